"""The llama.cpp engine on the packaged models: real inference, short prompts, few tokens."""

from __future__ import annotations

import math
from typing import Any

import pytest

from local_models.engine import LlamaEngine, Sampling, prompt_batches
from local_models.errors import LoadFailed, PromptTooLong, Unsupported
from local_models.prompts import FEW_SHOT, Prompt
from local_models.registry import LocalModelConfig

ASK = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Who wrote Hamlet?"}]


def evaluated_as_we_do(llm: Any, prompt: Prompt) -> list[int]:
    """A fresh context holding the prompt evaluated in our batches (prompt_batches); returns its tokens."""
    tokens = llm.tokenize(prompt.text.encode(), add_bos=not prompt.has_bos, special=True)
    llm.reset()
    for start, end in prompt_batches(len(tokens)):
        llm.eval(tokens[start:end])
    return list(tokens)


def test_greedy_chat_matches_llama_cpp_python(engines: dict[str, Any]) -> None:
    """Our chat-template rendering is llama-cpp-python's, and our token loop gives the answer its own completion
    gives from the same evaluated prompt (it samples from a context that already holds the prompt)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    smol: LlamaEngine = engines["smollm2"]
    prompt = smol.chat_prompt(ASK)
    model = smol.llm._model
    rendered = Jinja2ChatFormatter(smol.llm.metadata["tokenizer.chat_template"], model.token_get_text(
        model.token_eos()), model.token_get_text(model.token_bos()))(messages=ASK).prompt  # fmt: skip
    assert prompt.text == rendered
    ours = smol.generate(prompt, Sampling(max_tokens=24))
    evaluated_as_we_do(smol.llm, prompt)
    theirs = smol.llm.create_completion(prompt.text, temperature=0, max_tokens=24, stop=list(prompt.stop))
    smol.llm.reset()  # the engine keeps no stale view of the KV cache
    assert ours.text == theirs["choices"][0]["text"]  # type: ignore[index]
    assert ours.completion_tokens == len(ours.token_logprobs) > 0
    assert all(lp <= 0 and math.isfinite(lp) for lp in ours.token_logprobs)


def test_greedy_answer_does_not_depend_on_the_previous_request(engines: dict[str, Any]) -> None:
    """The same prompt gets the same greedy answer whatever the model answered before (llama-cpp-python's own
    prefix reuse evaluated the rest of a prompt in other batches, which round differently: "17th" vs "18th")."""
    smol: LlamaEngine = engines["smollm2"]
    prompt, sampling = smol.chat_prompt(ASK), Sampling(max_tokens=24)
    smol.llm.reset()
    first = smol.generate(prompt, sampling)
    other = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Who painted it?"}]
    smol.generate(smol.chat_prompt(other), sampling)  # shares the system prompt's prefix with ASK
    again = smol.generate(prompt, sampling)
    assert (again.text, again.token_logprobs) == (first.text, first.token_logprobs)


def test_a_shared_head_is_evaluated_once_and_changes_nothing(
    engines: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma's few-shot examples, shared by every prompt, are kept from the previous request (whole batches of
    them); the answer is the one a fresh context gives."""
    gemma: LlamaEngine = engines["gemma3"]
    first = gemma.chat_prompt([{"role": "user", "content": "Which is the largest ocean?"}])
    second = gemma.chat_prompt([{"role": "user", "content": "What colour is the sky?"}])
    sampling = Sampling(max_tokens=8)
    gemma.llm.reset()
    fresh = gemma.generate(second, sampling)
    evaluated: list[int] = []
    real_eval = gemma.llm.eval
    monkeypatch.setattr(gemma.llm, "eval", lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1])
    gemma.generate(first, sampling)
    evaluated.clear()
    again = gemma.generate(second, sampling)
    n = len(gemma.llm.tokenize(second.text.encode(), add_bos=True, special=True))
    prompt_evaluated = sum(evaluated) - again.completion_tokens  # each answer token is evaluated once
    assert prompt_evaluated <= n // 4, (evaluated, n)
    assert (again.text, again.token_logprobs) == (fresh.text, fresh.token_logprobs)


def test_logprobs_match_full_logits(engines: dict[str, Any]) -> None:
    """The logprob read from the last logits row equals the one llama-cpp-python computes with logits_all, from
    the same evaluated prompt."""
    from llama_cpp import Llama

    smol: LlamaEngine = engines["smollm2"]
    prompt = smol.chat_prompt(ASK)
    ours = smol.generate(prompt, Sampling(max_tokens=6))
    full = Llama(model_path=str(smol.path), n_ctx=512, n_threads=smol.config.threads, logits_all=True,
                 verbose=False)  # fmt: skip
    evaluated_as_we_do(full, prompt)
    ref = full.create_completion(prompt.text, max_tokens=6, temperature=0, logprobs=1)
    theirs = ref["choices"][0]["logprobs"]["token_logprobs"]  # type: ignore[index]
    n = min(len(theirs), len(ours.token_logprobs))
    assert n >= 3
    assert ours.token_logprobs[:n] == pytest.approx(theirs[:n], abs=2e-3)


def test_prompt_batches_end_at_fixed_positions() -> None:
    assert prompt_batches(1) == [(0, 1)]
    assert prompt_batches(8) == [(0, 8)]
    assert prompt_batches(23) == [(0, 8), (8, 16), (16, 23)]
    assert [end for _, end in prompt_batches(200)] == [8, 16, 24, 32, 48, 64, 96, 128, 192, 200]


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
