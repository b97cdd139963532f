"""vLLM through the router, against the fake vLLM (files/fake_engines, `--kind vllm`) with realistic sleep-mode
timings: load 3 s, fall asleep 0.2 s, wake 0.3 s. Two sleep-capable models alternate by sleep and wake (never a unit
restart, each switch well under a second); host RAM bounds the sleepers; a failed wake falls back to a restart."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.e2e.conftest import ModelSpec, RouterEnv, StreamResult

SLEEPY_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",
    "FAKE_LOAD_SECONDS": "3",
    "FAKE_SLEEP_SECONDS": "0.2",
    "FAKE_WAKE_SECONDS": "0.3",
}


def sleeper(model_id: str, port: int, **env: str) -> ModelSpec:
    return ModelSpec(
        model_id,
        "vllm",
        port=port,
        env={**SLEEPY_ENV, **env},
        args=["--enable-sleep-mode"],
        extra={"sleep": 1, "needs": {"gpu": 8}, "needs_asleep": {"host_ram": 40}},
    )


def timed_chat(router: RouterEnv, model: str) -> tuple[float, StreamResult]:
    started = time.monotonic()
    result = router.stream_chat(model, "[[tokens:3]]")
    return time.monotonic() - started, result


def statuses(router: RouterEnv) -> dict[str, Any]:
    return {m["id"]: m["status"]["value"] for m in httpx.get(router.base + "/v1/models", timeout=5).json()["data"]}


def test_two_sleepers_alternate_by_wake_in_under_a_second(router_factory) -> None:  # type: ignore[no-untyped-def]
    models = [sleeper("q1", 18217), sleeper("q2", 18218)]
    router: RouterEnv = router_factory(models, resources={"gpu": 10, "host_ram": 100})
    times: dict[str, list[float]] = {"load": [], "wake": []}
    for step, model in enumerate(["q1", "q2", "q1", "q2", "q1", "q2"]):
        took, result = timed_chat(router, model)
        assert result.done and not result.errors, result.raw
        status = result.text("reasoning_content")
        if step < 2:
            assert "⏳ Loading" in status or "✅" in status, status
            times["load"].append(took)
        else:
            assert status.startswith("🔀 Switching to q") and "Loading" not in status, status
            times["wake"].append(took)
        other = "q2" if model == "q1" else "q1"
        if step >= 1:
            assert statuses(router)[other] == "sleeping"
    for model in ("q1", "q2"):
        assert len(router.events(model, "start")) == 1, f"{model} was restarted: {router.events(model, 'start')}"
        assert len(router.events(model, "wake")) == 2
        assert router.is_active(model) == "active", "a sleeping engine's unit keeps running"
    assert max(times["wake"]) < 1.0, times
    assert min(times["load"]) > 2.5, times
    metrics = httpx.get(router.base + "/metrics", timeout=5).text
    assert 'llm_router_model_wakes_total{model="q1",outcome="ok"} 2.0' in metrics
    assert 'llm_router_model_sleeps_total{model="q2",reason="switch"} 2.0' in metrics
    assert 'llm_router_model_sleeping{model="q1"} 1.0' in metrics
    print(f"\nvLLM sleep/wake: first loads {times['load']}, wake switches {[round(t, 3) for t in times['wake']]}")


def test_host_ram_bounds_the_sleepers(router_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"FAKE_LOAD_SECONDS": "0.5"}
    models = [sleeper("q1", 18217, **env), sleeper("q2", 18218, **env), sleeper("q3", 18219, **env)]
    router: RouterEnv = router_factory(models, resources={"gpu": 10, "host_ram": 70})
    for model in ("q1", "q2", "q3"):
        _, result = timed_chat(router, model)
        assert result.done and not result.errors
    # q2 must make room for q3; asleep beside q1 (40 + 40 > 70) it would overflow host RAM: q1, the least
    # recently used sleeper, is stopped for real.
    assert statuses(router) == {"q1": "unloaded", "q2": "sleeping", "q3": "loaded"}
    assert router.is_active("q1") == "inactive"
    assert router.events("q1", "stop") or router.events("q1", "exit")
    health = httpx.get(router.base + "/health", timeout=5).json()
    assert health["resources"]["host_ram"] == {"capacity": 70.0, "held": 40.0}, health["resources"]


def test_a_failed_wake_restarts_the_unit_and_answers(router_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"FAKE_LOAD_SECONDS": "0.5"}
    models = [sleeper("q1", 18217, FAKE_WAKE_FAIL="1", **env), sleeper("q2", 18218, **env)]
    router: RouterEnv = router_factory(models, resources={"gpu": 10, "host_ram": 100})
    for model in ("q1", "q2", "q1"):
        _, result = timed_chat(router, model)
        assert result.done and not result.errors, result.raw
        assert result.text().startswith("tok1 tok2 tok3")
    assert len(router.events("q1", "start")) == 2, "the wake failed: the unit was restarted"
    assert statuses(router)["q1"] == "loaded"
    metrics = httpx.get(router.base + "/metrics", timeout=5).text
    assert 'llm_router_model_wakes_total{model="q1",outcome="failed"} 1.0' in metrics


def test_an_alias_reaches_vllm_as_its_served_model_name(router_factory) -> None:  # type: ignore[no-untyped-def]
    # vLLM answers 404 to any model name but its --served-model-name: the router sends the id it serves.
    model = ModelSpec("qwen-vllm", "vllm", env={"FAKE_LOAD_SECONDS": "0.2"}, extra={"aliases": ["qwen"]})
    router: RouterEnv = router_factory([model])
    result = router.stream_chat("qwen", "[[tokens:3]]")
    assert result.done and not result.errors, result
    assert "tok1 tok2 tok3" in result.text()
    with router.client() as client:
        answer = client.post(
            "/v1/chat/completions", json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code == 200 and answer.json()["model"] == "qwen", answer.text
    direct = httpx.post(
        "http://127.0.0.1:18214/v1/chat/completions",
        json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert direct.status_code == 404 and "does not exist" in direct.text  # the fake checks names like vLLM
