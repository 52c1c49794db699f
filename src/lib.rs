//! PaliGemma 2 (and 1) on ONNX Runtime: the graphs `python -m export convert` writes, driven by
//! their `manifest.json`, or the community's transformers.js exports ([`transformers_js`]). Start
//! at [`Pipeline`]: [`Pipeline::load`] with [`PipelineOptions`], then [`Pipeline::run`] over
//! [`Request`]s gives a [`Response`] per request (text, token ids, [`Detection`]s, [`Segment`]s
//! with their [`BinaryMask`]s) or that request's [`RequestError`].

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
pub mod transformers_js;

// How a pipeline runs its graphs; its error and timing types are re-exported below.
mod cpu;
mod engine;
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

pub use config::{ConfigError, DecoderFlavour, Dtype, DtypeChoice, Manifest};
pub use detect::{BoundingBox, Detection};
pub use engine::Timings;
pub use mask::{BinaryMask, MaskError, Rle};
pub use onnxruntime::{ExecutionProvider, IoBindingMode, OrtLibError, SessionError};
pub use pipeline::{ImageInput, LoadError, Pipeline, PipelineOptions, Request, RequestError, RequestId, Response, Update};
pub use preprocess::{ImageLimits, LoadedImage, PreprocessError};
pub use prompt::PromptError;
pub use segment::{Segment, SegmentError};
pub use session::{ModelError, Origin};
pub use transformers_js::LayoutError;

/// An error and its causes on one line: hf-hub keeps the HTTP status, libloading the `dlerror()`
/// text (`file too short`) and a failed run ONNX Runtime's message (which may span lines) in the
/// source chain, not in the message.
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
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_keeps_each_cause_once_on_one_line() {
        let shape = ndarray::ShapeError::from_kind(ndarray::ErrorKind::IncompatibleShape);
        let error = RequestError::Model(ModelError::Shape {
            what: "attention_mask",
            source: shape,
        });
        let text = error_chain(&error);
        assert!(text.starts_with("extending the decoder's attention_mask failed: "), "{text}");
        assert!(text.contains("incompatible shapes"), "{text}");
        // A cause's own lines (ONNX Runtime's messages have them) become one line.
        let read = ConfigError::Read {
            path: "m.json".into(),
            source: std::io::Error::other("first\n  second"),
        };
        assert!(!error_chain(&read).contains('\n'), "{}", error_chain(&read));
    }
}
