"""The app factory: create_app(settings) builds the serving objects in the lifespan and wires the routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from cache.counters import CounterStore, SQLiteCounters
from cache.embedder import AsyncEmbedder, Embedder, load_embedder
from cache.errors import CacheError
from cache.follower import Follower
from cache.index import VectorIndex
from cache.policy import CachePolicy
from cache.redis_counters import RedisCounters
from cache.redis_store import RedisStore
from cache.response_cache import ResponseCache
from cache.sqlite_store import SQLiteStore
from cache.store import EntryStore
from cache.verifier import AsyncVerifier, PairVerifier
from local_models import selfcheck
from local_models.cascade import CascadePolicy
from local_models.engine import LlamaEngine
from local_models.isolation import ChildProcessWorker
from local_models.registry import LocalModelConfig
from local_models.worker import ModelWorker
from proxy import admin, health, metrics, openai_api, openapi, responses_api
from proxy.budget import BudgetPolicy, Budgets
from proxy.cascade import Cascade
from proxy.config import Settings
from proxy.context import RequestIdMiddleware
from proxy.errors import install_error_handlers
from proxy.learning import Learner
from proxy.pipeline import CompletionPipeline
from proxy.router import Router
from proxy.services import Services, fingerprint
from proxy.spending import SpendPlanner
from proxy.tokens import TokenCounter
from proxy.upstream import Upstream

log = logging.getLogger("cachecade")
PURGE_EVERY_S = 60.0
FLUSH_USES_EVERY_S = 1.0


def create_app(
    settings: Settings | None = None,
    *,
    embedder: Embedder | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    engines: Mapping[str, LlamaEngine] | None = None,
    verifier: PairVerifier | None = None,
) -> FastAPI:
    """Build the app. `embedder`, `upstream_transport`, `engines` and `verifier` are seams for tests (preloaded
    models, a mock upstream)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await _start(settings, embedder, upstream_transport, engines, verifier)
        app.state.services = services
        tasks = [asyncio.create_task(_upkeep(services)), asyncio.create_task(metrics.metrics_of(app).watch_loop())]
        if services.follower is not None:
            tasks.append(asyncio.create_task(services.follower.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await _stop(services)

    app = FastAPI(title="cachecade", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(metrics.MetricsMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(admin.router)
    openapi.install(app)
    return app


async def _load_engines(
    settings: Settings, given: Mapping[str, LlamaEngine] | None
) -> tuple[dict[str, ModelWorker], dict[str, str]]:
    """Load the local models that some route uses (off the event loop), each behind its worker, once a test
    generation in a child process has run (selfcheck): a model whose check crashed stays off. Returns the
    workers and name -> why for the models left off."""
    configs = {name: settings.local_models[name] for name in settings.used_local_models()}
    engines = {name: given[name] for name in configs if given and name in given}
    paths = {name: await asyncio.to_thread(configs[name].gguf, settings.model_cache_dir)
             for name in configs if name not in engines}  # fmt: skip
    off: dict[str, str] = {}
    if settings.local_self_check and paths:
        checks = {name: (path, configs[name].threads) for name, path in paths.items()}
        off = await selfcheck.check_all(checks, settings.local_self_check_timeout_s)
    workers: dict[str, ModelWorker] = {}
    for name, config in configs.items():
        if name in engines:
            workers[name] = ModelWorker(engines[name], config.max_queue)
        elif name not in off:
            workers[name] = await asyncio.to_thread(_load_worker, name, config, paths[name], settings.local_isolation)
        else:
            continue
        where = "in a child process" if isinstance(workers[name], ChildProcessWorker) else "in-process"
        log.info("local model %s: %s (%s prompt, %s)", name, workers[name].engine.path, config.prompt, where)
    return workers, off


def _load_worker(name: str, config: LocalModelConfig, path: Path, isolated: bool) -> ModelWorker:
    if not isolated:
        return ModelWorker(LlamaEngine(name, config, path), config.max_queue)
    worker = ChildProcessWorker(name, config, path, config.max_queue)
    try:
        worker.start()
    except BaseException:
        worker.close()
        raise
    return worker


async def _start(
    settings: Settings,
    embedder: Embedder | None,
    transport: httpx.AsyncBaseTransport | None,
    engines: Mapping[str, LlamaEngine] | None,
    verifier_seam: PairVerifier | None = None,
) -> Services:
    model = embedder
    if model is None:
        model = await asyncio.to_thread(
            load_embedder, settings.embedder, settings.embedder_backend, settings.model_cache_dir,
            settings.embedder_threads,
        )  # fmt: skip
    async_embedder = AsyncEmbedder(model)
    store, counters = await open_stores(settings)
    verifier = await _load_verifier(settings, verifier_seam)
    cache = ResponseCache(store, VectorIndex(model.dim, settings.ivf_threshold, settings.ivf_nprobe), async_embedder,
                          settings.cache_policy(verifier.meta if verifier else None), verifier=verifier)  # fmt: skip
    follower = None
    if isinstance(store, RedisStore):
        follower = Follower(store, cache, lambda name, fields: None)  # on_policy is set once services exist
        loaded = await follower.start()
        await _check_embedders(store, model.model_id)
    else:
        loaded = await cache.rebuild_index()
    log.info("cache ready: %d vectors indexed (embedder %s)", loaded, model.model_id)
    upstream = None
    if settings.upstream_base_url is not None:
        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        upstream = Upstream.create(
            str(settings.upstream_base_url), key, timeout_s=settings.upstream_timeout_s,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            max_connections=settings.upstream_max_connections, transport=transport,
        )  # fmt: skip
        log.info("upstream: %s", upstream.base_url)
    else:
        log.warning("no upstream configured (CACHECADE_UPSTREAM_BASE_URL): misses are answered by local models")
    workers, off = await _load_engines(settings, engines)
    cascade = Cascade(workers, settings.cascade_policy(), off)
    cascade.router = Router(explore=settings.cascade_router_explore, min_tries=settings.cascade_router_min_tries,
                            max_pass_rate=settings.cascade_router_max_pass_rate,
                            min_similarity=settings.cascade_router_min_similarity,
                            seed=settings.learn_seed,
                            store=cache.store) if settings.cascade_router else None  # fmt: skip
    if settings.admin_token is None:
        log.info("admin API disabled: set CACHECADE_ADMIN_TOKEN to enable /admin")
    budgets = Budgets(counters, settings.budget_policy(), cache.clock)
    spending = SpendPlanner(budgets, await asyncio.to_thread(TokenCounter), cache, settings.max_prompt_tokens)
    pipeline = CompletionPipeline(cache, upstream, cascade, spending)
    learner = Learner(cache, settings.learn_served_ttl_s, lambda name, policy: services.publish(name, policy), upstream,
                      seed=settings.learn_seed, cascade=cascade)  # fmt: skip
    services = Services(settings, async_embedder, cache, upstream, pipeline, cascade, spending, learner, follower)
    await restore_policies(services)
    if follower is not None:
        follower.on_policy = lambda name, fields: apply_policy(services, name, fields)
    return services


async def _load_verifier(settings: Settings, given: PairVerifier | None) -> AsyncVerifier | None:
    """The semantic tier's verifier (exported to ONNX once, off the event loop), or None when it is off."""
    if given is not None:
        return AsyncVerifier(given)
    if settings.cache_verifier == "off" or not settings.cache_semantic_enabled:
        return None
    folder = None if settings.cache_verifier == "default" else Path(settings.cache_verifier).expanduser()
    verifier = await asyncio.to_thread(PairVerifier.load, folder, settings.model_cache_dir, 2,
                                      settings.cache_verifier_backend)  # fmt: skip
    policy = settings.cache_policy(verifier.meta)
    log.info("cache verifier %s: threshold %.3f from cosine %.2f", verifier.model_id, policy.verifier_threshold,
             policy.verifier_band_low)  # fmt: skip
    return AsyncVerifier(verifier)


async def open_stores(settings: Settings) -> tuple[EntryStore, CounterStore]:
    """Redis (shared by every replica) when CACHECADE_REDIS_URL is set, else SQLite files in the data dir."""
    if settings.redis_url:
        shared = RedisStore.from_url(settings.redis_url, cluster=settings.redis_cluster, prefix=settings.redis_prefix,
                                    timeout_s=settings.redis_timeout_s)  # fmt: skip
        log.info("shared store: Redis%s (prefix %s)", " Cluster" if settings.redis_cluster else "", shared.prefix)
        return shared, RedisCounters(shared.client, shared.prefix, shared.breaker)
    store = await SQLiteStore.open(settings.data_dir / "cache.sqlite3")
    counters = await SQLiteCounters.open(settings.data_dir / "budgets.sqlite3", time.time)
    log.info("embedded store in %s", settings.data_dir)
    return store, counters


async def _check_embedders(store: RedisStore, mine: str) -> None:
    """Vectors of another embedder are never mixed into this replica's index: say so when Redis holds some."""
    try:
        others = await store.embedder_ids() - {mine}
    except CacheError:
        return
    if others:
        log.warning("Redis holds entries embedded by %s; this replica embeds with %s and indexes only its own "
                    "(the others still serve exact hits and stay for replicas with that embedder)",
                    ", ".join(sorted(others)), mine)  # fmt: skip


def apply_policy(services: Services, name: str, fields: dict[str, Any], source: str = "another replica") -> None:
    """A policy change another replica made (or one kept in the store from before a restart); raises ValueError
    when it does not fit."""
    if name == "cache":
        services.cache.policy = CachePolicy.model_validate(fields)
    elif name == "cascade":
        policy = CascadePolicy.model_validate(fields)
        policy.check_models(services.cascade.models)
        services.cascade.policy = policy
    elif name == "budgets":
        services.spending.budgets.policy = BudgetPolicy.model_validate(fields)
    else:
        return
    services.in_force[name] = dict(fields)
    log.info("applied a %s policy change from %s", name, source)


async def restore_policies(services: Services) -> None:
    """Runtime policy changes kept in the store win over the settings they were made over; settings changed since
    (another deployment) win over them, with a warning. Either way the audit log keeps what was changed."""
    for name, policy in (("cache", services.cache.policy), ("cascade", services.cascade.policy),
                         ("budgets", services.spending.budgets.policy)):  # fmt: skip
        services.configured[name], services.in_force[name] = fingerprint(policy), policy.model_dump(mode="json")
        try:
            raw = await services.cache.store.load_policy(name)
        except CacheError as exc:
            log.warning("could not read the runtime %s policy from the store; the settings stand: %s", name, exc)
            continue
        if raw is None:
            continue
        kept = json.loads(raw)
        if kept.get("settings") != services.configured[name]:
            log.warning("the %s policy was changed at run time over other settings than these; the settings win "
                        "(GET /admin/audit shows the change)", name)  # fmt: skip
            continue
        try:
            apply_policy(services, name, kept["fields"], "the store (a change made before this start)")
        except (ValueError, KeyError) as exc:
            log.warning("the runtime %s policy kept in the store does not fit; the settings stand: %s", name, exc)


async def _stop(services: Services) -> None:
    await services.learner.drain()  # records for feedback still being written
    await services.responses.flush()  # stored responses not yet written
    if services.cascade.router is not None:
        await services.cascade.router.sync()  # the router's last answers and labels (it logs a store that is down)
    try:
        await services.cache.flush_uses()
    except CacheError as exc:  # a store that is down at shutdown loses the last LRU touches, nothing more
        log.warning("could not write the last uses of cache entries at shutdown: %s", exc)
    if services.upstream is not None:
        await services.upstream.aclose()
    await services.cache.store.close()
    with contextlib.suppress(CacheError):  # on Redis the counters share the store's (closed) client
        await services.spending.budgets.counters.close()
    services.embedder.close()
    if services.cache.verifier is not None:
        services.cache.verifier.close()
    for worker in services.cascade.workers.values():
        worker.close()


async def _upkeep(services: Services) -> None:
    """Write recorded uses every second; purge expired entries and ended budget windows every minute."""
    cache, last_purge = services.cache, time.monotonic()
    while True:
        await asyncio.sleep(FLUSH_USES_EVERY_S)
        try:
            await cache.flush_uses()
            if time.monotonic() - last_purge >= PURGE_EVERY_S:
                last_purge = time.monotonic()
                await cache.purge_expired()
                await services.spending.budgets.counters.purge(cache.clock())
        except Exception:  # keep going: a failed round only delays LRU bookkeeping or reclaiming space
            log.exception("cache upkeep failed")
