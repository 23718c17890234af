"""Keeps a replica in step with the shared Redis store: applies other replicas' put / delete / flush events to
this replica's FAISS index, and their policy changes to its policies.

It starts from the stream position read before the index was rebuilt, so nothing falls in between. When Redis
comes back after an outage it catches up from where it stopped; when the events it missed are gone (the stream
was trimmed, or Redis restarted empty) it rebuilds the index from the entries instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache.errors import StoreError
from cache.redis_store import Event, RedisStore
from cache.response_cache import ResponseCache

log = logging.getLogger("cachecade.follower")
BLOCK_MS = 200  # below the store's socket timeout: an idle XREAD must not look like a dead server


def _position(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class FollowerStats:
    applied: int = 0
    rebuilds: int = 0
    errors: int = 0
    lag_ms: float = 0.0  # age of the last event applied, by its stream id's clock


class Follower:
    """Applies the store's events to this replica. `on_policy(name, fields)` receives policy changes."""

    def __init__(self, store: RedisStore, cache: ResponseCache,
                 on_policy: Callable[[str, dict[str, Any]], None]) -> None:  # fmt: skip
        self.store = store
        self.cache = cache
        self.on_policy = on_policy
        self.last_id = "0-0"
        self.stats = FollowerStats()
        self._stale = False  # set after an outage: check the events we missed are still there

    async def start(self) -> int:
        """Read the stream position, then rebuild the index (fail open: an unreachable store leaves the index
        empty and the follower rebuilds once Redis answers). Returns the vectors indexed."""
        try:
            return await self._rebuild()
        except StoreError as exc:
            log.warning("Redis unreachable at start, serving without the shared cache until it answers: %s", exc)
            self._stale = True
            return 0

    async def run(self) -> None:
        """Follow until cancelled."""
        backoff = 0.25
        while True:
            try:
                if self._stale:
                    await self._recover()
                events = await self.store.read_events(self.last_id, BLOCK_MS)
            except StoreError as exc:
                self.stats.errors += 1
                self._stale = True
                log.debug("following Redis failed, retrying in %.2fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.25
            for event in events:
                self.apply(event)
            await asyncio.sleep(0)

    async def _recover(self) -> None:
        """After an outage: catch up from the stream when it still holds what we missed, else rebuild."""
        first = await self.store.first_event_id()
        if first is None or _position(first) > _position(self.last_id):
            loaded = await self._rebuild()
            self.stats.rebuilds += 1
            log.info("rebuilt the index from Redis after an outage: %d vectors", loaded)
        self._stale = False

    async def _rebuild(self) -> int:
        """Rebuild the index, then follow from the newest event read before it (none falls between). The position
        moves only once the rebuild succeeded: one cut short leaves it where a recovery rebuilds again."""
        newest = await self.store.last_event_id()
        loaded = await self.cache.rebuild_index(purge=False)
        self.last_id = newest
        return loaded

    def apply(self, event: Event) -> None:
        """Apply one event (this replica's own were applied when it made them)."""
        self.last_id = event.id
        if event.origin == self.store.origin:
            return
        index, embedder = self.cache.index, self.cache.embedder
        if event.op == "put" and event.vector is not None and embedder and event.embedder_id == embedder.model_id:
            index.add(event.partition, event.vid, event.vector)
        elif event.op == "delete":
            index.remove([event.vid])
        elif event.op == "flush":
            index.clear()
        elif event.op == "policy" and event.policy is not None:
            try:
                self.on_policy(event.name, event.policy)
            except ValueError as exc:  # e.g. a route naming a model this replica did not load
                log.warning("policy change %s from another replica not applied here: %s", event.name, exc)
        self.stats.applied += 1
        self.stats.lag_ms = max(0.0, time.time() * 1000 - _position(event.id)[0])
