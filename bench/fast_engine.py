#!/usr/bin/env python3
"""A minimal, fast fake llama-server for bench/proxy_bench.py (asyncio streams, stdlib only).

    python3 bench/fast_engine.py -m MODEL --host 127.0.0.1 --port PORT [--alias ID] [other llama-server flags]

Why not files/fake_engines (the project's fake): that one serves each connection from a thread and writes every
event with its own `sendall` plus a socket poll; at 64 unthrottled streams the GIL makes it the slowest part of the
"direct" path, so a proxy benchmark against it mostly measures the fake (see docs/benchmarks.md, issue 10). This one
answers only what a proxy benchmark needs, in llama-server's shapes (files/fake_engines/README.md):

- `GET /health`: 503 `Loading model` for FAKE_LOAD_SECONDS (0.5) after start, then 200 `{"status":"ok"}`;
  `GET /v1/models` (also while loading); anything else while loading: 503.
- `POST /v1/chat/completions`, streaming or not: `max_tokens` tokens (else FAKE_TOKENS, 64), `tok1`, ` tok2`, ...
  FAKE_TOKEN_DELAY (0) s apart; one `write()` per SSE event (chunked), as llama-server sends one event per token.
  Stream: role chunk, token chunks, the finish chunk (`timings` on it unless `stream_options.include_usage`, then
  a `choices: []` chunk with `usage` + `timings`), `data: [DONE]`.
- HTTP/1.1 keep-alive (idle connections closed after 5 s, like llama-server); SIGTERM/SIGINT exit 0 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

KEEPALIVE = 5.0
LOADING = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Engine:
    def __init__(self, model: str) -> None:
        self.model = model
        self.ready_at = time.monotonic() + env_float("FAKE_LOAD_SECONDS", 0.5)
        self.tokens = int(env_float("FAKE_TOKENS", 64))
        self.delay = env_float("FAKE_TOKEN_DELAY", 0.0)
        self.counter = 0
        self.models = json.dumps(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llamacpp"}]},
            separators=(",", ":"),
        ).encode()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                keep = headers.get("connection", "").lower() != "close"
                await self.handle(method, path.split("?", 1)[0], body, writer, keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def respond(self, writer: asyncio.StreamWriter, status: str, body: bytes, keep: bool) -> None:
        writer.write(
            b"HTTP/1.1 %s\r\nServer: llama.cpp\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n%s"
            % (status.encode(), len(body), b"" if keep else b"Connection: close\r\n", body)
        )

    async def handle(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter, keep: bool) -> None:
        loading = time.monotonic() < self.ready_at
        if path == "/v1/models":
            return self.respond(writer, "200 OK", self.models, keep)
        if loading:
            return self.respond(writer, "503 Service Unavailable", LOADING, keep)
        if path == "/health":
            return self.respond(writer, "200 OK", b'{"status":"ok"}', keep)
        if method != "POST" or path != "/v1/chat/completions":
            return self.respond(writer, "404 Not Found", b'{"error":{"code":404,"message":"File Not Found"}}', keep)
        try:
            request: dict[str, Any] = json.loads(body)
        except ValueError:
            return self.respond(writer, "400 Bad Request", b'{"error":{"code":400,"message":"bad json"}}', keep)
        n = int(request.get("max_tokens") or self.tokens)
        self.counter += 1
        cid = f"chatcmpl-fast{self.counter:08d}"
        head = {
            "created": int(time.time()),
            "id": cid,
            "model": self.model,
            "system_fingerprint": "b0-fast",
            "object": "chat.completion.chunk",
        }
        started = time.perf_counter()
        if not request.get("stream"):
            if self.delay:
                await asyncio.sleep(self.delay * max(0, n - 1))
            text = "".join(token(i) for i in range(1, n + 1))
            answer = {
                **head,
                "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}],
                "usage": usage(n),
                "timings": timings(n, started),
            }
            return self.respond(writer, "200 OK", dumps(answer), keep)
        writer.write(
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n%s\r\n" % (b"" if keep else b"Connection: close\r\n")
        )
        tail = dumps(head)[1:]  # `"created":...}` after the choices
        send(
            writer,
            {"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}], **head},
        )
        prefix = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
        for i in range(1, n + 1):
            if i > 1:
                await asyncio.sleep(self.delay)  # 0: still yields, so concurrent streams interleave
            send_raw(writer, prefix + token(i).encode() + b'"}}],' + tail)
            await writer.drain()
        finish = {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}], **head}
        opts = request.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            send(writer, finish)
            send(writer, {"choices": [], **head, "usage": usage(n), "timings": timings(n, started)})
        else:
            send(writer, {**finish, "timings": timings(n, started)})
        send_raw(writer, b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def token(i: int) -> str:
    return f"tok{i}" if i == 1 else f" tok{i}"


def usage(n: int) -> dict[str, int]:
    return {"completion_tokens": n, "prompt_tokens": 1, "total_tokens": n + 1}


def timings(n: int, started: float) -> dict[str, float]:
    ms = max((time.perf_counter() - started) * 1000, 0.001)
    return {
        "prompt_n": 1,
        "prompt_ms": 0.1,
        "predicted_n": n,
        "predicted_ms": ms,
        "predicted_per_second": max(n - 1, 1) * 1000 / ms,
    }


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def send_raw(writer: asyncio.StreamWriter, payload: bytes) -> None:
    event = b"data: " + payload + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(event), event))


def send(writer: asyncio.StreamWriter, obj: Any) -> None:
    send_raw(writer, dumps(obj))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="model")
    parser.add_argument("--alias")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args, _ = parser.parse_known_args()
    engine = Engine(args.alias or args.model)
    server = await asyncio.start_server(engine.serve, args.host, args.port, backlog=512)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"fast fake llama-server: {engine.model} on {args.host}:{args.port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()
    os._exit(0)  # open streams are cut, as llama-server's SIGTERM does


if __name__ == "__main__":
    asyncio.run(main())
