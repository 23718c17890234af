"""Budget-aware decoding: how many samples a budget pays for, and the TALE hint in the prompt."""

from __future__ import annotations

import copy
import itertools
import math

import pytest

from local_models.budget import TALE_HINT, VOTE_MARGIN, DecodingPlan, plan_decoding, with_hint

HINT = "Let's think step by step and use less than 50 tokens:"


@pytest.mark.parametrize(("k_max", "cap", "estimate"), [(5, 256, 100), (1, 64, None), (3, 4096, None)])
def test_no_budget_decodes_as_configured(k_max: int, cap: int, estimate: int | None) -> None:
    assert plan_decoding(k_max, cap, None, estimate) == DecodingPlan(k_max, cap)


@pytest.mark.parametrize(
    ("k_max", "cap", "budget", "estimate", "plan"),
    [
        (5, 256, 100, 100, DecodingPlan(1, 100)),  # 100 < 1.5 x 100: one greedy answer, capped by the budget
        (5, 64, 100, 100, DecodingPlan(1, 64)),  # ... and by the cap
        (5, 512, 1000, None, DecodingPlan(1, 512)),  # no estimate: a sample is assumed to need the cap
        (1, 256, 10_000, 10, DecodingPlan(1, 256)),  # a single-sample tier stays single
        (1, 256, 30, 10, DecodingPlan(1, 30)),
        (5, 512, 400, 100, DecodingPlan(2, 200)),  # 400 // 150 = 2 samples sharing the budget
        (5, 512, 1000, 100, DecodingPlan(5, 200)),
        (3, 512, 10_000, 100, DecodingPlan(3, 512)),  # k never above k_max, each sample at most the cap
    ],
)
def test_plans_for_a_budget(k_max: int, cap: int, budget: int, estimate: int | None, plan: DecodingPlan) -> None:
    assert plan_decoding(k_max, cap, budget, estimate) == plan


def test_samples_share_the_budget_and_each_affords_the_estimate() -> None:
    grid = itertools.product(
        [1, 2, 3, 5, 8], [16, 100, 512], [1, 10, 149, 150, 151, 299, 300, 1000, 5000], [None, 1, 50, 100]
    )
    for k_max, cap, budget, estimate in grid:
        plan = plan_decoding(k_max, cap, budget, estimate)
        where = (k_max, cap, budget, estimate, plan)
        assert 1 <= plan.samples <= k_max, where
        assert 1 <= plan.max_tokens <= min(cap, budget), where
        if plan.samples > 1:
            assert plan.samples * plan.max_tokens <= budget, where
            assert plan.max_tokens == min(cap, budget // plan.samples), where
            assert budget // plan.samples >= math.ceil(VOTE_MARGIN * (estimate or min(cap, budget))), where


def test_chat_hint_goes_after_the_last_user_turn_only() -> None:
    body = {
        "model": "smollm2",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Thinking..."},
        ],
    }
    before = copy.deepcopy(body)
    out = with_hint("chat", body, 50)
    assert body == before  # the caller's body and its messages are not touched
    assert out["messages"][3] == {"role": "user", "content": f"And 3+3?\n{HINT}"}
    assert [m for i, m in enumerate(out["messages"]) if i != 3] == [m for i, m in enumerate(body["messages"]) if i != 3]
    assert {k: v for k, v in out.items() if k != "messages"} == {"model": "smollm2", "temperature": 0}


def test_chat_without_user_turn_is_unchanged() -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}]}
    assert with_hint("chat", body, 50) == body
    assert with_hint("chat", {"model": "x"}, 50) == {"model": "x", "messages": []}


def test_hint_never_goes_to_an_earlier_user_turn() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
        ]
    }
    assert with_hint("chat", body, 50)["messages"][0] == {"role": "user", "content": "What is 2+2?"}


def test_completion_hint_goes_after_the_prompt() -> None:
    body = {"model": "gemma", "prompt": "Q: What is 17 times 3?\nA:", "max_tokens": 50}
    before = copy.deepcopy(body)
    out = with_hint("completion", body, 50)
    assert out == {**body, "prompt": f"Q: What is 17 times 3?\nA:\n{HINT}"}
    assert body == before


def test_completion_with_token_prompt_is_unchanged() -> None:
    body = {"prompt": [1, 2, 3]}
    assert with_hint("completion", body, 50) == body


def test_hint_text_is_tales() -> None:
    assert TALE_HINT.format(budget=50) == HINT
