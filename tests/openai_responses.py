"""The OpenAI Python SDK's Responses API through sluice and straight to the
upstream (vLLM's /v1/responses): a response, its stream of typed events,
the stream helper, a stored response continued with previous_response_id
and read back with retrieve, a function-call round, a background response
polled to its end, and a cancelled one; and, through sluice only, the SDK's
exceptions for an invalid key and for another key's response.

Usage: python openai_responses.py GATEWAY_URL UPSTREAM_URL API_KEY MODEL OTHER_KEY
Prints one JSON object: "compared" holds, for each scenario, what the SDK
returned both ways (ids and timestamps left out: they name each call);
"errors" the exceptions. Exits non-zero on any unexpected error.
"""
import json
import sys
import time

import openai

gateway_url, upstream_url, api_key, model, other_key = sys.argv[1:6]
gateway = openai.OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0)
upstream = openai.OpenAI(base_url=upstream_url + "/v1", api_key="unused", max_retries=0)
ask = dict(
    model=model,
    instructions="Answer in one sentence.",
    input="Where do rivers go?",
    temperature=0,
    max_output_tokens=12,
)
weather = [{
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]


def unnamed(value):
    """A response without what names the call: ids and timestamps."""
    value = value.model_dump() if hasattr(value, "model_dump") else value
    for key in ("id", "created_at", "previous_response_id"):
        value.pop(key, None)
    for item in value.get("output") or []:
        item.pop("id", None)
    return value


def response(client):
    return unnamed(client.responses.create(**ask))


def events(client):
    seen = []
    for event in client.responses.create(**ask, stream=True):
        entry = {"type": event.type, "sequence_number": event.sequence_number}
        if hasattr(event, "delta"):
            entry["delta"] = event.delta
        if event.type == "response.completed":
            entry["response"] = unnamed(event.response)
        seen.append(entry)
    return seen


def stream_helper(client):
    with client.responses.stream(**ask) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    return {"deltas": texts, "text": final.output_text, "usage": final.usage.model_dump()}


def follow_up(client):
    first = client.responses.create(**ask)
    second = client.responses.create(
        model=model, input="And then?", previous_response_id=first.id, temperature=0, max_output_tokens=8
    )
    again = client.responses.retrieve(first.id)
    return {
        "first": first.output_text,
        "second": second.output_text,
        "second usage": second.usage.model_dump(),
        "retrieved": unnamed(again),
        "retrieved is first": again.id == first.id and again.output_text == first.output_text,
    }


def function_call(client):
    called = client.responses.create(model=model, input="Weather in Paris?", tools=weather, temperature=0)
    call = called.output[0]
    answered = client.responses.create(
        model=model,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=weather,
        temperature=0,
        max_output_tokens=6,
    )
    streamed = [
        e.type
        for e in client.responses.create(model=model, input="Weather in Oslo?", tools=weather, temperature=0, stream=True)
    ]
    return {
        "call": {"type": call.type, "name": call.name, "arguments": json.loads(call.arguments)},
        "answer": answered.output_text,
        "streamed": streamed,
    }


def background(client):
    queued = client.responses.create(**ask, background=True)
    polled = queued
    deadline = time.time() + 20
    while polled.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.05)
        polled = client.responses.retrieve(queued.id)
    slow = client.responses.create(
        model=model, input="Take your time.", background=True, max_output_tokens=200,
        extra_body={"sim_token_delay_ms": 200},
    )
    cancelled = client.responses.cancel(slow.id)
    after = client.responses.retrieve(slow.id)
    return {
        "queued": queued.status,
        "polled": polled.status,
        "text": polled.output_text,
        "usage": polled.usage.model_dump() if polled.usage else None,
        "cancelled": cancelled.status,
        "after cancel": after.status,
    }


def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"class": type(e).__name__, "status": e.status_code, "body": e.body}
    return None


compared = {}
for name, scenario in [
    ("response", response),
    ("events", events),
    ("stream helper", stream_helper),
    ("follow-up", follow_up),
    ("function call", function_call),
    ("background", background),
]:
    compared[name] = {"gateway": scenario(gateway), "upstream": scenario(upstream)}

stored = gateway.responses.create(**ask)
other = openai.OpenAI(base_url=gateway_url + "/v1", api_key=other_key, max_retries=0)
bad = openai.OpenAI(base_url=gateway_url + "/v1", api_key="sk-wrong", max_retries=0)
errors = {
    "invalid key": error(lambda: bad.responses.create(**ask)),
    "another key retrieves": error(lambda: other.responses.retrieve(stored.id)),
    "another key continues": error(
        lambda: other.responses.create(model=model, input="mine now", previous_response_id=stored.id)
    ),
    "unknown id": error(lambda: gateway.responses.retrieve("resp_0000")),
}
print(json.dumps({"compared": compared, "errors": errors}))
