//! `paligemma serve`'s command line: its options, turned into [`ServeOptions`], and the command.

use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use crate::args::RuntimeArgs;
use crate::preprocess::ImageLimits;
use crate::serve::api::Limits;
use crate::serve::batcher::Batching;
use crate::serve::connections::ConnectionLimits;
use crate::serve::{run, ServeOptions};

/// Serve the model over HTTP: `POST /v1/generate`, `POST /v1/chat/completions` (OpenAI shape),
/// `GET /health`, `GET /metrics` (Prometheus) and a test page at `/`. Concurrent requests decode
/// together (continuous batching); SIGTERM stops accepting, finishes the queue and exits 0.
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
    /// Slots: most requests decoding together. A queued request takes a free slot before the
    /// next decode step; a finished one frees its slot at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_batch: u16,
    /// When queued requests join: `continuous` (into any free slot, at every step) or `static`
    /// (only when every slot is free; a batch then runs until its last row ends).
    #[arg(long, value_enum, default_value_t = Batching::Continuous)]
    pub batching: Batching,
    /// Most requests waiting while every slot is busy (those bound for a free slot do not count);
    /// more are answered 503 with Retry-After.
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

/// `paligemma serve`: serves until SIGTERM; the exit code.
pub fn command(args: ServeArgs) -> Result<i32> {
    let mut pipeline = args.runtime.pipeline_options()?;
    pipeline.image_limits = ImageLimits {
        max_pixels: args.max_image_pixels,
        ..ImageLimits::default()
    };
    run(ServeOptions {
        pipeline,
        host: args.host,
        port: args.port,
        max_batch: usize::from(args.max_batch),
        batching: args.batching,
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
