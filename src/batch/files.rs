//! A file's content in and out of the store, a part at a time: an upload is
//! written as it arrives and a download read as it is sent, so neither is
//! ever held whole in memory.

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use super::BatchError;
use crate::backends::store::Store;
use crate::backends::store::batches::FileRecord;

/// Writes one file's content in parts of `part_bytes`.
pub struct FileWriter {
    store: Arc<dyn Store>,
    record: FileRecord,
    part_bytes: usize,
    buffer: Vec<u8>,
    next_part: i32,
    written: u64,
    limit: u64,
    limit_key: &'static str,
}

impl FileWriter {
    /// Starts a file (unlisted until [`FileWriter::finish`]).
    pub async fn begin(
        store: Arc<dyn Store>,
        record: FileRecord,
        part_bytes: usize,
    ) -> Result<Self, BatchError> {
        store.insert_file(&record).await?;
        Ok(Self {
            store,
            record,
            part_bytes,
            buffer: Vec::with_capacity(part_bytes),
            next_part: 0,
            written: 0,
            limit: u64::MAX,
            limit_key: "",
        })
    }

    /// Refuses content past `limit` bytes, naming `key`.
    pub fn limited(mut self, limit: u64, key: &'static str) -> Self {
        self.limit = limit;
        self.limit_key = key;
        self
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), BatchError> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(BatchError::TooLarge {
                what: "the file",
                key: self.limit_key,
                limit: self.limit,
            });
        }
        while !data.is_empty() {
            let take = (self.part_bytes - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buffer.len() == self.part_bytes {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), BatchError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.store
            .put_file_part(&self.record.id, self.next_part, &self.buffer)
            .await?;
        self.next_part += 1;
        self.buffer.clear();
        Ok(())
    }

    /// Writes what is left and lists the file.
    pub async fn finish(mut self, purpose: &str) -> Result<FileRecord, BatchError> {
        self.flush().await?;
        let bytes = i64::try_from(self.written).unwrap_or(i64::MAX);
        self.store
            .complete_file(&self.record.id, bytes, purpose)
            .await?;
        self.record.bytes = bytes;
        self.record.purpose = purpose.to_string();
        Ok(self.record)
    }

    /// Deletes what was written.
    pub async fn abort(self) {
        if let Err(err) = self.store.delete_file(&self.record.id).await {
            tracing::warn!(%err, file_id = %self.record.id, "could not delete an unfinished file; it is removed when the retention sweep finds it");
        }
    }
}

/// A file's content, read from the store a part at a time.
pub fn content_stream(
    store: Arc<dyn Store>,
    file_id: String,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::try_unfold(0i32, move |part| {
        let store = store.clone();
        let file_id = file_id.clone();
        async move {
            match store.file_part(&file_id, part).await {
                Ok(Some(data)) => Ok(Some((Bytes::from(data), part + 1))),
                Ok(None) => Ok(None),
                Err(err) => Err(std::io::Error::other(err.to_string())),
            }
        }
    })
}

/// Splits a file's content into lines as its parts arrive, numbering them
/// from 1 (a line cut by a part's end is joined with its rest).
pub struct Lines {
    store: Arc<dyn Store>,
    file_id: String,
    next_part: i32,
    pending: Vec<u8>,
    ready: std::collections::VecDeque<Vec<u8>>,
    finished: bool,
    pub line: i32,
}

impl Lines {
    pub fn new(store: Arc<dyn Store>, file_id: String) -> Self {
        Self {
            store,
            file_id,
            next_part: 0,
            pending: Vec::new(),
            ready: Default::default(),
            finished: false,
            line: 0,
        }
    }

    /// The next line (without its end) and its number.
    pub async fn next(&mut self) -> Result<Option<(i32, Vec<u8>)>, BatchError> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                self.line += 1;
                return Ok(Some((self.line, line)));
            }
            if self.finished {
                return Ok(None);
            }
            match self.store.file_part(&self.file_id, self.next_part).await? {
                Some(data) => {
                    self.next_part += 1;
                    self.pending.extend_from_slice(&data);
                    let mut start = 0;
                    for end in memchr::memchr_iter(b'\n', &self.pending) {
                        self.ready
                            .push_back(trim_cr(&self.pending[start..end]).to_vec());
                        start = end + 1;
                    }
                    self.pending.drain(..start);
                }
                None => {
                    self.finished = true;
                    if !self.pending.is_empty() {
                        let last = std::mem::take(&mut self.pending);
                        self.ready.push_back(trim_cr(&last).to_vec());
                    }
                }
            }
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}
