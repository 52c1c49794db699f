//! The model directory's `manifest.json` (written by `python -m export convert`, see
//! `export/manifest.py`): every shape, id and file name the runtime uses comes from here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "paligemma-onnx";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the manifest ({source}); convert the model with `python -m export convert MODEL OUT_DIR`")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: format {found:?} version {version}, this runtime reads {FORMAT:?} version {FORMAT_VERSION}; re-run the export with this repository's `export/`")]
    Format { path: PathBuf, found: String, version: u32 },
    #[error("{path}: the model has no {dtype} graphs (it has: {available}); pick one with --dtype, or convert with --dtype fp32|fp16 or --quantize int8|int4 (dtypes int8, q4)")]
    MissingDtype { path: PathBuf, dtype: String, available: String },
}

/// Graph files per dtype, e.g. `{"fp32": "onnx/decoder_model_merged.onnx"}`.
pub type GraphFiles = BTreeMap<String, String>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    pub vision_encoder: GraphFiles,
    pub embed_tokens: GraphFiles,
    pub decoder: GraphFiles,
    pub seg_decoder: Option<GraphFiles>,
}

/// One converted model, as `export/manifest.py` describes it. Key names are the Hugging Face
/// config keys, so one grep finds a concept on both sides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub source: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_image_tokens: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
    pub layer_types: Vec<String>,
    pub max_position_embeddings: usize,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub image_token_id: i64,
    pub bos_token_id: i64,
    pub pad_token_id: i64,
    pub eos_token_id: Vec<i64>,
    pub loc_token_start: i64,
    pub seg_token_start: i64,
    pub dtypes: Vec<String>,
    pub graphs: Graphs,
    pub files: Vec<String>,
    pub file_sizes: BTreeMap<String, u64>,
    pub producer: BTreeMap<String, String>,
}

impl Manifest {
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
        if manifest.format != FORMAT || manifest.format_version != FORMAT_VERSION {
            return Err(ConfigError::Format {
                path,
                found: manifest.format,
                version: manifest.format_version,
            });
        }
        Ok(manifest)
    }

    /// The file of `graph` in `dtype`, relative to the model directory.
    pub fn graph_file<'a>(
        &self,
        model_dir: &Path,
        graph: &'a GraphFiles,
        dtype: &str,
    ) -> Result<&'a str, ConfigError> {
        graph.get(dtype).map(String::as_str).ok_or_else(|| ConfigError::MissingDtype {
            path: model_dir.join(MANIFEST_FILE),
            dtype: dtype.to_string(),
            available: graph.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }
}
