"""Load and validate the router's two configuration files (config.yml, models.yml).

Pure apart from reading the files: every problem is collected (file, key, reason) so an operator sees them all
in one run of `llm-router check-config`, which the Ansible role uses as `validate:`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_DIR = "/etc/llm-router"
CONFIG_DIR_ENV = "LLM_ROUTER_CONFIG_DIR"
CONFIG_FILE = "config.yml"
MODELS_FILE = "models.yml"

BACKEND_KINDS = ("llamacpp", "sglang", "tabbyapi", "vllm")
SLEEP_LEVELS = (1, 2)
"""vLLM sleep mode: 1 offloads the weights to host RAM (fast wake), 2 discards them (frees host RAM, slower wake)."""
STATUS_CHANNELS = ("reasoning", "content", "none")

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
UNIT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]*\.service$")
URL_PATTERN = re.compile(r"^https?://[^/\s:]+(:\d{1,5})?/?$")
DEFAULT_RESOURCES: Mapping[str, float] = {"gpu": 1.0}


@dataclass(frozen=True)
class BackendConfig:
    kind: str
    url: str
    warmup: bool
    """Send a real 1-token request before declaring the engine ready (first real request then is fast)."""
    stop_timeout: float
    """Seconds to wait, after the unit stopped, for the engine's port to refuse connections."""

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].split(":", 1)[0].rstrip("/")

    @property
    def port(self) -> int:
        rest = self.url.split("://", 1)[1].rstrip("/")
        if ":" in rest:
            return int(rest.rsplit(":", 1)[1])
        return 443 if self.url.startswith("https") else 80


@dataclass(frozen=True)
class ModelConfig:
    id: str
    backend: str
    unit: str
    name: str
    load_timeout: float
    url: str | None = None
    """This model's own engine URL; None: its backend's."""
    needs: Mapping[str, float] | None = None
    """Resources it holds while its unit runs; None: every resource at full capacity (one engine at a time)."""
    idle_unload: float | None = None
    """Seconds idle before its unit is stopped (0 = never); None: config.yml's `idle_unload`."""
    preload: bool = False
    aliases: tuple[str, ...] = ()
    sleep: int | None = None
    """vLLM sleep level used instead of stopping the unit (None: stop it, as for every other engine)."""
    needs_asleep: Mapping[str, float] = field(default_factory=dict)
    """Resources held while asleep (host RAM for level-1 weights); bounds how many models may sleep."""


@dataclass(frozen=True)
class RouterConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 8002
    api_keys: tuple[str, ...] = ()
    systemctl: tuple[str, ...] = ("systemctl",)
    journalctl: tuple[str, ...] = ("journalctl",)
    load_timeout: float = 180.0
    status_channel: str = "reasoning"
    speed_footer: bool = True
    footer_non_streaming: bool = False
    queue_limit: int = 64
    keepalive_interval: float = 5.0
    progress_interval: float = 2.0
    shutdown_grace: float = 60.0
    stall_timeout: float = 300.0
    """Seconds an engine may send nothing in the middle of an answer before the router gives up on it."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted (413 above)."""
    backends: Mapping[str, BackendConfig] = field(default_factory=dict)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    idle_unload: float = 0.0
    current_alias: str | None = None

    def units(self) -> list[str]:
        return [m.unit for m in self.models.values()]

    def engine(self, model: ModelConfig) -> BackendConfig:
        """The backend settings of this model's engine, with its own URL."""
        backend = self.backends[model.backend]
        return backend if model.url is None or model.url == backend.url else replace(backend, url=model.url)

    def needs(self, model: ModelConfig) -> dict[str, float]:
        return dict(self.resources) if model.needs is None else dict(model.needs)

    def idle_unload_of(self, model: ModelConfig) -> float:
        return self.idle_unload if model.idle_unload is None else model.idle_unload

    def fits(self, held: list[dict[str, float]]) -> bool:
        """Whether resources held together stay within every capacity."""
        return all(sum(n.get(name, 0.0) for n in held) <= capacity + 1e-9 for name, capacity in self.resources.items())

    def alias_targets(self) -> dict[str, str]:
        """Every alias a client may send, with the model id it stands for."""
        return {alias: model.id for model in self.models.values() for alias in model.aliases}


class ConfigError(Exception):
    """One or more problems, each naming file, key and reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def resolve_config_dir(cli_value: str | None) -> Path:
    return Path(cli_value or os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


class _Checker:
    """Collects problems while reading one YAML mapping."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(f"{self.file}: {key}: {reason}")

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
        for key in data:
            if key not in allowed:
                self.problem(f"{prefix}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        prefix: str,
        types: tuple[type, ...],
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        if key not in data:
            return default
        value = data[key]
        # bool is an int in Python: a YAML `true` must not pass as a number, nor 1 as a boolean.
        wrong_bool = isinstance(value, bool) and bool not in types
        if not isinstance(value, types) or wrong_bool:
            names = "a number" if set(types) == {int, float} else " or ".join(_type_name(t) for t in types)
            self.problem(f"{prefix}{key}", f"must be {names}, got {_type_name(type(value))} {value!r}")
            return default
        if check is not None:
            reason = check(value)
            if reason:
                self.problem(f"{prefix}{key}", reason)
                return default
        return value


def _type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(t, t.__name__)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _check_url(value: str) -> str | None:
    return None if URL_PATTERN.match(value) else f"must be http(s)://HOST:PORT without a path, got {value!r}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys silently: a model listed twice would vanish. Refuse it instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, name: str, problems: list[str]) -> Any:
    """Parse one file; `name` is what messages call it (Ansible's `validate:` hands over a temporary copy)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{name}: cannot read {path}: file not found")
        return None
    except OSError as exc:
        problems.append(f"{name}: cannot read {path}: {exc.strerror}")
        return None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problems.append(f"{name}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}")
        return None


def _check_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be HOST:PORT with a port 1-65535, got {value!r}"
    return None


def _check_argv(value: list[Any]) -> str | None:
    if not value or not all(isinstance(v, str) and v for v in value):
        return "must be a non-empty list of non-empty strings"
    return None


def _check_keys(value: list[Any]) -> str | None:
    if not all(isinstance(v, str) and v.strip() for v in value):
        return "must be a list of non-empty strings"
    return None


def parse_config(config_data: Any, models_data: Any, problems: list[str], check_models: bool = True) -> RouterConfig:
    """Build a RouterConfig from already-parsed YAML, appending every problem found."""
    c = _Checker(CONFIG_FILE, problems)
    if config_data is None:
        config_data = {}
    if not isinstance(config_data, dict):
        c.problem("(top level)", f"must be a mapping, got {_type_name(type(config_data))}")
        config_data = {}
    defaults = RouterConfig()
    allowed = {
        "listen",
        "api_keys",
        "systemctl",
        "journalctl",
        "load_timeout",
        "status_channel",
        "speed_footer",
        "footer_non_streaming",
        "queue_limit",
        "keepalive_interval",
        "progress_interval",
        "shutdown_grace",
        "backends",
        "resources",
        "idle_unload",
        "current_alias",
        "stall_timeout",
        "max_body_bytes",
    }
    c.unknown_keys(config_data, allowed, "")
    listen = c.get(config_data, "listen", "", (str,), "0.0.0.0:8002", _check_listen)
    host, _, port = listen.rpartition(":")
    api_keys = c.get(config_data, "api_keys", "", (list,), [], _check_keys) or []
    systemctl = c.get(config_data, "systemctl", "", (list,), ["systemctl"], _check_argv)
    journalctl = c.get(config_data, "journalctl", "", (list,), ["journalctl"], _check_argv)
    num = (int, float)
    load_timeout = c.get(config_data, "load_timeout", "", num, defaults.load_timeout, _positive)
    channel = c.get(
        config_data,
        "status_channel",
        "",
        (str,),
        defaults.status_channel,
        lambda v: None if v in STATUS_CHANNELS else f"must be one of {', '.join(STATUS_CHANNELS)}, got {v!r}",
    )
    speed_footer = c.get(config_data, "speed_footer", "", (bool,), defaults.speed_footer)
    footer_ns = c.get(config_data, "footer_non_streaming", "", (bool,), defaults.footer_non_streaming)
    queue_limit = c.get(config_data, "queue_limit", "", (int,), defaults.queue_limit, _positive)
    keepalive = c.get(config_data, "keepalive_interval", "", num, defaults.keepalive_interval, _positive)
    progress = c.get(config_data, "progress_interval", "", num, defaults.progress_interval, _positive)
    grace = c.get(config_data, "shutdown_grace", "", num, defaults.shutdown_grace, _positive)
    stall_timeout = c.get(config_data, "stall_timeout", "", num, defaults.stall_timeout, _positive)
    max_body_bytes = c.get(config_data, "max_body_bytes", "", (int,), defaults.max_body_bytes, _positive)
    resources: dict[str, float] = {}
    for name, capacity in c.get(config_data, "resources", "", (dict,), dict(DEFAULT_RESOURCES)).items():
        if not isinstance(name, str) or not name:
            c.problem(f"resources.{name}", "a resource name must be a non-empty string")
        elif isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or capacity <= 0:
            c.problem(f"resources.{name}", f"capacity must be a number greater than 0, got {capacity!r}")
        else:
            resources[name] = float(capacity)
    if not resources:
        resources = dict(DEFAULT_RESOURCES)
    idle_unload = c.get(config_data, "idle_unload", "", num, 0.0, _not_negative)
    current_alias = c.get(
        config_data,
        "current_alias",
        "",
        (str, type(None)),
        None,
        lambda v: (
            None
            if v is None or MODEL_ID_PATTERN.match(v)
            else "must be a model id: letters, digits, '.', '_', ':', '-'"
        ),
    )

    backends: dict[str, BackendConfig] = {}
    raw_backends = c.get(config_data, "backends", "", (dict,), {})
    for kind, raw in raw_backends.items():
        key = f"backends.{kind}"
        if kind not in BACKEND_KINDS:
            c.problem(key, f"unknown backend kind (allowed: {', '.join(BACKEND_KINDS)})")
            continue
        if not isinstance(raw, dict):
            c.problem(key, f"must be a mapping with 'url', got {_type_name(type(raw))}")
            continue
        c.unknown_keys(raw, {"url", "warmup", "stop_timeout"}, f"{key}.")
        if "url" not in raw:
            c.problem(f"{key}.url", "missing (e.g. http://127.0.0.1:8085)")
            continue
        url = c.get(
            raw,
            "url",
            f"{key}.",
            (str,),
            None,
            _check_url,
        )
        warmup = c.get(raw, "warmup", f"{key}.", (bool,), kind == "tabbyapi")
        stop_timeout = c.get(raw, "stop_timeout", f"{key}.", num, 30.0, _positive)
        if url is not None:
            backends[kind] = BackendConfig(kind, url.rstrip("/"), warmup, float(stop_timeout))

    models = _parse_models(models_data, backends, float(load_timeout), resources, problems) if check_models else {}
    if check_models:
        _check_together(models, backends, resources, current_alias, float(idle_unload), problems)
    return RouterConfig(
        listen_host=host or "0.0.0.0",
        listen_port=int(port) if port.isdigit() else 8002,
        api_keys=tuple(api_keys),
        systemctl=tuple(systemctl),
        journalctl=tuple(journalctl),
        load_timeout=float(load_timeout),
        status_channel=channel,
        speed_footer=speed_footer,
        footer_non_streaming=footer_ns,
        queue_limit=queue_limit,
        keepalive_interval=float(keepalive),
        progress_interval=float(progress),
        shutdown_grace=float(grace),
        stall_timeout=float(stall_timeout),
        max_body_bytes=max_body_bytes,
        backends=backends,
        models=models,
        resources=resources,
        idle_unload=float(idle_unload),
        current_alias=current_alias,
    )


def _parse_models(
    data: Any,
    backends: Mapping[str, BackendConfig],
    default_timeout: float,
    resources: Mapping[str, float],
    problems: list[str],
) -> dict[str, ModelConfig]:
    c = _Checker(MODELS_FILE, problems)
    if not isinstance(data, dict):
        c.problem("(top level)", "must be a mapping with a 'models' key")
        return {}
    c.unknown_keys(data, {"models"}, "")
    raw_models = data.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        c.problem("models", "must be a non-empty mapping of model id to its settings")
        return {}
    models: dict[str, ModelConfig] = {}
    unit_owner: dict[str, str] = {}
    for model_id, raw in raw_models.items():
        key = f"models.{model_id}"
        if not isinstance(model_id, str) or not MODEL_ID_PATTERN.match(model_id):
            c.problem(key, "model id must be 1-128 characters: letters, digits, '.', '_', ':', '-'")
            continue
        if not isinstance(raw, dict):
            c.problem(key, f"must be a mapping with 'backend' and 'unit', got {_type_name(type(raw))}")
            continue
        c.unknown_keys(
            raw,
            {
                "backend",
                "unit",
                "name",
                "load_timeout",
                "url",
                "needs",
                "idle_unload",
                "preload",
                "aliases",
                "sleep",
                "needs_asleep",
            },
            f"{key}.",
        )
        before = len(problems)
        for required in ("backend", "unit"):
            if required not in raw:
                c.problem(f"{key}.{required}", "missing")
        backend = c.get(raw, "backend", f"{key}.", (str,), None)
        if backend is not None and backend not in backends:
            configured = ", ".join(sorted(backends)) or "none"
            c.problem(
                f"{key}.backend", f"{backend!r} is not a configured backend in config.yml (configured: {configured})"
            )
        unit = c.get(
            raw,
            "unit",
            f"{key}.",
            (str,),
            None,
            lambda v: (
                None if UNIT_PATTERN.match(v) else f"must be a systemd service name ending in .service, got {v!r}"
            ),
        )
        if unit is not None:
            if unit in unit_owner:
                c.problem(f"{key}.unit", f"{unit!r} is already the unit of model {unit_owner[unit]!r}")
            else:
                unit_owner[unit] = model_id
        name = c.get(raw, "name", f"{key}.", (str,), model_id)
        timeout = c.get(raw, "load_timeout", f"{key}.", (int, float), default_timeout, _positive)
        url = c.get(raw, "url", f"{key}.", (str,), None, _check_url)
        needs = _parse_needs(c, raw, key, resources)
        idle = c.get(raw, "idle_unload", f"{key}.", (int, float), None, _not_negative)
        preload = c.get(raw, "preload", f"{key}.", (bool,), False)
        aliases = c.get(raw, "aliases", f"{key}.", (list,), [], _check_aliases)
        sleep = c.get(
            raw,
            "sleep",
            f"{key}.",
            (int, type(None)),
            None,
            lambda v: None if v is None or v in SLEEP_LEVELS else "must be 1 or 2 (vLLM's sleep levels)",
        )
        if sleep is not None and backend is not None and backend != "vllm":
            c.problem(f"{key}.sleep", f"only vllm models can sleep, this one runs on {backend}")
        needs_asleep = _parse_needs(c, raw, key, resources, field_name="needs_asleep") or {}
        if needs_asleep and sleep is None:
            c.problem(f"{key}.needs_asleep", "only a model with 'sleep' set is ever asleep")
        if len(problems) == before:
            models[model_id] = ModelConfig(
                model_id,
                backend,
                unit,
                name,
                float(timeout),
                url=None if url is None else url.rstrip("/"),
                needs=needs,
                idle_unload=None if idle is None else float(idle),
                preload=preload,
                aliases=tuple(aliases),
                sleep=sleep,
                needs_asleep=needs_asleep,
            )
    return models


def _parse_needs(
    c: _Checker, raw: Mapping[str, Any], key: str, resources: Mapping[str, float], field_name: str = "needs"
) -> dict[str, float] | None:
    needs = c.get(raw, field_name, f"{key}.", (dict,), None)
    if needs is None:
        return None
    parsed: dict[str, float] = {}
    for name, amount in needs.items():
        where = f"{key}.{field_name}.{name}"
        if name not in resources:
            c.problem(where, f"unknown resource (config.yml resources: {', '.join(sorted(resources))})")
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            c.problem(where, f"must be a number, 0 or more, got {amount!r}")
        elif amount > resources[name]:
            c.problem(where, f"{amount:g} is more than the capacity of {name!r} ({resources[name]:g})")
        else:
            parsed[name] = float(amount)
    return parsed


def _asleep_beside(config: RouterConfig, sleeper: ModelConfig, other: ModelConfig) -> bool:
    """`sleeper` can sleep (its unit running) while `other` runs."""
    return sleeper.sleep is not None and config.fits([dict(sleeper.needs_asleep), config.needs(other)])


def _check_aliases(value: list[Any]) -> str | None:
    for alias in value:
        if not isinstance(alias, str) or not MODEL_ID_PATTERN.match(alias):
            return f"each alias must be a model id (letters, digits, '.', '_', ':', '-'), got {alias!r}"
    return None


def _check_together(
    models: Mapping[str, ModelConfig],
    backends: Mapping[str, BackendConfig],
    resources: Mapping[str, float],
    current_alias: str | None,
    idle_unload: float,
    problems: list[str],
) -> None:
    """The rules that concern several models at once: names, shared engine URLs, preload."""
    c = _Checker(MODELS_FILE, problems)
    probe = RouterConfig(backends=backends, models=models, resources=resources, idle_unload=idle_unload)
    owner: dict[str, str] = {model_id: model_id for model_id in models}
    for model in models.values():
        for alias in model.aliases:
            if alias in owner:
                other = owner[alias]
                what = "a model id" if other == alias else f"already an alias of {other!r}"
                c.problem(f"models.{model.id}.aliases", f"{alias!r} is {what}")
            else:
                owner[alias] = model.id
    if current_alias is not None and current_alias in owner:
        problems.append(f"{CONFIG_FILE}: current_alias: {current_alias!r} is already a model id or alias in models.yml")
    listed = list(models.values())
    for index, first in enumerate(listed):
        for second in listed[index + 1 :]:
            if first.backend not in backends or second.backend not in backends:
                continue
            if probe.engine(first).url != probe.engine(second).url:
                continue
            if probe.fits([probe.needs(first), probe.needs(second)]):
                c.problem(
                    f"models.{second.id}.url",
                    f"{probe.engine(second).url} is also the engine URL of {first.id!r}, and their needs let both run "
                    "at once: give one of them its own url (port)",
                )
            elif _asleep_beside(probe, first, second) or _asleep_beside(probe, second, first):
                c.problem(
                    f"models.{second.id}.url",
                    f"{probe.engine(second).url} is also the engine URL of {first.id!r}, and one of them keeps its "
                    "engine (and port) asleep while the other runs: give one of them its own url (port)",
                )
    preload = [m for m in listed if m.preload]
    if preload and not probe.fits([probe.needs(m) for m in preload]):
        c.problem(
            "preload",
            f"the preload models ({', '.join(m.id for m in preload)}) cannot all run at once: their needs exceed "
            f"the resources {dict(resources)}",
        )


def load_config(config_dir: Path) -> RouterConfig:
    """Read and validate both files of a config directory; raise ConfigError listing every problem."""
    return load_config_files(config_dir / CONFIG_FILE, config_dir / MODELS_FILE)


def load_config_files(config_file: Path, models_file: Path | None) -> RouterConfig:
    """Validate files at arbitrary paths (Ansible's `validate:` hands over a temporary copy).

    With `models_file=None` only config.yml is checked: the role validates config.yml on its own before
    models.yml, which is then checked against the config.yml that just landed.
    """
    problems: list[str] = []
    config_data = _read_yaml(config_file, CONFIG_FILE, problems)
    models_data = _read_yaml(models_file, MODELS_FILE, problems) if models_file is not None else None
    if problems:
        raise ConfigError(problems)
    config = parse_config(config_data, models_data, problems, check_models=models_file is not None)
    if problems:
        raise ConfigError(problems)
    return config
