//! The model's ONNX Runtime sessions, checked against the manifest, with one typed call per graph:
//! `encode_image`, `embed_tokens`, `prefill` and `decode` (the portable decoder) or `step_slots`
//! (the GroupQueryAttention decoder, its cache updated in place), `decode_masks`.
//!
//! Tensor names follow the transformers.js PaliGemma convention (see `export/`). Only inputs a
//! graph declares are fed: a community decoder without `attention_mask`/`token_type_ids` still
//! runs, and [`DecoderInputs`] tells the caller what that costs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{s, Array, Array2, Array3, Array4, ArrayView2, ArrayView3, Dimension, Ix3, Ix4};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session, SessionInputValue};
use ort::value::{DynTensorValueType, DynValue, Tensor, TensorElementType, ValueType};

use crate::config::{ConfigError, DecoderFlavour, Dtype, DtypeChoice, Manifest};
use crate::cpu::{int8_weight_kernels_saturate, INT8_EXACT_FEATURES};
use crate::onnxruntime::{build_session, ExecutionProvider, IoBindingMode, SessionError};

/// Why the model's graphs cannot be opened or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest has no file of the dtype asked for.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// ONNX Runtime cannot be loaded, or a graph's session cannot be built.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A graph's input or output names, element types, static sizes or layer count differ from
    /// what the manifest says.
    #[error("{graph} ({path}) does not match {}: {what}: expected {expected}, found {found}; {}", origin.against(), origin.fix())]
    Mismatch {
        /// The graph: `vision_encoder`, `embed_tokens`, `decoder` or `seg_decoder`.
        graph: &'static str,
        /// Its ONNX file.
        path: PathBuf,
        /// What was compared, e.g. `shape of input pixel_values`.
        what: String,
        /// What the manifest and this runtime expect, e.g. `[?,3,224,224]`.
        expected: String,
        /// What the graph declares.
        found: String,
        /// Where the expectation came from, which says what to do.
        origin: Origin,
    },
    /// A tensor read or fed as float32 is float16 or bfloat16 in the graph: a bfloat16
    /// conversion, or graphs of different float types.
    #[error("{graph} ({path}) has {found} {what}; this runtime runs float32 and float16 graphs (convert with --dtype fp32 or fp16)")]
    ElementType {
        /// The graph: `vision_encoder`, `embed_tokens`, `decoder` or `seg_decoder`.
        graph: &'static str,
        /// Its ONNX file.
        path: PathBuf,
        /// The tensor, e.g. `input inputs_embeds`.
        what: String,
        /// Its element type in the graph.
        found: String,
    },
    /// ONNX Runtime failed to run a graph or to make one of its tensors; its error is the source.
    #[error("running {graph} failed")]
    Ort {
        /// The graph: `vision_encoder`, `embed_tokens`, `decoder` or `seg_decoder`.
        graph: &'static str,
        /// ONNX Runtime's error, with its code (`ort::Error::code`).
        #[source]
        source: ort::Error,
    },
    /// A run's inputs or outputs are not what they must be (a missing output, a wrong rank, image
    /// tokens and features that differ in number).
    #[error("running {graph} failed: {message}")]
    Run {
        /// The graph that was run.
        graph: &'static str,
        /// What was wrong, with both numbers.
        message: String,
    },
    /// Growing the decoder's attention mask or token types by one position failed.
    #[error("extending the decoder's {what} failed")]
    Shape {
        /// `attention_mask` or `token_type_ids`.
        what: &'static str,
        /// ndarray's error.
        #[source]
        source: ndarray::ShapeError,
    },
    /// Masks were asked of a model converted without `--seg-vae`.
    #[error("this model has no segmentation decoder; convert it with `--seg-vae vae-oid.npz` to get masks")]
    NoSegDecoder,
}

/// Where a model's description came from: what a graph that disagrees with it is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A conversion's `manifest.json`.
    Manifest,
    /// A transformers.js layout's config files (`transformers_js.rs`).
    TransformersJs,
}

impl Origin {
    fn against(self) -> &'static str {
        match self {
            Origin::Manifest => "manifest.json",
            Origin::TransformersJs => "its config files (config.json, the processor and tokenizer files) or the other graphs",
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Origin::Manifest => "the graph and the manifest come from different conversions — re-run `python -m export convert`",
            Origin::TransformersJs => {
                "the graphs and config files come from different exports, or the graph is not in the transformers.js PaliGemma layout; take them all from one repository"
            }
        }
    }
}

fn run_error(graph: &'static str) -> impl Fn(ort::Error) -> ModelError {
    move |source| ModelError::Ort { graph, source }
}

/// A session plus where it came from, for messages.
struct Graph {
    name: &'static str,
    path: PathBuf,
    session: Session,
    /// The model's description came from a transformers.js layout's config files, not a manifest.
    synthesized: bool,
}

impl Graph {
    #[allow(clippy::too_many_arguments)]
    fn open(
        name: &'static str,
        dir: &Path,
        file: &str,
        eps: &[ExecutionProvider],
        threads: Option<usize>,
        config_entries: &[(&str, &str)],
        providers: &mut Vec<(String, Vec<String>)>,
        warnings: &mut Vec<String>,
    ) -> Result<Graph, ModelError> {
        let path = dir.join(file);
        let (session, report) = build_session(&path, eps, threads, config_entries)?;
        providers.push((name.to_string(), report.providers));
        // Every graph meets the same failing provider: say it once.
        for warning in report.warnings {
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        Ok(Graph {
            name,
            path,
            session,
            synthesized: false,
        })
    }

    /// The float type of input (or output) `name`: float16 where the graph declares it, else
    /// float32 (a missing name or another type is reported by [`check`](Self::check)).
    fn float(&self, output: bool, name: &str) -> Float {
        let outlets = if output { self.session.outputs() } else { self.session.inputs() };
        match outlets.iter().find(|o| o.name() == name).map(|o| o.dtype()) {
            Some(ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            }) => Float::F16,
            _ => Float::F32,
        }
    }

    fn has_input(&self, name: &str) -> bool {
        self.session.inputs().iter().any(|i| i.name() == name)
    }

    fn mismatch(&self, what: impl Into<String>, expected: impl ToString, found: impl ToString) -> ModelError {
        ModelError::Mismatch {
            graph: self.name,
            path: self.path.clone(),
            what: what.into(),
            expected: expected.to_string(),
            found: found.to_string(),
            origin: if self.synthesized {
                Origin::TransformersJs
            } else {
                Origin::Manifest
            },
        }
    }

    /// Every input is one the runtime feeds: an input it does not know would fail every run.
    fn check_inputs(&self, known: &[&str], known_prefix: Option<&str>) -> Result<(), ModelError> {
        let unknown = self
            .session
            .inputs()
            .iter()
            .map(|i| i.name())
            .find(|name| !known.contains(name) && !known_prefix.is_some_and(|p| name.starts_with(p)));
        match unknown {
            Some(name) => {
                let mut feeds: Vec<String> = known.iter().map(|k| k.to_string()).collect();
                feeds.extend(known_prefix.map(|p| format!("{p}{{i}}.key/.value")));
                Err(self.mismatch("inputs", format!("only inputs this runtime feeds ({})", feeds.join(", ")), name))
            }
            None => Ok(()),
        }
    }

    /// Checks that `name` is an input (or output) with element type `ty` and, where the graph's
    /// axis is static, the size in `dims` (`None`: any size).
    fn check(&self, output: bool, name: &str, ty: TensorElementType, dims: &[Option<usize>]) -> Result<(), ModelError> {
        let outlets = if output { self.session.outputs() } else { self.session.inputs() };
        let kind = if output { "output" } else { "input" };
        let Some(outlet) = outlets.iter().find(|o| o.name() == name) else {
            let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
            return Err(self.mismatch(format!("{kind} names"), name, names.join(", ")));
        };
        let ValueType::Tensor { ty: found_ty, shape, .. } = outlet.dtype() else {
            return Err(self.mismatch(format!("{kind} {name}"), "a tensor", outlet.dtype()));
        };
        if *found_ty != ty {
            if matches!(found_ty, TensorElementType::Float16 | TensorElementType::Bfloat16) && ty == TensorElementType::Float32 {
                return Err(ModelError::ElementType {
                    graph: self.name,
                    path: self.path.clone(),
                    what: format!("{kind} {name}"),
                    found: found_ty.to_string(),
                });
            }
            return Err(self.mismatch(format!("element type of {kind} {name}"), ty, found_ty));
        }
        let fmt = |d: &[Option<usize>]| {
            let parts: Vec<String> = d.iter().map(|x| x.map_or("?".into(), |v| v.to_string())).collect();
            format!("[{}]", parts.join(","))
        };
        let found: Vec<Option<usize>> = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
        let fits = found.len() == dims.len()
            && found.iter().zip(dims).all(|(f, want)| match (f, want) {
                (Some(f), Some(w)) => f == w,
                _ => true,
            });
        if !fits {
            return Err(self.mismatch(format!("shape of {kind} {name}"), fmt(dims), fmt(&found)));
        }
        Ok(())
    }

    fn run<'s>(&'s mut self, inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)>) -> Result<ort::session::SessionOutputs<'s>, ModelError> {
        let name = self.name;
        self.session.run(inputs).map_err(run_error(name))
    }

    /// [`run`](Self::run), then ONNX Runtime hands the CPU arena's unused memory back to the
    /// system (`memory.enable_memory_arena_shrinkage`): the activations of a long prompt's prefill
    /// grow with its length squared, and the arena would keep them for good.
    fn run_shrinking<'s>(
        &'s mut self,
        inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
        options: &'s RunOptions,
    ) -> Result<ort::session::SessionOutputs<'s>, ModelError> {
        let name = self.name;
        self.session.run_with_options(inputs, options).map_err(run_error(name))
    }
}

/// Which optional inputs the portable decoder declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderInputs {
    pub attention_mask: bool,
    pub token_type_ids: bool,
    pub position_ids: bool,
    /// optimum's merged decoders choose their branch with a bool `use_cache_branch` (true once a
    /// cache exists), as transformers.js feeds it.
    pub use_cache_branch: bool,
}

impl DecoderInputs {
    /// Without a mask there is no padding and no prefix-LM block: batch 1 only.
    pub fn supports_batching(&self) -> bool {
        self.attention_mask && self.token_type_ids
    }
}

/// The KV cache: one key and one value tensor per layer, `[B,KVH,P,D]` in the graphs' float type,
/// held as the values ONNX Runtime returned, so a step feeds the previous step's `present.*`
/// without a copy.
pub struct KvCache {
    keys: Vec<DynValue>,
    values: Vec<DynValue>,
}

/// The GroupQueryAttention decoder's cache: per layer one key and one value buffer
/// `[R,KVH,capacity,D]`, row r's positions from index 0 (no padding: the graph takes each row's
/// length), bound through one IoBinding as both `past_key_values.*` and `present.*`, so ONNX
/// Runtime writes each step's keys and values in place and copies nothing else.
pub struct SlotCache {
    keys: Vec<Tensor<f32>>,
    values: Vec<Tensor<f32>>,
    binding: IoBinding,
    capacity: usize,
}

impl SlotCache {
    /// Positions each row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Where a row of an assembled [`SlotCache`] comes from.
#[derive(Clone, Copy)]
pub enum SlotSource<'a> {
    /// A prefill's cache (`[1,KVH,L,D]`).
    Prefill(&'a KvCache),
    /// Row `.1` of a slot cache.
    Slots(&'a SlotCache, usize),
}

/// One row of an assembled cache: `cache`'s row `row`, positions `from..P`.
#[derive(Clone, Copy)]
pub struct CacheRow<'a> {
    pub cache: &'a KvCache,
    pub row: usize,
    pub from: usize,
}

/// The element type of the float tensors at the boundary of the vision, embedding and decoder
/// graphs: float32 (fp32 and the quantized dtypes) or float16 (`--dtype fp16` conversions, for GPU
/// hosts). The pipeline works in f32 either way; f16 values are converted where they cross, which
/// is exact from f16 to f32 and rounds to nearest-even the other way, as numpy's `astype` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Float {
    F32,
    F16,
}

impl Float {
    /// See [`ModelSessions::assemble_cache`]; `rows` are (tensor, row, first position).
    fn assemble(self, rows: &[(&DynValue, usize, usize)], len: usize, m: &Manifest) -> Result<DynValue, ModelError> {
        let shape = (rows.len(), m.num_key_value_heads, len, m.head_dim);
        match self {
            Float::F32 => assemble_rows::<f32>(rows, shape),
            Float::F16 => assemble_rows::<f16>(rows, shape),
        }
    }

    fn element_type(self) -> TensorElementType {
        match self {
            Float::F32 => TensorElementType::Float32,
            Float::F16 => TensorElementType::Float16,
        }
    }

    fn tensor<D: Dimension + 'static>(self, array: Array<f32, D>, graph: &'static str) -> Result<DynValue, ModelError> {
        let value = match self {
            Float::F32 => Tensor::from_array(array).map_err(run_error(graph))?.into_dyn(),
            Float::F16 => Tensor::from_array(array.mapv(f16::from_f32)).map_err(run_error(graph))?.into_dyn(),
        };
        Ok(value)
    }
}

/// ONNX Runtime's session config key (`kOrtSessionOptionsAvx2PrecisionMode`) that rewrites constant
/// int8 weights of its integer MatMul ops to uint8 when its int8 kernels can saturate, so the exact
/// uint8 kernels run (`Avx2WeightS8ToU8Transformer`).
const X64_QUANT_PRECISION: &str = "session.x64quantprecision";

/// Whether the `graph` file picked in `dtype` holds int8 weights whose kernels would saturate on
/// this CPU: it is then built with [`X64_QUANT_PRECISION`]. Only int8 weights in integer MatMul ops
/// (version 1 conversions' `int8`, transformers.js exports' `int8` and `q8`), and only on CPUs
/// without VNNI.
fn needs_exact_int8(manifest: &Manifest, graph: &str, dtype: Dtype) -> Option<String> {
    match manifest.weight_format(dtype.as_str()) {
        Some(format)
            if format.has_int8_weights_in_integer_matmul()
                && format.graphs.iter().any(|g| g == graph)
                && int8_weight_kernels_saturate() =>
        {
            Some(format.op)
        }
        _ => None,
    }
}

/// The sessions of one model directory.
pub struct ModelSessions {
    manifest: Manifest,
    vision: Graph,
    embed: Graph,
    decoder: Graph,
    seg: Option<Graph>,
    floats: Floats,
    decoder_inputs: DecoderInputs,
    /// The decoder is the GroupQueryAttention one (`decoder_gqa`).
    in_place: bool,
    past_names: Vec<(String, String)>,
    present_names: Vec<(String, String)>,
    /// Run options of prefill runs: the CPU arena shrinks after them (see `Graph::run_shrinking`).
    shrink_arena: RunOptions,
    /// Where the portable decoder's `present.*` outputs are bound (`--io-binding`): the CUDA
    /// device's memory, so the cache never leaves the GPU between steps, or host memory; `None`:
    /// no IoBinding, ONNX Runtime returns them in host memory.
    cache_memory: Option<MemoryInfo<'static>>,
    /// (graph, execution providers ONNX Runtime assigned nodes to)
    pub providers: Vec<(String, Vec<String>)>,
    /// Providers that could not start while a later one in the list took over.
    pub warnings: Vec<String>,
    /// (graph, file, dtype) of each graph opened.
    pub files: Vec<(String, String, Dtype)>,
}

/// The float type each graph takes and gives at the pipeline's boundaries, read from the graph
/// itself: graphs of different dtypes (`--dtype vision=fp16,decoder=q4`) meet in one run, each
/// converted where it crosses.
#[derive(Debug, Clone, Copy)]
struct Floats {
    pixel_values: Float,
    image_features: Float,
    embeddings: Float,
    decoder_embeds: Float,
    logits: Float,
    cache: Float,
}

impl ModelSessions {
    pub fn open(
        dir: &Path,
        manifest: Manifest,
        choice: DtypeChoice,
        eps: &[ExecutionProvider],
        threads: Option<usize>,
        flavour: DecoderFlavour,
        io_binding: IoBindingMode,
    ) -> Result<ModelSessions, ModelError> {
        let mut providers = Vec::new();
        let mut warnings = Vec::new();
        let mut files = Vec::new();
        let m = &manifest;
        // A dtype the model lacks is the first thing to say.
        let selection = m.select(dir, choice)?;
        let mut open = |name: &'static str, file: &str, dtype: Dtype| -> Result<Graph, ModelError> {
            let entries: &[(&str, &str)] = if let Some(op) = needs_exact_int8(m, name, dtype) {
                // A transformers.js export cannot be re-converted, only replaced.
                const EXACT_INT8: &str =
                    "`python -m export convert --quantize int8` (MatMulNBits 8-bit: exact on every CPU, faster to decode)";
                let instead = if m.synthesized {
                    format!("transformers.js' quantize script writes its int8 graphs, and its q8 graphs without a Conv, so: run the export's --dtype q4 or --dtype fp32, or convert the checkpoint with {EXACT_INT8}")
                } else {
                    format!("re-convert with this version's {EXACT_INT8}, or run --dtype fp32")
                };
                warnings.push(format!(
                    "{file} holds int8 weights ({op}), which ONNX Runtime sums with saturating 16-bit \
                     instructions on this CPU: it has no {INT8_EXACT_FEATURES}. Running it with ONNX \
                     Runtime's exact uint8 kernels instead ({X64_QUANT_PRECISION}=1), which is slower; {instead}"
                ));
                &[(X64_QUANT_PRECISION, "1")]
            } else {
                &[]
            };
            files.push((name.to_string(), file.to_string(), dtype));
            let mut graph = Graph::open(name, dir, file, eps, threads, entries, &mut providers, &mut warnings)?;
            graph.synthesized = m.synthesized;
            Ok(graph)
        };
        let decoder_dtype = selection.decoder.1;
        let in_place = match flavour {
            DecoderFlavour::Auto => selection.decoder_gqa.is_some() && eps.iter().all(|e| *e == ExecutionProvider::Cpu),
            DecoderFlavour::Portable => false,
            DecoderFlavour::Gqa if selection.decoder_gqa.is_none() => {
                let why = if m.synthesized {
                    "transformers.js exports have none; run --decoder portable"
                } else if decoder_dtype == Dtype::Fp16 {
                    "float16 conversions have none (the GroupQueryAttention decoder is built in float32); run --decoder portable"
                } else if m.format_version < 3 {
                    "conversions before manifest format version 3 have none; convert again with this version's `python -m export convert`, or run --decoder portable"
                } else {
                    "this conversion has none (a head layout ONNX Runtime's GroupQueryAttention refuses, or a copy without it); run --decoder portable"
                };
                let (path, dtype) = (dir.join(crate::config::MANIFEST_FILE), decoder_dtype.to_string());
                return Err(ConfigError::NoGqaDecoder { path, dtype, why }.into());
            }
            DecoderFlavour::Gqa => true,
        };
        let vision = open("vision_encoder", &selection.vision_encoder.0, selection.vision_encoder.1)?;
        let embed = open("embed_tokens", &selection.embed_tokens.0, selection.embed_tokens.1)?;
        // Named after the manifest key: the providers report and messages say which decoder ran.
        let decoder = match &selection.decoder_gqa {
            Some(file) if in_place => open("decoder_gqa", file, decoder_dtype)?,
            _ => open("decoder", &selection.decoder.0, decoder_dtype)?,
        };
        let seg = match &selection.seg_decoder {
            Some(file) => Some(open("seg_decoder", file, Dtype::Fp32)?),
            None => None,
        };
        let layers = m.num_hidden_layers;
        let past_names = (0..layers)
            .map(|i| (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")))
            .collect();
        let present_names = (0..layers)
            .map(|i| (format!("present.{i}.key"), format!("present.{i}.value")))
            .collect();
        let decoder_inputs = DecoderInputs {
            attention_mask: decoder.has_input("attention_mask"),
            token_type_ids: decoder.has_input("token_type_ids"),
            position_ids: decoder.has_input("position_ids"),
            use_cache_branch: decoder.has_input("use_cache_branch"),
        };
        let floats = Floats {
            pixel_values: vision.float(false, "pixel_values"),
            image_features: vision.float(true, "image_features"),
            embeddings: embed.float(true, "inputs_embeds"),
            decoder_embeds: decoder.float(false, "inputs_embeds"),
            logits: decoder.float(true, "logits"),
            cache: decoder.float(false, "past_key_values.0.key"),
        };
        // TensorRT's outputs live in CUDA memory too.
        let gpu = [ExecutionProvider::Cuda.ort_name(), ExecutionProvider::TensorRt.ort_name()];
        let on_cuda = providers
            .iter()
            .any(|(graph, names)| graph == decoder.name && names.iter().any(|n| gpu.contains(&n.as_str())));
        let device = match (io_binding, on_cuda) {
            (IoBindingMode::Off, _) | (IoBindingMode::Auto, false) => None,
            (_, true) => Some(AllocationDevice::CUDA),
            (IoBindingMode::On, false) => Some(AllocationDevice::CPU),
        };
        let cache_memory = device
            .map(|device| MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default))
            .transpose()
            .map_err(run_error("decoder"))?;
        let mut shrink_arena = RunOptions::new().map_err(run_error("decoder"))?;
        shrink_arena
            .set("memory.enable_memory_arena_shrinkage", "cpu:0")
            .map_err(run_error("decoder"))?;
        let sessions = ModelSessions {
            shrink_arena,
            cache_memory,
            vision,
            embed,
            decoder,
            seg,
            floats,
            decoder_inputs,
            in_place,
            past_names,
            present_names,
            providers,
            warnings,
            files,
            manifest,
        };
        sessions.check_graphs()?;
        Ok(sessions)
    }

    /// Every graph's names, element types and static sizes against the manifest.
    fn check_graphs(&self) -> Result<(), ModelError> {
        use TensorElementType::{Float32, Int64};
        let m = &self.manifest;
        let f = &self.floats;
        let (s, n, h) = (m.image_size, m.num_image_tokens, m.hidden_size);
        let (kvh, d) = (m.num_key_value_heads, m.head_dim);
        self.vision.check(
            false,
            "pixel_values",
            f.pixel_values.element_type(),
            &[None, Some(3), Some(s), Some(s)],
        )?;
        self.vision
            .check(true, "image_features", f.image_features.element_type(), &[None, Some(n), Some(h)])?;
        self.embed.check(false, "input_ids", Int64, &[None, None])?;
        self.embed
            .check(true, "inputs_embeds", f.embeddings.element_type(), &[None, None, Some(h)])?;
        self.decoder
            .check(false, "inputs_embeds", f.decoder_embeds.element_type(), &[None, None, Some(h)])?;
        self.decoder
            .check(true, "logits", f.logits.element_type(), &[None, None, Some(m.vocab_size)])?;
        let float = f.cache.element_type();
        if self.in_place {
            self.decoder.check(false, "position_ids", Int64, &[None, None])?;
            self.decoder.check(false, "seqlens_k", TensorElementType::Int32, &[None])?;
            self.decoder.check(false, "total_sequence_length", TensorElementType::Int32, &[])?;
        }
        for name in ["attention_mask", "token_type_ids", "position_ids"] {
            if self.decoder.has_input(name) {
                self.decoder.check(false, name, Int64, &[None, None])?;
            }
        }
        if self.decoder_inputs.use_cache_branch {
            self.decoder.check(false, "use_cache_branch", TensorElementType::Bool, &[Some(1)])?;
        }
        self.vision.check_inputs(&["pixel_values"], None)?;
        self.embed.check_inputs(&["input_ids"], None)?;
        let decoder_inputs: &[&str] = if self.in_place {
            &["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"]
        } else {
            &[
                "inputs_embeds",
                "attention_mask",
                "token_type_ids",
                "position_ids",
                "use_cache_branch",
            ]
        };
        self.decoder.check_inputs(decoder_inputs, Some("past_key_values."))?;
        if let Some(seg) = &self.seg {
            seg.check_inputs(&["codes"], None)?;
        }
        let kv = [None, Some(kvh), None, Some(d)];
        for ((pk, pv), (ok, ov)) in self.past_names.iter().zip(&self.present_names) {
            self.decoder.check(false, pk, float, &kv)?;
            self.decoder.check(false, pv, float, &kv)?;
            self.decoder.check(true, ok, float, &kv)?;
            self.decoder.check(true, ov, float, &kv)?;
        }
        let layers_in_graph = self
            .decoder
            .session
            .inputs()
            .iter()
            .filter(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".key"))
            .count();
        if layers_in_graph != m.num_hidden_layers {
            return Err(self.decoder.mismatch(
                "number of layers (past_key_values.*.key inputs)",
                m.num_hidden_layers,
                layers_in_graph,
            ));
        }
        if let Some(seg) = &self.seg {
            seg.check(false, "codes", Int64, &[None, Some(16)])?;
            seg.check(true, "masks", Float32, &[None, Some(64), Some(64)])?;
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `false` for a portable decoder without attention_mask/token_type_ids (a community
    /// export): requests then run one at a time.
    pub fn supports_batching(&self) -> bool {
        self.in_place || self.decoder_inputs.supports_batching()
    }

    /// The batching inputs the portable decoder lacks (`attention_mask`, `token_type_ids`).
    pub fn missing_batch_inputs(&self) -> Vec<&'static str> {
        let d = &self.decoder_inputs;
        [("attention_mask", d.attention_mask), ("token_type_ids", d.token_type_ids)]
            .into_iter()
            .filter(|(_, declared)| !declared && !self.in_place)
            .map(|(name, _)| name)
            .collect()
    }

    /// The decoder is the GroupQueryAttention one: steps run on a [`SlotCache`]
    /// ([`step_slots`](Self::step_slots)), not through [`decode`](Self::decode).
    pub fn in_place(&self) -> bool {
        self.in_place
    }

    /// The memory the decoder's KV cache is bound to through an IoBinding, by ONNX Runtime's
    /// allocation device name (`Cpu`, `Cuda`); `None` without one (`--io-binding`). The
    /// GroupQueryAttention decoder's slot cache is always bound, in host memory.
    pub fn cache_binding(&self) -> Option<String> {
        if self.in_place {
            return Some(AllocationDevice::CPU.as_str().to_string());
        }
        self.cache_memory.as_ref().map(|m| m.allocation_device().as_str().to_string())
    }

    /// An empty cache (`P = 0`) for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> Result<KvCache, ModelError> {
        let m = &self.manifest;
        let empty = || -> Result<DynValue, ModelError> {
            let shape = (batch, m.num_key_value_heads, 0, m.head_dim);
            self.floats.cache.tensor(Array4::<f32>::zeros(shape), "decoder")
        };
        let layers = m.num_hidden_layers;
        Ok(KvCache {
            keys: (0..layers).map(|_| empty()).collect::<Result<_, _>>()?,
            values: (0..layers).map(|_| empty()).collect::<Result<_, _>>()?,
        })
    }

    /// A cache of `rows.len()` rows and `len` positions: row `r` holds `rows[r]`'s positions
    /// right-aligned, the positions before them zero (left pads, which the attention mask hides).
    /// This is how a request joins a running batch and how finished rows leave it: one copy of
    /// the rows kept, at that moment only.
    pub fn assemble_cache(&self, rows: &[CacheRow<'_>], len: usize) -> Result<KvCache, ModelError> {
        let layers = self.manifest.num_hidden_layers;
        let mut cache = KvCache {
            keys: Vec::with_capacity(layers),
            values: Vec::with_capacity(layers),
        };
        for layer in 0..layers {
            let keys: Vec<(&DynValue, usize, usize)> = rows.iter().map(|r| (&r.cache.keys[layer], r.row, r.from)).collect();
            let values: Vec<(&DynValue, usize, usize)> = rows.iter().map(|r| (&r.cache.values[layer], r.row, r.from)).collect();
            cache.keys.push(self.floats.cache.assemble(&keys, len, &self.manifest)?);
            cache.values.push(self.floats.cache.assemble(&values, len, &self.manifest)?);
        }
        Ok(cache)
    }

    /// Hands the decoder's CPU arena back to the system after a long prompt. A prefill shrinks the
    /// arena as it ends, but not the region its own outputs (the KV cache) live in; once that cache
    /// is gone, this two-position prefill on an empty cache frees it (one decode step's cost).
    pub fn release_arena(&mut self) -> Result<(), ModelError> {
        let embeds = Array3::<f32>::zeros((1, 2, self.manifest.hidden_size));
        self.prefill(embeds.view())?;
        Ok(())
    }

    /// One prompt alone: `inputs_embeds` f32[1,L,H] at positions 1..=L, every position a prompt
    /// token (the prefix-LM block). Its last position's logits f32[1,V] and its cache `[1,KVH,L,D]`.
    pub fn prefill(&mut self, inputs_embeds: ArrayView3<f32>) -> Result<(Array2<f32>, KvCache), ModelError> {
        let len = inputs_embeds.shape()[1];
        let positions = Array2::from_shape_fn((1, len), |(_, i)| i as i64 + 1);
        let mut cache = self.new_cache(1)?;
        let logits = if self.in_place {
            let err = run_error("decoder");
            let last = i32::try_from(len).unwrap_or(i32::MAX);
            let inputs = vec![
                ("position_ids", Tensor::from_array(positions).map_err(&err)?.into_dyn()),
                (
                    "seqlens_k",
                    Tensor::from_array(ndarray::arr1(&[last - 1])).map_err(&err)?.into_dyn(),
                ),
                (
                    "total_sequence_length",
                    Tensor::from_array(ndarray::arr0(last)).map_err(&err)?.into_dyn(),
                ),
            ];
            self.run_decoder(inputs_embeds, inputs, &mut cache)?
        } else {
            let (mask, types) = (Array2::<i64>::ones((1, len)), Array2::<i64>::zeros((1, len)));
            self.decode(inputs_embeds, mask.view(), types.view(), positions.view(), &mut cache)?
        };
        Ok((logits, cache))
    }

    /// A [`SlotCache`] of `rows.len()` rows that hold `capacity` positions each: row `r` gets the
    /// first `rows[r].1` positions of `rows[r].0`. How a request joins the in-place batch and how
    /// finished rows leave it (and how it grows): one copy of the positions kept, at that moment.
    pub fn assemble_slots(&self, rows: &[(SlotSource<'_>, usize)], capacity: usize) -> Result<SlotCache, ModelError> {
        let err = run_error("decoder");
        let m = &self.manifest;
        let shape = [rows.len(), m.num_key_value_heads, capacity, m.head_dim];
        let layer = |layer: usize, key: bool| -> Result<Tensor<f32>, ModelError> {
            let mut buffer = Tensor::<f32>::new(&Allocator::default(), shape).map_err(&err)?;
            let mut target = buffer.extract_array_mut().into_dimensionality::<Ix4>().map_err(kv_rank)?;
            for (r, &(source, len)) in rows.iter().enumerate() {
                let copy;
                let (values, row) = match source {
                    SlotSource::Prefill(cache) => {
                        let value = if key { &cache.keys[layer] } else { &cache.values[layer] };
                        copy = device_to_host(value)?;
                        let value = copy.as_ref().unwrap_or(value);
                        (value.try_extract_array::<f32>().map_err(&err)?, 0)
                    }
                    SlotSource::Slots(cache, row) => {
                        let value = if key { &cache.keys[layer] } else { &cache.values[layer] };
                        (value.extract_array(), row)
                    }
                };
                let values = values.into_dimensionality::<Ix4>().map_err(kv_rank)?;
                target.slice_mut(s![r, .., ..len, ..]).assign(&values.slice(s![row, .., ..len, ..]));
            }
            Ok(buffer)
        };
        let layers = m.num_hidden_layers;
        let mut keys = (0..layers).map(|l| layer(l, true)).collect::<Result<Vec<_>, _>>()?;
        let mut values = (0..layers).map(|l| layer(l, false)).collect::<Result<Vec<_>, _>>()?;
        let mut binding = self.decoder.session.create_binding().map_err(&err)?;
        for (layer, ((past_key, past_value), (present_key, present_value))) in self.past_names.iter().zip(&self.present_names).enumerate() {
            binding.bind_input(past_key.as_str(), &keys[layer]).map_err(&err)?;
            binding.bind_input(past_value.as_str(), &values[layer]).map_err(&err)?;
            binding.bind_output(present_key.as_str(), &mut keys[layer]).map_err(&err)?;
            binding.bind_output(present_value.as_str(), &mut values[layer]).map_err(&err)?;
        }
        binding
            .bind_output_to_device("logits", &host_memory().map_err(&err)?)
            .map_err(&err)?;
        Ok(SlotCache {
            keys,
            values,
            binding,
            capacity,
        })
    }

    /// One GroupQueryAttention decoder run of one new position per row on `cache`, written in
    /// place: `inputs_embeds` f32[R,1,H], `position_ids` i64[R,1], `seqlens_k` each row's length
    /// after this run minus 1 (at most `cache.capacity() - 1`). Returns the logits f32[R,V].
    pub fn step_slots(
        &mut self,
        inputs_embeds: ArrayView3<f32>,
        position_ids: ArrayView2<i64>,
        seqlens_k: &[i32],
        cache: &mut SlotCache,
    ) -> Result<Array2<f32>, ModelError> {
        let err = run_error("decoder");
        let total = seqlens_k.iter().max().map_or(1, |&k| k + 1);
        if total as usize > cache.capacity {
            return Err(ModelError::Run {
                graph: "decoder",
                message: format!("a row needs {total} cache positions, the slot cache holds {}", cache.capacity),
            });
        }
        let binding = &mut cache.binding;
        let embeds = Tensor::from_array(inputs_embeds.to_owned()).map_err(&err)?;
        binding.bind_input("inputs_embeds", &embeds).map_err(&err)?;
        let positions = Tensor::from_array(position_ids.to_owned()).map_err(&err)?;
        binding.bind_input("position_ids", &positions).map_err(&err)?;
        let seqlens = Tensor::from_array(ndarray::Array1::from(seqlens_k.to_vec())).map_err(&err)?;
        binding.bind_input("seqlens_k", &seqlens).map_err(&err)?;
        let total = Tensor::from_array(ndarray::arr0(total)).map_err(&err)?;
        binding.bind_input("total_sequence_length", &total).map_err(&err)?;
        let outputs = self.decoder.session.run_binding(binding).map_err(&err)?;
        last_position(&outputs["logits"], Float::F32)
    }

    /// pixel_values f32[B,3,S,S] -> image features f32[B,N,H] (already divided by sqrt(H)).
    pub fn encode_image(&mut self, pixel_values: Array4<f32>) -> Result<Array3<f32>, ModelError> {
        let input = self.floats.pixel_values.tensor(pixel_values, "vision_encoder")?;
        let outputs = self.vision.run(vec![("pixel_values".into(), input.into())])?;
        extract3(&outputs["image_features"], self.floats.image_features, "vision_encoder")
    }

    /// input_ids i64[B,T] -> raw embedding rows f32[B,T,H].
    pub fn embed_tokens(&mut self, input_ids: ArrayView2<i64>) -> Result<Array3<f32>, ModelError> {
        let input = Tensor::from_array(input_ids.to_owned()).map_err(run_error("embed_tokens"))?;
        let inputs = vec![("input_ids".into(), input.into())];
        let outputs = if input_ids.ncols() > 1 {
            self.embed.run_shrinking(inputs, &self.shrink_arena)?
        } else {
            self.embed.run(inputs)?
        };
        extract3(&outputs["inputs_embeds"], self.floats.embeddings, "embed_tokens")
    }

    /// One portable decoder run: `T` new positions on top of `cache` (`P` positions), which it
    /// extends. attention_mask and token_type_ids cover `P + T` positions; position_ids the new
    /// `T`. Returns the last position's logits f32[B,V].
    pub fn decode(
        &mut self,
        inputs_embeds: ArrayView3<f32>,
        attention_mask: ArrayView2<i64>,
        token_type_ids: ArrayView2<i64>,
        position_ids: ArrayView2<i64>,
        cache: &mut KvCache,
    ) -> Result<Array2<f32>, ModelError> {
        let err = run_error("decoder");
        let optional = [
            ("attention_mask", self.decoder_inputs.attention_mask, attention_mask),
            ("token_type_ids", self.decoder_inputs.token_type_ids, token_type_ids),
            ("position_ids", self.decoder_inputs.position_ids, position_ids),
        ];
        let mut inputs = Vec::new();
        for (name, declared, value) in optional {
            if declared {
                inputs.push((name, Tensor::from_array(value.to_owned()).map_err(&err)?.into_dyn()));
            }
        }
        if self.decoder_inputs.use_cache_branch {
            let cached = attention_mask.ncols() > inputs_embeds.shape()[1];
            inputs.push((
                "use_cache_branch",
                Tensor::from_array(ndarray::arr1(&[cached])).map_err(&err)?.into_dyn(),
            ));
        }
        self.run_decoder(inputs_embeds, inputs, cache)
    }

    /// A decoder run with `inputs` besides `inputs_embeds` and the past: `cache` becomes the
    /// `present.*` outputs. The last position's logits f32[B,V].
    fn run_decoder(
        &mut self,
        inputs_embeds: ArrayView3<f32>,
        inputs: Vec<(&'static str, DynValue)>,
        cache: &mut KvCache,
    ) -> Result<Array2<f32>, ModelError> {
        let mut feed: Vec<(Cow<'_, str>, DynValue)> = Vec::new();
        feed.push((
            "inputs_embeds".into(),
            self.floats.decoder_embeds.tensor(inputs_embeds.to_owned(), "decoder")?,
        ));
        feed.extend(inputs.into_iter().map(|(name, value)| (name.into(), value)));
        let past = std::mem::take(&mut cache.keys).into_iter().zip(std::mem::take(&mut cache.values));
        for ((k, v), (kn, vn)) in past.zip(&self.past_names) {
            feed.push((kn.as_str().into(), k));
            feed.push((vn.as_str().into(), v));
        }
        let logits_float = self.floats.logits;
        let prefill = inputs_embeds.shape()[1] > 1;
        let binding;
        let mut outputs = match &self.cache_memory {
            None => {
                let feed = feed.into_iter().map(|(name, value)| (name, value.into())).collect();
                if prefill {
                    self.decoder.run_shrinking(feed, &self.shrink_arena)?
                } else {
                    self.decoder.run(feed)?
                }
            }
            Some(memory) => {
                binding = self.bind_decoder(&feed, memory)?;
                let session = &mut self.decoder.session;
                let run = if prefill {
                    session.run_binding_with_options(&binding, &self.shrink_arena)
                } else {
                    session.run_binding(&binding)
                };
                run.map_err(run_error("decoder"))?
            }
        };
        let step_logits = last_position(&outputs["logits"], logits_float)?;
        for (key, value) in &self.present_names {
            let missing = |name: &str| ModelError::Run {
                graph: "decoder",
                message: format!("output {name} missing"),
            };
            cache.keys.push(outputs.remove(key).ok_or_else(|| missing(key))?);
            cache.values.push(outputs.remove(value).ok_or_else(|| missing(value))?);
        }
        Ok(step_logits)
    }

    /// An IoBinding of one portable decoder run: `feed` as inputs (ONNX Runtime copies those in
    /// host memory to the device, once), `present.*` bound to `cache_memory`, where the next run
    /// reads them as its past, and the logits to host memory, the only output the host needs.
    /// A new binding per run: the outputs' shapes grow with every step.
    fn bind_decoder(&self, feed: &[(Cow<'_, str>, DynValue)], cache_memory: &MemoryInfo<'static>) -> Result<IoBinding, ModelError> {
        let err = run_error("decoder");
        let mut binding = self.decoder.session.create_binding().map_err(&err)?;
        for (name, value) in feed {
            binding.bind_input(name.as_ref(), value).map_err(&err)?;
        }
        for (key, value) in &self.present_names {
            binding.bind_output_to_device(key.as_str(), cache_memory).map_err(&err)?;
            binding.bind_output_to_device(value.as_str(), cache_memory).map_err(&err)?;
        }
        binding
            .bind_output_to_device("logits", &host_memory().map_err(&err)?)
            .map_err(&err)?;
        Ok(binding)
    }

    /// codes i64[K,16] -> masks f32[K,64,64] through seg_decoder.onnx.
    pub fn decode_masks(&mut self, codes: Array2<i64>) -> Result<Array3<f32>, ModelError> {
        let seg = self.seg.as_mut().ok_or(ModelError::NoSegDecoder)?;
        let input = Tensor::from_array(codes).map_err(run_error("seg_decoder"))?;
        let outputs = seg.run(vec![("codes".into(), input.into())])?;
        extract3(&outputs["masks"], Float::F32, "seg_decoder")
    }
}

/// Host memory, where outputs the host reads are bound.
fn host_memory() -> ort::Result<MemoryInfo<'static>> {
    MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
}

/// A copy of `value` in host memory if it lives on a device (a KV cache the decoder left on the
/// GPU, see `--io-binding`), `None` if the host can read it where it is.
fn device_to_host(value: &DynValue) -> Result<Option<DynValue>, ModelError> {
    let err = run_error("decoder");
    let tensor = value.view().downcast::<DynTensorValueType>().map_err(&err)?;
    if tensor.memory_info().is_cpu_accessible() {
        return Ok(None);
    }
    Ok(Some(tensor.to(AllocationDevice::CPU, 0).map_err(&err)?.into_dyn()))
}

fn kv_rank(e: ndarray::ShapeError) -> ModelError {
    ModelError::Run {
        graph: "decoder",
        message: format!("a KV cache tensor is not 4-D: {e}"),
    }
}

fn assemble_rows<T>(rows: &[(&DynValue, usize, usize)], shape: (usize, usize, usize, usize)) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + Default + std::fmt::Debug + 'static,
{
    let err = run_error("decoder");
    let mut out = Array4::<T>::default(shape);
    let len = shape.2;
    // Rows of one batch share its tensor: a device-resident one is copied to the host once.
    let mut copies: Vec<(&DynValue, Option<DynValue>)> = Vec::new();
    for &(value, _, _) in rows {
        if !copies.iter().any(|(source, _)| std::ptr::eq(*source, value)) {
            copies.push((value, device_to_host(value)?));
        }
    }
    for (r, &(value, row, from)) in rows.iter().enumerate() {
        let copy = copies
            .iter()
            .find(|(source, _)| std::ptr::eq(*source, value))
            .and_then(|(_, copy)| copy.as_ref());
        let view = copy.unwrap_or(value).try_extract_array::<T>().map_err(&err)?;
        let view = view.into_dimensionality::<Ix4>().map_err(kv_rank)?;
        let kept = view.shape()[2] - from;
        out.slice_mut(s![r, .., len - kept.., ..])
            .assign(&view.slice(s![row, .., from.., ..]));
    }
    Ok(Tensor::from_array(out).map_err(err)?.into_dyn())
}

fn as3<'a, T>(view: ndarray::ArrayViewD<'a, T>, graph: &'static str) -> Result<ArrayView3<'a, T>, ModelError> {
    view.into_dimensionality::<Ix3>().map_err(|e| ModelError::Run {
        graph,
        message: e.to_string(),
    })
}

/// A `[B,T,X]` output as f32.
fn extract3(value: &DynValue, float: Float, graph: &'static str) -> Result<Array3<f32>, ModelError> {
    let err = run_error(graph);
    Ok(match float {
        Float::F32 => as3(value.try_extract_array::<f32>().map_err(err)?, graph)?.to_owned(),
        Float::F16 => as3(value.try_extract_array::<f16>().map_err(err)?, graph)?.mapv(f32::from),
    })
}

/// The last position of logits `[B,T,V]`: f32[B,V]. Only that row is copied (and converted).
fn last_position(value: &DynValue, float: Float) -> Result<Array2<f32>, ModelError> {
    let err = run_error("decoder");
    Ok(match float {
        Float::F32 => {
            let logits = as3(value.try_extract_array::<f32>().map_err(err)?, "decoder")?;
            logits.slice(s![.., logits.shape()[1] - 1, ..]).to_owned()
        }
        Float::F16 => {
            let logits = as3(value.try_extract_array::<f16>().map_err(err)?, "decoder")?;
            logits.slice(s![.., logits.shape()[1] - 1, ..]).mapv(f32::from)
        }
    })
}
