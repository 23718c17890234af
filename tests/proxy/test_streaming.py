"""SSE replay of cached answers and the accumulator that rebuilds answers from upstream streams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.streaming import DONE, StreamAccumulator, pieces, replay_chat, replay_completion, sse

CONTENT = "  Hello, world!\n\nThis is\ta test:  ünïcode ✓ 日本語.\n- item one\n- item two  "
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def chat_completion(content: Any = CONTENT, **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 123, "model": "m",
        "system_fingerprint": "fp1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip


def text_completion(text: str = CONTENT) -> dict[str, Any]:
    return {
        "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}], "usage": USAGE,
    }  # fmt: skip


def events(stream: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in stream[:-1]:
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        out.append(json.loads(raw[6:]))
    assert stream[-1] == DONE == b"data: [DONE]\n\n"
    return out


@pytest.mark.parametrize("text", [CONTENT, "one", "", " ", "a\n", "\n\nx  y\n"])
def test_pieces_concatenate_exactly(text: str) -> None:
    assert "".join(pieces(text)) == text
    assert all(pieces(text))


def test_pieces_are_word_sized() -> None:
    assert pieces("ab cd\n ef") == ["ab ", "cd\n ", "ef"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_replay_chat(include_usage: bool) -> None:
    stream = list(replay_chat(chat_completion(), include_usage))
    evs = events(stream)
    for ev in evs:
        assert ev["object"] == "chat.completion.chunk"
        assert (ev["id"], ev["created"], ev["model"], ev["system_fingerprint"]) == ("chatcmpl-abc", 123, "m", "fp1")
    assert evs[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]  # fmt: skip
    usage_events = [ev for ev in evs if "usage" in ev]
    if include_usage:
        assert usage_events == [evs[-1]]
        assert evs[-1]["choices"] == [] and evs[-1]["usage"] == USAGE
        evs = evs[:-1]
    else:
        assert usage_events == []
    final = evs[-1]["choices"][0]
    assert final["finish_reason"] == "stop" and final["delta"] == {}
    middle = [ev["choices"][0] for ev in evs[1:-1]]
    assert len(middle) > 5
    assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in middle)
    assert "".join(c["delta"]["content"] for c in middle) == CONTENT


def test_replay_chat_reasoning_then_content() -> None:
    response = chat_completion("Answer: 4", reasoning_content="Two plus two\nis four. ")
    evs = events(list(replay_chat(response, include_usage=False)))
    deltas = [ev["choices"][0]["delta"] for ev in evs[1:-1]]
    kinds = [next(iter(d)) for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")  # reasoning first
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two plus two\nis four. "
    assert "".join(d.get("content", "") for d in deltas) == "Answer: 4"


def test_replay_chat_tool_calls() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    response = chat_completion(None, tool_calls=calls)
    response["choices"][0]["finish_reason"] = "tool_calls"
    evs = events(list(replay_chat(response, include_usage=False)))
    assert [ev["choices"][0]["delta"] for ev in evs[1:3]] == [
        {"tool_calls": [{"index": 0, **calls[0]}]},
        {"tool_calls": [{"index": 1, **calls[1]}]},
    ]
    assert evs[-1]["choices"][0]["finish_reason"] == "tool_calls"
    acc = StreamAccumulator("chat")
    for chunk in replay_chat(response, include_usage=False):
        acc.feed(chunk)
    assert acc.complete
    assert acc.response()["choices"][0]["message"]["tool_calls"] == calls


@pytest.mark.parametrize("include_usage", [True, False])
def test_replay_completion(include_usage: bool) -> None:
    evs = events(list(replay_completion(text_completion(), include_usage)))
    assert all(ev["object"] == "text_completion" and ev["id"] == "cmpl-1" for ev in evs)
    if include_usage:
        assert evs[-1]["choices"] == [] and evs[-1]["usage"] == USAGE
        evs = evs[:-1]
    assert not any("usage" in ev for ev in evs)
    assert evs[-1]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert all(ev["choices"][0]["finish_reason"] is None for ev in evs[:-1])
    assert "".join(ev["choices"][0]["text"] for ev in evs) == CONTENT


@pytest.mark.parametrize("step", [1, 7, 64, 10_000])
def test_accumulator_rebuilds_replayed_chat(step: int) -> None:
    data = b"".join(replay_chat(chat_completion(reasoning_content="Think."), include_usage=True))
    acc = StreamAccumulator("chat")
    for i in range(0, len(data), step):
        acc.feed(data[i : i + step])
    assert acc.complete
    out = acc.response()
    assert (out["id"], out["object"], out["model"], out["created"]) == ("chatcmpl-abc", "chat.completion", "m", 123)
    assert out["choices"] == [
        {"index": 0, "logprobs": None, "finish_reason": "stop",
         "message": {"role": "assistant", "content": CONTENT, "reasoning_content": "Think."}},
    ]  # fmt: skip
    assert out["usage"] == USAGE


@pytest.mark.parametrize("step", [3, 7])
def test_accumulator_rebuilds_replayed_completion(step: int) -> None:
    data = b"".join(replay_completion(text_completion(), include_usage=False))
    acc = StreamAccumulator("completion")
    for i in range(0, len(data), step):
        acc.feed(data[i : i + step])
    assert acc.complete
    out = acc.response()
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": CONTENT, "logprobs": None, "finish_reason": "stop"}]
    assert "usage" not in out  # the stream reported none, so none is made up


def test_accumulator_crlf_and_no_space() -> None:
    acc = StreamAccumulator("chat")
    head = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    ev = {**head, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    acc.feed(b"data:" + json.dumps(ev).encode() + b"\r\n\r\n: keep-alive comment\r\n\r\ndata: [DONE]\r\n\r\n")
    assert acc.complete
    assert acc.response()["choices"][0]["message"]["content"] == "hi"


def test_accumulator_without_done_is_incomplete() -> None:
    data = b"".join(replay_chat(chat_completion(), include_usage=False))
    acc = StreamAccumulator("chat")
    acc.feed(data[: -len(DONE)])
    assert not acc.done and not acc.complete
    assert acc.response()["choices"][0]["finish_reason"] == "stop"  # the content arrived, only [DONE] did not
    acc.feed(b"data: [DONE]\n")  # no blank line yet: the event has not ended
    assert not acc.complete
    acc.feed(b"\n")
    assert acc.complete


def test_accumulator_error_event_is_incomplete() -> None:
    acc = StreamAccumulator("chat")
    acc.feed(next(replay_chat(chat_completion(), include_usage=False)))
    acc.feed(sse({"error": {"message": "upstream overloaded", "type": "server_error"}}))
    acc.feed(DONE)
    assert acc.done and acc.failed and not acc.complete


def test_accumulator_malformed_json_is_incomplete() -> None:
    acc = StreamAccumulator("chat")
    acc.feed(b"data: {not json\n\n" + DONE)
    assert acc.done and not acc.complete


def test_accumulator_merges_tool_call_deltas() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**head, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]})

    acc = StreamAccumulator("chat")
    acc.feed(delta({"role": "assistant", "content": None}))
    acc.feed(delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]}))  # fmt: skip
    for part in ['{"ci', 'ty": ', '"Paris"}']:
        acc.feed(delta({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
    acc.feed(delta({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                    "function": {"name": "get_time", "arguments": "{}"}}]}))  # fmt: skip
    acc.feed(delta({}, "tool_calls") + DONE)
    assert acc.complete
    message = acc.response()["choices"][0]["message"]
    assert message == {
        "role": "assistant", "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }  # fmt: skip
    assert acc.response()["choices"][0]["finish_reason"] == "tool_calls"
