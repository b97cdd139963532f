"""A changed model `args` takes effect on the next request (issue 12): the role asks each router to unload that
model (its engine unit stops), the other engines keep running, the router is not restarted, and `--check --diff`
names the model beforehand without touching anything. A model added (new Conflicts= lines only) reloads nothing.
Runs after test_20 (the upgraded wheel is installed; the same wheel is passed so the router itself has nothing to
change)."""

from __future__ import annotations

import copy
from pathlib import Path

from conftest import MODELS, ROUTER_UNIT, FleetHost, is_active, record, run_playbook, unit_of, wait_for

CHANGED = "chat"
KEPT = ("embed", "tabby")
NEW_ARGS = ["-c", "8192", "--fleet-reload-marker"]


def _load(host: FleetHost, model: str) -> None:
    with host.client() as client:
        body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "load"}]}
        resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, (host.name, model, resp.text)


def _cmdline(host: FleetHost, unit: str) -> list[str]:
    pid = host.unit_pid(unit)
    raw = host.box.file(f"/proc/{pid}/cmdline").content
    return [part.decode() for part in raw.split(b"\0") if part]


def test_changed_args_reload_that_model_only(
    fleet: list[FleetHost], molecule_env: dict[str, str], tmp_path: Path, upgraded_wheel: Path, results_file: Path
) -> None:
    for host in fleet:
        for model in (CHANGED, *KEPT):
            _load(host, model)
    before = {
        h.name: {m: h.unit_pid(unit_of(m)) for m in (CHANGED, *KEPT)} | {"router": h.unit_pid(ROUTER_UNIT)}
        for h in fleet
    }
    assert all(pid > 0 for pids in before.values() for pid in pids.values()), before

    models = copy.deepcopy(MODELS)
    next(m for m in models if m["id"] == CHANGED)["args"] = NEW_ARGS
    extra = {"llm_router_models": models, "llm_router_wheel": str(upgraded_wheel)}

    rc, output, check_seconds = run_playbook(molecule_env, tmp_path, extra, "--check", "--diff")
    assert rc == 0, output[-6000:]
    line = f"reload {CHANGED} (llm-backend-{CHANGED}.service runs with its old settings)"
    assert output.count(line) == len(fleet), output[-6000:]
    assert "--fleet-reload-marker" in output, "the start script's diff shows the new argument"
    for kept in KEPT:
        assert f"reload {kept} " not in output
    after_check = {
        h.name: {m: h.unit_pid(unit_of(m)) for m in (CHANGED, *KEPT)} | {"router": h.unit_pid(ROUTER_UNIT)}
        for h in fleet
    }
    assert after_check == before, "--check changed something"

    rc, output, seconds = run_playbook(molecule_env, tmp_path, extra)
    assert rc == 0, output[-6000:]
    for host in fleet:
        # Unloaded through the router (its unit stopped), the others untouched, the router not restarted.
        wait_for(lambda h=host: is_active(h.box, unit_of(CHANGED)) == "inactive", 30, f"{CHANGED} unloaded")
        assert host.unit_pid(ROUTER_UNIT) == before[host.name]["router"], host.name
        for kept in KEPT:
            assert host.unit_pid(unit_of(kept)) == before[host.name][kept], (host.name, kept)
        assert host.model_states()[CHANGED] == "unloaded"
        # The next request starts it with the new arguments.
        _load(host, CHANGED)
        argv = _cmdline(host, unit_of(CHANGED))
        assert argv[-len(NEW_ARGS) :] == NEW_ARGS, argv
        for kept in KEPT:
            assert host.unit_pid(unit_of(kept)) == before[host.name][kept], (host.name, kept)
    record(results_file, "args_reload", {"check_seconds": round(check_seconds, 1), "apply_seconds": round(seconds, 1)})

    # A model added: every unit that can never run beside it gets a new Conflicts= line ([Unit] only), which
    # reloads nothing; a second run changes nothing.
    running = {h.name: {m: h.unit_pid(unit_of(m)) for m in (CHANGED, *KEPT)} for h in fleet}
    added = {"id": "added", "backend": "vllm", "model": "/models/added", "needs": {"gpu": 20}}
    extra["llm_router_models"] = [*models, added]
    rc, output, add_seconds = run_playbook(molecule_env, tmp_path, extra)
    assert rc == 0, output[-6000:]
    assert "reload " not in output.split("Reload the models whose running engine has old settings")[-1].split("TASK")[0]
    for host in fleet:
        conflicts = host.run(f"systemctl show -P Conflicts {unit_of(CHANGED)}").stdout
        assert unit_of("added") in conflicts, (host.name, conflicts)
        assert {m: host.unit_pid(unit_of(m)) for m in (CHANGED, *KEPT)} == running[host.name], host.name
    rc, output, again_seconds = run_playbook(molecule_env, tmp_path, extra)
    assert rc == 0, output[-6000:]
    recap = [ln for ln in output.splitlines() if "llmr-fleet-" in ln and "changed=" in ln]
    assert recap and all("changed=0" in ln for ln in recap), recap
    record(results_file, "model_added_seconds", round(add_seconds, 1))
    record(results_file, "args_reload_second_run_seconds", round(again_seconds, 1))
