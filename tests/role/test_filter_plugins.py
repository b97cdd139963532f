"""roles/llm_router/filter_plugins/llm_router_lifecycle.py: which units conflict, and what the preflight refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.role.role_render import load_module

PLUGIN = Path(__file__).resolve().parents[2] / "roles/llm_router/filter_plugins/llm_router_lifecycle.py"


lc = load_module(PLUGIN, "llm_router_lifecycle")
PORTS = {"llamacpp": 8085, "sglang": 30000, "tabbyapi": 5000}


def model(model_id: str, backend: str = "llamacpp", **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": backend, "model": f"/m/{model_id}", **extra}


def problems(models: list[Any], **kwargs: Any) -> list[str]:
    kwargs.setdefault("backend_ports", PORTS)
    kwargs.setdefault("router_port", 8002)
    result: list[str] = lc.lifecycle_problems(models, **kwargs)
    return result


# --- conflicts (Conflicts= of the units) ---------------------------------------------------------------------


def test_without_resources_or_needs_every_pair_conflicts() -> None:
    models = [model("a"), model("b", "sglang"), model("c", "tabbyapi")]
    assert lc.conflicts(models, {}) == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    assert lc.conflicts(models, None) == lc.conflicts(models, {})


def test_one_model_conflicts_with_nothing() -> None:
    assert lc.conflicts([model("a")], {}) == {"a": []}


def test_needs_that_fit_together_do_not_conflict() -> None:
    models = [
        model("embed", needs={"gpu": 2}),
        model("chat-a", needs={"gpu": 16}),
        model("chat-b", "sglang", needs={"gpu": 20}),
        model("small", "tabbyapi", needs={"gpu": 2}),
    ]
    assert lc.conflicts(models, {"gpu": 24}) == {"embed": [], "chat-a": ["chat-b"], "chat-b": ["chat-a"], "small": []}


def test_exactly_full_capacity_fits() -> None:
    models = [model("a", needs={"gpu": 0.5}), model("b", needs={"gpu": 0.5})]
    assert lc.conflicts(models, {}) == {"a": [], "b": []}  # default {gpu: 1}
    models = [model("a", needs={"gpu": 0.1}), model("b", needs={"gpu": 0.2}), model("c", needs={"gpu": 0.7})]
    assert lc.conflicts(models, {}) == {"a": [], "b": [], "c": []}  # 0.1 + 0.2 + 0.7 in floats


def test_a_model_without_needs_holds_everything_but_fits_beside_needs_nothing() -> None:
    models = [model("big"), model("cpu", needs={}), model("small", needs={"gpu": 0.1})]
    assert lc.conflicts(models, {"gpu": 1}) == {"big": ["small"], "cpu": [], "small": ["big"]}


def test_one_gpu_each_on_a_two_gpu_host() -> None:
    resources = {"gpu0": 1, "gpu1": 1}
    models = [
        model("on0", needs={"gpu0": 1}),
        model("on1", needs={"gpu1": 1}),
        model("both", "sglang", needs={"gpu0": 1, "gpu1": 1}),
        model("on0b", needs={"gpu0": 1}),
    ]
    assert lc.conflicts(models, resources) == {
        "on0": ["both", "on0b"],
        "on1": ["both"],
        "both": ["on0", "on1", "on0b"],
        "on0b": ["on0", "both"],
    }


def test_unreadable_needs_count_as_everything() -> None:
    models = [model("a", needs={"gpu": "lots"}), model("b", needs={"gpu": 0.1})]
    assert lc.conflicts(models, {}) == {"a": ["b"], "b": ["a"]}


def test_model_needs_and_engine_port() -> None:
    assert lc.model_needs(model("a"), {"gpu": 24, "ram": 64}) == {"gpu": 24, "ram": 64}
    assert lc.model_needs(model("a", needs={"gpu": 4}), {"gpu": 24, "ram": 64}) == {"gpu": 4, "ram": 0}
    assert lc.engine_port(model("a"), PORTS) == 8085
    assert lc.engine_port(model("a", "sglang"), PORTS) == 30000
    assert lc.engine_port(model("a", port=8086), PORTS) == 8086
    assert lc.engine_port(model("a", port="8086"), PORTS) == 8086
    assert lc.engine_port(model("a", port=True), PORTS) is None


# --- preflight problems ---------------------------------------------------------------------------------------


def test_todays_inventories_have_no_problems() -> None:
    assert problems([model("a"), model("b"), model("c", "sglang")]) == []
    assert problems([model("a"), model("b")], resources={}, current_alias="", idle_unload=0) == []


def test_a_valid_lifecycle_inventory_has_no_problems() -> None:
    models = [
        model("embed", port=8086, needs={"gpu": 2}, preload=True, aliases=["embedding"]),
        model("chat-a", needs={"gpu": 16}, aliases=["chat"], idle_unload=600),
        model("chat-b", port=8086, needs={"gpu": 20}),  # embed's port, and 2 + 20 fit together: refused
    ]
    found = problems(models, resources={"gpu": 24}, current_alias="current", idle_unload=300)
    assert len(found) == 1 and "chat-b" in found[0] and "port: 8086" in found[0]
    models[2]["port"] = 8085  # chat-a's port: 16 + 20 > 24, never together: allowed
    assert problems(models, resources={"gpu": 24}, current_alias="current", idle_unload=300) == []


def test_shared_port_is_fine_when_only_one_engine_runs_at_a_time() -> None:
    assert problems([model("a", port=9000), model("b", "sglang", port=9000)]) == []


def test_shared_port_of_models_that_fit_together() -> None:
    found = problems([model("a", needs={"gpu": 0.5}), model("b", needs={"gpu": 0.5})])
    assert found == [
        'llm_router_models[1] (id "b"): port: 8085 is also the engine port of llm_router_models[0] (id "a"), and '
        "their needs let both run at once (gpu 0.5 + 0.5 <= 1): give one of them its own port"
    ]


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ([1], "llm_router_resources: must be a mapping of resource name to capacity, e.g. {gpu: 24}, got [1]"),
        ({"gpu": 0}, "llm_router_resources.gpu: capacity must be a number greater than 0, got 0"),
        ({"gpu": -2}, "llm_router_resources.gpu: capacity must be a number greater than 0, got -2"),
        ({"gpu": "24"}, 'llm_router_resources.gpu: capacity must be a number greater than 0, got "24"'),
        ({"gpu": True}, "llm_router_resources.gpu: capacity must be a number greater than 0, got true"),
        ({"": 1}, 'llm_router_resources: "": a resource name must be a non-empty string'),
    ],
)
def test_bad_resources(resources: Any, message: str) -> None:
    assert message in problems([model("a")], resources=resources)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"port": 0}, "port: must be a port number 1-65535, got 0"),
        ({"port": 65536}, "port: must be a port number 1-65535, got 65536"),
        ({"port": "http"}, 'port: must be a port number 1-65535, got "http"'),
        ({"port": True}, "port: must be a port number 1-65535, got true"),
        ({"port": 8002}, "port: 8002 is the port of the router itself (llm_router_port)"),
        ({"needs": [1]}, "needs: must be a mapping of resource name to amount, e.g. {gpu: 8}, got [1]"),
        (
            {"needs": {"vram": 1}},
            "needs.vram: unknown resource (the default resources, llm_router_resources unset: gpu)",
        ),
        ({"needs": {"gpu": 2}}, "needs.gpu: 2 is more than the capacity of gpu (1)"),
        ({"needs": {"gpu": -1}}, "needs.gpu: must be a number, 0 or more, got -1"),
        ({"needs": {"gpu": "1"}}, 'needs.gpu: must be a number, 0 or more, got "1"'),
        ({"idle_unload": -1}, "idle_unload: must be a number of seconds, 0 (never) or more, got -1"),
        ({"idle_unload": "10"}, 'idle_unload: must be a number of seconds, 0 (never) or more, got "10"'),
        ({"preload": "yes"}, 'preload: must be true or false, got "yes"'),
        ({"aliases": "x"}, 'aliases: must be a list of model ids, got "x"'),
        ({"aliases": ["ok", "not ok"]}, "aliases[1]: must be 1-128 characters"),
    ],
)
def test_bad_model_fields_name_the_model_and_field(extra: dict[str, Any], message: str) -> None:
    found = problems([model("a"), model("m", "sglang", **extra)])
    assert any(p.startswith('llm_router_models[1] (id "m"): ' + message) for p in found), found


def test_unknown_resource_names_the_configured_ones() -> None:
    found = problems([model("m", needs={"vram": 1})], resources={"gpu0": 1, "gpu1": 1})
    assert found == ['llm_router_models[0] (id "m"): needs.vram: unknown resource (llm_router_resources: gpu0, gpu1)']


def test_aliases_share_the_namespace_of_ids() -> None:
    found = problems(
        [model("a", aliases=["b", "x"]), model("b", aliases=["x"]), model("c", aliases=["c"])],
        current_alias="x",
    )
    assert found == [
        'llm_router_models[0] (id "a"): aliases: "b" is the id of llm_router_models[1] (id "b")',
        'llm_router_models[1] (id "b"): aliases: "x" is already an alias of llm_router_models[0] (id "a")',
        'llm_router_models[2] (id "c"): aliases: "c" is the id of llm_router_models[2] (id "c")',
        'llm_router_current_alias: "x" is already an alias of llm_router_models[0] (id "a")',
    ]


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("a", 'llm_router_current_alias: "a" is already the id of llm_router_models[0] (id "a")'),
        ("has space", "llm_router_current_alias: must be a model id"),
        (5, "llm_router_current_alias: must be a model id"),
    ],
)
def test_bad_current_alias(alias: Any, message: str) -> None:
    found = problems([model("a")], current_alias=alias)
    assert len(found) == 1 and found[0].startswith(message), found


@pytest.mark.parametrize("value", [None, "", 0, 0.0, "0", 600, "600"])
def test_good_idle_unload(value: Any) -> None:
    assert problems([model("a")], idle_unload=value) == []


@pytest.mark.parametrize("value", [-1, "-5", "soon", True, [1]])
def test_bad_idle_unload(value: Any) -> None:
    found = problems([model("a")], idle_unload=value)
    assert len(found) == 1 and found[0].startswith("llm_router_idle_unload: must be a number of seconds"), found


def test_preload_models_must_fit_at_once() -> None:
    models = [
        model("a", needs={"gpu": 10}, preload=True),
        model("b", needs={"gpu": 10}, preload=True, port=9001),
        model("c", needs={"gpu": 10}, preload=True, port=9002),
        model("d", needs={"gpu": 10}, preload=False, port=9003),
    ]
    assert problems(models, resources={"gpu": 30}) == []
    found = problems(models, resources={"gpu": 24})
    assert found == [
        'llm_router_models: preload: the models with preload: true ("a", "b", "c") cannot all run at once '
        "(gpu 10 + 10 + 10 = 30 > 24)"
    ]


def test_two_preload_models_without_needs_cannot_run_at_once() -> None:
    found = problems([model("a", preload=True), model("b", preload=True)])
    assert found == [
        'llm_router_models: preload: the models with preload: true ("a", "b") cannot all run at once '
        "(gpu 1 + 1 = 2 > 1)"
    ]


def test_malformed_model_lists_do_not_crash() -> None:
    # The preflight template reports their shape; these filters only must not fail on them.
    for models in (None, "x", {"id": "a"}, [None, 1, "a", {"backend": "llamacpp"}, {"id": 5}]):
        assert isinstance(problems(models), list)  # type: ignore[arg-type]
        assert isinstance(lc.conflicts(models, {}), dict)


# --- vLLM sleep mode (issue 9) ---------------------------------------------------------------------------------

VLLM_PORTS = {**PORTS, "vllm": 8000}


def sleeper(model_id: str, level: int = 1, **extra: Any) -> dict[str, Any]:
    return model(model_id, "vllm", sleep=level, **extra)


def test_two_sleepers_that_cannot_run_together_do_not_conflict() -> None:
    """Each is put to sleep (its unit keeps running) while the other runs: Conflicts= would stop the sleeper."""
    models = [sleeper("a", needs={"gpu": 16}), sleeper("b", 2, needs={"gpu": 16})]
    assert lc.conflicts(models, {"gpu": 24}) == {"a": [], "b": []}
    # Without resources and needs (one engine at a time) too.
    assert lc.conflicts([sleeper("a"), sleeper("b")], {}) == {"a": [], "b": []}


def test_a_pair_with_one_sleeper_does_not_conflict() -> None:
    """chat cannot sleep, but vllm-a sleeps beside it: starting chat must not stop vllm-a's unit."""
    models = [model("chat", needs={"gpu": 20}), sleeper("vllm-a", needs={"gpu": 16}), model("other", "sglang")]
    assert lc.conflicts(models, {"gpu": 24}) == {"chat": ["other"], "vllm-a": [], "other": ["chat"]}


def test_vllm_without_sleep_conflicts_like_any_engine() -> None:
    models = [model("a", "vllm", needs={"gpu": 16}), model("b", "vllm", needs={"gpu": 16})]
    assert lc.conflicts(models, {"gpu": 24}) == {"a": ["b"], "b": ["a"]}


def test_a_sleeper_whose_needs_asleep_do_not_fit_conflicts() -> None:
    """Asleep it still holds 10 of host_ram; beside a model needing 60 of 64 it is stopped for real: Conflicts= is
    right then (starting either unit stops the other, which the router does too)."""
    resources = {"gpu": 24, "host_ram": 64}
    models = [
        sleeper("big", needs={"gpu": 20}, needs_asleep={"host_ram": 10}),
        model("ram-hungry", needs={"gpu": 10, "host_ram": 60}),
        model("small", needs={"gpu": 4, "host_ram": 4}),
    ]
    assert lc.conflicts(models, resources) == {"big": ["ram-hungry"], "ram-hungry": ["big"], "small": []}


def test_sleep_only_counts_for_vllm() -> None:
    """An sglang model with `sleep` (refused by the preflight anyway) is not treated as sleep-capable."""
    models = [model("a", "sglang", sleep=1), model("b", "sglang", sleep=1)]
    assert lc.conflicts(models, {}) == {"a": ["b"], "b": ["a"]}
    assert lc.can_sleep(sleeper("x")) and not lc.can_sleep(model("x", "vllm")) and not lc.can_sleep("x")


def test_model_needs_asleep() -> None:
    resources = {"gpu": 24, "host_ram": 64}
    assert lc.model_needs_asleep(sleeper("a"), resources) == {"gpu": 0.0, "host_ram": 0.0}
    assert lc.model_needs_asleep(sleeper("a", needs_asleep={"host_ram": 40}), resources) == {
        "gpu": 0.0,
        "host_ram": 40.0,
    }
    assert lc.model_needs_asleep(sleeper("a", needs_asleep="x"), resources) == {"gpu": 0.0, "host_ram": 0.0}


def test_a_valid_vllm_inventory_has_no_problems() -> None:
    models = [
        sleeper("a", needs={"gpu": 16}, needs_asleep={"host_ram": 20}),
        sleeper("b", 2, port=8001, needs={"gpu": 16}),
        model("c", "vllm", port=8002 + 1, needs={"gpu": 16}),
    ]
    assert problems(models, resources={"gpu": 24, "host_ram": 64}, backend_ports=VLLM_PORTS, router_port=18002) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            model("m", "sglang", sleep=1),
            "sleep: only vllm models can sleep (vLLM's sleep mode), this one runs on sglang",
        ),
        (sleeper("m", 3), "sleep: must be 1 (weights offloaded to host RAM) or 2 (weights discarded), got 3"),
        (sleeper("m", True), "sleep: must be 1 (weights offloaded to host RAM) or 2 (weights discarded), got true"),
        (sleeper("m", "1"), 'sleep: must be 1 (weights offloaded to host RAM) or 2 (weights discarded), got "1"'),
        (
            model("m", "vllm", needs_asleep={"gpu": 0.1}),
            "needs_asleep: only a model with sleep set is ever asleep (set sleep: 1 or 2)",
        ),
        (
            sleeper("m", needs_asleep={"host_ram": 1}),
            "needs_asleep.host_ram: unknown resource (the default resources, llm_router_resources unset: gpu)",
        ),
        (sleeper("m", needs_asleep={"gpu": 2}), "needs_asleep.gpu: 2 is more than the capacity of gpu (1)"),
        (sleeper("m", needs_asleep={"gpu": -1}), "needs_asleep.gpu: must be a number, 0 or more, got -1"),
        (sleeper("m", needs_asleep=[1]), "needs_asleep: must be a mapping of resource name to amount"),
        (
            sleeper("m", args=["--max-model-len", 4096, "--host", "0.0.0.0"]),
            "args[2]: --host: with sleep the engine serves vLLM's unauthenticated dev-mode endpoints",
        ),
        (sleeper("m", args=["--host=0.0.0.0"]), "args[0]: --host=0.0.0.0: with sleep the engine serves"),
    ],
)
def test_bad_sleep_fields_name_the_model_and_field(entry: dict[str, Any], message: str) -> None:
    found = problems([model("a"), entry], backend_ports=VLLM_PORTS)
    assert any(p.startswith('llm_router_models[1] (id "m"): ' + message) for p in found), found


def test_a_sleeper_needs_a_port_of_its_own() -> None:
    """Asleep, vLLM keeps its port: a model that runs while it sleeps cannot bind the same one."""
    found = problems([sleeper("a"), sleeper("b")], backend_ports=VLLM_PORTS)
    assert found == [
        'llm_router_models[1] (id "b"): port: 8000 is also the engine port of llm_router_models[0] (id "a"), and '
        '"a" (sleep: 1) keeps its engine and port while asleep beside "b": give one of them its own port'
    ]
    assert problems([sleeper("a"), sleeper("b", port=8001)], backend_ports=VLLM_PORTS) == []
    # Two vLLM models without sleep never run together (one engine at a time): they may share the port.
    assert problems([model("a", "vllm"), model("b", "vllm")], backend_ports=VLLM_PORTS) == []


def test_sleep_null_means_unset() -> None:
    """models.yml omits a null sleep, and the router reads a missing one as "never sleeps"."""
    assert problems([model("a", "sglang", sleep=None), model("b", "vllm", sleep=None)], backend_ports=VLLM_PORTS) == []
    assert lc.conflicts([model("a", "vllm", sleep=None), model("b", "vllm")], {}) == {"a": ["b"], "b": ["a"]}
