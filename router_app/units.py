"""Control engine units through systemctl (or a stand-in named in config.yml) and read their journal."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class UnitError(Exception):
    """systemctl refused or failed; the message carries its output."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class ServiceManager(Protocol):
    """What the switcher needs from systemd. Tests inject fakes; production shells out to systemctl."""

    async def start(self, unit: str) -> None: ...

    async def stop(self, unit: str) -> None: ...

    async def states(self, units: Sequence[str]) -> dict[str, str]:
        """ActiveState per unit: active, activating, deactivating, inactive, failed (unknown units: inactive)."""
        ...

    async def last_log_lines(self, unit: str, lines: int = 20) -> list[str]: ...


async def run_command(argv: Sequence[str], timeout: float | None = None) -> CommandResult:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        # Timeout or cancellation: never leave a systemctl child behind.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return CommandResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


class Systemctl:
    """ServiceManager over `systemctl`/`journalctl` argv prefixes from config.yml."""

    def __init__(self, systemctl: Sequence[str], journalctl: Sequence[str], command_timeout: float = 300.0) -> None:
        self.systemctl = tuple(systemctl)
        self.journalctl = tuple(journalctl)
        # `systemctl stop` waits for the unit's whole cgroup to exit (TimeoutStopSec bounds it): allow for that.
        self.command_timeout = command_timeout

    async def _run(self, *args: str) -> CommandResult:
        try:
            return await run_command([*self.systemctl, *args], self.command_timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            # A stuck job or D-Bus: the switcher handles UnitError everywhere (a bare TimeoutError wedged a stop).
            raise UnitError(f"systemctl {' '.join(args)} did not return within {self.command_timeout:g} s") from None

    async def start(self, unit: str) -> None:
        result = await self._run("start", unit)
        if result.returncode != 0:
            raise UnitError(f"systemctl start {unit} failed: {_brief(result)}")

    async def stop(self, unit: str) -> None:
        result = await self._run("stop", unit)
        if result.returncode != 0:
            raise UnitError(f"systemctl stop {unit} failed: {_brief(result)}")

    async def states(self, units: Sequence[str]) -> dict[str, str]:
        if not units:
            return {}
        # is-active prints one state per unit and needs no privilege; its exit code only says "not all active".
        result = await self._run("is-active", *units)
        lines = result.stdout.split()
        if len(lines) != len(units):
            raise UnitError(f"systemctl is-active gave {len(lines)} states for {len(units)} units: {_brief(result)}")
        return {unit: ("inactive" if state == "unknown" else state) for unit, state in zip(units, lines, strict=True)}

    async def last_log_lines(self, unit: str, lines: int = 20) -> list[str]:
        try:
            result = await run_command(
                [*self.journalctl, "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat", "-q"], 10.0
            )
        except (OSError, TimeoutError) as exc:
            return [f"(could not read the journal of {unit}: {exc})"]
        text = result.stdout.strip() or result.stderr.strip()
        return text.splitlines()[-lines:] if text else []


def _brief(result: CommandResult) -> str:
    text = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()
    return " / ".join(text[-3:])
