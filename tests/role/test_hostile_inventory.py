"""Hostile inventory values (issue 11, item 3): refused by the preflight with a message naming the variable and the
problem, or rendered inert.

The role's real templates are rendered (tests/role/role_render.py), then each rendered start script is executed
with a stand-in engine that records the argv it received: every hostile argument must arrive verbatim and none of
the commands hidden in them may have run (they would create files in a canary directory). Environment values are
read back from the rendered units with systemd's own quoting rules (molecule/fleet checks them on a real systemd
too, in the running engine's /proc/PID/environ).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.role.role_render import Run, preflight, render

# Each of these would run `touch CANARY/<name>` if a shell or systemd ever interpreted it.
PAYLOADS = [
    "$(touch {canary}/dollar-paren)",
    "`touch {canary}/backtick`",
    "'; touch {canary}/single-quote; echo '",
    '"; touch {canary}/double-quote; echo "',
    "x\ntouch {canary}/newline",
    "x\rtouch {canary}/carriage-return",
    "x && touch {canary}/and || touch {canary}/or",
    "x; touch {canary}/semicolon",
    "x | tee {canary}/pipe",
    "> {canary}/redirect",
    "%n %h %i %% 100% %{canary}",
    "$HOME ${{PATH}} $0 $$ !! ~root * ?",
    "ünïcødé ✓ 模型 🚀",
    "\\ back\\slash \\' \\\" \\n trailing\\",
    "-- --flag=value with spaces",
    "",
    "  leading and trailing  ",
    "\ttab",
]

STANDIN = """#!{python}
# Stand-in engine: records its argv, environment and working directory, starts nothing.
import json, os, sys
with open(os.environ["STANDIN_OUT"], "w", encoding="utf-8") as fh:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd()}}, fh)
"""


def _payloads(canary: Path) -> list[str]:
    return [p.format(canary=canary) for p in PAYLOADS]


def _standin(directory: Path) -> Path:
    """The stand-in engine, at a path that is itself hostile (a space, `$(...)`, a quote)."""
    bin_dir = directory / "bin $(touch x) it's"
    bin_dir.mkdir(parents=True)
    path = bin_dir / "engine"
    path.write_text(STANDIN.format(python=sys.executable), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def systemd_environment(unit: str) -> dict[str, str]:
    """`Environment=` lines as systemd reads them: specifiers first (only `%%` may occur), then the word is
    unquoted with C escapes (the role writes each assignment as one double-quoted word)."""
    env: dict[str, str] = {}
    for line in unit.splitlines():
        if not line.startswith("Environment="):
            continue
        value = line[len("Environment=") :]
        assert not line.endswith("\\"), f"a trailing backslash would join the next line: {line!r}"
        assert re.search(r"%(?!%)", value.replace("%%", "")) is None, f"an unescaped specifier: {line!r}"
        value = value.replace("%%", "%")
        if not value.startswith('"'):  # a plain word the role writes itself
            assert re.fullmatch(r"[A-Za-z0-9_=.:/-]+", value), line
            name, _, val = value.partition("=")
            env[name] = val
            continue
        assert value.endswith('"'), line
        inner, out, i = value[1:-1], [], 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\":
                nxt = inner[i + 1]
                assert nxt in '\\"', f"an escape systemd would interpret: {line!r}"
                out.append(nxt)
                i += 2
                continue
            assert ch != '"', f"an unescaped quote ends the word early: {line!r}"
            out.append(ch)
            i += 1
        name, _, val = "".join(out).partition("=")
        env[name] = val
    return env


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hostile")
    canary = base / "canary"
    canary.mkdir()
    engine = _standin(base)
    tabby_dir = base / "tabby"
    tabby_dir.mkdir()
    args = [*_payloads(canary), 16384, 0.5]
    model_path = f"/models/a b/$(touch {canary}/model)'x\"`y`%n.gguf"
    env = {f"HOSTILE_{i}": p for i, p in enumerate(_payloads(canary)) if "\n" not in p and "\r" not in p}
    inventory = {
        "llm_router_llamacpp_server": str(engine),
        "llm_router_sglang_python": str(engine),
        "llm_router_tabbyapi_python": str(engine),
        "llm_router_vllm_python": str(engine),
        "llm_router_tabbyapi_dir": str(tabby_dir),
        "llm_router_resources": {"gpu": 4},
        "llm_router_models": [
            {
                "id": "llama",
                "backend": "llamacpp",
                "model": model_path,
                "args": args,
                "env": env,
                "name": "Evil %n `name` $(x) \\",
                "needs": {"gpu": 1},
            },
            {"id": "sglang", "backend": "sglang", "model": model_path, "args": args, "needs": {"gpu": 1}},
            {
                "id": "tabby",
                "backend": "tabbyapi",
                "model": "folder $(touch pwned)'\"`touch pwned2`%n",
                "args": args,
                "needs": {"gpu": 1},
            },
            {"id": "vllm", "backend": "vllm", "model": model_path, "args": args, "needs": {"gpu": 1}, "sleep": 1},
        ],
    }
    run = render(inventory, base / "render")
    assert run.rc == 0, run.output[-4000:]
    return {"run": run, "canary": canary, "engine": engine, "inventory": inventory, "args": args, "env": env}


def _execute(script: Path, out: Path) -> dict[str, Any]:
    env = {"PATH": os.environ["PATH"], "STANDIN_OUT": str(out), "HOME": str(out.parent)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("model_id", ["llama", "sglang", "tabby", "vllm"])
def test_hostile_arguments_reach_the_engine_verbatim(hostile: dict[str, Any], model_id: str, tmp_path: Path) -> None:
    run: Run = hostile["run"]
    model = next(m for m in hostile["inventory"]["llm_router_models"] if m["id"] == model_id)
    args = [str(a) for a in hostile["args"]]
    got = _execute(run.out / f"{model_id}.sh", tmp_path / "argv.json")
    expected = {
        "llama": ["-m", model["model"], "--host", "127.0.0.1", "--port", "8085", "-ngl", "999", *args],
        "sglang": [
            "-m",
            "sglang.launch_server",
            "--model-path",
            model["model"],
            "--host",
            "127.0.0.1",
            "--port",
            "30000",
            *args,
        ],
        "tabby": ["main.py", "--model-name", model["model"], *args],
        "vllm": [
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            model["model"],
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
            "--served-model-name",
            "vllm",
            "--enable-sleep-mode",
            *args,
        ],
    }[model_id]
    assert got["argv"] == expected
    if model_id == "tabby":
        assert got["cwd"] == hostile["inventory"]["llm_router_tabbyapi_dir"]
    assert sorted(os.listdir(hostile["canary"])) == [], "a command hidden in the inventory ran"
    assert not list(Path(hostile["inventory"]["llm_router_tabbyapi_dir"]).glob("pwned*"))


def test_hostile_environment_values_are_inert_in_the_unit(hostile: dict[str, Any]) -> None:
    unit = hostile["run"].file("llm-backend-llama.service")
    assert systemd_environment(unit) == {k: str(v) for k, v in hostile["env"].items()}
    description = next(line for line in unit.splitlines() if line.startswith("Description="))
    assert description == "Description=llm-router backend Evil %%n `name` $(x)  (llamacpp)"


def test_the_sleep_unit_keeps_dev_mode_after_the_models_env(hostile: dict[str, Any]) -> None:
    unit = hostile["run"].file("llm-backend-vllm.service")
    assert systemd_environment(unit) == {"VLLM_SERVER_DEV_MODE": "1"}


def test_rendered_units_pass_systemd_analyze(hostile: dict[str, Any], tmp_path: Path) -> None:
    """`systemd-analyze verify` (the role's validate:) accepts the units; it also works where systemd is not PID 1.
    ExecStart must exist for it, so the units are checked with the start scripts at the unit's path."""
    run: Run = hostile["run"]
    for unit in sorted(run.out.glob("llm-backend-*.service")):
        text = unit.read_text(encoding="utf-8")
        model_id = unit.name[len("llm-backend-") : -len(".service")]
        copy = tmp_path / unit.name
        copy.write_text(
            text.replace(f"ExecStart=/opt/llm-router/engines/{model_id}.sh", f"ExecStart={run.out}/{model_id}.sh"),
            encoding="utf-8",
        )
        proc = subprocess.run(
            ["systemd-analyze", "verify", f"{copy}:{unit.name}"], capture_output=True, text=True, check=False
        )
        complaints = [line for line in proc.stderr.splitlines() if unit.name in line or "Environment" in line]
        assert complaints == [], proc.stderr


# --- refused by the preflight -----------------------------------------------------------------------------------


def _model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": "llamacpp", "model": "/m/x.gguf", **extra}


HOSTILE_IDS = ["a$(touch x)", "a`id`", "a;b", "a b", "a\nb", "ünï", "a%n", "-lead", "../x", "a'b", 'a"b', "a/b", ""]


def test_preflight_refuses_hostile_ids_and_values(tmp_path: Path) -> None:
    models = [_model(i) for i in HOSTILE_IDS]
    models += [
        _model("env-newline", env={"X": "a\nb"}),
        _model("env-cr", env={"X": "a\rb"}),
        _model("env-name", env={"$(touch x)": "1", "A-B": "1"}),
        _model("args-port", args=["--port", "9"]),
        _model("args-port-eq", args=["--port=9"]),
        _model("name-escape", name="red \x1b[31m"),
        _model("name-newline", name="two\nlines"),
        {"id": "tabby-path", "backend": "tabbyapi", "model": "../../etc"},
        {"id": "tabby-slash", "backend": "tabbyapi", "model": "a/b"},
        {
            "id": "sleeper",
            "backend": "vllm",
            "model": "/m/s",
            "sleep": 1,
            "env": {"VLLM_SERVER_DEV_MODE": "0"},
            "needs": {},
        },
    ]
    run = preflight({"llm_router_models": models}, tmp_path)
    assert run.rc != 0
    assert "nothing was changed" in run.output
    problems = run.problems()
    text = "\n".join(problems)
    for index, model_id in enumerate(HOSTILE_IDS):
        where = f"llm_router_models[{index}] (id {json.dumps(model_id)})"
        assert any(where in p and "id: must be 1-128 characters" in p for p in problems), (model_id, text)
    expected = [
        'llm_router_models[13] (id "env-newline"): env.X: must be one line',
        'llm_router_models[14] (id "env-cr"): env.X: must be one line',
        "is not a valid environment variable name",
        'llm_router_models[16] (id "args-port"): args[0]: --port is written by the role',
        'llm_router_models[17] (id "args-port-eq"): args[0]: --port is written by the role',
        'llm_router_models[18] (id "name-escape"): name: must be a non-empty one-line string without control',
        'llm_router_models[19] (id "name-newline"): name: must be a non-empty one-line string',
        'llm_router_models[20] (id "tabby-path"): model: tabbyapi models are a folder name',
        'llm_router_models[21] (id "tabby-slash"): model: tabbyapi models are a folder name',
        'llm_router_models[22] (id "sleeper"): env.VLLM_SERVER_DEV_MODE: set to 1 by the role',
    ]
    missing = [e for e in expected if e not in text]
    assert missing == [], text


def test_preflight_refuses_hostile_settings_and_keys_the_role_owns(tmp_path: Path) -> None:
    inventory = {
        "llm_router_models": [_model("ok")],
        "llm_router_tabbyapi_config": {
            "network": {"host": "0.0.0.0", "port": 5001, "disable_auth": False, "sse_ping_interval": 5},
            "model": {"model_name": "x", "cache_mode": "Q4"},
            "logging": "verbose",
        },
        "llm_router_install_dir": "/opt/llm router",
        "llm_router_config_dir": "/etc/llm-%n",
        "llm_router_tabbyapi_dir": "/opt/tabby'$(x)",
        "llm_router_listen_address": "0.0.0.0'; touch /tmp/x; '",
        "llm_router_system_user": "root; rm",
        "llm_router_backend_supplementary_groups": ["video", "a b"],
        "llm_router_backend_service_options": ["LimitMEMLOCK=infinity", "A=1\n[Install]"],
        "llm_router_api_keys": ["k$(id)"],
    }
    run = preflight(inventory, tmp_path)
    assert run.rc != 0
    for needle in (
        "llm_router_tabbyapi_config: network.host: set by the role",
        "llm_router_tabbyapi_config: network.port: set llm_router_tabbyapi_port instead",
        "llm_router_tabbyapi_config: network.disable_auth: set by the role",
        "llm_router_tabbyapi_config: model.model_name: each TabbyAPI model",
        "llm_router_tabbyapi_config: logging: must be a mapping",
        "llm_router_install_dir: must be an absolute path",
        "llm_router_config_dir: must be an absolute path",
        "llm_router_tabbyapi_dir: must be an absolute path",
        "llm_router_listen_address: must be an IP address or a host name",
        "llm_router_system_user: must be a user or group name",
        'llm_router_system_user_groups: "a b" is not a group name',
        "llm_router_backend_service_options[1]: must be one line",
        "llm_router_api_keys[0]: must be printable ASCII without spaces",
    ):
        assert any(needle in p for p in run.problems()), (needle, run.problems())
    assert "k$(id)" not in run.output, "an API key was printed"
    assert "sse_ping_interval" not in run.output and "cache_mode" not in run.output


# --- TabbyAPI's config.yml: what the inventory writes applies ----------------------------------------------------


def test_tabbyapi_config_keys_apply_and_model_dir_overrides_the_variable(tmp_path: Path) -> None:
    import yaml

    run = render(
        {
            "llm_router_models": [{"id": "t", "backend": "tabbyapi", "model": "folder"}],
            "llm_router_tabbyapi_model_dir": "/not/this",
            "llm_router_tabbyapi_config": {
                "model": {"model_dir": "/srv/exl2", "cache_mode": "Q4", "max_seq_len": 8192},
                "network": {"sse_ping_interval": 5},
                "developer": {"unsafe_launch": False},
            },
        },
        tmp_path,
    )
    assert run.rc == 0, run.output[-3000:]
    config = yaml.safe_load(run.file("tabbyapi-config.yml"))
    assert config == {
        "model": {"model_dir": "/srv/exl2", "cache_mode": "Q4", "max_seq_len": 8192},
        "network": {"host": "127.0.0.1", "port": 5000, "disable_auth": True, "sse_ping_interval": 5},
        "developer": {"unsafe_launch": False},
    }


def test_tabbyapi_model_dir_variable_applies_without_the_config_key(tmp_path: Path) -> None:
    import yaml

    run = render(
        {
            "llm_router_models": [{"id": "t", "backend": "tabbyapi", "model": "folder"}],
            "llm_router_tabbyapi_model_dir": "/srv/models",
        },
        tmp_path,
    )
    assert run.rc == 0, run.output[-3000:]
    assert yaml.safe_load(run.file("tabbyapi-config.yml"))["model"] == {"model_dir": "/srv/models"}
