"""vLLM with sleep mode (issue 9), the role's side on a real systemd: what it laid down for the two sleep-capable
models, then switches between them through the router: the second switch wakes the first model instead of starting
its unit again (same InvocationID, a `wake` and no second `start` in the fake engine's event log), and /v1/models
says `sleeping` for the one asleep.

Runs after test_20 (every test takes `box`, which keeps them in file order).
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import httpx
import yaml
from conftest import (
    BY_ID,
    CONFIG_DIR,
    INVENTORY,
    active_backend_units,
    fit_together,
    is_active,
    main_pid,
    stream_chat,
    unit_of,
    units_conflict,
)

SLEEPERS = [m["id"] for m in INVENTORY["llm_router_models"] if m.get("backend") == "vllm" and m.get("sleep")]
SLEEP_A, SLEEP_B = SLEEPERS[:2]
VLLM_PYTHON = INVENTORY["llm_router_vllm_python"]


def test_the_scenario_has_two_sleepers_that_never_run_together_awake() -> None:
    assert len(SLEEPERS) >= 2, SLEEPERS
    assert not fit_together(SLEEP_A, SLEEP_B), "the two sleepers must not fit together awake"
    assert not units_conflict(SLEEP_A, SLEEP_B), "each sleeps beside the other: their units must not conflict"


def _port(model_id: str) -> int:
    return int(BY_ID[model_id].get("port", INVENTORY["llm_router_vllm_port"]))


def test_start_script_line(box: Any) -> None:
    for model_id in SLEEPERS:
        m = BY_ID[model_id]
        script = box.file(f"/opt/llm-router/engines/{model_id}.sh").content_string
        line = next(x for x in script.splitlines() if x.startswith("exec "))
        assert shlex.split(line) == [
            "exec",
            VLLM_PYTHON,
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            m["model"],
            "--host",
            "127.0.0.1",
            "--port",
            str(_port(model_id)),
            "--served-model-name",
            model_id,
            "--enable-sleep-mode",
        ], line


def test_unit_sets_dev_mode_and_has_no_conflicts(box: Any) -> None:
    for model_id in SLEEPERS:
        env = box.run(f"systemctl show -P Environment {unit_of(model_id)}").stdout.split()
        assert "VLLM_SERVER_DEV_MODE=1" in env, env
        conflicts = box.run(f"systemctl show -P Conflicts {unit_of(model_id)}").stdout.split()
        assert not [u for u in conflicts if u.startswith("llm-backend-")], conflicts
    # A model without sleep gets no dev mode.
    assert "VLLM_SERVER_DEV_MODE" not in box.run(f"systemctl show -P Environment {unit_of('chat-a')}").stdout


def test_models_yml_has_sleep_and_needs_asleep(box: Any) -> None:
    models = yaml.safe_load(box.file(f"{CONFIG_DIR}/models.yml").content_string)["models"]
    for model_id in SLEEPERS:
        assert models[model_id]["backend"] == "vllm"
        assert models[model_id]["sleep"] == BY_ID[model_id]["sleep"]
        assert models[model_id]["needs_asleep"] == BY_ID[model_id]["needs_asleep"]
    assert "sleep" not in models["chat-a"] and "needs_asleep" not in models["chat-a"]
    config = yaml.safe_load(box.file(f"{CONFIG_DIR}/config.yml").content_string)
    assert config["backends"]["vllm"] == {
        "url": f"http://127.0.0.1:{INVENTORY['llm_router_vllm_port']}",
        "warmup": False,
        "stop_timeout": 30,
    }


def test_the_fake_vllm_is_at_the_executable_path(box: Any) -> None:
    assert box.file(VLLM_PYTHON).is_symlink
    assert box.file(VLLM_PYTHON).linked_to == "/opt/fake-engines/vllm-python"
    assert box.run(f"test -x {VLLM_PYTHON}").rc == 0


def _status(client: httpx.Client) -> dict[str, str]:
    resp = client.get("/v1/models")
    assert resp.status_code == 200, resp.text[:500]
    return {m["id"]: (m.get("status") or {}).get("value", "") for m in resp.json()["data"]}


def _chat(client: httpx.Client, model: str) -> float:
    started = time.monotonic()
    stream = stream_chat(client, model, "Say hello.")
    assert stream.status == 200, f"{model}: {stream.status} {stream.error}"
    assert not stream.error and stream.done, stream.error
    return time.monotonic() - started


def _invocation(box: Any, model_id: str) -> str:
    return str(box.run(f"systemctl show -P InvocationID {unit_of(model_id)}").stdout.strip())


def _events(box: Any, model_id: str) -> list[dict[str, Any]]:
    path = BY_ID[model_id]["env"]["FAKE_EVENT_LOG"]
    text = box.run(f"cat {path} 2>/dev/null || true").stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_switching_between_sleepers_wakes_instead_of_restarting(box: Any, client: httpx.Client) -> None:
    for model_id in SLEEPERS:
        box.run(f"rm -f {BY_ID[model_id]['env']['FAKE_EVENT_LOG']}")
    _chat(client, SLEEP_A)  # a real start (its unit was not running)
    assert is_active(box, unit_of(SLEEP_A)) == "active"
    invocation_a, pid_a = _invocation(box, SLEEP_A), main_pid(box, unit_of(SLEEP_A))

    _chat(client, SLEEP_B)  # sleep-a is put to sleep (unit kept), sleep-b starts
    running = active_backend_units(box)
    assert unit_of(SLEEP_A) in running and unit_of(SLEEP_B) in running, running
    assert _invocation(box, SLEEP_A) == invocation_a, f"{SLEEP_A}'s unit was restarted instead of put to sleep"
    status = _status(client)
    assert (status[SLEEP_A], status[SLEEP_B]) == ("sleeping", "loaded"), status
    assert [e["event"] for e in _events(box, SLEEP_A) if e["event"] in ("sleep", "wake")] == ["sleep"]
    invocation_b = _invocation(box, SLEEP_B)

    seconds = _chat(client, SLEEP_A)  # a wake, not a start: 0.3 s against the fake's 1.5 s load
    assert _invocation(box, SLEEP_A) == invocation_a, f"{SLEEP_A}'s unit was restarted instead of woken"
    assert main_pid(box, unit_of(SLEEP_A)) == pid_a
    assert _invocation(box, SLEEP_B) == invocation_b, f"{SLEEP_B}'s unit was restarted or stopped"
    status = _status(client)
    assert (status[SLEEP_A], status[SLEEP_B]) == ("loaded", "sleeping"), status
    events_a = [e["event"] for e in _events(box, SLEEP_A)]
    assert events_a.count("start") <= 1 and "wake" in events_a, events_a
    assert [e["event"] for e in _events(box, SLEEP_B) if e["event"] in ("sleep", "wake")] == ["sleep"]
    assert seconds < 1.5, f"the switch back to {SLEEP_A} took {seconds:.2f} s: a wake should be well under the load"


def test_nothing_failed_after_the_sleep_switches(box: Any) -> None:
    failed = box.run("systemctl --failed --no-legend --plain").stdout.strip()
    assert failed == "", failed
