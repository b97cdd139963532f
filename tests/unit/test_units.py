"""Systemctl (router_app.units) over real child processes: failures and timeouts are UnitErrors naming the call."""

from __future__ import annotations

import sys

import pytest

from router_app.units import Systemctl, UnitError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
FAILER = [sys.executable, "-c", "import sys; sys.stderr.write('Failed: Access denied\\n'); sys.exit(1)"]


async def test_a_systemctl_call_that_outlives_the_command_timeout_is_a_unit_error() -> None:
    # A bare TimeoutError escaped the switcher's `except UnitError` and left a stopping slot stuck for good.
    services = Systemctl(SLEEPER, SLEEPER, command_timeout=0.5)
    for call in (services.stop("llm-backend-x.service"), services.start("llm-backend-x.service")):
        with pytest.raises(UnitError, match=r"llm-backend-x\.service did not return within 0\.5 s"):
            await call
    with pytest.raises(UnitError, match="is-active"):
        await services.states(["llm-backend-x.service"])


async def test_a_refused_call_is_a_unit_error_with_systemctls_words() -> None:
    services = Systemctl(FAILER, FAILER)
    with pytest.raises(UnitError, match=r"systemctl stop llm-backend-x\.service failed: Failed: Access denied"):
        await services.stop("llm-backend-x.service")
