//! Speech to text: `POST /v1/audio/transcriptions` and
//! `POST /v1/audio/translations`, multipart form uploads (`file`, `model`,
//! `language`, `prompt`, `response_format`, `temperature`, `stream`,
//! `stream_include_usage`, ...). Sluice reads the form's fields to route,
//! limit and log by (`model`, `stream`, the size of `file`) and forwards the
//! client's own bytes with the client's own `content-type` (its boundary),
//! re-encoding the form only when it must change a field: the model of an
//! alias, or `stream_include_usage` on a stream, so that vLLM reports the
//! tokens a limit counts. vLLM checks the rest.

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::Route;
use super::forwarded::invalid as bad;
use crate::error::GatewayError;

/// One part of the form, as received.
#[derive(Debug, Clone, PartialEq)]
struct FormField {
    name: String,
    file_name: Option<String>,
    content_type: Option<String>,
    data: Bytes,
}

/// A transcription or translation request.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioRequest {
    route: Route,
    model: String,
    /// The body's `content-type` (with its boundary) and bytes as sent upstream.
    content_type: String,
    /// The client's boundary, which its form's content does not hold: a
    /// re-encoded form keeps it.
    boundary: String,
    raw: Bytes,
    fields: Vec<FormField>,
    stream: bool,
    /// Whether the client asked for the usage chunk of a stream.
    include_usage: bool,
    file_bytes: usize,
    prompt: String,
}

/// A form boolean as vLLM's (pydantic's) form parsing reads it.
fn form_bool(field: &str, value: &[u8]) -> Result<bool, GatewayError> {
    match std::str::from_utf8(value).map(|v| v.trim().to_ascii_lowercase()) {
        Ok(v) if ["true", "1", "yes", "on", "t", "y"].contains(&v.as_str()) => Ok(true),
        Ok(v) if ["false", "0", "no", "off", "f", "n", ""].contains(&v.as_str()) => Ok(false),
        _ => Err(bad(field, "must be a boolean")),
    }
}

fn text(field: &str, value: &[u8]) -> Result<String, GatewayError> {
    String::from_utf8(value.to_vec()).map_err(|_| bad(field, "must be UTF-8 text"))
}

impl AudioRequest {
    /// Parses a multipart body sent to `route` with `content_type`.
    pub async fn parse(
        route: Route,
        content_type: Option<&str>,
        raw: Bytes,
    ) -> Result<Self, GatewayError> {
        let content_type = content_type.unwrap_or_default();
        let boundary = multer::parse_boundary(content_type).map_err(|_| {
            GatewayError::BadRequest(format!(
                "{} takes a multipart/form-data upload (`file`, `model`, ...); the request's content-type is `{content_type}`",
                route.path()
            ))
        })?;
        let body = futures::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(
            raw.clone(),
        )));
        let mut form = multer::Multipart::new(body, boundary.clone());
        let mut fields = Vec::new();
        loop {
            let field = match form.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(err) => {
                    return Err(GatewayError::BadRequest(format!(
                        "the multipart body cannot be read: {err}"
                    )));
                }
            };
            let name = field.name().unwrap_or_default().to_string();
            let file_name = field.file_name().map(str::to_string);
            let part_type = field.content_type().map(ToString::to_string);
            let data = field.bytes().await.map_err(|err| {
                GatewayError::BadRequest(format!("the multipart body cannot be read: {err}"))
            })?;
            fields.push(FormField {
                name,
                file_name,
                content_type: part_type,
                data,
            });
        }
        let mut request = Self {
            route,
            model: String::new(),
            content_type: content_type.to_string(),
            boundary,
            raw,
            fields,
            stream: false,
            include_usage: false,
            file_bytes: 0,
            prompt: String::new(),
        };
        let mut has_file = false;
        for field in &request.fields {
            let value = &field.data;
            match field.name.as_str() {
                "file" if field.file_name.is_none() => {
                    return Err(bad("file", "must be a file upload, not a text field"));
                }
                "file" => {
                    has_file = true;
                    request.file_bytes = value.len();
                }
                "model" => request.model = text("model", value)?,
                "prompt" => request.prompt = text("prompt", value)?,
                "stream" => request.stream = form_bool("stream", value)?,
                "stream_include_usage" => {
                    request.include_usage = form_bool("stream_include_usage", value)?
                }
                _ => {}
            }
        }
        if !has_file {
            return Err(GatewayError::BadRequest("`file` is required".into()));
        }
        if request.model.trim().is_empty() {
            return Err(GatewayError::BadRequest(
                "`model` is required: the gateway routes by it".into(),
            ));
        }
        if request.stream && !request.include_usage {
            // vLLM counts a stream's tokens only in the usage chunk.
            request.set_field("stream_include_usage", "true");
        }
        Ok(request)
    }

    pub fn route(&self) -> Route {
        self.route
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// Whether the client asked for a stream's usage chunk (sluice always
    /// asks upstream, and drops it for clients that did not).
    pub fn wants_usage_chunk(&self) -> bool {
        self.include_usage
    }

    /// The size of the uploaded audio, in bytes.
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    /// The `prompt` field (text that guides the model's style), if any.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// Sends the request for `model` instead (an alias resolved).
    pub fn set_model(&mut self, model: String) {
        self.set_field("model", &model);
        self.model = model;
    }

    /// The body's `content-type`, with the boundary of [`Self::upstream_body`].
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    pub fn upstream_body(&self) -> Bytes {
        self.raw.clone()
    }

    /// Sets a text field (replacing every field of that name) and re-encodes
    /// the form (with the client's boundary and content-type).
    fn set_field(&mut self, name: &str, value: &str) {
        self.fields.retain(|field| field.name != name);
        self.fields.push(FormField {
            name: name.to_string(),
            file_name: None,
            content_type: None,
            data: Bytes::copy_from_slice(value.as_bytes()),
        });
        let boundary = &self.boundary;
        let mut body = BytesMut::with_capacity(self.raw.len() + 256);
        for field in &self.fields {
            body.put_slice(format!("--{boundary}\r\n").as_bytes());
            let mut disposition = format!(
                "Content-Disposition: form-data; name=\"{}\"",
                quoted(&field.name)
            );
            if let Some(file_name) = &field.file_name {
                disposition.push_str(&format!("; filename=\"{}\"", quoted(file_name)));
            }
            body.put_slice(disposition.as_bytes());
            body.put_slice(b"\r\n");
            if let Some(content_type) = &field.content_type {
                body.put_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
            }
            body.put_slice(b"\r\n");
            body.put_slice(&field.data);
            body.put_slice(b"\r\n");
        }
        body.put_slice(format!("--{boundary}--\r\n").as_bytes());
        self.raw = body.freeze();
    }

    /// A digest of the form's fields in order (not of its boundary, which
    /// differs on every upload of the same file).
    fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for field in &self.fields {
            for part in [
                field.name.as_bytes(),
                field.file_name.as_deref().unwrap_or_default().as_bytes(),
                &field.data,
            ] {
                hasher.update((part.len() as u64).to_le_bytes());
                hasher.update(part);
            }
        }
        hex::encode(hasher.finalize())
    }

    /// In the route's own namespace, of the fields as sent upstream.
    pub fn default_cache_key(&self) -> String {
        let namespace = match self.route {
            Route::Translations => "translations-v1",
            _ => "transcriptions-v1",
        };
        format!("{namespace}:{}", self.digest())
    }

    /// The form's text fields as JSON (the file as its name and size).
    pub fn to_json(&self) -> String {
        let mut fields = serde_json::Map::new();
        for field in &self.fields {
            let value = match &field.file_name {
                Some(name) => serde_json::json!({"filename": name, "bytes": field.data.len()}),
                None => serde_json::Value::String(String::from_utf8_lossy(&field.data).into()),
            };
            fields.insert(field.name.clone(), value);
        }
        serde_json::Value::Object(fields).to_string()
    }
}

/// A form field or file name inside a quoted header parameter.
fn quoted(name: &str) -> String {
    name.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str, fields: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut body = Vec::new();
        for (name, file, data) in fields {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(file) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body.into()
    }

    async fn parse(fields: &[(&str, Option<&str>, &[u8])]) -> Result<AudioRequest, String> {
        let content_type = "multipart/form-data; boundary=XyZ";
        AudioRequest::parse(
            Route::Transcriptions,
            Some(content_type),
            form("XyZ", fields),
        )
        .await
        .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn reads_the_fields_and_forwards_the_bytes_unchanged() {
        let fields: &[(&str, Option<&str>, &[u8])] = &[
            ("file", Some("a.wav"), b"RIFF\x00\x01binary"),
            ("model", None, b"whisper"),
            ("language", None, b"en"),
        ];
        let request = parse(fields).await.unwrap();
        assert_eq!(request.model(), "whisper");
        assert!(!request.is_stream());
        assert_eq!(request.file_bytes(), 12);
        assert_eq!(request.upstream_body(), form("XyZ", fields));
        assert_eq!(request.content_type(), "multipart/form-data; boundary=XyZ");
    }

    #[tokio::test]
    async fn an_alias_and_a_stream_re_encode_the_form() {
        let mut request = parse(&[
            ("file", Some("a.wav"), b"\x00\xff audio"),
            ("model", None, b"alias"),
            ("stream", None, b"true"),
        ])
        .await
        .unwrap();
        assert!(request.is_stream());
        assert!(!request.wants_usage_chunk());
        request.set_model("whisper-large".into());
        let again = AudioRequest::parse(
            Route::Transcriptions,
            Some(request.content_type()),
            request.upstream_body(),
        )
        .await
        .unwrap();
        assert_eq!(again.model(), "whisper-large");
        assert!(
            again.wants_usage_chunk(),
            "asked upstream for the usage chunk"
        );
        assert_eq!(again.file_bytes(), 8);
        assert_eq!(again.fields[0].data.as_ref(), b"\x00\xff audio");
        assert_eq!(again.fields[0].file_name.as_deref(), Some("a.wav"));
        assert_eq!(again.default_cache_key(), request.default_cache_key());
    }

    #[tokio::test]
    async fn malformed_uploads_are_refused_naming_the_field() {
        for (fields, expected) in [
            (vec![("model", None, &b"m"[..])], "`file`"),
            (vec![("file", Some("a.wav"), &b"x"[..])], "`model`"),
            (
                vec![("file", None, &b"x"[..]), ("model", None, b"m")],
                "`file`",
            ),
            (
                vec![
                    ("file", Some("a.wav"), &b"x"[..]),
                    ("model", None, b"m"),
                    ("stream", None, b"maybe"),
                ],
                "`stream`",
            ),
        ] {
            let err = parse(&fields).await.unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let err = AudioRequest::parse(Route::Transcriptions, Some("application/json"), "{}".into())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("multipart/form-data"), "{err}");
    }
}
