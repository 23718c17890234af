"""The installed llama.cpp build is portable: no AMX code path (llama.cpp's AMX kernels die with SIGILL on worker
threads that never asked for the tile permission: PR #26954) and, for the default flags, no instruction beyond
llama.cpp's x86-64 baseline (AVX2, FMA, F16C, BMI2), whatever CPU built it.

Read from the shared libraries' disassembly, so it needs no AMX or AVX-512 CPU to run, and it fails on a
`-march=native` wheel made on an AVX-512 or AMX machine (the build `make` made before GGML_NATIVE=OFF)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")

# AT&T syntax as objdump prints it.
AMX = re.compile(r"\b(tilezero|tileloadd(t1)?|tilestored|tilerelease|ldtilecfg|sttilecfg|tdpb[su]{2}d|tdp[bf]f?16ps)\b")
# A user's `make test LLAMA_CMAKE_ARGS=...` checks a build for their fleet; CI always checks the shipped default.
FLEET_BUILD = bool(os.environ.get("LLAMA_CMAKE_ARGS")) and os.environ.get("CI") != "true"
BEYOND_BASELINE = {
    "AVX-512 (zmm registers)": re.compile(r"%zmm\d"),
    "AVX-512 (mask registers)": re.compile(r"%k[1-7]\b"),
    "VNNI (AVX-512 VNNI or AVX-VNNI)": re.compile(r"\bvpdp(bu|ws)sds?\b"),
    "AMX": AMX,
}


def libraries() -> list[Path]:
    import llama_cpp

    # A wheel holds libx.so, libx.so.0 and libx.so.0.y.z as copies: read each library once.
    found = {p.name.split(".so")[0]: p for p in sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*.so*"))}
    assert "libggml-cpu" in found, f"no libggml-cpu in {sorted(found)}"
    return list(found.values())


def scan(library: Path, patterns: dict[str, re.Pattern[str]]) -> dict[str, str]:
    """The first disassembled line matching each pattern (patterns that never match are left out)."""
    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils, which gcc brings) is needed to read the build"
    found: dict[str, str] = {}
    with subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(library)], stdout=subprocess.PIPE,
                          text=True, errors="replace") as process:  # fmt: skip
        assert process.stdout is not None
        for line in process.stdout:
            for name, pattern in patterns.items():
                if name not in found and pattern.search(line):
                    found[name] = line.strip()
    assert process.returncode == 0, f"objdump failed on {library}"
    return found


def test_no_library_holds_an_amx_instruction() -> None:
    for library in libraries():
        found = scan(library, {"AMX": AMX})
        assert not found, f"{library.name} holds AMX code ({found['AMX']}): rebuild with `make reinstall-llama`"


@pytest.mark.skipif(FLEET_BUILD, reason="a build for a fleet (LLAMA_CMAKE_ARGS set, outside CI)")
def test_default_build_stays_within_the_portable_baseline() -> None:
    for library in libraries():
        found = scan(library, BEYOND_BASELINE)
        assert not found, f"{library.name} is not a portable build: {found}"


@pytest.mark.skipif(FLEET_BUILD, reason="a build for a fleet (LLAMA_CMAKE_ARGS set, outside CI)")
def test_llama_cpp_reports_the_baseline_features() -> None:
    from llama_cpp import llama_print_system_info

    info = llama_print_system_info().decode()
    assert "AVX2 = 1" in info and "FMA = 1" in info, info
    assert not re.search(r"(AVX512\w*|AMX\w*|AVX_VNNI) = 1", info), info
