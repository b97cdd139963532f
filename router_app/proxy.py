"""Route one model request: admit it through the switcher, wait (with status chunks) if a switch is needed,
then proxy the engine's answer (byte-for-byte where possible) with speed accounting and the footer.

Framework-free: the HTTP layer hands in a ProxyRequest and sends back the ProxyResult.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from router_app import annotations as texts
from router_app import errors
from router_app.chunks import ChunkFactory, StatusChannel, append_footer
from router_app.relay import StreamRelay
from router_app.requests import ClientRequest, parse_request
from router_app.service import RouterService
from router_app.speed import HEADER_TOKENS_PER_SECOND, speed_from_response
from router_app.sse import DONE_EVENT, KEEPALIVE_EVENT, SSEDecoder, encode_json_event
from router_app.streams import UpstreamHead, open_upstream, ticks
from router_app.switcher import Lease, Phase, QueueFull, SwitchFailed, Ticket, WaitInfo

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


def _error_result(error: errors.OpenAIError) -> ProxyResult:
    return ProxyResult(error.status, {**JSON_HEADERS, **error.headers}, error.body())


def _engine_error_result(status: int, body: bytes) -> ProxyResult:
    return ProxyResult(status, dict(JSON_HEADERS), json.dumps(errors.normalise_engine_error(status, body)).encode())


async def handle_model_request(service: RouterService, request: ProxyRequest) -> ProxyResult:
    try:
        parsed = parse_request(request.raw_body, request.kind, request.headers)
    except errors.OpenAIError as error:
        return _error_result(error)
    target = service.switcher.resolve(parsed.model)
    if target is None:
        return _error_result(errors.model_not_found(parsed.model))
    received_at = time.monotonic()
    body = parsed.upstream_body()
    try:
        admission = service.switcher.request(target)
    except QueueFull as exc:
        service.metrics.answer(target, "rejected", None, None)
        return _queue_full(exc)
    plan = _Plan.make(service, request, parsed, received_at, target)
    if parsed.stream:
        return await _stream(service, plan, body, admission)
    return await _complete(service, plan, body, admission)


@dataclass
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
    forward_headers: dict[str, str] = field(default_factory=dict)
    readmitted: bool = False
    """Already loaded once more after its engine vanished: a second loss is an error, not another reload."""

    @classmethod
    def make(
        cls, service: RouterService, request: ProxyRequest, parsed: ClientRequest, received_at: float, target: str
    ) -> _Plan:
        config = service.config
        model = config.models[target]
        annotate = parsed.annotate
        channel: StatusChannel | None = None
        if annotate and config.status_channel in ("reasoning", "content"):
            channel = "reasoning" if config.status_channel == "reasoning" else "content"
        lowered = {k.lower(): v for k, v in request.headers.items()}
        return cls(
            kind=request.kind,
            model_id=parsed.model,
            target_id=target,
            model_name=model.name,
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


# ----- non-streaming ---------------------------------------------------------------------------------------------


async def _wait_for_lease(service: RouterService, admission: Lease | Ticket) -> Lease:
    if isinstance(admission, Lease):
        return admission
    try:
        return await asyncio.shield(admission.future)
    except asyncio.CancelledError:
        service.switcher.cancel(admission)
        raise


async def _complete(service: RouterService, plan: _Plan, body: bytes, admission: Lease | Ticket) -> ProxyResult:
    try:
        result = await _complete_once(service, plan, body, admission)
    except asyncio.CancelledError:
        service.metrics.answer(plan.target_id, "cancelled", None, None)
        raise
    if result.status >= 400:
        service.metrics.answer(plan.target_id, "error", None, None)
    return result


async def _complete_once(service: RouterService, plan: _Plan, body: bytes, admission: Lease | Ticket) -> ProxyResult:
    try:
        lease = await _wait_for_lease(service, admission)
    except SwitchFailed as failure:
        return _error_result(errors.service_unavailable(failure.describe(), code="model_load_failed"))
    try:
        url = lease.backend.url + UPSTREAM_PATHS[plan.kind]
        started = time.monotonic()
        try:
            response = await _post_once_more_if_dropped(service.client, url, body, plan.forward_headers)
        except httpx.ConnectError as exc:
            lease.release()
            if not plan.readmitted and await service.switcher.engine_lost(plan.target_id):
                return await _readmit(service, plan, body, _complete_once)
            return _error_result(_unreachable(plan, exc))
        except httpx.HTTPError as exc:
            service.switcher.report_engine_failure(plan.target_id)
            return _error_result(_unreachable(plan, exc))
        wall = time.monotonic() - started
        total = time.monotonic() - plan.received_at
        if response.status_code >= 400:
            return _engine_error_result(response.status_code, response.content)
        try:
            data = response.json()
        except ValueError:
            return _error_result(errors.bad_gateway(f"engine for {plan.model_id!r} sent a body that is not JSON"))
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
                if plan.footer and service.config.footer_non_streaming:
                    data = append_footer(data, speed.footer())
        service.metrics.answer(plan.target_id, "ok", total, speed)
        log.info(
            "%s request for %s: HTTP %d in %.2f s%s",
            plan.kind,
            plan.model_id,
            response.status_code,
            wall,
            f", {headers.get(HEADER_TOKENS_PER_SECOND)} tok/s" if HEADER_TOKENS_PER_SECOND in headers else "",
        )
        return ProxyResult(response.status_code, headers, json.dumps(data, ensure_ascii=False).encode())
    finally:
        lease.release()


async def _post_once_more_if_dropped(
    client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str]
) -> httpx.Response:
    # llama-server may close a kept-alive connection just as a request goes out on it ("Server disconnected without
    # sending a response"): nothing was answered, so sending it again is safe. Once.
    try:
        return await client.post(url, content=body, headers=headers)
    except httpx.RemoteProtocolError:
        return await client.post(url, content=body, headers=headers)


async def _readmit(
    service: RouterService,
    plan: _Plan,
    body: bytes,
    handler: Callable[[RouterService, _Plan, bytes, Lease | Ticket], Awaitable[ProxyResult]],
) -> ProxyResult:
    """The loaded engine vanished (stopped outside the router) before answering: load it again like any switch."""
    log.warning("engine of %s refused the connection and its unit is gone: loading it again", plan.model_id)
    plan.readmitted = True
    try:
        admission = service.switcher.request(plan.target_id)
    except QueueFull as exc:
        return _queue_full(exc)
    if isinstance(admission, Lease):
        admission.release()
        return _error_result(errors.bad_gateway(f"engine for {plan.model_id!r} refused the connection"))
    return await handler(service, plan, body, admission)


async def _read_error_body(upstream: AsyncGenerator[UpstreamHead | bytes, None]) -> bytes:
    """The rest of an engine's error response; the upstream is closed either way."""
    try:
        return b"".join([part async for part in upstream if isinstance(part, bytes)])
    finally:
        await upstream.aclose()


def _queue_full(exc: QueueFull) -> ProxyResult:
    return _error_result(errors.rate_limited(f"too many requests waiting for a model switch: {exc}", 5))


def _unreachable(plan: _Plan, exc: BaseException) -> errors.OpenAIError:
    return errors.bad_gateway(f"engine for {plan.model_id!r} did not answer: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----- streaming -------------------------------------------------------------------------------------------------


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


async def _stream(service: RouterService, plan: _Plan, body: bytes, admission: Lease | Ticket) -> ProxyResult:
    result = await _stream_once(service, plan, body, admission)
    if result.status >= 400:
        service.metrics.answer(plan.target_id, "error", None, None)
    return result


async def _stream_once(service: RouterService, plan: _Plan, body: bytes, admission: Lease | Ticket) -> ProxyResult:
    factory = ChunkFactory(plan.model_id, "chat" if plan.kind == "chat" else "completion")
    holder: dict[str, Lease] = {}

    def cleanup() -> None:
        lease = holder.get("lease")
        if lease is not None:
            lease.release()
        elif isinstance(admission, Ticket):
            service.switcher.cancel(admission)

    if isinstance(admission, Lease):
        holder["lease"] = admission
        sent_at = time.monotonic()
        upstream = open_upstream(
            service.client, admission.backend.url + UPSTREAM_PATHS[plan.kind], body, plan.forward_headers
        )
        try:
            head = await anext(upstream)
        except httpx.ConnectError as exc:
            cleanup()
            if not plan.readmitted and await service.switcher.engine_lost(plan.target_id):
                return await _readmit(service, plan, body, _stream_once)
            return _error_result(_unreachable(plan, exc))
        except httpx.HTTPError as exc:
            cleanup()
            service.switcher.report_engine_failure(plan.target_id)
            return _error_result(_unreachable(plan, exc))
        except BaseException:
            cleanup()
            raise
        assert isinstance(head, UpstreamHead)
        if head.status >= 400:
            try:
                error_body = await _read_error_body(upstream)
            finally:
                cleanup()
            return _engine_error_result(head.status, error_body)
        relay = _relay(service, plan, factory, upstream, sent_at)
        return ProxyResult(200, dict(SSE_HEADERS), ManagedStream(relay, cleanup), streaming=True)

    generator = _switch_then_relay(service, plan, factory, body, admission, holder)
    return ProxyResult(200, dict(SSE_HEADERS), ManagedStream(generator, cleanup), streaming=True)


def _status_line(plan: _Plan, info: WaitInfo, names: Mapping[str, str]) -> str:
    if info.phase is Phase.DRAINING and info.active is not None:
        return texts.waiting_line(info.in_flight, names.get(info.active, info.active))
    if info.phase is Phase.QUEUED:
        busy = info.active or "another model"
        return texts.waiting_line(max(info.in_flight, 1), names.get(busy, busy))
    elapsed = info.now - info.load_started if info.load_started is not None else 0.0
    if info.phase is Phase.WAKING:
        return texts.waking_line(plan.model_name, elapsed, info.timeout, info.estimate)
    return texts.loading_line(plan.model_name, elapsed, info.timeout, info.estimate)


async def _switch_then_relay(
    service: RouterService,
    plan: _Plan,
    factory: ChunkFactory,
    body: bytes,
    ticket: Ticket,
    holder: dict[str, Lease],
) -> AsyncGenerator[bytes, None]:
    """Headers are out: tell the client what happens while it waits, then relay the engine's answer."""
    channel = plan.status_channel
    waited_from = time.monotonic()

    def status(text: str) -> bytes:
        assert channel is not None
        return encode_json_event(factory.status(text, channel))

    waiting = _wait_for_switch(service, plan, factory, ticket, status)
    try:
        async for piece in waiting:
            yield piece
    except (asyncio.CancelledError, GeneratorExit):
        service.metrics.answer(plan.target_id, "cancelled", None, None)
        raise
    finally:
        await waiting.aclose()
    try:
        lease = ticket.future.result()
    except SwitchFailed as failure:
        service.metrics.answer(plan.target_id, "error", None, None)
        ending = status(texts.failed_line(plan.model_name, failure.reason)) if channel is not None else b""
        yield ending + _stream_error(errors.service_unavailable(failure.describe(), code="model_load_failed"))
        return
    holder["lease"] = lease
    if channel is not None:
        yield status(texts.ready_line(plan.model_name, time.monotonic() - waited_from))
    sent_at = time.monotonic()
    upstream = open_upstream(service.client, lease.backend.url + UPSTREAM_PATHS[plan.kind], body, plan.forward_headers)
    try:
        head = await anext(upstream)
    except httpx.HTTPError as exc:
        service.metrics.answer(plan.target_id, "error", None, None)
        service.switcher.report_engine_failure(plan.target_id)
        yield _stream_error(_unreachable(plan, exc))
        return
    assert isinstance(head, UpstreamHead)
    if head.status >= 400:
        service.metrics.answer(plan.target_id, "error", None, None)
        error_body = await _read_error_body(upstream)
        yield encode_json_event(errors.normalise_engine_error(head.status, error_body)) + DONE_EVENT
        return
    async for piece in _relay(service, plan, factory, upstream, sent_at):
        yield piece


async def _wait_for_switch(
    service: RouterService,
    plan: _Plan,
    factory: ChunkFactory,
    ticket: Ticket,
    status: Callable[[str], bytes],
) -> AsyncGenerator[bytes, None]:
    """Status chunks (or keep-alive comments) until the ticket is decided."""
    switcher = service.switcher
    channel = plan.status_channel
    names = {m.id: m.name for m in service.config.models.values()}
    if channel is not None:
        role = factory.role()
        opening = encode_json_event(role) if role is not None else b""
        yield opening + status(texts.switching_line(plan.model_name))
    else:
        yield KEEPALIVE_EVENT
    last_text = ""
    last_sent = time.monotonic()
    while not ticket.future.done():
        ticket.changed.clear()
        changed: asyncio.Future[Any] = asyncio.ensure_future(ticket.changed.wait())
        watched: set[asyncio.Future[Any]] = {changed, ticket.future}
        try:
            await asyncio.wait(
                watched,
                timeout=min(plan.progress_interval, plan.keepalive_interval),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            changed.cancel()
        if ticket.future.done():
            break
        info = switcher.wait_info(ticket)
        text = _status_line(plan, info, names)
        now = time.monotonic()
        # A new phase is shown at once; the same phase is repeated (with its new elapsed time) every interval.
        same_phase = text.split(":")[0] == last_text.split(":")[0]
        if channel is not None and (not same_phase or now - last_sent >= plan.progress_interval):
            yield status(text)
            last_text, last_sent = text, now
        elif now - last_sent >= plan.keepalive_interval:
            yield KEEPALIVE_EVENT
            last_sent = now


def _log_stream(plan: _Plan, relay: StreamRelay) -> None:
    speed = relay.meter.result()
    outcome = "error" if relay.saw_error else "complete" if relay.saw_finish else "cut short"
    figures = f", {speed.tokens} tokens at {speed.tokens_per_second:.1f} tok/s" if speed else ""
    log.info("%s stream for %s: %s%s", plan.kind, plan.model_id, outcome, figures)
    if relay.dropped:
        log.warning("engine for %s sent %d malformed SSE event(s): dropped", plan.model_id, relay.dropped)


def _stream_error(error: errors.OpenAIError) -> bytes:
    return encode_json_event(error.envelope()) + DONE_EVENT


async def _relay(
    service: RouterService,
    plan: _Plan,
    factory: ChunkFactory,
    upstream: AsyncGenerator[UpstreamHead | bytes, None],
    sent_at: float,
) -> AsyncGenerator[bytes, None]:
    """Forward the engine's SSE stream; look into an event only when a cheap byte test says so."""
    decoder = SSEDecoder()
    engine_failed = False
    shutting_down = False
    # Closed before the upstream in `finally`: its read in flight must be cancelled before the upstream can close.
    reading = ticks(_bytes_only(upstream), min(plan.keepalive_interval, plan.stall_timeout), service.ending)
    relay = StreamRelay(
        factory,
        footer=plan.footer,
        client_wants_usage=plan.client_wants_usage,
        sent_at=sent_at,
        received_at=plan.received_at,
    )
    try:
        heard_at = time.monotonic()
        async for item in reading:
            if item is None:
                if time.monotonic() - heard_at > plan.stall_timeout:
                    raise _EngineStalled(plan.stall_timeout)
                yield KEEPALIVE_EVENT
                continue
            heard_at = time.monotonic()
            now = time.monotonic()
            out = b"".join(relay.handle(event, now) for event in decoder.feed(item))
            if out:
                yield out
            if relay.finished:
                return
        leftover = decoder.flush()
        if leftover is not None and leftover.complete:
            out = relay.handle(leftover, time.monotonic())
            if out:
                yield out
            if relay.finished:
                return
        tail = relay.flush_held()
        if tail:
            yield tail
        if relay.saw_finish or relay.saw_error:
            # The answer (or the engine's error) was complete but the engine omitted [DONE]: end properly.
            yield DONE_EVENT
            return
        if service.ending.is_set():
            shutting_down = True
            reason = "the router is shutting down and its shutdown_grace ran out before the answer was complete"
        else:
            reason = "the engine closed the stream before the answer was complete"
            engine_failed = True
    except httpx.HTTPError as exc:
        reason = f"the engine connection failed mid-answer: {_describe(exc)}"
        engine_failed = True
    except _EngineStalled as stall:
        reason = f"the engine sent nothing for {stall.seconds:g} s (stall_timeout) in the middle of the answer"
        engine_failed = True
    finally:
        await reading.aclose()
        await upstream.aclose()
        _log_stream(plan, relay)
        # Neither finished nor failed: the client went away mid-answer.
        failed = relay.saw_error or engine_failed or shutting_down
        outcome = "error" if failed else "ok" if relay.saw_finish else "cancelled"
        first_text_at = relay.meter.first_text_at
        first_token = None if first_text_at is None else first_text_at - plan.received_at
        service.metrics.answer(plan.target_id, outcome, first_token, relay.meter.result())
    log.warning("model %s: %s", plan.model_id, reason)
    if shutting_down:
        yield _stream_error(errors.service_unavailable(f"model {plan.model_id!r}: {reason}", code="shutting_down"))
        return
    service.switcher.report_engine_failure(plan.target_id)
    yield relay.flush_held() + _stream_error(
        errors.bad_gateway(f"model {plan.model_id!r}: {reason}", code="engine_failed")
    )


class _EngineStalled(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


async def _bytes_only(upstream: AsyncGenerator[UpstreamHead | bytes, None]) -> AsyncGenerator[bytes, None]:
    async for item in upstream:
        if isinstance(item, bytes):
            yield item
