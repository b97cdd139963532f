"""The one owner of engine state: which unit runs, who is using it, who waits, and when to switch.

Decisions (`_schedule`) are synchronous and taken on current state only; the slow work (stop, start, readiness
polling, warm-up) runs in one detached task that reports back by finishing. Requests get either a Lease at once
(the model is loaded and nobody waits for another one) or a Ticket whose future resolves to a Lease.

Policy:
- requests for the loaded model run concurrently, unless requests for another model already wait: then they
  queue too, so a busy model cannot starve a switch;
- a switch waits until every answer still streaming from the active engine has finished (never cut one off);
- waiters are served grouped by model, groups ordered by their oldest waiter (no ping-pong);
- a request for the model being loaded joins that load; a failed load fails all of its waiters, and the next
  request for that model tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from router_app.config import BackendConfig, ModelConfig, RouterConfig
from router_app.engines import EngineProbe, Readiness
from router_app.units import ServiceManager, UnitError

log = logging.getLogger("llm_router.switcher")

FIRST_POLL_DELAY = 0.1
MAX_POLL_DELAY = 1.0
POLL_BACKOFF = 1.5
# Most engines are ready within seconds: poll at the first delay for this long (a /health call costs them nothing,
# and every 0.1 s saved here is 0.1 s of switch latency), then back off towards MAX_POLL_DELAY.
FAST_POLL_SECONDS = 5.0
LOAD_HISTORY = 5


class ModelStatus(str, Enum):
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"
    FAILED = "failed"


class Phase(str, Enum):
    QUEUED = "queued"  # behind another model's group
    DRAINING = "draining"  # waiting for answers on the active engine to finish
    STOPPING = "stopping"
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"


class SwitchFailed(Exception):
    def __init__(self, model_id: str, reason: str, log_lines: list[str] | None = None) -> None:
        self.model_id = model_id
        self.reason = reason
        self.log_lines = log_lines or []
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"loading model {self.model_id!r} failed: {self.reason}"
        if self.log_lines:
            text += "\nlast log lines:\n" + "\n".join(self.log_lines)
        return text


class QueueFull(Exception):
    pass


class Lease:
    """Permission to send one request to the loaded engine; release it when the answer is finished."""

    def __init__(self, switcher: Switcher, model: ModelConfig, backend: BackendConfig) -> None:
        self.model = model
        self.backend = backend
        self._switcher = switcher
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._switcher._release(self)


@dataclass(eq=False)
class Ticket:
    model: ModelConfig
    enqueued_at: float
    future: asyncio.Future[Lease]
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class WaitInfo:
    """What a waiting client is told."""

    phase: Phase
    target: str
    active: str | None
    in_flight: int
    load_started: float | None
    timeout: float
    estimate: float | None
    now: float


@dataclass
class _Load:
    model: ModelConfig
    task: asyncio.Task[None] | None = None
    phase: Phase = Phase.STOPPING
    started: float = 0.0


class Switcher:
    def __init__(
        self,
        config: RouterConfig,
        services: ServiceManager,
        probe: EngineProbe,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.services = services
        self.probe = probe
        self.clock = clock
        self.sleep = sleep
        self.status: dict[str, ModelStatus] = {m: ModelStatus.UNLOADED for m in config.models}
        self.last_error: dict[str, str] = {}
        self.load_seconds: dict[str, deque[float]] = {}
        # The unit that may be running, and its backend, kept apart from the model id so a model removed from
        # models.yml by a reload can still be stopped.
        self.active_model: str | None = None
        self.active_unit: str | None = None
        self.active_backend: BackendConfig | None = None
        self.in_flight = 0
        self.waiters: list[Ticket] = []
        self.load: _Load | None = None
        self.switches = 0

    # ----- requests -----------------------------------------------------------------------------------------

    def request(self, model_id: str) -> Lease | Ticket:
        """Admit a request for a configured model: a Lease now, or a Ticket to wait on. May raise QueueFull."""
        model = self.config.models[model_id]
        if self._is_ready(model_id) and not self.waiters:
            return self._grant(model)
        if len(self.waiters) >= self.config.queue_limit:
            raise QueueFull(f"{len(self.waiters)} requests are already waiting for a model switch")
        loop = asyncio.get_running_loop()
        ticket = Ticket(model, self.clock(), loop.create_future())
        self.waiters.append(ticket)
        self._schedule()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: leave the queue. A load already under way goes on for the next request."""
        if ticket in self.waiters:
            self.waiters.remove(ticket)
        if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
            ticket.future.result().release()
        else:
            ticket.future.cancel()
        self._schedule()

    def wait_info(self, ticket: Ticket) -> WaitInfo:
        target = ticket.model
        load = self.load
        if load is not None and load.model.id == target.id:
            phase, started = load.phase, load.started
        elif load is not None:
            phase, started = Phase.QUEUED, None
        elif self.in_flight and self.active_model != target.id:
            phase, started = Phase.DRAINING, None
        else:
            phase, started = Phase.QUEUED, None
        return WaitInfo(
            phase=phase,
            target=target.id,
            active=self.active_model,
            in_flight=self.in_flight,
            load_started=started,
            timeout=target.load_timeout,
            estimate=self.estimate(target.id),
            now=self.clock(),
        )

    def estimate(self, model_id: str) -> float | None:
        history = self.load_seconds.get(model_id)
        return statistics.median(history) if history else None

    def report_engine_failure(self, model_id: str) -> None:
        """The proxy lost the engine (refused connection, died mid-stream): check the unit, don't trust it."""
        if self.active_model == model_id and self.load is None:
            asyncio.get_running_loop().create_task(self._check_active_unit(model_id))

    async def engine_lost(self, model_id: str) -> bool:
        """A connection to the loaded engine was refused before any answer. True when the model is no longer
        ready (its unit stopped behind the router's back, or state moved on): a new request then loads it again."""
        if self._is_ready(model_id):
            await self._check_active_unit(model_id)
        return not self._is_ready(model_id)

    async def _check_active_unit(self, model_id: str) -> None:
        unit = self.active_unit
        if unit is None:
            return
        try:
            state = (await self.services.states([unit]))[unit]
        except UnitError as exc:
            log.warning("cannot read the state of %s: %s", unit, exc)
            return
        if state not in ("active", "activating") and self.active_model == model_id and self.load is None:
            log.warning("engine unit %s of model %s is %s: marking the model failed", unit, model_id, state)
            self.status[model_id] = ModelStatus.FAILED
            self.last_error[model_id] = f"engine unit {unit} is {state}"
            self.active_model = None
            self._schedule()

    # ----- state for /health and /v1/models ------------------------------------------------------------------

    def model_status(self, model_id: str) -> ModelStatus:
        return self.status.get(model_id, ModelStatus.UNLOADED)

    def snapshot(self) -> dict[str, object]:
        load = self.load
        return {
            "state": "switching" if load else ("serving" if self.active_model else "idle"),
            "active_model": self.active_model,
            "active_unit": self.active_unit,
            "loading_model": load.model.id if load else None,
            "loading_phase": load.phase.value if load else None,
            "in_flight": self.in_flight,
            "waiting": len(self.waiters),
            "switches": self.switches,
        }

    # ----- configuration --------------------------------------------------------------------------------------

    def update_config(self, config: RouterConfig) -> None:
        """Adopt a reloaded config: new models appear unloaded, removed ones fail their waiters."""
        self.config = config
        for model_id in list(self.status):
            if model_id not in config.models:
                del self.status[model_id]
        for model_id in config.models:
            self.status.setdefault(model_id, ModelStatus.UNLOADED)
        if self.active_model is not None and self.active_model not in config.models:
            self.active_model = None
        for ticket in list(self.waiters):
            if ticket.model.id not in config.models:
                self.waiters.remove(ticket)
                if not ticket.future.done():
                    ticket.future.set_exception(SwitchFailed(ticket.model.id, "the model was removed from models.yml"))
            else:
                ticket.model = config.models[ticket.model.id]
        self._schedule()

    # ----- start-up and shutdown -----------------------------------------------------------------------------

    async def adopt_running_unit(self) -> None:
        """At start-up, take over whichever configured unit systemd already runs."""
        units = self.config.units()
        states = await self.services.states(units)
        running = [unit for unit in units if states.get(unit) in ("active", "activating")]
        if not running:
            return
        by_unit = {m.unit: m for m in self.config.models.values()}
        keep = by_unit[running[0]]
        for extra in running[1:]:
            log.warning("more than one engine unit is running: stopping %s, keeping %s", extra, keep.unit)
            await self.services.stop(extra)
        log.info("adopting running unit %s as model %s", keep.unit, keep.id)
        self.active_unit = keep.unit
        self.active_backend = self.config.backends[keep.backend]
        self._begin_load(keep, adopt=True)

    async def close(self) -> None:
        load = self.load
        if load is not None and load.task is not None:
            load.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load.task
        for ticket in self.waiters:
            if not ticket.future.done():
                ticket.future.set_exception(SwitchFailed(ticket.model.id, "the router is shutting down"))
        self.waiters.clear()

    # ----- internals ------------------------------------------------------------------------------------------

    def _is_ready(self, model_id: str) -> bool:
        return self.active_model == model_id and self.load is None and self.status[model_id] is ModelStatus.LOADED

    def _grant(self, model: ModelConfig) -> Lease:
        self.in_flight += 1
        return Lease(self, model, self.config.backends[model.backend])

    def _release(self, lease: Lease) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._schedule()

    def _notify_waiters(self) -> None:
        for ticket in self.waiters:
            ticket.changed.set()

    def _schedule(self) -> None:
        self._notify_waiters()
        if self.load is not None or not self.waiters:
            return
        head = self.waiters[0].model.id
        if self._is_ready(head):
            for ticket in [t for t in self.waiters if t.model.id == head]:
                self.waiters.remove(ticket)
                if not ticket.future.done():
                    ticket.future.set_result(self._grant(ticket.model))
            self._notify_waiters()
            return
        if self.in_flight:
            return  # drain first: answers still streaming from the active engine are never cut off
        self._begin_load(self.waiters[0].model, adopt=False)

    def _begin_load(self, model: ModelConfig, adopt: bool) -> None:
        self.load = _Load(model=model, started=self.clock())
        self.status[model.id] = ModelStatus.LOADING
        self.load.task = asyncio.get_running_loop().create_task(self._run_load(model, adopt))
        self._notify_waiters()

    def _set_phase(self, phase: Phase) -> None:
        if self.load is not None:
            self.load.phase = phase
            if phase is Phase.STARTING:
                self.load.started = self.clock()
        self._notify_waiters()

    async def _run_load(self, model: ModelConfig, adopt: bool) -> None:
        backend = self.config.backends[model.backend]
        try:
            if not adopt:
                await self._stop_active()
                self._set_phase(Phase.STARTING)
                await self._wait_port_closed(model, backend, "before starting it")
                self.active_unit, self.active_backend = model.unit, backend
                try:
                    await self.services.start(model.unit)
                except UnitError as exc:
                    raise SwitchFailed(model.id, str(exc), await self.services.last_log_lines(model.unit)) from exc
            self._set_phase(Phase.LOADING)
            await self._wait_ready(model, backend)
            if backend.warmup:
                self._set_phase(Phase.WARMING)
                try:
                    await self.probe.warm_up(backend, model.id)
                except Exception as exc:
                    raise SwitchFailed(model.id, f"warm-up failed: {exc}") from exc
        except SwitchFailed as failure:
            log.error("%s", failure.describe())
            self.status[model.id] = ModelStatus.FAILED
            self.last_error[model.id] = failure.reason
            self._finish_load(failure)
        except asyncio.CancelledError:
            self.status[model.id] = ModelStatus.UNLOADED
            self.load = None
            raise
        except Exception as exc:  # an unexpected bug must not wedge the switcher forever
            log.exception("unexpected error while loading %s", model.id)
            self.status[model.id] = ModelStatus.FAILED
            self._finish_load(SwitchFailed(model.id, f"internal error: {exc!r}"))
        else:
            assert self.load is not None
            took = self.clock() - self.load.started
            self.load_seconds.setdefault(model.id, deque(maxlen=LOAD_HISTORY)).append(took)
            self.status[model.id] = ModelStatus.LOADED
            self.last_error.pop(model.id, None)
            self.active_model = model.id
            self.switches += 0 if adopt else 1
            log.info("model %s ready in %.2f s (unit %s)", model.id, took, model.unit)
            self._finish_load(None)

    def _finish_load(self, failure: SwitchFailed | None) -> None:
        assert self.load is not None
        model_id = self.load.model.id
        self.load = None
        if failure is not None:
            for ticket in [t for t in self.waiters if t.model.id == model_id]:
                self.waiters.remove(ticket)
                if not ticket.future.done():
                    ticket.future.set_exception(failure)
        self._schedule()

    async def _stop_active(self) -> None:
        unit, backend, model_id = self.active_unit, self.active_backend, self.active_model
        if unit is None:
            return
        self._set_phase(Phase.STOPPING)
        self.active_model = None
        if model_id is not None and model_id in self.status:
            self.status[model_id] = ModelStatus.UNLOADED
        log.info("stopping %s", unit)
        try:
            await self.services.stop(unit)
        except UnitError as exc:
            assert self.load is not None
            raise SwitchFailed(self.load.model.id, f"could not stop the running engine: {exc}") from exc
        self.active_unit = self.active_backend = None
        if backend is not None and self.load is not None:
            await self._wait_port_closed(self.load.model, backend, f"after stopping {unit}")

    async def _wait_port_closed(self, model: ModelConfig, backend: BackendConfig, when: str) -> None:
        # A stopped engine can hold its port a moment longer; TabbyAPI would silently bind port+1 if started now.
        deadline = self.clock() + backend.stop_timeout
        delay = FIRST_POLL_DELAY / 2
        while not await self.probe.port_closed(backend):
            if self.clock() >= deadline:
                raise SwitchFailed(
                    model.id,
                    f"port {backend.port} of {backend.kind} is still in use {when} "
                    f"({backend.stop_timeout:g} s): another process holds it",
                )
            await self.sleep(delay)
            delay = min(delay * POLL_BACKOFF, MAX_POLL_DELAY)

    async def _wait_ready(self, model: ModelConfig, backend: BackendConfig) -> None:
        assert self.load is not None
        deadline = self.load.started + model.load_timeout
        delay = FIRST_POLL_DELAY
        while True:
            if await self.probe.readiness(backend) is Readiness.READY:
                return
            state = (await self.services.states([model.unit]))[model.unit]
            if state in ("failed", "inactive"):
                lines = await self.services.last_log_lines(model.unit)
                raise SwitchFailed(model.id, f"engine unit {model.unit} exited while loading ({state})", lines)
            now = self.clock()
            if now >= deadline:
                with contextlib.suppress(UnitError):
                    await self.services.stop(model.unit)
                self.active_unit = self.active_backend = None
                raise SwitchFailed(
                    model.id, f"not ready after the load timeout of {model.load_timeout:g} s; unit {model.unit} stopped"
                )
            await self.sleep(min(delay, deadline - now))
            if now - self.load.started >= FAST_POLL_SECONDS:
                delay = min(delay * POLL_BACKOFF, MAX_POLL_DELAY)
