"""Settings: one pydantic-settings class. Environment variables prefixed CACHECADE_, then an optional YAML file.

Precedence, highest first: arguments to Settings(...), environment variables, the YAML file, the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from cache.policy import CachePolicy
from cache.verifier_model import VerifierMeta
from local_models.cascade import DEFAULT_ROUTE, DEFAULT_THRESHOLDS, UPSTREAM, CascadePolicy
from local_models.registry import LocalModelConfig, ModelNotFound, default_local_models
from proxy.budget import BudgetPolicy, KeyLimits

# The shipped default threshold, chosen with `cachecade calibrate` on QQP (docs/calibration.md).
DEFAULT_THRESHOLD = 0.95


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "cachecade"


class Settings(BaseSettings):
    """Every setting of a cachecade process. Invalid values stop the start with the setting named."""

    model_config = SettingsConfigDict(env_prefix="CACHECADE_", extra="forbid", validate_default=True)

    config_file: Path | None = Field(None, description="YAML file with any of these settings (lower case)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=1, le=65535, description="port to bind")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line, with request_id")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests (streams) may take to finish"
    )

    upstream_base_url: AnyHttpUrl | None = Field(
        None, description="OpenAI-compatible backend for misses, e.g. https://api.openai.com/v1"
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="key sent upstream; when unset the caller's Authorization header is passed through"
    )
    upstream_timeout_s: float = Field(300.0, gt=0, description="read timeout for upstream answers")
    responses_mode: Literal["auto", "native", "bridge"] = Field(
        "auto",
        description="POST /v1/responses: bridge answers every request through the chat pipeline (the upstream's "
        "chat completions); native passes requests the bridge cannot express (built-in tools, file inputs, an "
        "upstream's own response ids) through to the upstream's /responses; auto asks the upstream once whether it "
        "speaks the Responses API and remembers",
    )
    responses_ttl_s: float = Field(30 * 24 * 3600.0, gt=0, description="how long a stored response (store: true) "
                                   "can be continued (previous_response_id) and read back")  # fmt: skip
    upstream_connect_timeout_s: float = Field(5.0, gt=0)
    upstream_max_connections: int = Field(100, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above, "
                                "refused while it is read)")  # fmt: skip
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this (408 after)")
    max_prompt_tokens: int | None = Field(131_072, ge=1, description="longest prompt accepted, in tokens (400 "
                                          "above; unset: no limit)")  # fmt: skip

    admin_token: SecretStr | None = Field(
        None, description="bearer token of the /admin API (at least 16 characters); unset = admin disabled"
    )
    data_dir: Path = Field(default_factory=_default_data_dir, description="embedded store location")
    model_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "cachecade",
        description="where derived model files (the embedder's ONNX export) are kept",
    )
    redis_url: str | None = Field(
        None, description="shared store for every replica, e.g. redis://redis:6379/0 (unset: SQLite in data_dir)"
    )
    redis_cluster: bool = Field(False, description="redis_url names a node of a Redis Cluster")
    redis_prefix: str = Field("cachecade:", min_length=1, max_length=64, description="prefix of every Redis key")
    redis_timeout_s: float = Field(
        0.5, gt=0, le=30, description="Redis connect/read timeout: past it a request fails open, not slow"
    )

    embedder: str = Field("all-MiniLM-L6-v2", description="packaged embedder name or local model directory")
    embedder_backend: Literal["onnx", "onnx-int8", "torch"] = Field(
        "onnx",
        description="onnx: same weights on ONNX Runtime, ~4x faster here; onnx-int8: those weights quantised to "
        "int8, ~1.5x faster again, slightly different vectors (own cache index; docs/compression.md); torch: "
        "sentence-transformers",
    )
    embedder_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="threads for one embedding (onnx backends); unset: the fastest measured on a "
        "2-core sidecar, 2 for onnx and 1 for onnx-int8",
    )
    ivf_threshold: int = Field(
        50_000, ge=1, description="partition size past which search uses an IVF index instead of exact search"
    )
    ivf_nprobe: int = Field(
        16, ge=1, le=4096, description="IVF cells searched per lookup (more: better recall, slower)"
    )
    share_cache_across_tenants: bool = Field(
        False, description="serve one API key's cached answers to another (off: tenants are isolated)"
    )

    cache_exact_enabled: bool = True
    cache_semantic_enabled: bool = True
    cache_threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0, description="cosine similarity in [0, 1]")
    cache_model_thresholds: dict[str, float] = Field(default_factory=dict)
    cache_namespace_thresholds: dict[str, float] = Field(default_factory=dict)
    cache_ttl_s: float | None = Field(7 * 24 * 3600.0, gt=0, description="absolute entry lifetime")
    cache_max_entries: int | None = Field(100_000, ge=1, description="LRU eviction past this many entries")
    cache_max_temperature: float = Field(1.0, ge=0.0, le=2.0, description="requests above are not cached")
    cache_tool_calls: bool = Field(False, description="cache answers to requests that offer tools")
    cache_verifier: str = Field(
        "default",
        description="the pair model that checks semantic candidates: 'default' (shipped), an artifact "
        "folder made by `cachecade train-verifier`, or 'off' (cosine threshold alone)",
    )
    cache_max_error: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="the error rate semantic hits and accepted local answers must stay under: thresholds and "
        "local gates move with the labels from traffic to hold it (unset: they do not move)",
    )  # fmt: skip
    cache_namespace_max_error: dict[str, float] = Field(
        default_factory=dict, description="the same per namespace (JSON object)"
    )
    learn_min_labels: int = Field(30, ge=1, description="labels that must back a threshold before it loosens")
    cascade_router: bool = Field(True, description="skip a local tier when its answers to the nearest earlier "
                                 "queries did not pass (proxy/router.py)")  # fmt: skip
    cascade_router_min_tries: int = Field(30, ge=1, description="answers a tier must have given before the router "
                                          "may skip it")  # fmt: skip
    cascade_router_max_pass_rate: float = Field(0.1, ge=0.0, le=1.0, description="skip a tier when the router's "
                                                "estimate that its answer passes is under this")  # fmt: skip
    cascade_router_min_similarity: float = Field(0.5, ge=-1.0, le=1.0, description="cosine from which a "
                                                 "remembered query counts as the query's neighbour")  # fmt: skip
    learn_seed: int | None = Field(None, description="seed of the shadow-check sampling and the router's "
                                   "exploration (unset: random), for reproducible runs")  # fmt: skip
    cascade_router_explore: float = Field(0.05, ge=0.0, le=1.0, description="share of the router's skips tried "
                                          "anyway, to learn when a tier starts to pass")  # fmt: skip
    cache_shadow_share: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of semantic hits and accepted local answers also asked of the upstream after the "
        "response, to label them (0: none)",
    )  # fmt: skip
    cache_shadow_max_share: float = Field(0.1, ge=0.0, le=1.0, description="shadow calls: at most this share of "
                                          "the upstream calls")  # fmt: skip
    cache_shadow_daily_tokens: int = Field(100_000, ge=0, description="shadow calls: upstream tokens a day (UTC)")
    learn_served_ttl_s: float = Field(
        86400.0, ge=0.0,
        description="how long what answered a request is kept for feedback (POST /v1/feedback); 0: not kept",
    )  # fmt: skip
    cache_verifier_backend: Literal["onnx-int8", "onnx"] = Field(
        "onnx-int8",
        description="how the verifier runs: int8 weights with the artifact's int8 calibration (about 2x faster; "
        "fp32 when the artifact has no int8 calibration) or fp32",
    )
    cache_verifier_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="probability the verifier needs to serve a candidate (unset: the artifact's calibrated default)",
    )
    cache_verifier_band_low: float | None = Field(
        None, ge=0.0, le=1.0, description="cosine from which candidates are verified (unset: the artifact's)"
    )

    local_models: dict[str, LocalModelConfig] = Field(
        default_factory=default_local_models,
        description='local GGUF models by name: {"name": {"path": "smollm2" | "gemma3" | "/x.gguf", "prompt": '
        '"chat" | "few-shot", "n_ctx", "threads", "max_queue"}}',
    )
    cascade_routes: dict[str, list[str]] = Field(
        default_factory=lambda: {DEFAULT_ROUTE: ["smollm2", "gemma3", UPSTREAM]},
        description="requested model -> tiers (local model names, 'upstream', 'upstream:<model>')",
    )
    cascade_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS), description="per local model: gate score in [0, 1]"
    )
    cascade_min_token_prob: dict[str, float] = Field(default_factory=dict, description="per local model, [0, 1]")
    cascade_samples: dict[str, int] = Field(default_factory=dict, description="per local model: self-consistency k")
    cascade_upstream_model: str | None = Field(None, description="model a plain 'upstream' tier sends upstream")
    cascade_cache_local_answers: bool = Field(True, description="store local answers that passed the gate")
    cascade_local_without_upstream: bool = Field(
        True, description="with no upstream configured, answer every model through the default route"
    )
    cascade_default_route: str = DEFAULT_ROUTE
    local_max_tokens: int = Field(256, ge=1, le=32768, description="local answer cap when the client sets none")
    local_isolation: bool = Field(
        True,
        description="run each local model in a child process: a llama.cpp crash fails one request (it "
        "escalates), not the proxy; false: in the proxy's process (about 0.2 ms less per request)",
    )
    local_self_check: bool = Field(
        True,
        description="before serving, generate a few tokens per local model in a child process; a model whose "
        "check crashes (a llama.cpp build this CPU cannot run) starts off instead of taking the proxy down",
    )
    local_self_check_timeout_s: float = Field(120.0, gt=0, description="a self-check still running then counts as "
                                              "crashed")  # fmt: skip

    key_limits: dict[str, KeyLimits] = Field(
        default_factory=dict,
        description='per key id (`cachecade key-id KEY`): {"k-...": {"tokens_per_minute", "tokens_per_day", '
        '"tokens_per_month", "requests_per_minute"}}',
    )
    default_key_tokens_per_minute: int | None = Field(None, ge=1, description="for keys without their own limits")
    default_key_tokens_per_day: int | None = Field(
        None, ge=1, description="for keys without their own; unset = no limit"
    )
    default_key_tokens_per_month: int | None = Field(None, ge=1)
    default_key_requests_per_minute: int | None = Field(None, ge=1)
    budget_clamp_factor: float | None = Field(
        None, gt=0, description="max_tokens <= factor x the estimated answer length (never above the client's)"
    )
    budget_clamp_min_tokens: int = Field(16, ge=1, description="the clamp never goes below this")
    budget_default_max_tokens: int = Field(
        4096, ge=1, description="answer cap (and reservation) of a limited key's request without max_tokens"
    )
    budget_hint_routes: list[str] = Field(
        default_factory=list, description="requested models whose prompts state the token budget (TALE); off"
    )

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("CACHECADE_ADMIN_TOKEN must be at least 16 characters (or unset to disable admin)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("CACHECADE_REDIS_URL must start with redis://, rediss:// or unix://")
        return value or None

    @model_validator(mode="after")
    def _valid_policy(self) -> Settings:
        self.cache_policy()  # validates the per-model / per-namespace thresholds
        self.budget_policy()  # validates the key ids
        self.cascade_policy().check_models(self.local_models)
        for name in self.used_local_models():
            try:
                self.local_models[name].check()
            except ModelNotFound as exc:
                raise ValueError(f"local_models[{name!r}]: {exc}") from None
        return self

    def cascade_policy(self) -> CascadePolicy:
        """The initial run-time cascade policy."""
        return CascadePolicy(
            routes=self.cascade_routes,
            thresholds=self.cascade_thresholds,
            min_token_prob=self.cascade_min_token_prob,
            samples=self.cascade_samples,
            upstream_model=self.cascade_upstream_model,
            cache_local_answers=self.cascade_cache_local_answers,
            local_without_upstream=self.cascade_local_without_upstream,
            default_route=self.cascade_default_route,
            max_tokens=self.local_max_tokens,
        )

    def budget_policy(self) -> BudgetPolicy:
        """The initial run-time budget policy."""
        default = KeyLimits(
            tokens_per_minute=self.default_key_tokens_per_minute, tokens_per_day=self.default_key_tokens_per_day,
            tokens_per_month=self.default_key_tokens_per_month,
            requests_per_minute=self.default_key_requests_per_minute,
        )  # fmt: skip
        return BudgetPolicy(
            keys=self.key_limits, default=default, clamp_factor=self.budget_clamp_factor,
            clamp_min_tokens=self.budget_clamp_min_tokens, default_max_tokens=self.budget_default_max_tokens,
            hint_routes=self.budget_hint_routes,
        )  # fmt: skip

    def used_local_models(self) -> list[str]:
        """The local models some route (or the embedded default) needs: only these are loaded."""
        policy = self.cascade_policy()
        names = policy.local_names()
        return [n for n in self.local_models if n in names]

    def cache_policy(self, verifier: VerifierMeta | None = None) -> CachePolicy:
        """The initial run-time cache policy (the verifier's fields from its artifact unless set here)."""
        defaults = verifier or VerifierMeta()
        return CachePolicy(
            verifier_enabled=verifier is not None,
            verifier_threshold=self.cache_verifier_threshold
            if self.cache_verifier_threshold is not None
            else defaults.threshold,
            verifier_band_low=self.cache_verifier_band_low
            if self.cache_verifier_band_low is not None
            else defaults.band_low,
            exact_enabled=self.cache_exact_enabled,
            semantic_enabled=self.cache_semantic_enabled,
            threshold=self.cache_threshold,
            model_thresholds=self.cache_model_thresholds,
            namespace_thresholds=self.cache_namespace_thresholds,
            ttl_s=self.cache_ttl_s,
            max_entries=self.cache_max_entries,
            max_temperature=self.cache_max_temperature,
            cache_tool_calls=self.cache_tool_calls,
            max_error=self.cache_max_error,
            namespace_max_error=self.cache_namespace_max_error,
            learn_min_labels=self.learn_min_labels,
            shadow_share=self.cache_shadow_share,
            shadow_max_share=self.cache_shadow_max_share,
            shadow_daily_tokens=self.cache_shadow_daily_tokens,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file(init_settings, env_settings)
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def _config_file(*sources: PydanticBaseSettingsSource) -> Path | None:
    for source in sources:
        value: Any = source().get("config_file")
        if value:
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            return path
    return None
