//! `onnxruntime` against the real library from the `.venv` onnxruntime wheel, checked against
//! what the Python package reports about itself (version, library path, available providers).
//! Load failures live in `onnxruntime_load_errors.rs`: a process can load ONNX Runtime only once.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::python;
use paligemma::onnxruntime::{self, ExecutionProvider, LibSearch, LibSource, SessionError};

const TINY_MODEL: &str = "tests/data/onnxruntime_tiny_add.onnx";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `code` in the reference Python and returns its stdout lines.
fn python_lines(code: &str) -> Vec<String> {
    let output = Command::new(python()).arg("-c").arg(code).output().expect("reference Python runs");
    assert!(
        output.status.success(),
        "reference Python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

/// (version, library path) as the onnxruntime wheel describes itself.
fn wheel_reference() -> (String, PathBuf) {
    let lines = python_lines(
        "import onnxruntime, os\n\
         print(onnxruntime.__version__)\n\
         print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so.' + onnxruntime.__version__))",
    );
    (lines[0].clone(), PathBuf::from(&lines[1]))
}

/// Loads the wheel's library once for this test binary.
fn runtime() -> onnxruntime::OrtInfo {
    let (_, path) = wheel_reference();
    onnxruntime::init(Some(&path)).expect("the .venv onnxruntime library loads")
}

fn tiny_model() -> PathBuf {
    manifest_dir().join(TINY_MODEL)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paligemma-ort-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn real_library_loads_with_the_wheel_version() {
    let (version, path) = wheel_reference();
    let info = runtime();
    assert_eq!(info.version, version);
    assert_eq!(info.path, path);
    assert_eq!(info.source, LibSource::Explicit);
}

#[test]
fn second_init_returns_the_loaded_library() {
    let first = runtime();
    let again = onnxruntime::init(None).expect("already loaded");
    assert_eq!(first, again);
}

#[test]
fn venv_wheel_is_found_from_the_crate_root() {
    let (_, path) = wheel_reference();
    let search = LibSearch {
        build_root: Some(manifest_dir().to_path_buf()),
        ..LibSearch::default()
    };
    let found = search.locate().expect("the .venv wheel is found");
    assert_eq!(found, (path, LibSource::RepoVenv));
}

#[test]
fn venv_wheel_is_found_walking_up_from_the_executable() {
    let (_, path) = wheel_reference();
    let exe_dir = std::env::current_exe().expect("test exe").parent().expect("exe dir").to_path_buf();
    let search = LibSearch {
        exe_dir: Some(exe_dir),
        ..LibSearch::default()
    };
    assert_eq!(search.locate().expect("found above target/"), (path, LibSource::RepoVenv));
}

#[test]
fn search_order_is_explicit_then_env_then_executable_dir_then_venv() {
    let root = temp_dir("order");
    let bin = root.join("target/release");
    let capi = root.join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::create_dir_all(&capi).expect("capi dir");
    for file in [
        bin.join("libonnxruntime.so.1.31.1"),
        capi.join("libonnxruntime.so.1.31.1"),
        root.join("explicit.so"),
        root.join("env.so"),
    ] {
        std::fs::write(file, b"").expect("fake lib");
    }
    std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").expect("plug-in");

    let mut search = LibSearch {
        explicit: Some(root.join("explicit.so")),
        env_path: Some(root.join("env.so")),
        exe_dir: Some(bin.clone()),
        build_root: None,
    };
    assert_eq!(search.locate().expect("explicit"), (root.join("explicit.so"), LibSource::Explicit));
    search.explicit = None;
    assert_eq!(search.locate().expect("env"), (root.join("env.so"), LibSource::EnvVar));
    search.env_path = None;
    assert_eq!(
        search.locate().expect("exe dir"),
        (bin.join("libonnxruntime.so.1.31.1"), LibSource::NextToExecutable)
    );
    std::fs::remove_file(bin.join("libonnxruntime.so.1.31.1")).expect("remove");
    assert_eq!(
        search.locate().expect("venv"),
        (capi.join("libonnxruntime.so.1.31.1"), LibSource::RepoVenv)
    );
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn empty_search_lists_every_place_and_the_fix() {
    let root = temp_dir("empty");
    let search = LibSearch {
        exe_dir: Some(root.join("bin")),
        build_root: Some(root.clone()),
        ..LibSearch::default()
    };
    let message = search.locate().expect_err("nothing to find").to_string();
    assert!(message.contains("ORT_DYLIB_PATH"), "{message}");
    assert!(
        message.contains(&format!("{}/libonnxruntime.so*", root.join("bin").display())),
        "{message}"
    );
    assert!(message.contains(&format!("{}/.venv/lib/python3*", root.display())), "{message}");
    assert!(
        message.contains(".ci/setup") && message.contains("pip install onnxruntime==1.31.1"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn env_path_to_a_missing_file_is_an_error_not_a_fallthrough() {
    let root = temp_dir("env-missing");
    std::fs::write(root.join("libonnxruntime.so.1.31.1"), b"").expect("fake lib");
    let search = LibSearch {
        env_path: Some(root.join("nope.so")),
        exe_dir: Some(root.clone()),
        ..LibSearch::default()
    };
    let message = search.locate().expect_err("env wins").to_string();
    assert!(message.contains("nope.so") && message.contains("ORT_DYLIB_PATH"), "{message}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn cpu_session_runs_and_reports_cpu_provider() {
    runtime();
    let (mut session, report) = onnxruntime::build_session(&tiny_model(), &[ExecutionProvider::Cpu], Some(1), &[]).expect("CPU session");
    assert_eq!(report.providers, vec![ExecutionProvider::Cpu.ort_name().to_string()]);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let available = python_lines("import onnxruntime; print(','.join(onnxruntime.get_available_providers()))");
    assert!(available[0].split(',').any(|name| name == report.providers[0]), "{available:?}");

    let x = vec![0.5f32, -1.0, 2.0, 3.25];
    let input = ort::value::Tensor::from_array(([1usize, 4], x.clone())).expect("input tensor");
    let outputs = session.run(ort::inputs!["x" => input]).expect("run");
    let (_, y) = outputs["y"].try_extract_tensor::<f32>().expect("f32 output");
    let expected: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
    assert_eq!(y, expected.as_slice());
}

#[test]
fn cuda_falls_back_to_cpu_with_a_warning_when_the_wheel_has_no_cuda() {
    runtime();
    let available = python_lines("import onnxruntime; print(','.join(onnxruntime.get_available_providers()))");
    assert!(
        !available[0].contains("CUDAExecutionProvider"),
        "this test needs the CPU-only wheel; the .venv has {}",
        available[0]
    );
    let (_, report) = onnxruntime::build_session(&tiny_model(), &[ExecutionProvider::Cuda, ExecutionProvider::Cpu], None, &[])
        .expect("falls back to CPU");
    assert_eq!(report.providers, vec![ExecutionProvider::Cpu.ort_name().to_string()]);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let warning = &report.warnings[0];
    assert!(warning.contains("CUDA") && warning.contains("falling back to CPU"), "{warning}");
    assert!(!warning.contains('\n'), "{warning}");
}

#[test]
fn cuda_alone_is_an_error_naming_cuda() {
    runtime();
    let error = onnxruntime::build_session(&tiny_model(), &[ExecutionProvider::Cuda], None, &[]).expect_err("no CUDA here");
    let message = error.to_string();
    assert!(matches!(error, SessionError::ProvidersFailed { .. }), "{message}");
    assert!(message.contains("CUDA: ") && message.contains("add `cpu`"), "{message}");
}

#[test]
fn corrupt_graph_is_an_error_with_path_and_ort_message() {
    runtime();
    let dir = temp_dir("corrupt");
    let path = dir.join("broken.onnx");
    std::fs::write(&path, b"this is not a protobuf \x08\x96\x01 at all").expect("write");
    let error = onnxruntime::build_session(&path, &[ExecutionProvider::Cpu], None, &[]).expect_err("corrupt");
    let message = error.to_string();
    assert!(matches!(error, SessionError::CorruptGraph { .. }), "{message}");
    assert!(message.contains("broken.onnx") && !message.contains('\n'), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_graph_is_an_error_naming_the_path() {
    runtime();
    let path = manifest_dir().join("tests/data/no_such_graph.onnx");
    let error = onnxruntime::build_session(&path, &[ExecutionProvider::Cpu], None, &[]).expect_err("missing");
    assert!(matches!(error, SessionError::MissingGraph { .. }));
    assert!(error.to_string().contains("no_such_graph.onnx"));
}
