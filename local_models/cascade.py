"""Cascade policy (which tiers answer which requested model, and how sure a local tier must be) and the gate.

A route is an ordered list of tiers for a requested model name (an alias such as `cachecade/auto`, or a real
model name): local model names, then optionally `upstream` (forward as requested, or as `upstream_model`) or
`upstream:<model>`. A requested model with no route goes straight to the upstream; a local model never answers
for it unless configured (or no upstream is configured at all and `local_without_upstream` is on).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from local_models.confidence import Confidence
from local_models.engine import Generation

UPSTREAM = "upstream"
DEFAULT_ROUTE = "cachecade/auto"
# Scores are in [0, 1], higher = surer. Not calibrated to a useful precision: on NQ-open and SVAMP no threshold
# makes the packaged models' accepted answers right even half the time (docs/cascade.md), so these are set high
# and accept only the surest answers (e.g. SmolLM2's "The capital of France is Paris." at 0.82). Calibrate your
# own models with `cachecade calibrate-cascade`.
DEFAULT_THRESHOLDS = {"smollm2": 0.8, "gemma3": 0.9}


@dataclass(frozen=True)
class Tier:
    """One step of a route: a local model, or the upstream (with the model name to send it)."""

    name: str
    local: bool
    upstream_model: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.local else f"{UPSTREAM}:{self.upstream_model}"


def parse_tier(spec: str, requested: str, upstream_model: str | None) -> Tier:
    """`smollm2`, `upstream` or `upstream:gpt-4o-mini`."""
    if spec == UPSTREAM:
        return Tier(UPSTREAM, False, upstream_model or requested)
    if spec.startswith(UPSTREAM + ":"):
        return Tier(UPSTREAM, False, spec.split(":", 1)[1])
    return Tier(spec, True)


class CascadePolicy(BaseModel):
    """Cascade behaviour that the admin API can change at run time."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    routes: dict[str, list[str]] = Field(default_factory=lambda: {DEFAULT_ROUTE: ["smollm2", "gemma3", UPSTREAM]})
    thresholds: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    # Per cache namespace, per tier: what learning from traffic set (proxy/learning.py); over `thresholds`.
    namespace_thresholds: dict[str, dict[str, float]] = Field(default_factory=dict)
    min_token_prob: dict[str, float] = Field(default_factory=dict)
    samples: dict[str, int] = Field(default_factory=dict)
    upstream_model: str | None = None
    cache_local_answers: bool = True
    local_without_upstream: bool = True
    default_route: str = DEFAULT_ROUTE
    max_tokens: int = Field(256, ge=1, le=32768)

    def model_post_init(self, __context: object) -> None:
        for name, values in (("thresholds", self.thresholds), ("min_token_prob", self.min_token_prob)):
            for key, value in values.items():
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name}[{key!r}] = {value}: a confidence is in [0, 1]")
        for namespace, values in self.namespace_thresholds.items():
            for key, value in values.items():
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"namespace_thresholds[{namespace!r}][{key!r}] = {value}: a confidence is in "
                                     "[0, 1]")  # fmt: skip
        for key, k in self.samples.items():
            if not 1 <= k <= 16:
                raise ValueError(f"samples[{key!r}] = {k}: self-consistency takes 1 to 16 samples")
        for alias, tiers in self.routes.items():
            if not tiers:
                raise ValueError(f"routes[{alias!r}] is empty")
            if any(not t or (t.startswith(UPSTREAM) and t != UPSTREAM and not t.startswith(UPSTREAM + ":"))
                   for t in tiers):  # fmt: skip
                raise ValueError(f"routes[{alias!r}]: tiers are local model names, 'upstream' or 'upstream:<model>'")

    def threshold_for(self, tier: str, namespace: str = "") -> float:
        """A tier's gate threshold in a cache namespace: learnt there, else configured, else 1.0 (never accepts)."""
        learnt = self.namespace_thresholds.get(namespace, {}).get(tier)
        return learnt if learnt is not None else self.thresholds.get(tier, 1.0)

    def local_names(self) -> set[str]:
        """Every local model some route names."""
        return {t for tiers in self.routes.values() for t in tiers if not t.startswith(UPSTREAM)}

    def check_models(self, available: Collection[str]) -> None:
        """ValueError naming the route and model when a route uses a model that is not configured."""
        for alias, tiers in self.routes.items():
            for tier in tiers:
                if not tier.startswith(UPSTREAM) and tier not in available:
                    known = ", ".join(sorted(available)) or "none"
                    raise ValueError(f"routes[{alias!r}] names local model {tier!r}, which is not configured "
                                     f"(local models: {known})")  # fmt: skip
        if self.default_route != DEFAULT_ROUTE and self.default_route not in self.routes:
            raise ValueError(f"default_route {self.default_route!r} is not one of the routes")

    def route_for(self, model: str, has_upstream: bool) -> list[Tier] | None:
        """The tiers for a requested model; None = no cascade (straight to the upstream)."""
        specs = self.routes.get(model)
        if specs is None and not has_upstream and self.local_without_upstream:
            specs = self.routes.get(self.default_route)
        if specs is None:
            return None
        tiers = [parse_tier(s, model, self.upstream_model) for s in specs]
        return [t for t in tiers if t.local or has_upstream]


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one local answer."""

    accepted: bool
    reason: str | None = None  # why not: low-confidence, length, empty, repetition


def judge(generation: Generation, confidence: Confidence, threshold: float, min_token_prob: float = 0.0) -> Verdict:
    """Accept a local answer only when it is complete, not degenerate, and confident enough."""
    if generation.finish_reason == "length":
        return Verdict(False, "length")
    if confidence.degenerate is not None:
        return Verdict(False, confidence.degenerate)
    if confidence.score < threshold or confidence.min_prob < min_token_prob:
        return Verdict(False, "low-confidence")
    return Verdict(True)
