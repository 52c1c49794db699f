//! The model directory's `manifest.json` (written by `python -m export convert`, see
//! `export/manifest.py`): every shape, id and file name the runtime uses comes from here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The dtypes a model's graphs come in: this repository's manifest keys and transformers.js'
/// dtype names, each with the file suffix transformers.js gives it
/// (`decoder_model_merged{suffix}.onnx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// float32 graphs, the reference (no suffix).
    #[default]
    Fp32,
    /// float16 graphs with float16 inputs, outputs and KV cache (`_fp16`; `--dtype fp16` conversions).
    Fp16,
    /// 8-bit weights (`_int8`): this repository's `--quantize int8` (MatMulNBits), or a community
    /// export's int8 integer MatMuls.
    Int8,
    /// uint8 weights in integer MatMuls (`_uint8`, community exports).
    Uint8,
    /// transformers.js' `q8` (`_quantized`, community exports): dynamic int8 quantization.
    Q8,
    /// 4-bit weights (`_q4`): MatMulNBits with float32 I/O (`--quantize int4`).
    Q4,
    /// 4-bit weights on the float16 graph (`_q4f16`, community exports).
    Q4f16,
    /// bitsandbytes-style 4-bit weights (`_bnb4`, community exports).
    Bnb4,
}

impl Dtype {
    /// Every dtype, in the order `--help` lists them.
    pub const ALL: [Dtype; 8] = [
        Dtype::Fp32,
        Dtype::Fp16,
        Dtype::Int8,
        Dtype::Uint8,
        Dtype::Q8,
        Dtype::Q4,
        Dtype::Q4f16,
        Dtype::Bnb4,
    ];

    /// The manifest key (transformers.js' dtype name).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Q8 => "q8",
            Dtype::Q4 => "q4",
            Dtype::Q4f16 => "q4f16",
            Dtype::Bnb4 => "bnb4",
        }
    }

    /// transformers.js' file-name suffix (`DEFAULT_DTYPE_SUFFIX_MAPPING`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Fp32 => "",
            Dtype::Fp16 => "_fp16",
            Dtype::Int8 => "_int8",
            Dtype::Uint8 => "_uint8",
            Dtype::Q8 => "_quantized",
            Dtype::Q4 => "_q4",
            Dtype::Q4f16 => "_q4f16",
            Dtype::Bnb4 => "_bnb4",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dtype {
    type Err = ConfigError;

    /// A manifest key; `int4` (the `--quantize` name) is read as `q4`, `quantized` (the file
    /// suffix) as `q8`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "int4" => Ok(Dtype::Q4),
            "quantized" => Ok(Dtype::Q8),
            _ => Dtype::ALL
                .into_iter()
                .find(|d| d.as_str() == name)
                .ok_or_else(|| ConfigError::UnknownDtype { name: name.to_string() }),
        }
    }
}

/// The graphs `--dtype` picks a file for, by their manifest keys, with the short names
/// `--dtype vision=..,embed=..,decoder=..` accepts.
pub const SELECTABLE_GRAPHS: [(&str, &str); 3] = [("vision_encoder", "vision"), ("embed_tokens", "embed"), ("decoder", "decoder")];

/// `--dtype`: one dtype for the whole model, or one per graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DtypeChoice {
    /// `--dtype q4`: the decoder's file of that dtype; the vision encoder and the embedding take
    /// theirs where they have one, else their fp32 file (a quantized conversion's own rule).
    All(Dtype),
    /// `--dtype vision=fp16,embed=q8,decoder=q4f16`: exactly these files; a graph not named runs fp32.
    PerGraph {
        /// The vision encoder's dtype.
        vision_encoder: Dtype,
        /// The token embedding's dtype.
        embed_tokens: Dtype,
        /// The decoder's dtype (the GroupQueryAttention decoder's too, where it has one).
        decoder: Dtype,
    },
}

impl Default for DtypeChoice {
    fn default() -> Self {
        DtypeChoice::All(Dtype::Fp32)
    }
}

impl From<Dtype> for DtypeChoice {
    fn from(dtype: Dtype) -> Self {
        DtypeChoice::All(dtype)
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DtypeChoice::All(dtype) => write!(f, "{dtype}"),
            DtypeChoice::PerGraph {
                vision_encoder,
                embed_tokens,
                decoder,
            } => write!(f, "vision={vision_encoder},embed={embed_tokens},decoder={decoder}"),
        }
    }
}

impl std::str::FromStr for DtypeChoice {
    type Err = ConfigError;

    /// `q4`, or `graph=dtype` pairs separated by commas (`vision`, `embed`, `decoder`, or the
    /// manifest keys `vision_encoder`, `embed_tokens`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if !text.contains('=') {
            if text.contains(',') {
                return Err(ConfigError::DtypeChoice {
                    text: text.to_string(),
                    why: "a list of dtypes names no graph".to_string(),
                });
            }
            return Ok(DtypeChoice::All(text.trim().parse()?));
        }
        let mut picked: [Option<Dtype>; 3] = [None; 3];
        for pair in text.split(',') {
            let bad = |why: &str| ConfigError::DtypeChoice {
                text: text.to_string(),
                why: format!("{pair:?} {why}"),
            };
            let (graph, dtype) = pair.split_once('=').ok_or_else(|| bad("is not graph=dtype"))?;
            let graph = graph.trim();
            let slot = SELECTABLE_GRAPHS
                .iter()
                .position(|(key, short)| graph == *key || graph == *short)
                .ok_or_else(|| bad("names no graph (vision, embed, decoder)"))?;
            if picked[slot].is_some() {
                return Err(bad("names a graph a second time"));
            }
            picked[slot] = Some(dtype.trim().parse()?);
        }
        let [vision_encoder, embed_tokens, decoder] = picked.map(Option::unwrap_or_default);
        Ok(DtypeChoice::PerGraph {
            vision_encoder,
            embed_tokens,
            decoder,
        })
    }
}

/// The files one run opens, relative to the model directory, each with the dtype it was picked in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The vision encoder's file and dtype.
    pub vision_encoder: (String, Dtype),
    /// The token embedding's file and dtype.
    pub embed_tokens: (String, Dtype),
    /// The portable decoder's file and dtype.
    pub decoder: (String, Dtype),
    /// The GroupQueryAttention decoder's file in the decoder's dtype, where the model has one.
    pub decoder_gqa: Option<String>,
    /// The segmentation decoder's file, where the model has one (one file serves every dtype).
    pub seg_decoder: Option<String>,
}

/// Which of the manifest's decoder graphs runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DecoderFlavour {
    /// `decoder_gqa` where the model has it for the dtype and the providers are CPU only (its
    /// graphs are float32, which ONNX Runtime's CUDA GroupQueryAttention does not run), else
    /// `decoder`.
    #[default]
    Auto,
    /// `decoder`: standard ONNX attention, `present = concat(past, new)` at every run; every
    /// execution provider runs it (TensorRT runs no contrib ops).
    Portable,
    /// `decoder_gqa`: ONNX Runtime's GroupQueryAttention, the KV cache updated in place.
    Gqa,
}

impl DecoderFlavour {
    /// Every flavour, in the order `--help` lists them.
    pub const ALL: [DecoderFlavour; 3] = [DecoderFlavour::Auto, DecoderFlavour::Portable, DecoderFlavour::Gqa];

    /// The name `--decoder` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DecoderFlavour::Auto => "auto",
            DecoderFlavour::Portable => "portable",
            DecoderFlavour::Gqa => "gqa",
        }
    }
}

/// The manifest's file name in a model directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "paligemma-onnx";
/// Version 2 adds `quantization`, version 3 `graphs.decoder_gqa`; version 1 manifests still load
/// (their int8 graphs hold int8 weights, see [`Manifest::weight_format`]).
const FORMAT_VERSIONS: std::ops::RangeInclusive<u32> = 1..=3;

/// Why a model directory's `manifest.json` cannot be used. Every variant names the manifest's path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The manifest cannot be read: no `manifest.json` (not a converted model), or an I/O error.
    #[error("{path}: cannot read the manifest ({source}); convert the model with `python -m export convert MODEL OUT_DIR`")]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest is not JSON of [`Manifest`]'s shape (a missing, mistyped or unknown key).
    #[error("{path}: not a valid manifest: {message}")]
    Parse {
        /// The manifest's path.
        path: PathBuf,
        /// serde_json's error, with its line and column.
        message: String,
    },
    /// `format` is not `"paligemma-onnx"`, or `format_version` is not one this runtime reads (1 to 3).
    #[error("{path}: format {found:?} version {version}, this runtime reads {FORMAT:?} versions {}-{}; a newer manifest needs a newer paligemma, anything else a re-export with this repository's `python -m export convert`", FORMAT_VERSIONS.start(), FORMAT_VERSIONS.end())]
    Format {
        /// The manifest's path.
        path: PathBuf,
        /// The manifest's `format`.
        found: String,
        /// The manifest's `format_version`.
        version: u32,
    },
    /// `quantization` misses a quantized dtype, has an entry for a float or unlisted dtype, or
    /// names a graph that does not exist.
    #[error("{path}: `quantization` does not match the model: {problem}; the manifest was edited or comes from another converter, re-run `python -m export convert`")]
    Quantization {
        /// The manifest's path.
        path: PathBuf,
        /// The first mismatch found, e.g. `dtype int8 has no entry`.
        problem: String,
    },
    /// A dtype name that is none of this runtime's.
    #[error("unknown dtype {name:?}; valid: fp32, fp16, int8, uint8, q8, q4, q4f16, bnb4 (aliases: int4 for q4, quantized for q8), or one per graph: vision=fp16,embed=fp32,decoder=q4")]
    UnknownDtype {
        /// The name given.
        name: String,
    },
    /// A per-graph `--dtype` that cannot be read.
    #[error("--dtype {text:?}: {why}; write one dtype (q4) or graph=dtype pairs (vision=fp16,embed=fp32,decoder=q4)")]
    DtypeChoice {
        /// What was given.
        text: String,
        /// The pair that is wrong, and how.
        why: String,
    },
    /// `--decoder gqa` on a model (or dtype) without a GroupQueryAttention decoder.
    #[error("{path} lists no decoder_gqa graph for dtype {dtype}: {why}")]
    NoGqaDecoder {
        /// The manifest.
        path: PathBuf,
        /// The dtype asked for.
        dtype: String,
        /// Why the conversion has none, and what to do instead.
        why: &'static str,
    },
    /// A graph has no file for the dtype asked for (`--dtype`).
    #[error("{path}: {graph} has no {dtype} file (it has: {available}); pick one of those with --dtype, or one per graph that the model has, e.g. --dtype {suggestion}")]
    MissingDtype {
        /// The manifest's path (the model directory for a transformers.js layout).
        path: PathBuf,
        /// The graph: `vision_encoder`, `embed_tokens`, `decoder`.
        graph: &'static str,
        /// The dtype asked for.
        dtype: String,
        /// The dtypes the graph has, comma-separated.
        available: String,
        /// A per-graph `--dtype` whose every file exists, nearest to the one asked for.
        suggestion: String,
    },
}

/// Graph files per dtype, e.g. `{"fp32": "onnx/decoder_model_merged.onnx"}`.
pub type GraphFiles = BTreeMap<String, String>;

/// `graphs` in manifest.json: each graph's file per dtype (transformers.js names, e.g.
/// `onnx/decoder_model_merged_q4.onnx`). A quantized dtype maps the graphs it leaves in float to
/// the float files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    /// SigLIP and the projector: `pixel_values f32[B,3,S,S] -> image_features f32[B,N,H]`, divided by sqrt(H).
    pub vision_encoder: GraphFiles,
    /// The token embedding: `input_ids i64[B,T] -> inputs_embeds f32[B,T,H]`, raw rows (the decoder
    /// scales them by sqrt(H)).
    pub embed_tokens: GraphFiles,
    /// The Gemma 2 decoder with KV cache, prefill and steps in one graph: `inputs_embeds f32[B,T,H]`
    /// and `past_key_values.*` -> `logits` and `present.*`.
    pub decoder: GraphFiles,
    /// The same decoder on ONNX Runtime's `GroupQueryAttention`, whose KV cache the runtime
    /// updates in place (`export/decoder_gqa.py`): `inputs_embeds`, `position_ids`, `seqlens_k`,
    /// `total_sequence_length` and `past_key_values.*` -> `logits` and `present.*`. fp32 and
    /// quantized dtypes of conversions since format version 3.
    pub decoder_gqa: Option<GraphFiles>,
    /// big_vision's VQ-VAE mask decoder (`vae-oid.npz`), `codes i64[K,16] -> masks f32[K,64,64]`; one
    /// float32 file for every dtype; absent unless converted with `--seg-vae`.
    pub seg_decoder: Option<GraphFiles>,
}

/// What the quantized graphs of one dtype hold (`quantization` in manifest.json, written from
/// `export/quantize.py`'s `WEIGHT_FORMATS`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WeightFormat {
    /// The ONNX Runtime op the constant-weight MatMuls became: `DynamicQuantizeMatMul`, `MatMulNBits`.
    pub op: String,
    /// Element type of the stored weights: `uint8`, `int8`, `uint4`.
    pub weight_type: String,
    /// The graphs whose weights are in this format. A dtype converted with `--quantize-vision`
    /// also runs a quantized vision encoder, whose own format is under `vision_encoder` (in
    /// `details`); the dtype's other graphs run the fp32 files.
    pub graphs: Vec<String>,
    /// Scheme details (block size, zero point, accuracy level), for people and tools.
    #[serde(flatten)]
    pub details: BTreeMap<String, serde_json::Value>,
}

impl WeightFormat {
    /// int8 weights in ONNX Runtime's dynamic-quantization ops: the `U8S8` kernels, which saturate
    /// on x86 CPUs without VNNI (see `cpu.rs`).
    pub fn has_int8_weights_in_integer_matmul(&self) -> bool {
        self.weight_type == "int8" && matches!(self.op.as_str(), "DynamicQuantizeMatMul" | "MatMulInteger")
    }
}

/// One converted model, as `export/manifest.py` describes it. Key names are the Hugging Face
/// config keys, so one grep finds a concept on both sides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `"paligemma-onnx"`.
    pub format: String,
    /// 1 or 2; 2 adds `quantization`.
    pub format_version: u32,
    /// The model as given to `python -m export convert`: a Hub repo id or a local path.
    pub source: String,
    /// Side S of the square model input in pixels (the processor's `size["height"]`; 224, 448 or 896 for PaliGemma 2).
    pub image_size: usize,
    /// Side of a SigLIP patch in pixels (vision_config's `patch_size`).
    pub patch_size: usize,
    /// Image tokens N per prompt, `(S / patch_size)^2` (the processor's `image_seq_length`).
    pub num_image_tokens: usize,
    /// Width H of the decoder's embeddings and of the image features (text_config).
    pub hidden_size: usize,
    /// Logits per position V (text_config).
    pub vocab_size: usize,
    /// Decoder layers: one past/present key and value pair each (text_config).
    pub num_hidden_layers: usize,
    /// Query heads (text_config).
    pub num_attention_heads: usize,
    /// Key/value heads KVH of the cache tensors (text_config).
    pub num_key_value_heads: usize,
    /// Size D of one head in the cache tensors (text_config).
    pub head_dim: usize,
    /// Tokens a sliding-attention layer sees (text_config); the decoder graph builds the window.
    pub sliding_window: Option<usize>,
    /// `sliding_attention` or `full_attention` per layer (text_config).
    pub layer_types: Vec<String>,
    /// Positions of the model (text_config): a prompt, its image tokens included, and its new tokens must fit.
    pub max_position_embeddings: usize,
    /// Gemma 2's tanh cap of the logits, applied in the decoder graph (text_config).
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2's tanh cap of the attention scores, applied in the decoder graph (text_config).
    pub attn_logit_softcapping: Option<f64>,
    /// Id of `<image>`, whose embedding rows are replaced by the image features (config's `image_token_id`).
    pub image_token_id: i64,
    /// Id of `<bos>`, which follows the image tokens in a prompt (the tokenizer's).
    pub bos_token_id: i64,
    /// Id of `<pad>`: left padding, and the token fed to finished rows (the tokenizer's).
    pub pad_token_id: i64,
    /// Ids that end generation (generation_config's `eos_token_id`, as a list).
    pub eos_token_id: Vec<i64>,
    /// Id of `<loc0000>`, the first of the 1024 location tokens.
    pub loc_token_start: i64,
    /// Id of `<seg000>`, the first of the 128 mask-code tokens.
    pub seg_token_start: i64,
    /// The dtypes converted, the float one first (`fp32`, `fp16`, `int8`, `q4`): what `--dtype` takes.
    pub dtypes: Vec<String>,
    /// Each graph's file per dtype.
    pub graphs: Graphs,
    /// Quantized dtype -> what its graphs hold; absent in version 1 manifests.
    #[serde(default)]
    pub quantization: BTreeMap<String, WeightFormat>,
    /// Every file of the model directory but the manifest, relative to it: what a Hub download fetches.
    pub files: Vec<String>,
    /// Size in bytes of each of `files`.
    pub file_sizes: BTreeMap<String, u64>,
    /// Versions of the Python packages that converted the model (`transformers`, `torch`, `onnx`, ...).
    pub producer: BTreeMap<String, String>,
    /// Not read from a manifest.json but made from a transformers.js layout's config files (see
    /// `transformers_js.rs`).
    #[serde(skip)]
    pub synthesized: bool,
}

impl Manifest {
    /// Reads `model_dir/manifest.json` and checks its format, version and `quantization`.
    pub fn load(model_dir: &Path) -> Result<Manifest, ConfigError> {
        let path = model_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if manifest.format != FORMAT || !FORMAT_VERSIONS.contains(&manifest.format_version) {
            return Err(ConfigError::Format {
                path,
                found: manifest.format,
                version: manifest.format_version,
            });
        }
        if let Some(problem) = manifest.quantization_problem() {
            return Err(ConfigError::Quantization { path, problem });
        }
        Ok(manifest)
    }

    /// Runtime decisions rest on `quantization` (see `session.rs`), so it must describe this
    /// model: version 2 records every quantized dtype it lists, and only those, in graphs it has.
    fn quantization_problem(&self) -> Option<String> {
        const FLOAT_DTYPES: [&str; 2] = ["fp32", "fp16"];
        const GRAPHS: [&str; 5] = ["vision_encoder", "embed_tokens", "decoder", "decoder_gqa", "seg_decoder"];
        if self.format_version >= 2 {
            if let Some(dtype) = self
                .dtypes
                .iter()
                .find(|d| !FLOAT_DTYPES.contains(&d.as_str()) && !self.quantization.contains_key(*d))
            {
                return Some(format!("dtype {dtype} has no entry"));
            }
        }
        for (dtype, format) in &self.quantization {
            if FLOAT_DTYPES.contains(&dtype.as_str()) || !self.dtypes.contains(dtype) {
                return Some(format!(
                    "an entry for {dtype}, which is not a quantized dtype of this model (dtypes: {})",
                    self.dtypes.join(", ")
                ));
            }
            if let Some(graph) = format.graphs.iter().find(|g| !GRAPHS.contains(&g.as_str())) {
                return Some(format!("{dtype} lists graph {graph:?}; graphs are {}", GRAPHS.join(", ")));
            }
        }
        None
    }

    /// What the graphs of a quantized `dtype` hold; `None` for float dtypes. Version 1 manifests
    /// predate the record, and their `int8` graphs (the only quantized dtype then besides `q4`) hold
    /// int8 weights in `DynamicQuantizeMatMul` in the decoder.
    pub fn weight_format(&self, dtype: &str) -> Option<WeightFormat> {
        if let Some(format) = self.quantization.get(dtype) {
            return Some(format.clone());
        }
        (self.format_version == 1 && dtype == "int8").then(|| WeightFormat {
            op: "DynamicQuantizeMatMul".into(),
            weight_type: "int8".into(),
            graphs: vec!["decoder".into()],
            details: BTreeMap::new(),
        })
    }

    /// The files `choice` opens (see [`Graphs::select`]).
    pub fn select(&self, model_dir: &Path, choice: DtypeChoice) -> Result<Selection, ConfigError> {
        let path = if self.synthesized {
            model_dir.to_path_buf()
        } else {
            model_dir.join(MANIFEST_FILE)
        };
        self.graphs.select(&path, choice)
    }
}

impl Graphs {
    /// The files `choice` opens (see [`DtypeChoice`]): the decoder must have its dtype; with one
    /// dtype for the whole model, a vision encoder or embedding without that dtype runs its fp32
    /// file; a per-graph choice takes exactly the files it names. Errors name `path` (the manifest,
    /// or the model directory or repo of a transformers.js layout).
    pub fn select(&self, path: &Path, choice: DtypeChoice) -> Result<Selection, ConfigError> {
        let g = self;
        let asked = match choice {
            DtypeChoice::All(dtype) => [dtype; 3],
            DtypeChoice::PerGraph {
                vision_encoder,
                embed_tokens,
                decoder,
            } => [vision_encoder, embed_tokens, decoder],
        };
        // Per graph: the dtype asked for where it has it, else fp32, else its first.
        let suggestion = || {
            let pick = |files: &GraphFiles, want: Dtype| {
                [want, Dtype::Fp32]
                    .into_iter()
                    .chain(Dtype::ALL)
                    .find(|d| files.contains_key(d.as_str()))
                    .unwrap_or(want)
            };
            let [v, e, d] = asked;
            format!(
                "vision={},embed={},decoder={}",
                pick(&g.vision_encoder, v),
                pick(&g.embed_tokens, e),
                pick(&g.decoder, d)
            )
        };
        let exact = |graph: &'static str, files: &GraphFiles, dtype: Dtype| -> Result<(String, Dtype), ConfigError> {
            match files.get(dtype.as_str()) {
                Some(file) => Ok((file.clone(), dtype)),
                None => Err(ConfigError::MissingDtype {
                    path: path.to_path_buf(),
                    graph,
                    dtype: dtype.to_string(),
                    available: files.keys().cloned().collect::<Vec<_>>().join(", "),
                    suggestion: suggestion(),
                }),
            }
        };
        let (vision, embed, decoder) = match choice {
            DtypeChoice::All(dtype) => {
                let decoder = exact("decoder", &g.decoder, dtype)?;
                let or_fp32 = |graph, files: &GraphFiles| exact(graph, files, dtype).or_else(|_| exact(graph, files, Dtype::Fp32));
                (
                    or_fp32("vision_encoder", &g.vision_encoder)?,
                    or_fp32("embed_tokens", &g.embed_tokens)?,
                    decoder,
                )
            }
            DtypeChoice::PerGraph {
                vision_encoder,
                embed_tokens,
                decoder,
            } => (
                exact("vision_encoder", &g.vision_encoder, vision_encoder)?,
                exact("embed_tokens", &g.embed_tokens, embed_tokens)?,
                exact("decoder", &g.decoder, decoder)?,
            ),
        };
        let decoder_gqa = g.decoder_gqa.as_ref().and_then(|files| files.get(decoder.1.as_str())).cloned();
        let seg_decoder = g
            .seg_decoder
            .as_ref()
            .and_then(|files| files.get(decoder.1.as_str()).or_else(|| files.values().next()))
            .cloned();
        Ok(Selection {
            vision_encoder: vision,
            embed_tokens: embed,
            decoder,
            decoder_gqa,
            seg_decoder,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed scenes model's manifest, edited as `edit` says, written to a scratch directory.
    fn scenes_manifest(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Result<Manifest, ConfigError> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes").join(MANIFEST_FILE);
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
        edit(&mut json);
        let dir = std::env::temp_dir().join(format!("paligemma-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), json.to_string()).unwrap();
        let manifest = Manifest::load(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        manifest
    }

    #[test]
    fn the_scenes_manifest_records_each_quantized_format() {
        let m = scenes_manifest("formats", |_| {}).unwrap();
        let int8 = m.weight_format("int8").unwrap();
        assert_eq!((int8.op.as_str(), int8.weight_type.as_str()), ("MatMulNBits", "uint8"));
        assert_eq!(int8.details["bits"], 8);
        assert_eq!(int8.graphs, ["decoder", "decoder_gqa"]);
        assert!(!int8.has_int8_weights_in_integer_matmul());
        assert_eq!(m.weight_format("q4").unwrap().details["bits"], 4);
        assert_eq!(m.weight_format("fp32"), None);
    }

    #[test]
    fn version_1_int8_holds_int8_weights_in_dynamic_quantize_matmul() {
        let m = scenes_manifest("v1", |json| {
            json["format_version"] = 1.into();
            json.as_object_mut().unwrap().remove("quantization");
        })
        .unwrap();
        assert!(m.weight_format("int8").unwrap().has_int8_weights_in_integer_matmul());
        assert_eq!(m.weight_format("q4"), None);
    }

    #[test]
    fn a_newer_format_version_is_refused_by_name() {
        let error = scenes_manifest("v4", |json| json["format_version"] = 4.into()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("version 4, this runtime reads \"paligemma-onnx\" versions 1-3; a newer manifest needs a newer paligemma"),
            "{error}"
        );
    }

    #[test]
    fn a_quantization_record_that_does_not_match_the_model_is_refused() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str); 4] = [
            (
                "missing",
                |j| drop(j["quantization"].as_object_mut().unwrap().remove("int8")),
                "dtype int8 has no entry",
            ),
            (
                "float",
                |j| j["quantization"]["fp32"] = j["quantization"]["int8"].clone(),
                "an entry for fp32, which is not a quantized dtype",
            ),
            (
                "unlisted",
                |j| j["quantization"]["int7"] = j["quantization"]["int8"].clone(),
                "an entry for int7",
            ),
            (
                "graph",
                |j| j["quantization"]["int8"]["graphs"] = serde_json::json!(["decoder_model_merged"]),
                "int8 lists graph \"decoder_model_merged\"",
            ),
        ];
        for (tag, edit, needle) in cases {
            let error = scenes_manifest(tag, edit).unwrap_err().to_string();
            assert!(
                error.contains(needle) && error.contains("re-run `python -m export convert`"),
                "{tag}: {error}"
            );
        }
    }
}
