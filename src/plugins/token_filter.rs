//! Token filtering: one plugin instance per stream and choice, so a filter
//! can keep state across chunks; `on-tokens` takes a cached answer's texts
//! in one call when the plugin exports it, and `on-tool-call` the pieces of
//! a chat answer's tool calls.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::bindings::{TokenAction as WitAction, ToolCallAction as WitToolCallAction};
use super::runtime::{self, LoadedPlugin, PluginFailure};
use super::{PluginFamilies, PluginHost, PluginMetrics, checked_text, no_hook};
use crate::error::GatewayError;
use crate::observe::telemetry::StageSpan;
use crate::pipeline::policy::{
    RequestContext, TokenAction, TokenFilter, ToolCallAction, ToolCallPiece,
};

/// A token action from a plugin, checked.
fn token_action(action: WitAction) -> Result<TokenAction, PluginFailure> {
    Ok(match action {
        WitAction::Pass => TokenAction::Pass,
        WitAction::Replace(text) => TokenAction::Replace(checked_text(text)?),
        WitAction::Hold => TokenAction::Hold,
        WitAction::Stop(text) => TokenAction::Stop(checked_text(text)?),
    })
}

/// A stream's instance of one token plugin, per choice.
enum ChoiceInstance {
    Live(Box<runtime::Live>),
    /// Failed earlier in this stream (fail-open): text passes through.
    Skipped,
}

pub(super) struct WasmTokenFilter {
    plugin: Arc<LoadedPlugin>,
    metrics: Arc<PluginFamilies>,
    request_id: String,
    /// The API key of the request: instances are reused only within a key.
    key_id: String,
    /// By choice index: one entry unless the request asked for `n` > 1.
    choices: Vec<(u32, ChoiceInstance)>,
    /// The texts of an `on-tokens` call, concatenated, and where each ends
    /// (kept to reuse their buffers).
    batch_text: String,
    batch_ends: Vec<u32>,
    /// One span for this plugin's filtering of the whole stream.
    _span: StageSpan,
}

impl WasmTokenFilter {
    pub(super) fn new(
        plugin: Arc<LoadedPlugin>,
        metrics: Arc<PluginFamilies>,
        ctx: &RequestContext,
    ) -> Self {
        Self {
            _span: {
                let mut span = StageSpan::child_of(
                    &ctx.trace,
                    "plugin.on_token",
                    opentelemetry::trace::SpanKind::Internal,
                );
                span.set_with("plugin", || plugin.name.to_string());
                span
            },
            plugin,
            metrics,
            request_id: ctx.request_id.clone(),
            key_id: ctx.identity.key_id.clone(),
            choices: Vec::new(),
            batch_text: String::new(),
            batch_ends: Vec::new(),
        }
    }

    fn observe(&self, started: Instant, failure: Option<&PluginFailure>) {
        PluginMetrics::of(&self.plugin, &self.metrics)
            .on_token
            .observe(started, failure);
    }

    async fn call_on_tool_call(
        &mut self,
        index: u32,
        piece: ToolCallPiece<'_>,
    ) -> Result<Option<ToolCallAction>, PluginFailure> {
        let ChoiceInstance::Live(live) = self.instance(index).await? else {
            return Ok(None);
        };
        live.arm();
        let guest = live.guests.tool_call.as_ref().ok_or_else(no_hook)?;
        let piece = super::bindings::ToolCallPiece {
            call_index: piece.call_index,
            name: piece.name.map(str::to_owned),
            arguments: piece.arguments.to_owned(),
        };
        let action = guest
            .on_tool_call(&mut live.store, index, &piece)
            .await
            .map_err(PluginFailure::from_wasmtime)?;
        Ok(Some(match action {
            WitToolCallAction::Pass => ToolCallAction::Pass,
            WitToolCallAction::Replace(text) => ToolCallAction::Replace(checked_text(text)?),
            WitToolCallAction::Stop(text) => ToolCallAction::Stop(checked_text(text)?),
        }))
    }

    async fn instance(&mut self, index: u32) -> Result<&mut ChoiceInstance, PluginFailure> {
        let found = self.choices.iter().position(|(i, _)| *i == index);
        let at = match found {
            Some(at) => at,
            None => {
                let live = Box::new(
                    self.plugin
                        .checkout(&self.request_id, &self.key_id, true)
                        .await?,
                );
                self.choices.push((index, ChoiceInstance::Live(live)));
                self.choices.len() - 1
            }
        };
        Ok(&mut self.choices[at].1)
    }

    async fn call_on_token(
        &mut self,
        index: u32,
        text: &str,
    ) -> Result<Option<TokenAction>, PluginFailure> {
        match self.instance(index).await? {
            ChoiceInstance::Skipped => Ok(None),
            ChoiceInstance::Live(live) => {
                live.arm();
                let guest = live.guests.token.as_ref().ok_or_else(no_hook)?;
                let action = guest
                    .on_token(&mut live.store, index, text)
                    .await
                    .map_err(PluginFailure::from_wasmtime)?;
                Ok(Some(token_action(action)?))
            }
        }
    }

    /// `on-tokens` with several texts; `None` when the plugin was skipped or
    /// has no batch form (the caller then goes text by text).
    async fn call_on_tokens(
        &mut self,
        index: u32,
        texts: &[&str],
    ) -> Result<Option<Vec<TokenAction>>, PluginFailure> {
        let (mut text, mut ends) = (
            std::mem::take(&mut self.batch_text),
            std::mem::take(&mut self.batch_ends),
        );
        text.clear();
        ends.clear();
        for piece in texts {
            text.push_str(piece);
            ends.push(u32::try_from(text.len()).unwrap_or(u32::MAX));
        }
        let result = match self.instance(index).await? {
            ChoiceInstance::Live(live) if live.guests.token_batch.is_some() => {
                live.arm_for(u32::try_from(texts.len()).unwrap_or(u32::MAX));
                let guest = live.guests.token_batch.as_ref().ok_or_else(no_hook)?;
                guest
                    .on_tokens(&mut live.store, index, &text, &ends)
                    .await
                    .map(Some)
            }
            _ => Ok(None),
        };
        (self.batch_text, self.batch_ends) = (text, ends);
        let Some(actions) = result.map_err(PluginFailure::from_wasmtime)? else {
            return Ok(None);
        };
        let ends_in_stop = matches!(actions.last(), Some(WitAction::Stop(_)));
        if actions.len() > texts.len() || (actions.len() < texts.len() && !ends_in_stop) {
            return Err(PluginFailure::Invalid(format!(
                "on-tokens answered {} texts with {} actions",
                texts.len(),
                actions.len()
            )));
        }
        actions
            .into_iter()
            .map(token_action)
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn has_batch_form(&self) -> bool {
        self.plugin.exports.token_batch.is_some()
    }

    fn fail(&mut self, index: u32, failure: PluginFailure) -> Result<(), GatewayError> {
        self.fail_hook(index, "on-token", failure)
    }

    fn fail_hook(
        &mut self,
        index: u32,
        hook: &str,
        failure: PluginFailure,
    ) -> Result<(), GatewayError> {
        // The trapped instance is dropped here, never reused.
        match self.choices.iter_mut().find(|(i, _)| *i == index) {
            Some((_, choice)) => *choice = ChoiceInstance::Skipped,
            None => self.choices.push((index, ChoiceInstance::Skipped)),
        }
        PluginHost::on_failure(&self.plugin, hook, &self.request_id, failure)
    }
}

#[async_trait]
impl TokenFilter for WasmTokenFilter {
    async fn on_text(&mut self, index: u32, text: &str) -> Result<TokenAction, GatewayError> {
        let started = Instant::now();
        let result = self.call_on_token(index, text).await;
        match result {
            Ok(None) => Ok(TokenAction::Pass),
            Ok(Some(action)) => {
                self.observe(started, None);
                Ok(action)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure).map(|()| TokenAction::Pass)
            }
        }
    }

    async fn on_texts(
        &mut self,
        index: u32,
        texts: &[&str],
    ) -> Result<Vec<TokenAction>, GatewayError> {
        if texts.len() < 2 || !self.has_batch_form() {
            return crate::pipeline::policy::on_each_text(self, index, texts).await;
        }
        let started = Instant::now();
        let result = self.call_on_tokens(index, texts).await;
        match result {
            Ok(None) => Ok(vec![TokenAction::Pass; texts.len()]),
            Ok(Some(actions)) => {
                self.observe(started, None);
                Ok(actions)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure)
                    .map(|()| vec![TokenAction::Pass; texts.len()])
            }
        }
    }

    fn filters_text(&self) -> bool {
        self.plugin.exports.token.is_some()
    }

    fn filters_tool_calls(&self) -> bool {
        self.plugin.exports.tool_call.is_some()
    }

    async fn on_tool_call(
        &mut self,
        index: u32,
        piece: ToolCallPiece<'_>,
    ) -> Result<ToolCallAction, GatewayError> {
        let started = Instant::now();
        let result = self.call_on_tool_call(index, piece).await;
        let metrics = PluginMetrics::of(&self.plugin, &self.metrics);
        match result {
            Ok(None) => Ok(ToolCallAction::Pass),
            Ok(Some(action)) => {
                metrics.on_tool_call.observe(started, None);
                Ok(action)
            }
            Err(failure) => {
                metrics.on_tool_call.observe(started, Some(&failure));
                self.fail_hook(index, "on-tool-call", failure)
                    .map(|()| ToolCallAction::Pass)
            }
        }
    }

    async fn finish(&mut self, index: u32) -> Result<String, GatewayError> {
        let Some(at) = self.choices.iter().position(|(i, _)| *i == index) else {
            return Ok(String::new());
        };
        let ChoiceInstance::Live(mut live) = self.choices.swap_remove(at).1 else {
            return Ok(String::new());
        };
        let started = Instant::now();
        live.arm();
        let result = match live.guests.token.as_ref() {
            Some(guest) => guest
                .on_end(&mut live.store, index)
                .await
                .map_err(PluginFailure::from_wasmtime)
                .and_then(checked_text),
            // A filter of tool calls only: nothing is held.
            None => Ok(String::new()),
        };
        match result {
            Ok(text) => {
                self.observe(started, None);
                // on-end has flushed this choice: the instance may serve a later stream.
                self.plugin.checkin(*live, &self.key_id, true);
                Ok(text)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure).map(|()| String::new())
            }
        }
    }
}
