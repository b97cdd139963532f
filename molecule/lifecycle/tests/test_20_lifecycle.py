"""The router's engine lifecycle on real systemd, through polkit (issue 8). In order: each test starts from the
state the previous one left (what runs is checked with systemctl, not only the router's word).

Every test here takes the `box` fixture, which keeps pytest from reordering them.

1. the preload model runs after the router started;
2. an embedding model and a chat model run at once, the embedding engine never restarts;
3. a chat model that does not fit beside the first evicts only that one;
4. aliases and the current-model alias; 5. idle unload; 6. Open-WebUI's /models/load and /models/unload;
7. metrics; 8. the preload model comes back when the router restarts.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from conftest import (
    BY_ID,
    INVENTORY,
    MODEL_IDS,
    ROUTER_UNIT,
    active_backend_units,
    fit_together,
    is_active,
    main_pid,
    stream_chat,
    unit_of,
    wait_for,
)

PRELOAD = next(m["id"] for m in INVENTORY["llm_router_models"] if m.get("preload"))  # embed
EMBED = PRELOAD
EMBED_ALIAS = BY_ID[EMBED]["aliases"][0]
CHAT_A, CHAT_B = "chat-a", "chat-b"
CHAT_A_ALIAS = BY_ID[CHAT_A]["aliases"][0]
IDLE = next(m["id"] for m in INVENTORY["llm_router_models"] if m.get("idle_unload"))
CURRENT = INVENTORY["llm_router_current_alias"]
ALIASES = {alias: m["id"] for m in INVENTORY["llm_router_models"] for alias in m.get("aliases", [])}


def test_the_scenario_holds_together() -> None:
    assert fit_together(EMBED, CHAT_A) and fit_together(EMBED, CHAT_B), "embed must fit beside each chat model"
    assert not fit_together(CHAT_A, CHAT_B), "the two chat models must not fit together"
    assert fit_together(EMBED, CHAT_A, IDLE), "the idle model must not evict anything"


def _status(client: httpx.Client, path: str = "/v1/models") -> dict[str, str]:
    resp = client.get(path)
    assert resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text[:500]}"
    return {m["id"]: (m.get("status") or {}).get("value", "") for m in resp.json()["data"]}


def _chat(client: httpx.Client, model: str) -> Any:
    stream = stream_chat(client, model, "Say hello.")
    assert stream.status == 200, f"{model}: {stream.status} {stream.error}"
    assert not stream.error, stream.error
    assert stream.done, f"{model}: the stream did not end with [DONE]"
    return stream


def _embed(client: httpx.Client, model: str) -> dict[str, Any]:
    resp = client.post("/v1/embeddings", json={"model": model, "input": "a document to index"})
    assert resp.status_code == 200, f"{model}: {resp.status_code} {resp.text[:500]}"
    body: dict[str, Any] = resp.json()
    assert body["data"] and body["data"][0]["embedding"], body
    return body


def test_preload_model_runs_after_the_router_started(box: Any, client: httpx.Client) -> None:
    wait_for(lambda: is_active(box, unit_of(PRELOAD)) == "active", 30, f"{unit_of(PRELOAD)} is not active (preload)")
    wait_for(lambda: _status(client).get(PRELOAD) == "loaded", 30, f"/v1/models does not say {PRELOAD} is loaded")


def test_embedding_model_and_chat_model_run_at_once(box: Any, client: httpx.Client) -> None:
    pid = main_pid(box, unit_of(EMBED))
    assert pid > 0, f"{unit_of(EMBED)} has no main process"
    _embed(client, EMBED)
    _chat(client, CHAT_A)
    running = active_backend_units(box)
    assert unit_of(EMBED) in running and unit_of(CHAT_A) in running, running
    body = _embed(client, EMBED_ALIAS)  # between two chat switches in real use: the engine stays
    assert body.get("model") == EMBED_ALIAS, "an answer carries the id the client sent"
    assert main_pid(box, unit_of(EMBED)) == pid, f"{EMBED}'s engine was restarted"
    status = _status(client)
    assert status[EMBED] == "loaded" and status[CHAT_A] == "loaded", status


def test_a_model_that_does_not_fit_evicts_only_the_chat_model(box: Any, client: httpx.Client) -> None:
    pid = main_pid(box, unit_of(EMBED))
    _chat(client, CHAT_B)
    assert is_active(box, unit_of(CHAT_B)) == "active"
    assert is_active(box, unit_of(CHAT_A)) in ("inactive", "failed"), f"{CHAT_A} should have been evicted"
    assert is_active(box, unit_of(EMBED)) == "active", f"{EMBED} fits beside {CHAT_B}: it must keep running"
    assert main_pid(box, unit_of(EMBED)) == pid, f"{EMBED}'s engine was restarted"
    status = _status(client)
    assert (status[CHAT_A], status[CHAT_B], status[EMBED]) == ("unloaded", "loaded", "loaded"), status


def test_an_alias_routes_like_its_model(box: Any, client: httpx.Client) -> None:
    stream = _chat(client, CHAT_A_ALIAS)
    assert stream.models == {CHAT_A_ALIAS}, f"chunks name {stream.models}, the client sent {CHAT_A_ALIAS}"
    assert is_active(box, unit_of(CHAT_A)) == "active"
    assert is_active(box, unit_of(CHAT_B)) in ("inactive", "failed")
    assert is_active(box, unit_of(EMBED)) == "active"


def test_models_lists_aliases_and_the_current_alias(box: Any, client: httpx.Client) -> None:
    # (every test of this sequence takes `box`: pytest keeps tests on the same host-parametrized fixture together,
    # and would move a test without it out of order)
    status = _status(client)
    assert set(MODEL_IDS) | set(ALIASES) | {CURRENT} <= set(status), sorted(status)
    for alias, model_id in ALIASES.items():
        assert status[alias] == status[model_id], f"{alias} says {status[alias]}, {model_id} {status[model_id]}"


def test_the_current_alias_never_switches_while_a_model_is_loaded(box: Any, client: httpx.Client) -> None:
    before = active_backend_units(box)
    stream = _chat(client, CURRENT)
    assert stream.models == {CURRENT}, stream.models
    assert active_backend_units(box) == before, "a request for the current alias started or stopped an engine"


def test_idle_unload_stops_an_idle_model(box: Any, client: httpx.Client) -> None:
    _chat(client, IDLE)
    assert is_active(box, unit_of(IDLE)) == "active"
    idle = float(BY_ID[IDLE]["idle_unload"])
    wait_for(
        lambda: is_active(box, unit_of(IDLE)) in ("inactive", "failed"),
        idle + 15,
        f"{unit_of(IDLE)} still runs {idle:g} s after its last answer (idle_unload)",
    )
    assert _status(client)[IDLE] == "unloaded"
    # the others have a long idle_unload: untouched
    assert is_active(box, unit_of(EMBED)) == "active"
    assert is_active(box, unit_of(CHAT_A)) == "active"


def test_load_and_unload_api_through_polkit(box: Any, client: httpx.Client, router_url: str) -> None:
    """Open-WebUI's llama.cpp connection: POST /models/load|unload at the root. The router starts and stops the
    units as its unprivileged user: polkit's rule is what lets it."""
    resp = httpx.post(f"{router_url}/models/load", json={"model": CHAT_B}, timeout=10)
    assert resp.status_code == 401, f"no key: {resp.status_code} {resp.text[:300]}"
    resp = client.post("/models/load", json={"model": "no-such-model"})
    assert resp.status_code == 404, resp.text[:300]

    resp = client.post("/models/load", json={"model": CHAT_B})
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json() == {"success": True}
    wait_for(lambda: is_active(box, unit_of(CHAT_B)) == "active", 30, f"{unit_of(CHAT_B)} did not start")
    wait_for(lambda: _status(client, "/models").get(CHAT_B) == "loaded", 30, f"GET /models: {CHAT_B} not loaded")
    assert is_active(box, unit_of(CHAT_A)) in ("inactive", "failed"), f"{CHAT_A} does not fit beside {CHAT_B}"
    assert is_active(box, unit_of(EMBED)) == "active"

    resp = client.post("/models/unload", json={"model": CHAT_B})
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json() == {"success": True}
    assert is_active(box, unit_of(CHAT_B)) in ("inactive", "failed"), "unload answered before the unit stopped"
    assert _status(client, "/models")[CHAT_B] == "unloaded"
    resp = client.post("/models/unload", json={"model": CHAT_B})  # not loaded: fine too
    assert resp.status_code == 200, resp.text[:500]


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_metrics_without_a_key(box: Any, router_url: str) -> None:
    assert is_active(box, unit_of(IDLE)) in ("inactive", "failed")
    resp = httpx.get(f"{router_url}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text[:300]
    text = resp.text
    shown = "\n".join(line for line in text.splitlines() if re.match(r"llm_router_model_(loaded|loads|unloads)", line))
    assert _metric(text, "llm_router_model_loaded", model=EMBED) == 1.0, shown
    assert _metric(text, "llm_router_model_loaded", model=CHAT_B) == 0.0, shown
    assert (_metric(text, "llm_router_model_unloads_total", model=IDLE, reason="idle") or 0) >= 1, shown
    assert (_metric(text, "llm_router_model_unloads_total", model=CHAT_B, reason="request") or 0) >= 1, shown
    assert (_metric(text, "llm_router_model_unloads_total", model=CHAT_A, reason="switch") or 0) >= 1, shown
    assert (_metric(text, "llm_router_model_loads_total", model=CHAT_A, outcome="ok") or 0) >= 2, shown


def test_preload_model_comes_back_when_the_router_restarts(box: Any, client: httpx.Client) -> None:
    resp = client.post("/models/unload", json={"model": PRELOAD})
    assert resp.status_code == 200, resp.text[:500]
    assert is_active(box, unit_of(PRELOAD)) in ("inactive", "failed")
    pid = main_pid(box, ROUTER_UNIT)
    res = box.run(f"systemctl restart {ROUTER_UNIT}")
    assert res.rc == 0, res.stderr
    assert main_pid(box, ROUTER_UNIT) != pid
    wait_for(lambda: is_active(box, unit_of(PRELOAD)) == "active", 30, f"{PRELOAD} was not preloaded after a restart")
    wait_for(lambda: _status(client).get(PRELOAD) == "loaded", 30, f"/v1/models: {PRELOAD} not loaded after restart")


def test_nothing_failed(box: Any) -> None:
    failed = box.run("systemctl --failed --no-legend --plain").stdout.strip()
    assert failed == "", failed
    assert is_active(box, ROUTER_UNIT) == "active"
