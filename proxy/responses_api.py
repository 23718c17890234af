"""Routes of the Responses API: POST /v1/responses (bridged to the chat pipeline, or passed through to an upstream
that speaks it), GET and DELETE /v1/responses/{id} for the responses this proxy stored. Translation and encoding
live in proxy/responses.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from proxy import openapi
from proxy.context import RequestContext, key_id_of
from proxy.errors import InvalidRequest, NotFound, from_validation
from proxy.openai_api import UpstreamJSON, context, parse_body, services
from proxy.protocol import ChatCompletionRequest
from proxy.responses import (
    ResponsesRequest,
    Shell,
    bridgeable,
    chat_body,
    dumps,
    input_messages,
    stream_response,
    to_response,
)
from proxy.services import Services


class FastJSON(JSONResponse):
    """A Response object encoded by proxy.responses.dumps (orjson, with the json module as a fallback)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


router = APIRouter(prefix="/v1")


# A chat field named in a validation error, as the Responses field the client sent.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


async def _native(svc: Services, ctx: RequestContext) -> bool:
    """Whether requests the bridge cannot express go to the upstream's own Responses API."""
    mode = svc.settings.responses_mode
    if svc.upstream is None or mode == "bridge":
        return False
    return mode == "native" or await svc.upstream.speaks_responses(svc.upstream.headers(ctx.headers))


async def _pass_through(svc: Services, body: dict[str, Any], ctx: RequestContext) -> Response:
    """The request as it came, to the upstream's /responses (not cached): its own tools and ids keep working."""
    assert svc.upstream is not None
    headers = svc.upstream.headers(ctx.headers)
    served = {"x-served-by": "upstream", "x-cache": "BYPASS", "x-cache-bypass-reason": "responses-native"}
    if not body.get("stream"):
        return UpstreamJSON(await svc.upstream.post("responses", body, headers), headers=served)
    stack = contextlib.AsyncExitStack()
    chunks = await stack.enter_async_context(svc.upstream.stream("responses", body, headers))

    async def relay() -> AsyncIterator[bytes]:
        async with stack:
            async for chunk in chunks:
                yield chunk

    return StreamingResponse(relay(), media_type="text/event-stream", headers={**served, "cache-control": "no-cache"})


@router.post("/responses", openapi_extra=openapi.body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    """A response, streamed or not: answered by the same tiers as a chat completion (and from the same cache)."""
    svc = services(request)
    parsed, body = await parse_body(request, ResponsesRequest)
    ctx = context(request, svc)
    history: list[dict[str, Any]] = []
    if parsed.previous_response_id is not None:
        record = await svc.responses.load(ctx.key_id, parsed.previous_response_id)
        if record is None:
            if await _native(svc, ctx):
                return await _pass_through(svc, body, ctx)
            raise NotFound(f"no stored response {parsed.previous_response_id!r} for this API key (responses are "
                           "kept when created with store: true)", param="previous_response_id")  # fmt: skip
        history = record["messages"]
    if (field := bridgeable(parsed)) is not None:
        if await _native(svc, ctx):
            return await _pass_through(svc, body, ctx)
        raise InvalidRequest(f"'{field}' is not supported here: the upstream does not speak the Responses API, and "
                             "the chat completions it does speak cannot express it", param=field)  # fmt: skip
    turns = history + input_messages(parsed.input)  # the conversation after this request, without instructions
    chat = chat_body(parsed, body, turns)
    try:
        chat_request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = from_validation(exc)
        error.param = _PARAMS.get((error.param or "").split(".")[0], error.param)
        raise error from None
    reply = await svc.pipeline.run("chat", chat_request, chat, ctx)
    learned = svc.learner.remember(ctx, reply.outcome)
    shell = Shell(parsed)

    async def keep(response: dict[str, Any]) -> None:
        if parsed.store:
            await svc.responses.keep(ctx.key_id, shell.id, response, turns)

    headers = reply.outcome.headers()
    if reply.stream is not None:
        out: Response = StreamingResponse(stream_response(reply.stream, shell, keep), media_type="text/event-stream",
                                          headers={**headers, "cache-control": "no-cache"})  # fmt: skip
    else:
        assert reply.body is not None
        response = to_response(reply.body, shell)
        await keep(response)
        out = FastJSON(response, headers=headers)
    out.background = svc.learner.after(learned, ctx, "chat", chat, reply)
    return out


@router.get("/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    """A response this proxy stored for the caller's API key (another key's id is a 404)."""
    record = await services(request).responses.load(key_id_of(request.headers), response_id)
    if record is None:
        raise NotFound(f"no stored response {response_id!r} for this API key", param="response_id")
    return FastJSON(record["response"])


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    """Delete a stored response of the caller's API key: it can no longer be continued or read."""
    if not await services(request).responses.delete(key_id_of(request.headers), response_id):
        raise NotFound(f"no stored response {response_id!r} for this API key", param="response_id")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
