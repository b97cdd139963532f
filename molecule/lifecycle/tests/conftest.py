"""Fixtures of the lifecycle scenario's verify step (testinfra), on its own inventory.

The box and SSE helpers are molecule/default's (its conftest.py, loaded here under another module name so the two
conftest modules do not collide); the inventory is ../group_vars/llm_routers.yml.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SCENARIO_DIR = Path(__file__).resolve().parent.parent
INVENTORY_FILE = SCENARIO_DIR / "group_vars" / "llm_routers.yml"


def _load_default_helpers() -> Any:
    path = SCENARIO_DIR.parent / "default" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("molecule_default_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


helpers = _load_default_helpers()
UNIT_PREFIX: str = helpers.UNIT_PREFIX
ROUTER_UNIT: str = helpers.ROUTER_UNIT
ROUTER_USER: str = helpers.ROUTER_USER
CONFIG_DIR: str = helpers.CONFIG_DIR
Stream = helpers.Stream
stream_chat = helpers.stream_chat
is_active = helpers.is_active
active_backend_units = helpers.active_backend_units
main_pid = helpers.main_pid
run_as_router_user = helpers.run_as_router_user


INVENTORY: dict[str, Any] = helpers.load_inventory(INVENTORY_FILE)
MODELS: list[dict[str, Any]] = INVENTORY["llm_router_models"]
MODEL_IDS = [m["id"] for m in MODELS]
BY_ID = {m["id"]: m for m in MODELS}
RESOURCES: dict[str, float] = INVENTORY.get("llm_router_resources") or {"gpu": 1}


def unit_of(model_id: str) -> str:
    return f"{UNIT_PREFIX}{model_id}.service"


def needs_of(model_id: str) -> dict[str, float]:
    """The router's rule: no needs = every resource at full capacity; a resource not named = 0."""
    needs = BY_ID[model_id].get("needs")
    return dict(RESOURCES) if needs is None else {r: float(needs.get(r, 0)) for r in RESOURCES}


def fit_together(*model_ids: str) -> bool:
    return all(sum(needs_of(m)[r] for m in model_ids) <= cap + 1e-9 for r, cap in RESOURCES.items())


def can_sleep(model_id: str) -> bool:
    """A vLLM model with `sleep`: the router puts it to sleep instead of stopping its unit."""
    return BY_ID[model_id].get("backend") == "vllm" and BY_ID[model_id].get("sleep") is not None


def needs_asleep_of(model_id: str) -> dict[str, float]:
    needs = BY_ID[model_id].get("needs_asleep") or {}
    return {r: float(needs.get(r, 0)) for r in RESOURCES}


def asleep_beside(sleeper: str, other: str) -> bool:
    return can_sleep(sleeper) and all(
        needs_asleep_of(sleeper)[r] + needs_of(other)[r] <= cap + 1e-9 for r, cap in RESOURCES.items()
    )


def units_conflict(a: str, b: str) -> bool:
    """Whether the units of a and b conflict: the models never run together, and neither can be asleep (its unit
    running) beside the other."""
    return not fit_together(a, b) and not asleep_beside(a, b) and not asleep_beside(b, a)


wait_for = helpers.wait_for


@pytest.fixture(scope="session")
def router_url() -> str:
    return f"http://127.0.0.1:{int(INVENTORY['llm_router_port'])}"


@pytest.fixture(scope="session")
def api_key() -> str:
    return str(INVENTORY["llm_router_api_keys"][0])


@pytest.fixture(scope="session")
def client(router_url: str, api_key: str) -> Iterator[httpx.Client]:
    timeout = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=None)
    with httpx.Client(base_url=router_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout) as c:
        yield c


@pytest.fixture(scope="session")
def molecule_env() -> dict[str, str]:
    """What a nested ansible-playbook run needs: molecule's inventory and ansible.cfg (ROLES_PATH etc.)."""
    return dict(helpers.require_molecule_env())


@pytest.fixture(scope="module")
def box(host: Any) -> Any:
    assert host.run("true").rc == 0, "cannot run commands in the box over ssh"
    return host
