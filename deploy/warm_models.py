"""Image build step: make the derived model files, then start the app once.

The server makes some model files on first use in CACHECADE_MODEL_CACHE_DIR: the embedder's ONNX export (and its
int8 version), the cache verifier's ONNX export and the Gemma 3 GGUF joined from its package's chunks. Made here,
at build time, they are part of the image, whose runtime user cannot write there (and whose root filesystem may
be read-only); they are made readable by every user, since some are written private (0600) and the runtime user
is not root. The app is then started once with its real settings and must answer /readyz with 200 without
changing that directory: an image that would fail at start, or write there, fails its build instead.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from cache.embedder import load_embedder
from cache.verifier import PairVerifier
from proxy.app import create_app
from proxy.config import Settings

BACKENDS = ("onnx", "onnx-int8")  # both, so CACHECADE_EMBEDDER_BACKEND can be switched without a write


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def share(root: Path) -> None:
    """Let every user read the files under `root` (and enter its folders)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def main() -> int:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        cache_dir = settings.model_cache_dir
        for backend in BACKENDS:
            print(f"embedder {load_embedder(settings.embedder, backend, cache_dir).model_id} ({backend}): ok")
        for name in settings.used_local_models():
            print(f"local model {name}: {settings.local_models[name].gguf(cache_dir)}")
        if settings.cache_verifier != "off":
            folder = None if settings.cache_verifier == "default" else Path(settings.cache_verifier)
            verifier = PairVerifier.load(folder, cache_dir, backend=settings.cache_verifier_backend)
            print(f"cache verifier: {verifier.model_id}")
        share(cache_dir)
        before = snapshot(cache_dir)
        with TestClient(create_app(settings)) as client:
            ready = client.get("/readyz")
        print(f"/readyz {ready.status_code}: {ready.text}")
        changed = sorted(set(before.items()) ^ set(snapshot(cache_dir).items()))
        if changed:
            print(f"start-up changed {cache_dir}: {changed}", file=sys.stderr)
        return 0 if ready.status_code == 200 and not changed else 1


if __name__ == "__main__":
    sys.exit(main())
