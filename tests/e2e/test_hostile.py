"""Hostile input through the real HTTP layer: one real router process (hypercorn on 127.0.0.1, fake engines behind a
fake systemctl), hypothesis-generated bodies, headers, paths and methods.

Every answer must be complete and the router's own: never a 5xx, never an empty body, never a stack trace, every
error OpenAI's envelope with a message; the router's RSS stays bounded. No request here may load an engine: model
names are unknown ones (or a known one only where the router must refuse the body before routing), so every
answer comes from the router itself and a 5xx could only be its own fault.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import DEFAULT_MODELS, RouterEnv

pytestmark = pytest.mark.e2e

BASE_PORT = 18300  # fake engines on 18301-18304
MAX_BODY = 64 * 1024
KNOWN_IDS = frozenset(m.id for m in DEFAULT_MODELS)
POST_ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/models/load",
    "/models/unload",
    "/v1/models/load",
    "/v1/models/unload",
]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "logprobs",
    "seed",
    "user",
]
RSS_GROWTH_LIMIT_KIB = 64 * 1024
"""The router keeps nothing per request once answered; the biggest body it ever reads is MAX_BODY (64 KiB) and the
biggest header block hypercorn buffers is 16 KiB. What remains is allocator slack (pymalloc arenas and glibc heap
kept after peaks of a few concurrent megabyte-sized buffers) plus lazily imported modules: a few MiB. 64 MiB is
generous for that and still far below what a leak of the ~1000 bodies sent here (up to 4 MiB each) would show."""

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXAMPLES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def hostile_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterEnv]:
    env = RouterEnv(tmp_path_factory.mktemp("hostile"), DEFAULT_MODELS, {"max_body_bytes": MAX_BODY}, BASE_PORT)
    env.start()
    yield env
    env.stop()


@pytest.fixture(scope="module")
def client(hostile_router: RouterEnv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_router.base, timeout=30) as c:
        yield c


def rss_kib(env: RouterEnv) -> int:
    assert env.process is not None
    for line in Path(f"/proc/{env.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def check(response: httpx.Response, *, allowed: set[int] | None = None) -> None:
    """The pass criteria every answer must meet."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    if allowed is not None:
        assert response.status_code in allowed, f"{where}: {response.text[:500]}"
    assert "Traceback" not in response.text, f"{where}: {response.text[:2000]}"
    if response.request.method == "HEAD":
        return
    assert response.content, f"{where}: empty body"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: {body}"
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, f"{where}: {body}"
        assert isinstance(error["message"], str) and error["message"].strip(), f"{where}: {body}"
        assert isinstance(error["type"], str) and error["type"], f"{where}: {body}"
        assert response.headers["content-type"].startswith("application/json")


def defang(value: Any) -> Any:
    """A body that names a configured model would load an engine: rename it."""
    if isinstance(value, dict) and isinstance(value.get("model"), str) and value["model"].strip() in KNOWN_IDS:
        return {**value, "model": value["model"] + "-unknown"}
    return value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
unknown_models = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() not in KNOWN_IDS)


@SETTINGS
@given(endpoint=st.sampled_from(POST_ENDPOINTS), value=json_values)
def test_random_json_bodies(client: httpx.Client, endpoint: str, value: Any) -> None:
    EXAMPLES["random JSON bodies"] += 1
    response = client.post(endpoint, content=json.dumps(defang(value)).encode())
    check(response, allowed={400, 404, 413})


@SETTINGS
@given(
    endpoint=st.sampled_from(POST_ENDPOINTS),
    body=st.binary(max_size=2000)
    | st.binary(max_size=200).map(lambda b: b'{"model": "' + b + b'\xff\xfe"}')
    | st.binary(max_size=200).map(lambda b: b'{"model": "x", "messages": [{"content": "' + b + b'\xc3\x28"}]}'),
)
def test_non_json_and_invalid_utf8_bodies(client: httpx.Client, endpoint: str, body: bytes) -> None:
    EXAMPLES["non-JSON / invalid UTF-8 bodies"] += 1
    check(client.post(endpoint, content=body), allowed={400, 404})


@SETTINGS
@given(
    endpoint=st.sampled_from(POST_ENDPOINTS),
    field=st.sampled_from(FIELDS),
    value=json_values,
    model=unknown_models,
)
def test_wrong_types_for_known_fields(client: httpx.Client, endpoint: str, field: str, value: Any, model: str) -> None:
    EXAMPLES["wrong field types"] += 1
    body = defang({"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", field: value})
    check(client.post(endpoint, content=json.dumps(body).encode()), allowed={400, 404})


@settings(SETTINGS, max_examples=60)
@given(
    endpoint=st.sampled_from(POST_ENDPOINTS),
    depth=st.integers(min_value=129, max_value=20_000),
    opener=st.sampled_from(["[", '{"a":']),
    where=st.sampled_from(["top", "messages", "model"]),
)
def test_deeply_nested_json(client: httpx.Client, endpoint: str, depth: int, opener: str, where: str) -> None:
    """A known model on purpose: the router must refuse the body (400) before it routes anything."""
    EXAMPLES["deeply nested JSON"] += 1
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    body = {
        "top": nested,
        "messages": f'{{"model": "llama-a", "messages": {nested}}}',
        "model": f'{{"model": {nested}}}',
    }[where]
    response = client.post(endpoint, content=body.encode())
    check(response, allowed={400, 413})
    if len(body) <= MAX_BODY:
        assert response.status_code == 400


@settings(SETTINGS, max_examples=40)
@given(
    endpoint=st.sampled_from(POST_ENDPOINTS),
    size=st.integers(min_value=MAX_BODY + 1, max_value=4 * 1024 * 1024),
    chunked=st.booleans(),
)
def test_bodies_above_max_body_bytes(client: httpx.Client, endpoint: str, size: int, chunked: bool) -> None:
    EXAMPLES["bodies above max_body_bytes"] += 1
    payload = b'{"model": "llama-a", "prompt": "' + b"x" * size + b'"}'
    if chunked:  # no Content-Length: the limit must hold while the body streams in

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(payload), 65536):
                yield payload[start : start + 65536]

        response = client.post(endpoint, content=pieces())
    else:
        response = client.post(endpoint, content=payload)
    check(response, allowed={413})
    assert "max_body_bytes" in response.json()["error"]["message"]


header_values = st.text(alphabet=string.ascii_letters + string.digits + " -_.;=/", max_size=64)


@settings(SETTINGS, max_examples=60)
@given(
    path=st.sampled_from(["/v1/models", "/health", "/v1/chat/completions", "/models/unload", "/nope"]),
    size=st.integers(min_value=1, max_value=200_000),
    name=st.sampled_from(["Authorization", "X-LLM-Router-Annotate", "X-Junk", "Content-Type", "User-Agent"]),
    filler=header_values.filter(lambda s: s.strip() != ""),
)
def test_huge_header_values(client: httpx.Client, path: str, size: int, name: str, filler: str) -> None:
    EXAMPLES["huge header values"] += 1
    value = (filler * (size // len(filler) + 1))[:size].strip() or "x"
    method = "GET" if path in ("/v1/models", "/health", "/nope") else "POST"
    body = b'{"model": "no-such-model"}' if method == "POST" else None
    response = client.request(method, path, headers={name: value}, content=body)
    check(response, allowed={200, 400, 404, 405, 431})


path_text = st.text(alphabet=string.ascii_letters + string.digits + "-._~%/:@!$&'()*+,;=", max_size=60)


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "BREW", "PROPFIND", "TRACE"]),
    path=st.one_of(
        # Never "//...": a client reads that as a host ("//:" broke httpx's URL parser before any request was sent).
        path_text.map(lambda p: "/" + p.lstrip("/")),
        st.sampled_from(["/v1", "/v1/", "/v1/models/", "/v1/models/x/y", "/models/load/", "/v1/embeddings/x"]),
        path_text.map(lambda p: "/v1/" + p),
    ),
)
def test_unknown_paths_and_methods(client: httpx.Client, method: str, path: str) -> None:
    EXAMPLES["unknown paths and methods"] += 1
    if path.rstrip("/") in ("/models/sse", "/v1/models/sse") and method == "GET":
        path += "-not"  # the event stream never ends
    response = client.request(method, path, content=b'{"model": "no-such-model"}' if method == "POST" else None)
    if method == "OPTIONS" and response.status_code == 200:
        assert "allow" in response.headers  # Quart's automatic OPTIONS answer: an Allow header, no body
        return
    check(response, allowed={200, 400, 404, 405})


def test_hostile_input_left_the_router_healthy(hostile_router: RouterEnv, client: httpx.Client) -> None:
    """After every strategy above: still answering, nothing loaded, nothing in flight, memory bounded."""
    before = getattr(hostile_router, "rss_before", None)
    health = client.get("/health")
    assert health.status_code == 200
    statuses = {model["status"] for model in health.json()["models"].values()}
    assert statuses == {"unloaded"}, health.json()
    started = {model_id: hostile_router.is_active(model_id) for model_id in KNOWN_IDS}
    assert "active" not in started.values(), started
    assert "Traceback" not in hostile_router.log()
    after = rss_kib(hostile_router)
    total = sum(EXAMPLES.values())
    print(f"\nhypothesis examples run: {total} {dict(EXAMPLES)}; router RSS {before} KiB -> {after} KiB")
    assert before is not None, "run the whole module: the RSS baseline is taken by the first test"
    assert after - before < RSS_GROWTH_LIMIT_KIB, f"RSS grew {before} -> {after} KiB"
    assert total >= 500, EXAMPLES


@pytest.fixture(scope="module", autouse=True)
def rss_baseline(hostile_router: RouterEnv) -> None:
    # Baseline after a little warm-up (first requests import lazily loaded modules).
    with httpx.Client(base_url=hostile_router.base, timeout=30) as c:
        for _ in range(20):
            c.get("/v1/models")
            c.post("/v1/chat/completions", json={"model": "no-such-model"})
    hostile_router.rss_before = rss_kib(hostile_router)  # type: ignore[attr-defined]
