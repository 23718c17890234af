"""Image build step: make the derived model files, then start the app once.

The server makes some model files on first use in CACHECADE_MODEL_CACHE_DIR: the embedder's ONNX export (or its
int8 version), the cache verifier's ONNX export and the Gemma 3 GGUF joined from its package's chunks. Made here,
at build time (this stage has torch; the runtime stages do not), they are part of the image, whose runtime user
cannot write there (and whose root filesystem may be read-only); they are made readable by every user, since some
are written private (0600) and the runtime user is not root. Only the configured backends are made
(CACHECADE_EMBEDDER_BACKEND, CACHECADE_CACHE_VERIFIER_BACKEND: the Dockerfile's build arguments), and an fp32
file that served only to make an int8 one is removed. The app is then started once with its real settings and must
answer /readyz with 200 without changing that directory: an image that would fail at start, or write there, fails
its build instead.
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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def share(root: Path) -> None:
    """Let every user read the files under `root` (and enter its folders)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def drop_fp32(root: Path, embedder: bool, verifier: bool) -> None:
    """Remove the fp32 exports whose int8 versions were made from them (and that nothing loads)."""
    for int8 in root.rglob("*int8.onnx"):
        is_verifier = int8.name.startswith("verifier-")
        fp32 = int8.with_name(
            int8.name.replace("-int8.onnx", ".onnx") if is_verifier else int8.name.replace(".int8", "")
        )
        if fp32 != int8 and fp32.exists() and (verifier if is_verifier else embedder):
            fp32.unlink()


def main() -> int:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        cache_dir = settings.model_cache_dir
        backend = settings.embedder_backend
        print(f"embedder {load_embedder(settings.embedder, backend, cache_dir).model_id} ({backend}): ok")
        for name in settings.used_local_models():
            print(f"local model {name}: {settings.local_models[name].gguf(cache_dir)}")
        if settings.cache_verifier != "off":
            folder = None if settings.cache_verifier == "default" else Path(settings.cache_verifier)
            verifier = PairVerifier.load(folder, cache_dir, backend=settings.cache_verifier_backend)
            print(f"cache verifier: {verifier.model_id}")
        if backend == "onnx-int8" or settings.cache_verifier_backend == "onnx-int8":
            drop_fp32(cache_dir, embedder=backend == "onnx-int8",
                      verifier=settings.cache_verifier_backend == "onnx-int8")  # fmt: skip
        share(cache_dir)
        for path in sorted(p for p in cache_dir.rglob("*") if p.is_file()):
            print(f"{path.stat().st_size / 2**20:8.1f} MiB  {path.relative_to(cache_dir)}")
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
