"""Scheduling decisions with several engines: fit by declared resources, eviction (fewest, least recently used,
after draining), idle unload racing requests, preload, unload, aliases and the current model. Fake clock, fake
systemd, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from router_app.config import BackendConfig, ModelConfig, RouterConfig
from router_app.engines import Readiness
from router_app.switcher import Lease, ModelEvent, ModelStatus, Switcher, SwitchFailed, Ticket, UnloadReason


class FakeClock:
    """Monotonic seconds that move only when a test says so (`advance`); the switcher's sleeps wait for that."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in list(self.sleepers):
            if deadline <= self.now:
                self.sleepers.remove((deadline, future))
                if not future.done():
                    future.set_result(None)
        await settle()


class Systemd:
    def __init__(self) -> None:
        self.running: set[str] = set()
        self.calls: list[str] = []

    async def start(self, unit: str) -> None:
        self.calls.append(f"start {unit}")
        self.running.add(unit)

    async def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")
        self.running.discard(unit)

    async def states(self, units: Sequence[str]) -> dict[str, str]:
        return {u: "active" if u in self.running else "inactive" for u in units}

    async def last_log_lines(self, unit: str, lines: int = 20) -> list[str]:
        return []


class Probe:
    """Engines by URL: ready one poll after their unit started."""

    def __init__(self, systemd: Systemd, units_by_url: dict[str, str]) -> None:
        self.systemd = systemd
        self.units_by_url = units_by_url

    async def readiness(self, backend: BackendConfig) -> Readiness:
        running = self.units_by_url[backend.url] in self.systemd.running
        return Readiness.READY if running else Readiness.DOWN

    async def port_closed(self, backend: BackendConfig) -> bool:
        return self.units_by_url[backend.url] not in self.systemd.running

    async def warm_up(self, backend: BackendConfig, model_id: str) -> None:
        return None


def unit(model_id: str) -> str:
    return f"llm-backend-{model_id}.service"


def make(
    needs: dict[str, float | None],
    capacity: float = 10,
    idle: dict[str, float] | None = None,
    preload: Sequence[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    current_alias: str | None = None,
) -> tuple[Switcher, Systemd, FakeClock, list[ModelEvent]]:
    backends = {"llamacpp": BackendConfig("llamacpp", "http://127.0.0.1:9000", False, 5.0)}
    models = {}
    for index, (model_id, need) in enumerate(needs.items()):
        models[model_id] = ModelConfig(
            model_id,
            "llamacpp",
            unit(model_id),
            model_id.upper(),
            30.0,
            url=f"http://127.0.0.1:{9001 + index}",
            needs=None if need is None else {"gpu": need},
            idle_unload=(idle or {}).get(model_id),
            preload=model_id in preload,
            aliases=(aliases or {}).get(model_id, ()),
        )
    config = RouterConfig(backends=backends, models=models, resources={"gpu": capacity}, current_alias=current_alias)
    systemd = Systemd()
    probe = Probe(systemd, {config.engine(m).url: m.unit for m in models.values()})
    clock = FakeClock()
    switcher = Switcher(config, systemd, probe, clock=clock, sleep=clock.sleep)
    events: list[ModelEvent] = []
    switcher.subscribe(events.append)
    return switcher, systemd, clock, events


async def lease_of(result: Lease | Ticket) -> Lease:
    if isinstance(result, Lease):
        return result
    return await asyncio.wait_for(result.future, 5)


async def use(switcher: Switcher, clock: FakeClock, model_id: str) -> None:
    (await lease_of(switcher.request(model_id))).release()
    clock.now += 1


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


async def test_models_that_fit_run_side_by_side() -> None:
    switcher, systemd, clock, _ = make({"chat": 8, "embed": 2})
    await use(switcher, clock, "chat")
    await use(switcher, clock, "embed")
    assert systemd.running == {unit("chat"), unit("embed")}
    assert not any(c.startswith("stop") for c in systemd.calls)
    assert isinstance(switcher.request("chat"), Lease), "a loaded model answers at once beside the other"


async def test_without_needs_one_engine_at_a_time() -> None:
    switcher, systemd, clock, _ = make({"a": None, "b": None})
    await use(switcher, clock, "a")
    await use(switcher, clock, "b")
    assert systemd.running == {unit("b")}


async def test_eviction_takes_the_fewest_then_the_least_recently_used() -> None:
    switcher, systemd, clock, events = make({"z": 2, "x": 4, "y": 4, "w": 4})
    for model in ("z", "x", "y"):  # z used first (least recently), then x, then y: 10 of 10 held
        await use(switcher, clock, model)
    await use(switcher, clock, "w")
    # z alone frees too little; one of x and y suffices: x, the less recently used of them.
    assert systemd.running == {unit("z"), unit("y"), unit("w")}
    unloads = [(e.model, e.unload_reason) for e in events if e.status is ModelStatus.UNLOADED]
    assert unloads == [("x", UnloadReason.SWITCH)]


async def test_eviction_drains_the_victim_and_other_models_keep_serving() -> None:
    switcher, systemd, clock, _ = make({"a": 6, "b": 6, "e": 2})
    await use(switcher, clock, "e")
    running = await lease_of(switcher.request("a"))
    ticket = switcher.request("b")
    assert isinstance(ticket, Ticket)
    await settle()
    assert unit("a") in systemd.running, "never cut off a running answer"
    assert isinstance(switcher.request("a"), Ticket), "a model being drained for a switch takes no new requests"
    embed = switcher.request("e")
    assert isinstance(embed, Lease), "a model that does not conflict keeps serving at once"
    embed.release()
    running.release()
    (await lease_of(ticket)).release()
    assert unit("a") not in systemd.running and unit("e") in systemd.running


async def test_idle_unload_and_a_request_that_comes_first_wins() -> None:
    switcher, systemd, clock, events = make({"a": 5, "b": 5}, idle={"a": 10})
    await use(switcher, clock, "a")  # released at t0, clock then +1
    await clock.advance(8.9)  # 9.9 s idle
    lease = switcher.request("a")
    assert isinstance(lease, Lease)
    await clock.advance(20)
    assert unit("a") in systemd.running, "a model in use is never unloaded"
    lease.release()
    await clock.advance(9.5)
    assert unit("a") in systemd.running, "the idle time starts again at the last release"
    await clock.advance(1)
    assert unit("a") not in systemd.running
    assert events[-1] == ModelEvent("a", ModelStatus.UNLOADED, unload_reason=UnloadReason.IDLE)
    assert switcher.model_status("a") is ModelStatus.UNLOADED


async def test_preload_loads_at_start_and_adopted_units_are_kept_when_they_fit() -> None:
    switcher, systemd, _, _ = make({"chat": 8, "embed": 2, "other": 8}, preload=["embed"])
    systemd.running.add(unit("chat"))
    await switcher.adopt_running_unit()
    await settle()
    assert switcher.model_status("chat") is ModelStatus.LOADED
    assert switcher.model_status("embed") is ModelStatus.LOADED
    assert systemd.calls == [f"start {unit('embed')}"], "chat adopted as it runs; embed started beside it"


async def test_unload_of_a_loading_model_fails_its_waiters_and_stops_the_unit() -> None:
    switcher, systemd, _, events = make({"a": None})
    gate = asyncio.Event()
    original = systemd.start

    async def slow_start(name: str) -> None:
        await gate.wait()
        await original(name)

    systemd.start = slow_start  # type: ignore[method-assign]
    ticket = switcher.request("a")
    await settle()
    unloading = asyncio.ensure_future(switcher.unload("a"))
    await settle()
    with pytest.raises(SwitchFailed, match="unloaded"):
        await lease_of(ticket)  # at once, while `systemctl start` is still running
    assert not unloading.done(), "the unload waits for the start under way, never cancels it"
    gate.set()
    await asyncio.wait_for(unloading, 5)
    assert switcher.model_status("a") is ModelStatus.UNLOADED
    assert systemd.calls[-1] == f"stop {unit('a')}"
    assert events[-1].status is ModelStatus.UNLOADED


async def test_unload_waits_for_answers_in_flight() -> None:
    switcher, systemd, _, _ = make({"a": None})
    lease = await lease_of(switcher.request("a"))
    unloading = asyncio.ensure_future(switcher.unload("a"))
    await settle()
    assert not unloading.done() and unit("a") in systemd.running
    lease.release()
    await asyncio.wait_for(unloading, 5)
    assert unit("a") not in systemd.running


async def test_unload_stops_a_unit_the_router_did_not_start() -> None:
    switcher, systemd, _, _ = make({"a": None})
    systemd.running.add(unit("a"))  # started by hand after the router came up: no slot
    await asyncio.wait_for(switcher.unload("a"), 5)
    assert unit("a") not in systemd.running
    await asyncio.wait_for(switcher.unload("a"), 5)  # not running: nothing to do


async def test_aliases_and_the_current_model() -> None:
    switcher, _, clock, _ = make(
        {"a": 5, "b": 5, "c": 10}, preload=["b"], aliases={"a": ("alpha",)}, current_alias="current"
    )
    assert switcher.resolve("alpha") == "a"
    assert switcher.resolve("nope") is None
    assert switcher.resolve("current") == "b", "nothing used yet: the first preload model"
    await use(switcher, clock, "a")
    await use(switcher, clock, "b")
    assert switcher.resolve("current") == "b", "the most recently used loaded model"
    await use(switcher, clock, "a")
    assert switcher.resolve("current") == "a"
    ticket = switcher.request("c")  # evicts a and b
    assert switcher.resolve("current") == "c", "during a switch: the model coming, not the one leaving"
    (await lease_of(ticket)).release()
    await switcher.unload("c")
    assert switcher.resolve("current") == "c", "nothing loaded: the most recently used model"


class SleepyProbe(Probe):
    """vLLM engines with sleep mode: records sleeps and wakes; `wake_fails` makes wake_up fail."""

    def __init__(self, systemd: Systemd, units_by_url: dict[str, str]) -> None:
        super().__init__(systemd, units_by_url)
        self.asleep: set[str] = set()
        self.calls: list[str] = []
        self.wake_fails = False

    async def sleep(self, backend: BackendConfig, level: int) -> None:
        unit = self.units_by_url[backend.url]
        self.calls.append(f"sleep {unit} {level}")
        self.asleep.add(unit)

    async def wake_up(self, backend: BackendConfig) -> None:
        unit = self.units_by_url[backend.url]
        self.calls.append(f"wake {unit}")
        if self.wake_fails:
            raise RuntimeError("POST /wake_up answered HTTP 500")
        self.asleep.discard(unit)

    async def is_sleeping(self, backend: BackendConfig) -> bool:
        return self.units_by_url[backend.url] in self.asleep


def make_sleepers(
    models: dict[str, tuple[float, int | None]], ram: float = 100, idle: float | None = None
) -> tuple[Switcher, Systemd, SleepyProbe, FakeClock, list[ModelEvent]]:
    """Models `id -> (needs_asleep host_ram, sleep level)` on vLLM, each needing 8 of 10 gpu when awake."""
    backends = {"vllm": BackendConfig("vllm", "http://127.0.0.1:8000", False, 5.0)}
    configs = {}
    for index, (model_id, (asleep_ram, level)) in enumerate(models.items()):
        configs[model_id] = ModelConfig(
            model_id,
            "vllm",
            unit(model_id),
            model_id.upper(),
            30.0,
            url=f"http://127.0.0.1:{8001 + index}",
            needs={"gpu": 8, "host_ram": 0},
            idle_unload=idle,
            sleep=level,
            needs_asleep={"host_ram": asleep_ram} if level else {},
        )
    config = RouterConfig(backends=backends, models=configs, resources={"gpu": 10, "host_ram": ram})
    systemd = Systemd()
    probe = SleepyProbe(systemd, {config.engine(m).url: m.unit for m in configs.values()})
    clock = FakeClock()
    switcher = Switcher(config, systemd, probe, clock=clock, sleep=clock.sleep)
    events: list[ModelEvent] = []
    switcher.subscribe(events.append)
    return switcher, systemd, probe, clock, events


async def test_two_sleepers_alternate_by_sleep_and_wake_never_restarting() -> None:
    switcher, systemd, probe, clock, events = make_sleepers({"a": (40, 1), "b": (40, 1)})
    for model in ("a", "b", "a", "b"):
        await use(switcher, clock, model)
    assert systemd.calls == [f"start {unit('a')}", f"start {unit('b')}"], "no stop, no restart"
    assert probe.calls == [
        f"sleep {unit('a')} 1",
        f"sleep {unit('b')} 1",
        f"wake {unit('a')}",
        f"sleep {unit('a')} 1",
        f"wake {unit('b')}",
    ]
    assert switcher.model_status("a") is ModelStatus.SLEEPING and switcher.model_status("b") is ModelStatus.LOADED
    wakes = [e for e in events if e.wake_seconds is not None]
    assert [e.model for e in wakes] == ["a", "b"]
    assert switcher.estimate("a") is not None, "wakes have their own history"


async def test_host_ram_bounds_the_sleepers_the_least_recently_used_is_stopped() -> None:
    switcher, systemd, probe, clock, _ = make_sleepers({"a": (40, 1), "b": (40, 1), "c": (40, 1)}, ram=70)
    for model in ("a", "b", "c"):
        await use(switcher, clock, model)
    # For c, b must make room; asleep beside a it would hold 80 of 70 GiB host RAM: a, the least recently used
    # sleeper, is stopped for real and b sleeps.
    assert systemd.calls == [f"start {unit('a')}", f"start {unit('b')}", f"stop {unit('a')}", f"start {unit('c')}"]
    assert probe.calls == [f"sleep {unit('a')} 1", f"sleep {unit('b')} 1"]
    statuses = {m: switcher.model_status(m).value for m in ("a", "b", "c")}
    assert statuses == {"a": "unloaded", "b": "sleeping", "c": "loaded"}
    held = switcher.snapshot()["resources"]
    assert held == {"gpu": {"capacity": 10, "held": 8}, "host_ram": {"capacity": 70, "held": 40}}


async def test_a_model_without_sleep_is_stopped_and_sleepers_are_woken_not_restarted() -> None:
    switcher, systemd, probe, clock, _ = make_sleepers({"a": (40, 1), "plain": (0, None)})
    for model in ("a", "plain", "a", "plain"):
        await use(switcher, clock, model)
    assert systemd.calls == [
        f"start {unit('a')}",
        f"start {unit('plain')}",
        f"stop {unit('plain')}",
        f"start {unit('plain')}",
    ]
    assert probe.calls == [f"sleep {unit('a')} 1", f"wake {unit('a')}", f"sleep {unit('a')} 1"]


async def test_a_failed_wake_falls_back_to_a_unit_restart() -> None:
    switcher, systemd, probe, clock, events = make_sleepers({"a": (40, 1), "b": (40, 1)})
    await use(switcher, clock, "a")
    await use(switcher, clock, "b")
    probe.wake_fails = True
    await use(switcher, clock, "a")
    assert systemd.calls[-2:] == [f"stop {unit('a')}", f"start {unit('a')}"]
    assert switcher.model_status("a") is ModelStatus.LOADED
    assert any(e.wake_failed for e in events)
    assert [e.status for e in events if e.model == "a"][-2:] == [ModelStatus.LOADING, ModelStatus.LOADED]


async def test_idle_sleeper_sleeps_first_then_stops_after_a_longer_idle() -> None:
    switcher, systemd, probe, clock, _ = make_sleepers({"a": (40, 1)}, idle=10)
    await use(switcher, clock, "a")
    await clock.advance(9.5)
    assert switcher.model_status("a") is ModelStatus.SLEEPING
    assert probe.calls == [f"sleep {unit('a')} 1"]
    await clock.advance(35)
    assert switcher.model_status("a") is ModelStatus.SLEEPING, "asleep 4 x 10 s before a real stop"
    await clock.advance(10)
    assert switcher.model_status("a") is ModelStatus.UNLOADED and unit("a") not in systemd.running


async def test_unload_stops_a_sleeper_for_real_and_load_wakes_it() -> None:
    switcher, systemd, probe, clock, _ = make_sleepers({"a": (40, 1), "b": (40, 1)})
    await use(switcher, clock, "a")
    await use(switcher, clock, "b")
    switcher.load("a")
    await settle()
    assert probe.calls[-1] == f"wake {unit('a')}" and switcher.model_status("a") is ModelStatus.LOADED
    await switcher.unload("b")
    assert unit("b") not in systemd.running and switcher.model_status("b") is ModelStatus.UNLOADED
