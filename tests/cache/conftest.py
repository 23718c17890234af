"""Fixtures for the cache's stores: a real redis-server for the session, a clean database for each test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from cache.redis_counters import RedisCounters


@pytest.fixture
async def redis_counters(redis_url: str) -> AsyncIterator[RedisCounters]:
    """RedisCounters on the session's server; the database is flushed after the test."""
    counters = RedisCounters(redis.Redis.from_url(redis_url), prefix="test:")
    yield counters
    flusher = redis.Redis.from_url(redis_url)
    await flusher.flushdb()
    await flusher.aclose()
    await counters.close()
