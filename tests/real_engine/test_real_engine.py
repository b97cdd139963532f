"""Real engine end to end (issue 4): the router deployed by the role in the demo box, a real llama-server, two real
models (Gemma 3 270M Q4_K_M and Q8_0), the official `openai` SDK as the client.

The demo must be up (`make demo`; `.ci/run` does that before the tests). With LLM_ROUTER_TEST_DEMO_UP=1 the session
fixture runs `scripts/demo up` itself when the router does not answer. When neither, the tests FAIL (never skip):
a missing demo is a broken build, not an optional extra.

Environment: LLM_ROUTER_URL (default http://127.0.0.1:8002/v1), LLM_ROUTER_DEMO_BOX (default llmr-demo),
LLM_ROUTER_TEST_MODEL_1 / _2 (default gemma-3-270m-q4 / gemma-3-270m-q8).

The sequence (tests run in file order and share the demo's state):
  cold start: both engine units stopped, the router restarted (it adopts nothing)
  1. model 1, streamed (cold start)      2. model 2, streamed (switch)     3. model 1, non-streamed (switch)
  4. model 2, non-streamed (switch)      5. model 1, streamed (switch back), then once more (no switch)
Each answer: non-empty real text (the base model's wording is not asserted), the speed the router reports agrees
with llama-server's own `timings.predicted_per_second` within 2% (streamed: `usage["response_token/s"]` and, when
the answer stopped by itself, the footer's figure, vs the final chunk's `timings` that the router passes through
with `stream_options.include_usage`; an answer cut at max_tokens must have no footer; non-streamed: the
X-LLM-Router-Tokens-Per-Second header and `usage["response_token/s"]` vs the body's `timings`), `/v1/models` marks
the model in use as loaded and the other one not, and the other model's unit is inactive in the box.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.real_engine

REPO = Path(__file__).resolve().parents[2]
ROUTER_URL = os.environ.get("LLM_ROUTER_URL", "http://127.0.0.1:8002/v1").rstrip("/")
ROUTER_ROOT = ROUTER_URL.rsplit("/v1", 1)[0]
BOX = os.environ.get("LLM_ROUTER_DEMO_BOX", "llmr-demo")
MODEL_1 = os.environ.get("LLM_ROUTER_TEST_MODEL_1", "gemma-3-270m-q4")
MODEL_2 = os.environ.get("LLM_ROUTER_TEST_MODEL_2", "gemma-3-270m-q8")
MAX_TOKENS = 24
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
FOOTER = re.compile(r"\u26a1 (\d+(?:\.\d+)?) tok/s \((\d+) tokens? in (\d+(?:\.\d+)?)s\)")


def unit(model: str) -> str:
    return f"llm-backend-{model}.service"


def box(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(REPO / "scripts" / "box"), "exec", BOX, "--", *cmd], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"in box {BOX}: {' '.join(cmd)}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def unit_state(model: str) -> str:
    return box("systemctl", "is-active", unit(model), check=False).stdout.strip()


def router_health(timeout: float = 3.0) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"{ROUTER_ROOT}/health", timeout=timeout)
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


def model_statuses() -> dict[str, str]:
    data = httpx.get(f"{ROUTER_URL}/models", timeout=10).json()["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def wait_router(seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = router_health()
        if health is not None:
            return health
        time.sleep(0.2)
    return None


@pytest.fixture(scope="session")
def demo() -> None:
    """The demo router is up; with both engines stopped and the router restarted, nothing is loaded (cold start)."""
    if router_health() is None and os.environ.get("LLM_ROUTER_TEST_DEMO_UP") == "1":
        subprocess.run([str(REPO / "scripts" / "demo"), "up"], check=True, timeout=3600)
    if router_health() is None:
        pytest.fail(
            f"no llm-router answers on {ROUTER_ROOT}/health: bring the demo up first (`make demo`, as root), "
            "or set LLM_ROUTER_TEST_DEMO_UP=1 to let this test do it"
        )
    box("true")  # the box is there and we can run commands in it
    for model in (MODEL_1, MODEL_2):
        box("systemctl", "stop", unit(model))
    box("systemctl", "restart", "llm-router.service")
    assert wait_router(60) is not None, "the router did not come back after systemctl restart llm-router"
    statuses = model_statuses()
    assert {MODEL_1, MODEL_2} <= set(statuses), f"/v1/models lacks the demo models: {statuses}"
    assert statuses[MODEL_1] != "loaded" and statuses[MODEL_2] != "loaded", statuses


@pytest.fixture(scope="session")
def client(demo: None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=ROUTER_URL, api_key=os.environ.get("LLM_ROUTER_API_KEY", "demo"), timeout=300, max_retries=0
    )


@dataclass
class Answer:
    text: str = ""  # content with the router's footer removed
    raw_content: str = ""
    status: str = ""  # reasoning_content: the router's switch progress
    footer_tps: float | None = None
    footer_tokens: int | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    router_tps: float | None = None  # non-streaming: X-LLM-Router-Tokens-Per-Second


def stream(client: openai.OpenAI, model: str) -> Answer:
    ans = Answer()
    chunks = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.7,
    )
    for chunk in chunks:
        extra = chunk.model_extra or {}
        if extra.get("timings"):
            ans.timings = extra["timings"]
        if chunk.usage is not None:
            ans.usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            delta = choice.delta
            ans.raw_content += delta.content or ""
            ans.status += (delta.model_extra or {}).get("reasoning_content") or ""
            if choice.finish_reason:
                ans.finish_reason = choice.finish_reason
    found = FOOTER.findall(ans.raw_content)
    # The footer follows only an answer that ended normally; one cut at max_tokens ("length") has none.
    expected = 1 if ans.finish_reason == "stop" else 0
    assert len(found) == expected, (
        f"{model}: finish_reason {ans.finish_reason!r}, expected {expected} speed footer(s) in the streamed content, "
        f"got {found!r}: {ans.raw_content[-300:]!r}"
    )
    if found:
        ans.footer_tps, ans.footer_tokens = float(found[0][0]), int(found[0][1])
    ans.text = FOOTER.sub("", ans.raw_content).rstrip()
    return ans


def complete(client: openai.OpenAI, model: str) -> Answer:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0.7
    )
    body = json.loads(raw.text)
    completion = raw.parse()
    ans = Answer(headers=dict(raw.headers))
    ans.raw_content = completion.choices[0].message.content or ""
    ans.text = FOOTER.sub("", ans.raw_content).rstrip()
    ans.finish_reason = completion.choices[0].finish_reason
    ans.timings = body.get("timings")
    ans.usage = body.get("usage")
    value = raw.headers.get("x-llm-router-tokens-per-second")
    ans.router_tps = float(value) if value is not None else None
    return ans


def assert_speed_matches(model: str, reported: float | None, what: str, timings: dict[str, Any] | None) -> None:
    assert timings and timings.get("predicted_per_second"), f"{model}: llama-server's timings missing: {timings!r}"
    engine = float(timings["predicted_per_second"])
    assert reported is not None, f"{model}: the router reported no speed ({what})"
    # 2%; the footer shows one decimal, so allow its rounding (0.05) on slow machines.
    tolerance = max(0.02 * engine, 0.0501)
    assert abs(reported - engine) <= tolerance, (
        f"{model}: {what} says {reported} tok/s, llama-server's timings say {engine:.3f} tok/s (> 2% apart)"
    )


def assert_answer(model: str, ans: Answer) -> None:
    assert ans.text.strip(), f"{model}: empty answer: {ans.raw_content!r}"
    assert ans.finish_reason in ("length", "stop"), f"{model}: finish_reason {ans.finish_reason!r}"


def assert_loaded_only(model: str) -> None:
    other = MODEL_2 if model == MODEL_1 else MODEL_1
    statuses = model_statuses()
    assert statuses[model] == "loaded", f"/v1/models after answering with {model}: {statuses}"
    assert statuses[other] != "loaded", f"/v1/models after answering with {model}: {statuses}"
    assert unit_state(model) == "active", f"{unit(model)} is {unit_state(model)}"
    state = unit_state(other)
    assert state == "inactive", f"{unit(other)} should be inactive while {model} is in use, is {state!r}"


def check_streamed(client: openai.OpenAI, model: str, switch: bool) -> Answer:
    ans = stream(client, model)
    assert_answer(model, ans)
    if switch:
        assert ans.status.strip(), f"{model}: a switch streamed no status text (reasoning_content)"
    assert ans.usage and ans.usage.get("completion_tokens"), f"{model}: no usage in the stream: {ans.usage!r}"
    # Open-WebUI's info tooltip keys, on every answer whose client asked for usage.
    assert_speed_matches(model, ans.usage.get("response_token/s"), 'usage["response_token/s"]', ans.timings)
    assert isinstance(ans.usage.get("prompt_token/s"), float), f"{model}: usage {ans.usage}"
    assert re.fullmatch(r"\d+h\d+m\d+s", str(ans.usage.get("approximate_total"))), f"{model}: usage {ans.usage}"
    if ans.footer_tps is not None:
        if ans.timings:
            assert ans.footer_tokens == ans.timings["predicted_n"], f"{model}: footer tokens vs timings {ans.timings}"
        assert_speed_matches(model, ans.footer_tps, "the footer", ans.timings)
    assert_loaded_only(model)
    return ans


def check_non_streamed(client: openai.OpenAI, model: str) -> Answer:
    ans = complete(client, model)
    assert_answer(model, ans)
    assert_speed_matches(model, ans.router_tps, "the X-LLM-Router-Tokens-Per-Second header", ans.timings)
    assert ans.usage is not None
    assert_speed_matches(model, ans.usage.get("response_token/s"), 'usage["response_token/s"]', ans.timings)
    assert_loaded_only(model)
    return ans


def test_1_model_1_streamed_cold_start(client: openai.OpenAI) -> None:
    check_streamed(client, MODEL_1, switch=True)


def test_2_switch_to_model_2_streamed(client: openai.OpenAI) -> None:
    check_streamed(client, MODEL_2, switch=True)


def test_3_switch_to_model_1_non_streamed(client: openai.OpenAI) -> None:
    check_non_streamed(client, MODEL_1)


def test_4_switch_to_model_2_non_streamed(client: openai.OpenAI) -> None:
    check_non_streamed(client, MODEL_2)


def test_5_back_to_model_1_streamed_then_again_without_switch(client: openai.OpenAI) -> None:
    check_streamed(client, MODEL_1, switch=True)
    again = check_streamed(client, MODEL_1, switch=False)
    assert not again.status.strip(), f"no switch was needed, yet the router streamed status text: {again.status!r}"


def test_6_router_health_reports_the_loaded_model(demo: None) -> None:
    health = router_health()
    assert health is not None
    assert MODEL_1 in json.dumps(health), f"/health does not name the active model {MODEL_1}: {health}"
