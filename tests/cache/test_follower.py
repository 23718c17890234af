"""The follower's recovery logic, on stand-ins for the store and the cache (the real paths run in
tests/proxy/test_shared_store.py and the e2e tests)."""

from __future__ import annotations

from typing import Any

from cache.errors import StoreError
from cache.follower import Follower


class Stream:
    """The stream positions a RedisStore reports: events 1-0 to 5-0 are still there."""

    origin = "this-replica"

    async def last_event_id(self) -> str:
        return "5-0"

    async def first_event_id(self) -> str:
        return "1-0"


class Cache:
    """A cache whose rebuild fails while `failing` is set, as one cut short by Redis going away does."""

    def __init__(self) -> None:
        self.failing = True
        self.rebuilds = 0

    async def rebuild_index(self, purge: bool = True) -> int:
        self.rebuilds += 1
        if self.failing:
            raise StoreError("Redis: connection lost mid-read")
        return 3


def follower(cache: Cache) -> Follower:
    store: Any = Stream()
    return Follower(store, cache, lambda name, fields: None)  # type: ignore[arg-type]


async def test_a_rebuild_cut_short_at_start_is_done_again_on_recovery() -> None:
    cache = Cache()
    f = follower(cache)
    assert await f.start() == 0  # fails open: the index stays empty for now
    cache.failing = False
    await f._recover()
    # The stream still holds every event since 1-0, but the index was never built: it must be rebuilt, not caught up.
    assert cache.rebuilds == 2 and f.stats.rebuilds == 1 and f.last_id == "5-0"


async def test_a_good_start_follows_from_the_newest_event_read_before_the_rebuild() -> None:
    cache = Cache()
    cache.failing = False
    f = follower(cache)
    assert await f.start() == 3 and f.last_id == "5-0"
    f._stale = True
    await f._recover()  # nothing missed: caught up from the stream, no second rebuild
    assert cache.rebuilds == 1 and f.stats.rebuilds == 0
