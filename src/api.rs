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
use crate::engine::{mean_ms, ms, Timings};
use crate::pipeline::{Pipeline, Response};
use crate::segment::Segment;

/// One request's answer: a line of `paligemma --json`, the body of `/v1/generate` and the data of
/// its stream's `done` event.
#[derive(Debug, Serialize)]
pub struct Answer<'a> {
    /// The answer, as transformers' `decode(ids, skip_special_tokens=True)` gives it.
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
    /// Where this request's time went.
    pub timings: TimingSummary,
    /// Per graph, the execution providers ONNX Runtime assigned its nodes to.
    pub providers: &'a BTreeMap<String, Vec<String>>,
}

impl<'a> Answer<'a> {
    /// The answer to `response`, with the pipeline's `providers` per graph.
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

/// Where a request's time went, in milliseconds: its own vision and prefill runs, and the decode
/// steps it took part in (each step decodes every running request at once).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimingSummary {
    /// The vision encoder run, ms.
    pub vision_ms: f64,
    /// Embedding, image splice and the prefill decoder run, up to the first token, ms.
    pub prefill_ms: f64,
    /// Decode steps after the first token that this request took part in.
    pub decode_steps: usize,
    /// Mean time of one of those steps (all rows decoding at the time at once), ms; 0 without any.
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
    /// The error message, as on stderr after `error: request N: `.
    pub error: &'a str,
}

/// One line of a `--batch` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLine {
    /// Relative paths are taken from the current directory.
    pub image: PathBuf,
    /// The PaliGemma prompt (`caption en`, `detect cat`, ...).
    pub prompt: String,
    /// Most new tokens, `<eos>` included; `--max-new-tokens` when absent.
    pub max_new_tokens: Option<usize>,
}

/// The shape of a [`BatchLine`], for error messages.
pub const BATCH_LINE_SHAPE: &str = "{\"image\": PATH, \"prompt\": TEXT, \"max_new_tokens\": N (optional)}";

/// `GET /health`'s body: what the server runs, fixed once the model has loaded (the server
/// listens only then).
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
    /// `--model` as given.
    pub model: String,
    /// `--dtype` as given (`auto` is resolved per graph in `graphs`).
    pub dtype: String,
    /// Per graph, the execution providers ONNX Runtime assigned its nodes to.
    pub providers: BTreeMap<String, Vec<String>>,
    /// Per graph, its file and the dtype `--dtype` picked.
    pub graphs: BTreeMap<String, GraphFile>,
    /// The ONNX Runtime library loaded.
    pub onnxruntime: OrtLibrary,
}

/// One graph of [`Health::graphs`].
#[derive(Debug, Clone, Serialize)]
pub struct GraphFile {
    /// The ONNX file, relative to the model directory.
    pub file: String,
    /// `fp32`, `fp16`, `int8`, `q4`, ...
    pub dtype: &'static str,
}

/// [`Health::onnxruntime`]: the library's file, version and the search rule that found it.
#[derive(Debug, Clone, Serialize)]
pub struct OrtLibrary {
    /// The path handed to `dlopen`.
    pub path: PathBuf,
    /// `major.minor.patch` from the library's file name (see `OrtInfo::version`).
    pub version: String,
    /// `--ort-lib`, `ORT_DYLIB_PATH`, next to the executable, or the repository's .venv.
    pub source: String,
}

impl Health {
    /// The body for `pipeline`, loaded from `--model` `model` with `--dtype` `dtype`.
    pub fn new(model: String, dtype: String, pipeline: &Pipeline) -> Health {
        let graphs = pipeline.graph_files().iter().map(|(graph, file, dtype)| {
            let file = GraphFile {
                file: file.clone(),
                dtype: dtype.as_str(),
            };
            (graph.clone(), file)
        });
        Health {
            status: "ok",
            model,
            dtype,
            providers: pipeline.providers().iter().cloned().collect(),
            graphs: graphs.collect(),
            onnxruntime: OrtLibrary {
                path: pipeline.ort.path.clone(),
                version: pipeline.ort.version.clone(),
                source: pipeline.ort.source.to_string(),
            },
        }
    }
}

/// The `/v1/generate` JSON body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// Base64 of the image file, or a `data:image/...;base64,` URL.
    pub image: String,
    /// The PaliGemma prompt (`caption en`, `detect cat`, ...).
    pub prompt: String,
    /// Most new tokens, `<eos>` included: 1 to `--max-new-tokens-cap`; 64 (or the cap if lower)
    /// when absent.
    pub max_new_tokens: Option<usize>,
    /// `<eos>` is not chosen before this many tokens (capped at max_new_tokens), as the CLI's
    /// `--min-new-tokens`.
    pub min_new_tokens: Option<usize>,
    /// Answer with SSE events `token` (`{"text": DELTA}`), then `done` (the [`Answer`]) or
    /// `error`; `false` when absent.
    pub stream: Option<bool>,
}

/// The shape of a [`GenerateBody`], for error messages.
pub const GENERATE_SHAPE: &str =
    "{\"image\": BASE64, \"prompt\": TEXT, \"max_new_tokens\": N, \"min_new_tokens\": N, \"stream\": BOOL} (image and prompt required)";

/// OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// `invalid_request_error`: the request is at fault (4xx but 401).
    InvalidRequestError,
    /// `authentication_error`: the API key is missing or wrong (401).
    AuthenticationError,
    /// `server_error`: the server cannot take the request now (503) or the model failed (500).
    ServerError,
}

/// The stable `code` of an error answer, for clients to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    // The HTTP layer.
    /// 400: the request line or a header is not valid HTTP/1.1.
    BadRequest,
    /// 414: the request URI is over 64 KiB.
    UriTooLong,
    /// 431: the headers are over 128 KiB or 100 fields.
    HeadersTooLarge,
    /// 404: no route has the path.
    NotFound,
    /// 405: the route takes another method (POST for `/v1/...`, GET for the others).
    MethodNotAllowed,
    /// 415: the Content-Type is not JSON (nor multipart/form-data, for `/v1/generate`).
    UnsupportedMediaType,
    /// 400: the body could not be read from the connection.
    UnreadableBody,
    /// 413: the body is over `--max-body-bytes`.
    BodyTooLarge,
    /// 408: the body did not arrive within `--body-timeout`.
    BodyTimeout,
    /// 401: `--api-key` is set and `Authorization: Bearer KEY` is missing or holds another key.
    InvalidApiKey,
    // The body.
    /// 400: the body is not JSON of the endpoint's shape (syntax, or a missing, unknown or mistyped field).
    InvalidJson,
    /// 400: the multipart form cannot be read.
    InvalidMultipart,
    /// 400: a form part's value is not of its type (a whole number, true or false).
    InvalidField,
    /// 400: the form has a part that is none of image, prompt, max_new_tokens, min_new_tokens, stream.
    UnknownField,
    /// 400: the form has a part twice.
    DuplicateField,
    // The request.
    /// 400: the image is empty, or the form has no image part.
    MissingImage,
    /// 400: the image is not valid base64.
    InvalidBase64,
    /// 400: the image cannot be decoded, or a `data:` URL holds no base64.
    InvalidImage,
    /// 413: the image is over `--max-image-pixels`.
    ImageTooLarge,
    /// 400: the prompt is empty, or the form has no prompt part.
    EmptyPrompt,
    /// 400: the prompt has more than one `<image>`, or cannot be tokenized.
    InvalidPrompt,
    /// 400: the prompt is over `--max-prompt-tokens`, or with its new tokens over the model's positions.
    PromptTooLong,
    /// 400: max_new_tokens is 0 or over `--max-new-tokens-cap`.
    InvalidMaxNewTokens,
    // OpenAI's chat shape.
    /// 400: the user message's content is not one `image_url` part and one `text` part.
    InvalidContent,
    /// 400: the messages are not exactly one, of role `user` (system and developer messages are refused).
    UnsupportedMessage,
    /// 400: the image URL is not a `data:` URL (the server fetches nothing).
    UnsupportedImageUrl,
    /// 400: a field that would change the answer (`n`, `stop`, `logprobs`, tools, ...) is not at its neutral value.
    UnsupportedParameter,
    /// 400: `temperature` or `top_p` is outside OpenAI's range.
    InvalidValue,
    // The server.
    /// 503: the queue is full (`--max-queue`).
    QueueFull,
    /// 503: `--max-connections` connections are open, all running requests.
    TooManyConnections,
    /// 503: the server is shutting down, or its model worker stopped.
    ShuttingDown,
    /// 500: the model failed on the request.
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
    /// OpenAI's `error` object.
    pub error: ErrorDetail<'a>,
}

/// The `error` object of an [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    /// OpenAI's `message`: what is wrong and how to fix it, for people.
    pub message: &'a str,
    /// OpenAI's `type`: the class of error.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// OpenAI's `code`: this server's stable code, for clients to branch on.
    pub code: ErrorCode,
}

/// `POST /v1/chat/completions`' body, less the fields `serve::openai` accepts at their neutral
/// values and takes out first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Any name; echoed back.
    pub model: Option<String>,
    /// OpenAI's `messages`: here exactly one `user` message, with one `image_url` and one `text` part.
    pub messages: Vec<Message>,
    /// OpenAI's older name of `max_completion_tokens`; read when that is absent.
    pub max_tokens: Option<usize>,
    /// OpenAI's `max_completion_tokens`: the request's max_new_tokens (`<eos>` included), 1 to
    /// `--max-new-tokens-cap`; 64 (or the cap if lower) when both are absent.
    pub max_completion_tokens: Option<usize>,
    /// OpenAI's `stream`: answer with `chat.completion.chunk` SSE events, then `data: [DONE]`.
    pub stream: Option<bool>,
    /// OpenAI's `stream_options`; only `include_usage` is read.
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's `temperature`: checked to be 0 to 2, then ignored (decoding is greedy).
    pub temperature: Option<f64>,
    /// OpenAI's `top_p`: checked to be 0 to 1, then ignored (decoding is greedy).
    pub top_p: Option<f64>,
}

/// OpenAI's `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// OpenAI's `include_usage`: a last chunk with `usage` and no choices before `data: [DONE]`.
    pub include_usage: Option<bool>,
}

/// One of OpenAI's `messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// OpenAI's `role`: only `user` is taken.
    pub role: String,
    /// A string or an array of [`Part`]s; `serve::openai` parses it, so its errors can say what
    /// the array must hold.
    pub content: Value,
    /// OpenAI's participant `name`: accepted and ignored.
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    /// A `text` part: the PaliGemma prompt.
    Text {
        /// The prompt (`caption en`, `detect cat`, ...).
        text: String,
    },
    /// An `image_url` part: the image.
    ImageUrl {
        /// Where the image is; only `data:` URLs are taken.
        image_url: ImageUrl,
    },
}

/// `{"url": ..., "detail": ...}`, or the bare URL string some clients send.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    /// OpenAI's shape.
    Object {
        /// OpenAI's `url`: a `data:image/...;base64,` URL (the server fetches nothing).
        url: String,
        /// OpenAI's `detail` (`low`, `high`, `auto`): ignored, the image is resized to the model's size.
        #[allow(dead_code)]
        detail: Option<String>,
    },
    /// The URL alone.
    Url(String),
}

/// `usage` of a chat completion; `prompt_tokens` counts the image tokens.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// OpenAI's `prompt_tokens`: the prompt's tokens, its image tokens included.
    pub prompt_tokens: usize,
    /// OpenAI's `completion_tokens`: the generated tokens, `<eos>` not counted.
    pub completion_tokens: usize,
    /// OpenAI's `total_tokens`: the sum of both.
    pub total_tokens: usize,
}

/// What a chat answer adds to OpenAI's shape (OpenAI clients ignore it).
#[derive(Debug, Serialize)]
pub struct Extras<'a> {
    /// Boxes of a `detect` prompt, in original-image pixels.
    pub detections: &'a [Detection],
    /// Boxes and masks (COCO RLE) of a `segment` prompt.
    pub segments: &'a [Segment],
    /// Original image size `[width, height]`: the pixel space of boxes and masks.
    pub image_size: [u32; 2],
}

/// A `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    /// OpenAI's `id`: `chatcmpl-` and a hex time and counter, unique per answer.
    pub id: &'a str,
    /// OpenAI's `object`: `chat.completion`.
    pub object: &'static str,
    /// OpenAI's `created`: Unix time in seconds, when the request was queued.
    pub created: u64,
    /// OpenAI's `model`: the request's `model`, else `--model` as given.
    pub model: &'a str,
    /// OpenAI's `choices`: one, as greedy decoding gives one answer.
    pub choices: [CompletionChoice<'a>; 1],
    /// OpenAI's `usage`.
    pub usage: Usage,
    /// Boxes, masks and the image size, which OpenAI's shape has no place for.
    pub paligemma: Extras<'a>,
}

/// The one choice of a [`ChatCompletion`].
#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    /// OpenAI's `index`: 0.
    pub index: usize,
    /// OpenAI's `message`: the answer.
    pub message: AssistantMessage<'a>,
    /// OpenAI's `finish_reason`: `stop` when `<eos>` ended the answer, `length` when the token limit did.
    pub finish_reason: &'static str,
}

/// The answer as OpenAI's assistant message.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    /// OpenAI's `role`: `assistant`.
    pub role: &'static str,
    /// OpenAI's `content`: the answer text, as `/v1/generate`'s `text`.
    pub content: &'a str,
}

/// A `chat.completion.chunk` of a stream.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    /// OpenAI's `id`: the completion's, the same in every chunk of the stream.
    pub id: &'a str,
    /// OpenAI's `object`: `chat.completion.chunk`.
    pub object: &'static str,
    /// OpenAI's `created`: Unix time in seconds, when the request was queued; the same in every chunk.
    pub created: u64,
    /// OpenAI's `model`: the request's `model`, else `--model` as given.
    pub model: &'a str,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChunkChoice<'a>>,
    /// OpenAI's `usage`: only in the usage chunk (`stream_options.include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Boxes, masks and the image size: only in the chunk with the finish reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paligemma: Option<Extras<'a>>,
}

/// The one choice of a [`ChatChunk`].
#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    /// OpenAI's `index`: 0.
    pub index: usize,
    /// OpenAI's `delta`: what this chunk adds to the message.
    pub delta: Delta<'a>,
    /// OpenAI's `finish_reason`: `stop` or `length` in the last choice chunk, `null` before it.
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds: the role first, then text.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    /// OpenAI's `role`: `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// OpenAI's `content`: `""` in the first chunk, then the text the tokens made final; absent
    /// in the last.
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
