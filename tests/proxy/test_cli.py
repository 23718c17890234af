"""The `cachecade` command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main

CLI = [sys.executable, "-m", "proxy.cli"]


def test_serve_help_explains_every_option() -> None:
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--host", "--port", "--config", "--log-level", "CACHECADE_UPSTREAM_BASE_URL", "cache_threshold"):
        assert option in out


def test_serve_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    env = {"CACHECADE_CACHE_THRESHOLD": "2", "CACHECADE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*CLI, "serve", "--port", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "cache_threshold (CACHECADE_CACHE_THRESHOLD)" in result.stderr and "Traceback" not in result.stderr


def test_calibrate_prints_table_and_writes_json(
    tmp_path: Path, model_cache: Path, embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = [
        {"text_a": "How do I learn Python?", "text_b": "How can I learn Python?", "label": 1},
        {"text_a": "How many legs does a spider have?", "text_b": "How many legs do spiders have?", "label": 1},
        {"text_a": "What is the capital of France?", "text_b": "What is the capital of Germany?", "label": 0},
        {"text_a": "Why is the sky blue?", "text_b": "How do I bake bread?", "label": 0},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    out = tmp_path / "report.json"
    code = main(["calibrate", "--pairs", str(path), "--thresholds", "0.80:0.98:0.06", "--max-false-hit", "0.0",
                 "--model-cache", str(model_cache), "--json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "recommended threshold" in printed
    report = json.loads(out.read_text())
    assert [r["threshold"] for r in report["rows"]] == [0.8, 0.86, 0.92, 0.98]
    assert report["rows"][0]["false_hit_rate"]["of"] == 2 and report["recommended_threshold"] == 0.8
    # cosine + the shipped verifier, on the same pairs: Germany for France is no hit even below the cosine band
    assert "recommended verifier threshold" in printed
    verified = report["verifier"]
    assert verified["rows"][0]["false_hit_rate"]["of"] == 2 and verified["band_low"] == pytest.approx(0.8, abs=0.2)
    assert verified["recommended_threshold"] is not None


def test_calibrate_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--pairs", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bad_threshold_range_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--pairs", "x", "--thresholds", "0.9:0.8:0.01"])


def test_compress_embedder_compares_fp32_and_int8(
    tmp_path: Path, model_cache: Path, embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = [
        {"text_a": "How do I learn Python?", "text_b": "How can I learn Python?", "label": 1},
        {"text_a": "What is the capital of France?", "text_b": "What is the capital of Germany?", "label": 0},
        {"text_a": "Why is the sky blue?", "text_b": "How do I bake bread?", "label": 0},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    out = tmp_path / "compress.json"
    code = main(["compress", "embedder", "--pairs", str(path), "--queries", "5", "--model-cache", str(model_cache),
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "fp32 (all-MiniLM-L6-v2)" in printed and "int8 (all-MiniLM-L6-v2+int8-fused)" in printed
    assert "latency p50 (ms)" in printed and "hit rate on duplicates there" in printed
    report = json.loads(out.read_text())
    assert report["models"]["int8"]["size_mb"] < report["models"]["fp32"]["size_mb"] / 3
    assert report["latency"]["int8"]["queries"] == 5 and report["threads"] == {"fp32": 2, "int8": 1}
    assert report["quality"]["pairs"] == 3 and report["quality"]["cosine_fp32_int8"]["mean"] > 0.9


def test_compress_embedder_unreadable_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress", "embedder", "--pairs", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_compress_needs_a_model_to_compress() -> None:
    with pytest.raises(SystemExit):
        main(["compress"])


def test_calibrate_runs_on_the_int8_embedder(
    tmp_path: Path, model_cache: Path, embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"text_a": "How do I learn Python?", "text_b": "How can I learn Python?", "label": 1}]))
    out = tmp_path / "report.json"
    assert main(["calibrate", "--pairs", str(path), "--backend", "onnx-int8", "--model-cache", str(model_cache),
                 "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["embedder"] == "all-MiniLM-L6-v2+int8-fused"


def test_key_id_prints_the_id_budgets_use(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.context import key_id

    assert main(["key-id", "sk-alice-0123456789"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == key_id("sk-alice-0123456789") and printed.startswith("k-") and len(printed) == 26
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-alice-0123456789\n"))
    assert main(["key-id"]) == 0 and capsys.readouterr().out.strip() == printed
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["key-id"]) == 2
