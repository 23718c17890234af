"""End to end: the official openai client -> cachecade (uvicorn, real port) -> llama.cpp server (SmolLM2)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.learning import SAME_MEANING, short_answers_agree
from tests.e2e.conftest import Proxy, stop

pytestmark = pytest.mark.e2e
# Short, complete answers: greedy, and a newline ends the answer with finish_reason "stop".
GEN = {"model": "smollm2", "temperature": 0, "max_tokens": 48, "stop": ["\n"]}
Q = "How many legs does a spider have?"
PARAPHRASE = "How many legs do spiders have?"  # cosine 0.97 to Q with all-MiniLM-L6-v2; verifier 0.89


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    return start_proxy(tmp_path_factory.mktemp("e2e") / "data", upstream_base_url=llama_upstream)


def client(proxy: Proxy, key: str | None = None) -> openai.OpenAI:
    """A client with its own API key, hence its own tenant: tests sharing the server cannot see each other."""
    return openai.OpenAI(base_url=proxy.v1, api_key=key or f"sk-test-{uuid.uuid4().hex}", max_retries=0)


def ask(c: openai.OpenAI, question: str, system: str | None = None, **extra: object):  # type: ignore[no-untyped-def]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return c.chat.completions.with_raw_response.create(messages=messages, **GEN, **extra)  # type: ignore[call-overload]


def test_non_stream_miss_then_hit(proxy: Proxy) -> None:
    c = client(proxy)
    miss = ask(c, Q)
    assert miss.headers["x-cache"] == "MISS" and miss.headers["x-served-by"] == "upstream:smollm2"
    first = miss.parse()
    assert first.choices[0].finish_reason == "stop" and first.choices[0].message.content
    hit = ask(c, Q)
    assert hit.headers["x-cache"] == "HIT-EXACT" and hit.headers["x-served-by"] == "cache"
    second = hit.parse()
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.id != first.id and second.usage is not None and second.usage.completion_tokens > 0
    assert second.model == first.model


def test_stream_miss_then_hit_replays_chunks(proxy: Proxy) -> None:
    c = client(proxy)
    question = "Name a primary colour."
    # No max_tokens: llama.cpp's server streams no usage, so a streamed answer's length is unknown and is served
    # only to callers without a token limit (a limit could not be checked).
    gen = {k: v for k, v in GEN.items() if k != "max_tokens"}
    texts, headers = [], []
    for _ in range(2):
        with c.chat.completions.with_streaming_response.create(
            messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True}, **gen,  # type: ignore[arg-type]
        ) as response:  # fmt: skip
            headers.append(response.headers["x-cache"])
            chunks = list(response.parse())
        texts.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["stop"]
        assert chunks[-1].usage is None, "nothing made up: the upstream reported no usage"
    assert headers == ["MISS", "HIT-EXACT"]
    assert texts[0] and texts[1] == texts[0]
    plain = c.chat.completions.with_raw_response.create(messages=[{"role": "user", "content": question}], **gen)
    assert plain.headers["x-cache"] == "HIT-EXACT" and plain.parse().choices[0].message.content == texts[0]


def test_paraphrase_is_a_semantic_hit_at_the_default_threshold(proxy: Proxy) -> None:
    c = client(proxy)
    answer = ask(c, Q).parse().choices[0].message.content
    hit = ask(c, PARAPHRASE)
    assert hit.headers["x-cache"] == "HIT-SEMANTIC"
    assert float(hit.headers["x-cache-similarity"]) >= float(hit.headers["x-cache-threshold"])
    assert hit.headers["x-cache-verifier"] == "accept"  # the default server verifies semantic candidates
    assert hit.parse().choices[0].message.content == answer


def test_same_words_in_another_order_is_a_miss(proxy: Proxy) -> None:
    """Cosine 0.99, another question: the verifier rejects it, and the upstream answers."""
    c = client(proxy)
    first = ask(c, "Is a cat faster than a dog?")
    assert first.parse().choices[0].finish_reason == "stop"  # stored (greedy: the same answer every run)
    swapped = ask(c, "Is a dog faster than a cat?")
    assert swapped.headers["x-cache"] == "MISS" and swapped.headers["x-cache-verifier"] == "reject"


def test_feedback_with_the_official_client_deletes_a_bad_semantic_hit(proxy: Proxy) -> None:
    """As the README shows it: the request id from the raw response, POST /v1/feedback through the client's own
    post(); another key cannot label it; the bad answer is gone."""
    c = client(proxy)
    ask(c, Q)
    hit = ask(c, PARAPHRASE)
    assert hit.headers["x-cache"] == "HIT-SEMANTIC"
    body = {"request_id": hit.headers["x-request-id"], "good": False}
    with pytest.raises(openai.NotFoundError):
        client(proxy).post("/feedback", cast_to=dict, body=body)
    got = c.post("/feedback", cast_to=dict, body=body)
    assert got["entry_deleted"] is True and got["tier"] == "semantic"
    with pytest.raises(openai.ConflictError):
        c.post("/feedback", cast_to=dict, body=body)
    assert ask(c, PARAPHRASE).headers["x-cache"] == "MISS"


def test_shadow_check_runs_after_the_response_and_labels_the_hit(
    start_test_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path: Path, embedder: Any
) -> None:
    """Every semantic hit shadow-checked against the real upstream: the hit is answered without waiting for the
    upstream (faster than a miss), and the label (the greedy upstream agrees with itself) shows up after."""
    admin = {"authorization": "Bearer e2e-admin-token-0123456789"}
    proxy = start_test_proxy(tmp_path / "data", upstream_base_url=llama_upstream, cascade_routes="{}",
                             admin_token=admin["authorization"][7:], cache_shadow_share="1",
                             cache_shadow_max_share="1")  # fmt: skip
    c = client(proxy)
    started = time.perf_counter()
    ask(c, Q)
    miss_s = time.perf_counter() - started
    started = time.perf_counter()
    hit = ask(c, PARAPHRASE)
    hit_s = time.perf_counter() - started
    assert hit.headers["x-cache"] == "HIT-SEMANTIC" and hit_s < miss_s / 2, (hit_s, miss_s)
    deadline = time.monotonic() + 30
    while True:
        learning = httpx.get(f"{proxy.url}/admin/learning", headers=admin, timeout=10).json()
        scope = learning["scopes"].get("semantic/verifier/default")
        if scope or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert scope is not None and scope["labels"] == 1, learning
    assert scope["recent"][0]["source"] == "shadow"
    # The label is the judge's verdict on the cached answer against the upstream's own answer to the paraphrase.
    fresh = (
        openai.OpenAI(base_url=llama_upstream, api_key="x")
        .chat.completions.create(messages=[{"role": "user", "content": PARAPHRASE}], **GEN)
        .choices[0]
        .message.content
    )  # type: ignore[call-overload]
    cached = hit.parse().choices[0].message.content or ""
    expected = short_answers_agree(cached, fresh or "")
    if expected is None:  # long answers: by the cosine of their embeddings
        a, b = embedder.encode([cached, fresh or ""])
        expected = float(a @ b) >= SAME_MEANING
    assert scope["recent"][0]["good"] is expected, (cached, fresh)
    assert learning["stats"]["shadow"]["checks"] == 1 and learning["stats"]["shadow"]["tokens"] > 0


def test_different_system_prompt_is_a_miss(proxy: Proxy) -> None:
    c = client(proxy)
    first = ask(c, Q, system="Answer in one short sentence.")
    assert first.parse().choices[0].finish_reason == "stop"
    assert ask(c, Q, system="Answer in one word.").headers["x-cache"] == "MISS"
    assert ask(c, Q, system="Answer in one short sentence.").headers["x-cache"] == "HIT-EXACT"


def test_different_api_key_is_a_miss(proxy: Proxy) -> None:
    ask(client(proxy, "sk-tenant-a"), Q)
    assert ask(client(proxy, "sk-tenant-b"), Q).headers["x-cache"] == "MISS"
    assert ask(client(proxy, "sk-tenant-a"), Q).headers["x-cache"] == "HIT-EXACT"


def test_no_store(proxy: Proxy) -> None:
    c = client(proxy)
    assert ask(c, Q, extra_headers={"Cache-Control": "no-store"}).headers["x-cache"] == "MISS"
    assert ask(c, Q).headers["x-cache"] == "MISS"
    assert ask(c, Q).headers["x-cache"] == "HIT-EXACT"


def test_bad_requests_are_400_naming_the_parameter(proxy: Proxy) -> None:
    c = client(proxy)
    missing = httpx.post(f"{proxy.v1}/chat/completions", json={"model": "smollm2"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as bad_type:
        c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                  temperature="hot")  # type: ignore[arg-type]  # fmt: skip
    assert bad_type.value.param == "temperature"
    raw = httpx.post(f"{proxy.v1}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"


def test_upstream_down_is_502(start_test_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    from tests.conftest import free_port

    dead = start_test_proxy(tmp_path / "data", upstream_base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.APIStatusError) as err:
        client(dead).chat.completions.create(messages=[{"role": "user", "content": "hi"}], **GEN)
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_unavailable"  # type: ignore[index]
    stop(dead.process)


def test_restart_keeps_entries(start_test_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_test_proxy(data, upstream_base_url=llama_upstream)
    c = client(first, "sk-restart")
    answer = ask(c, Q).parse().choices[0].message.content
    stop(first.process)
    second = start_test_proxy(data, upstream_base_url=llama_upstream)
    c = client(second, "sk-restart")
    exact = ask(c, Q)
    assert exact.headers["x-cache"] == "HIT-EXACT" and exact.parse().choices[0].message.content == answer
    assert ask(c, PARAPHRASE).headers["x-cache"] == "HIT-SEMANTIC"  # the FAISS index was rebuilt at start
    stop(second.process)
