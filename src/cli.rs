//! The `paligemma` command line: arguments in, a [`Pipeline`] run, text or JSON out.
//!
//! Every failure is one line on stderr starting `error:` and exit code 2; in a batch, a request
//! that fails prints its own error and the others still run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::annotate::annotate;
use crate::onnxruntime::parse_ep_list;
use crate::pipeline::{ImageInput, Pipeline, PipelineOptions, Request, Response};
use crate::preprocess::ImageLimits;

/// Run PaliGemma 2 (ONNX) on images: captions, OCR, answers, detection boxes, segmentation masks.
#[derive(Debug, Parser)]
#[command(name = "paligemma", version)]
pub struct Args {
    /// Converted model directory (with manifest.json) or a Hugging Face repo id holding one.
    #[arg(long)]
    pub model: String,
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
    /// Execution providers in priority order: cpu, cuda, tensorrt (e.g. "tensorrt,cuda,cpu").
    #[arg(long, default_value = "cpu")]
    pub ep: String,
    /// Intra-op threads per graph (default: ONNX Runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which of the model's graphs to run.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// ONNX Runtime library to load (else $ORT_DYLIB_PATH, next to this binary, the repo's .venv).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Print one JSON object per request (text, token_ids, detections, segments, providers).
    #[arg(long)]
    pub json: bool,
    /// Write the image with boxes, labels and masks drawn to this PNG (single request).
    #[arg(long, conflicts_with = "batch")]
    pub annotate: Option<PathBuf>,
    /// Write each segmentation mask as a PNG (REQUEST_OBJECT.png) into this directory.
    #[arg(long)]
    pub masks_dir: Option<PathBuf>,
    /// Largest image accepted, in pixels (decompression-bomb guard).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    image: PathBuf,
    prompt: String,
    max_new_tokens: Option<usize>,
}

#[derive(Serialize)]
struct JsonResult<'a> {
    #[serde(flatten)]
    response: &'a Response,
    providers: &'a BTreeMap<String, Vec<String>>,
}

fn read_batch(path: &Path, default_max: usize) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the batch file {}", path.display()))?;
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line: BatchLine = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: expected {{\"image\": PATH, \"prompt\": TEXT}}", path.display(), n + 1)
        })?;
        requests.push(Request {
            image: ImageInput::Path(line.image),
            prompt: line.prompt,
            max_new_tokens: line.max_new_tokens.unwrap_or(default_max),
        });
    }
    if requests.is_empty() {
        bail!("{} holds no requests", path.display());
    }
    Ok(requests)
}

/// Runs the command; returns the process exit code (0, or 2 when any request failed).
pub fn run(args: Args) -> Result<i32> {
    let providers = parse_ep_list(&args.ep)?;
    let requests = match (&args.batch, &args.image, &args.prompt) {
        (Some(batch), _, _) => read_batch(batch, args.max_new_tokens)?,
        (None, Some(image), Some(prompt)) => vec![Request {
            image: ImageInput::Path(image.clone()),
            prompt: prompt.clone(),
            max_new_tokens: args.max_new_tokens,
        }],
        _ => bail!("give --image and --prompt, or --batch FILE"),
    };
    let mut options = PipelineOptions::new(args.model.clone());
    options.dtype = args.dtype.clone();
    options.providers = providers;
    options.threads = args.threads;
    options.ort_lib = args.ort_lib.clone();
    options.image_limits = ImageLimits {
        max_pixels: args.max_image_pixels,
    };
    let mut pipeline = Pipeline::load(options)?;
    for warning in pipeline.warnings() {
        eprintln!("warning: {warning}");
    }
    if !pipeline.supports_batching() {
        eprintln!("note: this decoder has no attention_mask/token_type_ids inputs (a community export): requests run one at a time with the graph's own prefix attention");
    }
    let providers: BTreeMap<String, Vec<String>> = pipeline.providers().iter().cloned().collect();

    let stream = !args.json && requests.len() == 1;
    let mut printed = String::new();
    let stdout = std::io::stdout();
    let results = pipeline.run(&requests, |_, text| {
        if stream && text.starts_with(&printed) {
            let mut out = stdout.lock();
            let _ = out.write_all(&text.as_bytes()[printed.len()..]);
            let _ = out.flush();
            printed = text.to_string();
        }
    });

    let mut failed = false;
    for (index, result) in results.iter().enumerate() {
        match result {
            Ok(response) => {
                if args.json {
                    println!("{}", serde_json::to_string(&JsonResult { response, providers: &providers })?);
                } else if stream {
                    println!("{}", &response.text[printed.len().min(response.text.len())..]);
                } else {
                    println!("[{index}] {}", response.text);
                }
                write_outputs(&args, index, response)?;
            }
            Err(e) => {
                failed = true;
                if args.json {
                    println!("{}", serde_json::json!({ "index": index, "error": e.to_string() }));
                }
                eprintln!("error: request {index}: {e}");
            }
        }
    }
    Ok(if failed { 2 } else { 0 })
}

fn write_outputs(args: &Args, index: usize, response: &Response) -> Result<()> {
    if let Some(path) = &args.annotate {
        let picture = annotate(&response.image, &response.detections, &response.segments)?;
        picture.save(path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(dir) = &args.masks_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (k, segment) in response.segments.iter().enumerate() {
            segment.mask.save_png(&dir.join(format!("{index}_{k}.png")))?;
        }
    }
    Ok(())
}
