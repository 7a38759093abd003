//! Conversions between the current WIT types (`sluice:plugin@0.4.0`) and
//! those of the older versions a component may be built against. Records
//! that did not change between versions are copied field by field; a
//! request of a kind an older version has no record for converts to `None`.

use super::{
    CacheKeyDecision, ChatMessage, ChatRequest, CompletionRequest, InferenceRequest,
    PoolingRequest, Rejection, RequestContext, RequestDecision, TokenAction, ToolCallAction,
    ToolCallPiece, v1, v2, v3,
};

/// A record of another version with the same fields, cloned from `$from`.
macro_rules! copy {
    ($from:expr => $to:path { $($field:ident),* $(,)? }) => {{
        let from = $from;
        $to { $($field: from.$field.clone()),* }
    }};
}

/// Conversions shared by 0.1.0, 0.2.0 and 0.3.0, whose completion records,
/// contexts and hook results are the same as 0.4.0's.
macro_rules! common {
    ($version:ident, $module:ident, $modified:ident) => {
        pub mod $module {
            use super::*;
            use super::$version::exports::sluice::plugin as hooks;
            use super::$version::sluice::plugin::types as old;

            pub fn context(ctx: &RequestContext) -> old::RequestContext {
                copy!(ctx => old::RequestContext { request_id, key_id, key_name, route, transport })
            }

            pub fn completion(request: &CompletionRequest) -> old::CompletionRequest {
                copy!(request => old::CompletionRequest {
                    model, prompts, max_tokens, temperature, top_p, user, body_json
                })
            }

            pub fn completion_back(request: &old::CompletionRequest) -> CompletionRequest {
                copy!(request => CompletionRequest {
                    model, prompts, max_tokens, temperature, top_p, user, body_json
                })
            }

            pub fn decision_back(
                decision: hooks::request_hook::RequestDecision,
                request: impl FnOnce(old::$modified) -> InferenceRequest,
            ) -> RequestDecision {
                use hooks::request_hook::RequestDecision as Old;
                match decision {
                    Old::Proceed => RequestDecision::Proceed,
                    Old::Modify(modified) => RequestDecision::Modify(request(modified)),
                    Old::Reject(rejection) => RequestDecision::Reject(Rejection {
                        status: rejection.status,
                        message: rejection.message,
                    }),
                }
            }

            pub fn key_back(decision: hooks::cache_key_hook::CacheKeyDecision) -> CacheKeyDecision {
                use hooks::cache_key_hook::CacheKeyDecision as Old;
                match decision {
                    Old::UseDefault => CacheKeyDecision::UseDefault,
                    Old::Custom(key) => CacheKeyDecision::Custom(key),
                    Old::Bypass => CacheKeyDecision::Bypass,
                }
            }

            pub fn action_back(action: hooks::token_hook::TokenAction) -> TokenAction {
                use hooks::token_hook::TokenAction as Old;
                match action {
                    Old::Pass => TokenAction::Pass,
                    Old::Replace(text) => TokenAction::Replace(text),
                    Old::Hold => TokenAction::Hold,
                    Old::Stop(text) => TokenAction::Stop(text),
                }
            }
        }
    };
}

// What a request hook of each version may return as a rewritten request.
common!(v1, legacy_v1, CompletionRequest);
common!(v2, legacy_v2, InferenceRequest);
common!(v3, legacy_v3, InferenceRequest);

/// The chat record of an older version (the same fields as 0.4.0's), to it and back.
macro_rules! chat_records {
    ($version:ident, $to:ident, $back:ident) => {
        fn $to(chat: &ChatRequest) -> $version::sluice::plugin::types::ChatRequest {
            use $version::sluice::plugin::types as old;
            old::ChatRequest {
                model: chat.model.clone(),
                messages: chat
                    .messages
                    .iter()
                    .map(|m| copy!(m => old::ChatMessage { role, content, json }))
                    .collect(),
                max_tokens: chat.max_tokens,
                temperature: chat.temperature,
                top_p: chat.top_p,
                user: chat.user.clone(),
                body_json: chat.body_json.clone(),
            }
        }

        fn $back(chat: $version::sluice::plugin::types::ChatRequest) -> ChatRequest {
            ChatRequest {
                messages: chat
                    .messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                        json: m.json,
                    })
                    .collect(),
                model: chat.model,
                max_tokens: chat.max_tokens,
                temperature: chat.temperature,
                top_p: chat.top_p,
                user: chat.user,
                body_json: chat.body_json,
            }
        }
    };
}

chat_records!(v2, chat_to_v2, chat_from_v2);
chat_records!(v3, chat_to_v3, chat_from_v3);

/// 0.1.0 reads completions only.
pub fn to_v1(request: &InferenceRequest) -> Option<v1::sluice::plugin::types::CompletionRequest> {
    match request {
        InferenceRequest::Completion(completion) => Some(legacy_v1::completion(completion)),
        InferenceRequest::Chat(_) | InferenceRequest::Pooling(_) => None,
    }
}

/// 0.2.0 reads completions and chats.
pub fn to_v2(request: &InferenceRequest) -> Option<v2::sluice::plugin::types::InferenceRequest> {
    use v2::sluice::plugin::types as old;
    Some(match request {
        InferenceRequest::Completion(completion) => {
            old::InferenceRequest::Completion(legacy_v2::completion(completion))
        }
        InferenceRequest::Chat(chat) => old::InferenceRequest::Chat(chat_to_v2(chat)),
        InferenceRequest::Pooling(_) => return None,
    })
}

pub fn from_v2(request: v2::sluice::plugin::types::InferenceRequest) -> InferenceRequest {
    use v2::sluice::plugin::types as old;
    match request {
        old::InferenceRequest::Completion(completion) => {
            InferenceRequest::Completion(legacy_v2::completion_back(&completion))
        }
        old::InferenceRequest::Chat(chat) => InferenceRequest::Chat(chat_from_v2(chat)),
    }
}

pub fn v2_piece(
    piece: &ToolCallPiece,
) -> v2::exports::sluice::plugin::tool_call_hook::ToolCallPiece {
    copy!(piece => v2::exports::sluice::plugin::tool_call_hook::ToolCallPiece {
        call_index, name, arguments
    })
}

pub fn tool_action_back(
    action: v2::exports::sluice::plugin::tool_call_hook::ToolCallAction,
) -> ToolCallAction {
    use v2::exports::sluice::plugin::tool_call_hook::ToolCallAction as Old;
    match action {
        Old::Pass => ToolCallAction::Pass,
        Old::Replace(text) => ToolCallAction::Replace(text),
        Old::Stop(text) => ToolCallAction::Stop(text),
    }
}

/// 0.3.0 reads completions, chats and the pooling routes: the same records
/// as 0.4.0 (which adds the agent APIs' conversations, as chats: the
/// caller does not hand those to a 0.3.0 component).
pub fn to_v3(request: &InferenceRequest) -> Option<v3::sluice::plugin::types::InferenceRequest> {
    use v3::sluice::plugin::types as old;
    Some(match request {
        InferenceRequest::Completion(completion) => {
            old::InferenceRequest::Completion(legacy_v3::completion(completion))
        }
        InferenceRequest::Chat(chat) => old::InferenceRequest::Chat(chat_to_v3(chat)),
        InferenceRequest::Pooling(pooling) => old::InferenceRequest::Pooling(
            copy!(pooling => old::PoolingRequest { model, texts, body_json }),
        ),
    })
}

pub fn from_v3(request: v3::sluice::plugin::types::InferenceRequest) -> InferenceRequest {
    use v3::sluice::plugin::types as old;
    match request {
        old::InferenceRequest::Completion(completion) => {
            InferenceRequest::Completion(legacy_v3::completion_back(&completion))
        }
        old::InferenceRequest::Chat(chat) => InferenceRequest::Chat(chat_from_v3(chat)),
        old::InferenceRequest::Pooling(pooling) => InferenceRequest::Pooling(PoolingRequest {
            model: pooling.model,
            texts: pooling.texts,
            body_json: pooling.body_json,
        }),
    }
}

pub fn v3_piece(
    piece: &ToolCallPiece,
) -> v3::exports::sluice::plugin::tool_call_hook::ToolCallPiece {
    copy!(piece => v3::exports::sluice::plugin::tool_call_hook::ToolCallPiece {
        call_index, name, arguments
    })
}

pub fn v3_tool_action_back(
    action: v3::exports::sluice::plugin::tool_call_hook::ToolCallAction,
) -> ToolCallAction {
    use v3::exports::sluice::plugin::tool_call_hook::ToolCallAction as Old;
    match action {
        Old::Pass => ToolCallAction::Pass,
        Old::Replace(text) => ToolCallAction::Replace(text),
        Old::Stop(text) => ToolCallAction::Stop(text),
    }
}
