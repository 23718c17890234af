"""Server-sent events: replaying a cached answer as a proper stream, and reading an upstream stream as it passes
through (to cache it once its terminal event has arrived)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")
_KNOWN_DELTA = frozenset({"role", "content", "reasoning_content", "refusal", "tool_calls"})


def sse(payload: Mapping[str, Any]) -> bytes:
    """One SSE data event."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def pieces(text: str) -> list[str]:
    """Split text into word-sized pieces whose concatenation is exactly the text."""
    return [p for p in _WORD_BOUNDARY.split(text) if p]


def _chat_chunk(head: Mapping[str, Any], delta: Mapping[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}
    return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})


def replay_chat(response: Mapping[str, Any], include_usage: bool) -> Iterator[bytes]:
    """A stored chat.completion as chat.completion.chunk events: role, reasoning, content, tool calls, finish
    reason, then usage (when asked) and [DONE]."""
    head = {k: response[k] for k in ("id", "created", "model", "system_fingerprint") if k in response}
    choice = response["choices"][0]
    message = choice.get("message") or {}
    yield _chat_chunk(head, {"role": message.get("role", "assistant"), "content": ""})
    for key in ("reasoning_content", "content", "refusal"):
        if isinstance(message.get(key), str):
            for piece in pieces(message[key]):
                yield _chat_chunk(head, {key: piece})
    extra = {k: v for k, v in message.items() if k not in _KNOWN_DELTA and v is not None}
    if extra:  # fields we do not split (audio, annotations, ...) travel whole in one chunk
        yield _chat_chunk(head, extra)
    for index, call in enumerate(message.get("tool_calls") or []):
        yield _chat_chunk(head, {"tool_calls": [{"index": index, **call}]})
    yield _chat_chunk(head, {}, choice.get("finish_reason", "stop"))
    if include_usage and response.get("usage"):
        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": response["usage"]})
    yield DONE


def replay_completion(response: Mapping[str, Any], include_usage: bool) -> Iterator[bytes]:
    """A stored text_completion as streamed text_completion events."""
    head = {k: response[k] for k in ("id", "created", "model", "system_fingerprint") if k in response}
    choice = response["choices"][0]

    def event(text: str, finish: str | None) -> bytes:
        body = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return sse({**head, "object": "text_completion", "choices": [body]})

    for piece in pieces(choice.get("text") or ""):
        yield event(piece, None)
    yield event("", choice.get("finish_reason", "stop"))
    if include_usage and response.get("usage"):
        yield sse({**head, "object": "text_completion", "choices": [], "usage": response["usage"]})
    yield DONE


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None


class SSEParser:
    """Splits SSE bytes (any split) into the data of each event."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that `chunk` completes."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                data, self._data = b"\n".join(self._data), []
                if data:
                    events.append(data)
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
        return events


class StreamAccumulator:
    """Reads SSE bytes as they pass through and rebuilds the complete response.

    `complete` is True only after the [DONE] event, with no error event seen: only then may the answer be cached.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, _Choice] = {}
        self.done = False
        self.failed = False
        self._parser = SSEParser()

    @property
    def complete(self) -> bool:
        return self.done and not self.failed

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream (any split)."""
        for data in self._parser.feed(chunk):
            self.take_data(data)

    def take_data(self, data: bytes) -> Any:
        """Take one event's data; returns the parsed event (None for [DONE] or data that is not JSON)."""
        if data.strip() == b"[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(data)
        except ValueError:
            self.failed = True
            return None
        self._take(event)
        return event

    def _take(self, event: Any) -> None:
        if not isinstance(event, dict) or "error" in event:
            self.failed = True
            return
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in event and key not in self.head:
                self.head[key] = event[key]
        if event.get("usage"):
            self.usage = event["usage"]
        for raw in event.get("choices") or []:
            choice = self.choices.setdefault(int(raw.get("index") or 0), _Choice())
            if raw.get("finish_reason"):
                choice.finish_reason = raw["finish_reason"]
            if self.kind == "completion":
                choice.text.append(raw.get("text") or "")
            else:
                self._take_delta(choice, raw.get("delta") or {})

    def _take_delta(self, choice: _Choice, delta: Mapping[str, Any]) -> None:
        if any(delta.get(k) for k in delta if k not in _KNOWN_DELTA):
            self.failed = True  # audio, annotations, ...: we could not reproduce it, so it is never stored
        if delta.get("role"):
            choice.role = delta["role"]
        for key, parts in (("content", choice.content), ("reasoning_content", choice.reasoning),
                           ("refusal", choice.refusal)):  # fmt: skip
            value = delta.get(key)
            if isinstance(value, str):
                parts.append(value)
            elif value is not None:
                self.failed = True
        for position, call in enumerate(delta.get("tool_calls") or []):
            slot = choice.tool_calls.setdefault(int(call.get("index", position)), {"function": {}})
            for key in ("id", "type"):
                if call.get(key):
                    slot[key] = call[key]
            function = call.get("function") or {}
            for key in ("name", "arguments"):
                if function.get(key):
                    slot["function"][key] = slot["function"].get(key, "") + function[key]

    def response(self) -> dict[str, Any]:
        """The complete non-stream response equivalent to what streamed."""
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        choices = [self._render(i, c) for i, c in sorted(self.choices.items())]
        out: dict[str, Any] = {**self.head, "object": obj, "choices": choices}
        if self.usage:  # without one, none is made up: the entry's length is then unknown
            out["usage"] = self.usage
        return out

    def _render(self, index: int, c: _Choice) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": index, "text": "".join(c.text), "logprobs": None, "finish_reason": c.finish_reason}
        message: dict[str, Any] = {"role": c.role, "content": "".join(c.content) if c.content else None}
        if c.reasoning:
            message["reasoning_content"] = "".join(c.reasoning)
        if c.refusal:
            message["refusal"] = "".join(c.refusal)
        if c.tool_calls:
            message["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
        elif message["content"] is None:
            message["content"] = ""
        return {"index": index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
