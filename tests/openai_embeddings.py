"""The OpenAI Python SDK's embeddings.create through sluice and straight to the
upstream, in every input shape and encoding the SDK sends.

Usage: python openai_embeddings.py GATEWAY_URL UPSTREAM_URL API_KEY MODEL
Prints one JSON object: for each scenario, what the SDK returned both ways
(`id` and `created` left out: they name each call). Exits non-zero on any error.
"""
import json
import sys

import openai

gateway_url, upstream_url, api_key, model = sys.argv[1:5]
gateway = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)
upstream = openai.OpenAI(base_url=f"{upstream_url}/v1", api_key="unused", max_retries=0)

scenarios = {
    "one text (the SDK's default base64)": dict(input="The river flows to the sea"),
    "texts as floats": dict(input=["first document", "second, longer document"], encoding_format="float"),
    "token ids": dict(input=[84, 104, 101, 32, 114], encoding_format="float"),
    "lists of token ids (base64)": dict(input=[[84, 104], [101, 32, 114, 105]], encoding_format="base64"),
    "fewer dimensions": dict(input="short", dimensions=8),
}


def call(client, kwargs):
    answer = client.embeddings.create(model=model, **kwargs).model_dump()
    answer.pop("id", None)
    answer.pop("created", None)
    return answer


print(json.dumps({
    name: {"gateway": call(gateway, kwargs), "upstream": call(upstream, kwargs)}
    for name, kwargs in scenarios.items()
}))
