//! Resolving a model argument to a local directory holding `manifest.json` (or the transformers.js
//! layout, see `transformers_js.rs`): either a directory made by `python -m export convert` or
//! downloaded, or a Hugging Face Hub repo id fetched with `hf-hub` 0.5 (sync `ureq` API) into the
//! standard Hub cache.
//!
//! The cache layout (`models--owner--name/{blobs,refs,snapshots}`) and the environment variables
//! follow Python's `huggingface_hub` (`constants.py`), so a model downloaded by either side is
//! found by the other: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//! else `~/.cache/huggingface/hub`; `HF_ENDPOINT`; `HF_TOKEN` (else the token file);
//! `HF_HUB_OFFLINE`. hf-hub itself only reads `HF_HOME`, `HF_ENDPOINT` and the token file, and
//! panics without a home directory, so the options are resolved here and passed explicitly.
//!
//! Which files make a model is the exporter's business: `manifest.json` carries
//! `"files": ["relative/path", ...]`, and every listed file must sit beside it. A transformers.js
//! repo has no manifest: its file list (the Hub's model info) says which graphs it holds, and only
//! the config files and the graphs `--dtype` picks are downloaded.

#[cfg(feature = "hub")]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, DtypeChoice};
use crate::transformers_js;

#[cfg(feature = "hub")]
use hf_hub::api::sync::ApiBuilder;
#[cfg(feature = "hub")]
use hf_hub::{Cache, Repo};

/// The file that marks a converted model directory.
pub const MANIFEST: &str = "manifest.json";

/// The public Hub, used when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The fix printed when a directory is not a converted model.
const CONVERT_HINT: &str =
    "convert a checkpoint with `python -m export convert MODEL OUT_DIR` and pass OUT_DIR, or pass a Hub repo id (owner/name)";

/// Longest repo name the Hub accepts (huggingface_hub `validate_repo_id`).
const MAX_REPO_NAME: usize = 96;

/// Why a model argument does not resolve to a usable model directory.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The argument is meant as a path (it starts with `/`, `.` or `~`, or has `\` or two `/`), or
    /// names a file, and no directory is there.
    #[error("model directory {path} {}; {CONVERT_HINT}", if path.exists() { "is a file, not a directory" } else { "does not exist" })]
    NotADirectory {
        /// The argument as a path.
        path: PathBuf,
    },
    /// The directory has no `manifest.json` and no transformers.js layout: it is not a model.
    #[error("{dir} has no {MANIFEST} and no onnx/decoder_model_merged*.onnx (the transformers.js layout), so it is not a converted model; {CONVERT_HINT}")]
    MissingManifest {
        /// The directory, made absolute.
        dir: PathBuf,
    },
    /// The argument is no directory and breaks a rule of Hub repo ids ([`validate_repo_id`]).
    #[error("{spec:?} is neither an existing directory nor a Hub repo id of the form owner/name: {reason}")]
    BadRepoId {
        /// The argument as given.
        spec: String,
        /// The rule it breaks.
        reason: String,
    },
    /// The manifest cannot be read, is not JSON, or its `files` list is missing or leaves the directory.
    #[error("manifest {path} is unusable: {reason}; re-run `python -m export convert` or re-download the model")]
    Manifest {
        /// The manifest's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file the manifest lists is not in the local model directory.
    #[error("{manifest} lists {file:?} but {dir} does not contain it; re-run `python -m export convert` or re-download the model")]
    MissingFile {
        /// The manifest's path.
        manifest: PathBuf,
        /// The model directory.
        dir: PathBuf,
        /// The missing file, relative to `dir`.
        file: String,
    },
    /// `HF_HUB_OFFLINE` is set and the cache does not hold the repo's manifest and every file it lists.
    #[error("no directory {repo} exists here, and as a Hub repo id: HF_HUB_OFFLINE is set and {repo} is not complete in the cache {cache_dir} (missing: {}); check the path, unset HF_HUB_OFFLINE to download it, or pass a local model directory", missing.join(", "))]
    OfflineNotCached {
        /// The repo id.
        repo: String,
        /// The Hub cache directory searched.
        cache_dir: PathBuf,
        /// The files not in the cache (`manifest.json` alone when neither it nor a transformers.js
        /// layout is cached).
        missing: Vec<String>,
    },
    /// hf-hub could not fetch a file: HTTP status, network, auth, or a reply it failed on.
    #[error("no directory {repo} exists here, and as a Hub repo id: could not download {file} of {repo} from {endpoint}: {reason}; check the path or the repo id, the network or HF_ENDPOINT, and HF_TOKEN for gated repos")]
    Download {
        /// The repo id.
        repo: String,
        /// The file, relative to the repo.
        file: String,
        /// The Hub base URL (`HF_ENDPOINT`, else the public Hub).
        endpoint: String,
        /// hf-hub's error and its causes on one line.
        reason: String,
    },
    /// A listed file landed in another snapshot than the manifest's: the repo's `main` moved
    /// during the download.
    #[error("{repo} changed on the Hub while its files were downloading ({file} landed in {found}, not beside the manifest in {expected}); run again")]
    CommitMoved {
        /// The repo id.
        repo: String,
        /// The file, relative to the repo.
        file: String,
        /// Its path beside the manifest, in the manifest's snapshot.
        expected: PathBuf,
        /// Where hf-hub put it.
        found: PathBuf,
    },
    /// A transformers.js repo has no graph of the dtype asked for (`--dtype`).
    #[error(transparent)]
    Dtype(#[from] ConfigError),
    /// The repo has neither `manifest.json` nor a transformers.js decoder graph.
    #[error("{repo} on {endpoint} has no {MANIFEST} and no onnx/decoder_model_merged*.onnx (the transformers.js layout): it is not a PaliGemma ONNX model; {CONVERT_HINT}")]
    NotAModel {
        /// The repo id.
        repo: String,
        /// The Hub base URL.
        endpoint: String,
    },
    /// None of `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME` and `HOME` is set, so there is no
    /// Hugging Face cache directory.
    #[error(
        "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME is set; set HF_HUB_CACHE or HF_HOME"
    )]
    NoCacheDir,
    /// The argument is a valid repo id, not a directory, and this build lacks the cargo feature `hub`.
    #[error("{repo} is not a directory, and this build has no Hub downloads (cargo feature `hub`); pass a converted model directory, or rebuild with default features")]
    NoHubSupport {
        /// The repo id.
        repo: String,
    },
}

/// Where and how to fetch Hub models. Build it with [`HubOptions::from_env`]; tests and callers
/// with their own settings fill the fields directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Hub base URL without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache directory holding `models--owner--name` folders.
    pub cache_dir: PathBuf,
    /// Never touch the network; the cache must hold everything (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Bearer token for gated or private repos.
    pub token: Option<String>,
    /// Draw download progress bars on stderr (off with `HF_HUB_DISABLE_PROGRESS_BARS`).
    pub progress: bool,
}

impl HubOptions {
    /// Options from the process environment, with `huggingface_hub`'s variable names and precedence.
    pub fn from_env() -> Result<HubOptions, HubError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`HubOptions::from_env`] over any variable lookup; empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<HubOptions, HubError> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        // huggingface_hub's HF_HOME: only the token file needs it when HF_HUB_CACHE is set.
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(|xdg| PathBuf::from(xdg).join("huggingface"))
                .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache").join("huggingface")))
        });
        let cache_dir = match (var("HF_HUB_CACHE"), &hf_home) {
            (Some(cache), _) => PathBuf::from(cache),
            (None, Some(home)) => home.join("hub"),
            (None, None) => return Err(HubError::NoCacheDir),
        };
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .or_else(|| hf_home.map(|home| home.join("token")));
        let token = var("HF_TOKEN")
            .or_else(|| token_file.and_then(|file| std::fs::read_to_string(file).ok()))
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());
        Ok(HubOptions {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            offline: var("HF_HUB_OFFLINE").is_some_and(|value| is_truthy(&value)),
            token,
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|value| is_truthy(&value)),
        })
    }
}

/// `huggingface_hub`'s reading of boolean variables: 1, ON, YES, TRUE in any case.
fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

/// Checks `spec` is a Hub model id `owner/name`: letters, digits, `_`, `-`, `.`, starting and
/// ending with a letter, digit or `_`, no `--` or `..`, the name at most 96 characters
/// (huggingface_hub `validate_repo_id`, with the owner made mandatory).
pub fn validate_repo_id(spec: &str) -> Result<(), HubError> {
    let bad = |reason: &str| HubError::BadRepoId {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let parts: Vec<&str> = spec.split('/').collect();
    let [owner, name] = parts.as_slice() else {
        return Err(bad("expected exactly one `/` between owner and name"));
    };
    for part in [owner, name] {
        if part.is_empty() {
            return Err(bad("owner and name must both be non-empty"));
        }
        if let Some(c) = part.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return Err(bad(&format!("character {c:?} is not allowed (letters, digits, `_`, `-`, `.`)")));
        }
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !word(part.chars().next()) || !word(part.chars().last()) {
            return Err(bad("each part must start and end with a letter, digit or `_`"));
        }
        if part.contains("--") || part.contains("..") {
            return Err(bad("`--` and `..` are not allowed"));
        }
    }
    if name.len() > MAX_REPO_NAME {
        return Err(bad(&format!(
            "the name has {} characters, at most {MAX_REPO_NAME} are allowed",
            name.len()
        )));
    }
    Ok(())
}

/// The relative paths under `manifest["files"]`. Each must stay inside the model directory:
/// the list comes from a download, and hf-hub writes each name below the snapshot folder.
pub fn manifest_files(manifest: &serde_json::Value) -> Result<Vec<String>, String> {
    let entries = manifest
        .get("files")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| "it has no \"files\" array listing the model's files".to_string())?;
    let mut files = Vec::with_capacity(entries.len());
    for entry in entries {
        let file = entry.as_str().ok_or_else(|| format!("\"files\" entry {entry} is not a string"))?;
        let inside = !file.contains(['\\', ':']) && file.split('/').all(|part| !matches!(part, "" | "." | ".."));
        if !inside {
            return Err(format!(
                "\"files\" entry {file:?} is not a relative path inside the model directory"
            ));
        }
        if file != MANIFEST && !files.iter().any(|known| known == file) {
            files.push(file.to_string());
        }
    }
    Ok(files)
}

/// Resolves `spec` to a directory holding `manifest.json` and every file it lists, or a
/// transformers.js layout with the graphs `dtype` picks.
///
/// An existing directory is used as is. Anything else must be a Hub repo id (`owner/name`): its
/// files come from the cache when all are there, otherwise they are downloaded (`manifest.json`
/// first, then each listed file; for a transformers.js repo, its config files and the graphs of
/// `dtype`), unless `options.offline` forbids the network.
pub fn resolve_model(spec: &str, options: &HubOptions, dtype: DtypeChoice) -> Result<PathBuf, HubError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return local_model(path);
    }
    if looks_like_path(spec) || path.exists() {
        return Err(HubError::NotADirectory { path: path.to_path_buf() });
    }
    validate_repo_id(spec)?;
    hub_model(spec, options, dtype)
}

/// Arguments a user meant as a path: a Hub id never starts with `/`, `.` or `~` nor has two `/`.
fn looks_like_path(spec: &str) -> bool {
    spec.starts_with(['/', '.', '~']) || spec.contains('\\') || spec.matches('/').count() > 1
}

fn local_model(dir: &Path) -> Result<PathBuf, HubError> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let manifest = dir.join(MANIFEST);
    if transformers_js::is_layout(&dir) {
        return Ok(dir);
    }
    if !manifest.is_file() {
        return Err(HubError::MissingManifest { dir });
    }
    let files = read_manifest_files(&manifest)?;
    if let Some(file) = files.into_iter().find(|file| !dir.join(file).is_file()) {
        return Err(HubError::MissingFile { manifest, dir, file });
    }
    Ok(dir)
}

fn read_manifest_files(manifest: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::Manifest {
        path: manifest.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    manifest_files(&json).map_err(bad)
}

/// What the cache holds for a repo at its cached `main` ref.
#[cfg(feature = "hub")]
enum Cached {
    /// The snapshot directory, holding the manifest and every file it lists.
    Complete(PathBuf),
    /// The names still missing (`manifest.json` alone when even that is absent).
    Missing(Vec<String>),
}

#[cfg(feature = "hub")]
fn cached_snapshot(cache: &Cache, repo_id: &str) -> Result<Cached, HubError> {
    let cached_manifest = cache.model(repo_id.to_string()).get(MANIFEST);
    let Some((manifest, dir)) = cached_manifest.as_ref().and_then(|manifest| Some((manifest, manifest.parent()?))) else {
        return Ok(Cached::Missing(vec![MANIFEST.to_string()]));
    };
    let missing: Vec<String> = read_manifest_files(manifest)?
        .into_iter()
        .filter(|file| !dir.join(file).is_file())
        .collect();
    Ok(if missing.is_empty() {
        Cached::Complete(dir.to_path_buf())
    } else {
        Cached::Missing(missing)
    })
}

/// What the cache holds of a transformers.js repo (a cached `config.json` beside
/// `onnx/decoder_model_merged*.onnx`) for `dtype`: complete, or the files `dtype` needs that are
/// absent. None when the cache holds no such layout.
#[cfg(feature = "hub")]
fn cached_layout(cache: &Cache, repo_id: &str, dtype: DtypeChoice) -> Option<Cached> {
    let config = cache.model(repo_id.to_string()).get("config.json")?;
    let dir = config.parent()?;
    if !transformers_js::is_layout(dir) {
        return None;
    }
    let files = transformers_js::all_files(dir);
    Some(match transformers_js::needed_files(&files, dtype, dir) {
        Ok(needed) => {
            let missing: Vec<String> = needed.into_iter().filter(|f| !files.contains(f)).collect();
            if missing.is_empty() {
                Cached::Complete(dir.to_path_buf())
            } else {
                Cached::Missing(missing)
            }
        }
        // The repo's full file list is unknown offline; say which graphs the cache lacks.
        Err(e) => Cached::Missing(vec![format!("the {dtype} graphs ({e})")]),
    })
}

#[cfg(not(feature = "hub"))]
fn hub_model(repo_id: &str, _options: &HubOptions, _dtype: DtypeChoice) -> Result<PathBuf, HubError> {
    Err(HubError::NoHubSupport { repo: repo_id.to_string() })
}

#[cfg(feature = "hub")]
fn hub_model(repo_id: &str, options: &HubOptions, dtype: DtypeChoice) -> Result<PathBuf, HubError> {
    let cache = Cache::new(options.cache_dir.clone());
    // A conversion's manifest lists its files; a transformers.js layout has none, so the dtype
    // picks them.
    let missing = match cached_snapshot(&cache, repo_id)? {
        Cached::Complete(dir) => return Ok(dir),
        Cached::Missing(manifest_missing) => match cached_layout(&cache, repo_id, dtype) {
            Some(Cached::Complete(dir)) => return Ok(dir),
            Some(Cached::Missing(missing)) => missing,
            None => manifest_missing,
        },
    };
    if options.offline {
        return Err(HubError::OfflineNotCached {
            repo: repo_id.to_string(),
            cache_dir: options.cache_dir.clone(),
            missing,
        });
    }

    let download_error = |file: &str, reason: String| HubError::Download {
        repo: repo_id.to_string(),
        file: file.to_string(),
        endpoint: options.endpoint.clone(),
        reason,
    };
    let api = ApiBuilder::from_cache(cache)
        .with_endpoint(options.endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(options.progress)
        .build()
        .map_err(|e| download_error(MANIFEST, crate::error_chain(&e)))?;
    let repo = api.repo(Repo::model(repo_id.to_string()));
    // hf-hub asserts on some malformed server replies (a redirect without Location); a bad
    // server must give an error, not bring the program down.
    let fetch = |file: &str| match catch_unwind(AssertUnwindSafe(|| repo.download(file))) {
        Ok(Ok(path)) => Ok(path),
        Ok(Err(e)) => Err(download_error(file, crate::error_chain(&e))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(download_error(
                file,
                format!("the Hub client (hf-hub) failed on an unexpected reply ({what})"),
            ))
        }
    };

    // Always fetch the manifest afresh: it pins the commit every other file must come from.
    let (first, files) = match fetch(MANIFEST) {
        Ok(manifest) => {
            let files = read_manifest_files(&manifest)?;
            (manifest, files)
        }
        Err(no_manifest) => {
            // A transformers.js repo has none: the repo's file list says which graphs it holds.
            let Ok(Ok(info)) = catch_unwind(AssertUnwindSafe(|| repo.info())) else {
                return Err(no_manifest);
            };
            let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
            if !names.iter().any(|n| n.starts_with("onnx/decoder_model_merged")) {
                return Err(HubError::NotAModel {
                    repo: repo_id.to_string(),
                    endpoint: options.endpoint.clone(),
                });
            }
            let mut files = transformers_js::needed_files(&names, dtype, Path::new(repo_id))?;
            let config = files.remove(files.iter().position(|f| f == "config.json").unwrap_or_default());
            (fetch(&config)?, files)
        }
    };
    let dir = first
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| download_error(MANIFEST, format!("hf-hub returned {} without a parent directory", first.display())))?;
    for file in files {
        let expected = dir.join(&file);
        if expected.is_file() {
            continue;
        }
        let found = fetch(&file)?;
        if found != expected {
            return Err(HubError::CommitMoved {
                repo: repo_id.to_string(),
                file,
                expected,
                found,
            });
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options_from(pairs: &[(&str, &str)]) -> Result<HubOptions, HubError> {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubOptions::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn repo_ids_need_owner_and_name() {
        assert!(validate_repo_id("google/paligemma2-3b-mix-224").is_ok());
        assert!(validate_repo_id("onnx-community/PaliGemma2_3B.v1").is_ok());
        for bad in [
            "paligemma",
            "a/b/c",
            "/name",
            "owner/",
            "own er/name",
            "owner/-name",
            "owner/na--me",
            "owner/na..me",
            "owner/name.",
        ] {
            assert!(matches!(validate_repo_id(bad), Err(HubError::BadRepoId { .. })), "{bad} accepted");
        }
        assert!(validate_repo_id(&format!("owner/{}", "x".repeat(97))).is_err());
        assert!(validate_repo_id(&format!("owner/{}", "x".repeat(96))).is_ok());
    }

    #[test]
    fn manifest_files_must_stay_inside_the_model_directory() {
        let ok = serde_json::json!({"files": ["graphs/vision.onnx", "tokenizer.json", "manifest.json", "tokenizer.json"]});
        assert_eq!(
            manifest_files(&ok),
            Ok(vec!["graphs/vision.onnx".to_string(), "tokenizer.json".to_string()])
        );
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "", "a\\b", "C:/x"] {
            let manifest = serde_json::json!({ "files": [bad] });
            assert!(manifest_files(&manifest).is_err(), "{bad:?} accepted");
        }
        assert!(manifest_files(&serde_json::json!({"graphs": {}})).is_err());
        assert!(manifest_files(&serde_json::json!({"files": [3]})).is_err());
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let dir = |pairs: &[(&str, &str)]| options_from(pairs).map(|o| o.cache_dir).ok();
        assert_eq!(dir(&[("HOME", "/h")]), Some(PathBuf::from("/h/.cache/huggingface/hub")));
        assert_eq!(
            dir(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]),
            Some(PathBuf::from("/x/huggingface/hub"))
        );
        assert_eq!(
            dir(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/hf")]),
            Some(PathBuf::from("/hf/hub"))
        );
        assert_eq!(dir(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")]), Some(PathBuf::from("/c")));
        assert!(matches!(options_from(&[]), Err(HubError::NoCacheDir)));
        // HF_HUB_CACHE alone is enough (no home: no token file either).
        assert_eq!(dir(&[("HF_HUB_CACHE", "/c")]), Some(PathBuf::from("/c")));
    }

    #[test]
    fn endpoint_offline_and_token_come_from_their_variables() {
        let defaults = options_from(&[("HF_HOME", "/nonexistent-hf-home")]).ok();
        assert_eq!(
            defaults.as_ref().map(|o| (o.endpoint.as_str(), o.offline, o.token.clone())),
            Some((DEFAULT_ENDPOINT, false, None))
        );
        let set = options_from(&[
            ("HF_HOME", "/nonexistent-hf-home"),
            ("HF_ENDPOINT", "http://127.0.0.1:8080/"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_TOKEN", " hf_abc \n"),
        ])
        .ok();
        assert_eq!(
            set.map(|o| (o.endpoint, o.offline, o.token)),
            Some(("http://127.0.0.1:8080".to_string(), true, Some("hf_abc".to_string())))
        );
        let quiet = options_from(&[("HF_HOME", "/h"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")]).ok();
        assert_eq!(quiet.map(|o| o.progress), Some(false));
        for (value, offline) in [("1", true), ("ON", true), ("true", true), ("0", false), ("no", false)] {
            let options = options_from(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", value)]).ok();
            assert_eq!(options.map(|o| o.offline), Some(offline), "HF_HUB_OFFLINE={value}");
        }
    }

    #[test]
    fn path_like_specs_are_not_taken_for_repo_ids() {
        assert!(looks_like_path("./models/pg2"));
        assert!(looks_like_path("/abs/dir"));
        assert!(looks_like_path("models/pg2/int4"));
        assert!(!looks_like_path("google/paligemma2-3b-mix-224"));
    }
}
