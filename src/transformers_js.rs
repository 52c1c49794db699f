//! Model directories in the transformers.js layout (the community's exports:
//! `onnx-community/paligemma2-3b-pt-224`, `-448`, `-896`, `Xenova/paligemma-3b-mix-224`): no
//! `manifest.json`, so one is made here from `config.json`, `generation_config.json`,
//! `preprocessor_config.json` (or `processor_config.json`), `tokenizer.json` and the graph files
//! under `onnx/`. The sessions then hold every graph to it as they hold a converted model to its
//! manifest (`session.rs`): names, element types, static sizes, layer count.
//!
//! Missing config keys take the defaults transformers' config classes give them
//! (`PaliGemmaConfig`, `GemmaConfig` for PaliGemma 1, `Gemma2Config` for PaliGemma 2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{ConfigError, Dtype, DtypeChoice, GraphFiles, Graphs, Manifest, WeightFormat, MANIFEST_FILE};
use crate::preprocess::{ImageProcessorConfig, PreprocessError};

/// The graphs of the layout: (manifest key, file stem under `onnx/`).
pub const GRAPH_STEMS: [(&str, &str); 3] = [
    ("vision_encoder", "vision_encoder"),
    ("embed_tokens", "embed_tokens"),
    ("decoder", "decoder_model_merged"),
];
/// The files besides the graphs a model needs.
pub const CONFIG_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Read where present; one of the image processor's two (`processor_config.json`'s
/// `image_processor` wins over `preprocessor_config.json`, as in transformers 5) must be.
pub const OPTIONAL_FILES: [&str; 3] = ["generation_config.json", "preprocessor_config.json", "processor_config.json"];

/// Why a transformers.js model directory cannot be used. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file the layout needs is missing or is not JSON.
    #[error("{dir}: {file} {problem}; a transformers.js model directory holds config.json, preprocessor_config.json and tokenizer.json beside onnx/ (download them from the model's repository)")]
    File {
        /// The model directory.
        dir: PathBuf,
        /// The file.
        file: &'static str,
        /// `is missing`, or the parser's error.
        problem: String,
    },
    /// A config value that is not what a PaliGemma model has, or two files that disagree.
    #[error("{path}: {problem}")]
    Config {
        /// The file read.
        path: PathBuf,
        /// What is wrong, with the values found.
        problem: String,
    },
    /// The image processor config cannot be read or asks for what is not implemented.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// `onnx/` lacks one of the three graphs in every dtype.
    #[error("{dir}/onnx has no {stem}*.onnx (it has: {found}); a transformers.js PaliGemma export has vision_encoder, embed_tokens and decoder_model_merged graphs")]
    MissingGraph {
        /// The model directory.
        dir: PathBuf,
        /// The graph's file stem.
        stem: &'static str,
        /// The .onnx files present.
        found: String,
    },
}

/// A directory without `manifest.json` whose `onnx/` holds a `decoder_model_merged*.onnx`.
pub fn is_layout(dir: &Path) -> bool {
    !dir.join(MANIFEST_FILE).exists() && onnx_files(dir).iter().any(|f| f.starts_with("onnx/decoder_model_merged"))
}

/// The `.onnx` files under `dir/onnx`, as `onnx/<name>`, sorted.
fn onnx_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("onnx")) else {
        return Vec::new();
    };
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok().filter(|e| e.path().is_file())?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".onnx"))
        .map(|name| format!("onnx/{name}"))
        .collect();
    files.sort();
    files
}

/// Each graph's file per dtype among `files` (paths relative to the model directory or repo): a
/// file `onnx/{stem}{suffix}.onnx` for each of transformers.js' suffixes (see [`Dtype::suffix`]).
/// A graph without any file has an empty map.
pub fn graphs(files: &[String]) -> Graphs {
    let of = |stem: &str| -> GraphFiles {
        Dtype::ALL
            .iter()
            .map(|dtype| (dtype.as_str().to_string(), format!("onnx/{stem}{}.onnx", dtype.suffix())))
            .filter(|(_, name)| files.contains(name))
            .collect()
    };
    // This repository's own graphs, in a conversion whose manifest.json was left behind.
    let seg = "onnx/seg_decoder.onnx".to_string();
    let seg_decoder = files
        .contains(&seg)
        .then(|| Dtype::ALL.iter().map(|d| (d.as_str().to_string(), seg.clone())).collect());
    Graphs {
        vision_encoder: of(GRAPH_STEMS[0].1),
        embed_tokens: of(GRAPH_STEMS[1].1),
        decoder: of(GRAPH_STEMS[2].1),
        decoder_gqa: Some(of("decoder_model_gqa")).filter(|files| !files.is_empty()),
        seg_decoder,
    }
}

/// The files of a transformers.js repo (its file list `files`) that running it in `choice` needs:
/// the config, processor and tokenizer files it has, and the picked graphs with their external
/// data; what a Hub download fetches. Errors name `repo`.
pub fn needed_files(files: &[String], choice: DtypeChoice, repo: &Path) -> Result<Vec<String>, ConfigError> {
    let selection = graphs(files).select(repo, choice)?;
    let mut needed: Vec<String> = CONFIG_FILES
        .iter()
        .chain(OPTIONAL_FILES.iter().filter(|f| files.iter().any(|n| n == *f)))
        .map(|f| f.to_string())
        .collect();
    let picked = [selection.vision_encoder.0, selection.embed_tokens.0, selection.decoder.0];
    for graph in picked.into_iter().chain(selection.decoder_gqa).chain(selection.seg_decoder) {
        needed.extend(with_external_data(&graph, files.iter().map(String::as_str)));
    }
    needed.sort();
    needed.dedup();
    Ok(needed)
}

/// What transformers.js' `scripts/quantize.py` writes in its 8-bit dtypes, recorded as a
/// conversion's manifest records its own (`session.rs` decides on it): ONNX Runtime's dynamic
/// quantizer in IntegerOps mode, so `MatMulInteger` on constant weights, with `int8` weights for
/// `int8`, `uint8` for `uint8`, and for `q8` `uint8` in a graph with a `Conv` (the vision
/// encoder's patch embedding) and `int8` in the others. Only the graphs with that dtype's file
/// are listed, and not the embedding (its weights feed a `Gather`, no integer MatMul); the
/// 4-bit dtypes (`MatMulNBits`, `MatMulBnb4`) are not recorded.
fn quantization(graphs: &Graphs) -> BTreeMap<String, WeightFormat> {
    let named = [("vision_encoder", &graphs.vision_encoder), ("decoder", &graphs.decoder)];
    [(Dtype::Int8, "int8"), (Dtype::Uint8, "uint8"), (Dtype::Q8, "int8")]
        .into_iter()
        .filter_map(|(dtype, weight_type)| {
            let graphs: Vec<String> = named
                .iter()
                .filter(|(name, files)| files.contains_key(dtype.as_str()) && !(dtype == Dtype::Q8 && *name == "vision_encoder"))
                .map(|(name, _)| name.to_string())
                .collect();
            let format = WeightFormat {
                op: "MatMulInteger".into(),
                weight_type: weight_type.into(),
                graphs,
                details: BTreeMap::from([("source".to_string(), Value::from("transformers.js scripts/quantize.py"))]),
            };
            (!format.graphs.is_empty()).then(|| (dtype.as_str().to_string(), format))
        })
        .collect()
}

/// Every regular file under `dir`, relative to it, sorted (a model directory's `files`).
pub fn all_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// The files of `graph_file` on disk: the graph and its external data (`<file>_data`,
/// `<file>_data_1`, ... as transformers.js names them, or `<file>.data`), among `files`.
pub fn with_external_data<'a>(graph_file: &str, files: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    files
        .into_iter()
        .filter(|f| {
            *f == graph_file
                || f.strip_prefix(graph_file).is_some_and(|rest| {
                    rest == ".data" || rest == "_data" || rest.strip_prefix("_data_").is_some_and(|n| n.parse::<u32>().is_ok())
                })
        })
        .map(str::to_string)
        .collect()
}

/// Defaults of the text config classes for keys a config.json leaves out.
struct TextDefaults {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    sliding_window: Option<usize>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
}

/// transformers' `GemmaConfig` (PaliGemma 1's text model).
const GEMMA: TextDefaults = TextDefaults {
    hidden_size: 3072,
    num_hidden_layers: 28,
    num_attention_heads: 16,
    num_key_value_heads: 16,
    head_dim: 256,
    vocab_size: 256000,
    sliding_window: None,
    final_logit_softcapping: None,
    attn_logit_softcapping: None,
};
/// transformers' `Gemma2Config` (PaliGemma 2's text model).
const GEMMA2: TextDefaults = TextDefaults {
    hidden_size: 2304,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 256,
    vocab_size: 256000,
    sliding_window: Some(4096),
    final_logit_softcapping: Some(30.0),
    attn_logit_softcapping: Some(50.0),
};
/// `PaliGemmaConfig`'s text config when config.json has none: Gemma with these sizes.
const PALIGEMMA_TEXT: TextDefaults = TextDefaults {
    hidden_size: 2048,
    num_hidden_layers: 18,
    num_attention_heads: 8,
    num_key_value_heads: 1,
    vocab_size: 257152,
    ..GEMMA
};
/// `PaliGemmaConfig.image_token_index`'s default.
const DEFAULT_IMAGE_TOKEN: i64 = 256000;
/// Both text classes' `max_position_embeddings`.
const DEFAULT_MAX_POSITIONS: usize = 8192;
/// The SigLIP patch of every PaliGemma (`PaliGemmaConfig`'s vision default).
const DEFAULT_PATCH: usize = 14;

/// A JSON file of the model directory, parsed; `None` if absent and `optional`.
fn read_json(dir: &Path, file: &'static str, optional: bool) -> Result<Option<Value>, LayoutError> {
    let path = dir.join(file);
    let bad = |problem: String| LayoutError::File {
        dir: dir.to_path_buf(),
        file,
        problem,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && optional => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(bad("is missing".into())),
        Err(e) => return Err(bad(format!("cannot be read ({e})"))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(format!("is not valid JSON ({e})")))
}

/// `key` of `object`, a JSON `null` read as absent.
fn field<'a>(object: &'a Value, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|v| !v.is_null())
}

/// Reads typed values of one JSON file, naming it in every error.
struct Reader {
    path: PathBuf,
}

impl Reader {
    fn error(&self, problem: String) -> LayoutError {
        LayoutError::Config {
            path: self.path.clone(),
            problem,
        }
    }

    fn usize(&self, object: &Value, key: &str, default: usize) -> Result<usize, LayoutError> {
        match field(object, key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| self.error(format!("{key} is {v}, not a positive integer"))),
        }
    }

    fn optional_usize(&self, object: &Value, key: &str, default: Option<usize>) -> Result<Option<usize>, LayoutError> {
        match object.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => self.usize(object, key, 0).map(Some),
        }
    }

    fn optional_f64(&self, object: &Value, key: &str, default: Option<f64>) -> Result<Option<f64>, LayoutError> {
        match object.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(format!("{key} is {v}, not a number"))),
        }
    }

    /// An id or a list of ids (`eos_token_id`).
    fn ids(&self, object: &Value, key: &str) -> Result<Option<Vec<i64>>, LayoutError> {
        let Some(v) = field(object, key) else { return Ok(None) };
        let list = match v {
            Value::Array(items) => items.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>(),
            other => other.as_i64().map(|id| vec![id]),
        };
        list.filter(|ids| !ids.is_empty())
            .map(Some)
            .ok_or_else(|| self.error(format!("{key} is {v}, not a token id or a list of them")))
    }
}

/// The manifest of a transformers.js layout directory (see the module docs). `synthesized` is
/// set; `dtypes` are the decoder's, in [`Dtype::ALL`]'s order.
pub fn manifest(dir: &Path) -> Result<Manifest, LayoutError> {
    let config = read_json(dir, "config.json", false)?.unwrap_or_default();
    let generation = read_json(dir, "generation_config.json", true)?;
    let cfg = Reader {
        path: dir.join("config.json"),
    };
    if field(&config, "model_type").and_then(Value::as_str) != Some("paligemma") {
        return Err(cfg.error(format!(
            "model_type is {}, not \"paligemma\"; this runtime runs PaliGemma and PaliGemma 2",
            field(&config, "model_type").map_or("absent".into(), Value::to_string)
        )));
    }
    let empty = Value::Object(Default::default());
    let (text, defaults) = match field(&config, "text_config") {
        None => (&empty, PALIGEMMA_TEXT),
        Some(text) => match field(text, "model_type").and_then(Value::as_str).unwrap_or("gemma") {
            "gemma" => (text, GEMMA),
            "gemma2" => (text, GEMMA2),
            other => {
                return Err(cfg.error(format!(
                    "text_config.model_type is {other:?}; PaliGemma's text model is gemma (PaliGemma 1) or gemma2 (PaliGemma 2)"
                )))
            }
        },
    };
    let vision = field(&config, "vision_config").unwrap_or(&empty);
    let num_hidden_layers = cfg.usize(text, "num_hidden_layers", defaults.num_hidden_layers)?;
    let sliding_window = if defaults.sliding_window.is_some() {
        cfg.optional_usize(text, "sliding_window", defaults.sliding_window)?
    } else {
        None
    };
    let layer_types = match field(text, "layer_types") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some(t @ ("full_attention" | "sliding_attention")) => Ok(t.to_string()),
                _ => Err(cfg.error(format!(
                    "text_config.layer_types holds {t}; valid: full_attention, sliding_attention"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(cfg.error(format!("text_config.layer_types is {other}, not a list"))),
        // Gemma2Config's rule: sliding, full, sliding, ...; Gemma has no sliding layers.
        None => (0..num_hidden_layers)
            .map(|i| {
                if sliding_window.is_some() && i % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
                .to_string()
            })
            .collect(),
    };
    if layer_types.len() != num_hidden_layers {
        return Err(cfg.error(format!(
            "text_config.layer_types has {} entries for {num_hidden_layers} layers",
            layer_types.len()
        )));
    }

    let (image_config, image_path, image_json) = ImageProcessorConfig::from_model_dir(dir)?;
    let pre = Reader { path: image_path };
    let image_size = image_config.height as usize;
    let patch_size = cfg.usize(vision, "patch_size", DEFAULT_PATCH)?;
    if image_size == 0 || !image_size.is_multiple_of(patch_size) {
        return Err(pre.error(format!("size.height {image_size} is not a whole number of {patch_size} px patches")));
    }
    let num_image_tokens = (image_size / patch_size).pow(2);
    if let Some(n) = field(&image_json, "image_seq_length")
        .and_then(Value::as_u64)
        .filter(|&n| n as usize != num_image_tokens)
    {
        return Err(pre.error(format!(
            "image_seq_length is {n}, but {image_size} px images in {patch_size} px patches (config.json) make {num_image_tokens} image tokens"
        )));
    }

    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(LayoutError::File {
            dir: dir.to_path_buf(),
            file: "tokenizer.json",
            problem: "is missing".into(),
        });
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| LayoutError::File {
        dir: dir.to_path_buf(),
        file: "tokenizer.json",
        problem: format!("cannot be read ({e})"),
    })?;
    let tok = Reader { path: tokenizer_path };
    let token = |name: &str| tokenizer.token_to_id(name).map(i64::from);
    let required = |name: &str| token(name).ok_or_else(|| tok.error(format!("has no {name} token: not a PaliGemma tokenizer")));
    let image_token_id = match field(&config, "image_token_id").or_else(|| field(&config, "image_token_index")) {
        Some(v) => v
            .as_i64()
            .ok_or_else(|| cfg.error(format!("image_token_index is {v}, not a token id")))?,
        None => DEFAULT_IMAGE_TOKEN,
    };
    let image = required("<image>")?;
    if image != image_token_id {
        return Err(cfg.error(format!(
            "image_token_index is {image_token_id}, but tokenizer.json's <image> is {image}: the processor and the model would disagree"
        )));
    }
    let generation_ids = match &generation {
        Some(json) => Reader {
            path: dir.join("generation_config.json"),
        }
        .ids(json, "eos_token_id")?,
        None => None,
    };
    // generate() reads generation_config.json, else the model config (transformers 5 writes the id
    // in text_config), else there is only the tokenizer's.
    let eos_token_id = match generation_ids {
        Some(ids) => ids,
        None => match cfg
            .ids(&config, "eos_token_id")?
            .map_or_else(|| cfg.ids(text, "eos_token_id"), |ids| Ok(Some(ids)))?
        {
            Some(ids) => ids,
            None => vec![required("<eos>")?],
        },
    };

    let files = all_files(dir);
    let graphs = graphs(&files);
    for (files, (_, stem)) in [&graphs.vision_encoder, &graphs.embed_tokens, &graphs.decoder]
        .into_iter()
        .zip(GRAPH_STEMS)
    {
        if files.is_empty() {
            return Err(LayoutError::MissingGraph {
                dir: dir.to_path_buf(),
                stem,
                found: onnx_files(dir).join(", "),
            });
        }
    }
    let dtypes = Dtype::ALL
        .iter()
        .map(|d| d.as_str().to_string())
        .filter(|d| graphs.decoder.contains_key(d))
        .collect();
    let file_sizes = files
        .iter()
        .map(|f| (f.clone(), std::fs::metadata(dir.join(f)).map_or(0, |m| m.len())))
        .collect();
    Ok(Manifest {
        format: "paligemma-onnx".into(),
        format_version: 3,
        source: dir.display().to_string(),
        image_size,
        patch_size,
        num_image_tokens,
        // Configs of older transformers state these at the top level only.
        hidden_size: cfg.usize(text, "hidden_size", cfg.usize(&config, "hidden_size", defaults.hidden_size)?)?,
        vocab_size: cfg.usize(text, "vocab_size", cfg.usize(&config, "vocab_size", defaults.vocab_size)?)?,
        num_hidden_layers,
        num_attention_heads: cfg.usize(text, "num_attention_heads", defaults.num_attention_heads)?,
        num_key_value_heads: cfg.usize(text, "num_key_value_heads", defaults.num_key_value_heads)?,
        head_dim: cfg.usize(text, "head_dim", defaults.head_dim)?,
        sliding_window,
        layer_types,
        max_position_embeddings: cfg.usize(text, "max_position_embeddings", DEFAULT_MAX_POSITIONS)?,
        final_logit_softcapping: cfg.optional_f64(text, "final_logit_softcapping", defaults.final_logit_softcapping)?,
        attn_logit_softcapping: cfg.optional_f64(text, "attn_logit_softcapping", defaults.attn_logit_softcapping)?,
        image_token_id,
        bos_token_id: required("<bos>")?,
        pad_token_id: required("<pad>")?,
        eos_token_id,
        loc_token_start: required("<loc0000>")?,
        seg_token_start: required("<seg000>")?,
        dtypes,
        quantization: quantization(&graphs),
        graphs,
        files,
        file_sizes,
        producer: BTreeMap::new(),
        synthesized: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transformers.js-layout directory: `config` as config.json, a 224 px preprocessor with
    /// `image_seq_length`, the scenes model's tokenizer (its `<image>` is 1664) and empty graph
    /// files named `graphs`.
    fn layout(tag: &str, config: serde_json::Value, image_seq_length: u64, graphs: &[&str]) -> Result<Manifest, LayoutError> {
        layout_edited(tag, config, image_seq_length, graphs, |_| {})
    }

    /// [`layout`] with the directory edited by `edit` before the manifest is made.
    fn layout_edited(
        tag: &str,
        config: serde_json::Value,
        image_seq_length: u64,
        graphs: &[&str],
        edit: impl FnOnce(&Path),
    ) -> Result<Manifest, LayoutError> {
        let dir = std::env::temp_dir().join(format!("paligemma-layout-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("onnx")).unwrap();
        let scenes = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes");
        std::fs::copy(scenes.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let preprocessor = serde_json::json!({"size": {"height": 224, "width": 224}, "image_seq_length": image_seq_length});
        std::fs::write(dir.join("preprocessor_config.json"), preprocessor.to_string()).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        for graph in graphs {
            std::fs::write(dir.join("onnx").join(graph), b"").unwrap();
        }
        edit(&dir);
        assert!(is_layout(&dir));
        let manifest = manifest(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        manifest
    }

    const GRAPHS: [&str; 5] = [
        "vision_encoder.onnx",
        "embed_tokens.onnx",
        "decoder_model_merged.onnx",
        "decoder_model_merged_q4f16.onnx",
        "decoder_model_merged_quantized.onnx",
    ];

    /// google/paligemma2-3b-pt-224's config.json as published: text_config states only what
    /// differs from Gemma2Config (image_token_index changed to this tokenizer's <image>).
    fn paligemma2_config() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
            "hidden_size": 2048, "image_token_index": 1664, "model_type": "paligemma", "pad_token_id": 0,
            "projection_dim": 2304,
            "text_config": {
                "cache_implementation": "hybrid", "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                "hidden_size": 2304, "intermediate_size": 9216, "model_type": "gemma2", "num_hidden_layers": 26,
                "num_image_tokens": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                "torch_dtype": "bfloat16", "vocab_size": 257216
            },
            "vision_config": {
                "hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 27, "num_image_tokens": 256, "num_positions": 256, "patch_size": 14,
                "projection_dim": 2304, "vision_use_head": false
            }
        })
    }

    #[test]
    fn a_paligemma2_config_takes_gemma2_defaults_for_what_it_leaves_out() {
        let m = layout("pg2", paligemma2_config(), 256, &GRAPHS).unwrap();
        assert!(m.synthesized);
        assert_eq!((m.image_size, m.patch_size, m.num_image_tokens), (224, 14, 256));
        assert_eq!((m.hidden_size, m.vocab_size, m.num_hidden_layers), (2304, 257216, 26));
        // Gemma2Config's defaults: 8 heads, 256 per head, softcap 50 on attention, 8192 positions.
        assert_eq!((m.num_attention_heads, m.num_key_value_heads, m.head_dim), (8, 4, 256));
        assert_eq!((m.attn_logit_softcapping, m.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert_eq!((m.sliding_window, m.max_position_embeddings), (Some(4096), 8192));
        assert_eq!(&m.layer_types[..3], ["sliding_attention", "full_attention", "sliding_attention"]);
        assert_eq!(
            (m.image_token_id, m.bos_token_id, m.pad_token_id, m.eos_token_id.clone()),
            (1664, 2, 0, vec![1])
        );
        assert_eq!(m.dtypes, ["fp32", "q8", "q4f16"]);
        assert_eq!(m.graphs.decoder["q8"], "onnx/decoder_model_merged_quantized.onnx");
        assert_eq!(m.graphs.vision_encoder.keys().collect::<Vec<_>>(), ["fp32"]);
    }

    #[test]
    fn the_8bit_dtypes_record_the_weights_transformers_js_quantize_script_writes() {
        let graphs = [
            "vision_encoder_quantized.onnx",
            "vision_encoder_int8.onnx",
            "embed_tokens_quantized.onnx",
            "decoder_model_merged_quantized.onnx",
            "decoder_model_merged_int8.onnx",
            "decoder_model_merged_uint8.onnx",
            "decoder_model_merged_q4.onnx",
        ];
        let m = layout("q8", paligemma2_config(), 256, &graphs).unwrap();
        let formats: Vec<_> = m
            .quantization
            .iter()
            .map(|(dtype, f)| (dtype.as_str(), f.op.as_str(), f.weight_type.as_str(), f.graphs.join(",")))
            .collect();
        // q8's vision encoder has a Conv, so the script gave it uint8 weights; the embeddings'
        // weights feed a Gather; q4 is MatMulNBits.
        assert_eq!(
            formats,
            [
                ("int8", "MatMulInteger", "int8", "vision_encoder,decoder".to_string()),
                ("q8", "MatMulInteger", "int8", "decoder".to_string()),
                ("uint8", "MatMulInteger", "uint8", "decoder".to_string()),
            ]
        );
        let saturating: Vec<_> = ["int8", "q8", "uint8", "q4"]
            .into_iter()
            .filter(|d| m.weight_format(d).is_some_and(|f| f.has_int8_weights_in_integer_matmul()))
            .collect();
        assert_eq!(saturating, ["int8", "q8"]);
    }

    #[test]
    fn a_paligemma1_config_is_gemma_without_window_or_softcaps() {
        // google/paligemma-3b-mix-224's text_config; one without model_type is read as Gemma too.
        let text = serde_json::json!({
            "hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
            "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1, "vocab_size": 257216
        });
        for (tag, text) in [
            ("pg1", text.clone()),
            ("untyped", {
                let mut t = text;
                t.as_object_mut().unwrap().remove("model_type");
                t
            }),
        ] {
            let mut config = paligemma2_config();
            config["text_config"] = text;
            let m = layout(tag, config, 256, &GRAPHS).unwrap();
            assert_eq!(
                (m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.head_dim),
                (18, 8, 1, 256)
            );
            assert_eq!(
                (m.sliding_window, m.attn_logit_softcapping, m.final_logit_softcapping),
                (None, None, None)
            );
            assert!(m.layer_types.iter().all(|t| t == "full_attention"), "{tag}");
        }
    }

    #[test]
    fn the_files_are_read_where_transformers_reads_them() {
        // No generation_config.json and no top-level eos_token_id: text_config's, as generate() uses.
        let mut config = paligemma2_config();
        config.as_object_mut().unwrap().remove("eos_token_id");
        config["text_config"]["eos_token_id"] = serde_json::json!([1, 23]);
        let m = layout("eos", config, 256, &GRAPHS).unwrap();
        assert_eq!(m.eos_token_id, [1, 23]);
        // processor_config.json's image_processor wins over preprocessor_config.json (transformers
        // 5), and serves alone.
        let nested = |dir: &Path| {
            let processor = serde_json::json!({"image_processor": {"size": {"height": 448, "width": 448}, "image_seq_length": 1024}});
            std::fs::write(dir.join("processor_config.json"), processor.to_string()).unwrap();
        };
        let m = layout_edited("nested", paligemma2_config(), 256, &GRAPHS, nested).unwrap();
        assert_eq!((m.image_size, m.num_image_tokens), (448, 1024));
        let alone = |dir: &Path| {
            nested(dir);
            std::fs::remove_file(dir.join("preprocessor_config.json")).unwrap();
        };
        assert_eq!(
            layout_edited("alone", paligemma2_config(), 256, &GRAPHS, alone).unwrap().image_size,
            448
        );
    }

    #[test]
    fn configs_the_runtime_cannot_serve_are_refused_by_name() {
        let error = |tag: &str, edit: fn(&mut serde_json::Value), seq: u64, graphs: &[&str]| {
            let mut config = paligemma2_config();
            edit(&mut config);
            layout(tag, config, seq, graphs).unwrap_err().to_string()
        };
        let e = error("gemma3", |c| c["text_config"]["model_type"] = "gemma3".into(), 256, &GRAPHS);
        assert!(e.contains("text_config.model_type is \"gemma3\""), "{e}");
        let e = error("llava", |c| c["model_type"] = "llava".into(), 256, &GRAPHS);
        assert!(e.contains("model_type is \"llava\""), "{e}");
        let e = error("seq", |_| {}, 1024, &GRAPHS);
        assert!(e.contains("image_seq_length is 1024") && e.contains("make 256 image tokens"), "{e}");
        let e = error("image", |c| c["image_token_index"] = 257152.into(), 256, &GRAPHS);
        assert!(e.contains("image_token_index is 257152") && e.contains("<image> is 1664"), "{e}");
        let e = error(
            "layers",
            |c| c["text_config"]["layer_types"] = serde_json::json!(["full_attention"]),
            256,
            &GRAPHS,
        );
        assert!(e.contains("1 entries for 26 layers"), "{e}");
        let e = error("novision", |_| {}, 256, &["embed_tokens.onnx", "decoder_model_merged.onnx"]);
        assert!(e.contains("no vision_encoder*.onnx"), "{e}");
        let no_image_token = |dir: &Path| {
            let path = dir.join("tokenizer.json");
            let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            tokenizer["added_tokens"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t["content"] != "<image>");
            tokenizer["model"]["vocab"].as_object_mut().unwrap().remove("<image>");
            std::fs::write(&path, tokenizer.to_string()).unwrap();
        };
        let e = layout_edited("noimage", paligemma2_config(), 256, &GRAPHS, no_image_token)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no <image> token"), "{e}");
        let shortest_edge =
            |dir: &Path| std::fs::write(dir.join("preprocessor_config.json"), r#"{"size": {"shortest_edge": 224}}"#).unwrap();
        let e = layout_edited("edge", paligemma2_config(), 256, &GRAPHS, shortest_edge)
            .unwrap_err()
            .to_string();
        assert!(e.contains("preprocessor_config.json") && e.contains("height"), "{e}");
    }

    #[test]
    fn a_hub_download_takes_the_config_files_and_the_picked_graphs_with_their_data() {
        let files: Vec<String> = [
            "README.md",
            "config.json",
            "generation_config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "onnx/vision_encoder.onnx",
            "onnx/vision_encoder_fp16.onnx",
            "onnx/embed_tokens.onnx",
            "onnx/embed_tokens_q4.onnx",
            "onnx/decoder_model_merged.onnx",
            "onnx/decoder_model_merged.onnx_data",
            "onnx/decoder_model_merged_q4.onnx",
            "onnx/decoder_model_merged_q4.onnx_data",
            "onnx/decoder_model_merged_q4.onnx_data_1",
            "onnx/decoder_model_merged_q4f16.onnx",
        ]
        .map(String::from)
        .to_vec();
        let needed = needed_files(&files, "q4".parse().unwrap(), Path::new("owner/repo")).unwrap();
        assert_eq!(
            needed,
            [
                "config.json",
                "generation_config.json",
                "onnx/decoder_model_merged_q4.onnx",
                "onnx/decoder_model_merged_q4.onnx_data",
                "onnx/decoder_model_merged_q4.onnx_data_1",
                "onnx/embed_tokens_q4.onnx",
                "onnx/vision_encoder.onnx",
                "preprocessor_config.json",
                "tokenizer.json",
            ]
        );
        let mixed = needed_files(&files, "vision=fp16,decoder=q4f16".parse().unwrap(), Path::new("owner/repo")).unwrap();
        assert!(mixed.contains(&"onnx/vision_encoder_fp16.onnx".to_string()) && mixed.contains(&"onnx/embed_tokens.onnx".to_string()));
        let missing = needed_files(&files, "vision=q4".parse().unwrap(), Path::new("owner/repo")).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("owner/repo: vision_encoder has no q4 file (it has: fp16, fp32)"),
            "{missing}"
        );
    }
}
