"""OpenAI protocol models for what clients send. Lenient on unknown fields (they pass through to the upstream),
strict on the types of the fields we read (no silent coercion of "yes" to true)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

StrictFloat = Annotated[float, Field(strict=True)]
Probability = Annotated[float, Field(strict=True, ge=0.0, le=1.0)]


class CacheOptions(BaseModel):
    """The body field `cache` (sent with the OpenAI SDK as extra_body={"cache": {...}})."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    namespace: Annotated[str, Field(strict=True, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")] = (
        "default"
    )
    ttl: Annotated[float, Field(strict=True, gt=0)] | None = None  # seconds
    threshold: Probability | None = None  # may only be stricter than the configured one
    verifier_threshold: Probability | None = None  # likewise, for the verifier's probability


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Message(_Lenient):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class _Generation(_Lenient):
    model: Annotated[str, Field(strict=True, min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=128)] | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    cache: CacheOptions | None = None
    token_budget: Annotated[int, Field(strict=True, ge=1)] | None = None  # like x-token-budget; never forwarded


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    """POST /v1/completions (legacy)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Lenient):
    """POST /v1/embeddings."""

    model: Annotated[str, Field(strict=True, min_length=1)]
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(strict=True, ge=1)] | None = None
