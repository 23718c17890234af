"""POST /v1/responses through the official openai client (in-process, over ASGI, so the SDK's own types parse every
object and event), bridged to an upstream that speaks only chat completions: the same tiers and the same cache as a
chat request, conversation state, function tools, streams, bad input, and the pass-through to an upstream that
speaks the Responses API itself. tests/e2e/test_responses_e2e.py runs the same against real servers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.proxy.conftest import FakeUpstream, chat, chat_response, sse_body, words

Q = "What is the capital of France?"
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
          "response.output_text.delta", "response.output_text.done", "response.content_part.done",
          "response.output_item.done", "response.completed"]  # fmt: skip


KEY_A = {"authorization": "Bearer sk-test-a"}


def sdk(client: httpx.AsyncClient, key: str = "sk-test-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://cachecade.test/v1", api_key=key, http_client=client, max_retries=0)


def upstream_chat_bodies(upstream: FakeUpstream) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in upstream.requests if r.url.path.endswith("/chat/completions")]


async def test_a_response_is_answered_through_the_chat_pipeline(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes={}) as client:
        raw = await sdk(client).responses.with_raw_response.create(
            model="up-model", input=Q, instructions="Answer briefly.", max_output_tokens=50, temperature=0.2,
            metadata={"team": "a"},
        )  # fmt: skip
        response = raw.parse()
    assert raw.headers["x-cache"] == "MISS" and raw.headers["x-served-by"] == "upstream:up-model"
    assert response.output_text == upstream.answer and response.status == "completed"
    assert response.id.startswith("resp_") and response.metadata == {"team": "a"}
    assert response.usage is not None and response.usage.input_tokens == 11 and response.usage.output_tokens == 7
    sent = upstream_chat_bodies(upstream)[0]
    assert sent["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2
    assert not {"input", "instructions", "max_output_tokens", "metadata", "store"} & set(sent)


async def test_an_answer_stored_through_one_api_serves_the_other(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes={}) as client:
        await client.post("/v1/chat/completions", json=chat(Q), headers=KEY_A)
        via_responses = await sdk(client).responses.with_raw_response.create(model="up-model", input=Q)
        items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Is it sunny?"}]}]
        first = await sdk(client).responses.with_raw_response.create(model="up-model", input=items)  # type: ignore[arg-type]
        via_chat = await client.post("/v1/chat/completions", json=chat("Is it sunny?"), headers=KEY_A)
    assert via_responses.headers["x-cache"] == "HIT-EXACT"
    assert via_responses.parse().output_text == upstream.answer
    assert first.headers["x-cache"] == "MISS" and via_chat.headers["x-cache"] == "HIT-EXACT"
    assert len(upstream_chat_bodies(upstream)) == 2


async def test_a_streamed_response_has_the_full_event_sequence_and_replays_from_the_cache(  # type: ignore[no-untyped-def]
    make_client, upstream: FakeUpstream
) -> None:
    async with make_client(cascade_routes={}) as client:
        runs = []
        for _ in range(2):
            stream = await sdk(client).responses.create(model="up-model", input=Q, stream=True)
            runs.append([event async for event in stream])
        hit = await client.post("/v1/responses", json={"model": "up-model", "input": Q, "stream": True}, headers=KEY_A)
    for events in runs:
        kinds = [e.type for e in events]
        assert [k for k in EVENTS if k in kinds] == EVENTS and kinds[0] == "response.created"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == upstream.answer
        assert events[-1].response.output_text == upstream.answer  # type: ignore[union-attr]
    assert hit.headers["x-cache"] == "HIT-EXACT" and len(upstream_chat_bodies(upstream)) == 1


async def test_previous_response_id_continues_the_conversation_per_key(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes={}) as client:
        first = await sdk(client).responses.create(model="up-model", input=Q)
        upstream.answer = "About 2.1 million people."
        second = await sdk(client).responses.create(model="up-model", input="And its population?",
                                                    previous_response_id=first.id)  # fmt: skip
        again = await client.post("/v1/chat/completions", json=chat("And its population?"), headers=KEY_A)
        with pytest.raises(openai.NotFoundError) as other_key:
            await sdk(client, "sk-test-b").responses.create(model="up-model", input="x", previous_response_id=first.id)
        fetched = await sdk(client).responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk(client, "sk-test-b").responses.retrieve(first.id)
        await sdk(client).responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk(client).responses.retrieve(first.id)
    sent = upstream_chat_bodies(upstream)[1]
    assert sent["messages"] == [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris is the capital "
                                "of France."}, {"role": "user", "content": "And its population?"}]  # fmt: skip
    assert second.output_text == "About 2.1 million people." and second.previous_response_id == first.id
    assert again.headers["x-cache"] == "MISS"  # cached under the whole conversation, never its last turn alone
    assert other_key.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert fetched.id == first.id and fetched.output_text == "Paris is the capital of France."


def tool_upstream(request: httpx.Request) -> httpx.Response:
    """Calls get_weather while no tool answer is in the conversation, then answers with what the tool said."""
    body = json.loads(request.content)
    tool_turns = [m for m in body["messages"] if m["role"] == "tool"]
    if not tool_turns:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
        answer = chat_response("", finish="tool_calls")
        answer["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx.Response(200, json=answer)
    return httpx.Response(200, json=chat_response(f"The weather is {tool_turns[0]['content']}."))


async def test_a_function_tool_round_trip(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}}]  # fmt: skip
    upstream.handler = tool_upstream
    async with make_client(cascade_routes={}) as client:
        first = await sdk(client).responses.create(model="up-model", input="Weather in Paris?", tools=tools)  # type: ignore[arg-type]
        call = first.output[0]
        assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)
        second = await sdk(client).responses.create(
            model="up-model", previous_response_id=first.id, tools=tools,  # type: ignore[arg-type]
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )  # fmt: skip
    assert second.output_text == "The weather is sunny."
    sent = upstream_chat_bodies(upstream)
    assert sent[0]["tools"][0] == {"type": "function", "function": {k: v for k, v in tools[0].items() if k != "type"}}
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "tool"]
    assert sent[1]["messages"][1]["tool_calls"][0]["id"] == call.call_id == "call_1"


async def test_json_schema_output_is_sent_as_response_format(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.answer = '{"city": "Paris"}'
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    text = {"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}
    async with make_client(cascade_routes={}) as client:
        response = await sdk(client).responses.create(model="up-model", input=Q, text=text)  # type: ignore[arg-type]
    assert json.loads(response.output_text) == {"city": "Paris"} and response.text.format.type == "json_schema"  # type: ignore[union-attr]
    sent = upstream_chat_bodies(upstream)[0]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                              "strict": True}}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "m", "input": 123}, 400, "input"),
        ({"model": "m", "input": [{"type": "message", "role": "wizard", "content": "x"}]}, 400, "input.0.role"),
        ({"model": "m", "input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, 400, "input.0.type"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, 400, "tools.0.name"),
        ({"model": "m", "input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}}, 400, "tool_choice"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            400,
            "input.0.content.0.file_id",
        ),
    ],
)
async def test_bad_input_names_the_parameter(make_client, upstream: FakeUpstream, body: dict, status: int,  # type: ignore[no-untyped-def]
                                             param: str) -> None:  # fmt: skip
    upstream.handler = lambda request: httpx.Response(404, json={"error": {"message": "no such route"}})
    async with make_client(cascade_routes={}) as client:
        r = await client.post("/v1/responses", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert upstream_chat_bodies(upstream) == []


async def test_an_incomplete_upstream_stream_fails_the_response_and_is_not_cached(  # type: ignore[no-untyped-def]
    make_client, upstream: FakeUpstream
) -> None:
    cut = sse_body(words(upstream.answer), done=False)
    upstream.handler = lambda request: httpx.Response(200, content=cut, headers={"content-type": "text/event-stream"})
    async with make_client(cascade_routes={}) as client:
        stream = await sdk(client).responses.create(model="up-model", input=Q, stream=True)
        events = [event async for event in stream]
        upstream.handler = None
        again = await client.post("/v1/responses", json={"model": "up-model", "input": Q}, headers=KEY_A)
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert again.headers["x-cache"] == "MISS"


async def test_requests_the_bridge_cannot_express_pass_through_to_an_upstream_that_speaks_responses(  # type: ignore[no-untyped-def]
    make_client, upstream: FakeUpstream
) -> None:
    native = {"id": "resp_up", "object": "response", "created_at": 1, "status": "completed", "model": "up-model",
              "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/responses"):
            body = json.loads(request.content)
            return httpx.Response(200, json=native) if body else httpx.Response(400, json={"error": {"message": "x"}})
        return httpx.Response(200, json=chat_response(upstream.answer))

    upstream.handler = handler
    async with make_client(cascade_routes={}) as client:
        searched = await client.post("/v1/responses", json={"model": "up-model", "input": "news?",
                                                            "tools": [{"type": "web_search"}]})  # fmt: skip
        plain = await client.post("/v1/responses", json={"model": "up-model", "input": Q})
    assert searched.status_code == 200 and searched.json()["id"] == "resp_up"
    assert searched.headers["x-cache-bypass-reason"] == "responses-native"
    passed = [json.loads(r.content) for r in upstream.requests if r.url.path.endswith("/responses")]
    assert passed[0] == {} and passed[1]["tools"] == [{"type": "web_search"}]  # the probe, then the request as sent
    assert plain.headers["x-cache"] == "MISS" and plain.json()["output"][0]["content"][0]["text"] == upstream.answer


async def test_a_conversation_continues_on_another_replica(make_replica, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    """On Redis a stored response is written before its answer is sent: the next turn may reach any replica."""
    async with make_replica("a") as a, make_replica("b") as b:
        first = await sdk(a).responses.create(model="up-model", input=Q)
        second = await sdk(b).responses.create(model="up-model", input="And Spain?", previous_response_id=first.id)
        fetched = await sdk(b).responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk(b, "sk-test-b").responses.retrieve(first.id)
    assert second.previous_response_id == first.id and fetched.output_text == first.output_text
    assert [m["role"] for m in upstream_chat_bodies(upstream)[1]["messages"]] == ["user", "assistant", "user"]


def sse(events: list[dict[str, Any]], done: bool = True) -> httpx.Response:
    head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    body = b"".join(b"data: " + json.dumps({**head, **e}).encode() + b"\n\n" for e in events)
    return httpx.Response(200, content=body + (b"data: [DONE]\n\n" if done else b""),
                          headers={"content-type": "text/event-stream"})  # fmt: skip


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


async def test_a_streamed_tool_call_after_text_closes_the_text_first_and_names_the_call(  # type: ignore[no-untyped-def]
    make_client, upstream: FakeUpstream
) -> None:
    """Text, then a tool call whose name and id arrive in a later chunk, then an unknown delta field (annotations):
    the message item is done before the call is added, the call ends with its name and id, and the stream completes."""
    upstream.handler = lambda request: sse([
        delta(role="assistant", content="Let me look."),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        delta(tool_calls=[{"index": 0, "id": "call_9", "type": "function",
                           "function": {"name": "get_weather", "arguments": '"Oslo"}'}}]),
        delta(annotations=[]),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ])  # fmt: skip
    async with make_client(cascade_routes={}) as client:
        stream = await sdk(client).responses.create(model="up-model", input="Weather?", stream=True)
        events = [event async for event in stream]
    kinds = [(e.type, getattr(e, "output_index", None)) for e in events]
    assert kinds.index(("response.output_item.done", 0)) < kinds.index(("response.output_item.added", 1))
    final = events[-1].response  # type: ignore[union-attr]
    assert events[-1].type == "response.completed"
    call = final.output[1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id == "call_9"
    assert json.loads(call.arguments) == {"city": "Oslo"} and final.output[0].content[0].text == "Let me look."


async def test_a_cut_answer_is_incomplete_and_objects_validate_against_the_sdk(  # type: ignore[no-untyped-def]
    make_client, upstream: FakeUpstream
) -> None:
    from openai.types.responses import Response

    upstream.handler = lambda request: httpx.Response(200, json=chat_response("Paris is", finish="length"))
    async with make_client(cascade_routes={}) as client:
        r = await client.post("/v1/responses", json={"model": "up-model", "input": Q, "max_output_tokens": 2})
    response = Response.model_validate(r.json())  # every required field, strictly typed
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.input_tokens == 11
