//! A cached answer through the filters all at once: one call per filter
//! for the whole text (its batch hook) instead of one per chunk.

use std::borrow::Cow;

use super::rebuild::{ChoiceOutput, assemble, has_tool_calls};
use super::{FilterChain, Filtered};
use crate::backends::cache::CachedChunks;
use crate::error::GatewayError;
use crate::pipeline::policy::TokenAction;
use crate::protocol::ChunkView;

impl FilterChain {
    pub async fn apply_all(
        &mut self,
        chunks: &CachedChunks,
    ) -> Result<Vec<Filtered>, GatewayError> {
        // The chunks with choices.
        let choice_views: Vec<Option<&ChunkView<'_>>> = chunks
            .views()
            .iter()
            .map(|v| v.as_ref().filter(|v| !v.choices.is_empty()))
            .collect();
        // One choice throughout (`n` = 1, the usual case): batch. Otherwise chunk by chunk.
        let mut indices = choice_views
            .iter()
            .flatten()
            .flat_map(|p| &p.choices)
            .map(|c| c.index);
        let single_choice = choice_views.iter().flatten().all(|p| p.choices.len() == 1)
            && indices
                .next()
                .is_some_and(|first| indices.all(|i| i == first));
        let tool_calls =
            self.tool_call_filters && chunks.iter().any(|c| has_tool_calls(c.payload_slice()));
        if !self.text_filters || !single_choice || tool_calls {
            let mut results = Vec::with_capacity(chunks.len());
            for chunk in chunks.iter() {
                let filtered = self.apply(chunk.clone()).await?;
                let stop = matches!(filtered, Filtered::Stop(_));
                results.push(filtered);
                if stop {
                    break;
                }
            }
            return Ok(results);
        }
        let index = choice_views
            .iter()
            .flatten()
            .map(|p| p.choices[0].index)
            .next()
            .unwrap_or(0);
        if !self.seen.contains(&index) {
            self.seen.push(index);
        }
        // The text of each chunk as it passes from filter to filter.
        let mut texts: Vec<Cow<'_, str>> = choice_views
            .iter()
            .map(|p| p.map_or(Cow::Borrowed(""), |p| Cow::Borrowed(p.choices[0].text())))
            .collect();
        let finishing: Vec<bool> = choice_views
            .iter()
            .map(|p| {
                p.as_ref()
                    .is_some_and(|p| p.choices[0].finish_reason.is_some())
            })
            .collect();
        // Chunks after a `Stop` are never delivered.
        let mut end = chunks.len();
        let mut stopped_at = None;
        for filter in self.filters.iter_mut().filter(|f| f.filters_text()) {
            let mut start = 0;
            while start < end {
                // Up to and including the next chunk that ends the choice.
                let segment_end = (start..end).find(|&i| finishing[i]).map_or(end, |i| i + 1);
                let positions: Vec<usize> = (start..segment_end)
                    .filter(|&i| choice_views[i].is_some() && !texts[i].is_empty())
                    .collect();
                let inputs: Vec<&str> = positions.iter().map(|&i| &*texts[i]).collect();
                let actions = if inputs.is_empty() {
                    Vec::new()
                } else {
                    filter.on_texts(index, &inputs).await?
                };
                let valid = actions.len() == inputs.len()
                    || matches!(actions.last(), Some(TokenAction::Stop(_)));
                if !valid || actions.len() > inputs.len() {
                    return Err(GatewayError::Internal(format!(
                        "a token filter answered {} texts with {} actions",
                        inputs.len(),
                        actions.len()
                    )));
                }
                drop(inputs);
                let mut stop_here = None;
                for (&i, action) in positions.iter().zip(actions) {
                    match action {
                        TokenAction::Pass => {}
                        TokenAction::Replace(text) => texts[i] = Cow::Owned(text),
                        TokenAction::Hold => texts[i] = Cow::Borrowed(""),
                        TokenAction::Stop(text) => {
                            texts[i] = Cow::Owned(text);
                            stop_here = Some(i);
                        }
                    }
                }
                // A stop from an earlier filter ends this one too.
                let last = segment_end - 1;
                let stop_here = stop_here.or(stopped_at.filter(|&s| s == last));
                if let Some(i) = stop_here {
                    end = i + 1;
                    stopped_at = Some(i);
                    let held = filter.finish(index).await?;
                    if !held.is_empty() {
                        texts[i].to_mut().push_str(&held);
                    }
                    break;
                }
                if finishing[last] {
                    let held = filter.finish(index).await?;
                    if !held.is_empty() {
                        texts[last].to_mut().push_str(&held);
                    }
                }
                start = segment_end;
            }
        }
        let mut results = Vec::with_capacity(end);
        for (i, (chunk, text)) in chunks.iter().zip(texts).take(end).enumerate() {
            let Some(view) = choice_views[i] else {
                results.push(Filtered::Chunk(chunk.clone()));
                continue;
            };
            let stop = stopped_at == Some(i);
            if finishing[i] || stop {
                self.finished.push(index);
            }
            let output = ChoiceOutput {
                text,
                finishing: finishing[i],
                stop,
            };
            results.push(assemble(chunk, view, std::slice::from_ref(&output)));
        }
        Ok(results)
    }
}
