"""Stream chunks: the ones the router injects, and the few engine chunks it must look into or reshape.

Injected chunks look like the engine's own (`id`, `object`, `created`, `model`, `choices[0].index`, one JSON object
per `data:` line). The id question: status chunks go out before the engine has produced anything, so they carry
the router's own id (`chatcmpl-router-…`). The engine's chunks are forwarded byte-for-byte and keep the engine's
id: rewriting them would mean parsing every event. So once the engine's first chunk is seen, `ChunkFactory.adopt`
takes over its `id`, `created` and `model`, and everything injected after that (the footer) matches the engine's
chunks. A switched stream therefore changes id once, between the status chunks and the answer; clients (the
openai package, Open-WebUI) key nothing on the id.

Per-event cost matters: `needs_inspection` is the byte test that tells the proxy which events to parse at all.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from router_app.sse import DONE_EVENT, encode_json_event

StreamKind = Literal["chat", "completion"]
"""`chat` for /v1/chat/completions (`chat.completion.chunk`), `completion` for /v1/completions (`text_completion`)."""

StatusChannel = Literal["reasoning", "content"]
"""Where status text goes in a chat stream: `delta.reasoning_content` (a collapsible "thinking" block in
Open-WebUI, not kept in its history) or `delta.content`. Completions have only `choices[0].text`."""

CHUNK_OBJECT: dict[StreamKind, str] = {"chat": "chat.completion.chunk", "completion": "text_completion"}


def needs_inspection(raw: bytes) -> bool:
    """True when an engine event must be parsed: it may carry finish_reason, usage, timings, an error, or [DONE].

    Everything else (the bulk of a stream: one token per event) is forwarded without parsing. No false negatives
    for those fields; false positives (a token that spells `"error"`) only cost a parse. Written for speed, about
    2 µs on a slow core: each `in`/`find` is a full C scan of the event, so there are as few as possible.
    """
    if len(raw) < 40 and b"[DONE]" in raw:
        return True
    # Every chunk carries `"finish_reason":null` and some engines `"usage":null`: only a non-null value counts.
    if _has_non_null(raw, b'"finish_reason"') or _has_non_null(raw, b'"usage"') or b'"timings"' in raw:
        return True
    if b"error" in raw:
        # An error object (`{"error": ...}`, SGLang's `"object":"error"`) or llama-server's bare `error:` line.
        return b'"error"' in raw or raw.startswith(b"error") or b"\nerror" in raw or b"\rerror" in raw
    return False


def carries_tool_calls(raw: bytes) -> bool:
    """True when an engine event (or response body) holds a non-empty `tool_calls` list.

    Engines repeat `"tool_calls":null` (or `[]`) in every delta; only a list with an entry counts. A quote inside
    generated text is escaped, so `"tool_calls"` only matches a real key. One C scan for the common case.
    """
    at = raw.find(b'"tool_calls"')
    while at >= 0:
        after = raw[at + 12 : at + 24].replace(b" ", b"").lstrip(b":")
        if after.startswith(b"[") and not after.startswith(b"[]"):
            return True
        at = raw.find(b'"tool_calls"', at + 12)
    return False


def finish_reason(chunk: Mapping[str, Any]) -> str | None:
    """The first choice's `finish_reason` that is set, or None (a chunk in the middle of the answer)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, Mapping):
            reason = choice.get("finish_reason")
            if reason is not None:
                return str(reason)
    return None


def footer_fits(reason: str | None, tool_calls: bool) -> bool:
    """The answer is plain text that ended normally: only then may the speed footer follow it.

    A tool call (finish_reason `tool_calls`, or `stop` with tool calls, as some engines send) is structured output;
    `length` and `content_filter` answers were cut and the footer would read as part of the cut text.
    """
    return reason == "stop" and not tool_calls


def _has_non_null(raw: bytes, key: bytes) -> bool:
    # Inside a JSON string a quote is escaped (`\"usage\"`), so `"key"` only matches a real key.
    at = raw.find(key)
    while at >= 0:
        after = at + len(key)
        if not raw[after : after + 8].replace(b" ", b"").startswith(b":null"):
            return True
        at = raw.find(key, after)
    return False


class ChunkFactory:
    """Builds every chunk the router injects into one streamed answer.

    Create one per request with the model id the client asked for; call `adopt` with the engine's first parsed
    chunk. Builders return plain dicts; send them with `sse.encode_json_event`.
    """

    def __init__(
        self, model: str, kind: StreamKind = "chat", *, created: int | None = None, id: str | None = None
    ) -> None:
        self.kind: StreamKind = kind
        self.model = model
        self.id = id or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-router-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time()) if created is None else created
        self.adopted = False
        """True once `adopt` took over the engine's identity."""

    def adopt(self, engine_chunk: Mapping[str, Any]) -> None:
        """Use the engine's `id`, `created` and `model` from now on (each only when present and well-typed)."""
        chunk_id = engine_chunk.get("id")
        created = engine_chunk.get("created")
        model = engine_chunk.get("model")
        if isinstance(chunk_id, str) and chunk_id:
            self.id = chunk_id
        if isinstance(created, int) and not isinstance(created, bool):
            self.created = created
        if isinstance(model, str) and model:
            self.model = model
        self.adopted = True

    def role(self) -> dict[str, Any] | None:
        """The opening `delta: {"role": "assistant", "content": ""}` chunk; None for completions (no roles)."""
        if self.kind != "chat":
            return None
        return self._chunk({"role": "assistant", "content": ""})

    def status(self, text: str, channel: StatusChannel) -> dict[str, Any]:
        """A chunk with status text in `channel` (completions ignore the channel: they only have `text`)."""
        if channel == "reasoning":
            return self._chunk({"reasoning_content": text})
        if channel == "content":
            return self._chunk({"content": text})
        raise ValueError(f"unknown status channel {channel!r}")

    def content(self, text: str) -> dict[str, Any]:
        """A chunk with answer text (the speed footer): `delta.content`, or `text` for completions."""
        return self._chunk({"content": text})

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            text = delta.get("content", delta.get("reasoning_content", ""))
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return {
            "id": self.id,
            "object": CHUNK_OBJECT[self.kind],
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }


def encode_stream_error(envelope: Mapping[str, Any]) -> bytes:
    """The in-band failure ending a stream whose headers are sent: `data: {"error": {...}}` then `data: [DONE]`.

    `envelope` comes from `errors` (`OpenAIError.envelope()`, `normalise_engine_error`). The openai client raises
    `APIError` with the message; Open-WebUI shows it.
    """
    return encode_json_event(envelope) + DONE_EVENT


def _has_text(choice: Mapping[str, Any]) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, Mapping):
        return any(value not in (None, "", []) for key, value in delta.items() if key != "role")
    return bool(choice.get("text"))


def split_finish_chunk(chunk: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split an engine chunk that carries both final text and `finish_reason` (SGLang does, on a `length` stop).

    The footer must go after the engine's last text and before `finish_reason`. Returns `(head, tail)`: `head`
    carries the text (every delta key, finish_reason null, no usage) or is None when there was no text; `tail` is
    the chunk with empty deltas (`text: ""` for completions), its finish_reason, usage and everything else. Send
    head, then the footer, then tail.
    """
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not any(isinstance(c, Mapping) and _has_text(c) for c in choices):
        return None, dict(chunk)
    head_choices: list[Any] = []
    tail_choices: list[Any] = []
    for choice in choices:
        if not isinstance(choice, Mapping):
            tail_choices.append(choice)
            continue
        if _has_text(choice):
            head_choices.append({**choice, "finish_reason": None})
        tail = dict(choice)
        if "delta" in tail:
            tail["delta"] = {}
        if "text" in tail:
            tail["text"] = ""
        tail_choices.append(tail)
    head = {key: value for key, value in chunk.items() if key not in ("usage", "timings")}
    head["choices"] = head_choices
    tail_chunk = dict(chunk)
    tail_chunk["choices"] = tail_choices
    return head, tail_chunk


def without_usage(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    """What to send a client that did not ask for usage, given an engine chunk that carries it.

    The usage-only chunk (`choices: []`, llama-server and SGLang) is dropped: None. TabbyAPI puts usage on a chunk
    that still has choices: that chunk is kept without its `usage` key. llama-server's `timings` go with usage.
    """
    if chunk.get("usage") is None:
        return dict(chunk)
    if not chunk.get("choices"):
        return None
    return {key: value for key, value in chunk.items() if key not in ("usage", "timings")}


def append_footer(body: Mapping[str, Any], footer: str) -> dict[str, Any]:
    """A non-streaming response body with `footer` appended to the first choice's text; `body` is not modified.

    Chat: `choices[0].message.content`; completions: `choices[0].text`. Left unchanged unless the answer is plain
    text that ended normally (`footer_fits`: finish_reason `stop`, no `tool_calls`) and that text is a string:
    structured output is never touched.
    """
    result = dict(body)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return result
    first = dict(choices[0])
    if first.get("finish_reason") != "stop":
        return result
    message = first.get("message")
    if isinstance(message, Mapping):
        if message.get("tool_calls") or not isinstance(message.get("content"), str):
            return result
        first["message"] = {**message, "content": message["content"] + footer}
    elif isinstance(first.get("text"), str):
        first["text"] = first["text"] + footer
    else:
        return result
    result["choices"] = [first, *choices[1:]]
    return result
