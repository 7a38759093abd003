//! OpenAI's Files and Batch APIs on sluice's own queue: files kept in the
//! store's database, batches validated before any line runs, and each
//! line run through the pipeline in the queue's batch lane, which workers
//! serve only from the capacity interactive traffic leaves.
//!
//! [`Batches`] is what the edge's handlers call (each operation checks the
//! caller owns what it names: its tenant, the key's team or the key). [`runner`] runs
//! the batches: every gateway runs one, and they share the work through
//! leases in the database, so any of them may die without losing a line.

mod api;
mod config;
mod files;
mod output;
pub mod runner;
mod validate;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;

use crate::backends::store::batches::{BatchRecord, FileRecord};
use crate::backends::store::{Store, StoreError};
use crate::error::GatewayError;
use crate::pipeline::state::Stages;
use crate::protocol::Route;
use crate::tenancy::Identity;

pub use config::{BatchConfig, parse_window};
pub use files::{FileWriter, content_stream};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} is larger than {key} ({limit} bytes)")]
    TooLarge {
        what: &'static str,
        key: &'static str,
        limit: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BatchError> for GatewayError {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::NotFound(message) => GatewayError::NotFound(message),
            BatchError::Invalid(message) => GatewayError::BadRequest(message),
            BatchError::TooLarge { .. } => GatewayError::Rejected {
                status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                message: err.to_string(),
            },
            BatchError::Store(err) => GatewayError::Backend(err.to_string()),
        }
    }
}

/// The Files and Batch APIs, for the edge.
pub struct Batches {
    store: Arc<dyn Store>,
    stages: Arc<Stages>,
    config: BatchConfig,
    /// Wakes this gateway's runner when a batch is created or cancelled.
    wake: Arc<Notify>,
}

/// `POST /v1/batches`'s body.
#[derive(Debug, Deserialize)]
pub struct NewBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// A page of a list: after this id, this many.
#[derive(Debug, Default, Deserialize)]
pub struct Page {
    pub after: Option<String>,
    pub limit: Option<i64>,
    pub order: Option<String>,
    pub purpose: Option<String>,
}

/// The routes a batch may name as its `endpoint`: every POST route with a
/// JSON body (uploads and a stored response's cancel are not).
pub fn batch_route(endpoint: &str) -> Option<Route> {
    Route::from_path(endpoint).filter(|route| {
        !route.is_get() && !route.takes_upload() && *route != Route::ResponsesCancel
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Batches {
    pub fn new(store: Arc<dyn Store>, stages: Arc<Stages>, config: BatchConfig) -> Self {
        Self {
            store,
            stages,
            config,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Starts a file upload for `identity`: the caller writes the content
    /// and finishes it.
    pub async fn begin_upload(
        &self,
        identity: &Identity,
        filename: &str,
    ) -> Result<FileWriter, BatchError> {
        let owner = identity.tenant();
        let held = self.store.owner_file_bytes(&owner).await?;
        let room = self
            .config
            .max_owner_bytes
            .get()
            .saturating_sub(held as u64);
        let (limit, key) = match room < self.config.max_file_bytes.get() {
            true => (room, "batch.max_owner_bytes (with the files already held)"),
            false => (self.config.max_file_bytes.get(), "batch.max_file_bytes"),
        };
        let record = FileRecord {
            id: format!("file-{}", uuid::Uuid::now_v7().simple()),
            owner,
            filename: filename.to_string(),
            purpose: String::new(),
            bytes: 0,
            created_at: now(),
            expires_at: Some(now() + self.config.file_retention.as_secs() as i64),
        };
        FileWriter::begin(
            self.store.clone(),
            record,
            self.config.file_part_bytes.get(),
        )
        .await
        .map(|writer| writer.limited(limit, key))
    }

    /// A file `identity` may read.
    pub async fn file(&self, identity: &Identity, id: &str) -> Result<FileRecord, BatchError> {
        self.store
            .find_file(id)
            .await?
            .filter(|file| file.owner == identity.tenant())
            .ok_or_else(|| BatchError::NotFound(format!("No such File object: {id}")))
    }

    pub async fn file_json(&self, identity: &Identity, id: &str) -> Result<Value, BatchError> {
        Ok(api::file(&self.file(identity, id).await?))
    }

    pub async fn list_files(&self, identity: &Identity, page: &Page) -> Result<Value, BatchError> {
        let limit = page.limit.unwrap_or(10_000).clamp(1, 10_000);
        let ascending = page.order.as_deref() == Some("asc");
        let mut files = self
            .store
            .list_files(
                &identity.tenant(),
                page.purpose.as_deref(),
                page.after.as_deref(),
                limit + 1,
                ascending,
            )
            .await?;
        let has_more = files.len() as i64 > limit;
        files.truncate(limit as usize);
        Ok(api::list(files.iter().map(api::file).collect(), has_more))
    }

    pub async fn delete_file(&self, identity: &Identity, id: &str) -> Result<Value, BatchError> {
        self.file(identity, id).await?;
        self.store.delete_file(id).await?;
        Ok(serde_json::json!({"id": id, "object": "file", "deleted": true}))
    }

    /// Creates a batch; it is validated and run in the background.
    pub async fn create(&self, identity: &Identity, new: NewBatch) -> Result<Value, BatchError> {
        if batch_route(&new.endpoint).is_none() {
            return Err(BatchError::Invalid(format!(
                "invalid value for `endpoint`: '{}' is not a route sluice can run in a batch (POST routes with a JSON body, such as /v1/chat/completions, /v1/completions, /v1/embeddings)",
                new.endpoint
            )));
        }
        let window = parse_window(&new.completion_window)
            .filter(|window| *window <= self.config.max_completion_window)
            .ok_or_else(|| {
                BatchError::Invalid(format!(
                    "invalid value for `completion_window`: '{}'; give a duration such as 24h, at most batch.max_completion_window_secs ({} s)",
                    new.completion_window,
                    self.config.max_completion_window.as_secs()
                ))
            })?;
        let metadata = match new.metadata {
            None => None,
            Some(metadata) => Some(check_metadata(metadata)?),
        };
        let input = self.file(identity, &new.input_file_id).await?;
        if input.purpose != "batch" {
            return Err(BatchError::Invalid(format!(
                "file {} has purpose '{}'; a batch's input file must have purpose 'batch'",
                input.id, input.purpose
            )));
        }
        let created_at = now();
        let batch = BatchRecord {
            id: format!("batch_{}", uuid::Uuid::now_v7().simple()),
            owner: identity.tenant(),
            key_id: identity.key_id.clone(),
            endpoint: new.endpoint,
            input_file_id: input.id,
            output_file_id: None,
            error_file_id: None,
            status: "validating".into(),
            completion_window: new.completion_window,
            metadata,
            errors: None,
            total: 0,
            completed: 0,
            failed: 0,
            created_at,
            in_progress_at: None,
            expires_at: created_at + window.as_secs() as i64,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            ending: None,
        };
        self.store.insert_batch(&batch).await?;
        self.wake.notify_one();
        Ok(api::batch(&batch))
    }

    async fn batch(&self, identity: &Identity, id: &str) -> Result<BatchRecord, BatchError> {
        self.store
            .find_batch(id)
            .await?
            .filter(|batch| batch.owner == identity.tenant())
            .ok_or_else(|| BatchError::NotFound(format!("No such batch: {id}")))
    }

    pub async fn batch_json(&self, identity: &Identity, id: &str) -> Result<Value, BatchError> {
        Ok(api::batch(&self.batch(identity, id).await?))
    }

    pub async fn list_batches(
        &self,
        identity: &Identity,
        page: &Page,
    ) -> Result<Value, BatchError> {
        let limit = page.limit.unwrap_or(20).clamp(1, 100);
        let mut batches = self
            .store
            .list_batches(&identity.tenant(), page.after.as_deref(), limit + 1)
            .await?;
        let has_more = batches.len() as i64 > limit;
        batches.truncate(limit as usize);
        Ok(api::list(
            batches.iter().map(api::batch).collect(),
            has_more,
        ))
    }

    /// Stops a batch taking new lines; it ends `cancelled` with what it has.
    pub async fn cancel(&self, identity: &Identity, id: &str) -> Result<Value, BatchError> {
        let batch = self.batch(identity, id).await?;
        if !self.store.cancel_batch(id, now()).await? && batch.status != "cancelling" {
            return Err(BatchError::Invalid(format!(
                "batch {id} cannot be cancelled: it is {}",
                batch.status
            )));
        }
        self.wake.notify_one();
        self.batch_json(identity, id).await
    }
}

/// OpenAI's rules for `metadata`: at most 16 pairs of strings, keys up to
/// 64 characters, values up to 512.
fn check_metadata(metadata: serde_json::Map<String, Value>) -> Result<String, BatchError> {
    let invalid = |message: String| BatchError::Invalid(format!("invalid `metadata`: {message}"));
    if metadata.len() > 16 {
        return Err(invalid(format!("{} pairs; at most 16", metadata.len())));
    }
    for (key, value) in &metadata {
        if key.chars().count() > 64 {
            return Err(invalid(format!("key '{key}' is longer than 64 characters")));
        }
        match value {
            Value::String(value) if value.chars().count() <= 512 => {}
            Value::String(_) => {
                return Err(invalid(format!(
                    "the value of '{key}' is longer than 512 characters"
                )));
            }
            _ => return Err(invalid(format!("the value of '{key}' is not a string"))),
        }
    }
    Ok(Value::Object(metadata).to_string())
}
