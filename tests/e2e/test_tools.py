"""Tool calling with the official `openai` Python client against a real node (SmolLM2-135M)."""
import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_weather_call(call):
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str)
    assert set(args) <= {"city", "unit"}
    assert args.get("unit", "celsius") in ("celsius", "fahrenheit")
    return args


def test_required_tool_call(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=100,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert check_weather_call(choice.message.tool_calls[0])["city"] == "Paris"


def test_parallel_calls_cut_by_the_limit_keep_the_whole_ones(client):
    # SmolLM2-135M repeats the call until max_tokens: the calls written whole are returned,
    # with finish_reason "length" as the answer was cut.
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=100,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "tool_calls")
    assert choice.message.content is None
    assert len(choice.message.tool_calls) >= 2, choice.message
    for call in choice.message.tool_calls:
        check_weather_call(call)
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == len(ids)


def test_named_tool_choice_calls_that_tool_once(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["timezone"], str)


def test_parallel_tool_calls_false_allows_one_call(client):
    ask = [{"role": "user", "content": "Weather in Paris, London, Rome, Berlin and Madrid?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=200,
    )
    assert len(r.choices[0].message.tool_calls) == 1


def test_auto_answers_with_a_reply_or_well_formed_calls(client):
    for ask in (ASK, [{"role": "user", "content": "Say hello."}]):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, tools=[WEATHER, TIME], temperature=0, max_tokens=100,
        )
        m = r.choices[0].message
        if m.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            assert m.content is None
            for c in m.tool_calls:
                assert c.function.name in ("get_weather", "get_time")
                assert isinstance(json.loads(c.function.arguments), dict)
        else:
            assert r.choices[0].finish_reason == "stop"
            assert m.content and not m.content.lstrip().startswith('{"response"'), m.content


def test_streamed_tool_calls_match_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                  max_tokens=100, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish, content = {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content.append(delta.content)
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            if tc.function:
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert not "".join(content)
    got = [calls[i] for i in sorted(calls)]
    assert [(c["name"], c["arguments"]) for c in got] == [(w.function.name, w.function.arguments) for w in whole]
    assert all(c["id"].startswith("call_") for c in got)


class GetWeather(BaseModel):
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


def test_pydantic_tool_arguments_parse_into_the_model(client):
    # `pydantic_function_tool` makes a strict tool; `parse` validates the arguments against it.
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", temperature=0, max_tokens=100,
    )
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_tool_result_is_answered(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=100,
    ).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees celsius."},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=60, tool_choice="none",
    )
    m = r.choices[0].message
    assert m.tool_calls is None
    assert m.content
    assert r.usage.prompt_tokens > 60  # the call and its result were in the prompt


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [WEATHER], "stop": ["}"]}, "stop"),
    ],
)
def test_bad_tools_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert e.value.param == param
