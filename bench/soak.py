#!/usr/bin/env python3
"""Soak: a real router process under mixed traffic with switches for N minutes (default 10), its memory and file
descriptors sampled every 10 s (a measurement script, not a test; issue 11, item 4).

Setup (tests/e2e's RouterEnv: `llm-router serve` on 127.0.0.1, the fake engines under the fake systemctl):
three models, resources {gpu: 10}: `chat-a` (fake llama-server, needs gpu 6) and `chat-b` (fake SGLang, needs
gpu 6) never run together, so every change between them is a switch; `embed` (fake llama-server on its own port,
needs gpu 2, idle_unload 2 s) runs beside either and is stopped when idle.

Traffic: `--clients` chat threads (default 6), each a random mix of streaming and non-streaming chat on chat-a or
chat-b (3-30 tokens), plus one embeddings thread sending bursts with pauses longer than embed's idle_unload, so it
is unloaded and loaded again all the time. Every answer is checked (status 200, the fake engine's full text, a
stream ends with [DONE] and no error event); anything else counts as an error.

Samples: the router process's VmRSS (/proc/PID/status) and its open descriptors (/proc/PID/fd; TCP sockets in
CLOSE-WAIT, closed by the client but not yet by the router, counted apart from /proc/net/tcp) every `--interval` s
(10). The first minute (`--warmup` s) is warm-up. At its end and at the end of the run the traffic pauses until
nothing is in flight and idle connections are gone (`--quiet-wait`, 25 s: longer than the router's keep-alive
timeout of 20 s for connections the clients leave open); those two quiet samples are compared.

Pass: RSS growth after warm-up < 5 % (quiet end vs quiet warm-up, and the largest loaded sample vs the first
loaded one after warm-up), quiet descriptor counts equal within --fd-tolerance (3), descriptors other than
CLOSE-WAIT under load without an upward trend (median of the last six samples <= median of the first six +
tolerance), 0 errors. Prints a table and a verdict; exits 1 on fail.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 6] [--interval 10] [--base-port 18370]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import tests.e2e.conftest as harness  # noqa: E402
from tests.e2e.conftest import ModelSpec, RouterEnv, StreamResult  # noqa: E402


def expected_text(tokens: int) -> str:
    return "".join(f"tok{i}" if i == 1 else f" tok{i}" for i in range(1, tokens + 1))


def proc_sample(pid: int) -> tuple[int, int, int]:
    """(VmRSS in KiB, open descriptors, of those TCP sockets in CLOSE-WAIT) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    inodes = set()
    fds = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        fds += 1
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    close_wait = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "08" and cols[9] in inodes:  # 08: CLOSE_WAIT (the peer closed, we did not yet)
                    close_wait += 1
    return rss, fds, close_wait


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1).split(",") for k, v in labels.items()):
            total += float(match.group(2))
    return total


class Traffic:
    def __init__(self, router: RouterEnv, clients: int, seed: int) -> None:
        self.router = router
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.chat_client, args=(seed + i,)) for i in range(clients)]
        self.threads.append(threading.Thread(target=self.embed_client, args=(seed + 1000,)))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def record(self, kind: str, problem: str | None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if problem:
                self.counts["errors"] += 1
                self.errors.append(f"{kind}: {problem}")

    def wait_if_paused(self) -> None:
        while self.paused.is_set() and not self.stop.is_set():
            time.sleep(0.05)

    def chat_client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.router.base, timeout=httpx.Timeout(10, read=120)) as client:
            while not self.stop.is_set():
                self.wait_if_paused()
                if self.stop.is_set():
                    return
                model = rng.choice(["chat-a", "chat-b"])
                tokens = rng.randint(3, 30)
                body: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"[[tokens:{tokens}]]"}],
                }
                try:
                    if rng.random() < 0.6:
                        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                            result = StreamResult.read(r)
                        problem = None
                        if result.status != 200 or result.errors or not result.done:
                            problem = f"stream {result.status} errors {result.errors} done {result.done}"
                        elif not result.text().startswith(expected_text(tokens) + "\n\n⚡ "):
                            problem = f"stream text {result.text()[:120]!r}"
                        self.record("stream", problem)
                    else:
                        response = client.post("/v1/chat/completions", json=body)
                        problem = None
                        if response.status_code != 200:
                            problem = f"HTTP {response.status_code} {response.text[:200]}"
                        elif response.json()["choices"][0]["message"]["content"] != expected_text(tokens):
                            problem = f"chat text {response.text[:120]!r}"
                        self.record("chat", problem)
                except (httpx.HTTPError, ValueError, KeyError, AssertionError) as exc:
                    self.record("chat", f"{type(exc).__name__}: {exc}")
                time.sleep(rng.random() * 0.3)

    def embed_client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.router.base, timeout=httpx.Timeout(10, read=120)) as client:
            while not self.stop.is_set():
                for _ in range(rng.randint(1, 5)):
                    self.wait_if_paused()
                    if self.stop.is_set():
                        return
                    try:
                        response = client.post("/v1/embeddings", json={"model": "embed", "input": f"x{rng.random()}"})
                        ok = response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 8
                        self.record("embed", None if ok else f"HTTP {response.status_code} {response.text[:200]}")
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        self.record("embed", f"{type(exc).__name__}: {exc}")
                # a pause longer than embed's idle_unload (2 s) half of the time
                self.stop.wait(rng.choice([0.5, 1.0, 3.0, 4.0]))


def quiet_sample(router: RouterEnv, traffic: Traffic, pid: int, wait: float) -> tuple[int, int, int]:
    """Pause the traffic, wait until nothing is in flight and idle connections are gone, sample.

    The clients expire idle connections after 5 s, the router's engine pool after 3 s; hypercorn notices a client's
    close of an idle keep-alive connection only at its keep_alive_timeout (75 s since the connection fixes): until
    then the socket stays open in CLOSE-WAIT. `wait` must exceed that to compare what the router really keeps."""
    traffic.paused.set()
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=router.base, timeout=5) as client:  # one connection for the polling
        while time.monotonic() < deadline:
            health = client.get("/health").json()
            if health.get("in_flight") == 0 and health.get("waiting") == 0:
                break
            time.sleep(0.2)
    time.sleep(wait)
    sample = proc_sample(pid)
    traffic.paused.clear()
    return sample


def run(args: argparse.Namespace, tmp: Path) -> int:
    models = [
        ModelSpec("chat-a", "llamacpp", env={"FAKE_LOAD_SECONDS": "0.3"}, extra={"needs": {"gpu": 6}}),
        ModelSpec("chat-b", "sglang", env={"FAKE_LOAD_SECONDS": "0.3"}, extra={"needs": {"gpu": 6}}),
        ModelSpec(
            "embed",
            "llamacpp",
            port=args.base_port + 5,
            env={"FAKE_LOAD_SECONDS": "0.2"},
            extra={"needs": {"gpu": 2}, "idle_unload": 2},
        ),
    ]
    router = RouterEnv(tmp, models, {"resources": {"gpu": 10}, "queue_limit": 200}, base_port=args.base_port)
    router.start()
    assert router.process is not None
    pid = router.process.pid
    traffic = Traffic(router, args.clients, args.seed)
    rows: list[tuple[float, str, int, int, int, int, int]] = []
    started = time.monotonic()
    total = args.minutes * 60
    quiet_warm: tuple[int, int, int] | None = None
    quiet_end: tuple[int, int, int] = (0, 0, 0)
    paused = 0.0  # seconds of quiet pauses: the run has --minutes of traffic, the table's t is traffic time
    try:
        traffic.start()
        next_sample = started
        while True:
            now = time.monotonic()
            elapsed = now - started - paused
            if elapsed >= total:
                break
            if quiet_warm is None and elapsed >= args.warmup:
                quiet_warm = quiet_sample(router, traffic, pid, args.quiet_wait)
                rows.append((elapsed, "quiet pause (warm-up end)", *quiet_warm, *requests(traffic)))
                paused += time.monotonic() - now
                next_sample = time.monotonic() + args.interval
                continue
            if now >= next_sample:
                rss, fds, close_wait = proc_sample(pid)
                phase = "warm-up" if elapsed < args.warmup else "load"
                rows.append((elapsed, phase, rss, fds, close_wait, *requests(traffic)))
                print(
                    f"  t={elapsed:5.0f}s rss={rss / 1024:.1f} MiB fds={fds} (close-wait {close_wait}) "
                    f"requests={requests(traffic)[0]}",
                    flush=True,
                )
                next_sample += args.interval
            time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        quiet_end = quiet_sample(router, traffic, pid, args.quiet_wait)
        rows.append((time.monotonic() - started - paused, "quiet pause (end)", *quiet_end, *requests(traffic)))
    finally:
        traffic.join()
        metrics = httpx.get(router.base + "/metrics", timeout=5).text
        health = httpx.get(router.base + "/health", timeout=5).json()
        log = router.log()
        router.stop()

    assert quiet_warm is not None, "the run must last longer than the warm-up (--minutes > 1)"
    loaded = [r for r in rows if r[1] == "load"]
    rss_growth = (quiet_end[0] - quiet_warm[0]) / quiet_warm[0] * 100
    load_growth = (max(r[2] for r in loaded) - loaded[0][2]) / loaded[0][2] * 100 if loaded else 0.0
    fd_delta = quiet_end[1] - quiet_warm[1]
    live = [r[3] - r[4] for r in loaded]
    first_live = statistics.median(live[:6]) if live else 0
    last_live = statistics.median(live[-6:]) if live else 0
    tracebacks = log.count("Traceback")
    names = ("chat-a", "chat-b", "embed")
    loads = {m: int(metric_sum(metrics, "llm_router_model_loads_total", model=m)) for m in names}
    idle_unloads = int(metric_sum(metrics, "llm_router_model_unloads_total", model="embed", reason="idle"))
    router_errors = int(metric_sum(metrics, "llm_router_requests_total", outcome="error"))

    print()
    print(f"soak: {args.minutes:g} min, {args.clients} chat clients + 1 embeddings client, every {args.interval:g} s")
    print()
    print(f"wall time {time.monotonic() - started:.0f} s, of which quiet pauses {paused:.0f} s and the end pause")
    print()
    print("| t (s of traffic) | phase | RSS (MiB) | open fds | of which CLOSE-WAIT | requests | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for elapsed, phase, rss, fds, close_wait, n, errs in rows:
        print(f"| {elapsed:.0f} | {phase} | {rss / 1024:.1f} | {fds} | {close_wait} | {n} | {errs} |")
    print()
    counts = dict(traffic.counts)
    print(
        f"requests: {counts}; engine loads {loads}; embed idle unloads {idle_unloads}; router error outcomes "
        f"{router_errors}; tracebacks in the router log {tracebacks}; /health at the end {health}"
    )
    checks = {
        f"RSS growth after warm-up (quiet end vs quiet warm-up) {rss_growth:+.2f} % < 5 %": rss_growth < 5,
        f"RSS growth under load (max vs first loaded sample) {load_growth:+.2f} % < 5 %": load_growth < 5,
        f"open fds quiet end vs quiet warm-up {quiet_warm[1]} -> {quiet_end[1]} (|{fd_delta:+d}| <= "
        f"{args.fd_tolerance})": abs(fd_delta) <= args.fd_tolerance,
        f"fds under load without CLOSE-WAIT: median first six {first_live:g}, last six {last_live:g} (range "
        f"{min(live, default=0)}-{max(live, default=0)})": last_live <= first_live + args.fd_tolerance,
        f"client errors {traffic.counts['errors']} == 0": traffic.counts["errors"] == 0,
        f"router error outcomes {router_errors} == 0, tracebacks {tracebacks} == 0": router_errors == 0
        and tracebacks == 0,
        f"switches happened (loads {loads}) and embed was idle-unloaded ({idle_unloads})": min(loads.values()) > 1
        and idle_unloads > 0,
    }
    for text, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    for problem in traffic.errors[:10]:
        print(f"  error: {problem}")
    verdict = all(checks.values())
    print(f"verdict: {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1


def requests(traffic: Traffic) -> tuple[int, int]:
    with traffic.lock:
        return sum(v for k, v in traffic.counts.items() if k != "errors"), traffic.counts["errors"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--interval", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of warm-up")
    parser.add_argument("--fd-tolerance", type=int, default=3)
    parser.add_argument(
        "--quiet-wait", type=float, default=25, help="seconds idle before a quiet sample (> the router's keep-alive)"
    )
    parser.add_argument("--base-port", type=int, default=18370, help="router port; engines use the next five")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--source", type=Path, help="run the router_app found in this directory (e.g. a `git archive` of a commit)"
    )
    args = parser.parse_args()
    if args.source is not None:
        harness.REPO = args.source.resolve()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM like Ctrl-C: stop the router and engines
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
