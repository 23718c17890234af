"""Fixtures for the cache's stores: a real redis-server for the session, a clean database for each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from cache.redis_counters import RedisCounters
from local_models.processes import ServerFailed, stop
from tests.redis_server import start_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this test session's own, on a free port; yields `redis://127.0.0.1:<port>/0`. Fails (never
    skips) when redis-server cannot start: `make test` installs it."""
    try:
        process, url = start_redis(tmp_path_factory.mktemp("redis") / "redis.log")
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture
async def redis_counters(redis_url: str) -> AsyncIterator[RedisCounters]:
    """RedisCounters on the session's server; the database is flushed after the test."""
    counters = RedisCounters(redis.Redis.from_url(redis_url), prefix="test:")
    yield counters
    flusher = redis.Redis.from_url(redis_url)
    await flusher.flushdb()
    await flusher.aclose()
    await counters.close()
