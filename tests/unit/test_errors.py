"""OpenAI error envelope builders and normalisation of every engine's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router_app.errors import (
    MAX_TEXT_MESSAGE,
    OpenAIError,
    authentication_failed,
    bad_gateway,
    envelope,
    invalid_request,
    model_not_found,
    normalise_engine_error,
    rate_limited,
    server_error,
    service_unavailable,
    type_for_status,
)


def test_envelope_always_has_four_keys() -> None:
    assert envelope("boom") == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}


@pytest.mark.parametrize(
    ("error", "status", "type_", "code", "param"),
    [
        (invalid_request("bad", param="model"), 400, "invalid_request_error", None, "model"),
        (authentication_failed(), 401, "authentication_error", "invalid_api_key", None),
        (model_not_found("m1"), 404, "not_found_error", "model_not_found", "model"),
        (rate_limited("full", 2.5), 429, "rate_limit_error", "queue_full", None),
        (server_error("oops"), 500, "server_error", None, None),
        (bad_gateway("gone", code="engine_crashed"), 502, "server_error", "engine_crashed", None),
        (service_unavailable("unit failed"), 503, "server_error", None, None),
    ],
)
def test_builders(error: OpenAIError, status: int, type_: str, code: str | None, param: str | None) -> None:
    assert error.status == status
    body = error.envelope()["error"]
    assert body["type"] == type_
    assert body["code"] == code
    assert body["param"] == param
    assert body["message"] == error.message == str(error)
    assert json.loads(error.body()) == error.envelope()
    assert repr(status) in repr(error)


def test_model_not_found_names_the_model() -> None:
    assert "'m1'" in model_not_found("m1").message


def test_headers() -> None:
    assert authentication_failed().headers == {"WWW-Authenticate": "Bearer"}
    assert rate_limited("x", 2.5).headers == {"Retry-After": "3"}
    assert rate_limited("x", 0).headers == {"Retry-After": "1"}
    assert rate_limited("x", 4).headers == {"Retry-After": "4"}
    assert invalid_request("x").headers == {}


def test_server_error_rejects_non_5xx() -> None:
    with pytest.raises(ValueError):
        server_error("x", status=404)


def test_body_keeps_unicode() -> None:
    assert "é".encode() in invalid_request("é").body()


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
        (302, "server_error"),
    ],
)
def test_type_for_status(status: int, type_: str) -> None:
    assert type_for_status(status) == type_


def err(status: int, body: Any) -> dict[str, Any]:
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    result = normalise_engine_error(status, body)
    assert set(result) == {"error"}
    inner = result["error"]
    assert isinstance(inner, dict)
    assert set(inner) == {"message", "type", "param", "code"}
    return inner


def test_llama_server_nested_error() -> None:
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    assert err(503, body) == {"message": "Loading model", "type": "unavailable_error", "param": None, "code": 503}


def test_llama_server_context_error_keeps_its_type() -> None:
    body = {"error": {"code": 400, "message": "request exceeds context", "type": "exceed_context_size_error"}}
    assert err(400, body)["type"] == "exceed_context_size_error"


def test_llama_server_bare_stream_error_value() -> None:
    # The value of llama-server's mid-stream `error: {...}` line is the un-nested object.
    inner = err(500, '{"code":500,"message":"slot crashed","type":"server_error"}')
    assert inner == {"message": "slot crashed", "type": "server_error", "param": None, "code": 500}


def test_openai_nested_error_with_string_code_and_param() -> None:
    body = {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "x"}}
    assert err(400, body) == {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "x"}


def test_sglang_unnested_error() -> None:
    body = {"object": "error", "message": "prompt too long", "type": "BadRequestError", "param": None, "code": 400}
    assert err(400, body) == {"message": "prompt too long", "type": "BadRequestError", "param": None, "code": 400}


def test_error_without_type_gets_one_from_status() -> None:
    assert err(404, {"error": {"message": "nope"}})["type"] == "not_found_error"
    assert err(500, {"message": "x", "type": ""})["type"] == "server_error"


def test_error_string() -> None:
    assert err(400, {"error": "plain"}) == {
        "message": "plain",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_odd_code_and_param_types_are_dropped_not_kept() -> None:
    inner = err(500, {"message": "x", "code": True, "param": 3})
    assert inner["code"] is None and inner["param"] is None
    assert err(500, {"message": "x", "code": {"a": 1}})["code"] is None


def test_tabbyapi_detail_string() -> None:
    inner = err(503, {"detail": "No models are currently loaded."})
    assert inner == {"message": "No models are currently loaded.", "type": "server_error", "param": None, "code": None}


def test_fastapi_validation_list_becomes_readable() -> None:
    body = {
        "detail": [
            {"type": "missing", "loc": ["body", "messages", 0, "content"], "msg": "Field required", "input": {}},
            {"type": "float_parsing", "loc": ["body", "temperature"], "msg": "Input should be a valid number"},
            {"loc": ["body"], "msg": "JSON decode error"},
            {"type": "weird"},
            "loose text",
        ]
    }
    inner = err(422, body)
    assert inner["type"] == "invalid_request_error"
    assert inner["message"] == (
        "messages.0.content: Field required; temperature: Input should be a valid number; "
        "body: JSON decode error; weird; loose text"
    )


def test_detail_of_other_shapes_is_kept_as_json() -> None:
    inner = err(500, {"detail": {"reason": "x"}})
    assert '{"reason":"x"}' in str(inner["message"])
    assert "500" in str(inner["message"])
    assert "HTTP 500" in str(err(500, {"detail": ""})["message"])


@pytest.mark.parametrize("body", [b"", b"   \n"])
def test_empty_body_names_the_status(body: bytes) -> None:
    inner = err(502, body)
    assert inner["message"] == "The engine answered HTTP 502 Bad Gateway with an empty body."
    assert inner["type"] == "server_error"


def test_plain_text_body_is_kept() -> None:
    inner = err(500, b"Internal Server Error: CUDA out of memory")
    assert (
        inner["message"]
        == "The engine answered HTTP 500 Internal Server Error: Internal Server Error: CUDA out of memory"
    )


def test_unknown_status_code_has_no_phrase() -> None:
    assert err(599, b"")["message"] == "The engine answered HTTP 599 with an empty body."


def test_html_body_is_truncated() -> None:
    inner = err(502, "<html>" + "x" * 10_000)
    message = str(inner["message"])
    assert message.endswith("…")
    assert len(message) < MAX_TEXT_MESSAGE + 100
    assert "<html>" in message


def test_unknown_json_is_kept() -> None:
    assert '{"status":"bad"}' in str(err(500, {"status": "bad"})["message"])
    assert "[1,2]" in str(err(500, [1, 2])["message"])
    assert '"only text"' in str(err(500, '"only text"')["message"])


def test_empty_message_falls_back_to_whole_body() -> None:
    inner = err(500, {"error": {"message": "", "type": "x"}})
    assert '"type":"x"' in str(inner["message"])


def test_invalid_utf8_is_replaced() -> None:
    assert "\ufffd" in str(err(500, b"bad \xff byte")["message"])
