#!/usr/bin/env python3
"""Request-path benchmark (issue 10): direct to the engine vs llm-router vs LiteLLM's proxy, one run, interleaved.

    make bench-proxy                      # = PYTHONPATH=. .venv/bin/python bench/proxy_bench.py
    PYTHONPATH=. .venv/bin/python bench/proxy_bench.py [--rounds 3] [--tokens 64] [--streams 32,64] [--single 20]
        [--switches 6] [--no-litellm] [--engine fast|stdlib] [--profile DIR] [--out docs/benchmarks.md]
        [--router-port 18800] [--litellm-port 18810]

What runs (ports 18800-18819 only): a fake llama-server, unthrottled (FAKE_TOKEN_DELAY=0, --tokens per stream;
`--engine fast`: bench/fast_engine.py, the default, because the project's stdlib fake is itself the bottleneck at
64 streams; `--engine stdlib`: files/fake_engines), run as the unit of model `m1` by the project's systemctl
stand-in (tests/fakes/fake_systemd.py) and pre-loaded through the router; the router (`python -m router_app serve`,
what `llm-router serve` runs, at --router-port, its own defaults except the e2e harness's ports and timeouts); LiteLLM's
proxy (scripts/litellm-venv, pinned, its own venv; at --litellm-port) pointed at the same engine port. A second model
`m2` on the same engine port conflicts with `m1` (no `needs`: one engine at a time) for the switch measurement.

The load generator is asyncio with raw protocols (a hand-rolled chunked decoder; JSON is parsed only until a stream's
first content token), one connection per stream, in this process; its own CPU is reported. Each round runs, for
direct, router and LiteLLM in turn: --single sequential 1-stream requests, two bursts of 32 concurrent streams, then
--load-bursts bursts of 64 concurrent streams while the proxy's and the engine's CPU (utime+stime from /proc/PID/stat,
process tree) and the proxy's VmRSS (sampled every 20 ms) are recorded. Figures:
- added first-token latency = p50 (p99) of the proxy's time to first content token - direct's, in the same round;
- SSE events/s at 64 streams = `data:` events delivered / wall time of the bursts, and its ratio to direct's;
- CPU per streamed event = CPU seconds of the proxy (engine, load generator) over the bursts / events delivered;
- RSS idle (before the round) and under load (max sampled during the 64-stream bursts);
- switch overhead (router only): time to first content token of a request that needs m1 -> m2 (or back) minus the
  engine's own switch measured directly just before with the same fake systemctl (`systemctl stop`, `systemctl
  start`, /health polled every 10 ms until 200, then direct time to first token: bench/switch_bench.py's
  `direct_switch`); and the time from sending that request to its first SSE data chunk (the router's status line).
Medians over rounds with the spread (min - max) in brackets. `--profile DIR`: after the rounds, py-spy records the
router during --profile-seconds of 64-stream bursts (speedscope file in DIR) and the top functions by own and total
samples are printed and written to DIR/top-functions.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.switch_bench import Target as SwitchTarget
from bench.switch_bench import direct_switch, log, publish
from tests.e2e.conftest import ModelSpec, RouterEnv, unit_of
from tests.fakes.fake_units import fake_python

REPO = Path(__file__).resolve().parent.parent
FAST_ENGINE = REPO / "bench" / "fast_engine.py"
PORTS = range(18800, 18820)
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB_TO_MIB = 1 / 1024  # VmRSS is in kB


# ----------------------------------------------------------------------------------------------------------------
# load generator


@dataclass
class Stream:
    t_send: float
    t_first_event: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None
    events: int = 0
    status: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        assert self.t_first_token is not None
        return self.t_first_token - self.t_send


def has_content(payload: bytes) -> bool:
    try:
        event = json.loads(payload)
    except ValueError:
        return False
    for choice in event.get("choices") or [] if isinstance(event, dict) else []:
        content = (choice.get("delta") or {}).get("content")
        if isinstance(content, str) and content:
            return True
    return False


class SSEClient(asyncio.Protocol):
    """One streamed request on its own connection: status line, headers, then the body (chunked, Content-Length or
    close-delimited); counts `data:` events and notes the first event and the first content token."""

    def __init__(self, request: bytes, result: Stream, done: asyncio.Future[None]) -> None:
        self.request = request
        self.r = result
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.left: int | None = None  # Content-Length bytes still to come
        self.raw = b""  # undecoded chunked framing
        self.remaining = 0  # bytes left in the current chunk
        self.crlf = False  # the CRLF after a chunk's data is due
        self.pending = b""  # decoded payload after the last complete event
        self.body_text = b""  # non-200 answers, for the error message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.head[:end].decode("latin-1").split("\r\n")
            data, self.head = self.head[end + 4 :], b""
            self.in_body = True
            self.r.status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip().lower() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            self.chunked = "chunked" in headers.get("transfer-encoding", "")
            if "content-length" in headers:
                self.left = int(headers["content-length"])
        if self.r.status != 200:
            self.body_text += data
            return
        if self.chunked:
            self.dechunk(data)
        else:
            self.payload(data)
            if self.left is not None:
                self.left -= len(data)
                if self.left <= 0:
                    self.finish()

    def dechunk(self, data: bytes) -> None:
        buf = self.raw + data if self.raw else data
        pos, n, parts = 0, len(buf), []
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                parts.append(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                continue
            if self.crlf:
                if n - pos < 2:
                    break
                pos += 2
                self.crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                self.payload(b"".join(parts))
                self.finish()
                return
            self.remaining, self.crlf = size, True
        self.raw = buf[pos:]
        if parts:
            self.payload(b"".join(parts))

    def payload(self, data: bytes) -> None:
        self.pending += data
        end = self.pending.rfind(b"\n\n")
        if end < 0:
            return
        complete, self.pending = self.pending[: end + 2], self.pending[end + 2 :]
        r = self.r
        if r.t_first_token is not None:  # the hot path: count, parse nothing
            r.events += complete.count(b"data:")
            return
        now = time.perf_counter()
        for block in complete.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not block.startswith(b"data:"):
                continue  # comments (`: keep-alive`) and blanks
            r.events += 1
            if r.t_first_event is None:
                r.t_first_event = now
            if r.t_first_token is None and has_content(block[5:].strip()):
                r.t_first_token = now

    def finish(self) -> None:
        if self.r.t_end is None:
            self.r.t_end = time.perf_counter()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.r.t_end is None:
            if self.r.status == 200 and self.chunked:
                self.r.error = f"connection lost mid-stream: {exc}"
            elif self.r.status != 200:
                self.r.error = f"HTTP {self.r.status}: {self.body_text[:200]!r}"
            else:
                self.payload(b"\n\n")  # close-delimited body
        self.finish()


def chat_request(port: int, model: str, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "The history of the bicycle begins"}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (port, len(body), body)
    )


async def stream(port: int, request: bytes) -> Stream:
    loop = asyncio.get_running_loop()
    result = Stream(t_send=time.perf_counter())
    done: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(lambda: SSEClient(request, result, done), "127.0.0.1", port)
        await done
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def burst(port: int, request: bytes, n: int) -> list[Stream]:
    results = await asyncio.gather(*(stream(port, request) for _ in range(n)))
    bad = [r.error or "no content token" for r in results if r.error or r.t_first_token is None]
    if bad:
        raise RuntimeError(f"port {port}: {len(bad)} of {n} streams failed, e.g. {bad[0]}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# process figures from /proc


def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total * KIB_TO_MIB


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------------------------------------------
# one round for one target


@dataclass
class Proxy:
    name: str
    port: int
    pid: Callable[[], int | None]  # the proxy's process (None: direct, no proxy)


@dataclass
class Round:
    ttft1: list[float] = field(default_factory=list)
    ttft32: list[float] = field(default_factory=list)
    events: int = 0
    wall: float = 0.0
    cpu_proxy: float | None = None
    cpu_engine: float = 0.0
    cpu_loadgen: float = 0.0
    rss_idle: float | None = None
    rss_load: float | None = None

    @property
    def eps(self) -> float:
        return self.events / self.wall


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def measure(path: Proxy, engine_pid: int, args: argparse.Namespace) -> Round:
    request = chat_request(path.port, "m1", args.tokens)
    pid = path.pid()
    out = Round(rss_idle=rss_mib(pid) if pid else None)
    for _ in range(args.single):
        out.ttft1.append((await burst(path.port, request, 1))[0].ttft)
    for _ in range(2):
        out.ttft32 += [r.ttft for r in await burst(path.port, request, args.mid_streams)]
    peak = [0.0]
    sampling = True

    async def sample() -> None:
        while sampling and pid:
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    cpu0 = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(engine_pid), self_cpu())
    t0 = time.perf_counter()
    for _ in range(args.load_bursts):
        out.events += sum(r.events for r in await burst(path.port, request, args.load_streams))
    out.wall = time.perf_counter() - t0
    cpu1 = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(engine_pid), self_cpu())
    sampling = False
    await sampler
    out.cpu_proxy = cpu1[0] - cpu0[0] if pid else None
    out.cpu_engine, out.cpu_loadgen = cpu1[1] - cpu0[1], cpu1[2] - cpu0[2]
    out.rss_load = peak[0] if pid else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# the processes


def engine_env(args: argparse.Namespace) -> dict[str, str]:
    return {
        "FAKE_TOKENS": str(args.tokens),
        "FAKE_TOKEN_DELAY": "0",
        "FAKE_LOAD_SECONDS": str(args.switch_load),
        "FAKE_ACCESS_LOG": "0",
        "FAKE_EVENT_LOG": "",
    }


def start_router(args: argparse.Namespace, tmp: Path) -> RouterEnv:
    env = engine_env(args)
    specs = [ModelSpec(m, "llamacpp", env=env) for m in ("m1", "m2")]
    router = RouterEnv(tmp / "router", specs, {"load_timeout": 60, "shutdown_grace": 5}, base_port=args.router_port)
    # The e2e harness's fast status/keep-alive intervals and footer settings are test settings: use the router's own
    # defaults for everything on the request path.
    config = {
        k: v
        for k, v in router.config.items()
        if k not in ("status_channel", "speed_footer", "progress_interval", "keepalive_interval")
    }
    router.write_config(config)
    if args.engine == "fast":
        for m in ("m1", "m2"):
            argv = [
                fake_python(),
                "-I",
                str(FAST_ENGINE),
                "-m",
                m,
                "--host",
                "127.0.0.1",
                "--port",
                str(args.router_port + 1),
                "-ngl",
                "999",
            ]
            router.systemd.define_unit(unit_of(m), argv, env=env)
    router.start()
    return router


def engine_pid(router: RouterEnv, model: str) -> int:
    pid = int(router.systemd.show(unit_of(model), "MainPID").get("MainPID") or 0)
    if not pid:
        raise RuntimeError(f"{unit_of(model)} has no main pid")
    return pid


def litellm_venv() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "litellm-venv")], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"scripts/litellm-venv failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


def litellm_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_litellm(venv: Path, args: argparse.Namespace, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "litellm.yaml"
    engine = f"http://127.0.0.1:{args.router_port + 1}/v1"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "model_list": [
                    {
                        "model_name": "m1",
                        "litellm_params": {"model": "openai/m1", "api_base": engine, "api_key": "none"},
                    }
                ],
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }
        )
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    log = (tmp / "litellm.log").open("wb")
    proc = subprocess.Popen(
        [
            str(venv / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(args.litellm_port),
            "--num_workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited {proc.returncode}: {(tmp / 'litellm.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{args.litellm_port}/health/liveliness", timeout=2).status_code == 200:
                return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("litellm did not come up in 180 s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# switches and profile


async def switches(router: RouterEnv, args: argparse.Namespace) -> list[dict[str, float]]:
    """Alternating m1 <-> m2 through the router, each preceded by the same switch made directly (there and back)."""
    sd = router.systemd
    target = SwitchTarget(
        "host",
        router.base + "/v1",
        f"http://127.0.0.1:{args.router_port + 1}",
        sd.systemctl_argv(),
        {m: unit_of(m) for m in ("m1", "m2")},
        inner_systemctl=sd.systemctl_argv(),
    )
    rows = []
    loaded = "m1"
    with httpx.Client(timeout=httpx.Timeout(connect=5, read=None, write=30, pool=None)) as client:
        for _ in range(args.switches):
            other = "m2" if loaded == "m1" else "m1"
            there = direct_switch(client, target, loaded, other, 4)
            direct_switch(client, target, other, loaded, 4)  # back, so the router's view is true again
            result = (await burst(args.router_port, chat_request(args.router_port, other, 4), 1))[0]
            assert result.t_first_event is not None
            rows.append(
                {
                    "direct": there["total"],
                    "router": result.ttft,
                    "overhead": result.ttft - there["total"],
                    "first_chunk": result.t_first_event - result.t_send,
                    "stop": there["stop"],
                    "start_to_ready": there["start_to_ready"],
                }
            )
            loaded = other
    if loaded != "m1":  # leave m1 loaded
        await burst(args.router_port, chat_request(args.router_port, "m1", 4), 1)
    return rows


def start_py_spy(pid: int, out_dir: Path) -> tuple[subprocess.Popen[bytes], Path] | str:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not spy:
        return "py-spy not found: `make venv` installs it (dev extra)"
    out_dir.mkdir(parents=True, exist_ok=True)
    speedscope = out_dir / "router-64-streams.speedscope.json"
    # Blocking mode (py-spy pauses the process for each sample): --nonblocking gave ~half the stacks cut short.
    argv = [spy, "record", "--pid", str(pid), "--format", "speedscope", "--rate", "200", "--output", str(speedscope)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), speedscope


def stop_py_spy(proc: subprocess.Popen[bytes], speedscope: Path, top: int) -> list[str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if not speedscope.exists():
        return [f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"]
    lines = top_functions(json.loads(speedscope.read_text()), top)
    (speedscope.parent / "top-functions.txt").write_text("\n".join(lines) + "\n")
    return lines


async def profile(router: RouterEnv, args: argparse.Namespace) -> list[str]:
    """py-spy on the router while 64-stream bursts run for --profile-seconds (not during the measured rounds: a
    sampling profiler that pauses the process would distort them)."""
    assert router.process is not None
    started = start_py_spy(router.process.pid, Path(args.profile))
    if isinstance(started, str):
        return [started]
    await asyncio.sleep(1.0)  # attached
    request = chat_request(args.router_port, "m1", args.tokens)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.profile_seconds:
        await burst(args.router_port, request, args.load_streams)
    return stop_py_spy(*started, args.profile_top)


def top_functions(data: dict[str, Any], n: int) -> list[str]:
    """Own (leaf) and total (anywhere on the stack, once per sample) samples per function, and own samples per
    package, from py-spy's speedscope output (busy samples only: py-spy leaves idle threads out unless --idle)."""
    frames = data["shared"]["frames"]
    keys: dict[tuple[str, str], int] = {}
    key_of = [keys.setdefault((f["name"], short(f.get("file", ""))), len(keys)) for f in frames]
    own: Counter[int] = Counter()
    total: Counter[int] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for prof in data["profiles"]:
        for stack in prof["samples"]:
            if not stack:
                continue
            samples += 1
            own[key_of[stack[-1]]] += 1
            packages[package(short(frames[stack[-1]].get("file", "")))] += 1
            for k in {key_of[f] for f in stack}:
                total[k] += 1
    if not samples:
        return ["py-spy recorded no busy samples"]
    names = {v: f"{name} ({file})" for (name, file), v in keys.items()}

    def share(count: int) -> str:
        return f"{100 * count / samples:.1f}"

    lines = [
        f"{samples} busy samples of the router (py-spy record, 200 Hz, during 64-stream bursts).",
        "",
        "| own % | total % | function (by own samples) |",
        "|---|---|---|",
    ]
    lines += [f"| {share(c)} | {share(total[k])} | `{names[k]}` |" for k, c in own.most_common(n)]
    # by total, without the frames every sample passes through (event loop, entry point)
    inclusive = [(k, c) for k, c in total.most_common() if c < 0.95 * samples][:n]
    lines += ["", "| total % | own % | function (by total samples, below the event loop) |", "|---|---|---|"]
    lines += [f"| {share(c)} | {share(own[k])} | `{names[k]}` |" for k, c in inclusive]
    big = [(p, c) for p, c in packages.most_common() if c >= 0.005 * samples]
    rest = samples - sum(c for _, c in big)
    lines += [
        "",
        "Own samples by package: " + ", ".join(f"{p} {share(c)} %" for p, c in big) + f", rest {share(rest)} %",
    ]
    return lines


def short(file: str) -> str:
    """site-packages/hypercorn/x.py -> hypercorn/x.py; .../lib/python3.11/asyncio/x.py -> asyncio/x.py."""
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    if "/router_app/" in file:
        return "router_app/" + file.split("/router_app/", 1)[1]
    if "/lib/python3" in file:
        return file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return file


def package(file: str) -> str:
    top = file.split("/", 1)[0]
    return "stdlib/other" if not top or top.endswith(".py") or top.startswith("<") else top


# ----------------------------------------------------------------------------------------------------------------
# report


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "–"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))} – {fmt.format(max(values))})"


def table(
    names: list[str],
    rounds: dict[str, list[Round]],
    sw: list[dict[str, float]],
    args: argparse.Namespace,
    header: list[str],
) -> str:
    direct = rounds["direct"]

    def added(name: str, pick: Callable[[Round], list[float]], q: float) -> str:
        if name == "direct":
            return "–"
        diffs = [1000 * (pct(pick(r), q) - pct(pick(d), q)) for r, d in zip(rounds[name], direct, strict=True)]
        return spread(diffs, "{:+.1f}") + " ms"

    def absolute(name: str, pick: Callable[[Round], list[float]], q: float) -> str:
        return spread([1000 * pct(pick(r), q) for r in rounds[name]], "{:.1f}") + " ms"

    def per_event(name: str, cpu: Callable[[Round], float | None]) -> str:
        values = [1e6 * c / r.events for r in rounds[name] if (c := cpu(r)) is not None]
        return spread(values, "{:.0f}") + " µs" if values else "–"

    def eps(name: str) -> str:
        ratios = [r.eps / d.eps for r, d in zip(rounds[name], direct, strict=True)]
        return f"{spread([r.eps for r in rounds[name]], '{:,.0f}')}/s; **{spread(ratios, '{:.2f}')}**"

    def rss(name: str) -> str:
        if name == "direct":
            return "–"
        idle = [r.rss_idle for r in rounds[name] if r.rss_idle is not None]
        load = [r.rss_load for r in rounds[name] if r.rss_load is not None]
        return f"{spread(idle, '{:.0f}')} / {spread(load, '{:.0f}')} MiB"

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("added first-token p50, 1 stream", lambda n: added(n, lambda r: r.ttft1, 0.5)),
        (f"added first-token p50, {args.mid_streams} streams", lambda n: added(n, lambda r: r.ttft32, 0.5)),
        (f"added first-token p99, {args.mid_streams} streams", lambda n: added(n, lambda r: r.ttft32, 0.99)),
        (f"SSE events/s at {args.load_streams} streams; vs direct", eps),
        ("proxy CPU per streamed event", lambda n: per_event(n, lambda r: r.cpu_proxy)),
        ("proxy RSS idle / under load", rss),
        ("(first-token p50, 1 stream, absolute)", lambda n: absolute(n, lambda r: r.ttft1, 0.5)),
        (
            f"(first-token p50 / p99, {args.mid_streams} streams, absolute)",
            lambda n: absolute(n, lambda r: r.ttft32, 0.5) + " / " + absolute(n, lambda r: r.ttft32, 0.99),
        ),
        (f"(engine CPU per event at {args.load_streams} streams)", lambda n: per_event(n, lambda r: r.cpu_engine)),
        (
            f"(load generator CPU per event at {args.load_streams} streams)",
            lambda n: per_event(n, lambda r: r.cpu_loadgen),
        ),
        (
            f"(events per {args.load_streams}-stream burst)",
            lambda n: spread([r.events / args.load_bursts for r in rounds[n]], "{:,.0f}"),
        ),
    ]
    lines = ["| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(n) for n in names) + " |")
    if sw:
        rest = " | –" * (len(names) - 2)
        lines.append(
            f"| switch overhead over the engine's own stop + start-to-ready + first token, median "
            f"({len(sw)} switches) | – | {spread([s['overhead'] for s in sw], '{:+.3f}')} s{rest} |"
        )
        lines.append(
            f"| first SSE chunk of a switching request (status line) | – | "
            f"{spread([1000 * s['first_chunk'] for s in sw], '{:.1f}')} ms{rest} |"
        )
        lines.append(
            f"| (engine's own switch, direct: stop / start-to-ready / total) | "
            f"{spread([s['stop'] for s in sw], '{:.3f}')} / {spread([s['start_to_ready'] for s in sw], '{:.3f}')}"
            f" / {spread([s['direct'] for s in sw], '{:.3f}')} s | "
            f"router TTFT {spread([s['router'] for s in sw], '{:.3f}')} s{rest} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, load average {load[0]:.2f}"


# ----------------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path) -> str:
    started = dt.datetime.now(dt.timezone.utc)
    machine_start = machine()
    venv = None if args.no_litellm else litellm_venv()
    router = start_router(args, tmp)
    litellm: subprocess.Popen[bytes] | None = None
    try:
        await burst(args.router_port, chat_request(args.router_port, "m1", 4), 1)  # pre-load m1
        engine = engine_pid(router, "m1")
        assert router.process is not None
        router_pid = router.process.pid
        paths = [
            Proxy("direct", args.router_port + 1, lambda: None),
            Proxy("router", args.router_port, lambda: router_pid),
        ]
        header = ["direct to the engine", "llm-router"]
        if venv is not None:
            log(f"starting LiteLLM from {venv}")
            litellm = start_litellm(venv, args, tmp)
            pid = litellm.pid
            paths.append(Proxy("litellm", args.litellm_port, lambda: pid))
            header.append(f"LiteLLM proxy {litellm_version(venv)}")
        else:
            log("--no-litellm: LiteLLM skipped")
        for p in paths:  # warm-up: connections, imports, first-request caches
            await burst(p.port, chat_request(p.port, "m1", args.tokens), 4)
        rounds: dict[str, list[Round]] = {p.name: [] for p in paths}
        for i in range(args.rounds):
            for p in paths:
                r = await measure(p, engine, args)
                rounds[p.name].append(r)
                log(
                    f"round {i + 1}/{args.rounds} {p.name}: ttft1 p50 {1000 * pct(r.ttft1, 0.5):.1f} ms, "
                    f"ttft{args.mid_streams} p99 {1000 * pct(r.ttft32, 0.99):.1f} ms, {r.eps:,.0f} events/s, "
                    f"CPU s: proxy {r.cpu_proxy or 0:.2f}, engine {r.cpu_engine:.2f}, loadgen {r.cpu_loadgen:.2f}"
                )
        if litellm is not None:
            stop_process(litellm)
            litellm = None
        profile_lines = await profile(router, args) if args.profile else []
        sw = await switches(router, args) if args.switches else []
        for s in sw:
            log(
                f"switch: direct {s['direct']:.3f} s, router {s['router']:.3f} s, overhead {s['overhead']:+.3f} s, "
                f"first chunk {1000 * s['first_chunk']:.1f} ms"
            )
    finally:
        if litellm is not None:
            stop_process(litellm)
        router.stop()
    names = [p.name for p in paths]
    command = "bench/proxy_bench.py " + " ".join(sys.argv[1:])
    engine_desc = (
        "bench/fast_engine.py (asyncio)"
        if args.engine == "fast"
        else "files/fake_engines llama-server (stdlib, threads)"
    )
    text = [
        f"#### Request path: {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine_start} at start, {os.getloadavg()[0]:.2f} at end. Engine: {engine_desc}, unthrottled "
        f"(FAKE_TOKEN_DELAY=0), {args.tokens} tokens per stream, under the fake systemctl. {args.rounds} interleaved "
        f"rounds; per round and path: {args.single} sequential 1-stream requests, 2 bursts of {args.mid_streams} "
        f"streams, {args.load_bursts} burst(s) of {args.load_streams} streams. Median over rounds (min – max). "
        f"Command: `{command}`.",
        "",
        table(names, rounds, sw, args, header),
    ]
    if profile_lines:
        text += [
            "",
            "Profile of the router during the 64-stream bursts (py-spy, own = in the function itself, total ="
            " including what it calls):",
            "",
            *profile_lines,
        ]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=20, help="sequential 1-stream requests per round")
    parser.add_argument("--mid-streams", type=int, default=32)
    parser.add_argument("--load-streams", type=int, default=64)
    parser.add_argument("--load-bursts", type=int, default=3)
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--switch-load", type=float, default=0.5, help="the fake engine's FAKE_LOAD_SECONDS")
    parser.add_argument("--engine", choices=["fast", "stdlib"], default="fast")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--router-port", type=int, default=18800, help="the engine listens on the next port")
    parser.add_argument("--litellm-port", type=int, default=18810)
    parser.add_argument("--profile", metavar="DIR")
    parser.add_argument("--profile-seconds", type=float, default=10)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="append the result to this file (e.g. docs/benchmarks.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    used = [args.router_port + i for i in range(5)] + [args.litellm_port]
    if any(p not in PORTS for p in used):
        raise SystemExit(f"ports {used} must lie in {PORTS.start}-{PORTS.stop - 1}")
    tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    try:
        result = asyncio.run(run(args, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    publish(result, args.out)


if __name__ == "__main__":
    main()
