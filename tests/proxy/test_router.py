"""The pre-generation router on vectors (proxy/router.py): conservative without neighbours, a skip after enough
failed neighbours, exploration, and forgetting when the gate changes."""

from __future__ import annotations

import numpy as np

from proxy.router import Router


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_skips_only_with_enough_close_failed_neighbours() -> None:
    router = Router(min_neighbours=3, min_similarity=0.8, max_pass_rate=0.2, explore=0.0)
    near, far = unit(1, 0.1, 0), unit(0, 0, 1)
    assert not router.skip("t", 0.7, near)  # nothing known: tried
    for _ in range(2):
        router.record("t", 0.7, unit(1, 0, 0), passed=False)
    assert not router.skip("t", 0.7, near)  # two neighbours are not enough
    router.record("t", 0.7, unit(1, 0.05, 0), passed=False)
    assert router.skip("t", 0.7, near) and not router.skip("t", 0.7, far)
    assert not router.skip("t", 0.7, None)  # no embedding: tried
    assert not router.skip("other", 0.7, near)  # per tier
    router.record("t", 0.7, unit(1, 0.02, 0), passed=True)
    assert not router.skip("t", 0.7, near)  # 1 of 4 passed: 25 % >= 20 %
    assert router.stats.skipped == {"t": 1}


def test_a_new_gate_threshold_forgets_and_exploration_tries_anyway() -> None:
    router = Router(min_neighbours=2, min_similarity=0.8, explore=0.5, seed=0)
    for _ in range(3):
        router.record("t", 0.7, unit(1, 0, 0), passed=False)
    decisions = [router.skip("t", 0.7, unit(1, 0, 0)) for _ in range(200)]
    assert 60 < decisions.count(False) < 140 and router.stats.explored["t"] == decisions.count(False)
    assert not router.skip("t", 0.6, unit(1, 0, 0))  # another threshold: the old verdicts are gone
