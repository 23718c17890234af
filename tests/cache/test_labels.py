"""The rule that moves a threshold from labels (cache/labels.py): the Clopper-Pearson bound, tightening at once
on errors, loosening only to a threshold that enough labels certify, and never below the floor."""

from __future__ import annotations

import pytest

from cache.labels import Label, decide, upper_bound


def labels(*items: tuple[float, bool]) -> list[Label]:
    return [Label("semantic/cosine/n", score, good, "feedback", float(i)) for i, (score, good) in enumerate(items)]


def test_upper_bound_is_clopper_pearson() -> None:
    assert upper_bound(0, 0, 0.95) == 1.0
    assert upper_bound(0, 10, 0.95) == pytest.approx(1 - 0.05 ** (1 / 10))  # the k = 0 case in closed form
    assert upper_bound(0, 149, 0.95) <= 0.02 < upper_bound(0, 148, 0.95)  # 149 clean labels certify 2 %
    assert 0.03 < upper_bound(1, 100, 0.95) < 0.05  # 1 in 100: the bound, not the 1 % estimate
    assert upper_bound(5, 5, 0.95) == 1.0


def test_tightens_at_once_past_the_wrong_answers() -> None:
    seen = labels((0.91, True), (0.93, False), (0.95, True), (0.97, True))
    decision = decide(seen, current=0.90, delta=0.02, floor=0.90)
    assert decision.reason == "tightened" and 0.93 < decision.threshold <= 0.95  # just past the error at 0.93
    assert (decision.labels, decision.errors) == (2, 0)


def test_few_clean_labels_keep_the_threshold() -> None:
    decision = decide(labels(*[(0.96, True)] * 10), current=0.95, delta=0.02, floor=0.90)
    assert decision.reason == "kept" and decision.threshold == 0.95 and decision.bound > 0.02


def test_loosens_only_when_enough_labels_certify_it() -> None:
    below = [(0.92 + i * 1e-4, True) for i in range(100)]  # answers served at 0.92 before, all right
    above = [(0.97, True)] * 60
    few = decide(labels(*below[:50], *above), current=0.95, delta=0.02, floor=0.90)
    assert few.reason == "kept"  # 110 clean labels at 0.92 do not certify 2 % (149 needed)
    enough = decide(labels(*below, *above), current=0.95, delta=0.02, floor=0.90)
    assert enough.reason == "loosened" and enough.threshold == pytest.approx(0.92)
    assert enough.labels == 160 and enough.bound <= 0.02
    floored = decide(labels(*below, *above), current=0.95, delta=0.02, floor=0.94)
    assert floored.reason == "kept" and floored.threshold == 0.95  # never below the floor


def test_an_error_with_enough_labels_tightens_only_as_far_as_certified() -> None:
    clean_high = [(0.98 + i * 1e-5, True) for i in range(200)]  # 200 clean labels at 0.98: certified
    wrong = [(0.935, False), (0.94, True)]
    decision = decide(labels(*clean_high, *wrong), current=0.93, delta=0.02, floor=0.93)
    assert decision.reason == "tightened" and 0.935 < decision.threshold <= 0.94  # past the error, no further


def test_short_answers_are_judged_as_text_long_ones_are_left_to_the_embedder() -> None:
    from proxy.learning import short_answers_agree

    assert short_answers_agree("Paris.", "paris") is True
    assert short_answers_agree("Paris", "The capital of France is Paris.") is True  # the shorter inside
    assert short_answers_agree("Paris", "Rome") is False
    assert short_answers_agree("The capital of France is Paris.", "Paris is the capital of France.") is True
    assert short_answers_agree("The capital of Spain is Madrid.", "Paris is the capital of France.") is False
    assert short_answers_agree("8", "A spider has 8 legs.") is True
    assert short_answers_agree("8", "A spider has 18 legs.") is False  # whole words, not digits inside numbers
    assert short_answers_agree("", "Paris") is False
    long = "word " * 20
    assert short_answers_agree(long, long + "more") is None


def test_beta_quantile_matches_scipy() -> None:
    """cache.labels computes the Beta quantile itself (SciPy is not in the runtime image): it agrees with
    scipy.special.betaincinv over the counts learning sees, from a handful of labels to millions."""
    import numpy as np

    special = pytest.importorskip("scipy.special")  # installed with the dev tools (sentence-transformers needs it)
    from cache.labels import beta_quantile

    rng = np.random.default_rng(0)
    n = np.concatenate([np.arange(1, 60), rng.integers(60, 3_000_000, 400)])
    k = (rng.random(len(n)) * n * rng.random(len(n))).astype(int)
    k[:20], k[20:30] = 0, n[20:30] - 1  # no errors; all but one wrong
    a, b = k + 1.0, (n - k).astype(float)
    for confidence in (0.5, 0.9, 0.95, 0.99, 0.999):
        expected = special.betaincinv(a, b, confidence)
        assert np.allclose(beta_quantile(a, b, confidence), expected, rtol=1e-8, atol=0), confidence
