"""Load failures, timeouts, engine crashes and bad requests: always a clear OpenAI-shaped error, never a hang."""

from __future__ import annotations

import time

import openai
import pytest

from tests.e2e.conftest import RouterEnv


def test_unit_that_exits_while_loading_fails_the_stream_fast_with_log_lines(router: RouterEnv) -> None:
    started = time.monotonic()
    result = router.stream_chat("broken")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"failure must be reported at once, took {elapsed:.2f} s"
    assert result.status == 200 and result.done
    assert "❌ Loading broken failed" in result.text("reasoning_content")
    (error,) = result.errors
    assert error["code"] == "model_load_failed"
    assert "exited while loading" in error["message"]
    assert "error: failed to load model" in error["message"], "the unit's last log lines are in the error"
    assert router.is_active("broken") == "failed"
    # the router is not wedged: another model loads right after
    assert router.stream_chat("llama-a", "[[tokens:2]]").done


def test_non_streaming_load_failure_is_503_with_the_reason(router: RouterEnv) -> None:
    with router.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "model_load_failed"
    assert "failed to load model" in error["message"]


def test_load_timeout_fails_and_stops_the_unit(router: RouterEnv) -> None:
    started = time.monotonic()
    result = router.stream_chat("sleepy")
    assert 1.9 < time.monotonic() - started < 6
    (error,) = result.errors
    assert "load timeout of 2 s" in error["message"]
    assert result.done
    assert router.is_active("sleepy") == "inactive"
    models = {m["id"]: m for m in router.client().get("/v1/models").json()["data"]}
    assert models["sleepy"]["status"] == {"value": "failed", "failed": True}


def test_engine_crash_mid_stream_ends_with_an_error_event_and_the_next_request_recovers(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    result = router.stream_chat("llama-a", "[[tokens:50]] [[crash-after:5]]")
    assert result.text().startswith("tok1 tok2 tok3 tok4 tok5")
    (error,) = result.errors
    assert "llama-a" in error["message"] and error["code"] == "engine_failed"
    assert result.done
    assert "⚡" not in result.text(), "no footer on a truncated answer"
    # the openai client raises instead of returning a silently truncated answer
    client = openai.OpenAI(base_url=router.base + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="llama-a", stream=True, messages=[{"role": "user", "content": "[[tokens:2]]"}]
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.startswith("tok1 tok2"), "the crashed engine was started again"


def test_openai_client_raises_on_mid_stream_crash(router: RouterEnv) -> None:
    client = openai.OpenAI(base_url=router.base + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="sg", stream=True, messages=[{"role": "user", "content": "[[tokens:30]] [[crash-after:3]]"}]
    )
    with pytest.raises(openai.APIError, match="sg"):
        for _ in stream:
            pass


def test_malformed_missing_and_unknown_model_requests(router: RouterEnv) -> None:
    with router.client() as client:
        bad_json = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        no_model = client.post("/v1/chat/completions", json={"messages": []})
        unknown = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        not_object = client.post("/v1/completions", json=["model"])
        no_route = client.get("/v1/nothing")
        wrong_method = client.get("/v1/chat/completions")
    for response, status in ((bad_json, 400), (no_model, 400), (not_object, 400), (unknown, 404), (no_route, 404)):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert no_model.json()["error"]["param"] == "model"
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_engine_errors_are_normalised_to_the_openai_envelope(router: RouterEnv) -> None:
    with router.client() as client:
        for model in ("llama-a", "sg", "tabby"):
            response = client.post(
                "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "[[error]]"}]}
            )
            assert 400 <= response.status_code < 500, (model, response.text)
            error = response.json()["error"]
            assert set(error) >= {"message", "type", "param", "code"} and error["message"], (model, error)


def test_llama_bare_error_line_mid_stream_becomes_an_error_event(router: RouterEnv) -> None:
    result = router.stream_chat("llama-a", "[[tokens:20]] [[error-midstream]]")
    assert result.errors and result.errors[0]["message"]
    assert result.done


def test_api_keys_are_required_when_configured(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(api_keys=["sk-one", "sk-two"])
    with router.client() as client:
        missing = client.get("/v1/models")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-three"})
        right = client.get("/v1/models", headers={"Authorization": "Bearer sk-two"})
        chat = client.post("/v1/chat/completions", json={"model": "llama-a"}, headers={"Authorization": "Bearer x"})
        health = client.get("/health")
    assert missing.status_code == 401 and wrong.status_code == 401 and chat.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200
    assert "sk-one" not in router.log() and "sk-two" not in router.log()


def test_engine_stopped_behind_the_routers_back_is_loaded_again(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    router.systemd.systemctl("stop", "llm-backend-llama-a.service", check=True)
    result = router.stream_chat("llama-a", "[[tokens:3]]")
    assert result.done and not result.errors, result.raw
    assert "tok1 tok2 tok3" in result.text()
    assert "✅ Llama A ready in" in result.text("reasoning_content")
    router.systemd.systemctl("stop", "llm-backend-llama-a.service", check=True)
    with router.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "llama-a", "messages": [{"role": "user", "content": "[[tokens:2]]"}]}
        )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "llama-a"
    assert len(router.events("llama-a", "start")) == 3


def test_non_streaming_engine_crash_is_a_502_not_a_reload_loop(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    with router.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "llama-a", "messages": [{"role": "user", "content": "[[tokens:9]] [[crash-after:3]]"}]},
        )
    assert response.status_code == 502, response.text
    assert response.json()["error"]["message"]
    assert len(router.events("llama-a", "start")) <= 2


def test_engine_silent_mid_answer_ends_the_stream_after_stall_timeout(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(stall_timeout=1, keepalive_interval=0.5)
    assert router.stream_chat("llama-a", "[[tokens:2]]").done  # loaded
    started = time.monotonic()
    result = router.stream_chat("llama-a", "[[silence:4]] [[tokens:3]]")
    took = time.monotonic() - started
    assert result.done, "the stream ends properly: error event, then [DONE]"
    (error,) = result.errors
    assert error["code"] == "engine_failed" and "stall_timeout" in error["message"], error
    assert took < 3.5, f"given up after {took:.1f} s, not after the engine's 4 s of silence"
    following = router.stream_chat("llama-a", "[[tokens:2]]")
    assert following.done and not following.errors, "the very next request works"


def test_a_body_above_max_body_bytes_gets_413_in_openai_shape(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(max_body_bytes=100_000)
    big = {"model": "llama-a", "messages": [{"role": "user", "content": "x" * 200_000}]}
    with router.client() as client:
        response = client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] and response.json()["error"]["message"]
        small = client.post("/v1/chat/completions", json={**big, "messages": [{"role": "user", "content": "hi"}]})
        assert small.status_code == 200
