"""Single flight: concurrent identical misses reach the upstream once.

The first request for an exact key leads; identical requests arriving while it runs wait for it, then look the
cache up again and are served the stored answer. Across replicas the leader holds a short Redis lock
(`lock:{<exact key>}`, expiring by itself if its holder dies); a replica that finds the key locked waits until the
lock is released (or expires) before looking up again. A leader whose answer could not be stored (an error, a
truncated answer) releases its followers, who then go on their own way: waiting never turns into failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from cache.errors import CacheError
from cache.redis_store import RedisStore

log = logging.getLogger("cachecade.flights")
LOCK_TTL_S = 30.0  # a leader that dies holds its followers at most this long
POLL_S = 0.02  # how often a follower on another replica checks the lock


@dataclass
class Flight:
    """A leader's hold on a key; `release` wakes its followers (call it once the answer is stored or failed)."""

    flights: Flights
    key: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    locked: bool = False
    released: bool = False
    held_by_stream: bool = False  # a relayed stream releases it when it ends

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.event.set()
        self.flights.local.pop(self.key, None)
        if self.locked and self.flights.locks is not None:
            with contextlib.suppress(CacheError):
                await self.flights.locks.unlock(self.key)


class Flights:
    """Who is answering which exact key, here and, given the Redis store's locks, on other replicas."""

    def __init__(self, locks: RedisStore | None) -> None:
        self.locks = locks
        self.local: dict[str, Flight] = {}

    async def lead(self, key: str) -> Flight | None:
        """A Flight when this request should answer the key; None after waiting for another request that did
        (look the cache up again)."""
        current = self.local.get(key)
        if current is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(current.event.wait(), LOCK_TTL_S)
            return None
        flight = self.local[key] = Flight(self, key)
        if self.locks is not None:
            try:
                flight.locked = await self.locks.try_lock(key, LOCK_TTL_S)
            except CacheError:  # fail open: without Redis each replica answers for itself
                return flight
            if not flight.locked:
                await self._wait_remote(self.locks, key)
                await flight.release()  # wakes local followers: they look up again too
                return None
        return flight

    async def _wait_remote(self, locks: RedisStore, key: str) -> None:
        deadline = asyncio.get_running_loop().time() + LOCK_TTL_S
        while asyncio.get_running_loop().time() < deadline:
            try:
                if not await locks.is_locked(key):
                    return
            except CacheError:
                return
            await asyncio.sleep(POLL_S)
