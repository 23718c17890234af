"""Cascade threshold calibration: loading QA files, grading, sequential threshold choice, and the CLI on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from local_models.calibration import (
    NEVER,
    QAItem,
    Record,
    calibrate,
    choose_threshold,
    env_line,
    first_number,
    is_correct,
    load_qa,
    render_table,
)
from local_models.confidence import Confidence
from proxy.cli import main

NQ = [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
      {"question": "how many seasons of the bastard executioner", "answer": ["one", "one season"]}]  # fmt: skip
SVAMP = [{"ID": "chal-1", "Body": "Each pack costs 76 dollars. There is a discount of 25 dollars on each pack.",
          "Question": "How much do you pay for each pack?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0}]  # fmt: skip
GSM8K = [{"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
         {"question": "A shop sells 1,200 pens a day. How many in 2 days?", "answer": "#### 2,400"}]  # fmt: skip


def _jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_loads_nq_open(tmp_path: Path) -> None:
    items = load_qa(_jsonl(tmp_path / "NQ-open.dev.jsonl", NQ))
    assert items[0] == QAItem("who wrote hamlet", ("William Shakespeare", "Shakespeare"), "nq_open")
    assert items[1].number is None


def test_loads_svamp_joining_body_and_question(tmp_path: Path) -> None:
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps(SVAMP, indent=4))
    (item,) = load_qa(path)
    assert item.question == f"{SVAMP[0]['Body']} {SVAMP[0]['Question']}"
    assert (item.dataset, item.number, item.answers) == ("svamp", 51.0, ("51",))


def test_loads_gsm8k_by_shape_whatever_the_name(tmp_path: Path) -> None:
    items = load_qa(_jsonl(tmp_path / "questions.jsonl", GSM8K))
    assert [(i.dataset, i.number) for i in items] == [("gsm8k", 13.0), ("gsm8k", 2400.0)]


def test_limit_takes_a_seeded_sample(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": [str(i)]} for i in range(50)]
    path = _jsonl(tmp_path / "nq.jsonl", rows)
    first, again, other = load_qa(path, 5, seed=1), load_qa(path, 5, seed=1), load_qa(path, 5, seed=2)
    assert len(first) == 5 and first == again and first != other


def test_unknown_or_malformed_files_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither"):
        load_qa(_jsonl(tmp_path / "pairs.jsonl", [{"text_a": "x", "text_b": "y"}]))
    with pytest.raises(ValueError, match="malformed"):
        load_qa(_jsonl(tmp_path / "gsm.jsonl", [GSM8K[0], {"question": "no answer"}]))


@pytest.mark.parametrize(
    ("answer", "right"),
    [("51", True), ("You pay $51.00 for each pack.", True), ("51.00001", False), ("51.0000001", True), ("1,051", False),
     ("The answer is 76 - 25 = 51", False), ("fifty-one", False), ("", False)],
)  # fmt: skip
def test_numeric_grading_reads_the_first_number(answer: str, right: bool) -> None:
    assert is_correct(answer, QAItem("q", ("51",), "svamp", 51.0)) is right


def test_first_number_handles_separators_and_signs() -> None:
    assert first_number("about 2,400 pens") == 2400.0
    assert first_number("-3.5 degrees") == -3.5
    assert first_number("none") is None


@pytest.mark.parametrize(
    ("answer", "right"),
    [("Shakespeare", True), ("It was written by William Shakespeare.", True), ("the SHAKESPEARE!", True),
     ("Christopher Marlowe", False), ("Shakespeare's rival", False)],
)  # fmt: skip
def test_text_grading_is_normalised_containment(answer: str, right: bool) -> None:
    assert is_correct(answer, QAItem("who wrote hamlet", ("William Shakespeare", "Shakespeare"), "nq_open")) is right


def test_text_grading_matches_whole_words_only() -> None:
    item = QAItem("how many seasons", ("one",), "nq_open")
    assert is_correct("There is one season.", item)
    assert not is_correct("Someone knows.", item)


def _record(score: float, correct: bool, finish: str = "stop", degenerate: str | None = None) -> Record:
    confidence = Confidence(math.log(score), math.log(score), degenerate)
    return Record("answer", finish, confidence, correct)  # type: ignore[arg-type]


def test_threshold_is_the_lowest_score_meeting_the_target() -> None:
    records = [_record(0.9, True), _record(0.8, True), _record(0.7, False), _record(0.6, True), _record(0.5, False)]
    assert choose_threshold(records, 0.75, 1) == 0.6  # accepts 4, 3 right
    assert choose_threshold(records, 0.9, 1) == 0.8
    assert choose_threshold(records, 0.9, 3) is None  # no prefix of 3+ is 90% right


def test_threshold_ignores_answers_the_gate_rejects_anyway() -> None:
    records = [_record(0.95, False, finish="length"), _record(0.9, False, degenerate="repetition"),
               _record(0.8, True), _record(0.3, False)]  # fmt: skip
    assert choose_threshold(records, 1.0, 1) == 0.8


def test_tied_scores_are_accepted_together() -> None:
    records = [_record(0.9, True), _record(0.7, True), _record(0.7, False)]
    assert choose_threshold(records, 0.75, 2) is None  # 0.7 accepts both ties: 2/3 right


def test_calibration_is_sequential_over_escalated_questions() -> None:
    items = [QAItem(f"q{i}", ("a",), "nq_open" if i < 3 else "svamp") for i in range(6)]
    little = [_record(0.9, True), _record(0.8, True), _record(0.3, False), _record(0.2, False),
              _record(0.7, False), _record(0.1, False)]  # fmt: skip
    # The big tier is only judged on q2..q5, so its confident wrong answer on q0 does not count.
    big = [_record(0.99, False), _record(0.5, True), _record(0.6, True), _record(0.6, True), _record(0.4, False),
           _record(0.2, False)]  # fmt: skip
    report = calibrate(items, {"smollm2": little, "gemma3": big}, target=1.0, min_accepted=2)
    small, large = report["tiers"]
    assert (small["threshold"], small["accepted"]["count"], small["reached"]) == (0.8, 2, 6)
    assert (large["threshold"], large["accepted"]["count"], large["reached"]) == (0.6, 2, 4)
    assert large["ungated_accuracy"]["count"] == 3 and large["ungated_accuracy"]["of"] == 6
    assert report["cascade"]["accepted"]["count"] == 4 and report["cascade"]["accuracy"]["rate"] == 1.0
    assert report["cascade"]["escalated"]["count"] == 2
    assert report["by_dataset"]["nq_open"]["accepted"]["count"] == 3
    assert report["thresholds"] == {"smollm2": 0.8, "gemma3": 0.6}


def test_a_tier_that_never_qualifies_gets_threshold_one() -> None:
    items = [QAItem("q", ("a",), "nq_open")] * 3
    report = calibrate(items, {"smollm2": [_record(0.9, False), _record(0.5, True), _record(0.4, False)]}, 0.9, 1)
    (tier,) = report["tiers"]
    assert (tier["threshold"], tier["qualified"], tier["accepted"]["count"]) == (NEVER, False, 0)
    assert "never accepts" in render_table(report)


def test_applied_threshold_is_rounded_down_and_printed_as_a_setting() -> None:
    items = [QAItem("q", ("a",), "nq_open")] * 2
    report = calibrate(items, {"smollm2": [_record(0.123456, True), _record(0.1, False)]}, 1.0, 1)
    assert report["thresholds"] == {"smollm2": 0.1234}
    assert report["tiers"][0]["accepted"]["count"] == 1
    assert env_line(report["thresholds"]) == """CACHECADE_CASCADE_THRESHOLDS='{"smollm2":0.1234}'"""


def test_cli_calibrates_smollm2_on_a_tiny_file(tmp_path: Path, model_cache: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rows = [{"question": "What is the capital of France?", "answer": ["Paris"]},
            {"question": "What is the capital of Italy?", "answer": ["Rome"]},
            {"question": "What colour is the sky on a clear day?", "answer": ["blue"]}]  # fmt: skip
    qa = _jsonl(tmp_path / "tiny.jsonl", rows)
    out = tmp_path / "report.json"
    code = main(["calibrate-cascade", "--qa", str(qa), "--target-precision", "0.5", "--tiers", "smollm2",
                 "--min-accepted", "1", "--max-tokens", "12", "--model-cache", str(model_cache),
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "smollm2" in printed and 'CACHECADE_CASCADE_THRESHOLDS=\'{"smollm2":' in printed
    report = json.loads(out.read_text())
    assert report["questions"] == 3 and len(report["records"]["smollm2"]) == 3
    answers = report["records"]["smollm2"]
    assert all(0.0 < a["score"] <= 1.0 and a["finish_reason"] in ("stop", "length") for a in answers)
    # SmolLM2 knows the capital of France: the grade must see it.
    assert answers[0]["correct"] and "Paris" in answers[0]["text"]
    assert 0.0 <= report["thresholds"]["smollm2"] <= 1.0


def test_cli_refuses_unknown_tier_and_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate-cascade", "--qa", "x", "--target-precision", "0.8", "--tiers", "gpt4"])
    assert main(["calibrate-cascade", "--qa", str(tmp_path / "nope.jsonl"), "--target-precision", "0.8"]) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_cli_seeds_the_routers_memory_in_the_proxys_store(tmp_path: Path, model_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--router writes every graded answer to the entry store `cachecade serve` is configured with (here the
    embedded SQLite store in CACHECADE_DATA_DIR); a router on that store starts from them."""
    from cache.sqlite_store import SQLiteStore
    from proxy.router import RIGHT, Router

    monkeypatch.setenv("CACHECADE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CACHECADE_MODEL_CACHE_DIR", str(model_cache))
    rows = [{"question": "What is the capital of France?", "answer": ["Paris"]},
            {"question": "What is the capital of Italy?", "answer": ["Nowhere"]}]  # fmt: skip
    qa = _jsonl(tmp_path / "tiny.jsonl", rows)
    code = await asyncio.to_thread(main, ["calibrate-cascade", "--qa", str(qa), "--target-precision", "0.5",
                                          "--tiers", "smollm2", "--max-tokens", "12", "--model-cache",
                                          str(model_cache), "--router"])  # fmt: skip
    assert code == 0
    store = await SQLiteStore.open(tmp_path / "data" / "cache.sqlite3")
    try:
        router = Router(store=store)
        await router.sync()
    finally:
        await store.close()
    memory = router.tiers["smollm2"]
    assert memory.count == 2 and list(memory.right[:2]) == [RIGHT, 0]  # graded: Paris right, "Nowhere" not said
    assert memory.vectors is not None and abs(float(np.linalg.norm(memory.vectors[0])) - 1.0) < 1e-2
