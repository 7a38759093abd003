//! [`BatchStore`] on SQLite and PostgreSQL: the same SQL for both but the
//! claim, which PostgreSQL runs with `FOR UPDATE SKIP LOCKED` so that
//! runners on several edges never wait on each other's lines (SQLite has
//! one writer, so its claim cannot race).

use async_trait::async_trait;

use super::batches::{
    ANSWERED, BatchRecord, BatchStore, ClaimedItem, FileRecord, ItemResult, ItemRow, NewItem,
    RUNNING, WAITING,
};
use super::{PostgresStore, SqliteStore, StoreError};

const FILE_COLUMNS: &str = "id, owner, filename, purpose, bytes, created_at, expires_at";
const BATCH_COLUMNS: &str = "id, owner, key_id, endpoint, input_file_id, output_file_id, \
     error_file_id, status, completion_window, metadata, errors, total, completed, failed, \
     created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, \
     cancelling_at, cancelled_at, ending";

const CLAIM_SQLITE: &str = "UPDATE batch_items SET state = 1, runner = $1, lease_until = $2, \
     attempts = attempts + 1 WHERE (batch_id, line) IN (SELECT i.batch_id, i.line \
     FROM batch_items i JOIN batches b ON b.id = i.batch_id \
     WHERE b.status = 'in_progress' AND (i.state = 0 OR (i.state = 1 AND i.lease_until < $3)) \
     ORDER BY b.created_at, i.batch_id, i.line LIMIT $4) \
     RETURNING batch_id, line, custom_id, body, attempts";
const CLAIM_POSTGRES: &str = "UPDATE batch_items SET state = 1, runner = $1, lease_until = $2, \
     attempts = attempts + 1 WHERE (batch_id, line) IN (SELECT i.batch_id, i.line \
     FROM batch_items i JOIN batches b ON b.id = i.batch_id \
     WHERE b.status = 'in_progress' AND (i.state = 0 OR (i.state = 1 AND i.lease_until < $3)) \
     ORDER BY b.created_at, i.batch_id, i.line LIMIT $4 FOR UPDATE OF i SKIP LOCKED) \
     RETURNING batch_id, line, custom_id, body, attempts";

/// Rows per multi-row INSERT of lines.
const ITEMS_PER_INSERT: usize = 500;

macro_rules! batch_store {
    ($name:ident, $db:ty, $claim:expr) => {
        #[async_trait]
        impl BatchStore for $name {
            async fn insert_file(&self, file: &FileRecord) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO files (id, owner, filename, purpose, bytes, complete, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, FALSE, $6, $7)",
                )
                .bind(&file.id)
                .bind(&file.owner)
                .bind(&file.filename)
                .bind(&file.purpose)
                .bind(file.bytes)
                .bind(file.created_at)
                .bind(file.expires_at)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn put_file_part(
                &self,
                file_id: &str,
                part: i32,
                data: &[u8],
            ) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO file_parts (file_id, part, data) VALUES ($1, $2, $3)")
                    .bind(file_id)
                    .bind(part)
                    .bind(data)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn complete_file(
                &self,
                file_id: &str,
                bytes: i64,
                purpose: &str,
            ) -> Result<(), StoreError> {
                sqlx::query("UPDATE files SET complete = TRUE, bytes = $2, purpose = $3 WHERE id = $1")
                    .bind(file_id)
                    .bind(bytes)
                    .bind(purpose)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn find_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError> {
                let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND complete");
                Ok(sqlx::query_as(&sql).bind(id).fetch_optional(self.pool()).await?)
            }

            async fn list_files(
                &self,
                owner: &str,
                purpose: Option<&str>,
                after: Option<&str>,
                limit: i64,
                ascending: bool,
            ) -> Result<Vec<FileRecord>, StoreError> {
                let (order, cmp) = match ascending {
                    true => ("ASC", ">"),
                    false => ("DESC", "<"),
                };
                // The cursor is a file: list from its (created_at, id) on.
                let sql = format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE owner = $1 AND complete \
                     AND ($2 IS NULL OR purpose = $2) \
                     AND ($3 IS NULL OR (created_at, id) {cmp} \
                          (SELECT created_at, id FROM files WHERE id = $3)) \
                     ORDER BY created_at {order}, id {order} LIMIT $4"
                );
                Ok(sqlx::query_as(&sql)
                    .bind(owner)
                    .bind(purpose)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(self.pool())
                    .await?)
            }

            async fn file_part(
                &self,
                file_id: &str,
                part: i32,
            ) -> Result<Option<Vec<u8>>, StoreError> {
                let row: Option<(Vec<u8>,)> =
                    sqlx::query_as("SELECT data FROM file_parts WHERE file_id = $1 AND part = $2")
                        .bind(file_id)
                        .bind(part)
                        .fetch_optional(self.pool())
                        .await?;
                Ok(row.map(|(data,)| data))
            }

            async fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
                let mut tx = self.pool().begin().await?;
                sqlx::query("DELETE FROM file_parts WHERE file_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let deleted = sqlx::query("DELETE FROM files WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(deleted > 0)
            }

            async fn clear_file_parts(&self, file_id: &str) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM file_parts WHERE file_id = $1")
                    .bind(file_id)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn owner_file_bytes(&self, owner: &str) -> Result<i64, StoreError> {
                let (bytes,): (Option<i64>,) = sqlx::query_as(
                    "SELECT CAST(SUM(bytes) AS BIGINT) FROM files WHERE owner = $1",
                )
                .bind(owner)
                .fetch_one(self.pool())
                .await?;
                Ok(bytes.unwrap_or(0))
            }

            async fn expired_files(
                &self,
                now: i64,
                stale_before: i64,
                limit: i64,
            ) -> Result<Vec<String>, StoreError> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM files WHERE (expires_at IS NOT NULL AND expires_at <= $1) \
                     OR (NOT complete AND created_at < $2) LIMIT $3",
                )
                .bind(now)
                .bind(stale_before)
                .bind(limit)
                .fetch_all(self.pool())
                .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            async fn insert_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO batches (id, owner, key_id, endpoint, input_file_id, status, \
                     completion_window, metadata, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&b.id)
                .bind(&b.owner)
                .bind(&b.key_id)
                .bind(&b.endpoint)
                .bind(&b.input_file_id)
                .bind(&b.status)
                .bind(&b.completion_window)
                .bind(&b.metadata)
                .bind(b.created_at)
                .bind(b.expires_at)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn find_batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
                let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1");
                Ok(sqlx::query_as(&sql).bind(id).fetch_optional(self.pool()).await?)
            }

            async fn list_batches(
                &self,
                owner: &str,
                after: Option<&str>,
                limit: i64,
            ) -> Result<Vec<BatchRecord>, StoreError> {
                let sql = format!(
                    "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = $1 \
                     AND ($2 IS NULL OR (created_at, id) < \
                          (SELECT created_at, id FROM batches WHERE id = $2)) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                );
                Ok(sqlx::query_as(&sql)
                    .bind(owner)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(self.pool())
                    .await?)
            }

            async fn lease_batch(
                &self,
                status: &str,
                now_ms: i64,
                until_ms: i64,
            ) -> Result<Option<BatchRecord>, StoreError> {
                let candidates: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM batches WHERE status = $1 AND lease_until < $2 \
                     ORDER BY created_at LIMIT 8",
                )
                .bind(status)
                .bind(now_ms)
                .fetch_all(self.pool())
                .await?;
                for (id,) in candidates {
                    let taken = sqlx::query(
                        "UPDATE batches SET lease_until = $1 \
                         WHERE id = $2 AND status = $3 AND lease_until < $4",
                    )
                    .bind(until_ms)
                    .bind(&id)
                    .bind(status)
                    .bind(now_ms)
                    .execute(self.pool())
                    .await?
                    .rows_affected();
                    if taken == 1 {
                        return self.find_batch(&id).await;
                    }
                }
                Ok(None)
            }

            async fn active_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
                let sql = format!(
                    "SELECT {BATCH_COLUMNS} FROM batches \
                     WHERE status IN ('in_progress', 'cancelling') ORDER BY created_at"
                );
                Ok(sqlx::query_as(&sql).fetch_all(self.pool()).await?)
            }

            async fn start_batch(&self, id: &str, total: i64, now: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE batches SET status = 'in_progress', total = $2, in_progress_at = $3, \
                     lease_until = 0 WHERE id = $1 AND status = 'validating'",
                )
                .bind(id)
                .bind(total)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn fail_batch(&self, id: &str, errors: &str, now: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE batches SET status = 'failed', errors = $2, failed_at = $3, \
                     lease_until = 0 WHERE id = $1 AND status = 'validating'",
                )
                .bind(id)
                .bind(errors)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn cancel_batch(&self, id: &str, now: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = $2 \
                     WHERE id = $1 AND status IN ('validating', 'in_progress')",
                )
                .bind(id)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn begin_finalizing(
                &self,
                id: &str,
                from: &str,
                ending: &str,
                now: i64,
                until_ms: i64,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE batches SET status = 'finalizing', ending = $3, finalizing_at = $4, \
                     lease_until = $5 WHERE id = $1 AND status = $2",
                )
                .bind(id)
                .bind(from)
                .bind(ending)
                .bind(now)
                .bind(until_ms)
                .execute(self.pool())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn end_batch(
                &self,
                id: &str,
                output_file_id: Option<&str>,
                error_file_id: Option<&str>,
                now: i64,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE batches SET status = ending, output_file_id = $2, error_file_id = $3, \
                     completed_at = CASE WHEN ending = 'completed' THEN $4 ELSE completed_at END, \
                     expired_at = CASE WHEN ending = 'expired' THEN $4 ELSE expired_at END, \
                     cancelled_at = CASE WHEN ending = 'cancelled' THEN $4 ELSE cancelled_at END, \
                     lease_until = 0 WHERE id = $1 AND status = 'finalizing'",
                )
                .bind(id)
                .bind(output_file_id)
                .bind(error_file_id)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_items(&self, batch_id: &str, items: &[NewItem]) -> Result<(), StoreError> {
                for chunk in items.chunks(ITEMS_PER_INSERT) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO batch_items (batch_id, line, custom_id, body) ",
                    );
                    query.push_values(chunk, |mut row, item| {
                        row.push_bind(batch_id)
                            .push_bind(item.line)
                            .push_bind(&item.custom_id)
                            .push_bind(&item.body);
                    });
                    query.build().execute(self.pool()).await?;
                }
                Ok(())
            }

            async fn delete_items(&self, batch_id: &str) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM batch_items WHERE batch_id = $1")
                    .bind(batch_id)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn claim_items(
                &self,
                runner: &str,
                now_ms: i64,
                until_ms: i64,
                limit: i64,
            ) -> Result<Vec<ClaimedItem>, StoreError> {
                Ok(sqlx::query_as($claim)
                    .bind(runner)
                    .bind(until_ms)
                    .bind(now_ms)
                    .bind(limit)
                    .fetch_all(self.pool())
                    .await?)
            }

            async fn renew_items(&self, runner: &str, until_ms: i64) -> Result<(), StoreError> {
                sqlx::query("UPDATE batch_items SET lease_until = $2 WHERE runner = $1 AND state = $3")
                    .bind(runner)
                    .bind(until_ms)
                    .bind(RUNNING)
                    .execute(self.pool())
                    .await?;
                Ok(())
            }

            async fn finish_item(
                &self,
                batch_id: &str,
                line: i32,
                runner: &str,
                result: &ItemResult,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool().begin().await?;
                let written = sqlx::query(
                    "UPDATE batch_items SET state = $4, status_code = $5, request_id = $6, output = $7 \
                     WHERE batch_id = $1 AND line = $2 AND runner = $3 AND state = $8",
                )
                .bind(batch_id)
                .bind(line)
                .bind(runner)
                .bind(ANSWERED)
                .bind(result.status_code)
                .bind(&result.request_id)
                .bind(&result.output)
                .bind(RUNNING)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if written != 1 {
                    return Ok(false);
                }
                let counter = match result.succeeded() {
                    true => "UPDATE batches SET completed = completed + 1 WHERE id = $1",
                    false => "UPDATE batches SET failed = failed + 1 WHERE id = $1",
                };
                sqlx::query(counter).bind(batch_id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn release_item(
                &self,
                batch_id: &str,
                line: i32,
                runner: &str,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE batch_items SET state = $4, runner = NULL, lease_until = 0 \
                     WHERE batch_id = $1 AND line = $2 AND runner = $3 AND state = $5",
                )
                .bind(batch_id)
                .bind(line)
                .bind(runner)
                .bind(WAITING)
                .bind(RUNNING)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn release_runner(&self, runner: &str) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE batch_items SET state = $2, runner = NULL, lease_until = 0 \
                     WHERE runner = $1 AND state = $3",
                )
                .bind(runner)
                .bind(WAITING)
                .bind(RUNNING)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn running_items(&self, batch_id: &str, now_ms: i64) -> Result<i64, StoreError> {
                let (count,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM batch_items WHERE batch_id = $1 AND state = $2 \
                     AND lease_until >= $3",
                )
                .bind(batch_id)
                .bind(RUNNING)
                .bind(now_ms)
                .fetch_one(self.pool())
                .await?;
                Ok(count)
            }

            async fn items_page(
                &self,
                batch_id: &str,
                after_line: i32,
                limit: i64,
            ) -> Result<Vec<ItemRow>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT line, custom_id, state, status_code, request_id, output FROM batch_items \
                     WHERE batch_id = $1 AND line > $2 ORDER BY line LIMIT $3",
                )
                .bind(batch_id)
                .bind(after_line)
                .bind(limit)
                .fetch_all(self.pool())
                .await?)
            }
        }
    };
}

batch_store!(SqliteStore, sqlx::Sqlite, CLAIM_SQLITE);
batch_store!(PostgresStore, sqlx::Postgres, CLAIM_POSTGRES);
