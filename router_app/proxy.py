"""Route one model request: admit it through the switcher, wait for its lease (telling a streaming client what it
waits for), then hand the exchange to `upstream` and the stream's bytes to `relay`.

Framework-free: the HTTP layer hands in a ProxyRequest and sends back the ProxyResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from router_app import annotations as texts
from router_app import errors
from router_app.chunks import ChunkFactory, StatusChannel, append_footer, encode_stream_error
from router_app.relay import StreamRelay
from router_app.requests import ClientRequest, parse_request
from router_app.service import RouterService
from router_app.speed import HEADER_TOKENS_PER_SECOND, Speed, speed_from_response
from router_app.sse import KEEPALIVE_EVENT, encode_json_event
from router_app.switcher import Lease, QueueFull, SwitchFailed, Ticket
from router_app.upstream import EngineFailed, EngineLost, EngineReply, RelayEnd, ShuttingDown, relay_stream
from router_app.waiting import WaitingStatus

log = logging.getLogger("llm_router.proxy")

RequestKind = Literal["chat", "completion", "embedding"]
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
JSON_HEADERS = {"Content-Type": "application/json"}
UPSTREAM_PATHS: dict[RequestKind, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}
# Headers an engine may care about; everything hop-by-hop or about the client's auth with us stays behind.
FORWARDED_HEADERS = ("accept-language", "user-agent", "x-request-id")


@dataclass(frozen=True)
class ProxyRequest:
    path: str
    kind: RequestKind
    raw_body: bytes
    headers: Mapping[str, str]


@dataclass
class ProxyResult:
    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes]
    streaming: bool = False


@dataclass(frozen=True)
class _Refusal:
    """An answer that is an error: sent as the HTTP response before the stream starts, in-band after."""

    status: int
    envelope: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: errors.OpenAIError) -> _Refusal:
        return cls(error.status, error.envelope(), error.headers)

    @classmethod
    def from_engine(cls, status: int, body: bytes) -> _Refusal:
        return cls(status, errors.normalise_engine_error(status, body))

    def result(self) -> ProxyResult:
        return ProxyResult(self.status, {**JSON_HEADERS, **self.headers}, json.dumps(self.envelope).encode())

    def in_band(self) -> bytes:
        return encode_stream_error(self.envelope)


async def handle_model_request(service: RouterService, request: ProxyRequest) -> ProxyResult:
    try:
        parsed = parse_request(request.raw_body, request.kind, request.headers)
    except errors.OpenAIError as error:
        return _Refusal.of(error).result()
    target = service.switcher.resolve(parsed.model)
    if target is None:
        return _Refusal.of(errors.model_not_found(parsed.model)).result()
    received_at = time.monotonic()
    body = parsed.upstream_body(target)
    try:
        admission = service.switcher.request(target)
    except QueueFull as exc:
        service.metrics.answer(target, "rejected", None, None)
        return _queue_full(exc).result()
    answer = _Answer(service, _Plan.make(service, request, parsed, received_at, target), body, admission)
    if parsed.stream:
        return await answer.stream()
    return await answer.complete()


@dataclass(frozen=True)
class _Plan:
    """Per-request decisions, taken once."""

    kind: RequestKind
    model_id: str
    """The id the client sent (a model id or an alias): answers carry it."""
    target_id: str
    """The configured model it stands for: what the switcher loads."""
    model_name: str
    status_channel: StatusChannel | None
    footer: bool
    client_wants_usage: bool
    keepalive_interval: float
    progress_interval: float
    stall_timeout: float
    received_at: float
    """When the router got the request (monotonic clock): the start of the answer's `approximate_total`."""
    forward_headers: dict[str, str]

    @classmethod
    def make(
        cls, service: RouterService, request: ProxyRequest, parsed: ClientRequest, received_at: float, target: str
    ) -> _Plan:
        config = service.config
        channel: StatusChannel | None = None
        if parsed.annotate and config.status_channel in ("reasoning", "content"):
            channel = "reasoning" if config.status_channel == "reasoning" else "content"
        lowered = {k.lower(): v for k, v in request.headers.items()}
        return cls(
            kind=request.kind,
            model_id=parsed.model,
            target_id=target,
            model_name=config.models[target].name,
            status_channel=channel,
            footer=parsed.footer_allowed and config.speed_footer,
            client_wants_usage=parsed.wants_usage,
            keepalive_interval=config.keepalive_interval,
            progress_interval=config.progress_interval,
            stall_timeout=config.stall_timeout,
            received_at=received_at,
            forward_headers={
                "content-type": "application/json",
                **{k: lowered[k] for k in FORWARDED_HEADERS if k in lowered},
            },
        )


class _Answer:
    """One request from admission to its last byte. Holds what must be given back however it ends: the lease
    (or the ticket still waiting for one) and the engine's reply."""

    def __init__(self, service: RouterService, plan: _Plan, body: bytes, admission: Lease | Ticket) -> None:
        self.service = service
        self.plan = plan
        self.body = body
        self.lease: Lease | None = admission if isinstance(admission, Lease) else None
        self.ticket: Ticket | None = admission if isinstance(admission, Ticket) else None
        self.reply: EngineReply | None = None
        self.readmitted = False
        """Loaded once more after its engine vanished: a second loss is an error, not another reload."""
        self._recorded = False
        self.factory = ChunkFactory(plan.model_id, "chat" if plan.kind == "chat" else "completion")

    # ----- bookkeeping ---------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Give back everything held; idempotent (the response body calls it however the response ends)."""
        reply, self.reply = self.reply, None
        if reply is not None:
            self.service.streams.discard(reply)
            reply.close()
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.service.switcher.cancel(ticket)

    def record(self, outcome: str, first_token: float | None = None, speed: Speed | None = None) -> None:
        """The request's outcome for the metrics, once."""
        if not self._recorded:
            self._recorded = True
            self.service.metrics.answer(self.plan.target_id, outcome, first_token, speed)

    # ----- the engine exchange, one rule for every path --------------------------------------------------------------

    async def _open(self) -> EngineReply | _Refusal | None:
        """Send the request on the lease held. None: the engine had vanished and its reload is admitted
        (`self.ticket`); wait for it like for any switch."""
        assert self.lease is not None
        plan, switcher = self.plan, self.service.switcher
        url = self.lease.backend.url + UPSTREAM_PATHS[plan.kind]
        try:
            reply = await self.service.upstream.open(url, self.body, plan.forward_headers)
        except EngineLost as exc:
            self.finish()
            if not self.readmitted and await switcher.engine_lost(plan.target_id):
                return self._readmit()
            return _Refusal.of(_unreachable(plan, exc))
        except EngineFailed as exc:
            self.finish()
            switcher.report_engine_failure(plan.target_id)
            return _Refusal.of(_unreachable(plan, exc))
        except BaseException:
            self.finish()
            raise
        if reply.status < 400:
            return reply
        try:
            error_body = await reply.body()
        except EngineFailed:
            error_body = b""
        finally:
            reply.close()
            self.finish()
        return _Refusal.from_engine(reply.status, error_body)

    def _readmit(self) -> _Refusal | None:
        plan = self.plan
        log.warning("engine of %s refused the connection and its unit is gone: loading it again", plan.model_id)
        self.readmitted = True
        try:
            admission = self.service.switcher.request(plan.target_id)
        except QueueFull as exc:
            return _queue_full(exc)
        if isinstance(admission, Lease):
            admission.release()
            return _Refusal.of(errors.bad_gateway(f"engine for {plan.model_id!r} refused the connection"))
        self.ticket = admission
        return None

    def _take_lease(self) -> SwitchFailed | None:
        """The ticket is decided: hold its lease, or return why the load failed."""
        ticket, self.ticket = self.ticket, None
        assert ticket is not None
        try:
            self.lease = ticket.future.result()
        except SwitchFailed as failure:
            return failure
        return None

    # ----- non-streaming -------------------------------------------------------------------------------------------

    async def complete(self) -> ProxyResult:
        try:
            result = await self._complete()
        except asyncio.CancelledError:
            self.record("cancelled")
            raise
        finally:
            self.finish()
        if result.status >= 400:
            self.record("error")
        return result

    async def _complete(self) -> ProxyResult:
        while True:
            if self.ticket is not None:
                with contextlib.suppress(SwitchFailed):  # _take_lease turns it into the answer
                    await asyncio.shield(self.ticket.future)
                failure = self._take_lease()
                if failure is not None:
                    return _load_failed(failure).result()
            started = time.monotonic()
            opened = await self._open()
            if opened is None:
                continue
            if isinstance(opened, _Refusal):
                return opened.result()
            self.reply = opened
            try:
                raw = await opened.body()
            except EngineFailed as exc:
                self.service.switcher.report_engine_failure(self.plan.target_id)
                return _Refusal.of(_unreachable(self.plan, exc)).result()
            return self._completed(opened.status, raw, started)

    def _completed(self, status: int, raw: bytes, started: float) -> ProxyResult:
        plan = self.plan
        wall = time.monotonic() - started
        total = time.monotonic() - plan.received_at
        try:
            data = json.loads(raw)
        except ValueError:
            not_json = errors.bad_gateway(f"engine for {plan.model_id!r} sent a body that is not JSON")
            return _Refusal.of(not_json).result()
        headers = dict(JSON_HEADERS)
        speed = None
        if isinstance(data, dict) and "model" in data:
            data["model"] = plan.model_id  # the id the client asked for, not the engine's path or alias
        if plan.kind != "embedding" and isinstance(data, dict):
            speed = speed_from_response(data, wall)
            if speed is not None:
                headers.update(speed.headers())
                usage = data.get("usage")
                if isinstance(usage, dict):
                    data["usage"] = {**usage, **speed.usage_extras(total)}
                if plan.footer and self.service.config.footer_non_streaming:
                    data = append_footer(data, speed.footer())
        self.record("ok", total, speed)
        log.info(
            "%s request for %s: HTTP %d in %.2f s%s",
            plan.kind,
            plan.model_id,
            status,
            wall,
            f", {headers.get(HEADER_TOKENS_PER_SECOND)} tok/s" if HEADER_TOKENS_PER_SECOND in headers else "",
        )
        return ProxyResult(status, headers, json.dumps(data, ensure_ascii=False).encode())

    # ----- streaming -----------------------------------------------------------------------------------------------

    async def stream(self) -> ProxyResult:
        if self.lease is not None:
            # Loaded: open the engine before answering, so its refusals keep their HTTP status.
            sent_at = time.monotonic()
            try:
                opened = await self._open()
            except asyncio.CancelledError:  # the client left before the engine's answer began
                self.record("cancelled")
                raise
            if isinstance(opened, _Refusal):
                self.record("error")
                return opened.result()
            if opened is not None:
                self.reply = opened
                return self._streaming(self._relay(opened, sent_at))
        return self._streaming(self._wait_then_relay())

    def _streaming(self, body: AsyncGenerator[bytes, None]) -> ProxyResult:
        return ProxyResult(200, dict(SSE_HEADERS), ManagedStream(body, self.finish), streaming=True)

    def _status(self, text: str) -> bytes:
        assert self.plan.status_channel is not None
        return encode_json_event(self.factory.status(text, self.plan.status_channel))

    async def _wait_then_relay(self) -> AsyncGenerator[bytes, None]:
        """Headers are out: tell the client what it waits for, then relay the engine's answer."""
        plan = self.plan
        channel = plan.status_channel
        waited_from = time.monotonic()
        names = {m.id: m.name for m in self.service.config.models.values()}
        lines = WaitingStatus(plan.model_name, names, plan.progress_interval, waited_from)
        try:
            if channel is not None:
                role = self.factory.role()
                opening = encode_json_event(role) if role is not None else b""
                yield opening + self._status(texts.switching_line(plan.model_name))
            else:
                yield KEEPALIVE_EVENT
            while True:
                async for piece in self._until_decided(lines):
                    yield piece
                failure = self._take_lease()
                if failure is not None:
                    self.record("error")
                    failed = self._status(texts.failed_line(plan.model_name, failure.reason)) if channel else b""
                    yield failed + _load_failed(failure).in_band()
                    return
                sent_at = time.monotonic()
                opened = await self._open()
                if opened is None:
                    continue  # the engine vanished before answering and is loading again: keep waiting
                ready = texts.ready_line(plan.model_name, time.monotonic() - waited_from)
                ready_event = self._status(ready) if channel is not None else b""
                if isinstance(opened, _Refusal):
                    self.record("error")
                    yield ready_event + opened.in_band()
                    return
                self.reply = opened
                if ready_event:
                    yield ready_event
                break
        except (asyncio.CancelledError, GeneratorExit):
            self.record("cancelled")
            raise
        async for piece in self._relay(opened, sent_at):
            yield piece

    async def _until_decided(self, lines: WaitingStatus) -> AsyncGenerator[bytes, None]:
        """Status lines (or keep-alive comments) until the ticket is decided."""
        ticket = self.ticket
        assert ticket is not None
        plan = self.plan
        switcher = self.service.switcher
        interval = min(plan.progress_interval, plan.keepalive_interval)
        last_sent = time.monotonic()
        while not ticket.future.done():
            ticket.changed.clear()
            changed: asyncio.Future[Any] = asyncio.ensure_future(ticket.changed.wait())
            try:
                await asyncio.wait({changed, ticket.future}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if ticket.future.done():
                return
            line = lines.line(switcher.wait_info(ticket))
            now = time.monotonic()
            if plan.status_channel is not None and line is not None:
                yield self._status(line)
                last_sent = now
            elif now - last_sent >= plan.keepalive_interval:
                yield KEEPALIVE_EVENT
                last_sent = now

    async def _relay(self, reply: EngineReply, sent_at: float) -> AsyncGenerator[bytes, None]:
        plan = self.plan
        relay = StreamRelay(
            self.factory,
            footer=plan.footer,
            client_wants_usage=plan.client_wants_usage,
            sent_at=sent_at,
            received_at=plan.received_at,
        )
        end = RelayEnd()
        self.service.streams.add(reply)
        if self.service.ending.is_set():
            reply.abort(ShuttingDown())
        relaying = relay_stream(
            reply, relay, end, tick=min(plan.keepalive_interval, plan.stall_timeout), stall_timeout=plan.stall_timeout
        )
        try:
            async for piece in relaying:
                yield piece
        finally:
            await relaying.aclose()
            self.finish()  # the lease goes back as soon as the engine's part is over
            failed = relay.saw_error or end.failure is not None
            outcome = "error" if failed else "ok" if relay.saw_finish else "cancelled"
            first_text_at = relay.meter.first_text_at
            first_token = None if first_text_at is None else first_text_at - plan.received_at
            speed = relay.meter.result()
            self.record(outcome, first_token, speed)
            _log_stream(plan, relay, failed, speed)
        if end.failure is None:
            return
        log.warning("model %s: %s", plan.model_id, end.failure)
        message = f"model {plan.model_id!r}: {end.failure}"
        if end.shutting_down:
            yield _Refusal.of(errors.service_unavailable(message, code="shutting_down")).in_band()
            return
        self.service.switcher.report_engine_failure(plan.target_id)
        yield relay.flush_held() + _Refusal.of(errors.bad_gateway(message, code="engine_failed")).in_band()


class ManagedStream:
    """The response body: delegates to a generator and runs `cleanup` however the response ends.

    Quart closes the body with `aclose()`; a generator that never started would skip its own `finally` there, and a
    lease that is never released would block every later switch. `cleanup` must be idempotent.
    """

    def __init__(self, inner: AsyncGenerator[bytes, None], cleanup: Callable[[], None]) -> None:
        self._inner = inner
        self._cleanup: Callable[[], None] | None = cleanup

    def __aiter__(self) -> ManagedStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._run_cleanup()

    def _run_cleanup(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def __del__(self) -> None:
        self._run_cleanup()


def _log_stream(plan: _Plan, relay: StreamRelay, failed: bool, speed: Speed | None) -> None:
    outcome = "error" if failed else "complete" if relay.saw_finish else "cut short"
    figures = f", {speed.tokens} tokens at {speed.tokens_per_second:.1f} tok/s" if speed else ""
    log.info("%s stream for %s: %s%s", plan.kind, plan.model_id, outcome, figures)
    if relay.dropped:
        log.warning("engine for %s sent %d malformed SSE event(s): dropped", plan.model_id, relay.dropped)


def _queue_full(exc: QueueFull) -> _Refusal:
    return _Refusal.of(errors.rate_limited(f"too many requests waiting for a model switch: {exc}", 5))


def _unreachable(plan: _Plan, exc: BaseException) -> errors.OpenAIError:
    return errors.bad_gateway(f"engine for {plan.model_id!r} did not answer: {exc}")


def _load_failed(failure: SwitchFailed) -> _Refusal:
    return _Refusal.of(errors.service_unavailable(failure.describe(), code="model_load_failed"))
