"""The llama.cpp engine on the packaged models: real inference, short prompts, few tokens."""

from __future__ import annotations

import math
from typing import Any

import pytest

from local_models.engine import LlamaEngine, Sampling
from local_models.errors import LoadFailed, PromptTooLong, Unsupported
from local_models.prompts import FEW_SHOT
from local_models.registry import LocalModelConfig

ASK = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Who wrote Hamlet?"}]


def test_greedy_chat_matches_llama_cpp_python(engines: dict[str, Any]) -> None:
    """Our token loop and chat-template rendering give what llama-cpp-python's own chat completion gives."""
    smol: LlamaEngine = engines["smollm2"]
    ours = smol.generate(smol.chat_prompt(ASK), Sampling(max_tokens=24))
    smol.llm.reset()  # theirs would reuse our KV cache and evaluate the prompt through other kernels
    theirs = smol.llm.create_chat_completion(messages=ASK, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    assert ours.text == theirs["choices"][0]["message"]["content"]
    assert ours.completion_tokens == len(ours.token_logprobs) > 0
    assert all(lp <= 0 and math.isfinite(lp) for lp in ours.token_logprobs)


def test_greedy_answer_does_not_depend_on_the_previous_request(engines: dict[str, Any]) -> None:
    """The same prompt gets the same greedy answer whatever the model answered before (no reuse of the previous
    request's KV cache, whose shorter batches round differently)."""
    smol: LlamaEngine = engines["smollm2"]
    prompt, sampling = smol.chat_prompt(ASK), Sampling(max_tokens=24)
    first = smol.generate(prompt, sampling)
    other = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Who painted it?"}]
    smol.generate(smol.chat_prompt(other), sampling)  # shares the system prompt's prefix with ASK
    again = smol.generate(prompt, sampling)
    assert (again.text, again.token_logprobs) == (first.text, first.token_logprobs)


def test_logprobs_match_full_logits(engines: dict[str, Any], model_cache: Any) -> None:
    """The logprob read from the last logits row equals the one llama-cpp-python computes with logits_all."""
    smol: LlamaEngine = engines["smollm2"]
    ours = smol.generate(smol.chat_prompt(ASK), Sampling(max_tokens=6))
    from llama_cpp import Llama

    full = Llama(model_path=str(smol.path), n_ctx=512, logits_all=True, verbose=False)
    prompt = smol.chat_prompt(ASK).text
    ref = full.create_completion(prompt, max_tokens=6, temperature=0, logprobs=1)
    theirs = ref["choices"][0]["logprobs"]["token_logprobs"]  # type: ignore[index]
    n = min(len(theirs), len(ours.token_logprobs))
    assert n >= 3
    assert ours.token_logprobs[:n] == pytest.approx(theirs[:n], abs=2e-3)


def test_length_and_stop_strings(engines: dict[str, Any]) -> None:
    smol: LlamaEngine = engines["smollm2"]
    long = smol.generate(smol.chat_prompt([{"role": "user", "content": "Write a long story."}]), Sampling(max_tokens=3))
    assert long.finish_reason == "length" and long.completion_tokens == 3
    first = smol.generate(smol.chat_prompt(ASK), Sampling(max_tokens=24))
    word = first.text.split()[0]
    cut = smol.generate(smol.chat_prompt(ASK), Sampling(max_tokens=24, stop=(word,)))
    assert cut.finish_reason == "stop" and word not in cut.text


def test_few_shot_prompt_for_the_base_model(engines: dict[str, Any]) -> None:
    gemma: LlamaEngine = engines["gemma3"]
    prompt = gemma.chat_prompt([{"role": "user", "content": "What is the capital of Italy?"}])
    assert prompt.text.endswith("Question: What is the capital of Italy?\nAnswer:")
    assert f"Question: {FEW_SHOT[0][0]}\nAnswer: {FEW_SHOT[0][1]}" in prompt.text
    answer = gemma.generate(prompt, Sampling(max_tokens=12))
    assert answer.finish_reason == "stop" and "\n" not in answer.text and "Rome" in answer.text


def test_unsupported_inputs_and_long_prompts(engines: dict[str, Any]) -> None:
    smol: LlamaEngine = engines["smollm2"]
    with pytest.raises(Unsupported):
        smol.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(Unsupported):
        smol.chat_prompt([{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}", "tool_call_id": "1"}])
    text = smol.chat_prompt(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert "ab" in text.text
    with pytest.raises(PromptTooLong):
        smol.generate(smol.chat_prompt([{"role": "user", "content": "word " * 3000}]), Sampling(max_tokens=4))


def test_bad_file_is_a_clear_load_error(tmp_path: Any) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(LoadFailed, match=r"not-a-model\.gguf"):
        LlamaEngine("mine", LocalModelConfig(path=str(bad)), bad)
