//! `POST /v1/chat/completions` in OpenAI's shape, for the clients that speak it.
//!
//! The request must hold exactly one user message whose `content` is one `image_url` part (a
//! `data:` URL: the server fetches nothing) and one `text` part, the PaliGemma prompt.
//!
//! Decoding is always greedy. The request fields (OpenAI's reference, 2026) fall in three groups:
//! - `temperature` (0 to 2), `top_p` (0 to 1) and `seed` shape sampling only: accepted, since
//!   clients send them by default, and greedy's answer is the one they converge to; `user`,
//!   `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier` and
//!   `parallel_tool_calls` are bookkeeping: accepted;
//! - fields that would change the tokens or the answer's shape (`NEUTRAL`: penalties,
//!   `logit_bias`, `logprobs`, `stop`, `n`, `response_format`, tools, audio, ...): accepted at the
//!   value that changes nothing (`0`, `false`, `null`, `[]`, `{"type": "text"}`), otherwise a 400
//!   `unsupported_parameter` naming the field and the value this server takes;
//! - anything else: a 400 naming the unknown field.
//!
//! The answer adds a `paligemma` object (`detections`, `segments`,
//! `image_size`) that OpenAI clients ignore; `usage.prompt_tokens` counts the image tokens.
//! With `stream`, chunks as OpenAI sends them: the role first, then one per token, then the
//! finish reason, the usage when `stream_options.include_usage`, then `data: [DONE]`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;

use crate::api::{
    AssistantMessage, ChatChunk, ChatCompletion, ChatRequest, ChunkChoice, CompletionChoice, Delta, ErrorCode, Extras, ImageUrl, Message,
    Part, Usage,
};
use crate::pipeline::Response;
use crate::serve::api::{self, decode_base64_image, ApiError};
use crate::serve::batcher::{Event, Ticket};
use crate::serve::AppState;

/// Accepted with any value: they only shape sampling, which greedy decoding does not do, or
/// are bookkeeping this server has no use for.
const IGNORED: &[&str] = &[
    "seed",
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
];

/// Fields accepted only at the value that changes nothing here: (name, is it that value, the
/// value to send).
type Neutral = (&'static str, fn(&Value) -> bool, &'static str);

fn zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}
fn empty(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(serde_json::Map::is_empty) || v.as_str() == Some("")
}
fn is_false(v: &Value) -> bool {
    v.as_bool() == Some(false)
}

/// `null` is neutral for each of them as well.
const NEUTRAL: &[Neutral] = &[
    ("n", |v| v.as_f64() == Some(1.0), "1 (greedy decoding gives one answer)"),
    ("frequency_penalty", zero, "0 (decoding is greedy, without penalties)"),
    ("presence_penalty", zero, "0 (decoding is greedy, without penalties)"),
    ("logit_bias", empty, "{} (no biases)"),
    ("logprobs", is_false, "false (log probabilities are not returned)"),
    ("top_logprobs", zero, "0 (log probabilities are not returned)"),
    ("stop", empty, "null (no stop sequences; the answer ends at <eos> or max_tokens)"),
    (
        "response_format",
        |v| v.get("type").and_then(Value::as_str) == Some("text") && v.as_object().is_some_and(|o| o.len() == 1),
        "{\"type\": \"text\"}",
    ),
    ("tools", empty, "[] (no tool calls)"),
    ("tool_choice", |v| v.as_str() == Some("none"), "\"none\" (no tool calls)"),
    ("functions", empty, "[] (no function calls)"),
    ("function_call", |v| v.as_str() == Some("none"), "\"none\" (no function calls)"),
    ("modalities", |v| *v == serde_json::json!(["text"]), "[\"text\"]"),
    ("audio", |_| false, "null (text answers only)"),
    ("prediction", |_| false, "null (no predicted outputs)"),
    ("reasoning_effort", |_| false, "null (not a reasoning model)"),
    ("verbosity", |_| false, "null"),
    ("web_search_options", |_| false, "null (the server fetches nothing)"),
];

/// Takes the [`IGNORED`] and [`NEUTRAL`] fields out of the body, refusing a field of the latter
/// at any other value; what stays is [`ChatRequest`]'s.
fn take_neutral_fields(body: &mut serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for name in IGNORED {
        body.remove(*name);
    }
    for (name, is_neutral, neutral) in NEUTRAL {
        if let Some(value) = body.remove(*name) {
            if !value.is_null() && !is_neutral(&value) {
                return Err(ApiError::invalid(
                    ErrorCode::UnsupportedParameter,
                    format!("{name} is {value}, which this server does not support; send {neutral} or leave {name} out"),
                ));
            }
        }
    }
    Ok(())
}

/// Parses the body: the neutral fields checked and dropped, the rest into [`ChatRequest`].
fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let mut object: serde_json::Map<String, Value> = api::parse_json(body, CHAT_SHAPE)?;
    take_neutral_fields(&mut object)?;
    let chat: ChatRequest = serde_json::from_value(Value::Object(object)).map_err(|e| {
        ApiError::invalid(
            ErrorCode::InvalidJson,
            format!("the body is not a valid request: {e}; expected {CHAT_SHAPE}"),
        )
    })?;
    let out_of_range = |name: &str, value: f64, range: &str| {
        ApiError::invalid(ErrorCode::InvalidValue, format!("{name} is {value}; OpenAI's range is {range}"))
    };
    if let Some(t) = chat.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(out_of_range("temperature", t, "0 to 2"));
    }
    if let Some(p) = chat.top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(out_of_range("top_p", p, "0 to 1"));
    }
    Ok(chat)
}

const CONTENT_SHAPE: &str =
    "[{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}, {\"type\": \"text\", \"text\": PROMPT}]";

const CHAT_SHAPE: &str = "{\"model\": NAME, \"messages\": [{\"role\": \"user\", \"content\": [image_url part, text part]}], \"max_tokens\": N, \"stream\": BOOL}";

/// The image bytes and prompt of the one user message.
fn parse_messages(messages: Vec<Message>) -> Result<(Vec<u8>, String), ApiError> {
    if let Some(m) = messages.iter().find(|m| m.role == "system" || m.role == "developer") {
        return Err(ApiError::invalid(
            ErrorCode::UnsupportedMessage,
            format!(
                "{} messages are not supported: PaliGemma takes no instructions, only a task prompt such as \"caption en\"; send one user message",
                m.role
            ),
        ));
    }
    let mut messages = messages.into_iter();
    let (Some(message), None) = (messages.next(), messages.next()) else {
        return Err(ApiError::invalid(
            ErrorCode::UnsupportedMessage,
            "send exactly one user message: this model answers one image and one prompt, not a conversation",
        ));
    };
    if message.role != "user" {
        return Err(ApiError::invalid(
            ErrorCode::UnsupportedMessage,
            format!("the message's role is {:?}; send one message with role \"user\"", message.role),
        ));
    }
    parse_content(message.content)
}

fn parse_content(content: Value) -> Result<(Vec<u8>, String), ApiError> {
    let wrong = |what: String| {
        ApiError::invalid(
            ErrorCode::InvalidContent,
            format!("{what}; the user message's content must be {CONTENT_SHAPE}"),
        )
    };
    if !content.is_array() {
        return Err(wrong("the content is not an array of parts (this model needs an image)".into()));
    }
    let parts: Vec<Part> = serde_json::from_value(content).map_err(|e| wrong(format!("a content part is malformed ({e})")))?;
    let (mut images, mut texts) = (Vec::new(), Vec::new());
    for part in parts {
        match part {
            Part::Text { text } => texts.push(text),
            Part::ImageUrl {
                image_url: ImageUrl::Object { url, .. } | ImageUrl::Url(url),
            } => images.push(url),
        }
    }
    if images.len() != 1 || texts.len() != 1 {
        return Err(wrong(format!(
            "the content has {} image_url and {} text parts, not one of each",
            images.len(),
            texts.len()
        )));
    }
    let (url, prompt) = (images.remove(0), texts.remove(0));
    if api::data_url(&url).is_none() {
        return Err(ApiError::invalid(
            ErrorCode::UnsupportedImageUrl,
            "only data: URLs, the server fetches nothing: send the image as data:image/png;base64,...",
        ));
    }
    Ok((decode_base64_image("image_url.url", &url)?, prompt))
}

/// A fresh `chatcmpl-` id: the time and a counter, unique within and across runs.
fn completion_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("chatcmpl-{nanos:x}{:04x}", COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every chunk and the answer share.
struct Reply {
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn finish_reason(response: &Response) -> &'static str {
        if response.finished {
            "stop"
        } else {
            "length"
        }
    }

    fn usage(response: &Response) -> Usage {
        let completion = response.token_ids.len();
        Usage {
            prompt_tokens: response.prompt_tokens,
            completion_tokens: completion,
            total_tokens: response.prompt_tokens + completion,
        }
    }

    fn extras(response: &Response) -> Extras<'_> {
        Extras {
            detections: &response.detections,
            segments: &response.segments,
            image_size: response.image_size,
        }
    }

    fn completion<'a>(&'a self, response: &'a Response) -> ChatCompletion<'a> {
        ChatCompletion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: [CompletionChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &response.text,
                },
                finish_reason: Reply::finish_reason(response),
            }],
            usage: Reply::usage(response),
            paligemma: Reply::extras(response),
        }
    }

    /// A chunk of one choice; no choice when `delta` is `None` (the usage chunk).
    fn chunk<'a>(&'a self, delta: Option<Delta<'a>>, finish_reason: Option<&'static str>) -> ChatChunk<'a> {
        ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: delta
                .map(|delta| ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason,
                })
                .into_iter()
                .collect(),
            usage: None,
            paligemma: None,
        }
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Result<HttpResponse, ApiError> {
    match api::media_type(request.headers()).as_deref() {
        Some("application/json") => {}
        other => return Err(ApiError::unsupported_media_type(other, "application/json")),
    }
    let body = api::read_body(request).await?;
    let chat = parse_chat(&body)?;
    let (image, prompt) = parse_messages(chat.messages)?;
    let request = state
        .limits
        .check(&state.prompts, image, prompt, chat.max_completion_tokens.or(chat.max_tokens), None)?;
    let stream = chat.stream.unwrap_or(false);
    let include_usage = chat.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let ticket = state.queue.submit(request, stream)?;
    let reply = Reply {
        id: completion_id(),
        created: unix_time(),
        model: chat.model.unwrap_or_else(|| state.info.model.clone()),
    };
    if !stream {
        let response = ticket.wait().await?;
        return Ok(Json(reply.completion(&response)).into_response());
    }
    Ok(api::sse(chunks(ticket, reply, include_usage)))
}

/// An SSE event whose data is `value` as JSON.
fn data(value: &impl serde::Serialize) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// The SSE data of a streamed completion.
fn chunks(ticket: Ticket, reply: Reply, include_usage: bool) -> impl futures_util::Stream<Item = SseEvent> + Send + 'static {
    struct Progress {
        ticket: Ticket,
        reply: Reply,
    }
    let first = data(&reply.chunk(
        Some(Delta {
            role: Some("assistant"),
            content: Some(""),
        }),
        None,
    ));
    let progress = Progress { ticket, reply };
    let rest = stream::unfold(Some(progress), move |current| async move {
        let mut p = current?;
        let events = match p.ticket.next().await {
            Event::Token(delta) => {
                let chunk = data(&p.reply.chunk(
                    Some(Delta {
                        content: Some(&delta),
                        ..Delta::default()
                    }),
                    None,
                ));
                return Some((vec![chunk], Some(p)));
            }
            Event::Done(result) => match *result {
                Ok(response) => {
                    // The token deltas already hold the whole text (the pipeline's TextStream).
                    let mut events = Vec::new();
                    let mut last = p.reply.chunk(Some(Delta::default()), Some(Reply::finish_reason(&response)));
                    last.paligemma = Some(Reply::extras(&response));
                    events.push(data(&last));
                    if include_usage {
                        let mut usage = p.reply.chunk(None, None);
                        usage.usage = Some(Reply::usage(&response));
                        events.push(data(&usage));
                    }
                    events.push(SseEvent::default().data("[DONE]"));
                    events
                }
                Err(e) => vec![data(&ApiError::from(e).json())],
            },
        };
        Some((events, None))
    });
    stream::once(async move { first }).chain(rest.flat_map(stream::iter))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(role: &str, content: Value) -> Message {
        Message {
            role: role.into(),
            content,
            name: None,
        }
    }

    fn parts(url: &str) -> Value {
        json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "caption en"}])
    }

    #[test]
    fn one_user_message_with_an_image_and_a_prompt_is_taken() {
        let (image, prompt) = parse_messages(vec![message("user", parts("data:image/png;base64,aGk="))]).unwrap();
        assert_eq!((image.as_slice(), prompt.as_str()), (b"hi".as_slice(), "caption en"));
    }

    #[test]
    fn system_messages_web_urls_and_text_only_content_are_refused() {
        let system = parse_messages(vec![message("system", json!("be brief")), message("user", parts("data:,"))]).unwrap_err();
        assert!(system.message.contains("system messages"), "{}", system.message);
        let web = parse_messages(vec![message("user", parts("https://example.com/cat.png"))]).unwrap_err();
        assert!(
            web.message.contains("only data: URLs, the server fetches nothing"),
            "{}",
            web.message
        );
        let text = parse_messages(vec![message("user", json!("caption en"))]).unwrap_err();
        assert_eq!(text.code, "invalid_content");
        let two = parse_messages(vec![message("user", parts("data:,")), message("user", parts("data:,"))]).unwrap_err();
        assert_eq!(two.code, "unsupported_message");
    }

    fn chat(body: Value) -> Result<ChatRequest, ApiError> {
        parse_chat(body.to_string().as_bytes())
    }

    #[test]
    fn sampling_options_are_accepted_and_unknown_fields_are_not() {
        let ok = chat(json!({"model": "m", "messages": [], "temperature": 0.7, "top_p": 0.9, "seed": 1, "user": "u", "n": 1}));
        assert!(ok.is_ok());
        let bad = chat(json!({"messages": [], "logprobs_please": true})).unwrap_err();
        assert!(bad.message.contains("logprobs_please"), "{}", bad.message);
        assert_eq!(chat(json!({"messages": [], "temperature": 3})).unwrap_err().code, "invalid_value");
    }

    #[test]
    fn fields_that_change_the_answer_are_taken_only_at_their_neutral_values() {
        // What OpenAI clients send by default, and the other neutral spellings.
        let neutral = json!({"messages": [], "stop": null, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": false,
            "top_logprobs": 0, "logit_bias": {}, "n": 1, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "modalities": ["text"], "audio": null, "stream_options": null, "store": false, "metadata": {"a": "b"},
            "parallel_tool_calls": true, "service_tier": "auto", "reasoning_effort": null});
        assert!(chat(neutral).is_ok());
        for (name, value) in [
            ("frequency_penalty", json!(0.5)),
            ("presence_penalty", json!(-1)),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("logit_bias", json!({"42": 100})),
            ("stop", json!(["\n"])),
            ("stop", json!("end")),
            ("n", json!(2)),
            ("response_format", json!({"type": "json_object"})),
            ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
            ("tool_choice", json!("auto")),
            ("modalities", json!(["text", "audio"])),
            ("reasoning_effort", json!("high")),
        ] {
            let e = chat(json!({"messages": [], name: value})).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{name}");
            assert!(
                e.message.starts_with(&format!("{name} is ")) && e.message.contains("send "),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn completion_ids_differ() {
        assert_ne!(completion_id(), completion_id());
    }
}
