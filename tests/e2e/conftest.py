"""End-to-end harness: the real router (`llm-router serve`, hypercorn on 127.0.0.1) in its own process, driving the
project's fake engine processes through the fake systemctl/journalctl stand-in named in config.yml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.fake_units import FakeSystemd, write_tabby_config

REPO = Path(__file__).resolve().parents[2]
ROUTER_PORT = 18210  # the fake engines use the next three ports (RouterEnv's base_port)
LLAMA_PORT = ROUTER_PORT + 1
SGLANG_PORT = ROUTER_PORT + 2
TABBY_PORT = ROUTER_PORT + 3


@dataclass
class ModelSpec:
    id: str
    backend: str
    env: dict[str, str] = field(default_factory=dict)
    load_timeout: float | None = None
    name: str | None = None
    port: int | None = None
    """This model's own engine port (models.yml `url`); None: its backend's port."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More models.yml keys: needs, idle_unload, preload, aliases, sleep, needs_asleep."""
    args: list[str] = field(default_factory=list)
    """Extra engine arguments (e.g. vLLM's --enable-sleep-mode)."""


DEFAULT_MODELS = [
    ModelSpec("llama-a", "llamacpp", name="Llama A"),
    ModelSpec("llama-b", "llamacpp", name="Llama B"),
    ModelSpec("sg", "sglang"),
    ModelSpec("tabby", "tabbyapi"),
    ModelSpec("broken", "llamacpp", env={"FAKE_FAIL_LOAD": "1", "FAKE_FAIL_AFTER": "0.2"}),
    ModelSpec("sleepy", "llamacpp", env={"FAKE_LOAD_SECONDS": "600"}, load_timeout=2),
]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, what: str = "the condition", interval: float = 0.02
) -> Any:
    """Poll `predicate` every `interval` s until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def unit_of(model_id: str) -> str:
    return f"llm-backend-{model_id}.service"


class RouterEnv:
    """A running router with its fake systemd; helpers to talk to it and inspect the engines."""

    def __init__(
        self, tmp: Path, models: list[ModelSpec], config_extra: dict[str, Any], base_port: int = ROUTER_PORT
    ) -> None:
        """`base_port` is the router's port; the fake llama-server, SGLang, TabbyAPI and vLLM use the next four."""
        self.tmp = tmp
        self.models = {m.id: m for m in models}
        self.systemd = FakeSystemd(tmp / "systemd")
        self.config_dir = tmp / "etc"
        self.config_dir.mkdir()
        self.events_dir = tmp / "events"
        self.events_dir.mkdir()
        self.port = base_port
        self.base = f"http://127.0.0.1:{base_port}"
        ports = {"llamacpp": base_port + 1, "sglang": base_port + 2, "tabbyapi": base_port + 3, "vllm": base_port + 4}
        tabby_dir = write_tabby_config(tmp / "tabby", ports["tabbyapi"], tmp / "tabby-models")
        for model in models:
            env = {"FAKE_LOAD_SECONDS": "0.3", "FAKE_EVENT_LOG": str(self.events_path(model.id)), **model.env}
            self.systemd.define_engine_unit(
                unit_of(model.id),
                model.backend,
                model.id,
                model.port or ports[model.backend],
                args=model.args,
                env=env,
                tabby_dir=tabby_dir if model.backend == "tabbyapi" else None,
            )
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{base_port}",
            "systemctl": self.systemd.systemctl_argv(),
            "journalctl": self.systemd.journalctl_argv(),
            "load_timeout": 30,
            "status_channel": "reasoning",
            "speed_footer": True,
            "progress_interval": 0.5,
            "keepalive_interval": 1,
            "shutdown_grace": 10,
            "backends": {kind: {"url": f"http://127.0.0.1:{port}"} for kind, port in ports.items()},
            **config_extra,
        }
        self.write_config(config)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "router.log"

    def write_config(self, config: dict[str, Any], models: dict[str, Any] | None = None) -> None:
        self.config = config
        (self.config_dir / "config.yml").write_text(yaml.safe_dump(config))
        if models is None:
            models = {"models": {}}
            for m in self.models.values():
                entry: dict[str, Any] = {"backend": m.backend, "unit": unit_of(m.id)}
                if m.name:
                    entry["name"] = m.name
                if m.load_timeout is not None:
                    entry["load_timeout"] = m.load_timeout
                if m.port is not None:
                    entry["url"] = f"http://127.0.0.1:{m.port}"
                models["models"][m.id] = {**entry, **m.extra}
        (self.config_dir / "models.yml").write_text(yaml.safe_dump(models))

    def events_path(self, model_id: str) -> Path:
        return self.events_dir / f"{model_id}.jsonl"

    def events(self, model_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.events_path(model_id)
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r.get("event") == kind]

    def start(self, listener: socket.socket | None = None) -> None:
        """Start the router; with `listener`, hand it that listening socket the way systemd's socket activation does
        (descriptor 3, LISTEN_FDS=1, LISTEN_PID = the router's pid) instead of letting it bind."""
        command = [sys.executable, "-m", "router_app", "serve", "--config-dir", str(self.config_dir)]
        passed: tuple[int, ...] = ()
        if listener is None:
            # A router (or engine) left over from an earlier run would answer /health in this router's place.
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    raise RuntimeError(f"port {self.port} is already in use: a leftover router? (ss -ltnp)")
        else:
            passed = (listener.fileno(),)
            # The pid survives exec, so LISTEN_PID is the router's, as systemd sets it after fork.
            activate = (
                "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
            )
            command = [sys.executable, "-c", activate, str(listener.fileno()), *command]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=passed
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited: {self.log()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"router did not come up: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.systemd.stop_all()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=httpx.Timeout(60, read=120), **kwargs)

    def is_active(self, model_id: str) -> str:
        return self.systemd.is_active(unit_of(model_id))

    def stream_chat(self, model: str, text: str = "hello", **extra: Any) -> StreamResult:
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": text}], **extra}
        headers = extra.pop("headers", None) if "headers" in extra else None
        with self.client() as client, client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            return StreamResult.read(r)


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    raw: str
    events: list[Any]
    comments: int

    @classmethod
    def read(cls, response: httpx.Response) -> StreamResult:
        raw = "".join(response.iter_text()).replace("\r\n", "\n")
        events: list[Any] = []
        comments = 0
        for block in raw.split("\n\n"):
            if not block.strip():
                continue
            if block.startswith(":"):
                comments += 1
                continue
            assert block.startswith("data: "), f"not an SSE data event: {block!r}"
            payload = block[len("data: ") :]
            assert "\n" not in payload, f"one JSON object per data line: {block!r}"
            events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
        return cls(response.status_code, response.headers, raw, events, comments)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and "choices" in e]

    def text(self, field: str = "content") -> str:
        out = []
        for chunk in self.chunks:
            for choice in chunk["choices"]:
                value = (choice.get("delta") or {}).get(field) if "delta" in choice else choice.get("text")
                if value:
                    out.append(value)
        return "".join(out)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Any]:
    envs: list[RouterEnv] = []

    def make(
        models: list[ModelSpec] | None = None, start: bool = True, base_port: int = ROUTER_PORT, **config_extra: Any
    ) -> RouterEnv:
        env = RouterEnv(tmp_path / f"r{len(envs)}", models or DEFAULT_MODELS, config_extra, base_port=base_port)
        envs.append(env)
        if start:
            env.start()
        return env

    yield make
    for env in envs:
        env.stop()


@pytest.fixture
def router(router_factory: Any) -> RouterEnv:
    env: RouterEnv = router_factory()
    return env
