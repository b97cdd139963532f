"""Generation speed from the engines' own figures, or from exact token counts and the clock; never from characters.

Sources, best first:
1. llama-server `timings` (`predicted_n`, `predicted_ms`, `predicted_per_second`): the engine's own decode timing.
   Its rate is (predicted_n - 1) / predicted_ms (measured, docs/benchmarks.md): the same N-1 reasoning as below.
2. TabbyAPI `usage.completion_tokens_per_sec` (with `completion_tokens`, `completion_time`).
3. Exact `usage.completion_tokens` with the router's clock (SGLang gives no speed):
   - streaming: N tokens over the time from the first to the last event that carried text. The first token's
     event marks the end of prefill plus one decode step, so that interval holds the decoding of the other N-1
     tokens: the rate is (N-1)/interval. Using N would overstate short answers (2 tokens 10 ms apart are not
     200 tok/s). The footer still shows N tokens and the interval, so N/seconds can differ from the rate shown
     in the last digit. Needs N >= 2.
   - non-streaming: N over the whole request's wall time, prefill and any queueing included: a lower bound.

Prompt processing speed, for the `prompt_token/s` Open-WebUI shows: llama-server `timings.prompt_per_second`,
TabbyAPI `usage.prompt_tokens_per_sec`, else (streaming only) `usage.prompt_tokens` over the time from sending the
request to the first event with text (prefill plus one decode step and any queueing in the engine: a lower bound).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from router_app.annotations import speed_footer

LLAMACPP_TIMINGS = "llamacpp-timings"
TABBYAPI_USAGE = "tabbyapi-usage"
USAGE_AND_STREAM_CLOCK = "usage-stream-clock"
USAGE_AND_REQUEST_CLOCK = "usage-request-clock"

HEADER_TOKENS_PER_SECOND = "X-LLM-Router-Tokens-Per-Second"
HEADER_COMPLETION_TOKENS = "X-LLM-Router-Completion-Tokens"
HEADER_GENERATION_SECONDS = "X-LLM-Router-Generation-Seconds"
HEADER_SPEED_SOURCE = "X-LLM-Router-Speed-Source"

# An event carries generated text when one of these string fields is non-empty. Compact or spaced JSON.
_TEXT_EVENT = re.compile(rb'"(?:content|reasoning_content|text|arguments)": ?"[^"]')


@dataclass(frozen=True)
class Speed:
    """One answer's generation speed and where it came from (one of the source constants above)."""

    tokens: int
    seconds: float
    tokens_per_second: float
    source: str
    prompt_tokens_per_second: float | None = None
    """Prompt processing speed, when the engine reports it or the stream's clock can tell."""

    def footer(self) -> str:
        """The text to append to the answer: `\\n\\n⚡ 23.4 tok/s (512 tokens in 21.9s)`."""
        return speed_footer(self.tokens, self.seconds, self.tokens_per_second)

    def headers(self) -> dict[str, str]:
        """Response headers for non-streaming answers (programmatic clients read these, not the text)."""
        return {
            HEADER_TOKENS_PER_SECOND: f"{self.tokens_per_second:.2f}",
            HEADER_COMPLETION_TOKENS: str(self.tokens),
            HEADER_GENERATION_SECONDS: f"{self.seconds:.3f}",
            HEADER_SPEED_SOURCE: self.source,
        }

    def usage_extras(self, total_seconds: float | None = None) -> dict[str, Any]:
        """Keys to merge into the answer's `usage`, in the shape Open-WebUI shows in its info tooltip (Ollama's:
        `response_token/s`, `prompt_token/s`, `approximate_total` of the whole request, switch included), and the
        raw figures behind them."""
        extras: dict[str, Any] = {"response_token/s": round(self.tokens_per_second, 2)}
        if self.prompt_tokens_per_second is not None:
            extras["prompt_token/s"] = round(self.prompt_tokens_per_second, 2)
        if total_seconds is not None:
            extras["approximate_total"] = approximate_total(total_seconds)
        extras.update(
            {
                "generation_tokens": self.tokens,
                "generation_seconds": round(self.seconds, 3),
                "speed_source": self.source,
            }
        )
        return extras


def approximate_total(seconds: float) -> str:
    """A duration as Open-WebUI writes Ollama's `approximate_total`: whole seconds, `0h1m5s`."""
    whole = max(0, int(seconds))
    return f"{whole // 3600}h{whole % 3600 // 60}m{whole % 60}s"


class SpeedMeter:
    """Measures one streamed answer. Feed it from the proxy loop, then ask `result()` once the stream ended.

    - `observe_event(raw, now)` for every engine event (cheap: one regex over the bytes);
    - `observe_chunk(chunk)` for the chunks the proxy parsed anyway (`chunks.needs_inspection`): the final
      ones carry `usage` / `timings`.
    `now` is any monotonic clock in seconds (`time.monotonic()`); the meter never reads a clock itself.
    """

    __slots__ = ("_first_text_at", "_last_text_at", "_sent_at", "_timings", "_usage")

    def __init__(self, sent_at: float | None = None) -> None:
        """`sent_at`: when the request went to the engine (same clock as `now`), for the prompt speed."""
        self._sent_at = sent_at
        self._first_text_at: float | None = None
        self._last_text_at: float | None = None
        self._timings: Mapping[str, Any] | None = None
        self._usage: Mapping[str, Any] | None = None

    @property
    def first_text_at(self) -> float | None:
        """When the first event with generated text arrived (the `now` it was observed with)."""
        return self._first_text_at

    def observe_event(self, raw: bytes, now: float) -> None:
        """Note the time of an event if it carries generated text."""
        if _TEXT_EVENT.search(raw) is not None:
            if self._first_text_at is None:
                self._first_text_at = now
            self._last_text_at = now

    def observe_chunk(self, chunk: Mapping[str, Any]) -> None:
        """Keep the latest `timings` and `usage` objects of a parsed chunk (the final ones win)."""
        timings = chunk.get("timings")
        if isinstance(timings, Mapping):
            self._timings = timings
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self._usage = usage

    def result(self) -> Speed | None:
        """The speed from the best source available, or None when nothing exact is known."""
        speed = _engine_speed(self._timings, self._usage)
        if speed is None:
            speed = self._clock_speed()
        if speed is None or speed.prompt_tokens_per_second is not None:
            return speed
        prompt_rate = self._clock_prompt_rate()
        return speed if prompt_rate is None else replace(speed, prompt_tokens_per_second=prompt_rate)

    def _clock_speed(self) -> Speed | None:
        tokens = _count(self._usage, "completion_tokens")
        if tokens is None or tokens < 2 or self._first_text_at is None or self._last_text_at is None:
            return None
        seconds = self._last_text_at - self._first_text_at
        if seconds > 0:
            return Speed(tokens, seconds, (tokens - 1) / seconds, USAGE_AND_STREAM_CLOCK)
        # Every text event arrived in one read (a short answer, or the relay behind a fast engine): the stream's
        # clock cannot tell them apart, the request's can.
        if self._sent_at is None or self._last_text_at <= self._sent_at:
            return None
        seconds = self._last_text_at - self._sent_at
        return Speed(tokens, seconds, tokens / seconds, USAGE_AND_REQUEST_CLOCK)

    def _clock_prompt_rate(self) -> float | None:
        prompt_tokens = _count(self._usage, "prompt_tokens")
        if prompt_tokens is None or prompt_tokens < 1 or self._sent_at is None or self._first_text_at is None:
            return None
        seconds = self._first_text_at - self._sent_at
        return prompt_tokens / seconds if seconds > 0 else None


def speed_from_response(body: Mapping[str, Any], wall_seconds: float) -> Speed | None:
    """The speed of a non-streaming answer: engine figures from the body, else usage over the request's wall time."""
    timings = body.get("timings")
    usage = body.get("usage")
    timings = timings if isinstance(timings, Mapping) else None
    usage = usage if isinstance(usage, Mapping) else None
    speed = _engine_speed(timings, usage)
    if speed is not None:
        return speed
    tokens = _count(usage, "completion_tokens")
    if tokens is None or tokens < 1 or wall_seconds <= 0:
        return None
    return Speed(tokens, wall_seconds, tokens / wall_seconds, USAGE_AND_REQUEST_CLOCK)


def _engine_speed(timings: Mapping[str, Any] | None, usage: Mapping[str, Any] | None) -> Speed | None:
    if timings is not None:
        tokens = _count(timings, "predicted_n")
        ms = _number(timings, "predicted_ms")
        if tokens is not None and tokens > 0 and ms is not None and ms > 0:
            rate = _number(timings, "predicted_per_second")
            if rate is None or rate <= 0:
                # Same convention as llama-server's own figure: predicted_ms spans the decoding of n-1 tokens.
                rate = (tokens - 1 if tokens > 1 else 1) * 1000 / ms
            return Speed(tokens, ms / 1000, rate, LLAMACPP_TIMINGS, _llamacpp_prompt_rate(timings))
    if usage is not None:
        rate = _number(usage, "completion_tokens_per_sec")
        tokens = _count(usage, "completion_tokens")
        if rate is not None and rate > 0 and tokens is not None and tokens > 0:
            seconds = _number(usage, "completion_time")
            if seconds is None or seconds <= 0:
                seconds = tokens / rate
            return Speed(tokens, seconds, rate, TABBYAPI_USAGE, _positive(_number(usage, "prompt_tokens_per_sec")))
    return None


def _llamacpp_prompt_rate(timings: Mapping[str, Any]) -> float | None:
    rate = _positive(_number(timings, "prompt_per_second"))
    if rate is not None:
        return rate
    tokens = _count(timings, "prompt_n")
    ms = _positive(_number(timings, "prompt_ms"))
    return tokens * 1000 / ms if tokens is not None and tokens > 0 and ms is not None else None


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _count(data: Mapping[str, Any] | None, key: str) -> int | None:
    if data is None:
        return None
    value = data.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
