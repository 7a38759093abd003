//! The chain against scripted filters: holds, flushes, batch and chunk by
//! chunk alike, chat deltas and tool calls.

use super::*;
use crate::backends::cache::CachedChunks;
use crate::protocol::ChunkSummary;
use async_trait::async_trait;
use serde_json::json;

/// Upper-cases text, holding anything after a `#` until the end.
struct Upper {
    held: String,
}

#[async_trait]
impl TokenFilter for Upper {
    async fn on_text(&mut self, _index: u32, text: &str) -> Result<TokenAction, GatewayError> {
        if text.contains('#') || !self.held.is_empty() {
            self.held.push_str(text);
            return Ok(TokenAction::Hold);
        }
        Ok(TokenAction::Replace(text.to_uppercase()))
    }
    async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
        Ok(std::mem::take(&mut self.held))
    }
}

fn chunk(text: &str, finish: Option<&str>) -> Chunk {
    let body = serde_json::json!({"id":"c","object":"text_completion","created":1,"model":"m",
        "choices":[{"index":0,"text":text,"logprobs":null,"finish_reason":finish,"stop_reason":null}],"usage":null});
    Chunk::from_payload(body.to_string().as_bytes())
}

fn text_of(filtered: Filtered) -> Option<String> {
    match filtered {
        Filtered::Chunk(c) | Filtered::Stop(c) => {
            let v: Value = serde_json::from_slice(c.payload_slice()).unwrap();
            Some(v["choices"][0]["text"].as_str().unwrap().to_string())
        }
        Filtered::Skip => None,
        Filtered::Then(..) => panic!("completion chunks come one at a time"),
    }
}

#[tokio::test]
async fn replaces_holds_and_flushes_at_the_finishing_chunk() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })]);
    assert_eq!(
        text_of(chain.apply(chunk("ab", None)).await.unwrap()).as_deref(),
        Some("AB")
    );
    assert_eq!(text_of(chain.apply(chunk("#x", None)).await.unwrap()), None);
    assert_eq!(
        text_of(chain.apply(chunk("y", Some("length"))).await.unwrap()).as_deref(),
        Some("#xy")
    );
    assert!(
        chain
            .finish(Some(&chunk("", None)))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn flushes_held_text_when_the_stream_ends_without_finish_reason() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })]);
    let template = chunk("#held", None);
    assert!(matches!(
        chain.apply(template.clone()).await.unwrap(),
        Filtered::Skip
    ));
    let last = chain.finish(Some(&template)).await.unwrap().unwrap();
    assert_eq!(text_of(Filtered::Chunk(last)).as_deref(), Some("#held"));
}

/// Upper-cases text, holds text from a `#` until a `!`, and stops the
/// response at a `$` (appending `+` for each call to `finish`).
struct Scripted {
    held: String,
}

#[async_trait]
impl TokenFilter for Scripted {
    async fn on_text(&mut self, _index: u32, text: &str) -> Result<TokenAction, GatewayError> {
        if text.contains('$') {
            return Ok(TokenAction::Stop(format!(
                "{}{}",
                self.held,
                text.to_uppercase()
            )));
        }
        if text.contains('#') || !self.held.is_empty() {
            self.held.push_str(text);
            if text.contains('!') {
                return Ok(TokenAction::Replace(std::mem::take(&mut self.held)));
            }
            return Ok(TokenAction::Hold);
        }
        Ok(TokenAction::Replace(text.to_uppercase()))
    }
    async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
        Ok(format!("{}+", std::mem::take(&mut self.held)))
    }
}

fn scripted_chain(filters: usize) -> FilterChain {
    FilterChain::new(
        (0..filters)
            .map(|_| {
                Box::new(Scripted {
                    held: String::new(),
                }) as Box<dyn TokenFilter>
            })
            .collect(),
    )
}

fn payloads(results: Vec<Filtered>) -> Vec<Option<(bool, String)>> {
    results
        .into_iter()
        .map(|f| match f {
            Filtered::Chunk(c) => Some((false, String::from_utf8_lossy(c.payload_slice()).into())),
            Filtered::Stop(c) => Some((true, String::from_utf8_lossy(c.payload_slice()).into())),
            Filtered::Skip => None,
            Filtered::Then(..) => panic!("completion chunks come one at a time"),
        })
        .collect()
}

#[tokio::test]
async fn filtering_all_chunks_at_once_gives_what_chunk_by_chunk_gives() {
    let usage = Chunk::from_payload(br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1}}"#);
    let scripts: Vec<Vec<Chunk>> = vec![
        vec![
            chunk("ab", None),
            chunk(" cd", None),
            chunk("e", Some("length")),
            usage.clone(),
        ],
        vec![
            chunk("a", None),
            chunk("#b", None),
            chunk("c", None),
            chunk("d!", None),
            chunk("e", Some("stop")),
        ],
        vec![
            chunk("a", None),
            chunk("#held", None),
            chunk("", None),
            chunk("x", Some("length")),
        ],
        vec![
            chunk("a", None),
            chunk("b$", None),
            chunk("never", None),
            chunk("sent", Some("length")),
        ],
        vec![
            chunk("#a", None),
            chunk("b$", None),
            chunk("c", Some("length")),
        ],
        vec![chunk("a", None), chunk("b", None)],
    ];
    for chunks in scripts {
        for filters in [1, 2, 3] {
            let mut one_by_one = scripted_chain(filters);
            let mut expected = Vec::new();
            for c in &chunks {
                let filtered = one_by_one.apply(c.clone()).await.unwrap();
                let stop = matches!(filtered, Filtered::Stop(_));
                expected.push(filtered);
                if stop {
                    break;
                }
            }
            let payloads_expected = payloads(expected);
            let cached = CachedChunks::new(chunks.clone());
            // The second hit on an entry reads the views the first one parsed.
            let first_hit = scripted_chain(filters).apply_all(&cached).await.unwrap();
            let mut at_once = scripted_chain(filters);
            let all = at_once.apply_all(&cached).await.unwrap();
            assert_eq!(
                payloads(first_hit),
                payloads_expected,
                "{filters} filters, first hit"
            );
            for (view, chunk) in cached.views().iter().zip(&chunks) {
                let summary = view
                    .as_ref()
                    .map_or_else(ChunkSummary::default, ChunkView::summary);
                let expected = chunk.summary();
                assert_eq!(
                    (summary.choices, summary.usage),
                    (expected.choices, expected.usage)
                );
            }
            assert_eq!(payloads(all), payloads_expected, "{filters} filters");
            let template = chunks.last().cloned();
            let flushed = |c: Option<Chunk>| c.map(|c| c.payload_slice().to_vec());
            assert_eq!(
                flushed(at_once.finish(template.as_ref()).await.unwrap()),
                flushed(one_by_one.finish(template.as_ref()).await.unwrap()),
                "{filters} filters, end of stream"
            );
        }
    }
}

fn chat_chunk(delta: Value, finish: Option<&str>) -> Chunk {
    let body = serde_json::json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",
        "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]});
    Chunk::from_payload(body.to_string().as_bytes())
}

fn delta_of(filtered: Filtered) -> Option<Value> {
    match filtered {
        Filtered::Chunk(c) | Filtered::Stop(c) => {
            let v: Value = serde_json::from_slice(c.payload_slice()).unwrap();
            Some(v["choices"][0]["delta"].clone())
        }
        Filtered::Skip => None,
        Filtered::Then(..) => panic!("chat chunks come one at a time"),
    }
}

#[tokio::test]
async fn chat_deltas_are_filtered_and_tool_calls_pass_untouched() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })]);
    let role = chat_chunk(serde_json::json!({"role":"assistant","content":""}), None);
    assert_eq!(
        delta_of(chain.apply(role.clone()).await.unwrap()),
        Some(serde_json::json!({"role":"assistant","content":""}))
    );
    assert_eq!(
        delta_of(
            chain
                .apply(chat_chunk(serde_json::json!({"content":"hi"}), None))
                .await
                .unwrap()
        ),
        Some(serde_json::json!({"content":"HI"}))
    );
    let tool = chat_chunk(
        serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"q\": \"x\"}"}}]}),
        None,
    );
    match chain.apply(tool.clone()).await.unwrap() {
        Filtered::Chunk(c) => assert_eq!(c, tool),
        _ => panic!("a tool-call delta must pass as it came"),
    }
    assert!(
        delta_of(
            chain
                .apply(chat_chunk(serde_json::json!({"content":"#a"}), None))
                .await
                .unwrap()
        )
        .is_none()
    );
    // The held text comes out with the finishing chunk, whose delta had no content.
    assert_eq!(
        delta_of(
            chain
                .apply(chat_chunk(serde_json::json!({}), Some("stop")))
                .await
                .unwrap()
        ),
        Some(serde_json::json!({"content":"#a"}))
    );
}

/// Reads tool calls only: upper-cases arguments, stops a call of `rm`.
struct ToolGuard;

#[async_trait]
impl TokenFilter for ToolGuard {
    async fn on_text(&mut self, _index: u32, _text: &str) -> Result<TokenAction, GatewayError> {
        panic!("a filter of tool calls never sees text");
    }
    async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
        Ok(String::new())
    }
    fn filters_text(&self) -> bool {
        false
    }
    fn filters_tool_calls(&self) -> bool {
        true
    }
    async fn on_tool_call(
        &mut self,
        _index: u32,
        piece: ToolCallPiece<'_>,
    ) -> Result<ToolCallAction, GatewayError> {
        Ok(match piece.name {
            Some("rm") => ToolCallAction::Stop("no".into()),
            _ => ToolCallAction::Replace(piece.arguments.to_uppercase()),
        })
    }
}

fn tool_chunks(name: &str) -> Vec<Chunk> {
    let call = |v: Value| chat_chunk(serde_json::json!({"tool_calls": [v]}), None);
    vec![
        chat_chunk(serde_json::json!({"role":"assistant","content":""}), None),
        call(
            serde_json::json!({"index":0,"id":"c1","type":"function","function":{"name":name,"arguments":""}}),
        ),
        call(serde_json::json!({"index":0,"function":{"arguments":"{\"q\": "}})),
        chat_chunk(
            serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"\"x\"}"}}]}),
            Some("tool_calls"),
        ),
    ]
}

#[tokio::test]
async fn tool_calls_reach_only_the_filters_that_ask_for_them() {
    let cached = CachedChunks::new(tool_chunks("search"));
    let all = FilterChain::new(vec![Box::new(ToolGuard)])
        .apply_all(&cached)
        .await
        .unwrap();
    let deltas: Vec<Value> = all.into_iter().map(|f| delta_of(f).unwrap()).collect();
    assert_eq!(
        deltas[0],
        serde_json::json!({"role":"assistant","content":""})
    );
    assert_eq!(
        deltas[1]["tool_calls"][0]["id"], "c1",
        "the rest of a piece is kept"
    );
    assert_eq!(
        deltas[2]["tool_calls"][0]["function"]["arguments"],
        "{\"Q\": "
    );
    assert_eq!(
        deltas[3]["tool_calls"][0]["function"]["arguments"],
        "\"X\"}"
    );

    let mut chain = FilterChain::new(vec![Box::new(ToolGuard)]);
    let chunks = tool_chunks("rm");
    assert!(
        matches!(chain.apply(chunks[0].clone()).await.unwrap(), Filtered::Chunk(c) if c == chunks[0])
    );
    let Filtered::Stop(stopped) = chain.apply(chunks[1].clone()).await.unwrap() else {
        panic!("a call of rm must stop the response");
    };
    let stopped: Value = serde_json::from_slice(stopped.payload_slice()).unwrap();
    assert_eq!(
        stopped["choices"][0]["delta"],
        serde_json::json!({"content":"no"})
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Without such a filter, tool calls pass as they came.
    let mut upper = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })]);
    for chunk in tool_chunks("rm") {
        assert!(
            matches!(upper.apply(chunk.clone()).await.unwrap(), Filtered::Chunk(c) if c == chunk)
        );
    }
}

fn event(body: Value) -> Chunk {
    Chunk::from_payload(body.to_string().as_bytes())
}

fn events_of(filtered: Filtered) -> Vec<Value> {
    let parse = |c: Chunk| serde_json::from_slice::<Value>(c.payload_slice()).unwrap();
    match filtered {
        Filtered::Chunk(c) | Filtered::Stop(c) => vec![parse(c)],
        Filtered::Then(a, b) => vec![parse(a), parse(b)],
        Filtered::Skip => Vec::new(),
    }
}

#[tokio::test]
async fn responses_deltas_are_filtered_held_text_flushed_and_done_events_agree() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })])
    .for_api(Some(TypedApi::Responses));
    let delta = |seq: u64, text: &str| {
        event(
            json!({"content_index":0,"delta":text,"item_id":"m","logprobs":[],"output_index":0,
            "sequence_number":seq,"type":"response.output_text.delta"}),
        )
    };
    let mut out = Vec::new();
    for chunk in [
        delta(4, "ab"),
        delta(5, "c#d"),
        delta(6, "e"),
        event(
            json!({"content_index":0,"item_id":"m","logprobs":[],"output_index":0,
            "sequence_number":7,"text":"abc#de","type":"response.output_text.done"}),
        ),
        event(
            json!({"content_index":0,"item_id":"m","output_index":0,"part":{"text":"abc#de","type":"output_text"},
            "sequence_number":8,"type":"response.content_part.done"}),
        ),
        event(
            json!({"item":{"content":[{"text":"abc#de","type":"output_text"}],"type":"message"},
            "output_index":0,"sequence_number":9,"type":"response.output_item.done"}),
        ),
        event(
            json!({"response":{"output":[{"content":[{"text":"abc#de","type":"output_text"}],
            "type":"message"}],"status":"completed"},"sequence_number":10,"type":"response.completed"}),
        ),
    ] {
        out.extend(events_of(chain.apply(chunk).await.unwrap()));
    }
    let summary: Vec<(u64, &str)> = out
        .iter()
        .map(|e| {
            (
                e["sequence_number"].as_u64().unwrap(),
                e["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (4, "response.output_text.delta"),
            (7, "response.output_text.delta"),
            (8, "response.output_text.done"),
            (9, "response.content_part.done"),
            (10, "response.output_item.done"),
            (11, "response.completed"),
        ]
    );
    assert_eq!(
        (out[0]["delta"].as_str(), out[1]["delta"].as_str()),
        (Some("AB"), Some("c#de"))
    );
    for text in [
        &out[2]["text"],
        &out[3]["part"]["text"],
        &out[4]["item"]["content"][0]["text"],
        &out[5]["response"]["output"][0]["content"][0]["text"],
    ] {
        assert_eq!(text, "ABc#de");
    }
}

#[tokio::test]
async fn anthropic_text_deltas_are_filtered_and_held_text_precedes_the_block_stop() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })])
    .for_api(Some(TypedApi::Anthropic));
    let delta = |text: &str| {
        event(
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}}),
        )
    };
    let first = events_of(chain.apply(delta("hi")).await.unwrap());
    assert_eq!(first[0]["delta"]["text"], "HI");
    assert!(events_of(chain.apply(delta(" #x")).await.unwrap()).is_empty());
    let stop = events_of(
        chain
            .apply(event(json!({"type":"content_block_stop","index":0})))
            .await
            .unwrap(),
    );
    assert_eq!(stop.len(), 2);
    assert_eq!(stop[0]["delta"]["text"], " #x");
    assert_eq!(stop[1]["type"], "content_block_stop");
    let untouched = event(
        json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}),
    );
    assert_eq!(
        events_of(chain.apply(untouched.clone()).await.unwrap()).len(),
        1
    );

    // A whole message: each text block through the filters.
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })])
    .for_api(Some(TypedApi::Anthropic));
    let message = event(json!({"id":"msg","type":"message","role":"assistant",
        "content":[{"type":"text","text":"whole"}],"usage":{"input_tokens":1,"output_tokens":1}}));
    let out = events_of(chain.apply(message).await.unwrap());
    assert_eq!(out[0]["content"][0]["text"], "WHOLE");
}

#[tokio::test]
async fn a_whole_response_is_filtered() {
    let mut chain = FilterChain::new(vec![Box::new(Upper {
        held: String::new(),
    })])
    .for_api(Some(TypedApi::Responses));
    let response = event(
        json!({"id":"resp_1","object":"response","output":[{"id":"msg_1",
        "content":[{"annotations":[],"text":"whole","type":"output_text","logprobs":null}],
        "role":"assistant","status":"completed","type":"message"}],"status":"completed","user":null}),
    );
    let out = events_of(chain.apply(response).await.unwrap());
    assert_eq!(out[0]["output"][0]["content"][0]["text"], "WHOLE");
}
