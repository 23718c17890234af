"""What may be cached and served: run-time tunable cache policy, request cacheability, answer admission."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CachePolicy(BaseModel):
    """Cache behaviour that the admin API can change at run time.

    Thresholds are cosine similarities of L2-normalised embeddings in [0, 1]; higher means closer. The most
    specific one wins (namespace, then model, then the global one); a request may only make it stricter.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    exact_enabled: bool = True
    semantic_enabled: bool = True
    threshold: float = Field(0.95, ge=0.0, le=1.0)
    model_thresholds: dict[str, float] = Field(default_factory=dict)
    namespace_thresholds: dict[str, float] = Field(default_factory=dict)
    ttl_s: float | None = Field(7 * 24 * 3600.0, gt=0)
    max_entries: int | None = Field(100_000, ge=1)
    max_temperature: float = Field(1.0, ge=0.0, le=2.0)
    cache_tool_calls: bool = False
    top_k: int = Field(4, ge=1, le=64)
    # The verifier (cache/verifier.py), when one is loaded: a candidate at cosine >= verifier_band_low is served
    # only if the verifier's probability that both texts ask the same thing is >= its threshold; the cosine
    # `threshold` above then applies only with the verifier off. Candidates at cosine >= verifier_skip_above are
    # served unverified (1.0: none, since word swaps reach 0.99).
    verifier_enabled: bool = True
    verifier_threshold: float = Field(0.5, ge=0.0, le=1.0)
    verifier_model_thresholds: dict[str, float] = Field(default_factory=dict)
    verifier_namespace_thresholds: dict[str, float] = Field(default_factory=dict)
    verifier_band_low: float = Field(0.8, ge=0.0, le=1.0)
    verifier_skip_above: float = Field(1.0, ge=0.0, le=1.0)
    # Learning from labels (cache/labels.py, proxy/learning.py): the largest error rate the operator accepts for
    # semantic hits (None: thresholds do not move), per namespace where set; a threshold is certified by at least
    # learn_min_labels labels at learn_confidence.
    max_error: float | None = Field(None, gt=0.0, lt=1.0)
    namespace_max_error: dict[str, float] = Field(default_factory=dict)
    learn_min_labels: int = Field(30, ge=1)
    learn_confidence: float = Field(0.95, gt=0.5, lt=1.0)
    # Shadow checks: this share of semantic hits and accepted local answers is also asked of the upstream after
    # the response is sent, and the two answers compared (a label); never more than shadow_max_share of this
    # replica's upstream calls, nor shadow_daily_tokens upstream tokens a day (UTC).
    shadow_share: float = Field(0.0, ge=0.0, le=1.0)
    shadow_max_share: float = Field(0.1, ge=0.0, le=1.0)
    shadow_daily_tokens: int = Field(100_000, ge=0)

    def model_post_init(self, __context: Any) -> None:
        for name in ("model_thresholds", "namespace_thresholds", "verifier_model_thresholds",
                     "verifier_namespace_thresholds"):  # fmt: skip
            for key, value in getattr(self, name).items():
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name}[{key!r}] = {value}: a threshold is in [0, 1]")
        for key, value in self.namespace_max_error.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"namespace_max_error[{key!r}] = {value}: an error rate is in (0, 1)")

    def max_error_for(self, namespace: str) -> float | None:
        """The error rate semantic hits in a namespace must stay under (None: no learning there)."""
        return self.namespace_max_error.get(namespace, self.max_error)

    def threshold_for(self, model: str, namespace: str) -> float:
        """The configured threshold for a model and namespace."""
        if namespace in self.namespace_thresholds:
            return self.namespace_thresholds[namespace]
        return self.model_thresholds.get(model, self.threshold)

    def verifier_threshold_for(self, model: str, namespace: str) -> float:
        """The configured verifier threshold (a probability) for a model and namespace."""
        if namespace in self.verifier_namespace_thresholds:
            return self.verifier_namespace_thresholds[namespace]
        return self.verifier_model_thresholds.get(model, self.verifier_threshold)


def uncacheable_reason(body: Mapping[str, Any], policy: CachePolicy) -> str | None:
    """Why this request must bypass the cache, or None when it may be looked up and stored."""
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > policy.max_temperature:
        return "temperature"
    if body.get("n") not in (None, 1):
        return "n"
    if body.get("tools") and not policy.cache_tool_calls:
        return "tools"
    if body.get("functions") and not policy.cache_tool_calls:
        return "tools"
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") or body.get("echo"):
        return "logprobs"  # 0 on /v1/completions still asks for token logprobs
    return None


def admissible(response: Mapping[str, Any], policy: CachePolicy) -> bool:
    """True for a complete answer worth storing: one choice, finished with "stop", no error."""
    if "error" in response:
        return False
    choices = response.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return False
    choice = choices[0]
    finished = {"stop", "tool_calls"} if policy.cache_tool_calls else {"stop"}
    if not isinstance(choice, Mapping) or choice.get("finish_reason") not in finished:
        return False
    message = choice.get("message")
    return not (isinstance(message, Mapping) and message.get("tool_calls") and not policy.cache_tool_calls)
