"""Settings: environment, YAML file, precedence, clear errors at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.config import DEFAULT_THRESHOLD, Settings


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.admin_token is None and s.upstream_base_url is None and s.redis_url is None
    assert s.host == "127.0.0.1" and s.cache_threshold == DEFAULT_THRESHOLD
    assert not s.share_cache_across_tenants


def test_environment_and_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "cachecade.yaml"
    config.write_text("cache_threshold: 0.9\nport: 9000\ncache_model_thresholds:\n  gpt-4o: 0.97\n")
    monkeypatch.setenv("CACHECADE_PORT", "9100")
    monkeypatch.setenv("CACHECADE_UPSTREAM_BASE_URL", "http://localhost:1234/v1")
    s = Settings(config_file=config)
    assert s.cache_threshold == 0.9 and s.cache_model_thresholds == {"gpt-4o": 0.97}
    assert s.port == 9100, "the environment wins over the file"
    assert str(s.upstream_base_url) == "http://localhost:1234/v1"
    assert Settings(config_file=config, port=9200).port == 9200, "arguments win over both"
    monkeypatch.setenv("CACHECADE_CONFIG_FILE", str(config))
    assert Settings().cache_threshold == 0.9


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("cache_threshold", 1.5, "cache_threshold"),
        ("upstream_base_url", "not a url", "upstream_base_url"),
        ("admin_token", "short", "at least 16"),
        ("redis_url", "http://localhost:6379/0", "redis://"),
        ("cache_model_thresholds", {"m": 3}, "model_thresholds"),
        ("port", 0, "port"),
        ("no_such_setting", 1, "no_such_setting"),
    ],
)
def test_bad_values_name_the_setting(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert needle in str(err.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Settings(config_file=tmp_path / "missing.yaml")


def test_policy_from_settings() -> None:
    policy = Settings(cache_threshold=0.9, cache_namespace_thresholds={"docs": 0.97}).cache_policy()
    assert policy.threshold_for("any", "docs") == 0.97 and policy.threshold_for("any", "other") == 0.9
