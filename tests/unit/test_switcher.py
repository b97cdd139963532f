"""The switch state machine with injected fakes: no processes, no sockets, a controllable clock."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import pytest

from router_app.config import BackendConfig, ModelConfig, RouterConfig
from router_app.engines import Readiness
from router_app.switcher import Lease, ModelStatus, Phase, QueueFull, Switcher, SwitchFailed, Ticket
from router_app.units import UnitError
from tests.e2e.storm import SwitchReplay


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class FakeSystemd:
    """Units that become ready after `load_polls` readiness probes; records every call."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.failed: set[str] = set()
        self.calls: list[str] = []
        self.exit_on_start: set[str] = set()
        self.start_gate: asyncio.Event | None = None

    async def start(self, unit: str) -> None:
        self.calls.append(f"start {unit}")
        if self.start_gate is not None:
            await self.start_gate.wait()
        if unit in self.exit_on_start:
            self.failed.add(unit)
            return
        self.running.add(unit)

    async def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")
        self.running.discard(unit)
        self.failed.discard(unit)

    async def states(self, units: Sequence[str]) -> dict[str, str]:
        return {u: "active" if u in self.running else "failed" if u in self.failed else "inactive" for u in units}

    async def last_log_lines(self, unit: str, lines: int = 20) -> list[str]:
        return [f"error: {unit} could not load the model file"]


class FakeProbe:
    def __init__(self, systemd: FakeSystemd, load_polls: int = 2) -> None:
        self.systemd = systemd
        self.load_polls = load_polls
        self.polls: dict[str, int] = {}
        self.never_ready: set[str] = set()
        self.unit_of_port: dict[int, str] = {}
        self.warmups: list[str] = []

    def _unit(self, backend: BackendConfig) -> str | None:
        return next((u for u in self.systemd.running if u.startswith(f"llm-backend-{backend.kind}")), None)

    async def readiness(self, backend: BackendConfig) -> Readiness:
        unit = self._unit(backend)
        if unit is None:
            return Readiness.DOWN
        self.polls[unit] = self.polls.get(unit, 0) + 1
        if unit in self.never_ready or self.polls[unit] < self.load_polls:
            return Readiness.LOADING
        return Readiness.READY

    async def port_closed(self, backend: BackendConfig) -> bool:
        return self._unit(backend) is None

    async def warm_up(self, backend: BackendConfig, model_id: str) -> None:
        self.warmups.append(model_id)


def make_config(queue_limit: int = 64, timeout: float = 30.0) -> RouterConfig:
    backends = {
        "llamacpp": BackendConfig("llamacpp", "http://127.0.0.1:8085", False, 5.0),
        "sglang": BackendConfig("sglang", "http://127.0.0.1:30000", False, 5.0),
        "tabbyapi": BackendConfig("tabbyapi", "http://127.0.0.1:5000", True, 5.0),
    }
    models = {
        "a": ModelConfig("a", "llamacpp", "llm-backend-llamacpp-a.service", "A", timeout),
        "b": ModelConfig("b", "sglang", "llm-backend-sglang-b.service", "B", timeout),
        "c": ModelConfig("c", "tabbyapi", "llm-backend-tabbyapi-c.service", "C", timeout),
    }
    return RouterConfig(backends=backends, models=models, queue_limit=queue_limit)


@pytest.fixture
def parts() -> tuple[Switcher, FakeSystemd, FakeProbe, FakeClock]:
    clock = FakeClock()
    systemd = FakeSystemd()
    probe = FakeProbe(systemd)
    return Switcher(make_config(), systemd, probe, clock=clock, sleep=clock.sleep), systemd, probe, clock


async def lease_of(result: Lease | Ticket) -> Lease:
    if isinstance(result, Lease):
        return result
    return await asyncio.wait_for(result.future, 5)


async def serve_all(admissions: Sequence[Lease | Ticket]) -> list[str]:
    """Wait for every admission's lease at once, release each right away; the models in the order served."""
    served: list[str] = []

    async def serve(admission: Lease | Ticket) -> None:
        lease = await lease_of(admission)
        served.append(lease.model.id)
        await asyncio.sleep(0)
        lease.release()

    await asyncio.gather(*(serve(a) for a in admissions))
    return served


async def test_first_request_starts_unit_and_later_ones_get_a_lease_at_once(parts):
    switcher, systemd, _, _ = parts
    first = switcher.request("a")
    assert isinstance(first, Ticket)
    assert switcher.model_status("a") is ModelStatus.LOADING
    lease = await lease_of(first)
    assert systemd.calls == ["start llm-backend-llamacpp-a.service"]
    assert switcher.model_status("a") is ModelStatus.LOADED
    second = switcher.request("a")
    assert isinstance(second, Lease)
    assert switcher.in_flight == 2
    lease.release()
    second.release()
    lease.release()  # idempotent
    assert switcher.in_flight == 0


async def test_concurrent_requests_join_one_load(parts):
    switcher, systemd, _, _ = parts
    tickets = [switcher.request("a") for _ in range(5)]
    leases = await asyncio.gather(*(lease_of(t) for t in tickets))
    assert systemd.calls.count("start llm-backend-llamacpp-a.service") == 1
    assert switcher.in_flight == 5
    for lease in leases:
        lease.release()


async def test_switch_waits_for_running_answers_to_drain(parts):
    switcher, systemd, _, _ = parts
    running = await lease_of(switcher.request("a"))
    ticket = switcher.request("b")
    assert isinstance(ticket, Ticket)
    await asyncio.sleep(0.01)
    assert "stop llm-backend-llamacpp-a.service" not in systemd.calls
    assert switcher.wait_info(ticket).phase is Phase.DRAINING
    assert switcher.wait_info(ticket).in_flight == 1
    running.release()
    lease = await lease_of(ticket)
    assert systemd.calls == [
        "start llm-backend-llamacpp-a.service",
        "stop llm-backend-llamacpp-a.service",
        "start llm-backend-sglang-b.service",
    ]
    assert switcher.model_status("a") is ModelStatus.UNLOADED
    assert switcher.model_status("b") is ModelStatus.LOADED
    lease.release()


async def test_new_requests_for_active_model_queue_behind_a_pending_switch(parts):
    switcher, _, _, _ = parts
    running = await lease_of(switcher.request("a"))
    to_b = switcher.request("b")
    again_a = switcher.request("a")
    assert isinstance(again_a, Ticket), "a busy model must not starve a waiting switch"
    running.release()
    (await lease_of(to_b)).release()
    (await lease_of(again_a)).release()
    assert switcher.switches == 3


async def test_waiters_are_grouped_by_model_without_ping_pong(parts):
    switcher, systemd, _, _ = parts
    running = await lease_of(switcher.request("c"))
    order = ["a", "b", "a", "b", "a", "b"]
    tickets = [switcher.request(m) for m in order]
    running.release()
    assert await serve_all(tickets) == ["a", "a", "a", "b", "b", "b"]
    starts = [c for c in systemd.calls if c.startswith("start")]
    assert starts == [
        "start llm-backend-tabbyapi-c.service",
        "start llm-backend-llamacpp-a.service",
        "start llm-backend-sglang-b.service",
    ]


async def test_a_load_whose_first_waiter_left_still_serves_the_requests_that_joined_it_before_switching_on(parts):
    # Found by the switch storm: a's load was begun for its oldest waiter, who left; the requests that had joined
    # the load were then younger than b's group, so a was evicted the moment it was ready, unused, and loaded
    # again after b: a wasted load (minutes on a real GPU) and a longer wait for everyone.
    switcher, systemd, _, _ = parts
    first_a = switcher.request("a")
    to_b = switcher.request("b")
    joined_a = switcher.request("a")
    switcher.cancel(first_a)
    assert await serve_all([joined_a, to_b]) == ["a", "b"]
    assert [c for c in systemd.calls if c.startswith("start")] == [
        "start llm-backend-llamacpp-a.service",
        "start llm-backend-sglang-b.service",
    ]


async def test_the_log_names_every_wait_load_and_served_group_so_the_storm_can_replay_it(parts, caplog):
    switcher, _, _, _ = parts
    caplog.set_level(logging.INFO, logger="llm_router.switcher")
    running = await lease_of(switcher.request("c"))  # request #1
    tickets = [switcher.request(m) for m in ["a", "b", "a", "b"]]  # #2-#5
    gone = switcher.request("a")  # #6, its client goes away
    switcher.cancel(gone)
    running.release()
    assert await serve_all(tickets) == ["a", "a", "b", "b"]
    log = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records)
    for line in (
        "request #2 for a waits (1 waiting)",
        "request #6 for a left the queue (its client went away)",
        "stopping llm-backend-tabbyapi-c.service (switch)",
        "stopped llm-backend-tabbyapi-c.service",
        "loading a: starting llm-backend-llamacpp-a.service",
        "serving 2 waiting request(s) for a: #2 #4",
        "serving 2 waiting request(s) for b: #3 #5",
    ):
        assert f"INFO llm_router.switcher: {line}" in log
    # tests/e2e/storm.py reads exactly these lines: one load per batch of waiting requests, nothing amiss.
    everything = {"a", "b", "c"}
    replay = SwitchReplay.parse(
        log,
        {m: everything - {m} for m in everything},
        set(),
        {m.unit: m.id for m in switcher.config.models.values()},
    )
    assert replay.problems == []
    assert replay.loads == replay.needed == Counter({"a": 1, "b": 1, "c": 1})
    assert (replay.waited, replay.left, replay.alternations) == (6, 1, 2)


async def test_unit_that_exits_fails_every_waiter_with_log_lines_and_next_request_retries(parts):
    switcher, systemd, _, clock = parts
    systemd.exit_on_start.add("llm-backend-llamacpp-a.service")
    tickets = [switcher.request("a") for _ in range(3)]
    started = clock.now
    for ticket in tickets:
        with pytest.raises(SwitchFailed) as failure:
            await lease_of(ticket)
        assert "exited while loading (failed)" in failure.value.reason
        assert failure.value.log_lines == ["error: llm-backend-llamacpp-a.service could not load the model file"]
    assert clock.now - started < 1.0, "a unit that exits must fail at once, not after the load timeout"
    assert switcher.model_status("a") is ModelStatus.FAILED
    systemd.exit_on_start.clear()
    lease = await lease_of(switcher.request("a"))
    assert switcher.model_status("a") is ModelStatus.LOADED
    # the failed unit was reset (stopped) before the retry started it again
    assert systemd.calls[-2:] == ["stop llm-backend-llamacpp-a.service", "start llm-backend-llamacpp-a.service"]
    lease.release()


async def test_load_timeout_stops_the_unit_and_reports_it(parts):
    switcher, systemd, probe, clock = parts
    probe.never_ready.add("llm-backend-llamacpp-a.service")
    started = clock.now
    with pytest.raises(SwitchFailed) as failure:
        await lease_of(switcher.request("a"))
    assert "load timeout of 30 s" in failure.value.reason
    assert 30.0 <= clock.now - started < 32.0
    assert systemd.calls[-1] == "stop llm-backend-llamacpp-a.service"
    assert switcher.model_status("a") is ModelStatus.FAILED


async def test_readiness_is_polled_fast_then_backs_off_to_one_second(parts):
    switcher, _, probe, clock = parts
    probe.load_polls = 60
    started = clock.now
    (await lease_of(switcher.request("a"))).release()
    # the first seconds are polled every 0.05 s: an engine ready after 3 s is noticed within 0.05 s
    assert 2.9 < clock.now - started < 3.1
    probe.load_polls = 120
    started = clock.now
    (await lease_of(switcher.request("b"))).release()
    elapsed = clock.now - started
    # 100 polls in the first 5 s, then 0.075 s growing by 1.5x to 1 s, then 1 s each:
    # ~17.5 s for 120 polls (fixed 0.05 s: 6 s; the seed's fixed 2 s ticks: 238 s)
    assert 16 < elapsed < 19


async def test_disconnected_waiter_leaves_queue_but_load_goes_on(parts):
    switcher, systemd, _, _ = parts
    gate = asyncio.Event()
    systemd.start_gate = gate
    ticket = switcher.request("a")
    assert isinstance(ticket, Ticket)
    await asyncio.sleep(0)
    switcher.cancel(ticket)
    assert switcher.waiters == []
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert switcher.model_status("a") is ModelStatus.LOADED
    assert switcher.in_flight == 0
    assert isinstance(switcher.request("a"), Lease)


async def test_queue_limit_raises_queue_full() -> None:
    clock = FakeClock()
    systemd = FakeSystemd()
    switcher = Switcher(make_config(queue_limit=2), systemd, FakeProbe(systemd), clock=clock, sleep=clock.sleep)
    switcher.request("a")
    switcher.request("a")
    with pytest.raises(QueueFull):
        switcher.request("a")


async def test_warm_up_runs_for_backends_that_want_it(parts):
    switcher, _, probe, _ = parts
    (await lease_of(switcher.request("c"))).release()
    (await lease_of(switcher.request("a"))).release()
    assert probe.warmups == ["c"]


async def test_estimate_comes_from_previous_loads(parts):
    switcher, _, _, _ = parts
    assert switcher.estimate("a") is None
    (await lease_of(switcher.request("a"))).release()
    (await lease_of(switcher.request("b"))).release()
    ticket = switcher.request("a")
    assert isinstance(ticket, Ticket)
    info = switcher.wait_info(ticket)
    assert info.estimate is not None and info.estimate > 0
    (await lease_of(ticket)).release()


async def test_adopts_the_unit_systemd_already_runs(parts):
    switcher, systemd, _, _ = parts
    systemd.running.update({"llm-backend-sglang-b.service", "llm-backend-llamacpp-a.service"})
    await switcher.adopt_running_unit()
    assert "stop llm-backend-sglang-b.service" in systemd.calls
    assert switcher.model_status("a") is ModelStatus.LOADING
    for _ in range(20):
        await asyncio.sleep(0)
    assert switcher.model_status("a") is ModelStatus.LOADED
    assert isinstance(switcher.request("a"), Lease)
    assert not any(c.startswith("start") for c in systemd.calls)


async def test_stop_failure_fails_the_switch(parts):
    switcher, systemd, _, _ = parts
    (await lease_of(switcher.request("a"))).release()

    async def refuse(unit: str) -> None:
        raise UnitError(f"systemctl stop {unit} failed: Access denied")

    systemd.stop = refuse  # type: ignore[method-assign]
    with pytest.raises(SwitchFailed) as failure:
        await lease_of(switcher.request("b"))
    assert "Access denied" in failure.value.reason


async def test_engine_failure_report_marks_model_failed_when_unit_died(parts):
    switcher, systemd, _, _ = parts
    (await lease_of(switcher.request("a"))).release()
    systemd.running.discard("llm-backend-llamacpp-a.service")
    systemd.failed.add("llm-backend-llamacpp-a.service")
    switcher.report_engine_failure("a")
    for _ in range(5):
        await asyncio.sleep(0)
    assert switcher.model_status("a") is ModelStatus.FAILED
    lease = await lease_of(switcher.request("a"))
    assert systemd.calls[-2:] == ["stop llm-backend-llamacpp-a.service", "start llm-backend-llamacpp-a.service"]
    lease.release()


async def test_reload_removing_a_model_fails_its_waiters(parts):
    switcher, _, _, _ = parts
    running = await lease_of(switcher.request("a"))
    ticket = switcher.request("b")
    config = make_config()
    models = {k: v for k, v in config.models.items() if k != "b"}
    switcher.update_config(RouterConfig(backends=config.backends, models=models))
    with pytest.raises(SwitchFailed, match="removed"):
        await lease_of(ticket)
    running.release()
    assert "b" not in switcher.status


class StopTimesOut(FakeSystemd):
    """`systemctl stop` that cannot even be run: create_subprocess_exec raises EMFILE."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_timeouts = 1

    async def stop(self, unit: str) -> None:
        if self.stop_timeouts:
            self.stop_timeouts -= 1
            self.calls.append(f"stop {unit} (EMFILE)")
            raise OSError(24, "Too many open files")
        await super().stop(unit)


async def test_a_stop_that_raises_oserror_fails_the_waiters_instead_of_wedging_the_switcher() -> None:
    clock = FakeClock()
    systemd = StopTimesOut()
    switcher = Switcher(make_config(), systemd, FakeProbe(systemd), clock=clock, sleep=clock.sleep)
    (await lease_of(switcher.request("a"))).release()
    ticket = switcher.request("b")  # needs a's unit stopped: that stop fails with OSError
    with pytest.raises(SwitchFailed):
        await asyncio.wait_for(lease_of(ticket), 2)
    lease = await asyncio.wait_for(lease_of(switcher.request("b")), 2)  # the very next request works
    lease.release()
