"""Command line: `llm-router check-config`, `llm-router serve` and `llm-router wait-ready`."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

from router_app.config import CONFIG_FILE, MODELS_FILE, ConfigError, load_config_files, resolve_config_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("check-config", "validate config.yml and models.yml; exit 1 listing every problem"),
        ("serve", "run the router (hypercorn, in-process)"),
        ("wait-ready", "wait until the router at config.yml's `listen` answers GET /health (exit 1 after --timeout)"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "--config-dir",
            help="directory with config.yml and models.yml (default: $LLM_ROUTER_CONFIG_DIR, else /etc/llm-router)",
        )
    check = sub.choices["check-config"]
    check.add_argument("--config-file", help="check this file instead of CONFIG_DIR/config.yml")
    check.add_argument("--models-file", help="check this file instead of CONFIG_DIR/models.yml")
    check.add_argument("--config-only", action="store_true", help="check config.yml alone")
    sub.choices["wait-ready"].add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return parser


# Where a client on this host reaches a router listening on a wildcard address.
_LOCAL_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def wait_ready(args: argparse.Namespace) -> int:
    """For `ExecStartPost=`: `systemctl start` returns once the router answers. With llm-router.socket the port
    accepts connections before the router runs, so a TCP connect proves nothing: this asks GET /health."""
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_config_files(config_dir / CONFIG_FILE, None)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    host = _LOCAL_FOR_WILDCARD.get(config.listen_host, config.listen_host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.listen_port}/health"
    deadline = time.monotonic() + args.timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as response:
                if response.status == 200:
                    return 0
                problem = f"HTTP {response.status}"
        except (OSError, ValueError) as exc:  # refused, reset, timeout, HTTP errors (urllib's are OSErrors)
            problem = str(exc)
        time.sleep(0.05)
    print(f"error: llm-router did not answer GET {url} within {args.timeout:g} s ({problem})", file=sys.stderr)
    return 1


def check_config(args: argparse.Namespace) -> int:
    config_dir = resolve_config_dir(args.config_dir)
    config_file = Path(args.config_file) if args.config_file else config_dir / CONFIG_FILE
    models_file = None if args.config_only else Path(args.models_file or config_dir / MODELS_FILE)
    try:
        config = load_config_files(config_file, models_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    what = "config.yml" if models_file is None else f"config.yml and {len(config.models)} model(s)"
    print(f"ok: {what} valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args)
    if args.command == "wait-ready":
        return wait_ready(args)
    from router_app.server import serve  # imported late: check-config must not need the web stack

    return serve(resolve_config_dir(args.config_dir))


if __name__ == "__main__":
    raise SystemExit(main())
