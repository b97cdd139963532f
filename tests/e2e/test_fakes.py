"""The fake engines and the fake systemd, tested as real processes on real sockets (ports 18100-18199)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files" / "fake_engines"))

import fake_engine
from fake_units import (
    FAKE_ENGINES_DIR,
    SYSTEM_PYTHON,
    FakeSystemd,
    write_tabby_config,
)

from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e

KINDS = ("llamacpp", "sglang", "tabbyapi")
_used_ports: set[int] = set()


def free_port(span: int = 1) -> int:
    """A port in 18100-18199 (with `span` consecutive free ones) not handed out before in this session."""
    for port in range(18100, 18200 - span + 1):
        block = range(port, port + span)
        if any(p in _used_ports for p in block):
            continue
        try:
            for p in block:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _used_ports.update(block)
        return port
    raise RuntimeError("no free port left in 18100-18199")


def request(
    port: int, method: str, path: str, body: Any = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def try_request(port: int, path: str) -> tuple[int, bytes] | None:
    try:
        status, _, body = request(port, "GET", path, timeout=2)
    except OSError:
        return None
    return status, body


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def sse_events(raw: bytes) -> list[tuple[str, Any]]:
    """Split an SSE body into (kind, value): ("data", obj | "[DONE]"), ("comment", text), ("error", obj)."""
    out: list[tuple[str, Any]] = []
    for block in re.split(rb"\r?\n\r?\n", raw):
        if not block.strip():
            continue
        text = block.decode()
        if text.startswith(":"):
            out.append(("comment", text[1:].strip()))
        elif text.startswith("data: "):
            payload = text[len("data: ") :]
            out.append(("data", payload if payload == "[DONE]" else json.loads(payload)))
        elif text.startswith("error: "):
            out.append(("error", json.loads(text[len("error: ") :])))
        else:
            raise AssertionError(f"unexpected SSE block {text!r}")
    return out


def chat(text: str, stream: bool = True, include_usage: bool | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "whatever",
        "stream": stream,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
        **extra,
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def raw_stream_request(port: int, body: dict[str, Any], version: str = "HTTP/1.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST /v1/chat/completions {version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def read_to_eof(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


# --------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------
class Env:
    """One fake systemd state dir plus helpers to start engines through it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sd = FakeSystemd(root / "systemd")
        self.models = root / "models"
        self.models.mkdir(exist_ok=True)

    def engine(
        self,
        kind: str,
        unit: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        model: str | None = None,
        args: tuple[str, ...] = (),
        stop_timeout: float = 5,
    ) -> dict[str, Any]:
        port = port or free_port()
        events = self.root / f"{unit}.events"
        full_env = {"FAKE_LOAD_SECONDS": "0.2", "FAKE_EVENT_LOG": str(events), **(env or {})}
        tabby_dir = None
        if kind == "tabbyapi":
            model = model or "Fake-Model-exl2"
            (self.models / model).mkdir(exist_ok=True)
            tabby_dir = write_tabby_config(self.root / f"tabby-{unit}", port, self.models)
        else:
            model = model or str(self.models / f"{unit}.gguf")
        self.sd.define_engine_unit(
            unit, kind, model, port, args=args, env=full_env, tabby_dir=tabby_dir, stop_timeout=stop_timeout
        )
        return {"unit": unit, "port": port, "events": events, "model": model, "kind": kind}

    def start(self, unit: str) -> float:
        t0 = time.monotonic()
        res = self.sd.systemctl("start", unit)
        assert res.returncode == 0, res.stderr
        return time.monotonic() - t0

    def wait_ready(self, eng: dict[str, Any], timeout: float = 5) -> None:
        path = "/v1/model" if eng["kind"] == "tabbyapi" else "/health"
        wait_until(lambda: (try_request(eng["port"], path) or (0,))[0] == 200, timeout)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.sd.stop_all()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """One running engine of each kind, shared by the request-shape tests."""
    e = Env(tmp_path_factory.mktemp("engines"))
    knobs = {"FAKE_TOKEN_DELAY": "0.005", "FAKE_PING_INTERVAL": "0.25", "FAKE_TOKENS": "5"}
    running = {kind: e.engine(kind, f"shared-{kind}.service", env=knobs) for kind in KINDS}
    for eng in running.values():
        e.start(eng["unit"])
    for eng in running.values():
        e.wait_ready(eng)
    yield running
    e.sd.stop_all()


# --------------------------------------------------------------------------------------------------------------
# readiness
# --------------------------------------------------------------------------------------------------------------
def test_llamacpp_port_open_at_once_503_while_loading(env: Env) -> None:
    eng = env.engine("llamacpp", "llama.service", env={"FAKE_LOAD_SECONDS": "1.0"})
    t0 = time.monotonic()
    assert env.start("llama.service") < 0.5
    wait_until(lambda: port_open(eng["port"]), timeout=1.0, interval=0.005)
    opened = time.monotonic() - t0
    status, _headers, body = request(eng["port"], "GET", "/health")
    assert status == 503
    assert json.loads(body) == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    status, _, body = request(eng["port"], "GET", "/v1/models")  # answers while loading
    models = json.loads(body)
    assert status == 200 and models["data"][0]["id"] == eng["model"] and models["data"][0]["meta"] is None
    assert models["models"][0]["model"] == eng["model"]
    status, _, body = request(eng["port"], "POST", "/v1/chat/completions", chat("hi", stream=False))
    assert status == 503 and json.loads(body)["error"]["type"] == "unavailable_error"
    wait_until(lambda: try_request(eng["port"], "/health") == (200, b'{"status":"ok"}'), timeout=3)
    ready_after = time.monotonic() - t0
    assert opened < 0.9 and ready_after >= 1.0
    names = [ev["event"] for ev in read_events(eng["events"])]
    assert names[0] == "start" and "ready" in names
    start = read_events(eng["events"])[0]
    assert start["kind"] == "llamacpp" and start["port"] == eng["port"] and start["model"] == eng["model"]


def test_sglang_health_503_then_200_and_health_generates(env: Env) -> None:
    eng = env.engine("sglang", "sglang.service", env={"FAKE_LOAD_SECONDS": "0.8"})
    env.start("sglang.service")
    wait_until(lambda: port_open(eng["port"]), timeout=1.0, interval=0.005)
    assert try_request(eng["port"], "/health") == (503, b"")
    status, _, body = request(eng["port"], "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == eng["model"]
    wait_until(lambda: try_request(eng["port"], "/health") == (200, b""), timeout=3)
    request(eng["port"], "GET", "/health")
    events = read_events(eng["events"])
    after_ready = events[[e["event"] for e in events].index("ready") :]
    assert [e["status"] for e in after_ready if e["event"] == "health"] == [200, 200]
    assert "Prefill batch" in env.sd.journal_path("sglang.service").read_text()


def test_tabbyapi_port_closed_until_loaded_then_model_card(env: Env) -> None:
    eng = env.engine("tabbyapi", "tabby.service", env={"FAKE_LOAD_SECONDS": "1.0"})
    t0 = time.monotonic()
    env.start("tabby.service")
    time.sleep(0.4)
    assert not port_open(eng["port"])
    wait_until(lambda: port_open(eng["port"]), timeout=3, interval=0.01)
    assert time.monotonic() - t0 >= 1.0
    status, _, body = request(eng["port"], "GET", "/v1/model")
    card = json.loads(body)
    assert status == 200 and card["id"] == eng["model"] and card["object"] == "model"
    assert request(eng["port"], "GET", "/health")[0] == 200
    status, _, body = request(eng["port"], "GET", "/v1/models")
    assert eng["model"] in [m["id"] for m in json.loads(body)["data"]]


def test_tabbyapi_binds_port_plus_one_when_busy(env: Env) -> None:
    port = free_port(span=2)
    eng = env.engine("tabbyapi", "tabby.service", port=port)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        env.start("tabby.service")
        wait_until(lambda: try_request(port + 1, "/v1/model"), timeout=5)
    assert env.sd.is_active("tabby.service") == "active"
    assert (
        f"Port {port} is currently in use. Switching to {port + 1}." in env.sd.journal_path("tabby.service").read_text()
    )
    assert {"event": "port_switched", "port": port, "bound_port": port + 1}.items() <= next(
        e for e in read_events(eng["events"]) if e["event"] == "port_switched"
    ).items()


@pytest.mark.parametrize("kind", ["llamacpp", "sglang"])
def test_busy_port_exits_1(env: Env, kind: str) -> None:
    port = free_port()
    env.engine(kind, "busy.service", port=port)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        env.start("busy.service")
        wait_until(lambda: env.sd.is_active("busy.service") == "failed", timeout=3)
    assert env.sd.show("busy.service", "ExecMainStatus")["ExecMainStatus"] == "1"
    journal = env.sd.journalctl("-u", "busy.service", "-n", "30", "--no-pager").stdout
    assert ("couldn't bind HTTP server socket" if kind == "llamacpp" else "address already in use") in journal


@pytest.mark.parametrize("kind", KINDS)
def test_failed_load_is_reported_fast_with_log_line(env: Env, kind: str) -> None:
    env.engine(kind, "bad.service", env={"FAKE_FAIL_LOAD": "1", "FAKE_FAIL_AFTER": "0.2"})
    t0 = time.monotonic()
    env.start("bad.service")
    wait_until(lambda: env.sd.is_active("bad.service") == "failed", timeout=3)
    assert time.monotonic() - t0 < 2.0
    props = env.sd.show("bad.service", "ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "1", "MainPID": "0"}
    res = env.sd.journalctl("-u", "bad.service", "-n", "30", "--no-pager", "-o", "cat")
    assert "fake load failure" in res.stdout
    assert res.stdout.rstrip().endswith("bad.service: Failed with result 'exit-code'.")
    res = env.sd.systemctl("is-active", "bad.service")
    assert (res.stdout.strip(), res.returncode) == ("failed", 3)


def test_missing_model_file_exits_at_once(env: Env) -> None:
    eng = env.engine("llamacpp", "missing.service", env={"FAKE_CHECK_MODEL_FILE": "1"}, model="/nonexistent/model.gguf")
    env.start("missing.service")
    wait_until(lambda: env.sd.is_active("missing.service") == "failed", timeout=2)
    assert (
        "error: failed to load model '/nonexistent/model.gguf'"
        in env.sd.journalctl("-u", "missing.service", "-n", "10").stdout
    )
    assert not port_open(eng["port"])


# --------------------------------------------------------------------------------------------------------------
# streams and usage placement
# --------------------------------------------------------------------------------------------------------------
def stream(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[bytes, list[tuple[str, Any]]]:
    status, headers, raw = request(port, "POST", path, body)
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    assert headers.get("transfer-encoding") == "chunked"
    return raw, sse_events(raw)


def check_common_stream(events: list[tuple[str, Any]], n_tokens: int) -> list[dict[str, Any]]:
    assert events[-1] == ("data", "[DONE]")
    chunks = [v for k, v in events if k == "data" and v != "[DONE]"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == " ".join(f"tok{i}" for i in range(1, n_tokens + 1))
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    return chunks


def test_llamacpp_stream_usage_and_timings(engines: dict[str, dict[str, Any]]) -> None:
    eng = engines["llamacpp"]
    raw, events = stream(eng["port"], chat("count [[tokens:6]] [[delay:0.02]]", include_usage=True))
    assert b"\r\n" not in raw and raw.endswith(b"data: [DONE]\n\n")
    chunks = check_common_stream(events, 6)
    finish_idx = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"])
    finish, usage_chunk = chunks[finish_idx], chunks[finish_idx + 1]
    assert finish_idx + 2 == len(chunks)
    t = finish["timings"]
    assert t["predicted_n"] == 6 and t["prompt_n"] == 3 and t["cache_n"] == 0
    assert 90 <= t["predicted_ms"] <= 400  # five 20 ms gaps from first to last token
    assert t["predicted_per_second"] == pytest.approx(6 * 1000 / t["predicted_ms"], rel=0.01)
    assert usage_chunk["choices"] == [] and usage_chunk["timings"] == t
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert all("usage" not in c for c in chunks[:-1])
    req = [e for e in read_events(eng["events"]) if e["event"] == "request"][-1]
    assert req["body"]["stream_options"] == {"include_usage": True} and req["stream"] is True
    assert read_events(eng["events"])[-1]["event"] == "stream_completed"


def test_llamacpp_stream_without_include_usage_has_timings_only(engines: dict[str, dict[str, Any]]) -> None:
    _, events = stream(engines["llamacpp"]["port"], chat("hi"))
    chunks = check_common_stream(events, 5)
    assert "timings" in chunks[-1] and all(c["choices"] for c in chunks)


def test_sglang_stream_usage_chunk(engines: dict[str, dict[str, Any]]) -> None:
    _raw, events = stream(engines["sglang"]["port"], chat("hello [[tokens:3]]", include_usage=True))
    chunks = check_common_stream(events, 3)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert not any("timings" in c for c in chunks)
    _, events = stream(engines["sglang"]["port"], chat("hello [[tokens:3]]"))
    assert all(v["choices"] for k, v in events if k == "data" and v != "[DONE]")


def test_tabbyapi_usage_rides_on_the_finish_chunk(engines: dict[str, dict[str, Any]]) -> None:
    raw, events = stream(engines["tabbyapi"]["port"], chat("hi [[tokens:4]] [[delay:0.02]]", include_usage=True))
    assert raw.endswith(b"data: [DONE]\r\n\r\n")  # sse-starlette separates events with CRLF
    chunks = check_common_stream(events, 4)
    assert all(c["choices"] for c in chunks)
    finish = chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop"
    usage = finish["usage"]
    assert usage["completion_tokens"] == 4 and usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert usage["completion_tokens_per_sec"] == pytest.approx(4 / usage["completion_time"], rel=0.02)
    for key in ("prompt_tokens_per_sec", "prompt_time", "total_time"):
        assert key in usage
    assert all(c["usage"] is None for c in chunks[:-1])
    _, events = stream(engines["tabbyapi"]["port"], chat("hi [[tokens:2]]"))
    assert all(v["usage"] is None for k, v in events if k == "data" and v != "[DONE]")


@pytest.mark.parametrize("kind", KINDS)
def test_non_stream_completions_and_embeddings(engines: dict[str, dict[str, Any]], kind: str) -> None:
    port = engines[kind]["port"]
    status, _, body = request(port, "POST", "/v1/chat/completions", chat("x [[tokens:3]]", stream=False))
    resp = json.loads(body)
    assert status == 200 and resp["choices"][0]["message"]["content"] == "tok1 tok2 tok3"
    assert resp["usage"]["completion_tokens"] == 3 and resp["model"] == engines[kind]["model"]
    assert ("timings" in resp) == (kind == "llamacpp")
    status, _, body = request(port, "POST", "/v1/chat/completions", chat("x", stream=False, max_tokens=7))
    resp = json.loads(body)
    assert resp["choices"][0]["finish_reason"] == "length" and resp["usage"]["completion_tokens"] == 7
    status, _, body = request(port, "POST", "/v1/completions", {"prompt": "once upon [[tokens:2]]"})
    resp = json.loads(body)
    assert status == 200 and resp["choices"][0]["text"] == "tok1 tok2" and resp["object"] == "text_completion"
    _raw, events = stream(
        port,
        {"prompt": "p [[tokens:2]]", "stream": True, "stream_options": {"include_usage": True}},
        path="/v1/completions",
    )
    texts = "".join(c["choices"][0]["text"] for k, c in events if k == "data" and c != "[DONE]" and c["choices"])
    assert texts == "tok1 tok2" and events[-1] == ("data", "[DONE]")
    status, _, body = request(port, "POST", "/v1/embeddings", {"input": ["a b", "c"], "model": "m"})
    resp = json.loads(body)
    assert status == 200 and len(resp["data"]) == 2 and len(resp["data"][0]["embedding"]) == 8
    assert resp["usage"]["prompt_tokens"] == 3
    again = json.loads(request(port, "POST", "/v1/embeddings", {"input": ["a b", "c"]})[2])
    assert again["data"] == resp["data"]  # deterministic


@pytest.mark.parametrize("kind", KINDS)
def test_error_shapes(engines: dict[str, dict[str, Any]], kind: str) -> None:
    port = engines[kind]["port"]
    status, _, body = request(port, "POST", "/v1/chat/completions", {"model": "m", "stream": True})
    missing = json.loads(body)
    status2, _, body2 = request(port, "POST", "/v1/chat/completions", chat("please [[error]]"))
    magic = json.loads(body2)
    if kind == "llamacpp":
        assert status == 400 and missing["error"]["code"] == 400
        assert missing["error"]["type"] == "invalid_request_error"
        assert status2 == 400 and set(magic["error"]) == {"code", "message", "type"}
    elif kind == "sglang":
        assert status == 400 and missing["object"] == "error" and missing["code"] == 400 and "error" not in missing
        assert status2 == 400 and set(magic) == {"object", "message", "type", "param", "code"}
        assert magic["type"] == "BadRequestError"
    else:
        assert status == 422 and missing["detail"][0]["loc"] == ["body", "messages"]
        assert status2 == 400 and isinstance(magic["detail"], str)
    for path, body in (("/v1/completions", {"model": "m"}), ("/v1/embeddings", {"model": "m"})):
        assert request(port, "POST", path, body)[0] == (422 if kind == "tabbyapi" else 400)


def test_llamacpp_bare_error_line_midstream(engines: dict[str, dict[str, Any]]) -> None:
    raw, events = stream(engines["llamacpp"]["port"], chat("go [[tokens:5]] [[error-midstream]]"))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "error" and ("data", "[DONE]") not in events
    assert events[-1][1]["code"] == 500 and events[-1][1]["type"] == "server_error"
    assert b"\nerror: {" in raw


@pytest.mark.parametrize("kind", ["llamacpp", "tabbyapi"])
def test_keepalive_comments_during_silence(engines: dict[str, dict[str, Any]], kind: str) -> None:
    _, events = stream(engines[kind]["port"], chat("wait [[silence:0.7]] [[tokens:1]]"))
    first_data = next(i for i, (k, _) in enumerate(events) if k == "data")
    assert first_data >= 2 and all(k == "comment" for k, _ in events[:first_data])
    assert events[0][1].startswith("ping")


def test_http10_stream_is_close_delimited(engines: dict[str, dict[str, Any]]) -> None:
    sock = raw_stream_request(engines["sglang"]["port"], chat("x [[tokens:2]]"), version="HTTP/1.0")
    raw = read_to_eof(sock)
    sock.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower() and body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("during", ["silence", "tokens"])
def test_client_disconnect_is_logged_at_once(engines: dict[str, dict[str, Any]], during: str) -> None:
    eng = engines["llamacpp"]
    text = "[[silence:5]]" if during == "silence" else "[[tokens:1000]] [[delay:0.02]]"
    sock = raw_stream_request(eng["port"], chat(text))
    read_until(sock, b"tok3" if during == "tokens" else b"\r\n\r\n")
    t0 = time.time()
    sock.close()
    ev = wait_until(
        lambda: [e for e in read_events(eng["events"]) if e["event"] == "client_disconnected" and e["ts"] >= t0 - 0.01],
        timeout=2,
    )
    assert ev[0]["ts"] - t0 < 0.5 and ev[0]["path"] == "/v1/chat/completions"


# --------------------------------------------------------------------------------------------------------------
# process death and stop
# --------------------------------------------------------------------------------------------------------------
def test_crash_after_kills_the_process_mid_stream(env: Env) -> None:
    eng = env.engine("llamacpp", "crash.service")
    env.start("crash.service")
    env.wait_ready(eng)
    sock = raw_stream_request(eng["port"], chat("[[tokens:10]] [[crash-after:3]]"))
    raw = read_to_eof(sock)
    sock.close()
    assert b"tok3" in raw and b"tok4" not in raw and b"[DONE]" not in raw and not raw.endswith(b"0\r\n\r\n")
    wait_until(lambda: env.sd.is_active("crash.service") == "failed", timeout=2)
    props = env.sd.show("crash.service", "Result", "ExecMainStatus")
    assert props == {"Result": "exit-code", "ExecMainStatus": "3"}
    assert any(e["event"] == "crash" for e in read_events(eng["events"]))


def test_sigterm_exits_promptly_with_0_mid_stream(env: Env) -> None:
    eng = env.engine("sglang", "term.service")
    env.start("term.service")
    env.wait_ready(eng)
    pid = int(env.sd.show("term.service", "MainPID")["MainPID"])
    sock = raw_stream_request(eng["port"], chat("[[tokens:1000]] [[delay:0.01]]"))
    read_until(sock, b"tok2")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_until(
        lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(),
        timeout=1,
        interval=0.002,
    )
    exit_time = time.monotonic() - t0
    assert exit_time < 0.2, exit_time
    read_to_eof(sock)  # the socket is closed by the exit
    sock.close()
    wait_until(lambda: env.sd.is_active("term.service") == "inactive", timeout=2)  # exit 0 -> not failed
    assert env.sd.show("term.service", "ExecMainStatus", "Result") == {"ExecMainStatus": "0", "Result": "success"}
    assert read_events(eng["events"])[-1]["event"] == "stop"
    assert read_events(eng["events"])[-1]["signal"] == "SIGTERM"
    assert not port_open(eng["port"])


def test_systemctl_stop_with_stream_running(env: Env) -> None:
    eng = env.engine("tabbyapi", "stop.service")
    env.start("stop.service")
    env.wait_ready(eng)
    sock = raw_stream_request(eng["port"], chat("[[tokens:1000]]"))
    read_until(sock, b"tok2")
    t0 = time.monotonic()
    res = env.sd.systemctl("stop", "stop.service")
    took = time.monotonic() - t0
    sock.close()
    assert res.returncode == 0 and took < 0.5, took
    assert env.sd.is_active("stop.service") == "inactive"
    assert not port_open(eng["port"])
    journal = env.sd.journal_path("stop.service").read_text()
    assert "Stopping stop.service..." in journal and journal.rstrip().endswith("Stopped stop.service.")


# --------------------------------------------------------------------------------------------------------------
# fake systemd on its own
# --------------------------------------------------------------------------------------------------------------
def test_systemd_unknown_units(env: Env) -> None:
    res = env.sd.systemctl("start", "nope.service")
    assert res.returncode == 5 and res.stderr.strip() == "Failed to start nope.service: Unit nope.service not found."
    res = env.sd.systemctl("is-active", "nope")
    assert (res.returncode, res.stdout) == (3, "inactive\n")
    assert env.sd.systemctl("stop", "nope.service").returncode == 5
    assert env.sd.show("nope.service", "LoadState")["LoadState"] == "not-found"
    assert env.sd.journalctl("-u", "nope.service", "-q").stdout == ""


def test_systemd_exit_states_and_exec_failure(env: Env) -> None:
    sd = env.sd
    sd.define_unit("ok.service", ["/bin/sh", "-c", "echo bye; exit 0"])
    sd.define_unit("bad.service", ["/bin/sh", "-c", "echo oops >&2; exit 7"])
    sd.define_unit("sig.service", ["/bin/sh", "-c", "kill -9 $$"])
    sd.define_unit("noexec.service", ["/nonexistent/binary", "--flag"])
    for unit in ("ok", "bad", "sig"):
        assert sd.systemctl("start", unit).returncode == 0
    wait_until(lambda: [sd.is_active(u) for u in ("ok", "bad", "sig")] == ["inactive", "failed", "failed"])
    assert sd.show("bad", "Result", "ExecMainStatus") == {"Result": "exit-code", "ExecMainStatus": "7"}
    assert sd.show("sig", "Result", "ExecMainStatus") == {"Result": "signal", "ExecMainStatus": "9"}
    assert sd.journalctl("--unit=bad.service", "-n1").stdout.strip() == "bad.service: Failed with result 'exit-code'."
    assert "oops" in sd.journalctl("-u", "bad", "--lines=5").stdout
    res = sd.systemctl("start", "noexec.service")
    assert res.returncode == 1 and "failed" in res.stderr
    assert sd.show("noexec", "ActiveState", "ExecMainStatus") == {"ActiveState": "failed", "ExecMainStatus": "203"}
    res = sd.systemctl("is-failed", "bad", "ok")
    assert res.returncode == 0 and res.stdout.split() == ["failed", "inactive"]
    assert sd.systemctl("reset-failed", "bad").returncode == 0 and sd.is_active("bad") == "inactive"
    assert sd.systemctl("stop", "sig").returncode == 0 and sd.is_active("sig") == "inactive"
    assert sd.systemctl("show", "--property=ActiveState,SubState", "--value", "ok").stdout == "inactive\ndead\n"


def test_systemd_stop_kills_whole_group_and_escalates(env: Env) -> None:
    sd = env.sd
    # the shell and its child both ignore SIGTERM: stop must SIGKILL them after stop_timeout
    sd.define_unit("stubborn.service", ["/bin/sh", "-c", "trap '' TERM; sleep 30 & sleep 30 & wait"], stop_timeout=0.4)
    assert sd.systemctl("start", "stubborn").returncode == 0
    pgid = int(sd.show("stubborn", "MainPID")["MainPID"])
    assert pgid == os.getpgid(pgid) and os.getsid(pgid) == pgid  # own session and process group
    time.sleep(0.1)
    t0 = time.monotonic()
    assert sd.systemctl("stop", "stubborn").returncode == 0
    took = time.monotonic() - t0
    assert 0.4 <= took < 1.5, took
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert "timed out. Killing." in sd.journal_path("stubborn.service").read_text()


def test_systemd_start_is_idempotent_and_race_free(env: Env) -> None:
    sd = env.sd
    marker = env.root / "starts.txt"
    sd.define_unit("once.service", ["/bin/sh", "-c", f"echo $$ >> {marker}; exec sleep 30"])
    results: list[int] = []

    def start() -> None:
        results.append(sd.systemctl("start", "once.service").returncode)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 6
    wait_until(lambda: marker.exists() and marker.read_text().strip())
    time.sleep(0.1)
    assert len(marker.read_text().split()) == 1
    pid = sd.show("once", "MainPID")["MainPID"]
    assert sd.systemctl("restart", "once").returncode == 0
    assert sd.show("once", "MainPID")["MainPID"] != pid and sd.is_active("once") == "active"
    res = sd.systemctl("is-active", "once", "nope")  # like systemctl: 0 when at least one is active
    assert res.stdout.split() == ["active", "inactive"] and res.returncode == 0


def test_systemd_command_speed(env: Env) -> None:
    sd = env.sd
    sd.define_unit("fast.service", ["/bin/sh", "-c", "exec sleep 30"])
    timings: dict[str, float] = {}
    for verb in ("start", "is-active", "stop", "is-active"):
        t0 = time.monotonic()
        sd.systemctl(verb, "fast.service")
        timings[verb] = max(timings.get(verb, 0), time.monotonic() - t0)
    print("fake systemctl timings (s):", timings)
    assert all(v < 0.5 for v in timings.values()), timings  # typically 30-60 ms on this machine


# --------------------------------------------------------------------------------------------------------------
# launchers, interpreter, config parsing
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no /usr/bin/python3")
def test_launchers_run_under_system_python(engines: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    res = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-I",
            "-S",
            "-c",
            "import sys; sys.path[:0] = sys.argv[1:]; import fake_engine, fake_systemd; print(sys.version_info[:2])",
            str(FAKE_ENGINES_DIR),
            str(Path(__file__).resolve().parents[1] / "fakes"),
        ],
        capture_output=True,
        text=True,
        env={},
    )
    assert res.returncode == 0, res.stderr
    for eng in engines.values():
        pid = next(e["pid"] for e in read_events(eng["events"]) if e["event"] == "start")
        assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(SYSTEM_PYTHON)
    out = subprocess.run(
        [str(FAKE_ENGINES_DIR / "sglang-python"), "-c", "print(6 * 7)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "42"
    script = tmp_path / "s.py"
    script.write_text("import sys; print(sys.argv[1:])")
    out = subprocess.run(
        [str(FAKE_ENGINES_DIR / "tabbyapi-python"), str(script), "--model-name", "x"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "['--model-name', 'x']"
    out = subprocess.run(
        [str(FAKE_ENGINES_DIR / "sglang-python"), "-m", "sglang.launch_server"], capture_output=True, text=True
    )
    assert out.returncode == 1 and "no model given" in out.stderr


def test_tabby_config_subset_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """# Ansible managed
network:
  host: "127.0.0.1"   # comment
  port: 5000
  disable_auth: true
  api_servers:
  - OAI
  - Kobold
model:
  model_dir: '/srv/models'
  max_seq_len: 8192
  gpu_split: [20, 24]
developer: {}
"""
    parsed = fake_engine.parse_simple_yaml(text)
    assert parsed == {
        "network": {"host": "127.0.0.1", "port": 5000, "disable_auth": True, "api_servers": ["OAI", "Kobold"]},
        "model": {"model_dir": "/srv/models", "max_seq_len": 8192, "gpu_split": [20, 24]},
        "developer": {},
    }
    assert fake_engine.parse_simple_yaml(json.dumps(parsed)) == parsed
    (tmp_path / "config.yml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TABBY_NETWORK_HOST", "127.0.0.2")
    log = fake_engine.Log("tabbyapi")
    cfg = fake_engine.build_config(
        "tabbyapi", ["--model-name", "M", "--port", "18199", "--gpu-split-auto", "False"], log
    )
    assert (cfg.host, cfg.port, cfg.model_id, cfg.ctx, cfg.model_path) == (
        "127.0.0.2",
        18199,
        "M",
        8192,
        "/srv/models/M",
    )
    cli = fake_engine.parse_cli(
        "llamacpp", ["-m", "/m.gguf", "--host", "h", "--port=9", "-ngl", "999", "-c", "2048", "--alias", "X", "-t", "2"]
    )
    assert cli == {"model": "/m.gguf", "host": "h", "port": "9", "ctx": "2048", "alias": "X"}
