"""Running OpenAI-compatible servers as child processes: llama.cpp's server on a GGUF (a real local upstream for
tests, benchmarks and the embedded default), and waiting for any server to answer."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerFailed(RuntimeError):
    """A child server exited or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll `url` until it answers 200; fail early, with the log's tail, if the process exits."""
    if seconds_until_ok(url, timeout, process=process) is None:
        if process.poll() is not None:
            raise ServerFailed(f"{process.args!r} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        raise ServerFailed(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def seconds_until_ok(url: str, timeout: float, interval: float = 0.2, started: float | None = None,
                     process: subprocess.Popen | None = None) -> float | None:  # fmt: skip
    """Seconds from `started` (a time.monotonic(); now by default) until `url` answers 200, or None after
    `timeout` seconds from then (or once `process`, the server, has exited)."""
    started = time.monotonic() if started is None else started
    while time.monotonic() - started < timeout and (process is None or process.poll() is None):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return None


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_llama_server(
    model: Path, alias: str, log: Path, threads: int = 2, n_ctx: int = 2048, wait: bool = True
) -> tuple[subprocess.Popen, str]:
    """Start `python -m llama_cpp.server` on a GGUF on a free port; returns the process and its /v1 URL (once it
    answers, unless wait=False)."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        if wait:
            wait_until_up(f"http://127.0.0.1:{port}/v1/models", process, log)
    except ServerFailed:
        stop(process)
        raise
    return process, f"http://127.0.0.1:{port}/v1"
