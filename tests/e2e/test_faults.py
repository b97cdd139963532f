"""The fault matrix (issue 11, item 2): one test per fault, each asserting what the client sees (HTTP status or an
in-band error naming the cause) and that the very next request works.

Real router process, real fake engine processes, the fake systemctl/journalctl (tests/fakes/fake_systemd.py, whose
faults.json can deny verbs the way polkit does, delay stops and make the journal unreadable). Rows proven
elsewhere are listed in docs/reliability.md with their tests (engine exits at start, crash mid-stream, silence
mid-answer, client disconnects, a broken models.yml on reload, SIGTERM while answers stream).

Ports 18310-18319: the router on 18310, the fake engines on 18311-18314 (llama-server, SGLang, TabbyAPI, vLLM).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ModelSpec, RouterEnv, StreamResult, unit_of, wait_until

BASE_PORT = 18310
LLAMA_PORT = BASE_PORT + 1

MODELS = [
    ModelSpec("llama-a", "llamacpp", name="Llama A"),
    ModelSpec("sg", "sglang"),
    ModelSpec("broken", "llamacpp", env={"FAKE_FAIL_LOAD": "1", "FAKE_FAIL_AFTER": "0.2"}),
]

Factory = Callable[..., RouterEnv]


@pytest.fixture
def make_router(router_factory: Factory) -> Factory:
    """tests/e2e's router_factory on this file's ports and models, with per-unit stop timeouts."""

    def make(
        models: list[ModelSpec] | None = None,
        start: bool = True,
        stop_timeouts: dict[str, float] | None = None,
        **config_extra: Any,
    ) -> RouterEnv:
        env = router_factory(models or MODELS, start=False, base_port=BASE_PORT, **config_extra)
        for model_id, seconds in (stop_timeouts or {}).items():  # the unit's TimeoutStopSec
            unit = env.systemd.state_dir / "units" / f"{unit_of(model_id)}.json"
            unit.write_text(unit.read_text().replace('"stop_timeout": 5', f'"stop_timeout": {seconds}'))
        if start:
            env.start()
        return env

    return make


def chat(router: RouterEnv, model: str, text: str = "[[tokens:2]]") -> httpx.Response:
    with router.client() as client:
        return client.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]}
        )


def works(router: RouterEnv, model: str, tokens: int = 3) -> None:
    """The very next request works: a full streamed answer, no error."""
    result = router.stream_chat(model, f"[[tokens:{tokens}]]")
    assert result.status == 200 and result.done and not result.errors, result.raw[-500:]
    expected = "".join(f"tok{i}" if i == 1 else f" tok{i}" for i in range(1, tokens + 1))
    assert result.text().startswith(expected), result.text()


def statuses(router: RouterEnv) -> dict[str, str]:
    with router.client() as client:
        return {m["id"]: m["status"]["value"] for m in client.get("/v1/models").json()["data"]}


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(target())
        except Exception as exc:  # the test asserts on it
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


# ----- engine faults -------------------------------------------------------------------------------------------------


def test_engine_hanging_while_loading_fails_at_the_load_timeout_and_the_next_request_works(
    make_router: Factory,
) -> None:
    models = [*MODELS, ModelSpec("hang", "llamacpp", env={"FAKE_LOAD_SECONDS": "600"}, load_timeout=1)]
    router = make_router(models)
    started = time.monotonic()
    result = router.stream_chat("hang")
    took = time.monotonic() - started
    assert 0.9 < took < 4, took
    assert result.status == 200 and result.done
    (error,) = result.errors
    assert error["code"] == "model_load_failed"
    assert "load timeout of 1 s" in error["message"] and unit_of("hang") in error["message"], error
    assert router.is_active("hang") == "inactive", "the hanging unit was stopped"
    with router.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "hang", "messages": [{"role": "user", "content": "x"}]}
        )
    assert response.status_code == 503 and "load timeout of 1 s" in response.json()["error"]["message"]
    works(router, "llama-a")  # same engine port as the hanging one: it was freed


def test_engine_answering_500_with_an_html_body_is_an_openai_error_and_the_next_request_works(
    make_router: Factory,
) -> None:
    router = make_router()
    works(router, "llama-a")
    response = chat(router, "llama-a", "[[html-500]]")
    assert response.status_code == 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "engine answered HTTP 500" in error["message"] and "Internal Server Error" in error["message"], error
    body = {"model": "sg", "stream": True, "messages": [{"role": "user", "content": "[[html-500]]"}]}
    works(router, "sg")
    with router.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as streamed:
        streamed.read()
    assert streamed.status_code == 500, "the engine failed before any byte went out: a real status"
    assert "engine answered HTTP 500" in streamed.json()["error"]["message"]
    assert len(router.events("llama-a", "html_500")) == 1 and len(router.events("sg", "html_500")) == 1
    works(router, "sg")
    assert len(router.events("sg", "start")) == 1, "an engine error is no reason to restart the engine"


def test_engine_ignoring_sigterm_is_killed_at_its_stop_timeout_and_the_switch_completes(make_router: Factory) -> None:
    models = [ModelSpec("stubborn", "llamacpp", env={"FAKE_IGNORE_SIGTERM": "1"}), ModelSpec("sg", "sglang")]
    router = make_router(models, stop_timeouts={"stubborn": 1.5})
    works(router, "stubborn")
    started = time.monotonic()
    works(router, "sg")  # needs stubborn's unit stopped first
    took = time.monotonic() - started
    assert took >= 1.5, f"the switch waited for the unit's stop timeout, took {took:.2f} s"
    assert router.events("stubborn", "ignored_signal"), "the engine really ignored SIGTERM"
    assert router.is_active("stubborn") == "inactive"
    journal = router.systemd.journal_path(unit_of("stubborn")).read_text()
    assert "State 'stop-sigterm' timed out. Killing." in journal
    assert len(router.events("sg", "start")) == 1
    works(router, "stubborn")  # and back: the killed unit starts again


def test_a_slow_stop_job_delays_the_switch_but_the_router_keeps_answering(make_router: Factory) -> None:
    router = make_router()
    works(router, "llama-a")
    router.systemd.set_faults(stop_delay={unit_of("llama-a"): 2.5})
    started = time.monotonic()
    thread, results = in_thread(lambda: router.stream_chat("sg", "[[tokens:3]]"))
    wait_until(lambda: httpx.get(router.base + "/health").json()["waiting"] == 1, 5, "sg to wait for the stop")
    time.sleep(0.3)  # inside the 2.5 s the stop job hangs
    for _ in range(3):  # health, model list and metrics answer at once while the stop hangs
        t0 = time.monotonic()
        assert httpx.get(router.base + "/health", timeout=5).status_code == 200
        assert httpx.get(router.base + "/v1/models", timeout=5).status_code == 200
        assert httpx.get(router.base + "/metrics", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 0.5
        time.sleep(0.3)
    thread.join(20)
    (result,) = results
    assert isinstance(result, StreamResult) and result.done and not result.errors, result
    assert time.monotonic() - started >= 2.5
    assert router.is_active("llama-a") == "inactive" and router.is_active("sg") == "active"
    router.systemd.set_faults()
    works(router, "llama-a")


def test_port_held_by_a_foreign_process_fails_the_load_naming_the_port_and_the_next_request_works(
    make_router: Factory,
) -> None:
    backends = {
        "llamacpp": {"url": f"http://127.0.0.1:{LLAMA_PORT}", "stop_timeout": 1},
        "sglang": {"url": f"http://127.0.0.1:{BASE_PORT + 2}"},
    }
    router = make_router(backends=backends)
    foreign = socket.socket()
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    foreign.bind(("127.0.0.1", LLAMA_PORT))
    foreign.listen(8)
    try:
        result = router.stream_chat("llama-a")
        assert result.status == 200 and result.done
        (error,) = result.errors
        assert error["code"] == "model_load_failed"
        assert f"port {LLAMA_PORT} of llamacpp is still in use" in error["message"], error
        assert "another process holds it" in error["message"]
        response = chat(router, "llama-a")
        assert response.status_code == 503 and f"port {LLAMA_PORT}" in response.json()["error"]["message"]
        assert router.events("llama-a", "start") == [], "the unit is never started onto a taken port"
        works(router, "sg")  # other engines are unaffected
    finally:
        foreign.close()
    works(router, "llama-a")
    assert len(router.events("llama-a", "start")) == 1


def raw_stream(router: RouterEnv, model: str, text: str) -> tuple[int, bytes]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]}
    with (
        httpx.Client(base_url=router.base, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        return response.status_code, response.read()


def test_engine_sending_malformed_sse_never_reaches_the_client_as_garbage(make_router: Factory) -> None:
    router = make_router()
    for model in ("llama-a", "sg"):
        works(router, model)
        status, raw = raw_stream(router, model, "[[tokens:5]] [[malformed-sse]]")
        assert status == 200
        blocks = [b for b in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
        events = []
        for block in blocks:
            if block.startswith(b":"):
                continue
            assert block.startswith(b"data: ") and b"\n" not in block, f"{model}: not one data line: {block!r}"
            payload = block[6:]
            if payload == b"[DONE]":
                events.append("[DONE]")
                continue
            try:
                parsed = json.loads(payload)
            except ValueError:
                raise AssertionError(f"{model}: the client got a data line that is not JSON: {block!r}") from None
            assert isinstance(parsed, dict), block
            events.append(parsed)
        assert events[-1] == "[DONE]"
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        text = "".join(
            (c.get("delta") or {}).get("content") or ""
            for e in events
            if isinstance(e, dict)
            for c in e.get("choices", [])
        )
        # Either the garbage is dropped and the answer is whole, or the stream ends with an error naming the cause.
        whole = not errors and text.startswith("tok1 tok2 tok3 tok4 tok5")
        named = len(errors) == 1 and model in errors[0]["message"] and "malformed" in errors[0]["message"]
        assert whole or named, (model, errors, text)
        works(router, model)


def test_answer_longer_than_the_shutdown_grace_ends_with_an_error_event_not_a_dropped_connection(
    make_router: Factory,
) -> None:
    router = make_router(shutdown_grace=1)
    works(router, "sg")
    thread, results = in_thread(lambda: raw_stream(router, "sg", "[[tokens:60]] [[delay:0.1]]"))
    time.sleep(0.8)
    assert router.process is not None
    router.process.send_signal(signal.SIGTERM)
    thread.join(15)
    (result,) = results
    assert not isinstance(result, Exception), f"the connection was dropped: {result!r}"
    _status, raw = result
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
    assert b'"error"' in raw and b"shut" in raw, raw[-300:]


# ----- systemd and polkit faults -------------------------------------------------------------------------------------


def test_systemctl_start_denied_by_polkit_names_the_unit_and_the_permission(make_router: Factory) -> None:
    router = make_router()
    router.systemd.set_faults(deny={"start": [unit_of("llama-a")]})
    result = router.stream_chat("llama-a")
    assert result.status == 200 and result.done
    (error,) = result.errors
    assert error["code"] == "model_load_failed"
    assert f"systemctl start {unit_of('llama-a')} failed" in error["message"], error
    assert "Interactive authentication required" in error["message"], error
    response = chat(router, "llama-a")
    assert response.status_code == 503
    assert unit_of("llama-a") in response.json()["error"]["message"]
    assert "Interactive authentication required" in response.json()["error"]["message"]
    assert router.events("llama-a", "start") == []
    works(router, "sg")  # units the fence allows still start
    router.systemd.set_faults()
    works(router, "llama-a")


def test_systemctl_stop_denied_by_polkit_keeps_the_running_engine_and_names_the_unit(make_router: Factory) -> None:
    router = make_router()
    works(router, "llama-a")
    router.systemd.set_faults(deny={"stop": [unit_of("llama-a")]}, deny_reason="denied")
    result = router.stream_chat("sg")
    assert result.done
    (error,) = result.errors
    assert f"could not stop the running engine {unit_of('llama-a')}" in error["message"], error
    assert "Access denied" in error["message"], error
    assert router.is_active("llama-a") == "active" and router.is_active("sg") == "inactive"
    works(router, "llama-a")  # the engine that could not be stopped still serves
    assert statuses(router)["llama-a"] == "loaded"
    router.systemd.set_faults()
    works(router, "sg")


def test_journal_unreadable_the_load_error_still_names_the_unit(make_router: Factory) -> None:
    router = make_router()
    router.systemd.set_faults(journal="unreadable")
    result = router.stream_chat("broken")
    assert result.done
    (error,) = result.errors
    assert error["code"] == "model_load_failed"
    assert f"engine unit {unit_of('broken')} exited while loading" in error["message"], error
    assert "insufficient permissions" in error["message"], "the journal's own complaint is passed on"
    works(router, "llama-a")


# ----- configuration and router restarts -----------------------------------------------------------------------------


def test_reload_with_a_broken_config_file_keeps_the_old_config(make_router: Factory) -> None:
    router = make_router()
    works(router, "llama-a")
    before = statuses(router)
    config_yml = router.config_dir / "config.yml"
    good = config_yml.read_text()
    config_yml.write_text(good + "listen: [unclosed\n  : :\n")  # not YAML at all
    router.reload()
    wait_until(lambda: router.log().count("reload refused") >= 1, 5, "the reload to be refused")
    assert statuses(router) == before
    works(router, "llama-a")
    assert len(router.events("llama-a", "start")) == 1, "a refused reload does not touch the engines"
    config_yml.write_text(good)
    (router.config_dir / "models.yml").unlink()  # a missing file is refused the same way
    router.reload()
    wait_until(lambda: router.log().count("reload refused") >= 2, 5, "the second reload to be refused")
    assert statuses(router) == before
    works(router, "sg")
    assert router.process is not None and router.process.poll() is None


def test_sigterm_while_a_model_loads_lets_the_waiting_answer_finish_and_the_new_router_adopts_the_unit(
    make_router: Factory,
) -> None:
    models = [*MODELS, ModelSpec("slow", "llamacpp", env={"FAKE_LOAD_SECONDS": "2"})]
    router = make_router(models, shutdown_grace=8)
    thread, results = in_thread(lambda: router.stream_chat("slow", "[[tokens:3]]"))
    wait_until(lambda: router.events("slow", "start"), 5, "slow's engine to start")
    assert router.process is not None
    router.process.send_signal(signal.SIGTERM)
    thread.join(15)
    (result,) = results
    assert isinstance(result, StreamResult), result
    assert result.done and not result.errors and result.text().startswith("tok1 tok2 tok3"), result.raw[-400:]
    assert router.process.wait(10) == 0
    assert router.is_active("slow") == "active", "stopping the router leaves the engine running"
    router.start()
    wait_until(lambda: statuses(router)["slow"] == "loaded", 5, "the new router to adopt slow")
    again = router.stream_chat("slow", "[[tokens:2]]")
    assert again.done and not again.errors and not again.text("reasoning_content"), "adopted: no switch"
    assert len(router.events("slow", "start")) == 1


def test_sigterm_while_answers_stream_finishes_them_and_the_new_router_adopts_the_unit(make_router: Factory) -> None:
    router = make_router(shutdown_grace=8)
    works(router, "sg")
    thread, results = in_thread(lambda: router.stream_chat("sg", "[[tokens:25]] [[delay:0.08]]"))
    wait_until(lambda: len(router.events("sg", "request")) >= 2, 5, "the answer to start")
    time.sleep(0.3)
    assert router.process is not None
    router.process.send_signal(signal.SIGTERM)
    refused_at = time.monotonic()
    with pytest.raises(httpx.HTTPError):  # a draining router takes no new requests (the listener is closed)
        while time.monotonic() - refused_at < 3:
            httpx.get(router.base + "/health", timeout=1)
            time.sleep(0.05)
    thread.join(15)
    (result,) = results
    assert isinstance(result, StreamResult), result
    assert result.done and not result.errors and "tok25" in result.text(), result.raw[-400:]
    assert router.process.wait(10) == 0
    router.start()
    wait_until(lambda: statuses(router)["sg"] == "loaded", 5, "the new router to adopt sg")
    works(router, "sg")
    assert len(router.events("sg", "start")) == 1


# ----- security model ------------------------------------------------------------------------------------------------


def test_api_keys_guard_v1_and_the_lifecycle_api_while_health_and_metrics_stay_open(make_router: Factory) -> None:
    router = make_router(api_keys=["sk-soak-one"])
    good = {"Authorization": "Bearer sk-soak-one"}
    bad = {"Authorization": "Bearer sk-wrong-key"}
    guarded = [
        ("GET", "/v1/models", None),
        ("GET", "/models", None),
        ("POST", "/models/load", {"model": "llama-a"}),
        ("POST", "/v1/models/load", {"model": "llama-a"}),
        ("POST", "/models/unload", {"model": "llama-a"}),
        ("POST", "/v1/models/unload", {"model": "llama-a"}),
        ("DELETE", "/models", None),
        ("POST", "/v1/chat/completions", {"model": "llama-a", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/completions", {"model": "llama-a", "prompt": "hi"}),
        ("POST", "/v1/embeddings", {"model": "llama-a", "input": "hi"}),
    ]
    with router.client() as client:
        for method, path, body in guarded:
            for headers in ({}, bad):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["type"] == "authentication_error"
        with client.stream("GET", "/models/sse") as sse:
            assert sse.status_code == 401
        assert router.events("llama-a", "start") == [], "an unauthorised load request loads nothing"
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/models/load", json={"model": "llama-a"}, headers=good).json() == {"success": True}
    wait_until(lambda: router.events("llama-a", "ready"), 10, "the authorised load")
    log = router.log()
    assert "sk-soak-one" not in log and "sk-wrong-key" not in log, "keys never reach the log"
