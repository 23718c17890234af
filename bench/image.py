"""The sidecar images' targets (issue 17), measured with Podman on this machine; prints a table and writes
bench/results/image.json.

    python -m bench.image [--starts 3] [--hits 2000] [--build]

- size: each image's uncompressed size (`podman image inspect`): latest <= 900 MB, cache-only <= 450 MB;
- start: `podman run` to the first /readyz 200, read-only root as the manifests run it: <= 10 s;
- build (--build, minutes): both targets with `podman build --no-cache` from the warm wheelhouse: <= 5 min;
- exact hit: p50 of one cached chat completion, sequential, from an app container in the sidecar's pod (its own
  network namespace: localhost is the sidecar) against the same client on the host against `cachecade serve` on
  the host, same settings: within 0.3 ms.

Run `make image` first (the bench uses the built images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import write_json
from local_models.processes import free_port, seconds_until_ok, stop
from tests.deploy.podman import BASE, CACHE_ONLY, FULL, run_sidecar
from tests.deploy.podman import podman as run_podman

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"latest": (FULL, 900), "cache-only": (CACHE_ONLY, 450)}
# Both local gates open, in the pod and on the host: the first answer (a miss) is stored, the rest are exact hits.
OPEN_GATES = '{"smollm2": 0.0, "gemma3": 0.0}'
# The timing client, the same file on the host and in the app container: sequential exact hits, p50 in ms.
CLIENT = """
import json, statistics, sys, time, httpx
url, n = sys.argv[1], int(sys.argv[2])
question = [{"role": "user", "content": "Name a primary colour."}]
body = {"model": "cachecade/auto", "max_tokens": 16, "messages": question}
with httpx.Client(timeout=120, headers={"Authorization": "Bearer sk-bench-image"}) as client:
    first = client.post(url, json=body)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(url, json=body)
        times.append((time.perf_counter() - started) * 1000)
    assert response.headers["x-cache"] == "HIT-EXACT", response.headers
print(json.dumps({"first": first.headers["x-cache"], "p50_ms": statistics.median(times),
                  "p90_ms": sorted(times)[int(0.9 * n)]}))
"""


def podman(*args: str, timeout: float = 600) -> str:
    return run_podman(*args, timeout=timeout).stdout


def ready_after(url: str, started: float, timeout_s: float = 300) -> float:
    seconds = seconds_until_ok(url, timeout_s, interval=0.05, started=started)
    if seconds is None:
        raise SystemExit(f"{url} not ready after {timeout_s} s")
    return seconds


def start_time(image: str) -> float:
    name, port = f"bench-{uuid.uuid4().hex[:8]}", free_port()
    extra = ["-e", "CACHECADE_UPSTREAM_BASE_URL=http://127.0.0.1:9/v1"] if image.endswith("cache-only") else []
    started = time.monotonic()
    run_sidecar(image, name, port, *extra)
    try:
        return ready_after(f"http://127.0.0.1:{port}/readyz", started)
    finally:
        podman("rm", "-f", "-v", "-t", "0", name)


def build_time() -> float:
    started = time.monotonic()
    for target, tag in (("cache-only", "cache-only"), ("full", "latest")):
        podman("build", "--no-cache", "--network=none", "--format", "docker", "-f", "deploy/Dockerfile",
               "--build-arg", f"BASE_IMAGE={BASE}", "--target", target, "-t", f"localhost/cachecade:{tag}", ".",
               timeout=3600)  # fmt: skip
    return time.monotonic() - started


def exact_hits(n: int) -> dict[str, dict[str, float]]:
    site = str(Path(httpx.__file__).parents[1])
    pod = f"bench-{uuid.uuid4().hex[:8]}"
    podman("pod", "create", "--name", pod)
    try:
        podman("run", "-d", "--pod", pod, "--name", f"{pod}-cachecade", "--read-only", "--tmpfs", "/tmp",
               "-e", f"CACHECADE_CASCADE_THRESHOLDS={OPEN_GATES}", IMAGES["latest"][0])  # fmt: skip
        out = podman("run", "--rm", "--pod", pod, "-v", f"{site}:/site:ro", "-e", "PYTHONPATH=/site", BASE, "sh",
                     "-c", "until python3 -c \"import urllib.request as u; u.urlopen('http://localhost:8080/readyz')\""
                     " 2>/dev/null; do sleep 0.5; done; exec python3 -c \"$0\" \"$@\"", CLIENT,
                     "http://localhost:8080/v1/chat/completions", str(n), timeout=1800)  # fmt: skip
        pod_result = json.loads(out.strip().splitlines()[-1])
    finally:
        podman("rm", "-f", "-v", "-t", "0", f"{pod}-cachecade")  # -v: with the image's anonymous data volume
        podman("pod", "rm", "-f", "-t", "0", pod)
    port = free_port()
    data = tempfile.TemporaryDirectory()
    serve = [str(Path(sys.executable).parent / "cachecade"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    # The image's settings: its embedder backend (int8) and the gates opened as in the pod.
    env = {**os.environ, "CACHECADE_DATA_DIR": data.name, "CACHECADE_CASCADE_THRESHOLDS": OPEN_GATES,
           "CACHECADE_EMBEDDER_BACKEND": "onnx-int8"}  # fmt: skip
    server = subprocess.Popen(serve, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready_after(f"http://127.0.0.1:{port}/readyz", time.monotonic())
        out = subprocess.run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}/v1/chat/completions", str(n)],
                             capture_output=True, text=True, check=True, timeout=1800).stdout  # fmt: skip
        host_result = json.loads(out.strip().splitlines()[-1])
    finally:
        stop(server)
        data.cleanup()
    return {"pod": pod_result, "host": host_result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--build", action="store_true", help="also time a --no-cache build of both targets")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": f"{os.cpu_count()} CPUs", "podman": podman("--version").strip()}
    for tag, (image, limit_mb) in IMAGES.items():
        size_mb = int(json.loads(podman("image", "inspect", image))[0]["Size"]) / 1e6
        starts = [start_time(image) for _ in range(args.starts)]
        results[tag] = {"size_mb": round(size_mb), "size_target_mb": limit_mb, "start_to_ready_s": starts,
                        "start_median_s": statistics.median(starts)}  # fmt: skip
        print(
            f"{tag:10s} {size_mb:6.0f} MB (target <= {limit_mb})   start -> /readyz: "
            + ", ".join(f"{s:.1f}" for s in starts)
            + " s (target <= 10)"
        )
    hits = exact_hits(args.hits)
    results["exact_hit"] = hits
    delta = hits["pod"]["p50_ms"] - hits["host"]["p50_ms"]
    print(
        f"exact hit p50: pod {hits['pod']['p50_ms']:.3f} ms, host {hits['host']['p50_ms']:.3f} ms, "
        f"difference {delta:+.3f} ms (target <= 0.3); p90 {hits['pod']['p90_ms']:.3f} / {hits['host']['p90_ms']:.3f}"
    )
    if args.build:
        seconds = build_time()
        results["build_no_cache_s"] = seconds
        print(f"build of both targets, --no-cache, warm wheelhouse: {seconds:.0f} s (target <= 300)")
    print(f"wrote {write_json('image', results).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
