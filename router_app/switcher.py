"""The one owner of engine state: which units run, who is using them, who waits, and what to load or stop next.

Running engines are slots (model, unit, engine URL, state, answers in flight, last use). Decisions (`_schedule`) are
synchronous and taken on current state only; the slow work (stop, start, readiness polling, warm-up, idle timers)
runs in detached tasks that report back by finishing. Requests get either a Lease at once (the model is loaded and
not about to be evicted) or a Ticket whose future resolves to a Lease.

Policy:
- models run side by side while, for every resource in config.yml, the `needs` of the running ones fit its capacity
  (by default every model needs everything: one engine at a time);
- a model that does not fit evicts the fewest running models needed, least recently used first, each only after its
  answers in flight have finished (never cut one off); while it drains, new requests for it wait, so a busy model
  cannot starve a switch; models it does not conflict with keep serving;
- waiters are served grouped by model, groups ordered by their oldest waiter (no ping-pong); once a group has to
  wait for room, later groups may not load either (they would take its room);
- a request for a model being loaded joins that load; a failed load fails all of its waiters, and the next request
  for that model tries again;
- an idle model (`idle_unload` seconds since its last answer, nothing in flight or waiting) is stopped by a timer
  that re-checks state when it fires: a request that came first wins.
Every status change is told to subscribers (`/models/sse`, metrics) as a ModelEvent: nothing polls this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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

FIRST_POLL_DELAY = 0.05
MAX_POLL_DELAY = 1.0
POLL_BACKOFF = 1.5
# Most engines are ready within seconds: poll at the first delay for this long (a /health call costs them nothing,
# and every 0.05 s saved here is 0.05 s of switch latency), then back off towards MAX_POLL_DELAY.
FAST_POLL_SECONDS = 5.0
LOAD_HISTORY = 5


class ModelStatus(str, Enum):
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"
    FAILED = "failed"
    SLEEPING = "sleeping"  # vLLM sleep mode: unit running, GPU freed; Open-WebUI's llama.cpp provider shows it loaded


class Phase(str, Enum):
    QUEUED = "queued"  # behind another model's group
    DRAINING = "draining"  # waiting for answers on a model to be evicted to finish
    STOPPING = "stopping"
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"
    WAKING = "waking"


class UnloadReason(str, Enum):
    SWITCH = "switch"  # evicted to make room
    IDLE = "idle"
    REQUEST = "request"  # POST /models/unload, or the unit died and was reset


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


class _Unloaded(Exception):
    """A load or wake noticed that POST /models/unload asked for the model meanwhile."""


@dataclass(frozen=True)
class ModelEvent:
    """A status change of one model, as `/models/sse` and the metrics see it."""

    model: str
    status: ModelStatus
    load_seconds: float | None = None
    """Set on `loaded` after a real load: how long it took."""
    unload_reason: UnloadReason | None = None
    """Set on `unloaded` when a running unit was stopped."""
    load_failed: bool = False
    sleep_seconds: float | None = None
    """Set on `sleeping`: how long the engine took to fall asleep."""
    wake_seconds: float | None = None
    """Set on `loaded` after a wake (instead of `load_seconds`)."""
    wake_failed: bool = False
    """Set on the `loading` event of a load that replaces a failed wake."""


class Lease:
    """Permission to send one request to a loaded engine; release it when the answer is finished."""

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
    internal: bool = False
    """A load the router asked for itself (preload, POST /models/load): served by loading, then released."""
    number: int = 0
    """Names it in the log (`request #12 for m waits`, `serving ... for m: #12 #13`): counts from 1 per router."""


@dataclass(frozen=True)
class WaitInfo:
    """What a waiting client is told."""

    phase: Phase
    target: str
    active: str | None
    """The model the wait is about: draining, stopping (the target itself when its own engine stops) or loading
    ahead of the target (QUEUED); None when queued and nothing moves yet."""
    in_flight: int
    load_started: float | None
    timeout: float
    estimate: float | None
    now: float


class SlotState(str, Enum):
    LOADING = "loading"  # starting, loading, warming up, or waking
    LOADED = "loaded"
    FALLING_ASLEEP = "falling_asleep"  # holds its full needs until the engine says it sleeps
    SLEEPING = "sleeping"  # holds only its needs_asleep
    STOPPING = "stopping"


SLEEP_IDLE_FACTOR = 4
"""A sleep-capable model idle for `idle_unload` seconds falls asleep; asleep this many times longer, it is stopped."""


@dataclass(eq=False)
class _Slot:
    """A unit that may be running, and everything the scheduler knows about it. It holds its resources (`needs`)
    from the moment its load begins until its stop has finished."""

    model: ModelConfig
    engine: BackendConfig
    needs: dict[str, float]
    state: SlotState
    last_used: float
    needs_asleep: dict[str, float] = field(default_factory=dict)
    phase: Phase = Phase.STARTING
    started: float = 0.0
    in_flight: int = 0
    evicting: bool = False
    """Chosen to make room: no new leases; stopped (or put to sleep) once its answers in flight have finished."""
    evict_to_sleep: bool = False
    unload_requested: bool = False
    stopped_from: SlotState = SlotState.LOADED
    since: int | None = None
    """While it loads (or wakes): the number of the oldest request it was begun for (`Ticket.number`). Its group
    keeps that place in the queue until the load completes, even if that request leaves: the requests that joined
    the load are then served by it, instead of the model being evicted unused for a group that came later than the
    load began."""
    task: asyncio.Task[None] | None = None
    idle_task: asyncio.Task[None] | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def unit(self) -> str:
        return self.model.unit

    @property
    def held(self) -> dict[str, float]:
        """What it holds now: its needs, or only its needs_asleep while asleep."""
        return self.needs_asleep if self.state is SlotState.SLEEPING else self.needs

    @property
    def can_sleep(self) -> bool:
        return self.model.sleep is not None


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
        self.wake_seconds: dict[str, deque[float]] = {}
        self.last_used: dict[str, float] = {}
        self.slots: dict[str, _Slot] = {}
        self.waiters: list[Ticket] = []
        self.switches = 0
        self._listeners: list[Callable[[ModelEvent], None]] = []
        self._ticket_numbers = itertools.count(1)

    # ----- requests -----------------------------------------------------------------------------------------

    def resolve(self, requested: str) -> str | None:
        """The configured model a client's id means: the id itself, an alias, or the current-model alias."""
        config = self.config
        if requested in config.models:
            return requested
        alias = config.alias_targets().get(requested)
        if alias is not None:
            return alias
        if config.current_alias is not None and requested == config.current_alias:
            return self.current_model()
        return None

    def current_model(self) -> str | None:
        """The model in use now: the most recently used loaded one; else the most recently used one; else the first
        preload model; else the first model. It never names an unloaded model while one is loaded."""
        models = self.config.models
        serving = [s for s in self.slots.values() if self._grantable(s.model.id) and s.model.id in models]
        if serving:
            return max(serving, key=lambda s: s.last_used).model.id
        # A switch is under way (the loaded model is about to make room): ride along with the model being loaded
        # or waited for, rather than queue for the one leaving, which would switch back right after.
        coming = {s.model.id for s in self.slots.values() if s.state is SlotState.LOADING}
        coming.update(t.model.id for t in self.waiters if not t.internal)
        coming &= set(models)
        if coming:
            return max(coming, key=lambda m: self.last_used.get(m, 0.0))
        busy = [s for s in self.slots.values() if s.model.id in models]
        if busy:
            return max(busy, key=lambda s: s.last_used).model.id
        used = [m for m in self.last_used if m in models]
        if used:
            return max(used, key=lambda m: self.last_used[m])
        preload = [m.id for m in models.values() if m.preload]
        if preload:
            return preload[0]
        return next(iter(models), None)

    def request(self, model_id: str) -> Lease | Ticket:
        """Admit a request for a configured model: a Lease now, or a Ticket to wait on. May raise QueueFull."""
        model = self.config.models[model_id]
        self.last_used[model_id] = self.clock()
        if self._grantable(model_id) and not any(t.model.id == model_id for t in self.waiters):
            return self._grant(model)
        if len(self.waiters) >= self.config.queue_limit:
            raise QueueFull(f"{len(self.waiters)} requests are already waiting for a model switch")
        return self._enqueue(model, internal=False)

    def load(self, model_id: str) -> None:
        """Load a model as a request would (resources, drain, grouping), without a request: preload, /models/load."""
        slot = self.slots.get(model_id)
        if slot is not None and slot.state in (SlotState.LOADING, SlotState.LOADED):
            return
        if any(t.model.id == model_id for t in self.waiters):
            return
        self._enqueue(self.config.models[model_id], internal=True)

    async def unload(self, model_id: str) -> None:
        """Stop a model's unit once its answers in flight have finished; a load under way is cancelled and its
        waiters fail. Returns when the unit is stopped (at once when it was not running)."""
        self._fail_waiters(model_id, SwitchFailed(model_id, "the model was unloaded (POST /models/unload)"))
        slot = self.slots.get(model_id)
        if slot is None:
            await self._stop_untracked(self.config.models[model_id])
            return
        if slot.state is SlotState.LOADING and slot.task is not None:
            # Never cancel the load task: it may be inside `systemctl start`. It checks this flag at every step
            # (start, each readiness poll, wake) and stops the unit itself.
            slot.unload_requested = True
        elif slot.state in (SlotState.LOADED, SlotState.FALLING_ASLEEP, SlotState.SLEEPING):
            slot.unload_requested = True
            self._schedule()
        await slot.stopped.wait()

    async def _stop_untracked(self, model: ModelConfig) -> None:
        """A unit that runs without the router knowing (started by hand after the router came up): an unload must
        stop it too, or an engine whose settings changed keeps running with the old ones (the role reloads changed
        engines through POST /models/unload). Raises UnitError when systemd refuses."""
        if await self._unit_state(model.unit) not in ("active", "activating", "reloading"):
            return
        if model.id in self.slots:  # a request started it meanwhile: the router owns it now
            await self.unload(model.id)
            return
        log.info("unloading %s: unit %s runs without the router having started it; stopping it", model.id, model.unit)
        await self.services.stop(model.unit)

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: leave the queue. A load already under way goes on for the next request."""
        if ticket in self.waiters:
            self.waiters.remove(ticket)
            log.info("request #%d for %s left the queue (its client went away)", ticket.number, ticket.model.id)
        if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
            ticket.future.result().release()
        else:
            ticket.future.cancel()
        self._schedule()

    def wait_info(self, ticket: Ticket) -> WaitInfo:
        target = ticket.model
        slot = self.slots.get(target.id)
        active = self.current_model()
        in_flight = self.in_flight
        started: float | None = None
        if slot is not None and slot.state is SlotState.LOADING:
            phase, started = slot.phase, slot.started
        elif slot is not None and slot.state is SlotState.STOPPING:
            phase, active = Phase.STOPPING, target.id
        else:
            evicting = [s for s in self.slots.values() if s.evicting or s.state is SlotState.STOPPING]
            loading = [s for s in self.slots.values() if s.state is SlotState.LOADING]
            if evicting and any(s.in_flight for s in evicting):
                phase = Phase.DRAINING
                active = max(evicting, key=lambda s: s.in_flight).model.id
                in_flight = sum(s.in_flight for s in evicting)
            elif evicting:
                phase = Phase.STOPPING
                active = evicting[0].model.id
            elif loading:
                phase, active = Phase.QUEUED, loading[0].model.id
            else:
                phase, active = Phase.QUEUED, None
        return WaitInfo(
            phase=phase,
            target=target.id,
            active=active,
            in_flight=in_flight,
            load_started=started,
            timeout=target.load_timeout,
            estimate=self.estimate(target.id),
            now=self.clock(),
        )

    def estimate(self, model_id: str) -> float | None:
        """Expected seconds for this model to become ready: its wake history while it wakes (or sleeps), else its
        load history."""
        slot = self.slots.get(model_id)
        waking = slot is not None and (slot.phase is Phase.WAKING or slot.state is SlotState.SLEEPING)
        history = self.wake_seconds.get(model_id) if waking else self.load_seconds.get(model_id)
        return statistics.median(history) if history else None

    def load_progress(self, model_id: str) -> float | None:
        """0..1 while a model loads, from its previous load times; None without history or when not loading."""
        slot = self.slots.get(model_id)
        estimate = self.estimate(model_id)
        if slot is None or slot.state is not SlotState.LOADING or not estimate:
            return None
        return max(0.0, min(0.99, (self.clock() - slot.started) / estimate))

    def report_engine_failure(self, model_id: str) -> None:
        """The proxy lost the engine (refused connection, died mid-stream): check the unit, don't trust it."""
        slot = self.slots.get(model_id)
        if slot is not None and slot.state is SlotState.LOADED:
            asyncio.get_running_loop().create_task(self._check_unit(model_id))

    async def engine_lost(self, model_id: str) -> bool:
        """A connection to the loaded engine was refused before any answer. True when the model is no longer
        ready (its unit stopped behind the router's back, or state moved on): a new request then loads it again."""
        if self._ready(model_id):
            await self._check_unit(model_id)
        return not self._ready(model_id)

    async def _check_unit(self, model_id: str) -> None:
        slot = self.slots.get(model_id)
        if slot is None:
            return
        try:
            state = (await self.services.states([slot.unit]))[slot.unit]
        except (UnitError, OSError) as exc:
            log.warning("cannot read the state of %s: %s", slot.unit, exc)
            return
        if (
            state not in ("active", "activating")
            and self.slots.get(model_id) is slot
            and slot.state is SlotState.LOADED
        ):
            log.warning("engine unit %s of model %s is %s: marking the model failed", slot.unit, model_id, state)
            self.last_error[model_id] = f"engine unit {slot.unit} is {state}"
            # Reset the unit (a failed unit must be stopped before it can start again); the slot holds its
            # resources until then.
            self._begin_stop(slot, UnloadReason.REQUEST, final_status=ModelStatus.FAILED)

    # ----- state for /health and /v1/models ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(slot.in_flight for slot in self.slots.values())

    def model_status(self, model_id: str) -> ModelStatus:
        return self.status.get(model_id, ModelStatus.UNLOADED)

    def requests_in_flight(self, model_id: str) -> int:
        slot = self.slots.get(model_id)
        return 0 if slot is None else slot.in_flight

    def snapshot(self) -> dict[str, object]:
        loading = [s for s in self.slots.values() if s.state is SlotState.LOADING]
        loaded = [s for s in self.slots.values() if s.state is SlotState.LOADED]
        active = max(loaded, key=lambda s: s.last_used) if loaded else None
        return {
            "state": "switching" if loading or self.waiters else ("serving" if loaded else "idle"),
            "active_model": active.model.id if active else None,
            "active_unit": active.unit if active else None,
            "loaded_models": [s.model.id for s in loaded],
            "loading_model": loading[0].model.id if loading else None,
            "loading_phase": loading[0].phase.value if loading else None,
            "sleeping_models": [s.model.id for s in self.slots.values() if s.state is SlotState.SLEEPING],
            "in_flight": self.in_flight,
            "waiting": len(self.waiters),
            "switches": self.switches,
            "resources": self._resource_use(),
        }

    def _resource_use(self) -> dict[str, dict[str, float]]:
        held = [s.held for s in self.slots.values()]
        return {
            name: {"capacity": capacity, "held": sum(n.get(name, 0.0) for n in held)}
            for name, capacity in self.config.resources.items()
        }

    def subscribe(self, listener: Callable[[ModelEvent], None]) -> Callable[[], None]:
        """Call `listener` with every ModelEvent from now on; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # ----- configuration --------------------------------------------------------------------------------------

    def update_config(self, config: RouterConfig) -> None:
        """Adopt a reloaded config: new models appear unloaded, removed ones fail their waiters and are stopped
        first when room is needed."""
        self.config = config
        for model_id in list(self.status):
            if model_id not in config.models and model_id not in self.slots:
                del self.status[model_id]
        for model_id in config.models:
            self.status.setdefault(model_id, ModelStatus.UNLOADED)
        for slot in self.slots.values():
            model = config.models.get(slot.model.id)
            if model is not None and model.unit == slot.unit:
                slot.model = model
        for model_id in {t.model.id for t in self.waiters} - set(config.models):
            self._fail_waiters(model_id, SwitchFailed(model_id, "the model was removed from models.yml"))
        for ticket in self.waiters:
            ticket.model = config.models[ticket.model.id]
        self._schedule()

    # ----- start-up and shutdown -----------------------------------------------------------------------------

    async def adopt_running_unit(self) -> None:
        """At start-up, take over the configured units systemd already runs (as many as fit; the rest are
        stopped), then load the preload models."""
        units = self.config.units()
        states = await self.services.states(units)
        by_unit = {m.unit: m for m in self.config.models.values()}
        for unit in units:
            if states.get(unit) not in ("active", "activating"):
                continue
            model = by_unit[unit]
            held = [s.held for s in self.slots.values()]
            asleep = False
            if model.sleep is not None:
                with contextlib.suppress(Exception):
                    asleep = await self.probe.is_sleeping(self.config.engine(model))
            needs = dict(model.needs_asleep) if asleep else self.config.needs(model)
            if not self.config.fits([*held, needs]):
                log.warning("engine unit %s is running but does not fit beside the adopted ones: stopping it", unit)
                await self.services.stop(unit)
                continue
            log.info("adopting running unit %s as model %s%s", unit, model.id, " (asleep)" if asleep else "")
            if asleep:
                slot = self._new_slot(model, SlotState.SLEEPING)
                self.slots[model.id] = slot
                self._emit(ModelEvent(model.id, ModelStatus.SLEEPING))
            else:
                self._begin_load(model, adopt=True)
        self.preload()

    def preload(self) -> None:
        for model in self.config.models.values():
            if model.preload:
                self.load(model.id)

    async def close(self) -> None:
        for slot in list(self.slots.values()):
            for task in (slot.task, slot.idle_task):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        for ticket in self.waiters:
            if not ticket.future.done():
                ticket.future.set_exception(SwitchFailed(ticket.model.id, "the router is shutting down"))
        self.waiters.clear()

    # ----- internals ------------------------------------------------------------------------------------------

    def _ready(self, model_id: str) -> bool:
        slot = self.slots.get(model_id)
        return slot is not None and slot.state is SlotState.LOADED

    def _grantable(self, model_id: str) -> bool:
        slot = self.slots.get(model_id)
        return slot is not None and slot.state is SlotState.LOADED and not slot.evicting and not slot.unload_requested

    def _grant(self, model: ModelConfig) -> Lease:
        slot = self.slots[model.id]
        slot.in_flight += 1
        slot.last_used = self.clock()
        self._cancel_idle_timer(slot)
        return Lease(self, slot.model, slot.engine)

    def _release(self, lease: Lease) -> None:
        slot = self.slots.get(lease.model.id)
        if slot is None or slot.in_flight == 0:
            return
        slot.in_flight -= 1
        slot.last_used = self.clock()
        if slot.in_flight == 0:
            self._schedule()

    def _enqueue(self, model: ModelConfig, internal: bool) -> Ticket:
        loop = asyncio.get_running_loop()
        ticket = Ticket(model, self.clock(), loop.create_future(), internal=internal, number=next(self._ticket_numbers))
        self.waiters.append(ticket)
        # One line per queued request, and one per group served (`_schedule`): enough to replay the queue from the
        # log (tests/e2e/storm.py counts the loads the admission order needs from these lines).
        what = "load" if internal else "request"
        log.info("%s #%d for %s waits (%d waiting)", what, ticket.number, model.id, len(self.waiters))
        self._schedule()
        return ticket

    def _emit(self, event: ModelEvent) -> None:
        self.status[event.model] = event.status
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break scheduling
                log.exception("status listener failed on %s", event)

    def _notify_waiters(self) -> None:
        for ticket in self.waiters:
            ticket.changed.set()

    def _oldest_waiter(self, model_id: str) -> int | None:
        return min((t.number for t in self.waiters if t.model.id == model_id), default=None)

    def _groups(self) -> list[tuple[ModelConfig, list[Ticket]]]:
        """Waiting requests by model, oldest group first: a group's place is its oldest request's (their numbers
        count up as they arrive), or, while its model loads, the oldest request the load was begun for
        (`_Slot.since`)."""
        groups: dict[str, list[Ticket]] = {}
        for ticket in self.waiters:
            groups.setdefault(ticket.model.id, []).append(ticket)

        def place(tickets: list[Ticket]) -> int:
            slot = self.slots.get(tickets[0].model.id)
            since = slot.since if slot is not None and slot.since is not None else tickets[0].number
            return min(since, tickets[0].number)

        return [(tickets[0].model, tickets) for tickets in sorted(groups.values(), key=place)]

    def _schedule(self) -> None:
        """Take every decision the current state allows. Synchronous; safe to call any time."""
        for each in self.slots.values():
            each.evicting = False
        blocked = False
        for model, tickets in self._groups():
            found = self.slots.get(model.id)
            if found is not None and found.state is SlotState.LOADED and not found.unload_requested:
                if found.evicting:
                    continue  # chosen to make room for an older group: its new requests wait
                log.info(
                    "serving %d waiting request(s) for %s: %s",
                    len(tickets),
                    model.id,
                    " ".join(f"#{t.number}" for t in tickets),
                )
                for ticket in tickets:
                    self._serve(ticket)
                continue
            asleep = found is not None and found.state is SlotState.SLEEPING and not found.unload_requested
            if (found is not None and not asleep) or blocked:
                continue  # its load (or the stop before it) is under way; or an older group waits for room
            victims = self._make_room(model, waking=found if asleep else None)
            if victims is None:
                blocked = True
            elif not victims:
                if found is not None:
                    self._begin_wake(found)
                else:
                    self._begin_load(model, adopt=False)
            else:
                for victim, to_sleep in victims:
                    victim.evicting = True
                    victim.evict_to_sleep = to_sleep
                blocked = True
        for slot in list(self.slots.values()):
            idle = slot.in_flight == 0
            if slot.state is SlotState.LOADED and slot.unload_requested and idle:
                self._begin_stop(slot, UnloadReason.REQUEST)
            elif slot.state is SlotState.LOADED and slot.evicting and idle:
                if slot.evict_to_sleep:
                    self._begin_sleep(slot, UnloadReason.SWITCH)
                else:
                    self._begin_stop(slot, UnloadReason.SWITCH)
            elif slot.state is SlotState.SLEEPING and (slot.evicting or slot.unload_requested):
                self._begin_stop(slot, UnloadReason.REQUEST if slot.unload_requested else UnloadReason.SWITCH)
            elif slot.state in (SlotState.LOADED, SlotState.SLEEPING) and idle:
                self._arm_idle_timer(slot)
            if slot.state is not SlotState.LOADING:
                slot.since = None  # its load is over (and its group was served above): back to the arrival order
        self._notify_waiters()

    def _serve(self, ticket: Ticket) -> None:
        self.waiters.remove(ticket)
        if ticket.future.done():
            return
        lease = self._grant(ticket.model)
        ticket.future.set_result(lease)
        if ticket.internal:
            lease.release()

    def _make_room(self, model: ModelConfig, waking: _Slot | None = None) -> list[tuple[_Slot, bool]] | None:
        """What to evict so that `model` fits: a list of (slot, put it to sleep rather than stop it); [] when it
        fits now; None when it cannot fit yet (loads, stops or sleeps under way hold the room it needs).

        Fewest slots first, least recently used first; slots of models that a reload removed go first. A loaded
        sleep-capable model is put to sleep (it keeps its needs_asleep) when that still fits; a sleeping one can
        only be stopped. `waking`: the target's own sleeping slot, whose needs_asleep it trades for its needs."""
        needs = self.config.needs(model)
        others = [s for s in self.slots.values() if s is not waking]
        if self.config.fits([*(s.held for s in others), needs]):
            return []
        candidates = sorted(
            (s for s in others if s.state in (SlotState.LOADED, SlotState.SLEEPING)),
            key=lambda s: (s.model.id in self.config.models, s.last_used),
        )
        fixed = [s.held for s in others if s.state not in (SlotState.LOADED, SlotState.SLEEPING)]
        for allow_sleep in (True, False):
            for count in range(1, len(candidates) + 1):
                for victims in itertools.combinations(candidates, count):
                    plan = [
                        (s, allow_sleep and s.can_sleep and s.state is SlotState.LOADED and not s.unload_requested)
                        for s in victims
                    ]
                    kept = [s.held for s in candidates if s not in victims]
                    asleep = [s.needs_asleep for s, to_sleep in plan if to_sleep]
                    if self.config.fits([*fixed, *kept, *asleep, needs]):
                        return plan
        return None

    # ----- idle unload ----------------------------------------------------------------------------------------

    def _arm_idle_timer(self, slot: _Slot) -> None:
        idle = self.config.idle_unload_of(slot.model)
        if idle <= 0 or slot.idle_task is not None or any(t.model.id == slot.model.id for t in self.waiters):
            return
        if slot.state is SlotState.SLEEPING:
            idle *= SLEEP_IDLE_FACTOR
        slot.idle_task = asyncio.get_running_loop().create_task(self._idle_timer(slot, idle, slot.state))

    def _cancel_idle_timer(self, slot: _Slot) -> None:
        task, slot.idle_task = slot.idle_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _idle_timer(self, slot: _Slot, idle: float, state: SlotState) -> None:
        while True:
            await self.sleep(max(0.0, slot.last_used + idle - self.clock()))
            if self.slots.get(slot.model.id) is not slot or slot.state is not state:
                return
            if slot.in_flight or any(t.model.id == slot.model.id for t in self.waiters):
                slot.idle_task = None
                return
            if self.clock() >= slot.last_used + idle:
                slot.idle_task = None
                if state is SlotState.LOADED and slot.can_sleep:
                    log.info("model %s idle for %g s: putting it to sleep", slot.model.id, idle)
                    self._begin_sleep(slot, UnloadReason.IDLE)
                else:
                    log.info("model %s idle for %g s: stopping %s", slot.model.id, idle, slot.unit)
                    self._begin_stop(slot, UnloadReason.IDLE)
                return

    # ----- loading --------------------------------------------------------------------------------------------

    def _begin_load(self, model: ModelConfig, adopt: bool) -> None:
        reset_first = self.status.get(model.id) is ModelStatus.FAILED
        slot = self._new_slot(model, SlotState.LOADING)
        slot.phase = Phase.LOADING if adopt else Phase.STARTING
        slot.since = self._oldest_waiter(model.id)
        if not adopt:
            log.info("loading %s: starting %s", model.id, model.unit)
        self.slots[model.id] = slot
        self._emit(ModelEvent(model.id, ModelStatus.LOADING))
        slot.task = asyncio.get_running_loop().create_task(self._run_load(slot, adopt, reset_first))
        self._notify_waiters()

    def _new_slot(self, model: ModelConfig, state: SlotState) -> _Slot:
        return _Slot(
            model=model,
            engine=self.config.engine(model),
            needs=self.config.needs(model),
            needs_asleep=dict(model.needs_asleep),
            state=state,
            last_used=self.clock(),
            started=self.clock(),
        )

    def _set_phase(self, slot: _Slot, phase: Phase) -> None:
        slot.phase = phase
        if phase is Phase.STARTING:
            slot.started = self.clock()
        self._notify_waiters()

    async def _run_load(self, slot: _Slot, adopt: bool, reset_first: bool) -> None:
        model, engine = slot.model, slot.engine
        try:
            if reset_first and not adopt:
                # The last load failed and left the unit failed (for the operator to see): reset it first.
                with contextlib.suppress(UnitError, OSError):
                    await self.services.stop(model.unit)
            if not adopt:
                await self._wait_port_closed(model, engine, "before starting it")
                self._set_phase(slot, Phase.STARTING)
                self._check_unloaded(slot)
                try:
                    await self.services.start(model.unit)
                except (UnitError, OSError) as exc:
                    raise SwitchFailed(model.id, str(exc), await self.services.last_log_lines(model.unit)) from exc
            self._check_unloaded(slot)
            self._set_phase(slot, Phase.LOADING)
            await self._wait_ready(slot)
            if engine.warmup:
                self._set_phase(slot, Phase.WARMING)
                try:
                    await self.probe.warm_up(engine, model.id)
                except Exception as exc:
                    raise SwitchFailed(model.id, f"warm-up failed: {exc}") from exc
            self._check_unloaded(slot)
        except SwitchFailed as failure:
            log.error("%s", failure.describe())
            await self._fail_load(slot, failure)
        except _Unloaded:
            await self._abandon_load(slot)
        except Exception as exc:  # an unexpected bug must not wedge the switcher forever
            log.exception("unexpected error while loading %s", model.id)
            await self._fail_load(slot, SwitchFailed(model.id, f"internal error: {exc!r}"))
        else:
            took = self.clock() - slot.started
            slot.state = SlotState.LOADED
            slot.task = None
            slot.last_used = self.clock()
            self.last_error.pop(model.id, None)
            if not adopt:
                self.load_seconds.setdefault(model.id, deque(maxlen=LOAD_HISTORY)).append(took)
                self.switches += 1
            log.info("model %s ready in %.2f s (unit %s)", model.id, took, model.unit)
            self._emit(ModelEvent(model.id, ModelStatus.LOADED, load_seconds=None if adopt else took))
            self._schedule()

    async def _abandon_load(self, slot: _Slot) -> None:
        """Unloaded while loading or waking: the unit must not go on loading in the background."""
        with contextlib.suppress(UnitError, OSError):
            await self.services.stop(slot.unit)
        self._drop(slot)
        self._emit(ModelEvent(slot.model.id, ModelStatus.UNLOADED, unload_reason=UnloadReason.REQUEST))
        self._schedule()

    def _check_unloaded(self, slot: _Slot) -> None:
        if slot.unload_requested:
            raise _Unloaded

    async def _fail_load(self, slot: _Slot, failure: SwitchFailed) -> None:
        model = slot.model
        self.last_error[model.id] = failure.reason
        # A unit that is still up (load timeout, failed warm-up) must not go on holding the GPU; one that exited
        # stays failed for the operator to see, and is reset before the next start.
        with contextlib.suppress(UnitError, OSError):
            state = (await self.services.states([model.unit]))[model.unit]
            if state in ("active", "activating", "reloading"):
                await self.services.stop(model.unit)
        self._drop(slot)
        self._fail_waiters(model.id, failure)
        self._emit(ModelEvent(model.id, ModelStatus.FAILED, load_failed=True))
        self._schedule()

    def _fail_waiters(self, model_id: str, failure: SwitchFailed) -> None:
        """Every request waiting for `model_id` leaves the queue with `failure`."""
        failing = [t for t in self.waiters if t.model.id == model_id]
        if failing:
            numbers = " ".join(f"#{t.number}" for t in failing)
            log.info("failing %d waiting request(s) for %s: %s", len(failing), model_id, numbers)
        for ticket in failing:
            self.waiters.remove(ticket)
            if not ticket.future.done():
                ticket.future.set_exception(failure)

    def _drop(self, slot: _Slot) -> None:
        if self.slots.get(slot.model.id) is slot:
            del self.slots[slot.model.id]
        self._cancel_idle_timer(slot)
        slot.stopped.set()

    # ----- stopping -------------------------------------------------------------------------------------------

    def _begin_stop(self, slot: _Slot, reason: UnloadReason, final_status: ModelStatus = ModelStatus.UNLOADED) -> None:
        slot.stopped_from = slot.state
        slot.state = SlotState.STOPPING
        slot.evicting = False
        self._cancel_idle_timer(slot)
        slot.task = asyncio.get_running_loop().create_task(self._run_stop(slot, reason, final_status))
        self._notify_waiters()

    async def _run_stop(self, slot: _Slot, reason: UnloadReason, final_status: ModelStatus) -> None:
        log.info("stopping %s (%s)", slot.unit, reason.value)
        try:
            await self.services.stop(slot.unit)
        except (UnitError, OSError) as exc:
            # The unit may still run: keep it as loaded, and fail the requests that waited for its room.
            log.error("could not stop %s: %s", slot.unit, exc)
            slot.state = slot.stopped_from
            slot.task = None
            slot.unload_requested = False
            for model, _ in self._groups()[:1]:
                self._fail_waiters(
                    model.id, SwitchFailed(model.id, f"could not stop the running engine {slot.unit}: {exc}")
                )
            slot.stopped.set()
            slot.stopped = asyncio.Event()
            self._schedule()
            return
        with contextlib.suppress(SwitchFailed):
            await self._wait_port_closed(slot.model, slot.engine, f"after stopping {slot.unit}")
        log.info("stopped %s", slot.unit)
        self._drop(slot)
        if final_status is ModelStatus.FAILED:
            self._emit(ModelEvent(slot.model.id, ModelStatus.FAILED))
        else:
            self._emit(ModelEvent(slot.model.id, ModelStatus.UNLOADED, unload_reason=reason))
        self._schedule()

    # ----- sleeping and waking (vLLM sleep mode) --------------------------------------------------------------

    def _begin_sleep(self, slot: _Slot, reason: UnloadReason) -> None:
        slot.state = SlotState.FALLING_ASLEEP
        slot.evicting = False
        self._cancel_idle_timer(slot)
        slot.task = asyncio.get_running_loop().create_task(self._run_sleep(slot, reason))
        self._notify_waiters()

    async def _run_sleep(self, slot: _Slot, reason: UnloadReason) -> None:
        level = slot.model.sleep or 1
        started = self.clock()
        log.info("putting %s to sleep (level %d, %s)", slot.model.id, level, reason.value)
        try:
            await self.probe.sleep(slot.engine, level)
        except Exception as exc:
            log.warning("model %s could not sleep (%s): stopping its unit instead", slot.model.id, exc)
            self.last_error[slot.model.id] = f"sleep failed: {exc}"
            self._begin_stop(slot, reason)
            return
        took = self.clock() - started
        slot.state = SlotState.SLEEPING
        slot.task = None
        slot.last_used = self.clock()
        self._emit(ModelEvent(slot.model.id, ModelStatus.SLEEPING, sleep_seconds=took, unload_reason=reason))
        self._schedule()

    def _begin_wake(self, slot: _Slot) -> None:
        slot.state = SlotState.LOADING
        slot.since = self._oldest_waiter(slot.model.id)
        slot.phase = Phase.WAKING
        slot.started = self.clock()
        self._cancel_idle_timer(slot)
        self._emit(ModelEvent(slot.model.id, ModelStatus.LOADING))
        slot.task = asyncio.get_running_loop().create_task(self._run_wake(slot))
        self._notify_waiters()

    async def _run_wake(self, slot: _Slot) -> None:
        model = slot.model
        try:
            self._check_unloaded(slot)
            await self.probe.wake_up(slot.engine)
            self._check_unloaded(slot)
            # The first request after a wake pays for re-initialisation; let the router pay it, not the user.
            await self.probe.warm_up(slot.engine, model.id)
        except _Unloaded:
            await self._abandon_load(slot)
            return
        except Exception as exc:
            reason = f"wake failed ({exc}): restarting its unit"
            log.warning("model %s: %s", model.id, reason)
            self.last_error[model.id] = reason
            self._emit(ModelEvent(model.id, ModelStatus.LOADING, wake_failed=True))
            with contextlib.suppress(UnitError, OSError):
                await self.services.stop(model.unit)
            with contextlib.suppress(SwitchFailed):
                await self._wait_port_closed(model, slot.engine, f"after stopping {model.unit}")
            slot.phase = Phase.STARTING
            slot.started = self.clock()
            await self._run_load(slot, adopt=False, reset_first=False)
            return
        took = self.clock() - slot.started
        slot.state = SlotState.LOADED
        slot.task = None
        slot.last_used = self.clock()
        self.wake_seconds.setdefault(model.id, deque(maxlen=LOAD_HISTORY)).append(took)
        log.info("model %s awake in %.2f s", model.id, took)
        self._emit(ModelEvent(model.id, ModelStatus.LOADED, wake_seconds=took))
        self._schedule()

    async def _wait_port_closed(self, model: ModelConfig, engine: BackendConfig, when: str) -> None:
        # A stopped engine can hold its port a moment longer; TabbyAPI would silently bind port+1 if started now.
        deadline = self.clock() + engine.stop_timeout
        delay = FIRST_POLL_DELAY / 2
        while not await self.probe.port_closed(engine):
            if self.clock() >= deadline:
                raise SwitchFailed(
                    model.id,
                    f"port {engine.port} of {engine.kind} is still in use {when} "
                    f"({engine.stop_timeout:g} s): another process holds it",
                )
            await self.sleep(delay)
            delay = min(delay * POLL_BACKOFF, MAX_POLL_DELAY)

    async def _unit_state(self, unit: str) -> str:
        return (await self.services.states([unit]))[unit]

    async def _wait_ready(self, slot: _Slot) -> None:
        model, engine = slot.model, slot.engine
        deadline = slot.started + model.load_timeout
        delay = FIRST_POLL_DELAY
        while True:
            self._check_unloaded(slot)
            readiness = await self.probe.readiness(engine)
            if readiness is Readiness.READY:
                return
            # An engine that answers "loading" runs: ask systemd (a subprocess) only when nothing answers.
            state = (
                "active" if readiness is Readiness.LOADING else (await self.services.states([model.unit]))[model.unit]
            )
            if state in ("failed", "inactive"):
                lines = await self.services.last_log_lines(model.unit)
                raise SwitchFailed(model.id, f"engine unit {model.unit} exited while loading ({state})", lines)
            now = self.clock()
            if now >= deadline:
                raise SwitchFailed(
                    model.id, f"not ready after the load timeout of {model.load_timeout:g} s; unit {model.unit} stopped"
                )
            await self.sleep(min(delay, deadline - now))
            if now - slot.started >= FAST_POLL_SECONDS:
                delay = min(delay * POLL_BACKOFF, MAX_POLL_DELAY)
