"""What the pipeline hands back: the outcome of a request (rendered as response headers), a miss with what its
answer needs, and the reply (JSON or an SSE stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from cache.keys import CacheKey, Kind
from proxy.budget import Ticket
from proxy.context import RequestContext
from proxy.flights import Flight
from proxy.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Outcome:
    """What happened to a request; rendered as response headers."""

    cache: str = "BYPASS"  # HIT-EXACT | HIT-SEMANTIC | MISS | BYPASS
    served_by: str = "upstream"  # cache | local:<model> | upstream:<model> | none
    similarity: float | None = None
    threshold: float | None = None
    age: float | None = None
    entry_id: str | None = None
    reason: str | None = None  # why the cache was bypassed
    escalated: list[str] = field(default_factory=list)  # local tiers tried and why they passed it on
    confidence: float | None = None  # gate score of the local answer served
    gate: str | None = None  # pass | last-tier (no upstream to escalate to, so not gated)
    rejected: list[tuple[str, float, str]] = field(default_factory=list)  # (tier, score, text) the gate rejected
    budget: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*, x-token-estimate, x-token-cap
    coalesced: bool = False  # waited for an identical request in flight and was served its answer
    verifier: str | None = None  # accept | reject | skipped: what the cache verifier decided
    verifier_score: float | None = None  # its probability for the candidate served (or the best one rejected)
    namespace: str = ""  # the request's cache namespace and model (what its labels count against)
    model: str = ""
    lookup_ms: float | None = None  # the cache lookup (embedding, search, verification), wall time
    verifier_ms: float | None = None  # of which waiting for the verifier's scores

    def headers(self) -> dict[str, str]:
        out = {"x-cache": self.cache, "x-served-by": self.served_by, **self.budget}
        if self.escalated:
            out["x-escalated"] = ",".join(self.escalated)
        if self.confidence is not None:
            out["x-local-confidence"] = f"{self.confidence:.4f}"
        if self.gate is not None:
            out["x-local-gate"] = self.gate
        if self.similarity is not None:
            out["x-cache-similarity"] = f"{self.similarity:.4f}"
        if self.threshold is not None:
            out["x-cache-threshold"] = f"{self.threshold:.4f}"
        if self.age is not None:
            out["age"] = str(int(self.age))
        if self.entry_id is not None:
            out["x-cache-entry-id"] = self.entry_id
        if self.reason is not None:
            out["x-cache-bypass-reason"] = self.reason
        if self.coalesced:
            out["x-cache-coalesced"] = "true"
        if self.verifier is not None:
            out["x-cache-verifier"] = self.verifier
        if self.verifier_score is not None:
            out["x-cache-verifier-score"] = f"{self.verifier_score:.4f}"
        timings = [(name, ms) for name, ms in (("cache", self.lookup_ms), ("verifier", self.verifier_ms))
                   if ms is not None]  # fmt: skip
        if timings:  # the W3C Server-Timing header: what the cache's own steps cost this request
            out["server-timing"] = ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings)
        return {name: header_safe(value) for name, value in out.items()}


def header_safe(value: str) -> str:
    """A header value from what a client sent (the model name in x-served-by): printable ASCII as it is, anything
    else (CR, LF, non-Latin text) percent-encoded, so it can neither break the response nor inject a header."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%"))


@dataclass(frozen=True)
class Admission:
    """What storing a miss's answer needs: the key (None: do not store), the query vector, a per-request TTL."""

    key: CacheKey | None
    vector: np.ndarray | None
    ttl: float | None


@dataclass(frozen=True)
class Miss:
    """One request that the cache did not answer, with what its answer needs: how to reach the caller, what
    the cache did (rendered as headers) and how to store the answer."""

    kind: Kind
    request: ChatCompletionRequest | CompletionRequest
    body: Mapping[str, Any]
    ctx: RequestContext
    outcome: Outcome
    admission: Admission
    key: CacheKey
    ticket: Ticket
    flight: Flight | None = None  # this request leads the answer for its exact key (single flight)


@dataclass
class Reply:
    """A JSON body or an SSE byte stream, with its outcome."""

    outcome: Outcome
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
