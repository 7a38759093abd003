"""The OpenAI Python SDK's Files and Batch APIs against sluice, unchanged.

Usage: openai_batch.py BASE_URL KEY OTHER_KEY MODEL SCENARIO

Scenarios (each prints one JSON object for the Rust test to check):
  run       a chat, a completions and an embeddings batch end to end, each
            output line compared with the same request answered one by one
  others    another key asks for the first key's file and batch
  invalid   a malformed input file
  cancel    a long batch cancelled as soon as it runs
  expire    a long batch with a 2 s completion window
"""

import io
import json
import sys
import time

import openai

base_url, key, other_key, model, scenario = sys.argv[1:6]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)


def upload(lines):
    data = "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")


def wait(batch_id, until=("completed", "failed", "expired", "cancelled"), timeout=120):
    deadline = time.time() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.time() > deadline:
            raise SystemExit(f"batch {batch_id} still {batch.status} after {timeout} s")
        time.sleep(0.1)


def lines_of(file_id):
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def chat_body(i):
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about river {i}"}],
        "max_tokens": 8,
        "temperature": 0,
    }


def run():
    out = {}
    chats = [
        {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)}
        for i in range(30)
    ]
    completions = [
        {
            "custom_id": f"text-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": f"The valley {i}", "max_tokens": 6, "temperature": 0},
        }
        for i in range(10)
    ]
    embeddings = [
        {
            "custom_id": f"vec-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": f"stone {i}"},
        }
        for i in range(5)
    ]
    for name, lines, endpoint in [
        ("chat", chats, "/v1/chat/completions"),
        ("completions", completions, "/v1/completions"),
        ("embeddings", embeddings, "/v1/embeddings"),
    ]:
        file = upload(lines)
        batch = client.batches.create(
            input_file_id=file.id,
            endpoint=endpoint,
            completion_window="24h",
            metadata={"scenario": name},
        )
        assert batch.status == "validating", batch.status
        batch = wait(batch.id)
        output = lines_of(batch.output_file_id)
        errors = lines_of(batch.error_file_id)
        same = 0
        for line in output:
            body = next(l["body"] for l in lines if l["custom_id"] == line["custom_id"])
            response = line["response"]["body"]
            if endpoint == "/v1/chat/completions":
                alone = client.chat.completions.create(**body)
                same += response["choices"][0]["message"]["content"] == alone.choices[0].message.content
            elif endpoint == "/v1/completions":
                alone = client.completions.create(**body)
                same += response["choices"][0]["text"] == alone.choices[0].text
            else:
                alone = client.embeddings.create(**body)
                same += response["data"][0]["embedding"] == alone.data[0].embedding
        out[name] = {
            "status": batch.status,
            "counts": [batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed],
            "metadata": batch.metadata,
            "custom_ids": sorted(line["custom_id"] for line in output),
            "status_codes": sorted({line["response"]["status_code"] for line in output}),
            "errors": len(errors),
            "same_as_alone": same,
            "timestamps": [batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at],
            "input_file": file.id,
            "batch": batch.id,
        }
    out["listed_batches"] = [b.id for b in client.batches.list(limit=2)]
    out["listed_files"] = [f.id for f in client.files.list(purpose="batch")]
    first = out["chat"]
    out["file_bytes"] = client.files.retrieve(first["input_file"]).bytes
    deleted = client.files.delete(first["input_file"])
    out["deleted"] = deleted.deleted
    try:
        client.files.retrieve(first["input_file"])
        out["after_delete"] = 200
    except openai.NotFoundError:
        out["after_delete"] = 404
    return out


def others():
    file = upload([{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(1)}])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(batch.id)
    other = openai.OpenAI(base_url=base_url + "/v1", api_key=other_key, max_retries=0)
    out = {}
    for name, call in [
        ("file", lambda: other.files.retrieve(file.id)),
        ("content", lambda: other.files.content(file.id)),
        ("delete", lambda: other.files.delete(file.id)),
        ("batch", lambda: other.batches.retrieve(batch.id)),
        ("cancel", lambda: other.batches.cancel(batch.id)),
        ("create", lambda: other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")),
    ]:
        try:
            call()
            out[name] = 200
        except openai.APIStatusError as err:
            out[name] = err.status_code
    out["listed_files"] = [f.id for f in other.files.list()]
    out["listed_batches"] = [b.id for b in other.batches.list()]
    out["owner_still_reads"] = client.files.retrieve(file.id).id == file.id
    return out


def invalid():
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(1)}
    lines = [
        good,
        "{not json",
        {"custom_id": "url", "method": "POST", "url": "/v1/completions", "body": chat_body(2)},
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(3)},
        {"custom_id": "stream", "method": "POST", "url": "/v1/chat/completions", "body": {**chat_body(4), "stream": True}},
        {"custom_id": "model", "method": "POST", "url": "/v1/chat/completions", "body": {**chat_body(5), "model": "no-such-model"}},
        {"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"},
    ]
    file = upload(lines)
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait(batch.id)
    try:
        client.batches.create(input_file_id=file.id, endpoint="/v1/nowhere", completion_window="24h")
        bad_endpoint = 200
    except openai.BadRequestError:
        bad_endpoint = 400
    return {
        "status": batch.status,
        "failed_at": batch.failed_at is not None,
        "errors": [[e.line, e.code, e.param] for e in batch.errors.data],
        "output": batch.output_file_id,
        "bad_endpoint": bad_endpoint,
    }


def long_batch(window):
    lines = [
        {
            "custom_id": f"long-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {**chat_body(i), "max_tokens": 100},
        }
        for i in range(200)
    ]
    file = upload(lines)
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window=window)


def ended(batch):
    output = lines_of(batch.output_file_id)
    errors = lines_of(batch.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    return {
        "status": batch.status,
        "answered": len(output),
        "error_codes": sorted({(line.get("error") or {}).get("code", "") for line in errors}),
        "unique": len(set(ids)),
        "lines": len(ids),
        "counts": [batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed],
    }


def cancel():
    batch = long_batch("24h")
    wait(batch.id, until=("in_progress",))
    cancelling = client.batches.cancel(batch.id)
    batch = wait(batch.id)
    return {**ended(batch), "cancelling": cancelling.status, "cancelled_at": batch.cancelled_at is not None}


def expire():
    batch = long_batch("2s")
    batch = wait(batch.id)
    return {**ended(batch), "expired_at": batch.expired_at is not None}


print(json.dumps({"run": run, "others": others, "invalid": invalid, "cancel": cancel, "expire": expire}[scenario]()))
