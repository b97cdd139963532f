"""History hygiene: take the router's own texts (status lines, speed footers) out of earlier assistant turns.

Clients send whole conversations back, our injected text included (Open-WebUI stores `delta.content` and, on its
llama.cpp provider, `reasoning_content`). The model must not see it: it would learn to imitate footers and waste
context. Only assistant messages are cleaned; user, system and tool messages are never touched, so an emoji a user
typed stays where it is. What is removed is defined in `annotations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_app.annotations import may_contain_annotations, strip_annotations

REASONING_FIELDS = ("reasoning_content", "reasoning")
"""Assistant-message fields that may carry reasoning, and so our status lines (streamed in the reasoning channel)."""


def clean_history(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return `(body, changed)`: the request body with injected texts removed from assistant messages.

    The input is never modified. When nothing changed the very same object comes back (no copy); otherwise a
    new body that shares every untouched message with the input.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body, False
    cleaned: list[Any] | None = None
    for index, message in enumerate(messages):
        new_message = _clean_message(message)
        if new_message is not None:
            if cleaned is None:
                cleaned = list(messages)
            cleaned[index] = new_message
    if cleaned is None:
        return body, False
    return {**body, "messages": cleaned}, True


def _clean_message(message: Any) -> dict[str, Any] | None:
    """The cleaned message, or None when it needs no change."""
    if not isinstance(message, Mapping) or message.get("role") != "assistant":
        return None
    changes: dict[str, Any] = {}
    content = message.get("content")
    if isinstance(content, str):
        text = _clean_text(content)
        if text is not None:
            changes["content"] = text
    elif isinstance(content, list):
        parts = _clean_parts(content)
        if parts is not None:
            changes["content"] = parts
    for field in REASONING_FIELDS:
        value = message.get(field)
        if isinstance(value, str):
            text = _clean_text(value)
            if text is not None:
                changes[field] = text
    if not changes:
        return None
    return {**message, **changes}


def _clean_parts(parts: list[Any]) -> list[Any] | None:
    cleaned: list[Any] | None = None
    for index, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            continue
        text = _clean_text(part["text"])
        if text is not None:
            if cleaned is None:
                cleaned = list(parts)
            cleaned[index] = {**part, "text": text}
    return cleaned


def _clean_text(text: str) -> str | None:
    if not may_contain_annotations(text):
        return None
    stripped = strip_annotations(text)
    return None if stripped == text else stripped
