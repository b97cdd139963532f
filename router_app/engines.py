"""Engine adapters: how to tell that llama-server, SGLang, TabbyAPI or vLLM is ready, gone, or warm; vLLM's sleep
mode (`--enable-sleep-mode` with `VLLM_SERVER_DEV_MODE=1`: `POST /sleep?level=N`, `POST /wake_up`, `GET /is_sleeping`).

Each probe is one short HTTP exchange with short timeouts; the switcher decides how often to call it.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum
from typing import Protocol

import httpx

from router_app.config import BackendConfig

PROBE_TIMEOUT = httpx.Timeout(2.0)
# Moving weights between GPU and host RAM takes seconds for big models: generous, but bounded.
SLEEP_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=None)


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
    """Readiness rules from each engine's own code (see shared notes, backends.md)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def readiness(self, backend: BackendConfig) -> Readiness:
        # TabbyAPI keeps its port closed until the model is loaded; /health there only reports past errors,
        # so the current model card is the proof. llama-server and SGLang answer 503 on /health while loading.
        path = "/v1/model" if backend.kind == "tabbyapi" else "/health"
        try:
            response = await self.client.get(backend.url + path, timeout=PROBE_TIMEOUT)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return Readiness.DOWN
        except httpx.TimeoutException:
            return Readiness.LOADING
        return Readiness.READY if response.status_code == 200 else Readiness.LOADING

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
        response = await self.client.post(
            backend.url + "/v1/completions",
            json={"model": model_id, "prompt": "Hello", "max_tokens": 1, "stream": False},
            timeout=httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=None),
        )
        if response.status_code != 200:
            raise RuntimeError(f"warm-up request answered HTTP {response.status_code}: {response.text[:300]}")

    async def sleep(self, backend: BackendConfig, level: int) -> None:
        """Put a vLLM engine to sleep: level 1 offloads the weights to host RAM, level 2 discards them."""
        response = await self.client.post(f"{backend.url}/sleep", params={"level": level}, timeout=SLEEP_TIMEOUT)
        if response.status_code != 200:
            raise RuntimeError(f"POST /sleep?level={level} answered HTTP {response.status_code}: {response.text[:300]}")

    async def wake_up(self, backend: BackendConfig) -> None:
        response = await self.client.post(f"{backend.url}/wake_up", timeout=SLEEP_TIMEOUT)
        if response.status_code != 200:
            raise RuntimeError(f"POST /wake_up answered HTTP {response.status_code}: {response.text[:300]}")

    async def is_sleeping(self, backend: BackendConfig) -> bool:
        response = await self.client.get(f"{backend.url}/is_sleeping", timeout=PROBE_TIMEOUT)
        if response.status_code != 200:
            return False  # no sleep mode: never asleep
        body = response.json()
        return isinstance(body, dict) and body.get("is_sleeping") is True
