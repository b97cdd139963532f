"""Rules written twice, once in Python (router_app) and once in the role (vars, argument specs, filter plugins,
templates), stay the same: like node_exporter's CI diff of specs and defaults, but across the two languages.

- the model id pattern, backend kinds, status channels, sleep levels, default resources;
- every key the role can write into config.yml and models.yml is one the router accepts, and the files rendered
  from an inventory using every feature pass `llm-router check-config`;
- the router's API the role calls (`/models`, `/models/load`, `/models/unload`) and the status it waits for;
- a unit name made from any valid model id is a unit name the router accepts.
(Every argument_specs key having a default and a README row: tests/role/test_argument_specs.py.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router_app import config as router_config
from router_app import switcher
from router_app.cli import main as router_cli
from tests.role.role_render import ROLE, load_module, render


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


VARS: dict[str, Any] = _load(ROLE / "vars" / "main.yml")
OPTIONS: dict[str, Any] = _load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]


PLUGIN = load_module(ROLE / "filter_plugins" / "llm_router_lifecycle.py", "llm_router_lifecycle_shared")


def test_model_id_pattern_is_the_routers() -> None:
    pattern = router_config.MODEL_ID_PATTERN.pattern
    assert VARS["_llm_router_model_id_pattern"] == pattern
    assert pattern == PLUGIN.MODEL_ID_PATTERN


def test_backend_kinds_are_the_routers() -> None:
    kinds = list(router_config.BACKEND_KINDS)
    assert VARS["_llm_router_backends"] == kinds
    assert OPTIONS["llm_router_models"]["options"]["backend"]["choices"] == kinds
    # One port, warm-up and stop-timeout variable per kind, and a port in the role's engine port table.
    for kind in kinds:
        for suffix in ("port", "warmup", "stop_timeout"):
            assert f"llm_router_{kind}_{suffix}" in OPTIONS, (kind, suffix)
    assert sorted(VARS["_llm_router_engine_ports"]) == sorted(kinds)


def test_status_channels_are_the_routers() -> None:
    channels = list(router_config.STATUS_CHANNELS)
    assert VARS["_llm_router_status_channels"] == channels
    assert OPTIONS["llm_router_status_channel"]["choices"] == channels


def test_sleep_levels_and_default_resources_are_the_routers() -> None:
    assert tuple(PLUGIN.SLEEP_LEVELS) == tuple(router_config.SLEEP_LEVELS)
    assert OPTIONS["llm_router_models"]["options"]["sleep"]["choices"] == list(router_config.SLEEP_LEVELS)
    assert dict(PLUGIN.DEFAULT_RESOURCES) == dict(router_config.DEFAULT_RESOURCES)


def _allowed(problems: list[str], where: str) -> set[str]:
    """The router's allowed keys, from its own refusal of an unknown key (check-config names them)."""
    line = next(p for p in problems if where in p and "unknown key" in p)
    match = re.search(r"allowed: ([^)]*)\)", line)
    assert match, line
    return {k.strip() for k in match.group(1).split(",")}


@pytest.fixture(scope="module")
def router_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "config.yml").write_text("not_a_key: 1\n", encoding="utf-8")
    (tmp / "models.yml").write_text(
        "models:\n  m:\n    backend: llamacpp\n    unit: llm-backend-m.service\n    not_a_key: 1\n", encoding="utf-8"
    )
    with pytest.raises(router_config.ConfigError) as err:
        router_config.load_config_files(tmp / "config.yml", tmp / "models.yml")
    return {"config": _allowed(err.value.problems, "config.yml"), "model": _allowed(err.value.problems, "models.yml")}


def test_every_config_key_the_role_writes_is_one_the_router_knows(router_keys: dict[str, set[str]]) -> None:
    role_keys = set(VARS["_llm_router_config_keys"])
    assert role_keys - router_keys["config"] == set()


# An inventory that makes the role write every key it can.
EVERYTHING: dict[str, Any] = {
    "llm_router_port": 18902,
    "llm_router_api_keys": ["key-one", "key-two"],
    "llm_router_listen_address": "127.0.0.1",
    "llm_router_load_timeout": 300,
    "llm_router_status_channel": "content",
    "llm_router_speed_footer": False,
    "llm_router_footer_non_streaming": True,
    "llm_router_queue_limit": 8,
    "llm_router_keepalive_interval": 3,
    "llm_router_progress_interval": 1.5,
    "llm_router_shutdown_grace": 45,
    "llm_router_tabbyapi_warmup": False,
    "llm_router_vllm_stop_timeout": 12,
    "llm_router_resources": {"gpu": 48, "host_ram": 64},
    "llm_router_idle_unload": 600,
    "llm_router_current_alias": "current",
    # Router settings newer than the role's own variables go through llm_router_config_extra.
    "llm_router_config_extra": {"stall_timeout": 120, "max_body_bytes": 1048576},
    "llm_router_models": [
        {
            "id": "big",
            "backend": "llamacpp",
            "model": "/m/big.gguf",
            "args": ["-c", "8192"],
            "env": {"A": "1"},
            "name": "Big model",
            "load_timeout": 900,
            "needs": {"gpu": 40},
            "idle_unload": 0,
            "aliases": ["default"],
        },
        {
            "id": "embed",
            "backend": "llamacpp",
            "model": "/m/embed.gguf",
            "port": 8086,
            "needs": {"gpu": 2},
            "preload": True,
        },
        {"id": "sg", "backend": "sglang", "model": "/m/sg", "needs": {"gpu": 20}},
        {"id": "tb", "backend": "tabbyapi", "model": "tb-folder", "port": 5005, "needs": {"gpu": 4}},
        {
            "id": "sleeper",
            "backend": "vllm",
            "model": "/m/v",
            "needs": {"gpu": 40},
            "sleep": 1,
            "needs_asleep": {"host_ram": 30},
        },
    ],
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = render(EVERYTHING, tmp_path_factory.mktemp("everything"))
    assert run.rc == 0, run.output[-4000:]
    return run.out


def test_files_rendered_from_every_feature_pass_check_config(
    rendered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert router_cli(["check-config", "--config-dir", str(rendered)]) == 0, capsys.readouterr().err
    config = router_config.load_config(rendered)
    assert set(config.models) == {m["id"] for m in EVERYTHING["llm_router_models"]}
    assert config.stall_timeout == 120 and config.max_body_bytes == 1048576
    assert config.models["sleeper"].sleep == 1 and config.models["embed"].preload


def test_the_rendered_files_use_every_key_the_role_knows(rendered: Path, router_keys: dict[str, set[str]]) -> None:
    config = _load(rendered / "config.yml")
    assert set(VARS["_llm_router_config_keys"]) <= set(config), "a key of _llm_router_config_keys is never written"
    written = {key for model in _load(rendered / "models.yml")["models"].values() for key in model}
    assert written == router_keys["model"], "models.yml keys differ from the router's model keys"


def test_the_api_the_role_calls_exists() -> None:
    from router_app.app import create_app
    from router_app.service import RouterService

    app = create_app(RouterService(router_config.RouterConfig()))
    routes = {(rule.rule, method) for rule in app.url_map.iter_rules() for method in rule.methods or ()}
    for route in (("/models", "GET"), ("/models/load", "POST"), ("/models/unload", "POST")):
        assert route in routes, route
    assert switcher.ModelStatus.LOADED.value == "loaded"  # what tasks/ready.yml waits for


@settings(max_examples=300, deadline=None)
@given(st.from_regex(router_config.MODEL_ID_PATTERN, fullmatch=True))
def test_a_unit_named_after_any_valid_model_id_is_a_valid_unit(model_id: str) -> None:
    assert re.fullmatch(PLUGIN.MODEL_ID_PATTERN, model_id)
    unit = f"{VARS['_llm_router_unit_prefix']}{model_id}.service"
    assert router_config.UNIT_PATTERN.fullmatch(unit), unit
    assert len(unit) <= 255  # systemd's limit on unit names
