//! The request pipeline, shared by REST and WebSocket: limits, policy
//! hooks, the model, cache lookup and queue submission ([`start`]), then a
//! [`Completion`] that yields the chunks to deliver. Transports only format
//! what it yields.

mod completion;
pub mod filter_chain;
mod metrics;
pub mod models;
pub mod policy;
mod record;
pub mod resumable;
pub mod state;
mod stored;

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::SpanKind;

use crate::backends::cache::CacheScope;
use crate::backends::queue::{QueuedRequest, ResponseEvent};
use crate::error::GatewayError;
use crate::protocol::{InferenceRequest, Route};
use crate::tenancy::Identity;
use completion::Source;
use filter_chain::{FilterChain, TypedApi};
use policy::RequestContext;
use state::{PipelineSettings, Stages};

pub use completion::{Completion, Delivery};
pub use metrics::RequestMetrics;
pub use record::{CLIENT_CLOSED, RequestRecord};

/// Runs the request through the limits, the hooks, the cache and the
/// queue. Returns the response to deliver, or the error to answer with
/// (before anything was sent) and the request's record.
pub async fn start(
    state: &Arc<Stages>,
    ctx: &RequestContext,
    request: InferenceRequest,
    mut record: RequestRecord,
) -> Result<Completion, (GatewayError, RequestRecord)> {
    match run(state, ctx, request, &mut record).await {
        Ok(source) => {
            let (source, filters, deliver_usage_chunk, to_cache) = source;
            Ok(Completion::new(
                record,
                source,
                filters,
                deliver_usage_chunk,
                to_cache,
            ))
        }
        Err(err) => {
            record.fail(&err);
            Err((err, record))
        }
    }
}

/// Where a response will come from, its filters, whether the usage chunk is
/// delivered, and (on a miss) the cache key to store it under.
type Started = (
    Source,
    FilterChain,
    bool,
    Option<(String, Vec<crate::protocol::Chunk>)>,
);

async fn run(
    state: &Arc<Stages>,
    ctx: &RequestContext,
    mut request: InferenceRequest,
    record: &mut RequestRecord,
) -> Result<Started, GatewayError> {
    let pinned_to = stored::check_owner(&*state.affinity, &ctx.identity, &mut request).await?;
    record.model = request.model().to_string();
    within_limits(&state.settings, &request)?;
    // Before the hooks: a request over its key's limits costs no plugin work.
    record.admission = state
        .limiter
        .admit(&ctx.identity, &ctx.request_id, &request, ctx.lane)
        .await?;
    let cache_key = state
        .policy
        .admit(ctx, &mut request, state.cache.is_some())
        .await?;
    // After the hooks: the model checked is the one sent (a plugin may map
    // aliases). A model the key may not use, or that does not exist, costs
    // its limits nothing: a misconfigured client cannot lock its key out.
    let resolved = match model_for(state, ctx, &request) {
        Ok(resolved) => resolved,
        Err(err) => {
            if let Some(admission) = record.admission.take() {
                admission.refund().await;
            }
            return Err(err);
        }
    };
    if !resolved.pool.is_empty() {
        record.model = resolved.pool.clone();
    }
    let requested = request.model().to_string();
    let placement = stored::claim(
        &*state.affinity,
        &ctx.identity,
        &mut request,
        &requested,
        pinned_to,
    )
    .await;
    let placement = match placement {
        Ok(placement) => placement,
        Err(err) => {
            if let Some(admission) = record.admission.take() {
                admission.refund().await;
            }
            return Err(err);
        }
    };
    if resolved.upstream != request.model() {
        request.set_model(resolved.upstream.clone());
    }
    let settings = &state.settings;
    let cache_key = cache_key
        .filter(|_| request.is_cacheable())
        .filter(|_| settings.cache_sampled || !request.is_sampled())
        .map(|key| scoped(settings.cache_scope, &ctx.identity, key));
    let deliver_usage_chunk = !request.is_stream() || request.wants_usage_chunk();
    // Token filters act on generated text (chat and completion chunks, the
    // typed APIs' text deltas); other answers pass as they came.
    let route = request.route();
    let typed = match route {
        Route::Messages => Some(TypedApi::Anthropic),
        Route::Responses | Route::ResponsesRetrieve => Some(TypedApi::Responses),
        _ => None,
    };
    let filters = FilterChain::new(match route.generates() || typed.is_some() {
        true => state.policy.token_filters(ctx),
        false => Vec::new(),
    })
    .for_api(typed);
    let lookups = &state.cache_metrics.lookups;
    record.looked_up = true;
    let mut lookup = record.trace.stage("cache.lookup");
    match (&state.cache, &cache_key) {
        (Some(cache), Some(key)) => match cache.get(key).await {
            Ok(Some(chunks)) => {
                lookup.set("result", "hit");
                drop(lookup);
                lookups.with_label_values(&["hit"]).inc();
                record.cache_hit = true;
                let source = Source::Cached { chunks, next: 0 };
                return Ok((source, filters, deliver_usage_chunk, None));
            }
            Ok(None) => {
                lookup.set("result", "miss");
                lookups.with_label_values(&["miss"]).inc();
            }
            Err(err) => {
                lookup.set("result", "error");
                lookups.with_label_values(&["error"]).inc();
                tracing::debug!(%err, "cache lookup failed; serving uncached");
            }
        },
        _ => {
            lookup.set("result", "bypass");
            lookups.with_label_values(&["bypass"]).inc();
        }
    }
    drop(lookup);

    let submitted = Instant::now();
    // Spans from the submission to the first chunk back; the worker's spans are its children.
    let mut submit = record
        .trace
        .stage_of_kind("queue.submit", SpanKind::Producer);
    let mut queued = QueuedRequest::new(
        ctx.request_id.clone(),
        resolved.pool,
        request.route(),
        request.upstream_body(),
        record.trace.headers_from(&submit),
    );
    if resolved.by_prefix {
        queued.prefix = request.prefix_key();
    }
    queued.buffered = !request.is_stream();
    queued.content_type = request.content_type().map(str::to_string);
    queued.pinned_to = placement.pinned_to;
    queued.stores = placement.stores;
    queued.lane = ctx.lane;
    queued.tenant = ctx.identity.tenant();
    queued.priority = ctx.identity.priority();
    let mut responses = state
        .queue
        .submit(queued)
        .await
        .map_err(GatewayError::from)?;
    let first = responses.next().await;
    state
        .queue_metrics
        .first_chunk
        .observe(submitted.elapsed().as_secs_f64());
    submit.set("wait_ms", submitted.elapsed().as_secs_f64() * 1000.0);
    drop(submit);
    if let ResponseEvent::Error(info) = first {
        return Err(GatewayError::Upstream(info));
    }
    let source = Source::Queue {
        responses,
        first: Some(first),
    };
    let to_cache = cache_key.map(|key| (key, Vec::new()));
    Ok((source, filters, deliver_usage_chunk, to_cache))
}

/// The request's model, resolved, if it exists and the key may use it.
fn model_for(
    state: &Stages,
    ctx: &RequestContext,
    request: &InferenceRequest,
) -> Result<models::Resolved, GatewayError> {
    let resolved = state.models.resolve(request.model())?;
    let allowed = ctx.identity.allows_model(request.model())
        || (!resolved.pool.is_empty() && ctx.identity.allows_model(&resolved.pool));
    if !allowed {
        state
            .tenancy_metrics
            .limited
            .with_label_values(&["model"])
            .inc();
        return Err(models::no_access(request.model()));
    }
    Ok(resolved)
}

/// A cache key within its scope: one key's requests (or one team's) never
/// share an entry with another's.
fn scoped(scope: CacheScope, identity: &Identity, key: String) -> String {
    match (scope, &identity.team) {
        (CacheScope::Global, _) => key,
        (CacheScope::Team, Some(team)) => format!("team:{}:{key}", team.id),
        (CacheScope::Team | CacheScope::Key, _) => format!("key:{}:{key}", identity.key_id),
    }
}

/// Refuses requests for more generations than the gateway allows at once.
fn within_limits(
    settings: &PipelineSettings,
    request: &InferenceRequest,
) -> Result<(), GatewayError> {
    let n = request.n();
    if n > settings.max_n {
        return Err(GatewayError::BadRequest(format!(
            "invalid value for `n`: {n} is more than the limit of {}",
            settings.max_n
        )));
    }
    let InferenceRequest::Completion(completion) = request else {
        return Ok(());
    };
    let prompts = completion.prompt.count();
    if prompts > settings.max_prompts {
        return Err(GatewayError::BadRequest(format!(
            "invalid value for `prompt`: {prompts} prompts are more than the limit of {}",
            settings.max_prompts
        )));
    }
    Ok(())
}
