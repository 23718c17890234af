"""Confidence signals: scores, degenerate output, answer normalisation and self-consistency votes."""

from __future__ import annotations

import math

import pytest

from local_models.confidence import Confidence, assess, degenerate_reason, normalise_answer, vote, vote_decided
from local_models.engine import Generation


def gen(text: str, logprobs: list[float], finish: str = "stop") -> Generation:
    return Generation(text, logprobs, finish, 10, 0.01)  # type: ignore[arg-type]


def test_score_is_the_geometric_mean_probability() -> None:
    c = assess(gen("Paris", [math.log(0.9), math.log(0.4)]))
    assert c.score == pytest.approx(0.6) and c.min_prob == pytest.approx(0.4) and c.degenerate is None
    assert Confidence(-1.0, -2.0, agreement=0.8, samples=5).score == 0.8


def test_degenerate_outputs() -> None:
    assert degenerate_reason("") == "empty" and degenerate_reason("  \n") == "empty"
    assert degenerate_reason("la Femme, " * 12) == "repetition"
    assert degenerate_reason("!" * 40) == "repetition"
    assert degenerate_reason("The capital of France is Paris, a city on the Seine with many museums.") is None
    assert assess(gen("", [])).degenerate == "empty"


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The answer is 1,200.", "1200"),
        ("3.50 dollars", "3.5"),
        ("The Eiffel Tower!", "eiffel tower"),
        ("-4", "-4"),
        ("5 pens cost 5 x 2 = 10 dollars, so she pays 10.", "10"),
    ],
)
def test_normalise_answer(text: str, normal: str) -> None:
    assert normalise_answer(text) == normal


def test_vote_and_early_stop() -> None:
    assert vote(["It is 7.", "7", "8"]) == (0, pytest.approx(2 / 3))
    assert vote(["7", "7"], total=5) == (0, pytest.approx(0.4))  # untaken samples count as dissent
    assert vote(["", ""]) == (0, 0.0)
    assert vote_decided(["7", "7", "7"], total=5)  # 3 of 5 already agree: 2 more cannot change it
    assert not vote_decided(["7", "8"], total=5)
