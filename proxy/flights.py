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
from cache.store import EntryStore

log = logging.getLogger("cachecade.flights")
LOCK_TTL_S = 30.0  # a leader that dies holds its followers at most this long
POLL_S = 0.02  # how often a follower on another replica checks the lock


@dataclass
class FlightStats:
    led: int = 0
    coalesced_local: int = 0  # requests that waited for a leader in this replica
    coalesced_remote: int = 0  # requests that waited for a leader on another replica


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
        if self.locked and isinstance(self.flights.store, RedisStore):
            with contextlib.suppress(CacheError):
                await self.flights.store.unlock(self.key)


class Flights:
    """Who is answering which exact key, here and (with the Redis store) on other replicas."""

    def __init__(self, store: EntryStore, wait_s: float = LOCK_TTL_S) -> None:
        self.store = store
        self.wait_s = wait_s
        self.local: dict[str, Flight] = {}
        self.stats = FlightStats()

    async def lead(self, key: str) -> Flight | None:
        """A Flight when this request should answer the key; None after waiting for another request that did
        (look the cache up again)."""
        current = self.local.get(key)
        if current is not None:
            self.stats.coalesced_local += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(current.event.wait(), self.wait_s)
            return None
        flight = self.local[key] = Flight(self, key)
        if isinstance(self.store, RedisStore):
            try:
                flight.locked = await self.store.try_lock(key, LOCK_TTL_S)
            except CacheError:  # fail open: without Redis each replica answers for itself
                return self._led(flight)
            if not flight.locked:
                self.stats.coalesced_remote += 1
                await self._wait_remote(key)
                await flight.release()  # wakes local followers: they look up again too
                return None
        return self._led(flight)

    def _led(self, flight: Flight) -> Flight:
        self.stats.led += 1
        return flight

    async def _wait_remote(self, key: str) -> None:
        assert isinstance(self.store, RedisStore)
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                if not await self.store.is_locked(key):
                    return
            except CacheError:
                return
            await asyncio.sleep(POLL_S)
