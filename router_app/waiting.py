"""What a client that waits for a model switch is told, and when (sans-IO: fed the switcher's WaitInfo, returns
the status line to send or None).

A line goes out at once when what the client waits for changes (the phase, or the model it waits on, or the number
of answers it waits for), and otherwise once every `repeat_every` seconds with the time elapsed, so every repeated
line says something new: two identical lines are never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router_app import annotations as texts
from router_app.switcher import Phase, WaitInfo


@dataclass(frozen=True)
class _Situation:
    """What the client waits for, compared as values to tell a change from a repeat."""

    phase: Phase
    subject: str | None
    """The model the wait is about: the one draining, stopping or loading first; the target while it loads."""
    running: int = 0


# Starting the unit, loading the weights and the warm-up request are one step for a user.
_LOADING = {Phase.STARTING: Phase.LOADING, Phase.WARMING: Phase.LOADING}


class WaitingStatus:
    def __init__(self, target_name: str, names: Mapping[str, str], repeat_every: float, waiting_since: float) -> None:
        self.target_name = target_name
        self.names = names
        """Display names by model id."""
        self.repeat_every = repeat_every
        self.waiting_since = waiting_since
        self._shown: _Situation | None = None
        self._sent_at = waiting_since
        self._last_line = ""

    def line(self, info: WaitInfo) -> str | None:
        situation = _situation(info)
        if situation == self._shown and info.now - self._sent_at < self.repeat_every:
            return None
        text = self._text(situation, info)
        if text == self._last_line:
            return None
        self._shown, self._sent_at, self._last_line = situation, info.now, text
        return text

    def _name(self, model_id: str | None) -> str:
        return "another model" if model_id is None else self.names.get(model_id, model_id)

    def _text(self, situation: _Situation, info: WaitInfo) -> str:
        waited = info.now - self.waiting_since
        phase = situation.phase
        if phase is Phase.DRAINING:
            return texts.waiting_line(situation.running, self._name(situation.subject), waited)
        if phase is Phase.STOPPING:
            return texts.stopping_line(self._name(situation.subject), waited)
        if phase is Phase.QUEUED:
            if situation.subject is None:
                return texts.queued_line(self.target_name, waited)
            return texts.loading_elsewhere_line(self._name(situation.subject), waited)
        loading_for = waited if info.load_started is None else info.now - info.load_started
        if phase is Phase.WAKING:
            return texts.waking_line(self.target_name, loading_for, info.timeout, info.estimate)
        return texts.loading_line(self.target_name, loading_for, info.timeout, info.estimate)


def _situation(info: WaitInfo) -> _Situation:
    phase = _LOADING.get(info.phase, info.phase)
    if phase is Phase.DRAINING:
        return _Situation(phase, info.active, max(info.in_flight, 1))
    if phase in (Phase.STOPPING, Phase.QUEUED):
        return _Situation(phase, info.active)
    return _Situation(phase, info.target)
