"""Fixtures of the fleet scenario's verify step: two boxes, each reached through testinfra by name (the tests run
once, not once per host), and each router from this machine on its own port.

The SSE helpers are molecule/default's (its conftest.py, loaded under another module name); the inventory is
../group_vars/llm_routers.yml plus ../host_vars/<host>.yml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import testinfra

SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parents[1]
HOSTS = ("llmr-fleet-a", "llmr-fleet-b")  # inventory order: the order of a rolling run


def _load_default_helpers() -> Any:
    path = SCENARIO_DIR.parent / "default" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("molecule_default_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


helpers = _load_default_helpers()
Stream = helpers.Stream
stream_chat = helpers.stream_chat
main_pid = helpers.main_pid
is_active = helpers.is_active
ROUTER_UNIT: str = helpers.ROUTER_UNIT

GROUP_VARS: dict[str, Any] = helpers.load_inventory(SCENARIO_DIR / "group_vars" / "llm_routers.yml")
HOST_VARS: dict[str, dict[str, Any]] = {
    h: helpers.load_inventory(SCENARIO_DIR / "host_vars" / f"{h}.yml") for h in HOSTS
}
MODELS: list[dict[str, Any]] = GROUP_VARS["llm_router_models"]
BY_ID = {m["id"]: m for m in MODELS}
API_KEY = str(GROUP_VARS["llm_router_api_keys"][0])


def unit_of(model_id: str) -> str:
    return f"llm-backend-{model_id}.service"


@dataclass
class FleetHost:
    name: str
    box: Any  # testinfra host
    url: str

    def client(self, read: float = 120.0) -> httpx.Client:
        timeout = httpx.Timeout(connect=5.0, read=read, write=30.0, pool=None)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout)

    def run(self, command: str) -> Any:
        return self.box.run(command)

    def unit_pid(self, unit: str) -> int:
        return int(main_pid(self.box, unit))

    def model_states(self) -> dict[str, str]:
        with self.client() as c:
            data = c.get("/models").json()["data"]
        return {e["id"]: e["status"]["value"] for e in data}

    def journal(self, unit: str, since: float) -> list[tuple[float, str]]:
        """(realtime seconds, message) of a unit's journal since `since` (the boxes share this machine's clock)."""
        out = self.run(f"journalctl -u {shlex.quote(unit)} --since @{since:.3f} -o json --no-pager").stdout
        entries = []
        for line in out.splitlines():
            if line.strip():
                e = json.loads(line)
                message = e.get("MESSAGE")
                if isinstance(message, list):  # not valid UTF-8: journald gives bytes
                    message = bytes(message).decode("utf-8", "replace")
                entries.append((int(e["__REALTIME_TIMESTAMP"]) / 1e6, str(message)))
        return entries


@pytest.fixture(scope="session")
def molecule_env() -> dict[str, str]:
    return dict(helpers.require_molecule_env())


@pytest.fixture(scope="session")
def fleet(molecule_env: dict[str, str]) -> list[FleetHost]:
    inventory = molecule_env["MOLECULE_INVENTORY_FILE"]
    hosts = []
    for name in HOSTS:
        box = testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)
        assert box.run("true").rc == 0, f"cannot run commands in {name} over ssh"
        hosts.append(FleetHost(name, box, f"http://127.0.0.1:{int(HOST_VARS[name]['llm_router_port'])}"))
    return hosts


wait_for = helpers.wait_for


def run_playbook(
    molecule_env: dict[str, str], tmp_path: Path, extra_vars: dict[str, Any], *args: str
) -> tuple[int, str, float]:
    """playbooks/site.yml (this scenario's converge.yml) against the fleet: (rc, output, seconds)."""
    extra = tmp_path / f"extra-{time.monotonic_ns()}.json"
    extra.write_text(json.dumps(extra_vars), encoding="utf-8")
    cmd = ["ansible-playbook", "-i", molecule_env["MOLECULE_INVENTORY_FILE"], "-e", f"@{extra}", *args,
           str(SCENARIO_DIR / "converge.yml")]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, env=molecule_env, capture_output=True, text=True, timeout=900, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.fixture(scope="session")
def upgraded_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The router's wheel built from this repository with a bumped local version (`0.1.0+fleet.N`): a changed
    wheel, as an upgrade brings. Built by the role's own builder."""
    import tomllib

    tmp = tmp_path_factory.mktemp("upgrade")
    src = tmp / "src"
    sys.path.insert(0, str(REPO / "roles" / "llm_router" / "files"))
    try:
        import build_wheel
    finally:
        sys.path.pop(0)
    for rel in build_wheel.source_files(REPO):
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((REPO / rel).read_bytes())
    pyproject = src / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    new_version = f"{version}+fleet.{int(time.time())}"
    pyproject.write_text(
        pyproject.read_text(encoding="utf-8").replace(f'version = "{version}"', f'version = "{new_version}"', 1),
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "roles/llm_router/files/build_wheel.py"), "--source", str(src), "--cache",
         str(tmp / "cache"), "--python", sys.executable],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    wheel = Path(json.loads(proc.stdout)["wheel"])
    assert new_version.replace("+", "+") in wheel.name or "fleet" in wheel.name, wheel.name
    return wheel


_SESSION: dict[str, bool] = {}
RESULTS = Path(os.environ.get("LLM_ROUTER_TEST_RESULTS", "/var/cache/llm-router/test-results")) / "molecule-fleet.json"


@pytest.fixture(scope="session")
def results_file() -> Path:
    """Where the scenario's figures go (printed in pytest's summary, so molecule's output shows them)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("{}", encoding="utf-8")
    _SESSION["results"] = True
    return RESULTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SESSION.get("results"):
        terminalreporter.write_sep("-", f"molecule/fleet figures ({RESULTS})")
        terminalreporter.write_line(RESULTS.read_text(encoding="utf-8"))


def record(path: Path, key: str, value: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
