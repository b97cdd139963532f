#!/usr/bin/env python3
"""Switch benchmark on a real llama-server (issue 4, item 5): a measurement script, not a test.

For N alternating switches between two models it measures
  (a) direct: the engine's own switch: `systemctl stop A`, `systemctl start B`, poll B's `/health` every 10 ms
      until 200, then the time to first content token of a streamed request sent straight to the engine;
  (b) through the router: the time to first content token of a streamed request that needs the same switch;
and, for each model, tokens/s of the same prompt (same max_tokens, greedy, ignore_eos) streamed direct vs through
the router in alternating rounds. It prints a markdown table (medians) and can append it to a file.

Switch overhead = router switch TTFT - (direct stop + start-to-ready + direct TTFT).

To keep the router's idea of the loaded engine true, each direct measurement switches A -> B and then B -> A again
(both timed) before the router is asked for B.

Two targets:

  host: everything on this machine's loopback, no box: two real llama-server units run by the project's systemctl
        stand-in (tests/fakes/fake_systemd.py) and a router started here (`llm-router serve`):
            .venv/bin/python bench/switch_bench.py host [--engine-dir DIR]

  box:  the demo box (`make demo`: the router deployed by the role inside a systemd-nspawn box, engine units
        llm-backend-<id>.service, systemctl through `scripts/box exec BOX -- systemctl`):
            .venv/bin/python bench/switch_bench.py box [--box llmr-demo] [--router-url http://127.0.0.1:8002/v1]
                [--engine-url http://127.0.0.1:18480] [--models gemma-3-270m-q4,gemma-3-270m-q8]

Common options: --switches 10 --rounds 5 --max-tokens 128 --out docs/benchmarks.md (append the table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENGINE_DIR = Path(os.environ.get("LLM_ROUTER_ENGINE_DIR", "/var/cache/llm-router/engine"))
PROMPT = "The history of the bicycle begins"
ANNOTATE_OFF = {"X-LLM-Router-Annotate": "off"}


# ----------------------------------------------------------------------------------------------------------------
# streaming client


@dataclass
class StreamResult:
    t_send: float
    t_first_byte: float | None = None
    t_first_token: float | None = None
    t_last_token: float | None = None
    n_token_events: int = 0
    text: str = ""
    status_text: str = ""
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    error: Any = None
    done: bool = False

    @property
    def ttft(self) -> float:
        assert self.t_first_token is not None, "no content token"
        return self.t_first_token - self.t_send

    @property
    def completion_tokens(self) -> int:
        if self.usage and self.usage.get("completion_tokens"):
            return int(self.usage["completion_tokens"])
        if self.timings and self.timings.get("predicted_n"):
            return int(self.timings["predicted_n"])
        return self.n_token_events

    @property
    def client_tps(self) -> float:
        """Decode speed seen by the client: tokens after the first over the time from first to last token."""
        assert self.t_first_token is not None and self.t_last_token is not None
        span = self.t_last_token - self.t_first_token
        return (self.completion_tokens - 1) / span if span > 0 else float("nan")

    @property
    def engine_tps(self) -> float:
        return float(self.timings["predicted_per_second"]) if self.timings else float("nan")


def stream_chat(
    client: httpx.Client, base_url: str, model: str, max_tokens: int, headers: dict[str, str] | None = None
) -> StreamResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "ignore_eos": True,  # llama-server: always generate max_tokens, so both paths decode the same count
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = StreamResult(t_send=time.perf_counter())
    with client.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers or {}) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            now = time.perf_counter()
            if res.t_first_byte is None:
                res.t_first_byte = now
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                res.done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.error = event["error"]
                continue
            if event.get("usage"):
                res.usage = event["usage"]
            if event.get("timings"):
                res.timings = event["timings"]
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    res.status_text += delta["reasoning_content"]
                if delta.get("content"):
                    if res.t_first_token is None:
                        res.t_first_token = now
                    res.t_last_token = now
                    res.n_token_events += 1
                    res.text += delta["content"]
    if res.error is not None:
        raise RuntimeError(f"{model}: in-band error: {res.error}")
    if res.t_first_token is None:
        raise RuntimeError(f"{model}: stream had no content token (done={res.done})")
    return res


def wait_health(client: httpx.Client, engine_url: str, timeout: float = 120.0, interval: float = 0.01) -> float:
    """Poll the engine's /health until 200; returns the time it answered 200."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if client.get(f"{engine_url}/health", timeout=2.0).status_code == 200:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{engine_url}/health not 200 after {timeout} s")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    name: str
    router_url: str  # .../v1
    engine_url: str  # http://host:port of whichever llama-server runs (all models share the llamacpp port)
    systemctl: list[str]  # argv prefix, run from here
    units: dict[str, str]  # model id -> unit
    exec_prefix: list[str] = field(default_factory=list)  # runs a command where systemctl lives (box: scripts/box exec)
    inner_systemctl: list[str] = field(default_factory=list)  # systemctl's argv there
    description: str = ""
    cleanup: list[Any] = field(default_factory=list)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.systemctl, *args], capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join([*self.systemctl, *args])}: rc={proc.returncode} {proc.stderr.strip()}")
        return proc

    def is_active(self, unit: str) -> str:
        return self.ctl("is-active", unit, check=False).stdout.strip()

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()


def llama_argv(server: str, model_path: str, model_id: str, port: int, threads: int = 2) -> list[str]:
    # Same flags the demo inventory gives the role (inventory/local): small context, 2 threads, one slot.
    return [
        server,
        "-m",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--alias",
        model_id,
        "-c",
        "2048",
        "-ngl",
        "0",
        "-t",
        str(threads),
        "-np",
        "1",
    ]


def wait_router(
    client: httpx.Client, router_url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 30
) -> None:
    root = router_url.rsplit("/v1", 1)[0]
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the router exited with code {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if client.get(f"{root}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"router at {root} did not answer /health within {timeout} s")


def host_target(args: argparse.Namespace, client: httpx.Client) -> Target:
    engine = Path(args.engine_dir)
    server = engine / "bin" / "llama-server"
    models = {
        "gemma-3-270m-q4": engine / "models" / "gemma-3-270m-q4_k_m.gguf",
        "gemma-3-270m-q8": engine / "models" / "gemma-3-270m-q8_0.gguf",
    }
    for path in [server, *models.values()]:
        if not path.exists():
            raise SystemExit(f"{path} missing: run scripts/prepare-engine first (or pass --engine-dir)")
    fake = REPO / "tests" / "fakes" / "fake_systemd.py"
    if not fake.exists():
        raise SystemExit(f"{fake} missing: the host target needs the project's systemctl stand-in")
    llm_router = shutil.which("llm-router", path=str(REPO / ".venv" / "bin")) or shutil.which("llm-router")
    if not llm_router:
        raise SystemExit("llm-router not installed: make venv")

    work = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    state, conf = work / "state", work / "config"
    (state / "units").mkdir(parents=True)
    conf.mkdir()
    systemctl = [sys.executable, str(fake), "--state-dir", str(state), "systemctl"]
    journalctl = [sys.executable, str(fake), "--state-dir", str(state), "journalctl"]
    units = {}
    for model_id, path in models.items():
        unit = f"llm-backend-{model_id}.service"
        units[model_id] = unit
        (state / "units" / f"{unit}.json").write_text(
            json.dumps(
                {
                    "argv": llama_argv(str(server), str(path), model_id, args.engine_port, args.threads),
                    "env": {},
                    "cwd": str(work),
                }
            )
        )
    (conf / "config.yml").write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{args.router_port}",
                "systemctl": systemctl,
                "journalctl": journalctl,
                "load_timeout": 120,
                "backends": {"llamacpp": {"url": f"http://127.0.0.1:{args.engine_port}"}},
            }
        )
    )
    (conf / "models.yml").write_text(
        yaml.safe_dump({"models": {m: {"backend": "llamacpp", "unit": u} for m, u in units.items()}})
    )
    router_log = open(work / "router.log", "wb")  # noqa: SIM115 - closed in cleanup
    proc = subprocess.Popen(
        [llm_router, "serve", "--config-dir", str(conf)],
        stdout=router_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = Target(
        "host",
        f"http://127.0.0.1:{args.router_port}/v1",
        f"http://127.0.0.1:{args.engine_port}",
        systemctl,
        units,
        inner_systemctl=systemctl,
        description="host loopback, router run by hand, fake_systemd stand-in",
    )

    def stop_all() -> None:
        for unit in units.values():
            target.ctl("stop", unit, check=False)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        router_log.close()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    target.cleanup.append(stop_all)
    try:
        wait_router(client, target.router_url, proc)
    except Exception:
        target.close()
        raise
    return target


def box_target(args: argparse.Namespace, client: httpx.Client) -> Target:
    exec_prefix = [str(REPO / "scripts" / "box"), "exec", args.box, "--"]
    systemctl = [*exec_prefix, "systemctl"]
    wait_router(client, args.router_url, None, timeout=10)
    listed = client.get(f"{args.router_url}/models", timeout=10).json()["data"]
    ids = args.models.split(",") if args.models else [m["id"] for m in listed if m.get("owned_by") == "llamacpp"][:2]
    if len(ids) != 2:
        raise SystemExit(f"need two llamacpp models on the router, got {ids}")
    units = {m: f"llm-backend-{m}.service" for m in ids}
    return Target(
        "box",
        args.router_url,
        args.engine_url,
        systemctl,
        units,
        exec_prefix=exec_prefix,
        inner_systemctl=["systemctl"],
        description=f"demo box {args.box}, router deployed by the role, real systemd",
    )


# ----------------------------------------------------------------------------------------------------------------
# measurement


def ensure_loaded_via_router(client: httpx.Client, target: Target, model: str) -> None:
    stream_chat(client, target.router_url, model, 4, ANNOTATE_OFF)


def direct_switch(client: httpx.Client, target: Target, src: str, dst: str, max_tokens: int) -> dict[str, float]:
    """stop src + start dst, timed where systemctl runs (so `scripts/box exec`'s own start-up is not counted: the
    router runs systemctl inside the box too), then /health polled from here; one wall clock (same kernel)."""
    ctl = shlex.join(target.inner_systemctl)
    script = (
        f"date +%s.%N; {ctl} stop {shlex.quote(target.units[src])} >&2; date +%s.%N; "
        f"{ctl} start {shlex.quote(target.units[dst])} >&2; date +%s.%N"
    )
    proc = subprocess.run([*target.exec_prefix, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    stamps = [float(x) for x in proc.stdout.split()]
    if proc.returncode != 0 or len(stamps) != 3:
        raise RuntimeError(f"direct switch {src} -> {dst} failed: rc={proc.returncode} {proc.stdout} {proc.stderr}")
    t0, t_stopped, t_started = stamps
    wall = time.time() - time.perf_counter()  # perf_counter -> wall clock
    t_ready = wait_health(client, target.engine_url) + wall
    res = stream_chat(client, target.engine_url + "/v1", dst, max_tokens)
    return {
        "stop": t_stopped - t0,
        "start": t_started - t_stopped,
        "start_to_ready": t_ready - t_stopped,
        "ttft": res.ttft,
        "total": res.t_first_token + wall - t0,  # type: ignore[operator]
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def publish(text: str, out: str | os.PathLike[str] | None) -> None:
    """Print a bench's markdown result and append it to `out` (e.g. docs/benchmarks.md) when given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text + "\n")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> str:
    limits = httpx.Limits(keepalive_expiry=3)
    timeout = httpx.Timeout(connect=5, read=None, write=30, pool=None)
    with httpx.Client(limits=limits, timeout=timeout) as client:
        target = host_target(args, client) if args.target == "host" else box_target(args, client)
        try:
            return measure(args, client, target)
        finally:
            target.close()


def measure(args: argparse.Namespace, client: httpx.Client, target: Target) -> str:
    a, b = list(target.units)
    log(f"target: {target.description}; models {a}, {b}")
    ensure_loaded_via_router(client, target, a)  # start state: A loaded by the router
    rows = []
    current = a
    for i in range(args.switches):
        dst = b if current == a else a
        there = direct_switch(client, target, current, dst, args.max_tokens)
        back = direct_switch(client, target, dst, current, args.max_tokens)  # restore what the router believes
        time.sleep(0.2)
        res = stream_chat(client, target.router_url, dst, args.max_tokens, ANNOTATE_OFF)
        inactive = target.is_active(target.units[current])
        row = {
            "i": i + 1,
            "from": current,
            "to": dst,
            "d_stop": there["stop"],
            "d_ready": there["start_to_ready"],
            "d_ttft": there["ttft"],
            "d_total": there["total"],
            "d_total_back": back["total"],
            "r_ttft": res.ttft,
            "overhead": res.ttft - there["total"],
            "old_unit": inactive,
        }
        rows.append(row)
        log(
            f"switch {i + 1}: {current} -> {dst}: direct {there['total']:.3f} s "
            f"(stop {there['stop']:.3f} + ready {there['start_to_ready']:.3f} + ttft {there['ttft']:.3f}), "
            f"router ttft {res.ttft:.3f} s, overhead {row['overhead']:+.3f} s, old unit {inactive}"
        )
        current = dst

    # tokens/s: same prompt and max_tokens, direct and through the router, alternating order each round
    speed: dict[str, dict[str, list[float]]] = {}
    for model in (a, b):
        ensure_loaded_via_router(client, target, model)  # switch if needed, and warm up
        s = speed.setdefault(model, {"d_client": [], "r_client": [], "d_engine": [], "r_engine": []})
        for r in range(args.rounds):
            order = ("direct", "router") if r % 2 == 0 else ("router", "direct")
            for path in order:
                url = target.engine_url + "/v1" if path == "direct" else target.router_url
                res = stream_chat(client, url, model, args.max_tokens, ANNOTATE_OFF if path == "router" else None)
                key = "d" if path == "direct" else "r"
                s[f"{key}_client"].append(res.client_tps)
                s[f"{key}_engine"].append(res.engine_tps)
            log(
                f"tok/s {model} round {r + 1}: direct {s['d_client'][-1]:.1f} router {s['r_client'][-1]:.1f} "
                f"(engine {s['d_engine'][-1]:.1f} / {s['r_engine'][-1]:.1f})"
            )
    return report(args, target, rows, speed)


def report(
    args: argparse.Namespace, target: Target, rows: list[dict[str, Any]], speed: dict[str, dict[str, list[float]]]
) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    machine = f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    load = f"load average at start {args.load_start}, at end {Path('/proc/loadavg').read_text().split()[0]}"
    out = [
        f"### Switch benchmark: {target.name} ({now})",
        "",
        f"Machine: {machine} ({load}). Target: {target.description}. Models: {', '.join(target.units)} "
        f"(Gemma 3 270M Q4_K_M / Q8_0 on llama-server `-c 2048 -t {getattr(args, 'threads', 2)} -np 1`). "
        f"{args.switches} alternating switches; streamed, max_tokens={args.max_tokens}, greedy, ignore_eos. "
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`.",
        "",
        "| # | switch | direct stop | direct start-to-ready | direct TTFT | direct total "
        "| router TTFT | overhead | old unit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['i']} | {r['from']} -> {r['to']} | {r['d_stop']:.3f} | {r['d_ready']:.3f} | "
            f"{r['d_ttft']:.3f} | {r['d_total']:.3f} | {r['r_ttft']:.3f} | {r['overhead']:+.3f} | "
            f"{r['old_unit']} |"
        )
    med = {k: median([r[k] for r in rows]) for k in ("d_stop", "d_ready", "d_ttft", "d_total", "r_ttft", "overhead")}
    out.append(
        f"| **median** | | {med['d_stop']:.3f} | {med['d_ready']:.3f} | {med['d_ttft']:.3f} | "
        f"{med['d_total']:.3f} | {med['r_ttft']:.3f} | **{med['overhead']:+.3f}** | |"
    )
    out += [
        "",
        "Times in seconds. Overhead = router TTFT on the switch - direct total (goal <= 0.25 s).",
        "",
        "| model | direct tok/s (client) | router tok/s (client) | ratio | direct tok/s (engine) "
        "| router tok/s (engine) | client/engine direct | client/engine router | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, s in speed.items():
        dc, rc, de, re_ = (median(s[k]) for k in ("d_client", "r_client", "d_engine", "r_engine"))
        # Per answer, the speed the client saw over the engine's own figure for that same answer: the engine's speed
        # swings with the machine's load between runs, this does not, so its ratio isolates what the path costs.
        ed = median([c / e for c, e in zip(s["d_client"], s["d_engine"], strict=True)])
        er = median([c / e for c, e in zip(s["r_client"], s["r_engine"], strict=True)])
        out.append(
            f"| {model} | {dc:.1f} | {rc:.1f} | **{rc / dc:.3f}** | {de:.1f} | {re_:.1f} "
            f"| {ed:.4f} | {er:.4f} | **{er / ed:.4f}** |"
        )
    out += [
        "",
        f"Medians of {args.rounds} runs per path and model, alternating order. Client tok/s = "
        "(completion tokens - 1) / (last token - first token) as the client sees them; engine tok/s = "
        "llama-server's own `timings.predicted_per_second` for the same answer. Goal: router/direct >= 0.98. The "
        "engine's own speed varies with the machine's load from run to run (compare the two engine columns); "
        "client/engine per answer does not, so the last ratio is the router's own cost on delivered tokens/s.",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True)
    host = sub.add_parser("host", help="loopback: router run here, fake_systemd stand-in, real llama-server")
    host.add_argument("--engine-dir", default=str(DEFAULT_ENGINE_DIR))
    host.add_argument("--router-port", type=int, default=18402)
    host.add_argument("--engine-port", type=int, default=18485)
    host.add_argument("--threads", type=int, default=2, help="llama-server -t (the demo uses 2)")
    host.add_argument("--keep", action="store_true", help="keep the temporary state/config dir (router.log)")
    box = sub.add_parser("box", help="the demo box deployed by the role")
    box.add_argument("--box", default=os.environ.get("LLM_ROUTER_DEMO_BOX", "llmr-demo"))
    box.add_argument("--router-url", default=os.environ.get("LLM_ROUTER_URL", "http://127.0.0.1:8002/v1"))
    box.add_argument("--engine-url", default=os.environ.get("LLM_ROUTER_ENGINE_URL", "http://127.0.0.1:18480"))
    box.add_argument("--models", help="two model ids, comma-separated (default: the first two llamacpp models)")
    for p in (host, box):
        p.add_argument("--switches", type=int, default=10)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--out", help="append the markdown table to this file")
    args = parser.parse_args()
    args.load_start = Path("/proc/loadavg").read_text().split()[0]
    publish(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
