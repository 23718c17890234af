"""The serving objects built once at start-up and kept on app.state."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from cache.embedder import AsyncEmbedder
from cache.errors import CacheError
from cache.follower import Follower
from cache.response_cache import ResponseCache
from proxy.cascade import Cascade
from proxy.config import Settings
from proxy.learning import Learner
from proxy.pipeline import CompletionPipeline
from proxy.spending import SpendPlanner
from proxy.upstream import Upstream

log = logging.getLogger("cachecade")


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
    started_at: float = field(default_factory=time.time)

    async def publish(self, name: str, policy: BaseModel) -> None:
        """Tell the other replicas (through the Redis store) about a policy changed here; best effort."""
        if self.follower is None:
            return
        try:
            await self.follower.store.publish_policy(name, policy.model_dump(mode="json"))
        except CacheError as exc:
            log.warning("could not share the %s policy change with other replicas: %s", name, exc)
