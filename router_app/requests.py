"""Client requests: parse and validate the body, decide what the router may do to the answer, build the body the
engine gets.

Everything that deserves a real HTTP status is decided here, before any response byte goes out: a bad body raises
`errors.OpenAIError` (400). The per-event check the proxy uses on the engine's stream is `chunks.needs_inspection`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from router_app.errors import invalid_request
from router_app.history import clean_history

Endpoint = Literal["chat", "completion", "embedding"]
"""/v1/chat/completions, /v1/completions, /v1/embeddings."""

ANNOTATE_HEADER = "X-LLM-Router-Annotate"
"""Request header; `off` (or `0`, `false`, `no`) turns status text and footer off for that request."""

_OFF_VALUES = frozenset({"off", "0", "false", "no"})

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects a request body may have. Real requests (tool schemas, structured outputs)
stay far below; much deeper bodies would exhaust Python's recursion limit when the body is re-serialised for the
engine (a 500 instead of a 400)."""


@dataclass(frozen=True)
class ClientRequest:
    """A validated request body and what the proxy needs to know about it."""

    raw: bytes
    """The body as received."""
    body: dict[str, Any]
    """The parsed body; treat as read-only (use `upstream_body` for what the engine gets)."""
    endpoint: Endpoint
    model: str
    stream: bool
    annotate: bool
    """The router may inject text into this answer: status lines while it waits for a load (they precede any model
    output, so they are safe even next to tools) and, when `footer_allowed` and the answer turns out to be plain
    text, the speed footer."""
    footer_allowed: bool
    """A footer may follow the answer: `annotate`, and the request did not ask for a JSON answer
    (`response_format`). Whether the answer really gets one is decided from the answer itself (finish_reason
    `stop`, no tool calls): a request's `tools` say nothing, Open-WebUI offers its built-in tools on every chat."""
    wants_usage: bool
    """The client itself asked for `stream_options.include_usage`. When False the proxy must drop the usage it
    forced on (`chunks.without_usage`)."""

    def upstream_body(self, engine_model: str) -> bytes:
        """The body to send the engine.

        `model` is the id the engine serves (`engine_model`: vLLM answers 404 to any other name, and the client may
        have used an alias). Chat: injected texts removed from assistant history (`history.clean_history`).
        Streams: usage forced on with `stream_options.include_usage: true`, other stream options kept. When nothing
        applies, the bytes as received (no re-serialisation).
        """
        body, changed = clean_history(self.body) if self.endpoint == "chat" else (self.body, False)
        if body.get("model") != engine_model:
            body = {**body, "model": engine_model}
            changed = True
        if self.stream and self.endpoint != "embedding":
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, Mapping) else {}
            options["include_usage"] = True
            body = {**body, "stream_options": options}
            changed = True
        if not changed:
            return self.raw
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def parse_request(raw: bytes, endpoint: Endpoint, headers: Mapping[str, str] | None = None) -> ClientRequest:
    """Parse and validate a request body; raise `OpenAIError` (400) for malformed JSON, a non-object body, a
    missing or non-string `model`, or a wrongly typed `stream` / `stream_options`."""
    body = _parse_json_object(raw)
    model = body.get("model")
    if model is None:
        _bad("You must provide a model parameter.", "model")
    if not isinstance(model, str) or not model.strip():
        _bad("The model parameter must be a non-empty string.", "model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        _bad(f"The stream parameter must be a boolean, got {_json_type(stream)}.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        _bad(f"The stream_options parameter must be an object, got {_json_type(options)}.", "stream_options")
    streaming = stream is True and endpoint != "embedding"
    annotate = annotations_allowed(endpoint, headers)
    return ClientRequest(
        raw=raw,
        body=body,
        endpoint=endpoint,
        model=model,
        stream=streaming,
        annotate=annotate,
        footer_allowed=annotate and not asks_for_json(body),
        wants_usage=streaming and isinstance(options, dict) and options.get("include_usage") is True,
    )


def annotations_allowed(endpoint: Endpoint, headers: Mapping[str, str] | None) -> bool:
    """Whether the router may inject text into the answer to this request at all.

    Not for embeddings, and not when the client said `X-LLM-Router-Annotate: off`. The request's `tools` do not
    count: what the answer is (a tool call, a JSON document) decides the footer, see `ClientRequest.footer_allowed`.
    """
    if endpoint == "embedding":
        return False
    if headers is not None:
        value = _header(headers, ANNOTATE_HEADER)
        if value is not None and value.strip().lower() in _OFF_VALUES:
            return False
    return True


def asks_for_json(body: Mapping[str, Any]) -> bool:
    """The answer must be a JSON document: any `response_format` but absent, null or `{"type": "text"}`.

    Text after a JSON document would break the client's parser, so such an answer never gets a footer.
    """
    response_format = body.get("response_format")
    if response_format is None:
        return False
    return not (isinstance(response_format, Mapping) and response_format.get("type") == "text")


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        _bad("The request body is empty; expected a JSON object.")
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as exc:  # also UnicodeDecodeError
        _bad(f"The request body is not valid JSON: {exc}")
    except RecursionError:
        _bad(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects).")
    if not isinstance(body, dict):
        _bad(f"The request body must be a JSON object, got {_json_type(body)}.")
    if json_depth(body) > MAX_JSON_DEPTH:
        _bad(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects).")
    return body


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar is 0), without recursion; stops counting
    once past `MAX_JSON_DEPTH`."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_JSON_DEPTH:
                return deepest
        pending.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; they are not JSON and engines would reject the re-serialised body.
    raise ValueError(f"{name} is not a valid JSON value")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf, which json.dumps writes back as the non-JSON `Infinity` when the body is re-serialised.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def _bad(message: str, param: str | None = None) -> NoReturn:
    raise invalid_request(message, param=param)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # Quart's headers match case-insensitively already; a plain dict (tests, other callers) does not.
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
