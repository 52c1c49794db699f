//! `paligemma serve` over real HTTP on loopback, with the tiny converted model: every endpoint,
//! every limit and error shape, batching that gives each request its answer alone, clients that
//! leave, a full queue, auth, CORS and SIGTERM.
//!
//! Long requests hold the worker (min_new_tokens = max_new_tokens, thousands of tokens); a test
//! releases it by closing that stream, which stops its row. Waits poll /metrics with a deadline;
//! nothing asserts a duration.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

mod common;

use common::{image as image_path, repo, seeded, tiny_model};

fn model() -> PathBuf {
    tiny_model("gqa1/onnx")
}

fn image_base64(name: &str) -> String {
    STANDARD.encode(std::fs::read(image_path(name)).unwrap())
}

/// Longest any wait for the server may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running `paligemma serve`, killed on drop so a failing test leaves no process behind.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_model(&model(), extra, env)
    }

    fn start_model(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let m = model.display().to_string();
        let mut command = Command::new(env!("CARGO_BIN_EXE_paligemma"));
        command
            .args(["serve", "--model", &m, "--port", "0", "--threads", "1"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("PALIGEMMA_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let base = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("the server exited before listening; stderr:\n{seen}");
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let stderr = Arc::new(Mutex::new(seen));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Server { child, base, stderr }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn address(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    fn metrics(&self) -> String {
        let (status, _, body) = get(&self.url("/metrics"), &[]);
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of one series, e.g. `paligemma_cancelled_total{stage="queued"}`.
    fn metric(&self, series: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// Waits until `series` reads `value` (a bounded poll).
    fn wait_metric(&self, series: &str, value: f64) {
        let started = Instant::now();
        while self.metric(series) != value {
            assert!(started.elapsed() < DEADLINE, "{series} never became {value}:\n{}", self.metrics());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

type Headers = Vec<(String, String)>;

fn collect(response: ureq::http::Response<ureq::Body>) -> (u16, Headers, String) {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response.into_body().read_to_string().unwrap();
    (status, headers, body)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Headers, String) {
    let mut request = agent().get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    collect(request.call().unwrap())
}

/// POSTs `body` with the given headers (no Content-Type unless given).
fn post(url: &str, headers: &[(&str, &str)], body: impl AsRef<[u8]>) -> (u16, Headers, String) {
    let mut request = agent().post(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    collect(request.send(body.as_ref()).unwrap())
}

fn post_json(url: &str, body: &Value) -> (u16, Headers, Value) {
    let (status, headers, text) = post(url, &[("content-type", "application/json")], body.to_string());
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"));
    (status, headers, value)
}

fn generate_body(image: &str, prompt: &str, max_new_tokens: usize) -> Value {
    json!({ "image": image_base64(image), "prompt": prompt, "max_new_tokens": max_new_tokens })
}

fn chat_body(image: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "paligemma-test",
        "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": { "url": format!("data:image/png;base64,{}", image_base64(image)) } },
            { "type": "text", "text": prompt },
        ]}],
        "max_tokens": max_tokens,
    })
}

/// The status is `status` and the body is `{"error": {"message", "type", "code"}}` whose message
/// contains `needle`.
fn assert_error(got: (u16, Headers, String), status: u16, code: &str, needle: &str) {
    let (got_status, headers, body) = got;
    assert_eq!(got_status, status, "{body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"), "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let error = &v["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["type"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    let message = error["message"].as_str().unwrap_or_else(|| panic!("no message: {body}"));
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

fn post_error(url: &str, body: &Value, status: u16, code: &str, needle: &str) {
    assert_error(
        post(url, &[("content-type", "application/json")], body.to_string()),
        status,
        code,
        needle,
    );
}

/// One server-sent event.
#[derive(Debug)]
struct Sse {
    event: Option<String>,
    data: String,
}

/// Reads SSE events from a streamed answer.
struct SseReader {
    lines: std::io::Lines<BufReader<ureq::BodyReader<'static>>>,
}

impl SseReader {
    fn open(url: &str, body: &Value) -> SseReader {
        let response = agent()
            .post(url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let kind = response.headers().get("content-type").unwrap().to_str().unwrap().to_string();
        assert_eq!(kind, "text/event-stream");
        SseReader {
            lines: BufReader::new(response.into_body().into_reader()).lines(),
        }
    }

    fn next(&mut self) -> Option<Sse> {
        let (mut event, mut data) = (None, String::new());
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if line.is_empty() {
                if event.is_some() || !data.is_empty() {
                    return Some(Sse { event, data });
                }
                continue;
            }
            if let Some(name) = line.strip_prefix("event: ") {
                event = Some(name.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        None
    }

    fn all(mut self) -> Vec<Sse> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

/// A streaming request long enough to hold the worker until dropped (closing the connection
/// stops its row). Returns once its first token arrived, so it is running.
fn hold(server: &Server) -> SseReader {
    let body = json!({ "image": image_base64("text.png"), "prompt": "caption en", "max_new_tokens": 8000, "min_new_tokens": 8000, "stream": true });
    let mut stream = SseReader::open(&server.url("/v1/generate"), &body);
    let first = stream.next().unwrap();
    assert_eq!(first.event.as_deref(), Some("token"), "{first:?}");
    stream
}

/// A raw request left waiting: the socket is the client; dropping it is the client leaving.
fn raw_post(server: &Server, path: &str, body: &Value) -> TcpStream {
    let mut socket = TcpStream::connect(server.address()).unwrap();
    let body = body.to_string();
    write!(
        socket,
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    socket
}

fn token_ids(v: &Value) -> Vec<i64> {
    v["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {v}"))
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

/// `paligemma --json` for one request.
fn cli_json(image: &Path, prompt: &str, max_new_tokens: usize) -> Value {
    let (m, i, n) = (
        model().display().to_string(),
        image.display().to_string(),
        max_new_tokens.to_string(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args([
            "--model",
            &m,
            "--image",
            &i,
            "--prompt",
            prompt,
            "--max-new-tokens",
            &n,
            "--json",
            "--threads",
            "1",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A multipart/form-data body of `(name, filename, bytes)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "paligemma-test-boundary";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").unwrap();
        if let Some(file) = filename {
            write!(body, "; filename=\"{file}\"\r\nContent-Type: application/octet-stream").unwrap();
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn health_page_and_metrics_answer() {
    let server = Server::start(&[]);
    let (status, headers, body) = get(&server.url("/health"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["model"], model().display().to_string());
    assert_eq!(v["dtype"], "fp32");
    assert_eq!(v["providers"]["decoder_gqa"], json!(["CPUExecutionProvider"]));
    // The checkout's binary finds the pinned wheel's library in .venv (deploy/tests checks a
    // bundle's own library beside its binary).
    let ort = &v["onnxruntime"];
    assert_eq!(ort["source"], "the repository's .venv onnxruntime wheel", "{ort}");
    assert!(ort["path"].as_str().unwrap().ends_with("libonnxruntime.so.1.31.1"), "{ort}");
    assert_eq!(ort["version"], "1.31.1");

    let (status, headers, body) = get(&server.url("/"), &[]);
    assert_eq!(status, 200);
    assert!(
        header(&headers, "content-type").is_some_and(|t| t.starts_with("text/html")),
        "{headers:?}"
    );
    assert!(body.to_ascii_lowercase().starts_with("<!doctype html"), "{body}");

    let (status, headers, text) = get(&server.url("/metrics"), &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/plain; version=0.0.4"));
    for family in [
        "paligemma_requests_total counter",
        "paligemma_queue_depth gauge",
        "paligemma_slots gauge",
        "paligemma_slots_in_use gauge",
        "paligemma_batch_size histogram",
        "paligemma_queue_wait_seconds histogram",
        "paligemma_request_duration_seconds histogram",
        "paligemma_generated_tokens_total counter",
        "paligemma_decode_tokens_per_second gauge",
        "paligemma_cancelled_total counter",
    ] {
        assert!(text.contains(&format!("# TYPE {family}\n")), "{family} missing:\n{text}");
    }
    assert!(
        text.contains("paligemma_requests_total{endpoint=\"/health\",code=\"200\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("paligemma_batch_size_bucket{le=\"4\"} 0\n"),
        "buckets 1..max_batch:\n{text}"
    );
    assert!(text.contains("paligemma_slots 4\n"), "{text}");
}

#[test]
fn generate_answers_the_cli_json_object() {
    let server = Server::start(&[]);
    let (status, _, got) = post_json(&server.url("/v1/generate"), &generate_body("chelsea.png", "caption en", 8));
    assert_eq!(status, 200, "{got}");
    let expected = cli_json(&image_path("chelsea.png"), "caption en", 8);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(&expected));
    for key in [
        "text",
        "token_ids",
        "detections",
        "segments",
        "malformed_objects",
        "finished",
        "image_size",
        "providers",
    ] {
        assert_eq!(got[key], expected[key], "{key}");
    }
    assert_eq!(got["timings"]["decode_steps"], expected["timings"]["decode_steps"]);
    // A segment prompt answers with the CLI's boxes and masks too.
    let (status, _, got) = post_json(&server.url("/v1/generate"), &generate_body("camera.png", "segment person", 12));
    assert_eq!(status, 200, "{got}");
    let expected = cli_json(&image_path("camera.png"), "segment person", 12);
    for key in ["text", "token_ids", "detections", "segments", "malformed_objects"] {
        assert_eq!(got[key], expected[key], "{key}");
    }
}

#[test]
fn multipart_and_data_url_bodies_give_the_plain_base64_answer() {
    let server = Server::start(&[]);
    let url = server.url("/v1/generate");
    let (_, _, plain) = post_json(&url, &generate_body("rocket.jpg", "describe en", 6));
    let data_url =
        json!({ "image": format!("data:image/jpeg;base64,{}", image_base64("rocket.jpg")), "prompt": "describe en", "max_new_tokens": 6 });
    let (status, _, from_url) = post_json(&url, &data_url);
    assert_eq!(status, 200, "{from_url}");
    assert_eq!(token_ids(&from_url), token_ids(&plain));

    let file = std::fs::read(image_path("rocket.jpg")).unwrap();
    let (kind, body) = multipart(&[
        ("image", Some("rocket.jpg"), &file),
        ("prompt", None, b"describe en"),
        ("max_new_tokens", None, b"6"),
    ]);
    let (status, _, text) = post(&url, &[("content-type", &kind)], body);
    assert_eq!(status, 200, "{text}");
    let from_form: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(token_ids(&from_form), token_ids(&plain));
    assert_eq!(from_form["text"], plain["text"]);

    let (kind, body) = multipart(&[("image", Some("rocket.jpg"), &file)]);
    assert_error(post(&url, &[("content-type", &kind)], body), 400, "empty_prompt", "\"prompt\"");
    let (kind, body) = multipart(&[
        ("image", Some("rocket.jpg"), &file),
        ("prompt", None, b"ocr"),
        ("temperature", None, b"1"),
    ]);
    assert_error(
        post(&url, &[("content-type", &kind)], body),
        400,
        "unknown_field",
        "\"temperature\"",
    );
}

#[test]
fn streamed_tokens_add_up_to_the_done_answer() {
    let server = Server::start(&[]);
    let url = server.url("/v1/generate");
    let (_, _, whole) = post_json(&url, &generate_body("chelsea.png", "caption en", 10));
    let mut body = generate_body("chelsea.png", "caption en", 10);
    body["stream"] = json!(true);
    let events = SseReader::open(&url, &body).all();
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(last.event.as_deref(), Some("done"), "{events:?}");
    let done: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(token_ids(&done), token_ids(&whole));
    assert_eq!(done["providers"], whole["providers"]);
    // At most one event per token: a token that leaves its text open (a byte run) sends none.
    assert!(
        !tokens.is_empty() && tokens.len() <= token_ids(&whole).len(),
        "{} events for {} tokens",
        tokens.len(),
        token_ids(&whole).len()
    );
    let mut text = String::new();
    for event in tokens {
        assert_eq!(event.event.as_deref(), Some("token"));
        let v: Value = serde_json::from_str(&event.data).unwrap();
        text.push_str(v["text"].as_str().unwrap());
    }
    assert_eq!(text, whole["text"].as_str().unwrap());
}

#[test]
fn chat_completions_answer_in_openai_shape_with_the_generate_text() {
    let server = Server::start(&[]);
    let (_, _, generated) = post_json(&server.url("/v1/generate"), &generate_body("chelsea.png", "detect cat", 8));
    let mut body = chat_body("chelsea.png", "detect cat", 8);
    // Sampling options OpenAI clients send are accepted (decoding stays greedy).
    for (key, value) in [
        ("temperature", json!(0.7)),
        ("top_p", json!(0.9)),
        ("seed", json!(3)),
        ("user", json!("u")),
        ("n", json!(1)),
    ] {
        body[key] = value;
    }
    let (status, _, v) = post_json(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "paligemma-test");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], generated["text"]);
    let n = token_ids(&generated).len();
    let expected_reason = if generated["finished"] == true { "stop" } else { "length" };
    assert_eq!(choice["finish_reason"], expected_reason);
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"], n);
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(model().join("manifest.json")).unwrap()).unwrap();
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > manifest["num_image_tokens"].as_u64().unwrap(),
        "image tokens are counted: {usage}"
    );
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt_tokens + n as u64);
    assert_eq!(v["paligemma"]["detections"], generated["detections"]);
    assert_eq!(v["paligemma"]["segments"], generated["segments"]);
    assert_eq!(v["paligemma"]["image_size"], json!([451, 300]));

    // max_completion_tokens is OpenAI's newer name for max_tokens.
    let mut newer = chat_body("chelsea.png", "detect cat", 0);
    newer.as_object_mut().unwrap().remove("max_tokens");
    newer["max_completion_tokens"] = json!(8);
    let (status, _, again) = post_json(&server.url("/v1/chat/completions"), &newer);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["choices"][0]["message"]["content"], generated["text"]);
}

#[test]
fn chat_completion_stream_sends_role_tokens_finish_usage_and_done() {
    let server = Server::start(&[]);
    let (_, _, generated) = post_json(&server.url("/v1/generate"), &generate_body("camera.png", "caption en", 6));
    let mut body = chat_body("camera.png", "caption en", 6);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let events = SseReader::open(&server.url("/v1/chat/completions"), &body).all();
    assert!(events.iter().all(|e| e.event.is_none()), "OpenAI streams carry data lines only");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && &c["id"] == id));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], token_ids(&generated).len());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        if generated["finished"] == true { "stop" } else { "length" }
    );
    let content: String = chunks[..chunks.len() - 2]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(content, generated["text"].as_str().unwrap());
    // At most one chunk per token between the role chunk and the finish chunk.
    assert!(chunks.len() - 3 <= token_ids(&generated).len());

    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!({ "include_usage": false });
    let events = SseReader::open(&server.url("/v1/chat/completions"), &body).all();
    assert!(events.iter().all(|e| !e.data.contains("\"usage\"")), "{events:?}");
}

#[test]
fn chat_completions_refuse_what_this_model_cannot_do() {
    let server = Server::start(&[]);
    let url = server.url("/v1/chat/completions");
    let mut system = chat_body("chelsea.png", "caption en", 4);
    system["messages"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({ "role": "system", "content": "be brief" }));
    post_error(&url, &system, 400, "unsupported_message", "system messages are not supported");

    let mut web = chat_body("chelsea.png", "caption en", 4);
    web["messages"][0]["content"][0]["image_url"]["url"] = json!("https://example.com/cat.png");
    post_error(
        &url,
        &web,
        400,
        "unsupported_image_url",
        "only data: URLs, the server fetches nothing",
    );

    let mut n = chat_body("chelsea.png", "caption en", 4);
    n["n"] = json!(2);
    post_error(&url, &n, 400, "unsupported_parameter", "n is 2");

    let mut logprobs = chat_body("chelsea.png", "caption en", 4);
    logprobs["logprobs"] = json!(true);
    post_error(&url, &logprobs, 400, "unsupported_parameter", "logprobs is true");

    let mut unknown = chat_body("chelsea.png", "caption en", 4);
    unknown["colour"] = json!("red");
    post_error(&url, &unknown, 400, "invalid_json", "unknown field `colour`");

    let mut text_only = chat_body("chelsea.png", "caption en", 4);
    text_only["messages"][0]["content"] = json!("caption en");
    post_error(&url, &text_only, 400, "invalid_content", "image_url");

    let mut two_texts = chat_body("chelsea.png", "caption en", 4);
    two_texts["messages"][0]["content"][0] = json!({ "type": "text", "text": "hi" });
    post_error(&url, &two_texts, 400, "invalid_content", "0 image_url and 2 text parts");

    let mut assistant = chat_body("chelsea.png", "caption en", 4);
    assistant["messages"][0]["role"] = json!("assistant");
    post_error(&url, &assistant, 400, "unsupported_message", "\"user\"");

    post_error(
        &url,
        &chat_body("chelsea.png", "caption en", 100_000),
        400,
        "invalid_max_new_tokens",
        "--max-new-tokens-cap",
    );
    let body = chat_body("chelsea.png", "caption en", 4).to_string();
    assert_error(
        post(&url, &[("content-type", "text/plain")], &body),
        415,
        "unsupported_media_type",
        "application/json",
    );
}

#[test]
fn limits_and_bad_requests_are_json_errors_that_name_the_problem() {
    let server = Server::start(&[
        "--max-body-bytes",
        "200000",
        "--max-image-pixels",
        "100000",
        "--max-prompt-tokens",
        "100000",
        "--max-new-tokens-cap",
        "16",
    ]);
    let url = server.url("/v1/generate");
    // chelsea.png is 240 kB: over the body limit as JSON and as a form.
    post_error(
        &url,
        &generate_body("chelsea.png", "ocr", 4),
        413,
        "body_too_large",
        "--max-body-bytes",
    );
    let big = std::fs::read(image_path("chelsea.png")).unwrap();
    let (kind, body) = multipart(&[("image", Some("chelsea.png"), &big), ("prompt", None, b"ocr")]);
    assert_error(
        post(&url, &[("content-type", &kind)], body),
        413,
        "body_too_large",
        "--max-body-bytes",
    );
    // A body declared far over the limit is refused before it is sent.
    let mut socket = TcpStream::connect(server.address()).unwrap();
    write!(
        socket,
        "POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"code\":\"body_too_large\""), "{answer}");
    // text.png (448x172) is under the pixel limit, rocket.jpg (640x427) over it.
    post_error(
        &url,
        &generate_body("rocket.jpg", "ocr", 4),
        413,
        "image_too_large",
        "--max-image-pixels",
    );

    let not_an_image = json!({ "image": STANDARD.encode(b"hello, not an image"), "prompt": "ocr" });
    post_error(&url, &not_an_image, 400, "invalid_image", "not in a supported format");
    let text_png = std::fs::read(image_path("text.png")).unwrap();
    let truncated = json!({ "image": STANDARD.encode(&text_png[..text_png.len() / 2]), "prompt": "ocr" });
    post_error(&url, &truncated, 400, "invalid_image", "truncated or corrupt");
    post_error(
        &url,
        &json!({ "image": "not base64!", "prompt": "ocr" }),
        400,
        "invalid_base64",
        "base64",
    );
    post_error(&url, &json!({ "image": "", "prompt": "ocr" }), 400, "missing_image", "image");

    post_error(&url, &generate_body("text.png", " ", 4), 400, "empty_prompt", "prompt is empty");
    // 30,000 emoji are 120,000 byte-fallback tokens: the cost is counted in tokens.
    post_error(
        &url,
        &generate_body("text.png", &"😀".repeat(30_000), 4),
        400,
        "prompt_too_long",
        "--max-prompt-tokens",
    );
    // Under the token limit but over the model's 8192 positions.
    let words: String = (0..6000).map(|i| format!("w{i} ")).collect();
    post_error(&url, &generate_body("text.png", &words, 4), 400, "prompt_too_long", "positions");
    post_error(
        &url,
        &generate_body("text.png", "ocr", 0),
        400,
        "invalid_max_new_tokens",
        "at least 1",
    );
    post_error(
        &url,
        &generate_body("text.png", "ocr", 17),
        400,
        "invalid_max_new_tokens",
        "--max-new-tokens-cap",
    );

    let mut unknown = generate_body("text.png", "ocr", 4);
    unknown["temperature"] = json!(0.5);
    post_error(&url, &unknown, 400, "invalid_json", "unknown field `temperature`");
    post_error(&url, &json!({ "prompt": "ocr" }), 400, "invalid_json", "missing field `image`");
    let syntax = post(&url, &[("content-type", "application/json")], "{\"image\": ");
    assert_error(syntax, 400, "invalid_json", "EOF");
    let body = generate_body("text.png", "ocr", 4).to_string();
    assert_error(post(&url, &[], &body), 415, "unsupported_media_type", "no Content-Type");
    assert_error(
        post(&url, &[("content-type", "text/plain")], &body),
        415,
        "unsupported_media_type",
        "text/plain",
    );

    assert_error(get(&server.url("/v2/nothing"), &[]), 404, "not_found", "/v2/nothing");
    assert_error(get(&url, &[]), 405, "method_not_allowed", "use POST");
    assert_error(post(&server.url("/health"), &[], ""), 405, "method_not_allowed", "use GET");

    // After all that the server still answers.
    let (status, _, ok) = post_json(&url, &generate_body("text.png", "ocr", 4));
    assert_eq!(status, 200, "{ok}");
    assert!(!server.stderr.lock().unwrap().contains("panicked"));
}

#[test]
fn static_batches_run_together_and_get_the_answers_they_get_alone() {
    let server = Server::start(&["--max-batch", "4", "--batching", "static", "--max-new-tokens-cap", "8000"]);
    let url = server.url("/v1/generate");
    let requests = [
        ("chelsea.png", "caption en", 8),
        ("camera.png", "detect person ; camera", 12),
        ("rocket.jpg", "answer en what is this?", 5),
        ("text.png", "ocr", 10),
        ("camera.png", "segment person", 9),
        ("chelsea.png", "describe en", 7),
    ];
    // Queue all six behind a long request, then release it: the worker takes 4, then 2.
    let holder = hold(&server);
    let clients: Vec<_> = requests
        .iter()
        .map(|&(image, prompt, n)| {
            let (url, body) = (url.clone(), generate_body(image, prompt, n));
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    server.wait_metric("paligemma_queue_depth", 6.0);
    drop(holder);
    let batched: Vec<Value> = clients
        .into_iter()
        .map(|c| {
            let (status, _, v) = c.join().unwrap();
            assert_eq!(status, 200, "{v}");
            v
        })
        .collect();
    // The holder decoded alone; the six joined only after it had ended, four at once.
    assert_eq!(server.metric("paligemma_queue_wait_seconds_count"), 7.0);
    let steps = server.metric("paligemma_batch_size_count");
    assert!(
        server.metric("paligemma_batch_size_bucket{le=\"3\"}") < steps,
        "no step of four rows:\n{}",
        server.metrics()
    );
    for ((image, prompt, n), batched) in requests.iter().zip(&batched) {
        let (_, _, alone) = post_json(&url, &generate_body(image, prompt, *n));
        assert_eq!(
            token_ids(batched),
            token_ids(&alone),
            "{image} {prompt:?}: batched differs from alone"
        );
        assert_eq!(batched["text"], alone["text"]);
        assert_eq!(batched["detections"], alone["detections"]);
        assert_eq!(batched["segments"], alone["segments"]);
    }
}

/// Continuous batching over HTTP: requests arrive at seeded random moments while others are
/// mid-answer, of lengths from 8 to 600 tokens; each joins the running batch and gets the answer
/// it gets alone.
#[test]
fn requests_arriving_mid_answer_join_the_batch_and_get_the_answers_they_get_alone() {
    let server = Server::start(&["--max-batch", "4", "--max-new-tokens-cap", "8000"]);
    let url = server.url("/v1/generate");
    let cases = [
        ("chelsea.png", "caption en"),
        ("camera.png", "detect person ; camera"),
        ("rocket.jpg", "answer en what is this?"),
        ("text.png", "ocr"),
        ("camera.png", "segment person"),
    ];
    let mut random = seeded(0x9e37_79b9_7f4a_7c15);
    let bodies: Vec<(Value, u64)> = (0..12)
        .map(|i| {
            let (image, prompt) = cases[i % cases.len()];
            let tokens = 8 + random(593);
            let mut body = generate_body(image, prompt, tokens as usize);
            body["min_new_tokens"] = json!(tokens);
            (body, random(600))
        })
        .collect();
    let clients: Vec<_> = bodies
        .iter()
        .map(|(body, delay_ms)| {
            let (url, body, delay) = (url.clone(), body.clone(), Duration::from_millis(*delay_ms));
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                post_json(&url, &body)
            })
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        server.metric("paligemma_batch_size_bucket{le=\"2\"}") < server.metric("paligemma_batch_size_count"),
        "no step decoded three or more requests:\n{}",
        server.metrics()
    );
    for ((body, _), (status, _, batched)) in bodies.iter().zip(&answers) {
        assert_eq!(*status, 200, "{batched}");
        let (_, _, alone) = post_json(&url, body);
        assert_eq!(token_ids(batched).len(), body["max_new_tokens"].as_u64().unwrap() as usize);
        assert_eq!(
            token_ids(batched),
            token_ids(&alone),
            "{}: joined mid-answer, it differs from alone",
            body["prompt"]
        );
        assert_eq!(batched["text"], alone["text"]);
        assert_eq!(batched["detections"], alone["detections"]);
        assert_eq!(batched["segments"], alone["segments"]);
    }
}

/// A transformers.js-layout model (no manifest, a decoder without mask inputs): concurrent
/// requests run one at a time, each with transformers' tokens (the fixture's), and /health names
/// the files `--dtype` picked.
#[test]
fn a_community_layout_serves_concurrent_requests_one_at_a_time_with_transformers_tokens() {
    let fixtures: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/expected_tokens.json")).unwrap()).unwrap();
    let case = fixtures["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gqa1/community/batch3")
        .unwrap();
    let max_new_tokens = fixtures["max_new_tokens"].as_u64().unwrap() as usize;
    let server = Server::start_model(
        &tiny_model("gqa1/community"),
        &["--max-batch", "4", "--dtype", "vision=fp16,embed=fp32,decoder=fp32"],
        &[],
    );
    assert!(server.stderr.lock().unwrap().contains("one at a time"));
    let (_, _, health) = get(&server.url("/health"), &[]);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        health["graphs"]["vision_encoder"],
        json!({"file": "onnx/vision_encoder_fp16.onnx", "dtype": "fp16"})
    );
    assert_eq!(
        health["graphs"]["decoder"],
        json!({"file": "onnx/decoder_model_merged.onnx", "dtype": "fp32"})
    );
    let url = server.url("/v1/generate");
    let clients: Vec<_> = case["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let path = repo().join(r["image"].as_str().unwrap());
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let body = generate_body(&name, r["prompt"].as_str().unwrap(), max_new_tokens);
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for (client, expected) in clients.into_iter().zip(case["expected"].as_array().unwrap()) {
        let (status, _, answer) = client.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(json!(token_ids(&answer)), *expected, "{answer}");
    }
    assert!(server.metric("paligemma_batch_size_count") >= 3.0);
    assert_eq!(
        server.metric("paligemma_batch_size_bucket{le=\"1\"}"),
        server.metric("paligemma_batch_size_count"),
        "a step decoded two requests at once:\n{}",
        server.metrics()
    );
}

#[test]
fn a_client_that_leaves_frees_its_slot_queued_or_running() {
    let server = Server::start(&["--max-new-tokens-cap", "8000", "--max-batch", "1"]);
    let holder = hold(&server);
    let leaver = raw_post(&server, "/v1/generate", &generate_body("chelsea.png", "caption en", 8));
    server.wait_metric("paligemma_queue_depth", 1.0);
    drop(leaver);
    server.wait_metric("paligemma_client_disconnects_total", 1.0);
    // Closing the holder's stream stops its row inside the running batch.
    drop(holder);
    server.wait_metric("paligemma_cancelled_total{stage=\"running\"}", 1.0);
    server.wait_metric("paligemma_cancelled_total{stage=\"queued\"}", 1.0);
    server.wait_metric("paligemma_queue_depth", 0.0);
    // Only the holder took a slot; the server goes on answering.
    assert_eq!(server.metric("paligemma_queue_wait_seconds_count"), 1.0);
    let (status, _, v) = post_json(&server.url("/v1/generate"), &generate_body("chelsea.png", "caption en", 4));
    assert_eq!(status, 200, "{v}");
    assert_eq!(server.metric("paligemma_queue_wait_seconds_count"), 2.0);
    assert_eq!(
        server.metric("paligemma_generated_tokens_total"),
        4.0,
        "the stopped rows' tokens are not counted"
    );
}

#[test]
fn a_row_stopped_inside_a_batch_leaves_the_other_rows_unchanged() {
    let server = Server::start(&["--max-new-tokens-cap", "8000"]);
    let url = server.url("/v1/generate");
    let mut staying_body = generate_body("camera.png", "describe en", 2000);
    staying_body["min_new_tokens"] = json!(2000);
    staying_body["stream"] = json!(true);
    let mut staying = SseReader::open(&url, &staying_body);
    assert_eq!(staying.next().unwrap().event.as_deref(), Some("token"));
    // It joins the running request, decodes beside it, and its client leaves.
    let leaving_body = json!({ "image": image_base64("chelsea.png"), "prompt": "caption en", "max_new_tokens": 8000, "min_new_tokens": 8000, "stream": true });
    let mut leaving = SseReader::open(&url, &leaving_body);
    assert_eq!(leaving.next().unwrap().event.as_deref(), Some("token"));
    assert_eq!(leaving.next().unwrap().event.as_deref(), Some("token"));
    drop(leaving);
    server.wait_metric("paligemma_cancelled_total{stage=\"running\"}", 1.0);
    let done = staying.all().pop().unwrap();
    assert_eq!(done.event.as_deref(), Some("done"), "{done:?}");
    let batched: Value = serde_json::from_str(&done.data).unwrap();
    assert!(
        server.metric("paligemma_batch_size_bucket{le=\"1\"}") < server.metric("paligemma_batch_size_count"),
        "the two never decoded in one step:\n{}",
        server.metrics()
    );
    staying_body["stream"] = json!(false);
    let (_, _, alone) = post_json(&url, &staying_body);
    assert_eq!(token_ids(&batched).len(), 2000);
    assert_eq!(token_ids(&batched), token_ids(&alone));
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(&["--max-queue", "1", "--max-new-tokens-cap", "8000", "--max-batch", "1"]);
    let url = server.url("/v1/generate");
    let holder = hold(&server);
    let queued = {
        let (url, body) = (url.clone(), generate_body("text.png", "ocr", 4));
        std::thread::spawn(move || post_json(&url, &body))
    };
    server.wait_metric("paligemma_queue_depth", 1.0);
    let refused = post(
        &url,
        &[("content-type", "application/json")],
        generate_body("text.png", "ocr", 4).to_string(),
    );
    assert_eq!(header(&refused.1, "retry-after"), Some("1"));
    assert_error(refused, 503, "queue_full", "--max-queue");
    drop(holder);
    let (status, _, v) = queued.join().unwrap();
    assert_eq!(status, 200, "{v}");
}

#[test]
fn sigterm_finishes_running_and_queued_requests_then_exits_0() {
    let mut server = Server::start(&["--max-new-tokens-cap", "8000", "--max-batch", "1"]);
    let url = server.url("/v1/generate");
    let body = json!({ "image": image_base64("text.png"), "prompt": "caption en", "max_new_tokens": 2500, "min_new_tokens": 2500, "stream": true });
    let mut running = SseReader::open(&url, &body);
    assert_eq!(running.next().unwrap().event.as_deref(), Some("token"));
    let queued = {
        let (url, body) = (url.clone(), generate_body("chelsea.png", "caption en", 6));
        std::thread::spawn(move || post_json(&url, &body))
    };
    server.wait_metric("paligemma_queue_depth", 1.0);
    let kill = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());

    let events = running.all();
    let done = events.last().unwrap();
    assert_eq!(
        done.event.as_deref(),
        Some("done"),
        "{:?}",
        &events[events.len().saturating_sub(3)..]
    );
    let done: Value = serde_json::from_str(&done.data).unwrap();
    assert_eq!(token_ids(&done).len(), 2500);
    let (status, _, v) = queued.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        token_ids(&v).len(),
        token_ids(&cli_json(&image_path("chelsea.png"), "caption en", 6)).len()
    );

    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", server.stderr.lock().unwrap());
}

#[test]
fn api_key_guards_every_route_but_health_and_the_page() {
    let server = Server::start_with_env(&[], &[("PALIGEMMA_API_KEY", "s3cret")]);
    let body = generate_body("text.png", "ocr", 4).to_string();
    let url = server.url("/v1/generate");
    for auth in [None, Some("Bearer wrong"), Some("Bearer s3cre"), Some("s3cret")] {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(auth.map(|a| ("authorization", a)));
        let answer = post(&url, &headers, &body);
        assert_eq!(header(&answer.1, "www-authenticate"), Some("Bearer"), "{auth:?}");
        assert_error(answer, 401, "invalid_api_key", "Authorization: Bearer");
    }
    let ok = post(
        &url,
        &[("content-type", "application/json"), ("authorization", "Bearer s3cret")],
        &body,
    );
    assert_eq!(ok.0, 200, "{}", ok.2);
    assert_error(get(&server.url("/metrics"), &[]), 401, "invalid_api_key", "API key");
    assert_eq!(get(&server.url("/metrics"), &[("authorization", "Bearer s3cret")]).0, 200);
    let chat = chat_body("text.png", "ocr", 4).to_string();
    assert_error(
        post(&server.url("/v1/chat/completions"), &[("content-type", "application/json")], &chat),
        401,
        "invalid_api_key",
        "API key",
    );
    assert_eq!(get(&server.url("/health"), &[]).0, 200);
    assert_eq!(get(&server.url("/"), &[]).0, 200);
}

#[test]
fn cors_headers_only_with_cors_origin() {
    let preflight = |server: &Server| {
        let mut socket = TcpStream::connect(server.address()).unwrap();
        write!(
            socket,
            "OPTIONS /v1/generate HTTP/1.1\r\nHost: test\r\nOrigin: https://app.example\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).unwrap();
        answer.to_ascii_lowercase()
    };
    let closed = Server::start(&[]);
    let answer = preflight(&closed);
    assert!(answer.starts_with("http/1.1 405"), "{answer}");
    assert!(!answer.contains("access-control-allow-origin"), "{answer}");
    let (_, headers, _) = get(&closed.url("/health"), &[("origin", "https://app.example")]);
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    drop(closed);

    let open = Server::start(&["--cors-origin", "https://app.example", "--api-key", "k"]);
    let answer = preflight(&open);
    assert!(answer.starts_with("http/1.1 204"), "a preflight needs no key: {answer}");
    for line in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: get, post, options",
        "access-control-allow-headers: authorization, content-type",
    ] {
        assert!(answer.contains(line), "{line} missing in {answer}");
    }
    let (status, headers, _) = get(&open.url("/metrics"), &[("origin", "https://app.example")]);
    assert_eq!(status, 401);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example"),
        "a browser must be able to read the 401"
    );
    let (status, headers, _) = get(&open.url("/health"), &[("origin", "https://app.example")]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("https://app.example"));
}

#[test]
fn a_model_that_cannot_load_is_one_error_line_and_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{stderr}");
}

/// Concatenated `token` event texts and the `done` answer of a streamed /v1/generate.
fn streamed_generate(url: &str, body: &Value) -> (String, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = SseReader::open(url, &body).all();
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(last.event.as_deref(), Some("done"), "{events:?}");
    let text = tokens
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    (text, serde_json::from_str(&last.data).unwrap())
}

/// Concatenated delta contents of a streamed chat completion.
fn streamed_chat(url: &str, body: &Value) -> String {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = SseReader::open(url, &body).all();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap())
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn streams_of_byte_fallback_text_add_up_to_the_answer() {
    // The tiny model answers these with byte-fallback runs that are not valid UTF-8: a later
    // byte turns an earlier character into U+FFFD, so text is sent only once final.
    let server = Server::start(&[]);
    for (image, prompt) in [("chelsea.png", "ocr"), ("text.png", "ocr"), ("rocket.jpg", "detect cat")] {
        let mut body = generate_body(image, prompt, 40);
        body["min_new_tokens"] = json!(40);
        let (_, _, whole) = post_json(&server.url("/v1/generate"), &body);
        let text = whole["text"].as_str().unwrap();
        assert!(text.contains('\u{FFFD}'), "{image} {prompt}: no invalid UTF-8 to test: {text:?}");
        let (streamed, done) = streamed_generate(&server.url("/v1/generate"), &body);
        assert_eq!(streamed, text, "{image} {prompt}: /v1/generate token events");
        assert_eq!(done["text"], whole["text"]);
        // The chat stream has no min_new_tokens: compare with its own non-streamed answer.
        let chat = chat_body(image, prompt, 40);
        let (_, _, answer) = post_json(&server.url("/v1/chat/completions"), &chat);
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            streamed_chat(&server.url("/v1/chat/completions"), &chat),
            content,
            "{image} {prompt}: OpenAI stream"
        );
    }
}

#[test]
fn openai_clients_default_fields_are_accepted_and_others_named() {
    let server = Server::start(&[]);
    let url = server.url("/v1/chat/completions");
    let (_, _, plain) = post_json(&url, &chat_body("chelsea.png", "caption en", 6));
    // What the openai, LangChain and LiteLLM clients put in a request at their defaults.
    let mut body = chat_body("chelsea.png", "caption en", 6);
    for (key, value) in [
        ("stop", json!(null)),
        ("frequency_penalty", json!(0)),
        ("presence_penalty", json!(0.0)),
        ("logprobs", json!(false)),
        ("top_logprobs", json!(null)),
        ("logit_bias", json!({})),
        ("n", json!(1)),
        ("temperature", json!(1.0)),
        ("top_p", json!(1)),
        ("stream_options", json!(null)),
        ("response_format", json!({"type": "text"})),
        ("tools", json!([])),
        ("parallel_tool_calls", json!(true)),
        ("user", json!("someone")),
        ("store", json!(false)),
        ("metadata", json!({})),
    ] {
        body[key] = value;
    }
    // The image_url as a bare string, and the data: URL spelled in capitals.
    body["messages"][0]["content"][0]["image_url"] = json!(format!("DATA:image/PNG;BASE64,{}", image_base64("chelsea.png")));
    let (status, _, v) = post_json(&url, &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"]);
    for (key, value, needle) in [
        ("frequency_penalty", json!(0.5), "frequency_penalty is 0.5"),
        ("stop", json!(["\n"]), "stop is [\"\\n\"]"),
        ("logit_bias", json!({"5": 10}), "logit_bias is"),
        ("response_format", json!({"type": "json_object"}), "response_format is"),
        ("tool_choice", json!("required"), "tool_choice is"),
    ] {
        let mut bad = chat_body("chelsea.png", "caption en", 6);
        bad[key] = value;
        post_error(&url, &bad, 400, "unsupported_parameter", needle);
    }
    let mut zero = chat_body("chelsea.png", "caption en", 6);
    zero["max_tokens"] = json!(0);
    post_error(&url, &zero, 400, "invalid_max_new_tokens", "0 new tokens");
}

#[test]
fn the_bearer_scheme_is_accepted_in_any_case() {
    let server = Server::start(&["--api-key", "sekrit"]);
    let body = generate_body("text.png", "ocr", 2).to_string();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} sekrit");
        let (status, _, text) = post(
            &server.url("/v1/generate"),
            &[("content-type", "application/json"), ("authorization", &auth)],
            &body,
        );
        assert_eq!(status, 200, "{scheme}: {text}");
    }
}

#[test]
fn soak_with_bad_requests_mixed_in_fails_only_the_bad_ones() {
    let server = Server::start(&["--max-batch", "4", "--max-queue", "256"]);
    let url = server.url("/v1/generate");
    let valid = [
        ("chelsea.png", "caption en", 6),
        ("chelsea.png", "<image>caption en", 6),
        ("camera.png", "caption <image> en", 5),
        ("text.png", "<image><bos>ocr", 4),
        ("camera.png", "detect cat", 7),
        ("camera.png", "segment person", 5),
        ("camera.png", "<image>detect cat", 7),
    ];
    // (body, status, code)
    let bad: Vec<(Value, u16, &str)> = vec![
        (generate_body("chelsea.png", "<image><image>caption en", 6), 400, "invalid_prompt"),
        (generate_body("chelsea.png", "<image>", 6), 400, "empty_prompt"),
        (generate_body("chelsea.png", &"😀".repeat(2000), 6), 400, "prompt_too_long"),
        (generate_body("chelsea.png", "caption en", 0), 400, "invalid_max_new_tokens"),
        (
            json!({ "image": STANDARD.encode(b"not an image"), "prompt": "ocr", "max_new_tokens": 4 }),
            400,
            "invalid_image",
        ),
        (
            json!({ "image": image_base64("text.png"), "prompt": "ocr", "max_new_tokens": -1 }),
            400,
            "invalid_json",
        ),
    ];
    let expected: Vec<Value> = valid.iter().map(|&(i, p, n)| post_json(&url, &generate_body(i, p, n)).2).collect();
    assert_eq!(
        token_ids(&expected[0]),
        token_ids(&expected[1]),
        "<image>caption en differs from caption en"
    );
    // The task is read after the placeholder: `<image>detect cat` answers boxes as `detect cat`.
    assert_eq!(
        (token_ids(&expected[6]), &expected[6]["detections"]),
        (token_ids(&expected[4]), &expected[4]["detections"])
    );
    // 8 clients, 24 requests each, every fourth one bad, all at once.
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let (url, valid, bad, expected) = (url.clone(), valid.to_vec(), bad.clone(), expected.clone());
            std::thread::spawn(move || {
                let (mut ok, mut refused) = (0, 0);
                for k in 0..24 {
                    let pick = client * 7 + k;
                    if k % 4 == 3 {
                        let (body, status, code) = &bad[pick % bad.len()];
                        let (got, _, v) = post_json(&url, body);
                        assert_eq!((got, v["error"]["code"].as_str()), (*status, Some(*code)), "{v}");
                        refused += 1;
                    } else {
                        let (image, prompt, n) = valid[pick % valid.len()];
                        let (status, _, v) = post_json(&url, &generate_body(image, prompt, n));
                        assert_eq!(status, 200, "{image} {prompt:?}: {v}");
                        let want = &expected[pick % valid.len()];
                        assert_eq!(
                            (token_ids(&v), &v["text"]),
                            (token_ids(want), &want["text"]),
                            "{image} {prompt:?}: wrong answer"
                        );
                        ok += 1;
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for client in clients {
        let (o, r) = client.join().expect("a client saw a failed, lost or wrong answer");
        ok += o;
        refused += r;
    }
    assert_eq!((ok, refused), (8 * 18, 8 * 6));
    assert!(
        server.metric("paligemma_batch_size_count") < (8 * 18 + valid.len()) as f64,
        "requests were never batched"
    );
    assert!(!server.stderr.lock().unwrap().contains("panicked"));
}

/// Sends SIGTERM and waits for the exit status, failing after `bound`.
fn terminate(server: &mut Server, bound: Duration) -> std::process::ExitStatus {
    let kill = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < bound,
            "the server did not exit within {bound:?} of SIGTERM:\n{}",
            server.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the server answers on a raw connection after `request`, read to the close.
fn raw_exchange(server: &Server, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(server.address()).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    // The server may answer and close before the whole request is written.
    let _ = socket.write_all(request);
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and the error code of a raw HTTP answer with a JSON body.
fn raw_error(answer: &str) -> (u16, String) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{head}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.len() > 20), "{body}");
    (status, v["error"]["code"].as_str().unwrap().to_string())
}

#[test]
fn errors_of_the_http_layer_have_the_json_error_body() {
    let server = Server::start(&[]);
    let garbage = raw_exchange(&server, b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(raw_error(&garbage), (400, "bad_request".to_string()));
    let bad_header = raw_exchange(&server, b"GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n");
    assert_eq!(raw_error(&bad_header), (400, "bad_request".to_string()));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    assert_eq!(
        raw_error(&raw_exchange(&server, long_uri.as_bytes())),
        (414, "uri_too_long".to_string())
    );
    let big_header = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(140_000));
    assert_eq!(
        raw_error(&raw_exchange(&server, big_header.as_bytes())),
        (431, "headers_too_large".to_string())
    );
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(
        raw_error(&raw_exchange(&server, many_headers.as_bytes())),
        (431, "headers_too_large".to_string())
    );
    // The server is unharmed, and a good request on a raw socket still gets its usual answer.
    let health = raw_exchange(&server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

#[test]
fn slow_clients_cannot_hold_the_server_and_sigterm_ends_it_within_the_bound() {
    let mut server = Server::start(&[
        "--max-connections",
        "64",
        "--header-timeout",
        "2",
        "--body-timeout",
        "2",
        "--shutdown-timeout",
        "20",
    ]);
    // 2,000 connections that never finish their request: most send half a head, some nothing,
    // some a whole head and part of the body.
    let mut slow = Vec::new();
    for k in 0..2000 {
        let Ok(mut socket) = TcpStream::connect(server.address()) else {
            continue;
        };
        let _ = match k % 4 {
            0 => Ok(()),
            3 => socket.write_all(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image\": ",
            ),
            _ => socket.write_all(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Len"),
        };
        slow.push(socket);
    }
    assert!(slow.len() > 1900, "only {} connections opened", slow.len());
    // A normal client is served meanwhile.
    let (status, _, health) = get(&server.url("/health"), &[]);
    assert_eq!(status, 200, "{health}");
    let (status, _, answer) = post_json(&server.url("/v1/generate"), &generate_body("chelsea.png", "caption en", 4));
    assert_eq!(status, 200, "{answer}");
    // A stalled body gets its 408 once the body timeout passes.
    let stalled = raw_exchange(
        &server,
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"image\"",
    );
    assert_eq!(raw_error(&stalled), (408, "body_timeout".to_string()));
    // An idle keep-alive connection, and one that never sends a byte, are closed by the header
    // timeout: reading them ends.
    let mut idle = TcpStream::connect(server.address()).unwrap();
    idle.set_read_timeout(Some(DEADLINE)).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut all = Vec::new();
    idle.read_to_end(&mut all).unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    let mut silent = TcpStream::connect(server.address()).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(silent.read(&mut [0u8; 16]).unwrap(), 0, "a silent connection was not closed");
    assert!(!server.stderr.lock().unwrap().contains("panicked"));
    // SIGTERM with thousands of unfinished connections still open on the client side: the
    // server closes them and exits 0 well within --shutdown-timeout.
    let status = terminate(&mut server, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", server.stderr.lock().unwrap());
    drop(slow);
}

/// A connection that sent a whole head and the start of a `Content-Length: 1000` body.
fn partial_body(server: &Server, extra_headers: &str) -> TcpStream {
    let mut socket = TcpStream::connect(server.address()).unwrap();
    write!(
        socket,
        "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: 1000\r\n\r\n{{\"im"
    )
    .unwrap();
    socket
}

#[test]
fn clients_stuck_in_their_body_neither_lock_others_out_nor_hold_the_shutdown() {
    let mut server = Server::start(&["--max-connections", "5", "--body-timeout", "60", "--shutdown-timeout", "60"]);
    let stuck: Vec<TcpStream> = (0..5).map(|_| partial_body(&server, "")).collect();
    // They run no request yet: a newcomer closes the longest idle of them instead of a 503.
    for _ in 0..3 {
        let (status, _, body) = get(&server.url("/health"), &[]);
        assert_eq!(status, 200, "{body}");
    }
    let more: Vec<TcpStream> = (0..5).map(|_| partial_body(&server, "")).collect();
    let (status, _, answer) = post_json(&server.url("/v1/generate"), &generate_body("text.png", "ocr", 2));
    assert_eq!(status, 200, "{answer}");
    // SIGTERM closes them at once rather than waiting out --shutdown-timeout (60 s).
    let status = terminate(&mut server, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    drop((stuck, more));
}

#[test]
fn a_request_without_the_key_or_far_over_the_body_limit_is_answered_before_its_body() {
    let server = Server::start(&["--api-key", "sekrit", "--max-body-bytes", "5000", "--body-timeout", "60"]);
    // Neither sends the body it declares: the answer comes from the head alone.
    let unauthorized = raw_exchange(
        &server,
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n",
    );
    assert_eq!(raw_error(&unauthorized), (401, "invalid_api_key".to_string()));
    let too_big = raw_exchange(
        &server,
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: 10001\r\n\r\n",
    );
    assert_eq!(raw_error(&too_big), (413, "body_too_large".to_string()));
}

#[test]
fn requests_still_running_after_the_shutdown_timeout_are_told_so() {
    let mut server = Server::start(&["--max-new-tokens-cap", "8000", "--max-batch", "2", "--shutdown-timeout", "1"]);
    let mut streaming = hold(&server);
    let waiting = {
        let (url, mut body) = (server.url("/v1/generate"), generate_body("chelsea.png", "caption en", 8000));
        body["min_new_tokens"] = json!(8000);
        std::thread::spawn(move || post_json(&url, &body))
    };
    // Both decode: the grace time is over before either ends.
    server.wait_metric("paligemma_slots_in_use", 2.0);
    let status = terminate(&mut server, DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", server.stderr.lock().unwrap());
    let (status, _, answer) = waiting.join().unwrap();
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("shutting_down")), "{answer}");
    let last = std::iter::from_fn(|| streaming.next()).last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{last:?}");
    assert!(last.data.contains("--shutdown-timeout"), "{}", last.data);
}
