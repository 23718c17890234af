"""An OpenAI-compatible upstream that answers each question with its gold answer, for measuring exactly how often
the cheap tiers serve a wrong one (bench/learning.py). Questions are the last user turn; the answers come from a
JSON object {question: answer} named by ORACLE_ANSWERS. An unknown question is answered "unknown". Answers are
streamed when asked (a word per event, ORACLE_STREAM_DELAY_S apart). With ORACLE_TAG_CALLER=1 every answer starts
with "[caller <digest of the Authorization header>]", so a client that is served another caller's answer can tell
(bench/hardening.py's tenant probes).

  ORACLE_ANSWERS=answers.json python -m uvicorn bench.oracle_upstream:app --port 8091
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
ANSWERS: dict[str, str] = json.loads(Path(os.environ.get("ORACLE_ANSWERS", "/dev/null")).read_text() or "{}")
CALLS = {"chat": 0}
TAG_CALLER = os.environ.get("ORACLE_TAG_CALLER") == "1"
STREAM_DELAY_S = float(os.environ.get("ORACLE_STREAM_DELAY_S", "0.01"))


def caller_tag(authorization: str) -> str:
    return f"[caller {hashlib.sha256(authorization.encode()).hexdigest()[:12]}]"


@app.post("/v1/chat/completions", response_model=None)
async def chat(request: Request) -> dict[str, Any] | StreamingResponse:
    body = await request.json()
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    content = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                   "")  # fmt: skip
    question = content if isinstance(content, str) else json.dumps(content)  # content parts: asked as their JSON
    CALLS["chat"] += 1
    answer = ANSWERS.get(question, "unknown")
    if TAG_CALLER:
        answer = f"{caller_tag(request.headers.get('authorization', ''))} {answer}"
    if body.get("stream"):
        return StreamingResponse(_stream(f"oracle-{CALLS['chat']}", body.get("model", "oracle"), answer),
                                 media_type="text/event-stream")  # fmt: skip
    return {"id": f"oracle-{CALLS['chat']}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "oracle"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(question.split()), "completion_tokens": 2,
                      "total_tokens": len(question.split()) + 2}}  # fmt: skip


async def _stream(answer_id: str, model: str, answer: str) -> AsyncIterator[bytes]:
    """The answer as chat.completion.chunk events, a word each, STREAM_DELAY_S apart (a stream a client can leave
    halfway through)."""
    head = {"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    pieces = [{"role": "assistant"}] + [{"content": word} for word in re.findall(r"\S+\s*", answer)]
    for delta in pieces:
        yield (
            b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode()
        )
        yield b"\n\n"
        await asyncio.sleep(STREAM_DELAY_S)
    yield b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
    yield b"\n\ndata: [DONE]\n\n"


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "oracle", "object": "model"}]}


@app.get("/calls")
async def calls() -> dict[str, int]:
    return CALLS
