//! The public entry point: a [`Pipeline`] built once from a model directory or Hub repo, then
//! [`Request`]s in and typed [`Response`]s out (text, token ids, boxes, masks).
//!
//! Two ways to run: [`Pipeline::run`] answers a list of requests; [`Pipeline::join`],
//! [`Pipeline::step`] and [`Pipeline::cancel`] let requests join and leave a running batch at
//! any step (what `paligemma serve` does). Either way, per request:
//! 1. load the image and compute pixel values (`preprocess`), encode the prompt (`prompt`); a
//!    request that fails here fails alone;
//! 2. its vision encoder and prefill run alone, then it decodes with the other running requests
//!    (`engine`), one at a time when the decoder cannot batch (a community export without
//!    attention_mask/token_type_ids);
//! 3. its text is decoded as it goes (`TextStream`); at its end, `detect ...` prompts give boxes,
//!    `segment ...` prompts boxes and masks through seg_decoder.onnx (`detect`, `segment`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use crate::config::{ConfigError, DecoderFlavour, Dtype, DtypeChoice, Manifest};
use crate::detect::{parse_detections, parse_segmentation, Detection};
use crate::engine::{Emitted, Engine, Generated, Prepared, SlotId, Timings};
use crate::hub::{resolve_model, HubError, HubOptions};
use crate::onnxruntime::{init, ExecutionProvider, IoBindingMode, OrtInfo, OrtLibError};
use crate::preprocess::{decode_image, load_image, pixel_values, ImageLimits, ImageProcessorConfig, LoadedImage, PreprocessError};
use crate::prompt::{PromptEncoder, PromptError, TextStream, DEFAULT_MAX_PROMPT_TOKENS, IMAGE_TOKEN};
use crate::segment::{decoder_input, segments, Segment, SegmentError};
use crate::session::{ModelError, ModelSessions};
use crate::transformers_js::{self, LayoutError};

/// Prompt positions squared above which a prefill held enough memory (attention scores grow with
/// the square) to hand the decoder's arena back once nothing runs: a 4,096-position prompt;
/// default prompts (`--max-prompt-tokens` 512) stay far below.
const LONG_PREFILL: usize = 4096 * 4096;

/// Errors that stop the pipeline from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime's library cannot be found, loaded or started.
    #[error(transparent)]
    OrtLib(#[from] OrtLibError),
    /// The model argument gives no complete model directory, or the Hub settings in the
    /// environment cannot be read.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// manifest.json cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A transformers.js layout directory's config files cannot be used.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A graph's session cannot be built, or the graphs do not match the manifest.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// tokenizer.json cannot be loaded.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// preprocessor_config.json cannot be read or asks for what is not implemented.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// preprocessor_config.json does not resize to the manifest's `image_size` square.
    #[error(
        "{path}: the image processor resizes to {width}x{height}, the model takes {expected}x{expected} images; the files come from different conversions or exports (take them from one)"
    )]
    ImageSize {
        /// The preprocessor config's path.
        path: PathBuf,
        /// The manifest's `image_size`, in pixels (the side of a square).
        expected: usize,
        /// The config's `size.width`, in pixels.
        width: u32,
        /// The config's `size.height`, in pixels.
        height: u32,
    },
}

/// Errors of one request; the other running requests are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The image cannot be read or decoded, or is over the [`ImageLimits`].
    #[error(transparent)]
    Image(#[from] PreprocessError),
    /// The prompt is refused (empty, over a limit, two `<image>`s), or max_new_tokens is 0.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// A graph failed on this request, run alone after a step it shared failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The seg decoder's masks cannot be made into [`Segment`]s.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The caller's `on_token` returned `false` for it ([`Pipeline::run_until`]).
    #[error("the request was stopped by its caller before it finished")]
    Stopped,
    /// [`Pipeline::join`] while [`Pipeline::capacity`] requests run.
    #[error("this model runs one request at a time (its decoder has no attention_mask/token_type_ids inputs) and one is running; join when it has ended")]
    Busy,
}

/// How to load a [`Pipeline`]; [`PipelineOptions::new`] fills in the defaults.
pub struct PipelineOptions {
    /// A converted model directory (with manifest.json) or a Hub repo id.
    pub model: String,
    /// Which graphs of the manifest to run: one dtype or one per graph (fp32 by default).
    pub dtype: DtypeChoice,
    /// Which decoder graph runs ([`DecoderFlavour::Auto`] by default: the in-place
    /// GroupQueryAttention one where the model has it and the providers are CPU only).
    pub decoder: DecoderFlavour,
    /// Whether the portable decoder's KV cache stays in the memory of the provider that computed
    /// it ([`IoBindingMode::Auto`] by default: on GPU memory where the decoder runs on CUDA).
    pub io_binding: IoBindingMode,
    /// Execution providers in priority order; empty means ONNX Runtime's default (CPU).
    pub providers: Vec<ExecutionProvider>,
    /// ONNX Runtime intra-op threads per graph (`--threads`; `None`: ONNX Runtime's choice).
    pub threads: Option<usize>,
    /// An explicit ONNX Runtime library (`--ort-lib`); otherwise see `onnxruntime::locate`.
    pub ort_lib: Option<PathBuf>,
    /// Pixel and file-size limits of request images, checked before their pixels are decoded.
    pub image_limits: ImageLimits,
    /// Most text tokens a prompt may hold (`<bos>`, the task and `\n`; not the image tokens).
    pub max_prompt_tokens: usize,
    /// Return each request's decoded image in its [`Response`] (to draw on it).
    pub keep_images: bool,
}

impl PipelineOptions {
    /// Options for `model`: fp32 graphs, ONNX Runtime's default provider (CPU) and threads, the
    /// library search of `onnxruntime::locate`, [`ImageLimits::default`], 512 prompt tokens
    /// ([`DEFAULT_MAX_PROMPT_TOKENS`]), images not kept.
    pub fn new(model: impl Into<String>) -> PipelineOptions {
        PipelineOptions {
            model: model.into(),
            dtype: DtypeChoice::default(),
            decoder: DecoderFlavour::Auto,
            io_binding: IoBindingMode::Auto,
            providers: Vec::new(),
            threads: None,
            ort_lib: None,
            image_limits: ImageLimits::default(),
            max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS,
            keep_images: false,
        }
    }
}

/// Where a request's image comes from.
pub enum ImageInput {
    /// An image file: a regular file of at most [`ImageLimits::max_bytes`].
    Path(PathBuf),
    /// The bytes of an image file (an upload); named "from the request" in errors.
    Bytes(Vec<u8>),
}

/// One image and prompt to answer.
pub struct Request {
    /// The image, in any supported format (found from its bytes).
    pub image: ImageInput,
    /// The PaliGemma prompt (`caption en`, `detect cat`, `segment car`), laid out as
    /// PaliGemmaProcessor does; `detect` and `segment` as first word give boxes and masks.
    pub prompt: String,
    /// Most new tokens, `<eos>` included (transformers' `max_new_tokens`); at least 1.
    pub max_new_tokens: usize,
    /// `<eos>` is not chosen before this many tokens (transformers' `min_new_tokens`).
    pub min_new_tokens: usize,
}

impl Request {
    /// A request for at most 64 new tokens, stopping at `<eos>`.
    pub fn new(image: ImageInput, prompt: impl Into<String>) -> Request {
        Request {
            image,
            prompt: prompt.into(),
            max_new_tokens: 64,
            min_new_tokens: 0,
        }
    }
}

/// What one request produced (`api::Answer` is its wire form).
#[derive(Debug, Clone)]
pub struct Response {
    /// The answer, as transformers' `decode(ids, skip_special_tokens=True)` gives it.
    pub text: String,
    /// Generated ids, up to and without `<eos>`.
    pub token_ids: Vec<i64>,
    /// Boxes of a `detect` prompt, in original-image pixels; empty for other prompts.
    pub detections: Vec<Detection>,
    /// Boxes and masks of a `segment` prompt, in original-image pixels; empty for other prompts.
    pub segments: Vec<Segment>,
    /// Objects of a detect/segment answer that were malformed and dropped.
    pub malformed_objects: usize,
    /// `true` when `<eos>` ended the answer, `false` when max_new_tokens did.
    pub finished: bool,
    /// Original image size `[width, height]`: the pixel space of boxes and masks.
    pub image_size: [u32; 2],
    /// Prompt length in tokens, image tokens included (what an OpenAI `usage` counts).
    pub prompt_tokens: usize,
    /// Where this request's time went: its vision and prefill, the decode steps it took part in.
    pub timings: Timings,
    /// The decoded image (upright, RGB), for drawing on it; only with
    /// [`PipelineOptions::keep_images`].
    pub image: Option<RgbImage>,
}

/// A request running in a [`Pipeline`], from [`Pipeline::join`] to its last [`Update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub(crate) u64);

/// What a running request produced in one [`Pipeline::join`] or [`Pipeline::step`].
#[derive(Debug)]
pub struct Update {
    /// The request.
    pub id: RequestId,
    /// The text its new token made final (often empty; see [`TextStream`]); a request's deltas
    /// concatenated are its answer's `text`.
    pub delta: String,
    /// Its answer or error, in the update of its last token.
    pub done: Option<Result<Response, RequestError>>,
}

impl Update {
    fn failed(id: RequestId, error: RequestError) -> Update {
        Update {
            id,
            delta: String::new(),
            done: Some(Err(error)),
        }
    }
}

/// A request between its join and its end.
struct Live {
    id: RequestId,
    slot: SlotId,
    task: Task,
    image: LoadedImage,
    /// Kept to run it again alone if a batch run fails.
    prepared: Prepared,
    stream: TextStream,
    generated: Generated,
}

/// The task a prompt asks for, by its PaliGemma prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Detect,
    Segment,
    Text,
}

impl Task {
    /// By the first word, the image placeholder aside (`<image>detect cat` detects, as `detect cat`).
    fn of(prompt: &str) -> Task {
        let text = prompt.replace(IMAGE_TOKEN, " ");
        let first = text.split_whitespace().next().unwrap_or("");
        match first {
            "detect" => Task::Detect,
            "segment" => Task::Segment,
            _ => Task::Text,
        }
    }
}

/// A loaded model: its ONNX Runtime sessions, tokenizer and image processor. Load it once with
/// [`Pipeline::load`], then [`run`](Pipeline::run) requests, or [`join`](Pipeline::join) them to
/// a running batch.
pub struct Pipeline {
    /// The model directory: the one given (made absolute), or the Hub cache snapshot of a repo id.
    pub model_dir: PathBuf,
    /// The ONNX Runtime library in use: its path, version and the rule that found it.
    pub ort: OrtInfo,
    sessions: ModelSessions,
    prompts: Arc<PromptEncoder>,
    image_config: ImageProcessorConfig,
    limits: ImageLimits,
    keep_images: bool,
    engine: Engine,
    /// Running requests, in joining order.
    live: Vec<Live>,
    next_id: u64,
    /// A prompt since the last arena release was long (see LONG_PREFILL).
    long_prefill: bool,
}

impl Pipeline {
    /// Loads, in order: ONNX Runtime; the model directory (downloading a Hub repo if needed); the
    /// manifest, tokenizer and image processor; the sessions, checked against the manifest.
    pub fn load(options: PipelineOptions) -> Result<Pipeline, LoadError> {
        let ort = init(options.ort_lib.as_deref())?;
        let model_dir = resolve_model(&options.model, &HubOptions::from_env()?, options.dtype)?;
        let manifest = if transformers_js::is_layout(&model_dir) {
            transformers_js::manifest(&model_dir)?
        } else {
            Manifest::load(&model_dir)?
        };
        let (image_config, config_path, _) = ImageProcessorConfig::from_model_dir(&model_dir)?;
        if image_config.height as usize != manifest.image_size || image_config.width != image_config.height {
            return Err(LoadError::ImageSize {
                path: config_path,
                expected: manifest.image_size,
                width: image_config.width,
                height: image_config.height,
            });
        }
        let prompts = Arc::new(PromptEncoder::load(&model_dir, &manifest, options.max_prompt_tokens)?);
        let sessions = ModelSessions::open(
            &model_dir,
            manifest,
            options.dtype,
            &options.providers,
            options.threads,
            options.decoder,
            options.io_binding,
        )?;
        Ok(Pipeline {
            model_dir,
            ort,
            sessions,
            prompts,
            image_config,
            limits: options.image_limits,
            keep_images: options.keep_images,
            engine: Engine::default(),
            live: Vec::new(),
            next_id: 0,
            long_prefill: false,
        })
    }

    /// The prompt encoder, for checking a request's prompt before it is queued (the server does).
    pub fn prompt_encoder(&self) -> Arc<PromptEncoder> {
        Arc::clone(&self.prompts)
    }

    /// The model's manifest.json.
    pub fn manifest(&self) -> &Manifest {
        self.sessions.manifest()
    }

    /// (graph, execution providers ONNX Runtime assigned its nodes to).
    pub fn providers(&self) -> &[(String, Vec<String>)] {
        &self.sessions.providers
    }

    /// (graph, file relative to the model directory, dtype) of every graph opened: what `--dtype`
    /// picked.
    pub fn graph_files(&self) -> &[(String, String, Dtype)] {
        &self.sessions.files
    }

    /// Providers that could not start while a later one in the list took over.
    pub fn warnings(&self) -> &[String] {
        &self.sessions.warnings
    }

    /// The decoder graph in use: [`DecoderFlavour::Gqa`] or [`DecoderFlavour::Portable`] (what
    /// [`PipelineOptions::decoder`]'s `Auto` chose).
    pub fn decoder(&self) -> DecoderFlavour {
        if self.sessions.in_place() {
            DecoderFlavour::Gqa
        } else {
            DecoderFlavour::Portable
        }
    }

    /// The memory the decoder's KV cache is bound to between steps (`Cpu`, `Cuda`), `None` where
    /// ONNX Runtime returns it to the host after every run (see [`PipelineOptions::io_binding`]).
    pub fn cache_binding(&self) -> Option<String> {
        self.sessions.cache_binding()
    }

    /// `false` for decoders without attention_mask/token_type_ids: requests then run one by one
    /// with the graph's own (full prefix) attention.
    pub fn supports_batching(&self) -> bool {
        self.sessions.supports_batching()
    }

    /// What a decoder without attention_mask/token_type_ids (a community export) means for the
    /// answers, for the CLI and the server to say once; `None` for ours. Such a graph attends to
    /// every cached position: exact for one unpadded request, except that transformers' sliding
    /// layers drop keys more than `sliding_window` positions behind a generated token, so a request
    /// that passes the window (every 896 px one) may differ.
    pub fn one_at_a_time_note(&self) -> Option<String> {
        if self.supports_batching() {
            return None;
        }
        let m = self.manifest();
        let mut note = format!(
            "this decoder has no {} input (a community export): requests run one at a time, each with the graph's own full prefix attention",
            self.sessions.missing_batch_inputs().join(" and no ")
        );
        if let Some(window) = m.sliding_window.filter(|_| m.layer_types.iter().any(|t| t == "sliding_attention")) {
            note.push_str(&format!(
                "; its sliding layers see every position where transformers' see the last {window}, so a request longer than \
                 {window} positions ({} of them image tokens) may get other tokens than transformers gives",
                m.num_image_tokens
            ));
        }
        Some(note)
    }

    fn prepare(&self, request: &Request) -> Result<(LoadedImage, Prepared), RequestError> {
        let image = match &request.image {
            ImageInput::Path(path) => load_image(path, &self.limits)?,
            ImageInput::Bytes(bytes) => decode_image(bytes, &self.limits)?,
        };
        let input_ids = self.prompts.encode(&request.prompt, request.max_new_tokens)?;
        let prepared = Prepared {
            pixel_values: pixel_values(&image, &self.image_config),
            input_ids,
            min_new_tokens: request.min_new_tokens.min(request.max_new_tokens),
            max_new_tokens: request.max_new_tokens,
        };
        Ok((image, prepared))
    }

    /// Runs `requests`; results come back in input order. `on_token(index, delta)` is called
    /// after every generated token of request `index` (for streaming) with the text that token
    /// made final, often empty (see [`TextStream`]); a request's deltas concatenated are its
    /// answer's `text`.
    pub fn run(&mut self, requests: &[Request], mut on_token: impl FnMut(usize, &str)) -> Vec<Result<Response, RequestError>> {
        self.run_until(requests, |index, delta| {
            on_token(index, delta);
            true
        })
    }

    /// [`run`](Self::run) where `on_token` returning `false` stops request `index` (a client that
    /// went away): its row generates no more and its result is [`RequestError::Stopped`]; the
    /// other requests get the same tokens as without it.
    ///
    /// A thin loop over [`join`](Self::join) and [`step`](Self::step): every request joins at
    /// once (one at a time for a decoder that cannot batch), then steps run until all ended.
    /// Isolation: a request whose image, prompt or limits are wrong fails before anything runs;
    /// see [`step`](Self::step) for a run that fails.
    pub fn run_until(
        &mut self,
        requests: &[Request],
        mut on_token: impl FnMut(usize, &str) -> bool,
    ) -> Vec<Result<Response, RequestError>> {
        let mut results: Vec<Option<Result<Response, RequestError>>> = (0..requests.len()).map(|_| None).collect();
        let mut index_of: HashMap<RequestId, usize> = HashMap::new();
        let mut deliver = |pipeline: &mut Pipeline, results: &mut [Option<_>], index: usize, update: Update| {
            if !on_token(index, &update.delta) {
                pipeline.cancel(update.id);
                results[index] = Some(Err(RequestError::Stopped));
            } else if let Some(done) = update.done {
                results[index] = Some(done);
            }
        };
        let capacity = self.capacity().unwrap_or(usize::MAX);
        let mut pending = 0..requests.len();
        loop {
            while self.live() < capacity {
                let Some(index) = pending.next() else { break };
                match self.join(&requests[index]) {
                    Ok(update) => {
                        index_of.insert(update.id, index);
                        deliver(self, &mut results, index, update);
                    }
                    Err(e) => results[index] = Some(Err(e)),
                }
            }
            if self.live() == 0 && pending.is_empty() {
                break;
            }
            for update in self.step() {
                if let Some(&index) = index_of.get(&update.id) {
                    deliver(self, &mut results, index, update);
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RequestError::Model(ModelError::Run {
                        graph: "pipeline",
                        message: "request was not run".into(),
                    }))
                })
            })
            .collect()
    }

    /// How many requests may run at once: `Some(1)` for a decoder without attention_mask /
    /// token_type_ids (a community export), `None` (no limit of the model's own) otherwise. A
    /// server bounds the rest with its `--max-batch`.
    pub fn capacity(&self) -> Option<usize> {
        (!self.supports_batching()).then_some(1)
    }

    /// Requests running now (joined and not yet ended).
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Prepares `request` (image, prompt, limits), runs its vision encoder and prefill alone and
    /// returns its first [`Update`]; unless that ended it, it decodes with every other running
    /// request at each [`step`](Self::step) from now on and gets exactly the tokens it gets
    /// alone. Errors are this request's only; the running ones are unaffected.
    pub fn join(&mut self, request: &Request) -> Result<Update, RequestError> {
        if self.capacity().is_some_and(|c| self.live() >= c) {
            return Err(RequestError::Busy);
        }
        let (image, prepared) = self.prepare(request)?;
        let admitted = self.engine.admit(&mut self.sessions, &prepared)?;
        self.next_id += 1;
        let len = prepared.input_ids.len();
        self.long_prefill |= len * len > LONG_PREFILL;
        let mut live = Live {
            id: RequestId(self.next_id),
            slot: admitted.first.slot,
            task: Task::of(&request.prompt),
            image,
            prepared,
            stream: TextStream::default(),
            generated: Generated::default(),
        };
        (live.generated.timings.vision, live.generated.timings.prefill) = (admitted.vision, admitted.prefill);
        Ok(self.receive(live, admitted.first))
    }

    /// One token for every running request, in one decoder run; the [`Update`]s of those that
    /// produced one, in joining order. A request that ends leaves at once.
    ///
    /// If the run fails, every running request is run again alone, so that only a request that
    /// fails alone gets the error; their updates then carry only the text that goes past what
    /// they had already given.
    pub fn step(&mut self) -> Vec<Update> {
        if self.live.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let updates = match self.engine.step(&mut self.sessions) {
            Ok(emitted) => {
                let took = started.elapsed();
                for live in &mut self.live {
                    live.generated.timings.steps.push(took);
                }
                emitted
                    .into_iter()
                    .filter_map(|e| {
                        let k = self.live.iter().position(|l| l.slot == e.slot)?;
                        let live = self.live.remove(k);
                        let update = self.receive(live, e);
                        Some(update)
                    })
                    .collect()
            }
            Err(_) => {
                self.engine.clear();
                std::mem::take(&mut self.live)
                    .into_iter()
                    .map(|live| self.run_alone(live))
                    .collect()
            }
        };
        self.release_memory();
        updates
    }

    /// Stops request `id`: it generates no more and gets no further update; the others go on
    /// unchanged. Unknown or ended ids are ignored.
    pub fn cancel(&mut self, id: RequestId) {
        if let Some(k) = self.live.iter().position(|l| l.id == id) {
            let live = self.live.remove(k);
            self.engine.release(live.slot);
        }
    }

    /// Forgets every running request: they get no further update (a server whose worker
    /// panicked mid-step starts them again).
    pub fn cancel_all(&mut self) {
        self.engine.clear();
        self.live.clear();
    }

    /// After a failed run: `live`'s request alone from its prefill to its end. Its update carries
    /// the text past what it had already given.
    fn run_alone(&mut self, mut live: Live) -> Update {
        live.stream.restart();
        live.generated = Generated::default();
        let alone = self.engine.admit(&mut self.sessions, &live.prepared).map_err(RequestError::from);
        let mut update = match alone {
            Ok(admitted) => {
                live.slot = admitted.first.slot;
                (live.generated.timings.vision, live.generated.timings.prefill) = (admitted.vision, admitted.prefill);
                self.receive(live, admitted.first)
            }
            Err(e) => return Update::failed(live.id, e),
        };
        let mut delta = std::mem::take(&mut update.delta);
        while update.done.is_none() {
            let started = Instant::now();
            let emitted = self.engine.step(&mut self.sessions);
            let took = started.elapsed();
            // The engine ran this request only, so it is the one emitted and the one live.
            let outcome = match (emitted, self.live.pop()) {
                (Ok(emitted), Some(live)) => emitted.into_iter().next().map(|e| (e, live)).ok_or_else(|| ModelError::Run {
                    graph: "decoder",
                    message: "the engine emitted no token for its one row".into(),
                }),
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(ModelError::Run {
                    graph: "decoder",
                    message: "the request left the engine unfinished".into(),
                }),
            };
            let (e, mut live) = match outcome {
                Ok(pair) => pair,
                Err(error) => {
                    self.engine.clear();
                    self.live.clear();
                    return Update::failed(update.id, error.into());
                }
            };
            live.generated.timings.steps.push(took);
            update = self.receive(live, e);
            delta.push_str(&update.delta);
        }
        update.delta = delta;
        update
    }

    /// Records `emitted` for `live`: the text it made final, and when it ended, the answer;
    /// otherwise `live` goes (back) among the running requests.
    fn receive(&mut self, mut live: Live, emitted: Emitted) -> Update {
        let mut delta = String::new();
        match emitted.token {
            None => live.generated.stopped_by_eos = true,
            Some(token) => {
                live.generated.token_ids.push(token);
                delta = live.stream.push(&self.prompts, token);
            }
        }
        let id = live.id;
        if !emitted.done {
            self.live.push(live);
            return Update { id, delta, done: None };
        }
        delta.push_str(&live.stream.finish(&self.prompts));
        let prompt_tokens = live.prepared.input_ids.len();
        let done = self.finish(live.task, &live.image, live.generated, prompt_tokens);
        Update {
            id,
            delta,
            done: Some(done),
        }
    }

    /// Hands the decoder's arena back once nothing runs after a long prompt (see LONG_PREFILL).
    fn release_memory(&mut self) {
        if self.live.is_empty() && std::mem::take(&mut self.long_prefill) {
            // Only memory is at stake: a failure here leaves the arena as it was.
            let _ = self.sessions.release_arena();
        }
    }

    /// Text, boxes and masks of one generated row.
    fn finish(&mut self, task: Task, image: &LoadedImage, g: Generated, prompt_tokens: usize) -> Result<Response, RequestError> {
        let text = self.prompts.decode(&g.token_ids);
        let (width, height) = image.rgb.dimensions();
        let mut response = Response {
            text,
            token_ids: g.token_ids,
            detections: Vec::new(),
            segments: Vec::new(),
            malformed_objects: 0,
            finished: g.stopped_by_eos,
            image_size: [width, height],
            prompt_tokens,
            timings: g.timings,
            image: self.keep_images.then(|| image.rgb.clone()),
        };
        let tagged = || self.prompts.decode_with_special_tokens(&response.token_ids);
        match task {
            Task::Detect => {
                let parsed = parse_detections(&tagged(), width, height);
                response.detections = parsed.objects;
                response.malformed_objects = parsed.malformed;
            }
            Task::Segment => {
                let parsed = parse_segmentation(&tagged());
                response.malformed_objects = parsed.malformed;
                if !parsed.objects.is_empty() {
                    let masks = self.sessions.decode_masks(decoder_input(&parsed.objects))?;
                    let decoded = segments(&parsed.objects, masks.view(), width, height)?;
                    response.segments = decoded.objects;
                    response.malformed_objects += decoded.malformed;
                }
            }
            Task::Text => {}
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_is_the_first_word_with_the_image_placeholder_aside() {
        assert_eq!(Task::of("detect cat ; dog"), Task::Detect);
        assert_eq!(Task::of("<image>detect cat"), Task::Detect);
        assert_eq!(Task::of("<image> segment car"), Task::Segment);
        assert_eq!(Task::of("caption <image> en"), Task::Text);
        assert_eq!(Task::of("detect<image>cat"), Task::Detect);
        assert_eq!(Task::of("detecting cats"), Task::Text);
    }
}
