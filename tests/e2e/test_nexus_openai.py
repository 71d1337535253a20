"""The official `openai` client against Nexus: the same API, served by a node over its link."""
import json

import openai
import pytest
from openai import OpenAI

from conftest import MODEL

QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]


@pytest.fixture()
def nexus(nexus_url):
    url, key = nexus_url
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_lists_the_network(nexus):
    models = {m.id: m for m in nexus.models.list()}
    assert MODEL in models
    assert models[MODEL].model_extra.get("nodes") == 1


def test_chat_through_nexus(nexus):
    r = nexus.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens >= 1


def test_streaming_through_nexus_with_preference(nexus):
    stream = nexus.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-lattice-preference": "cost"},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in text
    assert usage is not None and usage.completion_tokens >= 1


def test_errors_through_nexus(nexus):
    with pytest.raises(openai.NotFoundError):
        nexus.chat.completions.create(model="not-served", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        nexus.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 3000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        nexus.chat.completions.create(model=MODEL, messages=QUESTION, extra_headers={"x-lattice-preference": "fastest"})
    assert e.value.param == "x-lattice-preference"


def test_wrong_or_missing_key_is_an_authentication_error(nexus_url):
    url, key = nexus_url
    bad = OpenAI(base_url=f"{url}/v1", api_key="lk_wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


def _balance(url, key):
    """The key's account balance: {"available": units, "held": units} as strings."""
    import urllib.request

    req = urllib.request.Request(f"{url}/lattice/v1/account", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["balance"]


def test_usage_is_charged_to_the_key(nexus_url):
    url, key = nexus_url
    before = int(_balance(url, key)["available"])
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    after = _balance(url, key)
    # Node default price: 0.1 LAI per 1M prompt tokens, 0.2 LAI per 1M completion tokens.
    cost = (r.usage.prompt_tokens * 10**17 + r.usage.completion_tokens * 2 * 10**17) // 10**6
    assert before - int(after["available"]) == cost
    assert after["held"] == "0"


def test_several_answers_are_charged_as_reported(nexus_url):
    url, key = nexus_url
    before = int(_balance(url, key)["available"])
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    after = _balance(url, key)
    # Each answer is routed, metered and charged as a request of its own; usage is their sum,
    # and exactly what the balance lost.
    cost = (r.usage.prompt_tokens * 10**17 + r.usage.completion_tokens * 2 * 10**17) // 10**6
    assert before - int(after["available"]) == cost
    assert after["held"] == "0"
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=2, stream=True)
    done = {c.index for chunk in stream for c in chunk.choices if c.finish_reason}
    assert done == {0, 1}


def test_more_answers_than_slots_through_nexus(nexus):
    # Three long answers on a node with two slots: the third waits in the node's queue until
    # one of the first two ends, so those must be read while it waits. Each token is two
    # events here (its log probability, then its text), more than Nexus keeps for a reader
    # that does not read (1,024).
    stream = nexus.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=600, n=3, stream=True, logprobs=True,
        extra_body={"ignore_eos": True},
    )
    tokens, finish = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                tokens[c.index] = tokens.get(c.index, 0) + len(c.logprobs.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert tokens == {0: 600, 1: 600, 2: 600}


def test_structured_output_through_nexus(nexus):
    # The schema travels over the link (protocol 4) and the node's grammar enforces it.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"enum": ["France", "Italy"]}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = nexus.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content)
    assert list(answer) == ["city", "country"] and answer["country"] in ("France", "Italy")


def test_unenforceable_schema_is_refused_by_nexus(nexus):
    with pytest.raises(openai.BadRequestError) as e:
        nexus.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "minimum": 1}}},
        )
    assert e.value.param == "response_format.json_schema.schema"
    assert "minimum" in e.value.message


def test_tool_calls_through_nexus(nexus):
    # Nexus turns the tools into a schema for the node's grammar and reads the answer back into
    # tool calls, streamed or whole; a paid request is charged like any other.
    tool = {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    kwargs = dict(model=MODEL, messages=ask, tools=[tool], tool_choice="required", parallel_tool_calls=False,
                  temperature=0, max_tokens=60)
    r = nexus.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert r.usage.completion_tokens >= 1
    streamed = [tc for chunk in nexus.chat.completions.create(stream=True, **kwargs)
                for choice in chunk.choices for tc in choice.delta.tool_calls or []]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [
        (call.function.name, call.function.arguments)]


def test_log_probabilities_through_nexus(nexus):
    # Asked over the link (protocol 5), sent back as events before the text they belong to.
    r = nexus.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16,
                                      logprobs=True, top_logprobs=2)
    tokens = r.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
