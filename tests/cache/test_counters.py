"""Budget counters on both backends: SQLite on a temporary file, Redis on the session's own redis-server."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio as redis

from cache.counters import Count, CounterStore, SQLiteCounters
from cache.errors import StoreError
from cache.redis_counters import RedisCounters
from local_models.processes import free_port

LATER = time.time() + 3600  # a window that outlives every test


class Clock:
    """A settable clock for SQLiteCounters, starting at the real time so Redis-style expiries compare alike."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def count(key: str, amount: int, limit: int | None = 100, expires_at: float = LATER) -> Count:
    return Count(f"budget:{{k1}}:{key}", amount, limit, expires_at)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sqlite_counters(tmp_path: Path, clock: Clock) -> AsyncIterator[SQLiteCounters]:
    counters = await SQLiteCounters.open(tmp_path / "counters.sqlite3", clock)
    yield counters
    await counters.close()


@pytest.fixture(params=["sqlite_counters", "redis_counters"])
def counters(request: pytest.FixtureRequest) -> CounterStore:
    """Each test below runs once per backend."""
    store: CounterStore = request.getfixturevalue(request.param)
    return store


async def test_add_within_limits(counters: CounterStore) -> None:
    assert await counters.add([count("tokens", 30)], check=True) == (True, [30])
    assert await counters.add([count("tokens", 70)], check=True) == (True, [100])  # reaching the limit is allowed
    assert await counters.get([count("tokens", 0).key, count("other", 0).key]) == [100, 0]


async def test_add_past_limit_changes_nothing(counters: CounterStore) -> None:
    await counters.add([count("tokens", 90)], check=True)
    assert await counters.add([count("tokens", 11)], check=True) == (False, [90])
    assert await counters.get([count("tokens", 0).key]) == [90]


async def test_unchecked_add_always_adds_and_refunds_floor_at_zero(counters: CounterStore) -> None:
    assert await counters.add([count("tokens", 150)], check=False) == (True, [150])
    assert await counters.add([count("tokens", -40)], check=False) == (True, [110])
    assert await counters.add([count("tokens", -500)], check=False) == (True, [0])
    assert await counters.get([count("tokens", 0).key]) == [0]


async def test_counts_without_limit_are_not_checked(counters: CounterStore) -> None:
    assert await counters.add([count("requests", 10**6, limit=None)], check=True) == (True, [10**6])


async def test_several_counts_are_all_or_nothing(counters: CounterStore) -> None:
    await counters.add([count("requests", 5, limit=6)], check=True)
    many = [count("tokens", 50), count("requests", 2, limit=6), count("free", 7, limit=None)]
    assert await counters.add(many, check=True) == (False, [0, 5, 0])
    assert await counters.get([c.key for c in many]) == [0, 5, 0]
    many[1] = count("requests", 1, limit=6)
    assert await counters.add(many, check=True) == (True, [50, 6, 7])


async def test_empty_calls(counters: CounterStore) -> None:
    assert await counters.add([], check=True) == (True, [])
    assert await counters.get([]) == []


async def test_past_expiry_reads_zero(counters: CounterStore) -> None:
    assert await counters.add([count("tokens", 10, expires_at=time.time() - 10)], check=True) == (True, [10])
    assert await counters.get([count("tokens", 0).key]) == [0]
    assert await counters.add([count("tokens", 10)], check=True) == (True, [10])


async def test_sqlite_expired_keys_read_zero_and_purge(sqlite_counters: SQLiteCounters, clock: Clock) -> None:
    await sqlite_counters.add([count("old", 10, expires_at=clock.now + 60), count("new", 5)], check=True)
    clock.now += 59
    assert await sqlite_counters.get([count("old", 0).key]) == [10]
    clock.now += 1
    assert await sqlite_counters.get([count("old", 0).key, count("new", 0).key]) == [0, 5]
    assert await sqlite_counters.add([count("old", 95)], check=True) == (True, [95])  # a fresh window
    assert await sqlite_counters.purge(LATER) == 2
    assert await sqlite_counters.get([count("old", 0).key, count("new", 0).key]) == [0, 0]


async def test_redis_keys_expire(redis_counters: RedisCounters, redis_url: str) -> None:
    expires_at = math.floor(time.time()) + 2  # 1 to 2 s ahead, in whole seconds as EXPIREAT keeps it
    await redis_counters.add([count("tokens", 10, expires_at=expires_at), count("later", 1)], check=True)
    client = redis.Redis.from_url(redis_url)
    try:
        assert 0 < await client.ttl("test:" + count("tokens", 0).key) <= 2
        later_ttl = await client.ttl("test:" + count("later", 0).key)
        assert abs(later_ttl - (math.ceil(LATER) - time.time())) <= 1
    finally:
        await client.aclose()
    assert await redis_counters.get([count("tokens", 0).key]) == [10]
    await asyncio.sleep(expires_at - time.time() + 0.2)
    assert await redis_counters.get([count("tokens", 0).key, count("later", 0).key]) == [0, 1]
    assert await redis_counters.purge(time.time()) == 0


async def spend(stores: Sequence[CounterStore]) -> list[bool]:
    """50 concurrent adds of 10 against a limit of 100, spread over `stores`."""
    calls = [stores[i % len(stores)].add([count("tokens", 10)], check=True) for i in range(50)]
    return [ok for ok, _ in await asyncio.gather(*calls)]


async def test_concurrent_adds_never_overspend(counters: CounterStore) -> None:
    assert sum(await spend([counters])) == 10
    assert await counters.get([count("tokens", 0).key]) == [100]


async def test_two_sqlite_writers_never_overspend(tmp_path: Path, clock: Clock) -> None:
    stores = [await SQLiteCounters.open(tmp_path / "shared.sqlite3", clock) for _ in range(2)]
    try:
        assert sum(await spend(stores)) == 10
        assert [await s.get([count("tokens", 0).key]) for s in stores] == [[100], [100]]
    finally:
        for s in stores:
            await s.close()


async def test_two_redis_clients_never_overspend(redis_counters: RedisCounters, redis_url: str) -> None:
    other = RedisCounters.from_url(redis_url, prefix="test:")
    try:
        assert sum(await spend([redis_counters, other])) == 10
        assert await other.get([count("tokens", 0).key]) == [100]
    finally:
        await other.close()


async def test_redis_down_is_a_store_error() -> None:
    counters = RedisCounters.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="Redis"):
        await counters.add([count("tokens", 1)], check=True)
    with pytest.raises(StoreError):
        await counters.get([count("tokens", 0).key])
    await counters.close()


async def test_sqlite_closed_is_a_store_error(sqlite_counters: SQLiteCounters) -> None:
    await sqlite_counters.close()
    with pytest.raises(StoreError, match="closed"):
        await sqlite_counters.add([count("tokens", 1)], check=True)
