"""Switching engines through the real router and fake engine processes."""

from __future__ import annotations

import re

from tests.e2e.conftest import RouterEnv

FOOTER = re.compile(r"\n\n⚡ \d+\.\d tok/s \(\d+ tokens? in \d+\.\ds\)$")


def test_streamed_switch_shows_status_then_answer_with_footer(router: RouterEnv) -> None:
    result = router.stream_chat("llama-a", "hi [[tokens:8]]")
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.done and not result.errors
    status = result.text("reasoning_content")
    assert status.startswith("🔀 Switching to Llama A\n")
    assert re.search(r"✅ Llama A ready in \d+\.\d s", status)
    content = result.text()
    assert FOOTER.search(content), content
    for chunk in result.chunks:
        assert {"id", "object", "created", "model"} <= chunk.keys()
        assert chunk["object"] == "chat.completion.chunk"
        assert all("index" in c for c in chunk["choices"])
    assert router.is_active("llama-a") == "active"
    # usage was forced on for the engine, and dropped for a client that did not ask
    request = router.events("llama-a", "request")[-1]
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert not any(c.get("usage") for c in result.chunks)
    finish = [c for c in result.chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finish) == 1 and result.chunks[-1] is finish[0], "footer goes before the finish_reason chunk"


def test_switch_between_models_of_one_engine_kind_and_across_kinds(router: RouterEnv) -> None:
    for model in ("llama-a", "llama-b", "sg", "tabby", "llama-a"):
        result = router.stream_chat(model, "[[tokens:5]]")
        assert result.done and not result.errors, result.raw
        assert FOOTER.search(result.text()), (model, result.text())
        assert router.is_active(model) == "active"
        others = [m for m in ("llama-a", "llama-b", "sg", "tabby") if m != model]
        assert all(router.is_active(m) != "active" for m in others)
