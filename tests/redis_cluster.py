"""A throwaway 3-master Redis Cluster (Debian's redis-server and redis-cli) on free ports, for tests."""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from local_models.processes import ServerFailed, free_port, stop

MASTERS = 3
BUS_OFFSET = 10_000  # each node also listens on its port + 10000 for the cluster bus


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose bus ports (+10000, so at most 55535) are free too, all distinct."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        taken = {*ports, *(p + BUS_OFFSET for p in ports)}
        if port + BUS_OFFSET <= 65535 and not {port, port + BUS_OFFSET} & taken and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerFailed(f"{name} is not on PATH: run `make system-deps` (Debian's redis-server and redis-tools)")
    return path


def _start_node(server: str, port: int, workdir: Path) -> subprocess.Popen:
    cmd = [server, "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
           "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(workdir)]  # fmt: skip
    with (workdir / f"redis-{port}.log").open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _logs(workdir: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in sorted(workdir.glob("*.log")))


def _wait(
    ready: Callable[[], bool], processes: list[subprocess.Popen], workdir: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if any(p.poll() is not None for p in processes):
            raise ServerFailed(f"Redis Cluster: a node exited while waiting for {what}:\n{_logs(workdir)}")
        if time.monotonic() > deadline:
            raise ServerFailed(f"Redis Cluster: {what} not within {timeout}s:\n{_logs(workdir)}")
        time.sleep(0.1)


def _cli(cli: str, port: int, *args: str) -> str:
    done = subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True, timeout=5)
    return done.stdout


def _cluster_ok(cli: str, port: int) -> bool:
    return "cluster_state:ok" in _cli(cli, port, "cluster", "info")


def start_cluster(workdir: Path, timeout: float = 30.0) -> tuple[list[subprocess.Popen], str]:
    """Start 3 in-memory masters (no replicas) on 127.0.0.1 and join them; returns the processes and the URL of
    the first node once `cluster info` says cluster_state:ok. Raises ServerFailed, with the logs, on failure."""
    server, cli = _binary("redis-server"), _binary("redis-cli")
    ports = _cluster_ports(MASTERS)
    processes = [_start_node(server, port, workdir) for port in ports]
    try:
        pinging = lambda: all(_cli(cli, p, "ping").startswith("PONG") for p in ports)  # noqa: E731
        _wait(pinging, processes, workdir, "nodes answering PING", timeout)
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                  "--cluster-yes"]  # fmt: skip
        done = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ServerFailed(f"{create!r} failed:\n{done.stdout}\n{done.stderr}\n{_logs(workdir)}")
        for port in ports:  # every node must agree, or a client's first MOVED may land on one still joining
            _wait(functools.partial(_cluster_ok, cli, port), processes, workdir, "cluster_state:ok", timeout)
    except BaseException:
        stop_cluster(processes)
        raise
    return processes, f"redis://127.0.0.1:{ports[0]}"


def stop_cluster(processes: list[subprocess.Popen]) -> None:
    """Stop every node of the cluster."""
    for process in processes:
        stop(process)
