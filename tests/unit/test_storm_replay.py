"""The storm's replay of the switcher's log (tests/e2e/storm.py, `SwitchReplay`): its minimum of unit starts and
the faults it must refuse, on hand-written logs (the lines as router_app/switcher.py writes them)."""

from __future__ import annotations

from collections import Counter

from tests.e2e.storm import SwitchReplay

CONFLICTS = {"a": {"x"}, "e": {"x"}, "x": {"a", "e"}}
UNITS = {f"u-{m}.service": m for m in CONFLICTS}


def replay(*lines: str, idle: frozenset[str] = frozenset({"e"})) -> SwitchReplay:
    log = "\n".join(["INFO llm_router: llm-router listening", *(f"INFO llm_router.switcher: {x}" for x in lines)])
    return SwitchReplay.parse(log, CONFLICTS, set(idle), UNITS)


def wait(n: int, model: str) -> str:
    return f"request #{n} for {model} waits (1 waiting)"


def load(model: str) -> str:
    return f"loading {model}: starting u-{model}.service"


def ready(model: str) -> str:
    return f"model {model} ready in 0.30 s (unit u-{model}.service)"


def serve(model: str, *numbers: int) -> str:
    return f"serving {len(numbers)} waiting request(s) for {model}: " + " ".join(f"#{n}" for n in numbers)


def stop(model: str, reason: str = "switch") -> list[str]:
    return [f"stopping u-{model}.service ({reason})", f"stopped u-{model}.service"]


def test_requests_that_waited_together_need_one_load_and_a_switch_back_needs_another():
    result = replay(
        wait(1, "a"), load("a"), wait(2, "a"), wait(3, "x"), ready("a"), serve("a", 1, 2),
        wait(4, "a"),  # a is loaded but must make room for x first (no overtaking): a second batch of a
        *stop("a"), load("x"), ready("x"), serve("x", 3), *stop("x"), load("a"), ready("a"), serve("a", 4),
    )  # fmt: skip
    assert result.problems == []
    assert result.needed == result.loads == Counter({"a": 2, "x": 1})
    assert result.alternations == 2 and result.waited == 4


def test_a_request_left_waiting_when_its_model_became_ready_is_broken_grouping_and_its_load_is_not_needed():
    result = replay(
        wait(1, "a"), wait(2, "x"), wait(3, "a"), load("a"), ready("a"), serve("a", 1),  # #3 was waiting too
        *stop("a"), load("x"), ready("x"), serve("x", 2), *stop("x"), load("a"), ready("a"), serve("a", 3),
    )  # fmt: skip
    assert result.needed == Counter({"a": 1, "x": 1})
    assert result.loads == Counter({"a": 2, "x": 1})  # 3 starts where 2 were needed: the storm's ×1.2 fails
    assert any("[3] for a waited through its load" in p for p in result.problems)


def test_two_loads_at_once_a_start_before_the_stop_finished_and_needless_stops_are_refused():
    twice = replay(wait(1, "a"), load("a"), load("a"), ready("a"), serve("a", 1))
    assert any("two loads of a at once" in p for p in twice.problems)
    early = replay(
        wait(1, "a"), load("a"), ready("a"), serve("a", 1), wait(2, "x"),
        "stopping u-a.service (switch)", load("x"), "stopped u-a.service", ready("x"), serve("x", 2),
    )  # fmt: skip
    assert any("x started while the conflicting a still held its resources" in p for p in early.problems)
    needless = replay(wait(1, "a"), load("a"), ready("a"), serve("a", 1), wait(2, "e"), *stop("a"))
    assert any("needless switch stop of a" in p for p in needless.problems)
    not_idle = replay(wait(1, "a"), load("a"), ready("a"), serve("a", 1), *stop("a", "idle"))
    assert any("idle stop of a, which has no idle_unload" in p for p in not_idle.problems)


def test_an_idle_restart_is_needed_and_a_batch_whose_clients_all_left_needs_a_load_only_if_one_began():
    result = replay(
        wait(1, "e"), load("e"), ready("e"), serve("e", 1), *stop("e", "idle"),
        wait(2, "e"), load("e"), "request #2 for e left the queue (its client went away)", ready("e"),
        wait(3, "x"), "request #3 for x left the queue (its client went away)",  # left before any load began
    )  # fmt: skip
    assert result.needed == result.loads == Counter({"e": 2})
    assert result.left == 2
    assert result.problems == []
