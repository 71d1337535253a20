"""The official `openai` client against Nexus: the same API, served by a node over its link."""
import openai
import pytest
from openai import OpenAI

from conftest import MODEL

QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]


@pytest.fixture()
def nexus(nexus_url):
    return OpenAI(base_url=f"{nexus_url}/v1", api_key="not-needed-yet", max_retries=0, timeout=120)


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
