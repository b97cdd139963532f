"""A model removed from the inventory while it answers: the role unloads it through the router first (the answer
in flight finishes), then deletes its unit and start script; the router is reloaded, not restarted. Runs last: it
changes the fleet's model list."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

from conftest import MODELS, ROUTER_UNIT, FleetHost, record, run_playbook, stream_chat, unit_of

REMOVED = "tabby"
TOKENS = 600  # 30 s at 0.05 s a token: still streaming when the playbook reaches the engines


def test_a_removed_model_finishes_its_answer_then_goes(
    fleet: list[FleetHost], molecule_env: dict[str, str], tmp_path: Path, upgraded_wheel: Path, results_file: Path
) -> None:
    host = fleet[0]
    router_pids = {h.name: h.unit_pid(ROUTER_UNIT) for h in fleet}
    result: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        with host.client() as client:
            result["stream"] = stream_chat(
                client, REMOVED, f"[[tokens:{TOKENS}]] [[delay:0.05]] x", on_event=lambda _: started.set()
            )
        result["ended"] = time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60), "the stream never started"
    models = [m for m in copy.deepcopy(MODELS) if m["id"] != REMOVED]
    begin = time.time()
    rc, output, seconds = run_playbook(
        molecule_env, tmp_path, {"llm_router_models": models, "llm_router_wheel": str(upgraded_wheel)}
    )
    end = time.time()
    thread.join(60)
    assert rc == 0, output[-6000:]

    stream = result["stream"]
    assert stream.status == 200 and stream.done and not stream.error, stream
    assert stream.finish_reasons == ["stop"], stream.finish_reasons
    assert f" tok{TOKENS}" in stream.content and stream.content.startswith("tok1 tok2"), stream.content[-200:]
    stops = [ts for ts, msg in host.journal(unit_of(REMOVED), begin) if msg.startswith("Stopping ")]
    assert len(stops) == 1, stops
    # In flight when the playbook ran, finished before its unit was stopped, and the playbook waited for it.
    assert begin < result["ended"] <= stops[0] + 0.5 < end, (begin, result["ended"], stops, end)
    for h in fleet:
        assert not h.box.file(f"/etc/systemd/system/{unit_of(REMOVED)}").exists, h.name
        assert not h.box.file(f"/opt/llm-router/engines/{REMOVED}.sh").exists, h.name
        assert REMOVED not in h.model_states(), h.name
        assert h.unit_pid(ROUTER_UNIT) == router_pids[h.name], f"{h.name}: the router was restarted"
    record(
        results_file,
        "model_removed_while_answering",
        {
            "playbook_seconds": round(seconds, 1),
            "answer_ended_after_playbook_began_s": round(result["ended"] - begin, 1),
        },
    )
