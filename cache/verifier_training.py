"""`cachecade train-verifier`: fine-tune the verifier's top layers on labelled pairs plus generated hard pairs,
calibrate its score on held-out pairs, choose its threshold, and write the artifact.

Pairs are split by a hash of their texts (`verifier_data.split_of`): 85 % train, 15 % validation. The validation
pairs are halved again: one half fits the calibration (Platt scaling) and picks the threshold, the other is
where the figures in the artifact's `training` record come from. Generated hard pairs are made from the train
half's questions only, so no validation question is ever seen in training.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.verifier_data import Pair, generated_pairs, read_pairs, split_of
from cache.verifier_model import WEIGHTS, VerifierMeta, build_network, save_trained

Embed = Callable[[Sequence[str]], np.ndarray]
HARD_PER_KIND = 400  # generated validation pairs scored per kind (word-swap, number, ...)


def fit_platt(logits: np.ndarray, labels: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit + b), by Newton's method on the log loss with step halving (a step that does
    not lower the loss is halved until it does), so it converges from any start."""

    def loss(a: float, b: float) -> float:
        z = a * logits + b
        return float(np.sum(np.logaddexp(0, z) - labels * z))

    a, b = 1.0, 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(a * logits + b, -50, 50)))
        w = p * (1 - p) + 1e-9
        grad = np.array([np.sum((p - labels) * logits), np.sum(p - labels)])
        hess = np.array([[np.sum(w * logits * logits), np.sum(w * logits)], [np.sum(w * logits), np.sum(w)]])
        step = np.linalg.solve(hess + 1e-6 * np.eye(2), grad)
        scale, before = 1.0, loss(a, b)
        while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > before:
            scale /= 2
        a, b = a - scale * float(step[0]), b - scale * float(step[1])
        if np.abs(scale * step).max() < 1e-9:
            break
    return a, b


def rates(served: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Hits on duplicates and false hits on non-duplicates, pair by pair."""
    positives, negatives = labels == 1, labels == 0
    return {"hit_rate": float(served[positives].mean()) if positives.any() else 0.0,
            "false_hit_rate": float(served[negatives].mean()) if negatives.any() else 0.0,
            "pairs": len(labels)}  # fmt: skip


def pick_threshold(probability: np.ndarray, cosine: np.ndarray, labels: np.ndarray, band_low: float,
                   max_false_hit: float) -> float:  # fmt: skip
    """The lowest probability threshold whose false-hit rate (served = cosine >= band_low and probability >=
    threshold) stays within `max_false_hit` on these pairs."""
    negatives = probability[(labels == 0) & (cosine >= band_low)]
    allowed = math.floor(max_false_hit * int((labels == 0).sum()))
    if len(negatives) <= allowed:
        return 0.5
    return float(np.sort(negatives)[::-1][allowed]) + 1e-6


def train(pair_files: Sequence[Path], out: Path, embed: Embed, seed: int = 0, epochs: int = 1,
          layers: int = 4, trained_from: int = 1, batch: int = 32, lr: float = 1e-4, generated_share: float = 1.0,
          max_false_hit: float = 0.01, band_low: float = 0.8, max_steps: int | None = None,
          progress: bool = True) -> VerifierMeta:  # fmt: skip
    """Train, calibrate and write the artifact into `out`; returns its meta (with the validation figures)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from cache.embedder import resolve_embedder_path

    started = time.monotonic()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = [p for f in pair_files for p in read_pairs(Path(f))]
    train_pairs = [p for p in pairs if split_of(p, seed) == "train"]
    held_out = [p for p in pairs if split_of(p, seed) == "validation"]
    questions = sorted({t for p in train_pairs for t in (p.a, p.b)})
    made = generated_pairs(questions, seed)
    rng.shuffle(made)
    made = made[: int(generated_share * len(train_pairs))]
    train_set = train_pairs + made
    rng.shuffle(train_set)

    meta = VerifierMeta(layers=layers, trained_from=trained_from, band_low=band_low, pooling="mean")
    network = build_network(meta, None)
    base = {k: v.clone() for k, v in network.trained_state().items()}  # the package's, before training
    for name, parameter in network.named_parameters():
        parameter.requires_grad = name.startswith("head.") or any(
            name.startswith(f"encoder.encoder.layer.{i}.") for i in range(trained_from, layers)
        )
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedder_path(meta.base))
    params = [p for p in network.parameters() if p.requires_grad]
    head = list(network.head.parameters())  # a new layer: a faster rate than the pretrained ones
    optimizer = torch.optim.AdamW([{"params": [p for p in params if all(p is not h for h in head)], "lr": lr},
                                   {"params": head, "lr": lr * 10}], weight_decay=0.01)  # fmt: skip
    total = math.ceil(len(train_set) / batch) * epochs
    total = min(total, max_steps) if max_steps else total
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, total // 20)) *
                                                 max(0.0, 1 - s / total))  # fmt: skip

    def encode(batch_pairs: Sequence[Pair], swap: bool) -> dict[str, Any]:
        """Tokenised pairs; in training each pair's order is drawn at random (the score must be symmetric)."""
        ordered = [(p.b, p.a) if swap and rng.random() < 0.5 else (p.a, p.b) for p in batch_pairs]
        return dict(tokenizer([a for a, _ in ordered], [b for _, b in ordered], padding=True, truncation=True,
                              max_length=meta.max_length, return_tensors="pt"))  # fmt: skip

    network.train()
    step, bar = 0, tqdm(total=total, desc="train-verifier", unit="step", disable=not progress)
    for _ in range(epochs):
        for i in range(0, len(train_set), batch):
            if step >= total:
                break
            chunk = train_set[i : i + batch]
            logits = network(**encode(chunk, swap=True))
            labels = torch.tensor([float(p.label) for p in chunk])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    network.eval()

    def logits_of(items: Sequence[Pair]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in tqdm(range(0, len(items), 128), desc="validate", disable=not progress):
                out.append(network(**encode(items[i : i + 128], swap=False)).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    calibrate_half, report_half = halves(held_out, seed)
    cal_logits, cal_labels = logits_of(calibrate_half), np.array([p.label for p in calibrate_half])
    meta.platt = fit_platt(cal_logits, cal_labels.astype(float))
    cal_cosine = cosines(calibrate_half, embed)
    meta.threshold = pick_threshold(probability(cal_logits, meta.platt), cal_cosine, cal_labels, band_low,
                                    max_false_hit)  # fmt: skip
    figures = evaluate(report_half, logits_of(report_half), cosines(report_half, embed), meta)
    held_questions = sorted({t for p in report_half for t in (p.a, p.b)})
    hard = generated_pairs(held_questions, seed + 2)
    figures["generated_hard_pairs"] = {kind: evaluate(items, logits_of(items), cosines(items, embed), meta)
                                       for kind in sorted({p.source for p in hard})
                                       if (items := [p for p in hard if p.source == kind][:HARD_PER_KIND])}  # fmt: skip
    meta.training = {"files": [Path(f).name for f in pair_files], "seed": seed, "epochs": epochs, "steps": step,
                     "train_pairs": len(train_pairs), "generated_pairs": len(made), "batch": batch, "lr": lr,
                     "max_false_hit": max_false_hit, "seconds": round(time.monotonic() - started),
                     "validation": figures}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_trained(network, base, out / WEIGHTS)
    calibrate_int8(out, meta, calibrate_half, report_half, embed, max_false_hit, progress)
    meta.write(out)
    return meta


def halves(held_out: Sequence[Pair], seed: int) -> tuple[list[Pair], list[Pair]]:
    """The held-out pairs' calibration half (fits the scores, picks the threshold) and report half (figures)."""
    return ([p for p in held_out if split_of(p, seed + 1, 0.5) == "train"],
            [p for p in held_out if split_of(p, seed + 1, 0.5) == "validation"])  # fmt: skip


def calibrate_int8(folder: Path, meta: VerifierMeta, calibrate_half: Sequence[Pair], report_half: Sequence[Pair],
                   embed: Embed, max_false_hit: float, progress: bool = True) -> None:  # fmt: skip
    """Fit the int8 export's own calibration and threshold on the calibration half, as for fp32, and record its
    figures on the report half (meta.int8). The export is made in a scratch folder from the weights in
    `folder`, as serving makes it."""
    import tempfile

    from tqdm import tqdm

    from cache.verifier import PairVerifier, export, quantize

    with tempfile.TemporaryDirectory() as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        export(folder, meta, fp32)
        quantize(fp32, meta, int8)
        verifier = PairVerifier(int8, meta, "int8")

        def logits_of(items: Sequence[Pair]) -> np.ndarray:
            chunks = [verifier.logits([(p.a, p.b) for p in items[i : i + 64]])
                      for i in tqdm(range(0, len(items), 64), desc="calibrate int8", disable=not progress)]  # fmt: skip
            return np.concatenate(chunks) if chunks else np.zeros(0)

        cal_logits, cal_labels = logits_of(calibrate_half), np.array([p.label for p in calibrate_half])
        platt = fit_platt(cal_logits, cal_labels.astype(float))
        threshold = pick_threshold(probability(cal_logits, platt), cosines(calibrate_half, embed), cal_labels,
                                   meta.band_low, max_false_hit)  # fmt: skip
        meta.int8 = {"platt": list(platt), "threshold": threshold}
        meta.int8["validation"] = evaluate(report_half, logits_of(report_half), cosines(report_half, embed),
                                           meta.as_int8())  # fmt: skip


def recalibrate(pair_files: Sequence[Path], folder: Path, embed: Embed, seed: int = 0, max_false_hit: float = 0.01,
                progress: bool = True) -> VerifierMeta:  # fmt: skip
    """The int8 calibration of an artifact already trained on these pair files with this seed (no training):
    for artifacts made before int8 serving."""
    meta = VerifierMeta.read(folder)
    pairs = [p for f in pair_files for p in read_pairs(Path(f))]
    calibrate_half, report_half = halves([p for p in pairs if split_of(p, seed) == "validation"], seed)
    calibrate_int8(folder, meta, calibrate_half, report_half, embed, max_false_hit, progress)
    meta.write(folder)
    return meta


def probability(logits: np.ndarray, platt: tuple[float, float]) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-(platt[0] * logits + platt[1]))))


def cosines(items: Sequence[Pair], embed: Embed) -> np.ndarray:
    if not items:
        return np.zeros(0)
    first, second = embed([p.a for p in items]), embed([p.b for p in items])
    return np.asarray((first * second).sum(axis=1))


def evaluate(items: Sequence[Pair], logits: np.ndarray, cosine: np.ndarray, meta: VerifierMeta) -> dict[str, Any]:
    """Pair by pair: the verified rule (cosine >= band_low and probability >= threshold) against cosine alone at
    the shipped 0.95."""
    labels = np.array([p.label for p in items])
    verified = (cosine >= meta.band_low) & (probability(logits, meta.platt) >= meta.threshold)
    return {"verified": rates(verified, labels), "cosine_0.95": rates(cosine >= 0.95, labels)}
