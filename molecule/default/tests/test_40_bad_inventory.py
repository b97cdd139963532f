"""A broken model list is refused before anything changes on the host; the running router is left alone.

Runs the converge playbook again (a nested ansible-playbook against molecule's inventory) with a bad
llm_router_models given as extra vars, and compares the deployed files' checksums before and after.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import CONFIG_DIR, INVENTORY, MODEL_IDS, MODELS, ROUTER_UNIT, SCENARIO_DIR, main_pid

DEPLOYED = (
    f"{CONFIG_DIR}/config.yml",
    f"{CONFIG_DIR}/models.yml",
    "/etc/systemd/system/llm-backend-*.service",
    "/etc/systemd/system/llm-router.service",
    "/etc/systemd/system/llm-router.socket",
    "/opt/llm-router/engines/*",
    "/etc/polkit-1/rules.d/*llm-router*",
)


def _bad(kind: str) -> tuple[list[dict[str, Any]], str]:
    """A broken model list and a word the refusal must name."""
    models = copy.deepcopy(MODELS)
    if kind == "duplicate-id":
        models.append({**models[0], "model": "/models/other.gguf"})
        return models, models[0]["id"]
    if kind == "unknown-backend":
        # Refused by Ansible's own check of meta/argument_specs.yml (backend choices), which names the field and the
        # value, not the model.
        models.append({"id": "mlx-x", "backend": "mlx", "model": "/models/x"})
        return models, "got: mlx"
    if kind == "bad-id-characters":
        models.append({"id": "bad id/with slash", "backend": "llamacpp", "model": "/models/x.gguf"})
        return models, "bad id/with slash"
    if kind == "tabbyapi-without-folder":
        models.append({"id": "tabby-nofolder", "backend": "tabbyapi", "model": ""})
        return models, "tabby-nofolder"
    raise AssertionError(kind)


def _run_converge(
    molecule_env: dict[str, str],
    tmp_path: Path,
    models: list[dict[str, Any]],
    *args: str,
    extra_vars: dict[str, Any] | None = None,
) -> tuple[int, str]:
    extra = tmp_path / "bad-models.json"
    extra.write_text(json.dumps({"llm_router_models": models, **(extra_vars or {})}), encoding="utf-8")
    cmd = [
        "ansible-playbook",
        "-i",
        molecule_env["MOLECULE_INVENTORY_FILE"],
        "-e",
        f"@{extra}",
        *args,
        str(Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", SCENARIO_DIR)) / "converge.yml"),
    ]
    proc = subprocess.run(cmd, env=molecule_env, capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _fingerprint(box: Any) -> str:
    res = box.run("sha256sum " + " ".join(DEPLOYED) + " 2>/dev/null | sort -k2")
    return res.stdout


@pytest.mark.parametrize("kind", ["duplicate-id", "unknown-backend", "bad-id-characters", "tabbyapi-without-folder"])
def test_bad_model_list_is_refused(
    kind: str, box: Any, client: httpx.Client, molecule_env: dict[str, str], tmp_path: Path
) -> None:
    models, culprit = _bad(kind)
    before = _fingerprint(box)
    assert f"{CONFIG_DIR}/models.yml" in before, "nothing deployed to compare against"
    pid_before = main_pid(box)

    rc, output = _run_converge(molecule_env, tmp_path, models)
    assert rc != 0, f"the role accepted a broken model list ({kind}):\n{output[-3000:]}"
    assert culprit in output, f"the refusal does not name {culprit!r}:\n{output[-3000:]}"
    # nothing changed on the host, and the play reported no change before failing
    assert _fingerprint(box) == before
    assert "changed=0" in output, output[-2000:]
    assert main_pid(box) == pid_before, f"{ROUTER_UNIT} was restarted"
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    assert sorted(m["id"] for m in resp.json()["data"]) == sorted(MODEL_IDS)


# Several engines at once (issue 8): (extra vars besides the models, the models, what the refusal must say).
_NEEDS = {"gpu": 2}
LIFECYCLE_BAD: dict[str, tuple[dict[str, Any], list[dict[str, Any]], str]] = {
    "needs-unknown-resource": (
        {"llm_router_resources": {"gpu": 24}},
        [{**MODELS[0], "needs": {"vram": 4}}, *MODELS[1:]],
        f'(id "{MODELS[0]["id"]}"): needs.vram: unknown resource (llm_router_resources: gpu)',
    ),
    "needs-above-capacity": (
        {"llm_router_resources": {"gpu": 24}},
        [*MODELS[:-1], {**MODELS[-1], "needs": {"gpu": 30}}],
        f'(id "{MODELS[-1]["id"]}"): needs.gpu: 30 is more than the capacity of gpu (24)',
    ),
    "same-port-running-together": (
        {"llm_router_resources": {"gpu": 24}},
        [{**MODELS[0], "needs": _NEEDS}, {**MODELS[1], "needs": _NEEDS}, *MODELS[2:]],
        f'(id "{MODELS[1]["id"]}"): port: {INVENTORY["llm_router_llamacpp_port"]} is also the engine port of',
    ),
    "alias-is-another-id": (
        {},
        [{**MODELS[0], "aliases": [MODELS[1]["id"]]}, *MODELS[1:]],
        f'aliases: "{MODELS[1]["id"]}" is the id of llm_router_models[1]',
    ),
    "current-alias-is-an-alias": (
        {"llm_router_current_alias": "chat"},
        [{**MODELS[0], "aliases": ["chat"]}, *MODELS[1:]],
        'llm_router_current_alias: "chat" is already an alias of llm_router_models[0]',
    ),
    "preload-too-big": (
        {},
        [{**MODELS[0], "preload": True}, {**MODELS[1], "preload": True}, *MODELS[2:]],
        "cannot all run at once (gpu 1 + 1 = 2 > 1)",
    ),
    "negative-idle-unload": (
        {},
        [*MODELS[:-1], {**MODELS[-1], "idle_unload": -5}],
        f'(id "{MODELS[-1]["id"]}"): idle_unload: must be a number of seconds, 0 (never) or more, got -5',
    ),
    "port-of-the-router": (
        {},
        [{**MODELS[0], "port": INVENTORY["llm_router_port"]}, *MODELS[1:]],
        f"port: {INVENTORY['llm_router_port']} is the port of the router itself",
    ),
}


@pytest.mark.parametrize("kind", sorted(LIFECYCLE_BAD))
def test_bad_lifecycle_settings_are_refused(
    kind: str, box: Any, client: httpx.Client, molecule_env: dict[str, str], tmp_path: Path
) -> None:
    """Resources, needs, ports, aliases, preload, idle unload: refused by the preflight, naming model and field."""
    extra_vars, models, message = LIFECYCLE_BAD[kind]
    before = _fingerprint(box)
    pid_before = main_pid(box)
    rc, output = _run_converge(molecule_env, tmp_path, models, extra_vars=extra_vars)
    assert rc != 0, f"the role accepted {kind}:\n{output[-3000:]}"
    flat = " ".join(output.split())  # the YAML callback folds long messages
    assert message in flat, f"the refusal does not say {message!r}:\n{output[-3000:]}"
    assert "nothing was changed" in flat
    assert _fingerprint(box) == before
    assert "changed=0" in output, output[-2000:]
    assert main_pid(box) == pid_before, f"{ROUTER_UNIT} was restarted"


def _models_yml(entries: list[tuple[str, dict[str, Any]]]) -> str:
    """A models.yml (the router's format: `models:` mapping id -> settings); entries may repeat an id."""
    text = "models:\n"
    for model_id, settings in entries:
        for line in yaml.safe_dump({model_id: settings}, sort_keys=False).splitlines():
            text += f"  {line}\n"
    return text


def _bad_models_yml(box: Any, kind: str) -> tuple[str, str]:
    deployed = yaml.safe_load(box.file(f"{CONFIG_DIR}/models.yml").content_string)["models"]
    entries = list(deployed.items())
    first_id, first = entries[0]
    if kind == "duplicate-id":
        return _models_yml([*entries, (first_id, first)]), first_id
    if kind == "unknown-backend":
        return _models_yml([*entries, ("mlx-x", {**first, "backend": "mlx"})]), "mlx"
    if kind == "bad-id-characters":
        return _models_yml([*entries, ("bad id/with slash", first)]), "bad id/with slash"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["duplicate-id", "unknown-backend", "bad-id-characters"],
)
def test_router_checker_refuses_a_bad_models_yml(kind: str, box: Any) -> None:
    """What the role's `validate:` runs on models.yml (llm-router check-config), on a broken file in the box."""
    text, culprit = _bad_models_yml(box, kind)
    path = f"/tmp/molecule-bad-models-{kind}.yml"
    box.run(f"cat > {path} <<'MOLECULE_EOF'\n{text}MOLECULE_EOF")
    res = box.run(f"/opt/llm-router/venv/bin/llm-router check-config --config-dir {CONFIG_DIR} --models-file {path}")
    box.run(f"rm -f {path}")
    assert res.rc != 0, f"check-config accepted:\n{text}\n{res.stdout}"
    assert culprit in res.stdout + res.stderr, res.stdout + res.stderr


def test_validate_keeps_the_old_models_yml(box: Any, molecule_env: dict[str, str], tmp_path: Path) -> None:
    """The role's `validate:` wiring, with the preflight skipped (it is tagged `always`; skipping it leaves
    validate as the only check): the configure phase alone with an unknown backend must fail at models.yml and
    leave the deployed file alone."""
    models, _culprit = _bad("unknown-backend")
    before = box.run(f"sha256sum {CONFIG_DIR}/models.yml").stdout
    pid_before = main_pid(box)
    only_configure = ("--tags", "llm_router_configure", "--skip-tags", "always", "-e", "__llm_router_runtime=false")
    rc, output = _run_converge(molecule_env, tmp_path, models, *only_configure)
    after = box.run(f"sha256sum {CONFIG_DIR}/models.yml").stdout
    if after != before:  # put the good configuration back for the tests that follow
        _run_converge(molecule_env, tmp_path, MODELS, *only_configure)
    assert rc != 0, f"validate: accepted a broken models.yml:\n{output[-3000:]}"
    assert "Write models.yml" in output, output[-3000:]
    assert after == before, "models.yml changed"
    assert main_pid(box) == pid_before
