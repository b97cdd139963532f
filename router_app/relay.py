"""Relay decisions for an engine's SSE stream (sans-IO: fed decoded events, returns the bytes to send)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from router_app import errors
from router_app.chunks import (
    ChunkFactory,
    carries_tool_calls,
    encode_stream_error,
    finish_reason,
    footer_fits,
    needs_inspection,
    split_finish_chunk,
    without_usage,
)
from router_app.speed import SpeedMeter
from router_app.sse import SSEEvent, encode_json_event

_MODEL_FIELD = re.compile(rb'"model": ?"(?:[^"\\]|\\.)*"')


class StreamRelay:
    """Per-stream relay decisions for one engine SSE stream, event by event.

    Every event passes through untouched unless it must be reshaped: the usage the router forced on is hidden from a
    client that did not ask for it (and carries the speed in Open-WebUI's keys for one that did), llama-server's
    bare `error:` line becomes an error event, and the footer goes in before the `finish_reason` chunk of a plain
    text answer. Only that chunk is held back, and only until the speed figures are known (llama-server chat and
    SGLang send usage in a separate last chunk): the engine's bytes before it are never delayed or changed.

    `footer` says whether the request allows one; the answer decides (`chunks.footer_fits`): finish_reason `stop`
    and no tool calls. `sent_at` and `received_at` (same clock as `now`) are when the request went to the engine and
    when the router received it, for the prompt speed and the total time.
    """

    def __init__(
        self,
        factory: ChunkFactory,
        *,
        footer: bool,
        client_wants_usage: bool,
        sent_at: float | None = None,
        received_at: float | None = None,
    ) -> None:
        self.footer = footer
        self.client_wants_usage = client_wants_usage
        self.factory = factory
        self.meter = SpeedMeter(sent_at)
        self.received_at = received_at
        self.now = 0.0
        self.held: list[dict[str, Any]] = []
        self.saw_tool_calls = False
        self.dropped = 0
        """Events dropped because they were not OpenAI chunks (malformed SSE from the engine)."""
        self.saw_finish = False
        self.saw_error = False
        self.finished = False
        self.footer_sent = False
        # Engines name the model their own way (a path, an alias); clients see the id they asked for. The engine's
        # exact `"model":"..."` bytes are learnt from its first chunk and replaced in every event (a bytes.replace,
        # no parse): JSON strings escape quotes, so the pattern cannot occur inside generated text.
        self.model = factory.model
        self._our_model = b'"model":' + json.dumps(self.model, ensure_ascii=False).encode()
        self._engine_model: bytes | None = None

    def handle(self, event: SSEEvent, now: float) -> bytes:
        raw = event.raw
        self.now = now
        if not self.saw_tool_calls and self.footer and carries_tool_calls(raw):
            self.saw_tool_calls = True
        if not needs_inspection(raw):
            if not _looks_like_chunk(raw):
                return self._malformed(raw)
            self.meter.observe_event(raw, now)
            if not self.factory.adopted and event.data:
                self._adopt(event.data, raw)
            return self._rename(raw)
        if event.error is not None and event.data is None:
            # llama-server's bare `error: {...}` line: rewrite into an in-band error event.
            self.saw_error = True
            self.finished = True
            envelope = errors.normalise_engine_error(500, event.error.encode())
            return self.flush_held() + encode_stream_error(envelope)
        if event.is_done:
            self.finished = True
            return self.flush_held() + raw
        data = event.data
        if data is None:
            return self._malformed(raw)
        try:
            chunk = json.loads(data)
        except ValueError:
            return self._malformed(raw)
        if not isinstance(chunk, dict):
            return self._malformed(raw)
        if ("error" in chunk or chunk.get("object") == "error") and not chunk.get("choices"):
            self.saw_error = True
            envelope = errors.normalise_engine_error(500, data.encode())
            return self.flush_held() + encode_json_event(envelope)
        if not isinstance(chunk.get("choices"), list):
            return self._malformed(raw)
        self.meter.observe_event(raw, now)
        self.meter.observe_chunk(chunk)
        if not self.factory.adopted:
            self._adopt_chunk(chunk, raw)
        if "model" in chunk:
            chunk["model"] = self.model
        out = b""
        reason = finish_reason(chunk)
        if reason is not None:
            self.saw_finish = True
            if self.footer and footer_fits(reason, self.saw_tool_calls):
                head, tail = split_finish_chunk(chunk)
                if head is not None:
                    out += encode_json_event(head)
                self.held.append(tail)
                if self.meter.result() is not None and _engine_figures(chunk):
                    out += self.flush_held()
                return out
            return out + self._client_view(chunk, raw)
        if self.held:
            # The usage-only chunk after the finish chunk: the figures are complete now.
            self.held.append(chunk)
            return self.flush_held()
        return self._client_view(chunk, raw)

    def _malformed(self, raw: bytes) -> bytes:
        """An event that is not an OpenAI chunk: forward comments (pings), drop everything else.

        Clients parse every `data:` line as JSON (Open-WebUI, the openai package): a garbled line would break them.
        The answer goes on with the engine's next good event; the count is logged at the end of the stream.
        """
        if raw.startswith(b":"):
            return raw
        self.dropped += 1
        return b""

    def _adopt(self, data: str, raw: bytes) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            return
        if isinstance(chunk, dict):
            self._adopt_chunk(chunk, raw)

    def _adopt_chunk(self, chunk: Mapping[str, Any], raw: bytes) -> None:
        self.factory.adopt(chunk)
        self.factory.model = self.model
        found = _MODEL_FIELD.search(raw)
        if found is not None and found.group(0) != self._our_model:
            self._engine_model = found.group(0)

    def _rename(self, raw: bytes) -> bytes:
        engine_model = self._engine_model
        if engine_model is None or engine_model not in raw:
            return raw
        return raw.replace(engine_model, self._our_model)

    def _client_view(self, chunk: dict[str, Any], raw: bytes) -> bytes:
        usage = chunk.get("usage")
        if usage is None:
            return self._rename(raw)
        if not self.client_wants_usage:
            reshaped = without_usage(chunk)
            return b"" if reshaped is None else encode_json_event(reshaped)
        speed = self.meter.result()
        if speed is None or not isinstance(usage, dict):
            return self._rename(raw)
        total = None if self.received_at is None else self.now - self.received_at
        return encode_json_event({**chunk, "usage": {**usage, **speed.usage_extras(total)}})

    def flush_held(self) -> bytes:
        if not self.held:
            return b""
        out = b""
        if self.footer and not self.footer_sent:
            speed = self.meter.result()
            if speed is not None:
                out += encode_json_event(self.factory.content(speed.footer()))
                self.footer_sent = True
        for chunk in self.held:
            out += self._client_view(chunk, encode_json_event(chunk))
        self.held = []
        return out


def _looks_like_chunk(raw: bytes) -> bool:
    """A cheap shape test for the events forwarded unparsed: one `data:` line holding a JSON object with a
    `choices` list. Two prefix/suffix tests and one scan: the bulk of a stream passes them in well under a µs."""
    if not (raw.startswith(b"data: {") or raw.startswith(b"data:{")) or not raw.rstrip().endswith(b"}"):
        return False
    return b'"choices":[' in raw or b'"choices": [' in raw


def _engine_figures(chunk: Mapping[str, Any]) -> bool:
    """The finish chunk itself carries the final figures (llama-server timings, TabbyAPI usage)."""
    usage = chunk.get("usage")
    return isinstance(chunk.get("timings"), Mapping) or (isinstance(usage, Mapping) and bool(usage))
