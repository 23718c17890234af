"""The Responses API at the edge: a `POST /v1/responses` request is translated into the chat request it means (the
same pipeline answers it: exact and semantic cache, verifier, local cascade, budgets, single flight, learning), and
the chat answer is re-encoded as a Response object or, streamed, as the Responses event sequence. A question asked
through one API is therefore a cache hit through the other.

What the translation keeps: `instructions` (a system message first), `input` as text or items (messages with text
or image parts, earlier `function_call` items and their `function_call_output`), `max_output_tokens`,
`temperature`, `top_p`, `text.format` (JSON schema or JSON object), function `tools` and `tool_choice`,
`parallel_tool_calls`, `user`; other unknown fields pass through to the chat request. What it cannot express (built-in
tools such as web search, file inputs, item references) is a 400 naming the field, unless the upstream speaks the
Responses API itself (proxy/openai_api.py passes those requests through).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from cache.errors import CacheError
from cache.store import EntryStore
from proxy.errors import InvalidRequest, ProxyError, to_proxy_error
from proxy.logs import Throttle
from proxy.protocol import CacheOptions, Probability
from proxy.streaming import SSEParser, StreamAccumulator, sse

log = logging.getLogger("cachecade.responses")
# Responses-only fields that mean nothing to a chat upstream: never forwarded.
_NOT_FORWARDED = {"input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "store",
                  "previous_response_id", "metadata", "stream", "truncation", "include", "background", "reasoning",
                  "conversation", "prompt", "prompt_cache_key", "safety_identifier", "service_tier", "max_tool_calls",
                  "top_logprobs", "stream_options", "n"}  # fmt: skip


class ResponsesRequest(BaseModel):
    """POST /v1/responses: the fields read here; the rest pass through (see the module docstring)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Annotated[str, Field(strict=True, min_length=1)]
    input: StrictStr | list[dict[str, Any]]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool = True
    previous_response_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)] | None = None
    user: StrictStr | None = None
    stream: StrictBool = False
    cache: CacheOptions | None = None
    token_budget: Annotated[int, Field(strict=True, ge=1)] | None = None


def new_id(prefix: str) -> str:
    """A unique id that sorts by time (stored responses are appended to the store's index, not scattered: about
    a fifth less work per row in SQLite)."""
    return f"{prefix}_{time.time_ns():016x}{os.urandom(8).hex()}"


def bridgeable(request: ResponsesRequest) -> str | None:
    """Why the request cannot be expressed as a chat request (the field, for a 400 or a pass-through), or None."""
    for i, tool in enumerate(request.tools or []):
        if tool.get("type") != "function":
            return f"tools.{i}.type"
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            return f"tools.{i}.name"
        if not isinstance(tool.get("parameters", {}), dict | None):
            return f"tools.{i}.parameters"
    choice = request.tool_choice
    if isinstance(choice, dict) and (choice.get("type") != "function" or not isinstance(choice.get("name"), str)):
        return "tool_choice"
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        return "tool_choice"
    if request.text is not None and not isinstance(request.text.get("format", {}), dict):
        return "text.format"
    if isinstance(request.input, list):
        for i, item in enumerate(request.input):
            kind = item.get("type", "message")
            if kind not in ("message", "function_call", "function_call_output", "reasoning"):
                return f"input.{i}.type"
            content = item.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "input_image",
                                                                          "text", "refusal"):  # fmt: skip
                    return f"input.{i}.content.{j}.type"
                if part.get("type") == "input_image" and not part.get("image_url"):
                    return f"input.{i}.content.{j}.file_id"  # a file the upstream holds: not a URL chat can take
    extra = request.model_extra or {}
    for name in ("background", "conversation", "prompt"):
        if extra.get(name):
            return name
    return None


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content for chat: text as a string (one text part is the same string, so that chat and
    Responses requests for the same question share a cache entry), images as image_url parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise InvalidRequest(f"'{where}.{j}.text' must be a string", param=f"{where}.{j}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InvalidRequest(f"'{where}.{j}.image_url' must be a URL", param=f"{where}.{j}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail", "auto")}})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages (consecutive function calls become one assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"'input.{i}.role' must be user, assistant, system or developer",
                                     param=f"input.{i}.role")  # fmt: skip
            messages.append({"role": role, "content": _content(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}  # fmt: skip
            if not all(isinstance(v, str) for v in (call["id"], item.get("name"), item.get("arguments", ""))):
                raise InvalidRequest(f"'input.{i}' needs call_id, name and arguments as strings", param=f"input.{i}")
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and last.get("content") is None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequest(f"'input.{i}.call_id' must be a string", param=f"input.{i}.call_id")
            if isinstance(output, list):  # content parts: their text (bridgeable() let only text parts through)
                output = "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        # reasoning items carry nothing a chat upstream can take: left out
    return messages


def chat_body(request: ResponsesRequest, body: Mapping[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request that `request` means: `turns` is the conversation (the stored history it continues, then
    its input as messages), the instructions go first; fields Responses does not define pass through."""
    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
    chat: dict[str, Any] = {k: v for k, v in body.items() if k not in _NOT_FORWARDED}
    chat |= {"model": request.model, "messages": messages + turns, "stream": request.stream}
    if request.stream:
        chat["stream_options"] = {"include_usage": True}
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    if request.tools:
        chat["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                          "strict") if k in t}} for t in request.tools]  # fmt: skip
    if isinstance(request.tool_choice, dict):
        chosen = request.tool_choice.get("name")
        chat["tool_choice"] = {"type": "function", "function": {"name": chosen}} if chosen else request.tool_choice
    elif request.tool_choice is not None:
        chat["tool_choice"] = request.tool_choice
    fmt = (request.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    return chat


# --- re-encoding ---------------------------------------------------------------------------------------------------


def _usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}  # fmt: skip


class Shell:
    """What every Response object of one request repeats: its id, the request's settings, and how it ended."""

    def __init__(self, request: ResponsesRequest, response_id: str | None = None) -> None:
        self.request = request
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())

    def render(self, status: str, output: list[dict[str, Any]], usage: Mapping[str, Any] | None = None,
               model: str | None = None, error: dict[str, Any] | None = None,
               incomplete: str | None = None) -> dict[str, Any]:  # fmt: skip
        r = self.request
        fmt = (r.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": model or r.model,
            "output": output, "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": r.store, "temperature": r.temperature if r.temperature is not None else 1.0,
            "text": {"format": fmt}, "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
            "tools": [{**t, "strict": t.get("strict")} for t in r.tools or []],
            "top_p": r.top_p if r.top_p is not None else 1.0, "truncation": "disabled", "usage": _usage(usage),
            "user": r.user, "metadata": r.metadata or {},
        }  # fmt: skip


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _call_item(item_id: str, call: Mapping[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {"type": "function_call", "id": item_id, "call_id": call.get("id") or new_id("call"),
            "name": function.get("name") or "", "arguments": function.get("arguments") or "",
            "status": status}  # fmt: skip


def _ending(finish: str | None) -> tuple[str, str | None]:
    """(status, incomplete reason) from a chat finish_reason."""
    if finish == "length":
        return "incomplete", "max_output_tokens"
    if finish == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def to_response(chat: Mapping[str, Any], shell: Shell) -> dict[str, Any]:
    """A chat.completion as a Response object."""
    choice = (chat.get("choices") or [{}])[0]
    status, incomplete = _ending(choice.get("finish_reason"))
    return shell.render(status, _output(choice.get("message") or {}, status), chat.get("usage"), chat.get("model"),
                        incomplete=incomplete)  # fmt: skip


def _output(message: Mapping[str, Any], status: str) -> list[dict[str, Any]]:
    """A chat message as output items: its text (or refusal) as a message, then its tool calls."""
    output: list[dict[str, Any]] = []
    content, refusal, calls = message.get("content"), message.get("refusal"), message.get("tool_calls") or []
    if isinstance(refusal, str) and refusal and not content:
        part = {"type": "refusal", "refusal": refusal}
        item = _message_item(new_id("msg"), "", status)
        output.append({**item, "content": [part]})
    elif (isinstance(content, str) and content) or not calls:
        output.append(_message_item(new_id("msg"), str(content or ""), status))
    output += [_call_item(new_id("fc"), call) for call in calls]
    return output


def answer_messages(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Response's output as the chat messages that continue its conversation."""
    return input_messages([item for item in response.get("output") or [] if item.get("type") != "reasoning"])


# --- streaming -----------------------------------------------------------------------------------------------------


class EventWriter:
    """Responses SSE events with their sequence numbers."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n".encode() + sse(payload)


async def stream_response(chat_stream: AsyncIterator[bytes], shell: Shell,
                          on_complete: Callable[[dict[str, Any]], Awaitable[None]] | None = None
                          ) -> AsyncIterator[bytes]:  # fmt: skip
    """A chat.completion.chunk stream (from the upstream, a local model or a cache replay) as the Responses event
    sequence. An error event, or a stream that ends before [DONE], ends it with `response.failed`; `on_complete` gets
    the final Response object of a stream that completed (to keep the conversation). A client that goes away closes
    the chat stream at once (and with it the upstream request or the local generation)."""
    try:
        async for event in _events(chat_stream, shell, on_complete):
            yield event
    finally:
        close = getattr(chat_stream, "aclose", None)
        if close is not None:
            await close()


async def _events(chat_stream: AsyncIterator[bytes], shell: Shell,
                  on_complete: Callable[[dict[str, Any]], Awaitable[None]] | None) -> AsyncIterator[bytes]:  # fmt: skip
    event = EventWriter()
    parser, accumulator = SSEParser(), StreamAccumulator("chat")
    items: list[dict[str, Any]] = []  # the output items announced so far, in order (their last state)
    text: dict[str, Any] | None = None  # the message item while its text streams: {"id", "text", "index"}
    calls: dict[int, int] = {}  # a tool call's chat index -> its position in `items`

    def close_text(status: str) -> list[bytes]:
        """The done events of the streaming message, which ends before another item starts (as OpenAI's do)."""
        nonlocal text
        if text is None:
            return []
        index = text["index"]
        item = _message_item(text["id"], text["text"], status)
        part, text = item["content"][0], None
        items[index] = item
        return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=part["text"], logprobs=[]),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=index, item=item)]  # fmt: skip

    started = shell.render("in_progress", [])
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    failure: ProxyError | None = None
    try:
        async for chunk in chat_stream:
            for data in parser.feed(chunk):
                parsed = accumulator.take_data(data)
                if isinstance(parsed, dict) and "error" in parsed:
                    error = parsed["error"] if isinstance(parsed["error"], dict) else {"message": str(parsed["error"])}
                    failure = ProxyError(str(error.get("message") or "the answer failed"), code=error.get("code"))
                    break
                for choice in (parsed or {}).get("choices") or []:
                    if int(choice.get("index") or 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    piece = delta.get("content")
                    if isinstance(piece, str) and piece and not calls:
                        if text is None:
                            text = {"id": new_id("msg"), "text": "", "index": len(items)}
                            items.append({**_message_item(text["id"], "", "in_progress"), "content": []})
                            index = text["index"]
                            yield event("response.output_item.added", output_index=index, item=items[index])
                            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                            yield event("response.content_part.added", item_id=text["id"], output_index=index,
                                        content_index=0, part=part)  # fmt: skip
                        text["text"] += piece
                        yield event("response.output_text.delta", item_id=text["id"], output_index=text["index"],
                                    content_index=0, delta=piece, logprobs=[])  # fmt: skip
                    for position, call in enumerate(delta.get("tool_calls") or []):
                        slot = int(call.get("index", position))
                        function = call.get("function") or {}
                        if slot not in calls:
                            for done in close_text("completed"):
                                yield done
                            items.append(_call_item(new_id("fc"), {"id": call.get("id"), "function": {
                                "name": function.get("name"), "arguments": ""}}, "in_progress"))  # fmt: skip
                            calls[slot] = len(items) - 1
                            yield event("response.output_item.added", output_index=calls[slot], item=items[calls[slot]])
                        if function.get("arguments"):
                            item = items[calls[slot]]
                            item["arguments"] += function["arguments"]
                            yield event("response.function_call_arguments.delta", item_id=item["id"],
                                        output_index=calls[slot], delta=function["arguments"])  # fmt: skip
            if failure is not None:
                break
    except Exception as exc:  # a failure inside the pipeline's stream: reported as the stream's end
        failure = to_proxy_error(exc)
    if failure is None and not accumulator.done:
        failure = ProxyError("the answer's stream ended before it was complete", code="stream_incomplete")
    if failure is not None:
        yield event("error", code=failure.code or "server_error", message=failure.message, param=failure.param)
        error = {"code": "rate_limit_exceeded" if failure.status == 429 else "server_error",
                 "message": failure.message}  # fmt: skip
        yield event("response.failed", response=shell.render("failed", items, error=error))
        return
    final = accumulator.response()
    choice = (final.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    status, incomplete = _ending(choice.get("finish_reason"))
    for done in close_text(status if not calls else "completed"):
        yield done
    whole_calls = message.get("tool_calls") or []
    for slot, index in sorted(calls.items(), key=lambda kv: kv[1]):
        whole = whole_calls[slot] if slot < len(whole_calls) else {}
        item = _call_item(items[index]["id"], {"id": whole.get("id") or items[index]["call_id"], "function": {
            "name": (whole.get("function") or {}).get("name") or items[index]["name"],
            "arguments": items[index]["arguments"]}})  # fmt: skip
        items[index] = item
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=item["name"], arguments=item["arguments"])  # fmt: skip
        yield event("response.output_item.done", output_index=index, item=item)
    if not items:  # nothing streamed: an empty answer, or a refusal
        for item in _output(message, status):
            items.append(item)
            index = len(items) - 1
            yield event("response.output_item.added", output_index=index, item={**item, "content": []})
            for part in item.get("content") or []:
                yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part=part)  # fmt: skip
                yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)  # fmt: skip
            yield event("response.output_item.done", output_index=index, item=item)
    response = shell.render(status, items, final.get("usage"), final.get("model"), incomplete=incomplete)
    if on_complete is not None:  # before the last event: a client that continues at once finds it kept
        await on_complete(response)
    yield event("response.completed" if status == "completed" else "response.incomplete", response=response)


# --- stored responses ----------------------------------------------------------------------------------------------


class StoredResponses:
    """The responses kept for `previous_response_id` and GET / DELETE, per API key. In a store of this process's own
    (SQLite) they are written in batches (one transaction every `every_s`): keeping one costs a request almost
    nothing, reads look at the batch not yet written first, so a request that continues a response always finds
    it, and a crash loses at most the last `every_s` of them (their answers were already sent). In a shared store
    (Redis) each is written before its response is sent, so that a request continuing it on another replica finds
    it."""

    def __init__(self, store: EntryStore, ttl_s: float, shared: bool, every_s: float = 0.1) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.shared = shared
        self.every_s = every_s
        # (key id, response id) -> (response, turns, expires_at): serialised when written, off the request's path
        self._pending: dict[tuple[str, str], tuple[Mapping[str, Any], list[dict[str, Any]], float]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._failed = Throttle()

    async def keep(self, key_id: str, response_id: str, response: Mapping[str, Any], turns: list[dict[str, Any]]
                   ) -> None:  # fmt: skip
        """Keep a response with the conversation it ends (`turns`: its input after the history it continued)."""
        self._pending[(key_id, response_id)] = (response, turns, time.time() + self.ttl_s)
        if self.shared:
            await self.flush()
        elif self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_soon())

    async def _write_soon(self) -> None:
        await asyncio.sleep(self.every_s)
        await self.flush()

    async def flush(self) -> None:
        """Write what is pending now (also at shutdown)."""
        batch, self._pending = self._pending, {}
        if batch:
            try:
                await self.store.save_responses(self._encoded(batch))
            except CacheError as exc:  # best effort, like the cache: the answers stand without them
                self._failed.warning(log, "could not keep %d stored responses: %s", len(batch), exc)

    def _encoded(self, batch: dict[tuple[str, str], tuple[Mapping[str, Any], list[dict[str, Any]], float]]
                 ) -> list[tuple[str, str, str, float]]:  # fmt: skip
        """The batch's records as JSON; one that cannot be made (an answer an upstream sent malformed) is dropped
        alone, with a log line."""
        out = []
        for (key_id, response_id), (response, turns, at) in batch.items():
            try:
                out.append((key_id, response_id, dumps(_record(response, turns)).decode(), at))
            except (ProxyError, TypeError, ValueError) as exc:
                log.warning("stored response %s left out: %s", response_id, exc)
        return out

    async def load(self, key_id: str, response_id: str) -> dict[str, Any] | None:
        """A stored response of this key ({"response", "messages"}), or None (another key's id too)."""
        now = time.time()
        pending = self._pending.get((key_id, response_id))
        if pending is not None:
            return _record(pending[0], pending[1]) if pending[2] > now else None
        record = await self.store.load_response(key_id, response_id, now)
        return None if record is None else dict(json.loads(record))

    async def delete(self, key_id: str, response_id: str) -> bool:
        pending = self._pending.pop((key_id, response_id), None)
        return await self.store.delete_response(key_id, response_id) or pending is not None


def _record(response: Mapping[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """What is kept of a response: the object (GET) and the conversation it ends (previous_response_id)."""
    return {"response": response, "messages": turns + answer_messages(response)}


def dumps(value: Any) -> bytes:
    """JSON by orjson (several times faster on these large objects; NaN becomes null), or by the json module for what
    orjson cannot encode (an integer over 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode()
