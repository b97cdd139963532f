"""Speed accounting from each engine's real-looking final chunks, the clock fallback, and its outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router_app.annotations import strip_annotations
from router_app.chunks import needs_inspection
from router_app.speed import (
    LLAMACPP_TIMINGS,
    TABBYAPI_USAGE,
    USAGE_AND_REQUEST_CLOCK,
    USAGE_AND_STREAM_CLOCK,
    Speed,
    SpeedMeter,
    approximate_total,
    speed_from_response,
)
from router_app.sse import SSEDecoder


def token_event(text: str, id: str = "c") -> bytes:
    chunk = {"id": id, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def run_stream(events: list[tuple[float, bytes]]) -> Speed | None:
    """Drive a meter the way the proxy does: every event timed, only the inspected ones parsed."""
    meter = SpeedMeter()
    decoder = SSEDecoder()
    for now, raw in events:
        for event in decoder.feed(raw):
            meter.observe_event(event.raw, now)
            if needs_inspection(event.raw) and not event.is_done and event.data:
                meter.observe_chunk(json.loads(event.data))
    return meter.result()


LLAMA_FINISH = b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"id":"c","object":"x"}\n\n'
LLAMA_USAGE = (
    b'data: {"choices":[],"id":"c","usage":{"completion_tokens":512,"prompt_tokens":20,"total_tokens":532},'
    b'"timings":{"cache_n":0,"prompt_n":20,"prompt_ms":80.1,"prompt_per_second":249.7,"predicted_n":512,'
    b'"predicted_ms":21900.0,"predicted_per_second":23.378995433789953}}\n\n'
)
TABBY_FINAL = (
    b'data: {"id":"t","choices":[{"index":0,"finish_reason":"stop","delta":{"role":"assistant","content":""}}],'
    b'"usage":{"prompt_tokens":20,"completion_tokens":100,"total_tokens":120,"prompt_time":0.1,'
    b'"prompt_tokens_per_sec":200.0,"completion_time":2.5,"completion_tokens_per_sec":40.0}}\n\n'
)
SGLANG_FINISH = (
    b'data: {"id":"s","choices":[{"index":0,"delta":{"role":null,"content":"","reasoning_content":null},'
    b'"finish_reason":"stop"}],"usage":null}\n\n'
)
SGLANG_USAGE = (
    b'data: {"id":"s","choices":[],"usage":{"prompt_tokens":20,"total_tokens":31,"completion_tokens":11,'
    b'"prompt_tokens_details":null}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_llama_server_timings_win() -> None:
    speed = run_stream([(0.0, token_event("a")), (9.0, token_event("b")), (9.1, LLAMA_FINISH), (9.1, LLAMA_USAGE)])
    assert speed == Speed(512, 21.9, 23.378995433789953, LLAMACPP_TIMINGS, prompt_tokens_per_second=249.7)
    assert speed.footer() == "\n\n⚡ 23.4 tok/s (512 tokens in 21.9s)"


def test_llama_timings_without_rate_are_computed() -> None:
    meter = SpeedMeter()
    meter.observe_chunk({"timings": {"predicted_n": 101, "predicted_ms": 4000}})
    assert meter.result() == Speed(101, 4.0, 25.0, LLAMACPP_TIMINGS)  # llama-server's own (n-1) convention
    meter.observe_chunk({"timings": {"predicted_n": 1, "predicted_ms": 50}})
    assert meter.result() == Speed(1, 0.05, 20.0, LLAMACPP_TIMINGS)


# Copied from a real llama-server stream (docs/benchmarks.md): finish chunk, then usage + timings, then [DONE].
REAL_LLAMA_TAIL = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795565047,"id":"chatcmpl-uzHj",'
    b'"model":"gemma-3-270m-q4","system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1795565047,"id":"chatcmpl-uzHj","model":"gemma-3-270m-q4",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk","usage":{"completion_tokens":32,'
    b'"prompt_tokens":29,"total_tokens":61,"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,'
    b'"prompt_n":29,"prompt_ms":247.53,"prompt_per_token_ms":8.53551724137931,"prompt_per_second":117.15751626065527,'
    b'"predicted_n":32,"predicted_ms":667.193,"predicted_per_token_ms":21.522354838709678,'
    b'"predicted_per_second":46.46331721106186}}\n\n'
    b"data: [DONE]\n\n"
)


def test_real_llama_server_tail() -> None:
    speed = run_stream([(0.0, token_event("a")), (0.6, token_event("b")), (0.7, REAL_LLAMA_TAIL)])
    assert speed is not None
    assert (speed.tokens, speed.seconds, speed.tokens_per_second) == (32, 0.667193, 46.46331721106186)
    assert speed.prompt_tokens_per_second is not None
    assert speed.footer() == "\n\n⚡ 46.5 tok/s (32 tokens in 0.7s)"


def test_latest_timings_win_over_per_token_timings() -> None:
    meter = SpeedMeter()
    meter.observe_chunk({"timings": {"predicted_n": 1, "predicted_ms": 10, "predicted_per_second": 100}})
    meter.observe_chunk({"timings": {"predicted_n": 50, "predicted_ms": 1000, "predicted_per_second": 50}})
    assert meter.result() == Speed(50, 1.0, 50.0, LLAMACPP_TIMINGS)


def test_tabbyapi_usage_on_a_chunk_with_choices() -> None:
    speed = run_stream([(0.0, token_event("a")), (5.0, token_event("b")), (5.0, TABBY_FINAL), (5.0, DONE)])
    assert speed == Speed(100, 2.5, 40.0, TABBYAPI_USAGE, prompt_tokens_per_second=200.0)
    assert speed.footer() == "\n\n⚡ 40.0 tok/s (100 tokens in 2.5s)"


def test_tabbyapi_without_completion_time() -> None:
    meter = SpeedMeter()
    meter.observe_chunk({"usage": {"completion_tokens": 80, "completion_tokens_per_sec": 40.0}})
    assert meter.result() == Speed(80, 2.0, 40.0, TABBYAPI_USAGE)


def test_sglang_usage_with_stream_clock_uses_n_minus_one() -> None:
    events = [(0.5, b'data: {"id":"s","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')]
    events += [(1.0 + 0.1 * i, token_event(f"t{i}")) for i in range(11)]
    events += [(3.0, SGLANG_FINISH), (3.0, SGLANG_USAGE), (3.0, DONE)]
    speed = run_stream(events)
    assert speed is not None
    assert speed.source == USAGE_AND_STREAM_CLOCK
    assert speed.tokens == 11
    assert speed.seconds == pytest.approx(1.0)  # first text at 1.0, last at 2.0: the role chunk does not count
    assert speed.tokens_per_second == pytest.approx(10.0)  # 10 intervals between 11 tokens
    assert speed.footer() == "\n\n⚡ 10.0 tok/s (11 tokens in 1.0s)"
    assert speed.prompt_tokens_per_second is None  # the meter was not told when the request went out


def test_sglang_prompt_speed_from_the_stream_clock() -> None:
    meter = SpeedMeter(sent_at=0.5)
    meter.observe_event(token_event("a"), 0.9)
    meter.observe_event(token_event("b"), 1.9)
    meter.observe_chunk(json.loads(SGLANG_USAGE.removeprefix(b"data: ")))
    speed = meter.result()
    assert speed is not None
    assert speed.prompt_tokens_per_second == pytest.approx(20 / 0.4)  # 20 prompt tokens, first text 0.4 s after


def test_llama_prompt_speed_computed_when_the_rate_is_missing() -> None:
    meter = SpeedMeter(sent_at=0.0)
    meter.observe_chunk({"timings": {"predicted_n": 10, "predicted_ms": 1000, "prompt_n": 50, "prompt_ms": 250}})
    speed = meter.result()
    assert speed is not None
    assert speed.prompt_tokens_per_second == pytest.approx(200.0)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0h0m0s"), (4.99, "0h0m4s"), (65.2, "0h1m5s"), (3725, "1h2m5s"), (-1, "0h0m0s")]
)
def test_approximate_total_in_open_webui_format(seconds: float, text: str) -> None:
    assert approximate_total(seconds) == text


def test_text_events_are_recognised_in_every_field() -> None:
    meter = SpeedMeter()
    meter.observe_event(b'data: {"choices":[{"delta":{"reasoning_content":"r"}}]}\n\n', 1.0)
    meter.observe_event(b'data: {"choices":[{"text":"x"}]}\n\n', 2.0)
    meter.observe_event(b'data: {"choices": [{"delta": {"content": "spaced"}}]}\n\n', 3.0)
    meter.observe_event(b'data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{"}}]}}]}\n\n', 4.0)
    meter.observe_event(b'data: {"choices":[{"delta":{"content":""}}]}\n\n', 9.0)
    meter.observe_event(b": keep-alive\n\n", 9.0)
    meter.observe_chunk({"usage": {"completion_tokens": 4}})
    assert meter.result() == Speed(4, 3.0, 1.0, USAGE_AND_STREAM_CLOCK)


@pytest.mark.parametrize(
    ("chunk", "times"),
    [
        ({"usage": {"completion_tokens": 1}}, [1.0]),  # one token: no interval to measure
        ({"usage": {"completion_tokens": 5}}, [1.0, 1.0]),  # zero interval
        ({"usage": {"completion_tokens": 5}}, []),  # no text events seen
        ({"usage": {"prompt_tokens": 5}}, [1.0, 2.0]),  # no completion count
        ({"usage": {"completion_tokens": "5"}}, [1.0, 2.0]),
        ({"usage": {"completion_tokens": True}}, [1.0, 2.0]),
        ({}, [1.0, 2.0]),  # no usage at all: never guess from characters
        ({"usage": None, "timings": None}, [1.0, 2.0]),
    ],
)
def test_no_speed_without_exact_figures(chunk: dict[str, Any], times: list[float]) -> None:
    meter = SpeedMeter()
    for now in times:
        meter.observe_event(token_event("some text"), now)
    meter.observe_chunk(chunk)
    assert meter.result() is None


@pytest.mark.parametrize(
    "timings",
    [
        {"predicted_n": 0, "predicted_ms": 0},
        {"predicted_n": 5, "predicted_ms": 0},
        {"predicted_n": 5.5, "predicted_ms": 100},
        {"predicted_n": 5, "predicted_ms": float("nan")},
        {"predicted_n": 5, "predicted_ms": float("inf")},
    ],
)
def test_unusable_timings_fall_through_to_usage(timings: dict[str, Any]) -> None:
    meter = SpeedMeter()
    meter.observe_event(token_event("a"), 0.0)
    meter.observe_event(token_event("b"), 1.0)
    meter.observe_chunk({"timings": timings, "usage": {"completion_tokens": 3}})
    assert meter.result() == Speed(3, 1.0, 2.0, USAGE_AND_STREAM_CLOCK)


def test_unusable_tabby_rate_falls_through() -> None:
    meter = SpeedMeter()
    meter.observe_chunk({"usage": {"completion_tokens": 3, "completion_tokens_per_sec": 0}})
    assert meter.result() is None


def test_non_streaming_llama_timings() -> None:
    body = {
        "choices": [{"message": {"content": "x"}}],
        "usage": {"completion_tokens": 30},
        "timings": {"predicted_n": 30, "predicted_ms": 1500.0, "predicted_per_second": 20.0},
    }
    assert speed_from_response(body, 9.0) == Speed(30, 1.5, 20.0, LLAMACPP_TIMINGS)


def test_non_streaming_tabby_usage() -> None:
    body = {"usage": {"completion_tokens": 10, "completion_time": 0.5, "completion_tokens_per_sec": 20.0}}
    assert speed_from_response(body, 9.0) == Speed(10, 0.5, 20.0, TABBYAPI_USAGE)


def test_non_streaming_usage_over_request_time_uses_n() -> None:
    assert speed_from_response({"usage": {"completion_tokens": 30}}, 2.0) == Speed(
        30, 2.0, 15.0, USAGE_AND_REQUEST_CLOCK
    )
    assert speed_from_response({"usage": {"completion_tokens": 1}}, 0.5) == Speed(1, 0.5, 2.0, USAGE_AND_REQUEST_CLOCK)


@pytest.mark.parametrize(
    ("body", "wall"),
    [
        ({"usage": {"completion_tokens": 30}}, 0.0),
        ({"usage": {"completion_tokens": 0}}, 1.0),
        ({"usage": "x", "timings": "y"}, 1.0),
        ({}, 1.0),
    ],
)
def test_non_streaming_without_figures(body: dict[str, Any], wall: float) -> None:
    assert speed_from_response(body, wall) is None


def test_headers_and_usage_extras() -> None:
    speed = Speed(512, 21.9, 23.378995, LLAMACPP_TIMINGS)
    assert speed.headers() == {
        "X-LLM-Router-Tokens-Per-Second": "23.38",
        "X-LLM-Router-Completion-Tokens": "512",
        "X-LLM-Router-Generation-Seconds": "21.900",
        "X-LLM-Router-Speed-Source": "llamacpp-timings",
    }
    assert speed.usage_extras() == {
        "response_token/s": 23.38,
        "generation_tokens": 512,
        "generation_seconds": 21.9,
        "speed_source": "llamacpp-timings",
    }
    with_prompt = Speed(512, 21.9, 23.378995, LLAMACPP_TIMINGS, prompt_tokens_per_second=249.666)
    assert with_prompt.usage_extras(total_seconds=47.3) == {
        "response_token/s": 23.38,
        "prompt_token/s": 249.67,
        "approximate_total": "0h0m47s",
        "generation_tokens": 512,
        "generation_seconds": 21.9,
        "speed_source": "llamacpp-timings",
    }


def test_footer_is_removable_from_history() -> None:
    speed = Speed(3, 0.25, 12.0, USAGE_AND_STREAM_CLOCK)
    assert strip_annotations("answer" + speed.footer()) == "answer"


def test_text_that_arrived_in_one_read_is_timed_from_the_request() -> None:
    # The relay hands over everything buffered at once: all text events share one arrival time.
    meter = SpeedMeter(sent_at=1.0)
    for text in ("a", "b", "c", "d"):
        meter.observe_event(token_event(text), 1.5)
    meter.observe_chunk(json.loads(SGLANG_USAGE.removeprefix(b"data: ")))
    speed = meter.result()
    assert speed is not None
    assert speed.source == USAGE_AND_REQUEST_CLOCK
    assert speed.seconds == pytest.approx(0.5)
    assert speed.tokens_per_second == pytest.approx(speed.tokens / 0.5)


def test_text_in_one_read_without_a_send_time_has_no_speed() -> None:
    meter = SpeedMeter()
    meter.observe_event(token_event("a"), 1.5)
    meter.observe_event(token_event("b"), 1.5)
    meter.observe_chunk(json.loads(SGLANG_USAGE.removeprefix(b"data: ")))
    assert meter.result() is None
