//! The public entry point: a [`Pipeline`] built once from a model directory or Hub repo, then
//! [`Request`]s in and typed [`Response`]s out (text, token ids, boxes, masks).
//!
//! Steps of [`Pipeline::run`]:
//! 1. per request: load the image and compute pixel values (`preprocess`), encode the prompt
//!    (`prompt`); a request that fails here fails alone;
//! 2. the valid requests run as one left-padded batch (`generate`), or one by one when the decoder
//!    cannot batch (a community export without attention_mask/token_type_ids);
//! 3. per request: decode the text; `detect ...` prompts give boxes, `segment ...` prompts boxes
//!    and masks through seg_decoder.onnx (`detect`, `segment`).

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;

use crate::config::{ConfigError, Dtype, Manifest};
use crate::detect::{parse_detections, parse_segmentation, Detection};
use crate::generate::{generate, Generated, Generation, Prepared, Timings};
use crate::hub::{resolve_model, HubError, HubOptions};
use crate::onnxruntime::{init, ExecutionProvider, OrtInfo, OrtLibError};
use crate::preprocess::{decode_image, load_image, pixel_values, ImageLimits, ImageProcessorConfig, LoadedImage, PreprocessError};
use crate::prompt::{PromptEncoder, PromptError, TextStream, DEFAULT_MAX_PROMPT_TOKENS, IMAGE_TOKEN};
use crate::segment::{decoder_input, segments, Segment, SegmentError};
use crate::session::{ModelError, ModelSessions};

/// Batch rows x prompt positions squared above which a batch's prefill held enough memory
/// (attention scores grow with the square) to hand the decoder's arena back after it: a
/// 4,096-position prompt; default prompts (`--max-prompt-tokens` 512) stay far below.
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
        "{path}: the image processor resizes to {width}x{height}, the manifest says {expected}x{expected}; the files come from different conversions"
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

/// Errors of one request; the other requests of a batch are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The image cannot be read or decoded, or is over the [`ImageLimits`].
    #[error(transparent)]
    Image(#[from] PreprocessError),
    /// The prompt is refused (empty, over a limit, two `<image>`s), or max_new_tokens is 0.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// A graph failed on this request, run alone after its batch failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The seg decoder's masks cannot be made into [`Segment`]s.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The caller's `on_token` returned `false` for it ([`Pipeline::run_until`]).
    #[error("the request was stopped by its caller before it finished")]
    Stopped,
}

/// How to load a [`Pipeline`]; [`PipelineOptions::new`] fills in the defaults.
pub struct PipelineOptions {
    /// A converted model directory (with manifest.json) or a Hub repo id.
    pub model: String,
    /// Which graphs of the manifest to run ([`Dtype::Fp32`] by default).
    pub dtype: Dtype,
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
            dtype: Dtype::Fp32,
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
    /// Where the time went, for the batch this request ran in.
    pub timings: Timings,
    /// The decoded image (upright, RGB), for drawing on it; only with
    /// [`PipelineOptions::keep_images`].
    pub image: Option<RgbImage>,
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
/// [`Pipeline::load`], then [`run`](Pipeline::run) batches of requests.
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
}

impl Pipeline {
    /// Loads, in order: ONNX Runtime; the model directory (downloading a Hub repo if needed); the
    /// manifest, tokenizer and image processor; the sessions, checked against the manifest.
    pub fn load(options: PipelineOptions) -> Result<Pipeline, LoadError> {
        let ort = init(options.ort_lib.as_deref())?;
        let model_dir = resolve_model(&options.model, &HubOptions::from_env()?)?;
        let manifest = Manifest::load(&model_dir)?;
        let config_path = model_dir.join("preprocessor_config.json");
        let image_config = ImageProcessorConfig::from_file(&config_path)?;
        if image_config.height as usize != manifest.image_size || image_config.width != image_config.height {
            return Err(LoadError::ImageSize {
                path: config_path,
                expected: manifest.image_size,
                width: image_config.width,
                height: image_config.height,
            });
        }
        let prompts = Arc::new(PromptEncoder::load(&model_dir, &manifest, options.max_prompt_tokens)?);
        let sessions = ModelSessions::open(&model_dir, manifest, options.dtype.as_str(), &options.providers, options.threads)?;
        Ok(Pipeline {
            model_dir,
            ort,
            sessions,
            prompts,
            image_config,
            limits: options.image_limits,
            keep_images: options.keep_images,
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

    /// Providers that could not start while a later one in the list took over.
    pub fn warnings(&self) -> &[String] {
        &self.sessions.warnings
    }

    /// `false` for decoders without attention_mask/token_type_ids: requests then run one by one
    /// with the graph's own (full prefix) attention.
    pub fn supports_batching(&self) -> bool {
        self.sessions.decoder_inputs().supports_batching()
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
    /// Isolation: a request whose image, prompt or limits are wrong fails before anything runs;
    /// a batch whose run fails is run again request by request, so only the request that fails
    /// alone gets the error (the others' deltas are not sent twice).
    pub fn run_until(
        &mut self,
        requests: &[Request],
        mut on_token: impl FnMut(usize, &str) -> bool,
    ) -> Vec<Result<Response, RequestError>> {
        let mut results: Vec<Option<Result<Response, RequestError>>> = Vec::new();
        // The requests that prepared well: their request index and image, and, in the same
        // order, what the decoder takes.
        let mut ready: Vec<(usize, LoadedImage)> = Vec::new();
        let mut prepared: Vec<Prepared> = Vec::new();
        for (index, request) in requests.iter().enumerate() {
            match self.prepare(request) {
                Ok((image, p)) => {
                    ready.push((index, image));
                    prepared.push(p);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut streams = vec![TextStream::default(); requests.len()];
        let groups: Vec<std::ops::Range<usize>> = if self.supports_batching() {
            std::iter::once(0..ready.len()).collect()
        } else {
            (0..ready.len()).map(|i| i..i + 1).collect()
        };
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            let outcome = match self.generate_group(&ready[group.clone()], &prepared[group.clone()], &mut streams, &mut on_token) {
                Err(_) if group.len() > 1 => group
                    .map(|k| (k, self.generate_group(&ready[k..=k], &prepared[k..=k], &mut streams, &mut on_token)))
                    .collect(),
                outcome => vec![(group.start, outcome)],
            };
            for (first, generation) in outcome {
                match generation {
                    Ok(generation) => {
                        for (k, g) in generation.rows.into_iter().enumerate() {
                            let (index, image) = &ready[first + k];
                            let prompt_tokens = prepared[first + k].input_ids.len();
                            results[*index] = Some(self.finish(&requests[*index], image, g, prompt_tokens, generation.timings.clone()));
                        }
                    }
                    Err(e) => results[ready[first].0] = Some(Err(e.into())),
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

    /// One `generate` call over `rows`, streaming each row's final text through `on_token`, the
    /// rest of it once the batch ends.
    fn generate_group(
        &mut self,
        rows: &[(usize, LoadedImage)],
        prepared: &[Prepared],
        streams: &mut [TextStream],
        on_token: &mut impl FnMut(usize, &str) -> bool,
    ) -> Result<Generation, ModelError> {
        for (index, _) in rows {
            streams[*index].restart();
        }
        let prompts = &self.prompts;
        let generation = generate(&mut self.sessions, prepared, |row, token| {
            let index = rows[row].0;
            let delta = streams[index].push(prompts, token);
            on_token(index, &delta)
        })?;
        let longest = prepared.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        if prepared.len() * longest * longest > LONG_PREFILL {
            self.sessions.release_arena()?;
        }
        for ((index, _), g) in rows.iter().zip(&generation.rows) {
            let tail = streams[*index].finish(prompts);
            if !g.stopped && !tail.is_empty() {
                on_token(*index, &tail);
            }
        }
        Ok(generation)
    }

    /// Text, boxes and masks of one generated row.
    fn finish(
        &mut self,
        request: &Request,
        image: &LoadedImage,
        g: Generated,
        prompt_tokens: usize,
        timings: Timings,
    ) -> Result<Response, RequestError> {
        if g.stopped {
            return Err(RequestError::Stopped);
        }
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
            timings,
            image: self.keep_images.then(|| image.rgb.clone()),
        };
        let tagged = || self.prompts.decode_with_special_tokens(&response.token_ids);
        match Task::of(&request.prompt) {
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
