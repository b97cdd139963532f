"""The router behind the real Open-WebUI, driven through its web page in headless Chromium (issue 7).

Every case uses its own model (see conftest.MAIN_MODELS), so each starts with a switch or none as it needs, and
saves a screenshot into the results folder. The router's text (status lines, speed footer) must show in the page
where it helps the user and must never reach an engine: not in a later turn's history, not in Open-WebUI's
background task prompts."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from playwright.sync_api import Locator, Page, expect

from tests.e2e.conftest import RouterEnv, unit_of, wait_until
from tests.openwebui.harness import (
    FOOTER_RE,
    ROUTER_MARKS,
    ChatPage,
    OpenWebUI,
    chat_history_of,
    engine_requests,
    router_text_in,
    settle,
    task_requests,
)

BUILTIN_TIME_TOOL = "get_current_timestamp"  # open_webui/tools/builtin.py, offered by default, works offline


def stream_requests_with(env: RouterEnv, model_id: str, marker: str) -> list[dict[str, Any]]:
    """The streaming chat requests an engine received whose first user message contains `marker`."""
    out = []
    for event in engine_requests(env.events_path(model_id)):
        body = event["body"]
        if not (isinstance(body, dict) and body.get("stream")):
            continue
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        if users and marker in str(users[0].get("content")):
            out.append(body)
    return out


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    # Page and HTTP checks: every 0.2 s is often enough.
    return wait_until(predicate, timeout, what, interval=0.2)


def expand(block: Any) -> None:
    """Open a collapsible block (Open-WebUI's reasoning and tool groups) if it is closed."""
    if block.get_attribute("aria-expanded") != "true":
        block.click()
    expect(block).to_have_attribute("aria-expanded", "true")


def router_health(env: RouterEnv) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(env.base + "/health", timeout=5).json()
    return data


def output_texts(message: dict[str, Any]) -> list[tuple[str, str]]:
    """(item type, text) for each item of a stored assistant message's `output` (Open-WebUI 0.12)."""
    out = []
    for item in message.get("output") or []:
        parts = item.get("content") if isinstance(item.get("content"), list) else item.get("output")
        text = "".join(p.get("text", "") for p in parts or [] if isinstance(p, dict))
        if item.get("type") == "function_call":
            text = f"{item.get('name')} {item.get('arguments')}"
        out.append((str(item.get("type")), text))
    return out


# ----------------------------------------------------------------------------------------------------------------
# a. the model list
# ----------------------------------------------------------------------------------------------------------------
def test_a_model_selector_lists_the_routers_models(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, content_router: RouterEnv, results: Path
) -> None:
    ids = openwebui.model_ids()
    expected = {**router.models, **content_router.models}
    assert set(expected) <= set(ids), ids
    page.goto(openwebui.base + "/")
    page.locator("#model-selector-model-button").click()
    listbox = page.get_by_role("listbox", name="Available models")
    expect(listbox).to_be_visible()
    for model_id, spec in expected.items():
        option = listbox.locator(f'[role="option"][data-value="{model_id}"]')
        expect(option).to_have_attribute("aria-label", f"Select {spec.name} model")
        expect(option).to_contain_text(str(spec.name))
    ChatPage(page, openwebui, results).screenshot("a_model_selector.png")


# ----------------------------------------------------------------------------------------------------------------
# b. a chat that switches, at default settings: status lines while loading, then the speed footer
# ----------------------------------------------------------------------------------------------------------------
def test_b_switch_shows_status_while_loading_then_the_speed_footer(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("llama-chat", "Llama Chat")
    assert router_health(router)["models"]["llama-chat"]["status"] == "unloaded"
    answer = chat.send("switch to the llama please case-b [[tokens:16]] [[delay:0.05]]")

    thinking = answer.get_by_role("button").filter(has_text="Thinking")
    expect(thinking).to_be_visible(timeout=20_000)
    expand(thinking)
    expect(answer.get_by_text("🔀 Switching to Llama Chat")).to_be_visible(timeout=10_000)
    expect(answer.get_by_text(re.compile(r"⏳ Loading Llama Chat: \d+\.\d s elapsed")).first).to_be_visible()
    health = router_health(router)
    chat.screenshot("b1_status_while_loading.png")
    assert health["loading_model"] == "llama-chat", f"the status was not seen during the load: {health}"

    chat.wait_done(answer, "tok16")
    expect(answer.get_by_text(FOOTER_RE)).to_be_visible()
    thought = answer.get_by_role("button").filter(has_text=re.compile(r"Thought for \d+ seconds?"))
    expect(thought).to_be_visible()
    expand(thought)
    expect(answer.get_by_text(re.compile(r"✅ Llama Chat ready in \d+(\.\d+)? s"))).to_be_visible()
    chat.screenshot("b2_answer_with_footer.png")

    requests = stream_requests_with(router, "llama-chat", "case-b")
    assert len(requests) == 1
    assert any(t["function"]["name"] == BUILTIN_TIME_TOOL for t in requests[0].get("tools") or []), (
        "Open-WebUI's default settings offer its built-in tools"
    )
    stored = chat.stored_messages()[-1]
    assert FOOTER_RE.search(stored["content"]), stored["content"]


# ----------------------------------------------------------------------------------------------------------------
# c. a tool-using answer: the tool call works; the footer only on the answer that ended with "stop"
# ----------------------------------------------------------------------------------------------------------------
def test_c_tool_call_round_trip_and_footer_only_after_the_final_answer(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("tabby-tools", "Tabby Tools")
    answer = chat.send(f"what time is it case-c [[tool:{BUILTIN_TIME_TOOL}]] [[tokens:6]]")
    chat.wait_done(answer, "tok6")

    # The page shows the tool call ("Explored get_current_timestamp"); inside: the switch status (reasoning), then
    # the call with the tool's real output, then the final text with the footer, once.
    group = answer.get_by_role("button", name="Toggle details").filter(has_text=BUILTIN_TIME_TOOL)
    expect(group).to_be_visible()
    expand(group)
    thought = answer.locator("button[aria-expanded]").filter(has_text="Thought")
    expand(thought)
    expect(answer.get_by_text("🔀 Switching to Tabby Tools")).to_be_visible()
    answer.get_by_role("button").filter(has_text=f"View Result from {BUILTIN_TIME_TOOL}").click()
    expect(answer.get_by_text(re.compile(r'"current_timestamp": \d{10}'))).to_be_visible()
    expect(answer.get_by_text(FOOTER_RE)).to_have_count(1)
    chat.screenshot("c_tool_call.png")

    # The engine: a tool call answered, then the follow-up request carried the call and the tool's result.
    tool_calls = router.events("tabby-tools", "tool_call")
    assert [e["name"] for e in tool_calls] == [BUILTIN_TIME_TOOL]
    requests = stream_requests_with(router, "tabby-tools", "case-c")
    assert len(requests) == 2, [r["messages"] for r in requests]
    first, follow_up = requests
    assert first["messages"][-1]["role"] == "user"
    roles = [m["role"] for m in follow_up["messages"]]
    assert roles[-2:] == ["assistant", "tool"], roles
    call = follow_up["messages"][-2]["tool_calls"][0]
    assert call["function"]["name"] == BUILTIN_TIME_TOOL
    assert follow_up["messages"][-1]["tool_call_id"] == call["id"]
    assert "current_timestamp" in follow_up["messages"][-1]["content"]
    assert router_text_in(follow_up) == [], "router text reached the engine in the tool round trip"

    # What Open-WebUI stored: status (reasoning) -> function_call -> its output -> the final text. Nothing the
    # router wrote precedes the call (the answer that ended with finish_reason "tool_calls" got no footer); the
    # final answer, which ended with "stop" and no tool_calls, ends with the footer.
    items = output_texts(chat.stored_messages()[-1])
    kinds = [kind for kind, _ in items]
    assert "function_call" in kinds and kinds[-1] == "message", items
    call_at = kinds.index("function_call")
    assert kinds[call_at + 1] == "function_call_output", items
    assert not any(FOOTER_RE.search(text) for _, text in items[:call_at]), items
    final_text = items[-1][1]
    assert final_text.startswith("tok1"), final_text
    assert FOOTER_RE.search(final_text.strip().splitlines()[-1]), final_text


# ----------------------------------------------------------------------------------------------------------------
# d. the second turn's engine request holds no router text
# ----------------------------------------------------------------------------------------------------------------
def test_d_second_turn_request_contains_no_router_text(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("sglang-chat", "SGLang Chat")
    first = chat.send("first turn case-d [[tokens:8]]")
    chat.wait_done(first, "tok8")
    expect(first.get_by_text(FOOTER_RE)).to_be_visible()
    stored_first = chat.stored_messages()[-1]
    assert any("🔀 Switching to SGLang Chat" in text for _, text in output_texts(stored_first)), stored_first
    assert FOOTER_RE.search(stored_first["content"]), "Open-WebUI stores the footer in the answer's content"

    settle([router])  # the first turn's background tasks first
    second = chat.send("second turn case-d [[tokens:5]]")
    chat.wait_done(second, "tok5")
    expect(second.get_by_text(FOOTER_RE)).to_be_visible()
    chat.screenshot("d_second_turn.png")

    requests = stream_requests_with(router, "sglang-chat", "case-d")
    assert len(requests) == 2
    body = requests[-1]
    assistant = [m for m in body["messages"] if m["role"] == "assistant"]
    assert len(assistant) == 1 and "tok1" in str(assistant[0]["content"]), body["messages"]
    assert router_text_in(body) == [], json.dumps(body["messages"], ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# e. Open-WebUI's background task prompts (title, tags, follow-ups) hold no router text
# ----------------------------------------------------------------------------------------------------------------
def _tasks_for(env: RouterEnv, model_id: str, marker: str) -> list[dict[str, Any]]:
    return [e["body"] for e in task_requests(env.events_path(model_id)) if marker in chat_history_of(e["body"])]


def _assert_tasks_clean(env: RouterEnv, model_id: str, marker: str) -> list[dict[str, Any]]:
    # The title task goes out with the first request (empty ASSISTANT line); follow-ups and tags after the answer.
    wait_for(
        lambda: len([t for t in _tasks_for(env, model_id, marker) if "ASSISTANT: tok1" in chat_history_of(t)]) >= 2,
        60,
        "the follow-up and tags tasks with the answer in <chat_history>",
    )
    tasks = _tasks_for(env, model_id, marker)
    dirty = {
        chat_history_of(t): [m for m in ROUTER_MARKS if m in chat_history_of(t)] for t in tasks if router_text_in(t)
    }
    assert not dirty, f"router text in {len(dirty)} of {len(tasks)} task prompts: {dirty}"
    return tasks


def test_e_background_task_prompts_contain_no_router_text(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("llama-tasks", "Llama Tasks")
    answer = chat.send("tasks please case-e [[tokens:6]]")
    chat.wait_done(answer, "tok6")
    expect(answer.get_by_text(FOOTER_RE)).to_be_visible()
    chat.screenshot("e1_tasks_reasoning_channel.png")
    stored = chat.stored_messages()[-1]
    assert FOOTER_RE.search(stored["content"]), "Open-WebUI stores the footer: its task prompts paste it"
    tasks = _assert_tasks_clean(router, "llama-tasks", "case-e")
    assert len(tasks) >= 2


def test_e_background_task_prompts_contain_no_router_text_with_status_in_content(
    page: Page, openwebui: OpenWebUI, content_router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("content-llama", "Content Llama")
    answer = chat.send("tasks please case-e2 [[tokens:6]]")
    chat.wait_done(answer, "tok6")
    # status_channel: content puts the status lines into the answer's text itself
    expect(answer.get_by_text("🔀 Switching to Content Llama")).to_be_visible()
    expect(answer.get_by_text(FOOTER_RE)).to_be_visible()
    chat.screenshot("e2_tasks_content_channel.png")
    stored = chat.stored_messages()[-1]
    assert "🔀 Switching to Content Llama" in stored["content"], "Open-WebUI stores the status lines as content"
    _assert_tasks_clean(content_router, "content-llama", "case-e2")


# ----------------------------------------------------------------------------------------------------------------
# f. the info tooltip shows the router's tokens/s (model capability "usage" on; built-in tools left on)
# ----------------------------------------------------------------------------------------------------------------
def test_f_info_tooltip_shows_tokens_per_second(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    # The only setting: Workspace > Models > SGLang Usage > Capabilities > Usage (stream_options.include_usage).
    openwebui.set_model_capabilities("sglang-usage", "SGLang Usage", {"usage": True})
    chat = ChatPage(page, openwebui, results)
    chat.open("sglang-usage", "SGLang Usage")
    answer = chat.send("usage please case-f [[tokens:10]]")
    chat.wait_done(answer, "tok10")
    expect(answer.get_by_text(FOOTER_RE)).to_be_visible()

    info = page.get_by_role("button", name="Info").last
    expect(info).to_be_visible()
    info.hover()
    tooltip = page.get_by_role("tooltip")
    expect(tooltip).to_be_visible()
    for key in ("response_token/s", "prompt_token/s", "approximate_total"):
        expect(tooltip).to_contain_text(key)
    chat.screenshot("f_usage_tooltip.png")

    usage = chat.stored_messages()[-1].get("usage") or {}
    assert float(usage["response_token/s"]) > 0, usage
    requests = stream_requests_with(router, "sglang-usage", "case-f")
    assert len(requests) == 1
    assert any(t["function"]["name"] == BUILTIN_TIME_TOOL for t in requests[0].get("tools") or []), (
        "built-in tools stay on"
    )


# ----------------------------------------------------------------------------------------------------------------
# g. Stop pressed during a load: the page stays usable, the router's load goes on, the next message needs no switch
# ----------------------------------------------------------------------------------------------------------------
def test_g_stop_during_a_load_keeps_the_load_going(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    chat = ChatPage(page, openwebui, results)
    chat.open("llama-stop", "Llama Stop")
    first = chat.send("stop during the load case-g [[tokens:4]]")
    thinking = first.get_by_role("button").filter(has_text="Thinking")
    expect(thinking).to_be_visible(timeout=20_000)
    expand(thinking)
    expect(first.get_by_text(re.compile(r"⏳ Loading Llama Stop")).first).to_be_visible()
    assert router_health(router)["loading_model"] == "llama-stop"
    chat.screenshot("g1_before_stop.png")
    page.get_by_role("button", name="Stop", exact=True).click()

    expect(page.get_by_role("button", name="Stop", exact=True)).to_have_count(0, timeout=10_000)
    expect(page.locator("#chat-input")).to_be_editable()
    assert not router.events("llama-stop", "ready"), "Stop came after the load had finished"
    wait_for(lambda: router.events("llama-stop", "ready"), 30, "the engine to finish loading after Stop")
    wait_for(lambda: router_health(router)["models"]["llama-stop"]["status"] == "loaded", 10, "the router to serve it")
    settle([router])
    second = chat.send("after the stop case-g [[tokens:4]]")
    chat.wait_done(second, "tok4")
    expect(second.get_by_text(FOOTER_RE)).to_be_visible()
    expect(second.get_by_text("🔀")).to_have_count(0)
    expect(second.get_by_role("button").filter(has_text=re.compile("Thinking|Thought"))).to_have_count(0)
    chat.screenshot("g2_after_stop.png")

    stored = chat.stored_messages()[-1]
    assert not any("🔀" in text for _, text in output_texts(stored)), output_texts(stored)
    # The stopped request never reached the engine (its client left during the load); Open-WebUI sends the next
    # turn without the stopped (empty) answer: two user messages in a row.
    turns = stream_requests_with(router, "llama-stop", "case-g")
    assert len(turns) == 1, turns
    assert [m["role"] for m in turns[0]["messages"]] == ["user", "user"], turns[0]["messages"]
    assert router_text_in(turns[0]) == [], turns[0]["messages"]
    assert len(router.events("llama-stop", "start")) == 1, router.events("llama-stop", "start")
    journal = router.systemd.journal_path(unit_of("llama-stop")).read_text()
    assert journal.count("Started ") == 1, journal
    assert router_health(router)["models"]["llama-stop"]["status"] == "loaded"


# ----------------------------------------------------------------------------------------------------------------
# h. connection provider `llama.cpp`: the loaded dot, Eject and "Load Model" drive the router's lifecycle API
# ----------------------------------------------------------------------------------------------------------------
MAIN_CONNECTION = 0  # the main router is Open-WebUI's first OpenAI connection (conftest's OPENAI_API_BASE_URLS)
LOADED_DOT = "span.rounded-full.bg-green-500"  # ModelItem.svelte: the green dot, tooltip "Loaded"
LIFECYCLE_PATHS = re.compile(r"^/(api/models/(load|unload)|openai/models/\d+/(load|unload|sse|catalog))$")


@contextmanager
def connection_provider(openwebui: OpenWebUI, idx: int, provider: str) -> Iterator[None]:
    """Set one connection's provider type (Admin Settings > Connections > the connection's "Provider Type"), and put
    the whole OpenAI config back afterwards: the other cases expect the Default provider."""
    original = openwebui.api("GET", "/openai/config")
    changed = json.loads(json.dumps(original))
    configs = changed.setdefault("OPENAI_API_CONFIGS", {})
    configs[str(idx)] = {**configs.get(str(idx), {}), "provider": provider}
    openwebui.api("POST", "/openai/config/update", changed)
    try:
        yield
    finally:
        openwebui.api("POST", "/openai/config/update", original)


def router_models(env: RouterEnv) -> dict[str, str]:
    """The router's own lifecycle listing, `GET /models` (Open-WebUI's llama.cpp path): id -> status.value."""
    response = httpx.get(env.base + "/models", timeout=5)
    assert response.status_code == 200, response.text
    return {m["id"]: m["status"]["value"] for m in response.json()["data"]}


def router_unloads(env: RouterEnv, model_id: str, reason: str) -> float:
    """llm_router_model_unloads_total{model, reason} from the router's /metrics (0 before the first one)."""
    text = httpx.get(env.base + "/metrics", timeout=5).text
    for line in text.splitlines():
        labels = (f'model="{model_id}"', f'reason="{reason}"')
        if line.startswith("llm_router_model_unloads_total{") and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class SseReader(threading.Thread):
    """Reads an SSE stream (here Open-WebUI's `/openai/models/{idx}/sse`, which relays the router's
    `/models/sse`) in the background and keeps its `model_status` events, until `until` is seen or it is closed."""

    def __init__(self, url: str, token: str, until: tuple[str, str], timeout: float = 30) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.until, self.timeout = url, token, until, timeout
        self.events: list[dict[str, Any]] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None
        self.status_code = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            with httpx.stream("GET", self.url, headers=headers, timeout=httpx.Timeout(10, read=5)) as response:
                self.status_code = response.status_code
                self.opened.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[len("data: ") :])
                        self.events.append(event)
                        if (event.get("model"), event.get("data", {}).get("status")) == self.until:
                            return
                    if time.monotonic() > deadline:
                        return
        except BaseException as exc:  # reported by the test, never swallowed
            self.error = exc
        finally:
            self.opened.set()

    def statuses(self, model_id: str) -> list[str]:
        return [e["data"]["status"] for e in self.events if e.get("model") == model_id]


def open_manage_models(page: Page) -> Locator:
    """Admin Settings > Models > Actions > Manage: the "Manage Models" dialog of the llama.cpp connections."""
    page.get_by_role("button", name="Actions").click()
    page.get_by_role("button", name="Manage", exact=True).click()
    dialog = page.get_by_role("dialog").filter(has_text="Manage Models").last
    expect(dialog).to_contain_text("Model providers")
    return dialog


def test_h_llamacpp_provider_loaded_dot_eject_and_load_model(
    page: Page, openwebui: OpenWebUI, router: RouterEnv, results: Path
) -> None:
    model_id, name = "llama-eject", "Llama Eject"
    chat = ChatPage(page, openwebui, results)
    sent: list[tuple[str, str, Any]] = []  # what the web page asks Open-WebUI to do (method, path, JSON body)

    def record(request: Any) -> None:
        path = urlparse(request.url).path
        if LIFECYCLE_PATHS.match(path):
            sent.append((request.method, path, request.post_data_json if request.method == "POST" else None))

    page.on("request", record)
    with connection_provider(openwebui, MAIN_CONNECTION, "llama.cpp"):
        # The router has this model loaded (its own POST /models/load, as any client could ask).
        response = httpx.post(router.base + "/models/load", json={"model": model_id}, timeout=10)
        assert (response.status_code, response.json()) == (200, {"success": True}), response.text
        wait_for(lambda: router_models(router)[model_id] == "loaded", 20, f"the router to load {model_id}")
        assert router.is_active(model_id) == "active"
        listed = {m["id"]: m for m in openwebui.api("GET", "/api/models?refresh=true")["data"]}
        assert listed[model_id].get("loaded") is True, listed[model_id]
        for other in set(router.models) - {model_id}:
            assert listed[other].get("loaded") is False, (other, listed[other].get("loaded"))

        # 1. the model selector: the green "loaded" dot on this model only
        page.goto(openwebui.base + "/")
        expect(page.locator("#chat-input")).to_be_editable(timeout=60_000)
        page.locator("#model-selector-model-button").click()
        listbox = page.get_by_role("listbox", name="Available models")
        option = listbox.locator(f'[role="option"][data-value="{model_id}"]')
        expect(option).to_have_attribute("aria-label", f"Select {name} model")
        expect(option.locator(LOADED_DOT)).to_have_count(1)
        for other in router.models:
            if other != model_id:
                expect(listbox.locator(f'[role="option"][data-value="{other}"]').locator(LOADED_DOT)).to_have_count(0)
        expect(listbox.locator(LOADED_DOT)).to_have_count(1)
        option.hover()
        eject = option.locator('button[aria-label="Eject model"]')
        expect(eject).to_be_visible()
        eject.hover()  # its tooltip: "Eject"
        chat.screenshot("h1_loaded_dot.png")

        # 2. Eject: Open-WebUI's /api/models/unload -> the router's POST /models/unload -> the unit stops
        unloads_before = router_unloads(router, model_id, "request")
        eject.click()
        expect(page.get_by_text("Model unloaded successfully")).to_be_visible(timeout=20_000)
        assert router.is_active(model_id) == "inactive"
        assert router_models(router)[model_id] == "unloaded"
        assert router_unloads(router, model_id, "request") == unloads_before + 1
        expect(option.locator(LOADED_DOT)).to_have_count(0)
        expect(option.locator('button[aria-label="Eject model"]')).to_have_count(0)
        expect(listbox.locator(LOADED_DOT)).to_have_count(0)
        chat.screenshot("h2_after_eject.png")
        page.keyboard.press("Escape")

        # 3. The model selector's menu has no "load"; Admin Settings > Models > Actions > Manage has "Load Model" for
        # a llama.cpp connection: Open-WebUI's /openai/models/0/load -> the router's /models/load. Meanwhile
        # Open-WebUI's /openai/models/0/sse relays the router's /models/sse (the page itself never opens it).
        sse = SseReader(f"{openwebui.base}/openai/models/{MAIN_CONNECTION}/sse", openwebui.token, (model_id, "loaded"))
        sse.start()
        assert sse.opened.wait(15) and sse.status_code == 200, (sse.status_code, sse.error)
        page.goto(openwebui.base + "/admin/settings/models")
        dialog = open_manage_models(page)
        row = dialog.locator("div.border-b").filter(has_text=model_id)
        chip = row.locator("span.rounded-full")
        expect(chip).to_have_text("unloaded")
        row.get_by_role("button", name="Load Model", exact=True).click()
        expect(page.get_by_text("Model loaded successfully")).to_be_visible(timeout=20_000)
        wait_for(lambda: router.is_active(model_id) == "active", 20, f"the unit of {model_id} to start")
        wait_for(lambda: router_models(router)[model_id] == "loaded", 20, f"the router to report {model_id} loaded")
        sse.join(20)
        assert sse.error is None, sse.error
        statuses = sse.statuses(model_id)
        assert statuses[:1] == ["loading"] and statuses[-1] == "loaded", sse.events

        dialog.get_by_role("button", name="Close").click()  # reopened, it lists the router's /models afresh
        expect(dialog).to_have_count(0)
        dialog = open_manage_models(page)
        expect(chip).to_have_text("loaded")
        expect(row.get_by_role("button", name="Load Model", exact=True)).to_be_disabled()
        expect(row.get_by_role("button", name="Unload Model", exact=True)).to_be_enabled()
        chat.screenshot("h3_manage_models.png")

        page.goto(openwebui.base + "/")
        expect(page.locator("#chat-input")).to_be_editable(timeout=60_000)
        page.locator("#model-selector-model-button").click()
        listbox = page.get_by_role("listbox", name="Available models")
        expect(listbox.locator(f'[role="option"][data-value="{model_id}"]').locator(LOADED_DOT)).to_have_count(1)
        expect(listbox.locator(LOADED_DOT)).to_have_count(1)
        chat.screenshot("h3_loaded_from_menu.png")

    posts = [(method, path, body) for method, path, body in sent if method == "POST"]
    assert posts == [
        ("POST", "/api/models/unload", {"model": model_id}),
        ("POST", f"/openai/models/{MAIN_CONNECTION}/load", {"model": model_id}),
    ], sent
    assert {path for method, path, _ in sent if method == "GET"} == {f"/openai/models/{MAIN_CONNECTION}/catalog"}, sent
    assert len(router.events(model_id, "start")) == 2, router.events(model_id, "start")
    assert (
        openwebui.api("GET", "/openai/config")["OPENAI_API_CONFIGS"].get(str(MAIN_CONNECTION), {}).get("provider")
        != "llama.cpp"
    ), "the connection's provider was put back"
