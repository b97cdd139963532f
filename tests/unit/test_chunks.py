"""Injected chunk shapes, identity adoption, finish/usage reshaping, the per-event byte test, non-stream footer."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from router_app.chunks import (
    ChunkFactory,
    append_footer,
    carries_tool_calls,
    encode_stream_error,
    finish_reason,
    footer_fits,
    needs_inspection,
    split_finish_chunk,
    without_usage,
)
from router_app.errors import envelope
from router_app.sse import SSEDecoder, encode_json_event

# Real-looking engine events (shapes from the engines' code; see shared/notes/backends.md).
LLAMA_FIRST = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"created":1764000000,"id":"chatcmpl-llama1","model":"llama-3.3-70b-q4.gguf","system_fingerprint":"b6000",'
    b'"object":"chat.completion.chunk"}\n\n'
)
LLAMA_TOKEN = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" world"}}],"created":1764000000,'
    b'"id":"chatcmpl-llama1","model":"m","system_fingerprint":"b6000","object":"chat.completion.chunk"}\n\n'
)
LLAMA_FINISH = (
    b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1764000000,'
    b'"id":"chatcmpl-llama1","model":"m","object":"chat.completion.chunk"}\n\n'
)
LLAMA_USAGE = (
    b'data: {"choices":[],"created":1764000000,"id":"chatcmpl-llama1","model":"m","object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":512,"prompt_tokens":20,"total_tokens":532},"timings":{"prompt_n":20,'
    b'"prompt_ms":80.1,"prompt_per_second":249.7,"predicted_n":512,"predicted_ms":21900.0,'
    b'"predicted_per_second":23.38}}\n\n'
)
SGLANG_TOKEN = (
    b'data: {"id":"a1b2","object":"chat.completion.chunk","created":1764000001,"model":"qwen",'
    b'"choices":[{"index":0,"delta":{"role":null,"content":"Hi","reasoning_content":null,"tool_calls":null},'
    b'"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}\n\n'
)
SGLANG_FINISH_WITH_TEXT = (
    b'data: {"id":"a1b2","object":"chat.completion.chunk","created":1764000001,"model":"qwen",'
    b'"choices":[{"index":0,"delta":{"role":null,"content":" end","reasoning_content":null,"tool_calls":null},'
    b'"logprobs":null,"finish_reason":"length","matched_stop":null}],"usage":null}\n\n'
)
TABBY_FINAL = (
    b'data: {"id":"chatcmpl-t1","choices":[{"index":0,"finish_reason":"stop","stop_str":"<|im_end|>",'
    b'"delta":{"role":"assistant","content":""},"logprobs":null}],"created":1764000002,"model":"exl2",'
    b'"object":"chat.completion.chunk","usage":{"prompt_tokens":20,"completion_tokens":100,"total_tokens":120,'
    b'"prompt_time":0.1,"prompt_tokens_per_sec":200.0,"completion_time":2.5,"completion_tokens_per_sec":40.0}}\n\n'
)
SPACED_FINISH = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null}\n\n'
SPACED_USAGE = b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'


@pytest.mark.parametrize(
    "raw",
    [
        LLAMA_FINISH,
        LLAMA_USAGE,
        SGLANG_FINISH_WITH_TEXT,
        TABBY_FINAL,
        SPACED_FINISH,
        SPACED_USAGE,
        b"data: [DONE]\n\n",
        b'error: {"code":500,"message":"x"}\n\n',
        b'\nerror: {"code":500,"message":"x"}\n\n',
        b'data: {"error":{"message":"x"}}\n\n',
        b'data: {"object":"error","message":"x"}\n\n',
        b'data: {"choices":[{"delta":{"content":"x"}}],"timings":{"predicted_n":1}}\n\n',
        b'data: {"choices":[{"index":0,"finish_reason":null},{"index":1,"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[{"finish_reason" :  "stop"}]}\n\n',
        b'data: {"choices":[],"usage":\n{"completion_tokens":1}}\n\n',
        b"data:[DONE]\r\n\r\n",
    ],
)
def test_needs_inspection_catches_every_event_that_matters(raw: bytes) -> None:
    assert needs_inspection(raw)


@pytest.mark.parametrize(
    "raw",
    [
        LLAMA_FIRST,
        LLAMA_TOKEN,
        SGLANG_TOKEN,
        b": keep-alive\n\n",
        b'data: {"choices":[{"delta":{"content":"an error occurred, \\"error\\" said"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"usage: finish_reason"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"\\"usage\\": {\\"finish_reason\\":\\"x"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":" error"},"finish_reason": null}],"usage": null}\n\n',
        b'data: {"choices":[{"delta":{"content":"print(\'[DONE]\')"}}]}\n\n',  # long: not the DONE event
    ],
)
def test_needs_inspection_skips_plain_token_events(raw: bytes) -> None:
    assert not needs_inspection(raw)


def test_needs_inspection_false_positive_only_costs_a_parse() -> None:
    # A token that is exactly "error" looks like an error key; documented, harmless.
    assert needs_inspection(b'data: {"choices":[{"delta":{"content":"error"}}]}\n\n')


def parsed(raw: bytes) -> dict[str, Any]:
    (event,) = SSEDecoder().feed(raw)
    result = json.loads(event.data or "")
    assert isinstance(result, dict)
    return result


def test_role_chunk() -> None:
    factory = ChunkFactory("llama", created=100, id="chatcmpl-x")
    assert factory.role() == {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 100,
        "model": "llama",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert ChunkFactory("m", "completion").role() is None


def test_status_chunks_per_channel() -> None:
    factory = ChunkFactory("m")
    assert factory.status("s", "reasoning")["choices"][0]["delta"] == {"reasoning_content": "s"}
    assert factory.status("s", "content")["choices"][0]["delta"] == {"content": "s"}
    with pytest.raises(ValueError):
        factory.status("s", "none")  # type: ignore[arg-type]


def test_completion_chunks_use_text() -> None:
    factory = ChunkFactory("m", "completion", created=5, id="cmpl-1")
    for chunk in (factory.status("s", "reasoning"), factory.status("s", "content"), factory.content("s")):
        assert chunk == {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 5,
            "model": "m",
            "choices": [{"index": 0, "text": "s", "logprobs": None, "finish_reason": None}],
        }


def test_content_chunk() -> None:
    chunk = ChunkFactory("m").content("\n\n⚡ 1.0 tok/s (1 token in 1.0s)")
    assert chunk["choices"][0]["delta"] == {"content": "\n\n⚡ 1.0 tok/s (1 token in 1.0s)"}


def test_default_ids_and_created() -> None:
    chat, completion = ChunkFactory("m"), ChunkFactory("m", "completion")
    assert chat.id.startswith("chatcmpl-router-") and completion.id.startswith("cmpl-router-")
    assert chat.id != ChunkFactory("m").id
    assert isinstance(chat.created, int) and chat.created > 1_700_000_000
    assert not chat.adopted


def test_adopt_takes_engine_identity() -> None:
    factory = ChunkFactory("llama-3.3-70b-q4", created=1, id="chatcmpl-router-1")
    before = factory.status("s", "reasoning")
    factory.adopt(parsed(LLAMA_FIRST))
    after = factory.content("x")
    assert (before["id"], before["created"], before["model"]) == ("chatcmpl-router-1", 1, "llama-3.3-70b-q4")
    assert (after["id"], after["created"], after["model"]) == ("chatcmpl-llama1", 1764000000, "llama-3.3-70b-q4.gguf")
    assert factory.adopted


def test_adopt_ignores_missing_or_bad_fields() -> None:
    factory = ChunkFactory("m", created=1, id="r")
    factory.adopt({"id": "", "created": True, "model": 3})
    assert (factory.id, factory.created, factory.model) == ("r", 1, "m")
    factory.adopt({"created": 7})
    assert (factory.id, factory.created) == ("r", 7)


def test_injected_chunks_encode_to_one_line() -> None:
    raw = encode_json_event(ChunkFactory("m").status("line 1\nline 2\n", "content"))
    assert raw.count(b"\n") == 2


def test_encode_stream_error() -> None:
    raw = encode_stream_error(envelope("engine died", code="engine_crashed"))
    events = SSEDecoder().feed(raw)
    assert len(events) == 2
    assert json.loads(events[0].data or "") == {
        "error": {"message": "engine died", "type": "server_error", "param": None, "code": "engine_crashed"}
    }
    assert events[1].is_done


def test_split_finish_chunk_with_text() -> None:
    chunk = parsed(SGLANG_FINISH_WITH_TEXT)
    original = copy.deepcopy(chunk)
    head, tail = split_finish_chunk(chunk)
    assert chunk == original
    assert head is not None
    assert head["choices"][0]["delta"]["content"] == " end"
    assert head["choices"][0]["finish_reason"] is None
    assert head["id"] == "a1b2"
    assert tail["choices"][0]["delta"] == {}
    assert tail["choices"][0]["finish_reason"] == "length"
    assert tail["choices"][0]["matched_stop"] is None


def test_split_finish_chunk_moves_usage_to_the_tail() -> None:
    head, tail = split_finish_chunk(
        {
            "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
            "usage": {"a": 1},
            "timings": {},
        }
    )
    assert head is not None and "usage" not in head and "timings" not in head
    assert tail["usage"] == {"a": 1} and tail["timings"] == {}


@pytest.mark.parametrize("raw", [LLAMA_FINISH, TABBY_FINAL])
def test_split_finish_chunk_without_text(raw: bytes) -> None:
    chunk = parsed(raw)
    head, tail = split_finish_chunk(chunk)
    assert head is None
    assert tail == chunk


def test_split_finish_chunk_completion_and_odd_shapes() -> None:
    head, tail = split_finish_chunk({"choices": [{"index": 0, "text": "end", "finish_reason": "length"}]})
    assert head == {"choices": [{"index": 0, "text": "end", "finish_reason": None}]}
    assert tail == {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    assert split_finish_chunk({"choices": "x"}) == (None, {"choices": "x"})
    head, tail = split_finish_chunk(
        {"choices": ["junk", {"index": 1, "delta": {"content": "y"}, "finish_reason": "stop"}]}
    )
    assert head == {"choices": [{"index": 1, "delta": {"content": "y"}, "finish_reason": None}]}
    assert tail["choices"] == ["junk", {"index": 1, "delta": {}, "finish_reason": "stop"}]


def test_without_usage_drops_usage_only_chunk() -> None:
    assert without_usage(parsed(LLAMA_USAGE)) is None
    assert without_usage({"usage": {"completion_tokens": 1}}) is None


def test_without_usage_keeps_tabbyapi_chunk_with_choices() -> None:
    chunk = parsed(TABBY_FINAL)
    result = without_usage(chunk)
    assert result is not None
    assert "usage" not in result
    assert result["choices"] == chunk["choices"]
    assert "usage" in chunk  # input untouched


def test_without_usage_leaves_chunks_without_usage() -> None:
    chunk = parsed(SGLANG_TOKEN)
    assert without_usage(chunk) == chunk


CHAT_BODY: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "Other"}, "finish_reason": "stop"},
    ],
    "usage": {"completion_tokens": 1},
}


def test_append_footer_chat() -> None:
    original = copy.deepcopy(CHAT_BODY)
    result = append_footer(CHAT_BODY, "\n\n⚡ f")
    assert original == CHAT_BODY
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "Hello\n\n⚡ f"}
    assert result["choices"][1] == CHAT_BODY["choices"][1]
    assert result["usage"] == CHAT_BODY["usage"]


def test_append_footer_completion() -> None:
    body = {"object": "text_completion", "choices": [{"index": 0, "text": "abc", "finish_reason": "stop"}]}
    assert append_footer(body, "!")["choices"][0]["text"] == "abc!"
    assert body["choices"][0]["text"] == "abc"  # type: ignore[index]


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}}]},
        {"choices": [{"message": {"role": "assistant", "content": "x", "tool_calls": [{"id": "t"}]}}]},
        {"choices": [{"message": {"role": "assistant", "content": [{"type": "text", "text": "x"}]}}]},
        {"choices": [{"index": 0}]},
        {"choices": []},
        {"choices": ["junk"]},
        {"object": "embedding"},
    ],
)
def test_append_footer_leaves_structured_or_odd_bodies_alone(body: dict[str, Any]) -> None:
    assert append_footer(body, "F") == body


@pytest.mark.parametrize("reason", ["length", "tool_calls", "content_filter", None])
def test_append_footer_only_after_a_normal_stop(reason: str | None) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": reason}]}
    assert append_footer(body, "F") == body


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"delta":{"tool_calls":[{"index":0,"id":"c"}]}}', True),
        (b'{"delta":{"tool_calls": [ {"index":0}]}}', True),
        (b'{"delta":{"content":"x","tool_calls":null}}', False),
        (b'{"delta":{"tool_calls":[]}}', False),
        (b'{"delta":{"tool_calls": []}}', False),
        (b'{"delta":{"content":"the key \\"tool_calls\\":[1] in text"}}', False),
        (b'{"delta":{"tool_calls":null},"x":{"tool_calls":[{"id":"c"}]}}', True),
        (b'{"delta":{"content":"x"}}', False),
    ],
)
def test_carries_tool_calls(raw: bytes, expected: bool) -> None:
    assert carries_tool_calls(raw) is expected


@pytest.mark.parametrize(
    ("reason", "tool_calls", "fits"),
    [("stop", False, True), ("stop", True, False), ("tool_calls", False, False), ("length", False, False)],
)
def test_footer_fits_only_a_plain_answer_that_stopped(reason: str, tool_calls: bool, fits: bool) -> None:
    assert footer_fits(reason, tool_calls) is fits
    assert finish_reason({"choices": [{"index": 0, "finish_reason": reason}]}) == reason
    assert finish_reason({"choices": [{"index": 0, "finish_reason": None}]}) is None
