//! The `paligemma` command line: arguments in, a [`Pipeline`] run, text or JSON out.
//!
//! Every failure is one line on stderr starting `error:` and exit code 2; in a batch, a request
//! that fails prints its own error and the others still run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::annotate::annotate;
use crate::bench::BenchOptions;
use crate::input::read_regular_file;
use crate::onnxruntime::parse_ep_list;
use crate::pipeline::{ImageInput, Pipeline, PipelineOptions, Request, Response};
use crate::preprocess::ImageLimits;
use crate::prompt::DEFAULT_MAX_PROMPT_TOKENS;
use crate::serve::api::Limits;
use crate::serve::connections::ConnectionLimits;
use crate::serve::ServeOptions;

/// Run PaliGemma 2 (ONNX) on images: captions, OCR, answers, detection boxes, segmentation masks.
#[derive(Debug, Parser)]
#[command(
    name = "paligemma",
    version,
    after_help = "HTTP service: paligemma serve --help\nBenchmark: paligemma bench --help"
)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Image file (PNG, JPEG, GIF, WebP, BMP, TIFF).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub image: Option<PathBuf>,
    /// Prompt: "caption en", "ocr", "answer en QUESTION", "detect cat ; dog", "segment car", ...
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub prompt: Option<String>,
    /// JSON-lines file, one request per line: {"image": PATH, "prompt": TEXT, "max_new_tokens": N
    /// (optional)}; relative paths are taken from the current directory. All run as padded batches.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// Most tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Fewest tokens to generate: `<eos>` is not chosen before (as transformers' min_new_tokens).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Print one JSON object per request (text, token_ids, detections, segments, providers).
    #[arg(long)]
    pub json: bool,
    /// Write the image with boxes, labels and masks drawn to this PNG (single request; the name
    /// must end in .png).
    #[arg(long, conflicts_with = "batch", value_parser = png_path)]
    pub annotate: Option<PathBuf>,
    /// Write each segmentation mask as a PNG (REQUEST_OBJECT.png) into this directory.
    #[arg(long)]
    pub masks_dir: Option<PathBuf>,
    /// Largest image accepted, in pixels (decompression-bomb guard).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
}

/// The model and how ONNX Runtime runs it: shared by `paligemma` and `paligemma bench`.
#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Converted model directory (with manifest.json) or a Hugging Face repo id holding one.
    /// Default: the repository's committed scenes model, models/scenes (see models/README.md).
    #[arg(long)]
    pub model: Option<String>,
    /// Execution providers in priority order: cpu, cuda, tensorrt (e.g. "tensorrt,cuda,cpu").
    #[arg(long, default_value = "cpu")]
    pub ep: String,
    /// Intra-op threads per graph (default: ONNX Runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which of the model's graphs to run.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Most text tokens a prompt may hold (`<bos>`, the task, `\n`; the image tokens are not
    /// counted): what a request costs grows with its tokens, not its characters.
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_TOKENS, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub max_prompt_tokens: usize,
    /// ONNX Runtime library to load (else $ORT_DYLIB_PATH, next to this binary, the repo's .venv).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

impl RuntimeArgs {
    fn pipeline_options(&self) -> Result<PipelineOptions> {
        let model = match &self.model {
            Some(model) => model.clone(),
            None => default_model()?.display().to_string(),
        };
        let mut options = PipelineOptions::new(model);
        options.dtype = self.dtype.clone();
        options.providers = parse_ep_list(&self.ep)?;
        options.threads = self.threads;
        options.ort_lib = self.ort_lib.clone();
        options.max_prompt_tokens = self.max_prompt_tokens;
        Ok(options)
    }
}

/// Where the default model lives, relative to a repository checkout.
const DEFAULT_MODEL: &str = "models/scenes";

/// `models/scenes` under the current directory, else under an ancestor of the executable (a
/// `target/release/paligemma` in a checkout), else under the crate root recorded at build time.
fn default_model() -> Result<PathBuf> {
    let mut roots = vec![std::env::current_dir().ok()];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(|dir| Some(dir.to_path_buf())));
    }
    roots.push(Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))));
    let mut searched = Vec::new();
    for root in roots.into_iter().flatten() {
        let dir = root.join(DEFAULT_MODEL);
        if dir.join("manifest.json").is_file() {
            return Ok(dir);
        }
        let shown = dir.display().to_string();
        if !searched.contains(&shown) {
            searched.push(shown);
        }
    }
    bail!(
        "no --model given and the default model ({DEFAULT_MODEL}, committed in this repository) is not in {}; \
         pass --model with a converted directory or a Hugging Face repo id",
        searched.join(", ")
    )
}

/// Measure load, vision, prefill, first-token and decode times, long-run and batch decoding of one
/// model and dtype; prints one JSON object (`python -m bench` compares it with transformers).
#[derive(Debug, Parser)]
#[command(name = "paligemma bench")]
pub struct BenchArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Image(s): the first for the single and long runs, all of them (cycled) for the batch run.
    #[arg(long, required = true)]
    pub image: Vec<PathBuf>,
    #[arg(long, default_value = "caption en")]
    pub prompt: String,
    /// Tokens generated by the single and the batch run.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Tokens of the long run (early vs late decode steps).
    #[arg(long, default_value_t = 256)]
    pub long_tokens: usize,
    /// Rows of the batch run.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

/// Serve the model over HTTP: `POST /v1/generate`, `POST /v1/chat/completions` (OpenAI shape),
/// `GET /health`, `GET /metrics` (Prometheus) and a test page at `/`. Concurrent requests run as
/// one batch; SIGTERM stops accepting, finishes the queue and exits 0.
#[derive(Debug, Parser)]
#[command(name = "paligemma serve", bin_name = "paligemma serve")]
pub struct ServeArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Address to listen on; the default takes no connection from other machines.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the `listening on` line on stderr names it).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most requests run together as one batch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_batch: u16,
    /// Most requests waiting for the model; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Largest request body in bytes (a base64 image is 4/3 of the file).
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds a request body may take to arrive (408 after).
    #[arg(long, default_value_t = 60)]
    pub body_timeout: u64,
    /// Seconds a connection may take to send a request head; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs())]
    pub header_timeout: u64,
    /// Seconds a client may take none of its answer before it is dropped (its request cancelled).
    #[arg(long, default_value_t = ConnectionLimits::default().write_timeout.as_secs())]
    pub write_timeout: u64,
    /// Most open connections (keep under `ulimit -n`); at the cap the longest-idle connection is
    /// closed for a new one, or the new one answered 503 when all run requests.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub max_connections: usize,
    /// Seconds SIGTERM waits for running and queued requests before cancelling them and exiting.
    #[arg(long, default_value_t = ConnectionLimits::default().shutdown_timeout.as_secs())]
    pub shutdown_timeout: u64,
    /// Largest image accepted, in pixels (decompression-bomb guard).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Most new tokens one request may ask for.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens_cap: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and /.
    #[arg(long, env = "PALIGEMMA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow browsers on this origin (or `*`) to call the API: answers CORS preflights.
    #[arg(long)]
    pub cors_origin: Option<String>,
}

/// What the command line asks for.
pub enum Command {
    Run(Args),
    Bench(BenchArgs),
    Serve(ServeArgs),
}

/// Parses the process arguments: `paligemma bench ...`, `paligemma serve ...` or the plain run.
pub fn parse() -> Command {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("bench") => Command::Bench(BenchArgs::parse_from(&argv[1..])),
        Some("serve") => Command::Serve(ServeArgs::parse_from(&argv[1..])),
        _ => Command::Run(Args::parse_from(argv)),
    }
}

pub fn serve(args: ServeArgs) -> Result<i32> {
    let mut pipeline = args.runtime.pipeline_options()?;
    pipeline.image_limits = ImageLimits {
        max_pixels: args.max_image_pixels,
        ..ImageLimits::default()
    };
    crate::serve::run(ServeOptions {
        pipeline,
        host: args.host,
        port: args.port,
        max_batch: usize::from(args.max_batch),
        max_queue: args.max_queue as usize,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            body_timeout: Duration::from_secs(args.body_timeout),
            max_new_tokens_cap: args.max_new_tokens_cap,
        },
        connections: ConnectionLimits {
            max_connections: args.max_connections,
            header_timeout: Duration::from_secs(args.header_timeout),
            write_timeout: Duration::from_secs(args.write_timeout),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        },
        api_key: args.api_key.filter(|k| !k.is_empty()),
        cors_origin: args.cors_origin,
    })?;
    Ok(0)
}

pub fn bench(args: BenchArgs) -> Result<i32> {
    let report = crate::bench::run(BenchOptions {
        pipeline: args.runtime.pipeline_options()?,
        images: args.image,
        prompt: args.prompt,
        tokens: args.tokens,
        long_tokens: args.long_tokens,
        batch: args.batch,
    })?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    print_line(&serde_json::to_string(&report)?)?;
    Ok(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    image: PathBuf,
    prompt: String,
    max_new_tokens: Option<usize>,
}

/// One request's `--json` object; `paligemma serve` answers the same.
#[derive(Serialize)]
pub(crate) struct JsonResult<'a> {
    #[serde(flatten)]
    pub(crate) response: &'a Response,
    pub(crate) providers: &'a BTreeMap<String, Vec<String>>,
}

/// The lines of a text file as editors on any system write it: UTF-8 with or without a
/// byte-order mark, or UTF-16 with one (Windows' "Unicode"); line ends `\n` or `\r\n`. Each line
/// is decoded on its own: one that is not text is that line's error, not the file's.
fn text_lines(bytes: &[u8]) -> Vec<Result<String, String>> {
    fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Vec<Result<String, String>> {
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| unit([c[0], c[1]])).collect();
        let line = |units: &[u16]| String::from_utf16(units).map_err(|_| "is not valid UTF-16 text (a lone surrogate)".to_string());
        units.split(|&u| u == u16::from(b'\n')).map(line).collect()
    }
    let utf8 = |bytes: &[u8]| -> Vec<Result<String, String>> {
        let line = |line: &[u8]| {
            String::from_utf8(line.to_vec()).map_err(|e| {
                format!(
                    "is not UTF-8 text (byte {} of the line); save the file as UTF-8",
                    e.utf8_error().valid_up_to() + 1
                )
            })
        };
        bytes.split(|&b| b == b'\n').map(line).collect()
    };
    let lines = match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => utf8(rest),
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => utf8(bytes),
    };
    lines
        .into_iter()
        .map(|l| l.map(|l| l.strip_suffix('\r').map(str::to_string).unwrap_or(l)))
        .collect()
}

/// Largest `--batch` file: a million requests of a long path and prompt.
const MAX_BATCH_FILE_BYTES: u64 = 1 << 30;

/// One request of the command line: where it comes from (the `--batch` line) and the request,
/// or why that line is not one.
struct Entry {
    line: Option<usize>,
    request: Result<Request, String>,
}

/// The requests of a `--batch` file, one per non-blank line, each parsed on its own: a line that
/// is not a valid request is that request's error, not the file's.
fn read_batch(path: &Path, default_max: usize, min_new_tokens: usize) -> Result<Vec<Entry>> {
    let bytes = read_regular_file(path, "batch file", MAX_BATCH_FILE_BYTES)?;
    let parse = |line: Result<String, String>| -> Result<Request, String> {
        let line: BatchLine = serde_json::from_str(&line?)
            .map_err(|e| format!("{e}; expected {{\"image\": PATH, \"prompt\": TEXT, \"max_new_tokens\": N (optional)}}"))?;
        Ok(Request {
            image: ImageInput::Path(line.image),
            prompt: line.prompt,
            max_new_tokens: line.max_new_tokens.unwrap_or(default_max),
            min_new_tokens,
        })
    };
    let entries: Vec<Entry> = text_lines(&bytes)
        .into_iter()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(n, line)| Entry {
            line: Some(n + 1),
            request: parse(line).map_err(|e| format!("{} line {}: {e}", path.display(), n + 1)),
        })
        .collect();
    if entries.is_empty() {
        bail!("{} holds no requests", path.display());
    }
    Ok(entries)
}

/// One line to stdout; a closed pipe or a full disk is an error, not a panic.
fn print_line(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write the answer to stdout")
}

/// Runs the command; returns the process exit code (0, or 2 when any request failed).
pub fn run(args: Args) -> Result<i32> {
    let entries = match (&args.batch, &args.image, &args.prompt) {
        (Some(batch), _, _) => read_batch(batch, args.max_new_tokens, args.min_new_tokens)?,
        (None, Some(image), Some(prompt)) => vec![Entry {
            line: None,
            request: Ok(Request {
                image: ImageInput::Path(image.clone()),
                prompt: prompt.clone(),
                max_new_tokens: args.max_new_tokens,
                min_new_tokens: args.min_new_tokens,
            }),
        }],
        _ => bail!("give --image and --prompt, or --batch FILE"),
    };
    let mut options = args.runtime.pipeline_options()?;
    options.image_limits = ImageLimits {
        max_pixels: args.max_image_pixels,
        ..ImageLimits::default()
    };
    let mut pipeline = Pipeline::load(options)?;
    for warning in pipeline.warnings() {
        eprintln!("warning: {warning}");
    }
    if !pipeline.supports_batching() {
        eprintln!("note: this decoder has no attention_mask/token_type_ids inputs (a community export): requests run one at a time with the graph's own prefix attention");
    }
    let providers: BTreeMap<String, Vec<String>> = pipeline.providers().iter().cloned().collect();

    // The lines that parsed run as one batch; the others keep their place with their error.
    let (mut valid, mut line_errors, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    for entry in entries {
        lines.push(entry.line);
        match entry.request {
            Ok(request) => {
                valid.push(request);
                line_errors.push(None);
            }
            Err(e) => line_errors.push(Some(e)),
        }
    }
    let stream = !args.json && line_errors.len() == 1;
    let stdout = std::io::stdout();
    let mut ran = pipeline
        .run(&valid, |_, delta| {
            if stream && !delta.is_empty() {
                let mut out = stdout.lock();
                let _ = out.write_all(delta.as_bytes());
                let _ = out.flush();
            }
        })
        .into_iter();
    let results: Vec<Result<Response, String>> = line_errors
        .into_iter()
        .map(|error| match error {
            Some(e) => Err(e),
            None => ran
                .next()
                .map_or_else(|| Err("the request was not run".into()), |r| r.map_err(|e| e.to_string())),
        })
        .collect();

    let mut failed = false;
    for ((index, result), line) in results.iter().enumerate().zip(lines) {
        match result {
            Ok(response) => {
                if args.json {
                    print_line(&serde_json::to_string(&JsonResult {
                        response,
                        providers: &providers,
                    })?)?;
                } else if stream {
                    print_line("")?;
                } else {
                    print_line(&format!("[{index}] {}", response.text))?;
                }
                write_outputs(&args, index, response)?;
            }
            Err(e) => {
                failed = true;
                // Errors of a line already name it; a request that failed later gets its line too.
                let e = match line {
                    Some(n) if !e.contains(&format!(" line {n}: ")) => format!("line {n}: {e}"),
                    _ => e.clone(),
                };
                if args.json {
                    print_line(&serde_json::json!({ "index": index, "line": line, "error": e }).to_string())?;
                }
                eprintln!("error: request {index}: {e}");
            }
        }
    }
    Ok(if failed { 2 } else { 0 })
}

/// `--annotate`'s value: a path ending in `.png`, checked before the model loads.
fn png_path(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    match path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()) {
        Some(name) if name.len() > 4 && name.ends_with(".png") => Ok(path),
        _ => Err(format!(
            "{value} is not a file name ending in .png; the annotated image is written as PNG, name it e.g. out.png"
        )),
    }
}

fn write_outputs(args: &Args, index: usize, response: &Response) -> Result<()> {
    if let Some(path) = &args.annotate {
        let picture = annotate(&response.image, &response.detections, &response.segments)?;
        // Encoded in memory, written beside the target and renamed over it: a failed run leaves
        // neither an empty or truncated file nor a damaged earlier one.
        let mut png = Vec::new();
        picture
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .context("cannot encode the annotated image as PNG")?;
        let partial = path.with_file_name(format!(".{}.partial", path.file_name().unwrap_or_default().to_string_lossy()));
        let written = std::fs::write(&partial, png).and_then(|()| std::fs::rename(&partial, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
    }
    if let Some(dir) = &args.masks_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (k, segment) in response.segments.iter().enumerate() {
            segment.mask.save_png(&dir.join(format!("{index}_{k}.png")))?;
        }
    }
    Ok(())
}
