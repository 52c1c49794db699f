//! ONNX Runtime: finding and loading its shared library ([`library`]), and building sessions on a
//! chosen list of execution providers ([`providers`]).
//!
//! The crate uses `ort` 2.0.0-rc.15 with `load-dynamic`: nothing is linked at build time, the
//! library comes from the `onnxruntime==1.31.1` wheel at run time. `ort::init_from` does the
//! `dlopen` and rejects a library whose minor version is below the API level ort was built for
//! (`ort::MINOR_VERSION`, 31); [`library`] decides *which* file to hand it, remembers where it
//! came from, and turns ort's load errors into messages that say what to install.
//!
//! Providers are registered through ort's provider types (`ort::ep::CUDA`, `ort::ep::TensorRT`;
//! the same `SessionOptionsAppendExecutionProvider_*` calls the Python `providers=[...]` argument
//! makes). Which provider really ran which node is read back with
//! `Session_GetEpGraphAssignmentInfo` (C API 24+), since a provider that registers can still be
//! handed no node at all.

pub mod library;
pub mod providers;

pub use library::{
    init, is_ort_library_name, locate, pick_library, version_from_file_name, LibSearch, LibSource, OrtInfo, OrtLibError, OrtVersion,
    ENV_DYLIB_PATH, MIN_VERSION,
};
pub use providers::{
    build_session, check_unique, parse_ep_list, ExecutionProvider, IoBindingMode, ProviderFailure, ProviderListError, SessionError,
    SessionReport, PROVIDER_NAMES,
};

/// ONNX Runtime messages carry newlines and a final period; error lines must stay one line and
/// read well with text after them.
fn one_line(message: &str) -> String {
    message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches('.')
        .to_string()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ort_messages_collapse_to_one_line() {
        assert_eq!(one_line("Load model failed:\n  bad proto.\n"), "Load model failed: bad proto");
    }
}
