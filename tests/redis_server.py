"""A throwaway `redis-server` (Debian's binary, installed by `make system-deps`) on a free port, for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from local_models.processes import ServerFailed, free_port, stop


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(log: Path, timeout: float = 10.0, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start an in-memory redis-server (no RDB, no AOF) on 127.0.0.1; returns the process and its URL (database
    0) once it answers PING. Raises ServerFailed, with the log, if it exits or does not answer in time."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerFailed("redis-server is not on PATH: run `make system-deps` (installs Debian's redis-server)")
    port = port or free_port()  # a given port: restart a server where its clients expect it
    cmd = [binary, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1"]
    with log.open("a") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not _answers_ping(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise ServerFailed(f"{cmd!r} did not answer PING within {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"
