//! The request hooks, `on-request` (prompt rewriting) and `cache-key`, run
//! on pooled instances in chain order.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use super::OnError;
use super::bindings::{
    self, CacheKeyDecision, InferenceRequest as WitRequest, RequestContext as WitContext,
    RequestDecision, RequestKind,
};
use super::runtime::{self, LoadedPlugin, PluginFailure};
use super::{Chain, HookMetrics, MAX_PLUGIN_TEXT, PluginHost, PluginMetrics, no_hook};
use crate::error::GatewayError;
use crate::observe::telemetry::StageSpan;
use crate::pipeline::policy::RequestContext;
use crate::protocol::{
    ChatMessage, ChatRequest, CompletionRequest, Conversation, InferenceRequest, PoolingRequest,
    Prompt,
};

impl PluginHost {
    pub(super) fn metrics_of<'p>(&self, plugin: &'p LoadedPlugin) -> &'p PluginMetrics {
        PluginMetrics::of(plugin, &self.metrics)
    }

    /// One request-hook call on a pooled instance: check one out, arm its
    /// deadline, run `call`, and return the instance to the pool only if the
    /// call succeeded. Records the call's metrics and span.
    async fn pooled_call<T>(
        &self,
        plugin: &LoadedPlugin,
        metrics: &HookMetrics,
        span_name: &'static str,
        ctx: &RequestContext,
        call: impl AsyncFnOnce(&mut runtime::Live) -> Result<T, PluginFailure>,
    ) -> Result<T, PluginFailure> {
        let started = Instant::now();
        let mut span = StageSpan::child_of(
            &ctx.trace,
            span_name,
            opentelemetry::trace::SpanKind::Internal,
        );
        span.set_with("plugin", || plugin.name.to_string());
        let result = span
            .during(async {
                let key_id = &ctx.identity.key_id;
                let mut live = plugin.checkout(&ctx.request_id, key_id, false).await?;
                live.arm();
                let value = call(&mut live).await?;
                plugin.checkin(live, key_id, false);
                Ok(value)
            })
            .await;
        metrics.observe(started, result.as_ref().err());
        result
    }

    /// Applies the plugin's `on_error` policy: `Ok` to skip it, `Err` to fail the request.
    pub(super) fn on_failure(
        plugin: &LoadedPlugin,
        hook: &str,
        request_id: &str,
        failure: PluginFailure,
    ) -> Result<(), GatewayError> {
        tracing::warn!(plugin = %plugin.name, hook, request_id, %failure, "plugin failed");
        Self::by_policy(plugin, request_id)
    }

    /// Applies the `on_error` policy of a plugin whose hook cannot read a
    /// request of `route` (built against a WIT version without a record for
    /// it): a fail-closed plugin refuses it, a fail-open one lets it pass unread.
    pub(super) fn cannot_read_route(
        plugin: &LoadedPlugin,
        hook: &str,
        route: &str,
        request_id: &str,
    ) -> Result<(), GatewayError> {
        if plugin.config.on_error == OnError::FailClosed {
            let package = plugin.exports.hooks().version.package();
            tracing::warn!(
                plugin = %plugin.name, hook, route, request_id,
                "the plugin is built against {package}, which cannot read requests of this route; \
                 refusing the request (on_error = \"fail-closed\")"
            );
        }
        Self::by_policy(plugin, request_id)
    }

    fn by_policy(plugin: &LoadedPlugin, request_id: &str) -> Result<(), GatewayError> {
        match plugin.config.on_error {
            OnError::FailOpen => Ok(()),
            OnError::FailClosed => Err(GatewayError::Plugin {
                request_id: request_id.to_string(),
            }),
        }
    }
}

pub(super) fn wit_context(ctx: &RequestContext) -> WitContext {
    WitContext {
        request_id: ctx.request_id.clone(),
        key_id: ctx.identity.key_id.clone(),
        key_name: ctx.identity.key_name.clone(),
        route: ctx.route.to_string(),
        transport: ctx.transport.to_string(),
    }
}

/// The kind of record a request is for plugins (which WIT versions read it).
pub(super) fn request_kind(request: &InferenceRequest) -> RequestKind {
    match request {
        InferenceRequest::Completion(_) => RequestKind::Completion,
        InferenceRequest::Chat(_) => RequestKind::Chat,
        InferenceRequest::Messages(_) | InferenceRequest::Responses(_) => RequestKind::Conversation,
        _ => RequestKind::Pooling,
    }
}

/// An agent API's conversation as a chat record.
fn conversation(
    model: &str,
    turns: Vec<crate::protocol::Turn>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    body_json: String,
) -> WitRequest {
    WitRequest::Chat(bindings::ChatRequest {
        model: model.to_string(),
        messages: turns
            .into_iter()
            .map(|turn| bindings::ChatMessage {
                role: turn.role,
                content: turn.text,
                json: turn.json,
            })
            .collect(),
        max_tokens,
        temperature,
        top_p: None,
        user: None,
        body_json,
    })
}

/// The request as plugins see it; `None` for a route the plugin interface
/// has no record for (speech to text, a stored response's retrieve or cancel).
pub(super) fn wit_request(request: &InferenceRequest) -> Option<WitRequest> {
    let body_json = || request.to_json();
    Some(match request {
        InferenceRequest::Audio(_) | InferenceRequest::StoredResponse(_) => return None,
        InferenceRequest::Messages(r) => conversation(
            r.model(),
            r.turns(),
            r.max_tokens(),
            r.temperature(),
            body_json(),
        ),
        InferenceRequest::Responses(r) => conversation(
            r.model(),
            r.turns(),
            r.max_output_tokens(),
            r.temperature(),
            body_json(),
        ),
        InferenceRequest::Completion(request) => {
            WitRequest::Completion(bindings::CompletionRequest {
                model: request.model.clone(),
                prompts: request.prompt.texts(),
                max_tokens: request.max_tokens,
                temperature: request.temperature,
                top_p: request.top_p,
                user: request.user.clone(),
                body_json: body_json(),
            })
        }
        InferenceRequest::Chat(request) => WitRequest::Chat(bindings::ChatRequest {
            model: request.model.clone(),
            messages: request
                .messages
                .iter()
                .map(|message| bindings::ChatMessage {
                    role: message.role.clone(),
                    content: message.text(),
                    json: serde_json::to_string(message).unwrap_or_default(),
                })
                .collect(),
            max_tokens: request.output_limit(),
            temperature: request.temperature,
            top_p: request.top_p,
            user: request.user.clone(),
            body_json: body_json(),
        }),
        InferenceRequest::Pooling(request) => WitRequest::Pooling(bindings::PoolingRequest {
            model: request.model().to_string(),
            texts: request.texts().to_vec(),
            body_json: body_json(),
        }),
    })
}

/// Applies a plugin's rewritten request, refusing results the gateway could not send.
fn apply(
    request: &mut InferenceRequest,
    modified: WitRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    match (request, modified) {
        (InferenceRequest::Completion(request), WitRequest::Completion(modified)) => {
            apply_completion(request, modified, max_bytes)
        }
        (InferenceRequest::Chat(request), WitRequest::Chat(modified)) => {
            apply_chat(request, modified, max_bytes)
        }
        (InferenceRequest::Pooling(request), WitRequest::Pooling(modified)) => {
            apply_pooling(request, modified, max_bytes)
        }
        (InferenceRequest::Messages(request), WitRequest::Chat(modified)) => {
            apply_conversation(request, modified, max_bytes)
        }
        (InferenceRequest::Responses(request), WitRequest::Chat(modified)) => {
            apply_conversation(request, modified, max_bytes)
        }
        (request, modified) => Err(PluginFailure::Invalid(format!(
            "rewrote a {} request as a {:?} request",
            request.route().path(),
            modified.kind()
        ))),
    }
}

/// Applies a rewritten conversation of an agent API: the model and each
/// turn's text (its role and JSON are the gateway's to keep).
fn apply_conversation(
    request: &mut dyn Conversation,
    modified: bindings::ChatRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    let size = modified.model.len()
        + modified
            .messages
            .iter()
            .map(|m| m.content.as_ref().map_or(0, String::len))
            .sum::<usize>();
    check_rewrite(&modified.model, size, max_bytes)?;
    if modified.model != request.model() {
        request.set_model(modified.model);
    }
    let texts: Vec<Option<String>> = modified.messages.into_iter().map(|m| m.content).collect();
    if texts
        != request
            .turns()
            .into_iter()
            .map(|t| t.text)
            .collect::<Vec<_>>()
    {
        request
            .set_turn_texts(texts)
            .map_err(PluginFailure::Invalid)?;
    }
    Ok(())
}

/// What every rewritten request must be: within the size limit, with a model.
fn check_rewrite(model: &str, size: usize, max_bytes: usize) -> Result<(), PluginFailure> {
    if size > max_bytes {
        return Err(PluginFailure::Invalid(format!(
            "rewritten request is {size} bytes, over the {max_bytes}-byte limit"
        )));
    }
    if model.trim().is_empty() {
        return Err(PluginFailure::Invalid(
            "rewritten request has an empty model".into(),
        ));
    }
    Ok(())
}

fn apply_pooling(
    request: &mut PoolingRequest,
    modified: bindings::PoolingRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    let size = modified.model.len() + modified.texts.iter().map(String::len).sum::<usize>();
    check_rewrite(&modified.model, size, max_bytes)?;
    if modified.model != request.model() {
        request.set_model(modified.model);
    }
    if modified.texts != request.texts() {
        request
            .set_texts(modified.texts)
            .map_err(PluginFailure::Invalid)?;
    }
    Ok(())
}

fn apply_chat(
    request: &mut ChatRequest,
    modified: bindings::ChatRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    let size = modified.model.len()
        + modified
            .messages
            .iter()
            .map(|m| m.json.len() + m.content.as_ref().map_or(0, String::len))
            .sum::<usize>();
    check_rewrite(&modified.model, size, max_bytes)?;
    if modified.messages.is_empty() {
        return Err(PluginFailure::Invalid(
            "rewritten request has no messages".into(),
        ));
    }
    let messages = modified
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let invalid = |reason: String| PluginFailure::Invalid(format!("message {i}: {reason}"));
            let mut fields = match serde_json::from_str::<serde_json::Value>(&message.json) {
                Ok(serde_json::Value::Object(fields)) => fields,
                _ => return Err(invalid("`json` is not a JSON object".into())),
            };
            fields.insert("role".into(), serde_json::Value::String(message.role));
            let mut rebuilt: ChatMessage =
                serde_json::from_value(fields.into()).map_err(|err| invalid(err.to_string()))?;
            if let Some(text) = message.content
                && rebuilt.text().as_ref() != Some(&text)
            {
                rebuilt.set_text(text);
            }
            Ok(rebuilt)
        })
        .collect::<Result<Vec<_>, _>>()?;
    request.messages = messages;
    request.model = modified.model;
    if modified.max_tokens != request.output_limit() {
        request.max_completion_tokens = modified.max_tokens;
        request.max_tokens = None;
    }
    request.temperature = modified.temperature;
    request.top_p = modified.top_p;
    request.user = modified.user;
    Ok(())
}

fn apply_completion(
    request: &mut CompletionRequest,
    modified: bindings::CompletionRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    let size = modified.model.len() + modified.prompts.iter().map(String::len).sum::<usize>();
    check_rewrite(&modified.model, size, max_bytes)?;
    match &request.prompt {
        Prompt::Text(_) | Prompt::Texts(_) => {
            if modified.prompts.is_empty() || modified.prompts.iter().any(String::is_empty) {
                return Err(PluginFailure::Invalid(
                    "rewritten request has an empty prompt".into(),
                ));
            }
            request.prompt = match (&request.prompt, modified.prompts.len()) {
                (Prompt::Text(_), 1) => {
                    Prompt::Text(modified.prompts.into_iter().next().unwrap_or_default())
                }
                _ => Prompt::Texts(modified.prompts),
            };
        }
        Prompt::Tokens(_) | Prompt::TokenBatches(_) => {}
    }
    request.model = modified.model;
    request.max_tokens = modified.max_tokens;
    request.temperature = modified.temperature;
    request.top_p = modified.top_p;
    request.user = modified.user;
    Ok(())
}

/// The plugins of `chain` that run `hook` for this request's key, in chain order.
pub(super) fn hooked<'c>(
    chain: &'c Chain,
    ctx: &RequestContext,
    hook: impl Fn(&runtime::Exports) -> bool,
) -> Vec<&'c Arc<LoadedPlugin>> {
    chain
        .plugins
        .iter()
        .filter(|p| hook(&p.exports) && p.applies_to(&ctx.identity.key_name))
        .collect()
}

impl PluginHost {
    /// `on-request` through `plugins`; `wit_req` is kept equal to `request`
    /// as plugins see it (rebuilt only after a plugin changed it).
    pub(super) async fn rewrite(
        &self,
        plugins: &[&Arc<LoadedPlugin>],
        ctx: &RequestContext,
        wit_ctx: &WitContext,
        request: &mut InferenceRequest,
        wit_req: &mut WitRequest,
    ) -> Result<(), GatewayError> {
        let kind = request_kind(request);
        for plugin in plugins {
            if !plugin.exports.hooks().reads(kind) {
                Self::cannot_read_route(plugin, "on-request", ctx.route, &ctx.request_id)?;
                continue;
            }
            let metrics = &self.metrics_of(plugin).on_request;
            let current: &WitRequest = wit_req;
            let result = self
                .pooled_call(plugin, metrics, "plugin.on_request", ctx, async |live| {
                    let guest = live.guests.request.as_ref().ok_or_else(no_hook)?;
                    guest
                        .on_request(&mut live.store, wit_ctx, current)
                        .await
                        .map_err(PluginFailure::from_wasmtime)?
                        .ok_or_else(no_hook)
                })
                .await;
            match result {
                Ok(RequestDecision::Proceed) => {}
                Ok(RequestDecision::Modify(modified)) => {
                    match apply(request, modified, self.max_body_bytes) {
                        Ok(()) => {
                            if let Some(rewritten) = wit_request(request) {
                                *wit_req = rewritten;
                            }
                        }
                        Err(failure) => {
                            metrics.traps.inc();
                            Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?;
                        }
                    }
                }
                Ok(RequestDecision::Reject(rejection)) => {
                    match StatusCode::from_u16(rejection.status) {
                        Ok(status) if (400..600).contains(&rejection.status) => {
                            return Err(GatewayError::Rejected {
                                status,
                                message: rejection.message.chars().take(4096).collect(),
                            });
                        }
                        _ => {
                            metrics.traps.inc();
                            let failure = PluginFailure::Invalid(format!(
                                "rejected with status {}, not 400..599",
                                rejection.status
                            ));
                            Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?;
                        }
                    }
                }
                Err(failure) => Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?,
            }
        }
        Ok(())
    }

    /// `cache-key` through `plugins`, starting from `key`: the key to use,
    /// or `None` when a plugin bypasses the cache.
    pub(super) async fn choose_key(
        &self,
        plugins: &[&Arc<LoadedPlugin>],
        ctx: &RequestContext,
        wit_ctx: &WitContext,
        (wit_req, kind): (&WitRequest, RequestKind),
        mut key: String,
    ) -> Result<Option<String>, GatewayError> {
        for plugin in plugins {
            if !plugin.exports.hooks().reads(kind) {
                Self::cannot_read_route(plugin, "cache-key", ctx.route, &ctx.request_id)?;
                continue;
            }
            let metrics = &self.metrics_of(plugin).cache_key;
            let result = self
                .pooled_call(plugin, metrics, "plugin.cache_key", ctx, async |live| {
                    let guest = live.guests.cache_key.as_ref().ok_or_else(no_hook)?;
                    let decision = guest
                        .cache_key(&mut live.store, wit_ctx, wit_req, &key)
                        .await
                        .map_err(PluginFailure::from_wasmtime)?
                        .ok_or_else(no_hook)?;
                    match decision {
                        CacheKeyDecision::Custom(custom) if custom.len() > MAX_PLUGIN_TEXT => Err(
                            PluginFailure::Invalid(format!("cache key of {} bytes", custom.len())),
                        ),
                        decision => Ok(decision),
                    }
                })
                .await;
            match result {
                Ok(CacheKeyDecision::UseDefault) => {}
                Ok(CacheKeyDecision::Custom(custom)) => {
                    let mut digest = [0u8; 64];
                    hex::encode_to_slice(Sha256::digest(custom.as_bytes()), &mut digest)
                        .map_err(|err| GatewayError::Internal(err.to_string()))?;
                    key.clear();
                    key.push_str("plugin:");
                    key.extend(digest.iter().map(|&b| char::from(b)));
                }
                Ok(CacheKeyDecision::Bypass) => return Ok(None),
                Err(failure) => Self::on_failure(plugin, "cache-key", &ctx.request_id, failure)?,
            }
        }
        Ok(Some(key))
    }
}
