"""The request pipeline for generation endpoints: exact cache, semantic cache, then the upstream; admission of
complete answers afterwards. No FastAPI in here: routes parse, call `run`, and render the Reply."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import numpy as np

from cache.errors import CacheError
from cache.keys import CacheKey, Kind, chat_key, completion_key
from cache.policy import admissible, uncacheable_reason
from cache.redis_store import RedisStore
from cache.response_cache import Hit, Lookup, ResponseCache
from proxy.budget import Ticket
from proxy.cascade import Budget, Cascade, CascadeResult, LocalAnswer
from proxy.context import RequestContext
from proxy.errors import InvalidRequest, ProxyError, ServiceUnavailable, sse_error_event
from proxy.flights import Flight, Flights
from proxy.logs import Throttle
from proxy.outcome import Admission, Miss, Outcome, Reply
from proxy.protocol import CacheOptions, ChatCompletionRequest, CompletionRequest
from proxy.spending import Spend, SpendPlanner, upstream_usage
from proxy.streaming import StreamAccumulator, replay_chat, replay_completion
from proxy.upstream import Upstream

log = logging.getLogger("cachecade.pipeline")
T = TypeVar("T")

_PATHS = {"chat": "chat/completions", "completion": "completions"}
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


class ClientDisconnected(ProxyError):
    """The caller went away before the answer was ready (nobody reads this response)."""

    status = 499
    code = "client_closed_request"


async def cancel_on_disconnect(work: Awaitable[T], disconnected: Callable[[], Awaitable[None]] | None) -> T:
    """Await `work`, cancelling it (and so its upstream request) if the client disconnects first."""
    if disconnected is None:
        return await work
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnected("client disconnected")
    return task.result()


async def _iterate(events: Iterator[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _reply(
    kind: Kind, request: ChatCompletionRequest | CompletionRequest, response: dict[str, Any], outcome: Outcome
) -> Reply:
    """A complete answer we hold (cached or local): JSON, or replayed as a proper SSE stream."""
    if not request.stream:
        return Reply(outcome, body=response)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    replay = replay_chat if kind == "chat" else replay_completion
    return Reply(outcome, stream=_iterate(replay(response, include_usage)))


class CompletionPipeline:
    """Serves chat and legacy completions: cache tiers first, then the upstream."""

    def __init__(self, cache: ResponseCache, upstream: Upstream | None, cascade: Cascade, spending: SpendPlanner
                 ) -> None:  # fmt: skip
        self.flights = Flights(cache.store if isinstance(cache.store, RedisStore) else None)  # locks across replicas
        self.cache = cache
        self.upstream = upstream
        self.cascade = cascade
        self.spending = spending
        self._settling: set[asyncio.Task[None]] = set()
        self._store_failed = Throttle()  # a full disk or a full Redis fails every write: one log line a minute

    async def run(
        self,
        kind: Kind,
        request: ChatCompletionRequest | CompletionRequest,
        body: Mapping[str, Any],
        ctx: RequestContext,
    ) -> Reply:
        """Answer one request (a 429 first when the caller's key is over its request rate)."""
        ticket = await self.spending.budgets.open(ctx.key_id)
        try:
            reply = await self._run(kind, request, body, ctx, ticket)
        except ProxyError as exc:
            exc.headers = {**ticket.headers(self.cache.clock()), **exc.headers}
            raise
        reply.outcome.budget.update(ticket.headers(self.cache.clock()))
        return reply

    async def _run(
        self,
        kind: Kind,
        request: ChatCompletionRequest | CompletionRequest,
        body: Mapping[str, Any],
        ctx: RequestContext,
        ticket: Ticket,
    ) -> Reply:
        options = request.cache or CacheOptions()
        key = (chat_key if kind == "chat" else completion_key)(body, ctx.tenant, options.namespace)
        lookup = Lookup(ctx.directives.max_age, request.token_limit(), options.threshold, options.verifier_threshold)
        self._check_threshold(key, lookup)
        reason = uncacheable_reason(body, self.cache.policy) or ("no-cache" if ctx.directives.no_cache else None)
        outcome = Outcome(reason=reason, namespace=key.namespace, model=key.model)
        hit, vector = await self._lookup(key, lookup, outcome) if reason is None else (None, None)
        if hit is not None:
            return self._from_cache(kind, hit, request, outcome)
        if outcome.cache == "BYPASS":
            self.cache.stats.bypassed += 1
        storable = outcome.reason in (None, "no-cache") and not ctx.directives.no_store
        admission = Admission(key if storable else None, vector, options.ttl)
        flight = None
        if storable and outcome.cache == "MISS":  # single flight: identical misses reach a model once
            flight = await self.flights.lead(key.exact)
            if flight is None and (hit := await self._lookup_again(key, lookup)) is not None:
                outcome.coalesced = True
                return self._from_cache(kind, hit, request, outcome)
        try:
            return await self._answer(Miss(kind, request, body, ctx, outcome, admission, key, ticket, flight))
        except ProxyError as exc:  # errors say what the cache did too
            exc.headers = {**outcome.headers(), **exc.headers}
            raise
        finally:
            if flight is not None and not flight.held_by_stream:
                await flight.release()

    async def _lookup(self, key: CacheKey, lookup: Lookup, outcome: Outcome) -> tuple[Hit | None, np.ndarray | None]:
        semantic = key.text is not None and self.cache.policy.semantic_enabled
        outcome.threshold = self.cache.threshold(key, lookup) if semantic else None
        started = time.perf_counter()
        try:
            hit, vector = await self.cache.lookup(key, lookup)
        except CacheError as exc:  # fail open: the cache is an optimisation, never a reason to fail
            log.warning("cache lookup failed, serving from upstream: %s", exc)
            outcome.reason = "cache-error"
            return None, None
        outcome.lookup_ms, outcome.verifier_ms = (time.perf_counter() - started) * 1000, lookup.verdict.ms
        outcome.cache = "MISS" if hit is None else outcome.cache
        outcome.verifier, outcome.verifier_score = lookup.verdict.decision, lookup.verdict.score
        return hit, vector

    async def _lookup_again(self, key: CacheKey, lookup: Lookup) -> Hit | None:
        try:
            return await self.cache.lookup_again(key, lookup)
        except CacheError:  # fail open, as on the first lookup
            return None

    def _check_threshold(self, key: CacheKey, lookup: Lookup) -> None:
        """A request may only make thresholds stricter: a looser one is a 400 naming the field."""
        configured = {"threshold": self.cache.threshold(key, Lookup()),
                      "verifier_threshold": self.cache.verifier_threshold(key, Lookup())}  # fmt: skip
        for name, given in (("threshold", lookup.threshold), ("verifier_threshold", lookup.verifier_threshold)):
            if given is not None and given < configured[name]:
                raise InvalidRequest(
                    f"cache.{name} {given} is looser than the configured {configured[name]}; a request may only "
                    f"make the threshold stricter (higher)", param=f"cache.{name}", code="invalid_value",
                )  # fmt: skip

    def _from_cache(
        self, kind: Kind, hit: Hit, request: ChatCompletionRequest | CompletionRequest, outcome: Outcome
    ) -> Reply:
        now = time.time()
        outcome.cache = "HIT-EXACT" if hit.tier == "exact" else "HIT-SEMANTIC"
        outcome.served_by = "cache"
        outcome.similarity = hit.similarity
        outcome.age = hit.entry.age(now)
        outcome.entry_id = hit.entry.id
        # What the hit saved, never counted against a budget (the key pays nothing for it).
        outcome.budget["x-tokens-saved"] = str(hit.entry.tokens_saved)
        response = {**hit.entry.response, "id": _ID_PREFIX[kind] + uuid.uuid4().hex, "created": int(now)}
        return _reply(kind, request, response, outcome)

    async def _plan(self, miss: Miss) -> Spend:
        """Estimate the answer's length, cap it and reserve it against the key's budget (429 when short)."""
        request, ctx = miss.request, miss.ctx
        estimate = await self.spending.estimate(miss.key, miss.admission.vector)
        miss.outcome.budget.update(estimate.headers())
        budgets = [b for b in (ctx.token_budget, request.token_budget) if b is not None]
        spend = await self.spending.plan(
            miss.kind, miss.body, request.model, request.token_limit(), min(budgets, default=None), miss.ticket,
            estimate,
        )  # fmt: skip
        miss.outcome.budget.update(spend.headers())
        return spend

    async def _answer(self, miss: Miss) -> Reply:
        """The cascade's local tiers when the requested model has a route, else (or then) the upstream. What the
        answer cost replaces the key's reservation; a failure refunds it."""
        spend = await self._plan(miss)
        try:
            return await self._cascade(miss, spend)
        except BaseException:
            await self._settle(spend, 0)
            raise

    async def _cascade(self, miss: Miss, spend: Spend) -> Reply:
        body = self.spending.apply(miss.kind, miss.body, spend)
        route = self.cascade.route(miss.request.model, self.upstream is not None)
        if route is None:
            return await self._from_upstream(miss, None, body, spend)
        work = self.cascade.run(miss.kind, body, route, spend.cap, Budget(spend.budget, spend.estimate.tokens),
                                miss.admission.vector, miss.key.namespace, miss.ctx.request_id)  # fmt: skip
        result = await cancel_on_disconnect(work, miss.ctx.disconnected)
        self.spending.stats.local_spent += result.local_tokens
        miss.outcome.escalated = result.tried
        miss.outcome.rejected = [(a.tier, a.confidence.score, a.generation.text.strip()) for a in result.rejected]
        if result.answer is not None:
            return await self._from_local(miss, result.answer, spend)
        if result.upstream is None:
            raise _exhausted(result)
        return await self._from_upstream(miss, result.upstream.upstream_model, body, spend)

    async def _settle(self, spend: Spend, spent: int) -> None:
        """Shielded: a caller leaving must not leave the reservation standing."""
        try:
            await asyncio.shield(self.spending.settle(spend, spent))
        except CacheError as exc:  # the answer stands; the counters are off by this request
            log.warning("could not settle token budget: %s", exc)

    async def _from_local(self, miss: Miss, answer: LocalAnswer, spend: Spend) -> Reply:
        g, stats = answer.generation, self.spending.stats
        stats.local_prompt += g.prompt_tokens
        stats.local_completion += g.completion_tokens
        await self._settle(spend, g.prompt_tokens + g.completion_tokens)
        response = answer.response(miss.kind)
        outcome = miss.outcome
        outcome.served_by = f"local:{answer.tier}"
        outcome.confidence = answer.confidence.score
        outcome.gate = "pass" if answer.gated else "last-tier"
        if answer.gated and self.cascade.policy.cache_local_answers:  # only answers that passed the gate
            outcome.entry_id = await self._store(miss.admission, response, tier=f"local:{answer.tier}")
        return _reply(miss.kind, miss.request, response, outcome)

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise ServiceUnavailable(
                "cache miss and no upstream configured: set CACHECADE_UPSTREAM_BASE_URL to an OpenAI-compatible "
                "base URL (e.g. https://api.openai.com/v1)",
                code="upstream_not_configured",
            )
        return self.upstream

    async def _from_upstream(self, miss: Miss, model: str | None, body: Mapping[str, Any], spend: Spend) -> Reply:
        """Forward the request (as `model` when a route names one); relay a stream, store a complete answer."""
        outcome, path = miss.outcome, _PATHS[miss.kind]
        if self.upstream is None:
            outcome.served_by = "none"
        upstream = self._upstream()
        forwarded = dict(body)
        if model is not None:
            forwarded["model"] = model
        outcome.served_by = f"upstream:{forwarded.get('model')}"
        headers = upstream.headers(miss.ctx.headers)
        if miss.request.stream:
            stack = AsyncExitStack()
            chunks = await stack.enter_async_context(upstream.stream(path, forwarded, headers))
            if miss.flight is not None:
                miss.flight.held_by_stream = True  # released once the stream has ended (and its answer is stored)
            stream = self._pass_through(miss.kind, chunks, stack, miss.admission, spend, miss.flight)
            return Reply(outcome, stream=stream)
        payload = await cancel_on_disconnect(upstream.post(path, forwarded, headers), miss.ctx.disconnected)
        await self._settle(spend, self._count_upstream(payload, spend))
        outcome.entry_id = await self._store(miss.admission, payload)
        return Reply(outcome, body=payload)

    def _count_upstream(self, payload: Mapping[str, Any], spend: Spend) -> int:
        prompt, completion, reported = upstream_usage(payload, self.spending.counter, spend.prompt_tokens)
        stats = self.spending.stats
        stats.upstream_prompt += prompt
        stats.upstream_completion += completion
        stats.upstream_unreported += not reported
        return prompt + completion

    async def _pass_through(
        self,
        kind: Kind,
        chunks: AsyncIterator[bytes],
        stack: AsyncExitStack,
        admission: Admission,
        spend: Spend,
        flight: Flight | None,
    ) -> AsyncIterator[bytes]:
        """Relay upstream bytes unchanged; once [DONE] has arrived, store the answer before relaying [DONE].
        A client that goes away cancels this generator, which closes the upstream connection. The key pays for
        the answer's usage, or our count of its text, or (cut short) the whole reservation."""
        accumulator = StreamAccumulator(kind)
        stored = False
        spent = spend.prompt_tokens + (spend.cap or 0)
        try:
            async for chunk in chunks:
                answer = None
                try:
                    accumulator.feed(chunk)
                    answer = accumulator.response() if accumulator.complete and not stored else None
                except Exception:  # an odd event must never break bytes we relay unchanged; just don't store
                    accumulator.failed = True
                if answer is not None:
                    stored = True
                    spent = self._count_upstream(answer, spend)
                    await self._store(admission, answer)
                yield chunk
        except ProxyError as exc:
            yield sse_error_event(exc)
        finally:
            await stack.aclose()
            self._background(self._settle(spend, spent))
            if flight is not None:
                self._background(flight.release())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` to its end even when the caller is being cancelled (a closed stream)."""
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)  # kept until done: the loop holds tasks only weakly
        task.add_done_callback(self._settling.discard)

    async def _store(self, admission: Admission, payload: Mapping[str, Any], tier: str = "upstream") -> str | None:
        if admission.key is None or not admissible(payload, self.cache.policy):
            return None
        try:
            # Shielded: a client leaving mid-write must not leave the store and the index out of step.
            entry = await asyncio.shield(
                self.cache.put(admission.key, payload, admission.vector, tier=tier, ttl_s=admission.ttl)
            )
        except CacheError as exc:  # an answer we could not store is still a good answer
            self._store_failed.warning(log, "could not store answer: %s", exc)
            return None
        return entry.id


def _exhausted(result: CascadeResult) -> ServiceUnavailable:
    """No local tier answered and there is no upstream tier to escalate to."""
    tried = ", ".join(result.tried) or "none"
    if result.error is not None and result.error.reason == "off":
        tried += f"; {result.error}"
    retry = {"retry-after": "1"} if result.error is not None and result.error.reason == "saturated" else {}
    return ServiceUnavailable(
        f"no local model could answer ({tried}) and no upstream tier follows; configure CACHECADE_UPSTREAM_BASE_URL "
        "or retry later", code="local_models_unavailable", headers=retry,
    )  # fmt: skip
