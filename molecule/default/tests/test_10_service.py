"""The deployed service: units, user, files, hardening and least privilege (polkit)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import CONFIG_DIR, MODEL_IDS, ROUTER_UNIT, ROUTER_USER, is_active, main_pid, run_as_router_user, unit_of


def test_systemd_is_pid1_and_running(box: Any) -> None:
    state = box.run("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded"), state
    assert box.run("cat /proc/1/comm").stdout.strip() == "systemd"


def test_router_unit_active_and_enabled(box: Any) -> None:
    assert is_active(box, ROUTER_UNIT) == "active"
    assert box.run(f"systemctl is-enabled {ROUTER_UNIT}").stdout.strip() == "enabled"


def test_systemd_holds_the_routers_listening_socket(box: Any) -> None:
    # llm-router.socket: a restart of the router refuses no client (connections wait in the socket's backlog).
    assert is_active(box, "llm-router.socket") == "active"
    assert box.run("systemctl is-enabled llm-router.socket").stdout.strip() == "enabled"
    assert box.run("systemctl show -P Listen llm-router.socket").stdout.strip() == "127.0.0.1:18302 (Stream)"
    assert box.run("systemctl show -P Triggers llm-router.socket").stdout.strip() == ROUTER_UNIT


def test_router_runs_as_its_own_user(box: Any) -> None:
    pid = main_pid(box)
    assert pid > 0
    user = box.run(f"ps -o user= -p {pid}").stdout.strip()
    assert user == ROUTER_USER
    # and every process of the unit, not only the main one
    users = box.run(f"systemctl show -P ControlGroup {ROUTER_UNIT}").stdout.strip()
    procs = box.run(f"cat /sys/fs/cgroup{users}/cgroup.procs").stdout.split()
    assert procs, f"no processes in {users}"
    owners = {box.run(f"ps -o user= -p {p}").stdout.strip() for p in procs} - {""}
    assert owners == {ROUTER_USER}


def test_router_user_is_a_system_account_without_login(box: Any) -> None:
    user = box.user(ROUTER_USER)
    assert user.exists
    assert user.uid < 1000
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_backend_unit_per_model_not_enabled_not_running(box: Any, model_id: str) -> None:
    unit = unit_of(model_id)
    load = box.run(f"systemctl show -P LoadState {unit}").stdout.strip()
    assert load == "loaded", f"{unit}: LoadState={load}"
    enabled = box.run(f"systemctl is-enabled {unit}").stdout.strip()
    assert enabled in ("disabled", "static", "indirect"), f"{unit} should not start at boot, is {enabled}"
    assert box.run(f"systemctl show -P Type {unit}").stdout.strip() == "exec"
    assert box.run(f"systemctl show -P KillMode {unit}").stdout.strip() == "control-group"


def test_backend_units_conflict_with_each_other(box: Any) -> None:
    for model_id in MODEL_IDS:
        conflicts = set(box.run(f"systemctl show -P Conflicts {unit_of(model_id)}").stdout.split())
        others = {unit_of(m) for m in MODEL_IDS if m != model_id}
        assert others <= conflicts, f"{unit_of(model_id)} lacks Conflicts= on {sorted(others - conflicts)}"


def test_config_files_present_and_valid(box: Any) -> None:
    for name in ("config.yml", "models.yml"):
        f = box.file(f"{CONFIG_DIR}/{name}")
        assert f.exists and f.is_file, name
        assert not f.mode & 0o007, f"{name} is world-accessible ({oct(f.mode)}): it may hold API keys"
    check = run_as_router_user(box, f"/opt/llm-router/venv/bin/llm-router check-config --config-dir {CONFIG_DIR}")
    assert check.rc == 0, check.stdout + check.stderr


def test_api_key_not_in_world_readable_places(box: Any, api_key: str) -> None:
    res = box.run(f"grep -rl -- {api_key} /etc/systemd /opt/llm-router/engines /etc/llm-router 2>/dev/null")
    for path in res.stdout.split():
        assert not box.file(path).mode & 0o004, f"{path} holds the API key and is world-readable"


@pytest.mark.parametrize(
    ("prop", "expected"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", {"yes", "read-only", "tmpfs"}),
        ("PrivateTmp", "yes"),
        ("User", ROUTER_USER),
    ],
)
def test_router_unit_hardening(box: Any, prop: str, expected: str | set[str]) -> None:
    value = box.run(f"systemctl show -P {prop} {ROUTER_UNIT}").stdout.strip()
    if isinstance(expected, set):
        assert value in expected, f"{prop}={value}"
    else:
        assert value == expected, f"{prop}={value}"


def test_router_unit_reload_is_a_signal(box: Any) -> None:
    reload_cmd = box.run(f"systemctl show -P ExecReload {ROUTER_UNIT}").stdout
    assert "HUP" in reload_cmd, reload_cmd


@pytest.mark.parametrize("unit", ["cron.service", "ssh.service"])
@pytest.mark.parametrize("verb", ["stop", "restart"])
def test_router_user_cannot_touch_other_units(box: Any, unit: str, verb: str) -> None:
    assert is_active(box, unit) == "active"
    res = run_as_router_user(box, f"systemctl --no-ask-password {verb} {unit}")
    assert res.rc != 0, f"llm-router could {verb} {unit}"
    assert "Access denied" in res.stderr or "Interactive authentication required" in res.stderr, res.stderr
    assert is_active(box, unit) == "active"


def test_router_user_cannot_start_an_unrelated_unit(box: Any) -> None:
    res = run_as_router_user(box, "systemctl --no-ask-password start systemd-tmpfiles-clean.service")
    assert res.rc != 0
