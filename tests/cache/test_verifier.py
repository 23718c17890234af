"""The cache verifier: the shipped artifact on hand-written pairs, its calibration helpers, the batching wrapper,
the generated hard pairs, and `cachecade train-verifier` on a tiny generated file."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.verifier import INT8_MAX_DRIFT, AsyncVerifier, PairVerifier
from cache.verifier_data import Pair, generated_pairs, negation, number_change, surface_variant, word_swap
from cache.verifier_model import ARTIFACT, WEIGHTS
from cache.verifier_training import fit_platt, pick_threshold

SAME = [
    ("What is the capital city of France?", "what is the capital city of france"),
    ("What is the capital city of France?", "what's the capital city of france?"),
    ("How do I learn Python quickly?", "please tell me how do I learn Python quickly?"),
    ("How many legs does a spider have?", "HOW MANY LEGS DOES A SPIDER HAVE"),
]
DIFFERENT = [
    ("How do I convert dollars to euros?", "How do I convert euros to dollars?"),
    ("Is a cat faster than a dog?", "Is a dog faster than a cat?"),
    ("Why do men earn more than women?", "Why do women earn more than men?"),
    ("What is 15 percent of 200?", "What is 15 percent of 300?"),
    ("How many calories are in 100 grams of rice?", "How many calories are in 500 grams of rice?"),
]


@pytest.fixture(scope="module")
def verifier(model_cache: Path) -> PairVerifier:
    return PairVerifier.load(None, model_cache)


def test_shipped_verifier_accepts_rewordings(verifier: PairVerifier) -> None:
    scores = verifier.score(SAME)
    assert (scores >= verifier.meta.threshold).all(), dict(zip(SAME, scores.round(3), strict=True))


def test_shipped_verifier_rejects_swaps_and_changed_numbers(verifier: PairVerifier) -> None:
    scores = verifier.score(DIFFERENT)
    assert (scores < verifier.meta.threshold).all(), dict(zip(DIFFERENT, scores.round(3), strict=True))


@pytest.mark.xfail(strict=True, reason="a known miss of the shipped model: about 0.89, above its threshold (0.87)")
def test_shipped_verifier_rejects_the_city_swap(verifier: PairVerifier) -> None:
    (score,) = verifier.score([("Cheap flights from Paris to Rome", "Cheap flights from Rome to Paris")])
    assert score < verifier.meta.threshold


def test_int8_serving_uses_its_own_calibration_and_stays_near_fp32(verifier: PairVerifier, model_cache: Path,
                                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                   ) -> None:  # fmt: skip
    fp32 = PairVerifier.load(None, model_cache, backend="onnx")
    assert verifier.model_id == fp32.model_id + "-int8"
    assert verifier.meta.threshold == fp32.meta.int8["threshold"] != fp32.meta.threshold
    assert verifier.meta.platt == tuple(fp32.meta.int8["platt"])
    drift = np.abs(verifier.logits(SAME + DIFFERENT) - fp32.logits(SAME + DIFFERENT))
    assert 0 < drift.max() <= INT8_MAX_DRIFT, drift  # quantised (not the fp32 graph), and near it
    # An artifact without an int8 calibration (trained before int8 serving) serves in fp32, with a warning.
    old = tmp_path / "old"
    shutil.copytree(ARTIFACT, old)
    meta = json.loads((old / "verifier.json").read_text())
    del meta["int8"]
    (old / "verifier.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="cachecade.verifier"):
        fallback = PairVerifier.load(old, model_cache)
    assert fallback.model_id == fp32.model_id and "no int8 calibration" in caplog.text


def test_scores_are_probabilities_and_the_decision_does_not_depend_on_order(verifier: PairVerifier) -> None:
    forward = verifier.score(SAME + DIFFERENT)
    backward = verifier.score([(b, a) for a, b in SAME + DIFFERENT])
    assert ((forward >= 0) & (forward <= 1)).all()
    t = verifier.meta.threshold
    assert ((forward >= t) == (backward >= t)).all(), (forward.round(3), backward.round(3))


async def test_concurrent_lookups_are_scored_in_shared_batches(verifier: PairVerifier) -> None:
    calls: list[int] = []

    class Counting(PairVerifier):
        def score(self, pairs):  # type: ignore[no-untyped-def]
            calls.append(len(pairs))
            return verifier.score(pairs)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(verifier.__dict__)
    wrapped = AsyncVerifier(counting)
    try:
        results = await asyncio.gather(*(wrapped.score([pair]) for pair in SAME + DIFFERENT))
    finally:
        wrapped.close()
    n = len(SAME + DIFFERENT)
    assert [len(r) for r in results] == [1] * n
    assert len(calls) < n and sum(calls) == n  # the first alone, the others batched behind it


def test_platt_fit_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(float)
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)


def test_threshold_keeps_false_hits_within_the_target() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 1000 + [1] * 1000)
    probability = np.concatenate([rng.random(1000) * 0.9, 0.5 + rng.random(1000) * 0.5])
    cosine = np.full(2000, 0.9)
    t = pick_threshold(probability, cosine, labels, 0.8, 0.01)
    assert ((probability >= t) & (labels == 0)).sum() <= 10
    assert ((probability >= t) & (labels == 0)).sum() >= 9  # the lowest such threshold


def test_generated_pairs_change_the_question_or_only_its_form() -> None:
    rng = random.Random(0)
    assert word_swap("Cheap flights from Paris to Rome?", rng) == "Cheap flights from Rome to Paris?"
    assert negation("Is coffee bad for you?", rng) == "Is not coffee bad for you?"
    changed = number_change("What is 15 percent of 200?", rng)
    assert changed is not None and changed != "What is 15 percent of 200?" and "percent of" in changed
    variant = surface_variant("What is the capital of France?", rng)
    assert variant.lower().replace("what's", "what is").strip(" ?").endswith("capital of france")
    made = generated_pairs(["How do I travel from London to Paris by train?"], seed=0)
    assert {p.source for p in made} >= {"word-swap", "surface"} and {p.label for p in made} == {0, 1}


def test_train_verifier_cli_on_a_tiny_file(tmp_path: Path, model_cache: Path) -> None:
    questions = ["How do I travel from London to Paris by train?", "What is the boiling point of water?",
                 "Which is bigger, the sun or the moon?", "How many legs does a spider have?",
                 "Is Python faster than Java?", "Who wrote the play Hamlet?"] * 6  # fmt: skip
    pairs = [Pair(q, q.lower(), 1) for q in questions] + [Pair(q, questions[i - 1], 0) for i, q in enumerate(questions)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"text_a": p.a, "text_b": p.b, "label": p.label}) for p in pairs))
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-m", "proxy.cli", "train-verifier", "--pairs", str(data), "--out", str(out),
           "--max-steps", "2", "--threads", "1", "--model-cache", str(model_cache), "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert summary["steps"] == 2 and 0 <= summary["threshold"] <= 1 and 0 <= summary["int8"]["threshold"] <= 1
    trained = PairVerifier.load(out, tmp_path / "cache")
    assert trained.model_id.endswith("-int8") and trained.meta.threshold == summary["int8"]["threshold"]
    assert trained.score([("a question?", "a question")]).shape == (1,)
    assert (out / WEIGHTS).stat().st_size < 5 * 10**6
    # --recalibrate refits the int8 calibration of the artifact in place, without training.
    weights = (out / WEIGHTS).read_bytes()
    again = subprocess.run([*cmd, "--recalibrate"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / WEIGHTS).read_bytes() == weights
    assert json.loads((out / "verifier.json").read_text())["int8"]["threshold"] == summary["int8"]["threshold"]
