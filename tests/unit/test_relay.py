"""StreamRelay on each engine's stream shape: byte-for-byte pass-through, footer placement, usage hiding, errors."""

from __future__ import annotations

import json
from typing import Any

from router_app.chunks import ChunkFactory
from router_app.relay import StreamRelay
from router_app.sse import SSEDecoder


def event(payload: Any, sep: bytes = b"\n\n") -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode() + sep


def chat_chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-engine",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
TIMINGS = {"predicted_n": 4, "predicted_ms": 100.0, "predicted_per_second": 40.0, "prompt_n": 3, "prompt_ms": 5.0}


def run(
    stream: list[bytes], *, footer: bool = True, wants_usage: bool = False, received_at: float | None = None
) -> tuple[bytes, StreamRelay]:
    relay = StreamRelay(
        ChunkFactory("m"), footer=footer, client_wants_usage=wants_usage, sent_at=0.0, received_at=received_at
    )
    decoder = SSEDecoder()
    out = b""
    clock = 0.0
    for raw in stream:
        for ev in decoder.feed(raw):
            clock += 0.01
            out += relay.handle(ev, clock)
    return out, relay


def parse(out: bytes) -> list[Any]:
    events = []
    for block in out.replace(b"\r\n", b"\n").split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:].decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def content_of(events: list[Any]) -> str:
    text = ""
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            text += e["choices"][0].get("delta", {}).get("content") or ""
    return text


LLAMA_CHAT = [
    event(chat_chunk("Hello")),
    event(chat_chunk(" there")),
    event(chat_chunk(" you")),
    event(chat_chunk(" all")),
    event(chat_chunk(None, "stop")),
    event({**chat_chunk(), "choices": [], "usage": USAGE, "timings": TIMINGS}),
    b"data: [DONE]\n\n",
]


def test_tokens_pass_through_byte_for_byte_and_footer_precedes_finish() -> None:
    out, relay = run(LLAMA_CHAT)
    assert out.startswith(b"".join(LLAMA_CHAT[:4])), "content events are forwarded untouched"
    events = parse(out)
    assert events[-1] == "[DONE]"
    footer_index = next(i for i, e in enumerate(events) if "⚡" in json.dumps(e, ensure_ascii=False))
    finish_index = next(i for i, e in enumerate(events) if isinstance(e, dict) and e["choices"][0]["finish_reason"])
    assert footer_index == finish_index - 1
    assert content_of(events) == "Hello there you all\n\n⚡ 40.0 tok/s (4 tokens in 0.1s)"
    assert events[footer_index]["id"] == "chatcmpl-engine", "injected chunks adopt the engine's id"
    assert not any(isinstance(e, dict) and e.get("usage") for e in events), "usage hidden from a client not asking"
    assert relay.finished and relay.saw_finish


def test_usage_kept_for_a_client_that_asked_with_open_webui_speed_keys() -> None:
    events = parse(run(LLAMA_CHAT, wants_usage=True, received_at=-65.0)[0])
    usage_chunks = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == [] and usage_chunks[0]["timings"] == TIMINGS
    usage = usage_chunks[0]["usage"]
    assert {k: usage[k] for k in USAGE} == USAGE, "the engine's figures stay as they were"
    assert usage["response_token/s"] == 40.0
    assert usage["prompt_token/s"] == 600.0  # llama-server's prompt_n / prompt_ms
    assert usage["approximate_total"] == "0h1m5s"  # from the router receiving the request, a switch included


def test_no_footer_when_off_and_every_other_byte_unchanged() -> None:
    out, _ = run(LLAMA_CHAT, footer=False, wants_usage=True)
    assert out.startswith(b"".join(LLAMA_CHAT[:5]))
    assert out.endswith(LLAMA_CHAT[-1])
    usage_event = parse(out)[-2]
    assert set(usage_event["usage"]) > set(USAGE), "only keys were added to usage"
    assert "⚡" not in out.decode()


def tool_call_stream(finish: str) -> list[bytes]:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    args = {"index": 0, "function": {"arguments": "{}"}}
    return [
        event(chat_chunk(None, tool_calls=None)),
        event({**chat_chunk(), "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}),
        event({**chat_chunk(), "choices": [{"index": 0, "delta": {"tool_calls": [args]}, "finish_reason": None}]}),
        event(chat_chunk(None, finish)),
        event({**chat_chunk(), "choices": [], "usage": USAGE, "timings": TIMINGS}),
        b"data: [DONE]\n\n",
    ]


def test_a_tool_call_answer_gets_no_footer_and_passes_unchanged() -> None:
    # finish_reason "tool_calls" (vLLM, SGLang) and "stop" with tool calls (some llama-server versions) alike.
    for finish in ("tool_calls", "stop"):
        stream = tool_call_stream(finish)
        out, relay = run(stream)
        assert "⚡" not in out.decode()
        assert out.startswith(b"".join(stream[:4])), "nothing held back or reshaped before the usage"
        assert relay.saw_tool_calls and relay.finished


def test_a_cut_answer_gets_no_footer() -> None:
    stream = [*LLAMA_CHAT[:4], event(chat_chunk(None, "length")), *LLAMA_CHAT[5:]]
    out, _ = run(stream)
    assert "⚡" not in out.decode()
    assert out.startswith(b"".join(stream[:5]))


def test_null_or_empty_tool_calls_do_not_count() -> None:
    stream = [event(chat_chunk("Hi", tool_calls=None)), *LLAMA_CHAT[1:]]
    stream[0] = stream[0].replace(b'"tool_calls":null', b'"tool_calls": []')
    out, relay = run(stream)
    assert not relay.saw_tool_calls
    assert "⚡ 40.0 tok/s" in out.decode()


def test_sglang_usage_after_finish_gives_clock_based_speed() -> None:
    stream = [
        event({**chat_chunk("a"), "usage": None}),
        event({**chat_chunk(" b"), "usage": None}),
        event({**chat_chunk(" c"), "usage": None}),
        event({**chat_chunk(None, "stop"), "usage": None}),
        event({**chat_chunk(), "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}),
        b"data: [DONE]\n\n",
    ]
    events = parse(run(stream)[0])
    text = content_of(events)
    assert text.startswith("a b c\n\n⚡ ") and "(3 tokens in 0.0s)" in text
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tabby_usage_on_the_finish_chunk_is_stripped_not_dropped() -> None:
    usage = {**USAGE, "completion_tokens_per_sec": 55.5, "completion_time": 0.072}
    stream = [
        event(chat_chunk("x"), b"\r\n\r\n"),
        event({**chat_chunk(" y", "stop"), "usage": usage}, b"\r\n\r\n"),
        b"data: [DONE]\r\n\r\n",
    ]
    events = parse(run(stream)[0])
    assert content_of(events) == "x y\n\n⚡ 55.5 tok/s (4 tokens in 0.1s)"
    finish = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and "usage" not in finish[0]


def test_llama_bare_error_line_becomes_error_event_and_done() -> None:
    stream = [event(chat_chunk("a")), b'error: {"code":500,"message":"kv cache full","type":"server_error"}\n\n']
    out, relay = run(stream)
    events = parse(out)
    assert events[-2] == {"error": {"message": "kv cache full", "type": "server_error", "param": None, "code": 500}}
    assert events[-1] == "[DONE]" and relay.finished and relay.saw_error


def test_in_band_engine_error_is_normalised() -> None:
    stream = [event({"object": "error", "message": "boom", "type": "BadRequestError", "param": None, "code": 400})]
    events = parse(run(stream)[0])
    assert events == [{"error": {"message": "boom", "type": "BadRequestError", "param": None, "code": 400}}]


def test_finish_without_any_figures_is_released_at_done_without_footer() -> None:
    stream = [event(chat_chunk("a")), event(chat_chunk(None, "stop")), b"data: [DONE]\n\n"]
    events = parse(run(stream)[0])
    assert content_of(events) == "a"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_completions_footer_goes_into_text() -> None:
    def text_chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            **extra,
        }

    relay = StreamRelay(ChunkFactory("m", "completion"), footer=True, client_wants_usage=False)
    decoder = SSEDecoder()
    raw = event(text_chunk("a")) + event(text_chunk("", "stop", usage=USAGE, timings=TIMINGS)) + b"data: [DONE]\n\n"
    out = b"".join(relay.handle(ev, 0.0) for ev in decoder.feed(raw))
    events = parse(out)
    texts = [e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"]]
    assert texts[1].startswith("\n\n⚡ 40.0 tok/s") and events[1]["object"] == "text_completion"
    assert "usage" not in events[2]


def test_engine_model_name_is_replaced_by_the_requested_id_in_every_event() -> None:
    def named(chunk: dict[str, Any]) -> dict[str, Any]:
        return {**chunk, "model": "/models/Llama-3.3-70B.gguf"}

    stream = [
        event(named(chat_chunk("a"))),
        event(named(chat_chunk(' "model":"x" b'))),
        event(named(chat_chunk(None, "stop"))),
        event({**named(chat_chunk()), "choices": [], "usage": USAGE, "timings": TIMINGS}),
        b"data: [DONE]\n\n",
    ]
    relay = StreamRelay(ChunkFactory("llama-70b"), footer=True, client_wants_usage=True)
    decoder = SSEDecoder()
    out = b"".join(relay.handle(ev, 0.0) for raw in stream for ev in decoder.feed(raw))
    events = [e for e in parse(out) if isinstance(e, dict)]
    assert {e["model"] for e in events} == {"llama-70b"}
    assert content_of(events).startswith('a "model":"x" b'), "generated text is never rewritten"
