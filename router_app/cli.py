"""Command line: `llm-router check-config` and `llm-router serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router_app.config import CONFIG_FILE, MODELS_FILE, ConfigError, load_config_files, resolve_config_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("check-config", "validate config.yml and models.yml; exit 1 listing every problem"),
        ("serve", "run the router (hypercorn, in-process)"),
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
    return parser


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
    from router_app.server import serve  # imported late: check-config must not need the web stack

    return serve(resolve_config_dir(args.config_dir))


if __name__ == "__main__":
    raise SystemExit(main())
