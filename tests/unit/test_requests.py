"""Request parsing, validation errors, the annotation decision, and the body the engine gets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router_app.annotations import speed_footer
from router_app.errors import OpenAIError
from router_app.requests import (
    ANNOTATE_HEADER,
    MAX_JSON_DEPTH,
    Endpoint,
    annotations_allowed,
    asks_for_json,
    json_depth,
    parse_request,
)


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_parse_basic_chat() -> None:
    request = parse_request(raw({"model": "m", "messages": []}), "chat")
    assert request.model == "m"
    assert request.endpoint == "chat"
    assert not request.stream
    assert request.annotate
    assert not request.wants_usage
    assert request.body == {"model": "m", "messages": []}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"", None, "empty"),
        (b"  \n", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b'{"model": "m"', None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b'{"model": "m", "temperature": NaN}', None, "NaN"),
        (b'{"model": "m", "x": -Infinity}', None, "Infinity"),
        (b"[1, 2]", None, "an array"),
        (b'"text"', None, "a string"),
        (b"null", None, "null"),
        (b"{}", "model", "provide a model"),
        (b'{"model": null}', "model", "provide a model"),
        (b'{"model": 3}', "model", "non-empty string"),
        (b'{"model": "  "}', "model", "non-empty string"),
        (b'{"model": ["m"]}', "model", "non-empty string"),
        (b'{"model": "m", "stream": "true"}', "stream", "a string"),
        (b'{"model": "m", "stream": 1}', "stream", "a number"),
        (b'{"model": "m", "stream": true, "stream_options": true}', "stream_options", "a boolean"),
        (b'{"model": "m", "stream_options": []}', "stream_options", "an array"),
    ],
)
def test_invalid_requests_raise_openai_400(body: bytes, param: str | None, fragment: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_request(body, "chat")
    error = caught.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert fragment in error.message


def test_stream_detection() -> None:
    assert parse_request(raw({"model": "m", "stream": True}), "chat").stream
    assert parse_request(raw({"model": "m", "stream": True}), "completion").stream
    assert not parse_request(raw({"model": "m", "stream": False}), "chat").stream
    assert not parse_request(raw({"model": "m", "stream": None}), "chat").stream
    assert not parse_request(raw({"model": "m", "stream": True}), "embedding").stream


@pytest.mark.parametrize(
    ("options", "wants"),
    [
        (None, False),
        ({}, False),
        ({"include_usage": False}, False),
        ({"include_usage": True}, True),
        ({"include_usage": "yes"}, False),
    ],
)
def test_wants_usage_and_forced_include_usage(options: dict[str, Any] | None, wants: bool) -> None:
    body: dict[str, Any] = {"model": "m", "stream": True, "messages": []}
    if options is not None:
        body["stream_options"] = options
    request = parse_request(raw(body), "chat")
    assert request.wants_usage is wants
    upstream = json.loads(request.upstream_body("m"))
    assert upstream["stream_options"]["include_usage"] is True
    assert upstream["messages"] == [] and upstream["model"] == "m"
    assert request.body == body  # the parsed body is not modified


def test_other_stream_options_are_kept() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    upstream = json.loads(parse_request(raw(body), "completion").upstream_body("m"))
    assert upstream["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


def test_non_streaming_without_history_changes_forwards_the_bytes_received() -> None:
    original = b'{"model":"m",  "messages":[{"role":"user","content":"\\u26a1 hi"}], "x": 1.50}'
    assert parse_request(original, "chat").upstream_body("m") is original
    embedding = b'{"model": "e", "input": "x", "stream": true}'
    assert parse_request(embedding, "embedding").upstream_body("e") is embedding


def test_upstream_body_cleans_chat_history() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "answer é" + speed_footer(3, 1.0, 3.0)},
        ],
    }
    upstream = parse_request(raw(body), "chat").upstream_body("m")
    assert json.loads(upstream)["messages"][1]["content"] == "answer é"
    assert "é".encode() in upstream  # UTF-8, not \\u escapes
    assert b", " not in upstream  # compact


def test_completion_prompt_is_never_rewritten() -> None:
    body = raw({"model": "m", "prompt": "x" + speed_footer(3, 1.0, 3.0)})
    assert parse_request(body, "completion").upstream_body("m") is body


@pytest.mark.parametrize(
    ("extra", "footer"),
    [
        ({}, True),
        # Open-WebUI offers its built-in tools on every chat: tools in the request decide nothing.
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, True),
        ({"tools": []}, True),
        ({"tool_choice": "auto"}, True),
        ({"functions": [{"name": "f"}]}, True),
        ({"function_call": "auto"}, True),
        # A JSON answer must stay a JSON document.
        ({"response_format": {"type": "json_object"}}, False),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, False),
        ({"response_format": "json"}, False),
        ({"response_format": {"type": "text"}}, True),
        ({"response_format": None}, True),
        ({"temperature": 0.2, "max_tokens": 10}, True),
    ],
)
def test_status_always_footer_unless_json_is_asked_for(extra: dict[str, Any], footer: bool) -> None:
    body = {"model": "m", "messages": [], **extra}
    request = parse_request(raw(body), "chat")
    assert request.annotate
    assert request.footer_allowed is footer
    assert asks_for_json(body) is not footer


def test_annotate_off_turns_the_footer_off_too() -> None:
    request = parse_request(raw({"model": "m"}), "chat", {ANNOTATE_HEADER: "off"})
    assert not request.annotate
    assert not request.footer_allowed
    assert not annotations_allowed("chat", {ANNOTATE_HEADER: "off"})


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({ANNOTATE_HEADER: "off"}, False),
        ({"x-llm-router-annotate": "OFF "}, False),
        ({"X-LLM-ROUTER-ANNOTATE": "0"}, False),
        ({ANNOTATE_HEADER: "false"}, False),
        ({ANNOTATE_HEADER: "no"}, False),
        ({ANNOTATE_HEADER: "on"}, True),
        ({ANNOTATE_HEADER: ""}, True),
        ({"X-Other": "off"}, True),
        ({}, True),
    ],
)
def test_annotation_header(headers: dict[str, str], allowed: bool) -> None:
    assert parse_request(raw({"model": "m"}), "chat", headers).annotate is allowed


@pytest.mark.parametrize("endpoint", ["chat", "completion", "embedding"])
def test_annotation_per_endpoint(endpoint: Endpoint) -> None:
    assert parse_request(raw({"model": "m"}), endpoint).annotate is (endpoint != "embedding")


@pytest.mark.parametrize("depth", [129, 900, 10_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_bodies_are_a_400_not_a_recursion_error(depth: int, opener: str) -> None:
    # 10 000 levels overflowed json.loads (RecursionError, HTTP 500 through the router); levels just under Python's
    # recursion limit would parse here but leave no room to re-serialise the body inside the request handler.
    closer = "]" if opener == "[" else "}"
    raw = ('{"model": "m", "stream": true, "messages": ' + opener * depth + "1" + closer * depth + "}").encode()
    with pytest.raises(OpenAIError) as caught:
        parse_request(raw, "chat")
    assert caught.value.status == 400
    assert "nested too deeply" in caught.value.message


def test_nesting_up_to_the_limit_is_accepted_and_re_serialised() -> None:
    depth = MAX_JSON_DEPTH - 3  # the body object, the messages list and the message are levels too
    schema: Any = {}
    for _ in range(depth - 1):
        schema = {"a": schema}
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x", "s": schema}]}
    parsed = parse_request(json.dumps(body).encode(), "chat")
    assert json_depth(parsed.body) == MAX_JSON_DEPTH
    assert json.loads(parsed.upstream_body("m"))["stream_options"] == {"include_usage": True}


def test_json_depth() -> None:
    assert json_depth(1) == 0
    assert json_depth([]) == 1
    assert json_depth({"a": [1, {"b": []}]}) == 4
    assert json_depth([[1], [[2]], []]) == 3


def test_numbers_out_of_float_range_are_a_400() -> None:
    # They would parse to inf and be re-serialised for the engine as the non-JSON `Infinity`.
    with pytest.raises(OpenAIError) as caught:
        parse_request(b'{"model": "m", "stream": true, "temperature": 1e999}', "chat")
    assert caught.value.status == 400
    assert "out of range" in caught.value.message
    assert parse_request(b'{"model": "m", "temperature": 1.5e300}', "chat").body["temperature"] == 1.5e300


def test_an_alias_reaches_the_engine_as_the_model_id_it_serves() -> None:
    body = {"model": "current", "messages": [{"role": "user", "content": "hi"}]}
    upstream = json.loads(parse_request(raw(body), "chat").upstream_body("qwen-vllm"))
    assert upstream == {**body, "model": "qwen-vllm"}
