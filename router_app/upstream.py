"""Every call the router makes to an engine for a client: open the request (one retry rule), sort its failures
into "the engine is gone" and "the engine failed", and relay a streamed answer (the hot loop).

aiohttp: its C parser and buffered StreamReader hand over everything that arrived in one read, which is what lets
the relay write many engine events at once under load, at a quarter of httpx's CPU per event (docs/benchmarks.md,
issue 10). The engine probes (engines.py) share the pool. No web framework here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from router_app.relay import StreamRelay
from router_app.sse import DONE_EVENT, KEEPALIVE_EVENT, SSEDecoder

# Keep-alive shorter than llama-server's own ~5 s, so a socket the engine is closing is never reused
# (notes/streaming.md); no read timeout (prefill and long answers: the relay has its own stall_timeout).
KEEPALIVE_SECONDS = 3.0
CONNECT_TIMEOUT = 5.0


class EngineLost(Exception):
    """Nothing accepted the connection: the engine may have been stopped behind the router's back."""


class EngineFailed(Exception):
    """The engine could not be reached or broke the exchange before answering."""


class ShuttingDown(Exception):
    """The router's shutdown grace ran out while this answer was still streaming."""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EngineReply:
    """An engine's answer whose head has arrived. Close it when done: an answer not read to its end closes the
    connection, so the engine stops generating for a client that went away."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content
        self.status = response.status

    async def body(self) -> bytes:
        """The whole body (a non-streamed answer, an error)."""
        try:
            return await self._response.read()
        except aiohttp.ClientError as exc:
            raise EngineFailed(describe(exc)) from exc

    async def read(self, timeout: float) -> bytes | None:
        """Everything received so far (waiting for more only when nothing is buffered); b"" at the end of the
        body; None after `timeout` seconds without a byte. Raises aiohttp.ClientError when the connection broke,
        and whatever `abort` was given."""
        content = self._content
        data = content.read_nowait()
        if data or content.at_eof():
            return data
        try:
            async with asyncio.timeout(timeout):
                return await content.readany()
        except TimeoutError:
            # Cancelling the wait is safe: aiohttp's protocol keeps buffering what arrives.
            return None

    def abort(self, reason: BaseException) -> None:
        """Wake the reader with `reason` (raised from `read`)."""
        self._content.set_exception(reason)

    def close(self) -> None:
        response = self._response
        with contextlib.suppress(Exception):
            response.content.read_nowait()  # the end of the body often arrives with [DONE]: keep the connection
        if response.content.at_eof():
            response.release()
        else:
            response.close()


class Upstream:
    """The connection pool to the engines (created on first use: aiohttp wants a running loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=None),
                # Engines must not compress: the relay forwards their bytes as they are.
                skip_auto_headers=("Accept-Encoding",),
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def open(self, url: str, body: bytes, headers: Mapping[str, str]) -> EngineReply:
        """POST `body` and return once the engine's answer head arrived.

        Sent a second time only when the first try failed before any response byte: a kept-alive connection the
        engine closed just as the request went out (nothing was answered, so nothing is repeated).
        """
        session = self.session()
        for attempt in (1, 2):
            try:
                response = await session.post(url, data=body, headers=headers)
            except aiohttp.ClientConnectorError as exc:
                if attempt == 2:
                    raise EngineLost(describe(exc)) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 2:
                    raise EngineFailed(describe(exc)) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise EngineFailed(describe(exc)) from exc
            else:
                return EngineReply(response)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class RelayEnd:
    """How a relayed stream ended, for the caller's log and metrics."""

    failure: str | None = None
    """Why the answer is incomplete (the engine's fault, a stall, the shutdown); None when it was not cut."""
    shutting_down: bool = False


async def relay_stream(
    reply: EngineReply,
    relay: StreamRelay,
    end: RelayEnd,
    *,
    tick: float,
    stall_timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[bytes, None]:
    """Forward the engine's SSE stream through `relay`: one write per read, holding every event that had arrived.

    A keep-alive comment goes out after `tick` seconds of silence; `stall_timeout` seconds without a byte end the
    answer. On an incomplete end `end.failure` says why and the caller sends the in-band error.
    """
    decoder = SSEDecoder()
    heard_at = clock()
    try:
        while True:
            data = await reply.read(tick)
            if data is None:
                if clock() - heard_at > stall_timeout:
                    end.failure = (
                        f"the engine sent nothing for {stall_timeout:g} s (stall_timeout) in the middle of the answer"
                    )
                    return
                yield KEEPALIVE_EVENT
                continue
            if not data:
                break
            now = heard_at = clock()
            events = decoder.feed(data)
            if len(events) == 1:
                out = relay.handle(events[0], now)
            else:
                out = b"".join([relay.handle(event, now) for event in events])
            if out:
                yield out
            if relay.finished:
                return
    except ShuttingDown:
        end.shutting_down = True
        end.failure = "the router is shutting down and its shutdown_grace ran out before the answer was complete"
        return
    except aiohttp.ClientError as exc:
        end.failure = f"the engine connection failed mid-answer: {describe(exc)}"
        return
    leftover = decoder.flush()
    if leftover is not None and leftover.complete:
        out = relay.handle(leftover, clock())
        if out:
            yield out
        if relay.finished:
            return
    tail = relay.flush_held()
    if tail:
        yield tail
    if relay.saw_finish or relay.saw_error:
        # The answer (or the engine's error) was complete but the engine omitted [DONE]: end properly.
        yield DONE_EVENT
        return
    end.failure = "the engine closed the stream before the answer was complete"
