"""What the role laid down for several engines at once: Conflicts= from needs, own ports, the new config keys."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    BY_ID,
    CONFIG_DIR,
    INVENTORY,
    MODEL_IDS,
    RESOURCES,
    SCENARIO_DIR,
    fit_together,
    run_as_router_user,
    unit_of,
    units_conflict,
)


def _conflicts(box: Any, model_id: str) -> set[str]:
    listed = set(box.run(f"systemctl show -P Conflicts {unit_of(model_id)}").stdout.split())
    return {m for m in MODEL_IDS if unit_of(m) in listed}


def test_the_inventory_exercises_both_cases() -> None:
    pairs = list(itertools.combinations(MODEL_IDS, 2))
    assert any(fit_together(a, b) for a, b in pairs), "no pair of models that can run together"
    assert any(not fit_together(a, b) for a, b in pairs), "no pair of models that can never run together"
    assert any(not fit_together(a, b) and not units_conflict(a, b) for a, b in pairs), "no pair kept apart by sleep"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_conflicts_exactly_with_the_models_it_can_never_run_beside(box: Any, model_id: str) -> None:
    expected = {other for other in MODEL_IDS if other != model_id and units_conflict(model_id, other)}
    assert _conflicts(box, model_id) == expected, f"needs {BY_ID[model_id].get('needs')} of {RESOURCES}"


def test_conflicting_units_are_ordered_one_way(box: Any) -> None:
    """After= only between conflicting units, never both ways (no ordering cycles)."""
    for a, b in itertools.permutations(MODEL_IDS, 2):
        after = set(box.run(f"systemctl show -P After {unit_of(a)}").stdout.split())
        if unit_of(b) in after:
            assert units_conflict(a, b), f"{a} is ordered after {b}, but their units may run together"
            back = set(box.run(f"systemctl show -P After {unit_of(b)}").stdout.split())
            assert unit_of(a) not in back, f"ordering cycle between {a} and {b}"


@pytest.mark.parametrize("model_id", [m for m in MODEL_IDS if "port" in BY_ID[m]])
def test_own_port_in_the_start_script(box: Any, model_id: str) -> None:
    script = box.file(f"/opt/llm-router/engines/{model_id}.sh").content_string
    assert f"--port {BY_ID[model_id]['port']}" in script, script


def test_config_yml_has_the_lifecycle_settings(box: Any) -> None:
    config = yaml.safe_load(box.file(f"{CONFIG_DIR}/config.yml").content_string)
    assert config["resources"] == INVENTORY["llm_router_resources"]
    assert config["idle_unload"] == INVENTORY["llm_router_idle_unload"]
    assert config["current_alias"] == INVENTORY["llm_router_current_alias"]


def test_models_yml_has_the_per_model_settings(box: Any) -> None:
    models = yaml.safe_load(box.file(f"{CONFIG_DIR}/models.yml").content_string)["models"]
    assert list(models) == MODEL_IDS
    for model_id, entry in models.items():
        inv = BY_ID[model_id]
        for key in ("needs", "idle_unload", "preload", "aliases", "sleep", "needs_asleep"):
            assert entry.get(key) == inv.get(key), f"{model_id}.{key}"
        if "port" in inv:
            assert entry["url"] == f"http://127.0.0.1:{inv['port']}"
        else:
            assert "url" not in entry, f"{model_id} has no port of its own: its backend's url applies"


def test_router_accepts_its_configuration(box: Any) -> None:
    check = run_as_router_user(box, f"/opt/llm-router/venv/bin/llm-router check-config --config-dir {CONFIG_DIR}")
    assert check.rc == 0, check.stdout + check.stderr


def test_check_mode_shows_a_resources_change_and_changes_nothing(
    box: Any, molecule_env: dict[str, str], tmp_path: Path
) -> None:
    """`--check --diff` with a bigger GPU: chat-a and chat-b would fit together, their Conflicts= go (shown in the
    diff); nothing on the host changes."""
    fingerprint = "sha256sum /etc/llm-router/* /etc/systemd/system/llm-backend-*.service /opt/llm-router/engines/*"
    before = box.run(fingerprint).stdout
    extra = tmp_path / "bigger-gpu.json"
    extra.write_text(json.dumps({"llm_router_resources": {"gpu": 40}}), encoding="utf-8")
    playbook = Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", SCENARIO_DIR)) / "converge.yml"
    cmd = ["ansible-playbook", "-i", molecule_env["MOLECULE_INVENTORY_FILE"], "--check", "--diff", "-e", f"@{extra}"]
    proc = subprocess.run([*cmd, str(playbook)], env=molecule_env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "-Conflicts=llm-backend-chat-b.service" in output, output[-3000:]
    assert "-Conflicts=llm-backend-chat-a.service" in output, output[-3000:]
    assert '+resources: {"gpu": 40}' in output, output[-3000:]
    assert box.run(fingerprint).stdout == before, "check mode changed files on the host"
