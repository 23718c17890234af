"""Cascade policy: routes, tiers, validation, and the gate."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from local_models.cascade import CascadePolicy, Tier, judge
from local_models.confidence import assess
from local_models.engine import Generation


def test_routes() -> None:
    policy = CascadePolicy(routes={"cachecade/auto": ["smollm2", "gemma3", "upstream:gpt-4o-mini"],
                                   "gpt-4o": ["smollm2", "upstream"]})  # fmt: skip
    assert policy.route_for("cachecade/auto", True) == [
        Tier("smollm2", True),
        Tier("gemma3", True),
        Tier("upstream", False, "gpt-4o-mini"),
    ]
    assert policy.route_for("gpt-4o", True) == [Tier("smollm2", True), Tier("upstream", False, "gpt-4o")]
    assert policy.route_for("other", True) is None  # no route: straight to the upstream
    assert policy.route_for("other", False) == [Tier("smollm2", True), Tier("gemma3", True)]  # embedded default
    assert CascadePolicy(local_without_upstream=False).route_for("other", False) is None
    assert CascadePolicy(upstream_model="m").route_for("cachecade/auto", True)[-1] == Tier("upstream", False, "m")


def test_bad_policies_name_the_field() -> None:
    with pytest.raises(ValidationError, match="thresholds"):
        CascadePolicy(thresholds={"smollm2": 1.5})
    with pytest.raises(ValidationError, match="samples"):
        CascadePolicy(samples={"smollm2": 0})
    with pytest.raises(ValidationError, match="empty"):
        CascadePolicy(routes={"x": []})
    with pytest.raises(ValueError, match="'nope', which is not configured"):
        CascadePolicy(routes={"cachecade/auto": ["nope"]}).check_models({"smollm2"})


def test_gate() -> None:
    sure = Generation("Paris", [math.log(0.95)] * 3, "stop", 5, 0.1)
    assert judge(sure, assess(sure), 0.9).accepted
    assert judge(sure, assess(sure), 0.96).reason == "low-confidence"
    assert judge(sure, assess(sure), 0.5, min_token_prob=0.99).reason == "low-confidence"
    cut = Generation("Paris is", [math.log(0.95)] * 3, "length", 5, 0.1)
    assert judge(cut, assess(cut), 0.0).reason == "length"
    empty = Generation("  ", [math.log(0.99)], "stop", 5, 0.1)
    assert judge(empty, assess(empty), 0.0).reason == "empty"
