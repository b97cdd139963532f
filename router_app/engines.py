"""Engine adapters: how to tell that llama-server, SGLang, TabbyAPI or vLLM is ready, gone, or warm; vLLM's sleep
mode (`--enable-sleep-mode` with `VLLM_SERVER_DEV_MODE=1`: `POST /sleep?level=N`, `POST /wake_up`, `GET /is_sleeping`).

Each probe is one short HTTP exchange with short timeouts; the switcher decides how often to call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from enum import Enum
from typing import Any, Protocol

import aiohttp

from router_app.config import BackendConfig
from router_app.upstream import Upstream

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
WARM_UP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=120.0)
# Moving weights between GPU and host RAM takes seconds for big models: generous, but bounded.
SLEEP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=300.0)


class Readiness(Enum):
    READY = "ready"
    LOADING = "loading"  # the engine answers and says it is still loading
    DOWN = "down"  # nothing listens yet


class EngineProbe(Protocol):
    async def readiness(self, backend: BackendConfig) -> Readiness: ...

    async def port_closed(self, backend: BackendConfig) -> bool: ...

    async def warm_up(self, backend: BackendConfig, model_id: str) -> None: ...

    async def sleep(self, backend: BackendConfig, level: int) -> None: ...

    async def wake_up(self, backend: BackendConfig) -> None: ...

    async def is_sleeping(self, backend: BackendConfig) -> bool: ...


class HttpEngineProbe:
    """Readiness rules from each engine's own code (see shared notes, backends.md). Shares the model traffic's
    connection pool (`Upstream`)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def _call(self, method: str, url: str, timeout: aiohttp.ClientTimeout, **kwargs: Any) -> tuple[int, bytes]:
        async with self.upstream.session().request(method, url, timeout=timeout, **kwargs) as response:
            return response.status, await response.read()

    async def readiness(self, backend: BackendConfig) -> Readiness:
        # TabbyAPI keeps its port closed until the model is loaded; /health there only reports past errors,
        # so the current model card is the proof. llama-server and SGLang answer 503 on /health while loading.
        path = "/v1/model" if backend.kind == "tabbyapi" else "/health"
        try:
            status, _ = await self._call("GET", backend.url + path, PROBE_TIMEOUT)
        except TimeoutError:  # before ClientError: aiohttp's timeouts are both
            return Readiness.LOADING
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return Readiness.DOWN
        return Readiness.READY if status == 200 else Readiness.LOADING

    async def port_closed(self, backend: BackendConfig) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(backend.host, backend.port), 1.0)
        except asyncio.TimeoutError:
            # Before OSError: from Python 3.11 on this is the builtin TimeoutError, an OSError. A listener whose accept
            # queue is full (a process that holds the port but no longer accepts) times out: the port is in use.
            return False
        except OSError:  # refused, unreachable: nothing listens
            return True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return False

    async def warm_up(self, backend: BackendConfig, model_id: str) -> None:
        """One real 1-token generation, so the first user request does not pay for lazy initialisation."""
        body = {"model": model_id, "prompt": "Hello", "max_tokens": 1, "stream": False}
        status, text = await self._call("POST", backend.url + "/v1/completions", WARM_UP_TIMEOUT, json=body)
        if status != 200:
            raise RuntimeError(f"warm-up request answered HTTP {status}: {_excerpt(text)}")

    async def sleep(self, backend: BackendConfig, level: int) -> None:
        """Put a vLLM engine to sleep: level 1 offloads the weights to host RAM, level 2 discards them."""
        status, text = await self._call("POST", f"{backend.url}/sleep", SLEEP_TIMEOUT, params={"level": level})
        if status != 200:
            raise RuntimeError(f"POST /sleep?level={level} answered HTTP {status}: {_excerpt(text)}")

    async def wake_up(self, backend: BackendConfig) -> None:
        status, text = await self._call("POST", f"{backend.url}/wake_up", SLEEP_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"POST /wake_up answered HTTP {status}: {_excerpt(text)}")

    async def is_sleeping(self, backend: BackendConfig) -> bool:
        status, text = await self._call("GET", f"{backend.url}/is_sleeping", PROBE_TIMEOUT)
        if status != 200:
            return False  # no sleep mode: never asleep
        try:
            body = json.loads(text)
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("is_sleeping") is True


def _excerpt(body: bytes) -> str:
    return body[:300].decode("utf-8", errors="replace")
