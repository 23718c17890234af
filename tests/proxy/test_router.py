"""The pre-generation router on vectors (proxy/router.py): conservative until a tier has a record, a skip when
neither the tier's record nor the query's neighbours say it will pass, labels and thresholds changing the
prediction, exploration, and offline seeds (the memory
shared through the entry stores: tests/cache/test_stores.py)."""

from __future__ import annotations

import numpy as np

from proxy.router import Router


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


NEAR, FAR = unit(1, 0.1, 0), unit(0, 0, 1)


def test_conservative_until_the_tier_has_a_record() -> None:
    router = Router(min_tries=5, min_similarity=0.8, explore=0.0)
    assert not router.skip("t", 0.7, NEAR)  # nothing known: tried
    for _ in range(4):
        router.record("t", unit(1, 0, 0), score=0.2, complete=True)
    assert not router.skip("t", 0.7, NEAR)  # four answers are not a record
    router.record("t", unit(1, 0, 0), score=0.2, complete=True)
    assert router.skip("t", 0.7, NEAR)  # five failed answers, nothing passed anywhere
    assert router.skip("t", 0.7, FAR)  # the tier's record decides where there are no neighbours
    assert not router.skip("t", 0.7, None)  # no embedding: tried
    assert not router.skip("other", 0.7, NEAR)  # per tier
    assert router.stats.skipped == {"t": 2}


def test_a_neighbour_that_passed_is_enough_to_try() -> None:
    router = Router(min_tries=5, min_similarity=0.8, explore=0.0)
    for _ in range(10):
        router.record("t", unit(0, 1, 0), score=0.2, complete=True)  # fails on one kind of question
    router.record("t", unit(1, 0, 0), score=0.9, complete=True)  # passes on another
    assert not router.skip("t", 0.7, NEAR) and router.skip("t", 0.7, unit(0, 1, 0.1))
    prediction = router.predict("t", 0.7, NEAR)
    assert prediction.neighbours == 1 and prediction.neighbours_passed == 1 and prediction.tries == 11
    router.record("t", unit(1, 0, 0), score=0.95, complete=False)  # cut off: does not pass at any threshold
    assert router.predict("t", 0.7, NEAR).neighbours_passed == 1


def test_labels_and_thresholds_change_the_prediction() -> None:
    router = Router(min_tries=3, min_similarity=0.8, explore=0.0)
    for i in range(3):
        router.record("t", unit(1, 0, 0), score=0.9, complete=True, request_id=f"r{i}")
    assert not router.skip("t", 0.7, NEAR)  # all three passed the gate
    for i in range(3):
        assert router.label("t", f"r{i}", right=False)  # ... and were wrong
    assert router.skip("t", 0.7, NEAR)  # the router skips a tier after labelled failures
    assert not router.label("t", "unknown", right=True) and router.stats.labels["unmatched"] == 1
    for i in range(3):
        router.label("t", f"r{i}", right=True)  # labels change: tried again
    assert not router.skip("t", 0.7, NEAR)
    assert router.skip("t", 0.95, NEAR)  # a stricter gate: the same scores no longer pass
    assert not router.skip("t", 0.5, NEAR)


def test_exploration_tries_a_share_of_the_skips() -> None:
    router = Router(min_tries=3, explore=0.5, seed=0)
    for _ in range(3):
        router.record("t", unit(1, 0, 0), score=0.1, complete=True)
    decisions = [router.skip("t", 0.7, unit(1, 0, 0)) for _ in range(200)]
    assert 60 < decisions.count(False) < 140 and router.stats.explored["t"] == decisions.count(False)


def test_seeded_from_an_offline_run() -> None:
    router = Router(min_tries=4, min_similarity=0.8, explore=0.0)
    vectors = np.stack([unit(1, 0, 0), unit(1, 0.05, 0)] + [unit(0, 1, 0.01 * i) for i in range(8)])
    right = [True, True] + [False] * 8
    router.seed("t", vectors, scores=[0.9] * 10, complete=[True] * 10, right=right)
    assert not router.skip("t", 0.5, NEAR) and router.skip("t", 0.5, unit(0, 1, 0.02))
