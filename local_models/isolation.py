"""A local model in a child process of its own, so that a crash inside llama.cpp ends the child, not the proxy.

The proxy keeps the model's vocabulary and chat template (a vocab-only load: prompts are rendered here, cheaply);
the weights live in the child, which runs one job at a time for the worker's thread. When the child dies (a
signal, an abort on a failed assertion) or stops answering, the request in flight escalates with reason
`crashed` and the next request starts a new child; after MAX_CRASHES crashes within CRASH_WINDOW_S the model is
turned off (reason `off`, shown in /readyz) until restart, so a model that crashes on every request costs one
failed answer per crash, not a restart loop.

Protocol (a duplex pipe, one job at a time): the parent sends ("generate", prompt, samplings); the child answers
each sampling with ("generation", g) or ("error", exc) and waits for "more" or "stop" before the next one (so
`enough`, a function of the parent's, decides early stops); a job ends with ("done", None). Cancelling sets a
shared event that the child checks at every token.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from local_models.engine import Generation, LlamaEngine, Sampling
from local_models.errors import Crashed, LoadFailed, LocalModelError, TierOff
from local_models.prompts import Prompt
from local_models.registry import LocalModelConfig
from local_models.selfcheck import signal_name
from local_models.worker import Enough, ModelWorker

log = logging.getLogger("cachecade.local")
MAX_CRASHES = 3
CRASH_WINDOW_S = 600.0
START_TIMEOUT_S = 300.0
ANSWER_TIMEOUT_S = 600.0  # no message from the child for this long: it hangs, and is killed
POLL_S = 0.05  # how often a waiting parent looks at its cancel event


class _ChildGone(Exception):
    """The child died or hung; the message says how."""


class _Child:
    """One child process, its end of the pipe and its cancel event."""

    def __init__(self, name: str, config: LocalModelConfig, path: Path) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded, model-holding parent
        self.conn, theirs = context.Pipe()
        self.cancel = context.Event()
        self.process = context.Process(target=_serve, args=(theirs, self.cancel, name, config, path), daemon=True,
                                       name=f"llm-{name}")  # fmt: skip
        self.process.start()
        theirs.close()  # the child's end lives in the child only, so its death is an EOF here

    def send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
            raise _ChildGone(self.how_it_ended()) from exc

    def receive(self, cancel: threading.Event | None, timeout_s: float) -> Any:
        """The child's next message; _ChildGone when it died or sent nothing for `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.conn.poll(POLL_S):
                if cancel is not None and cancel.is_set():
                    self.cancel.set()
                if time.monotonic() > deadline:
                    self.kill()
                    raise _ChildGone(f"sent nothing for {timeout_s:g} s and was killed")
            return self.conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise _ChildGone(self.how_it_ended()) from exc

    def how_it_ended(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        return f"died with {signal_name(-code)}" if code < 0 else f"exited with {code}"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class ChildProcessWorker(ModelWorker):
    """ModelWorker whose generations run in a child process (see the module docstring). `engine` is the
    vocab-only load that renders prompts here."""

    def __init__(self, name: str, config: LocalModelConfig, path: Path, max_queue: int | None = None) -> None:
        super().__init__(LlamaEngine(name, config, path, vocab_only=True), max_queue)
        self.config, self.path = config, path
        self._child: _Child | None = None
        self._crashes: collections.deque[float] = collections.deque(maxlen=MAX_CRASHES)

    def start(self) -> None:
        """Start the child and wait until its model is loaded (blocking: call it off the event loop)."""
        self._executor.submit(self._ensure_child).result()

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs."""
        return self._child.process.pid if self._child is not None else None

    def _ensure_child(self) -> _Child:
        if self._child is not None:
            return self._child
        child = _Child(self.name, self.config, self.path)
        try:
            kind, value = child.receive(None, START_TIMEOUT_S)
        except _ChildGone as gone:
            self._crashed(f"llama.cpp {gone} while loading")
            raise Crashed(f"local model {self.name}: llama.cpp {gone} while loading") from None
        if kind == "error":
            child.kill()
            raise value
        self._child = child
        return child

    def _run(self, prompt: Prompt, samplings: Sequence[Sampling], enough: Enough, cancel: threading.Event
             ) -> list[Generation]:  # fmt: skip
        if self.off_reason is not None:
            raise TierOff(f"local model {self.name} is off: {self.off_reason}")
        child = self._ensure_child()
        child.cancel.clear()
        try:
            return self._exchange(child, prompt, samplings, enough, cancel)
        except _ChildGone as gone:
            self._child = None
            child.kill()
            self._crashed(f"llama.cpp {gone} while answering")
            raise Crashed(f"local model {self.name}: llama.cpp {gone} while answering") from None

    def _exchange(self, child: _Child, prompt: Prompt, samplings: Sequence[Sampling], enough: Enough,
                  cancel: threading.Event) -> list[Generation]:  # fmt: skip
        child.send(("generate", prompt, list(samplings)))
        out: list[Generation] = []
        error: LocalModelError | None = None
        while True:
            kind, value = child.receive(cancel, ANSWER_TIMEOUT_S)
            if kind == "done":
                break
            if kind == "error":
                error = value
                continue  # "done" follows
            out.append(value)
            more = len(out) < len(samplings) and not (enough is not None and enough(out))
            child.send("more" if more else "stop")
        if error is not None:
            raise error
        return out

    def _crashed(self, how: str) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        recent = [t for t in self._crashes if now - t <= CRASH_WINDOW_S]
        if len(recent) >= MAX_CRASHES:
            self.off_reason = f"{how}, {len(recent)} times in {CRASH_WINDOW_S:g} s"
            log.error("local model %s is OFF until restart: %s", self.name, self.off_reason)
        else:
            log.error("local model %s: %s; a new child process takes the next request", self.name, how)

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
        super().close()


def _serve(conn: Connection, cancel: Any, name: str, config: LocalModelConfig, path: Path) -> None:
    """The child: load the model, then answer jobs until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    try:
        engine = LlamaEngine(name, config, path)
    except LoadFailed as exc:
        conn.send(("error", exc))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        _, prompt, samplings = message
        for sampling in samplings:
            try:
                conn.send(("generation", engine.generate(prompt, sampling, cancel.is_set)))
            except LocalModelError as exc:
                conn.send(("error", exc))
                break
            if conn.recv() != "more":
                break
        conn.send(("done", None))
