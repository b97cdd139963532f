"""Filters of the llm_router role for several engines at once (issue 8): resources, needs, ports, aliases.

Pure Python on plain data (no Ansible imports beyond the plugin class), so tests/role/ tests them directly. The
rules mirror the router's own (router_app/config.py, `llm-router check-config`), which validates the rendered
models.yml again before it lands:

- `resources` (name -> capacity > 0); empty or unset means the router's default `{gpu: 1}`.
- A model's `needs` (resource -> amount >= 0) is what it holds while its unit runs; a resource it does not name
  counts 0 (`needs: {}` holds nothing); no `needs` at all holds every resource at full capacity.
- Models can run at the same time when, for every resource, their needs summed stay within its capacity.
- A vLLM model with `sleep` (issue 9) is put to sleep instead of stopped: its unit keeps running and it holds its
  `needs_asleep` (default `{}`: nothing) while another model runs. So it may be asleep beside any model whose needs fit
  beside its needs_asleep, and its unit must not conflict with that model's.

Used by templates/preflight_problems.yml.j2 (`llm_router_lifecycle_problems`) and templates/backend.service.j2
(`llm_router_conflicts`: Conflicts= only between models that can never run together).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_RESOURCES: dict[str, float] = {"gpu": 1.0}
SLEEP_LEVELS = (1, 2)  # vLLM's sleep levels (router_app/config.py SLEEP_LEVELS)
EPSILON = 1e-9  # the router's tolerance when summing needs (router_app/config.py RouterConfig.fits)
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # vars/main.yml _llm_router_model_id_pattern


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    """A number, or a string holding one (`-e name=value` hands strings over); None otherwise."""
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _fmt(value: Any) -> str:
    """A number as people write it (2, 0.5), anything else as JSON would show it."""
    if _is_number(value):
        return f"{float(value):g}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _where(index: int, model: Any) -> str:
    where = f"llm_router_models[{index}]"
    if isinstance(model, Mapping) and isinstance(model.get("id"), str):
        where += f' (id "{model["id"]}")'
    return where


def effective_resources(resources: Any) -> dict[str, float]:
    """The capacities the router will use: the valid entries of `resources`, else its default {gpu: 1}."""
    out: dict[str, float] = {}
    if isinstance(resources, Mapping):
        for name, capacity in resources.items():
            amount = _as_number(capacity)
            if isinstance(name, str) and name and amount is not None and amount > 0:
                out[name] = amount
    return out or dict(DEFAULT_RESOURCES)


def model_needs(model: Any, resources: Any) -> dict[str, float]:
    """What `model` holds while its unit runs, over the effective resources (unreadable needs: everything)."""
    capacity = effective_resources(resources)
    needs = model.get("needs") if isinstance(model, Mapping) else None
    if not isinstance(needs, Mapping):
        return dict(capacity)
    out = {}
    for name, cap in capacity.items():
        amount = _as_number(needs.get(name, 0))
        out[name] = cap if amount is None or amount < 0 else amount
    return out


def can_sleep(model: Any) -> bool:
    """Whether the router puts this model to sleep instead of stopping its unit (a vllm model with `sleep` set)."""
    return isinstance(model, Mapping) and model.get("backend") == "vllm" and model.get("sleep") is not None


def model_needs_asleep(model: Any, resources: Any) -> dict[str, float]:
    """What a sleep-capable `model` holds while asleep, over the effective resources (unset or unreadable: nothing)."""
    capacity = effective_resources(resources)
    needs = model.get("needs_asleep") if isinstance(model, Mapping) else None
    if not isinstance(needs, Mapping):
        return dict.fromkeys(capacity, 0.0)
    out = {}
    for name in capacity:
        amount = _as_number(needs.get(name, 0))
        out[name] = 0.0 if amount is None or amount < 0 else amount
    return out


def asleep_beside(sleeper: Any, other: Any, resources: Any) -> bool:
    """Whether `sleeper` can be asleep (its unit running) while `other` runs: it can sleep and its needs_asleep fit
    beside the other's needs (past that the router stops the sleeper for real)."""
    return can_sleep(sleeper) and fits(
        [model_needs_asleep(sleeper, resources), model_needs(other, resources)], resources
    )


def fits(held: Sequence[Mapping[str, float]], resources: Any) -> bool:
    """Whether these needs, held together, stay within every capacity."""
    capacity = effective_resources(resources)
    return all(sum(n.get(name, 0.0) for n in held) <= cap + EPSILON for name, cap in capacity.items())


def conflicts(models: Any, resources: Any = None) -> dict[str, list[str]]:
    """For every model id, the ids of the models whose units can never run beside its unit (inventory order).

    Pairwise is exact: two models can run at the same time iff their two needs fit together (a running third model
    only makes it harder, never possible where the pair alone is not). With no resources and no needs anywhere every
    pair conflicts: one engine at a time, as before issue 8.

    Sleep (issue 9): `Conflicts=` means starting either unit stops the other. A sleep-capable model that the router
    puts to sleep to make room keeps its unit running, so a pair conflicts only when neither can be asleep beside the
    other (neither can sleep, or its needs_asleep do not fit beside the other's needs). Otherwise systemd would stop
    the sleeping engine when the other starts.
    """
    listed = [m for m in (models or []) if isinstance(m, Mapping) and isinstance(m.get("id"), str)]
    needs = {m["id"]: model_needs(m, resources) for m in listed}
    out: dict[str, list[str]] = {m["id"]: [] for m in listed}
    for i, first in enumerate(listed):
        for second in listed[i + 1 :]:
            if first["id"] == second["id"]:
                continue
            if fits([needs[first["id"]], needs[second["id"]]], resources):
                continue
            if asleep_beside(first, second, resources) or asleep_beside(second, first, resources):
                continue
            out[first["id"]].append(second["id"])
            out[second["id"]].append(first["id"])
    return out


def engine_port(model: Any, backend_ports: Mapping[str, Any]) -> int | None:
    """The port this model's engine listens on: its own `port`, else its backend's."""
    if not isinstance(model, Mapping):
        return None
    port = model.get("port")
    backend = model.get("backend")
    if port is None and isinstance(backend, str):
        port = backend_ports.get(backend)
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.strip().isdigit():
        return int(port.strip())
    return None


def _check_resources(resources: Any, problems: list[str]) -> None:
    if resources is None:
        return
    if not isinstance(resources, Mapping):
        problems.append(
            "llm_router_resources: must be a mapping of resource name to capacity, e.g. {gpu: 24}, got "
            + _fmt(resources)
        )
        return
    for name, capacity in resources.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"llm_router_resources: {_fmt(name)}: a resource name must be a non-empty string")
        elif not _is_number(capacity) or capacity <= 0:
            problems.append(
                f"llm_router_resources.{name}: capacity must be a number greater than 0, got {_fmt(capacity)}"
            )


def _check_needs(
    where: str, field: str, needs: Any, capacity: Mapping[str, float], resources_set: bool, problems: list[str]
) -> None:
    if not isinstance(needs, Mapping):
        problems.append(
            f"{where}: {field}: must be a mapping of resource name to amount, e.g. {{gpu: 8}}, got {_fmt(needs)}"
        )
        return
    known = ", ".join(capacity)
    source = "llm_router_resources" if resources_set else "the default resources, llm_router_resources unset"
    for name, amount in needs.items():
        if name not in capacity:
            problems.append(f"{where}: {field}.{name}: unknown resource ({source}: {known})")
        elif not _is_number(amount) or amount < 0:
            problems.append(f"{where}: {field}.{name}: must be a number, 0 or more, got {_fmt(amount)}")
        elif amount > capacity[name] + EPSILON:
            problems.append(
                f"{where}: {field}.{name}: {_fmt(amount)} is more than the capacity of {name} ({_fmt(capacity[name])})"
            )


def _check_model(
    index: int,
    model: Mapping[str, Any],
    capacity: Mapping[str, float],
    resources_set: bool,
    router_port: int | None,
    problems: list[str],
) -> None:
    where = _where(index, model)
    if "port" in model:
        port = model["port"]
        number = engine_port({"port": port}, {})
        if number is None or not 1 <= number <= 65535:
            problems.append(f"{where}: port: must be a port number 1-65535, got {_fmt(port)}")
        elif router_port is not None and number == router_port:
            problems.append(f"{where}: port: {number} is the port of the router itself (llm_router_port)")
    if "needs" in model:
        _check_needs(where, "needs", model["needs"], capacity, resources_set, problems)
    if model.get("sleep") is not None:  # null: not set (the router's default)
        sleep = model["sleep"]
        backend = model.get("backend")
        if isinstance(backend, str) and backend != "vllm":
            problems.append(
                f"{where}: sleep: only vllm models can sleep (vLLM's sleep mode), this one runs on {backend}"
            )
        if not _is_number(sleep) or sleep not in SLEEP_LEVELS:
            problems.append(
                f"{where}: sleep: must be 1 (weights offloaded to host RAM) or 2 (weights discarded), got {_fmt(sleep)}"
            )
        args = model.get("args")
        if isinstance(args, Sequence) and not isinstance(args, (str, Mapping)):
            for i, arg in enumerate(args):
                if isinstance(arg, str) and (arg == "--host" or arg.startswith("--host=")):
                    problems.append(
                        f"{where}: args[{i}]: {arg}: with sleep the engine serves vLLM's unauthenticated dev-mode "
                        "endpoints (VLLM_SERVER_DEV_MODE=1); it must stay on 127.0.0.1, where the role binds it"
                    )
    if "needs_asleep" in model:
        if model.get("sleep") is None:
            problems.append(f"{where}: needs_asleep: only a model with sleep set is ever asleep (set sleep: 1 or 2)")
        _check_needs(where, "needs_asleep", model["needs_asleep"], capacity, resources_set, problems)
    if "idle_unload" in model:
        value = model["idle_unload"]
        if not _is_number(value) or value < 0:
            problems.append(f"{where}: idle_unload: must be a number of seconds, 0 (never) or more, got {_fmt(value)}")
    if "preload" in model and not isinstance(model["preload"], bool):
        problems.append(f"{where}: preload: must be true or false, got {_fmt(model['preload'])}")
    if "aliases" in model:
        aliases = model["aliases"]
        if isinstance(aliases, (str, Mapping)) or not isinstance(aliases, Sequence):
            problems.append(f"{where}: aliases: must be a list of model ids, got {_fmt(aliases)}")
        else:
            for i, alias in enumerate(aliases):
                if not isinstance(alias, str) or not re.match(MODEL_ID_PATTERN, alias):
                    problems.append(
                        f'{where}: aliases[{i}]: must be 1-128 characters: letters, digits, ".", "_", ":", '
                        f'"-", starting with a letter or digit, got {_fmt(alias)}'
                    )


def lifecycle_problems(
    models: Any,
    resources: Any = None,
    current_alias: Any = None,
    idle_unload: Any = 0,
    backend_ports: Mapping[str, Any] | None = None,
    router_port: Any = None,
) -> list[str]:
    """Every problem with the issue-8 settings, each naming the variable, the model and the field.

    `models` may be malformed (the preflight template reports the basic shape problems itself): entries that are
    not mappings are skipped here.
    """
    problems: list[str] = []
    backend_ports = backend_ports or {}
    resources_set = isinstance(resources, Mapping) and len(resources) > 0
    _check_resources(resources, problems)
    capacity = effective_resources(resources)

    if idle_unload is not None and idle_unload != "":
        value = _as_number(idle_unload)
        if isinstance(idle_unload, bool) or value is None or value < 0:
            problems.append(
                f"llm_router_idle_unload: must be a number of seconds, 0 (never) or more, got {_fmt(idle_unload)}"
            )

    port_of_router = engine_port({"port": router_port}, {})
    listed = list(models) if isinstance(models, Sequence) and not isinstance(models, (str, Mapping)) else []
    entries = [(i, m) for i, m in enumerate(listed) if isinstance(m, Mapping)]
    for index, model in entries:
        _check_model(index, model, capacity, resources_set, port_of_router, problems)

    # Names: ids, aliases and the current alias share one namespace.
    owner: dict[str, tuple[int, Any]] = {}
    for index, model in entries:
        if isinstance(model.get("id"), str):
            owner.setdefault(model["id"], (index, model))
    for index, model in entries:
        aliases = model.get("aliases")
        if isinstance(aliases, (str, Mapping)) or not isinstance(aliases, Sequence):
            continue
        for alias in aliases:
            if not isinstance(alias, str):
                continue
            if alias in owner:
                other_index, other = owner[alias]
                what = "the id" if other.get("id") == alias else "already an alias"
                problems.append(
                    f"{_where(index, model)}: aliases: {_fmt(alias)} is {what} of {_where(other_index, other)}"
                )
            else:
                owner[alias] = (index, model)
    if current_alias is not None and current_alias != "":
        if not isinstance(current_alias, str) or not re.match(MODEL_ID_PATTERN, current_alias):
            problems.append(
                'llm_router_current_alias: must be a model id (letters, digits, ".", "_", ":", "-") or empty, '
                f"got {_fmt(current_alias)}"
            )
        elif current_alias in owner:
            other_index, other = owner[current_alias]
            what = "the id" if other.get("id") == current_alias else "an alias"
            problems.append(
                f"llm_router_current_alias: {_fmt(current_alias)} is already {what} of {_where(other_index, other)}"
            )

    # Two models that can run at the same time need two engine URLs (host is always 127.0.0.1: ports); so do two
    # models one of which can be asleep (its engine still listening) while the other runs.
    with_ids = [(i, m) for i, m in entries if isinstance(m.get("id"), str)]
    for a, (first_index, first) in enumerate(with_ids):
        for second_index, second in with_ids[a + 1 :]:
            port = engine_port(first, backend_ports)
            if port is None or port != engine_port(second, backend_ports):
                continue
            first_needs, second_needs = model_needs(first, resources), model_needs(second, resources)
            if fits([first_needs, second_needs], resources):
                together = ", ".join(
                    f"{name} {_fmt(first_needs[name])} + {_fmt(second_needs[name])} <= {_fmt(cap)}"
                    for name, cap in capacity.items()
                )
                problems.append(
                    f"{_where(second_index, second)}: port: {port} is also the engine port of "
                    f"{_where(first_index, first)}, and their needs let both run at once ({together}): give one "
                    "of them its own port"
                )
            elif asleep_beside(first, second, resources) or asleep_beside(second, first, resources):
                sleeper, awake = (first, second) if asleep_beside(first, second, resources) else (second, first)
                problems.append(
                    f"{_where(second_index, second)}: port: {port} is also the engine port of "
                    f'{_where(first_index, first)}, and "{sleeper["id"]}" (sleep: {_fmt(sleeper.get("sleep"))}) '
                    f'keeps its engine and port while asleep beside "{awake["id"]}": give one of them its own port'
                )

    preload = [(i, m) for i, m in with_ids if m.get("preload") is True]
    if preload:
        held = [model_needs(m, resources) for _, m in preload]
        if not fits(held, resources):
            over = ", ".join(
                f"{name} {' + '.join(_fmt(n[name]) for n in held)} = {_fmt(sum(n[name] for n in held))} > {_fmt(cap)}"
                for name, cap in capacity.items()
                if sum(n[name] for n in held) > cap + EPSILON
            )
            ids = ", ".join(f'"{m["id"]}"' for _, m in preload)
            problems.append(
                f"llm_router_models: preload: the models with preload: true ({ids}) cannot all run at once ({over})"
            )
    return problems


class FilterModule:
    """llm_router_conflicts, llm_router_lifecycle_problems, llm_router_model_needs, llm_router_engine_port."""

    def filters(self) -> dict[str, Any]:
        return {
            "llm_router_conflicts": conflicts,
            "llm_router_lifecycle_problems": lifecycle_problems,
            "llm_router_model_needs": model_needs,
            "llm_router_engine_port": engine_port,
        }
