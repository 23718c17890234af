"""Token budgets and rate limits per API key: limits per window, an atomic reservation before a call (with the
estimate), reconciliation after it (with what was spent), and OpenAI's x-ratelimit-* headers.

A key's token budget counts the tokens of the answers it is served by a model (prompt + completion, local or
upstream). Cache hits cost nothing (their tokens are reported as saved, never counted twice), and the tokens a
local tier spends on an answer it passes on (escalation, extra self-consistency samples) are the proxy's own
cost, shown in /admin/stats but not billed to the key.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cache.counters import Count, CounterStore
from cache.errors import StoreError
from proxy.errors import ProxyError

log = logging.getLogger("cachecade.budget")
Window = Literal["minute", "day", "month"]
_KEY_ID = re.compile(r"^(k-[0-9a-f]{24}|anonymous)$")
_ABBREVIATION = {"minute": "TPM", "day": "TPD", "month": "TPMo"}


Limit = Annotated[int, Field(strict=True, ge=1, le=2**62)]  # counted in 64-bit integers (Redis INCRBY, SQLite)
TokenCount = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]  # a max_tokens: a C int in llama.cpp


class KeyLimits(BaseModel):
    """One key's limits; None = unlimited."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tokens_per_minute: Limit | None = None
    tokens_per_day: Limit | None = None
    tokens_per_month: Limit | None = None
    requests_per_minute: Limit | None = None

    def token_limits(self) -> list[tuple[Window, int]]:
        windows: list[tuple[Window, int | None]] = [
            ("minute", self.tokens_per_minute), ("day", self.tokens_per_day), ("month", self.tokens_per_month)
        ]  # fmt: skip
        return [(w, limit) for w, limit in windows if limit is not None]

    @property
    def limited(self) -> bool:
        return bool(self.token_limits()) or self.requests_per_minute is not None


class BudgetPolicy(BaseModel):
    """Limits per key id (`cachecade key-id KEY` prints a key's id; keys themselves are never stored), the
    default for keys without their own, and how decoding plans for a budget. Changeable at run time."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keys: dict[str, KeyLimits] = Field(default_factory=dict)
    default: KeyLimits = Field(default_factory=KeyLimits)
    clamp_factor: Annotated[float, Field(gt=0, le=1000)] | None = None  # max_tokens <= factor x estimated length
    clamp_min_tokens: TokenCount = 16  # the clamp never goes below this
    default_max_tokens: TokenCount = 4096  # the cap of a limited key's request that sets no max_tokens
    hint_routes: list[str] = Field(default_factory=list)  # requested models whose prompts state the budget (TALE)

    @field_validator("keys")
    @classmethod
    def _key_ids(cls, keys: dict[str, KeyLimits]) -> dict[str, KeyLimits]:
        for key_id in keys:
            if not _KEY_ID.match(key_id):
                raise ValueError(
                    f"{key_id!r} is not a key id: budgets are set per key id ('k-' and 24 hex digits, printed by "
                    "`cachecade key-id KEY`) or 'anonymous'"
                )
        return keys

    def limits_for(self, key_id: str) -> KeyLimits:
        return self.keys.get(key_id, self.default)


def window_span(window: Window, now: float) -> tuple[str, float]:
    """The label of the window holding `now` (UTC) and the time it ends."""
    if window == "minute":
        start = math.floor(now / 60) * 60
        return f"{int(start)}", start + 60.0
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if window == "day":
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
        return day.strftime("%Y%m%d"), end.timestamp()
    next_month = dt.datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=dt.UTC)
    return day.strftime("%Y%m"), next_month.timestamp()


def duration(seconds: float) -> str:
    """OpenAI's reset format: '59s', '6m0s', '23h59m59s' (whole seconds, rounded up)."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Usage:
    """One limited counter of a key in its current window."""

    what: Literal["tokens", "requests"]
    window: Window
    limit: int
    used: int
    key: str
    resets_at: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def headers(self, now: float) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{self.what}": str(self.limit),
            f"x-ratelimit-remaining-{self.what}": str(self.remaining),
            f"x-ratelimit-reset-{self.what}": duration(self.resets_at - now),
        }


class RateLimited(ProxyError):
    """A key went over one of its limits (429, OpenAI's shape)."""

    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"


@dataclass
class Ticket:
    """One request's standing with its key's limits: what it reserved and what is left."""

    key_id: str
    limits: KeyLimits
    tokens: list[Usage] = field(default_factory=list)
    requests: Usage | None = None
    reserved: int = 0

    @property
    def remaining_tokens(self) -> int | None:
        """Tokens left in the tightest window (None when the key has no token limit)."""
        return min((u.remaining for u in self.tokens), default=None)

    def headers(self, now: float) -> dict[str, str]:
        """x-ratelimit-* for the tightest token window and for requests, on every response to a limited key."""
        out = self.requests.headers(now) if self.requests else {}
        if self.tokens:
            out.update(min(self.tokens, key=lambda u: u.remaining).headers(now))
        return out


class Budgets:
    """Checks, reserves and reconciles token budgets and request rates per key, on a CounterStore."""

    def __init__(self, counters: CounterStore, policy: BudgetPolicy, clock: Callable[[], float]) -> None:
        self.counters = counters
        self.policy = policy
        self.clock = clock
        self.errors = 0  # counter operations that failed (the requests went on unmetered)

    def _usage(self, key_id: str, what: Literal["tokens", "requests"], window: Window, limit: int) -> Usage:
        label, end = window_span(window, self.clock())
        # One hash tag per key id: every counter of a key lands in one Redis Cluster slot (one atomic script).
        return Usage(what, window, limit, 0, f"budget:{{{key_id}}}:{what}:{window}:{label}", end)

    def _ticket(self, key_id: str) -> Ticket:
        limits = self.policy.limits_for(key_id)
        ticket = Ticket(key_id, limits)
        ticket.tokens = [self._usage(key_id, "tokens", w, limit) for w, limit in limits.token_limits()]
        if limits.requests_per_minute is not None:
            ticket.requests = self._usage(key_id, "requests", "minute", limits.requests_per_minute)
        return ticket

    async def _read(self, usages: Sequence[Usage]) -> None:
        if usages:
            for usage, used in zip(usages, await self.counters.get([u.key for u in usages]), strict=True):
                usage.used = used

    async def peek(self, key_id: str) -> Ticket:
        """A key's limits and usage in the current windows, counting nothing (for the admin API)."""
        ticket = self._ticket(key_id)
        await self._read([*ticket.tokens, *([ticket.requests] if ticket.requests else [])])
        return ticket

    def _failed_open(self, ticket: Ticket, exc: StoreError) -> Ticket:
        """Fail open: counters we cannot reach limit nothing (the request goes on, unmetered, without headers)."""
        self.errors += 1
        log.warning("budget counters unavailable, %s not metered: %s", ticket.key_id, exc)
        ticket.tokens, ticket.requests, ticket.reserved = [], None, 0
        return ticket

    async def open(self, key_id: str) -> Ticket:
        """Count the request against the key's request rate (429 when over it) and read its token usage."""
        ticket = self._ticket(key_id)
        try:
            await self._open(ticket)
        except StoreError as exc:
            return self._failed_open(ticket, exc)
        return ticket

    async def _open(self, ticket: Ticket) -> None:
        rpm = ticket.requests
        if rpm is None:
            await self._read(ticket.tokens)
            return
        # One round trip: the request counted and the token windows read (an amount of 0 with no limit changes
        # nothing and is never refused), so a 429's token headers tell the truth too.
        reads = [Count(u.key, 0, None, u.resets_at) for u in ticket.tokens]
        ok, values = await self.counters.add([Count(rpm.key, 1, rpm.limit, rpm.resets_at), *reads], check=True)
        for usage, used in zip([rpm, *ticket.tokens], values, strict=True):
            usage.used = used
        if not ok:
            raise self._refusal(ticket, rpm, 1, "requests")

    async def reserve(self, ticket: Ticket, tokens: int) -> None:
        """Reserve tokens in every window at once, or raise RateLimited naming the window that is short."""
        if not ticket.tokens:
            return
        counts = [Count(u.key, tokens, u.limit, u.resets_at) for u in ticket.tokens]
        try:
            ok, values = await self.counters.add(counts, check=True)
        except StoreError as exc:
            self._failed_open(ticket, exc)
            return
        for usage, used in zip(ticket.tokens, values, strict=True):
            usage.used = used
        if not ok:
            # The window that frees up last: retrying before it ends is refused again.
            short = max((u for u in ticket.tokens if u.used + tokens > u.limit), key=lambda u: u.resets_at)
            raise self._refusal(ticket, short, tokens, "tokens")
        ticket.reserved = tokens

    async def settle(self, ticket: Ticket, spent: int) -> None:
        """Replace the reservation by what was spent (a refund when less, never refused when more)."""
        delta, ticket.reserved = spent - ticket.reserved, 0
        if not ticket.tokens or delta == 0:
            return
        try:
            _, values = await self.counters.add([Count(u.key, delta, None, u.resets_at) for u in ticket.tokens],
                                                check=False)  # fmt: skip
        except StoreError as exc:
            self.errors += 1
            log.warning("budget counters unavailable, %d tokens of %s not settled: %s", delta, ticket.key_id, exc)
            return
        for usage, used in zip(ticket.tokens, values, strict=True):
            usage.used = used

    def _refusal(self, ticket: Ticket, usage: Usage, asked: int, what: str) -> RateLimited:
        now = self.clock()
        name = _ABBREVIATION[usage.window] if what == "tokens" else "RPM"
        per = "tokens" if what == "tokens" else "requests"
        message = (
            f"Rate limit reached for key {ticket.key_id} on {per} per {usage.window} ({name}): Limit {usage.limit}, "
            f"Used {usage.used}, Requested {asked}. Please try again in {duration(usage.resets_at - now)}."
        )
        headers = {**ticket.headers(now), "retry-after": str(max(1, math.ceil(usage.resets_at - now)))}
        error = RateLimited(message, param=None, headers=headers)
        error.type = per
        return error
