"""How an entry is laid out in Redis: one hash of four fields (see cache.redis_store for the keys around it).

  ix        what a rebuild reads: partition NUL embedder_id NUL expires_at NUL vector (float16)
  meta      JSON array of the small fields (META)
  response  the answer, JSON
  text      the embedded text (absent when None)

Each field of a hash costs Redis ~50-70 B, so the small ones are packed. A vector float16 cannot hold (not
normalised) goes in `vector` as float32. Entries written before this layout (a field each, `vid`, `vector` float32)
are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cache.store import Entry

META = ("tenant", "namespace", "kind", "model", "exact_key", "tier", "created_at", "prompt_tokens",
        "completion_tokens")  # fmt: skip
# What a rebuild reads: `ix` (and `vector`, float32, when float16 could not hold it), or the earlier layout's fields.
REBUILD_FIELDS = ("ix", "vector", "partition", "embedder_id", "expires_at")
_F16_MAX = float(np.finfo(np.float16).max)


def entry_fields(e: Entry) -> dict[str, Any]:
    """The hash of an entry (see the module's docstring). Raises ValueError for what cannot be stored."""
    if "\0" in e.partition + e.embedder_id:
        raise ValueError("NUL in a partition or embedder id")
    vector = None if e.vector is None else np.asarray(e.vector, dtype=np.float32)
    # float16 halves the bytes and moves the cosine of unit vectors by ~1e-6, far below a threshold's step; a
    # vector it cannot hold (past 65504, or NaN: not normalised) is kept as float32.
    half = vector is not None and bool(np.abs(vector).max(initial=0.0) <= _F16_MAX)
    v16 = vector.astype(np.float16).tobytes() if vector is not None and half else b""
    expires = b"" if e.expires_at is None else repr(e.expires_at).encode()
    fields: dict[str, Any] = {
        "ix": b"\0".join([e.partition.encode(), e.embedder_id.encode(), expires, v16]),
        "meta": json.dumps([getattr(e, k) for k in META], separators=(",", ":")),
        "response": json.dumps(e.response, allow_nan=False, separators=(",", ":")),
    }  # fmt: skip
    if e.text is not None:
        fields["text"] = e.text
    if vector is not None and not half:
        fields["vector"] = vector.tobytes()
    return fields


def index_fields(values: Sequence[bytes | None]) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None]:
    """(partition, embedder_id, expires_at, float16 vector) from the values of REBUILD_FIELDS, in either layout."""
    ix, _, partition, embedder, expires = values
    if ix is None:
        return partition, embedder, expires, None
    partition, embedder, expires, v16 = ix.split(b"\0", 3)
    return partition, embedder, expires, v16


def stored_vector(v16: bytes | None, v32: bytes | None) -> np.ndarray | None:
    if v16:
        return np.frombuffer(v16, dtype=np.float16).astype(np.float32)
    return np.frombuffer(v32, dtype=np.float32) if v32 else None


def small_fields(f: Mapping[str, bytes | None]) -> dict[str, Any]:
    """The small fields of an entry: its JSON `meta`, or (the earlier layout) a field each."""
    packed = f.get("meta")
    if packed:
        return dict(zip(META, json.loads(packed), strict=False))  # not strict: a later version may append
    old = {k: (f[k] or b"").decode() for k in META}
    return old | {"created_at": float(old["created_at"]), "prompt_tokens": int(old["prompt_tokens"]),
                  "completion_tokens": int(old["completion_tokens"])}  # fmt: skip


def entry_of(vid: int, raw: Mapping[bytes, bytes]) -> Entry:
    f = {k.decode(): v for k, v in raw.items()}
    partition, embedder, expires, v16 = index_fields([f.get(k) for k in REBUILD_FIELDS])
    if partition is None or embedder is None:
        raise KeyError("partition")
    return Entry(
        vid=vid, **small_fields(f), partition=partition.decode(), embedder_id=embedder.decode(),
        response=json.loads(f["response"]), expires_at=float(expires) if expires else None,
        text=f.get("text", b"").decode() or None, vector=stored_vector(v16, f.get("vector")),
    )  # fmt: skip
