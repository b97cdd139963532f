"""The real Open-WebUI (the pinned PyPI release, from scripts/openwebui-venv) as a process, offline and single-user,
in front of one or more real routers (tests/e2e's RouterEnv with the fake engines); plus its admin API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Locator, Page, expect

from tests.e2e.conftest import REPO, RouterEnv, port_free

OPENWEBUI_VERSION = "0.12.4"
VENV_SCRIPT = REPO / "scripts" / "openwebui-venv"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Text only the router writes: its status lines and its speed footer.
ROUTER_MARKS = ("🔀", "⏳", "✅", "⚡ ")
FOOTER_RE = re.compile(r"⚡ \d+(?:\.\d+)? tok/s \(\d+ tokens in \d+(?:\.\d+)?s\)")


def results_dir() -> Path:
    return Path(os.environ.get("LLM_ROUTER_TEST_RESULTS") or "/var/cache/llm-router/test-results/openwebui")


def ensure_venv() -> Path:
    """Install (or reuse) Open-WebUI's venv with the project's script; fail loudly when that is impossible."""
    proc = subprocess.run([str(VENV_SCRIPT)], capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{VENV_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    venv = Path(proc.stdout.strip().splitlines()[-1])
    if not (venv / "bin" / "open-webui").exists():
        raise RuntimeError(f"{VENV_SCRIPT} printed {venv}, which has no bin/open-webui")
    return venv


class OpenWebUI:
    """`open-webui serve` on 127.0.0.1:port with its data in data_dir, one OpenAI connection per URL."""

    def __init__(self, venv: Path, data_dir: Path, port: int, openai_urls: list[str]) -> None:
        self.venv = venv
        self.data_dir = data_dir
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.openai_urls = openai_urls
        self.log_path = data_dir.parent / "open-webui.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    def env(self) -> dict[str, str]:
        unused = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: embeddings are never reachable
        env = {
            **os.environ,
            "DATA_DIR": str(self.data_dir),
            "WEBUI_SECRET_KEY": "llm-router-tests",
            "WEBUI_AUTH": "False",
            "OFFLINE_MODE": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "ENABLE_OLLAMA_API": "false",
            "ENABLE_OPENAI_API": "true",
            "OPENAI_API_BASE_URLS": ";".join(self.openai_urls),
            "OPENAI_API_KEYS": ";".join("unused" for _ in self.openai_urls),
            "RAG_EMBEDDING_ENGINE": "openai",
            "RAG_OPENAI_API_BASE_URL": unused,
            "RAG_OPENAI_API_KEY": "unused",
            "RAG_EMBEDDING_MODEL": "none",
            "AUDIO_STT_ENGINE": "openai",
            "WHISPER_MODEL_AUTO_UPDATE": "false",
            "ENABLE_CODE_INTERPRETER": "false",
            "ANONYMIZED_TELEMETRY": "false",
            "DO_NOT_TRACK": "true",
            "SCARF_NO_ANALYTICS": "true",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("OPENAI_API_BASE_URL", "OPENAI_API_KEY", "VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(name, None)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        return env

    def start(self, timeout: float = 240) -> None:
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is already in use (a leftover Open-WebUI?)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.data_dir,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"open-webui exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"open-webui did not answer /health within {timeout} s:\n{self.log_tail()}")
        response = httpx.post(self.base + "/api/v1/auths/signin", json={"email": "", "password": ""}, timeout=30)
        response.raise_for_status()
        self.token = response.json()["token"]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # -- admin API ------------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        response = httpx.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
        )
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json() if response.content else None

    def model_ids(self) -> list[str]:
        data = self.api("GET", "/api/models?refresh=true")
        return [m["id"] for m in data["data"]]

    def set_model_capabilities(self, model_id: str, name: str, capabilities: dict[str, bool]) -> Any:
        """A model entry (admin "Models" workspace) over the connection's model: its capabilities switches."""
        body = {
            "id": model_id,
            "base_model_id": None,
            "name": name,
            "meta": {"description": None, "capabilities": capabilities},
            "params": {},
            "access_control": None,
            "is_active": True,
        }
        return self.api("POST", "/api/v1/models/create", body)

    def chat(self, chat_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.api("GET", f"/api/v1/chats/{chat_id}")
        return data


def engine_requests(events_path: Path) -> list[dict[str, Any]]:
    """The `request` events of a fake engine's event log, oldest first."""
    if not events_path.exists():
        return []
    rows = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == "request"]


def message_texts(body: dict[str, Any]) -> list[str]:
    """Every text a request body carries in its messages (content in all shapes, reasoning, tool arguments)."""
    out: list[str] = []
    for message in body.get("messages") or []:
        for key in ("content", "reasoning_content", "reasoning"):
            value = message.get(key)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out += [p.get("text", "") for p in value if isinstance(p, dict)]
        for call in message.get("tool_calls") or []:
            out.append(json.dumps(call, ensure_ascii=False))
    return out


def router_text_in(body: dict[str, Any]) -> list[str]:
    """The router marks found in a request body's messages (empty when it is clean)."""
    return [mark for text in message_texts(body) for mark in ROUTER_MARKS if mark in text]


def task_requests(events_path: Path) -> list[dict[str, Any]]:
    """Open-WebUI's background tasks (title, tags, follow-ups) an engine received: non-streaming chat requests
    whose user message starts with `### Task:` and pastes the conversation between <chat_history> tags."""
    out = []
    for event in engine_requests(events_path):
        body = event.get("body")
        if not isinstance(body, dict) or body.get("stream"):
            continue
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        text = users[-1].get("content") if users else None
        if isinstance(text, str) and text.startswith("### Task:") and "<chat_history>" in text:
            out.append(event)
    return out


def chat_history_of(task_body: dict[str, Any]) -> str:
    text = str([m for m in task_body["messages"] if m.get("role") == "user"][-1]["content"])
    return text.split("<chat_history>", 1)[1].split("</chat_history>", 1)[0]


class ChatPage:
    """Open-WebUI's chat page, driven like a user: open a new chat for a model, type, press Enter, watch."""

    def __init__(self, page: Page, openwebui: OpenWebUI, results: Path) -> None:
        self.page = page
        self.openwebui = openwebui
        self.results = results

    def open(self, model_id: str, name: str) -> None:
        self.page.goto(f"{self.openwebui.base}/?models={model_id}")
        expect(self.page.locator("#chat-input")).to_be_editable(timeout=60_000)
        expect(self.page.locator("#model-selector-model-button")).to_have_attribute(
            "aria-label", f"Selected model: {name}"
        )

    def send(self, text: str) -> Locator:
        """Type a message and press Enter; returns the locator of the answer it starts (the new last answer)."""
        before = self.answers().count()
        box = self.page.locator("#chat-input")
        box.click()
        self.page.keyboard.type(text)
        expect(box).to_contain_text(text)
        self.page.keyboard.press("Enter")
        expect(self.answers()).to_have_count(before + 1, timeout=30_000)
        return self.answers().nth(before)

    def answers(self) -> Locator:
        return self.page.locator("#messages-container .chat-assistant")

    def wait_done(self, answer: Locator, last_text: str, timeout: float = 60_000) -> None:
        expect(answer).to_contain_text(last_text, timeout=timeout)
        expect(self.page.get_by_role("button", name="Stop", exact=True)).to_have_count(0, timeout=timeout)

    def chat_id(self) -> str:
        match = re.search(r"/c/([0-9a-f-]{36})", self.page.url)
        assert match, f"not on a saved chat: {self.page.url}"
        return match.group(1)

    def stored_messages(self) -> list[dict[str, Any]]:
        """The chat's messages as Open-WebUI stored them, oldest first (its history is a tree: follow the
        current branch back from currentId)."""
        history = self.openwebui.chat(self.chat_id())["chat"]["history"]
        messages, current = history["messages"], history.get("currentId")
        chain: list[dict[str, Any]] = []
        while current:
            chain.append(messages[current])
            current = messages[current].get("parentId")
        return chain[::-1]

    def screenshot(self, name: str) -> Path:
        """Save a screenshot once the page's transitions (collapsibles sliding open, tooltips fading in) ended."""
        self.page.wait_for_function(
            "() => document.getAnimations().every("
            "a => a.playState !== 'running' || a.effect?.getTiming().iterations === Infinity)",
            timeout=10_000,
        )
        path = self.results / name
        self.page.screenshot(path=str(path))
        return path


def settle(envs: list[RouterEnv], quiet: float = 1.5, timeout: float = 60) -> None:
    """Wait until no request is in flight or waiting on any router and no engine has seen a request for `quiet`
    seconds: Open-WebUI sends its background tasks (title, tags, follow-ups) right after an answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        last_request = 0.0
        for env in envs:
            health = httpx.get(env.base + "/health", timeout=5).json()
            busy = busy or bool(health.get("in_flight") or health.get("waiting") or health.get("loading_model"))
            for model_id in env.models:
                requests = env.events(model_id, "request")
                if requests:
                    last_request = max(last_request, float(requests[-1]["ts"]))
        if not busy and time.time() - last_request >= quiet:
            return
        time.sleep(0.2)
    raise AssertionError(f"the routers did not become idle within {timeout} s")
