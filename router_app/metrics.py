"""Prometheus metrics, fed by the switcher's status events and by the proxy's per-answer figures.

Counters and histograms are updated as things happen; the gauges (loaded, in flight, waiting) are read from the
switcher at scrape time, so they can never drift from the state that decides. Rendering is prometheus-client's.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router_app.speed import Speed
from router_app.switcher import ModelEvent, ModelStatus, Switcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The `_created` timestamp series double every counter's output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
WAKE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class _StateCollector(Collector):
    def __init__(self, switcher: Switcher) -> None:
        self.switcher = switcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        switcher = self.switcher
        loaded = GaugeMetricFamily("llm_router_model_loaded", "1 while the model's engine is loaded", labels=["model"])
        sleeping = GaugeMetricFamily(
            "llm_router_model_sleeping", "1 while the model's engine sleeps (vLLM sleep mode)", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "llm_router_requests_in_flight", "Answers being streamed from the model's engine", labels=["model"]
        )
        for model_id in switcher.config.models:
            is_loaded = switcher.model_status(model_id) is ModelStatus.LOADED
            loaded.add_metric([model_id], 1.0 if is_loaded else 0.0)
            is_sleeping = switcher.model_status(model_id) is ModelStatus.SLEEPING
            sleeping.add_metric([model_id], 1.0 if is_sleeping else 0.0)
            in_flight.add_metric([model_id], float(switcher.requests_in_flight(model_id)))
        yield loaded
        yield sleeping
        yield in_flight
        yield GaugeMetricFamily(
            "llm_router_requests_waiting", "Requests waiting for a model load", value=float(len(switcher.waiters))
        )


class RouterMetrics:
    def __init__(self, switcher: Switcher) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "llm_router_requests", "Model requests by outcome", ["model", "outcome"], registry=registry
        )
        self.loads = Counter(
            "llm_router_model_loads", "Engine loads by outcome (ok, failed)", ["model", "outcome"], registry=registry
        )
        self.unloads = Counter(
            "llm_router_model_unloads",
            "Engine stops by reason (switch, idle, request)",
            ["model", "reason"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "llm_router_model_load_seconds", "Time to load a model", ["model"], buckets=LOAD_BUCKETS, registry=registry
        )
        self.time_to_first_token = Histogram(
            "llm_router_time_to_first_token_seconds",
            "From the request's arrival to the first answer token, waits and loads included",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "llm_router_generated_tokens", "Tokens generated, by the engine's count", ["model"], registry=registry
        )
        self.tokens_per_second = Histogram(
            "llm_router_tokens_per_second",
            "Generation speed per answer",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=registry,
        )
        self.sleeps = Counter(
            "llm_router_model_sleeps",
            "Engines put to sleep instead of stopped, by reason (switch, idle)",
            ["model", "reason"],
            registry=registry,
        )
        self.wakes = Counter(
            "llm_router_model_wakes",
            "Engines woken from sleep, by outcome (ok, failed: the unit was restarted)",
            ["model", "outcome"],
            registry=registry,
        )
        self.sleep_seconds = Histogram(
            "llm_router_model_sleep_seconds",
            "Time to put a model to sleep",
            ["model"],
            buckets=WAKE_BUCKETS,
            registry=registry,
        )
        self.wake_seconds = Histogram(
            "llm_router_model_wake_seconds",
            "Time to wake a model, warm-up included",
            ["model"],
            buckets=WAKE_BUCKETS,
            registry=registry,
        )
        registry.register(_StateCollector(switcher))
        switcher.subscribe(self.on_event)

    def on_event(self, event: ModelEvent) -> None:
        if event.status is ModelStatus.SLEEPING:
            if event.sleep_seconds is not None:
                reason = event.unload_reason.value if event.unload_reason is not None else "switch"
                self.sleeps.labels(event.model, reason).inc()
                self.sleep_seconds.labels(event.model).observe(event.sleep_seconds)
        elif event.status is ModelStatus.LOADED and event.wake_seconds is not None:
            self.wakes.labels(event.model, "ok").inc()
            self.wake_seconds.labels(event.model).observe(event.wake_seconds)
        elif event.wake_failed:
            self.wakes.labels(event.model, "failed").inc()
        elif event.status is ModelStatus.LOADED and event.load_seconds is not None:
            self.loads.labels(event.model, "ok").inc()
            self.load_seconds.labels(event.model).observe(event.load_seconds)
        elif event.load_failed:
            self.loads.labels(event.model, "failed").inc()
        elif event.unload_reason is not None:
            self.unloads.labels(event.model, event.unload_reason.value).inc()

    def answer(self, model: str, outcome: str, first_token_seconds: float | None, speed: Speed | None) -> None:
        """One finished request: its outcome (`ok`, `error`, `cancelled`, `rejected`) and figures when known."""
        self.requests.labels(model, outcome).inc()
        if first_token_seconds is not None:
            self.time_to_first_token.labels(model).observe(first_token_seconds)
        if speed is not None:
            self.generated_tokens.labels(model).inc(speed.tokens)
            self.tokens_per_second.labels(model).observe(speed.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
