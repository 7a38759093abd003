//! A batch's end: its answered lines written, in input order, to an output
//! file (2xx answers) and an error file (the rest, and the lines a
//! cancelled or expired batch never ran), one JSON line each in OpenAI's
//! batch output shape. The files' ids follow from the batch's, so a
//! finalizer that dies half-way is replaced by one that rewrites them.

use std::sync::Arc;

use serde_json::json;

use super::files::FileWriter;
use super::{BatchConfig, BatchError, now};
use crate::backends::store::Store;
use crate::backends::store::batches::{ANSWERED, BatchRecord, FileRecord, ItemRow};

/// Lines read at once.
const PAGE: i64 = 500;

/// Writes a finalizing batch's files and ends it as its `ending` says.
pub async fn finalize(
    store: &Arc<dyn Store>,
    config: &BatchConfig,
    batch: &BatchRecord,
) -> Result<(), BatchError> {
    let ending = batch.ending.as_deref().unwrap_or("completed");
    let suffix = batch.id.strip_prefix("batch_").unwrap_or(&batch.id);
    let output_id = format!("file-{suffix}-output");
    let error_id = format!("file-{suffix}-errors");
    let mut output = new_file(store, config, batch, &output_id, "batch_output.jsonl").await?;
    let mut errors = new_file(store, config, batch, &error_id, "batch_errors.jsonl").await?;
    let mut after = 0;
    loop {
        let rows = store.items_page(&batch.id, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.line;
        for row in &rows {
            let (line, ok) = output_line(&batch.id, row, ending);
            let file = match ok {
                true => &mut output,
                false => &mut errors,
            };
            file.write(line.as_bytes()).await?;
        }
    }
    let output_id = keep_if_written(output, "batch_output").await?;
    let error_id = keep_if_written(errors, "batch_errors").await?;
    store
        .end_batch(&batch.id, output_id.as_deref(), error_id.as_deref(), now())
        .await?;
    Ok(())
}

/// A fresh file (whatever an earlier finalizer left under its id is removed).
async fn new_file(
    store: &Arc<dyn Store>,
    config: &BatchConfig,
    batch: &BatchRecord,
    id: &str,
    filename: &str,
) -> Result<FileWriter, BatchError> {
    store.delete_file(id).await?;
    let record = FileRecord {
        id: id.to_string(),
        owner: batch.owner.clone(),
        filename: filename.to_string(),
        purpose: String::new(),
        bytes: 0,
        created_at: now(),
        expires_at: Some(now() + config.file_retention.as_secs() as i64),
    };
    FileWriter::begin(store.clone(), record, config.file_part_bytes.get()).await
}

async fn keep_if_written(file: FileWriter, purpose: &str) -> Result<Option<String>, BatchError> {
    if file.written() == 0 {
        file.abort().await;
        return Ok(None);
    }
    Ok(Some(file.finish(purpose).await?.id))
}

/// One line of the output (true) or error file (false).
fn output_line(batch_id: &str, row: &ItemRow, ending: &str) -> (String, bool) {
    let custom_id = serde_json::Value::String(row.custom_id.clone());
    if row.state != ANSWERED {
        let (code, message) = match ending {
            "expired" => (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
            _ => (
                "batch_cancelled",
                "This request was not executed because the batch was cancelled.",
            ),
        };
        let line = json!({
            "id": format!("batch_req_{batch_id}_{}", row.line),
            "custom_id": custom_id,
            "response": null,
            "error": {"code": code, "message": message},
        });
        return (format!("{line}\n"), false);
    }
    let status = row.status_code.unwrap_or(500);
    let request_id = row.request_id.as_deref().unwrap_or_default();
    // The answer's body is written as it was answered, not re-encoded.
    let body = row
        .output
        .as_deref()
        .and_then(|body| std::str::from_utf8(body).ok())
        .filter(|body| serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok())
        .unwrap_or("null");
    let line = format!(
        "{{\"id\":{},\"custom_id\":{custom_id},\"response\":{{\"status_code\":{status},\"request_id\":{},\"body\":{body}}},\"error\":null}}\n",
        json!(format!("batch_req_{request_id}")),
        json!(request_id),
    );
    (line, (200..300).contains(&status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: i32, status: i32, output: &str) -> ItemRow {
        ItemRow {
            line: 3,
            custom_id: "req-\"3\"".into(),
            state,
            status_code: Some(status),
            request_id: Some("abc".into()),
            output: Some(output.as_bytes().to_vec()),
        }
    }

    #[test]
    fn an_answered_line_carries_the_body_as_answered() {
        let (line, ok) = output_line("batch_1", &row(ANSWERED, 200, "{\"x\": 1}"), "completed");
        assert!(ok);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["custom_id"], "req-\"3\"");
        assert_eq!(parsed["response"]["status_code"], 200);
        assert_eq!(parsed["response"]["request_id"], "abc");
        assert_eq!(parsed["response"]["body"]["x"], 1);
        assert!(line.contains("{\"x\": 1}"), "{line}");
        assert!(parsed["error"].is_null());
    }

    #[test]
    fn failures_and_lines_never_run_go_to_the_error_file() {
        let (line, ok) = output_line(
            "batch_1",
            &row(ANSWERED, 400, "{\"error\":{}}"),
            "completed",
        );
        assert!(!ok);
        assert!(line.contains("\"status_code\":400"));
        let (line, ok) = output_line("batch_1", &row(0, 0, ""), "expired");
        assert!(!ok);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["error"]["code"], "batch_expired");
        assert!(parsed["response"].is_null());
    }
}
