"""The fake vLLM personality (`fake_engine.py --kind vllm`), tested as real processes started through its launchers
(`vllm serve ...`, `PY -m vllm.entrypoints.openai.api_server ...`) on ports 18260-18269."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e

FAKE_ENGINES_DIR = Path(__file__).resolve().parents[2] / "files" / "fake_engines"
VLLM = FAKE_ENGINES_DIR / "vllm"
VLLM_PYTHON = FAKE_ENGINES_DIR / "vllm-python"
PORTS = range(18260, 18270)
_next_port = [0]


def free_port() -> int:
    """The next port of 18260-18269 (round robin) that can be bound now."""
    for _ in range(len(PORTS)):
        port = PORTS[_next_port[0] % len(PORTS)]
        _next_port[0] += 1
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port left in 18260-18269")


def request(
    port: int, method: str, path: str, body: Any = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def chat(text: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    # No `model`: vLLM then serves its own (any other name than --served-model-name is a 404, tested below).
    return {"stream": stream, "messages": [{"role": "user", "content": text}], **extra}


def sse_data(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        assert block.startswith(b"data: "), block
        payload = block[len(b"data: ") :].decode()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Vllm:
    """One fake vLLM process; `events()` reads its FAKE_EVENT_LOG."""

    def __init__(self, tmp: Path, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.port = port
        self.event_log = tmp / f"vllm-{port}-{time.monotonic_ns()}.events"
        self.out = tmp / f"vllm-{port}.out"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "VLLM_"))}
        full_env.update(
            {"FAKE_LOAD_SECONDS": "0.2", "FAKE_TOKEN_DELAY": "0.005", "FAKE_EVENT_LOG": str(self.event_log)}
        )
        full_env.update(env)
        with self.out.open("wb") as fh:
            self.proc = subprocess.Popen(argv, env=full_env, stdout=fh, stderr=subprocess.STDOUT)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.event_log.exists():
            return []
        rows = [json.loads(line) for line in self.event_log.read_text().splitlines() if line.strip()]
        return [r for r in rows if name is None or r["event"] == name]

    def wait_ready(self, timeout: float = 5) -> None:
        def ready() -> bool:
            try:
                return request(self.port, "GET", "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Vllm]]:
    """start(form, model, served=None, args=(), env={}) -> a running (not necessarily ready) fake vLLM."""
    running: list[Vllm] = []

    def _start(
        form: str = "serve",
        model: str = "Org/Fake-7B",
        served: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Vllm:
        port = free_port()
        common = ["--host", "127.0.0.1", "--port", str(port)]
        if served:
            common += ["--served-model-name", served]
        if form == "serve":
            argv = [str(VLLM), "serve", model, *common, *args]
        else:
            argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, *common, *args]
        eng = Vllm(tmp_path, argv, port, env or {})
        running.append(eng)
        return eng

    yield _start
    for eng in running:
        eng.stop()


SLEEPY = {"VLLM_SERVER_DEV_MODE": "1", "FAKE_SLEEP_SECONDS": "0.2", "FAKE_WAKE_SECONDS": "0.3"}


# --------------------------------------------------------------------------------------------------------------
# launch forms and readiness
# --------------------------------------------------------------------------------------------------------------
def test_api_server_form_port_closed_while_loading_then_health_200_empty(start: Callable[..., Vllm]) -> None:
    eng = start("api_server", model="/models/Qwen3-8B", served="qwen3-8b", env={"FAKE_LOAD_SECONDS": "1.0"})
    wait_until(lambda: eng.events("start"))
    t0 = time.monotonic()
    assert not port_open(eng.port)  # bound but not listening: refused while the model loads
    time.sleep(0.3)
    assert not port_open(eng.port)
    eng.wait_ready()
    assert time.monotonic() - t0 >= 0.6
    status, headers, body = request(eng.port, "GET", "/health")
    assert (status, body) == (200, b"")
    assert "content-type" not in headers
    status, _, body = request(eng.port, "GET", "/v1/models")
    card = json.loads(body)["data"][0]
    assert (card["id"], card["root"], card["owned_by"], card["object"]) == (
        "qwen3-8b",
        "/models/Qwen3-8B",
        "vllm",
        "model",
    )
    assert eng.events("start")[0]["argv"][:2] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_serve_form_model_id_is_the_model_without_served_name(start: Callable[..., Vllm]) -> None:
    eng = start("serve", model="Org/Fake-7B")
    eng.wait_ready()
    status, _, body = request(eng.port, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "Org/Fake-7B"
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", chat("hi [[tokens:2]]"))
    resp = json.loads(body)
    assert status == 200 and resp["model"] == "Org/Fake-7B"
    assert resp["choices"][0]["message"]["content"] == "tok1 tok2"
    assert resp["usage"] == {
        "prompt_tokens": 1,
        "total_tokens": 3,
        "completion_tokens": 2,
        "prompt_tokens_details": None,
    }


def test_launchers_pass_other_uses_through(tmp_path: Path) -> None:
    out = subprocess.run([str(VLLM_PYTHON), "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == "42"
    out = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.strip()
    out = subprocess.run([str(VLLM_PYTHON), "-m", "vllm.nope"], capture_output=True, text=True, timeout=10)
    assert out.returncode != 0


def test_busy_port_fails_at_start(start: Callable[..., Vllm]) -> None:
    first = start("serve")
    first.wait_ready()
    # a second fake on the same port: the bind fails before any load
    second = Vllm(first.event_log.parent, [str(VLLM), "serve", "X/Y", "--port", str(first.port)], first.port, {})
    try:
        assert second.proc.wait(5) == 1
        assert "address already in use" in second.out.read_text()
    finally:
        second.stop()


# --------------------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------------------
def test_stream_with_include_usage(start: Callable[..., Vllm]) -> None:
    eng = start("serve", served="fake")
    eng.wait_ready()
    body = chat("hi there [[tokens:3]]", stream=True, stream_options={"include_usage": True})
    status, headers, raw = request(eng.port, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["tok1", " tok2", " tok3"]
    finish = chunks[4]["choices"][0]
    assert (finish["finish_reason"], finish["stop_reason"], finish["delta"]) == ("stop", None, {"content": ""})
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}
    assert all("usage" not in c for c in chunks[:5])  # vLLM leaves the key out, not null
    # without include_usage: no usage chunk; a max_tokens cut rides on the last token's chunk
    status, _, raw = request(eng.port, "POST", "/v1/chat/completions", chat("hi", stream=True, max_tokens=2))
    chunks = sse_data(raw)[:-1]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert chunks[-1]["choices"][0]["delta"] == {"content": " tok2"}


def test_errors_are_nested_and_midstream_error_then_done(start: Callable[..., Vllm]) -> None:
    eng = start("serve")
    eng.wait_ready()
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", chat("[[error]]"))
    err = json.loads(body)
    assert status == 400 and set(err) == {"error"}
    assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400 and err["error"]["param"] is None
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", {})
    assert status == 400 and "messages" in json.loads(body)["error"]["message"]
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", chat("hi", model="other-model"))
    assert status == 404 and json.loads(body)["error"]["message"] == "The model `other-model` does not exist."
    status, _, raw = request(eng.port, "POST", "/v1/chat/completions", chat("[[error-midstream]]", stream=True))
    events = sse_data(raw)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "InternalServerError"
    status, _, body = request(eng.port, "GET", "/nope")
    assert status == 404 and json.loads(body) == {"detail": "Not Found"}


def test_completions_embeddings_and_tool_call(start: Callable[..., Vllm]) -> None:
    eng = start("serve")
    eng.wait_ready()
    status, _, body = request(eng.port, "POST", "/v1/completions", {"prompt": "once [[tokens:2]]"})
    choice = json.loads(body)["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("tok1 tok2", "stop", None)
    status, _, body = request(eng.port, "POST", "/v1/embeddings", {"input": ["a", "b"]})
    emb = json.loads(body)
    assert status == 200 and emb["id"].startswith("embd-") and len(emb["data"]) == 2
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    status, _, raw = request(eng.port, "POST", "/v1/chat/completions", chat("[[tool:get_time]]", True, tools=tools))
    chunks = sse_data(raw)[:-1]
    head = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert head["id"].startswith("chatcmpl-tool-") and head["function"] == {"name": "get_time"}
    assert chunks[2]["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "function": {"arguments": "{}"}}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------------------------------------------
# sleep mode
# --------------------------------------------------------------------------------------------------------------
def test_sleep_request_held_until_wake_no_restart(start: Callable[..., Vllm]) -> None:
    eng = start("api_server", served="sleepy", args=("--enable-sleep-mode",), env=SLEEPY)
    eng.wait_ready()
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": False}
    t0 = time.monotonic()
    status, _, body = request(eng.port, "POST", "/sleep?level=1")
    assert (status, body) == (200, b"") and time.monotonic() - t0 >= 0.2
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": True}
    assert request(eng.port, "GET", "/health")[0] == 200  # still healthy, still listed
    assert request(eng.port, "GET", "/v1/models")[0] == 200
    # a request while asleep is held (vLLM's scheduler is paused) and answered after the wake-up
    result: dict[str, Any] = {}

    def ask() -> None:
        result["resp"] = request(eng.port, "POST", "/v1/chat/completions", chat("[[tokens:2]]", True), timeout=10)
        result["t"] = time.monotonic()

    asker = threading.Thread(target=ask)
    asker.start()
    wait_until(lambda: eng.events("asleep_request"))
    time.sleep(0.3)
    assert "resp" not in result
    t_wake = time.monotonic()
    status, _, body = request(eng.port, "POST", "/wake_up")
    woke = time.monotonic()
    assert (status, body) == (200, b"") and woke - t_wake >= 0.3
    asker.join(5)
    assert result["resp"][0] == 200 and result["t"] >= woke - 0.05
    assert [c["choices"][0]["delta"].get("content") for c in sse_data(result["resp"][2])[1:3]] == ["tok1", " tok2"]
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": False}
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", chat("again [[tokens:1]]"))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "tok1"
    sleeps, wakes = eng.events("sleep"), eng.events("wake")
    assert [(e["level"], e["mode"]) for e in sleeps] == [(1, "abort")]
    assert [(e["level"], e["tags"]) for e in wakes] == [(1, ["kv_cache", "weights"])]
    assert len(eng.events("start")) == 1 and {e["pid"] for e in eng.events()} == {eng.proc.pid}


def test_request_while_asleep_error_and_abort_policies(start: Callable[..., Vllm]) -> None:
    eng = start("serve", args=("--enable-sleep-mode",), env={**SLEEPY, "FAKE_ASLEEP_REQUESTS": "error"})
    eng.wait_ready()
    assert request(eng.port, "POST", "/sleep")[0] == 200
    status, _, body = request(eng.port, "POST", "/v1/chat/completions", chat("hi"))
    assert status == 503 and json.loads(body)["error"]["code"] == 503
    eng2 = start("serve", args=("--enable-sleep-mode",), env={**SLEEPY, "FAKE_ASLEEP_REQUESTS": "abort"})
    eng2.wait_ready()
    assert request(eng2.port, "POST", "/sleep")[0] == 200
    status, _, body = request(eng2.port, "POST", "/v1/chat/completions", chat("hi"), timeout=3)
    choice = json.loads(body)["choices"][0]
    assert status == 200 and (choice["finish_reason"], choice["message"]["content"]) == ("abort", "")


def test_sleep_aborts_running_stream(start: Callable[..., Vllm]) -> None:
    eng = start("serve", args=("--enable-sleep-mode",), env={**SLEEPY, "FAKE_TOKEN_DELAY": "0.05"})
    eng.wait_ready()
    result: dict[str, Any] = {}
    asker = threading.Thread(
        target=lambda: result.update(r=request(eng.port, "POST", "/v1/chat/completions", chat("[[tokens:100]]", True)))
    )
    asker.start()
    time.sleep(0.3)
    assert request(eng.port, "POST", "/sleep?level=1")[0] == 200
    asker.join(5)
    chunks = sse_data(result["r"][2])
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "abort"
    assert len(chunks) < 50


def test_wake_failure_leaves_it_asleep(start: Callable[..., Vllm]) -> None:
    eng = start("serve", args=("--enable-sleep-mode",), env={**SLEEPY, "FAKE_WAKE_FAIL": "1"})
    eng.wait_ready()
    assert request(eng.port, "POST", "/sleep?level=1")[0] == 200
    status, _, body = request(eng.port, "POST", "/wake_up")
    err = json.loads(body)["error"]
    assert status == 500 and err["type"] == "InternalServerError" and err["code"] == 500
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": True}
    assert [e["level"] for e in eng.events("wake_failed")] == [1] and not eng.events("wake")


def test_level2_wake_is_slower_and_tags_wake_in_parts(start: Callable[..., Vllm]) -> None:
    knobs = {**SLEEPY, "FAKE_WAKE_SECONDS": "0.1", "FAKE_WAKE2_SECONDS": "0.8"}
    eng = start("serve", args=("--enable-sleep-mode",), env=knobs)
    eng.wait_ready()
    assert request(eng.port, "POST", "/sleep?level=2")[0] == 200
    t0 = time.monotonic()
    assert request(eng.port, "POST", "/wake_up?tags=weights")[0] == 200
    assert time.monotonic() - t0 >= 0.8
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": True}  # kv_cache still asleep
    assert request(eng.port, "POST", "/wake_up?tags=kv_cache")[0] == 200
    assert json.loads(request(eng.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": False}
    assert request(eng.port, "POST", "/sleep?level=1")[0] == 200
    t0 = time.monotonic()
    assert request(eng.port, "POST", "/wake_up")[0] == 200
    assert 0.1 <= time.monotonic() - t0 < 0.6
    assert [(e["level"], e["tags"]) for e in eng.events("wake")] == [
        (2, ["weights"]),
        (2, ["kv_cache"]),
        (1, ["kv_cache", "weights"]),
    ]


def test_sleep_endpoints_need_dev_mode_and_sleep_mode(start: Callable[..., Vllm]) -> None:
    no_dev = start("serve", args=("--enable-sleep-mode",))  # VLLM_SERVER_DEV_MODE unset: routes not registered
    no_flag = start("serve", env={"VLLM_SERVER_DEV_MODE": "1"})  # routes exist, the engine has no sleep mode
    no_dev.wait_ready()
    no_flag.wait_ready()
    for path, method in (("/sleep?level=1", "POST"), ("/wake_up", "POST"), ("/is_sleeping", "GET")):
        status, _, body = request(no_dev.port, method, path)
        assert status == 404 and json.loads(body) == {"detail": "Not Found"}
    assert request(no_flag.port, "POST", "/sleep?level=1")[0] == 500
    assert json.loads(request(no_flag.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": False}
    assert request(no_flag.port, "POST", "/v1/chat/completions", chat("hi"))[0] == 200
