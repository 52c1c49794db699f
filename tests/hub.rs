//! `hub::resolve_model` against a loopback server that answers hf-hub's requests the way the
//! Hub does (`hf-hub` 0.5 `api/sync.rs`: `GET /{repo}/resolve/{revision}/{file}` with
//! `Range: bytes=0-0` for the metadata, reading `etag` or `x-linked-etag`, `x-repo-commit` and
//! `Content-Range`; LFS files answered with a 302 to a CDN URL; then `Range: bytes=N-` to download).
//! Configuration is passed explicitly; the environment is read only in a child process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use paligemma::hub::{self, HubError, HubOptions, MANIFEST};
use paligemma::DtypeChoice;

mod common;

use common::{image, tiny_model};

const REPO: &str = "test-owner/tiny-paligemma";
const COMMIT: &str = "4f1c0d6e2b8a9d7c5e3f1a2b4c6d8e0f1a3b5c7d";

/// How the fake Hub answers for one file.
#[derive(Clone, Copy, PartialEq)]
enum Reply {
    /// 200/206 with `etag` and `x-repo-commit`, as for files stored in git.
    Direct,
    /// 302 to `/cdn/{etag}` with `x-linked-etag`, as for LFS files.
    Lfs,
    /// A 302 without `Location`: a broken proxy or server.
    BrokenRedirect,
}

struct RepoFile {
    body: Vec<u8>,
    etag: String,
    reply: Reply,
}

/// A request as the server saw it: (path, headers with lower-case names).
type Seen = (String, HashMap<String, String>);

struct FakeHub {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Serves `files` as repo `REPO` at commit `COMMIT`.
    fn start<N: Into<String>>(files: Vec<(N, RepoFile)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let files: Arc<HashMap<String, RepoFile>> = Arc::new(files.into_iter().map(|(n, f)| (n.into(), f)).collect());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, addr, &files, &seen);
                }
            }
        });
        FakeHub {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn request_count(&self) -> usize {
        self.requests.lock().expect("request log").len()
    }

    /// Closes the listening socket: later connections are refused.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread");
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: TcpStream, addr: SocketAddr, files: &HashMap<String, RepoFile>, seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_or(true, |n| n == 0) || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    seen.lock().expect("request log").push((path.clone(), headers.clone()));

    let resolve_prefix = format!("/{REPO}/resolve/main/");
    let response = if let Some(name) = path.strip_prefix(&resolve_prefix) {
        match files.get(name) {
            Some(file) if file.reply == Reply::BrokenRedirect => (
                format!(
                    "HTTP/1.1 302 Found\r\nX-Linked-Etag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Length: 0\r\n",
                    file.etag
                ),
                Vec::new(),
            ),
            Some(file) if file.reply == Reply::Lfs => {
                let head = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://{addr}/cdn/{}\r\nX-Linked-Etag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Length: 0\r\n",
                    file.etag, file.etag
                );
                (head, Vec::new())
            }
            Some(file) => ranged(
                file,
                headers.get("range"),
                &format!("ETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\n", file.etag),
            ),
            None => not_found(),
        }
    } else if path == format!("/api/models/{REPO}/revision/main") {
        // The model info hf-hub's `info()` reads: the repo's file list and commit.
        let siblings: Vec<serde_json::Value> = files.keys().map(|name| serde_json::json!({ "rfilename": name })).collect();
        let body = serde_json::json!({ "siblings": siblings, "sha": COMMIT }).to_string().into_bytes();
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        )
    } else if let Some(etag) = path.strip_prefix("/cdn/") {
        match files.values().find(|file| file.reply == Reply::Lfs && file.etag == etag) {
            Some(file) => ranged(file, headers.get("range"), ""),
            None => not_found(),
        }
    } else {
        not_found()
    };
    let (head, body) = response;
    let mut stream = stream;
    let _ = stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
    let _ = stream.write_all(&body);
}

/// 206 with `Content-Range` for `bytes=a-b` / `bytes=a-`, else 200 with the whole body.
fn ranged(file: &RepoFile, range: Option<&String>, extra: &str) -> (String, Vec<u8>) {
    let len = file.body.len();
    let bounds = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let start: usize = a.parse().ok()?;
            let end: usize = if b.is_empty() { len.checked_sub(1)? } else { b.parse().ok()? };
            (start <= end && end < len).then_some((start, end))
        });
    match bounds {
        Some((start, end)) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\n{extra}Content-Range: bytes {start}-{end}/{len}\r\nContent-Length: {}\r\n",
                end + 1 - start
            ),
            file.body[start..=end].to_vec(),
        ),
        None => (format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: {len}\r\n"), file.body.clone()),
    }
}

fn not_found() -> (String, Vec<u8>) {
    (
        "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\n".to_string(),
        Vec::new(),
    )
}

/// Distinct etags per body, as the Hub's content hashes are.
fn etag_of(body: &[u8]) -> String {
    let hash = body
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

fn file(body: &[u8], reply: Reply) -> RepoFile {
    RepoFile {
        body: body.to_vec(),
        etag: etag_of(body),
        reply,
    }
}

/// manifest.json + a tokenizer + an LFS-style graph in a subfolder.
fn tiny_repo() -> Vec<(&'static str, RepoFile)> {
    vec![
        (
            MANIFEST,
            file(
                br#"{"format": 1, "files": ["tokenizer.json", "graphs/vision.onnx"]}"#,
                Reply::Direct,
            ),
        ),
        ("tokenizer.json", file(br#"{"model": {"type": "BPE"}}"#, Reply::Direct)),
        (
            "graphs/vision.onnx",
            file(&(0u8..=255).cycle().take(3000).collect::<Vec<u8>>(), Reply::Lfs),
        ),
    ]
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paligemma-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn options(endpoint: String, cache_dir: &Path, offline: bool) -> HubOptions {
    HubOptions {
        endpoint,
        cache_dir: cache_dir.to_path_buf(),
        offline,
        token: None,
        progress: false,
    }
}

fn snapshot_dir(cache: &Path) -> PathBuf {
    cache.join("models--test-owner--tiny-paligemma").join("snapshots").join(COMMIT)
}

#[test]
fn hub_repo_downloads_into_the_cache_then_loads_offline_after_the_server_stops() {
    let cache = temp_dir("download");
    let mut server = FakeHub::start(tiny_repo());

    let dir = hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), DtypeChoice::default()).expect("download");
    assert_eq!(dir, snapshot_dir(&cache));
    for (name, served) in tiny_repo() {
        assert_eq!(std::fs::read(dir.join(name)).expect("downloaded file"), served.body, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("models--test-owner--tiny-paligemma/refs/main"))
            .ok()
            .as_deref(),
        Some(COMMIT)
    );

    // Cache first: a complete snapshot needs no request even when online.
    let before = server.request_count();
    assert_eq!(
        hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), DtypeChoice::default()).expect("cached"),
        dir
    );
    assert_eq!(server.request_count(), before);

    let endpoint = server.endpoint();
    server.stop();
    assert_eq!(
        hub::resolve_model(REPO, &options(endpoint, &cache, true), DtypeChoice::default()).expect("offline from cache"),
        dir
    );
    let _ = std::fs::remove_dir_all(cache);
}

/// Every file of the fixtures' transformers.js-layout model (no manifest), graphs as LFS files.
fn community_repo() -> Vec<(String, RepoFile)> {
    let root = tiny_model("gqa1/community");
    let mut files = Vec::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).expect("model dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let name = path.strip_prefix(&root).expect("under root").to_string_lossy().to_string();
            let reply = if name.ends_with(".onnx") { Reply::Lfs } else { Reply::Direct };
            files.push((name, file(&std::fs::read(&path).expect("model file"), reply)));
        }
    }
    files
}

/// A transformers.js repo: no manifest, so the repo's file list picks what to fetch: the config,
/// processor and tokenizer files and the graphs of the dtype asked for, nothing else. The binary
/// then runs it from the cache, offline, as it runs the same directory locally.
#[test]
fn transformers_js_repo_downloads_only_the_graphs_of_its_dtype() {
    let cache = temp_dir("community");
    let mut server = FakeHub::start(community_repo());
    let q4: DtypeChoice = "q4".parse().expect("dtype");
    let missing = hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), "bnb4".parse().expect("dtype"))
        .expect_err("no bnb4 graphs")
        .to_string();
    assert!(
        missing.contains("decoder has no bnb4 file (it has: fp16, fp32, int8, q4, q4f16, q8)"),
        "{missing}"
    );
    let dir = hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), q4).expect("download");
    let mut got = paligemma::transformers_js::all_files(&dir);
    got.sort();
    let mut expected = vec![
        "config.json",
        "generation_config.json",
        "onnx/decoder_model_merged_q4.onnx",
        "onnx/embed_tokens_q4.onnx",
        "onnx/vision_encoder_q4.onnx",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
    ];
    expected.sort();
    assert_eq!(got, expected);
    let endpoint = server.endpoint();
    server.stop();
    assert_eq!(
        hub::resolve_model(REPO, &options(endpoint.clone(), &cache, true), q4).expect("offline from cache"),
        dir
    );
    let offline = hub::resolve_model(REPO, &options(endpoint.clone(), &cache, true), "fp16".parse().expect("dtype"));
    // The cache holds the layout's q4 graphs: the error says fp16's are absent, not the
    // manifest a transformers.js repo never has.
    match offline {
        Err(e @ HubError::OfflineNotCached { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("missing: the fp16 graphs (") && text.contains("has no fp16 file (it has: q4)"),
                "{text}"
            );
            assert!(!text.contains("manifest.json"), "{text}");
        }
        other => panic!("{other:?}"),
    }

    let run = |model: &str, env: &[(&str, &Path)]| {
        let image = image("chelsea.png").display().to_string();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma"));
        command
            .args([
                "--model",
                model,
                "--image",
                &image,
                "--prompt",
                "caption en",
                "--dtype",
                "q4",
                "--json",
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", &endpoint);
        for (key, value) in env {
            command.env(key, value);
        }
        let out = command.output().expect("paligemma runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["token_ids"].clone()
    };
    let local = tiny_model("gqa1/community").display().to_string();
    assert_eq!(run(REPO, &[("HF_HUB_CACHE", &cache)]), run(&local, &[]));
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn offline_with_an_empty_cache_is_a_clear_error_without_requests() {
    let cache = temp_dir("offline-empty");
    let server = FakeHub::start(tiny_repo());
    let error = hub::resolve_model(REPO, &options(server.endpoint(), &cache, true), DtypeChoice::default()).expect_err("nothing cached");
    let message = error.to_string();
    assert!(matches!(error, HubError::OfflineNotCached { .. }), "{message}");
    assert!(
        message.contains("HF_HUB_OFFLINE") && message.contains(REPO) && message.contains(MANIFEST),
        "{message}"
    );
    assert_eq!(server.request_count(), 0);
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn token_is_sent_as_a_bearer_header() {
    let cache = temp_dir("token");
    let server = FakeHub::start(tiny_repo());
    let mut opts = options(server.endpoint(), &cache, false);
    opts.token = Some("hf_test_token".to_string());
    hub::resolve_model(REPO, &opts, DtypeChoice::default()).expect("download");
    let requests = server.requests.lock().expect("request log").clone();
    let to_hub: Vec<&Seen> = requests.iter().filter(|(path, _)| path.contains("/resolve/")).collect();
    assert!(!to_hub.is_empty());
    for (path, headers) in to_hub {
        assert_eq!(
            headers.get("authorization").map(String::as_str),
            Some("Bearer hf_test_token"),
            "{path}"
        );
    }
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn file_missing_on_the_hub_is_an_error_naming_it() {
    let cache = temp_dir("missing-remote");
    let mut repo = tiny_repo();
    repo.retain(|(name, _)| *name != "tokenizer.json");
    let server = FakeHub::start(repo);
    let error = hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), DtypeChoice::default()).expect_err("404");
    let message = error.to_string();
    assert!(
        matches!(error, HubError::Download { ref file, .. } if file == "tokenizer.json"),
        "{message}"
    );
    assert!(message.contains("404"), "{message}");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn malformed_hub_reply_is_an_error_not_a_panic() {
    // hf-hub 0.5 `expect`s a Location header on any redirect; the panic must stay inside resolve_model.
    let cache = temp_dir("broken-redirect");
    let mut repo = tiny_repo();
    repo.retain(|(name, _)| *name != "tokenizer.json");
    repo.push(("tokenizer.json", file(b"{}", Reply::BrokenRedirect)));
    let server = FakeHub::start(repo);
    let error = hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), DtypeChoice::default()).expect_err("broken reply");
    assert!(
        matches!(error, HubError::Download { ref file, .. } if file == "tokenizer.json"),
        "{error}"
    );
    assert!(error.to_string().contains("unexpected reply"), "{error}");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn unreachable_endpoint_is_a_download_error() {
    let cache = temp_dir("unreachable");
    let endpoint = {
        let mut server = FakeHub::start(Vec::<(String, RepoFile)>::new());
        server.stop();
        server.endpoint()
    };
    let error = hub::resolve_model(REPO, &options(endpoint.clone(), &cache, false), DtypeChoice::default()).expect_err("refused");
    let message = error.to_string();
    assert!(
        matches!(error, HubError::Download { .. }) && message.contains(&endpoint),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn local_directory_with_manifest_and_files_is_used_as_is() {
    let dir = temp_dir("local");
    std::fs::create_dir_all(dir.join("graphs")).expect("graphs dir");
    for (name, served) in tiny_repo() {
        std::fs::write(dir.join(name), served.body).expect("write");
    }
    let unused = options("http://127.0.0.1:9".to_string(), &dir.join("no-cache"), true);
    let spec = dir.to_str().expect("utf-8 temp path");
    assert_eq!(hub::resolve_model(spec, &unused, DtypeChoice::default()).expect("local model"), dir);

    std::fs::remove_file(dir.join("graphs/vision.onnx")).expect("remove");
    let message = hub::resolve_model(spec, &unused, DtypeChoice::default())
        .expect_err("file gone")
        .to_string();
    assert!(message.contains("graphs/vision.onnx") && message.contains(spec), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn directory_without_manifest_is_an_error_with_the_convert_command() {
    let dir = temp_dir("no-manifest");
    let unused = options("http://127.0.0.1:9".to_string(), &dir.join("no-cache"), true);
    let error = hub::resolve_model(dir.to_str().expect("utf-8"), &unused, DtypeChoice::default()).expect_err("no manifest");
    let message = error.to_string();
    assert!(matches!(error, HubError::MissingManifest { .. }), "{message}");
    assert!(
        message.contains(&dir.display().to_string()) && message.contains("python -m export convert MODEL OUT_DIR"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_repo_id_is_an_error() {
    let unused = options("http://127.0.0.1:9".to_string(), Path::new("/nonexistent-cache"), true);
    for spec in ["paligemma2", "owner/bad name", "owner/-x"] {
        let error = hub::resolve_model(spec, &unused, DtypeChoice::default()).expect_err("malformed");
        assert!(matches!(error, HubError::BadRepoId { .. }), "{spec}: {error}");
    }
    // Path-shaped arguments that do not exist are reported as missing directories.
    for spec in ["./models/nope", "/nonexistent/model", "models/pg2/int4"] {
        let error = hub::resolve_model(spec, &unused, DtypeChoice::default()).expect_err("missing dir");
        assert!(matches!(error, HubError::NotADirectory { .. }), "{spec}: {error}");
    }
}

/// Runs in a child process started by `from_env_reads_the_huggingface_variables`, which sets
/// the variables; never on its own.
#[test]
#[ignore = "child of from_env_reads_the_huggingface_variables"]
fn from_env_child() {
    let options = HubOptions::from_env().expect("options from env");
    assert_eq!(Some(options.endpoint.clone()), std::env::var("HF_ENDPOINT").ok());
    assert!(options.offline);
    let dir = hub::resolve_model(REPO, &options, DtypeChoice::default()).expect("offline from the cache under HF_HOME");
    println!("RESOLVED {}", dir.display());
}

#[test]
fn from_env_reads_the_huggingface_variables() {
    let home = temp_dir("from-env");
    let cache = home.join("hub");
    let mut server = FakeHub::start(tiny_repo());
    hub::resolve_model(REPO, &options(server.endpoint(), &cache, false), DtypeChoice::default()).expect("populate the cache");
    let endpoint = server.endpoint();
    server.stop();

    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "from_env_child", "--ignored", "--nocapture"])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", &endpoint)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .output()
        .expect("child test runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("RESOLVED {}", snapshot_dir(&cache).display())), "{stdout}");
    let _ = std::fs::remove_dir_all(home);
}
