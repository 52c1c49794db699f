//! PaliGemma 2 on ONNX Runtime: the graphs `python -m export convert` writes, driven by their
//! `manifest.json`. Start at [`Pipeline`]: [`Pipeline::load`] with [`PipelineOptions`], then
//! [`Pipeline::run`] over [`Request`]s gives a [`Response`] per request (text, token ids,
//! [`Detection`]s, [`Segment`]s with their [`BinaryMask`]s) or that request's [`RequestError`].

#![warn(missing_docs)]

// The library: a pipeline and the parts a caller sees in its requests and responses.
pub mod annotate;
pub mod api;
pub mod config;
pub mod detect;
pub mod hub;
pub mod input;
pub mod mask;
pub mod onnxruntime;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod resample;
pub mod segment;

// How a pipeline runs its graphs; its error and timing types are re-exported below.
mod cpu;
mod generate;
mod session;

// The `paligemma` binary's commands: public for src/main.rs and the tests, not the library's API.
#[doc(hidden)]
pub mod args;
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod cli;
#[cfg(feature = "serve")]
#[doc(hidden)]
pub mod serve;

pub use config::{ConfigError, Manifest};
pub use detect::{BoundingBox, Detection};
pub use generate::Timings;
pub use mask::{BinaryMask, MaskError, Rle};
pub use onnxruntime::{ExecutionProvider, OrtLibError, SessionError};
pub use pipeline::{ImageInput, LoadError, Pipeline, PipelineOptions, Request, RequestError, Response};
pub use preprocess::{ImageLimits, LoadedImage, PreprocessError};
pub use prompt::PromptError;
pub use segment::{Segment, SegmentError};
pub use session::ModelError;

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
