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
    """Models loaded and the store usable."""
    svc = getattr(request.app.state, "services", None)
    if svc is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    try:
        await svc.cache.store.ping()
    except CacheError as exc:
        return JSONResponse({"status": "store unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({
        "status": "ready",
        "embedder": svc.embedder.model_id,
        "indexed_vectors": len(svc.cache.index),
        "local_models": sorted(svc.cascade.workers),
        "upstream_configured": svc.upstream is not None,  # not the URL: it may hold credentials or internal names
    })  # fmt: skip
