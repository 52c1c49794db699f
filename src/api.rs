//! The wire types: what `paligemma --json` prints and reads (`--batch` lines), and what
//! `paligemma serve` reads and answers (`/v1/generate`, the error body, OpenAI's chat shapes).
//! The command line and the server build their JSON from here; neither depends on the other.
//!
//! Field names are the ones users already know: the answer object's are this project's since the
//! first release; the error body and the chat shapes are OpenAI's (`{"error": {"message", "type",
//! "code"}}`, `chat.completion`, `chat.completion.chunk`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::detect::Detection;
use crate::generate::{mean_ms, ms, Timings};
use crate::pipeline::Response;
use crate::segment::Segment;

/// One request's answer: a line of `paligemma --json`, the body of `/v1/generate` and the data of
/// its stream's `done` event.
#[derive(Debug, Serialize)]
pub struct Answer<'a> {
    pub text: &'a str,
    /// Generated ids, up to and without `<eos>`.
    pub token_ids: &'a [i64],
    /// Boxes of a `detect` prompt, in original-image pixels.
    pub detections: &'a [Detection],
    /// Boxes and masks (COCO RLE) of a `segment` prompt.
    pub segments: &'a [Segment],
    /// Objects of a detect/segment answer that were malformed and dropped.
    pub malformed_objects: usize,
    /// `true` when `<eos>` ended the answer, `false` when max_new_tokens did.
    pub finished: bool,
    /// Original image size `[width, height]`: the pixel space of boxes and masks.
    pub image_size: [u32; 2],
    pub timings: TimingSummary,
    /// Per graph, the execution providers ONNX Runtime assigned its nodes to.
    pub providers: &'a BTreeMap<String, Vec<String>>,
}

impl<'a> Answer<'a> {
    pub fn new(response: &'a Response, providers: &'a BTreeMap<String, Vec<String>>) -> Answer<'a> {
        Answer {
            text: &response.text,
            token_ids: &response.token_ids,
            detections: &response.detections,
            segments: &response.segments,
            malformed_objects: response.malformed_objects,
            finished: response.finished,
            image_size: response.image_size,
            timings: TimingSummary::from(&response.timings),
            providers,
        }
    }
}

/// Where the time of the batch a request ran in went, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimingSummary {
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_steps: usize,
    pub decode_ms_per_token: f64,
}

impl From<&Timings> for TimingSummary {
    fn from(t: &Timings) -> TimingSummary {
        TimingSummary {
            vision_ms: ms(t.vision),
            prefill_ms: ms(t.prefill),
            decode_steps: t.steps.len(),
            decode_ms_per_token: mean_ms(&t.steps),
        }
    }
}

/// The `paligemma --json` line of a request that failed.
#[derive(Debug, Serialize)]
pub struct Failure<'a> {
    /// The request's place among the run's requests (a `--batch` file's non-blank lines).
    pub index: usize,
    /// Its line in the `--batch` file (`null` for `--image`/`--prompt`).
    pub line: Option<usize>,
    pub error: &'a str,
}

/// One line of a `--batch` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLine {
    /// Relative paths are taken from the current directory.
    pub image: PathBuf,
    pub prompt: String,
    pub max_new_tokens: Option<usize>,
}

/// The shape of a [`BatchLine`], for error messages.
pub const BATCH_LINE_SHAPE: &str = "{\"image\": PATH, \"prompt\": TEXT, \"max_new_tokens\": N (optional)}";

/// The `/v1/generate` JSON body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// Base64 of the image file, or a `data:image/...;base64,` URL.
    pub image: String,
    pub prompt: String,
    pub max_new_tokens: Option<usize>,
    /// `<eos>` is not chosen before this many tokens (capped at max_new_tokens), as the CLI's
    /// `--min-new-tokens`.
    pub min_new_tokens: Option<usize>,
    pub stream: Option<bool>,
}

/// The shape of a [`GenerateBody`], for error messages.
pub const GENERATE_SHAPE: &str =
    "{\"image\": BASE64, \"prompt\": TEXT, \"max_new_tokens\": N, \"min_new_tokens\": N, \"stream\": BOOL} (image and prompt required)";

/// OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    InvalidRequestError,
    AuthenticationError,
    ServerError,
}

/// The stable `code` of an error answer, for clients to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    // The HTTP layer.
    BadRequest,
    UriTooLong,
    HeadersTooLarge,
    NotFound,
    MethodNotAllowed,
    UnsupportedMediaType,
    UnreadableBody,
    BodyTooLarge,
    BodyTimeout,
    InvalidApiKey,
    // The body.
    InvalidJson,
    InvalidMultipart,
    InvalidField,
    UnknownField,
    DuplicateField,
    // The request.
    MissingImage,
    InvalidBase64,
    InvalidImage,
    ImageTooLarge,
    EmptyPrompt,
    InvalidPrompt,
    PromptTooLong,
    InvalidMaxNewTokens,
    // OpenAI's chat shape.
    InvalidContent,
    UnsupportedMessage,
    UnsupportedImageUrl,
    UnsupportedParameter,
    InvalidValue,
    // The server.
    QueueFull,
    TooManyConnections,
    ShuttingDown,
    ModelError,
}

impl ErrorCode {
    /// The code as it is sent (`"invalid_image"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::UnreadableBody => "unreadable_body",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMultipart => "invalid_multipart",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::DuplicateField => "duplicate_field",
            ErrorCode::MissingImage => "missing_image",
            ErrorCode::InvalidBase64 => "invalid_base64",
            ErrorCode::InvalidImage => "invalid_image",
            ErrorCode::ImageTooLarge => "image_too_large",
            ErrorCode::EmptyPrompt => "empty_prompt",
            ErrorCode::InvalidPrompt => "invalid_prompt",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::InvalidMaxNewTokens => "invalid_max_new_tokens",
            ErrorCode::InvalidContent => "invalid_content",
            ErrorCode::UnsupportedMessage => "unsupported_message",
            ErrorCode::UnsupportedImageUrl => "unsupported_image_url",
            ErrorCode::UnsupportedParameter => "unsupported_parameter",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ModelError => "model_error",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// `{"error": {"message", "type", "code"}}`: every error answer of the server, and the data of a
/// stream's error event.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: ErrorType,
    pub code: ErrorCode,
}

/// `POST /v1/chat/completions`' body, less the fields `serve::openai` accepts at their neutral
/// values and takes out first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Any name; echoed back.
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    /// A string or an array of [`Part`]s; `serve::openai` parses it, so its errors can say what
    /// the array must hold.
    pub content: Value,
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// `{"url": ..., "detail": ...}`, or the bare URL string some clients send.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object {
        url: String,
        #[allow(dead_code)]
        detail: Option<String>,
    },
    Url(String),
}

/// `usage` of a chat completion; `prompt_tokens` counts the image tokens.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// What a chat answer adds to OpenAI's shape (OpenAI clients ignore it).
#[derive(Debug, Serialize)]
pub struct Extras<'a> {
    pub detections: &'a [Detection],
    pub segments: &'a [Segment],
    pub image_size: [u32; 2],
}

/// A `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [CompletionChoice<'a>; 1],
    pub usage: Usage,
    pub paligemma: Extras<'a>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: usize,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// A `chat.completion.chunk` of a stream.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paligemma: Option<Extras<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: usize,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds: the role first, then text.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_sent_in_snake_case() {
        for (code, name) in [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::InvalidMaxNewTokens, "invalid_max_new_tokens"),
            (ErrorCode::UnsupportedImageUrl, "unsupported_image_url"),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), Value::String(name.into()));
            assert_eq!(code, name);
        }
    }
}
