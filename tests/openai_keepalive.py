"""The OpenAI Python SDK streaming a chat whose first token is slow, through
a gateway that keeps the wait alive with SSE comment lines: the SDK skips
them and reads the answer as if they were not there.

Usage: python openai_keepalive.py GATEWAY_URL API_KEY MODEL FIRST_TOKEN_DELAY_MS
Prints one JSON object: the streamed text and the number of chunks.
"""
import json
import sys

import openai

gateway_url, api_key, model, delay = sys.argv[1:5]
client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0)
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "take your time"}],
    max_tokens=6,
    stream=True,
    extra_body={"sim_first_token_delay_ms": int(delay)},
)
chunks = [chunk for chunk in stream]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print(json.dumps({"text": text, "chunks": len(chunks)}))
