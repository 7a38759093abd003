//! The batch runner every gateway runs: it validates new batches, claims
//! lines with a lease (`batch.lease_ms`, renewed while they run), runs each
//! through the pipeline in the queue's batch lane as the key that created
//! the batch, writes the answer, and finalizes batches that are done,
//! cancelled or past their window. Runners on several gateways share the
//! work through the database; a line whose runner died is claimed again
//! when its lease runs out, and its answer is written once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use prometheus::IntCounterVec;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Batches, batch_route, now, output, validate};
use crate::backends::queue::Lane;
use crate::backends::store::batches::{BatchRecord, ClaimedItem, ItemResult};
use crate::error::GatewayError;
use crate::observe::metrics::{MetricsRegistry, Roles};
use crate::observe::outage::Outage;
use crate::pipeline::policy::RequestContext;
use crate::pipeline::{self, RequestRecord};
use crate::protocol::{InferenceRequest, Route};
use crate::tenancy::Identity;

/// How long a batch's key is trusted before it is looked up again.
const IDENTITY_TTL: Duration = Duration::from_secs(5);
/// How often expired files are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// An upload unfinished for this long was abandoned.
const STALE_UPLOAD_SECS: i64 = 3600;

const OUTCOMES: [&str; 4] = ["succeeded", "failed", "retried", "superseded"];

/// `sluice_batch_lines_total{outcome}`.
pub struct BatchMetrics {
    lines: IntCounterVec,
}

impl BatchMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let lines = registry.counter_vec(
            Roles::EDGE,
            "sluice_batch_lines_total",
            "Batch lines run by this gateway, by outcome (retried: given back to run again; superseded: another gateway took the line over)",
            &["outcome"],
        );
        for outcome in OUTCOMES {
            lines.with_label_values(&[outcome]);
        }
        Self { lines }
    }
}

pub struct Runner {
    batches: Arc<Batches>,
    id: String,
    metrics: BatchMetrics,
    /// Each batch's route and key, as its lines need them.
    known: Mutex<HashMap<String, (Route, String)>>,
    identities: Mutex<HashMap<String, (Instant, Option<Identity>)>>,
    /// Cancelled when a batch stops running (expired), to stop its lines.
    running: Mutex<HashMap<String, CancellationToken>>,
    outage: Outage,
}

/// How a line's run ended.
enum Ran {
    Written(bool),
    Retry { rate_limited: bool },
    Superseded,
    Stopped,
}

impl Runner {
    pub fn new(batches: Arc<Batches>, metrics: BatchMetrics) -> Arc<Self> {
        Arc::new(Self {
            batches,
            id: uuid::Uuid::now_v7().simple().to_string(),
            metrics,
            known: Default::default(),
            identities: Default::default(),
            running: Default::default(),
            outage: Outage::default(),
        })
    }

    /// Runs until `shutdown`; then gives its lines back to be run elsewhere.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let config = self.batches.config.clone();
        let store = self.batches.store.clone();
        let mut lines: JoinSet<Ran> = JoinSet::new();
        let mut renew = tokio::time::interval(config.lease / 3);
        let mut sweep_at = Instant::now();
        let mut paused_until = Instant::now();
        let mut look = true;
        let batch_claim = (config.concurrency.get() / 8).max(1);
        loop {
            let room = config.concurrency.get() - lines.len();
            if room > 0 && (look || room >= batch_claim) && Instant::now() >= paused_until {
                look = false;
                let now_ms = now_ms();
                let until = now_ms + config.lease.as_millis() as i64;
                match store
                    .claim_items(&self.id, now_ms, until, room as i64)
                    .await
                {
                    Ok(items) => {
                        self.store_up();
                        for item in items {
                            let runner = self.clone();
                            lines.spawn(async move { runner.run_line(item).await });
                        }
                    }
                    Err(err) => self.store_down(&err),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(ran) = lines.join_next(), if !lines.is_empty() => {
                    match ran {
                        Ok(Ran::Written(true)) => self.count("succeeded"),
                        Ok(Ran::Written(false)) => self.count("failed"),
                        Ok(Ran::Retry { rate_limited }) => {
                            self.count("retried");
                            if rate_limited {
                                paused_until = Instant::now() + config.poll;
                            }
                        }
                        Ok(Ran::Superseded) => self.count("superseded"),
                        Ok(Ran::Stopped) | Err(_) => {}
                    }
                    continue;
                }
                _ = renew.tick() => {
                    let until = now_ms() + config.lease.as_millis() as i64;
                    if let Err(err) = store.renew_items(&self.id, until).await {
                        self.store_down(&err);
                    }
                    continue;
                }
                () = self.batches.wake.notified() => {}
                () = tokio::time::sleep(config.poll) => {}
            }
            look = true;
            if let Err(err) = self.maintain().await {
                tracing::warn!(%err, "batch upkeep failed; trying again shortly");
            }
            if sweep_at.elapsed() >= SWEEP_EVERY {
                sweep_at = Instant::now();
                self.sweep().await;
            }
        }
        lines.shutdown().await;
        if let Err(err) = store.release_runner(&self.id).await {
            tracing::warn!(%err, "could not give back this gateway's batch lines; they run elsewhere once their lease runs out");
        }
    }

    fn store_up(&self) {
        if self.outage.succeeded().is_some() {
            tracing::info!("the store answers the batch runner again");
        }
    }

    fn store_down(&self, err: &dyn std::fmt::Display) {
        if self.outage.failed().is_some() {
            tracing::warn!(%err, "the batch runner cannot reach the store; batches wait until it answers");
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics.lines.with_label_values(&[outcome]).inc();
    }

    /// Validates new batches, finalizes those that are done, cancelled or
    /// expired, and takes over finalizations whose runner died.
    async fn maintain(&self) -> Result<(), super::BatchError> {
        let store = &self.batches.store;
        let lease = self.batches.config.lease.as_millis() as i64;
        let now_ms = now_ms();
        if let Some(batch) = store
            .lease_batch("validating", now_ms, now_ms + lease * 4)
            .await?
        {
            self.validate(&batch).await?;
        }
        let active = store.active_batches().await?;
        self.stop_lines_of_inactive(&active);
        for batch in active {
            let unfinished = batch.total - batch.completed - batch.failed;
            let ending = match batch.status.as_str() {
                "in_progress" if unfinished <= 0 => "completed",
                "in_progress" if batch.expires_at <= now() => "expired",
                "cancelling" if store.running_items(&batch.id, now_ms).await? == 0 => "cancelled",
                _ => continue,
            };
            if store
                .begin_finalizing(&batch.id, &batch.status, ending, now(), now_ms + lease * 4)
                .await?
            {
                self.finalize(&batch.id).await?;
            }
        }
        if let Some(batch) = store
            .lease_batch("finalizing", now_ms, now_ms + lease * 4)
            .await?
        {
            self.finalize(&batch.id).await?;
        }
        Ok(())
    }

    async fn validate(&self, batch: &BatchRecord) -> Result<(), super::BatchError> {
        let store = &self.batches.store;
        let refuse = |code: &str, message: String| {
            serde_json::json!([{"code": code, "line": null, "param": null, "message": message}])
                .to_string()
        };
        let Some(route) = batch_route(&batch.endpoint) else {
            let errors = refuse(
                "invalid_url",
                format!("'{}' is not a batch endpoint", batch.endpoint),
            );
            store.fail_batch(&batch.id, &errors, now()).await?;
            return Ok(());
        };
        let identity = match self
            .batches
            .stages
            .auth
            .identity_of_key(&batch.key_id)
            .await
        {
            Ok(identity) => identity,
            Err(GatewayError::Backend(message)) => {
                return Err(super::BatchError::Invalid(message));
            }
            Err(err) => {
                let errors = refuse("invalid_api_key", err.to_string());
                store.fail_batch(&batch.id, &errors, now()).await?;
                return Ok(());
            }
        };
        let max = self.batches.config.max_requests.get();
        match validate::check(store, &self.batches.stages, batch, route, &identity, max).await? {
            validate::Checked::Valid(total) => {
                store.start_batch(&batch.id, total, now()).await?;
            }
            validate::Checked::Invalid(errors) => {
                let errors = serde_json::Value::Array(errors).to_string();
                store.fail_batch(&batch.id, &errors, now()).await?;
            }
        }
        Ok(())
    }

    async fn finalize(&self, id: &str) -> Result<(), super::BatchError> {
        let store = &self.batches.store;
        let Some(batch) = store.find_batch(id).await? else {
            return Ok(());
        };
        if let Some(token) = self.lock_running().remove(id) {
            token.cancel();
        }
        output::finalize(store, &self.batches.config, &batch).await
    }

    /// Stops this runner's lines of batches that no longer run (expired
    /// while they ran): their answers would not be read. Forgets what it
    /// knew of them.
    fn stop_lines_of_inactive(&self, active: &[BatchRecord]) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| active.iter().any(|batch| &batch.id == id));
        let mut running = self.lock_running();
        running.retain(|id, token| {
            let live = active.iter().any(|batch| &batch.id == id);
            if !live {
                token.cancel();
            }
            live
        });
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes files past their retention and uploads abandoned half-way.
    async fn sweep(&self) {
        let store = &self.batches.store;
        let expired = match store
            .expired_files(now(), now() - STALE_UPLOAD_SECS, 1_000)
            .await
        {
            Ok(expired) => expired,
            Err(err) => return self.store_down(&err),
        };
        for id in expired {
            if let Err(err) = store.delete_file(&id).await {
                tracing::warn!(%err, file_id = %id, "could not delete an expired file");
            }
        }
    }

    async fn run_line(self: Arc<Self>, item: ClaimedItem) -> Ran {
        let stop = self
            .lock_running()
            .entry(item.batch_id.clone())
            .or_default()
            .clone();
        let answered = tokio::select! {
            answered = self.answer(&item) => answered,
            () = stop.cancelled() => return Ran::Stopped,
        };
        let store = &self.batches.store;
        let result = match answered {
            Ok(result) => result,
            Err(retry) => {
                if let Err(err) = store
                    .release_item(&item.batch_id, item.line, &self.id)
                    .await
                {
                    tracing::warn!(%err, "could not give back a batch line; it runs again when its lease runs out");
                }
                return retry;
            }
        };
        let succeeded = result.succeeded();
        match store
            .finish_item(&item.batch_id, item.line, &self.id, &result)
            .await
        {
            Ok(true) => Ran::Written(succeeded),
            Ok(false) => Ran::Superseded,
            Err(err) => {
                tracing::warn!(%err, "could not write a batch line's answer; it runs again when its lease runs out");
                Ran::Stopped
            }
        }
    }

    /// Runs one line as its batch's key; `Err` when it should run again.
    async fn answer(&self, item: &ClaimedItem) -> Result<ItemResult, Ran> {
        let request_id = uuid::Uuid::now_v7().simple().to_string();
        let (route, key_id) = match self.batch_of(&item.batch_id).await {
            Some(known) => known,
            None => return Err(Ran::Stopped),
        };
        let failed = |err: GatewayError| ItemResult {
            status_code: i32::from(err.status().as_u16()),
            request_id: request_id.clone(),
            output: match route.is_anthropic() {
                true => err.anthropic_json().into_bytes(),
                false => err.info().to_json().into_bytes(),
            },
        };
        let identity = match self.identity(&key_id).await {
            Ok(identity) => identity,
            Err(err) if err.status().is_server_error() => {
                return Err(Ran::Retry {
                    rate_limited: false,
                });
            }
            Err(err) => return Ok(failed(err)),
        };
        let request = match InferenceRequest::parse(route, &item.body) {
            Ok(request) => request,
            Err(err) => return Ok(failed(err)),
        };
        let stages = &self.batches.stages;
        let mut record = RequestRecord::new(
            stages.clone(),
            request_id.clone(),
            route,
            "batch",
            Instant::now(),
            &[],
        );
        record.identify(&identity);
        let ctx = RequestContext {
            request_id: request_id.clone(),
            identity,
            route: route.path(),
            transport: "batch",
            trace: record.trace.context().clone(),
            lane: Lane::Batch,
        };
        let answered = match pipeline::start(stages, &ctx, request, record).await {
            Ok(mut completion) => completion.answer().await.map_err(GatewayError::Upstream),
            Err((err, _record)) => Err(err),
        };
        match answered {
            Ok(body) => Ok(ItemResult {
                status_code: 200,
                request_id,
                output: body.to_vec(),
            }),
            Err(err) => {
                let status = err.status();
                let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
                let transient = matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
                let attempts = self.batches.config.max_attempts.get();
                if rate_limited || (transient && (item.attempts as u32) < attempts) {
                    return Err(Ran::Retry { rate_limited });
                }
                Ok(failed(err))
            }
        }
    }

    /// A batch's route and key.
    async fn batch_of(&self, id: &str) -> Option<(Route, String)> {
        if let Some(known) = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            return Some(known.clone());
        }
        let batch = self.batches.store.find_batch(id).await.ok()??;
        let known = (batch_route(&batch.endpoint)?, batch.key_id);
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), known.clone());
        Some(known)
    }

    /// The identity of a batch's key, looked up again every few seconds so
    /// that revoking the key stops its batches.
    async fn identity(&self, key_id: &str) -> Result<Identity, GatewayError> {
        let revoked = GatewayError::Unauthorized("invalid or revoked API key");
        if let Some((at, identity)) = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            && at.elapsed() < IDENTITY_TTL
        {
            return identity.clone().ok_or(revoked);
        }
        let looked_up = self.batches.stages.auth.identity_of_key(key_id).await;
        let identity = match looked_up {
            Ok(identity) => Some(identity),
            Err(GatewayError::Backend(message)) => return Err(GatewayError::Backend(message)),
            Err(_) => None,
        };
        self.identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key_id.to_string(), (Instant::now(), identity.clone()));
        identity.ok_or(revoked)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
