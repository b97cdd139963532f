"""Shared fixtures for the molecule verify step (testinfra).

Two ways into the box: the router's HTTP API from this machine (the box shares its network, the router listens on
127.0.0.1:llm_router_port), and testinfra's `host` (ssh into the box, from molecule's inventory) for systemctl,
sudo and files. The inventory under test is read from ../group_vars/llm_routers.yml, the same file molecule links.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

SCENARIO_DIR = Path(__file__).resolve().parent.parent
INVENTORY_FILE = SCENARIO_DIR / "group_vars" / "llm_routers.yml"
UNIT_PREFIX = "llm-backend-"  # roles/llm_router/vars/main.yml: _llm_router_unit_prefix
ROUTER_UNIT = "llm-router.service"
ROUTER_USER = "llm-router"
CONFIG_DIR = "/etc/llm-router"


def load_inventory(path: Path = INVENTORY_FILE) -> dict[str, Any]:
    """A scenario's group_vars (the lifecycle scenario reads its own with this too)."""
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data


INVENTORY = load_inventory()
MODELS: list[dict[str, Any]] = INVENTORY["llm_router_models"]
MODEL_IDS = [m["id"] for m in MODELS]


def unit_of(model_id: str) -> str:
    return f"{UNIT_PREFIX}{model_id}.service"


def first_model(backend: str) -> str:
    return next(m["id"] for m in MODELS if m["backend"] == backend)


def models_of(backend: str) -> list[str]:
    return [m["id"] for m in MODELS if m["backend"] == backend]


@pytest.fixture(scope="session")
def inventory() -> dict[str, Any]:
    return INVENTORY


@pytest.fixture(scope="session")
def router_url() -> str:
    return f"http://127.0.0.1:{int(INVENTORY['llm_router_port'])}"


@pytest.fixture(scope="session")
def api_key() -> str:
    keys = INVENTORY.get("llm_router_api_keys") or []
    assert keys, "the molecule inventory should set an API key, to prove auth works"
    return str(keys[0])


@pytest.fixture(scope="session")
def client(router_url: str, api_key: str) -> Iterator[httpx.Client]:
    timeout = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=None)
    with httpx.Client(base_url=router_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout) as c:
        yield c


@pytest.fixture(scope="module")
def box(host: Any) -> Any:
    """testinfra's host for the box, with a clear failure when the box is not reachable."""
    assert host.run("true").rc == 0, "cannot run commands in the box over ssh"
    return host


# --------------------------------------------------------------------------------------------------------------
# helpers on the box


def is_active(box: Any, unit: str) -> str:
    return box.run(f"systemctl is-active {shlex.quote(unit)}").stdout.strip()


def active_backend_units(box: Any) -> list[str]:
    out = box.run(
        f"systemctl list-units --no-legend --plain --state=active,activating,deactivating '{UNIT_PREFIX}*.service'"
    ).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def main_pid(box: Any, unit: str = ROUTER_UNIT) -> int:
    return int(box.run(f"systemctl show -P MainPID {shlex.quote(unit)}").stdout.strip() or 0)


def sha256_of(box: Any, path: str) -> str:
    res = box.run(f"sha256sum {shlex.quote(path)}")
    return res.stdout.split()[0] if res.rc == 0 else f"missing (rc={res.rc})"


def run_as_router_user(box: Any, command: str) -> Any:
    return box.run(f"sudo -n -u {ROUTER_USER} -- {command}")


# --------------------------------------------------------------------------------------------------------------
# a small SSE client


@dataclass
class Stream:
    status: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    comments: int = 0
    error: str = ""

    @property
    def content(self) -> str:
        return "".join((c.get("delta") or {}).get("content") or "" for e in self.events for c in e.get("choices") or [])

    @property
    def reasoning(self) -> str:
        return "".join(
            (c.get("delta") or {}).get("reasoning_content") or "" for e in self.events for c in e.get("choices") or []
        )

    @property
    def content_chunks(self) -> int:
        return sum(1 for e in self.events for c in e.get("choices") or [] if (c.get("delta") or {}).get("content"))

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events for c in e.get("choices") or [] if c.get("finish_reason")]

    @property
    def models(self) -> set[str]:
        return {e["model"] for e in self.events if e.get("model")}


def stream_chat(
    client: httpx.Client,
    model: str,
    prompt: str = "Say hello.",
    on_event: Callable[[Stream], None] | None = None,
    headers: dict[str, str] | None = None,
    into: Stream | None = None,
    **extra: Any,
) -> Stream:
    """POST a streamed chat completion and collect it; `on_event` sees the stream after each data event. `into`
    collects into a Stream the caller holds: after a transport error its `status` says whether an answer began."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}], **extra}
    result = Stream() if into is None else into
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            resp.read()
            result.error = resp.text
            return result
        for line in resp.iter_lines():
            if line.startswith(":"):
                result.comments += 1
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                result.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                result.error = json.dumps(event["error"])
            result.events.append(event)
            if on_event is not None:
                on_event(result)
    return result


class BackgroundStream(threading.Thread):
    """stream_chat in a thread; `progressed` is set once `min_chunks` content chunks have arrived."""

    def __init__(self, client: httpx.Client, model: str, prompt: str, min_chunks: int) -> None:
        super().__init__(daemon=True)
        self.client, self.model, self.prompt, self.min_chunks = client, model, prompt, min_chunks
        self.progressed = threading.Event()
        self.result: Stream | None = None
        self.exc: BaseException | None = None

    def _seen(self, s: Stream) -> None:
        if s.content_chunks >= self.min_chunks:
            self.progressed.set()

    def run(self) -> None:
        try:
            self.result = stream_chat(self.client, self.model, self.prompt, on_event=self._seen)
        except BaseException as exc:  # reported by the test
            self.exc = exc
        finally:
            self.progressed.set()


MOLECULE_ENV_KEYS = ("MOLECULE_INVENTORY_FILE", "ANSIBLE_CONFIG", "ANSIBLE_ROLES_PATH")


def require_molecule_env() -> dict[str, str]:
    """What a nested ansible-playbook run needs (molecule's inventory and ansible.cfg), or a failure saying how to
    run the tests (molecule/lifecycle and molecule/fleet)."""
    env = dict(os.environ)
    for key in MOLECULE_ENV_KEYS:
        assert env.get(key), f"{key} is not set: run these tests through `molecule verify`/`molecule test`"
    return env


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"after {timeout:g} s: {what}")


@pytest.fixture(scope="session")
def molecule_env() -> dict[str, str]:
    """What a nested ansible-playbook run needs: molecule's inventory and ansible.cfg (ROLES_PATH etc.)."""
    env = dict(os.environ)
    for key in MOLECULE_ENV_KEYS:
        if not env.get(key):
            pytest.skip(f"{key} is not set: run these tests through `molecule verify`/`molecule test`")
    return env
