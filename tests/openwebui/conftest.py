"""Fixtures for the Open-WebUI suite: one Open-WebUI (the real PyPI release, offline, single user) and one headless
Debian Chromium (driven by Playwright's sync API) for the whole package, in front of two real routers with the fake
engines: the main one (status in `delta.reasoning_content`, the default) and one with `status_channel: content`.

Nothing here is optional: a missing Chromium, a failed Open-WebUI install or start fails every test with the reason.
Screenshots (and the routers', engines' and Open-WebUI's logs) go to $LLM_ROUTER_TEST_RESULTS, default
/var/cache/llm-router/test-results/openwebui/; the path is printed at the end of the run."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.e2e.conftest import ModelSpec, RouterEnv
from tests.openwebui.harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OpenWebUI,
    ensure_venv,
    results_dir,
    settle,
)

MAIN_ROUTER_PORT = 18230  # fake engines on 18231-18233 (tests/e2e uses 18210-18213)
CONTENT_ROUTER_PORT = 18240  # fake engines on 18241-18243
OPENWEBUI_PORT = 18249

# One model per case, so no case depends on what another one loaded. Loads are long enough to watch.
MAIN_MODELS = [
    ModelSpec("llama-chat", "llamacpp", env={"FAKE_LOAD_SECONDS": "5"}, name="Llama Chat"),
    ModelSpec("sglang-chat", "sglang", env={"FAKE_LOAD_SECONDS": "3"}, name="SGLang Chat"),
    ModelSpec("tabby-tools", "tabbyapi", env={"FAKE_LOAD_SECONDS": "3"}, name="Tabby Tools"),
    ModelSpec("llama-tasks", "llamacpp", env={"FAKE_LOAD_SECONDS": "2"}, name="Llama Tasks"),
    ModelSpec("sglang-usage", "sglang", env={"FAKE_LOAD_SECONDS": "1"}, name="SGLang Usage"),
    ModelSpec("llama-stop", "llamacpp", env={"FAKE_LOAD_SECONDS": "6"}, name="Llama Stop"),
    ModelSpec("llama-eject", "llamacpp", env={"FAKE_LOAD_SECONDS": "1"}, name="Llama Eject"),
]
CONTENT_MODELS = [
    ModelSpec("content-llama", "llamacpp", env={"FAKE_LOAD_SECONDS": "3"}, name="Content Llama"),
]
ROUTER_SETTINGS: dict[str, Any] = {"progress_interval": 1, "keepalive_interval": 2, "load_timeout": 60}

_results_used: list[Path] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _results_used:
        terminalreporter.write_sep("-", "Open-WebUI suite: screenshots and logs")
        terminalreporter.write_line(str(_results_used[0]))


@pytest.fixture(scope="package")
def results() -> Path:
    path = results_dir()
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.png"), *path.glob("*.html")]:
        old.unlink()
    shutil.rmtree(path / "logs", ignore_errors=True)
    _results_used.append(path)
    return path


@pytest.fixture(scope="package", autouse=True)
def teardown_on_sigterm() -> Iterator[None]:
    """A CI timeout's SIGTERM tears the fixtures down (KeyboardInterrupt) instead of leaving Open-WebUI, the
    routers and the engines running on their ports."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="package")
def routers(tmp_path_factory: pytest.TempPathFactory, results: Path) -> Iterator[dict[str, RouterEnv]]:
    tmp = tmp_path_factory.mktemp("owui-routers")
    envs = {
        "main": RouterEnv(tmp / "main", MAIN_MODELS, dict(ROUTER_SETTINGS), base_port=MAIN_ROUTER_PORT),
        "content": RouterEnv(
            tmp / "content",
            CONTENT_MODELS,
            {**ROUTER_SETTINGS, "status_channel": "content"},
            base_port=CONTENT_ROUTER_PORT,
        ),
    }
    try:
        for env in envs.values():
            env.start()
        yield envs
    finally:
        for env in envs.values():
            env.stop()
        logs = results / "logs"
        for name, env in envs.items():
            shutil.copytree(env.events_dir, logs / f"router-{name}" / "events", dirs_exist_ok=True)
            if env.log_path.exists():
                shutil.copy(env.log_path, logs / f"router-{name}" / "router.log")


@pytest.fixture(scope="package")
def router(routers: dict[str, RouterEnv]) -> RouterEnv:
    return routers["main"]


@pytest.fixture(scope="package")
def content_router(routers: dict[str, RouterEnv]) -> RouterEnv:
    return routers["content"]


@pytest.fixture(scope="package")
def openwebui(
    tmp_path_factory: pytest.TempPathFactory, routers: dict[str, RouterEnv], results: Path
) -> Iterator[OpenWebUI]:
    venv = ensure_venv()
    tmp = tmp_path_factory.mktemp("owui")
    urls = [routers["main"].base + "/v1", routers["content"].base + "/v1"]
    server = OpenWebUI(venv, tmp / "data", OPENWEBUI_PORT, urls)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        (results / "logs").mkdir(parents=True, exist_ok=True)
        if server.log_path.exists():
            shutil.copy(server.log_path, results / "logs" / "open-webui.log")


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="package")
def browser(playwright: Playwright, openwebui: OpenWebUI) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium and fonts-noto-color-emoji (.ci/run does); "
            "never `playwright install`, which downloads a browser"
        )
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        dismiss_release_notes(browser, openwebui)
        yield browser
    finally:
        browser.close()


def dismiss_release_notes(browser: Browser, openwebui: OpenWebUI) -> None:
    """A new user first sees a "What's New" dialog; dismissing it once is stored in the user's settings."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(openwebui.base + "/")
        page.locator("#chat-input").wait_for(timeout=60_000)
        button = page.get_by_role("button", name="Okay, Let's Go!")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not button.is_visible():
            page.wait_for_timeout(200)
        if button.is_visible():
            button.click()
            button.wait_for(state="hidden", timeout=10_000)
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, routers: dict[str, RouterEnv]) -> Iterator[Page]:
    """A fresh browser context per case, on a quiet router (the previous case's background tasks are done)."""
    settle(list(routers.values()))
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
