"""Config validation: every rejection names the file, the key and the reason; good files load with defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from router_app.cli import main
from router_app.config import ConfigError, load_config, parse_config

GOOD_CONFIG: dict[str, Any] = {
    "listen": "0.0.0.0:8002",
    "api_keys": [],
    "systemctl": ["systemctl"],
    "journalctl": ["journalctl"],
    "load_timeout": 180,
    "status_channel": "reasoning",
    "speed_footer": True,
    "backends": {
        "llamacpp": {"url": "http://127.0.0.1:8085"},
        "sglang": {"url": "http://127.0.0.1:30000"},
        "tabbyapi": {"url": "http://127.0.0.1:5000"},
    },
}
GOOD_MODELS: dict[str, Any] = {
    "models": {
        "llama-3.3-70b-q4": {
            "backend": "llamacpp",
            "unit": "llm-backend-llama-3.3-70b-q4.service",
            "name": "Llama 3.3 70B Q4_K_M",
            "load_timeout": 600,
        },
        "qwen2.5-72b-exl2": {"backend": "tabbyapi", "unit": "llm-backend-qwen2.5-72b-exl2.service"},
    }
}


def problems_of(config: Any, models: Any) -> list[str]:
    problems: list[str] = []
    parse_config(config, models, problems)
    return problems


def with_change(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


DELETE = object()


def test_good_files_load_with_defaults_and_overrides() -> None:
    problems: list[str] = []
    config = parse_config(GOOD_CONFIG, GOOD_MODELS, problems)
    assert problems == []
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8002)
    assert config.models["llama-3.3-70b-q4"].load_timeout == 600
    assert config.models["qwen2.5-72b-exl2"].load_timeout == 180
    assert config.models["qwen2.5-72b-exl2"].name == "qwen2.5-72b-exl2"
    assert config.backends["tabbyapi"].warmup is True and config.backends["llamacpp"].warmup is False
    assert config.backends["sglang"].port == 30000 and config.backends["sglang"].host == "127.0.0.1"
    assert config.queue_limit == 64 and config.footer_non_streaming is False


def test_empty_config_file_means_defaults_but_models_still_need_backends() -> None:
    problems = problems_of(None, GOOD_MODELS)
    assert problems == [
        "models.yml: models.llama-3.3-70b-q4.backend: 'llamacpp' is not a configured backend in config.yml "
        "(configured: none)",
        "models.yml: models.qwen2.5-72b-exl2.backend: 'tabbyapi' is not a configured backend in config.yml "
        "(configured: none)",
    ]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("colour", "blue", "config.yml: colour: unknown key"),
        ("listen", "8002", "config.yml: listen: must be HOST:PORT"),
        ("listen", "host:99999", "config.yml: listen: must be HOST:PORT"),
        ("listen", 8002, "config.yml: listen: must be a string, got an integer 8002"),
        ("api_keys", "secret", "config.yml: api_keys: must be a list"),
        ("api_keys", ["ok", ""], "config.yml: api_keys: must be a list of non-empty strings"),
        ("systemctl", [], "config.yml: systemctl: must be a non-empty list of non-empty strings"),
        ("journalctl", "journalctl", "config.yml: journalctl: must be a list"),
        ("load_timeout", 0, "config.yml: load_timeout: must be greater than 0"),
        ("load_timeout", True, "config.yml: load_timeout: must be a number, got a boolean True"),
        ("status_channel", "chat", "config.yml: status_channel: must be one of reasoning, content, none"),
        ("speed_footer", "yes", "config.yml: speed_footer: must be a boolean"),
        ("queue_limit", 2.5, "config.yml: queue_limit: must be an integer"),
        ("keepalive_interval", -1, "config.yml: keepalive_interval: must be greater than 0"),
        ("backends", [], "config.yml: backends: must be a mapping"),
        ("backends.ollama", {"url": "http://x:1"}, "config.yml: backends.ollama: unknown backend kind"),
        ("backends.sglang", "http://x:1", "config.yml: backends.sglang: must be a mapping with 'url'"),
        ("backends.sglang.url", DELETE, "config.yml: backends.sglang.url: missing"),
        ("backends.sglang.url", "http://x:1/v1", "config.yml: backends.sglang.url: must be http(s)://HOST:PORT"),
        ("backends.sglang.port", 1, "config.yml: backends.sglang.port: unknown key"),
        ("backends.sglang.warmup", "on", "config.yml: backends.sglang.warmup: must be a boolean"),
    ],
)
def test_config_rejections(path: str, value: Any, expected: str) -> None:
    problems = problems_of(with_change(GOOD_CONFIG, path, value), GOOD_MODELS)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (None, "models.yml: (top level): must be a mapping with a 'models' key"),
        ({"models": {}}, "models.yml: models: must be a non-empty mapping"),
        ({"models": [], "extra": 1}, "models.yml: extra: unknown key"),
        ({"models": {"bad id!": {"backend": "llamacpp", "unit": "u.service"}}}, "models.yml: models.bad id!: model id"),
        ({"models": {"m": "llamacpp"}}, "models.yml: models.m: must be a mapping with 'backend' and 'unit'"),
        ({"models": {"m": {"unit": "u.service"}}}, "models.yml: models.m.backend: missing"),
        ({"models": {"m": {"backend": "llamacpp"}}}, "models.yml: models.m.unit: missing"),
        (
            {"models": {"m": {"backend": "vllm", "unit": "u.service"}}},
            "models.yml: models.m.backend: 'vllm' is not a configured backend",
        ),
        (
            {"models": {"m": {"backend": "llamacpp", "unit": "u.timer"}}},
            "models.yml: models.m.unit: must be a systemd service name",
        ),
        (
            {"models": {"m": {"backend": "llamacpp", "unit": "u.service", "gpu": 1}}},
            "models.yml: models.m.gpu: unknown key",
        ),
        (
            {"models": {"m": {"backend": "llamacpp", "unit": "u.service", "load_timeout": "10"}}},
            "models.yml: models.m.load_timeout: must be",
        ),
        (
            {"models": {"m": {"backend": "llamacpp", "unit": "u.service", "name": 7}}},
            "models.yml: models.m.name: must be a string",
        ),
        (
            {
                "models": {
                    "a": {"backend": "llamacpp", "unit": "u.service"},
                    "b": {"backend": "sglang", "unit": "u.service"},
                }
            },
            "models.yml: models.b.unit: 'u.service' is already the unit of model 'a'",
        ),
    ],
)
def test_models_rejections(models: Any, expected: str) -> None:
    problems = problems_of(GOOD_CONFIG, models)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    config = with_change(GOOD_CONFIG, "status_channel", "x")
    config["listen"] = "nope"
    models = {"models": {"m": {"backend": "vllm", "unit": "bad unit"}}}
    assert len(problems_of(config, models)) == 4


def write(directory: Path, config: Any, models: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yml").write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    (directory / "models.yml").write_text(models if isinstance(models, str) else yaml.safe_dump(models))
    return directory


def test_load_config_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nowhere")
    assert "config.yml: cannot read" in str(missing.value) and "file not found" in str(missing.value)
    directory = write(tmp_path / "bad", "listen: [unclosed\n", GOOD_MODELS)
    with pytest.raises(ConfigError) as invalid:
        load_config(directory)
    assert str(invalid.value).startswith("config.yml: invalid YAML at line 2")


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good", GOOD_CONFIG, GOOD_MODELS)
    assert main(["check-config", "--config-dir", str(good)]) == 0
    assert "ok: config.yml and 2 model(s) valid" in capsys.readouterr().out
    bad_models = tmp_path / "candidate.yml"
    bad_models.write_text(yaml.safe_dump({"models": {"m": {"backend": "vllm", "unit": "u.service"}}}))
    assert main(["check-config", "--config-dir", str(good), "--models-file", str(bad_models)]) == 1
    assert "error: models.yml: models.m.backend: 'vllm'" in capsys.readouterr().err
    assert main(["check-config", "--config-file", str(good / "config.yml"), "--config-only"]) == 0


def test_config_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write(tmp_path / "env", GOOD_CONFIG, GOOD_MODELS)
    monkeypatch.setenv("LLM_ROUTER_CONFIG_DIR", str(good))
    assert main(["check-config"]) == 0


def test_duplicate_model_id_is_refused_with_its_line(tmp_path: Path) -> None:
    models = "models:\n  a: {backend: llamacpp, unit: a.service}\n  a: {backend: sglang, unit: b.service}\n"
    directory = write(tmp_path / "dup", GOOD_CONFIG, models)
    with pytest.raises(ConfigError) as error:
        load_config(directory)
    assert str(error.value) == "models.yml: invalid YAML at line 3, column 3: duplicate key 'a'"


def lifecycle_models(**per_model: dict[str, Any]) -> dict[str, Any]:
    models: dict[str, Any] = {
        "chat": {"backend": "llamacpp", "unit": "llm-backend-chat.service", "needs": {"gpu": 8}},
        "embed": {
            "backend": "llamacpp",
            "unit": "llm-backend-embed.service",
            "url": "http://127.0.0.1:8086",
            "needs": {"gpu": 2},
        },
    }
    for model_id, extra in per_model.items():
        models[model_id] = {**models.get(model_id, {}), **extra}
    return {"models": models}


LIFECYCLE_CONFIG = {**GOOD_CONFIG, "resources": {"gpu": 10}}


def test_lifecycle_keys_load_with_their_defaults_and_values() -> None:
    problems: list[str] = []
    config = parse_config(
        {**LIFECYCLE_CONFIG, "idle_unload": 300, "current_alias": "current"},
        lifecycle_models(embed={"aliases": ["emb"], "preload": True, "idle_unload": 0}),
        problems,
    )
    assert problems == []
    chat, embed = config.models["chat"], config.models["embed"]
    assert config.resources == {"gpu": 10.0} and config.current_alias == "current"
    assert config.idle_unload_of(chat) == 300 and config.idle_unload_of(embed) == 0
    assert config.engine(embed).url == "http://127.0.0.1:8086" and config.engine(chat).url == "http://127.0.0.1:8085"
    assert embed.preload and embed.aliases == ("emb",) and config.alias_targets() == {"emb": "embed"}
    assert config.fits([config.needs(chat), config.needs(embed)])
    defaults = parse_config(GOOD_CONFIG, GOOD_MODELS, problems)
    model = defaults.models["qwen2.5-72b-exl2"]
    assert defaults.resources == {"gpu": 1.0} and defaults.needs(model) == {"gpu": 1.0}, "one engine at a time"
    assert defaults.idle_unload_of(model) == 0 and defaults.current_alias is None


@pytest.mark.parametrize(
    ("config_extra", "models", "expected"),
    [
        ({}, lifecycle_models(chat={"needs": {"vram": 1}}), "models.yml: models.chat.needs.vram: unknown resource"),
        ({}, lifecycle_models(chat={"needs": {"gpu": 11}}), "models.chat.needs.gpu: 11 is more than the capacity"),
        ({}, lifecycle_models(chat={"needs": {"gpu": -1}}), "models.chat.needs.gpu: must be a number, 0 or more"),
        ({}, lifecycle_models(chat={"idle_unload": -5}), "models.chat.idle_unload: must be 0 or more"),
        ({"idle_unload": -1}, lifecycle_models(), "config.yml: idle_unload: must be 0 or more"),
        ({"resources": {"gpu": 0}}, lifecycle_models(), "config.yml: resources.gpu: capacity must be a number"),
        (
            {},
            lifecycle_models(embed={"url": "http://127.0.0.1:8085"}),
            "models.yml: models.embed.url: http://127.0.0.1:8085 is also the engine URL of 'chat'",
        ),
        ({}, lifecycle_models(embed={"aliases": ["chat"]}), "models.embed.aliases: 'chat' is a model id"),
        (
            {},
            lifecycle_models(chat={"aliases": ["x"]}, embed={"aliases": ["x"]}),
            "models.embed.aliases: 'x' is already an alias of 'chat'",
        ),
        ({"current_alias": "embed"}, lifecycle_models(), "config.yml: current_alias: 'embed' is already a model id"),
        (
            {},
            lifecycle_models(
                chat={"preload": True}, big={"backend": "sglang", "unit": "llm-backend-big.service", "preload": True}
            ),
            "models.yml: preload: the preload models (chat, big) cannot all run at once",
        ),
        ({}, lifecycle_models(chat={"aliases": ["bad id!"]}), "models.chat.aliases: each alias must be a model id"),
        ({}, lifecycle_models(chat={"preload": "yes"}), "models.chat.preload: must be a boolean"),
    ],
)
def test_lifecycle_rejections_name_file_key_and_reason(
    config_extra: dict[str, Any], models: dict[str, Any], expected: str
) -> None:
    found = problems_of({**LIFECYCLE_CONFIG, **config_extra}, models)
    assert any(expected in p for p in found), found


def test_shared_url_is_fine_for_models_that_never_run_together() -> None:
    models = lifecycle_models(embed={"url": "http://127.0.0.1:8085", "needs": {"gpu": 3}})
    assert problems_of(LIFECYCLE_CONFIG, models) == [], "8 + 3 > 10: they never run at once, sharing a port is fine"
    assert problems_of(GOOD_CONFIG, GOOD_MODELS) == []


def test_a_sleeper_may_not_share_its_engine_url_with_a_model_that_runs_while_it_sleeps() -> None:
    vllm = {**LIFECYCLE_CONFIG, "backends": {**GOOD_CONFIG["backends"], "vllm": {"url": "http://127.0.0.1:8000"}}}
    models = {
        "models": {
            "qa": {"backend": "vllm", "unit": "llm-backend-qa.service", "needs": {"gpu": 8}, "sleep": 1},
            "qb": {"backend": "vllm", "unit": "llm-backend-qb.service", "needs": {"gpu": 8}},
        }
    }
    found = problems_of(vllm, models)
    assert any("keeps its engine (and port) asleep" in p for p in found), found
    models["models"]["qb"]["url"] = "http://127.0.0.1:8001"
    assert problems_of(vllm, models) == []
