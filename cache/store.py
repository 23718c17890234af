"""Cache entries and the store interface. The store is the source of truth; vector indexes follow it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cache.labels import Label, Served


def new_vid() -> int:
    """A random positive 63-bit id: usable as a FAISS id, unique across replicas without coordination."""
    return secrets.randbits(63) or 1


def hex_id(vid: int) -> str:
    """The public form of an entry id: 16 hex digits (also how the Redis store names its keys)."""
    return format(vid, "016x")


def vid_from_id(entry_id: str) -> int | None:
    """Parse the public entry id (16 hex digits); None when it is not one."""
    try:
        vid = int(entry_id, 16)
    except ValueError:
        return None
    return vid if len(entry_id) == 16 and 0 < vid < 2**63 else None


@dataclass
class Entry:
    """One cached answer with everything needed to re-check it on read and to rebuild the index."""

    vid: int
    tenant: str
    namespace: str
    kind: str
    model: str
    partition: str
    exact_key: str
    response: dict[str, Any]  # the complete non-stream response object, replayable as JSON or as SSE
    tier: str  # which tier produced it: "upstream", later "local:<model>"
    created_at: float
    expires_at: float | None
    text: str | None = None  # the embedded text, kept so a new embedder can re-embed
    vector: np.ndarray | None = field(default=None, repr=False)
    embedder_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def id(self) -> str:
        """The public id: 16 hex digits."""
        return hex_id(self.vid)

    @property
    def tokens_saved(self) -> int:
        """Tokens a hit on this entry spares the caller: its prompt and its answer (an unknown answer length: 0)."""
        return self.prompt_tokens + max(0, self.completion_tokens)

    def expired(self, now: float) -> bool:
        """True once the absolute TTL has passed."""
        return self.expires_at is not None and now >= self.expires_at

    def age(self, now: float) -> float:
        """Seconds since the entry was stored."""
        return max(0.0, now - self.created_at)

    def summary(self) -> dict[str, Any]:
        """What the admin API shows of an entry (no vectors, no answer text)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "namespace": self.namespace,
            "kind": self.kind,
            "model": self.model,
            "tier": self.tier,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass(frozen=True)
class PutResult:
    """Ids an insert removed: the entry it replaced (same exact key) and the ones evicted (LRU)."""

    replaced: list[int]
    evicted: list[int]


@dataclass(frozen=True)
class IndexedVector:
    """What a replica needs from the store to rebuild its vector index."""

    vid: int
    partition: str
    vector: np.ndarray


class EntryStore(Protocol):
    """Where entries live. Methods that remove entries return the removed ids so indexes can follow."""

    async def put(self, entry: Entry, max_entries: int | None) -> PutResult:
        """Store an entry, replacing one with the same exact key and evicting the least recently used."""
        ...

    async def get(self, vid: int) -> Entry | None: ...

    async def get_exact(self, exact_key: str, now: float) -> Entry | None:
        """The live entry stored under this exact key, if any."""
        ...

    async def touch(self, last_used: dict[int, float]) -> None:
        """Record uses (id -> time), for LRU eviction; ids that are gone are ignored."""
        ...

    async def delete(self, vids: list[int]) -> list[int]: ...

    async def delete_where(self, *, tenant: str | None, namespace: str | None) -> list[int]: ...

    async def flush(self) -> int: ...

    async def purge_expired(self, now: float) -> list[int]: ...

    async def count(self) -> int: ...

    async def list_entries(self, *, tenant: str | None, namespace: str | None, limit: int) -> list[Entry]: ...

    def iter_vectors(self, embedder_id: str) -> AsyncIterator[IndexedVector]:
        """Every live vector made by this embedder, for an index rebuild at start."""
        ...

    async def ping(self) -> None:
        """Raise StoreError when the store is not usable."""
        ...

    async def close(self) -> None: ...

    # Labels from traffic (cache/labels.py): what answered a request, and whether answers were right.

    async def remember(self, served: Served, expires_at: float) -> None: ...

    async def recall(self, key_id: str, request_id: str, now: float) -> Served | None: ...

    async def claim_label(self, key_id: str, request_id: str) -> bool:
        """True the first time a request is labelled, False after."""
        ...

    async def add_label(self, label: Label, keep: int) -> None: ...

    async def labels(self, scope: str, limit: int) -> list[Label]:
        """The newest `limit` labels of a scope, newest first."""
        ...

    async def label_scopes(self) -> list[str]: ...

    # Stored responses (proxy/responses.py): what continues a Responses API conversation, per API key.

    async def save_responses(self, items: list[tuple[str, str, str, float]]) -> None:
        """Keep stored Responses API responses: (API key id, response id, record, expires_at) each."""
        ...

    async def load_response(self, key_id: str, response_id: str, now: float) -> str | None:
        """A stored response of this API key, or None (also for another key's id)."""
        ...

    async def delete_response(self, key_id: str, response_id: str) -> bool:
        """Delete a stored response of this API key; False when there was none."""
        ...

    # Runtime policy changes (proxy/services.py): the policy in force per name, and the audit log of changes.

    async def save_policy(self, name: str, record: str) -> None:
        """Keep the runtime policy `name` (a JSON record), replacing the one kept."""
        ...

    async def load_policy(self, name: str) -> str | None: ...

    async def append_audit(self, record: str, keep: int) -> None:
        """Append a change to the audit log (keeping the newest `keep`)."""
        ...

    async def audit(self, limit: int) -> list[str]:
        """The newest `limit` audit records, newest first."""
        ...

    # The cascade router's shared memory (proxy/router.py): an append-only log of samples, read from a cursor.

    async def add_route_samples(self, samples: list[str], keep: int) -> None:
        """Append samples to the log, keeping about the newest `keep`."""
        ...

    async def route_samples(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (cursor, sample) after the cursor `after` ("" from the oldest kept), oldest first."""
        ...
