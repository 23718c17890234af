"""The serving objects built once at start-up and kept on app.state."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cache.embedder import AsyncEmbedder
from cache.errors import CacheError
from cache.follower import Follower
from cache.response_cache import ResponseCache
from proxy.cascade import Cascade
from proxy.config import Settings
from proxy.learning import Learner
from proxy.pipeline import CompletionPipeline
from proxy.responses import StoredResponses
from proxy.spending import SpendPlanner
from proxy.upstream import Upstream

log = logging.getLogger("cachecade")
AUDIT_KEEP = 100_000  # audit records kept in the store, newest


def fingerprint(policy: BaseModel) -> str:
    """A short digest of a policy's fields: which settings a runtime change was made over."""
    return hashlib.sha256(json.dumps(policy.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Services:
    """Everything a route needs, built in the app's lifespan."""

    settings: Settings
    embedder: AsyncEmbedder
    cache: ResponseCache
    upstream: Upstream | None
    pipeline: CompletionPipeline
    cascade: Cascade
    spending: SpendPlanner
    learner: Learner
    follower: Follower | None = None  # with the Redis store: keeps the index and policies in step
    responses: StoredResponses = field(init=False)  # the Responses API's stored responses (proxy/responses.py)
    started_at: float = field(default_factory=time.time)
    configured: dict[str, str] = field(default_factory=dict)  # per policy: the fingerprint of what settings gave
    in_force: dict[str, dict[str, Any]] = field(default_factory=dict)  # per policy: its fields now (audit's "old")

    def __post_init__(self) -> None:
        self.responses = StoredResponses(self.cache.store, self.settings.responses_ttl_s, self.follower is not None)

    async def publish(self, name: str, policy: BaseModel, who: str = "learning") -> None:
        """A policy changed here: the change is logged and audited (who, the old and new values, when), the policy
        kept in the store so that it lasts across restarts, and shared with the other replicas. Best effort: a store
        that is down loses the record, never the change."""
        new = policy.model_dump(mode="json")
        old = self.in_force.get(name, {})
        self.in_force[name] = new
        changed = {k: {"old": old.get(k), "new": v} for k, v in new.items() if old.get(k) != v}
        log.info("%s changed %s policy: %s", who.split(":", 1)[0], name, {k: v["new"] for k, v in changed.items()})
        record = {"at": time.time(), "who": who, "policy": name, "changed": changed}
        kept = {"fields": new, "settings": self.configured.get(name, "")}
        try:
            await self.cache.store.append_audit(json.dumps(record), AUDIT_KEEP)
            await self.cache.store.save_policy(name, json.dumps(kept))
        except CacheError as exc:
            log.warning("could not keep the %s policy change in the store (audit, restart): %s", name, exc)
        if self.follower is None:
            return
        try:
            await self.follower.store.publish_policy(name, new)
        except CacheError as exc:
            log.warning("could not share the %s policy change with other replicas: %s", name, exc)
