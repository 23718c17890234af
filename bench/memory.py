"""Where the memory of `cachecade serve` goes, itemised.

1. **Per process**, for each configuration (the embedded default with both packaged models; one model; cache only,
   no local models): a real `cachecade serve` started and ready, then each process's resident memory (RSS), its
   proportional share (PSS: pages shared between processes counted once), and how much of it is anonymous (heap,
   buffers) or file-backed (mapped model weights, libraries). Model workers are named by the GGUF they map.
2. **Inside the proxy**: the same steps as its start, one by one in a fresh interpreter (imports, the embedder, the
   verifier, the token counter, the vocab-only llama.cpp loads), with the growth of RSS after each.

  python -m bench.memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, say, write_report
from bench.hardening import descendants
from bench.latency import start_proxy
from local_models.processes import stop, wait_until_up

CONFIGS = {
    "default (SmolLM2 + Gemma 3)": {},
    "one local model (SmolLM2)": {"CACHECADE_CASCADE_ROUTES": json.dumps({"cachecade/auto": ["smollm2", "upstream"]})},
    "cache only (no local models)": {"CACHECADE_CASCADE_ROUTES": "{}"},
}


def rollup(pid: int) -> dict[str, float]:
    """MB from /proc/PID/smaps_rollup: Rss, Pss, Anonymous, and Rss less Anonymous (file-backed)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"],
            "file": fields["Rss"] - fields["Anonymous"]}  # fmt: skip


def role(pid: int) -> str:
    """What a process of the proxy's tree is: the model worker of the GGUF it maps, or the resource tracker."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    ggufs = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if line.endswith(".gguf")}
    if ggufs:
        return "model worker: " + ", ".join(sorted(ggufs))
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return "multiprocessing resource tracker" if "resource_tracker" in cmdline else cmdline[:60]


def processes(extra: dict[str, str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as work:
        proxy, url, log = start_proxy(Path(work), "", 0.95, extra)  # no upstream: the embedded default
        try:
            wait_until_up(f"{url}/readyz", proxy, log, 300)
            rows = [{"process": "proxy", **rollup(proxy.pid)}]
            rows += [{"process": role(pid), **rollup(pid)} for pid in descendants(proxy.pid)]
        finally:
            with contextlib.suppress(Exception):
                stop(proxy)
    return rows


STEPS = r"""
import json, sys
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
steps, last = [], rss()
def step(name):
    global last
    now = rss(); steps.append([name, round(now - last, 1)]); last = now
steps.append(["Python interpreter", round(last, 1)])
import numpy; step("numpy")
import fastapi, pydantic, httpx, uvicorn; step("FastAPI, pydantic, httpx, uvicorn")
import proxy.app
step("the rest of the proxy's imports (ONNX Runtime, FAISS, tokenizers, SciPy's special functions, ...)")
from proxy.config import Settings
s = Settings()
from cache.embedder import load_embedder
e = load_embedder(s.embedder, s.embedder_backend, s.model_cache_dir, s.embedder_threads)
step(f"the embedder ({s.embedder}, {s.embedder_backend})")
e.encode(["a question of a few words, asked to warm the session up"] * 32)
step("the embedder's buffers after a batch of 32")
from cache.verifier import PairVerifier
PairVerifier.load(None, s.model_cache_dir, 2, s.cache_verifier_backend)
step(f"the verifier ({s.cache_verifier_backend})")
from proxy.tokens import TokenCounter
TokenCounter().count("hello"); step("the token counter (tiktoken's encoding)")
from local_models.engine import LlamaEngine
for name in sorted(s.used_local_models()):
    cfg = s.local_models[name]
    LlamaEngine(name, cfg, cfg.gguf(s.model_cache_dir), vocab_only=True)
    step(f"{name}'s vocabulary (vocab-only llama.cpp load)")
print(json.dumps(steps))
"""


def proxy_steps() -> list[list[Any]]:
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(report: dict[str, Any]) -> str:
    lines = []
    for name, rows in report["configurations"].items():
        total = {k: sum(r[k] for r in rows) for k in ("rss", "pss", "anon", "file")}
        lines += [f"\n{name}: RSS {total['rss']:.0f} MB in all, PSS {total['pss']:.0f} MB",
                  "| process | RSS | PSS | anonymous | file-backed |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {r['process']} | {r['rss']:.0f} | {r['pss']:.0f} | {r['anon']:.0f} | {r['file']:.0f} |" for r in rows
        ]
    lines += ["\ninside the proxy (a fresh interpreter, its start's steps one by one):", "| step | RSS growth (MB) |",
              "|---|---:|"]  # fmt: skip
    lines += [f"| {name} | {mb:.0f} |" for name, mb in report["proxy_steps"]]
    return "\n".join(lines).lstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configurations = {}
    for name, extra in CONFIGS.items():
        say(f"memory: {name}")
        configurations[name] = processes(extra)
    report = {"machine": machine(), "configurations": configurations, "proxy_steps": proxy_steps()}
    text = table(report)
    print(text)
    write_report("memory", report, text, args.out)


if __name__ == "__main__":
    main()
