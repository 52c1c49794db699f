//! Libraries `onnxruntime::init` must refuse with an error, never a panic. Kept apart from
//! `tests/onnxruntime.rs` because a process that loaded the real library keeps it: these tests
//! need a process where no ONNX Runtime load has succeeded.

use std::path::{Path, PathBuf};
use std::process::Command;

use paligemma::onnxruntime::{self, OrtLibError};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paligemma-ortload-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn missing_explicit_library_is_an_error_naming_it() {
    let path = Path::new("/nonexistent/libonnxruntime.so.1.31.1");
    let error = onnxruntime::init(Some(path)).expect_err("missing file");
    let message = error.to_string();
    assert!(matches!(error, OrtLibError::NotAFile { .. }), "{message}");
    assert!(
        message.contains("/nonexistent/libonnxruntime.so.1.31.1") && message.contains("--ort-lib"),
        "{message}"
    );
}

#[test]
fn zero_byte_library_is_a_load_error_not_a_panic() {
    let dir = temp_dir("zero");
    let path = dir.join("libonnxruntime.so.1.31.1");
    std::fs::write(&path, b"").expect("zero-byte file");
    let error = onnxruntime::init(Some(&path)).expect_err("not an ELF file");
    let message = error.to_string();
    assert!(matches!(error, OrtLibError::NotLoadable { .. }), "{message}");
    // The dlerror() text travels with the error, so the user sees why dlopen refused the file.
    assert!(
        message.contains(&path.display().to_string()) && message.contains("file too short"),
        "{message}"
    );
    assert!(message.contains(".ci/setup"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn library_without_ort_entry_point_is_a_load_error() {
    // A real shared object that is not ONNX Runtime: the wheel's provider bridge.
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let bridge = std::fs::read_dir(&venv_lib)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|python| {
            python
                .path()
                .join("site-packages/onnxruntime/capi/libonnxruntime_providers_shared.so")
        })
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no onnxruntime wheel under {}: run `.ci/setup` (creates .venv with onnxruntime 1.31.1)",
                venv_lib.display()
            )
        });
    let error = onnxruntime::init(Some(&bridge)).expect_err("no OrtGetApiBase");
    let message = error.to_string();
    assert!(
        matches!(error, OrtLibError::NotLoadable { .. }) && message.contains("OrtGetApiBase"),
        "{message}"
    );
}

#[test]
fn too_old_library_reports_found_and_needed_versions() {
    // A stand-in exporting only `OrtGetApiBase`, whose version string is all ort reads before
    // rejecting a library; building it needs the C compiler Rust already links with.
    let dir = temp_dir("old");
    let source = dir.join("fake_ort.c");
    std::fs::write(
        &source,
        "typedef struct { const void *(*get_api)(unsigned); const char *(*get_version)(void); } Base;\n\
         static const void *get_api(unsigned v) { (void)v; return 0; }\n\
         static const char *get_version(void) { return \"1.20.1\"; }\n\
         static const Base base = { get_api, get_version };\n\
         const Base *OrtGetApiBase(void) { return &base; }\n",
    )
    .expect("write C source");
    let library = dir.join("libonnxruntime.so.1.20.1");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "building the stand-in library needs `cc` on PATH"
    );

    let error = onnxruntime::init(Some(&library)).expect_err("1.20 is too old");
    let message = error.to_string();
    assert!(
        matches!(error, OrtLibError::TooOld { ref found, .. } if found == "1.20.1"),
        "{message}"
    );
    assert!(message.contains("version 1.20.1") && message.contains(">= 1.31"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}
