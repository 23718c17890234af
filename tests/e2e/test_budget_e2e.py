"""End to end: token budgets with the official openai client -> cachecade (uvicorn) -> llama.cpp server (SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import Callable

import openai
import pytest

from proxy.context import key_id
from tests.e2e.conftest import Proxy

pytestmark = pytest.mark.e2e
KEY, OTHER = "sk-e2e-budget-0123456789", "sk-e2e-other-0123456789"
GEN = {"model": "smollm2", "temperature": 0, "stop": ["\n"]}


def client(proxy: Proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key=key, max_retries=0)


def test_budget_is_enforced_with_the_real_upstreams_usage(
    start_test_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    limits = json.dumps({key_id(KEY): {"tokens_per_day": 120}})
    proxy = start_test_proxy(tmp_path_factory.mktemp("budget") / "data", upstream_base_url=llama_upstream,
                        key_limits=limits)  # fmt: skip
    c = client(proxy, KEY)
    messages = [{"role": "user", "content": "Name a colour."}]
    first = c.chat.completions.with_raw_response.create(messages=messages, max_tokens=16, **GEN)  # type: ignore[call-overload]
    answer = first.parse()
    spent = answer.usage.prompt_tokens + answer.usage.completion_tokens  # what llama.cpp's server reported
    assert first.headers["x-ratelimit-limit-tokens"] == "120"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 120 - spent
    # The per-request budget reaches the upstream as max_tokens, through extra_body.
    capped = c.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        extra_body={"token_budget": 3},
        **GEN,
    )
    assert capped.headers["x-token-cap"] == "3" and capped.parse().usage.completion_tokens <= 3
    with pytest.raises(openai.RateLimitError) as refused:
        for i in range(20):
            c.chat.completions.create(messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16, **GEN)
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and "Limit 120" in error.message
    assert error.response.headers["x-ratelimit-limit-tokens"] == "120"
    other = client(proxy, OTHER).chat.completions.create(messages=messages, max_tokens=16, **GEN)
    assert other.choices[0].message.content is not None  # another key is not limited by this one
