"""Podman as the container tests and bench/image.py run it: the project's containers.conf, the images `make image`
builds, and the sidecar started as the manifests run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "podman" / "containers.conf"
BASE = "localhost/cachecade-base:bookworm"
FULL, CACHE_ONLY = "localhost/cachecade:latest", "localhost/cachecade:cache-only"
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONF))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run podman from the repository root; with `check`, an AssertionError with its stderr when it fails."""
    result = subprocess.run(["podman", *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def run_sidecar(image: str, name: str, port: int, *extra: str) -> None:
    """The image as the manifests run it: read-only root, only /tmp (tmpfs) and the data volume writable, its port
    published on 127.0.0.1."""
    podman("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8080", *extra,
           image)  # fmt: skip
