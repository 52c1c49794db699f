//! `POST /v1/chat/completions` in OpenAI's shape, for the clients that speak it.
//!
//! The request must hold exactly one user message whose `content` is one `image_url` part (a
//! `data:` URL: the server fetches nothing) and one `text` part, the PaliGemma prompt. Decoding is
//! always greedy: `temperature`, `top_p` and `seed` are accepted, since OpenAI clients send them,
//! and ignored; `n` must be 1. The answer adds a `paligemma` object (`detections`, `segments`,
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
use serde::Deserialize;
use serde_json::{json, Value};

use crate::pipeline::Response;
use crate::serve::api::{self, decode_base64_image, ApiError};
use crate::serve::batcher::{Event, Ticket};
use crate::serve::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    /// Any name; echoed back.
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[allow(dead_code)]
    temperature: Option<f64>,
    #[allow(dead_code)]
    top_p: Option<f64>,
    n: Option<u64>,
    #[allow(dead_code)]
    seed: Option<i64>,
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    /// Parsed by [`parse_content`], whose errors say what the array must hold.
    content: Value,
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageUrl {
    url: String,
    #[allow(dead_code)]
    detail: Option<String>,
}

const CONTENT_SHAPE: &str =
    "[{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}, {\"type\": \"text\", \"text\": PROMPT}]";

const CHAT_SHAPE: &str = "{\"model\": NAME, \"messages\": [{\"role\": \"user\", \"content\": [image_url part, text part]}], \"max_tokens\": N, \"stream\": BOOL}";

/// The image bytes and prompt of the one user message.
fn parse_messages(messages: Vec<Message>) -> Result<(Vec<u8>, String), ApiError> {
    if messages.iter().any(|m| m.role == "system" || m.role == "developer") {
        return Err(ApiError::invalid(
            "unsupported_message",
            "system messages are not supported: PaliGemma takes no instructions, only a task prompt such as \"caption en\"; send one user message",
        ));
    }
    let mut messages = messages.into_iter();
    let (Some(message), None) = (messages.next(), messages.next()) else {
        return Err(ApiError::invalid(
            "unsupported_message",
            "send exactly one user message: this model answers one image and one prompt, not a conversation",
        ));
    };
    if message.role != "user" {
        return Err(ApiError::invalid(
            "unsupported_message",
            format!("the message's role is {:?}; send one message with role \"user\"", message.role),
        ));
    }
    parse_content(message.content)
}

fn parse_content(content: Value) -> Result<(Vec<u8>, String), ApiError> {
    let wrong = |what: String| ApiError::invalid("invalid_content", format!("{what}; the user message's content must be {CONTENT_SHAPE}"));
    if !content.is_array() {
        return Err(wrong("the content is not an array of parts (this model needs an image)".into()));
    }
    let parts: Vec<Part> = serde_json::from_value(content).map_err(|e| wrong(format!("a content part is malformed ({e})")))?;
    let (mut images, mut texts) = (Vec::new(), Vec::new());
    for part in parts {
        match part {
            Part::Text { text } => texts.push(text),
            Part::ImageUrl { image_url } => images.push(image_url.url),
        }
    }
    if images.len() != 1 || texts.len() != 1 {
        return Err(wrong(format!("the content has {} image_url and {} text parts, not one of each", images.len(), texts.len())));
    }
    let (url, prompt) = (images.remove(0), texts.remove(0));
    if !url.starts_with("data:") {
        return Err(ApiError::invalid(
            "unsupported_image_url",
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

    fn usage(response: &Response) -> Value {
        let completion = response.token_ids.len();
        json!({
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": response.prompt_tokens + completion,
        })
    }

    fn extras(response: &Response) -> Value {
        json!({
            "detections": response.detections,
            "segments": response.segments,
            "image_size": response.image_size,
        })
    }

    fn completion(&self, response: &Response) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": response.text },
                "finish_reason": Reply::finish_reason(response),
            }],
            "usage": Reply::usage(response),
            "paligemma": Reply::extras(response),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        })
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Result<HttpResponse, ApiError> {
    match api::media_type(request.headers()).as_deref() {
        Some("application/json") => {}
        other => return Err(ApiError::unsupported_media_type(other, "application/json")),
    }
    let body = api::read_body(request).await?;
    let chat: ChatRequest = api::parse_json(&body, CHAT_SHAPE)?;
    if chat.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("unsupported_n", "n must be 1: decoding is greedy, every choice would be the same"));
    }
    let (image, prompt) = parse_messages(chat.messages)?;
    let request = state.limits.check(image, prompt, chat.max_completion_tokens.or(chat.max_tokens), None)?;
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

/// The SSE data of a streamed completion.
fn chunks(ticket: Ticket, reply: Reply, include_usage: bool) -> impl futures_util::Stream<Item = SseEvent> + Send + 'static {
    struct Progress {
        ticket: Ticket,
        reply: Reply,
        /// Text sent so far: the answer's text may extend past the last token's delta.
        streamed: String,
    }
    let first = reply.chunk(json!({ "role": "assistant", "content": "" }), None);
    let progress = Progress {
        ticket,
        reply,
        streamed: String::new(),
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let rest = stream::unfold(Some(progress), move |current| async move {
        let mut p = current?;
        let events = match p.ticket.next().await {
            Event::Token(delta) => {
                p.streamed.push_str(&delta);
                let chunk = p.reply.chunk(json!({ "content": delta }), None);
                return Some((vec![data(chunk)], Some(p)));
            }
            Event::Done(result) => match *result {
                Ok(response) => {
                    let mut events = Vec::new();
                    if let Some(rest) = response.text.strip_prefix(p.streamed.as_str()).filter(|r| !r.is_empty()) {
                        events.push(data(p.reply.chunk(json!({ "content": rest }), None)));
                    }
                    let mut last = p.reply.chunk(json!({}), Some(Reply::finish_reason(&response)));
                    last["paligemma"] = Reply::extras(&response);
                    events.push(data(last));
                    if include_usage {
                        let mut usage = p.reply.chunk(json!({}), None);
                        usage["choices"] = json!([]);
                        usage["usage"] = Reply::usage(&response);
                        events.push(data(usage));
                    }
                    events.push(SseEvent::default().data("[DONE]"));
                    events
                }
                Err(e) => vec![data(ApiError::from(e).json())],
            },
        };
        Some((events, None))
    });
    stream::once(async move { data(first) }).chain(rest.flat_map(stream::iter))
}

#[cfg(test)]
mod tests {
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
        assert!(web.message.contains("only data: URLs, the server fetches nothing"), "{}", web.message);
        let text = parse_messages(vec![message("user", json!("caption en"))]).unwrap_err();
        assert_eq!(text.code, "invalid_content");
        let two = parse_messages(vec![message("user", parts("data:,")), message("user", parts("data:,"))]).unwrap_err();
        assert_eq!(two.code, "unsupported_message");
    }

    #[test]
    fn sampling_options_are_accepted_and_unknown_fields_are_not() {
        let ok: Result<ChatRequest, _> =
            serde_json::from_value(json!({"model": "m", "messages": [], "temperature": 0.7, "top_p": 0.9, "seed": 1, "user": "u", "n": 1}));
        assert!(ok.is_ok());
        let bad: Result<ChatRequest, _> = serde_json::from_value(json!({"messages": [], "logprobs": true}));
        assert!(bad.unwrap_err().to_string().contains("logprobs"));
    }

    #[test]
    fn completion_ids_differ() {
        assert_ne!(completion_id(), completion_id());
    }
}
