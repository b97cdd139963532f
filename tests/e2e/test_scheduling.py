"""Requests that arrive during a switch: joiners, drain before evict, grouping, disconnects."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.conftest import RouterEnv, StreamResult


def test_concurrent_requests_join_one_load(router: RouterEnv) -> None:
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: router.stream_chat("sg", f"joiner {i} [[tokens:4]]"), range(6)))
    for result in results:
        assert result.done and not result.errors, result.raw
        assert result.text().startswith("tok1")
    assert len(router.events("sg", "start")) == 1, "one load, many waiters"
    assert len(router.events("sg", "request")) == 6


def test_switch_waits_for_running_answer_to_finish(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    long_answer: dict[str, StreamResult] = {}

    def run_long() -> None:
        long_answer["a"] = router.stream_chat("llama-a", "[[tokens:30]] [[delay:0.1]]")

    thread = threading.Thread(target=run_long)
    thread.start()
    time.sleep(0.5)  # the long answer is streaming now
    switched = router.stream_chat("sg", "[[tokens:3]]")
    thread.join(30)
    a = long_answer["a"]
    assert a.done and not a.errors, "a running answer is never cut off by a switch"
    assert re.findall(r"\btok\d+", a.text()) == [f"tok{i}" for i in range(1, 31)]
    assert switched.done and not switched.errors
    status = switched.text("reasoning_content")
    assert "⏳ Waiting for 1 running answer on Llama A to finish" in status, status


def test_waiting_requests_are_grouped_by_model(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    results: list[StreamResult] = []
    lock = threading.Lock()

    def call(model: str, text: str) -> None:
        result = router.stream_chat(model, text)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=call, args=("llama-a", "[[tokens:20]] [[delay:0.1]]"))]
    threads[0].start()
    time.sleep(0.4)
    # Two users alternating between sg and tabby while llama-a is busy: one switch per model, not one per request.
    for i, model in enumerate(["sg", "tabby", "sg", "tabby", "sg", "tabby"]):
        thread = threading.Thread(target=call, args=(model, f"user {i} [[tokens:3]]"))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert len(results) == 7
    assert all(r.done and not r.errors for r in results), [r.raw for r in results if r.errors]
    assert len(router.events("sg", "start")) == 1
    assert len(router.events("tabby", "start")) == 1
    assert len(router.events("llama-a", "start")) == 1


def test_client_disconnect_mid_stream_closes_the_engine_request(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    body = {
        "model": "llama-a",
        "stream": True,
        "messages": [{"role": "user", "content": "[[tokens:400]] [[delay:0.05]]"}],
    }
    with router.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
        closed_at = time.monotonic()
    deadline = closed_at + 3
    while time.monotonic() < deadline and not router.events("llama-a", "client_disconnected"):
        time.sleep(0.05)
    assert router.events("llama-a", "client_disconnected"), "the engine must see the connection close"
    assert time.monotonic() - closed_at < 2
    assert not router.events("llama-a", "stream_completed")[1:], "the engine stopped generating"
    # the lease was released: a switch is possible at once
    assert router.stream_chat("sg", "[[tokens:2]]").done


def test_waiting_client_that_disconnects_leaves_the_queue_and_the_load_goes_on(router: RouterEnv) -> None:
    body = {"model": "sleepy", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    # sleepy never becomes ready; a waiter that leaves must not wedge the switcher
    with router.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if "Switching" in line:
                break
    time.sleep(2.5)  # past sleepy's load timeout of 2 s: the load finished (failed) without any waiter
    health = httpx.get(router.base + "/health").json()
    assert health["waiting"] == 0 and health["in_flight"] == 0
    assert router.stream_chat("llama-a", "[[tokens:2]]").done


def test_queue_full_answers_429_with_retry_after(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(queue_limit=1)
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    thread = threading.Thread(target=router.stream_chat, args=("llama-a", "[[tokens:20]] [[delay:0.1]]"))
    thread.start()
    time.sleep(0.4)
    waiter = threading.Thread(target=router.stream_chat, args=("sg", "[[tokens:1]]"))
    waiter.start()
    time.sleep(0.3)
    with router.client() as client:
        response = client.post("/v1/chat/completions", json={"model": "tabby", "messages": []})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    thread.join(30)
    waiter.join(30)
