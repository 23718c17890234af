"""Local-model and cascade settings: bad configuration stops the start with the setting named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.config import Settings

CLI = [sys.executable, "-m", "proxy.cli"]


def test_defaults_route_auto_through_both_packaged_models() -> None:
    settings = Settings()
    assert settings.used_local_models() == ["smollm2", "gemma3"]
    assert settings.cascade_policy().routes == {"cachecade/auto": ["smollm2", "gemma3", "upstream"]}


def test_user_gguf_path(tmp_path: Path) -> None:
    fake = tmp_path / "mine.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 16)
    settings = Settings(local_models={"mine": {"path": str(fake), "prompt": "few-shot"}},
                        cascade_routes={"cachecade/auto": ["mine", "upstream"]})  # fmt: skip
    assert settings.used_local_models() == ["mine"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"local_models": {"mine": {"path": "/nope/x.gguf"}}, "cascade_routes": {"a": ["mine"]}},
            "local_models['mine']",
        ),
        ({"cascade_routes": {"a": ["llama9"]}}, "names local model 'llama9', which is not configured"),
        ({"cascade_thresholds": {"smollm2": 1.5}}, "a confidence is in [0, 1]"),
        ({"local_models": {"x": {"path": "smollm2", "prompt": "chatml"}}}, "prompt"),
    ],
)
def test_bad_local_config_names_the_problem(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises((ValidationError, ValueError)) as info:
        Settings(**overrides)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    with pytest.raises(ValidationError, match="not a GGUF file"):
        Settings(local_models={"m": {"path": str(bad)}}, cascade_routes={"a": ["m"]})


def test_serve_stops_with_a_clear_message_on_a_bad_model_path(tmp_path: Path) -> None:
    env = {"CACHECADE_LOCAL_MODELS": '{"mine": {"path": "/nope/model.gguf"}}',
           "CACHECADE_CASCADE_ROUTES": '{"cachecade/auto": ["mine"]}',
           "CACHECADE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}  # fmt: skip
    result = subprocess.run([*CLI, "serve", "--port", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "/nope/model.gguf is not a file" in result.stderr and "Traceback" not in result.stderr
