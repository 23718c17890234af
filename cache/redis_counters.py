"""CounterStore on Redis (redis-py's asyncio client), shared by every proxy process that points at the same server.

`add` is one Lua script, so its check-then-add is atomic across processes. Redis Cluster runs a script on one
node only: every key of one `add` (or `get`) call must hash to the same slot, so callers put one hash tag in all of
them, e.g. `budget:{<key id>}:tokens:day:20261124` and `budget:{<key id>}:requests:minute:202611240412`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cache.counters import Count
from cache.errors import StoreError

if TYPE_CHECKING:
    from cache.breaker import Breaker

T = TypeVar("T")

# KEYS: the counters. ARGV[1]: "1" to check limits; then per key: amount, limit ("" for none), expires_at (unix s).
# Reads every key first so a refused add writes nothing; EXPIREAT in the past deletes the key, which is right: its
# window is over.
_ADD = """
local values = {}
for i = 1, #KEYS do
    values[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
if ARGV[1] == '1' then
    for i = 1, #KEYS do
        local limit = tonumber(ARGV[3 * i])
        if limit ~= nil and values[i] + tonumber(ARGV[3 * i - 1]) > limit then
            return {0, values}
        end
    end
end
for i = 1, #KEYS do
    values[i] = math.max(0, values[i] + tonumber(ARGV[3 * i - 1]))
    redis.call('SET', KEYS[i], string.format('%d', values[i]))
    redis.call('EXPIREAT', KEYS[i], ARGV[3 * i + 1])
end
return {1, values}
"""


class RedisCounters:
    """CounterStore in Redis. Keys are `prefix + key`; each expires at the end of its count's window.

    The store owns `client` and closes it in `close`."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str = "cachecade:",
                 breaker: Breaker | None = None) -> None:  # fmt: skip
        self._client: Any = client  # Any: see RedisStore.client
        self._prefix = prefix
        self._add_script = client.register_script(_ADD)
        self._breaker = breaker  # shared with the RedisStore on the same server: fail fast while it is down

    @classmethod
    def from_url(cls, url: str, prefix: str = "cachecade:") -> RedisCounters:
        """Connect lazily (the first command opens the connection) to e.g. `redis://host:6379/0`."""
        return cls(redis.Redis.from_url(url), prefix)

    async def _run(self, call: Awaitable[T]) -> T:
        if self._breaker is not None:
            return await self._breaker.run(call)
        try:
            return await call
        except (RedisError, OSError) as exc:  # OSError covers the builtin ConnectionError and TimeoutError
            raise StoreError(f"budget counters in Redis: {exc}") from exc

    async def add(self, counts: Sequence[Count], *, check: bool) -> tuple[bool, list[int]]:
        """See `CounterStore.add`. All keys of one call must share one hash tag (see the module's docstring)."""
        if not counts:
            return True, []
        args: list[Any] = ["1" if check else "0"]
        for c in counts:
            args += [c.amount, "" if c.limit is None else c.limit, math.ceil(c.expires_at)]
        keys = [self._prefix + c.key for c in counts]
        ok, values = await self._run(self._add_script(keys=keys, args=args))
        return bool(ok), [int(v) for v in values]

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        values = await self._run(self._client.mget([self._prefix + k for k in keys]))
        return [0 if v is None else int(v) for v in values]

    async def purge(self, now: float) -> int:
        """Nothing to do: Redis drops each key itself at its EXPIREAT. Returns 0."""
        return 0

    async def close(self) -> None:
        await self._run(self._client.aclose())
