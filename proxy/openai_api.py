"""OpenAI-compatible routes: thin; parse, call the pipeline, render."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive

from cache.embedder import DEFAULT_EMBEDDER, PACKAGED_EMBEDDERS
from cache.keys import Kind
from proxy import openapi
from proxy.context import SHARED, CacheDirectives, RequestContext, key_id_of, request_id_of, token_budget_of
from proxy.errors import InvalidRequest, NotFound, PayloadTooLarge, ProxyError, RequestTimeout, from_validation
from proxy.outcome import Reply
from proxy.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from proxy.services import Services

router = APIRouter(prefix="/v1")
M = TypeVar("M", bound=BaseModel)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


PARSE_IN_THREAD = 64 * 1024  # bodies at least this large are parsed off the event loop


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, refused with a 413 as soon as it is known to be over `limit` bytes: from Content-Length
    before reading anything, else while it is read (a chunked body that keeps coming); a 408 when it has not all
    arrived within `timeout_s` (a client trickling it byte by byte)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, within the size limit (413 above); anything else is a 400."""
    settings = services(request).settings
    raw = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        body = await asyncio.to_thread(json.loads, raw) if len(raw) >= PARSE_IN_THREAD else json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    if SURROGATE_ESCAPE.search(raw) and (where := lone_surrogate(body)) is not None:
        raise InvalidRequest(f"'{where}' holds a lone UTF-16 surrogate (an escape such as \\ud800 that is not "
                             "half of a pair): not text", param=where, code="invalid_value")  # fmt: skip
    return body


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a surrogate written as an escape: json.loads lets lone ones in
SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "body") -> str | None:
    """The dotted path of the first string in `value` that holds a lone surrogate (of the object, for a key that
    does), or None."""
    if isinstance(value, str):
        return path if SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if SURROGATE.search(key):
                return path
            if (found := lone_surrogate(item, key if path == "body" else f"{path}.{key}")) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := lone_surrogate(item, f"{path}.{i}")) is not None:
                return found
    return None


async def parse_body(request: Request, model: type[M]) -> tuple[M, dict[str, Any]]:
    """The JSON body, validated; errors are 400s that name the parameter."""
    body = await read_json(request)
    try:
        return model.model_validate(body), body
    except ValidationError as exc:
        raise from_validation(exc) from None


async def _disconnect(receive: Receive) -> None:
    """Return once the client has gone away (the body was already read, so only http.disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def context(request: Request, svc: Services) -> RequestContext:
    headers = request.headers
    key_id = key_id_of(headers)  # hashed once: it is also the tenant unless tenants share the cache
    return RequestContext(
        request_id=request_id_of(request.scope),
        tenant=SHARED if svc.settings.share_cache_across_tenants else key_id,
        headers={k.lower(): v for k, v in headers.items()},
        key_id=key_id,
        token_budget=token_budget_of(headers),
        directives=CacheDirectives.parse(headers.get("cache-control")),
        disconnected=lambda: _disconnect(request.receive),
    )


def render(reply: Reply) -> Response:
    headers = reply.outcome.headers()
    if reply.stream is not None:
        headers["cache-control"] = "no-cache"
        return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
    return UpstreamJSON(reply.body, headers=headers)


class UpstreamJSON(JSONResponse):
    """JSON as the upstream sent it: some servers put NaN or Infinity in logprobs, which Python parses, so
    refusing to write them back would turn a good answer into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode()


async def _generate(request: Request, kind: Kind, model: type[ChatCompletionRequest | CompletionRequest]) -> Response:
    svc = services(request)
    parsed, body = await parse_body(request, model)
    ctx = context(request, svc)
    reply = await svc.pipeline.run(kind, parsed, body, ctx)
    record = svc.learner.remember(ctx, reply.outcome)  # written in the background: for POST /v1/feedback
    response = render(reply)
    response.background = svc.learner.after(record, ctx, kind, body, reply)  # after the response is sent
    return response


@router.post("/chat/completions", openapi_extra=openapi.body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """Chat completions, streamed or not, answered from the cache when it can."""
    return await _generate(request, "chat", ChatCompletionRequest)


@router.post("/completions", openapi_extra=openapi.body(CompletionRequest))
async def completions(request: Request) -> Response:
    """Legacy text completions, answered from the cache when it can."""
    return await _generate(request, "completion", CompletionRequest)


class Feedback(BaseModel):
    """POST /v1/feedback: whether the answer to an earlier request (its x-request-id) was right."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    good: bool


@router.post("/feedback", openapi_extra=openapi.body(Feedback))
async def feedback(request: Request) -> Response:
    """Label an answer: the same API key as its request. A bad answer the cache holds is deleted at once, and a
    label on a semantic hit counts against the threshold that served it (proxy/learning.py)."""
    svc = services(request)
    parsed, _ = await parse_body(request, Feedback)
    result = await svc.learner.feedback(key_id_of(request.headers), parsed.request_id, parsed.good)
    return JSONResponse({"object": "feedback", **result})


def _is_local_embedder(name: str, svc: Services) -> bool:
    lowered = name.lower()
    return lowered in PACKAGED_EMBEDDERS or lowered in {"cachecade/embed", svc.settings.embedder.lower()}


@router.post("/embeddings", openapi_extra=openapi.body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    """Embeddings from the local embedder; other models are forwarded to the upstream when one is set."""
    svc = services(request)
    parsed, body = await parse_body(request, EmbeddingRequest)
    if not _is_local_embedder(parsed.model, svc):
        if svc.upstream is None:
            raise NotFound(
                f"model {parsed.model!r} is not served here; local embedder: {DEFAULT_EMBEDDER}", param="model"
            )
        upstream = svc.upstream
        payload = await upstream.post("embeddings", body, upstream.headers(context(request, svc).headers))
        return JSONResponse(payload, headers={"x-served-by": "upstream"})
    if parsed.dimensions is not None and parsed.dimensions != svc.embedder.dim:
        raise InvalidRequest(
            f"dimensions must be {svc.embedder.dim} for {parsed.model} (or omitted)", param="dimensions"
        )
    texts = [parsed.input] if isinstance(parsed.input, str) else parsed.input
    vectors = await svc.embedder.embed_many(texts)
    tokens = sum(await svc.embedder.count_tokens(texts))
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, parsed.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse(
        {"object": "list", "data": data, "model": parsed.model,
         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
        headers={"x-served-by": "local"},
    )  # fmt: skip


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


@router.get("/models")
async def models(request: Request) -> Response:
    """The local embedder and the cascade's routes (the model names it answers), plus the upstream's models
    (when one is set and answers)."""
    svc = services(request)
    local = [DEFAULT_EMBEDDER, *svc.cascade.policy.routes]
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": int(svc.started_at), "owned_by": "cachecade"} for name in local
    ]
    if svc.upstream is not None:
        try:
            upstream = await svc.upstream.get("models", svc.upstream.headers(context(request, svc).headers))
            data += [m for m in upstream.get("data", []) if isinstance(m, dict) and "id" in m]
        except ProxyError:
            pass  # the local list still answers; /readyz says more
    return JSONResponse({"object": "list", "data": data}, headers={"x-served-by": "cachecade"})
