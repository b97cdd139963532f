"""Through the router: the model list, auth, streamed switches between engines (checked with systemctl)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from conftest import (
    MODEL_IDS,
    MODELS,
    ROUTER_USER,
    active_backend_units,
    is_active,
    models_of,
    run_as_router_user,
    stream_chat,
    unit_of,
)

FOOTER = re.compile(r"⚡ \d+(\.\d+)? tok/s")


def test_models_lists_the_inventory(client: httpx.Client) -> None:
    resp = client.get("/v1/models")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert sorted(ids) == sorted(MODEL_IDS)
    named = {m["id"]: m["name"] for m in MODELS if m.get("name")}
    by_id = {m["id"]: m for m in body["data"]}
    for model_id, name in named.items():
        assert by_id[model_id].get("name") == name, by_id[model_id]


def test_models_needs_the_api_key(router_url: str) -> None:
    resp = httpx.get(f"{router_url}/v1/models", timeout=10)
    assert resp.status_code == 401, resp.text
    resp = httpx.get(f"{router_url}/v1/models", headers={"Authorization": "Bearer wrong-key"}, timeout=10)
    assert resp.status_code == 401, resp.text


def test_chat_needs_the_api_key(router_url: str) -> None:
    body = {"model": MODEL_IDS[0], "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{router_url}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 401, resp.text


def test_unknown_model_is_404(client: httpx.Client) -> None:
    resp = client.post(
        "/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "model_not_found"


def _check_switched_to(box: Any, model_id: str) -> None:
    assert is_active(box, unit_of(model_id)) == "active"
    assert active_backend_units(box) == [unit_of(model_id)], "exactly one engine may run"


def _check_stream(stream: Any, model_id: str, cold: bool) -> None:
    assert stream.status == 200, stream.error
    assert not stream.error, stream.error
    assert stream.done, "the stream did not end with [DONE]"
    assert stream.finish_reasons, "no chunk carried finish_reason"
    assert FOOTER.search(stream.content), f"no speed footer in {stream.content[-200:]!r}"
    if cold:
        assert stream.reasoning.strip(), "a cold start should show status text in delta.reasoning_content"


def test_stream_to_first_model_starts_its_unit(client: httpx.Client, box: Any) -> None:
    model_a = MODEL_IDS[0]
    cold = unit_of(model_a) not in active_backend_units(box)  # cold on a fresh box; not on a re-run of verify
    stream = stream_chat(client, model_a, "Hello A")
    _check_stream(stream, model_a, cold=cold)
    # the model's text came through, apart from the injected status and footer
    assert FOOTER.sub("", stream.content).strip()
    _check_switched_to(box, model_a)


def test_switch_within_one_engine_kind(client: httpx.Client, box: Any) -> None:
    llamas = models_of("llamacpp")
    if len(llamas) < 2:
        pytest.skip("needs two llama.cpp models")
    a, b = llamas[0], llamas[1]
    stream = stream_chat(client, a, "again A")
    _check_stream(stream, a, cold=False)
    _check_switched_to(box, a)
    stream = stream_chat(client, b, "now B")
    _check_stream(stream, b, cold=True)
    _check_switched_to(box, b)
    assert is_active(box, unit_of(a)) == "inactive"


@pytest.mark.parametrize("backend", ["sglang", "tabbyapi", "llamacpp"])
def test_switch_across_engine_kinds(client: httpx.Client, box: Any, backend: str) -> None:
    targets = models_of(backend)
    if not targets:
        pytest.skip(f"no {backend} model in the inventory")
    target = targets[0]
    before = active_backend_units(box)
    stream = stream_chat(client, target, f"hello {backend}")
    _check_stream(stream, target, cold=unit_of(target) not in before)
    _check_switched_to(box, target)
    for unit in before:
        if unit != unit_of(target):
            assert is_active(box, unit) == "inactive", f"{unit} still runs after the switch to {target}"


def test_every_chunk_names_the_requested_model(client: httpx.Client) -> None:
    for backend in ("llamacpp", "sglang", "tabbyapi"):
        targets = models_of(backend)
        if targets:
            stream = stream_chat(client, targets[0], "which model?")
            assert stream.models == {targets[0]}, f"{backend}: {stream.models}"


def test_non_streaming_request(client: httpx.Client, box: Any) -> None:
    model_id = MODEL_IDS[0]
    resp = client.post(
        "/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "no stream"}]}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    _check_switched_to(box, model_id)


def test_router_user_reads_backend_journal(box: Any) -> None:
    """The router shows an engine's last log lines on failure: its user must read the backend units' journal."""
    unit = unit_of(MODEL_IDS[0])
    res = run_as_router_user(box, f"journalctl --no-pager -q -n 20 -u {unit}")
    assert res.rc == 0, res.stderr
    assert "insufficient permissions" not in (res.stdout + res.stderr)
    assert res.stdout.strip(), f"{ROUTER_USER} sees no journal lines for {unit}"
