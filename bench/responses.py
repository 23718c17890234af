"""What the Responses API costs over chat completions, with wrk against one `cachecade serve` (an oracle upstream,
local models off so that a miss is the upstream's), in the same run:

- exact hits: one question stored, then asked for `--seconds` through /v1/chat/completions, then through
  /v1/responses (target: the Responses p50 within 10 % of the chat p50), and again with `store: false` (no stored
  response: what keeping one costs);
- semantic hits: a paraphrase of a stored question, through each API (the same target);
- misses: a new question every request, each in a cache namespace of its own (so that no templated neighbour
  answers it), through each API (target: the bridge adds at most 1 ms to the p50).

  python -m bench.responses [--seconds 5 --connections 4]   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, say, write_report
from bench.learning import oracle_and_proxy

QUESTION = "How many legs does a spider have?"
PARAPHRASE = "How many legs do spiders have?"
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
MISS = {"namespace": "nsUNIQUE"}  # every miss in a namespace of its own: no near neighbour can answer it

SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local path, template, unique = "%(path)s", [[%(body)s]], %(unique)s
local n = 0
request = function()
  n = n + 1
  local body = template
  if unique then body = string.gsub(template, "UNIQUE", n .. "x" .. math.random(1, 1000000000)) end
  return wrk.format("POST", path, nil, body)
end
"""


def chat(text: str) -> dict[str, Any]:
    return {"model": "oracle", "messages": [{"role": "user", "content": text}]}


def responses(text: str) -> dict[str, Any]:
    return {"model": "oracle", "input": text}


def wrk(url: str, run: tuple[str, dict[str, Any], bool], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """p50 / p90 / p99 latency (ms) and requests per second of one wrk run of (path, body, unique)."""
    path, body, unique = run
    script = work / "post.lua"
    script.write_text(SCRIPT % {"path": path, "body": json.dumps(body), "unique": "true" if unique else "false"})
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = {q: float(v) * UNIT_MS[u] for q, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_ms": found["50"], "p90_ms": found["90"], "p99_ms": found["99"],
            "rps": float(rate.group(1)) if rate else 0.0, "non_2xx": int(errors.group(1)) if errors else 0}  # fmt: skip


def abba(url: str, chat_run: tuple[str, dict[str, Any], bool], responses_run: tuple[str, dict[str, Any], bool],
         args: argparse.Namespace, work: Path) -> dict[str, Any]:  # fmt: skip
    """After a warm-up run of each, chat, Responses, Responses, chat, `--rounds` times: a drift during the runs
    weighs on both alike. Per API: the median of its runs' figures, and the runs."""
    runs: dict[str, list[dict[str, Any]]] = {"chat": [], "responses": []}
    wrk(url, chat_run, args, work)  # warm-up, not counted: the first seconds of a case run slower
    wrk(url, responses_run, args, work)
    for api in ("chat", "responses", "responses", "chat") * args.rounds:
        runs[api].append(wrk(url, chat_run if api == "chat" else responses_run, args, work))
    return {api: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs} for api, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run; each API runs twice per case")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="chat, responses, responses, chat: this many times")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.responses needs wrk: apt-get install wrk")
    gold = {QUESTION: "Eight.", PARAPHRASE: "Eight."}
    report: dict[str, Any] = {"machine": machine(), "seconds": args.seconds, "connections": args.connections,
                              "rounds": args.rounds}  # fmt: skip
    with tempfile.TemporaryDirectory() as work, oracle_and_proxy(Path(work), gold, {"CACHECADE_CASCADE_ROUTES": "{}"}
                                                                 ) as url:  # fmt: skip
        seeded = httpx.post(f"{url}/v1/chat/completions", json=chat(QUESTION), timeout=60)
        checks = {"chat exact": httpx.post(f"{url}/v1/chat/completions", json=chat(QUESTION)),
                  "responses exact": httpx.post(f"{url}/v1/responses", json=responses(QUESTION)),
                  "chat semantic": httpx.post(f"{url}/v1/chat/completions", json=chat(PARAPHRASE)),
                  "responses semantic": httpx.post(f"{url}/v1/responses", json=responses(PARAPHRASE))}  # fmt: skip
        report["x_cache"] = {"seed": seeded.headers.get("x-cache")} | {k: r.headers.get("x-cache")
                                                                       for k, r in checks.items()}  # fmt: skip
        say(f"responses bench: x-cache before the runs {report['x_cache']}")
        cases = {
            "exact hit": (("/v1/chat/completions", chat(QUESTION), False),
                          ("/v1/responses", responses(QUESTION), False)),
            "exact hit, store: false": (("/v1/chat/completions", chat(QUESTION), False),
                                        ("/v1/responses", {**responses(QUESTION), "store": False}, False)),
            "semantic hit": (("/v1/chat/completions", chat(PARAPHRASE), False),
                             ("/v1/responses", responses(PARAPHRASE), False)),
            "miss": (("/v1/chat/completions", {**chat("Question UNIQUE?"), "cache": MISS}, True),
                     ("/v1/responses", {**responses("Question UNIQUE?"), "cache": MISS}, True)),
        }  # fmt: skip
        for name, (chat_run, responses_run) in cases.items():
            report[name] = abba(url, chat_run, responses_run, args, Path(work))
            say(f"responses bench: {name} chat p50 {report[name]['chat']['p50_ms']:.2f} ms, responses p50 "
                f"{report[name]['responses']['p50_ms']:.2f} ms")  # fmt: skip
    text = table(report)
    write_report("responses", report, text, args.out)


def table(report: dict[str, Any]) -> str:
    lines = [f"Responses API vs chat completions, wrk -t1 -c{report['connections']} -d{report['seconds']}s, runs in "
             f"the order (chat, responses, responses, chat) x {report['rounds']}; the median of each API's runs "
             f"(x-cache checked first: {report['x_cache']})",
             "| requests | chat p50 | responses p50 | difference | target | chat / responses req/s | non-2xx |",
             "|---|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for name, target in (("exact hit", "<= +10 %"), ("exact hit, store: false", ""), ("semantic hit", "<= +10 %"),
                         ("miss", "<= +1 ms")):  # fmt: skip
        c, r = report[name]["chat"], report[name]["responses"]
        diff = f"{(r['p50_ms'] / c['p50_ms'] - 1):+.1%}" if "hit" in name else f"{r['p50_ms'] - c['p50_ms']:+.2f} ms"
        lines.append(f"| {name} | {c['p50_ms']:.2f} ms | {r['p50_ms']:.2f} ms | {diff} | {target} | "
                     f"{c['rps']:.0f} / {r['rps']:.0f} | {c['non_2xx']} / {r['non_2xx']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
