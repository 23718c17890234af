"""Cache policy: thresholds, request cacheability, answer admission."""

from __future__ import annotations

from typing import Any

import pytest

from cache.policy import CachePolicy, admissible, uncacheable_reason


def test_defaults() -> None:
    policy = CachePolicy()
    assert policy.threshold == 0.95
    assert policy.threshold_for("any", "any") == 0.95
    assert policy.exact_enabled and policy.semantic_enabled and not policy.cache_tool_calls


def test_threshold_precedence() -> None:
    policy = CachePolicy(threshold=0.9, model_thresholds={"m": 0.8}, namespace_thresholds={"ns": 0.7})
    assert policy.threshold_for("m", "ns") == 0.7  # namespace wins over model
    assert policy.threshold_for("other", "ns") == 0.7
    assert policy.threshold_for("m", "other") == 0.8  # model wins over global
    assert policy.threshold_for("other", "other") == 0.9


def test_threshold_zero_is_respected() -> None:
    policy = CachePolicy(threshold=0.9, model_thresholds={"m": 0.0}, namespace_thresholds={"ns": 1.0})
    assert policy.threshold_for("m", "x") == 0.0
    assert policy.threshold_for("m", "ns") == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"threshold": -0.1},
        {"model_thresholds": {"m": 1.01}},
        {"namespace_thresholds": {"ns": -0.5}},
        {"ttl_s": 0},
        {"max_entries": 0},
        {"max_temperature": 2.5},
        {"top_k": 0},
        {"unknown_field": 1},
    ],
)
def test_invalid_policy_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CachePolicy(**kwargs)


def test_invalid_threshold_rejected_via_model_validate() -> None:
    with pytest.raises(ValueError, match="model_thresholds"):
        CachePolicy.model_validate({**CachePolicy().model_dump(), "model_thresholds": {"m": 3.0}})


def test_invalid_assignment_rejected() -> None:
    policy = CachePolicy()
    with pytest.raises(ValueError):
        policy.threshold = 2.0
    assert policy.threshold == 0.95


def base(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    "extra,reason",
    [
        ({}, None),
        ({"temperature": 1.0}, None),
        ({"temperature": 1.01}, "temperature"),
        ({"temperature": 2}, "temperature"),
        ({"n": 1}, None),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tools": []}, None),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": False}, None),
        ({"echo": True}, "logprobs"),
    ],
)
def test_uncacheable_reason(extra: dict[str, Any], reason: str | None) -> None:
    assert uncacheable_reason(base(**extra), CachePolicy()) == reason


def test_temperature_bound_follows_policy() -> None:
    assert uncacheable_reason(base(temperature=0.5), CachePolicy(max_temperature=0.2)) == "temperature"
    assert uncacheable_reason(base(temperature=0.2), CachePolicy(max_temperature=0.2)) is None


def test_tools_allowed_with_cache_tool_calls() -> None:
    policy = CachePolicy(cache_tool_calls=True)
    assert uncacheable_reason(base(tools=[{"type": "function", "function": {"name": "f"}}]), policy) is None
    assert uncacheable_reason(base(functions=[{"name": "f"}]), policy) is None
    assert uncacheable_reason(base(tools=[{"type": "function"}], n=3), policy) == "n"


def response(finish: str | None = "stop", message: dict[str, Any] | None = None, n: int = 1) -> dict[str, Any]:
    msg = message or {"role": "assistant", "content": "Paris."}
    return {
        "object": "chat.completion",
        "choices": [{"index": i, "message": msg, "finish_reason": finish} for i in range(n)],
    }


TOOL_MESSAGE = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}


def test_admissible_complete_answer() -> None:
    assert admissible(response(), CachePolicy())
    assert admissible({"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}, CachePolicy())


@pytest.mark.parametrize(
    "resp",
    [
        response(finish="length"),
        response(finish="content_filter"),
        response(finish=None),
        response(n=2),
        {"choices": []},
        {"object": "chat.completion"},
        {"error": {"message": "boom"}, "choices": response()["choices"]},
        {"choices": ["not a mapping"]},
    ],
    ids=["length", "content_filter", "unfinished", "two-choices", "no-choices", "missing", "error", "bad-choice"],
)
def test_not_admissible(resp: dict[str, Any]) -> None:
    assert not admissible(resp, CachePolicy())
    assert not admissible(resp, CachePolicy(cache_tool_calls=True))


def test_tool_calls_only_with_cache_tool_calls() -> None:
    tool_resp = response(finish="tool_calls", message=TOOL_MESSAGE)
    assert not admissible(tool_resp, CachePolicy())
    assert admissible(tool_resp, CachePolicy(cache_tool_calls=True))
    # tool calls under finish_reason "stop" are still tool calls
    stop_with_tools = response(finish="stop", message=TOOL_MESSAGE)
    assert not admissible(stop_with_tools, CachePolicy())
    assert admissible(stop_with_tools, CachePolicy(cache_tool_calls=True))
