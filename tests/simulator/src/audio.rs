//! vLLM's speech-to-text routes: `POST /v1/audio/transcriptions` and
//! `POST /v1/audio/translations`, multipart uploads of a WAV file.
//!
//! The "model" hears the audio's length and its samples: it answers one
//! word per half second of audio, drawn from a hash of the samples, so the
//! same file always gets the same text. Answers are vLLM's shapes: a
//! transcription `{"text", "usage": {"type": "duration", "seconds"}}`, a
//! translation `{"text"}`, or (with `stream`) `transcription.chunk` /
//! `translation.chunk` events, one word each, the usage chunk when
//! `stream_include_usage` is set, then `[DONE]`. Like a model without
//! segment timestamps, it refuses `verbose_json`; like vLLM, `srt` and `vtt`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::SimState;
use crate::pooling::{bad_request, tokenize};
use crate::routes::{admit_parsed, refuse_if_down};
use crate::stream::AbortGuard;

const WORDS: [&str; 16] = [
    "the", "river", "runs", "under", "a", "quiet", "bridge", "while", "birds", "sing", "over",
    "green", "fields", "and", "stone", "walls",
];

/// A mono 16-bit PCM WAV file of `millis` of a tone whose pitch is `seed`'s:
/// what tests upload.
pub fn wav(millis: u32, seed: u8) -> Vec<u8> {
    let rate: u32 = 16_000;
    let samples = rate * millis / 1000;
    let mut data = Vec::with_capacity(samples as usize * 2);
    for i in 0..samples {
        let phase = (i as f32) * (200.0 + f32::from(seed) * 10.0) / rate as f32;
        let value = ((phase * std::f32::consts::TAU).sin() * 8000.0) as i16;
        data.extend_from_slice(&value.to_le_bytes());
    }
    let mut file = Vec::with_capacity(44 + data.len());
    file.extend_from_slice(b"RIFF");
    file.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    file.extend_from_slice(b"WAVEfmt ");
    file.extend_from_slice(&16u32.to_le_bytes());
    file.extend_from_slice(&1u16.to_le_bytes()); // PCM
    file.extend_from_slice(&1u16.to_le_bytes()); // mono
    file.extend_from_slice(&rate.to_le_bytes());
    file.extend_from_slice(&(rate * 2).to_le_bytes());
    file.extend_from_slice(&2u16.to_le_bytes());
    file.extend_from_slice(&16u16.to_le_bytes());
    file.extend_from_slice(b"data");
    file.extend_from_slice(&(data.len() as u32).to_le_bytes());
    file.extend_from_slice(&data);
    file
}

/// The duration of a WAV file, in seconds, and its samples; `None` when it is not one.
fn decode_wav(file: &[u8]) -> Option<(f64, &[u8])> {
    if file.len() < 12 || &file[..4] != b"RIFF" || &file[8..12] != b"WAVE" {
        return None;
    }
    let (mut at, mut byte_rate) = (12, None);
    while at + 8 <= file.len() {
        let id = &file[at..at + 4];
        let size = u32::from_le_bytes(file[at + 4..at + 8].try_into().ok()?) as usize;
        let body = file.get(at + 8..at + 8 + size)?;
        match id {
            b"fmt " if size >= 12 => {
                byte_rate = Some(u32::from_le_bytes(body[8..12].try_into().ok()?));
            }
            b"data" => {
                let rate = f64::from(byte_rate.filter(|r| *r > 0)?);
                return Some((body.len() as f64 / rate, body));
            }
            _ => {}
        }
        at += 8 + size + size % 2;
    }
    None
}

/// What the model hears in `samples`: one word per half second (at least one).
fn words(samples: &[u8], seconds: f64) -> Vec<&'static str> {
    let count = ((seconds * 2.0).ceil() as usize).max(1);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in samples {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..count)
        .map(|i| {
            let mixed = hash.rotate_left((i as u32 * 7) % 64) ^ (i as u64);
            WORDS[(mixed % WORDS.len() as u64) as usize]
        })
        .collect()
}

#[derive(Serialize)]
struct DurationUsage {
    r#type: &'static str,
    seconds: u64,
}

#[derive(Serialize)]
struct TranscriptionResponse {
    text: String,
    usage: DurationUsage,
}

#[derive(Serialize)]
struct TranslationResponse {
    text: String,
}

#[derive(Serialize)]
struct Delta<'a> {
    content: &'a str,
}

#[derive(Serialize)]
struct StreamChoice<'a> {
    delta: Delta<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    /// Sent (as `null`) on the last choice only, as vLLM's `exclude_unset` dump does.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Value>,
}

#[derive(Serialize)]
struct StreamUsage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
}

#[derive(Serialize)]
struct StreamChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<StreamChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<StreamUsage>,
}

/// The form's text fields, and the file as `{"filename", "bytes"}`, as JSON
/// (what the simulator records), with the file's bytes.
async fn read_form(headers: &HeaderMap, body: Bytes) -> Result<(Value, Bytes), Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let invalid = |message: String| bad_request(&message, None);
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| invalid("Expected a multipart/form-data body".into()))?;
    let stream = futures::stream::once(std::future::ready(Ok::<_, Infallible>(body)));
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut fields, mut file) = (Map::new(), None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| invalid(e.to_string()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|e| invalid(e.to_string()))?;
        let value = match file_name {
            Some(file_name) => {
                let value = serde_json::json!({"filename": file_name, "bytes": data.len()});
                file = Some(data);
                value
            }
            None => Value::String(String::from_utf8_lossy(&data).into_owned()),
        };
        fields.insert(name, value);
    }
    match file {
        Some(file) => Ok((Value::Object(fields), file)),
        None => Err(bad_request("Field required: file", Some("file"))),
    }
}

fn form_flag(body: &Value, field: &str) -> bool {
    body.get(field)
        .and_then(Value::as_str)
        .is_some_and(|v| ["true", "1", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()))
}

pub(crate) async fn transcriptions(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    speech_to_text(state, headers, body, true).await
}

pub(crate) async fn translations(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    speech_to_text(state, headers, body, false).await
}

async fn speech_to_text(
    state: Arc<SimState>,
    headers: HeaderMap,
    body: Bytes,
    transcribe: bool,
) -> Response {
    if let Err(response) = refuse_if_down(&state) {
        return *response;
    }
    let (form, file) = match read_form(&headers, body).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    let (request_id, form) = match admit_parsed(&state, &headers, form, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let stream = form_flag(&form, "stream");
    if !stream {
        for option in ["stream_include_usage", "stream_continuous_usage_stats"] {
            if form_flag(&form, option) {
                return bad_request(
                    "Stream options can only be defined when `stream=True`.",
                    Some(option),
                );
            }
        }
    }
    let model = state.config.model.clone();
    match form.get("response_format").and_then(Value::as_str) {
        None | Some("json" | "text") => {}
        Some("verbose_json") if stream => {
            return bad_request("verbose_json format doesn't support streaming case", None);
        }
        Some("verbose_json") => {
            return bad_request(
                &format!("Currently do not support verbose_json for {model}"),
                None,
            );
        }
        Some(_) => {
            return bad_request(
                "Currently only support response_format: `text`, `json` or `verbose_json`",
                None,
            );
        }
    }
    let Some((seconds, samples)) = decode_wav(&file) else {
        return bad_request("Invalid or unsupported audio file.", None);
    };
    let words = words(samples, seconds);
    let mut guard = AbortGuard::new(state.clone(), request_id.clone());
    if !stream {
        tokio::time::sleep(state.config.first_token_delay).await;
        guard.finish();
        let text = words.join(" ");
        return match transcribe {
            true => axum::Json(TranscriptionResponse {
                text,
                usage: DurationUsage {
                    r#type: "duration",
                    seconds: seconds.ceil() as u64,
                },
            })
            .into_response(),
            false => axum::Json(TranslationResponse { text }).into_response(),
        };
    }
    let (task, object) = match transcribe {
        true => ("transcribe", "transcription.chunk"),
        false => ("translate", "translation.chunk"),
    };
    let id = format!("{task}-{request_id}");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prompt = form
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let prompt_tokens = 4 + tokenize(prompt).len();
    let mut events: Vec<String> = Vec::with_capacity(words.len() + 2);
    for (i, word) in words.iter().enumerate() {
        let last = i + 1 == words.len();
        let content = match i {
            0 => word.to_string(),
            _ => format!(" {word}"),
        };
        let chunk = StreamChunk {
            id: &id,
            object,
            created,
            model: &model,
            choices: vec![StreamChoice {
                delta: Delta { content: &content },
                finish_reason: last.then_some("stop"),
                stop_reason: last.then_some(Value::Null),
            }],
            usage: None,
        };
        events.push(serde_json::to_string(&chunk).unwrap_or_default());
    }
    if form_flag(&form, "stream_include_usage") {
        let usage = StreamChunk {
            id: &id,
            object,
            created,
            model: &model,
            choices: Vec::new(),
            usage: Some(StreamUsage {
                prompt_tokens,
                total_tokens: prompt_tokens + words.len(),
                completion_tokens: words.len(),
            }),
        };
        events.push(serde_json::to_string(&usage).unwrap_or_default());
    }
    events.push("[DONE]".into());
    let (first_delay, delay) = (state.config.first_token_delay, state.config.token_delay);
    let frames = futures::stream::unfold(
        (events.into_iter().enumerate(), guard),
        move |(mut events, mut guard)| async move {
            let (i, event) = events.next()?;
            tokio::time::sleep(if i == 0 { first_delay } else { delay }).await;
            if event == "[DONE]" {
                guard.finish();
            }
            let frame = Bytes::from(format!("data: {event}\n\n"));
            Some((Ok::<_, Infallible>(frame), (events, guard)))
        },
    );
    let mut response = Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wav_file_is_heard_for_its_length_and_samples() {
        let file = wav(1500, 1);
        let (seconds, samples) = decode_wav(&file).unwrap();
        assert!((seconds - 1.5).abs() < 1e-9, "{seconds}");
        assert_eq!(words(samples, seconds).len(), 3);
        assert_eq!(words(samples, seconds), words(samples, seconds));
        let other = wav(1500, 2);
        let (_, other_samples) = decode_wav(&other).unwrap();
        assert_ne!(words(samples, seconds), words(other_samples, seconds));
        assert!(decode_wav(b"ID3 not a wav").is_none());
    }
}
