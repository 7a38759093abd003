"""The OpenAI Python SDK's audio.transcriptions.create and
audio.translations.create through sluice and straight to the upstream, with
a WAV file, streamed and not.

Usage: python openai_audio.py GATEWAY_URL UPSTREAM_URL API_KEY MODEL
Prints one JSON object: for each scenario, what the SDK returned both ways
(`id` and `created` left out: they name each call). Exits non-zero on any error.
"""
import io
import json
import math
import struct
import sys
import wave

import openai

gateway_url, upstream_url, api_key, model = sys.argv[1:5]
gateway = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)
upstream = openai.OpenAI(base_url=f"{upstream_url}/v1", api_key="unused", max_retries=0)


def tone(seconds, pitch):
    """A mono 16 kHz WAV file of a sine tone."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * pitch * i / 16000)))
            for i in range(int(16000 * seconds))
        )
        out.writeframes(frames)
    return buffer.getvalue()


audio = tone(2.2, 440)


def plain(value):
    value = value.model_dump() if hasattr(value, "model_dump") else value
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("id", "created")}
    return value


def transcribe(client):
    return plain(client.audio.transcriptions.create(model=model, file=("speech.wav", audio, "audio/wav")))


def translate(client):
    return plain(client.audio.translations.create(model=model, file=("speech.wav", audio, "audio/wav")))


def transcribe_streamed(client):
    stream = client.audio.transcriptions.create(
        model=model, file=("speech.wav", audio, "audio/wav"), stream=True, language="en"
    )
    return [plain(event) for event in stream]


print(json.dumps({
    name: {"gateway": call(gateway), "upstream": call(upstream)}
    for name, call in {
        "transcription": transcribe,
        "translation": translate,
        "streamed transcription": transcribe_streamed,
    }.items()
}))
