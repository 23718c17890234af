"""The admin API under /admin, behind a bearer token (CACHECADE_ADMIN_TOKEN); disabled without one."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ValidationError

from cache.policy import CachePolicy
from cache.store import vid_from_id
from local_models.cascade import CascadePolicy
from proxy import openapi
from proxy.budget import BudgetPolicy
from proxy.errors import InvalidRequest, NotFound, Unauthorized, from_validation
from proxy.openai_api import parse_body, read_json, services
from proxy.services import Services

log = logging.getLogger("cachecade.admin")


def require_admin(request: Request) -> Services:
    """Check the bearer token in constant time; a 404 when admin is disabled."""
    svc = services(request)
    token = svc.settings.admin_token
    if token is None:
        raise NotFound("the admin API is disabled: set CACHECADE_ADMIN_TOKEN to enable it")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("admin API: missing or wrong bearer token", headers={"www-authenticate": "Bearer"})
    return svc


def admin_id(svc: Services) -> str:
    """Who made a change, for the audit log: the admin token's id (a digest, never the token)."""
    token = svc.settings.admin_token
    return _token_id(token.get_secret_value()) if token else "admin"


@functools.cache
def _token_id(token: str) -> str:
    return "admin:" + hashlib.sha256(token.encode()).hexdigest()[:12]


Admin = Annotated[Services, Depends(require_admin)]
router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/config")
async def get_config(svc: Admin) -> dict[str, Any]:
    """The cache policy in force (thresholds are cosine similarities in [0, 1], higher = stricter)."""
    return svc.cache.policy.model_dump()


P = TypeVar("P", bound=BaseModel)


async def _merged(request: Request, current: P) -> P:
    """The policy with the body's fields changed (the rest stay), validated; a bad field is a 400 naming it."""
    body = await read_json(request)
    try:
        return type(current).model_validate({**current.model_dump(), **body})
    except ValidationError as exc:
        raise from_validation(exc) from None


_CONFIG_BODY = openapi.body(CachePolicy, partial=True)  # PUT and PATCH: any of its fields


@router.put("/config", openapi_extra=_CONFIG_BODY)
@router.patch("/config", openapi_extra=_CONFIG_BODY)
async def put_config(request: Request, svc: Admin) -> dict[str, Any]:
    """Change any policy fields (the rest stay); takes effect at once, and is logged."""
    policy = await _merged(request, svc.cache.policy)
    svc.cache.policy = policy
    await svc.publish("cache", policy, who=admin_id(svc))
    return policy.model_dump()


@router.get("/audit")
async def get_audit(svc: Admin, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    """Every policy change (admin API and learning), newest first: who, when, and each field's old and new value.
    Append-only in the store (the newest 100,000 kept)."""
    records = [json.loads(raw) for raw in await svc.cache.store.audit(limit)]
    return {"object": "list", "data": records}


@router.get("/learning")
async def get_learning(svc: Admin) -> dict[str, Any]:
    """What traffic taught the thresholds: per scope, its labels and the last decision of the rule."""
    return await svc.learner.report()


@router.get("/cascade")
async def get_cascade(svc: Admin) -> dict[str, Any]:
    """The cascade policy in force: routes, per-model gate thresholds (in [0, 1], higher = stricter), samples."""
    return {**svc.cascade.policy.model_dump(), "local_models": svc.cascade.serving,
            "local_models_off": svc.cascade.off}  # fmt: skip


_CASCADE_BODY = openapi.body(CascadePolicy, partial=True)  # PUT and PATCH: any of its fields


@router.put("/cascade", openapi_extra=_CASCADE_BODY)
@router.patch("/cascade", openapi_extra=_CASCADE_BODY)
async def put_cascade(request: Request, svc: Admin) -> dict[str, Any]:
    """Change any cascade fields (the rest stay); routes may only name loaded local models. Logged."""
    policy = await _merged(request, svc.cascade.policy)
    try:
        policy.check_models(svc.cascade.models)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="routes") from None
    svc.cascade.policy = policy
    await svc.publish("cascade", policy, who=admin_id(svc))
    return await get_cascade(svc)


@router.get("/budgets")
async def get_budgets(svc: Admin) -> dict[str, Any]:
    """Token and request limits per key id, the default for other keys, and the decoding policy for budgets."""
    return svc.spending.policy.model_dump()


_BUDGETS_BODY = openapi.body(BudgetPolicy, partial=True)  # PUT and PATCH: any of its fields


@router.put("/budgets", openapi_extra=_BUDGETS_BODY)
@router.patch("/budgets", openapi_extra=_BUDGETS_BODY)
async def put_budgets(request: Request, svc: Admin) -> dict[str, Any]:
    """Change any budget fields (the rest stay; `keys` is replaced whole); takes effect at once, and is logged."""
    budgets = svc.spending.budgets
    policy = await _merged(request, budgets.policy)
    budgets.policy = policy
    await svc.publish("budgets", policy, who=admin_id(svc))
    return policy.model_dump()


@router.get("/budgets/usage")
async def budget_usage(svc: Admin, key_id: Annotated[str, Query(min_length=1)]) -> dict[str, Any]:
    """One key's limits and what it used in the current windows (reading counts nothing)."""
    ticket = await svc.spending.budgets.peek(key_id)
    now = time.time()
    usages = [*ticket.tokens, *([ticket.requests] if ticket.requests else [])]
    windows = [{"what": u.what, "window": u.window, "limit": u.limit, "used": u.used, "remaining": u.remaining,
                "resets_in_s": round(u.resets_at - now, 1)} for u in usages]  # fmt: skip
    return {"key_id": key_id, "limits": ticket.limits.model_dump(), "windows": windows}


@router.get("/stats")
async def stats(svc: Admin) -> dict[str, Any]:
    """Hits by tier, misses, hit rate, entries, tokens saved, since this process started."""
    return {
        **svc.cache.stats.as_dict(),
        "cascade": {
            **svc.cascade.stats.as_dict(),
            "local_models": svc.cascade.serving,
            "local_models_off": svc.cascade.off,
            "router": svc.cascade.router.summary() if svc.cascade.router is not None else None,
        },
        "tokens": {**svc.spending.stats.as_dict(), "saved_by_cache": svc.cache.stats.tokens_saved},
        "learning": {
            "labels": svc.learner.stats.labels,
            "entries_deleted": svc.learner.stats.entries_deleted,
            "threshold_changes": svc.learner.stats.changes,
            "shadow": svc.learner.stats.shadow,
            "escalations": svc.learner.stats.escalations,
            "thresholds": {scope: d.threshold for scope, d in svc.learner.decisions.items()},
        },
        "entries": await svc.cache.store.count(),
        "indexed_vectors": len(svc.cache.index),
        "partitions": svc.cache.index.partitions(),
        "index_builds_in_flight": svc.cache.index.building(),
        "uptime_s": round(time.time() - svc.started_at, 1),
    }


@router.get("/entries")
async def list_entries(
    svc: Admin,
    tenant: str | None = None,
    namespace: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Newest entries first (metadata only: no answer text, no vectors)."""
    entries = await svc.cache.store.list_entries(tenant=tenant, namespace=namespace, limit=limit)
    return {"object": "list", "data": [e.summary() for e in entries]}


@router.delete("/entries/{entry_id}")
async def delete_entry(entry_id: str, svc: Admin) -> dict[str, Any]:
    """Delete one entry by the id shown in x-cache-entry-id."""
    vid = vid_from_id(entry_id)
    if vid is None:
        raise InvalidRequest(f"{entry_id!r} is not an entry id (16 hex digits)", param="entry_id")
    if not await svc.cache.delete([vid]):
        raise NotFound(f"no entry {entry_id}", param="entry_id")
    log.info("admin deleted entry %s", entry_id)
    return {"deleted": 1}


@router.delete("/entries")
async def delete_entries(svc: Admin, namespace: str | None = None, tenant: str | None = None) -> dict[str, Any]:
    """Delete every entry of a namespace and/or tenant (one of them is required; see /admin/flush)."""
    if namespace is None and tenant is None:
        raise InvalidRequest("give namespace and/or tenant; to delete everything use POST /admin/flush",
                             param="namespace")  # fmt: skip
    deleted = await svc.cache.delete_where(tenant=tenant, namespace=namespace)
    log.info("admin deleted %d entries (namespace=%s tenant=%s)", deleted, namespace, tenant)
    return {"deleted": deleted}


class FlushRequest(BaseModel):
    """POST /admin/flush needs {"confirm": "flush"}."""

    confirm: str | None = None


@router.post("/flush", openapi_extra=openapi.body(FlushRequest))
async def flush(request: Request, svc: Admin) -> dict[str, Any]:
    """Delete every entry; needs the explicit confirmation field."""
    parsed, _ = await parse_body(request, FlushRequest)
    if parsed.confirm != "flush":
        raise InvalidRequest('flushing deletes every entry: send {"confirm": "flush"}', param="confirm")
    deleted = await svc.cache.flush()
    log.warning("admin flushed the cache: %d entries deleted", deleted)
    return {"deleted": deleted}
