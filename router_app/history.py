"""History hygiene: take the router's own texts (status lines, speed footers) out of earlier assistant turns.

Clients send whole conversations back, our injected text included (Open-WebUI stores `delta.content` and, on its
llama.cpp provider, `reasoning_content`). The model must not see it: it would learn to imitate footers and waste
context. Assistant messages are cleaned (content, `<details type="reasoning">` blocks in it, reasoning fields);
of user messages only the pasted conversation of a task prompt (`<chat_history>` sections, where Open-WebUI's
title/tags/follow-up tasks quote earlier answers), and there only its assistant turns. System and tool messages
are never touched, so an emoji a user typed stays where it is. What is removed is defined in `annotations`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from router_app.annotations import (
    may_contain_annotations,
    may_contain_task_history,
    strip_annotations,
    strip_reasoning_details,
    strip_task_history,
)

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
    if not isinstance(message, Mapping):
        return None
    role = message.get("role")
    if role == "user":
        return _clean_task_prompt(message)
    if role != "assistant":
        return None
    changes: dict[str, Any] = {}
    content = message.get("content")
    if isinstance(content, str):
        text = _clean_text(content)
        if text is not None:
            changes["content"] = text
    elif isinstance(content, list):
        parts = _clean_parts(content, _clean_text)
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


def _clean_task_prompt(message: Mapping[str, Any]) -> dict[str, Any] | None:
    content = message.get("content")
    if isinstance(content, str):
        text = _clean_task_text(content)
        return None if text is None else {**message, "content": text}
    if isinstance(content, list):
        parts = _clean_parts(content, _clean_task_text)
        return None if parts is None else {**message, "content": parts}
    return None


def _clean_parts(parts: list[Any], clean: Callable[[str], str | None]) -> list[Any] | None:
    cleaned: list[Any] | None = None
    for index, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            continue
        text = clean(part["text"])
        if text is not None:
            if cleaned is None:
                cleaned = list(parts)
            cleaned[index] = {**part, "text": text}
    return cleaned


def _clean_text(text: str) -> str | None:
    stripped = strip_reasoning_details(text)
    if may_contain_annotations(stripped):
        stripped = strip_annotations(stripped)
    return None if stripped == text else stripped


def _clean_task_text(text: str) -> str | None:
    if not may_contain_task_history(text):
        return None
    stripped = strip_task_history(text)
    return None if stripped == text else stripped
