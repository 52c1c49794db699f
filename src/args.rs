//! Command-line options every `paligemma` command shares: the model, the execution providers, the
//! dtype and the prompt limit, and where the default model is found.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::{DecoderFlavour, DtypeChoice};
use crate::onnxruntime::{check_unique, ExecutionProvider, IoBindingMode};
use crate::pipeline::PipelineOptions;
use crate::prompt::DEFAULT_MAX_PROMPT_TOKENS;

/// The model and how ONNX Runtime runs it: shared by `paligemma`, `paligemma bench` and
/// `paligemma serve`.
#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Converted model directory (with manifest.json), a transformers.js export (onnx/ with
    /// vision_encoder, embed_tokens, decoder_model_merged graphs; no manifest) or a Hugging Face
    /// repo id holding either.
    /// Default: the repository's committed scenes model, models/scenes (see models/README.md).
    #[arg(long)]
    pub model: Option<String>,
    /// Execution providers in priority order: cpu, cuda, tensorrt (e.g. "tensorrt,cuda,cpu").
    #[arg(long, default_value = "cpu", value_delimiter = ',', value_parser = clap::value_parser!(ExecutionProvider))]
    pub ep: Vec<ExecutionProvider>,
    /// Intra-op threads per graph (default: ONNX Runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which of the model's graphs to run: a dtype (fp32, fp16, int8, uint8, q8, q4, q4f16, bnb4;
    /// transformers.js' names; int4 = q4), for the decoder and for every graph that has it (the
    /// others run fp32), or one per graph: `vision=fp16,embed=q8,decoder=q4f16` (a graph not named
    /// runs fp32).
    #[arg(long, default_value = "fp32")]
    pub dtype: DtypeChoice,
    /// Which decoder graph runs: `gqa` (ONNX Runtime's GroupQueryAttention, the KV cache updated
    /// in place; conversions since format version 3, fp32 and quantized dtypes), `portable`
    /// (standard ONNX attention, every execution provider), or `auto`: gqa where the model has it
    /// and the providers are CPU only.
    #[arg(long, value_enum, default_value_t = DecoderFlavour::Auto)]
    pub decoder: DecoderFlavour,
    /// Whether the portable decoder's KV cache stays where its provider computed it, through an
    /// ONNX Runtime IoBinding: `auto` (on where the decoder runs on CUDA or TensorRT: the cache
    /// stays in GPU memory and only the logits come back), `on` (also on CPU, where it is bound to
    /// host memory and changes nothing but the call path), `off` (the cache goes to host memory
    /// and back every token). The gqa decoder always binds its cache, in host memory.
    #[arg(long, value_enum, default_value_t = IoBindingMode::Auto)]
    pub io_binding: IoBindingMode,
    /// Most text tokens a prompt may hold (`<bos>`, the task, `\n`; the image tokens are not
    /// counted): what a request costs grows with its tokens, not its characters.
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_TOKENS, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub max_prompt_tokens: usize,
    /// ONNX Runtime library to load (else $ORT_DYLIB_PATH, next to this binary, the repo's .venv).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

impl RuntimeArgs {
    /// The pipeline options these arguments give (the default model looked up if none).
    pub fn pipeline_options(&self) -> Result<PipelineOptions> {
        let model = match &self.model {
            Some(model) => model.clone(),
            None => default_model()?.display().to_string(),
        };
        let mut options = PipelineOptions::new(model);
        options.dtype = self.dtype;
        options.decoder = self.decoder;
        options.io_binding = self.io_binding;
        check_unique(&self.ep)?;
        options.providers = self.ep.clone();
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

impl clap::ValueEnum for DecoderFlavour {
    fn value_variants<'a>() -> &'a [Self] {
        &DecoderFlavour::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

impl clap::ValueEnum for IoBindingMode {
    fn value_variants<'a>() -> &'a [Self] {
        &IoBindingMode::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}
