//! Which `libonnxruntime` to load (`--ort-lib`, `ORT_DYLIB_PATH`, beside the executable, the
//! repository's `.venv`), its version, and loading it once for the process through `ort::init_from`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;

use super::one_line;

/// The oldest ONNX Runtime this crate runs on, as `(major, minor)`: the API level `ort` rc.15 is built for.
pub const MIN_VERSION: (u32, u32) = (1, ort::MINOR_VERSION);

/// Environment variable naming the library file, shared with `ort`'s own fallback.
pub const ENV_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// The fix every "library not usable" message ends with.
const INSTALL_HINT: &str = "run `.ci/setup` (creates .venv with onnxruntime 1.31.1), or `pip install onnxruntime==1.31.1` \
     and pass --ort-lib PATH/TO/onnxruntime/capi/libonnxruntime.so.1.31.1 or set ORT_DYLIB_PATH";

/// Where the loaded library was found; printed with the path so a user knows which setting won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibSource {
    /// `--ort-lib PATH`.
    Explicit,
    /// The `ORT_DYLIB_PATH` environment variable.
    EnvVar,
    /// A `libonnxruntime.so*` in the directory of the running executable.
    NextToExecutable,
    /// The onnxruntime wheel in a `.venv` above the executable (or above the crate at build time).
    RepoVenv,
}

impl fmt::Display for LibSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Explicit => "--ort-lib",
            Self::EnvVar => "ORT_DYLIB_PATH",
            Self::NextToExecutable => "next to the executable",
            Self::RepoVenv => "the repository's .venv onnxruntime wheel",
        })
    }
}

/// The loaded ONNX Runtime: file, version and which search rule found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtInfo {
    /// Absolute path handed to `dlopen`.
    pub path: PathBuf,
    /// `major.minor.patch` as carried by the library's file name (`libonnxruntime.so.1.31.1`, after
    /// following symlinks); `>=1.31` when the name carries none. ort exposes no call for the exact
    /// version string of a library that loaded, only the guarantee that its minor level is high enough.
    pub version: String,
    /// The search rule that found it.
    pub source: LibSource,
}

/// Why ONNX Runtime's library cannot be found, loaded or started.
#[derive(Debug, thiserror::Error)]
pub enum OrtLibError {
    /// `--ort-lib` or `ORT_DYLIB_PATH` names no file; the search stops there.
    #[error("ONNX Runtime library {path} (from {origin}) does not exist or is not a file; fix the path, or {INSTALL_HINT}")]
    NotAFile {
        /// The path as given.
        path: PathBuf,
        /// The setting that gave it.
        origin: LibSource,
    },
    /// Neither setting is given and no library is beside the executable or in a `.venv` wheel.
    #[error("no ONNX Runtime library found; searched: {}. To fix: {INSTALL_HINT}", searched.join("; "))]
    NotFound {
        /// Every place searched, in order.
        searched: Vec<String>,
    },
    /// `dlopen` failed (not a shared library, another architecture, a missing dependency), or
    /// the library exports no `OrtGetApiBase`.
    #[error("ONNX Runtime library {path} (from {origin}) could not be loaded: {reason}. To fix: {INSTALL_HINT}")]
    NotLoadable {
        /// The library file.
        path: PathBuf,
        /// The search rule that found it.
        origin: LibSource,
        /// `dlerror()`'s text with its causes, or what the library lacks.
        reason: String,
    },
    /// The library's minor version is below the API level ort was built for ([`MIN_VERSION`]).
    #[error("ONNX Runtime at {path} (from {origin}) is version {found}; this program needs >= {}.{}. To fix: {INSTALL_HINT}", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld {
        /// The library file.
        path: PathBuf,
        /// The search rule that found it.
        origin: LibSource,
        /// The version string the library reports.
        found: String,
    },
    /// [`init`] is asked for another `--ort-lib` than the library this process already loaded.
    #[error(
        "ONNX Runtime is already loaded from {loaded} in this process; it cannot also load {requested}. Pass the same library everywhere"
    )]
    AlreadyLoaded {
        /// The library loaded first.
        loaded: PathBuf,
        /// The path asked for now.
        requested: PathBuf,
    },
    /// The library loaded, but ONNX Runtime failed to create its environment.
    #[error("ONNX Runtime loaded from {path} but its environment could not be created: {message}")]
    Environment {
        /// The library file.
        path: PathBuf,
        /// ONNX Runtime's error, on one line.
        message: String,
    },
}

/// A parsed `major.minor.patch` version, as found in library file names and in ort's version string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrtVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version: the C API level (31 for 1.31.x).
    pub minor: u32,
    /// Patch version; 0 when the text has none.
    pub patch: u32,
}

impl OrtVersion {
    /// Parses `1.31.1` (a missing patch reads as 0; any suffix after a non-digit is ignored: `1.32.0-dev`).
    pub fn parse(text: &str) -> Option<OrtVersion> {
        let mut parts = text.trim().split('.').map(|part| {
            let digits: &str = &part[..part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len())];
            digits.parse::<u32>().ok()
        });
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(OrtVersion { major, minor, patch })
    }

    /// Whether `(major, minor)` is at least [`MIN_VERSION`].
    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= MIN_VERSION
    }
}

impl fmt::Display for OrtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// True for ONNX Runtime's own library names: `libonnxruntime.so`, `libonnxruntime.so.1.31.1`,
/// `libonnxruntime.1.31.1.dylib`, `onnxruntime.dll`; false for its provider plug-ins
/// (`libonnxruntime_providers_shared.so`) and the Python extension.
pub fn is_ort_library_name(name: &str) -> bool {
    name == "libonnxruntime.so"
        || name.starts_with("libonnxruntime.so.")
        || name == "onnxruntime.dll"
        || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib"))
}

/// The version carried by a library file name (`libonnxruntime.so.1.31.1` -> 1.31.1), if any.
pub fn version_from_file_name(name: &str) -> Option<OrtVersion> {
    let rest = name
        .strip_prefix("libonnxruntime.so.")
        .or_else(|| name.strip_prefix("libonnxruntime.").and_then(|r| r.strip_suffix(".dylib")))?;
    OrtVersion::parse(rest)
}

/// Of several library names in one directory, the one to load: the highest version in the name,
/// a bare `libonnxruntime.so` only when no name carries a version.
pub fn pick_library<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|name| is_ort_library_name(name))
        .max_by(|a, b| (version_from_file_name(a), *a).cmp(&(version_from_file_name(b), *b)))
}

/// The inputs of the library search, separated from the process so tests can point it at temp dirs.
#[derive(Debug, Clone, Default)]
pub struct LibSearch {
    /// `--ort-lib PATH`.
    pub explicit: Option<PathBuf>,
    /// Value of `ORT_DYLIB_PATH` (unset or empty: `None`).
    pub env_path: Option<PathBuf>,
    /// Directory of the running executable.
    pub exe_dir: Option<PathBuf>,
    /// The crate root recorded at build time, searched for `.venv` after the executable's ancestors.
    pub build_root: Option<PathBuf>,
}

impl LibSearch {
    /// The search this process would run: `explicit`, then `ORT_DYLIB_PATH`, the executable's
    /// directory and its ancestors, then the crate root this binary was built from.
    pub fn from_process(explicit: Option<&Path>) -> LibSearch {
        LibSearch {
            explicit: explicit.map(Path::to_path_buf),
            env_path: std::env::var_os(ENV_DYLIB_PATH).filter(|v| !v.is_empty()).map(PathBuf::from),
            exe_dir: std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)),
            build_root: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        }
    }

    /// Runs the search. An explicit path or `ORT_DYLIB_PATH` that names no file is an error at
    /// once rather than a reason to look elsewhere: silently loading another library would hide
    /// the typo.
    pub fn locate(&self) -> Result<(PathBuf, LibSource), OrtLibError> {
        for (given, source) in [(&self.explicit, LibSource::Explicit), (&self.env_path, LibSource::EnvVar)] {
            if let Some(path) = given {
                return if path.is_file() {
                    Ok((absolute(path), source))
                } else {
                    Err(OrtLibError::NotAFile {
                        path: path.clone(),
                        origin: source,
                    })
                };
            }
        }

        let mut searched = vec!["--ort-lib (not given)".to_string(), format!("{ENV_DYLIB_PATH} (not set)")];
        if let Some(dir) = &self.exe_dir {
            if let Some(found) = library_in_dir(dir) {
                return Ok((found, LibSource::NextToExecutable));
            }
            searched.push(format!("{}/libonnxruntime.so*", dir.display()));
        }

        let mut roots: Vec<&Path> = self.exe_dir.iter().flat_map(|dir| dir.ancestors()).collect();
        roots.extend(self.build_root.as_deref());
        for root in &roots {
            if let Some(found) = library_in_venv(root) {
                return Ok((found, LibSource::RepoVenv));
            }
        }
        if let Some(dir) = &self.exe_dir {
            searched.push(format!(
                "{}/.venv/lib/python3*/site-packages/onnxruntime/capi/ and in every parent directory",
                dir.display()
            ));
        }
        if let Some(root) = &self.build_root {
            searched.push(format!("{}/.venv/lib/python3*/site-packages/onnxruntime/capi/", root.display()));
        }
        Err(OrtLibError::NotFound { searched })
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn library_in_dir(dir: &Path) -> Option<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_file())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    pick_library(names.iter().map(String::as_str)).map(|name| absolute(&dir.join(name)))
}

fn library_in_venv(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path())
        .collect();
    pythons.sort();
    pythons
        .iter()
        .rev()
        .find_map(|python| library_in_dir(&python.join("site-packages").join("onnxruntime").join("capi")))
}

/// Finds the ONNX Runtime library: `explicit` (`--ort-lib`), then `ORT_DYLIB_PATH`, then a
/// `libonnxruntime.so*` next to the executable, then the `.venv` onnxruntime wheel of the
/// repository above the executable (or the crate root at build time).
pub fn locate(explicit: Option<&Path>) -> Result<(PathBuf, LibSource), OrtLibError> {
    LibSearch::from_process(explicit).locate()
}

struct Loaded {
    info: OrtInfo,
    environment: Environment,
}

/// ONNX Runtime can be loaded once per process (ort keeps the first library for good).
static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

/// Locates and loads ONNX Runtime once per process and creates its environment. Later calls
/// return the first result; asking for a different file after that is an error.
pub fn init(explicit: Option<&Path>) -> Result<OrtInfo, OrtLibError> {
    init_with(&LibSearch::from_process(explicit))
}

fn init_with(search: &LibSearch) -> Result<OrtInfo, OrtLibError> {
    let mut loaded = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(done) = loaded.as_ref() {
        return match &search.explicit {
            Some(requested) if absolute(requested) != done.info.path => Err(OrtLibError::AlreadyLoaded {
                loaded: done.info.path.clone(),
                requested: requested.clone(),
            }),
            _ => Ok(done.info.clone()),
        };
    }

    let (path, source) = search.locate()?;
    // A zero-byte, foreign or too-old file comes back from ort as an error carrying dlopen's
    // text or the version string; none of those paths panics.
    let builder = ort::init_from(&path).map_err(|error| match error {
        ort::LoadDynamicError::BadVersion { version_str, path } => OrtLibError::TooOld {
            path,
            origin: source,
            found: version_str,
        },
        ort::LoadDynamicError::Dlopen { error, path } => OrtLibError::NotLoadable {
            path,
            origin: source,
            reason: crate::error_chain(&error),
        },
        ort::LoadDynamicError::MissingApi { path } => OrtLibError::NotLoadable {
            path,
            origin: source,
            reason: "it does not export `OrtGetApiBase`, so it is not an ONNX Runtime library".to_string(),
        },
        other => OrtLibError::NotLoadable {
            path: path.clone(),
            origin: source,
            reason: other.to_string(),
        },
    })?;
    let environment = builder
        .with_name("paligemma")
        // ONNX Runtime logs failures (a provider library that will not load) to stderr itself;
        // the errors this module returns carry the same text in one line, so its log is kept
        // quiet unless asked for with PALIGEMMA_ORT_LOG=1.
        .with_logger(std::sync::Arc::new(|level, category, _id, location, message| {
            if std::env::var_os("PALIGEMMA_ORT_LOG").is_some() {
                eprintln!("onnxruntime {level:?} [{category}] {location}: {message}");
            }
        }))
        .build()
        .map_err(|e| OrtLibError::Environment {
            path: path.clone(),
            message: one_line(&e.to_string()),
        })?;

    let file_version = std::fs::canonicalize(&path)
        .ok()
        .and_then(|real| real.file_name().and_then(|n| n.to_str()).and_then(version_from_file_name))
        .or_else(|| path.file_name().and_then(|n| n.to_str()).and_then(version_from_file_name))
        .filter(OrtVersion::is_supported);
    let version = match file_version {
        Some(v) => v.to_string(),
        None => format!(">={}.{}", MIN_VERSION.0, MIN_VERSION.1),
    };
    let info = OrtInfo { path, version, source };
    *loaded = Some(Loaded {
        info: info.clone(),
        environment,
    });
    Ok(info)
}

pub(super) fn environment() -> Option<Environment> {
    let loaded = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loaded.as_ref().map(|done| done.environment.clone())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parses_from_ort_version_strings() {
        assert_eq!(
            OrtVersion::parse("1.31.1"),
            Some(OrtVersion {
                major: 1,
                minor: 31,
                patch: 1
            })
        );
        assert_eq!(
            OrtVersion::parse("1.32.0-dev"),
            Some(OrtVersion {
                major: 1,
                minor: 32,
                patch: 0
            })
        );
        assert_eq!(
            OrtVersion::parse("1.31"),
            Some(OrtVersion {
                major: 1,
                minor: 31,
                patch: 0
            })
        );
        assert_eq!(OrtVersion::parse("garbage"), None);
        assert_eq!(OrtVersion::parse(""), None);
    }

    #[test]
    fn versions_below_the_api_level_are_unsupported() {
        assert!(OrtVersion::parse("1.31.1").is_some_and(|v| v.is_supported()));
        assert!(OrtVersion::parse("1.40.0").is_some_and(|v| v.is_supported()));
        assert!(OrtVersion::parse("1.30.9").is_some_and(|v| !v.is_supported()));
        assert!(OrtVersion::parse("1.9.0").is_some_and(|v| !v.is_supported()));
    }

    #[test]
    fn library_names_exclude_provider_plugins() {
        assert!(is_ort_library_name("libonnxruntime.so.1.31.1"));
        assert!(is_ort_library_name("libonnxruntime.so"));
        assert!(is_ort_library_name("libonnxruntime.1.31.1.dylib"));
        assert!(!is_ort_library_name("libonnxruntime_providers_shared.so"));
        assert!(!is_ort_library_name("onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so"));
    }

    #[test]
    fn highest_versioned_library_wins_over_bare_name() {
        let names = [
            "libonnxruntime.so",
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.31.1",
            "libonnxruntime_providers_shared.so",
        ];
        assert_eq!(pick_library(names), Some("libonnxruntime.so.1.31.1"));
        assert_eq!(pick_library(["libonnxruntime.so"]), Some("libonnxruntime.so"));
        assert_eq!(pick_library(["libonnxruntime_providers_cuda.so"]), None);
    }
}
