"""Engine lifecycle end to end: co-resident engines by declared resources, eviction of one of two, idle unload,
preload, the load/unload/sse API, aliases, the current-model alias and the metrics after known traffic.

Real router process (hypercorn on 127.0.0.1), real fake engine processes on their own ports, fake systemctl."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx

from tests.e2e.conftest import ModelSpec, RouterEnv, StreamResult, wait_until

EMBED_PORT = 18216


def statuses(router: RouterEnv) -> dict[str, Any]:
    with router.client() as client:
        return {m["id"]: m["status"]["value"] for m in client.get("/models").json()["data"]}


def metric(router: RouterEnv, name: str, **labels: str) -> float:
    text = httpx.get(router.base + "/metrics", timeout=5).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def starts(router: RouterEnv, model: str) -> int:
    return len(router.events(model, "start"))


def test_co_resident_engines_and_eviction_of_only_the_conflicting_one(router_factory) -> None:  # type: ignore[no-untyped-def]
    models = [
        ModelSpec("chat-a", "llamacpp", extra={"needs": {"gpu": 8}}),
        ModelSpec("chat-b", "sglang", extra={"needs": {"gpu": 8}}),
        ModelSpec("embed", "llamacpp", port=EMBED_PORT, extra={"needs": {"gpu": 2}, "aliases": ["embed-alias"]}),
    ]
    router: RouterEnv = router_factory(models, resources={"gpu": 10})
    with router.client() as client:
        embedding = client.post("/v1/embeddings", json={"model": "embed-alias", "input": "hello"})
    assert embedding.status_code == 200, embedding.text
    assert embedding.json()["model"] == "embed-alias", "answers carry the id the client sent"

    first = router.stream_chat("chat-a", "[[tokens:3]]")
    assert first.done and not first.errors
    assert router.is_active("embed") == "active" and router.is_active("chat-a") == "active"

    second = router.stream_chat("chat-b", "[[tokens:3]]")
    assert second.done and not second.errors
    assert second.text("reasoning_content").startswith("🔀 Switching to chat-b")
    assert router.is_active("chat-a") == "inactive", "chat-b does not fit beside chat-a: chat-a was evicted"
    assert router.is_active("embed") == "active", "the embedding engine fits beside either and keeps running"
    assert starts(router, "embed") == 1

    with router.client() as client:
        again = client.post("/v1/embeddings", json={"model": "embed", "input": "more"})
    assert again.status_code == 200
    assert starts(router, "embed") == 1, "no restart of the co-resident engine"
    listed = statuses(router)
    assert listed == {
        "chat-a": "unloaded",
        "chat-b": "loaded",
        "embed": "loaded",
        "embed-alias": "loaded",
    }, listed

    assert metric(router, "llm_router_model_loads_total", model="chat-a", outcome="ok") == 1
    assert metric(router, "llm_router_model_unloads_total", model="chat-a", reason="switch") == 1
    assert metric(router, "llm_router_model_unloads_total", model="embed", reason="switch") == 0
    assert metric(router, "llm_router_model_loaded", model="embed") == 1
    assert metric(router, "llm_router_model_loaded", model="chat-a") == 0
    assert metric(router, "llm_router_requests_total", model="chat-b", outcome="ok") == 1
    assert metric(router, "llm_router_requests_total", model="embed", outcome="ok") == 2
    assert metric(router, "llm_router_generated_tokens_total", model="chat-a") == 3
    assert metric(router, "llm_router_tokens_per_second_count", model="chat-b") == 1
    assert metric(router, "llm_router_time_to_first_token_seconds_count", model="chat-a") == 1
    assert metric(router, "llm_router_model_load_seconds_count", model="chat-b") == 1
    assert metric(router, "llm_router_requests_in_flight", model="chat-b") == 0
    assert metric(router, "llm_router_requests_waiting") == 0


class EventReader:
    """Reads /models/sse in a thread, collecting its events."""

    def __init__(self, router: RouterEnv) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(router.base,), daemon=True)
        self._thread.start()

    def _run(self, base: str) -> None:
        timeout = httpx.Timeout(5, read=None)
        with httpx.Client(timeout=timeout) as client, client.stream("GET", base + "/models/sse") as response:
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                elif line.startswith(":"):
                    self.comments += 1

    def of(self, model: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["model"] == model]

    def close(self) -> None:
        self._stop.set()


def test_preload_load_unload_sse_idle_unload_and_current_alias(router_factory) -> None:  # type: ignore[no-untyped-def]
    models = [
        ModelSpec("a", "llamacpp", name="Model A", extra={"preload": True}),
        ModelSpec("b", "sglang", env={"FAKE_LOAD_SECONDS": "2.5"}, extra={"idle_unload": 1}),
        ModelSpec("slow", "tabbyapi", env={"FAKE_LOAD_SECONDS": "30"}),
    ]
    router: RouterEnv = router_factory(models, current_alias="current")
    wait_until(lambda: statuses(router)["a"] == "loaded", 10, "the preload model to be loaded at start-up")
    assert statuses(router)["current"] == "loaded"

    now = router.stream_chat("current", "[[tokens:2]]")
    assert now.done and not now.errors
    assert not now.text("reasoning_content"), "the current-model alias never causes a switch"
    assert starts(router, "a") == 1

    reader = EventReader(router)
    try:
        time.sleep(0.3)
        with router.client() as client:
            loaded = client.post("/models/load", json={"model": "b"})
        assert loaded.status_code == 200 and loaded.json() == {"success": True}
        wait_until(lambda: any(e["data"]["status"] == "loaded" for e in reader.of("b")), 15, "b loaded on /models/sse")
        b_events = reader.of("b")
        assert b_events[0] == {"model": "b", "event": "model_status", "data": {"status": "loading"}}
        assert len([e for e in b_events if e["data"]["status"] == "loading"]) >= 2, "loading repeats while it loads"
        assert {"model": "a", "event": "model_status", "data": {"status": "unloaded"}} in reader.of("a")
        assert router.is_active("a") == "inactive"

        # Idle unload: b has idle_unload 1 s and nothing uses it.
        wait_until(lambda: router.is_active("b") == "inactive", 5, "the idle model b to be stopped")
        # The event follows once the router saw the stop finish (and the port close).
        wait_until(lambda: reader.of("b")[-1]["data"]["status"] == "unloaded", 5, "b unloaded on /models/sse")
        assert metric(router, "llm_router_model_unloads_total", model="b", reason="idle") == 1

        # A second load of b has history: its loading events carry a progress estimate.
        with router.client() as client:
            assert client.post("/v1/models/load", json={"model": "b"}).json() == {"success": True}
        wait_until(lambda: statuses(router)["b"] == "loaded", 15, "b loaded again")
        progress = [e["data"].get("progress") for e in reader.of("b")[-4:] if e["data"]["status"] == "loading"]
        assert any(p is not None and 0 <= p["value"] < 1 for p in progress), reader.of("b")
    finally:
        reader.close()

    with router.client() as client:
        unloaded = client.post("/models/unload", json={"model": "b"})
        assert unloaded.json() == {"success": True}
        assert router.is_active("b") == "inactive", "unload returns once the unit is stopped"
        assert client.post("/models/unload", json={"model": "b"}).json() == {"success": True}, "not loaded: fine"
        missing = client.post("/models/load", json={"model": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        bad = client.post("/models/load", content=b"not json")
        assert bad.status_code == 400
        delete = client.delete("/models", params={"model": "b"})  # Open-WebUI's "Delete" on a llama.cpp connection
        assert delete.status_code == 405 and "never deletes model files" in delete.json()["error"]["message"]
    assert metric(router, "llm_router_model_unloads_total", model="b", reason="request") == 1

    # Unloading a model that is loading cancels the load; its waiting request gets a clear error.
    results: list[StreamResult] = []
    waiting = threading.Thread(target=lambda: results.append(router.stream_chat("slow", "[[tokens:2]]")))
    waiting.start()
    wait_until(lambda: statuses(router)["slow"] == "loading", 10, "slow to be loading")
    with router.client() as client:
        assert client.post("/models/unload", json={"model": "slow"}).json() == {"success": True}
    waiting.join(10)
    (result,) = results
    assert result.errors and "unloaded" in result.errors[0]["message"], result.raw
    assert statuses(router)["slow"] == "unloaded"
    assert router.is_active("slow") == "inactive"
