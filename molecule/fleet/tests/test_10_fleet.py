"""The fleet as playbooks/site.yml leaves it: both routers up with the preload model loaded, TabbyAPI's model
directory from llm_router_tabbyapi_config, Open-WebUI's connection list for both hosts."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import HOST_VARS, HOSTS, MODELS, FleetHost, is_active, unit_of


def test_each_router_answers_with_its_preload_model_loaded(fleet: list[FleetHost]) -> None:
    for host in fleet:
        states = host.model_states()
        assert sorted(states) == sorted(m["id"] for m in MODELS), host.name
        assert states["embed"] == "loaded", (host.name, states)
        assert is_active(host.box, unit_of("embed")) == "active"


def test_tabbyapi_config_model_dir_applies(fleet: list[FleetHost]) -> None:
    """model.model_dir of llm_router_tabbyapi_config wins over llm_router_tabbyapi_model_dir: the fake TabbyAPI
    (FAKE_CHECK_MODEL_FILE) only loads when the folder is in that directory."""
    for host in fleet:
        config = yaml.safe_load(host.box.file("/opt/tabbyAPI/config.yml").content_string)
        assert config["model"] == {"model_dir": "/srv/tabby-models", "max_seq_len": 4096}
        assert config["network"]["port"] == HOST_VARS[host.name]["llm_router_tabbyapi_port"]
        with host.client() as client:
            body = {"model": "tabby", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
            resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, (host.name, resp.text)


def test_openwebui_connections_list_both_hosts(molecule_env: dict[str, str]) -> None:
    path = Path(molecule_env["MOLECULE_INVENTORY_FILE"]).parent / "openwebui-connections.env"
    if not path.exists():  # molecule's inventory may be a file inside the ephemeral directory
        path = Path(molecule_env["MOLECULE_INVENTORY_FILE"]) / "openwebui-connections.env"
    text = path.read_text(encoding="utf-8")
    urls = ";".join(f"http://127.0.0.1:{HOST_VARS[h]['llm_router_port']}/v1" for h in HOSTS)
    assert f'OPENAI_API_BASE_URLS="{urls}"' in text
    assert 'OPENAI_API_KEYS="fleet-key-2c9e51;fleet-key-2c9e51"' in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
