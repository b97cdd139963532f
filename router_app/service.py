"""The router's long-lived parts, without any web framework: config, switcher, upstream HTTP client, reload."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any

from router_app.config import ConfigError, RouterConfig, load_config
from router_app.engines import HttpEngineProbe
from router_app.metrics import RouterMetrics
from router_app.switcher import ModelStatus, Switcher
from router_app.units import Systemctl
from router_app.upstream import EngineReply, ShuttingDown, Upstream

log = logging.getLogger("llm_router")


class RouterService:
    def __init__(self, config: RouterConfig, config_dir: Path | None = None) -> None:
        self.config = config
        self.config_dir = config_dir
        self.upstream = Upstream()
        self.streams: set[EngineReply] = set()
        """Engine answers being relayed now: the end of the shutdown grace interrupts them."""
        self.services = Systemctl(config.systemctl, config.journalctl)
        self.switcher = Switcher(config, self.services, HttpEngineProbe(self.upstream))
        self.metrics = RouterMetrics(self.switcher)
        self.ending = asyncio.Event()
        """Set when the shutdown grace runs out (`end_streams`)."""
        self.started = int(time.time())

    def models_listing(self) -> dict[str, Any]:
        """OpenAI's model list plus `name` and llama.cpp-router style `status` (`/v1/models` and `/models`), from
        memory, never from an engine. Aliases and the current-model alias are entries of their own."""
        data: list[dict[str, Any]] = []
        for model in self.config.models.values():
            data.append(self._entry(model.id, model.id, model.name))
            for alias in model.aliases:
                data.append(self._entry(alias, model.id, model.name))
        current_alias = self.config.current_alias
        current = self.switcher.current_model()
        if current_alias is not None and current is not None:
            data.append(self._entry(current_alias, current, f"Current model ({self.config.models[current].name})"))
        return {"object": "list", "data": data}

    def _entry(self, listed_id: str, model_id: str, name: str) -> dict[str, Any]:
        model = self.config.models[model_id]
        state = self.switcher.model_status(model_id)
        status: dict[str, Any] = {"value": state.value}
        if state is ModelStatus.FAILED:
            status["failed"] = True
        entry: dict[str, Any] = {
            "id": listed_id,
            "object": "model",
            "created": self.started,
            "owned_by": model.backend,
            "name": name,
            "status": status,
        }
        if listed_id != model_id:
            entry["alias_of"] = model_id
        return entry

    async def startup(self) -> None:
        try:
            await self.switcher.adopt_running_unit()
        except Exception as exc:  # the router must come up even when systemd cannot be asked
            log.error("could not ask systemd which engine runs: %s", exc)

    def end_streams(self) -> None:
        """The shutdown grace ran out: streams still running end with an error event, not a cut."""
        self.ending.set()
        for reply in list(self.streams):
            reply.abort(ShuttingDown())

    async def shutdown(self) -> None:
        await self.switcher.close()
        await self.upstream.close()

    def reload(self) -> None:
        """SIGHUP: re-read both files; a config that fails validation is refused and the old one kept."""
        if self.config_dir is None:
            return
        try:
            new = load_config(self.config_dir)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return
        if (new.listen_host, new.listen_port) != (self.config.listen_host, self.config.listen_port):
            log.warning("listen address changes take effect on restart, not on reload")
        self.config = new
        self.services.systemctl = new.systemctl
        self.services.journalctl = new.journalctl
        self.switcher.update_config(new)
        log.info("configuration reloaded: %d model(s)", len(new.models))

    def authorised(self, authorization: str | None) -> bool:
        keys = self.config.api_keys
        if not keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.strip().encode()
        # Compare against every key, constant time each, so timing does not reveal which key nearly matched.
        matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
        return any(matches)
