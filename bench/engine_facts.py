#!/usr/bin/env python3
"""Record what the real llama-server (from scripts/prepare-engine) actually sends: a host-level proof, no router.

    .venv/bin/python bench/engine_facts.py [--engine-dir DIR] [--port 18410] [--max-tokens 32]

For each model: start llama-server on 127.0.0.1:PORT, time start -> /health 200 (and what /health said before),
stream a chat completion with and without `stream_options.include_usage`, a non-streaming one, a streamed
/v1/completions, then SIGTERM and time the exit. Prints markdown with the raw final chunks (the router's speed
accounting must match them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from switch_bench import llama_argv  # bench/ is on sys.path: these are scripts run from it

DEFAULT_ENGINE_DIR = Path(os.environ.get("LLM_ROUTER_ENGINE_DIR", "/var/cache/llm-router/engine"))
MODELS = {"gemma-3-270m-q4": "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q8": "gemma-3-270m-q8_0.gguf"}


def sse_events(client: httpx.Client, url: str, body: dict) -> list[tuple[float, str]]:
    out = []
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line:
                out.append((time.perf_counter() - t0, line))
    return out


def short(line: str) -> str:
    return line if len(line) < 2000 else line[:2000] + "..."


def facts_for(args: argparse.Namespace, client: httpx.Client, model_id: str, file: str) -> list[str]:
    engine = Path(args.engine_dir)
    base = f"http://127.0.0.1:{args.port}"
    argv = llama_argv(str(engine / "bin" / "llama-server"), str(engine / "models" / file), model_id, args.port)
    md = [f"### {model_id} ({file})", "", f"`{' '.join(argv[1:])}` (binary: bin/llama-server of the engine dir)", ""]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[str] = []
    try:
        while True:
            try:
                r = client.get(f"{base}/health", timeout=2)
                state = f"{r.status_code} {r.text.strip()}"
            except httpx.TransportError as exc:
                state = f"connection error ({type(exc).__name__})"
            if not seen or seen[-1].split(" @ ")[0] != state:
                seen.append(f"{state} @ {time.perf_counter() - t0:.3f} s")
            if state.startswith("200"):
                break
            if proc.poll() is not None or time.perf_counter() - t0 > 60:
                raise RuntimeError(f"llama-server did not become ready: {seen}")
            time.sleep(0.005)
        md += ["- `/health` from process start: " + "; then ".join(seen), ""]
        chat = {
            "model": model_id,
            "messages": [{"role": "user", "content": "The history of the bicycle"}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        for title, body in (
            ("chat, stream, include_usage", {**chat, "stream_options": {"include_usage": True}}),
            ("chat, stream, no stream_options", chat),
            (
                "completions, stream, include_usage",
                {
                    "model": model_id,
                    "prompt": "The history of the bicycle",
                    "max_tokens": args.max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ),
        ):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            events = sse_events(client, base + path, body)
            content = [e for e in events if '"content":"' in e[1] or '"text":"' in e[1]]
            md += [
                f"- {title}: {len(events)} lines, {len(content)} with text; first text at {content[0][0]:.3f} s"
                if content
                else f"- {title}: {len(events)} lines",
                "",
                "```",
            ]
            md += [short(line) for _, line in events[-3:]]
            md += ["```", ""]
            final = [json.loads(line[5:]) for _, line in events if line.startswith("data: {") and "timings" in line]
            if final:
                t = final[-1]["timings"]
                n, ms, pps = t["predicted_n"], t["predicted_ms"], t["predicted_per_second"]
                md += [
                    f"  predicted_n={n}, predicted_ms={ms:.1f}: n/ms = {n / ms * 1000:.2f}/s, "
                    f"(n-1)/ms = {(n - 1) / ms * 1000:.2f}/s, predicted_per_second = {pps:.2f}",
                    "",
                ]
        r = client.post(f"{base}/v1/chat/completions", json={**chat, "stream": False})
        md += [
            "- chat, non-streaming: headers " + ", ".join(f"{k}: {v}" for k, v in r.headers.items()),
            "",
            "```",
            short(r.text),
            "```",
            "",
        ]
        r = client.post(
            f"{base}/v1/chat/completions", json={**chat, "model": "no-such-model", "max_tokens": 2, "stream": False}
        )
        md += [f"- unknown `model` in the request: HTTP {r.status_code} (llama-server ignores the field)", ""]
    finally:
        t_stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        md += [f"- SIGTERM (idle) to exit: {time.perf_counter() - t_stop:.3f} s, exit code {proc.returncode}", ""]
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir", default=str(DEFAULT_ENGINE_DIR))
    parser.add_argument("--port", type=int, default=18410)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    version = (
        subprocess.run(
            [str(Path(args.engine_dir) / "bin" / "llama-server"), "--version"], capture_output=True, text=True
        )
        .stderr.strip()
        .replace("\n", "; ")
    )
    md = [f"llama-server `--version`: {version}", ""]
    for model_id, file in MODELS.items():
        # No keep-alive: right after a streamed response llama-server may close the connection, and a request sent
        # on it at that moment fails with "Server disconnected without sending a response" (seen ~1 in 5).
        with httpx.Client(timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_keepalive_connections=0)) as client:
            md += facts_for(args, client, model_id, file)
    print("\n".join(md))


if __name__ == "__main__":
    main()
