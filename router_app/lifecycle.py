"""The lifecycle API in llama.cpp router mode's shapes (`/models`, `/models/load`, `/models/unload`, `/models/sse`),
so Open-WebUI's `llama.cpp` connection type shows a loaded dot, an Eject button and load-from-menu unchanged.

Framework-free: the HTTP layer parses the body and hands over; `status_stream` is the SSE body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from router_app import errors
from router_app.requests import MAX_JSON_DEPTH, json_depth
from router_app.sse import KEEPALIVE_EVENT
from router_app.switcher import ModelEvent, ModelStatus, Switcher

PROGRESS_INTERVAL = 1.0
"""Seconds between repeated `loading` events of a model that loads (the contract asks for at least every 2 s)."""


def requested_model(raw: bytes | str, switcher: Switcher) -> str:
    """The configured model a `{"model": ID}` body names (an id or an alias); OpenAIError 400/404 otherwise."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:  # also UnicodeDecodeError
        raise errors.invalid_request(f"The request body is not valid JSON: {exc}") from exc
    except RecursionError:
        body = None
        too_deep = True
    else:
        too_deep = json_depth(body) > MAX_JSON_DEPTH
    if too_deep:
        raise errors.invalid_request(
            f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects)."
        )
    model = body.get("model") if isinstance(body, Mapping) else None
    if not isinstance(model, str) or not model:
        raise errors.invalid_request('The body must be a JSON object with "model": the model id.', param="model")
    target = switcher.resolve(model)
    if target is None:
        raise errors.model_not_found(model)
    return target


def status_event(model: str, status: ModelStatus, progress: float | None = None) -> bytes:
    data: dict[str, Any] = {"status": status.value}
    if progress is not None:
        data["progress"] = {"value": round(progress, 3)}
    payload = {"model": model, "event": "model_status", "data": data}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def status_stream(switcher: Switcher, keepalive_interval: float) -> AsyncGenerator[bytes, None]:
    """One event per status change of any model; `loading` repeated with its progress while a model loads;
    keep-alive comments during silence. Subscribes on the first iteration, unsubscribes when the client leaves."""
    events: asyncio.Queue[ModelEvent] = asyncio.Queue()
    unsubscribe = switcher.subscribe(events.put_nowait)
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    try:
        yield KEEPALIVE_EVENT  # headers out at once, so clients see the stream is open
        while True:
            loading = [m for m in switcher.config.models if switcher.model_status(m) is ModelStatus.LOADING]
            timeout = PROGRESS_INTERVAL if loading else keepalive_interval
            try:
                event = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                out = b"".join(status_event(m, ModelStatus.LOADING, switcher.load_progress(m)) for m in loading)
                now = loop.time()
                if out:
                    yield out
                    last_sent = now
                elif now - last_sent >= keepalive_interval:
                    yield KEEPALIVE_EVENT
                    last_sent = now
                continue
            progress = switcher.load_progress(event.model) if event.status is ModelStatus.LOADING else None
            yield status_event(event.model, event.status, progress)
            last_sent = loop.time()
    finally:
        unsubscribe()
