"""Hostile inventory values on a real systemd (issue 11, item 3): the `hostile` model's path, `--alias` argument
and HOSTILE environment value hold quotes, `$(...)`, backticks, `%` specifiers, backslashes and unicode. Its
engine must receive them verbatim (its /proc/PID/cmdline and environ) and none of the commands in them may have
run in the box. tests/role/test_hostile_inventory.py covers the rest without a box."""

from __future__ import annotations

from conftest import BY_ID, HOST_VARS, FleetHost, unit_of

MODEL = "hostile"


def test_hostile_values_reach_the_engine_verbatim(fleet: list[FleetHost]) -> None:
    host = fleet[0]
    spec = BY_ID[MODEL]
    with host.client() as client:
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    pid = host.unit_pid(unit_of(MODEL))
    argv = [p.decode() for p in host.box.file(f"/proc/{pid}/cmdline").content.split(b"\0") if p]
    engine_argv = argv[argv.index("--kind") + 2 :]  # the fake's launcher: python3 -I fake_engine.py --kind llamacpp
    port = str(HOST_VARS[host.name]["llm_router_llamacpp_port"])
    assert engine_argv == ["-m", spec["model"], "--host", "127.0.0.1", "--port", port, "-ngl", "999", *spec["args"]]
    environ = dict(
        item.decode().split("=", 1) for item in host.box.file(f"/proc/{pid}/environ").content.split(b"\0") if item
    )
    assert environ["HOSTILE"] == spec["env"]["HOSTILE"]
    pwned = host.run("ls -d /tmp/llmr-pwned* /var/tmp/llmr-pwned* 2>/dev/null").stdout.strip()
    assert pwned == "", "a command hidden in the inventory ran"
    unit = host.run(f"systemctl show -P Environment {unit_of(MODEL)}").stdout
    assert "HOSTILE=" in unit
