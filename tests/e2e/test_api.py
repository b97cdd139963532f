"""The API surface: model list, health, non-streaming answers, completions, embeddings, annotations, reload."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import yaml

from tests.e2e.conftest import DEFAULT_MODELS, ModelSpec, RouterEnv, StreamResult

FOOTER = re.compile(r"\n\n⚡ \d+\.\d tok/s \(\d+ tokens? in \d+\.\ds\)$")


def test_models_list_reports_status_from_memory(router: RouterEnv) -> None:
    with router.client() as client:
        listing = client.get("/v1/models").json()
        assert listing["object"] == "list"
        entries = {m["id"]: m for m in listing["data"]}
        assert set(entries) == {m.id for m in DEFAULT_MODELS}
        assert entries["llama-a"]["name"] == "Llama A"
        assert entries["sg"]["owned_by"] == "sglang"
        assert all(e["status"] == {"value": "unloaded"} for e in entries.values())
        assert all({"id", "object", "created", "owned_by"} <= e.keys() for e in entries.values())
        assert router.stream_chat("sg", "[[tokens:2]]").done
        entries = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert entries["sg"]["status"] == {"value": "loaded"}
        health = client.get("/health").json()
    assert health["active_model"] == "sg" and health["active_unit"] == "llm-backend-sg.service"
    assert health["models"]["sg"]["status"] == "loaded"


def test_models_list_answers_while_a_model_loads(router: RouterEnv) -> None:
    import threading

    thread = threading.Thread(target=router.stream_chat, args=("sleepy",))
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    entries = {m["id"]: m for m in httpx.get(router.base + "/v1/models").json()["data"]}
    assert time.monotonic() - started < 0.5
    assert entries["sleepy"]["status"] == {"value": "loading"}
    thread.join(10)


def test_non_streaming_chat_carries_speed_in_headers_and_usage_without_footer(router: RouterEnv) -> None:
    with router.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "llama-a", "messages": [{"role": "user", "content": "[[tokens:6]]"}]}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    content = body["choices"][0]["message"]["content"]
    assert "⚡" not in content, "non-streaming answers get no text footer by default (Open-WebUI tasks parse JSON)"
    assert float(response.headers["x-llm-router-tokens-per-second"]) > 0
    assert response.headers["x-llm-router-completion-tokens"] == "6"
    assert response.headers["x-llm-router-speed-source"] == "llamacpp-timings"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["response_token/s"] > 0


def test_non_streaming_footer_when_configured(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(footer_non_streaming=True)
    with router.client() as client:
        body = client.post(
            "/v1/chat/completions", json={"model": "tabby", "messages": [{"role": "user", "content": "[[tokens:4]]"}]}
        ).json()
    assert FOOTER.search(body["choices"][0]["message"]["content"])


def test_completions_stream_and_embeddings_are_routed(router: RouterEnv) -> None:
    with router.client() as client:
        with client.stream(
            "POST", "/v1/completions", json={"model": "sg", "prompt": "once [[tokens:4]]", "stream": True}
        ) as response:
            result = StreamResult.read(response)
        embedding = client.post("/v1/embeddings", json={"model": "llama-b", "input": "hello"})
    assert result.done and not result.errors
    assert all(c["object"] == "text_completion" for c in result.chunks)
    assert result.text().startswith("🔀 Switching to sg"), "completions get status in their only channel: text"
    assert FOOTER.search(result.text())
    assert router.events("sg", "request")[-1]["path"] == "/v1/completions"
    assert embedding.status_code == 200, embedding.text
    vector = embedding.json()["data"][0]["embedding"]
    assert len(vector) == 8 and all(isinstance(v, float) for v in vector)
    assert router.events("llama-b", "request")[-1]["path"] == "/v1/embeddings"


def test_annotations_follow_the_answer_not_the_request(router: RouterEnv) -> None:
    # Open-WebUI offers its built-in tools on every chat: a plain answer still gets its status and its footer.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases: list[tuple[dict[str, Any], bool, bool]] = [
        ({"tools": tools, "tool_choice": "auto"}, True, True),
        ({"response_format": {"type": "json_object"}}, True, False),
        ({"headers": {"X-LLM-Router-Annotate": "off"}}, False, False),
    ]
    for i, (extra, status, footer) in enumerate(cases):
        model = ["llama-a", "llama-b", "sg"][i]  # each one needs a switch
        headers = extra.pop("headers", None)
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "[[tokens:3]]"}], **extra}
        with router.client() as client, client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            result = StreamResult.read(r)
        assert result.done and not result.errors
        assert result.text().startswith("tok1 tok2 tok3"), (extra, result.text())
        assert bool(FOOTER.search(result.text())) is footer, (extra, result.text())
        assert result.text("reasoning_content").startswith("🔀 Switching to ") is status, extra


def test_injected_text_is_removed_from_history_before_the_engine_sees_it(router: RouterEnv) -> None:
    first = router.stream_chat("llama-a", "question one [[tokens:3]]")
    answer = first.text()
    status = first.text("reasoning_content")
    assert "⚡" in answer
    messages = [
        {"role": "user", "content": "question one"},
        {"role": "assistant", "content": answer, "reasoning_content": status},
        {"role": "user", "content": "question two ⚡ keeps my emoji [[tokens:2]]"},
    ]
    with router.client() as client:
        client.post("/v1/chat/completions", json={"model": "llama-a", "messages": messages})
    seen = router.events("llama-a", "request")[-1]["body"]["messages"]
    assert seen[1]["content"] == "tok1 tok2 tok3"
    assert "reasoning_content" not in seen[1] or not seen[1]["reasoning_content"]
    assert seen[2]["content"] == messages[2]["content"]


def test_status_in_content_channel(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(status_channel="content")
    result = router.stream_chat("llama-a", "[[tokens:2]]")
    text = result.text()
    assert text.startswith("🔀 Switching to Llama A\n")
    assert "tok1 tok2" in text and FOOTER.search(text)


def test_sighup_reload_good_and_bad(router: RouterEnv) -> None:
    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    models = yaml.safe_load((router.config_dir / "models.yml").read_text())
    models["models"]["llama-a"]["name"] = "Llama A renamed"
    del models["models"]["llama-b"]
    router.write_config(router.config, models)
    router.reload()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = {m["id"]: m for m in httpx.get(router.base + "/v1/models").json()["data"]}
        if "llama-b" not in entries:
            break
        time.sleep(0.05)
    assert "llama-b" not in entries and entries["llama-a"]["name"] == "Llama A renamed"
    assert entries["llama-a"]["status"] == {"value": "loaded"}, "a reload keeps the running engine"
    # a broken models.yml is refused and the running config kept
    (router.config_dir / "models.yml").write_text("models:\n  x: {backend: nope, unit: u.service}\n")
    router.reload()
    time.sleep(0.5)
    entries = {m["id"]: m for m in httpx.get(router.base + "/v1/models").json()["data"]}
    assert "llama-a" in entries and "x" not in entries
    assert "reload refused" in router.log() and "models.x.backend" in router.log()
    assert router.stream_chat("llama-a", "[[tokens:2]]").done


def test_router_restart_adopts_the_running_engine(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory()
    assert router.stream_chat("sg", "[[tokens:2]]").done
    router.process.terminate()  # type: ignore[union-attr]
    router.process.wait(15)  # type: ignore[union-attr]
    assert router.is_active("sg") == "active", "stopping the router leaves the engine running"
    router.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = {m["id"]: m for m in httpx.get(router.base + "/v1/models").json()["data"]}
        if entries["sg"]["status"] == {"value": "loaded"}:
            break
        time.sleep(0.05)
    assert entries["sg"]["status"] == {"value": "loaded"}
    result = router.stream_chat("sg", "[[tokens:2]]")
    assert not result.text("reasoning_content"), "no switch needed after adoption"
    assert len(router.events("sg", "start")) == 1


def test_stream_longer_than_sixty_seconds_with_silence_gets_keepalives(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(models=[ModelSpec("llama-a", "llamacpp", env={"FAKE_PING_INTERVAL": "600"})])
    result = router.stream_chat("llama-a", "[[silence:62]] [[tokens:3]]")
    assert result.done and not result.errors, result.raw[-500:]
    assert "tok1 tok2 tok3" in result.text()
    assert result.comments >= 10, "keep-alive comments during the engine's silence"


def test_sigterm_lets_running_streams_finish(router: RouterEnv) -> None:
    import threading

    assert router.stream_chat("llama-a", "[[tokens:2]]").done
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(router.stream_chat("llama-a", "[[tokens:20]] [[delay:0.1]]"))
    )
    thread.start()
    time.sleep(0.5)
    assert router.process is not None
    router.process.terminate()
    thread.join(30)
    (result,) = results
    assert result.done and not result.errors, result.raw[-300:]
    assert "tok20" in result.text()
    assert router.process.wait(15) == 0


TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}


def test_tool_call_round_trip_gets_status_and_no_footer_then_a_footer_on_the_text(router_factory) -> None:  # type: ignore[no-untyped-def]
    router: RouterEnv = router_factory(footer_non_streaming=True)
    for model in ("llama-a", "sg", "tabby"):
        question = {"role": "user", "content": "what time is it? [[tool:get_time]]"}
        body = {"model": model, "stream": True, "messages": [question], "tools": [TOOL]}
        with router.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
            call = StreamResult.read(r)
        assert call.done and not call.errors, call.raw
        assert call.text("reasoning_content").startswith("🔀 Switching to "), "the load is shown next to tools"
        assert "⚡" not in call.raw, f"{model}: a tool call gets no footer"
        finishes = [c["choices"][0]["finish_reason"] for c in call.chunks if c.get("choices")]
        assert finishes[-1] == "tool_calls", (model, finishes)
        deltas = [c["choices"][0]["delta"].get("tool_calls") for c in call.chunks if c.get("choices")]
        parts = [part for delta in deltas if delta for part in delta]
        assert parts[0]["function"]["name"] == "get_time" and parts[0]["id"]
        arguments = "".join(p["function"].get("arguments") or "" for p in parts)
        assert json.loads(arguments) == {"zone": ""}, "the call's arguments arrive intact"
        tool_call = {"id": parts[0]["id"], "type": "function", "function": {"name": "get_time", "arguments": arguments}}
        messages = [
            question,
            {"role": "assistant", "content": None, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": parts[0]["id"], "content": "12:00 [[tokens:3]]"},
        ]
        follow_up = {"model": model, "stream": True, "messages": messages, "tools": [TOOL]}
        with router.client() as client, client.stream("POST", "/v1/chat/completions", json=follow_up) as r:
            answer = StreamResult.read(r)
        assert answer.done and not answer.errors
        assert FOOTER.search(answer.text()), f"{model}: the plain answer after the tool result shows its speed"
        with router.client() as client:
            plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert plain["choices"][0]["finish_reason"] == "tool_calls"
        assert plain["choices"][0]["message"]["content"] is None, "non-streaming tool calls are never touched"
