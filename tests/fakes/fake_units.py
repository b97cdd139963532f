"""Helpers for tests that run the fake engines under the fake systemd (stdlib only).

    from tests.fakes.fake_units import FakeSystemd          # or put tests/fakes on sys.path
    sd = FakeSystemd(tmp_path / "systemd")
    sd.define_engine_unit("llm-backend-a.service", "llamacpp", "/models/a.gguf", port=18101,
                          env={"FAKE_LOAD_SECONDS": "0.3"})
    config = {"systemctl": sd.systemctl_argv(), "journalctl": sd.journalctl_argv(), ...}
    ...
    sd.stop_all()                                            # in the fixture's teardown
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE_SYSTEMD = HERE / "fake_systemd.py"
FAKE_ENGINES_DIR = REPO / "files" / "fake_engines"
LLAMA_SERVER = FAKE_ENGINES_DIR / "llama-server"
SGLANG_PYTHON = FAKE_ENGINES_DIR / "sglang-python"
VLLM_PYTHON = FAKE_ENGINES_DIR / "vllm-python"
TABBYAPI_PYTHON = FAKE_ENGINES_DIR / "tabbyapi-python"
TABBYAPI_MAIN = FAKE_ENGINES_DIR / "tabbyapi" / "main.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def fake_python() -> str:
    """The interpreter for the fakes: Debian's python3 when present (fast start, stdlib only), else ours."""
    return SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable


def systemctl_argv(state_dir: str | os.PathLike[str]) -> list[str]:
    return [fake_python(), "-I", str(FAKE_SYSTEMD), "--state-dir", str(state_dir), "systemctl"]


def journalctl_argv(state_dir: str | os.PathLike[str]) -> list[str]:
    return [fake_python(), "-I", str(FAKE_SYSTEMD), "--state-dir", str(state_dir), "journalctl"]


def define_unit(state_dir: str | os.PathLike[str], unit: str, argv: Sequence[str],
                env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                stop_timeout: float = 5, description: str | None = None, inherit_env: bool = False) -> Path:
    """Write STATE_DIR/units/<unit>.json (atomically); returns its path."""
    units = Path(state_dir) / "units"
    units.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "lock", "journal"):
        (Path(state_dir) / sub).mkdir(exist_ok=True)
    data = {"argv": [str(a) for a in argv], "env": {str(k): str(v) for k, v in (env or {}).items()},
            "cwd": str(cwd) if cwd else None, "stop_timeout": stop_timeout,
            "description": description or unit, "inherit_env": inherit_env}
    path = units / f"{unit}.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def write_tabby_config(tabby_dir: str | os.PathLike[str], port: int, model_dir: str | os.PathLike[str],
                       host: str = "127.0.0.1", extra: Mapping[str, Mapping[str, object]] | None = None) -> Path:
    """A TabbyAPI directory as the role lays it out: config.yml plus main.py (a symlink to the fake's)."""
    d = Path(tabby_dir)
    d.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, object]] = {"network": {"host": host, "port": port, "disable_auth": True},
                                              "model": {"model_dir": str(model_dir)}}
    for sec, values in (extra or {}).items():
        sections.setdefault(sec, {}).update(values)
    lines = ["# Ansible managed (test copy)"]
    for sec, values in sections.items():
        lines.append(f"{sec}:")
        lines += [f"  {key}: {json.dumps(value)}" for key, value in values.items()]
    (d / "config.yml").write_text("\n".join(lines) + "\n")
    main = d / "main.py"
    if not main.exists():
        main.symlink_to(TABBYAPI_MAIN)
    return d


def engine_command(kind: str, model: str, port: int, args: Sequence[str] = (),
                   tabby_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], str | None]:
    """(argv, cwd) exactly as the role's start scripts launch each engine."""
    if kind == "llamacpp":
        return [str(LLAMA_SERVER), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-ngl", "999",
                *args], None
    if kind == "sglang":
        return [str(SGLANG_PYTHON), "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
                "--port", str(port), *args], None
    if kind == "vllm":
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                "--port", str(port), "--served-model-name", model, *args], None
    if kind == "tabbyapi":
        if tabby_dir is None:
            raise ValueError("tabbyapi needs tabby_dir (see write_tabby_config)")
        return [str(TABBYAPI_PYTHON), "main.py", "--model-name", model, *args], str(tabby_dir)
    raise ValueError(f"unknown engine kind {kind!r}")


class FakeSystemd:
    """One state directory, with helpers to define units and call the fake systemctl/journalctl."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        for sub in ("units", "run", "lock", "journal"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)

    def systemctl_argv(self) -> list[str]:
        return systemctl_argv(self.state_dir)

    def journalctl_argv(self) -> list[str]:
        return journalctl_argv(self.state_dir)

    def define_unit(self, unit: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                    cwd: str | os.PathLike[str] | None = None, stop_timeout: float = 5) -> Path:
        return define_unit(self.state_dir, unit, argv, env=env, cwd=cwd, stop_timeout=stop_timeout)

    def define_engine_unit(self, unit: str, kind: str, model: str, port: int, args: Sequence[str] = (),
                           env: Mapping[str, str] | None = None, tabby_dir: str | os.PathLike[str] | None = None,
                           stop_timeout: float = 5) -> Path:
        argv, cwd = engine_command(kind, model, port, args, tabby_dir)
        return self.define_unit(unit, argv, env=env, cwd=cwd, stop_timeout=stop_timeout)

    def systemctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.systemctl_argv(), *args], capture_output=True, text=True, check=check,
                              timeout=60)

    def journalctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.journalctl_argv(), *args], capture_output=True, text=True, timeout=60)

    def is_active(self, unit: str) -> str:
        return self.systemctl("is-active", unit).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = [a for p in props for a in ("-p", p)]
        lines = self.systemctl("show", *args, unit).stdout.splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def journal_path(self, unit: str) -> Path:
        return self.state_dir / "journal" / f"{unit}.log"

    def units(self) -> list[str]:
        return sorted(p.name[:-5] for p in (self.state_dir / "units").glob("*.json"))

    def set_faults(self, **faults: object) -> None:
        """Write STATE_DIR/faults.json (see fake_systemd.py): deny={"start": [UNIT] or "*", "stop": ...},
        deny_reason="interactive"|"denied", stop_delay={UNIT or "*": SECONDS}, journal="unreadable".
        No arguments: no faults."""
        path = self.state_dir / "faults.json"
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(faults))
        os.replace(tmp, path)

    def stop_all(self) -> None:
        """Stop every defined unit (teardown): leaves no process behind (faults are cleared first)."""
        (self.state_dir / "faults.json").unlink(missing_ok=True)
        units = self.units()
        if units:
            self.systemctl("stop", *units)
