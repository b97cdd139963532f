"""The switch storm (issue 11, item 1): scenario, clients, checks and figures, in one place for the CI-sized test
(tests/e2e/test_storm.py) and the full-size bench script (bench/storm.py).

Scenario: one router (RouterEnv: `llm-router serve` on 127.0.0.1, fake engines under the fake systemctl), resources
`{gpu: 10}` and three models on fake engines that load in 0.2 s:
- `chat-a` (llama-server, `needs: {gpu: 5}`) and `embed` (its own llama-server, `needs: {gpu: 5}`, `idle_unload: 1`)
  run side by side (co-resident by `needs`);
- `chat-x` (SGLang, no `needs`: it needs every resource) is exclusive: it runs alone, so every change between it and
  the other two is a switch.
Each of `clients` threads sends `requests` requests one after another, each a random choice of streamed and
non-streamed chat and legacy completions (to `chat-a` or `chat-x`), embeddings (to `embed`), a stream it leaves
after its first few content chunks, and a stream it leaves while it waits for a switch (after the first or second
status line; when it was not made to wait it leaves after its first content chunks instead). Between requests a
client pauses 0-50 ms, sometimes 1-1.5 s (a user reading). Then the idle race (`idle_race`): embeddings one at a
time ~1 s apart, to meet `embed`'s idle stop under way (during the storm the exclusive model evicts it first).

Pass criteria (`check`, each a line in `StormResult.problems`):
- clients: 0 failed requests other than the deliberate disconnects, 0 truncated answers (every stream not left
  ends with its one finish chunk and `[DONE]`), every answer equals the fake engine's text exactly (status block
  and speed footer checked for their form and taken off; embeddings equal the fake's vector for the input);
- engines (their event logs): no engine process started while one of the same model still ran, `chat-x` never ran
  beside `chat-a` or `embed`, and those two did run side by side;
- the router's own account (its log, replayed by `SwitchReplay`): no unit started while its stop was
  unfinished, no two loads of one model at once, every stop justified (a switch stop only while a request for a
  conflicting model waited; an idle stop only of `embed`, after at least 1 s without a request per its engine's
  log), every waiting request served by the first load of its model that completed after it arrived (grouping),
  and unit starts <= 1.2 x the minimum the admission order needs (`SwitchReplay.needed`, defined there);
- after the storm: nothing in flight and nothing waiting (`/health`), and `/metrics` agrees with the clients and
  the engines: `llm_router_requests_total` per model and outcome equals the clients' own counts (answers `ok`,
  disconnects `cancelled`, nothing else), loads equal
  engine starts, unloads equal engine stops.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.e2e.conftest import REPO, ModelSpec, RouterEnv, unit_of, wait_until

CHAT_A, EMBED, CHAT_X = "chat-a", "embed", "chat-x"
MODEL_IDS = (CHAT_A, EMBED, CHAT_X)
CAPACITY = 10.0
NEEDS = {CHAT_A: 5.0, EMBED: 5.0, CHAT_X: CAPACITY}
IDLE_MODEL = EMBED
IDLE_UNLOAD = 1.0
LOAD_SECONDS = 0.2
EMBED_DIM = 8
START_FACTOR = 1.2
"""Unit starts may exceed the minimum the admission order needs by this factor at most."""

KINDS: dict[str, int] = {
    # kind: weight (out of 100)
    "chat-stream": 22,
    "chat": 14,
    "completion-stream": 14,
    "completion": 10,
    "embedding": 24,
    "leave-mid-answer": 9,
    "leave-waiting": 7,
}
LEAVING_TOKENS = 80
"""Answers a client leaves are this long (10 ms a token): the router notices the disconnect long before the end."""
CONTENT_CHUNKS_BEFORE_LEAVING = 3

FOOTER = re.compile(r"\n\n⚡ \d+\.\d tok/s \((\d+) tokens? in \d+\.\ds\)\Z")
STATUS_BLOCK = re.compile(r"\A(?:(?:🔀|⏳) [^\n]+\n)*✅ [^\n]+ ready in \d+(?:\.\d)? s\n\n\Z")


def conflicts() -> dict[str, set[str]]:
    """Models that cannot run together (their needs exceed the capacity)."""
    return {m: {o for o in MODEL_IDS if o != m and NEEDS[m] + NEEDS[o] > CAPACITY} for m in MODEL_IDS}


def storm_models(base_port: int) -> list[ModelSpec]:
    """The three models; engine ports base_port+1 (llama-server), +2 (SGLang) and +5 (embed's own)."""
    load = {"FAKE_LOAD_SECONDS": str(LOAD_SECONDS)}
    return [
        ModelSpec(CHAT_A, "llamacpp", env=load, extra={"needs": {"gpu": NEEDS[CHAT_A]}}),
        ModelSpec(
            EMBED,
            "llamacpp",
            port=base_port + 5,
            env=load,
            extra={"needs": {"gpu": NEEDS[EMBED]}, "idle_unload": IDLE_UNLOAD},
        ),
        ModelSpec(CHAT_X, "sglang", env=load),
    ]


STORM_CONFIG: dict[str, Any] = {"resources": {"gpu": CAPACITY}, "queue_limit": 200}
"""config.yml keys of the storm's router (beyond RouterEnv's defaults)."""


def expected_text(tokens: int) -> str:
    """The fake engine's answer to `[[tokens:N]]`."""
    return "".join(f"tok{i}" if i == 1 else f" tok{i}" for i in range(1, tokens + 1))


@functools.cache
def _load_fake_engine() -> Any:
    spec = importlib.util.spec_from_file_location("fake_engine", REPO / "files/fake_engines/fake_engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- clients ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as its client saw it."""

    client: int
    index: int
    kind: str
    model: str
    started: float
    ended: float = 0.0
    left: str | None = None
    """`mid-answer` or `waiting` when the client disconnected on purpose."""
    waited: bool = False
    """A stream that got status lines (it waited for a switch)."""
    problem: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.truncated and self.left is None


class _Problem(Exception):
    def __init__(self, text: str, truncated: bool = False) -> None:
        super().__init__(text)
        self.truncated = truncated


def _events(response: httpx.Response) -> Iterator[Any]:
    """SSE data payloads as they arrive: a dict per JSON event, the string `[DONE]`; comments skipped."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                if len(data) > 1:
                    raise _Problem(f"an event of several data lines: {data!r}")
                payload = data[0]
                data = []
                yield "[DONE]" if payload == "[DONE]" else json.loads(payload)
            continue
        if not line.startswith("data: "):
            raise _Problem(f"not an SSE data line: {line!r}")
        data.append(line[len("data: ") :])
    if data:
        raise _Problem(f"stream ended inside an event: {data!r}", truncated=True)


def _piece(chunk: dict[str, Any], field_name: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    value = (choice.get("delta") or {}).get(field_name) if "delta" in choice else choice.get("text")
    return value if isinstance(value, str) else ""


def _is_router_chunk(chunk: dict[str, Any]) -> bool:
    return "-router-" in str(chunk.get("id", ""))


def _check_answer(kind: str, events: list[Any], tokens: int) -> bool:
    """Raise _Problem unless `events` are a whole stream whose answer is the engine's text; True if it waited."""
    if not events or events[-1] != "[DONE]":
        raise _Problem("the stream ended without [DONE]", truncated=True)
    if events.count("[DONE]") != 1:
        raise _Problem("[DONE] more than once")
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        raise _Problem(f"error events {errors}")
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e.get("choices")]
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"][0].get("finish_reason")]
    if finishes != ["stop"] or chunks[-1]["choices"][0].get("finish_reason") != "stop":
        raise _Problem(f"no single finish chunk at the end: {finishes}", truncated=True)
    if kind.startswith("chat"):
        status = "".join(_piece(c, "reasoning_content") for c in chunks)
        text = "".join(_piece(c, "content") for c in chunks)
    else:
        whole = "".join(_piece(c, "text") for c in chunks)
        status, text = "", whole
        if whole.startswith(("🔀", "⏳", "✅")):
            end = whole.find("\n\n") + 2
            status, text = whole[:end], whole[end:]
    if status and not STATUS_BLOCK.match(status):
        raise _Problem(f"status block {status!r}")
    footer = FOOTER.search(text)
    if footer is None or int(footer.group(1)) != tokens:
        raise _Problem(f"no speed footer for {tokens} tokens: {text[-80:]!r}")
    if text[: footer.start()] != expected_text(tokens):
        raise _Problem(f"answer {text[: footer.start()][:120]!r} is not the engine's {tokens} tokens", truncated=True)
    return bool(status)


class StormClient:
    """One client thread's requests; `outcomes` collects them."""

    def __init__(self, router: RouterEnv, number: int, requests: int, seed: int, record: Callable[[Outcome], None]):
        self.router = router
        self.number = number
        self.requests = requests
        self.rng = random.Random(seed * 1000 + number)
        self.record = record
        self.embedding: Callable[[str, int], list[float]] = _load_fake_engine().embedding_vector

    def run(self) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        with httpx.Client(base_url=self.router.base, timeout=httpx.Timeout(10, read=120)) as http:
            for index in range(self.requests):
                kind = self.rng.choices(kinds, weights)[0]
                model = EMBED if kind == "embedding" else self.rng.choice([CHAT_A, CHAT_X])
                self.attempt(http, Outcome(self.number, index, kind, model, time.monotonic()))
                pause = self.rng.uniform(1.0, 1.5) if self.rng.random() < 0.1 else self.rng.uniform(0, 0.05)
                time.sleep(pause)

    def attempt(self, http: httpx.Client, outcome: Outcome) -> None:
        """Send one request, note how it went, record it."""
        try:
            self.one(http, outcome)
        except _Problem as exc:
            outcome.problem, outcome.truncated = str(exc), exc.truncated
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            outcome.problem = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.monotonic()
        self.record(outcome)

    def one(self, http: httpx.Client, outcome: Outcome) -> None:
        tag = f"storm c{self.number} r{outcome.index}"
        if outcome.kind == "embedding":
            text = f"{tag} {self.rng.random()}"
            response = http.post("/v1/embeddings", json={"model": EMBED, "input": text})
            if response.status_code != 200:
                raise _Problem(f"HTTP {response.status_code} {response.text[:200]}")
            answer = response.json()
            vectors = [d["embedding"] for d in answer["data"]]
            if answer.get("model") != EMBED or vectors != [self.embedding(text, EMBED_DIM)]:
                raise _Problem(f"embedding {response.text[:200]}")
            return
        leaving = outcome.kind.startswith("leave")
        tokens = LEAVING_TOKENS if leaving else self.rng.randint(3, 12)
        chat = outcome.kind.startswith("chat") or (leaving and self.rng.random() < 0.6)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {"model": outcome.model}
        if chat:
            body["messages"] = [{"role": "user", "content": f"[[tokens:{tokens}]] {tag}"}]
        else:
            body["prompt"] = f"[[tokens:{tokens}]] {tag}"
        answer_kind = "chat" if chat else "completion"
        if not (leaving or outcome.kind.endswith("-stream")):
            self.complete(http, path, body, answer_kind, tokens)
            return
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise _Problem(f"HTTP {response.status_code} {response.read()[:200]!r}")
            events: list[Any] = []
            statuses = contents = 0
            leave_after = self.rng.randint(1, 2)
            for event in _events(response):
                events.append(event)
                if not isinstance(event, dict) or not event.get("choices"):
                    continue
                piece = _piece(event, "reasoning_content" if chat else "text")
                if _is_router_chunk(event) and piece.startswith(("🔀", "⏳")):
                    statuses += 1
                elif _piece(event, "content" if chat else "text").startswith(("tok", " tok")):
                    contents += 1
                if outcome.kind == "leave-waiting" and statuses >= leave_after and contents == 0:
                    outcome.left, outcome.waited = "waiting", True
                    return  # closing the response closes the connection: the client is gone
                if leaving and contents >= CONTENT_CHUNKS_BEFORE_LEAVING:
                    outcome.left, outcome.waited = "mid-answer", statuses > 0
                    return
            outcome.waited = _check_answer(answer_kind, events, tokens)

    def complete(self, http: httpx.Client, path: str, body: dict[str, Any], kind: str, tokens: int) -> None:
        response = http.post(path, json=body)
        if response.status_code != 200:
            raise _Problem(f"HTTP {response.status_code} {response.text[:200]}")
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        if text != expected_text(tokens) or choice.get("finish_reason") != "stop" or data["model"] != body["model"]:
            raise _Problem(f"answer {response.text[:200]}", truncated=choice.get("finish_reason") != "stop")


def run_clients(router: RouterEnv, clients: int, requests: int, seed: int) -> tuple[list[Outcome], float]:
    """Run the storm's clients to the end; the outcomes and the wall time."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def record(outcome: Outcome) -> None:
        with lock:
            outcomes.append(outcome)

    started = time.monotonic()
    threads = [
        threading.Thread(target=StormClient(router, n, requests, seed, record).run, name=f"storm-client-{n}")
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if any(t.is_alive() for t in threads):
        raise AssertionError("a storm client hung for 10 minutes")
    return outcomes, time.monotonic() - started


# ----- the router's log, replayed --------------------------------------------------------------------------------

_LINE = re.compile(r"^[A-Z]+ llm_router\.switcher: (.*)$")
_WAIT = re.compile(r"request #(\d+) for (\S+) waits \(\d+ waiting\)$")
_SERVE = re.compile(r"serving \d+ waiting request\(s\) for (\S+): (#\d+(?: #\d+)*)$")
_LEAVE = re.compile(r"request #(\d+) for (\S+) left the queue")
_FAIL = re.compile(r"failing \d+ waiting request\(s\) for (\S+): (#\d+(?: #\d+)*)$")
_LOAD = re.compile(r"loading (\S+): starting (\S+)$")
_READY = re.compile(r"model (\S+) ready in [\d.]+ s")
_STOP = re.compile(r"stopping (\S+) \((\w+)\)$")
_STOPPED = re.compile(r"stopped (\S+)$")
_TROUBLE = re.compile(r"could not stop|loading model .* failed|unexpected error|load #\d+")


@dataclass
class _Batch:
    model: str
    members: set[int] = field(default_factory=set)
    load_begun: bool = False


@dataclass
class SwitchReplay:
    """The switcher's decisions, replayed from its log lines in order (one asyncio thread writes them).

    **The minimum the admission order needs** (`needed`, per model): the number of *batches* of waiting requests.
    Requests served at once never need a load (their model was loaded). Walk the waiting requests in the order the
    router admitted them (`request #N for M waits`): a request for M joins M's open batch, or opens one when M has
    none. A batch of M stays open while one of its requests still waits or a load of M is under way: it is a chain
    of requests that waited together, each arriving while an earlier one still waited, so one load completing
    while they wait can serve them all (a correct router serves every waiting request of M when M becomes ready,
    which closes the batch). A batch counts when a load of M began or completed while it was open; one whose
    requests all left before any load of M began needs none.

    Why that is a minimum: a batch's first request waited while no earlier request for M waited, so M was not
    ready for it (stopped, stopping, or loaded but chosen to make room for an older group of a conflicting model:
    the no-starvation rule lets nobody overtake that group); so every counted batch needs a load during its open
    span, and two batches cannot share one: the later opened after the earlier closed. Hence
    `needed[M] <= starts[M]` for any router, and `starts[M] - needed[M]` counts loads beyond one per batch: a
    request left waiting when its model became ready and served by a later load (grouping broken), a pointless or
    duplicate load. Switches forced by the clients' order (alternations of conflicting models in admission order,
    after batching) and restarts after a genuine idle unload are in `needed`; needless stops are not, and are
    refused separately (`problems`).
    """

    needed: Counter[str] = field(default_factory=Counter)
    loads: Counter[str] = field(default_factory=Counter)
    stops: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(model, reason) of every stop the router began."""
    stop_reasons: dict[str, list[str]] = field(default_factory=dict)
    """Per model, the reason of each stop in order (to pair them with the engine's stop events)."""
    waited: int = 0
    left: int = 0
    raced_stops: Counter[str] = field(default_factory=Counter)
    """Requests admitted while their model's stop was under way, by the stop's reason (idle, switch)."""
    alternations: int = 0
    """Batches whose model conflicts with the previous batch's, in the order they opened."""
    max_waiting: int = 0
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(
        cls,
        log: str,
        conflicting: dict[str, set[str]],
        idle_models: set[str],
        units: dict[str, str] | None = None,
    ) -> SwitchReplay:
        """Replay a router log. `conflicting`: for every model id, the models it cannot run beside; `units`: model
        id by unit name (default: RouterEnv's `llm-backend-<id>.service`)."""
        replay = cls()
        lines = [m.group(1) for line in log.splitlines() if (m := _LINE.match(line))]
        replay._run(lines, conflicting, idle_models, units or {unit_of(m): m for m in conflicting})
        return replay

    def _run(
        self, lines: list[str], conflicting: dict[str, set[str]], idle_models: set[str], models: dict[str, str]
    ) -> None:
        waiting: dict[int, str] = {}
        batches: dict[str, _Batch] = {}
        loading: set[str] = set()
        loaded: set[str] = set()
        stopping: dict[str, str] = {}
        just_ready: dict[str, set[int]] = {}
        last_batch: str | None = None
        problems = self.problems

        def close_if_done(model: str) -> None:
            batch = batches.get(model)
            if batch is not None and not (batch.members & waiting.keys()) and model not in loading:
                del batches[model]
                self.needed[model] += batch.load_begun

        for line in lines:
            if match := _WAIT.match(line):
                number, model = int(match.group(1)), match.group(2)
                waiting[number] = model
                self.waited += 1
                self.max_waiting = max(self.max_waiting, len(waiting))
                if model in stopping:
                    self.raced_stops[stopping[model]] += 1
                if model not in batches:
                    batches[model] = _Batch(model)
                    if last_batch is not None and model in conflicting[last_batch]:
                        self.alternations += 1
                    last_batch = model
                batches[model].members.add(number)
            elif (match := _SERVE.match(line)) or (match := _FAIL.match(line)):
                model = match.group(1)
                numbers = {int(n) for n in match.group(2).replace("#", "").split()}
                strays = {n for n in numbers if waiting.get(n) != model}
                if strays:
                    problems.append(f"log: {line!r} names requests not waiting for {model}: {sorted(strays)}")
                if line.startswith("serving"):
                    if model not in loaded:
                        problems.append(f"log: requests for {model} served while it was not loaded: {line!r}")
                    missed = just_ready.pop(model, set()) & waiting.keys() - numbers
                    if missed:
                        problems.append(
                            f"grouping: requests {sorted(missed)} for {model} waited through its load without being "
                            "served by it"
                        )
                for number in numbers:
                    waiting.pop(number, None)
                close_if_done(model)
            elif match := _LEAVE.match(line):
                model = waiting.pop(int(match.group(1)), match.group(2))
                self.left += 1
                close_if_done(model)
            elif match := _LOAD.match(line):
                model = match.group(1)
                if model in loading or model in loaded:
                    state = "loading" if model in loading else "loaded"
                    problems.append(f"two loads of {model} at once: {line!r} while it was {state}")
                if model in stopping:
                    problems.append(f"{match.group(2)} started while its stop was unfinished")
                for other in conflicting[model] & (loading | loaded | set(stopping)):
                    problems.append(f"{model} started while the conflicting {other} still held its resources")
                loading.add(model)
                self.loads[model] += 1
                if model in batches:
                    batches[model].load_begun = True
                else:
                    problems.append(f"a load of {model} that no waiting request asked for")
            elif match := _READY.match(line):
                model = match.group(1)
                loading.discard(model)
                loaded.add(model)
                just_ready[model] = {n for n, m in waiting.items() if m == model}
                if model in batches:
                    batches[model].load_begun = True
                    close_if_done(model)  # else the serving line that follows closes it
            elif match := _STOP.match(line):
                model, reason = models.get(match.group(1), match.group(1)), match.group(2)
                if model not in loaded:
                    problems.append(f"stop of {model} while it was not loaded: {line!r}")
                if just_ready.get(model, set()) & waiting.keys():
                    problems.append(f"grouping: {model} stopped with requests still waiting for it since its load")
                loaded.discard(model)
                stopping[model] = reason
                self.stops[(model, reason)] += 1
                self.stop_reasons.setdefault(model, []).append(reason)
                if reason == "switch":
                    if not any(m in conflicting[model] for m in waiting.values()):
                        problems.append(f"needless switch stop of {model}: no request for a conflicting model waited")
                elif reason == "idle":
                    if model not in idle_models:
                        problems.append(f"idle stop of {model}, which has no idle_unload")
                    if model in waiting.values():
                        problems.append(f"idle stop of {model} while a request for it waited")
                else:
                    problems.append(f"unexpected stop: {line!r}")
            elif match := _STOPPED.match(line):
                stopping.pop(models.get(match.group(1), match.group(1)), None)
            elif _TROUBLE.search(line):
                problems.append(f"log: {line!r}")
        for model in list(batches):
            close_if_done(model)
        if waiting:
            problems.append(f"requests still waiting at the end of the log: {sorted(waiting)}")
        if batches or loading:
            problems.append(f"unfinished at the end of the log: batches {sorted(batches)}, loads {sorted(loading)}")


# ----- checks and figures ----------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text: every sample of every metric, with its labels."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return samples


def metric_counts(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, *keys: str) -> Counter[Any]:
    """Non-zero samples of `name` summed by the label values `keys` (a tuple of them, or the one value)."""
    counts: Counter[Any] = Counter()
    for labels, value in samples.get(name, []):
        key = tuple(labels.get(k, "") for k in keys)
        if value:
            counts[key if len(keys) > 1 else key[0]] += int(value)
    return counts


@dataclass
class StormResult:
    clients: int
    requests: int
    outcomes: list[Outcome]
    seconds: float
    replay: SwitchReplay
    starts: Counter[str]
    problems: list[str]
    race_requests: int = 0
    """Of `outcomes`, the idle-race phase's embeddings (`idle_race`)."""

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problem is not None and not o.truncated]

    @property
    def truncated(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.truncated]

    def table(self) -> str:
        """The figures as a markdown table."""
        by_kind = Counter(o.kind for o in self.outcomes)
        by_model = Counter(o.model for o in self.outcomes)
        left = Counter(o.left for o in self.outcomes if o.left)
        latencies = sorted(o.ended - o.started for o in self.outcomes if o.ok)
        p50 = statistics.median(latencies) if latencies else 0.0
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
        needed, starts = self.replay.needed, self.starts
        total_needed, total_starts = sum(needed.values()), sum(starts.values())
        per_model = " / ".join(f"{starts[m]} vs {needed[m]}" for m in MODEL_IDS)
        rows = [
            (
                "clients × requests each (+ idle-race embeddings)",
                f"{self.clients} × {self.requests} = {self.clients * self.requests} (+ {self.race_requests})",
            ),
            ("requests by kind (idle race included)", ", ".join(f"{k} {by_kind[k]}" for k in KINDS)),
            ("requests by model (idle race included)", ", ".join(f"{m} {by_model[m]}" for m in MODEL_IDS)),
            ("answered in full", str(sum(o.ok for o in self.outcomes))),
            ("disconnects (mid-answer / while waiting)", f"{left['mid-answer']} / {left['waiting']}"),
            ("failed (other than disconnects)", str(len(self.failed))),
            ("truncated answers", str(len(self.truncated))),
            ("requests that waited for a switch", str(self.replay.waited)),
            (
                "unit starts vs minimum (chat-a / embed / chat-x)",
                f"{per_model}; total {total_starts} vs {total_needed} "
                f"(×{total_starts / total_needed if total_needed else 0:.2f}, limit ×{START_FACTOR})",
            ),
            ("switches between conflicting models (after batching)", str(self.replay.alternations)),
            (
                "idle stops of embed / requests that arrived during an idle stop / during a switch stop",
                f"{self.replay.stops[(EMBED, 'idle')]} / {self.replay.raced_stops['idle']} / "
                f"{self.replay.raced_stops['switch']}",
            ),
            ("duration of the clients' part (without the idle race)", f"{self.seconds:.1f} s"),
            ("latency of full answers p50 / p99", f"{p50:.2f} s / {p99:.2f} s"),
            ("problems", str(len(self.problems))),
        ]
        return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def engine_timeline(router: RouterEnv) -> tuple[Counter[str], dict[str, list[float]], list[str], int]:
    """From the fake engines' event logs: starts per model, stop times per model, problems, and how many starts
    found a co-resident model running."""
    events = sorted(((e["ts"], m, e) for m in MODEL_IDS for e in router.events(m)), key=lambda row: row[0])
    alive: dict[str, set[int]] = {m: set() for m in MODEL_IDS}
    starts: Counter[str] = Counter()
    stops: dict[str, list[float]] = {m: [] for m in MODEL_IDS}
    problems: list[str] = []
    beside = 0
    conflicting = conflicts()
    for _, model, event in events:
        pid = event["pid"]
        if event["event"] == "start":
            if alive[model]:
                problems.append(f"engine of {model} started while pid {sorted(alive[model])} still ran")
            for other in conflicting[model]:
                if alive[other]:
                    problems.append(f"engine of {model} started while the conflicting {other} ran")
            beside += any(alive[o] for o in MODEL_IDS if o != model and o not in conflicting[model])
            alive[model].add(pid)
            starts[model] += 1
        elif event["event"] in ("stop", "exit") and pid in alive[model]:
            alive[model].discard(pid)
            stops[model].append(event["ts"])
    return starts, stops, problems, beside


def check(router: RouterEnv, outcomes: list[Outcome], seconds: float, clients: int, requests: int) -> StormResult:
    """Every pass criterion of the storm (see the module docstring); call after the clients have finished."""
    problems: list[str] = []
    for o in outcomes:
        if o.problem is not None:
            what = "truncated" if o.truncated else "failed"
            problems.append(f"{what}: client {o.client} request {o.index} ({o.kind}, {o.model}): {o.problem}")
    race = sum(o.client == clients for o in outcomes)
    if len(outcomes) != clients * requests + race:
        problems.append(f"{len(outcomes)} outcomes for {clients} × {requests} requests and {race} more")

    def settled() -> dict[str, Any] | None:
        health: dict[str, Any] = httpx.get(router.base + "/health", timeout=5).json()
        quiet = health["in_flight"] == 0 and health["waiting"] == 0 and health["state"] != "switching"
        # embed's idle unload is due 1 s after its last answer: wait for it (and its stop) to settle the counts.
        replay = SwitchReplay.parse(router.log(), conflicts(), {IDLE_MODEL})
        stops = sum(replay.stops.values())
        return (
            health
            if quiet
            and IDLE_MODEL not in health["loaded_models"]
            and router.log().count("INFO llm_router.switcher: stopped ") == stops
            else None
        )

    try:
        health = wait_until(settled, timeout=15, what="the router to settle after the storm", interval=0.1)
    except AssertionError as exc:
        health = httpx.get(router.base + "/health", timeout=5).json()
        problems.append(f"{exc}: /health {health}")
    samples = parse_metrics(httpx.get(router.base + "/metrics", timeout=5).text)
    log = router.log()
    replay = SwitchReplay.parse(log, conflicts(), {IDLE_MODEL})
    problems += replay.problems
    if "Traceback" in log:
        problems.append("a traceback in the router's log")

    starts, stop_times, engine_problems, beside = engine_timeline(router)
    problems += engine_problems
    if beside == 0:
        problems.append(f"{CHAT_A} and {EMBED} never ran side by side")
    for model in MODEL_IDS:
        if replay.loads[model] != starts[model]:
            problems.append(
                f"{model}: the router began {replay.loads[model]} loads, its engine started {starts[model]}"
            )
        reasons = replay.stop_reasons.get(model, [])
        if len(reasons) != len(stop_times[model]):
            problems.append(
                f"{model}: the router began {len(reasons)} stops, its engine stopped {len(stop_times[model])}"
            )
    # Every idle stop came after at least IDLE_UNLOAD s without a request, by the engine's own clock.
    requests_at = [e["ts"] for e in router.events(IDLE_MODEL, "request")]
    for reason, stopped_at in zip(replay.stop_reasons.get(IDLE_MODEL, []), stop_times[IDLE_MODEL], strict=False):
        if reason != "idle":
            continue
        last = max((t for t in requests_at if t < stopped_at), default=None)
        if last is not None and stopped_at - last < IDLE_UNLOAD:
            problems.append(f"{IDLE_MODEL} stopped as idle {stopped_at - last:.3f} s after a request")
    for model in MODEL_IDS:  # first in the list: the storm's headline criterion
        if not replay.needed[model] <= starts[model] <= START_FACTOR * replay.needed[model]:
            problems.insert(
                0,
                f"{model}: {starts[model]} unit starts, the admission order needs {replay.needed[model]} "
                f"(allowed up to ×{START_FACTOR})",
            )

    # /metrics against the clients and the engines.
    seen: Counter[tuple[str, str]] = Counter()
    for o in outcomes:
        if o.ok:
            seen[(o.model, "ok")] += 1
        elif o.left is not None:
            seen[(o.model, "cancelled")] += 1
    counted = metric_counts(samples, "llm_router_requests_total", "model", "outcome")
    if counted != seen:
        problems.append(f"/metrics requests_total {dict(counted)} != the clients' {dict(seen)}")
    loads_ok = metric_counts(samples, "llm_router_model_loads_total", "model", "outcome")
    if loads_ok != Counter({(m, "ok"): n for m, n in starts.items()}):
        problems.append(f"/metrics model_loads_total {dict(loads_ok)} != engine starts {dict(starts)}")
    unloads = metric_counts(samples, "llm_router_model_unloads_total", "model", "reason")
    if unloads != replay.stops:
        problems.append(f"/metrics model_unloads_total {dict(unloads)} != the stops in the log {dict(replay.stops)}")
    for model in MODEL_IDS:
        running = starts[model] - len(stop_times[model])
        gauge = metric_counts(samples, "llm_router_model_loaded", "model")[model]
        if gauge != running:
            problems.append(f"/metrics model_loaded{{model={model}}} {gauge}, engines running {running}")
    in_flight = metric_counts(samples, "llm_router_requests_in_flight", "model")
    if sum(in_flight.values()) or any(value for _, value in samples.get("llm_router_requests_waiting", [])):
        problems.append("/metrics shows requests in flight or waiting after the storm")
    if health["in_flight"] or health["waiting"]:
        problems.append(f"/health after the storm: {health}")
    return StormResult(clients, requests, outcomes, seconds, replay, starts, problems, race)


def idle_race(router: RouterEnv, client: int, count: int, seed: int) -> list[Outcome]:
    """After the storm, `count` embeddings one at a time, each sent 0.97-1.12 s after the previous answer: around
    the moment `embed`'s idle unload (1 s) fires, so that requests meet its idle stop under way (and just before
    and after it). Counted as client number `client`."""
    outcomes: list[Outcome] = []
    racer = StormClient(router, client, count, seed, outcomes.append)
    with httpx.Client(base_url=router.base, timeout=httpx.Timeout(10, read=120)) as http:
        for index in range(count):
            if index:
                time.sleep(IDLE_UNLOAD + racer.rng.uniform(-0.03, 0.12))
            racer.attempt(http, Outcome(client, index, "embedding", EMBED, time.monotonic()))
    return outcomes


def run_storm(router: RouterEnv, clients: int, requests: int, seed: int, race: int = 6) -> StormResult:
    """The storm's clients, then `race` idle-race embeddings, then every check."""
    outcomes, seconds = run_clients(router, clients, requests, seed)
    outcomes += idle_race(router, clients, race, seed)
    return check(router, outcomes, seconds, clients, requests)
