"""Drives sluice with the official OpenAI Python SDK (base_url pointed at the gateway).

Usage: python openai_sdk.py BASE_URL API_KEY MODEL
Prints one JSON line with what the SDK returned; exits non-zero on any error.
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)

completion = client.completions.create(model=model, prompt="The river flows", max_tokens=6, seed=1)
stream = client.completions.create(
    model=model, prompt="The river flows", max_tokens=6, seed=1, stream=True,
    stream_options={"include_usage": True},
)
streamed, usage = "", None
for chunk in stream:
    for choice in chunk.choices:
        streamed += choice.text
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens

try:
    openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-sluice-wrong", max_retries=0).completions.create(
        model=model, prompt="x", max_tokens=1)
    auth_error = None
except openai.AuthenticationError as err:
    auth_error = err.status_code

print(json.dumps({
    "text": completion.choices[0].text,
    "finish_reason": completion.choices[0].finish_reason,
    "completion_tokens": completion.usage.completion_tokens,
    "streamed": streamed,
    "stream_usage": usage,
    "auth_error": auth_error,
}))
