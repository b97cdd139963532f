"""`systemctl reload llm-router` (SIGHUP) re-reads the configuration without dropping an open stream."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import MODEL_IDS, ROUTER_UNIT, BackgroundStream, is_active, main_pid

TOKENS = 200
LONG_PROMPT = f"Tell me a long story. [[tokens:{TOKENS}]] [[delay:0.02]]"  # fake engine magic: ~4 s of tokens


def test_reload_keeps_an_open_stream(client: httpx.Client, box: Any) -> None:
    model_id = MODEL_IDS[0]
    pid_before = main_pid(box)
    worker = BackgroundStream(client, model_id, LONG_PROMPT, min_chunks=20)
    worker.start()
    assert worker.progressed.wait(timeout=60), "the long stream did not start"
    assert worker.exc is None, worker.exc
    assert worker.is_alive(), "the stream ended before the reload: make it longer"

    reload = box.run(f"systemctl reload {ROUTER_UNIT}")
    assert reload.rc == 0, reload.stderr

    worker.join(timeout=120)
    assert not worker.is_alive(), "the stream never finished"
    assert worker.exc is None, f"the stream broke: {worker.exc!r}"
    stream = worker.result
    assert stream is not None
    assert stream.status == 200, stream.error
    assert not stream.error, stream.error
    assert stream.done, "the stream did not end with [DONE]"
    assert stream.content_chunks >= TOKENS * 0.9, f"only {stream.content_chunks} content chunks"

    # a reload, not a restart: same process, still serving
    assert is_active(box, ROUTER_UNIT) == "active"
    assert main_pid(box) == pid_before
    resp = client.get("/v1/models")
    assert resp.status_code == 200
