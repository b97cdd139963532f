#!/usr/bin/env python3
"""Switch times through the router: stop/start vs vLLM's sleep/wake, against the fake vLLM (a measurement script).

Two routers (`llm-router serve`) over the project's fake systemctl, each with two vLLM models that cannot run
together (gpu 8 + 8 > 10) on the fake vLLM (files/fake_engines, `--kind vllm`) with the same engine timings:
load 3 s, fall asleep 0.2 s, wake 0.3 s. One router stops and starts units (no `sleep` key), the other puts the
evicted model to sleep (`sleep: 1`). For N alternating requests it measures each switching request's wall time
(request sent to `[DONE]`, 3 tokens) and prints the medians as a markdown table.

    PYTHONPATH=. .venv/bin/python bench/sleep_bench.py [--switches 10] [--out docs/benchmarks.md]

What it cannot tell: a real vLLM's sleep/wake time depends on the model's size and the PCIe bandwidth (published:
wake 0.1-0.4 s for small models, seconds for 70B); the router's own share is what this measures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.e2e.conftest import ModelSpec, RouterEnv

ENGINE_ENV = {"FAKE_LOAD_SECONDS": "3", "FAKE_SLEEP_SECONDS": "0.2", "FAKE_WAKE_SECONDS": "0.3"}


def models(sleep: bool) -> list[ModelSpec]:
    specs = []
    for index, model_id in enumerate(("v1", "v2")):
        extra: dict[str, object] = {"needs": {"gpu": 8}}
        if sleep:
            extra.update({"sleep": 1, "needs_asleep": {"host_ram": 40}})
        specs.append(
            ModelSpec(
                model_id,
                "vllm",
                port=18291 + index,
                env={**ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1"},
                args=["--enable-sleep-mode"] if sleep else [],
                extra=extra,
            )
        )
    return specs


def measure(sleep: bool, switches: int, tmp: Path) -> list[float]:
    router = RouterEnv(
        tmp / ("sleep" if sleep else "stop"),
        models(sleep),
        {"resources": {"gpu": 10, "host_ram": 100}},
        base_port=18290,
    )
    router.start()
    try:
        for model in ("v1", "v2"):  # the first loads are not switches between running engines
            assert router.stream_chat(model, "[[tokens:3]]").done
        times = []
        for step in range(switches):
            model = "v1" if step % 2 == 0 else "v2"
            started = time.monotonic()
            result = router.stream_chat(model, "[[tokens:3]]")
            times.append(time.monotonic() - started)
            assert result.done and not result.errors, result.raw
        return times
    finally:
        router.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stop_start = measure(False, args.switches, Path(tmp))
        sleep_wake = measure(True, args.switches, Path(tmp))
    rows = [
        "| switch (fake vLLM: load 3 s, sleep 0.2 s, wake 0.3 s) | median | min | max |",
        "|---|---|---|---|",
        f"| stop + start | {statistics.median(stop_start):.2f} s | {min(stop_start):.2f} s | {max(stop_start):.2f} s |",
        f"| sleep + wake | {statistics.median(sleep_wake):.2f} s | {min(sleep_wake):.2f} s | {max(sleep_wake):.2f} s |",
        "",
        f"{args.switches} alternating switching requests each (3 tokens, request to [DONE]); speed-up "
        f"{statistics.median(stop_start) / statistics.median(sleep_wake):.1f}x.",
    ]
    table = "\n".join(rows)
    print(table)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
