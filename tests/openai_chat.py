"""Drives sluice's chat route with the official OpenAI Python SDK and calls the
simulated vLLM directly with the same arguments, so a test can compare the two
field by field.

Usage: python openai_chat.py GATEWAY_URL UPSTREAM_URL API_KEY MODEL
Prints one JSON object: for each scenario, what the SDK returned through the
gateway ("gateway") and straight from the upstream ("direct"), with response
ids and timestamps blanked (they name different requests). Exits non-zero on
any error.
"""
import json
import sys

import openai

gateway_url, upstream_url, api_key, model = sys.argv[1:5]
gateway = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)
direct = openai.OpenAI(base_url=f"{upstream_url}/v1", api_key="unused", max_retries=0)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}

SCENARIOS = {
    "plain": dict(messages=[{"role": "user", "content": "Tell me about the river"}], max_tokens=6, seed=1),
    "system_and_parts": dict(
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ]},
        ],
        max_completion_tokens=5, temperature=0.5, seed=2,
    ),
    "n2_logprobs": dict(
        messages=[{"role": "user", "content": "Two answers please"}],
        max_tokens=4, n=2, logprobs=True, top_logprobs=1, seed=3,
    ),
    "tool_call": dict(
        messages=[{"role": "user", "content": "What is the weather in Oslo today?"}],
        tools=[WEATHER_TOOL], tool_choice="auto", seed=4,
    ),
    "tool_result": dict(
        messages=[
            {"role": "user", "content": "What is the weather in Oslo today?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"query\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL], max_tokens=5, seed=5,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    ),
}


def blank(dump):
    dump.pop("id", None)
    dump.pop("created", None)
    return dump


def run(client, args, stream):
    if not stream:
        return blank(client.chat.completions.create(model=model, **args).model_dump())
    chunks = client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **args)
    return [blank(chunk.model_dump()) for chunk in chunks]


result = {}
for name, args in SCENARIOS.items():
    for stream in (False, True):
        key = f"{name}/{'stream' if stream else 'json'}"
        result[key] = {"gateway": run(gateway, args, stream), "direct": run(direct, args, stream)}

try:
    gateway.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    result["unknown_model"] = None
except openai.NotFoundError as err:
    result["unknown_model"] = err.status_code
try:
    gateway.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
    result["bad_role"] = None
except openai.BadRequestError as err:
    result["bad_role"] = err.message
result["models"] = [m.id for m in gateway.models.list().data]

print(json.dumps(result))
