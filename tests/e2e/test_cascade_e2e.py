"""End to end through the cascade: the official openai client -> `cachecade serve` (local SmolLM2 / Gemma 3) ->
a real upstream process (llama.cpp's server on SmolLM2) when the local answer is not good enough."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.e2e.conftest import Proxy

pytestmark = pytest.mark.e2e
ADMIN = "e2e-admin-token-0123456789"
EASY = [{"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    return start_proxy(
        tmp_path_factory.mktemp("cascade") / "data", upstream_base_url=llama_upstream, admin_token=ADMIN,
        cascade_routes=json.dumps({"cachecade/auto": ["smollm2", "upstream:smollm2"]}),
        cascade_thresholds=json.dumps({"smollm2": 0.99}), cache_exact_enabled="false",
        cache_semantic_enabled="false",
    )  # fmt: skip


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=f"sk-test-{uuid.uuid4().hex}", max_retries=0)


def test_low_confidence_escalates_to_a_real_upstream_then_admin_lowers_the_gate(proxy: Proxy) -> None:
    c = client(proxy.v1)
    r = c.chat.completions.with_raw_response.create(model="cachecade/auto", messages=EASY, max_tokens=32)  # type: ignore[arg-type]
    assert r.headers["x-served-by"] == "upstream:smollm2" and r.headers["x-escalated"] == "smollm2:low-confidence"
    assert r.parse().choices[0].message.content
    admin = {"authorization": f"Bearer {ADMIN}"}
    # After the response, the rejected local answer was compared with the real upstream's: a label for the gate.
    deadline = time.monotonic() + 30
    while True:
        learning = httpx.get(f"{proxy.url}/admin/learning", headers=admin, timeout=10).json()
        if learning["stats"]["escalations"]["compared"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert learning["stats"]["escalations"]["compared"] == 1, learning
    (label,) = learning["scopes"]["local:smollm2/confidence/default"]["recent"]
    assert label["source"] == "escalation" and label["request_id"] == r.headers["x-request-id"]
    put = httpx.put(f"{proxy.url}/admin/cascade", json={"thresholds": {"smollm2": 0.7}}, headers=admin, timeout=10)
    assert put.status_code == 200
    local = c.chat.completions.with_raw_response.create(model="cachecade/auto", messages=EASY, max_tokens=32)  # type: ignore[arg-type]
    assert local.headers["x-served-by"] == "local:smollm2" and "Paris" in (
        local.parse().choices[0].message.content or ""
    )
    streamed = c.chat.completions.create(model="cachecade/auto", messages=EASY, max_tokens=32, stream=True)  # type: ignore[arg-type]
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)


def test_cut_off_local_answer_escalates(proxy: Proxy) -> None:
    story = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    r = client(proxy.v1).chat.completions.with_raw_response.create(model="cachecade/auto", messages=story,  # type: ignore[arg-type]
                                                                   max_tokens=4)  # fmt: skip
    assert r.headers["x-escalated"].startswith("smollm2:") and r.headers["x-served-by"] == "upstream:smollm2"


def test_embedded_default_answers_without_any_upstream(start_test_proxy: Callable[..., Proxy],
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    """What `make serve` gives a newcomer: no upstream, no key, any model name answered by the local tiers."""
    local = start_test_proxy(tmp_path_factory.mktemp("embedded") / "data")
    r = client(local.v1).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=EASY, max_tokens=32)  # type: ignore[arg-type]
    assert r.headers["x-served-by"].startswith("local:") and r.headers["x-local-gate"] in ("pass", "last-tier")
    assert 0.0 <= float(r.headers["x-local-confidence"]) <= 1.0 and r.parse().choices[0].message.content
