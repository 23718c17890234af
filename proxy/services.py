"""The serving objects built once at start-up and kept on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cache.embedder import AsyncEmbedder
from cache.response_cache import ResponseCache
from proxy.cascade import Cascade
from proxy.config import Settings
from proxy.pipeline import CompletionPipeline
from proxy.spending import SpendPlanner
from proxy.upstream import Upstream


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
    started_at: float = field(default_factory=time.time)
