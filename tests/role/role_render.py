"""Run pieces of the real role on this machine, without a managed host: its preflight, and its templates rendered
into a directory. Both go through `ansible-playbook` (connection local, nothing outside the output directory is
touched), so what is tested is exactly what a converge runs: role defaults and vars, the filter plugins,
`meta/argument_specs.yml`, the preflight template and the file templates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "llm_router"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

# The role's preflight with its argument check: the `always` tasks (argument specs, preflight, facts) in check mode.
PREFLIGHT_PLAY = """
- name: Preflight only
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: llm_router
"""

# The preflight tasks, then every template a host gets, into OUT (the role's vars made public for the templates).
RENDER_PLAY = """
- name: Render the role's templates
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run the role's preflight (its defaults and vars stay visible)
      ansible.builtin.include_role:
        name: llm_router
        tasks_from: preflight
        public: true
    - name: Start scripts (the role's validate)
      ansible.builtin.template:
        src: "{{ role_dir }}/templates/engine.sh.j2"
        dest: "{{ out }}/{{ item.id }}.sh"
        mode: "0755"
        validate: bash -n %s
      loop: "{{ llm_router_models }}"
    - name: Backend units
      ansible.builtin.template:
        src: "{{ role_dir }}/templates/backend.service.j2"
        dest: "{{ out }}/llm-backend-{{ item.id }}.service"
        mode: "0644"
      loop: "{{ llm_router_models }}"
    - name: Router unit, config files, TabbyAPI config, polkit rule
      ansible.builtin.template:
        src: "{{ role_dir }}/templates/{{ item.src }}"
        dest: "{{ out }}/{{ item.dest }}"
        mode: "0644"
      loop:
        - {src: llm-router.service.j2, dest: llm-router.service}
        - {src: config.yml.j2, dest: config.yml}
        - {src: models.yml.j2, dest: models.yml}
        - {src: tabbyapi-config.yml.j2, dest: tabbyapi-config.yml}
        - {src: polkit.rules.j2, dest: 50-llm-router.rules}
"""


def load_module(path: Path, name: str) -> ModuleType:
    """A Python file of the role (a filter plugin: not importable as a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    rc: int
    output: str
    out: Path

    def file(self, name: str) -> str:
        return (self.out / name).read_text(encoding="utf-8")

    def problems(self) -> list[str]:
        """The message lines of the failed task (the preflight's list of problems)."""
        found: list[str] = []
        for line in self.output.splitlines():
            if "FAILED! => {" in line:
                msg = json.loads(line.split("FAILED! => ", 1)[1]).get("msg")
                found.extend(msg if isinstance(msg, list) else [str(msg)])
        return found


def _run(play: str, inventory: dict[str, Any], tmp: Path, *args: str) -> Run:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    playbook = tmp / "play.yml"
    playbook.write_text(play, encoding="utf-8")
    extra = tmp / "inventory.json"
    extra.write_text(
        json.dumps(
            {
                "llm_router_check_engine_executables": False,
                **inventory,
                "out": str(out),
                "role_dir": str(ROLE),
                "ansible_python_interpreter": sys.executable,
            }
        ),
        encoding="utf-8",
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_FILTER_PLUGINS=str(ROLE / "filter_plugins"),
        ANSIBLE_NOCOLOR="1",
        # The failure as one JSON line (YAML output folds long lines).
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
    )
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-e", f"@{extra}", *args, str(playbook)]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300, check=False)
    return Run(proc.returncode, proc.stdout + proc.stderr, out)


def preflight(inventory: dict[str, Any], tmp: Path) -> Run:
    """The role's argument check and preflight against `inventory` (extra vars), in check mode: rc 0 or the
    refusal's text in `output`."""
    return _run(PREFLIGHT_PLAY, inventory, tmp, "--check", "--tags", "llm_router_preflight")


def render(inventory: dict[str, Any], tmp: Path) -> Run:
    """The preflight, then every template of the role rendered into `tmp/out` (files named as on a host)."""
    return _run(RENDER_PLAY, inventory, tmp)
