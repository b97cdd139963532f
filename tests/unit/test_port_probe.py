"""HttpEngineProbe.port_closed on real sockets: a port is free only when connecting is refused."""

from __future__ import annotations

import socket

from router_app.config import BackendConfig
from router_app.engines import HttpEngineProbe
from router_app.upstream import Upstream

PORT = 18318


def backend() -> BackendConfig:
    return BackendConfig("llamacpp", f"http://127.0.0.1:{PORT}", False, 1.0)


async def test_nothing_listening_is_closed() -> None:
    assert await HttpEngineProbe(Upstream()).port_closed(backend()) is True


async def test_a_listener_that_never_accepts_holds_the_port_even_when_its_queue_is_full() -> None:
    # A process that holds the port but no longer accepts: once its accept queue is full, connecting times out.
    # That timeout once counted as "closed" (TimeoutError is an OSError from Python 3.11 on), and the router started
    # an engine onto the taken port.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(1)
    try:
        probe = HttpEngineProbe(Upstream())
        for _ in range(5):  # fills the queue, then times out
            assert await probe.port_closed(backend()) is False
    finally:
        listener.close()
