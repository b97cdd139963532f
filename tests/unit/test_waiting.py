"""Status lines for a client waiting for a switch: a change shows at once, a repeat only after the interval and
with the new elapsed time, never two identical lines, and each phase names the model it is about."""

from __future__ import annotations

from router_app.switcher import Phase, WaitInfo
from router_app.waiting import WaitingStatus

NAMES = {"a": "Model A", "b": "Model B"}


def info(
    phase: Phase, now: float, active: str | None = None, in_flight: int = 0, started: float | None = None
) -> WaitInfo:
    return WaitInfo(phase, "b", active, in_flight, started, 600, None, now)


def status(repeat_every: float = 2.0) -> WaitingStatus:
    return WaitingStatus("Model B", NAMES, repeat_every, waiting_since=100.0)


def test_each_phase_names_the_model_it_waits_on() -> None:
    s = status()
    assert (
        s.line(info(Phase.DRAINING, 100.5, "a", 2))
        == "⏳ Waiting for 2 running answers on Model A to finish, 0.5 s elapsed\n"
    )
    assert s.line(info(Phase.STOPPING, 101.0, "a")) == "⏳ Stopping Model A, 1.0 s elapsed\n"
    assert s.line(info(Phase.STARTING, 101.5, started=101.5)) == "⏳ Loading Model B: 0.0 s elapsed, timeout 600 s\n"


def test_queued_behind_another_load_says_so_not_running_answers() -> None:
    s = status()
    assert s.line(info(Phase.QUEUED, 100.2, "a")) == "⏳ Waiting for Model A to finish loading, 0.2 s elapsed\n"
    assert status().line(info(Phase.QUEUED, 100.2, None)) == "⏳ Queued to load Model B, 0.2 s elapsed\n"


def test_same_situation_repeats_only_after_the_interval_with_the_new_time() -> None:
    s = status(repeat_every=2.0)
    assert s.line(info(Phase.LOADING, 101.0, started=100.0)) is not None
    assert s.line(info(Phase.LOADING, 102.0, started=100.0)) is None
    assert s.line(info(Phase.LOADING, 103.0, started=100.0)) == "⏳ Loading Model B: 3.0 s elapsed, timeout 600 s\n"


def test_starting_loading_and_warming_are_one_step() -> None:
    s = status()
    assert s.line(info(Phase.STARTING, 100.1, started=100.0)) is not None
    assert s.line(info(Phase.LOADING, 100.2, started=100.0)) is None
    assert s.line(info(Phase.WARMING, 100.3, started=100.0)) is None


def test_a_change_of_count_or_model_shows_at_once() -> None:
    s = status()
    assert s.line(info(Phase.DRAINING, 100.1, "a", 2)) is not None
    assert (
        s.line(info(Phase.DRAINING, 100.2, "a", 1))
        == "⏳ Waiting for 1 running answer on Model A to finish, 0.2 s elapsed\n"
    )
    assert s.line(info(Phase.QUEUED, 100.3, "a")) is not None
    assert s.line(info(Phase.WAKING, 100.4, started=100.4)) == "⏳ Waking Model B: 0.0 s elapsed, timeout 600 s\n"


def test_never_two_identical_lines() -> None:
    s = status(repeat_every=0.0)
    lines = [s.line(info(Phase.QUEUED, 100.0 + i * 0.01, "a")) for i in range(20)]
    sent = [line for line in lines if line is not None]
    assert len(sent) == len(set(sent)) == 3  # 0.0, 0.1 and 0.2 s elapsed at 0.1 s resolution (0.00 .. 0.19)
