"""A switch storm at CI size: 20 concurrent clients, 3 models (an embedding model co-resident with either of two
conflicting chat models), streaming and non-streaming chat and embeddings in a random order. Nothing may fail or
be cut, every answer is the engine's full text, grouping keeps the number of starts low, and the router ends idle.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from typing import Any

import httpx

from tests.e2e.conftest import ModelSpec, RouterEnv, StreamResult

CLIENTS = 20
REQUESTS_PER_CLIENT = int(os.environ.get("LLM_ROUTER_STORM_REQUESTS", "5"))  # 10 for the full size
EMBED_PORT = 18215


def expected_text(tokens: int) -> str:
    return "".join(f"tok{i}" if i == 1 else f" tok{i}" for i in range(1, tokens + 1))


def one_request(router: RouterEnv, rng: random.Random) -> tuple[str, str | None]:
    """Send one random request; return (model, problem or None)."""
    model = rng.choice(["chat-a", "chat-b", "embed"])
    tokens = rng.randint(3, 12)
    with httpx.Client(base_url=router.base, timeout=httpx.Timeout(10, read=120)) as client:
        if model == "embed":
            response = client.post("/v1/embeddings", json={"model": "embed", "input": f"text {tokens}"})
            ok = response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 8
            return model, None if ok else f"embeddings: HTTP {response.status_code} {response.text[:200]}"
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"[[tokens:{tokens}]]"}]}
        if rng.random() < 0.5:
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                result = StreamResult.read(response)
            if result.errors or not result.done:
                return model, f"stream: errors {result.errors} done {result.done}"
            text = result.text()
            if not text.startswith(expected_text(tokens) + "\n\n⚡ "):
                return model, f"stream text {text!r}"
            finishes = [c["choices"][0].get("finish_reason") for c in result.chunks if c.get("choices")]
            if "stop" not in finishes:
                return model, f"no finish chunk: {finishes}"
            return model, None
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return model, f"chat: HTTP {response.status_code} {response.text[:200]}"
        content = response.json()["choices"][0]["message"]["content"]
        return model, None if content == expected_text(tokens) else f"chat text {content!r}"


def test_switch_storm(router_factory) -> None:  # type: ignore[no-untyped-def]
    models = [
        ModelSpec("chat-a", "llamacpp", env={"FAKE_LOAD_SECONDS": "0.2"}, extra={"needs": {"gpu": 6}}),
        ModelSpec("chat-b", "sglang", env={"FAKE_LOAD_SECONDS": "0.2"}, extra={"needs": {"gpu": 6}}),
        ModelSpec(
            "embed",
            "llamacpp",
            port=EMBED_PORT,
            env={"FAKE_LOAD_SECONDS": "0.2"},
            extra={"needs": {"gpu": 2}, "idle_unload": 1},
        ),
    ]
    router: RouterEnv = router_factory(models, resources={"gpu": 10}, queue_limit=200)
    problems: list[str] = []
    sent: Counter[str] = Counter()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(REQUESTS_PER_CLIENT):
            model, problem = one_request(router, rng)
            with lock:
                sent[model] += 1
                if problem:
                    problems.append(f"{model}: {problem}")
            time.sleep(rng.random() * 0.05)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    took = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert problems == [], problems[:5]
    assert sum(sent.values()) == CLIENTS * REQUESTS_PER_CLIENT

    health = httpx.get(router.base + "/health", timeout=5).json()
    assert health["in_flight"] == 0 and health["waiting"] == 0, health

    starts = {m: len(router.events(m, "start")) for m in ("chat-a", "chat-b", "embed")}
    # Never two engine processes of one model at once: every start comes after the previous process has gone.
    for model in starts:
        alive: set[int] = set()
        for event in router.events(model):
            if event["event"] == "start":
                assert not alive, f"{model}: engine started while pid {alive} still ran"
                alive.add(event["pid"])
            elif event["event"] in ("stop", "exit"):
                alive.discard(event["pid"])
    # Grouping: the chat models alternate at most once per batch of waiters, far fewer starts than requests.
    assert starts["chat-a"] + starts["chat-b"] <= (sent["chat-a"] + sent["chat-b"]) // 2, (starts, sent)
    metrics = httpx.get(router.base + "/metrics", timeout=5).text
    assert 'llm_router_requests_total{model="chat-a",outcome="ok"}' in metrics
    assert 'outcome="error"' not in metrics
    print(f"\nswitch storm: {sum(sent.values())} requests {dict(sent)} in {took:.1f} s; engine starts {starts}")
