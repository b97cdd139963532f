"""`llm-router serve`: hypercorn in-process (one worker), graceful shutdown, SIGHUP reloads the config."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from http import HTTPStatus
from itertools import chain
from pathlib import Path

import h11
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from router_app import errors
from router_app.app import create_app
from router_app.config import ConfigError, RouterConfig, load_config
from router_app.service import RouterService

log = logging.getLogger("llm_router")

SHUTDOWN_MARGIN = 2.0
KEEP_ALIVE_TIMEOUT = 20.0
"""Seconds an idle client connection stays open (hypercorn's default is 5 s). Clients must close an idle connection
before the server does: with equal timeouts (httpx's pool expires idle connections at 5 s too) a request sent on a
reused connection just as the server closes it gets no answer at all ("Server disconnected without sending a
response"). 20 s is above the idle expiry of httpx (5 s), aiohttp (15 s, Open-WebUI) and Node (5 s). A connection
the client closes is closed at once (`_read_then_stop_idle_timer`)."""


SD_LISTEN_FDS_START = 3
"""The first descriptor systemd passes to a socket-activated service (sd_listen_fds(3))."""


def inherited_listener(environ: Mapping[str, str], pid: int) -> int | None:
    """The listening socket systemd passed (llm-router.socket), or None when the router must bind itself.

    With the socket held by systemd, a restart refuses no client: connections wait in the socket's backlog until the
    new router accepts them."""
    if environ.get("LISTEN_PID") != str(pid) or environ.get("LISTEN_FDS") != "1":
        return None
    return SD_LISTEN_FDS_START


def hypercorn_config(config: RouterConfig, listener_fd: int | None = None) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"fd://{listener_fd}" if listener_fd is not None else f"{config.listen_host}:{config.listen_port}"]
    # In-process, one worker: one switcher owns engine state, and SIGTERM reaches our own loop (notes/streaming.md).
    hc.workers = 0
    # Streams still running when shutdown_grace ends get an error event (service.end_streams); hypercorn waits a little
    # longer than the grace so that event reaches them.
    hc.graceful_timeout = config.shutdown_grace + SHUTDOWN_MARGIN
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Streams may run for many minutes: no read timeout (it would also cut responses that are still streaming).
    hc.read_timeout = None
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    return hc


class CloseUnreadRequests:
    """ASGI middleware: an answer that goes out before the request body was read to its end (413 above
    `max_body_bytes`, 401, 404, 400 on a body still arriving) says `Connection: close`.

    hypercorn closes such a connection as soon as the answer is sent (the request is unfinished, so the connection
    cannot be reused) but does not tell the client. A keep-alive client (httpx, aiohttp, requests) then sends its
    next request on that connection and gets no answer at all: "Server disconnected without sending a response".
    With the header it opens a new connection instead.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def tracked_receive() -> ASGIReceiveEvent:
            nonlocal complete
            message = await receive()
            if message["type"] != "http.request" or not message["more_body"]:
                complete = True
            return message

        async def marked_send(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and not complete:
                headers = [(name, value) for name, value in message["headers"] if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked_receive, marked_send)


def protocol_error_body(status_code: int) -> bytes:
    """The envelope for a request hypercorn refuses before the app sees it (a malformed request line or header,
    headers above `h11_max_incomplete_size`: 400, 431)."""
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        phrase = "Bad Request"
    message = f"The HTTP request could not be parsed: {phrase}."
    if status_code == 431:
        message = "The request's header fields are too large."
    return errors.OpenAIError(status_code, message, errors.type_for_status(status_code)).body()


async def _send_protocol_error(self: H11Protocol, status_code: int) -> None:
    # hypercorn's own version answers with an empty body; clients only understand OpenAI's envelope.
    body = protocol_error_body(status_code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await self._send_h11_event(
        h11.Response(status_code=status_code, headers=list(chain(headers, self.config.response_headers("h11"))))
    )
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


H11Protocol._send_error_response = _send_protocol_error  # type: ignore[method-assign]

_read_until_closed = TCPServer._read_data


async def _read_then_stop_idle_timer(self: TCPServer) -> None:
    # hypercorn 0.18 closes a connection only once every task of its task group ended, and the keep-alive timer is
    # one of them: a client's close of an idle connection left the socket in CLOSE-WAIT for keep_alive_timeout.
    # Nothing can arrive after the client's end of stream, so the timer has nothing left to guard.
    await _read_until_closed(self)
    await self.idle_task.stop()


TCPServer._read_data = _read_then_stop_idle_timer  # type: ignore[method-assign]

ARRIVING_REQUEST_GRACE = 1.0
"""Seconds a connection without a request yet stays open once shutdown began (see `_idle_timeout_at_shutdown`)."""


async def _idle_timeout_at_shutdown(self: TCPServer) -> None:
    # hypercorn 0.18 closes every connection without a request in progress the moment shutdown begins, also one it
    # accepted an instant earlier whose request is on its way: that client gets no answer at all ("Server
    # disconnected without sending a response"), the one race left when systemd holds the socket across a restart.
    # Give such a request a moment: once it arrives the connection is busy, hypercorn cancels this timer and serves it.
    try:
        await asyncio.wait_for(self.context.terminated.wait(), self.config.keep_alive_timeout)
    except asyncio.TimeoutError:
        pass
    else:
        await asyncio.sleep(ARRIVING_REQUEST_GRACE)
    await asyncio.shield(self._initiate_server_close())


TCPServer._idle_timeout = _idle_timeout_at_shutdown  # type: ignore[method-assign]


def serve(config_dir: Path) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        return 1
    asyncio.run(_serve(config_dir, config))
    return 0


async def _serve(config_dir: Path, config: RouterConfig) -> None:
    service = RouterService(config, config_dir)
    app = create_app(service)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def begin_shutdown() -> None:
        if not stop.is_set():
            stop.set()
            loop.call_later(config.shutdown_grace, service.end_streams)

    loop.add_signal_handler(signal.SIGTERM, begin_shutdown)
    loop.add_signal_handler(signal.SIGINT, begin_shutdown)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    listener_fd = inherited_listener(os.environ, os.getpid())
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for the systemctl processes we run
        os.environ.pop(name, None)
    log.info(
        "llm-router listening on %s:%d%s with %d model(s)",
        config.listen_host,
        config.listen_port,
        " (socket from systemd)" if listener_fd is not None else "",
        len(config.models),
    )
    hc = hypercorn_config(config, listener_fd)
    await hypercorn_serve(CloseUnreadRequests(app), hc, shutdown_trigger=stop.wait)
    log.info("llm-router stopped")
