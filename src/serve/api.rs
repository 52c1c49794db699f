//! `POST /v1/generate`: its request bodies (JSON or multipart), the limits checked before a job is
//! queued, and the error JSON every endpoint answers with, OpenAI's shape:
//! `{"error": {"message", "type", "code"}}`. The one mapping from errors to HTTP status is
//! [`ApiError::from`].
//!
//! Status codes: 400 for a bad body, prompt, image or token count; 413 for a body over
//! `--max-body-bytes` and for an image over `--max-image-pixels` (its size is the problem, as for
//! the body); 415 for a content type other than JSON (or multipart here); 401, 404, 405 as usual;
//! 503 with `Retry-After: 1` when the queue is full; 500 when the model fails.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use base64::Engine;
use futures_util::stream::{self, Stream, StreamExt};

use crate::api::{Answer, ErrorBody, ErrorCode, ErrorDetail, ErrorType, GenerateBody, GENERATE_SHAPE};
use crate::error_chain;
use crate::pipeline::{ImageInput, Request, RequestError};
use crate::preprocess::PreprocessError;
use crate::prompt::{PromptEncoder, PromptError};
use crate::serve::batcher::{Event, JobError, SubmitError};
use crate::serve::AppState;

/// `max_new_tokens` when a request does not say (lowered to the cap when that is smaller).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// Request limits checked in the handler, before anything is queued (the prompt's token limit is
/// the pipeline's `--max-prompt-tokens`, checked by its [`PromptEncoder`]).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// A body not received in this time is answered 408 (a client that stalls mid-upload).
    pub body_timeout: std::time::Duration,
    pub max_new_tokens_cap: usize,
}

/// An error answer: status, OpenAI's `type`, a stable `code` to branch on, and a message that
/// names the problem and the fix.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorType::InvalidRequestError, code, message)
    }

    pub fn new(status: StatusCode, kind: ErrorType, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn body_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::InvalidRequestError,
            ErrorCode::BodyTooLarge,
            format!("the request body is over this server's limit of {limit} bytes (--max-body-bytes); send a smaller image"),
        )
    }

    pub fn unsupported_media_type(found: Option<&str>, expected: &str) -> ApiError {
        let found = found.map_or_else(|| "no Content-Type header".to_string(), |t| format!("Content-Type {t:?}"));
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorType::InvalidRequestError,
            ErrorCode::UnsupportedMediaType,
            format!("the request has {found}; send {expected}"),
        )
    }

    /// The error JSON as an SSE `data` payload, for failures after a stream started.
    pub fn json(&self) -> serde_json::Value {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                code: self.code,
            },
        };
        serde_json::to_value(body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let mut response = (self.status, Json(self.json())).into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        let (code, message) = match e {
            SubmitError::Full => (
                ErrorCode::QueueFull,
                "the server's queue is full (--max-queue); retry after a second",
            ),
            SubmitError::Stopped => (ErrorCode::ShuttingDown, "the model worker has stopped; retry on another server"),
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorType::ServerError, code, message)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> ApiError {
        let message = error_chain(&e);
        match e {
            JobError::Request(RequestError::Image(PreprocessError::TooManyPixels { width, height, pixels, limit, .. })) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorType::InvalidRequestError,
                ErrorCode::ImageTooLarge,
                format!("the image is {width}x{height} = {pixels} pixels, over this server's limit of {limit} (--max-image-pixels); downscale it"),
            ),
            JobError::Request(RequestError::Image(_)) => ApiError::invalid(ErrorCode::InvalidImage, message),
            JobError::Request(RequestError::Prompt(e)) => e.into(),
            JobError::WorkerGone | JobError::ShutDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorType::ServerError, ErrorCode::ShuttingDown, message),
            JobError::Request(_) | JobError::Panicked(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorType::ServerError, ErrorCode::ModelError, message)
            }
        }
    }
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> ApiError {
        let code = match e {
            PromptError::Empty => ErrorCode::EmptyPrompt,
            PromptError::TooLong { .. } | PromptError::OverTokenLimit { .. } | PromptError::OverByteLimit { .. } => {
                ErrorCode::PromptTooLong
            }
            PromptError::NoNewTokens => ErrorCode::InvalidMaxNewTokens,
            PromptError::ImagePlaceholders { .. } | PromptError::Encode(_) | PromptError::Tokenizer { .. } => ErrorCode::InvalidPrompt,
        };
        ApiError::invalid(code, e.to_string())
    }
}

/// A checked request, ready to queue.
pub struct Checked {
    pub request: Request,
    pub stream: bool,
}

impl Limits {
    /// Checks all but the image before queueing, the prompt with the pipeline's own encoder (the
    /// layout, `<image>` placeholders, token limits), so a request that cannot run is answered
    /// at once and never reaches a batch; the image is decoded by the pipeline.
    pub fn check(
        &self,
        prompts: &PromptEncoder,
        image: Vec<u8>,
        prompt: String,
        max_new_tokens: Option<usize>,
        min_new_tokens: Option<usize>,
    ) -> Result<Request, ApiError> {
        if image.is_empty() {
            return Err(ApiError::invalid(
                ErrorCode::MissingImage,
                "the image is empty; send the image file's bytes",
            ));
        }
        let max_new_tokens = max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS.min(self.max_new_tokens_cap));
        if max_new_tokens > self.max_new_tokens_cap {
            return Err(ApiError::invalid(
                ErrorCode::InvalidMaxNewTokens,
                format!(
                    "{max_new_tokens} new tokens are asked for; this server takes 1 to {} (--max-new-tokens-cap)",
                    self.max_new_tokens_cap
                ),
            ));
        }
        prompts.encode(&prompt, max_new_tokens)?;
        Ok(Request {
            image: ImageInput::Bytes(image),
            prompt,
            max_new_tokens,
            min_new_tokens: min_new_tokens.unwrap_or(0),
        })
    }
}

/// The text after a `data:` scheme, which RFC 3986 makes case-insensitive (`DATA:`, `Data:`).
pub fn data_url(text: &str) -> Option<&str> {
    let scheme = text.get(..5)?;
    scheme.eq_ignore_ascii_case("data:").then(|| &text[5..])
}

/// The image of a JSON body: base64, or a `data:` URL holding base64 (RFC 2397: any media type
/// and parameters, `;base64` in any case). The base64 may be wrapped in lines, padded or not, in
/// the standard or the URL-safe alphabet (Python's `urlsafe_b64encode`).
pub fn decode_base64_image(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let data = match data_url(text) {
        Some(url) => match url.split_once(',') {
            Some((meta, data)) if meta.rsplit(';').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("base64")) => data,
            _ => {
                return Err(ApiError::invalid(
                    ErrorCode::InvalidImage,
                    format!("{field} is a data: URL without base64 data; send data:image/png;base64,..."),
                ))
            }
        },
        None => text,
    };
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD_PAD_INDIFFERENT
        .decode(compact.as_bytes())
        .or_else(|e| URL_SAFE_PAD_INDIFFERENT.decode(compact.as_bytes()).map_err(|_| e))
        .map_err(|e| {
            ApiError::invalid(
                ErrorCode::InvalidBase64,
                format!("{field} is not valid base64 ({e}); send the file's bytes base64-encoded, or a data:image/...;base64,... URL"),
            )
        })
}

/// The media type of a request, lowercased, without parameters; JSON's other spellings
/// (`text/json`, RFC 6839's `application/...+json`) read as `application/json`.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let kind = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = kind == "text/json" || (kind.starts_with("application/") && kind.ends_with("+json"));
    Some(if json { "application/json".into() } else { kind })
}

/// Reads a body of at most `limit` bytes. A longer one is read on, and dropped, up to twice the
/// limit before the 413: hyper closes a connection whose body is left unread, and a client
/// still sending then gets a broken pipe instead of the answer.
pub async fn read_limited(body: Body, limit: usize, timeout: std::time::Duration) -> Result<Bytes, ApiError> {
    let mut chunks = body.into_data_stream();
    let (mut kept, mut total) = (Vec::new(), 0usize);
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(ErrorCode::UnreadableBody, format!("cannot read the request body: {e}")))?;
            total = total.saturating_add(chunk.len());
            if total <= limit {
                kept.extend_from_slice(&chunk);
            } else if total > limit.saturating_mul(2) {
                break;
            }
        }
        Ok::<(), ApiError>(())
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorType::InvalidRequestError,
            ErrorCode::BodyTimeout,
            format!(
                "the request body did not arrive within {} s (--body-timeout); send it at once",
                timeout.as_secs()
            ),
        )
    })??;
    if total > limit {
        return Err(ApiError::body_too_large(limit));
    }
    Ok(Bytes::from(kept))
}

/// The body, already read and bounded by [`read_limited`] in the router.
pub async fn read_body(request: axum::extract::Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::invalid(ErrorCode::UnreadableBody, format!("cannot read the request body: {e}")))
}

/// Parses a JSON body into `T`, every serde error (syntax, unknown or missing field) a 400 that
/// names it.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    // A UTF-8 byte-order mark, as Windows tools write before JSON, is not part of the text.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            ErrorCode::InvalidJson,
            format!("the body is not a valid request: {e}; expected {expected}"),
        )
    })
}

async fn parse_generate(request: axum::extract::Request, limits: &Limits, prompts: &PromptEncoder) -> Result<Checked, ApiError> {
    let kind = media_type(request.headers());
    match kind.as_deref() {
        Some("application/json") => {
            let body = read_body(request).await?;
            let body: GenerateBody = parse_json(&body, GENERATE_SHAPE)?;
            let image = decode_base64_image("image", &body.image)?;
            Ok(Checked {
                request: limits.check(prompts, image, body.prompt, body.max_new_tokens, body.min_new_tokens)?,
                stream: body.stream.unwrap_or(false),
            })
        }
        Some("multipart/form-data") => parse_multipart(request, limits, prompts).await,
        other => Err(ApiError::unsupported_media_type(other, "application/json or multipart/form-data")),
    }
}

async fn parse_multipart(request: axum::extract::Request, limits: &Limits, prompts: &PromptEncoder) -> Result<Checked, ApiError> {
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::invalid(ErrorCode::InvalidMultipart, format!("cannot read the multipart form: {e}")))?;
    let bad_part = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(ErrorCode::InvalidMultipart, format!("cannot read the multipart form: {e}"))
    };
    let (mut image, mut prompt, mut max_new, mut min_new, mut stream) = (None, None, None, None, false);
    let mut seen = std::collections::HashSet::new();
    while let Some(field) = form.next_field().await.map_err(bad_part)? {
        let name = field.name().unwrap_or("").to_string();
        if !seen.insert(name.clone()) {
            return Err(ApiError::invalid(
                ErrorCode::DuplicateField,
                format!("the form has two {name:?} parts; send each part once"),
            ));
        }
        if name == "image" {
            image = Some(field.bytes().await.map_err(bad_part)?.to_vec());
            continue;
        }
        let text = field.text().await.map_err(bad_part)?;
        let invalid = |what: &str| ApiError::invalid(ErrorCode::InvalidField, format!("form part {name:?} is {text:?}, not {what}"));
        let number = || text.trim().parse::<usize>().map_err(|_| invalid("a whole number"));
        match name.as_str() {
            "prompt" => prompt = Some(text.clone()),
            "max_new_tokens" => max_new = Some(number()?),
            "min_new_tokens" => min_new = Some(number()?),
            "stream" => {
                stream = match text.trim() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(invalid("true or false")),
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    ErrorCode::UnknownField,
                    format!("unknown form part {name:?}; the parts are image (file), prompt, max_new_tokens, min_new_tokens, stream"),
                ))
            }
        }
    }
    let image = image.ok_or_else(|| {
        ApiError::invalid(
            ErrorCode::MissingImage,
            "the form has no \"image\" part; attach the image file as \"image\"",
        )
    })?;
    let prompt = prompt.ok_or_else(|| {
        ApiError::invalid(
            ErrorCode::EmptyPrompt,
            "the form has no \"prompt\" part; add the task, e.g. \"caption en\"",
        )
    })?;
    Ok(Checked {
        request: limits.check(prompts, image, prompt, max_new, min_new)?,
        stream,
    })
}

/// `POST /v1/generate`: the CLI's `--json` object, or with `stream` SSE events `token`
/// (`{"text": DELTA}`), then `done` (the object) or `error`.
pub async fn generate(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Result<HttpResponse, ApiError> {
    let checked = parse_generate(request, &state.limits, &state.prompts).await?;
    let ticket = state.queue.submit(checked.request, checked.stream)?;
    if !checked.stream {
        let response = ticket.wait().await?;
        return Ok(Json(Answer::new(&response, &state.info.providers)).into_response());
    }
    // The stream owns the ticket: hyper dropping the body of a client that left cancels the job.
    let events = stream::unfold(Some((ticket, state)), |current| async move {
        let (mut ticket, state) = current?;
        let event = match ticket.next().await {
            Event::Token(delta) => {
                let event = SseEvent::default()
                    .event("token")
                    .data(serde_json::json!({ "text": delta }).to_string());
                return Some((event, Some((ticket, state))));
            }
            Event::Done(result) => match *result {
                Ok(response) => {
                    let json = Answer::new(&response, &state.info.providers);
                    SseEvent::default()
                        .event("done")
                        .data(serde_json::to_string(&json).unwrap_or_default())
                }
                Err(e) => SseEvent::default().event("error").data(ApiError::from(e).json().to_string()),
            },
        };
        Some((event, None))
    });
    Ok(sse(events))
}

/// An SSE answer; the keep-alive comments also let a queued stream notice a client that left.
pub fn sse(events: impl Stream<Item = SseEvent> + Send + 'static) -> HttpResponse {
    Sse::new(events.map(Ok::<_, std::convert::Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 1000,
            body_timeout: std::time::Duration::from_secs(1),
            max_new_tokens_cap: 10,
        }
    }

    /// The committed scenes model's tokenizer, prompts held to `max_prompt_tokens`.
    fn encoder(max_prompt_tokens: usize) -> PromptEncoder {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes");
        let manifest = crate::config::Manifest::load(&dir).unwrap();
        PromptEncoder::load(&dir, &manifest, max_prompt_tokens).unwrap()
    }

    #[test]
    fn data_urls_and_plain_base64_decode_to_the_same_bytes() {
        let plain = decode_base64_image("image", "aGVs bG8=").unwrap();
        let url = decode_base64_image("image", "data:image/png;base64,aGVsbG8").unwrap();
        assert_eq!(plain, b"hello");
        assert_eq!(url, b"hello");
        // Spellings other clients use: scheme and `;base64` in capitals, parameters, URL-safe.
        assert_eq!(decode_base64_image("image", "DATA:image/PNG;BASE64,aGVsbG8=").unwrap(), b"hello");
        assert_eq!(
            decode_base64_image("image", "data:image/png;name=a.png;base64,aGVsbG8").unwrap(),
            b"hello"
        );
        assert_eq!(decode_base64_image("image", "-_8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_base64_image("image", "+/8=").unwrap(), [0xfb, 0xff]);
        let e = decode_base64_image("image", "data:image/png,hello").unwrap_err();
        assert_eq!(e.code, "invalid_image");
        assert_eq!(decode_base64_image("image", "%%%").unwrap_err().code, "invalid_base64");
    }

    #[test]
    fn json_in_its_other_spellings_and_with_a_byte_order_mark_is_json() {
        let kind = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            media_type(&headers)
        };
        for value in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            "text/json",
            "application/vnd.api+json",
        ] {
            assert_eq!(kind(value).as_deref(), Some("application/json"), "{value}");
        }
        assert_eq!(kind("text/plain").as_deref(), Some("text/plain"));
        let v: serde_json::Value = parse_json(b"\xEF\xBB\xBF{\"a\": 1}", "{}").unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn limits_name_the_flag_to_change() {
        let (l, prompts) = (limits(), encoder(5));
        let check = |prompt: &str, max: Option<usize>, image: Vec<u8>| l.check(&prompts, image, prompt.into(), max, None);
        let error = |r: Result<Request, ApiError>| r.err().expect("an error");
        assert!(check("ocr", None, vec![1]).is_ok());
        let e = error(check("answer en what is the colour of the square", None, vec![1]));
        assert!(e.message.contains("--max-prompt-tokens"), "{}", e.message);
        assert_eq!(e.code, "prompt_too_long");
        let e = error(check("<image><image>ocr", None, vec![1]));
        assert_eq!(e.code, "invalid_prompt");
        let e = error(check("ocr", Some(11), vec![1]));
        assert!(e.message.contains("--max-new-tokens-cap"), "{}", e.message);
        assert_eq!(error(check("ocr", Some(0), vec![1])).code, "invalid_max_new_tokens");
        assert_eq!(error(check("  ", None, vec![1])).code, "empty_prompt");
        assert_eq!(error(check("ocr", None, Vec::new())).code, "missing_image");
        // The default is lowered to a smaller cap rather than refused.
        assert_eq!(check("ocr", None, vec![1]).map(|r| r.max_new_tokens).ok(), Some(10));
    }

    #[test]
    fn request_errors_map_to_status_codes() {
        let status = |e: RequestError| ApiError::from(JobError::Request(e)).status;
        assert_eq!(status(PromptError::Empty.into()), StatusCode::BAD_REQUEST);
        let big = PreprocessError::TooManyPixels {
            image: "x".into(),
            width: 10,
            height: 10,
            pixels: 100,
            limit: 50,
        };
        assert_eq!(status(big.into()), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status(PreprocessError::Empty { image: "x".into() }.into()), StatusCode::BAD_REQUEST);
        assert_eq!(status(RequestError::Stopped), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            ApiError::from(JobError::Panicked("boom".into())).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
