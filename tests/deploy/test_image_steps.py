"""The image's build steps without a container engine: deploy/Dockerfile's installs in a fresh venv, its warm-up
(deploy/warm_models.py), then `cachecade serve` started as the image starts it, with the venv, the model cache
and HOME read-only (as under readOnlyRootFilesystem) where this machine allows a private read-only bind mount.

Slow (minutes): the venv gets the project and its dependencies from pip's cache; llama-cpp-python's wheel comes
from deploy/llama_wheel.sh with the image's LLAMA_CMAKE_ARGS, as the builder stage runs it (the same flags as
`make install`, so it finds the wheel already built). torch comes from the index pip is configured with (this
machine: its local CPU wheel) rather than PyTorch's CPU index.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from local_models.processes import free_port, wait_until_up
from tests.deploy.dockerfile import DEPLOY, Stage, global_args, healthcheck_command, stages

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = DEPLOY.parent
CONTEXT = ["pyproject.toml", "README.md", "proxy", "cache", "local_models"]  # what the builder stage copies
PIP_TIMEOUT_S = 1800  # a cold pip cache compiles llama-cpp-python (about 8 minutes on 2 cores)


@dataclass
class Image:
    """The fresh venv and model cache, laid out as the image has them."""

    venv: Path
    models: Path
    root: Path
    models_made: list[tuple[str, int]] = field(default_factory=list)

    def env(self, stage: Stage, **extra: str) -> dict[str, str]:
        """A stage's environment (its plain ENV values; paths are this test's), nothing of the caller's own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHECADE_", "VIRTUAL_ENV", "PYTHON"))}
        env |= {k: v for k, v in stage.env().items() if "/" not in v and "$" not in v}
        env |= {"PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}", "CACHECADE_MODEL_CACHE_DIR": str(self.models)}
        return env | extra

    def snapshot(self) -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_mtime_ns) for p in self.models.rglob("*"))


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Install as the builder stage does, from a copy of the build context, then run its warm-up."""
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    context.mkdir()
    for name in CONTEXT:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, context / name)
    image = Image(root / "venv", root / "models", root)
    builder = stages()[0]
    env = image.env(builder, LLAMA_CMAKE_ARGS=global_args()["LLAMA_CMAKE_ARGS"],
                    CMAKE_BUILD_PARALLEL_LEVEL=global_args()["BUILD_JOBS"])  # fmt: skip
    python = str(image.venv / "bin" / "python")
    torch = re.search(r"\btorch==\S+", " ".join(builder.all("RUN")))
    assert torch is not None
    run([sys.executable, "-m", "venv", str(image.venv)], env, root, 120)
    run([python, "-m", "pip", "install", "-q", torch[0]], env, root, PIP_TIMEOUT_S)
    wheel = run(["bash", str(DEPLOY / "llama_wheel.sh")], env | {"PYTHON": python}, root, PIP_TIMEOUT_S).strip()
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], env, root, PIP_TIMEOUT_S)
    run([python, "-m", "pip", "install", "-q", "--only-binary", "llama-cpp-python", str(context)], env, root,
        PIP_TIMEOUT_S)  # fmt: skip
    run([python, "-m", "pip", "check"], env, root, 120)
    run([python, str(DEPLOY / "warm_models.py")], env, root, 600)
    image.models_made = image.snapshot()
    return image


def test_warm_up_leaves_model_files_every_user_can_read(image: Image) -> None:
    """The runtime user (10001) is not the builder (root): it must read what the warm-up made."""
    names = {p.name for p in image.models.rglob("*") if p.is_file()}
    assert any(n.endswith(".int8.onnx") for n in names) and any(n.endswith(".gguf") for n in names), names
    for path in [image.models, *image.models.rglob("*")]:
        wanted = 0o555 if path.is_dir() else 0o444
        assert path.stat().st_mode & wanted == wanted, f"{path}: {oct(path.stat().st_mode)}"


def read_only_mounts_work() -> bool:
    """Whether this process may make a private mount namespace with read-only bind mounts (root here; not in
    every sandbox)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", probe],
                          capture_output=True, timeout=30).returncode == 0  # fmt: skip


@pytest.fixture(scope="module")
def server(image: Image) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`cachecade serve` as the image's ENTRYPOINT runs it, on a free loopback port. Writable: the data dir and
    /tmp; read-only (when possible): the venv, the model cache and HOME."""
    home, data = image.root / "home", image.root / "data"
    home.mkdir()
    data.mkdir()
    port = free_port()
    env = image.env(stages()[-1], HOME=str(home), CACHECADE_DATA_DIR=str(data), CACHECADE_HOST="127.0.0.1",
                    CACHECADE_PORT=str(port))  # fmt: skip
    serve = [str(image.venv / "bin" / "cachecade"), "serve"]
    if read_only_mounts_work():
        mount = 'for d in "$@"; do mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" || exit 97; done'
        script = f"{mount}; exec {shlex.join(serve)}"
        serve = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                 str(image.venv), str(image.models), str(home)]  # fmt: skip
    log = image.root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(serve, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=home)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", process, log, timeout=300)
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_server_starts_ready_and_answers(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    _, url, _ = server
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["local_models"] == ["gemma3", "smollm2"]
    body = {"model": "cachecade/auto", "max_tokens": 16,
            "messages": [{"role": "user", "content": "How many legs does a spider have?"}]}  # fmt: skip
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-served-by"].startswith("local:")
    assert answer.json()["choices"][0]["message"]["content"]


def test_image_healthcheck_command_passes(image: Image, server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    _, url, _ = server
    command = healthcheck_command(stages()[-1])
    env = image.env(stages()[-1], CACHECADE_PORT=url.rsplit(":", 1)[1])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_memory_fits_the_sidecar_limit(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    """Resident memory after start and one answer, against the limit in deploy/k8s/deployment.yaml."""
    process, _, _ = server
    rss_kib = int(re.findall(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text())[0])
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (sidecar,) = deployment["spec"]["template"]["spec"]["initContainers"]
    limit = sidecar["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    print(f"cachecade RSS after start and one answer: {rss_kib / 1024:.0f} MiB (limit {limit})")
    assert rss_kib * 1024 < 0.75 * int(limit[:-2]) * 2**30


def test_sigterm_stops_cleanly_and_nothing_was_written(
    image: Image, server: tuple[subprocess.Popen[bytes], str, Path]
) -> None:
    process, _, log = server
    process.send_signal(signal.SIGTERM)
    # uvicorn drains, shuts the app down, then re-raises the signal: a container exits 143, not 0.
    assert process.wait(timeout=45) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "Application shutdown complete." in log.read_text()
    assert image.snapshot() == image.models_made
    assert not any((image.root / "home").iterdir()), "start-up wrote to HOME (read-only in the image)"
    assert "Traceback" not in log.read_text()
