"""Prometheus metrics at GET /metrics: the counters the serving objects already keep (read at scrape time, so the
pipeline knows nothing of Prometheus) and request latency timed by an ASGI middleware.

Each app has its own registry (on app.state, made on first use): several apps can run in one process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cache.redis_store import RedisStore

if TYPE_CHECKING:
    from proxy.services import Services

# 1 ms .. 60 s: cache hits take milliseconds, local answers and upstream streams seconds to a minute.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_EVERY_S = 0.25
UNSET = "unset"  # a response without x-served-by / x-cache (errors before the pipeline ran)

router = APIRouter()


class Metrics:
    """One app's registry: request latency, upstream errors, and the services' own counters."""

    def __init__(self, services: Callable[[], Services | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["route", "served_by", "cache"]
        self.request_seconds = Histogram(
            "cachecade_request_seconds", "Time from a /v1 request's arrival to the start of its response (headers)",
            labels, buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.response_end_seconds = Histogram(
            "cachecade_response_end_seconds", "Time from a /v1 request's arrival to the end of its body (for a "
            "stream: its last chunk)", labels, buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "cachecade_upstream_errors", "Responses with status >= 500 from the upstream tier (x-served-by "
            "upstream:*, or none when no upstream is configured)", ["status"], registry=self.registry,
        )  # fmt: skip
        self.loop_lag_seconds = Histogram(
            "cachecade_event_loop_lag_seconds", f"How late the event loop woke a {LAG_EVERY_S:g} s sleep: time every "
            "request waited for a step that held the loop", buckets=LAG_BUCKETS, registry=self.registry,
        )  # fmt: skip
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, CPU seconds
        self.registry.register(ServicesCollector(services))

    async def watch_loop(self) -> None:
        """Observe the event loop's lag every LAG_EVERY_S until cancelled (run by the app's lifespan)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_EVERY_S)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - start - LAG_EVERY_S))

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def metrics_of(app: Any) -> Metrics:
    """The app's Metrics, made on first use and kept on app.state."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = Metrics(lambda: getattr(app.state, "services", None))
    return metrics


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus scrape endpoint (async: it reads the counters on the event loop, where they change)."""
    return Response(metrics_of(request.app).render(), media_type=CONTENT_TYPE_LATEST)


class ServicesCollector(Collector):
    """Exports the counters kept by the cache, cascade, spending planner, store and follower."""

    def __init__(self, services: Callable[[], Services | None]) -> None:
        self.services = services

    def describe(self) -> list[Metric]:
        return []  # families are made at scrape time: nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        svc = self.services()
        if svc is None:  # not started yet
            return
        yield from _cache(svc)
        yield from _cascade(svc)
        yield from _learning(svc)
        yield from _tokens(svc)
        yield from _stores(svc)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, labels: list[str], values: Iterable[tuple[Sequence[str], float]]
              ) -> CounterMetricFamily:  # fmt: skip
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _cache(svc: Services) -> Iterator[Metric]:
    s = svc.cache.stats
    lookups = [(["hit_exact"], s.hits_exact), (["hit_semantic"], s.hits_semantic), (["miss"], s.misses),
               (["bypass"], s.bypassed)]  # fmt: skip
    yield _labelled("cachecade_cache_lookups", "Cache lookups by result (bypass: not looked up)", ["result"], lookups)
    yield _counter("cachecade_cache_stored", "Answers stored in the cache", s.stored)
    yield _counter("cachecade_cache_evicted", "Entries evicted (LRU bound)", s.evicted)
    yield _counter("cachecade_cache_expired", "Entries purged past their TTL", s.expired)
    yield _counter("cachecade_cache_stale_index_ids", "Index ids whose entry had left the store", s.stale_index_ids)
    yield _counter("cachecade_cache_too_long_for_semantic", "Lookups too long to embed (exact tier only)",
                   s.too_long_for_semantic)  # fmt: skip
    verdicts = [(["accept"], s.verifier_accepts), (["reject"], s.verifier_rejects), (["skipped"], s.verifier_skips),
                (["error"], s.verifier_errors)]  # fmt: skip
    yield _labelled("cachecade_cache_verifier_decisions", "Semantic lookups by what the verifier decided",
                    ["decision"], verdicts)  # fmt: skip
    yield GaugeMetricFamily("cachecade_cache_index_vectors", "Vectors in this replica's index", len(svc.cache.index))
    yield GaugeMetricFamily("cachecade_cache_index_builds", "Partitions whose larger (IVF) index is being built",
                            svc.cache.index.building())  # fmt: skip


def _learning(svc: Services) -> Iterator[Metric]:
    s = svc.learner.stats
    yield _labelled("cachecade_feedback_labels", "Answers labelled by POST /v1/feedback", ["good"],
                    [(["true"], s.labels["good"]), (["false"], s.labels["bad"])])  # fmt: skip
    yield _counter("cachecade_feedback_entries_deleted", "Cache entries deleted on a bad label", s.entries_deleted)
    yield _labelled("cachecade_shadow_checks", "Served answers asked of the upstream again, by result (capped: "
                    "sampled but over a cap, not asked)", ["result"],
                    [([r], s.shadow[r]) for r in ("agreed", "disagreed", "capped", "errors")])  # fmt: skip
    yield _counter("cachecade_shadow_tokens", "Upstream tokens spent on shadow checks", s.shadow["tokens"])
    yield _labelled("cachecade_escalation_comparisons", "Local answers the gate rejected, compared with the "
                    "upstream's answer to the same request, by result", ["result"],
                    [([r], s.escalations[r]) for r in ("agreed", "disagreed", "errors")])  # fmt: skip
    yield _labelled("cachecade_threshold_changes", "Thresholds moved by the labels to hold max_error", ["direction"],
                    [([d], n) for d, n in s.changes.items()])  # fmt: skip
    learned = GaugeMetricFamily("cachecade_learned_threshold", "The threshold the labels chose, per scope "
                                "(tier/scale/namespace)", labels=["scope"])  # fmt: skip
    bound = GaugeMetricFamily("cachecade_learned_error_bound", "Upper confidence bound of the served error rate "
                              "at that threshold", labels=["scope"])  # fmt: skip
    for scope, decision in list(svc.learner.decisions.items()):
        learned.add_metric([scope], decision.threshold)
        bound.add_metric([scope], decision.bound)
    yield learned
    yield bound


def _cascade(svc: Services) -> Iterator[Metric]:
    s = svc.cascade.stats
    served = [([tier], n) for tier, n in list(s.served.items())]
    yield _labelled("cachecade_local_answers", "Answers served by a local tier", ["tier"], served)
    escalations = [(key.partition(":")[::2], n) for key, n in list(s.escalated.items())]  # "tier:reason"
    yield _labelled("cachecade_escalations", "Local tiers that passed a request on, by reason", ["tier", "reason"],
                    escalations)  # fmt: skip
    yield _counter("cachecade_cascade_to_upstream", "Cascaded requests that ended at the upstream", s.upstream)
    router = svc.cascade.router
    if router is not None:
        yield _labelled("cachecade_router_decisions", "Local tiers the router skipped, or tried anyway to explore",
                        ["tier", "decision"], [([t, "skipped"], n) for t, n in list(router.stats.skipped.items())]
                        + [([t, "explored"], n) for t, n in list(router.stats.explored.items())])  # fmt: skip
        memory = GaugeMetricFamily("cachecade_router_memory", "Local answers the router remembers, per tier",
                                   labels=["tier"])  # fmt: skip
        for name, tier in list(router.tiers.items()):
            memory.add_metric([name], tier.count)
        yield memory
    up = GaugeMetricFamily("cachecade_local_model_up", "1: the local model passed its start-up self-check and "
                           "serves; 0: it is off (see /readyz for why)", labels=["tier"])  # fmt: skip
    for name in sorted(svc.cascade.models):
        up.add_metric([name], 0.0 if name in svc.cascade.off else 1.0)
    yield up


def _tokens(svc: Services) -> Iterator[Metric]:
    s, saved = svc.spending.stats, svc.cache.stats.tokens_saved
    kinds = [(["saved_by_cache"], saved), (["local_prompt"], s.local_prompt),
             (["local_completion"], s.local_completion), (["upstream_prompt"], s.upstream_prompt),
             (["upstream_completion"], s.upstream_completion)]  # fmt: skip
    yield _labelled("cachecade_tokens", "Tokens by kind: saved by cache hits, of answers served locally, as the "
                    "upstream reported them", ["kind"], kinds)  # fmt: skip
    yield _counter("cachecade_local_tokens_spent", "Every token local tiers spent, passed-on answers included",
                   s.local_spent)  # fmt: skip
    yield _counter("cachecade_upstream_answers_without_usage", "Upstream answers without usage (counted by our "
                   "estimate)", s.upstream_unreported)  # fmt: skip
    yield _counter("cachecade_budget_clamped_requests", "Requests whose answer cap was lowered", s.clamped)
    yield _counter("cachecade_budget_counter_errors", "Budget counter operations that failed (requests went on "
                   "unmetered)", svc.spending.budgets.errors)  # fmt: skip


def _stores(svc: Services) -> Iterator[Metric]:
    store = svc.cache.store
    if isinstance(store, RedisStore):
        yield _counter("cachecade_redis_errors", "Redis operations that failed", store.errors)
        yield GaugeMetricFamily("cachecade_redis_available", "1 unless backing off after a Redis failure",
                                1.0 if store.available else 0.0)  # fmt: skip
    if svc.follower is not None:
        f = svc.follower.stats
        yield _counter("cachecade_follower_events_applied", "Store events applied to this replica", f.applied)
        yield _counter("cachecade_follower_rebuilds", "Index rebuilds from the store", f.rebuilds)
        yield _counter("cachecade_follower_errors", "Failed rounds of following the event stream", f.errors)
        yield GaugeMetricFamily("cachecade_follower_lag_seconds", "Age of the last event applied", f.lag_ms / 1000)


@dataclass
class _Timing:
    """One /v1 request's timing and the response's labels, read from its headers."""

    start: float = field(default_factory=time.perf_counter)
    status: int = 500  # when the app raised before responding, the server answers 500
    headers: dict[str, str] = field(default_factory=dict)
    first: float | None = None

    def started(self, message: Message) -> None:
        self.first = time.perf_counter() - self.start
        self.status = int(message["status"])
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}

    def record(self, metrics: Metrics, route: str) -> None:
        served_by, cache = self.headers.get("x-served-by", ""), self.headers.get("x-cache", "")
        # upstream:<model> names the client's model: kept out of the labels so their number stays bounded
        labels = (route, "upstream" if served_by.startswith("upstream") else served_by or UNSET, cache.lower() or UNSET)
        end = time.perf_counter() - self.start
        metrics.request_seconds.labels(*labels).observe(end if self.first is None else self.first)
        metrics.response_end_seconds.labels(*labels).observe(end)
        if self.status >= 500 and (served_by.startswith("upstream") or served_by == "none"):
            metrics.upstream_errors.labels(str(self.status)).inc()


class MetricsMiddleware:
    """Times every /v1 request (to its response's start and to the end of its body) and counts upstream errors."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or "app" not in scope:
            await self.app(scope, receive, send)
            return
        timing = _Timing()

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                timing.started(message)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            # the route template, not the path: the label's values stay few
            timing.record(metrics_of(scope["app"]), getattr(scope.get("route"), "path", "unmatched"))
