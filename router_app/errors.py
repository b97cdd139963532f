"""OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}`: the router's own errors, and every
engine's error bodies turned into it.

Clients (the openai package, Open-WebUI) only understand this one shape, so nothing leaves the router in any
other: not SGLang's un-nested error, not TabbyAPI's FastAPI `{"detail": ...}`, not an empty 502.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"

MAX_TEXT_MESSAGE = 4000
"""Plain-text and HTML error bodies are cut to this many characters: enough for any real message, not a page."""


class OpenAIError(Exception):
    """An error to answer with: HTTP status, envelope fields and extra headers (e.g. `Retry-After`).

    Raise it anywhere before the response starts; the HTTP layer renders `status`, `headers` and `envelope()`.
    After a stream has started, send `envelope()` in-band instead (see `chunks.encode_stream_error`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return envelope(self.message, self.type, param=self.param, code=self.code)

    def body(self) -> bytes:
        """The envelope as compact UTF-8 JSON, ready to send."""
        return json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False).encode()

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, {self.type!r}, code={self.code!r})"


def envelope(
    message: str, type: str = SERVER, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` with all four keys always present."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400: the request itself is wrong (malformed JSON, missing `model`, wrong types)."""
    return OpenAIError(400, message, INVALID_REQUEST, param=param, code=code)


def authentication_failed(message: str = "Invalid or missing API key.") -> OpenAIError:
    """401, with the `WWW-Authenticate` header HTTP asks for."""
    return OpenAIError(401, message, AUTHENTICATION, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> OpenAIError:
    """404 `model_not_found`, worded like OpenAI's own."""
    return OpenAIError(404, f"The model '{model}' does not exist.", NOT_FOUND, param="model", code="model_not_found")


def rate_limited(message: str, retry_after: float) -> OpenAIError:
    """429 with `Retry-After` in whole seconds (at least 1): the wait queue is full."""
    seconds = max(1, int(retry_after + 0.999))
    return OpenAIError(429, message, RATE_LIMIT, code="queue_full", headers={"Retry-After": str(seconds)})


def server_error(message: str, *, status: int = 500, code: str | None = None) -> OpenAIError:
    """5xx `server_error`: 500 the router failed, 502 the engine failed or vanished, 503 the model cannot load."""
    if not 500 <= status <= 599:
        raise ValueError(f"server_error needs a 5xx status, got {status}")
    return OpenAIError(status, message, SERVER, code=code)


def bad_gateway(message: str, *, code: str | None = None) -> OpenAIError:
    """502: the engine answered badly or the connection to it broke."""
    return server_error(message, status=502, code=code)


def service_unavailable(message: str, *, code: str | None = None) -> OpenAIError:
    """503: the model could not be loaded (unit failed, load timeout); `message` carries the reason."""
    return server_error(message, status=503, code=code)


def type_for_status(status: int) -> str:
    """The OpenAI error type that matches an HTTP status, for engine errors that name none."""
    if status == 401:
        return AUTHENTICATION
    if status == 403:
        return PERMISSION
    if status == 404:
        return NOT_FOUND
    if status == 429:
        return RATE_LIMIT
    if 400 <= status < 500:
        return INVALID_REQUEST
    return SERVER


def normalise_engine_error(status: int, body: bytes) -> dict[str, Any]:
    """Turn any engine error body into the OpenAI envelope, keeping the engine's message, type and code.

    Shapes understood:
    - OpenAI / llama-server: `{"error": {"code", "message", "type"}}` (also `{"error": "text"}`);
    - llama-server's bare stream `error:` line value and SGLang: un-nested `{"message", "type", "param", "code"}`
      (SGLang adds `"object": "error"`);
    - TabbyAPI / FastAPI: `{"detail": "text"}` or a 422 `{"detail": [{"loc", "msg", "type"}, ...]}`;
    - anything else (plain text, HTML, empty, unknown JSON): a message naming the HTTP status and the body's text.
    The type falls back to the one for `status` when the engine gives none.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        found = _from_json(status, parsed)
        if found is not None:
            return found
    if parsed is not None:
        # Valid JSON of a shape nobody documents: keep it all, compactly.
        text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return envelope(_status_message(status, text), type_for_status(status))


def _from_json(status: int, parsed: dict[str, Any]) -> dict[str, Any] | None:
    inner = parsed.get("error")
    if isinstance(inner, dict) and _has_text(inner.get("message")):
        return _envelope_from_fields(status, inner)
    if isinstance(inner, str) and inner.strip():
        return envelope(inner, type_for_status(status))
    if _has_text(parsed.get("message")):
        return _envelope_from_fields(status, parsed)
    if "detail" in parsed:
        return envelope(_detail_message(status, parsed["detail"]), type_for_status(status))
    return None


def _envelope_from_fields(status: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    engine_type = fields.get("type")
    if not isinstance(engine_type, str) or not engine_type.strip():
        engine_type = type_for_status(status)
    param = fields.get("param")
    code = fields.get("code")
    return envelope(
        str(fields["message"]),
        engine_type,
        param=param if isinstance(param, str) else None,
        # llama-server's code is the HTTP status as an int, OpenAI's a string: keep whichever the engine sent.
        code=code if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
    )


def _detail_message(status: int, detail: Any) -> str:
    if isinstance(detail, str) and detail.strip():
        return detail
    if isinstance(detail, list) and detail:
        return "; ".join(_validation_item(item) for item in detail)
    return _status_message(status, json.dumps(detail, separators=(",", ":"), ensure_ascii=False))


def _validation_item(item: Any) -> str:
    """One FastAPI/pydantic validation problem as `messages.0.content: Field required`."""
    if not isinstance(item, dict):
        return str(item)
    message = str(item.get("msg") or item.get("type") or "invalid")
    loc = item.get("loc")
    if isinstance(loc, list) and loc:
        # FastAPI prefixes the part of the request ("body", "query"); the rest is the path inside the JSON.
        path = [str(part) for part in loc]
        if len(path) > 1 and path[0] in ("body", "query", "path", "header"):
            path = path[1:]
        return f"{'.'.join(path)}: {message}"
    return message


def _status_message(status: int, text: str) -> str:
    try:
        phrase = f" {HTTPStatus(status).phrase}"
    except ValueError:
        phrase = ""
    if not text:
        return f"The engine answered HTTP {status}{phrase} with an empty body."
    if len(text) > MAX_TEXT_MESSAGE:
        text = text[:MAX_TEXT_MESSAGE] + "…"
    return f"The engine answered HTTP {status}{phrase}: {text}"


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
