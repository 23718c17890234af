"""Cache keys: canonical JSON, the exact key, the partition (context fingerprint) and the embedded text."""

from __future__ import annotations

from typing import Any

import pytest

from cache.keys import canonical_json, chat_key, completion_key


def chat(last: Any = "How can I learn Python quickly?", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": last},
        ],
        "temperature": 0,
    }
    body.update(extra)
    return body


def test_canonical_json_integral_floats_equal_ints() -> None:
    assert canonical_json({"t": 0.0, "n": [1.0, 2.5]}) == canonical_json({"t": 0, "n": [1, 2.5]})
    assert canonical_json({"t": 0.0}) == '{"t":0}'
    assert canonical_json(2.5) == "2.5"


def test_canonical_json_key_order_irrelevant() -> None:
    a = {"b": 1, "a": {"y": [1, {"q": 1, "p": 2}], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, {"p": 2, "q": 1}]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":"é","y":[1,{"p":2,"q":1}]},"b":1}'


def test_canonical_json_tuple_is_list() -> None:
    assert canonical_json((1, 2.0)) == canonical_json([1, 2]) == "[1,2]"


def test_same_request_same_keys() -> None:
    k1, k2 = chat_key(chat(), "t1", "ns"), chat_key(chat(), "t1", "ns")
    assert k1 == k2
    assert k1.kind == "chat"
    assert k1.model == "gpt-x"
    assert k1.text == "How can I learn Python quickly?"
    assert k1.exact != k1.partition
    assert len(k1.exact) == 64 and len(k1.partition) == 64


def test_temperature_float_vs_int_same_key() -> None:
    assert chat_key(chat(temperature=0.0), "t", "n") == chat_key(chat(temperature=0), "t", "n")


def test_paraphrase_of_last_turn_same_partition_other_exact() -> None:
    a = chat_key(chat("How can I learn Python quickly?"), "t", "n")
    b = chat_key(chat("What is the fastest way to learn Python?"), "t", "n")
    assert a.partition == b.partition
    assert a.exact != b.exact
    assert b.text == "What is the fastest way to learn Python?"


def _with_first_message(role: str, content: str) -> dict[str, Any]:
    body = chat()
    body["messages"] = [{"role": role, "content": content}, *body["messages"][1:]]
    return body


def _with_earlier_turn(content: str) -> dict[str, Any]:
    body = chat()
    body["messages"][1] = {"role": "user", "content": content}
    return body


@pytest.mark.parametrize(
    "other",
    [
        _with_first_message("system", "You are verbose."),
        _with_earlier_turn("Hey"),
        chat(model="gpt-y"),
        chat(temperature=0.7),
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        chat(response_format={"type": "json_object"}),
        chat(top_p=0.5),
    ],
    ids=["system", "earlier-turn", "model", "temperature", "tools", "response_format", "top_p"],
)
def test_context_changes_partition(other: dict[str, Any]) -> None:
    base = chat_key(chat(), "t", "n")
    changed = chat_key(other, "t", "n")
    assert changed.partition != base.partition
    assert changed.exact != base.exact
    assert changed.text == base.text


@pytest.mark.parametrize("tenant,namespace", [("t2", "n"), ("t", "n2")])
def test_tenant_and_namespace_isolate(tenant: str, namespace: str) -> None:
    base = chat_key(chat(), "t", "n")
    other = chat_key(chat(), tenant, namespace)
    assert other.partition != base.partition
    assert other.exact != base.exact
    assert (other.tenant, other.namespace) == (tenant, namespace)


def test_tenant_namespace_boundary_not_ambiguous() -> None:
    assert chat_key(chat(), "ab", "c").partition != chat_key(chat(), "a", "bc").partition


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True, "stream_options": {"include_usage": True}},
        {"max_tokens": 50},
        {"max_completion_tokens": 10},
        {"user": "alice"},
        {"cache": {"max_age": 10}},
        {"metadata": {"a": "b"}, "store": True},
    ],
)
def test_ignored_fields(extra: dict[str, Any]) -> None:
    assert chat_key(chat(**extra), "t", "n") == chat_key(chat(), "t", "n")


def test_content_string_equals_text_parts() -> None:
    as_string = chat_key(chat("line one\nline two"), "t", "n")
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    as_parts = chat_key(chat(parts), "t", "n")
    assert as_parts == as_string
    assert as_parts.text == "line one\nline two"


def test_image_part_is_not_text() -> None:
    parts = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]
    key = chat_key(chat(parts), "t", "n")
    assert key.text is None
    assert key.partition != chat_key(chat("what is this"), "t", "n").partition


def test_last_message_not_user_has_no_text() -> None:
    body = chat()
    body["messages"].append({"role": "assistant", "content": "Practice daily."})
    key = chat_key(body, "t", "n")
    assert key.text is None
    # with no embedded turn, the whole conversation is the partition
    body2 = chat()
    body2["messages"].append({"role": "assistant", "content": "Read a book."})
    assert chat_key(body2, "t", "n").partition != key.partition


def test_blank_last_user_turn_has_no_text() -> None:
    assert chat_key(chat("   "), "t", "n").text is None


def test_completion_key_string_and_single_item_list() -> None:
    body = {"model": "m", "prompt": "Once upon a time", "temperature": 0}
    a = completion_key(body, "t", "n")
    b = completion_key({**body, "prompt": ["Once upon a time"]}, "t", "n")
    assert a.kind == b.kind == "completion"
    assert a.text == b.text == "Once upon a time"
    assert a.partition == b.partition
    assert a.exact == b.exact  # "x" and ["x"] are the same request
    other = completion_key({**body, "prompt": "In a galaxy far away"}, "t", "n")
    assert other.partition == a.partition
    assert other.exact != a.exact


def test_completion_key_multi_prompt_has_no_text() -> None:
    key = completion_key({"model": "m", "prompt": ["a", "b"]}, "t", "n")
    assert key.text is None
    assert key.partition != completion_key({"model": "m", "prompt": ["a", "c"]}, "t", "n").partition


def test_chat_and_completion_never_share_partition() -> None:
    c = completion_key({"model": "gpt-x", "prompt": "hello"}, "t", "n")
    k = chat_key({"model": "gpt-x", "messages": [{"role": "user", "content": "hello"}]}, "t", "n")
    assert c.partition != k.partition
    assert c.exact != k.exact
