"""Re-quantising the packaged SmolLM2 with llama.cpp and the offline measures (real files, few tokens)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from local_models.compress import QuantizeError, decode_speeds, perplexity, requantize
from local_models.engine import LlamaEngine, Sampling
from local_models.registry import LocalModelConfig, smollm2_gguf

# One thread: two llama.cpp threads on a busy 2-core machine stall for seconds at their barriers.
THREADS = 1
TEXT = (
    "Rain falls on the hills and runs down into small streams. The streams join to form a river, and the river "
    "carries the water back to the sea, where the sun warms it and lifts it into the air again."
)


@pytest.fixture(scope="module")
def q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 re-quantised to Q8_0 (about a second)."""
    made = requantize(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smollm2.Q8_0.gguf", "q8_0", THREADS)
    assert made.qtype == "Q8_0" and made.tensors > 0 and made.fallback_tensors == 0
    return made.path


def test_requantised_file_loads_and_generates(q8: Path) -> None:
    engine = LlamaEngine("q8", LocalModelConfig(path=str(q8), n_ctx=256, threads=THREADS), q8)
    try:
        assert engine.llm.metadata["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
        answer = engine.generate(engine.chat_prompt([{"role": "user", "content": "Say hello."}]), Sampling(8))
    finally:
        engine.llm.close()
    assert answer.completion_tokens > 0 and answer.text.strip()
    assert q8.stat().st_size > smollm2_gguf().stat().st_size  # 8-bit blocks are bigger than the Q4_1 source
    speeds = decode_speeds({"source": smollm2_gguf(), "q8": q8}, "Hello", n_tokens=4, rounds=1, threads=THREADS)
    assert set(speeds) == {"source", "q8"} and all(speed > 0 for speed in speeds.values())


def test_perplexity_matches_token_by_token_reference(q8: Path) -> None:
    """exp(mean NLL) over batched windows equals a token-at-a-time computation, and beats scrambled text.

    (llama-cpp-python's echoed prompt logprobs are no reference: they score each token with its own row.)"""
    import llama_cpp
    from llama_cpp import Llama

    ours = perplexity(q8, TEXT, n_ctx=128, threads=THREADS)
    llm = Llama(model_path=str(q8), n_ctx=128, n_threads=THREADS, logits_all=False, verbose=False)
    tokens = llm.tokenize(TEXT.encode(), add_bos=False)
    nll = 0.0
    for before, token in itertools.pairwise(tokens):
        llm.eval([before])
        last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)  # eval keeps no scores without logits_all
        logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64)
        nll += float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[token])
    llm.close()
    assert math.isfinite(ours) and ours > 1
    assert ours == pytest.approx(math.exp(nll / (len(tokens) - 1)), rel=1e-2)
    assert perplexity(q8, " ".join(reversed(TEXT.split())), n_ctx=128, threads=THREADS) > 2 * ours


def test_k_quant_fallback_is_reported(tmp_path: Path) -> None:
    """SmolLM2's 576-wide rows are no multiple of 256: most tensors of a "Q2_K" file are really q4_0."""
    made = requantize(smollm2_gguf(), tmp_path / "smollm2.Q2_K.gguf", "Q2_K", THREADS)
    assert (made.fallback_tensors, made.tensors, made.fallback_types) == (180, 272, {"q4_0": 180})


def test_unknown_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"'Q9_9'.*known: .*Q4_K_M"):
        requantize(smollm2_gguf(), tmp_path / "x.gguf", "Q9_9")
    assert not list(tmp_path.iterdir())


def test_refused_type_says_why_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"IQ2_XXS: .*imatrix"):
        requantize(smollm2_gguf(), tmp_path / "x.gguf", "IQ2_XXS")
    assert not list(tmp_path.iterdir())


def test_compress_gguf_command_reports_source_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from proxy.cli import main

    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "What is the capital of France?", "answer": ["Paris"]}\n'
                  '{"question": "What is 2 + 2?", "answer": ["4", "four"]}\n')  # fmt: skip
    out = tmp_path / "report.json"
    args = ["compress", "gguf", "--model", "smollm2", "--types", "Q4_0", "--out", str(tmp_path / "gguf"),
            "--qa", str(qa), "--threads", str(THREADS), "--speed-rounds", "1", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "source" in table and "Q4_0" in table and "perplexity" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["source", "Q4_0"] and all(r["perplexity"] > 1 for r in rows)
    assert main(["compress", "gguf", "--types", "Q9_9", "--out", str(tmp_path / "gguf")]) == 2
    assert "Q9_9" in capsys.readouterr().err
