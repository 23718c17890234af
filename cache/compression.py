"""What a compressed model buys and costs, measured on the same inputs as the model it replaces.

`embedder_report` compares the fp32 ONNX embedder with its int8 quantisation: file size, single-query latency
(one query at a time, as the proxy embeds a request) and, on labelled pairs, the threshold that meets the shipped
false-hit target with the hit rate there. `cachecade compress embedder` and bench/embedder_int8.py print it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.calibration import Pair, threshold_rows
from cache.onnx_embedder import OnnxEmbedder

FALSE_HIT_TARGET = 0.02  # the target the shipped threshold was chosen for (docs/calibration.md)
THRESHOLD_GRID_SPEC = "0.80:0.99:0.005"
THRESHOLD_GRID = [round(0.80 + 0.005 * i, 3) for i in range(39)]
SPEEDUP_TARGET = 2.0
HIT_RATE_TOLERANCE_POINTS = 2.0
# Timed when no pairs are given: short questions like the prompts the cache sees.
SAMPLE_QUESTIONS = [
    "How do I learn Python quickly?", "What is the capital of France?", "Why is the sky blue?",
    "How can I improve my English speaking skills?", "What are the health benefits of green tea?",
    "How do vaccines train the immune system?", "What is the difference between a virus and a bacterium?",
    "Which programming language should I learn first?", "How do I stop procrastinating?",
    "What is the best way to prepare for a job interview?", "How does compound interest work?",
    "Can you explain quantum entanglement simply?",
]  # fmt: skip
_WARMUP = 10  # first calls pay for allocations and thread start-up, which a running server has behind it


def load_pair(name: str, cache_dir: Path, threads: int | None) -> dict[str, OnnxEmbedder]:
    """The fp32 embedder and its int8 quantisation (made on first use), keyed "fp32" and "int8"; threads None:
    each with its own default, as the server runs it."""
    return {"fp32": OnnxEmbedder.load(name, cache_dir, threads),
            "int8": OnnxEmbedder.load(name, cache_dir, threads, int8=True)}  # fmt: skip


def latency_texts(pairs: Sequence[Pair] | None, count: int) -> list[str]:
    """`count` query texts: the pairs' second texts when there are pairs, else the sample questions repeated."""
    source = [p.text_b for p in pairs] if pairs else SAMPLE_QUESTIONS
    return [source[i % len(source)] for i in range(count)]


def single_query_latency(embedders: dict[str, OnnxEmbedder], texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """p50/p99 latency (ms) and queries/s of one-text calls, per embedder.

    The embedders take turns on each text, so a burst of load from elsewhere on the machine slows both alike
    instead of whichever happened to be running.
    """
    warmup = list(texts[:_WARMUP])
    seconds: dict[str, list[float]] = {key: [] for key in embedders}
    for i, text in enumerate([*warmup, *texts]):
        for key, embedder in embedders.items():
            start = time.perf_counter()
            embedder.encode([text])
            if i >= len(warmup):
                seconds[key].append(time.perf_counter() - start)
    return {key: _latency(values) for key, values in seconds.items()}


def _latency(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "queries_per_s": round(len(ms) / (float(ms.sum()) / 1000), 1), "queries": len(ms)}  # fmt: skip


def _encode_unique(pairs: Sequence[Pair], embedder: OnnxEmbedder) -> tuple[dict[str, int], np.ndarray]:
    texts = sorted({p.text_a for p in pairs} | {p.text_b for p in pairs})
    return {t: i for i, t in enumerate(texts)}, embedder.encode(texts)


def _pair_cosines(pairs: Sequence[Pair], position: dict[str, int], vectors: np.ndarray) -> np.ndarray:
    a = vectors[[position[p.text_a] for p in pairs]]
    b = vectors[[position[p.text_b] for p in pairs]]
    return np.einsum("ij,ij->i", a, b)


def _at_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The row of the lowest threshold whose false-hit rate meets the target (None when none does)."""
    return next((r for r in rows if r["false_hit_rate"]["rate"] <= target), None)


def pair_quality(pairs: Sequence[Pair], embedders: dict[str, OnnxEmbedder], target: float) -> dict[str, Any]:
    """Per embedder, the threshold meeting the false-hit target and the hit rate there; int8 at fp32's
    threshold; and how close the int8 vectors are to fp32's (cosine, over every text of the pairs)."""
    labels = np.array([p.label for p in pairs], dtype=bool)
    start = time.perf_counter()
    encoded = {key: _encode_unique(pairs, embedder) for key, embedder in embedders.items()}
    rows = {key: threshold_rows(_pair_cosines(pairs, *encoded[key]), labels, THRESHOLD_GRID) for key in encoded}
    chosen = {key: _at_target(rows[key], target) for key in rows}
    fp32_threshold = chosen["fp32"]["threshold"] if chosen["fp32"] else None
    cosine = np.einsum("ij,ij->i", encoded["fp32"][1], encoded["int8"][1])
    return {
        "pairs": len(pairs), "duplicates": int(labels.sum()), "max_false_hit": target,
        "thresholds": THRESHOLD_GRID_SPEC, "at_target": chosen,
        "int8_at_fp32_threshold": next((r for r in rows["int8"] if r["threshold"] == fp32_threshold), None),
        "cosine_fp32_int8": {"mean": round(float(cosine.mean()), 5), "min": round(float(cosine.min()), 5),
                             "texts": len(cosine)},
        "encode_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def _vector_agreement(embedders: dict[str, OnnxEmbedder], texts: Sequence[str]) -> dict[str, Any]:
    unique = sorted(set(texts))
    cosine = np.einsum("ij,ij->i", embedders["fp32"].encode(unique), embedders["int8"].encode(unique))
    return {"mean": round(float(cosine.mean()), 5), "min": round(float(cosine.min()), 5), "texts": len(unique)}


def embedder_report(
    name: str, cache_dir: Path, threads: int | None, pairs: Sequence[Pair] | None = None, queries: int = 300
) -> dict[str, Any]:
    """fp32 against int8 on the same inputs: size, single-query latency, and quality on `pairs` if given."""
    embedders = load_pair(name, cache_dir, threads)
    texts = latency_texts(pairs, queries)
    load_before = round(os.getloadavg()[0], 2)
    report: dict[str, Any] = {
        "embedder": name, "threads": {key: e.threads for key, e in embedders.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "models": {key: {"model_id": e.model_id, "file": e.onnx_path.name,
                         "size_mb": round(e.onnx_path.stat().st_size / 1e6, 1)} for key, e in embedders.items()},
        "latency": single_query_latency(embedders, texts),
        # Other work on the machine slows both embedders; the 1-minute load average says how busy it was.
        "load_average_1min": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
    }  # fmt: skip
    report["speedup_p50"] = round(report["latency"]["fp32"]["p50_ms"] / report["latency"]["int8"]["p50_ms"], 2)
    if pairs:
        quality = pair_quality(pairs, embedders, FALSE_HIT_TARGET)
        report["quality"] = quality
        report["cosine_fp32_int8"] = quality["cosine_fp32_int8"]
    else:
        report["cosine_fp32_int8"] = _vector_agreement(embedders, texts)
    report["targets"] = _targets(report)
    return report


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    """The acceptance targets: int8 at least 2x faster per query (p50), and a hit rate at the false-hit target
    within 2 points of fp32's (None where no pairs were given)."""
    out: dict[str, Any] = {"speedup_p50": report["speedup_p50"], "speedup_target": SPEEDUP_TARGET,
                           "speedup_met": report["speedup_p50"] >= SPEEDUP_TARGET,
                           "hit_rate_change_points": None, "hit_rate_tolerance_points": HIT_RATE_TOLERANCE_POINTS,
                           "hit_rate_met": None}  # fmt: skip
    chosen = report.get("quality", {}).get("at_target", {})
    if chosen.get("fp32") and chosen.get("int8"):
        change = 100 * (chosen["int8"]["hit_rate"]["rate"] - chosen["fp32"]["hit_rate"]["rate"])
        out["hit_rate_change_points"] = round(change, 2)
        out["hit_rate_met"] = abs(change) <= HIT_RATE_TOLERANCE_POINTS
    return out


def _pct(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"


def _line(label: str, fp32: str, int8: str) -> str:
    return f"{label:<40}  {fp32:>28}  {int8:>28}"


def _quality_lines(quality: dict[str, Any]) -> list[str]:
    chosen, at_fp32 = quality["at_target"], quality["int8_at_fp32_threshold"] or {}

    def field(key: str, name: str) -> str:
        return _pct(chosen[key][name]) if chosen[key] else "-"

    def threshold(key: str) -> str:
        return f"{chosen[key]['threshold']:.3f}" if chosen[key] else "none"

    target = f"{100 * quality['max_false_hit']:.0f}%"
    return [
        f"pairs: {quality['pairs']} ({quality['duplicates']} duplicates); thresholds {quality['thresholds']}",
        _line(f"lowest threshold, false hits <= {target}", threshold("fp32"), threshold("int8")),
        _line("  hit rate on duplicates there", field("fp32", "hit_rate"), field("int8", "hit_rate")),
        _line("  false-hit rate there", field("fp32", "false_hit_rate"), field("int8", "false_hit_rate")),
        _line(f"at fp32's threshold ({threshold('fp32')}): hit rate", field("fp32", "hit_rate"),
              _pct(at_fp32.get("hit_rate"))),
        _line("  false-hit rate there", field("fp32", "false_hit_rate"), _pct(at_fp32.get("false_hit_rate"))),
    ]  # fmt: skip


def render_embedder_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table, fp32 and int8 side by side."""
    models, latency, targets = report["models"], report["latency"], report["targets"]
    cosine = report["cosine_fp32_int8"]
    fp32, int8 = latency["fp32"], latency["int8"]
    load = report["load_average_1min"]
    lines = [
        f"embedder {report['embedder']}: fp32 vs int8 ONNX; threads per query "
        f"{', '.join(f'{key} {n}' for key, n in report['threads'].items())}; "
        f"{fp32['queries']} single queries each, taking turns; {report['machine']}, "
        f"load average {load['before']:.2f} -> {load['after']:.2f}",
        _line("", f"fp32 ({models['fp32']['model_id']})", f"int8 ({models['int8']['model_id']})"),
        _line("ONNX file (MB)", f"{models['fp32']['size_mb']:.1f}", f"{models['int8']['size_mb']:.1f}"),
        _line("latency p50 (ms)", f"{fp32['p50_ms']:.2f}", f"{int8['p50_ms']:.2f}"),
        _line("latency p99 (ms)", f"{fp32['p99_ms']:.2f}", f"{int8['p99_ms']:.2f}"),
        _line("queries/s (one at a time)", f"{fp32['queries_per_s']:.0f}", f"{int8['queries_per_s']:.0f}"),
    ]
    if "quality" in report:
        lines += _quality_lines(report["quality"])
    lines.append(f"cosine fp32 vs int8 vectors: mean {cosine['mean']:.4f}, min {cosine['min']:.4f} "
                 f"over {cosine['texts']} texts")  # fmt: skip
    lines.append(_verdict(targets))
    return "\n".join(lines)


def _verdict(targets: dict[str, Any]) -> str:
    def met(flag: bool | None) -> str:
        return "not measured" if flag is None else ("met" if flag else "NOT met")

    change = targets["hit_rate_change_points"]
    hit = "n/a" if change is None else f"{change:+.1f} points"
    return (f"int8 speed-up at p50: {targets['speedup_p50']:.2f}x (target >= {targets['speedup_target']:.0f}x: "
            f"{met(targets['speedup_met'])}); hit-rate change at the false-hit target: {hit} (target within "
            f"{targets['hit_rate_tolerance_points']:.0f} points: {met(targets['hit_rate_met'])})")  # fmt: skip
