"""The Anthropic Python SDK's messages API through sluice and straight to
the upstream (vLLM's /v1/messages): a message, a stream of events, the
stream helper, count_tokens, a tool use round (a tool_use block, then the
tool_result sent back), a streamed tool use; and the SDK's exceptions for an invalid key
and a rate-limited one.

Usage: python anthropic_messages.py GATEWAY_URL UPSTREAM_URL API_KEY MODEL LIMITED_KEY
Prints one JSON object: for each scenario, what the SDK returned both ways
(message ids left out: they name each call), and the exceptions raised.
Exits non-zero on any unexpected error.
"""
import json
import sys

import anthropic

gateway_url, upstream_url, api_key, model, limited_key = sys.argv[1:6]
gateway = anthropic.Anthropic(base_url=gateway_url, api_key=api_key, max_retries=0)
upstream = anthropic.Anthropic(base_url=upstream_url, api_key="unused", max_retries=0)
ask = dict(
    model=model,
    max_tokens=12,
    system="Answer in one sentence.",
    messages=[{"role": "user", "content": "Where do rivers go?"}],
    # This SDK no longer takes `temperature` as an argument; vLLM reads it.
    extra_body={"temperature": 0},
)


def unnamed(value):
    value = value.model_dump() if hasattr(value, "model_dump") else value
    value.pop("id", None)
    if isinstance(value.get("message"), dict):
        value["message"].pop("id", None)
    return value


def message(client):
    return unnamed(client.messages.create(**ask))


def events(client):
    return [unnamed(event) for event in client.messages.create(stream=True, **ask)]


def helper(client):
    with client.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {"text": text, "usage": final.usage.model_dump(), "stop_reason": final.stop_reason}


def count(client):
    return client.messages.count_tokens(
        model=model, system=ask["system"], messages=ask["messages"]
    ).model_dump()


tools = [{
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
question = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_round(client):
    first = client.messages.create(model=model, max_tokens=32, tools=tools, messages=question)
    use = next(block for block in first.content if block.type == "tool_use")
    answer = [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]
    second = client.messages.create(
        model=model, max_tokens=8, tools=tools,
        messages=question + [
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": answer},
        ],
    )
    return {"first": unnamed(first), "second": unnamed(second)}


def tool_stream(client):
    with client.messages.stream(model=model, max_tokens=32, tools=tools, messages=question) as stream:
        return unnamed(stream.get_final_message())


def error(call):
    try:
        call()
    except anthropic.APIStatusError as err:
        return {"class": type(err).__name__, "status": err.status_code, "body": err.body,
                "retry_after": err.response.headers.get("retry-after")}
    return None


limited = anthropic.Anthropic(base_url=gateway_url, api_key=limited_key, max_retries=0)
print(json.dumps({
    "compared": {
        name: {"gateway": call(gateway), "upstream": call(upstream)}
        for name, call in {
            "message": message,
            "events": events,
            "stream helper": helper,
            "count_tokens": count,
            "tool round": tool_round,
            "tool stream": tool_stream,
        }.items()
    },
    "invalid key": error(lambda: anthropic.Anthropic(
        base_url=gateway_url, api_key="sk-not-a-key", max_retries=0).messages.create(**ask)),
    "rate limited": [error(lambda: limited.messages.create(**ask)) for _ in range(2)],
}))
