"""The official `openai` Python client against a real node: chat, streaming, completions, errors."""
import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL

QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens >= 1


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content:
                parts.append(delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(parts)
    assert "Paris" in text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1
    # Greedy: streaming and non-streaming give the same answer.
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert full.choices[0].message.content == text


def test_text_completion_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "stop"
    assert " 7" not in r.choices[0].text
    assert r.choices[0].text.startswith(" 5")


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name an animal."}],
                  temperature=1.0, top_p=0.95, seed=1234, max_tokens=16)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_context_overflow_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 3000}])
    assert e.value.code == "context_length_exceeded"


def test_max_tokens_out_of_range_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"extra_body": {"suffix": "end"}}, "suffix"),
        ({"extra_body": {"best_of": 2}}, "best_of"),
    ],
)
def test_unsupported_fields_are_refused_by_name(client, extra, param):
    # Not implemented yet: a clear 400 naming the field, not an answer made without it.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, **extra)
    assert e.value.param == param
    assert "not supported" in e.value.message


POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_several_answers_with_n(client):
    one = client.chat.completions.create(model=MODEL, messages=POEM, max_tokens=24, seed=7)
    r = client.chat.completions.create(model=MODEL, messages=POEM, max_tokens=24, seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert all(texts) and all(c.finish_reason in ("stop", "length") for c in r.choices)
    # Each answer samples with its own seed (seed + index): not three copies of one answer.
    assert len(set(texts)) > 1, texts
    # Each answer is a request of its own, so usage counts the prompt once per answer.
    assert r.usage.prompt_tokens == 3 * one.usage.prompt_tokens
    assert r.usage.completion_tokens >= 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_several_answers_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=POEM, max_tokens=16, n=2, stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, roles, usage = {}, {}, {}, []
    for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices
            usage.append(chunk.usage)
        for c in chunk.choices:
            assert not usage, "the usage chunk comes last"
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles.setdefault(c.index, c.delta.role)
            if c.finish_reason:
                assert c.index not in finish
                finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1] and all(texts.values())
    assert roles == {0: "assistant", 1: "assistant"}
    assert sorted(finish) == [0, 1]
    assert len(usage) == 1 and usage[0].completion_tokens >= 2


def test_prompt_lists_and_echo(client):
    prompts = ["1, 2, 3,", "A, B, C, D,"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, echo=True, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # Answer i of prompt p is choice p * n + i, its text the prompt then the continuation.
    for c in r.choices:
        assert c.text.startswith(prompts[c.index // 2]), c
    assert r.choices[0].text.startswith("1, 2, 3, 4")
    assert r.choices[2].text.startswith("A, B, C, D, E")
    stream = client.completions.create(model=MODEL, prompt=prompts[0], echo=True, max_tokens=6,
                                       temperature=0, stream=True)
    first, text = None, ""
    for chunk in stream:
        first = chunk.choices[0].text if first is None else first
        text += chunk.choices[0].text
    assert first == prompts[0]
    assert text.startswith("1, 2, 3, 4")


def test_best_of_keeps_the_likeliest_answers(client):
    prompt = "Once upon a time"
    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, best_of=3, n=2, logprobs=1, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in r.choices]
    assert means[0] >= means[1], means
    # All three answers were generated, and are counted.
    assert r.usage.prompt_tokens == 3 * one.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, best_of=2, stream=True)
    assert e.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, best_of=2, n=3)
    assert e.value.param == "best_of"


def test_log_probabilities_through_an_upstream_backend(client, upstream_node_url):
    # A node in front of another node (any OpenAI-compatible server that reports them): the
    # same greedy tokens with the same log probabilities and alternatives, in both formats.
    via = openai.OpenAI(base_url=f"{upstream_node_url}/v1", api_key="x", max_retries=0, timeout=120)
    chat = dict(messages=QUESTION, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    direct = client.chat.completions.create(model=MODEL, **chat).choices[0]
    proxied = via.chat.completions.create(model="via-upstream", **chat).choices[0]
    assert proxied.message.content == direct.message.content
    flat = lambda c: [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
                      for t in c.logprobs.content]
    assert flat(proxied) == flat(direct)
    assert len(flat(direct)) >= 1
    text = dict(prompt="1, 2, 3,", temperature=0, max_tokens=6, logprobs=2)
    direct = client.completions.create(model=MODEL, **text).choices[0]
    proxied = via.completions.create(model="via-upstream", **text).choices[0]
    assert proxied.text == direct.text
    assert proxied.logprobs.tokens == direct.logprobs.tokens
    assert proxied.logprobs.token_logprobs == direct.logprobs.token_logprobs
    assert proxied.logprobs.top_logprobs == direct.logprobs.top_logprobs
    # best_of ranks by them, so it works there too.
    r = via.completions.create(model="via-upstream", prompt="Once upon a time", max_tokens=6, best_of=2)
    assert len(r.choices) == 1 and r.choices[0].text


def test_best_of_without_log_probabilities_is_refused_by_its_name(plain_upstream_node_url):
    # best_of ranks answers by log probabilities; a backend that reports none cannot rank, and
    # the 400 names the field the caller sent, not the `logprobs` it did not.
    via = openai.OpenAI(base_url=f"{plain_upstream_node_url}/v1", api_key="x", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        via.completions.create(model="plain-upstream", prompt="Once upon a time", max_tokens=4, best_of=2)
    assert e.value.param == "best_of"
    # Without best_of the same backend answers.
    assert via.completions.create(model="plain-upstream", prompt="Once upon a time", max_tokens=4).choices[0].text


def test_too_many_answers_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, n=17)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a"] * 9, n=2, max_tokens=4)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", echo=True, logprobs=1, max_tokens=4)
    assert e.value.param == "echo"


def test_fields_asking_for_nothing_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, logprobs=False,
        response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0,
    )
    assert r.choices[0].message.content


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    name: str = Field(max_length=16)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=18, le=99)  # `minimum` / `maximum` in the schema
    pets: list[Pet] = Field(max_length=2)


def test_structured_output_parses_into_the_pydantic_model(client):
    # The client turns the model class into a strict `json_schema` response format (with a
    # `$defs` reference for Pet) and parses the answer back into it.
    r = client.chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=300, response_format=Person,
        messages=[{"role": "user", "content": "Invent a person who has one pet."}],
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    person = choice.message.parsed
    assert isinstance(person, Person), choice.message.content
    assert list(json.loads(choice.message.content)) == ["name", "age", "pets"]
    assert len(person.pets) <= 2
    assert 18 <= person.age <= 99


def test_json_mode_answers_with_an_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=200,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content
    assert text.startswith("{"), text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"4294967295": 1}}, None),  # outside the vocabulary: found by the engine
    ],
)
def test_bad_formats_biases_and_penalties_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, **extra)
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"


def test_penalties_are_applied(client):
    ask = [{"role": "user", "content": "Write the word dog fifty times."}]
    common = dict(model=MODEL, messages=ask, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**common).choices[0].message.content
    penalised = client.chat.completions.create(frequency_penalty=2, **common).choices[0].message.content
    assert penalised != plain
    assert len(set(penalised.split())) > len(set(plain.split())), (plain, penalised)


def test_streaming_error_before_first_token_is_an_http_error(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5, stream=True)


def test_chat_log_probabilities(client):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == r.usage.completion_tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy
    # Streamed, each chunk carries the log probabilities of its own text: the same tokens.
    streamed = [t for chunk in client.chat.completions.create(stream=True, **kwargs)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]


def test_completion_log_probabilities(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    assert all(p <= 0 for p in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    # The sampled token is always among its alternatives (OpenAI's form).
    assert all(top[t] == p for top, t, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # With no alternatives asked for, each entry still names the sampled token.
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_log_probability_requests_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, **extra)
    assert e.value.param == param
