//! Execution providers and session building: the provider list in priority order, registration,
//! fallback to a later provider with a warning, and the providers ONNX Runtime really assigned.

use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::str::FromStr;

use ort::environment::Environment;
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::AsPointer;

use super::library::environment;
use super::one_line;

/// Session config key that makes ONNX Runtime keep the node-to-provider assignment readable after load.
const RECORD_ASSIGNMENT_KEY: &str = "session.record_ep_graph_assignment_info";

/// An execution provider this crate can ask ONNX Runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionProvider {
    /// `cpu`: ONNX Runtime's CPU provider, always present.
    Cpu,
    /// `cuda`: the CUDA provider of an onnxruntime-gpu library, with its default options.
    Cuda,
    /// `tensorrt`: the TensorRT provider of an onnxruntime-gpu library, with its default options.
    TensorRt,
}

/// Whether the portable decoder runs through an ONNX Runtime IoBinding that leaves its `present.*`
/// outputs (the KV cache) in the memory of the provider that computed them (`--io-binding`; the
/// GroupQueryAttention decoder always binds its cache, in host memory). Without one,
/// ONNX Runtime copies every output to host memory and every input back to the device, so on CUDA
/// the whole cache crosses the bus twice per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IoBindingMode {
    /// On where ONNX Runtime assigned decoder nodes to CUDA or TensorRT, off elsewhere.
    #[default]
    Auto,
    /// Always; on CPU the cache is bound to host memory, which changes nothing but the call path.
    On,
    /// Never: the cache comes back to the host after every run.
    Off,
}

impl IoBindingMode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [IoBindingMode; 3] = [IoBindingMode::Auto, IoBindingMode::On, IoBindingMode::Off];

    /// The name `--io-binding` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBindingMode::Auto => "auto",
            IoBindingMode::On => "on",
            IoBindingMode::Off => "off",
        }
    }
}

/// The names [`ExecutionProvider::from_str`] accepts, for messages and `--help`.
pub const PROVIDER_NAMES: &str = "cpu, cuda, tensorrt";

impl ExecutionProvider {
    /// ONNX Runtime's name for the provider, as reported by the graph assignment.
    pub fn ort_name(self) -> &'static str {
        match self {
            Self::Cpu => "CPUExecutionProvider",
            Self::Cuda => "CUDAExecutionProvider",
            Self::TensorRt => "TensorrtExecutionProvider",
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "CPU",
            Self::Cuda => "CUDA",
            Self::TensorRt => "TensorRT",
        })
    }
}

impl FromStr for ExecutionProvider {
    type Err = ProviderListError;

    /// One name, in any case, surrounding spaces ignored: `cpu`, `cuda`, `tensorrt`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" => Ok(Self::TensorRt),
            "" => Err(ProviderListError::Empty),
            _ => Err(ProviderListError::Unknown { name: name.to_string() }),
        }
    }
}

/// A provider list that names no known provider, or one twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderListError {
    /// An empty entry: an empty list, or a stray comma (`cpu,`, `cpu,,cuda`).
    #[error("an empty execution provider name (an empty list, or a stray comma); valid names: {PROVIDER_NAMES}, comma-separated")]
    Empty,
    /// A name is not one of [`PROVIDER_NAMES`].
    #[error("unknown execution provider {name:?}; valid names: {PROVIDER_NAMES}")]
    Unknown {
        /// The name as given.
        name: String,
    },
    /// A provider is listed more than once.
    #[error("execution provider {provider} appears twice in {list:?}; list each provider once, in priority order")]
    Duplicate {
        /// The whole list, lowercase and comma-separated.
        list: String,
        /// The provider listed twice.
        provider: ExecutionProvider,
    },
}

/// Parses a comma-separated provider list in priority order: `"tensorrt,cuda,cpu"`.
pub fn parse_ep_list(list: &str) -> Result<Vec<ExecutionProvider>, ProviderListError> {
    let providers = list.split(',').map(str::parse).collect::<Result<Vec<ExecutionProvider>, _>>()?;
    check_unique(&providers)?;
    Ok(providers)
}

/// Refuses a provider list that names a provider twice (a typo, or a list pasted together).
pub fn check_unique(providers: &[ExecutionProvider]) -> Result<(), ProviderListError> {
    for (i, provider) in providers.iter().enumerate() {
        if providers[..i].contains(provider) {
            return Err(ProviderListError::Duplicate {
                list: providers
                    .iter()
                    .map(|p| p.to_string().to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(","),
                provider: *provider,
            });
        }
    }
    Ok(())
}

/// One provider that did not start, and ONNX Runtime's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderFailure {
    /// The provider that did not start.
    pub provider: ExecutionProvider,
    /// ONNX Runtime's error, on one line.
    pub reason: String,
}

impl fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.provider, self.reason)
    }
}

/// What a session build did: the providers that were handed nodes, and the fallbacks taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// ONNX Runtime names (`CPUExecutionProvider`, ...) of the providers assigned at least one node,
    /// in the order ONNX Runtime lists them.
    pub providers: Vec<String>,
    /// One line per requested provider that could not start while a later one took over.
    pub warnings: Vec<String>,
}

/// Why a graph's session cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// [`build_session`] ran before [`init`](super::init) loaded ONNX Runtime.
    #[error("ONNX Runtime is not loaded: call onnxruntime::init before building a session")]
    NotInitialized,
    /// The graph's file is not there.
    #[error("graph file {path} does not exist; check the model directory or re-run the export")]
    MissingGraph {
        /// The graph file.
        path: PathBuf,
    },
    /// ONNX Runtime rejects the file itself (bad protobuf, invalid graph), whatever the provider.
    #[error("graph file {path} is not a valid ONNX model ({message}); re-run the export or re-download the model")]
    CorruptGraph {
        /// The graph file.
        path: PathBuf,
        /// ONNX Runtime's error, on one line.
        message: String,
    },
    /// Every listed provider failed to register or to take the graph.
    #[error("no requested execution provider could start for {path}: {}. Install onnxruntime-gpu (CUDA 13, cuDNN 9, TensorRT 10) and point --ort-lib at its library, or add `cpu` to the provider list", failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    ProvidersFailed {
        /// The graph file.
        path: PathBuf,
        /// Each provider's failure, in the order they happened.
        failures: Vec<ProviderFailure>,
    },
    /// Any other ONNX Runtime error in building the session or reading its provider assignment.
    #[error("ONNX Runtime could not build a session for {path}: {message}")]
    Ort {
        /// The graph file.
        path: PathBuf,
        /// ONNX Runtime's error, on one line.
        message: String,
    },
}

/// Builds a session for the graph at `path` with the providers in priority order (empty: ONNX
/// Runtime's default, CPU), `threads` intra-op threads (`None`: ONNX Runtime's default) and
/// `config_entries`, ONNX Runtime session config keys and values
/// (`onnxruntime_session_options_config_keys.h`).
///
/// A provider that cannot start is an error naming it and ONNX Runtime's reason, unless another
/// listed provider starts: then the session is built without it and `SessionReport::warnings`
/// says so. Nothing is printed.
pub fn build_session(
    path: &Path,
    eps: &[ExecutionProvider],
    threads: Option<usize>,
    config_entries: &[(&str, &str)],
) -> Result<(Session, SessionReport), SessionError> {
    let environment = environment().ok_or(SessionError::NotInitialized)?;
    if !path.is_file() {
        return Err(SessionError::MissingGraph { path: path.to_path_buf() });
    }
    let ort_failure = |e: ort::Error| SessionError::Ort {
        path: path.to_path_buf(),
        message: one_line(&e.to_string()),
    };

    let mut candidates: Vec<ExecutionProvider> = eps.to_vec();
    let mut failures: Vec<ProviderFailure> = Vec::new();
    loop {
        let mut builder = new_builder(&environment, threads, config_entries).map_err(ort_failure)?;
        let mut started = Vec::new();
        for &provider in &candidates {
            match register(provider, &mut builder) {
                Ok(()) => started.push(provider),
                Err(e) => failures.push(ProviderFailure {
                    provider,
                    reason: one_line(&e.to_string()),
                }),
            }
        }
        if !candidates.is_empty() && started.is_empty() {
            return Err(SessionError::ProvidersFailed {
                path: path.to_path_buf(),
                failures,
            });
        }

        match builder.commit_from_file(path) {
            Ok(session) => {
                let providers = assigned_providers(&session).map_err(ort_failure)?;
                let warnings = fallback_warnings(&failures, &started);
                return Ok((session, SessionReport { providers, warnings }));
            }
            Err(e) if is_model_error(e.code()) => {
                return Err(SessionError::CorruptGraph {
                    path: path.to_path_buf(),
                    message: one_line(&e.to_string()),
                });
            }
            Err(e) => {
                // A GPU provider registers lazily: a missing device or CUDA library only shows up
                // here. Blame the highest-priority accelerator and retry without it.
                let Some(culprit) = started.iter().copied().find(|p| *p != ExecutionProvider::Cpu) else {
                    return Err(ort_failure(e));
                };
                failures.push(ProviderFailure {
                    provider: culprit,
                    reason: one_line(&e.to_string()),
                });
                candidates = started.into_iter().filter(|p| *p != culprit).collect();
                if candidates.is_empty() {
                    return Err(SessionError::ProvidersFailed {
                        path: path.to_path_buf(),
                        failures,
                    });
                }
            }
        }
    }
}

fn new_builder(environment: &Environment, threads: Option<usize>, config_entries: &[(&str, &str)]) -> Result<SessionBuilder, ort::Error> {
    let mut builder = Session::builder(environment)?
        .with_config_entry(RECORD_ASSIGNMENT_KEY, "1")
        .map_err(ort::Error::<()>::from)?;
    for (key, value) in config_entries {
        builder = builder.with_config_entry(*key, *value).map_err(ort::Error::<()>::from)?;
    }
    match threads {
        Some(n) => builder.with_intra_threads(n).map_err(ort::Error::<()>::from),
        None => Ok(builder),
    }
}

/// Status codes that mean the file itself is wrong, whatever the provider.
fn is_model_error(code: ort::ErrorCode) -> bool {
    matches!(
        code,
        ort::ErrorCode::InvalidProtobuf | ort::ErrorCode::InvalidGraph | ort::ErrorCode::NoModel | ort::ErrorCode::NoSuchFile
    )
}

/// The warning lines for providers that failed while at least one listed provider started.
fn fallback_warnings(failures: &[ProviderFailure], started: &[ExecutionProvider]) -> Vec<String> {
    let running = started.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    failures
        .iter()
        .map(|failure| {
            format!(
                "execution provider {} could not start ({}); falling back to {}",
                failure.provider, failure.reason, running
            )
        })
        .collect()
}

/// Appends `provider` to the session options through ort's provider types (their `cuda` and
/// `tensorrt` features compile the registration only; with `load-dynamic` nothing is downloaded):
/// CUDA and TensorRT with their default options, an error when the library cannot start them.
fn register(provider: ExecutionProvider, builder: &mut SessionBuilder) -> Result<(), ort::Error> {
    use ort::ep::ExecutionProvider as _;
    match provider {
        // The CPU provider is always present; appending it is a no-op in ONNX Runtime.
        ExecutionProvider::Cpu => Ok(()),
        ExecutionProvider::Cuda => ort::ep::CUDA::default().register(builder),
        ExecutionProvider::TensorRt => ort::ep::TensorRT::default().register(builder),
    }
}

/// Distinct names of the providers ONNX Runtime assigned nodes to, in its order.
fn assigned_providers(session: &Session) -> Result<Vec<String>, ort::Error> {
    let api = ort::api();
    let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = ptr::null();
    let mut count: usize = 0;
    let mut names: Vec<String> = Vec::new();
    // SAFETY: the session was built with `session.record_ep_graph_assignment_info=1`; the array
    // and the strings it leads to are owned by the session, which outlives this function.
    unsafe {
        ort::Error::result_from_status((api.Session_GetEpGraphAssignmentInfo)(session.ptr(), &mut subgraphs, &mut count))?;
        for i in 0..count {
            let subgraph = *subgraphs.add(i);
            let mut name: *const std::ffi::c_char = ptr::null();
            ort::Error::result_from_status((api.EpAssignedSubgraph_GetEpName)(subgraph, &mut name))?;
            if name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_list_parses_in_priority_order() {
        let list = parse_ep_list("tensorrt, CUDA ,cpu").ok();
        assert_eq!(
            list,
            Some(vec![ExecutionProvider::TensorRt, ExecutionProvider::Cuda, ExecutionProvider::Cpu])
        );
    }

    #[test]
    fn unknown_provider_lists_valid_names() {
        let message = parse_ep_list("cuda,rocm").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("\"rocm\"") && message.contains(PROVIDER_NAMES), "{message}");
        assert!(matches!(parse_ep_list(""), Err(ProviderListError::Empty)));
        assert!(matches!(parse_ep_list("cpu,,cuda"), Err(ProviderListError::Empty)));
        assert!(matches!(parse_ep_list("cpu,cpu"), Err(ProviderListError::Duplicate { .. })));
    }

    #[test]
    fn each_failed_provider_warns_naming_the_fallback() {
        let failures = [ProviderFailure {
            provider: ExecutionProvider::TensorRt,
            reason: "libnvinfer.so.10: cannot open shared object file".to_string(),
        }];
        let warnings = fallback_warnings(&failures, &[ExecutionProvider::Cuda, ExecutionProvider::Cpu]);
        assert_eq!(
            warnings,
            vec![
                "execution provider TensorRT could not start (libnvinfer.so.10: cannot open shared object file); falling back to CUDA, CPU"
                    .to_string()
            ]
        );
    }
}
