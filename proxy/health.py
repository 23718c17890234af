"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cache.errors import CacheError

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Models loaded and the store usable (with Redis: ready even while Redis is down, since requests fail open
    and a replica taken out of service would fail them)."""
    svc = getattr(request.app.state, "services", None)
    if svc is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    store = "ok"
    try:
        await svc.cache.store.ping()
    except CacheError as exc:
        if svc.follower is None:  # the local store is this replica's own: without it nothing works
            return JSONResponse({"status": "store unavailable", "detail": str(exc)}, status_code=503)
        store = f"unavailable, failing open: {exc}"  # Redis down: requests still succeed, so stay in service
    return JSONResponse({
        "status": "ready",
        "store": store,
        "embedder": svc.embedder.model_id,
        "indexed_vectors": len(svc.cache.index),
        "local_models": svc.cascade.serving,
        "local_models_off": svc.cascade.off,  # failed the self-check or crashed: their tiers escalate
        "upstream_configured": svc.upstream is not None,  # not the URL: it may hold credentials or internal names
    })  # fmt: skip
