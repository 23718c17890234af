"""Health, readiness, models, embeddings, request ids."""

from __future__ import annotations

import base64

import httpx
import numpy as np

from tests.proxy.conftest import FakeUpstream


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["local_models"] == ["gemma3", "smollm2"]


async def test_request_id_echoed_or_generated(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz", headers={"x-request-id": "abc-123"})).headers["x-request-id"] == "abc-123"
    generated = (await client.get("/healthz", headers={"x-request-id": "bad id\x01"})).headers["x-request-id"]
    assert generated != "bad id\x01" and len(generated) == 32


async def test_models_lists_local_and_upstream(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert ids == ["all-MiniLM-L6-v2", "cachecade/auto", "up-model"]


async def test_local_embeddings(client: httpx.AsyncClient, embedder) -> None:  # type: ignore[no-untyped-def]
    r = await client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["hello", "world"]})
    body = r.json()
    assert r.status_code == 200 and [d["index"] for d in body["data"]] == [0, 1]
    vector = np.array(body["data"][0]["embedding"])
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert np.allclose(vector, embedder.encode(["hello"])[0], atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0
    b64 = await client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hello",
                                                    "encoding_format": "base64"})  # fmt: skip
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vector, atol=1e-6)


async def test_embedding_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = await client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


async def test_other_embedding_models_go_upstream(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.handler = lambda request: httpx.Response(200, json={"object": "list", "data": [], "model": "e3"})
    r = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert r.status_code == 200 and r.headers["x-served-by"] == "upstream"
    assert upstream.requests[-1].url.path == "/v1/embeddings"


async def test_openapi_describes_the_request_bodies(client: httpx.AsyncClient) -> None:
    """The routes read their bodies themselves (size limit, timeout), so the schema names each body model
    (proxy/openapi.py): clients and the fuzzer (tests/proxy/test_fuzz.py) see what to send."""
    spec = (await client.get("/openapi.json")).json()
    chat_body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert chat_body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemas = spec["components"]["schemas"]
    assert {"messages", "model"} <= set(schemas["ChatCompletionRequest"]["required"])
    assert schemas["Message"]["properties"]["role"]["enum"][:2] == ["system", "developer"]
    patch = spec["paths"]["/admin/config"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert "threshold" in patch["properties"] and "required" not in patch  # any subset of the policy's fields
    assert spec["paths"]["/v1/chat/completions"]["post"]["responses"]["413"]["description"]
