"""Token budgets and request rates per key on real SQLite counters, with a fake clock for the windows."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from cache.counters import SQLiteCounters
from cache.errors import StoreError
from proxy.budget import BudgetPolicy, Budgets, KeyLimits, RateLimited, Ticket, duration, window_span

KEY_A = "k-" + "a" * 24
KEY_B = "k-" + "b" * 24
# 2026-11-24 12:00:30 UTC: half a minute into a minute, 11h59m30s before the day ends.
T0 = dt.datetime(2026, 11, 24, 12, 0, 30, tzinfo=dt.UTC).timestamp()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def counters(tmp_path: Path, clock: Clock) -> AsyncIterator[SQLiteCounters]:
    store = await SQLiteCounters.open(tmp_path / "b.sqlite3", clock)
    yield store
    await store.close()


def budgets_for(counters: SQLiteCounters, clock: Clock, **limits: int) -> Budgets:
    """Budgets where KEY_A has `limits` and every other key is unlimited."""
    return Budgets(counters, BudgetPolicy(keys={KEY_A: KeyLimits(**limits)}), clock)


async def used(budgets: Budgets, key_id: str = KEY_A) -> dict[str, int]:
    ticket = await budgets.peek(key_id)
    return {u.window: u.used for u in ticket.tokens}


async def refused(budgets: Budgets, tokens: int, key_id: str = KEY_A) -> RateLimited:
    ticket = await budgets.open(key_id)
    with pytest.raises(RateLimited) as caught:
        await budgets.reserve(ticket, tokens)
    return caught.value


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-3, "0s"), (0.2, "1s"), (59, "59s"), (59.01, "1m0s"), (360, "6m0s"), (3600, "1h0m0s"),
     (86399, "23h59m59s")],
)  # fmt: skip
def test_duration_in_openai_reset_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


def test_window_spans_are_utc_minutes_days_and_months() -> None:
    minute_start = utc(2026, 11, 24, 12, 0)
    assert window_span("minute", T0) == (str(int(minute_start)), minute_start + 60)
    assert window_span("minute", minute_start + 60) == (str(int(minute_start + 60)), minute_start + 120)
    assert window_span("day", T0) == ("20261124", utc(2026, 11, 25))
    assert window_span("day", utc(2026, 11, 24, 23, 59, 59)) == ("20261124", utc(2026, 11, 25))
    assert window_span("month", T0) == ("202611", utc(2026, 12, 1))
    assert window_span("month", utc(2026, 2, 28, 23, 0)) == ("202602", utc(2026, 3, 1))


def test_month_window_of_december_ends_on_january_first_of_next_year() -> None:
    assert window_span("month", utc(2026, 12, 31, 23, 59, 59)) == ("202612", utc(2027, 1, 1))
    assert window_span("month", utc(2027, 1, 1)) == ("202701", utc(2027, 2, 1))


@pytest.mark.parametrize("raw", ["sk-abc", "k-" + "A" * 24, "k-" + "a" * 23, "Anonymous"])
def test_policy_refuses_what_is_not_a_key_id(raw: str) -> None:
    with pytest.raises(ValidationError, match="cachecade key-id"):
        BudgetPolicy(keys={raw: KeyLimits(tokens_per_day=10)})


def test_policy_accepts_key_ids_and_anonymous_and_refuses_bad_limits() -> None:
    policy = BudgetPolicy(keys={KEY_A: KeyLimits(tokens_per_day=10), "anonymous": KeyLimits(requests_per_minute=1)})
    assert policy.limits_for(KEY_A).tokens_per_day == 10
    assert policy.limits_for(KEY_B) == policy.default == KeyLimits()
    with pytest.raises(ValidationError):
        KeyLimits(tokens_per_day=0)
    with pytest.raises(ValidationError):
        KeyLimits(tokens_per_dya=10)  # type: ignore[call-arg]
    assert not KeyLimits().limited and KeyLimits(requests_per_minute=1).limited


async def test_limits_are_per_key_and_isolated(counters: SQLiteCounters, clock: Clock) -> None:
    limits = KeyLimits(tokens_per_day=1000)
    budgets = Budgets(counters, BudgetPolicy(keys={KEY_A: limits, KEY_B: limits}), clock)
    await budgets.reserve(await budgets.open(KEY_A), 1000)
    await refused(budgets, 1, KEY_A)
    ticket_b = await budgets.open(KEY_B)
    assert ticket_b.remaining_tokens == 1000
    await budgets.reserve(ticket_b, 1000)
    assert await used(budgets, KEY_A) == await used(budgets, KEY_B) == {"day": 1000}


async def test_key_without_own_limits_gets_the_policy_default(counters: SQLiteCounters, clock: Clock) -> None:
    policy = BudgetPolicy(keys={KEY_A: KeyLimits(tokens_per_day=5000)}, default=KeyLimits(tokens_per_day=100))
    budgets = Budgets(counters, policy, clock)
    ticket = await budgets.open(KEY_B)
    assert ticket.limits == KeyLimits(tokens_per_day=100)
    await budgets.reserve(ticket, 100)
    error = await refused(budgets, 1, KEY_B)
    assert "Limit 100, Used 100, Requested 1" in error.message
    assert (await budgets.open(KEY_A)).remaining_tokens == 5000  # its own limit, and untouched


async def test_unlimited_key_reserves_nothing_and_gets_no_headers(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_day=10)
    ticket = await budgets.open(KEY_B)
    await budgets.reserve(ticket, 10**9)
    await budgets.settle(ticket, 10**9)
    assert ticket.tokens == [] and ticket.requests is None and ticket.reserved == 0
    assert ticket.remaining_tokens is None and ticket.headers(clock()) == {}
    assert counters.db.execute("SELECT COUNT(*) FROM counters").fetchone() == (0,)


async def test_reserve_past_the_limit_is_a_429_naming_window_and_numbers(
    counters: SQLiteCounters, clock: Clock
) -> None:
    budgets = budgets_for(counters, clock, tokens_per_day=1000)
    await budgets.reserve(await budgets.open(KEY_A), 900)
    error = await refused(budgets, 200)
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert error.message == (
        f"Rate limit reached for key {KEY_A} on tokens per day (TPD): Limit 1000, Used 900, Requested 200. "
        "Please try again in 11h59m30s."
    )
    assert error.headers == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "11h59m30s",
        "retry-after": str(11 * 3600 + 59 * 60 + 30),
    }
    assert error.body()["error"]["code"] == "rate_limit_exceeded"
    assert await used(budgets) == {"day": 900}  # a refused reservation changes nothing


async def test_refusal_names_the_window_that_is_short(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_minute=500, tokens_per_day=600, tokens_per_month=10_000)
    await budgets.reserve(await budgets.open(KEY_A), 450)
    assert "(TPM): Limit 500, Used 450, Requested 100" in (await refused(budgets, 100)).message
    clock.now += 60
    error = await refused(budgets, 200)
    assert "tokens per day (TPD): Limit 600, Used 450, Requested 200" in error.message
    assert await used(budgets) == {"minute": 0, "day": 450, "month": 450}


async def test_retry_after_waits_for_every_short_window(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_minute=1000, tokens_per_day=1000)
    await budgets.reserve(await budgets.open(KEY_A), 900)
    error = await refused(budgets, 200)  # short in both windows: retrying after the minute cannot succeed
    assert "(TPD)" in error.message and error.headers["retry-after"] == str(11 * 3600 + 59 * 60 + 30)


async def test_settle_refunds_and_charges_beyond_the_reservation(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_minute=5000, tokens_per_day=1000)
    ticket = await budgets.open(KEY_A)
    await budgets.reserve(ticket, 500)
    assert ticket.reserved == 500
    await budgets.settle(ticket, 200)
    assert ticket.reserved == 0 and await used(budgets) == {"minute": 200, "day": 200}
    ticket = await budgets.open(KEY_A)
    await budgets.reserve(ticket, 300)
    await budgets.settle(ticket, 1200)  # spent more than reserved and than the limit: charged, never refused
    assert await used(budgets) == {"minute": 1400, "day": 1400}
    assert ticket.remaining_tokens == 0
    await refused(budgets, 1)


async def test_settle_without_reservation_charges_what_was_spent(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_day=1000)
    ticket = await budgets.open(KEY_A)
    await budgets.settle(ticket, 70)
    await budgets.settle(ticket, 0)  # nothing reserved, nothing spent: no change
    assert await used(budgets) == {"day": 70}


async def test_minute_window_resets_when_the_clock_crosses_the_minute(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_minute=100, tokens_per_day=1000)
    await budgets.reserve(await budgets.open(KEY_A), 100)
    clock.now += 29.9  # still 12:00
    error = await refused(budgets, 1)
    assert "(TPM)" in error.message and error.headers["retry-after"] == "1"
    clock.now += 0.1  # 12:01:00
    await budgets.reserve(await budgets.open(KEY_A), 100)
    assert await used(budgets) == {"minute": 100, "day": 200}  # the day kept counting


async def test_day_window_resets_at_midnight_utc(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_day=100, tokens_per_month=1000)
    await budgets.reserve(await budgets.open(KEY_A), 100)
    clock.now = utc(2026, 11, 24, 23, 59, 59)
    await refused(budgets, 1)
    clock.now = utc(2026, 11, 25)
    await budgets.reserve(await budgets.open(KEY_A), 100)
    assert await used(budgets) == {"day": 100, "month": 200}


async def test_requests_per_minute_refuses_the_extra_request(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, requests_per_minute=3)
    for _ in range(3):
        await budgets.open(KEY_A)
    with pytest.raises(RateLimited) as caught:
        await budgets.open(KEY_A)
    error = caught.value
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert "requests per minute (RPM): Limit 3, Used 3, Requested 1. Please try again in 30s." in error.message
    assert error.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30s",
        "retry-after": "30",
    }
    peeked = await budgets.peek(KEY_A)
    assert peeked.requests is not None and peeked.requests.used == 3  # the refused one was not counted
    clock.now += 30
    assert (await budgets.open(KEY_A)).requests is not None
    assert (await budgets.peek(KEY_A)).requests.used == 1  # type: ignore[union-attr]


async def test_peek_counts_nothing(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, requests_per_minute=1, tokens_per_day=10)
    for _ in range(5):
        await budgets.peek(KEY_A)
    ticket = await budgets.open(KEY_A)
    assert ticket.requests is not None and ticket.requests.used == 1


async def test_requests_refusal_reports_real_token_usage(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, requests_per_minute=1, tokens_per_day=1000)
    await budgets.reserve(await budgets.open(KEY_A), 600)
    with pytest.raises(RateLimited) as caught:
        await budgets.open(KEY_A)
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "400"


async def test_concurrent_reservations_never_overspend(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_day=1000)

    async def one() -> None:
        await budgets.reserve(await budgets.open(KEY_A), 100)

    results = await asyncio.gather(*(one() for _ in range(30)), return_exceptions=True)
    assert sum(r is None for r in results) == 10
    assert all(isinstance(r, RateLimited) for r in results if r is not None)
    assert await used(budgets) == {"day": 1000}


async def test_two_processes_sharing_the_file_never_overspend(
    tmp_path: Path, counters: SQLiteCounters, clock: Clock
) -> None:
    other = await SQLiteCounters.open(tmp_path / "b.sqlite3", clock)  # its own connection and writer thread
    try:
        sides = [budgets_for(counters, clock, tokens_per_day=1000), budgets_for(other, clock, tokens_per_day=1000)]

        async def one(budgets: Budgets) -> None:
            await budgets.reserve(await budgets.open(KEY_A), 100)

        results = await asyncio.gather(*(one(sides[i % 2]) for i in range(40)), return_exceptions=True)
        assert sum(r is None for r in results) == 10
        assert await used(sides[0]) == await used(sides[1]) == {"day": 1000}
    finally:
        await other.close()


async def test_ticket_headers_report_the_tightest_token_window(counters: SQLiteCounters, clock: Clock) -> None:
    budgets = budgets_for(counters, clock, tokens_per_minute=500, tokens_per_day=600, requests_per_minute=10)
    ticket = await budgets.open(KEY_A)
    await budgets.reserve(ticket, 400)
    assert ticket.remaining_tokens == 100
    assert ticket.headers(clock()) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "30s",
    }
    clock.now += 60
    ticket = await budgets.open(KEY_A)
    await budgets.reserve(ticket, 150)
    headers = ticket.headers(clock())
    assert ticket.remaining_tokens == 50
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("600", "50")
    assert headers["x-ratelimit-reset-tokens"] == "11h58m30s"


def test_ticket_without_limits_has_no_headers() -> None:
    assert Ticket(KEY_A, KeyLimits()).headers(T0) == {}


class BrokenCounters:
    """A counter store whose server is gone: every call fails the way a real one does."""

    async def add(self, counts: object, *, check: bool) -> tuple[bool, list[int]]:
        raise StoreError("connection refused")

    async def get(self, keys: object) -> list[int]:
        raise StoreError("connection refused")

    async def purge(self, now: float) -> int:
        raise StoreError("connection refused")

    async def close(self) -> None:
        return None


async def test_unreachable_counters_fail_open(clock: Clock) -> None:
    budgets = Budgets(BrokenCounters(), BudgetPolicy(default=KeyLimits(tokens_per_day=10, requests_per_minute=1)),
                      clock)  # fmt: skip
    for _ in range(3):  # past both limits: nothing is refused, nothing is metered, no headers claim a standing
        ticket = await budgets.open(KEY_A)
        await budgets.reserve(ticket, 500)
        await budgets.settle(ticket, 600)
        assert ticket.headers(clock()) == {} and ticket.remaining_tokens is None
    assert budgets.errors == 3
