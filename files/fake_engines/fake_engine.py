#!/usr/bin/env python3
"""Fake inference engine: a real HTTP process that behaves like llama-server, SGLang, TabbyAPI or vLLM.

Stdlib only (runs under Debian 12's /usr/bin/python3).  Used by llm-router's end-to-end tests and by the
Ansible role's molecule test, launched exactly like the real engines (see README.md beside this file):

    fake_engine.py --kind llamacpp -m MODEL --host H --port P -ngl 999 [ARGS...]
    fake_engine.py --kind sglang [-m sglang.launch_server] --model-path MODEL --host H --port P [ARGS...]
    fake_engine.py --kind tabbyapi --model-name NAME [--model-dir D] [--host H] [--port P] [ARGS...]
        (TabbyAPI reads ./config.yml from its working directory; CLI flags override it)
    fake_engine.py --kind vllm [-m vllm.entrypoints.openai.api_server] --model MODEL --host H --port P [ARGS...]
    fake_engine.py --kind vllm serve MODEL --host H --port P [--served-model-name ID] [--enable-sleep-mode] [ARGS...]

Environment knobs (all optional): FAKE_LOAD_SECONDS (0.5), FAKE_FAIL_LOAD, FAKE_FAIL_AFTER (0.2),
FAKE_FAIL_MESSAGE, FAKE_CHECK_MODEL_FILE, FAKE_TOKENS (16), FAKE_TOKEN_DELAY (0.01), FAKE_SILENCE (0),
FAKE_CRASH_AFTER, FAKE_PING_INTERVAL (15), FAKE_EMBED_DIM (8), FAKE_KEEPALIVE_TIMEOUT (5), FAKE_EVENT_LOG,
FAKE_ACCESS_LOG (1), FAKE_IGNORE_SIGTERM; vLLM sleep mode (with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1):
FAKE_SLEEP_SECONDS (0.2), FAKE_WAKE_SECONDS (0.3), FAKE_WAKE2_SECONDS (1.0), FAKE_WAKE_FAIL,
FAKE_ASLEEP_REQUESTS (wait|error|abort).  Per-request magic words in the last user message (or the prompt / input):
[[tokens:N]] [[delay:S]] [[silence:S]] [[crash-after:N]] [[error]] [[error-midstream]] [[tool:NAME]]
[[malformed-sse]] [[html-500]] [[headers-delay:S]].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time

TYPE_CHECKING = False  # typing is not imported at run time: start-up time matters (the port opens sooner)
if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer  # imported lazily at run time, after the port is bound
    from typing import Any

KINDS = ("llamacpp", "sglang", "tabbyapi", "vllm")
VLLM_DEV_PATHS = ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc")
DEFAULT_PORTS = {"llamacpp": 8080, "sglang": 30000, "tabbyapi": 5000, "vllm": 8000}
VLLM_MODULES = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main")
VLLM_VERSION = "0.0.0+fake"
TABBY_SECTIONS = ("network", "logging", "model", "draft_model", "lora", "embeddings", "sampling", "developer")
MAGIC_RE = re.compile(
    r"\[\[(tokens|delay|silence|crash-after|error-midstream|error|tool|malformed-sse|html-500|headers-delay)"
    r"(?::\s*([^\]]*))?\]\]"
)
JSON_SEPARATORS = (",", ":")


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------
def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        return default


def env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError:
        return default


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=JSON_SEPARATORS, ensure_ascii=False).encode()


class Log:
    """Human-readable lines on stdout/stderr, written with one os.write each (safe from signal handlers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _prefix(self, level: str) -> str:
        if self.kind == "sglang":
            return time.strftime("[%Y-%m-%d %H:%M:%S] ")
        if self.kind == "tabbyapi":
            return f"{level + ':':<10}"
        if self.kind == "vllm":  # vLLM's logger: `INFO 12-01 15:55:00 [file.py:123] message`
            return f"{level} {time.strftime('%m-%d %H:%M:%S')} [fake_engine.py] "
        return ""

    def _write(self, fd: int, level: str, msg: str) -> None:
        data = "".join(self._prefix(level) + line + "\n" for line in msg.split("\n")).encode()
        with contextlib.suppress(OSError):
            os.write(fd, data)

    def info(self, msg: str) -> None:
        self._write(1, "INFO", msg)

    def warning(self, msg: str) -> None:
        self._write(2, "WARNING", msg)

    def error(self, msg: str) -> None:
        self._write(2, "ERROR", msg)


class EventLog:
    """JSON lines for tests: one os.write per line on an O_APPEND descriptor (line-atomic across processes)."""

    def __init__(self, path: str | None, kind: str) -> None:
        self.kind = kind
        self.fd: int | None = None
        if path:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                sys.stderr.write(f"warning: cannot open FAKE_EVENT_LOG {path}: {exc}\n")

    def emit(self, event: str, **fields: Any) -> None:
        if self.fd is None:
            return
        record = {"event": event, **fields}
        record.setdefault("kind", self.kind)
        record.setdefault("pid", os.getpid())
        record["ts"] = round(time.time(), 6)
        with contextlib.suppress(OSError):
            os.write(self.fd, json.dumps(record, separators=JSON_SEPARATORS, default=str).encode() + b"\n")


# --------------------------------------------------------------------------------------------------------------
# configuration: command line (per engine kind) and TabbyAPI's config.yml
# --------------------------------------------------------------------------------------------------------------
CLI_FLAGS: dict[str, dict[str, str]] = {
    "llamacpp": {
        "-m": "model", "--model": "model", "--host": "host", "--port": "port", "-a": "alias", "--alias": "alias",
        "-c": "ctx", "--ctx-size": "ctx",
    },
    "sglang": {
        "--model-path": "model", "--model": "model", "--host": "host", "--port": "port",
        "--served-model-name": "alias", "--context-length": "ctx",
    },
    "vllm": {
        "--model": "model", "--host": "host", "--port": "port", "--served-model-name": "alias",
        "--max-model-len": "ctx",
    },
    "tabbyapi": {
        "--model-name": "model_name", "--model-dir": "model_dir", "--host": "host", "--port": "port",
        "--max-seq-len": "ctx", "--config": "config",
    },
}


def parse_cli(kind: str, argv: list[str]) -> dict[str, str]:
    """Pick the flags the fake cares about; accept and ignore everything else (like `-ngl 999 -t 2`)."""
    known = CLI_FLAGS[kind]
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and "=" in tok:
            flag, value = tok.split("=", 1)
            if flag in known:
                out[known[flag]] = value
        elif tok in known and i + 1 < len(argv):
            out[known[tok]] = argv[i + 1]
            i += 1
        i += 1
    return out


def _strip_yaml_comment(line: str) -> str:
    quote = ""
    for idx, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (idx == 0 or line[idx - 1] in " \t"):
            return line[:idx]
    return line


def _yaml_scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            if text[0] == "[" and text.endswith("]"):
                inner = text[1:-1].strip()
                return [_yaml_scalar(part) for part in inner.split(",")] if inner else []
            return text
    if text[0] == '"' and text.endswith('"') and len(text) >= 2:
        try:
            return json.loads(text)
        except ValueError:
            return text[1:-1]
    if text[0] == "'" and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_simple_yaml(text: str) -> dict[str, Any]:
    """The YAML subset a templated config.yml uses: nested block mappings, block lists of scalars, scalars
    (plain, quoted, JSON-style flow [..]/{..}), comments.  A JSON document (valid YAML) is accepted as is."""
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("top level must be a mapping")
        return data
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]  # (indent of the container's entries, container)
    pending: tuple[int, dict[str, Any], str] | None = None  # "key:" waiting for its nested block
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_yaml_comment(raw).rstrip()
        body = line.strip()
        if not body or body in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip(" "))
        is_item = body == "-" or body.startswith("- ")
        if pending is not None:
            p_indent, p_dict, p_key = pending
            pending = None
            if is_item and indent >= p_indent:
                p_dict[p_key] = []
                stack.append((indent, p_dict[p_key]))
            elif indent > p_indent:
                p_dict[p_key] = {}
                stack.append((indent, p_dict[p_key]))
        while len(stack) > 1 and (indent < stack[-1][0] or (isinstance(stack[-1][1], list) and not is_item)):
            stack.pop()
        container = stack[-1][1]
        if is_item:
            if not isinstance(container, list):
                raise ValueError(f"line {lineno}: list item outside a list")
            container.append(_yaml_scalar(body[1:]))
            continue
        if not isinstance(container, dict):
            raise ValueError(f"line {lineno}: expected a list item")
        if body.endswith(":"):
            key, value = body[:-1], ""
        elif ": " in body:
            key, value = body.split(": ", 1)
        else:
            raise ValueError(f"line {lineno}: expected 'key: value', got {body!r}")
        key = str(_yaml_scalar(key))
        if value.strip():
            container[key] = _yaml_scalar(value)
        else:
            container[key] = None
            pending = (indent, container, key)
    return root


class Config:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.model = ""  # as given on the command line (path, or TabbyAPI folder name)
        self.model_id = ""  # the id the engine reports
        self.model_path = ""  # what FAKE_CHECK_MODEL_FILE checks
        self.host = "127.0.0.1"
        self.port = DEFAULT_PORTS[kind]
        self.ctx = 4096
        self.ping_interval = 15.0
        self.tabby_model_dir = "models"
        self.sleep_mode = False  # vLLM: --enable-sleep-mode
        self.dev_mode = False  # vLLM: VLLM_SERVER_DEV_MODE=1 registers /sleep, /wake_up, /is_sleeping, ...


def vllm_argv(argv: list[str]) -> tuple[list[str], str]:
    """Strip vLLM's entry point (`-m vllm.entrypoints.openai.api_server`, `-m vllm.entrypoints.cli.main serve`,
    `serve`) and return the remaining flags plus `vllm serve`'s positional model (or "")."""
    if argv[:1] == ["-m"]:
        module = argv[1] if len(argv) > 1 else ""
        if module not in VLLM_MODULES:
            raise SystemExit(f"{sys.executable}: No module named {module}")
        argv = argv[2:]
        if module == "vllm.entrypoints.cli.main" and argv[:1] != ["serve"]:
            raise SystemExit("usage: vllm serve [model_tag] [options] (the fake knows only `serve`)")
    positional = ""
    if argv[:1] == ["serve"]:
        argv = argv[1:]
        if argv and not argv[0].startswith("-"):
            positional, argv = argv[0], argv[1:]
    return argv, positional


def build_config(kind: str, argv: list[str], log: Log) -> Config:
    cfg = Config(kind)
    positional = ""
    if kind == "vllm":
        argv, positional = vllm_argv(argv)
        cfg.sleep_mode = any(a == "--enable-sleep-mode" or a.lower() == "--enable-sleep-mode=true" for a in argv)
        try:  # vllm/envs.py: bool(int(os.getenv("VLLM_SERVER_DEV_MODE", "0")))
            cfg.dev_mode = bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0") or "0"))
        except ValueError:
            cfg.dev_mode = False
    if kind == "sglang" and argv[:1] == ["-m"]:
        module = argv[1] if len(argv) > 1 else ""
        if module != "sglang.launch_server":
            raise SystemExit(f"{sys.executable}: No module named {module}")
        argv = argv[2:]
    cli = parse_cli(kind, argv)
    if positional:
        cli["model"] = positional  # `vllm serve MODEL`: the positional wins over --model
    if kind == "tabbyapi":
        conf_path = cli.get("config") or "config.yml"
        file_cfg: dict[str, Any] = {}
        if os.path.exists(conf_path):
            with open(conf_path, encoding="utf-8") as fh:
                file_cfg = parse_simple_yaml(fh.read())
            log.info(f"Using config file {os.path.abspath(conf_path)}")
        elif "config" in cli:
            raise SystemExit(f"config file {conf_path} not found")
        merged: dict[str, dict[str, Any]] = {
            sec: dict(val) for sec, val in file_cfg.items() if isinstance(val, dict)
        }
        for name, value in os.environ.items():
            for sec in TABBY_SECTIONS:
                prefix = f"TABBY_{sec.upper()}_"
                if name.startswith(prefix):
                    merged.setdefault(sec, {})[name[len(prefix):].lower()] = _yaml_scalar(value)
        if "config" not in cli:  # real TabbyAPI ignores every other flag when --config is given
            for key, sec in (("host", "network"), ("port", "network"), ("model_name", "model"),
                             ("model_dir", "model"), ("ctx", "model")):
                if key in cli:
                    merged.setdefault(sec, {})["max_seq_len" if key == "ctx" else key] = _yaml_scalar(cli[key])
        net, mod = merged.get("network", {}), merged.get("model", {})
        cfg.host = str(net.get("host") or "127.0.0.1")
        cfg.port = int(net.get("port") or 5000)
        if net.get("sse_ping_interval"):
            cfg.ping_interval = float(net["sse_ping_interval"])
        cfg.model = str(mod.get("model_name") or "")
        cfg.model_id = cfg.model
        cfg.model_path = os.path.join(str(mod.get("model_dir") or "models"), cfg.model)
        cfg.ctx = int(mod.get("max_seq_len") or cfg.ctx)
        cfg.tabby_model_dir = str(mod.get("model_dir") or "models")
    else:
        if not cli.get("model"):
            flag = {"llamacpp": "-m", "vllm": "--model"}.get(kind, "--model-path")
            raise SystemExit(f"error: no model given ({flag} MODEL)")
        cfg.model = cli["model"]
        cfg.model_path = cfg.model
        cfg.model_id = cli.get("alias") or cfg.model
        cfg.host = cli.get("host", cfg.host)
        cfg.port = int(cli.get("port", cfg.port))
        cfg.ctx = int(cli.get("ctx", cfg.ctx))
    if kind == "vllm":
        cfg.ping_interval = float("inf")  # vLLM sends no keep-alive comments (FAKE_PING_INTERVAL can force some)
    cfg.ping_interval = env_float("FAKE_PING_INTERVAL", cfg.ping_interval)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# per-request plan: knobs from env and magic words
# --------------------------------------------------------------------------------------------------------------
class Plan:
    def __init__(self) -> None:
        self.tokens = 0
        self.finish_reason = "stop"
        self.delay = env_float("FAKE_TOKEN_DELAY", 0.01)
        self.silence = env_float("FAKE_SILENCE", 0.0)
        self.crash_after = env_int("FAKE_CRASH_AFTER", None)
        self.error = False
        self.error_midstream = False
        self.malformed_sse = False
        self.html_500 = False
        self.headers_delay = 0.0
        self.prompt_tokens = 1
        self.tool_call: tuple[str, str] | None = None  # (name, JSON arguments): answer with this tool call


def wanted_tool_call(body: dict[str, Any], messages: list[Any]) -> tuple[str, str] | None:
    """[[tool:NAME]] in the last message, when that message is the user's and the request offers a tool NAME:
    the tool call to answer with (its required arguments filled with minimal valid values).  After the tool's
    result (a last message with role `tool`) the engine answers with text again."""
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") != "user":
        return None
    names = [arg.strip() for name, arg in MAGIC_RE.findall(content_text(last.get("content"))) if name == "tool"]
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") in names:
            arguments = minimal_arguments(function.get("parameters"))
            return str(function["name"]), json.dumps(arguments, separators=JSON_SEPARATORS)
    return None


def minimal_arguments(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return {key: minimal_value(props.get(key)) for key in required if isinstance(key, str)}


def minimal_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return ""
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        return minimal_arguments(schema)
    return {"integer": 0, "number": 0, "boolean": False, "array": [], "null": None}.get(str(kind), "")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def count_words(text: str) -> int:
    return len(text.split())


def make_plan(body: dict[str, Any], magic_text: str, all_text: str) -> Plan:
    plan = Plan()
    magic_tokens: int | None = None
    for name, arg in MAGIC_RE.findall(magic_text):
        try:
            if name == "tokens":
                magic_tokens = max(0, int(float(arg)))
            elif name == "delay":
                plan.delay = max(0.0, float(arg))
            elif name == "silence":
                plan.silence = max(0.0, float(arg))
            elif name == "crash-after":
                plan.crash_after = max(0, int(float(arg)))
            elif name == "error":
                plan.error = True
            elif name == "error-midstream":
                plan.error_midstream = True
            elif name == "malformed-sse":
                plan.malformed_sse = True
            elif name == "html-500":
                plan.html_500 = True
            elif name == "headers-delay":
                plan.headers_delay = max(0.0, float(arg))
        except ValueError:
            continue
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    limit = int(max_tokens) if isinstance(max_tokens, (int, float)) and max_tokens >= 0 else None
    natural: float
    if magic_tokens is not None:
        natural = magic_tokens
    elif limit is not None:
        natural = float("inf")  # the fake model never stops by itself before max_tokens
    else:
        natural = env_int("FAKE_TOKENS", 16) or 0
    if limit is not None and natural > limit:
        plan.tokens, plan.finish_reason = limit, "length"
    else:
        plan.tokens, plan.finish_reason = int(natural), "stop"
    plan.prompt_tokens = max(1, count_words(MAGIC_RE.sub(" ", all_text)))
    return plan


def token_text(i: int) -> str:
    return f"tok{i}" if i == 1 else f" tok{i}"


def embedding_vector(text: str, dim: int) -> list[float]:
    digest = b""
    counter = 0
    while len(digest) < dim * 2:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = [(int.from_bytes(digest[2 * i:2 * i + 2], "big") / 32767.5) - 1.0 for i in range(dim)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in raw]


# --------------------------------------------------------------------------------------------------------------
# response shapes per engine
# --------------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self) -> None:
        self.t_request = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.n = 0

    def token(self) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.n += 1

    def prompt_ms(self) -> float:
        end = self.t_first if self.t_first is not None else time.monotonic()
        return max((end - self.t_request) * 1000.0, 0.001)

    def predicted_ms(self) -> float:
        if self.t_first is None or self.t_last is None:
            return 0.0
        return (self.t_last - self.t_first) * 1000.0


class Shapes:
    """Builds the engine-specific JSON objects for one generation."""

    def __init__(self, engine: Engine, endpoint: str, plan: Plan, include_usage: bool) -> None:
        self.engine = engine
        self.kind = engine.cfg.kind
        self.endpoint = endpoint  # "chat" | "completion"
        self.plan = plan
        self.include_usage = include_usage
        self.created = int(time.time())
        hexid = os.urandom(16).hex()
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        self.id = hexid if self.kind == "sglang" else prefix + hexid
        self.object = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        self.finish_sent = False  # vLLM: a `length` finish rides on the last token's chunk

    # -- figures --------------------------------------------------------------------------------------------------
    def usage(self, timer: Timer) -> dict[str, Any]:
        p, c = self.plan.prompt_tokens, timer.n
        usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if self.kind in ("sglang", "vllm"):
            usage = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c, "prompt_tokens_details": None}
        elif self.kind == "tabbyapi":
            prompt_time = timer.prompt_ms() / 1000.0
            completion_time = timer.predicted_ms() / 1000.0
            usage.update({
                "prompt_time": round(prompt_time, 6),
                "completion_time": round(completion_time, 6),
                "total_time": round(prompt_time + completion_time, 6),
                "prompt_tokens_per_sec": round(p / prompt_time, 3) if prompt_time > 0 else 0.0,
                "completion_tokens_per_sec": round(c / completion_time, 3) if completion_time > 0 else 0.0,
            })
        return usage

    def timings(self, timer: Timer) -> dict[str, Any]:
        prompt_ms, predicted_ms = timer.prompt_ms(), timer.predicted_ms()
        p, n = self.plan.prompt_tokens, timer.n
        return {
            "cache_n": 0,
            "prompt_n": p,
            "prompt_ms": round(prompt_ms, 3),
            "prompt_per_token_ms": round(prompt_ms / p, 3),
            "prompt_per_second": round(p * 1000.0 / prompt_ms, 3),
            "predicted_n": n,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_token_ms": round(predicted_ms / n, 3) if n else 0.0,
            "predicted_per_second": round(n * 1000.0 / predicted_ms, 3) if predicted_ms > 0 else 0.0,
        }

    # -- stream chunks --------------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        model = self.engine.cfg.model_id
        if self.kind == "llamacpp":
            out: dict[str, Any] = {"choices": choices, "created": self.created, "id": self.id, "model": model,
                                   "system_fingerprint": "b0000-fake", "object": self.object}
        elif self.kind == "sglang":
            out = {"id": self.id, "object": self.object, "created": self.created, "model": model,
                   "choices": choices, "usage": None}
        elif self.kind == "vllm":  # pydantic exclude_unset: no `usage` key on ordinary chunks
            out = {"id": self.id, "object": self.object, "created": self.created, "model": model,
                   "choices": choices}
        else:
            out = {"id": self.id, "choices": choices, "created": self.created, "model": model,
                   "object": self.object, "usage": None}
        out.update(extra)
        return out

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.endpoint == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if self.kind == "sglang":
                choice["matched_stop"] = None
            elif self.kind == "vllm":
                choice["stop_reason"] = None
            return choice
        if self.kind == "vllm":
            delta = {"role": "assistant", "content": ""} if role else {"content": text or ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = None
            return choice
        if self.kind == "llamacpp":
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": None}
            elif text is not None:
                delta = {"content": text}
            return {"finish_reason": finish, "index": 0, "delta": delta}
        if self.kind == "sglang":
            delta = {"role": "assistant" if role else None, "content": text, "reasoning_content": None,
                     "tool_calls": None}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "matched_stop": None}
        delta = {"role": "assistant", "content": text or "", "tool_calls": None}
        return {"index": 0, "finish_reason": finish, "delta": delta, "logprobs": None}

    def role_chunk(self) -> dict[str, Any] | None:
        if self.endpoint != "chat" or self.kind == "tabbyapi":
            return None  # TabbyAPI repeats role "assistant" in every delta; legacy completions have no role
        if self.kind == "sglang":
            return self._chunk([self._choice("", None, role=True)])
        return self._chunk([self._choice(None, None, role=True)])

    def token_chunk(self, text: str, last: bool = False) -> dict[str, Any]:
        if last and self.kind == "vllm" and self.plan.finish_reason == "length":
            self.finish_sent = True
            return self._chunk([self._choice(text, "length")])
        return self._chunk([self._choice(text, None)])

    def tool_call_chunks(self, name: str, arguments: str) -> list[dict[str, Any]]:
        """The call's id, type and function name first (empty arguments), then the arguments."""
        call_id = self.tool_call_id()
        head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        if self.kind == "llamacpp":
            tail: dict[str, Any] = {"index": 0, "function": {"arguments": arguments}}
            deltas: list[dict[str, Any]] = [{"tool_calls": [head]}, {"tool_calls": [tail]}]
        elif self.kind == "vllm":  # vLLM's tool parsers: name first (no arguments key), then the arguments
            head = {"id": call_id, "type": "function", "index": 0, "function": {"name": name}}
            tail = {"index": 0, "function": {"arguments": arguments}}
            deltas = [{"tool_calls": [head]}, {"tool_calls": [tail]}]
        elif self.kind == "sglang":
            tail = {"id": None, "index": 0, "type": "function", "function": {"name": None, "arguments": arguments}}
            base = {"role": None, "content": None, "reasoning_content": None}
            deltas = [{**base, "tool_calls": [head]}, {**base, "tool_calls": [tail]}]
        else:
            tail = {"index": 0, "function": {"arguments": arguments}}
            deltas = [{"role": "assistant", "content": None, "tool_calls": [head]},
                      {"role": "assistant", "content": None, "tool_calls": [tail]}]
        out = []
        for delta in deltas:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if self.kind == "sglang":
                choice.update({"logprobs": None, "matched_stop": None})
            elif self.kind in ("tabbyapi", "vllm"):
                choice["logprobs"] = None
            out.append(self._chunk([choice]))
        return out

    def tool_call_id(self) -> str:
        if self.kind == "llamacpp":  # llama-server: 32 random letters and digits
            alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            return "".join(alphabet[b % len(alphabet)] for b in os.urandom(32))
        if self.kind == "vllm":
            return "chatcmpl-tool-" + os.urandom(16).hex()
        return "call_" + os.urandom(12).hex()

    def final_chunks(self, timer: Timer) -> list[dict[str, Any]]:
        finish = self.plan.finish_reason
        if self.kind == "llamacpp":
            out = [self._chunk([self._choice(None, finish)], timings=self.timings(timer))]
            if self.include_usage:
                out.append(self._chunk([], usage=self.usage(timer), timings=self.timings(timer)))
            return out
        if self.kind == "sglang":
            out = [self._chunk([self._choice(None, finish)])]
            if self.include_usage:
                out.append(self._chunk([], usage=self.usage(timer)))
            return out
        if self.kind == "vllm":
            out = [] if self.finish_sent else [self._chunk([self._choice("", finish)])]
            if self.include_usage:  # exclude_none: no prompt_tokens_details
                usage = {k: v for k, v in self.usage(timer).items() if v is not None}
                out.append(self._chunk([], usage=usage))
            return out
        usage = self.usage(timer) if self.include_usage else None
        return [self._chunk([self._choice("", finish)], usage=usage)]

    # -- non-stream responses -------------------------------------------------------------------------------------
    def response(self, text: str, timer: Timer) -> dict[str, Any]:
        model = self.engine.cfg.model_id
        finish = self.plan.finish_reason
        obj = "chat.completion" if self.endpoint == "chat" else "text_completion"
        if self.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.kind == "sglang":
                message.update({"reasoning_content": None, "tool_calls": None})
            elif self.kind == "vllm":
                message.update({"refusal": None, "annotations": None, "audio": None, "function_call": None,
                                "tool_calls": [], "reasoning_content": None})
            elif self.kind == "tabbyapi":
                message["tool_calls"] = None
            if self.plan.tool_call is not None:
                name, arguments = self.plan.tool_call
                message["content"] = None
                message["tool_calls"] = [{"id": self.tool_call_id(), "type": "function",
                                          "function": {"name": name, "arguments": arguments}}]
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.kind == "llamacpp":
            return {"choices": [choice], "created": self.created, "model": model,
                    "system_fingerprint": "b0000-fake", "object": obj, "usage": self.usage(timer),
                    "id": self.id, "timings": self.timings(timer)}
        if self.kind == "sglang":
            choice.update({"logprobs": None, "matched_stop": None})
            return {"id": self.id, "object": obj, "created": self.created, "model": model, "choices": [choice],
                    "usage": self.usage(timer)}
        if self.kind == "vllm":
            choice.update({"logprobs": None, "finish_reason": finish, "stop_reason": None})
            if self.endpoint == "completion":
                choice["prompt_logprobs"] = None
            out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": model,
                                   "choices": [choice], "service_tier": None, "system_fingerprint": None,
                                   "usage": self.usage(timer)}
            if self.endpoint == "chat":
                out["prompt_logprobs"] = None
            out["kv_transfer_params"] = None
            return out
        return {"id": self.id, "choices": [choice], "created": self.created, "model": model, "object": obj,
                "usage": self.usage(timer)}


def error_shape(kind: str, status: int, message: str) -> dict[str, Any]:
    if kind == "llamacpp":
        etype = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 503: "unavailable_error"}.get(status, "server_error")
        return {"error": {"code": status, "message": message, "type": etype}}
    if kind == "sglang":
        etype = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
            status, "InternalServerError")
        return {"object": "error", "message": message, "type": etype, "param": None, "code": status}
    if kind == "vllm":  # current vLLM (ErrorResponse{error: ErrorInfo}): nested; `code` is the HTTP status
        etype = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
            status, "InternalServerError")
        return {"error": {"message": message, "type": etype, "param": None, "code": status}}
    return {"detail": message}


# --------------------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------------------
class ClientGone(Exception):
    pass


class Engine:
    def __init__(self, cfg: Config, log: Log, events: EventLog) -> None:
        self.cfg = cfg
        self.log = log
        self.events = events
        self.ready = threading.Event()
        self.created = int(time.time())
        self.bound_port = cfg.port
        self.embed_dim = env_int("FAKE_EMBED_DIM", 8) or 8
        self.access_log = os.environ.get("FAKE_ACCESS_LOG", "1") != "0"
        # vLLM sleep mode: `awake` is cleared while a sleep is under way, while asleep and while waking (the
        # scheduler is paused: new requests wait); `sleeping_tags` is what /wake_up still has to restore.
        self.awake = threading.Event()
        self.awake.set()
        self.sleep_lock = threading.Lock()  # one /sleep or /wake_up at a time
        self.sleeping_tags: set[str] = set()
        self.sleep_level = 0
        self.sleep_epoch = 0  # bumped by a /sleep in mode abort: running generations end with finish_reason abort
        self.running = 0  # generations in flight (for /sleep?mode=wait)
        self.running_cv = threading.Condition()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def fail_load_and_exit(self, detail: str) -> None:
        cfg, log = self.cfg, self.log
        if cfg.kind == "llamacpp":
            log.error(f"llama_model_load: error loading model: {detail}")
            log.error(f"common_init_from_params: failed to load model '{cfg.model}'")
            log.error(f"srv    load_model: failed to load model, '{cfg.model}'")
            log.error(f"error: failed to load model '{cfg.model}': {detail}")
            log.error("main: exiting due to model loading error")
        elif cfg.kind == "sglang":
            log.error(f"Scheduler hit an exception: RuntimeError: failed to load model '{cfg.model}': {detail}")
            log.error("Received sigquit from a child process. It usually means the child failed.")
        elif cfg.kind == "vllm":
            log.error(f"EngineCore failed to start: RuntimeError: failed to load model '{cfg.model}': {detail}")
            log.error("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}")
        else:
            log.error(f"Could not load model '{cfg.model}': {detail}")
        self.events.emit("exit", code=1, reason=detail)
        os._exit(1)

    def mark_ready(self) -> None:
        cfg, log = self.cfg, self.log
        self.ready.set()
        if cfg.kind == "llamacpp":
            log.info("main: model loaded")
            log.info(f"main: server is listening on http://{cfg.host}:{self.bound_port} - starting the main loop")
            log.info("srv  update_slots: all slots are idle")
        elif cfg.kind == "sglang":
            log.info("The server is fired up and ready to roll!")
        elif cfg.kind == "vllm":
            log.info(f"Starting vLLM API server 0 on http://{cfg.host}:{self.bound_port}")
            log.info(f"Started server process [{os.getpid()}]")
            log.info("Application startup complete.")
        else:
            log.info(f"Model successfully loaded: {cfg.model}")
            log.info(f"Uvicorn running on http://{cfg.host}:{self.bound_port} (Press CTRL+C to quit)")
        self.events.emit("ready", port=self.bound_port)

    def load(self, then_ready: bool = True) -> None:
        """Sleep through the load, then become ready or fail (FAKE_FAIL_LOAD)."""
        if env_flag("FAKE_FAIL_LOAD"):
            time.sleep(env_float("FAKE_FAIL_AFTER", 0.2))
            self.fail_load_and_exit(os.environ.get("FAKE_FAIL_MESSAGE") or "fake load failure (FAKE_FAIL_LOAD=1)")
        time.sleep(env_float("FAKE_LOAD_SECONDS", 0.5))
        if then_ready:
            self.mark_ready()

    # -- request dispatch -----------------------------------------------------------------------------------------
    def handle(self, h: Any, method: str) -> None:
        path = h.path.split("?", 1)[0]
        kind = self.cfg.kind
        if kind == "vllm" and path in VLLM_DEV_PATHS:
            return self.vllm_dev(h, method, path)
        if method == "GET":
            if path in ("/health", "/v1/health", "/health_generate"):
                return self.health(h, path)
            if path in ("/v1/models", "/models", "/v1/model/list"):
                return self.models(h)
            if not self.ready.is_set() and kind == "llamacpp":
                return self.loading_error(h)
            if kind == "tabbyapi" and path == "/v1/model":
                return self.tabby_model(h)
            if kind == "llamacpp" and path == "/props":
                return h.send_json(200, {"model_path": self.cfg.model, "total_slots": 1, "build_info": "fake",
                                         "default_generation_settings": {"n_ctx": self.cfg.ctx}})
            if kind == "sglang" and path == "/get_model_info":
                return h.send_json(200, {"model_path": self.cfg.model, "is_generation": True})
            if kind == "vllm" and path == "/version":
                return h.send_json(200, {"version": VLLM_VERSION})
            return self.not_found(h)
        if method != "POST":
            return self.not_found(h)
        raw = h.read_body()
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return self.not_found(h)
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self.events.emit("request", path=path, stream=False, body=raw.decode("utf-8", "replace"))
            return self.bad_request(h, f"invalid JSON in request body: {exc}", loc="body")
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        self.events.emit("request", path=path, stream=stream, body=body)
        if not self.ready.is_set():
            return self.loading_error(h)
        if not isinstance(body, dict):
            return self.bad_request(h, "request body must be a JSON object", loc="body")
        if kind == "vllm" and body.get("model") and body["model"] != self.cfg.model_id:
            # vLLM serves only its --served-model-name (serving_engine.py `_check_model`): anything else is a 404.
            return h.send_json(404, error_shape(kind, 404, f"The model `{body['model']}` does not exist."))
        hold = abort_now = False
        if kind == "vllm" and not self.awake.is_set():  # asleep, falling asleep or waking: scheduler paused
            policy = os.environ.get("FAKE_ASLEEP_REQUESTS", "wait").strip().lower() or "wait"
            self.events.emit("asleep_request", path=path, policy=policy)
            if policy == "error":
                return h.send_json(503, error_shape(kind, 503, "The engine is sleeping: wake it up first "
                                                    "(POST /wake_up)"))
            if policy == "abort" and path != "/v1/embeddings":
                abort_now = True
            else:
                hold = True
        if path == "/v1/embeddings":
            if hold:
                self.awake.wait()
            return self.embeddings(h, body)
        return self.generate(h, path, body, stream, hold=hold, abort_now=abort_now)

    # -- vLLM's dev-mode endpoints (sleep mode) --------------------------------------------------------------------
    def vllm_dev(self, h: Any, method: str, path: str) -> None:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(h.path).query)
        raw = h.read_body() if method == "POST" else b""
        if not self.cfg.dev_mode:  # the routes exist only with VLLM_SERVER_DEV_MODE=1
            return self.not_found(h)
        if method != ("GET" if path == "/is_sleeping" else "POST"):
            return h.send_json(405, {"detail": "Method Not Allowed"})
        if path == "/is_sleeping":
            return h.send_json(200, {"is_sleeping": bool(self.sleeping_tags)})
        if path == "/collective_rpc":
            try:
                rpc = json.loads(raw or b"{}")
            except ValueError as exc:
                return h.send_json(400, {"detail": f"JSON decode error: {exc}"})
            name = rpc.get("method") if isinstance(rpc, dict) else None
            if name is None:
                return h.send_json(400, {"detail": "Missing 'method' in request body"})
            self.events.emit("collective_rpc", method=name)
            return h.send_json(200, {"results": [None]})
        if not self.cfg.sleep_mode:  # guessed: the engine refuses (vLLM asserts enable_sleep_mode) -> 500
            return h.send_json(500, error_shape("vllm", 500, "Sleep mode is not enabled in the model config "
                                                "(start the server with --enable-sleep-mode)"))
        if path == "/sleep":
            return self.vllm_sleep(h, query)
        return self.vllm_wake(h, query)

    def vllm_sleep(self, h: Any, query: dict[str, list[str]]) -> None:
        try:
            level = int(query.get("level", ["1"])[0])
        except ValueError:
            return h.send_raw(500, b"Internal Server Error", "text/plain; charset=utf-8")
        mode = query.get("mode", ["abort"])[0]
        if mode not in ("abort", "wait", "keep"):
            return h.send_json(400, error_shape("vllm", 400, f"Invalid pause mode: {mode}"))
        with self.sleep_lock:
            if self.sleeping_tags:
                self.log.warning("Executor is already sleeping.")
                return h.send_raw(200, b"", "")
            t0 = time.monotonic()
            self.awake.clear()  # pause the scheduler first: new requests wait (FAKE_ASLEEP_REQUESTS)
            if mode == "abort":
                self.sleep_epoch += 1  # running generations end at their next token with finish_reason abort
            else:  # wait (keep is treated like wait: see README)
                with self.running_cv:
                    self.running_cv.wait_for(lambda: self.running == 0)
            time.sleep(max(0.0, env_float("FAKE_SLEEP_SECONDS", 0.2)))
            self.sleeping_tags = {"weights", "kv_cache"}
            self.sleep_level = level
            seconds = round(time.monotonic() - t0, 6)
            self.log.info(f"It took {seconds:.6f} seconds to fall asleep.")
            self.events.emit("sleep", level=level, mode=mode, seconds=seconds)
        return h.send_raw(200, b"", "")

    def vllm_wake(self, h: Any, query: dict[str, list[str]]) -> None:
        tags = query.get("tags") or None
        self.log.info(f"wake up the engine with tags: {tags}")
        with self.sleep_lock:
            if not self.sleeping_tags:
                self.log.warning("Executor is not sleeping.")
                return h.send_raw(200, b"", "")
            if tags and any(t not in self.sleeping_tags for t in tags):
                self.log.warning(f"Tag {tags} is not in sleeping tags {sorted(self.sleeping_tags)}")
                return h.send_raw(200, b"", "")
            waking = set(tags) if tags else set(self.sleeping_tags)
            level = self.sleep_level
            t0 = time.monotonic()
            if env_flag("FAKE_WAKE_FAIL"):
                time.sleep(0.05)
                reason = "fake wake-up failure (FAKE_WAKE_FAIL=1): CUDA error: out of memory"
                self.log.error(f"Wake up failed: {reason}")
                self.events.emit("wake_failed", level=level, reason=reason)
                return h.send_json(500, error_shape("vllm", 500, reason))
            if "weights" in waking:  # level 2 discarded the weights: they come back from disk (slower)
                knob, default = ("FAKE_WAKE2_SECONDS", 1.0) if level >= 2 else ("FAKE_WAKE_SECONDS", 0.3)
                time.sleep(max(0.0, env_float(knob, default)))
            self.sleeping_tags -= waking
            if not self.sleeping_tags:
                self.sleep_level = 0
                self.awake.set()  # resume the scheduler: held requests run now
            seconds = round(time.monotonic() - t0, 6)
            self.log.info(f"It took {seconds:.6f} seconds to wake up tags {sorted(waking)}.")
            self.events.emit("wake", level=level, tags=sorted(waking), seconds=seconds,
                             is_sleeping=bool(self.sleeping_tags))
        return h.send_raw(200, b"", "")

    @contextlib.contextmanager
    def in_flight(self) -> Any:
        with self.running_cv:
            self.running += 1
        try:
            yield
        finally:
            with self.running_cv:
                self.running -= 1
                self.running_cv.notify_all()

    # -- simple endpoints -----------------------------------------------------------------------------------------
    def health(self, h: Any, path: str) -> None:
        kind, ready = self.cfg.kind, self.ready.is_set()
        status = 200 if ready else 503
        self.events.emit("health", path=path, status=status)
        if kind == "llamacpp":
            if ready:
                return h.send_json(200, {"status": "ok"})
            return self.loading_error(h)
        if kind == "sglang":
            if ready:  # the real /health runs a 1-token generation every call
                self.log.info("Prefill batch. #new-seq: 1, #new-token: 1, #cached-token: 0, token usage: 0.00, "
                              "#running-req: 0, #queue-req: 0")
            return h.send_raw(status, b"", "text/plain; charset=utf-8")
        if kind == "vllm":  # Response(status_code=200): empty body, no content type (also while asleep)
            return h.send_raw(200, b"", "")
        return h.send_json(200, {"status": "healthy", "issues": []})

    def loading_error(self, h: Any) -> None:
        if self.cfg.kind == "llamacpp":
            return h.send_json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        return h.send_json(503, error_shape(self.cfg.kind, 503, "The server is not ready yet (loading model)"))

    def not_found(self, h: Any) -> None:
        if self.cfg.kind == "llamacpp":
            return h.send_json(404, error_shape("llamacpp", 404, "File Not Found"))
        return h.send_json(404, {"detail": "Not Found"})

    def bad_request(self, h: Any, message: str, loc: str) -> None:
        kind = self.cfg.kind
        if kind == "tabbyapi":  # FastAPI request validation
            detail = [{"type": "missing" if loc != "body" else "json_invalid", "loc": ["body", loc] if loc != "body"
                       else ["body"], "msg": message, "input": None}]
            return h.send_json(422, {"detail": detail})
        return h.send_json(400, error_shape(kind, 400, message))

    def models(self, h: Any) -> None:
        cfg, kind = self.cfg, self.cfg.kind
        if kind == "llamacpp":
            meta = None
            if self.ready.is_set():
                meta = {"vocab_type": 2, "n_vocab": 32000, "n_ctx_train": cfg.ctx, "n_ctx": cfg.ctx, "n_embd": 4096,
                        "n_params": 7000000000, "size": 4000000000}
            return h.send_json(200, {
                "models": [{"name": cfg.model_id, "model": cfg.model_id, "modified_at": "", "size": "",
                            "digest": "", "type": "model", "description": "", "tags": [""],
                            "capabilities": ["completion"], "parameters": "",
                            "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                                        "parameter_size": "", "quantization_level": ""}}],
                "object": "list",
                "data": [{"id": cfg.model_id, "object": "model", "created": self.created, "owned_by": "llamacpp",
                          "meta": meta}],
            })
        if kind == "sglang":
            return h.send_json(200, {"object": "list", "data": [
                {"id": cfg.model_id, "object": "model", "created": self.created, "owned_by": "sglang",
                 "root": cfg.model, "parent": None, "max_model_len": cfg.ctx}]})
        if kind == "vllm":
            permission = {"id": "modelperm-" + os.urandom(16).hex(), "object": "model_permission",
                          "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                          "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                          "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}
            return h.send_json(200, {"object": "list", "data": [
                {"id": cfg.model_id, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": cfg.model, "parent": None, "max_model_len": cfg.ctx, "permission": [permission]}]})
        names = [cfg.model_id] if cfg.model_id else []
        model_dir = cfg.tabby_model_dir
        with contextlib.suppress(OSError):
            names = sorted({*names, *(e for e in os.listdir(model_dir) if os.path.isdir(os.path.join(model_dir, e)))})
        return h.send_json(200, {"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "tabbyAPI", "logging": None,
             "parameters": None} for n in names]})

    def tabby_model(self, h: Any) -> None:
        cfg = self.cfg
        if not cfg.model_id:
            return h.send_json(400, {"detail": "No models are currently loaded."})
        return h.send_json(200, {
            "id": cfg.model_id, "object": "model", "created": self.created, "owned_by": "tabbyAPI", "logging": None,
            "parameters": {"max_seq_len": cfg.ctx, "cache_size": cfg.ctx, "cache_mode": "FP16",
                           "prompt_template": "chatml", "use_vision": False, "draft": None}})

    def embeddings(self, h: Any, body: dict[str, Any]) -> None:
        inp = body.get("input")
        if inp is None or inp == "" or inp == []:
            msg = "'input' is required" if self.cfg.kind != "tabbyapi" else "Field required"
            return self.bad_request(h, msg, loc="input")
        items: list[Any] = inp if isinstance(inp, list) and not all(isinstance(x, int) for x in inp) else [inp]
        texts = [x if isinstance(x, str) else json.dumps(x) for x in items]
        if any(MAGIC_RE.search(t) and "[[error]]" in t for t in texts):
            return self.magic_error(h)
        tokens = sum(len(x) if isinstance(x, list) else max(1, count_words(str(x))) for x in items)
        data = [{"object": "embedding", "index": i, "embedding": embedding_vector(t, self.embed_dim)}
                for i, t in enumerate(texts)]
        model = self.cfg.model_id
        if self.cfg.kind == "llamacpp":
            return h.send_json(200, {"model": model, "object": "list", "usage": {"prompt_tokens": tokens,
                                                                                  "total_tokens": tokens},
                                     "data": data})
        usage: dict[str, Any] = {"prompt_tokens": tokens, "total_tokens": tokens}
        if self.cfg.kind == "sglang":
            usage.update({"completion_tokens": 0, "prompt_tokens_details": None})
        if self.cfg.kind == "vllm":
            usage.update({"completion_tokens": 0, "prompt_tokens_details": None})
            return h.send_json(200, {"id": "embd-" + os.urandom(16).hex(), "object": "list",
                                     "created": int(time.time()), "model": model, "data": data, "usage": usage})
        return h.send_json(200, {"object": "list", "data": data, "model": model, "usage": usage})

    def magic_error(self, h: Any) -> None:
        return h.send_json(400, error_shape(self.cfg.kind, 400, "fake error requested with [[error]]"))

    def html_error(self, h: Any) -> None:
        """[[html-500]]: what a crashed handler behind a proxy or a framework's debug page sends: 500, text/html."""
        body = (b"<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n<body><h1>Internal "
                b"Server Error</h1><p>The server encountered an internal error ([[html-500]]).</p></body></html>\n")
        self.events.emit("html_500")
        h.send_response(500)
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, h: Any, path: str, body: dict[str, Any], stream: bool, hold: bool = False,
                 abort_now: bool = False) -> None:
        endpoint = "chat" if path == "/v1/chat/completions" else "completion"
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                msg = {"llamacpp": "'messages' is required", "sglang": "1 validation error: body.messages: Field "
                       "required", "tabbyapi": "Field required", "vllm": "[{'type': 'missing', 'loc': ('body', "
                       "'messages'), 'msg': 'Field required', 'input': None}]"}[self.cfg.kind]
                return self.bad_request(h, msg, loc="messages")
            texts = [content_text(m.get("content")) for m in messages if isinstance(m, dict)]
            users = [content_text(m.get("content")) for m in messages
                     if isinstance(m, dict) and m.get("role") == "user"]
            magic_text, all_text = (users[-1] if users else ""), " ".join(texts)
        else:
            prompt = body.get("prompt")
            if prompt is None or prompt == "" or prompt == []:
                msg = {"llamacpp": "'prompt' is required", "sglang": "1 validation error: body.prompt: Field "
                       "required", "tabbyapi": "Field required", "vllm": "[{'type': 'missing', 'loc': ('body', "
                       "'prompt'), 'msg': 'Field required', 'input': None}]"}[self.cfg.kind]
                return self.bad_request(h, msg, loc="prompt")
            if isinstance(prompt, list):
                magic_text = " ".join(p if isinstance(p, str) else "" for p in prompt)
                all_text = magic_text if magic_text.strip() else " ".join("t" for _ in prompt)
            else:
                magic_text = all_text = str(prompt)
        plan = make_plan(body, magic_text, all_text)
        if plan.error:
            return self.magic_error(h)
        if plan.html_500:
            return self.html_error(h)
        if endpoint == "chat":
            plan.tool_call = wanted_tool_call(body, messages)
            if plan.tool_call is not None:  # two "tokens": the name chunk and the arguments chunk
                plan.tokens, plan.finish_reason = 2, "tool_calls"
                self.events.emit("tool_call", path=path, name=plan.tool_call[0], arguments=plan.tool_call[1])
        if abort_now:  # FAKE_ASLEEP_REQUESTS=abort: answered at once, no tokens, finish_reason abort
            plan.tokens, plan.finish_reason, plan.tool_call, plan.silence = 0, "abort", None, 0.0
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        shapes = Shapes(self, endpoint, plan, include_usage)
        if plan.headers_delay:  # busy before it answers at all: not even the status line and headers yet
            self.events.emit("headers_delay", path=path, seconds=plan.headers_delay)
            time.sleep(plan.headers_delay)
        if stream:
            return self.stream(h, path, shapes, plan, hold)
        if hold:
            self.awake.wait()
        with self.in_flight():
            epoch = self.sleep_epoch
            timer = Timer()
            time.sleep(plan.silence)
            text = []
            for i in range(1, plan.tokens + 1):
                if plan.crash_after is not None and timer.n >= plan.crash_after:
                    self.crash(plan.crash_after)
                if self.sleep_epoch != epoch:  # a /sleep (mode abort) came in
                    plan.finish_reason = "abort"
                    break
                if i > 1 and plan.delay > 0:
                    time.sleep(plan.delay)
                text.append(token_text(i))
                timer.token()
            if plan.crash_after is not None and timer.n >= plan.crash_after:
                self.crash(plan.crash_after)
            return h.send_json(200, shapes.response("".join(text), timer))

    def crash(self, n: int) -> None:
        self.events.emit("crash", after=n)
        self.log.error(f"fake engine: crashing on purpose after {n} tokens ([[crash-after:{n}]])")
        os._exit(3)

    def stream(self, h: Any, path: str, shapes: Shapes, plan: Plan, hold: bool = False) -> None:
        w = SSEWriter(h, self, path)
        try:
            while hold and not self.awake.is_set():  # vLLM: headers at once, then nothing until the wake-up
                w.wait(0.05)
            with self.in_flight():
                self._stream(w, path, shapes, plan)
        except ClientGone:
            return

    def _stream(self, w: SSEWriter, path: str, shapes: Shapes, plan: Plan) -> None:
        timer = Timer()
        epoch = self.sleep_epoch
        w.wait(plan.silence)
        if plan.crash_after == 0:
            self.crash(0)
        role = shapes.role_chunk()
        if role is not None:
            w.event(role)
        tool_chunks = shapes.tool_call_chunks(*plan.tool_call) if plan.tool_call is not None else []
        for i in range(1, plan.tokens + 1):
            if i > 1:
                w.wait(plan.delay)
            if self.sleep_epoch != epoch:  # a /sleep (mode abort) came in: vLLM finishes with `abort`
                plan.finish_reason = "abort"
                break
            w.event(tool_chunks[i - 1] if tool_chunks else shapes.token_chunk(token_text(i), i == plan.tokens))
            timer.token()
            if plan.crash_after is not None and timer.n >= plan.crash_after:
                self.crash(plan.crash_after)
            if plan.error_midstream and timer.n >= min(2, plan.tokens):
                return self.midstream_error(w)
            if plan.malformed_sse and timer.n == min(2, plan.tokens):
                self.malformed_events(w)
        if plan.error_midstream:  # zero tokens requested
            return self.midstream_error(w)
        for chunk in shapes.final_chunks(timer):
            w.event(chunk)
        w.done()
        self.events.emit("stream_completed", path=path, tokens=timer.n)  # before the client can see the end
        w.close()

    def malformed_events(self, w: SSEWriter) -> None:
        """[[malformed-sse]]: after 2 tokens, a data line that is not JSON, a JSON line that is no chunk, a line
        without a field name and an unknown field; then the stream goes on normally."""
        for payload in (b"data: {not json at all", b'data: {"choices": "nope"}', b"garbage without a field name",
                        b"event: surprise\ndata: [not, json]", b"data: \xff\xfe invalid utf-8"):
            w.write(payload + w.sep)
        self.events.emit("malformed_sse", path=w.path)

    def midstream_error(self, w: SSEWriter) -> None:
        message = "fake error in the middle of the stream ([[error-midstream]])"
        if self.cfg.kind == "llamacpp":  # llama-server writes a bare `error:` line and ends the stream
            w.write(b"error: " + dumps({"code": 500, "message": message, "type": "server_error"}) + b"\n\n")
        elif self.cfg.kind in ("sglang", "vllm"):  # vLLM: create_streaming_error_response, then [DONE]
            w.event({"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}})
            w.done()
        else:
            w.event({"error": {"message": message, "trace": None}})
        w.close()
        self.events.emit("stream_error", path=w.path)


class SSEWriter:
    """Writes one SSE response: chunked on HTTP/1.1, close-delimited on HTTP/1.0.  Notices a client that went
    away either on a failed write or, while waiting, by polling its socket for EOF."""

    def __init__(self, h: Any, engine: Engine, path: str) -> None:
        self.h = h
        self.engine = engine
        self.path = path
        self.sock: socket.socket = h.connection
        self.sep = b"\r\n\r\n" if engine.cfg.kind == "tabbyapi" else b"\n\n"  # sse-starlette uses CRLF
        self.chunked = h.request_version == "HTTP/1.1"
        self.pipelined = False
        self.gone = False
        self.ping_interval = engine.cfg.ping_interval
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        if self.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        try:
            h.end_headers()
        except OSError:
            self._gone()
            raise ClientGone() from None
        self.last_write = time.monotonic()

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.h.close_connection = True
            self.engine.events.emit("client_disconnected", path=self.path)
            self.engine.log.info(f"srv  cancel_tasks: client disconnected from {self.path}, cancelling the task")

    def write(self, payload: bytes) -> None:
        if self.chunked:
            payload = b"%x\r\n%s\r\n" % (len(payload), payload)
        try:
            self.sock.sendall(payload)
        except OSError:
            self._gone()
            raise ClientGone() from None
        self.last_write = time.monotonic()

    def event(self, obj: dict[str, Any]) -> None:
        self.write(b"data: " + dumps(obj) + self.sep)

    def done(self) -> None:
        self.write(b"data: [DONE]" + self.sep)

    def ping(self) -> None:
        if self.engine.cfg.kind == "tabbyapi":
            self.write(b": ping - " + time.strftime("%Y-%m-%d %H:%M:%S").encode() + self.sep)
        else:
            self.write(b": ping" + self.sep)

    def close(self) -> None:
        if self.chunked:
            try:
                self.sock.sendall(b"0\r\n\r\n")
            except OSError:
                self._gone()
                raise ClientGone() from None

    def _peer_closed(self, timeout: float) -> bool:
        if self.pipelined:
            time.sleep(timeout)
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(max(0, int(timeout * 1000))):
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if data:
            self.pipelined = True  # the client sent more bytes: cannot watch for EOF any more
            return False
        return True

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, sending keep-alive comments during long silences and noticing disconnects."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return
            until_ping = self.last_write + self.ping_interval - now
            if until_ping <= 0:
                self.ping()
                continue
            if self._peer_closed(min(remaining, until_ping)):
                self._gone()
                raise ClientGone()


# --------------------------------------------------------------------------------------------------------------
# HTTP plumbing (http.server imported lazily, after the port is bound)
# --------------------------------------------------------------------------------------------------------------
def make_server(sock: socket.socket, engine: Engine) -> ThreadingHTTPServer:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    kind = engine.cfg.kind
    keepalive = env_float("FAKE_KEEPALIVE_TIMEOUT", 5.0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llama.cpp" if kind == "llamacpp" else "uvicorn"
        sys_version = ""
        timeout = keepalive  # idle keep-alive connections are closed after this (llama-server: 5 s)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _dispatch(self, method: str) -> None:
            try:
                engine.handle(self, method)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                if not self.close_connection:
                    self.connection.settimeout(keepalive)

        def read_body(self) -> bytes:
            self.connection.settimeout(600)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def send_raw(self, status: int, data: bytes, ctype: str) -> None:
            self.send_response(status)
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_json(self, status: int, obj: Any) -> None:
            self.send_raw(status, dumps(obj), "application/json; charset=utf-8")

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if not engine.access_log or (self.path == "/health" and kind not in ("sglang", "vllm")):
                return
            if kind == "llamacpp":
                engine.log.info(f"srv  log_server_r: request: {self.command} {self.path} "
                                f"{self.client_address[0]} {code}")
            else:
                engine.log.info(f'{self.client_address[0]}:{self.client_address[1]} - "{self.command} '
                                f'{self.path} {self.request_version}" {code}')

        def log_error(self, format: str, *args: Any) -> None:
            pass  # keep-alive timeouts and malformed requests: not worth a journal line

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False
        request_queue_size = 256

    server = Server((engine.cfg.host, engine.bound_port), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()[:2]
    server.server_name = engine.cfg.host
    server.server_port = engine.bound_port
    return server


def bind(host: str, port: int, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(256)
    except OSError:
        sock.close()
        raise
    return sock


def port_in_use(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((target, port)) == 0


def bind_error(engine: Engine, exc: OSError) -> int:
    cfg, log = engine.cfg, engine.log
    if cfg.kind == "llamacpp":
        log.error(f"couldn't bind HTTP server socket, hostname: {cfg.host}, port: {engine.bound_port}")
        log.error("main: exiting due to HTTP server error")
    else:
        log.error(f"[Errno {exc.errno}] error while attempting to bind on address ('{cfg.host}', "
                  f"{engine.bound_port}): address already in use" if exc.errno == 98 else f"bind failed: {exc}")
    engine.events.emit("exit", code=1, reason=f"bind failed: {exc}")
    return 1


def model_missing(engine: Engine) -> int:
    cfg, log = engine.cfg, engine.log
    if cfg.kind == "llamacpp":
        log.error(f"gguf_init_from_file: failed to open GGUF file '{cfg.model}' (No such file or directory)")
        log.error(f"error: failed to load model '{cfg.model}': file not found")
        log.error("main: exiting due to model loading error")
    elif cfg.kind == "sglang":
        log.error(f"OSError: model path '{cfg.model}' does not exist (not a local folder or file)")
    elif cfg.kind == "vllm":
        log.error(f"OSError: {cfg.model} is not a local folder and is not a valid model identifier")
    else:
        log.error(f"FileNotFoundError: model path {cfg.model_path} does not exist. Check model_name?")
    engine.events.emit("exit", code=1, reason=f"model not found: {cfg.model_path}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    kind = ""
    if args and args[0].startswith("--kind"):
        if "=" in args[0]:
            kind, args = args[0].split("=", 1)[1], args[1:]
        elif len(args) > 1:
            kind, args = args[1], args[2:]
    kind = kind or os.environ.get("FAKE_ENGINE_KIND", "")
    if kind not in KINDS:
        sys.stderr.write(f"usage: fake_engine.py --kind {{{'|'.join(KINDS)}}} ENGINE-ARGS...\n")
        return 2
    log = Log(kind)
    events = EventLog(os.environ.get("FAKE_EVENT_LOG"), kind)

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        log.info(f"received {name}, shutting down")
        events.emit("stop", signal=name)
        os._exit(0)

    def ignore_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        log.info(f"received {name}, ignoring it (FAKE_IGNORE_SIGTERM)")
        events.emit("ignored_signal", signal=name)

    signal.signal(signal.SIGTERM, ignore_signal if env_flag("FAKE_IGNORE_SIGTERM") else on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        cfg = build_config(kind, args, log)
    except SystemExit as exc:
        log.error(str(exc.code))
        events.emit("exit", code=1, reason=str(exc.code))
        return 1
    except (OSError, ValueError) as exc:
        log.error(f"invalid configuration: {exc}")
        events.emit("exit", code=1, reason=str(exc))
        return 1
    engine = Engine(cfg, log, events)
    events.emit("start", kind=kind, model=cfg.model, port=cfg.port, pid=os.getpid(), argv=args)
    if kind == "llamacpp":
        log.info("build: 0000 (fake) with python for linux")
        log.info(f"main: HTTP server is listening, hostname: {cfg.host}, port: {cfg.port}, http threads: 4")
        log.info(f"srv    load_model: loading model '{cfg.model}'")
    elif kind == "sglang":
        log.info(f"server_args=ServerArgs(model_path='{cfg.model}', host='{cfg.host}', port={cfg.port})")
    elif kind == "vllm":
        log.info(f"vLLM API server version {VLLM_VERSION}")
        log.info(f"non-default args: {{'model': '{cfg.model}', 'host': '{cfg.host}', 'port': {cfg.port}, "
                 f"'served_model_name': ['{cfg.model_id}'], 'enable_sleep_mode': {cfg.sleep_mode}}}")
        if cfg.dev_mode:
            log.warning("SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!")
    else:
        log.info("Starting TabbyAPI (fake)")
    if env_flag("FAKE_CHECK_MODEL_FILE") and cfg.model_path and not os.path.exists(cfg.model_path):
        return model_missing(engine)

    if kind == "tabbyapi":
        # TabbyAPI checks its port at start-up, loads the model (port still closed), then serves.
        if port_in_use(cfg.host, cfg.port):
            engine.bound_port = cfg.port + 1
            log.warning(f"Port {cfg.port} is currently in use. Switching to {engine.bound_port}.")
            events.emit("port_switched", port=cfg.port, bound_port=engine.bound_port)
        if cfg.model:
            log.info(f"Loading model: {cfg.model_path}")
            if env_flag("FAKE_FAIL_LOAD"):
                time.sleep(env_float("FAKE_FAIL_AFTER", 0.2))
                engine.fail_load_and_exit(os.environ.get("FAKE_FAIL_MESSAGE") or "fake load failure")
            time.sleep(env_float("FAKE_LOAD_SECONDS", 0.5))
        else:
            log.warning("No model name given: starting without a model")
        try:
            sock = bind(cfg.host, engine.bound_port)
        except OSError as exc:
            return bind_error(engine, exc)
        server = make_server(sock, engine)
        engine.mark_ready()
    elif kind == "vllm":
        # vLLM binds its socket before the engine starts (so a busy port fails at once) but listens only once the
        # model is loaded and the app is built: until then connections are refused.
        try:
            sock = bind(cfg.host, cfg.port, listen=False)
        except OSError as exc:
            return bind_error(engine, exc)
        engine.load(then_ready=False)
        sock.listen(256)
        server = make_server(sock, engine)
        engine.mark_ready()
    else:
        # llama-server and SGLang open the port at once and answer 503 while loading.
        try:
            sock = bind(cfg.host, cfg.port)
        except OSError as exc:
            return bind_error(engine, exc)
        server = make_server(sock, engine)
        threading.Thread(target=engine.load, name="loader", daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
