"""An OpenAI-compatible upstream that answers each question with its gold answer, for measuring exactly how often
the cheap tiers serve a wrong one (bench/learning.py). Questions are the last user turn; the answers come from a
JSON object {question: answer} named by ORACLE_ANSWERS. An unknown question is answered "unknown". With
ORACLE_TAG_CALLER=1 every answer starts with "[caller <digest of the Authorization header>]", so a client that is
served another caller's answer can tell (bench/hardening.py's tenant probes).

  ORACLE_ANSWERS=answers.json python -m uvicorn bench.oracle_upstream:app --port 8091
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

app = FastAPI()
ANSWERS: dict[str, str] = json.loads(Path(os.environ.get("ORACLE_ANSWERS", "/dev/null")).read_text() or "{}")
CALLS = {"chat": 0}
TAG_CALLER = os.environ.get("ORACLE_TAG_CALLER") == "1"


def caller_tag(authorization: str) -> str:
    return f"[caller {hashlib.sha256(authorization.encode()).hexdigest()[:12]}]"


@app.post("/v1/chat/completions")
async def chat(request: Request) -> dict[str, Any]:
    body = await request.json()
    question = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    CALLS["chat"] += 1
    answer = ANSWERS.get(question, "unknown")
    if TAG_CALLER:
        answer = f"{caller_tag(request.headers.get('authorization', ''))} {answer}"
    return {"id": f"oracle-{CALLS['chat']}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "oracle"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(question.split()), "completion_tokens": 2,
                      "total_tokens": len(question.split()) + 2}}  # fmt: skip


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "oracle", "object": "model"}]}


@app.get("/calls")
async def calls() -> dict[str, int]:
    return CALLS
