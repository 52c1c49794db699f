//! PaliGemma 2 on ONNX Runtime: the graphs `python -m export convert` writes, driven by their
//! `manifest.json`. Start at [`pipeline::Pipeline`].

pub mod annotate;
pub mod cli;
pub mod config;
pub mod detect;
pub mod generate;
pub mod hub;
pub mod onnxruntime;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod segment;
pub mod session;
