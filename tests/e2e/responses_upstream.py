"""A small upstream that speaks both chat completions and the Responses API, standing in for OpenAI in the end-to-end
tests (tests/e2e/test_responses_e2e.py). Its model is scripted, so that tool calls are certain:

- chat completions: with tools and no tool result after the last user turn, it calls the first tool with
  {"city": <the last word of the question>}; with a tool result, it answers "The answer is <result>."; otherwise
  "Echo: <question>"; with a JSON schema response format, an object with each required property. Streamed when
  asked, with usage; a question that starts with "Slowly:" streams one word every 0.1 s (a stream in flight).
- /v1/responses (what the proxy passes through: built-in tools, this server's own response ids): answers
  "Searched: <input>" for a web_search tool, "Continued <previous id>" for a previous_response_id it issued; an
  empty body is a 400, as OpenAI answers it (the proxy's probe).

  python -m uvicorn tests.e2e.responses_upstream:app --port 8092     (or start() from a test)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

app = FastAPI()


def start(log: Path) -> tuple[subprocess.Popen, str]:
    """This server in a process of its own on a free port: the process and its /v1 URL, once it answers."""
    from local_models.processes import free_port, wait_until_up

    port = free_port()
    with log.open("w") as out:
        cmd = [sys.executable, "-m", "uvicorn", "tests.e2e.responses_upstream:app", "--port", str(port)]
        process = subprocess.Popen([*cmd, "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    wait_until_up(f"http://127.0.0.1:{port}/v1/models", process, log, 60)
    return process, f"http://127.0.0.1:{port}/v1"


ISSUED: set[str] = set()


def _script(body: dict[str, Any]) -> dict[str, Any]:
    """The assistant message for a chat request."""
    messages = body.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    question = messages[last_user].get("content") if last_user >= 0 else ""
    question = question if isinstance(question, str) else json.dumps(question)
    tool_results = [m for m in messages[last_user + 1 :] if m.get("role") == "tool"]
    if tool_results:
        return {"role": "assistant", "content": f"The answer is {tool_results[-1].get('content')}."}
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":  # an object with each required property, of its type
        schema = fmt["json_schema"]["schema"]
        samples = {"integer": 8, "number": 8.0, "string": question, "boolean": True}
        value = {k: samples.get(schema["properties"][k].get("type")) for k in schema.get("required", [])}
        return {"role": "assistant", "content": json.dumps(value)}
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        city = (question.rstrip("?. ").split() or ["nowhere"])[-1]
        call = {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps({"city": city})}}  # fmt: skip
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": f"Echo: {question}"}


def _chunks(head: dict[str, Any], message: dict[str, Any], usage: dict[str, int]) -> Iterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        event = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    slowly = (message.get("content") or "").startswith("Echo: Slowly:")
    for word in (message.get("content") or "").split(" "):
        if word:
            if slowly:
                time.sleep(0.1)  # a sync generator: Starlette runs it in a thread
            yield chunk({"content": word + " " if not word.endswith(".") else word})
    for index, call in enumerate(message.get("tool_calls") or []):
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": ""}}]})  # fmt: skip
        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    yield chunk({}, "tool_calls" if message.get("tool_calls") else "stop")
    yield b"data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}).encode()
    yield b"\n\ndata: [DONE]\n\n"


@app.post("/v1/chat/completions", response_model=None)
async def chat(request: Request) -> dict[str, Any] | StreamingResponse:
    body = await request.json()
    message = _script(body)
    usage = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": body.get("model", "m")}
    if body.get("stream"):
        return StreamingResponse(_chunks(head, message, usage), media_type="text/event-stream")
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {**head, "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]}  # fmt: skip


def _response(body: dict[str, Any], text: str) -> dict[str, Any]:
    response_id = f"resp_up{uuid.uuid4().hex[:12]}"
    ISSUED.add(response_id)
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": body.get("model", "m"), "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": body.get("tools") or [], "previous_response_id": body.get("previous_response_id"),
            "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "status": "completed",
                        "role": "assistant", "content": [part]}],
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}  # fmt: skip


@app.post("/v1/responses", response_model=None)
async def responses(request: Request) -> Response:
    body = await request.json()
    if not body.get("model") or "input" not in body:
        error = {"message": "Missing required parameter: 'model'.", "type": "invalid_request_error", "param": "model"}
        return JSONResponse({"error": {**error, "code": None}}, status_code=400)
    previous = body.get("previous_response_id")
    if previous and previous not in ISSUED:
        return JSONResponse({"error": {"message": f"Response '{previous}' not found", "type": "invalid_request_error",
                                       "param": "previous_response_id", "code": None}}, status_code=404)  # fmt: skip
    text = f"Continued {previous}" if previous else f"Searched: {body['input']}"
    response = _response(body, text)
    if not body.get("stream"):
        return JSONResponse(response)

    def events() -> Iterator[bytes]:
        item = response["output"][0]
        sequence = [("response.created", {"response": {**response, "status": "in_progress", "output": []}}),
                    ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
                    ("response.output_text.delta", {"item_id": item["id"], "output_index": 0, "content_index": 0,
                                                    "delta": text, "logprobs": []}),
                    ("response.output_item.done", {"output_index": 0, "item": item}),
                    ("response.completed", {"response": response})]  # fmt: skip
        for number, (kind, fields) in enumerate(sequence):
            data = json.dumps({"type": kind, "sequence_number": number, **fields})
            yield f"event: {kind}\ndata: {data}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
