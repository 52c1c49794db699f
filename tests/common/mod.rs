//! What the integration tests share: the repository, the tiny converted models, the test images,
//! a seeded random draw.

// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny converted model, e.g. "gqa1/onnx", under $PALIGEMMA_TEST_MODELS or target/tiny-models.
pub fn tiny_model(name: &str) -> PathBuf {
    let root = std::env::var_os("PALIGEMMA_TEST_MODELS").map_or_else(|| repo().join("target/tiny-models"), PathBuf::from);
    let dir = root.join(name);
    assert!(
        dir.join("manifest.json").is_file() || dir.join("config.json").is_file(),
        "{} is missing: run `.venv/bin/python -m export fixtures {}` (bash .ci/run does)",
        dir.display(),
        root.display()
    );
    dir
}

/// The reference Python (numpy, Pillow, transformers, onnxruntime 1.31.1): `$PALIGEMMA_PYTHON`, else
/// the repository's `.venv` that `bash .ci/setup` creates.
pub fn python() -> PathBuf {
    let python = std::env::var_os("PALIGEMMA_PYTHON").map_or_else(|| repo().join(".venv/bin/python"), PathBuf::from);
    assert!(
        python.is_file(),
        "reference Python {} is missing: run `bash .ci/setup` (creates .venv from export/requirements.txt) or set PALIGEMMA_PYTHON",
        python.display()
    );
    python
}

pub fn image(name: &str) -> PathBuf {
    repo().join("tests/data/images").join(name)
}

/// A seeded xorshift64 draw in `0..n`: schedules that are random but the same on every run.
pub fn seeded(mut state: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    }
}
