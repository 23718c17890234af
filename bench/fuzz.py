"""Fuzzing a real `cachecade serve` (the embedded default with the packaged models, an oracle upstream) with requests
generated from its own OpenAPI schema (/openapi.json, by schemathesis: valid and invalid bodies, query and path
parameters for every operation), plus hand-written hostile requests (oversized, deeply nested, wrong content
types, header injection in x-request-id, unicode edge cases, streaming clients that vanish).

Reported: 5xx caused by us (target 0; a 5xx the upstream sent is counted apart), crashes (the proxy or a model
worker exiting, target 0), unhandled errors in the proxy's log, requests refused with a clear 4xx (OpenAI's error
shape with a message), and resident memory before and after.

  python -m bench.fuzz --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, say, write_report
from bench.hardening import descendants
from bench.latency import start_proxy
from bench.learning import ADMIN, serve_oracle
from bench.soak import rss_mb
from local_models.cascade import DEFAULT_ROUTE
from local_models.processes import stop, wait_until_up


def generated_requests(spec: dict[str, Any], per_operation: int, seed: int, admin_token: str,
                       route_share: float = 0.0) -> list[dict[str, Any]]:  # fmt: skip
    """Up to `per_operation` requests per operation of `spec` (half valid, half invalid where schemathesis can make
    invalid ones), as httpx.request keyword arguments with a path instead of a URL and a "label" (operation and
    generation mode). Admin operations carry the admin token, nine times in ten; `route_share` of the generated
    chat and completion bodies ask for the cascade's route (the local models) instead of the generated model name."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(spec)
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases: list[Any] = []
            collect = _collector(operation.as_strategy(generation_mode=mode), cases, per_operation // 2, seed)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                collect()
            for case in cases:
                kwargs = case.as_transport_kwargs(base_url="")
                headers = {k: v for k, v in kwargs.get("headers", {}).items() if not k.lower().startswith("x-schema")}
                if operation.path.startswith("/admin") and rng.random() < 0.9:
                    headers["authorization"] = f"Bearer {admin_token}"
                elif operation.path.startswith("/v1"):
                    headers["authorization"] = f"Bearer sk-fuzz-{rng.randrange(5)}"
                request = {"label": f"{operation.method.upper()} {operation.path} ({mode.value})",
                           "method": kwargs["method"], "path": kwargs["url"], "headers": headers,
                           "params": kwargs.get("params") or {}}  # fmt: skip
                if "json" in kwargs:
                    request["json"] = kwargs["json"]
                    body = request["json"]
                    if operation.path.endswith("completions") and isinstance(body, dict) and rng.random() < route_share:
                        request["json"] = {**body, "model": DEFAULT_ROUTE}
                        request["label"] += " (local route)"
                elif kwargs.get("data") is not None:
                    request["content"] = kwargs["data"]
                out.append(request)
    return out


def _collector(strategy: Any, cases: list[Any], examples: int, seed: int) -> Any:
    """A hypothesis test that appends up to `examples` draws of `strategy` to `cases` when called."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(case: Any) -> None:
        cases.append(case)

    return collect


def hostile_requests() -> list[dict[str, Any]]:
    """Hand-written cases the generator does not make (the raw-socket ones are in raw_cases)."""
    chat = {"model": "oracle", "messages": [{"role": "user", "content": "Hello?"}]}
    deep = "[" * 100_000 + '"x"' + "]" * 100_000  # 100,000 levels of nesting
    odd = ["\u0000", "\ud7ff\ue000", "\u202eevil", "e\u0301" * 500, "😀" * 2000, "\ufeffBOM", "Z\u0335\u0336" * 300,
           "\U0010ffff", "a\u2028b\u2029c", "\x1b[31mred"]  # fmt: skip
    cases: list[dict[str, Any]] = [
        {"label": "deeply nested JSON", "method": "POST", "path": "/v1/chat/completions",
         "content": '{"model": "oracle", "messages": [{"role": "user", "content": ' + deep + "}]}"},
        {"label": "wrong content type", "method": "POST", "path": "/v1/chat/completions",
         "headers": {"content-type": "text/plain"}, "content": "model=oracle&messages=hi"},
        {"label": "form body", "method": "POST", "path": "/v1/chat/completions",
         "headers": {"content-type": "application/x-www-form-urlencoded"}, "content": "model=oracle"},
        {"label": "lone surrogate escaped", "method": "POST", "path": "/v1/chat/completions",
         "content": '{"model": "oracle", "messages": [{"role": "user", "content": "\\ud800"}]}'},
        {"label": "bad UTF-8", "method": "POST", "path": "/v1/chat/completions",
         "content": b'{"model": "oracle", "messages": [{"role": "user", "content": "\xff\xfe"}]}'},
        {"label": "NaN and huge numbers", "method": "POST", "path": "/v1/chat/completions",
         "content": '{"model": "oracle", "messages": [{"role": "user", "content": "x"}], "temperature": NaN,'
                    ' "max_tokens": 1e400}'},
        {"label": "body over the limit", "method": "POST", "path": "/v1/chat/completions",
         "content": b'{"model": "oracle", "messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}'},
        {"label": "empty body", "method": "POST", "path": "/v1/chat/completions", "content": b""},
        {"label": "duplicate keys", "method": "POST", "path": "/v1/chat/completions",
         "content": '{"model": "oracle", "model": 3, "messages": [{"role": "user", "content": "x"}]}'},
        {"label": "long x-request-id", "method": "POST", "path": "/v1/chat/completions", "json": chat,
         "headers": {"x-request-id": "r" * 10_000}},
        {"label": "unicode x-request-id", "method": "POST", "path": "/v1/chat/completions", "json": chat,
         "headers": {"x-request-id": "ид-😀".encode()}},  # UTF-8 bytes in a header
        {"label": "huge n", "method": "POST", "path": "/v1/chat/completions", "json": {**chat, "n": 10**12}},
        {"label": "bad cache-control", "method": "POST", "path": "/v1/chat/completions", "json": chat,
         "headers": {"cache-control": "max-age=-1, s-maxage=NaN, no-store=" + "x" * 5000}},
        {"label": "bad x-token-budget", "method": "POST", "path": "/v1/chat/completions", "json": chat,
         "headers": {"x-token-budget": "-99999999999999999999999"}},
        {"label": "admin with a wrong token", "method": "PUT", "path": "/admin/config", "json": {"threshold": 0},
         "headers": {"authorization": "Bearer " + "A" * 64}},
    ]  # fmt: skip
    cases += [{"label": f"unicode edge case {i}", "method": "POST", "path": "/v1/chat/completions",
               "json": {**chat, "messages": [{"role": "user", "content": text}]}}
              for i, text in enumerate(odd)]  # fmt: skip
    return cases


async def raw_cases(host: str, port: int) -> dict[str, str]:
    """Raw-socket cases: CR/LF injected into x-request-id (which httpx refuses to send), a streaming client that
    vanishes after its first event, and one that vanishes before the answer. The outcome of each, in words."""
    out: dict[str, str] = {}
    story = [{"role": "user", "content": "Tell me a long story, please?"}]
    body = json.dumps({"model": "oracle", "stream": True, "max_tokens": 32, "messages": story}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    for name, extra, read in (
        ("CR/LF in x-request-id", "X-Request-Id: abc\r\nSet-Cookie: injected=1\r\n", 4096),
        ("bare CR in x-request-id", "X-Request-Id: abc\rInjected: 1\r\n", 4096),
        ("stream client vanishes after its first event", "", 64),
        ("stream client vanishes before the answer", "", 0),
    ):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write((head + extra + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()
        got = await asyncio.wait_for(reader.read(read), 60) if read else b""
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        status = got.split(b"\r\n", 1)[0].decode(errors="replace")
        injected = b"injected" in got.lower().split(b"\r\n\r\n", 1)[0]
        out[name] = f"{status or 'closed by the client'}{'; INJECTED HEADER' if injected else ''}"
    return out


def classify(status: int, body: bytes, served_by: str) -> str:
    if status < 400:
        return "ok"
    try:
        error = json.loads(body)["error"]
        clear = isinstance(error["message"], str) and bool(error["message"]) and "type" in error
    except (ValueError, KeyError, TypeError):
        error, clear = {}, False
    if status >= 500:
        return (
            "5xx upstream" if error.get("type") == "upstream_error" or served_by.startswith("upstream") else "5xx ours"
        )
    return "4xx clear" if clear else "4xx unclear"


async def send_all(url: str, requests: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=180) as client:
            while not queue.empty():
                r = queue.get_nowait()
                kwargs = {k: v for k, v in r.items() if k not in ("label", "path")}
                started = time.perf_counter()
                try:
                    response = await client.request(url=r["path"], **kwargs)
                    outcome = classify(response.status_code, response.content, response.headers.get("x-served-by", ""))
                    status: int | str = response.status_code
                except httpx.HTTPError as exc:
                    outcome, status = f"transport error ({type(exc).__name__})", type(exc).__name__
                results.append({"label": r["label"], "status": status, "outcome": outcome,
                                "ms": (time.perf_counter() - started) * 1000})  # fmt: skip
                if len(results) % 500 == 0:
                    say(f"fuzz: {len(results)}/{len(requests)} sent")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="generated requests, at least")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--route-share", type=float, default=0.15,
                        help="share of chat and completion bodies sent to the local models' route")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, serve_oracle(Path(work), {"Hello?": "Hi."}) as upstream:
        proxy, url, log = start_proxy(Path(work), upstream, 0.95, {"CACHECADE_ADMIN_TOKEN": ADMIN})
        try:
            wait_until_up(f"{url}/readyz", proxy, log, 300)
            spec = httpx.get(f"{url}/openapi.json").json()
            operations = sum(len(methods) for methods in spec["paths"].values())
            per_operation, requests = max(2, 2 * args.requests // operations), []
            while len(requests) < args.requests:  # operations without parameters give one request: ask for more
                started = time.monotonic()
                requests = generated_requests(spec, per_operation, args.seed, ADMIN, args.route_share)
                say(f"fuzz: {len(requests)} requests generated for {operations} operations "
                    f"({per_operation} at most each) in {time.monotonic() - started:.0f} s")  # fmt: skip
                per_operation = int(per_operation * 1.5)
            random.Random(args.seed).shuffle(requests)
            hostile = hostile_requests()
            requests += hostile
            workers_before = sorted(descendants(proxy.pid))
            rss_before = {"proxy": rss_mb(proxy.pid), "workers": sum(rss_mb(p) for p in workers_before)}
            started = time.monotonic()
            results = asyncio.run(send_all(url, requests, args.concurrency))
            raw = asyncio.run(raw_cases("127.0.0.1", int(url.rsplit(":", 1)[1])))
            seconds = time.monotonic() - started
            alive = proxy.poll() is None and httpx.get(f"{url}/healthz").status_code == 200
            workers_after = sorted(descendants(proxy.pid)) if alive else []
            rss_after = {"proxy": rss_mb(proxy.pid), "workers": sum(rss_mb(p) for p in workers_after)} if alive else {}
        finally:
            with contextlib.suppress(Exception):
                stop(proxy)
        logged = log.read_text(errors="replace")
    outcomes = Counter(r["outcome"] for r in results)
    by_label: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        by_label[r["label"]][str(r["status"])] += 1
    report = {
        "machine": machine(), "seed": args.seed, "requests": len(results), "generated": len(results) - len(hostile),
        "seconds": round(seconds, 1), "outcomes": dict(outcomes),
        "ours_5xx": [r for r in results if r["outcome"] == "5xx ours"][:50],
        "unclear_4xx": [r for r in results if r["outcome"] == "4xx unclear"][:50],
        "crashes": {"proxy_exited": not alive, "workers_replaced": workers_before != workers_after},
        "unhandled_in_log": logged.count("unhandled error") + logged.count("Exception in ASGI application"),
        "unhandled_lines": [line[:4000] for line in logged.splitlines()
                            if "unhandled error" in line or "Exception in ASGI application" in line][:10],
        "raw_cases": raw, "rss_mb_before": rss_before, "rss_mb_after": rss_after,
        "by_operation": {k: dict(v) for k, v in sorted(by_label.items())},
    }  # fmt: skip
    text = table(report)
    print(text)
    write_report("fuzz", report, text, args.out)


def table(report: dict[str, Any]) -> str:
    outcomes, before, after = report["outcomes"], report["rss_mb_before"], report["rss_mb_after"]
    lines = [
        f"fuzz: {report['requests']} requests ({report['generated']} generated from /openapi.json, the rest "
        f"hand-written) in {report['seconds']} s, seed {report['seed']}",
        "| what | target | got |", "|---|---|---|",
        f"| 5xx caused by us | 0 | {outcomes.get('5xx ours', 0)} |",
        f"| 5xx from the upstream | | {outcomes.get('5xx upstream', 0)} |",
        f"| crashes (proxy exited / model workers replaced) | 0 | {int(report['crashes']['proxy_exited'])} / "
        f"{int(report['crashes']['workers_replaced'])} |",
        f"| unhandled errors in the proxy's log | 0 | {report['unhandled_in_log']} |",
        f"| refused with a clear 4xx (OpenAI error shape) | | {outcomes.get('4xx clear', 0)} |",
        f"| 4xx without a clear error body | 0 | {outcomes.get('4xx unclear', 0)} |",
        f"| answered (2xx/3xx) | | {outcomes.get('ok', 0)} |",
        f"| transport errors | 0 | {sum(v for k, v in outcomes.items() if k.startswith('transport'))} |",
        f"| RSS proxy + workers, MB (before -> after) | | {before['proxy']:.0f} + {before['workers']:.0f} -> "
        + (f"{after['proxy']:.0f} + {after['workers']:.0f} |" if after else "(exited) |"),
    ]  # fmt: skip
    lines += [f"| raw: {name} | | {outcome} |" for name, outcome in report["raw_cases"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
