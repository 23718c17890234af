"""A circuit breaker for a shared store: fail fast while it is unreachable instead of waiting on every call."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from redis.exceptions import RedisError

from cache.errors import StoreError

T = TypeVar("T")
MAX_BACKOFF_S = 10.0


class Breaker:
    """Fail fast while Redis is unreachable: after a failure, calls raise StoreError at once for a backoff that
    doubles (0.25 s up to MAX_BACKOFF_S); the first call after it tries the network again."""

    def __init__(self) -> None:
        self.errors = 0
        self._backoff = 0.0
        self._down_until = 0.0
        self._last_error = ""

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def check(self) -> None:
        """Raise StoreError at once while backing off."""
        now = time.monotonic()
        if now < self._down_until:
            raise StoreError(f"Redis unavailable ({self._last_error}), retrying in {self._down_until - now:.1f}s")

    def failed(self, exc: BaseException) -> StoreError:
        """Record a failure (start or lengthen the backoff); returns the StoreError to raise."""
        self.errors += 1
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2 or 0.25)
        self._down_until = time.monotonic() + self._backoff
        self._last_error = f"{type(exc).__name__}: {exc}"  # said while backing off: why Redis is not used
        return StoreError(f"Redis: {exc}")

    async def run(self, call: Awaitable[T]) -> T:
        try:
            self.check()
        except StoreError:
            if hasattr(call, "close"):
                call.close()  # the coroutine never runs
            raise
        try:
            result = await call
        except (RedisError, OSError) as exc:
            raise self.failed(exc) from exc
        self._backoff = 0.0
        return result
