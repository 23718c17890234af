"""A tiny generation in a child process before a local tier is used.

A llama.cpp build can hold instructions the CPU cannot run (a `-march=native` wheel made on another machine) or
kernels that crash on it (llama.cpp's AMX path asks for the tile permission on the main thread only, so its
worker threads die with SIGILL: llama.cpp PR #26954). Either kills the whole process at the first generation,
and the proxy with it. So the first generation of each model runs in a child: when the child dies on a signal
or hangs, that tier starts off, and the proxy says why instead of dying.

    python -m local_models.selfcheck MODEL.gguf THREADS   (prints llama.cpp's system info; exit 0 when it ran)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cachecade.local")
# Long enough that the prompt runs through the matrix-matrix kernels and the answer through the matrix-vector ones.
PROMPT = (
    "Question: A lighthouse keeper climbs 120 steps to the lamp room four times a night. How many steps does "
    "the keeper climb in a week of nights? Think it through and give the number.\nAnswer:"
)
TOKENS = 8
CHILD = (sys.executable, "-m", "local_models.selfcheck")  # tests swap it for a child that crashes on purpose
REBUILD_HINT = (
    "this llama-cpp-python build runs instructions this CPU cannot run or whose kernels crash on it (a "
    "-march=native build made on another machine, or llama.cpp's AMX kernels). Reinstall the portable build with "
    "`make reinstall-llama` (README: Supported CPUs), then restart"
)
SIGNAL_NAMES = {"SIGILL": "illegal instruction", "SIGSEGV": "segmentation fault", "SIGBUS": "bus error",
                "SIGABRT": "aborted", "SIGFPE": "arithmetic exception", "SIGKILL": "killed"}  # fmt: skip


@dataclass(frozen=True)
class CheckResult:
    """How a model's test generation went: ok, crashed (a signal or a hang: the tier must stay off), or failed
    with an ordinary error (the in-process load reports it)."""

    ok: bool
    crashed: bool = False
    detail: str = ""
    system_info: str = ""


async def check(path: Path, threads: int, timeout_s: float = 120.0, child: Sequence[str] | None = None) -> CheckResult:
    """Load the GGUF and generate a few tokens in a child process (`child`, default CHILD) with the tier's thread
    count."""
    process = await asyncio.create_subprocess_exec(
        *(child or CHILD), str(path), str(threads), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return CheckResult(False, True, f"a test generation did not finish in {timeout_s:g} s")
    code = process.returncode
    if code == 0:
        return CheckResult(True, system_info=_system_info(out))
    if code is not None and code < 0:
        name = signal_name(-code)
        what = f" ({SIGNAL_NAMES[name]})" if name in SIGNAL_NAMES else ""
        return CheckResult(False, True, f"llama.cpp died with {name}{what} in a test generation")
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
    return CheckResult(False, False, f"the test generation exited with {code}: {tail[0]}")


async def check_all(models: Mapping[str, tuple[Path, int]], timeout_s: float = 120.0) -> dict[str, str]:
    """Check every model (name -> (GGUF, threads)) at once; returns name -> why for those that crashed, which
    must stay off. Each outcome is logged; an ordinary failure is left for the in-process load to report."""
    names = list(models)
    results = await asyncio.gather(*(check(*models[name], timeout_s) for name in names))
    off = {}
    for name, result in zip(names, results, strict=True):
        if result.crashed:
            off[name] = result.detail
            log.error("local model %s is OFF: %s; %s", name, result.detail, REBUILD_HINT)
        elif result.ok:
            log.info("local model %s passed its self-check (llama.cpp %s)", name, result.system_info)
        else:
            log.warning("local model %s: self-check failed: %s", name, result.detail)
    return off


def signal_name(number: int) -> str:
    """SIGILL, SIGSEGV, ... for a signal number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _system_info(out: bytes) -> str:
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return str(json.loads(out.decode().strip().splitlines()[-1])["system_info"])
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """The child: load, generate TOKENS tokens greedily, print llama.cpp's system info as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m local_models.selfcheck MODEL.gguf THREADS", file=sys.stderr)
        return 2
    from llama_cpp import Llama, llama_print_system_info

    threads = int(args[1])
    llm = Llama(model_path=args[0], n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=0.0)
    print(json.dumps({"system_info": llama_print_system_info().decode("utf-8", "replace").strip()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
