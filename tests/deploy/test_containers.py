"""The sidecar for real: `make image` builds both images with Podman (no network inside the build), then
containers and pods run them on this machine.

Skipped, with the reason, only where a container cannot run at all (no Podman, or `podman run` refused by the
kernel or the sandbox). Containers talk over loopback only: a published port on 127.0.0.1, or pods on the host's
network sharing the test's Redis and upstream on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from local_models.processes import free_port, seconds_until_ok, stop
from tests.conftest import served
from tests.deploy import kube
from tests.deploy.podman import BASE, CACHE_ONLY, ENV, FULL, podman, run_sidecar
from tests.e2e import responses_upstream
from tests.redis_server import start_redis

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def cannot_run(reason: str) -> None:
    """Skip where containers cannot run; in CI (CI=true), where `make test` installed Podman, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"in CI the containers must run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def images() -> None:
    """Both images, built once per run by `make image` (layers cached by Podman between runs)."""
    if shutil.which("podman") is None:
        cannot_run("podman is not installed (`make container-deps` installs Debian's)")
    if sys.version_info[:2] != (3, 11):
        cannot_run("the lock files and the image are for CPython 3.11 (the wheelhouse is made by this venv's pip)")
    base = subprocess.run([str(ROOT / "deploy/podman/base.sh"), BASE], env=ENV, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert base.returncode == 0, base.stderr[-3000:]
    probe = podman("run", "--rm", "--network=none", BASE, "true", check=False)
    if probe.returncode != 0:
        cannot_run(f"containers cannot run here: {probe.stderr.strip()[-500:]}")
    build = subprocess.run(["make", "--no-print-directory", "image"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=3600)  # fmt: skip
    assert build.returncode == 0, f"make image failed:\n{build.stdout[-3000:]}\n{build.stderr[-5000:]}"


def wait_ready(url: str, timeout_s: float = 180, container: str | None = None) -> float:
    """Seconds until `url` answers 200 (the container's log in the failure)."""
    seconds = seconds_until_ok(url, timeout_s)
    if seconds is None:
        logs = podman("logs", container, check=False).stderr[-3000:] if container else ""
        raise AssertionError(f"{url} not ready in {timeout_s} s\n{logs}")
    return seconds


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Containers, volumes and pods to remove after the test."""
    made: list[str] = []
    yield made
    for name in made:
        podman("rm", "-f", "-v", "-t", "0", name, check=False)  # -v: the image's anonymous data volume too
        podman("volume", "rm", "-f", name, check=False)
        podman("pod", "rm", "-f", "-t", "0", name, check=False)
        podman("secret", "rm", f"{name}-admin", check=False)


def ask(client: OpenAI, question: str) -> tuple[str, str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="cachecade/auto", max_tokens=24, messages=[{"role": "user", "content": question}]
    )
    return raw.headers["x-cache"], raw.headers["x-served-by"], raw.parse().choices[0].message.content or ""


def test_images_have_no_torch_no_compiler_no_pip_and_run_as_non_root(images: None) -> None:
    check = ("import importlib.util as u, os, shutil, sys; print(os.getuid(), os.getgid(), "
             "[m for m in ('torch', 'pip', 'scipy', 'sentence_transformers', 'llama_cpp') if u.find_spec(m)], "
             "[c for c in ('gcc', 'cc', 'curl', 'apt-get') if shutil.which(c)])")  # fmt: skip
    full = podman("run", "--rm", "--entrypoint", "python", FULL, "-c", check).stdout.split(" ", 2)
    cache_only = podman("run", "--rm", "--entrypoint", "python", CACHE_ONLY, "-c", check).stdout.split(" ", 2)
    assert full[:2] == cache_only[:2] == ["10001", "10001"]
    assert full[2].strip() == "['llama_cpp'] []"  # llama.cpp only in the full image; nothing else of the list
    assert cache_only[2].strip() == "[] []"


def test_full_image_serves_read_only_and_its_store_outlives_the_container(images: None, names: list[str]) -> None:
    """Local models answer with no upstream; the embedded store on a volume survives `podman rm`; the image's
    health check works by hand; `podman stop` ends it with exit code 0. (The local gates are opened so that the
    answer is stored: an answer served only as the last tier, below its gate, is not cached.)"""
    volume, first, second = (f"cc-test-{uuid.uuid4().hex[:8]}" for _ in range(3))
    names += [first, second, volume]
    podman("volume", "create", volume)
    port = free_port()
    gate = ("-e", 'CACHECADE_CASCADE_THRESHOLDS={"smollm2": 0.0, "gemma3": 0.0}')
    run_sidecar(FULL, first, port, "-v", f"{volume}:/var/lib/cachecade", *gate)
    wait_ready(f"http://127.0.0.1:{port}/readyz", container=first)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-container-test", max_retries=0)
    question = "What is the capital of France?"
    cache, served_by, answer = ask(client, question)
    assert cache == "MISS" and served_by in ("local:smollm2", "local:gemma3") and answer
    assert ask(client, question)[0] == "HIT-EXACT"
    assert podman("healthcheck", "run", first, check=False).returncode == 0
    podman("stop", "-t", "60", first)
    assert podman("inspect", first, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    podman("rm", first)
    run_sidecar(FULL, second, port, "-v", f"{volume}:/var/lib/cachecade", *gate)
    wait_ready(f"http://127.0.0.1:{port}/readyz", container=second)
    cache, _, again = ask(client, question)
    assert (cache, again) == ("HIT-EXACT", answer)  # from the volume's SQLite store, written by the first container


def test_sigterm_drains_an_inflight_stream_and_exits_zero(images: None, names: list[str], upstream: str) -> None:
    """A stream from the upstream is in flight (one word every 0.1 s) when `podman stop` sends SIGTERM: the client
    still gets every word and `[DONE]`, and the container exits 0 within the grace period. (The cache-only image,
    on the host's network to reach the test's upstream on 127.0.0.1, bound to 127.0.0.1.)"""
    name, port = f"cc-test-{uuid.uuid4().hex[:8]}", free_port()
    names.append(name)
    podman("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--network=host",
           "-e", f"CACHECADE_PORT={port}", "-e", "CACHECADE_HOST=127.0.0.1",
           "-e", f"CACHECADE_UPSTREAM_BASE_URL={upstream}", CACHE_ONLY)  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/readyz", container=name)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-container-test", max_retries=0)
    words = " ".join(f"w{i}" for i in range(30))
    stream = client.chat.completions.create(
        model="cachecade/auto", stream=True, messages=[{"role": "user", "content": f"Slowly: {words}"}]
    )
    chunks = [next(iter(stream))]
    stopped: dict[str, float | int] = {}

    def stop() -> None:
        stopped["at"] = started = time.monotonic()
        stopped["rc"] = podman("stop", "-t", "60", name, timeout=90, check=False).returncode
        stopped["s"] = time.monotonic() - started

    stopper = threading.Thread(target=stop)
    stopper.start()
    arrived = []
    for chunk in stream:  # the openai client ends the iteration at `data: [DONE]`, raises if the stream is cut
        chunks.append(chunk)
        arrived.append(time.monotonic())
    stopper.join()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == f"Echo: Slowly: {words}"  # every word, none lost to the shutdown
    assert arrived[-1] > float(stopped["at"]) + 1.0  # most of the stream came after SIGTERM was sent
    assert stopped["rc"] == 0 and float(stopped["s"]) < 60
    assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (the session's may hold other tests' entries for the pods' key)."""
    with served(lambda: start_redis(tmp_path / "redis.log"), stop) as url:
        yield url


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[str]:
    with served(lambda: responses_upstream.start(tmp_path / "upstream.log"), stop) as url:
        yield url


def play_pod(tmp_path: Path, names: list[str], redis_url: str, upstream: str, questions: tuple[str, ...]
             ) -> tuple[list[dict[str, object]], list[kube.Probe], int]:  # fmt: skip
    """One pod of deploy/k8s's app Deployment (tests/deploy/kube.py's transform); its probes polled as the
    manifests state them; the app's output once it has exited."""
    pod, port = f"cc-pod-{uuid.uuid4().hex[:8]}", free_port()
    names.append(pod)
    staging = tmp_path / pod
    staging.mkdir()
    shutil.copy(ROOT / "tests/deploy/pod_client.py", staging / "pod_client.py")
    site = Path(httpx.__file__).parents[1]  # this venv's packages: the openai client and what it imports
    wiring = kube.Wiring(pod=pod, port=port, image=FULL, app_image=BASE, redis_url=redis_url, upstream_url=upstream,
                         admin_token="pod-test-admin-token-" + uuid.uuid4().hex, app_script=staging / "pod_client.py",
                         app_site=site, questions=questions)  # fmt: skip
    rendered, secret = staging / "pod.yaml", staging / "secret.json"
    played, secret_json = kube.render(wiring)
    rendered.write_text(played)
    secret.write_text(secret_json)
    podman("secret", "create", f"{pod}-admin", str(secret))
    podman("kube", "play", str(rendered), timeout=300)
    manifest_probes = kube.probes(kube.sidecar(kube.manifests()["Deployment/app"]["spec"]["template"]["spec"]))
    ports = {8080: port}  # the manifests' container port -> the sidecar's port on the host network
    for probe in manifest_probes:
        wait_ready(f"http://127.0.0.1:{ports[probe.port]}{probe.path}", timeout_s=300)
    app = f"{pod}-app"
    podman("wait", app, timeout=300)
    logs = podman("logs", app).stdout
    assert podman("inspect", app, "--format", "{{.State.ExitCode}}").stdout.strip() == "0", logs
    return [json.loads(line) for line in logs.splitlines() if line.startswith("{")], manifest_probes, port


def test_pods_from_the_manifests_share_one_redis(images: None, names: list[str], tmp_path: Path, redis_url: str,
                                                 upstream: str) -> None:  # fmt: skip
    """deploy/k8s under `podman kube play`: the app reaches its sidecar at localhost with the official client (a
    MISS, a HIT-EXACT, a HIT-SEMANTIC), the admin API takes the Secret's token; a second pod on the same Redis
    serves the first pod's answer as a hit."""
    question, reworded = "How many legs does a spider have?", "How many legs do spiders have?"
    first, probes, _ = play_pod(tmp_path, names, redis_url, upstream, (question, question, reworded))
    assert {p.kind for p in probes} == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert [r["x-cache"] for r in first[:3]] == ["MISS", "HIT-EXACT", "HIT-SEMANTIC"], first
    assert first[3] == {"admin_with_token": 200, "admin_without_token": 401}
    second, _, _ = play_pod(tmp_path, names, redis_url, upstream, (question,))
    assert second[0]["x-cache"] == "HIT-EXACT" and second[0]["answer"] == first[0]["answer"], second
