//! What the store keeps for OpenAI's Files and Batch APIs: files in parts,
//! batches, and one row per input line. The rows are the batch's durable
//! progress: a line is claimed with a lease by one runner at a time, and its
//! answer is written once (the write names the runner that holds the
//! lease), so a runner killed mid-line loses nothing and a line is never
//! answered twice. Timestamps are Unix seconds; leases Unix milliseconds.

use async_trait::async_trait;

use super::StoreError;

/// A file, as listed (complete files only).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRecord {
    pub id: String,
    /// `key:<id>` or `team:<id>`: who may read it.
    pub owner: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A batch as stored; `status` is one of OpenAI's batch statuses.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BatchRecord {
    pub id: String,
    pub owner: String,
    pub key_id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub status: String,
    pub completion_window: String,
    /// JSON object of strings.
    pub metadata: Option<String>,
    /// JSON array of OpenAI's `BatchError`s.
    pub errors: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    /// While finalizing: the status it ends in.
    pub ending: Option<String>,
}

/// A validated input line, to be run.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// 1-based, as OpenAI's errors count lines.
    pub line: i32,
    pub custom_id: String,
    pub body: Vec<u8>,
}

/// A line a runner has claimed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedItem {
    pub batch_id: String,
    pub line: i32,
    pub custom_id: String,
    pub body: Vec<u8>,
    /// Claims so far, this one included.
    pub attempts: i32,
}

/// What a line was answered with.
#[derive(Debug, Clone)]
pub struct ItemResult {
    pub status_code: i32,
    pub request_id: String,
    /// The answer's body, or its error's.
    pub output: Vec<u8>,
}

impl ItemResult {
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code)
    }
}

/// A line as the finalizer reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub line: i32,
    pub custom_id: String,
    /// 2 when answered.
    pub state: i32,
    pub status_code: Option<i32>,
    pub request_id: Option<String>,
    pub output: Option<Vec<u8>>,
}

/// Item states.
pub const WAITING: i32 = 0;
pub const RUNNING: i32 = 1;
pub const ANSWERED: i32 = 2;

#[async_trait]
pub trait BatchStore: Send + Sync {
    /// Starts a file; it is listed once [`BatchStore::complete_file`] runs.
    async fn insert_file(&self, file: &FileRecord) -> Result<(), StoreError>;
    async fn put_file_part(&self, file_id: &str, part: i32, data: &[u8]) -> Result<(), StoreError>;
    /// Marks a file whole, with its size and purpose (a form may name the
    /// purpose after the file).
    async fn complete_file(
        &self,
        file_id: &str,
        bytes: i64,
        purpose: &str,
    ) -> Result<(), StoreError>;
    /// A complete file.
    async fn find_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError>;
    /// An owner's complete files, newest first (or oldest first), after the file `after`.
    async fn list_files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        ascending: bool,
    ) -> Result<Vec<FileRecord>, StoreError>;
    /// Part `part` (from 0) of a file's content; `None` past its end.
    async fn file_part(&self, file_id: &str, part: i32) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes a file and its content; false when there was none.
    async fn delete_file(&self, id: &str) -> Result<bool, StoreError>;
    /// Removes a file's content, keeping its row (an output rewritten).
    async fn clear_file_parts(&self, file_id: &str) -> Result<(), StoreError>;
    /// Bytes held by an owner's files, whole or being written.
    async fn owner_file_bytes(&self, owner: &str) -> Result<i64, StoreError>;
    /// Files past their expiry, and uploads abandoned before `stale_before`.
    async fn expired_files(
        &self,
        now: i64,
        stale_before: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError>;

    async fn insert_batch(&self, batch: &BatchRecord) -> Result<(), StoreError>;
    async fn find_batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError>;
    /// An owner's batches, newest first, after the batch `after`.
    async fn list_batches(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchRecord>, StoreError>;
    /// Takes the lease of one batch in `status` whose lease has run out.
    async fn lease_batch(
        &self,
        status: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<BatchRecord>, StoreError>;
    /// Batches being run or cancelled.
    async fn active_batches(&self) -> Result<Vec<BatchRecord>, StoreError>;
    /// validating → in_progress with `total` lines.
    async fn start_batch(&self, id: &str, total: i64, now: i64) -> Result<bool, StoreError>;
    /// validating → failed, with OpenAI's `errors` list.
    async fn fail_batch(&self, id: &str, errors: &str, now: i64) -> Result<bool, StoreError>;
    /// validating or in_progress → cancelling.
    async fn cancel_batch(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// `from` → finalizing, to end as `ending`, leased until `until_ms`.
    async fn begin_finalizing(
        &self,
        id: &str,
        from: &str,
        ending: &str,
        now: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError>;
    /// finalizing → its ending, with its output and error files.
    async fn end_batch(
        &self,
        id: &str,
        output_file_id: Option<&str>,
        error_file_id: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError>;

    async fn insert_items(&self, batch_id: &str, items: &[NewItem]) -> Result<(), StoreError>;
    async fn delete_items(&self, batch_id: &str) -> Result<(), StoreError>;
    /// Claims up to `limit` lines of running batches that are waiting or
    /// whose lease ran out, oldest batch first.
    async fn claim_items(
        &self,
        runner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedItem>, StoreError>;
    /// Extends the leases of every line `runner` holds.
    async fn renew_items(&self, runner: &str, until_ms: i64) -> Result<(), StoreError>;
    /// Writes a line's answer if `runner` still holds it, and counts it in
    /// its batch; false when another runner took it over.
    async fn finish_item(
        &self,
        batch_id: &str,
        line: i32,
        runner: &str,
        result: &ItemResult,
    ) -> Result<bool, StoreError>;
    /// Gives back every line `runner` holds (it is shutting down).
    async fn release_runner(&self, runner: &str) -> Result<(), StoreError>;
    /// Gives a line back to be run again.
    async fn release_item(&self, batch_id: &str, line: i32, runner: &str)
    -> Result<(), StoreError>;
    /// Lines of a batch running under a live lease.
    async fn running_items(&self, batch_id: &str, now_ms: i64) -> Result<i64, StoreError>;
    /// A batch's lines in order, after `after_line`.
    async fn items_page(
        &self,
        batch_id: &str,
        after_line: i32,
        limit: i64,
    ) -> Result<Vec<ItemRow>, StoreError>;
}
