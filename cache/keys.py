"""Cache keys: the canonical request, the exact key, the partition and the text to embed.

Keying rule (docs/caching.md): only the last user turn is embedded; everything else that can change the answer
(system prompt, earlier turns, tools, response_format, sampling parameters, model) goes into an exact *context
fingerprint*. The partition is (tenant, namespace, kind, context fingerprint) and never contains the embedded text,
so paraphrases of the last turn land in the same partition while a different conversation never does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["chat", "completion"]

# Fields that do not change a complete answer. max_tokens is left out on purpose: only complete answers
# (finish_reason == "stop") are cached, and the lookup checks that a stored answer fits the caller's limit.
IGNORED_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "cache",
        "user",
        "metadata",
        "store",
        "max_tokens",
        "max_completion_tokens",
        "token_budget",
    }
)
_EMBEDDED = "\x00cachecade:embedded-turn\x00"


@dataclass(frozen=True)
class CacheKey:
    """Everything the cache needs to look a request up and to store its answer."""

    kind: Kind
    tenant: str
    namespace: str
    model: str
    exact: str
    partition: str
    text: str | None  # the text to embed; None when the request has no single final user turn


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, integral floats written as integers (0.0 == 0)."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def _digest(*parts: Any) -> str:
    # surrogatepass: a lone surrogate ("\ud800") is valid JSON and must key, not crash.
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8", "surrogatepass")).hexdigest()


def content_text(content: Any) -> str | None:
    """The text of a message's content: a string, or a list made only of text parts; None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    return None


def _normalise_message(message: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(message)
    text = content_text(message.get("content"))
    if text is not None:
        out["content"] = text  # "hi" and [{"type": "text", "text": "hi"}] are the same request
    return out


def _request_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in IGNORED_FIELDS}


def chat_key(body: Mapping[str, Any], tenant: str, namespace: str) -> CacheKey:
    """Key a validated chat completion request body."""
    fields = _request_fields(body)
    messages = [_normalise_message(m) for m in body["messages"]]
    fields["messages"] = messages
    exact = _digest("exact", tenant, namespace, "chat", fields)
    last = messages[-1]
    text = last.get("content") if last.get("role") == "user" else None
    if not isinstance(text, str) or not text.strip():
        text = None
    context = dict(fields)
    if text is not None:
        context["messages"] = [*messages[:-1], {**last, "content": _EMBEDDED}]
    partition = _digest("partition", tenant, namespace, "chat", context)
    return CacheKey("chat", tenant, namespace, str(body["model"]), exact, partition, text)


def completion_key(body: Mapping[str, Any], tenant: str, namespace: str) -> CacheKey:
    """Key a validated legacy completion request body; a single string prompt is the embedded text."""
    fields = _request_fields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = fields["prompt"] = prompt[0]  # "x" and ["x"] are the same request
    exact = _digest("exact", tenant, namespace, "completion", fields)
    text = prompt if isinstance(prompt, str) and prompt.strip() else None
    context = {k: v for k, v in fields.items() if k != "prompt"} if text is not None else fields
    partition = _digest("partition", tenant, namespace, "completion", context)
    return CacheKey("completion", tenant, namespace, str(body["model"]), exact, partition, text)
