"""Last: nothing left failed, and the polkit rule's other half (the router's user may start/stop backend units).

The start/stop test runs last: Conflicts= makes it stop whatever engine the router has loaded, behind its back."""

from __future__ import annotations

from typing import Any

from conftest import MODEL_IDS, ROUTER_UNIT, active_backend_units, is_active, run_as_router_user, unit_of


def test_no_failed_units(box: Any) -> None:
    failed = box.run("systemctl --failed --no-legend --plain").stdout.strip()
    assert failed == "", failed


def test_router_still_active(box: Any) -> None:
    assert is_active(box, ROUTER_UNIT) == "active"


def test_at_most_one_engine(box: Any) -> None:
    running = [m for m in MODEL_IDS if is_active(box, unit_of(m)) in ("active", "activating")]
    assert len(running) <= 1, running


def test_router_user_can_start_and_stop_a_backend_unit(box: Any) -> None:
    """The polkit rule's other half, on a backend unit that is not running now."""
    running = active_backend_units(box)
    unit = next(unit_of(m) for m in reversed(MODEL_IDS) if unit_of(m) not in running)
    try:
        res = run_as_router_user(box, f"systemctl --no-ask-password start {unit}")
        assert res.rc == 0, res.stderr
        assert is_active(box, unit) in ("active", "activating")
    finally:
        res = run_as_router_user(box, f"systemctl --no-ask-password stop {unit}")
    assert res.rc == 0, res.stderr
    assert is_active(box, unit) in ("inactive", "failed")
