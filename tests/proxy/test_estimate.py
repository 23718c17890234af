"""Completion-length estimates: the neighbours' similarity-weighted median, else a class from the prompt."""

from __future__ import annotations

import pytest

from cache.response_cache import Neighbour
from proxy.estimate import (
    LONG_ANSWER,
    SHORT_ANSWER,
    WORKED_ANSWER,
    Estimate,
    from_neighbours,
    from_prompt,
    weighted_quantile,
)


@pytest.mark.parametrize(
    ("values", "weights", "q", "expected"),
    [
        ([10, 20, 30], [1, 1, 5], 0.5, 30),  # the heavy value wins the median
        ([30, 10, 20], [5, 1, 1], 0.5, 30),  # order of the input does not matter
        ([10, 20, 30], [5, 1, 1], 0.5, 10),
        ([1, 2, 3], [1, 1, 1], 0.5, 2),
        ([10, 20], [1, 1], 0.5, 10),  # an even split takes the lower value
        ([10, 20, 30], [1, 1, 1], 0.0, 10),
        ([10, 20, 30], [1, 1, 1], 1.0, 30),
        ([10, 20, 30, 40], [1, 1, 1, 1], 0.75, 30),
    ],
)
def test_weighted_quantile(values: list[float], weights: list[float], q: float, expected: float) -> None:
    assert weighted_quantile(values, weights, q) == expected


def test_weighted_quantile_needs_one_weight_per_value() -> None:
    with pytest.raises(ValueError):
        weighted_quantile([1, 2], [1], 0.5)


def test_no_neighbours_no_estimate() -> None:
    assert from_neighbours([]) is None


def test_neighbours_give_their_similarity_weighted_median() -> None:
    near = [Neighbour(0.95, 300), Neighbour(0.4, 20), Neighbour(0.4, 30)]
    assert from_neighbours(near) == Estimate(300, "neighbours", 3)  # 0.95 is more than half of 1.75
    far = [Neighbour(0.5, 300), Neighbour(0.9, 20), Neighbour(0.9, 30)]
    assert from_neighbours(far) == Estimate(30, "neighbours", 3)
    assert from_neighbours(far, q=0.1) == Estimate(20, "neighbours", 3)


def test_neighbour_estimate_is_at_least_one_token() -> None:
    assert from_neighbours([Neighbour(0.9, 0)]) == Estimate(1, "neighbours", 1)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (None, SHORT_ANSWER),
        ("", SHORT_ANSWER),
        ("What is the capital of France?", SHORT_ANSWER),
        ("Should I listen to jazz?", SHORT_ANSWER),  # 'list' only as a whole word
        ("How many legs does a spider have?", WORKED_ANSWER),
        ("What is 17 times 3?", WORKED_ANSWER),
        ("Why is the sky blue?", WORKED_ANSWER),
        ("Explain photosynthesis.", LONG_ANSWER),
        ("Write a story about 3 cats.", LONG_ANSWER),  # long form wins over worked
        ("SUMMARISE this article", LONG_ANSWER),
    ],
)
def test_prompt_classes(text: str | None, tokens: int) -> None:
    assert from_prompt(text) == Estimate(tokens, "prompt")


def test_class_sizes_are_ordered() -> None:
    assert (SHORT_ANSWER, WORKED_ANSWER, LONG_ANSWER) == (48, 192, 384)


def test_headers_say_the_figure_and_its_source() -> None:
    assert Estimate(30, "neighbours", 3).headers() == {
        "x-token-estimate": "30",
        "x-token-estimate-source": "neighbours;n=3",
    }
    assert Estimate(48, "prompt").headers() == {"x-token-estimate": "48", "x-token-estimate-source": "prompt"}
