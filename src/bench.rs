//! `paligemma bench`: where this runtime's time goes on one model and dtype, as one JSON object.
//! `python -m bench` runs it beside transformers and prints the ratios; see README "Performance".
//!
//! Every run forces its length with `min_new_tokens`, so random-weight models that pick `<eos>`
//! early still decode the tokens asked for. One short warm-up run comes first: the figures are the
//! steady state a server sees, not ONNX Runtime's first-run allocations.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::engine::{mean_ms, ms};
use crate::pipeline::{ImageInput, Pipeline, PipelineOptions, Request, Response};

pub struct BenchOptions {
    pub pipeline: PipelineOptions,
    /// The first image serves the single and long runs; the batch run cycles through all.
    pub images: Vec<PathBuf>,
    pub prompt: String,
    /// Tokens of the single and batch runs.
    pub tokens: usize,
    /// Tokens of the long run, which compares early and late decode steps.
    pub long_tokens: usize,
    pub batch: usize,
}

/// Steps averaged at each end of the long run.
const WINDOW: usize = 8;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub dtype: String,
    /// The decoder graph that ran: `gqa` or `portable`.
    pub decoder: &'static str,
    /// The memory the KV cache is bound to between steps (`Cpu`, `Cuda`), null without IoBinding
    /// (`--io-binding` sets it for the portable decoder; the gqa one is always bound, `Cpu`).
    pub io_binding: Option<String>,
    /// (graph, execution providers ONNX Runtime assigned its nodes to)
    pub providers: Vec<(String, Vec<String>)>,
    /// (graph, file, dtype) of every graph that ran.
    pub graphs: Vec<(String, String, String)>,
    /// What loading warned about (a provider fallback, a format this CPU computes another way):
    /// the figures are of that path.
    pub warnings: Vec<String>,
    /// Pipeline::load: ONNX Runtime, tokenizer, the sessions (graph optimisation included).
    pub load_s: f64,
    pub vision_ms: f64,
    /// Embedding, splice and the prefill decoder run.
    pub prefill_ms: f64,
    /// From the request (image file) to the first token: loading, preprocessing, vision, prefill.
    pub first_token_ms: f64,
    /// Mean decode step of the single run (tokens 2..=tokens).
    pub decode_ms_per_token: f64,
    pub long_tokens: usize,
    /// Mean step time of tokens 9..=16 and of the last 8 tokens of the long run.
    pub long_early_ms: f64,
    pub long_late_ms: f64,
    /// Every decode step of the single and the long run, ms (step k gives token k + 2), for robust
    /// windows on a shared host and for plots.
    pub single_steps_ms: Vec<f64>,
    pub long_steps_ms: Vec<f64>,
    pub batch: usize,
    /// Decode tokens per second (prefill excluded), batch 1 and batch `batch`.
    pub single_decode_tokens_per_s: f64,
    pub batch_decode_tokens_per_s: f64,
    pub token_ids: TokenIds,
}

#[derive(Debug, Serialize)]
pub struct TokenIds {
    pub single: Vec<i64>,
    pub long: Vec<i64>,
    pub batch: Vec<Vec<i64>>,
}

fn request(image: &Path, prompt: &str, tokens: usize) -> Request {
    Request {
        max_new_tokens: tokens,
        min_new_tokens: tokens,
        ..Request::new(ImageInput::Path(image.to_path_buf()), prompt)
    }
}

/// Runs `requests` and returns their responses, failing on the first failed request.
fn run_all(pipeline: &mut Pipeline, requests: &[Request], first_token: &mut Option<Duration>) -> Result<Vec<Response>> {
    let started = Instant::now();
    let results = pipeline.run(requests, |_, _| {
        first_token.get_or_insert_with(|| started.elapsed());
    });
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("bench request {i} failed")))
        .collect()
}

pub fn run(options: BenchOptions) -> Result<BenchReport> {
    let Some(first) = options.images.first() else {
        bail!("bench needs at least one image");
    };
    if options.tokens < 2 || options.long_tokens < 2 * WINDOW + 8 || options.batch == 0 {
        bail!("bench needs --tokens >= 2, --long-tokens >= {} and --batch >= 1", 2 * WINDOW + 8);
    }
    let dtype = options.pipeline.dtype.to_string();
    let started = Instant::now();
    let mut pipeline = Pipeline::load(options.pipeline)?;
    let load_s = started.elapsed().as_secs_f64();

    run_all(&mut pipeline, &[request(first, &options.prompt, 2)], &mut None)?;

    let mut first_token = None;
    let single = run_all(&mut pipeline, &[request(first, &options.prompt, options.tokens)], &mut first_token)?.remove(0);
    let long = run_all(&mut pipeline, &[request(first, &options.prompt, options.long_tokens)], &mut None)?.remove(0);
    let batch_requests: Vec<Request> = options
        .images
        .iter()
        .cycle()
        .take(options.batch)
        .map(|image| request(image, &options.prompt, options.tokens))
        .collect();
    let batch = run_all(&mut pipeline, &batch_requests, &mut None)?;

    let t = &single.timings;
    // Token k (k >= 2) comes from step k - 2; token 1 from the prefill.
    let late = &long.timings.steps;
    Ok(BenchReport {
        dtype,
        decoder: pipeline.decoder().as_str(),
        io_binding: pipeline.cache_binding(),
        providers: pipeline.providers().to_vec(),
        graphs: pipeline
            .graph_files()
            .iter()
            .map(|(graph, file, dtype)| (graph.clone(), file.clone(), dtype.to_string()))
            .collect(),
        warnings: pipeline.warnings().to_vec(),
        load_s,
        vision_ms: ms(t.vision),
        prefill_ms: ms(t.prefill),
        first_token_ms: ms(first_token.unwrap_or_default()),
        decode_ms_per_token: mean_ms(&t.steps),
        long_tokens: options.long_tokens,
        long_early_ms: mean_ms(&late[16 - WINDOW - 1..16 - 1]),
        long_late_ms: mean_ms(&late[late.len() - WINDOW..]),
        single_steps_ms: t.steps.iter().map(|&d| ms(d)).collect(),
        long_steps_ms: late.iter().map(|&d| ms(d)).collect(),
        batch: options.batch,
        single_decode_tokens_per_s: t.decode_tokens_per_s(1).unwrap_or(f64::NAN),
        batch_decode_tokens_per_s: batch[0].timings.decode_tokens_per_s(options.batch).unwrap_or(f64::NAN),
        token_ids: TokenIds {
            single: single.token_ids,
            long: long.token_ids,
            batch: batch.into_iter().map(|r| r.token_ids).collect(),
        },
    })
}
