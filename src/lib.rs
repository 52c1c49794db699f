//! PaliGemma 2 on ONNX Runtime: the graphs `python -m export convert` writes, driven by their
//! `manifest.json`. Start at [`pipeline::Pipeline`].

pub mod annotate;
pub mod api;
pub mod args;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod detect;
pub mod generate;
pub mod hub;
pub mod input;
pub mod mask;
pub mod onnxruntime;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod resample;
pub mod segment;
pub mod serve;
pub mod session;

/// An error and its causes on one line: hf-hub keeps the HTTP status and libloading the
/// `dlerror()` text (`file too short`) in the source chain, not in the message.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        // Wrappers often repeat their source's text in their own message.
        let inner_text = inner.to_string();
        if !text.ends_with(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}
