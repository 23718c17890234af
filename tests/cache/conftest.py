"""Fixtures for the cache's stores: a real redis-server for the session, a clean database for each test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from cache.redis_counters import RedisCounters
from cache.redis_store import RedisStore
from tests.conftest import served
from tests.redis_cluster import start_cluster, stop_cluster


@pytest.fixture
async def redis_counters(redis_url: str) -> AsyncIterator[RedisCounters]:
    """RedisCounters on the session's server; the database is flushed after the test."""
    counters = RedisCounters(redis.Redis.from_url(redis_url), prefix="test:")
    yield counters
    flusher = redis.Redis.from_url(redis_url)
    await flusher.flushdb()
    await flusher.aclose()
    await counters.close()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A RedisStore on the session's server under a prefix of its own; the database is flushed after the test."""
    store = RedisStore.from_url(redis_url, prefix=f"test-{uuid.uuid4().hex}:")
    yield store
    await store.client.flushdb()
    await store.close()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master Redis Cluster of this test session's own; yields the URL of one node. Fails (never skips) when
    redis-server or redis-cli is missing or the cluster does not form."""
    with served(lambda: start_cluster(tmp_path_factory.mktemp("redis-cluster")), stop_cluster) as url:
        yield url
