"""The role's variables are declared twice: defaults/main.yml (values) and meta/argument_specs.yml (types, docs).

These tests keep the two in step (the node_exporter role's CI check), and keep the model-entry options in step with
the keys the preflight allows (vars/main.yml) and the README's table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "llm_router"
README = ROLE.parents[1] / "README.md"


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


DEFAULTS: dict[str, Any] = _load(ROLE / "defaults" / "main.yml")
OPTIONS: dict[str, Any] = _load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
VARS: dict[str, Any] = _load(ROLE / "vars" / "main.yml")


def test_every_default_is_documented_and_every_option_has_a_default() -> None:
    assert sorted(set(DEFAULTS) - set(OPTIONS)) == [], "in defaults/main.yml, missing from argument_specs"
    assert sorted(set(OPTIONS) - set(DEFAULTS)) == [], "in argument_specs, missing from defaults/main.yml"


def test_argument_spec_defaults_equal_the_defaults() -> None:
    different = {k: (OPTIONS[k].get("default"), v) for k, v in DEFAULTS.items() if OPTIONS[k].get("default") != v}
    assert different == {}, "argument_specs default != defaults/main.yml value"


def test_every_option_has_a_type_and_a_description() -> None:
    for name, spec in OPTIONS.items():
        assert spec.get("type"), name
        assert spec.get("description"), name


def test_public_variables_carry_the_role_prefix() -> None:
    assert [k for k in DEFAULTS if not k.startswith("llm_router_")] == []
    assert [k for k in VARS if not k.startswith("_llm_router_")] == []


def test_model_entry_options_match_the_keys_the_preflight_allows() -> None:
    models = OPTIONS["llm_router_models"]
    assert models["type"] == "list"
    assert models["elements"] == "dict"
    assert sorted(models["options"]) == sorted(VARS["_llm_router_model_keys"])
    assert models["options"]["backend"]["choices"] == VARS["_llm_router_backends"]
    for key in ("id", "backend", "model"):
        assert models["options"][key].get("required") is True, key


def test_readme_table_lists_every_variable_and_model_key() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [name for name in DEFAULTS if f"| `{name}` |" not in text]
    assert missing == [], "variables missing from README's inventory table"
    row = next(line for line in text.splitlines() if line.startswith("| `llm_router_models` |"))
    missing_keys = [key for key in VARS["_llm_router_model_keys"] if f"`{key}`" not in row]
    assert missing_keys == [], "model keys missing from the llm_router_models row of README's table"
