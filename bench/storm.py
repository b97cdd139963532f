#!/usr/bin/env python3
"""Switch storm at full size (issue 11, item 1): the scenario and every check of tests/e2e/test_storm.py (both
from tests/e2e/storm.py), 20 clients × 10 requests by default, with the figures as a markdown table.

One router (RouterEnv: `llm-router serve` on 127.0.0.1, the fake engines under the fake systemctl), resources
{gpu: 10}: `chat-a` (fake llama-server, gpu 5) and `embed` (fake llama-server on its own port, gpu 5,
idle_unload 1 s) run side by side; `chat-x` (fake SGLang, no needs: all of it) runs alone. Each client sends a
random mix of streamed and non-streamed chat and legacy completions, embeddings, and streams it leaves mid-answer
or while waiting for a switch; then `--race` embeddings ~1 s apart meet embed's idle stop. Pass: see
tests/e2e/storm.py (0 failed or truncated answers, starts <= 1.2 × the minimum the admission order needs, the
router idle and its /metrics equal to the clients' counts afterwards). Exits 1 on any problem.

    .venv/bin/python bench/storm.py [--clients 20] [--requests 10] [--race 6] [--seed N] [--base-port 18860]
                                    [--append-to docs/reliability.md]

`--append-to FILE` adds the run (date, commit, machine, seed, the table) to FILE: above the line
`<!-- bench/storm.py --append-to: new runs go above this line -->` when FILE has one (the storm section of
docs/reliability.md does), else at its end. The router listens on --base-port, its engines on the next five ports.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e import storm  # noqa: E402
from tests.e2e.conftest import RouterEnv  # noqa: E402

MARKER = "<!-- bench/storm.py --append-to: new runs go above this line -->"


def describe_run(seed: int) -> str:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    return f"{now}, commit {commit or '?'}, {machine}, seed {seed}"


def add_run(path: Path, text: str) -> None:
    """Insert `text` above MARKER in the file, or append it when there is none."""
    old = path.read_text() if path.exists() else ""
    at = old.find(MARKER)
    path.write_text(old + text if at < 0 else old[:at] + text.lstrip("\n") + "\n" + old[at:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--race", type=int, default=6, help="idle-race embeddings after the storm")
    parser.add_argument("--seed", type=int, default=None, help="random by default (printed)")
    parser.add_argument("--base-port", type=int, default=18860, help="router port; engines use the next five")
    parser.add_argument("--append-to", type=Path, help="append the run's table to this markdown file")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM like Ctrl-C: stop the router and engines
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        router = RouterEnv(
            Path(tmp), storm.storm_models(args.base_port), dict(storm.STORM_CONFIG), base_port=args.base_port
        )
        router.start()
        try:
            result = storm.run_storm(router, args.clients, args.requests, seed, race=args.race)
        finally:
            router.stop()
    heading = f"Switch storm, {describe_run(seed)}"
    print(f"\n{heading}\n\n{result.table()}\n")
    for problem in result.problems:
        print(f"  problem: {problem}")
    print(f"verdict: {'FAIL' if result.problems else 'PASS'}")
    if args.append_to is not None:
        add_run(args.append_to, f"\n{heading}:\n\n{result.table()}\n")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
