"""Async plumbing for streams: an upstream response owned by one generator, and reading with keep-alive ticks.

No web framework here: these are used by the proxy and tested against real HTTP servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class UpstreamHead:
    status: int
    headers: httpx.Headers


async def open_upstream(
    client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str] | None = None
) -> AsyncGenerator[UpstreamHead | bytes, None]:
    """One generator owns the upstream response from start to close (notes/streaming.md: anything else leaks it).

    The first item is the UpstreamHead; then raw body bytes. Start it with `anext()` in the view to learn the
    status before answering; close it (`aclose()`) and the upstream connection closes at once, so the engine stops
    generating for a client that went away.
    """
    for attempt in (1, 2):
        head_seen = False
        try:
            async with client.stream("POST", url, content=body, headers=headers) as response:
                head_seen = True
                yield UpstreamHead(response.status_code, response.headers)
                async for chunk in response.aiter_raw():
                    yield chunk
                return
        except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError):
            # Retry once, and only when the failure came before any response header: an idle keep-alive socket
            # the engine closed at the same moment. A failure after the head is the engine's, and is reported.
            if attempt == 2 or head_seen:
                raise


async def ticks(
    source: AsyncIterator[bytes], interval: float, stop: asyncio.Event | None = None
) -> AsyncGenerator[bytes | None, None]:
    """Yield the source's items, and None after every `interval` seconds of silence; end early once `stop` is set.

    One long-lived `__anext__` task is polled with `asyncio.wait`: a timeout never cancels the read in flight
    (cancelling an httpcore read would kill the upstream connection). Closing this generator cancels that read.
    """
    iterator = source.__aiter__()
    pending: asyncio.Future[bytes] | None = None
    stopped: asyncio.Future[Any] | None = None if stop is None else asyncio.ensure_future(stop.wait())
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            watched: set[asyncio.Future[Any]] = {pending} if stopped is None else {pending, stopped}
            done, _ = await asyncio.wait(watched, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            if stopped is not None and stopped in done:
                return
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if stopped is not None:
            stopped.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
