"""What the official OpenAI Python SDK makes of sluice's rate limits.

Usage: python openai_limits.py GATEWAY_URL API_KEY MODEL
The key allows one request per minute. Prints one JSON object: the limit
headers of the admitted request, and the exception the second one raised.
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
messages = [{"role": "user", "content": "one request"}]

raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=2)
admitted = {name: raw.headers.get(name) for name in (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")}
raw.parse()

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    refused = None
except openai.RateLimitError as err:
    refused = {
        "class": type(err).__name__,
        "status": err.status_code,
        "type": err.type,
        "code": err.code,
        "message": err.message,
        "retry_after": err.response.headers.get("retry-after"),
        "remaining": err.response.headers.get("x-ratelimit-remaining-requests"),
    }

print(json.dumps({"admitted": admitted, "refused": refused}))
