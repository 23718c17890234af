"""End to end, the Responses API: the official openai client and the OpenAI Agents SDK's default model class
(OpenAIResponsesModel) -> cachecade (uvicorn, real port) -> a real upstream that does not speak the Responses API
(llama-cpp-python's server on SmolLM2: bridged to its chat completions), and one that does
(tests/e2e/responses_upstream.py, standing in for OpenAI: built-in tools and its own ids pass through); LangChain's
ChatOpenAI with use_responses_api."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import agents
import httpx
import openai
import pytest

from local_models.processes import stop
from tests.conftest import served
from tests.e2e import responses_upstream
from tests.e2e.conftest import Proxy

pytestmark = pytest.mark.e2e
# Short, complete answers (a truncated one is never cached): greedy, and a newline ends the answer; `stop` is not a
# Responses field, so it passes through to the chat request.
GEN = {"model": "smollm2", "temperature": 0, "max_output_tokens": 48, "extra_body": {"stop": ["\n"]}}
Q = "How many legs does a spider have?"
agents.set_tracing_disabled(True)  # the SDK would send traces to OpenAI: no network beyond what is configured


@pytest.fixture(scope="module")
def bridged(start_proxy: Callable[..., Proxy], llama_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    return start_proxy(tmp_path_factory.mktemp("responses-bridge") / "data", upstream_base_url=llama_upstream)


@pytest.fixture(scope="module")
def scripted_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("scripted") / "upstream.log"
    with served(lambda: responses_upstream.start(log), stop) as url:
        yield url


@pytest.fixture(scope="module")
def native(start_proxy: Callable[..., Proxy], scripted_upstream: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Proxy:  # fmt: skip
    return start_proxy(tmp_path_factory.mktemp("responses-native") / "data", upstream_base_url=scripted_upstream)


def client(proxy: Proxy, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key=key or f"sk-test-{uuid.uuid4().hex}", max_retries=0)


def test_a_response_misses_then_hits(bridged: Proxy) -> None:
    c = client(bridged)
    miss = c.responses.with_raw_response.create(input=Q, **GEN)  # type: ignore[call-overload]
    hit = c.responses.with_raw_response.create(input=Q, **GEN)  # type: ignore[call-overload]
    assert miss.headers["x-cache"] == "MISS" and miss.headers["x-served-by"] == "upstream:smollm2"
    assert hit.headers["x-cache"] == "HIT-EXACT" and hit.headers["x-served-by"] == "cache"
    first, second = miss.parse(), hit.parse()
    assert first.output_text and second.output_text == first.output_text and second.id != first.id
    assert first.usage is not None and first.usage.output_tokens > 0


def test_chat_then_responses_and_back_share_the_cache(bridged: Proxy) -> None:
    c = client(bridged)
    messages = [{"role": "user", "content": "Name a primary colour."}]
    chat = c.chat.completions.create(messages=messages, model="smollm2", temperature=0, max_tokens=48, stop=["\n"])  # type: ignore[arg-type]
    via_responses = c.responses.with_raw_response.create(input="Name a primary colour.", **GEN)  # type: ignore[call-overload]
    assert via_responses.headers["x-cache"] == "HIT-EXACT"
    assert via_responses.parse().output_text == chat.choices[0].message.content
    c.responses.create(input="Name a season.", **GEN)  # type: ignore[call-overload]
    season = [{"role": "user", "content": "Name a season."}]
    back = c.chat.completions.with_raw_response.create(messages=season, model="smollm2", temperature=0,  # type: ignore[arg-type]
                                                       max_tokens=48, stop=["\n"])  # fmt: skip
    assert back.headers["x-cache"] == "HIT-EXACT"


def test_a_stream_and_its_replay_from_the_cache(bridged: Proxy) -> None:
    c = client(bridged)
    # No max_output_tokens: llama.cpp's server streams no usage, so a streamed answer's length is unknown and is
    # served only to callers without a token limit (as for chat completions).
    gen = {k: v for k, v in GEN.items() if k != "max_output_tokens"}
    runs = []
    for _ in range(2):
        with c.responses.create(input=Q, stream=True, **gen) as stream:  # type: ignore[call-overload]
            runs.append(list(stream))
    for events in runs:
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text and events[-1].response.output_text == text  # type: ignore[union-attr]
    assert runs[1][-1].response.output_text == runs[0][-1].response.output_text  # type: ignore[union-attr]
    body = {"input": Q, "stream": True, "model": "smollm2", "temperature": 0, "stop": ["\n"]}
    replay = httpx.post(f"{bridged.v1}/responses", json=body,
                        headers={"authorization": f"Bearer {c.api_key}"}, timeout=60)  # fmt: skip
    assert replay.headers["x-cache"] == "HIT-EXACT" and "event: response.completed" in replay.text


def test_previous_response_id_and_stored_responses(bridged: Proxy) -> None:
    c = client(bridged)
    first = c.responses.create(input="My name is Ada. Say hello.", **GEN)  # type: ignore[call-overload]
    second = c.responses.with_raw_response.create(input="What is my name?", previous_response_id=first.id, **GEN)  # type: ignore[call-overload]
    assert second.headers["x-cache"] == "MISS" and second.parse().previous_response_id == first.id
    alone = c.responses.with_raw_response.create(input="What is my name?", **GEN)  # type: ignore[call-overload]
    assert alone.headers["x-cache"] == "MISS"  # the continued one is cached under the whole conversation only
    assert c.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        client(bridged).responses.retrieve(first.id)  # another key
    with pytest.raises(openai.NotFoundError) as unknown:
        c.responses.create(input="x", previous_response_id="resp_nobody", **GEN)  # type: ignore[call-overload]
    assert unknown.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_type:
        c.responses.create(input=123, **GEN)  # type: ignore[call-overload]
    assert wrong_type.value.body["param"] == "input"  # type: ignore[index]


def test_json_schema_output(native: Proxy) -> None:
    """text.format becomes chat's response_format json_schema (OpenAI's; llama-cpp-python's server takes only
    json_object with a schema, so this runs against the scripted upstream)."""
    schema = {"type": "object", "properties": {"legs": {"type": "integer"}}, "required": ["legs"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "legs", "schema": schema, "strict": True}}
    response = client(native).responses.create(model="scripted", input=Q, text=fmt)  # type: ignore[arg-type]
    assert json.loads(response.output_text) == {"legs": 8} and response.text.format.type == "json_schema"  # type: ignore[union-attr]


def agent_model(proxy: Proxy, model: str = "smollm2") -> agents.OpenAIResponsesModel:
    sdk = openai.AsyncOpenAI(base_url=proxy.v1, api_key=f"sk-test-{uuid.uuid4().hex}", max_retries=0)
    return agents.OpenAIResponsesModel(model=model, openai_client=sdk)


def test_an_agent_with_the_default_model_class_answers(bridged: Proxy) -> None:
    agent = agents.Agent(name="Assistant", instructions="Answer in one short sentence.", model=agent_model(bridged),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=32))  # fmt: skip
    result = agents.Runner.run_sync(agent, "What is the capital of France?")
    assert isinstance(result.final_output, str) and result.final_output


def test_a_function_tool_round_trip_through_the_bridge(native: Proxy) -> None:
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": city}]
    c = client(native)
    first = c.responses.create(model="scripted", input="Weather in Paris?", tools=tools)  # type: ignore[arg-type]
    call = first.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    answer = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = c.responses.create(model="scripted", previous_response_id=first.id, tools=tools, input=answer)  # type: ignore[arg-type]
    assert second.output_text == "The answer is sunny."


def test_an_agent_with_a_function_tool(native: Proxy) -> None:
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"rainy in {city}"

    agent = agents.Agent(name="Weather", instructions="Use the tool.", model=agent_model(native, "scripted"),
                         tools=[get_weather])  # fmt: skip
    result = agents.Runner.run_sync(agent, "What is the weather in Oslo?")
    assert asked == ["Oslo"] and result.final_output == "The answer is rainy in Oslo."


def test_built_in_tools_and_upstream_ids_pass_through(native: Proxy) -> None:
    c = client(native)
    raw = c.responses.with_raw_response.create(model="scripted", input="news", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    searched = raw.parse()
    assert raw.headers["x-cache-bypass-reason"] == "responses-native" and searched.output_text == "Searched: news"
    continued = c.responses.create(model="scripted", input="more", previous_response_id=searched.id)
    assert continued.output_text == f"Continued {searched.id}"  # the upstream's own id, passed through
    with c.responses.create(model="scripted", input="live", tools=[{"type": "web_search"}], stream=True) as stream:  # type: ignore[list-item]
        events = list(stream)
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "Searched: live"  # type: ignore[union-attr]


def test_langchain_with_the_responses_api(bridged: Proxy) -> None:
    """LangChain's ChatOpenAI(use_responses_api=True), invoke and stream, cached like any other client."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2", base_url=bridged.v1, api_key=f"sk-test-{uuid.uuid4().hex}",  # type: ignore[arg-type]
                     use_responses_api=True, temperature=0, max_retries=0, extra_body={"stop": ["\n"]},
                     include_response_headers=True)  # fmt: skip
    first = llm.invoke(Q)
    again = llm.invoke(Q)
    streamed = "".join(str(chunk.text) for chunk in llm.stream(Q))
    assert first.text and again.text == first.text and streamed == first.text
    assert first.response_metadata["headers"]["x-cache"] == "MISS"
    assert (
        again.response_metadata["headers"]["x-cache"] == "HIT-EXACT"
        and again.response_metadata["id"] != first.response_metadata["id"]
    )
