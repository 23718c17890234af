"""Property-based requests generated from the app's own OpenAPI schema (schemathesis: valid and invalid bodies,
query and path parameters, for every operation) and hand-written hostile ones, through the real app: no 5xx, and
every refusal a 4xx in OpenAI's error shape with a message. bench/fuzz.py sends 5,000 and more to a real server."""

from __future__ import annotations

import json
from collections import Counter

from bench.fuzz import classify, generated_requests, hostile_requests
from tests.proxy.conftest import ADMIN


async def test_generated_and_hostile_requests_get_no_5xx(make_client, upstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes={}) as client:
        spec = (await client.get("/openapi.json")).json()
        operations = {f"{m.upper()} {p}" for p, methods in spec["paths"].items() for m in methods}
        requests = generated_requests(spec, 24, seed=1, admin_token=ADMIN) + hostile_requests()
        outcomes: Counter[str] = Counter()
        bad = []
        for r in requests:
            kwargs = {k: v for k, v in r.items() if k not in ("label", "path")}
            response = await client.request(url=r["path"], **kwargs)
            outcome = classify(response.status_code, response.content, response.headers.get("x-served-by", ""))
            outcomes[outcome] += 1
            if outcome not in ("ok", "4xx clear"):
                bad.append((r["label"], response.status_code, response.text[:200]))
        assert (await client.get("/healthz")).status_code == 200
    assert not bad, bad[:10]
    assert {r["label"].split(" (")[0] for r in requests} >= operations  # every operation was fuzzed
    assert outcomes["4xx clear"] >= 100 and outcomes["ok"] >= 100  # both refusals and answers were reached
    assert any(json.loads(b.content)["model"] for b in upstream.requests if b.content)  # answers came from upstream
