"""The start-up self-check: a test generation in a child process, whose crash turns a tier off instead of killing
the proxy. Children that die on purpose stand for a llama.cpp build the CPU cannot run; the passing case runs
the real packaged model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from local_models import selfcheck
from local_models.registry import smollm2_gguf


def child(code: str) -> tuple[str, ...]:
    """A child command that runs `code` instead of the model (it gets the same MODEL THREADS arguments)."""
    return (sys.executable, "-c", code)


async def test_the_packaged_model_passes_in_a_child() -> None:
    result = await selfcheck.check(smollm2_gguf(), 2)
    assert result.ok and not result.crashed, result.detail
    assert "CPU" in result.system_info  # llama.cpp's own account of the features it was built with


@pytest.mark.parametrize(
    ("signal_name", "words"),
    [("SIGILL", "illegal instruction"), ("SIGSEGV", "segmentation fault"), ("SIGABRT", "aborted")],
)
async def test_a_child_killed_by_a_signal_is_a_crash(signal_name: str, words: str) -> None:
    code = f"import os, signal; os.kill(os.getpid(), signal.{signal_name})"
    result = await selfcheck.check(Path("model.gguf"), 2, child=child(code))
    assert not result.ok and result.crashed
    assert result.detail == f"llama.cpp died with {signal_name} ({words}) in a test generation"


async def test_a_hung_child_is_killed_and_counts_as_a_crash() -> None:
    result = await selfcheck.check(Path("model.gguf"), 2, timeout_s=0.5, child=child("import time; time.sleep(30)"))
    assert result.crashed and "did not finish in 0.5 s" in result.detail


async def test_an_ordinary_error_is_not_a_crash() -> None:
    code = "import sys; print('bad magic', file=sys.stderr); sys.exit(1)"
    result = await selfcheck.check(Path("model.gguf"), 2, child=child(code))
    assert not result.ok and not result.crashed
    assert result.detail == "the test generation exited with 1: bad magic"


async def test_check_all_turns_off_only_the_models_that_crashed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The child sees the model path as argv[1]: only "bad.gguf" dies.
    code = "import os, signal, sys; sys.argv[1] == 'bad.gguf' and os.kill(os.getpid(), signal.SIGILL); print('{}')"
    monkeypatch.setattr(selfcheck, "CHILD", child(code))
    with caplog.at_level(logging.INFO, logger="cachecade.local"):
        off = await selfcheck.check_all({"good": (Path("good.gguf"), 2), "bad": (Path("bad.gguf"), 2)})
    assert off == {"bad": "llama.cpp died with SIGILL (illegal instruction) in a test generation"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "local model bad is OFF" in errors[0] and "make reinstall-llama" in errors[0]


def test_the_child_needs_two_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert selfcheck.main(["only-one"]) == 2
    assert "usage" in capsys.readouterr().err
