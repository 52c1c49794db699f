//! Files a user names (images, `--batch` files): regular files only, their size checked before a
//! byte is read. A device such as `/dev/zero` or `/dev/urandom` would be read until memory runs
//! out, a FIFO blocks until something writes to it, and a directory has no bytes to read.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Why a file a user named cannot be read. `what` names the kind of file ("image file", "batch file").
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Nothing is at the path (or a symbolic link there is dangling).
    #[error("{what} {path} does not exist: check the path")]
    NotFound {
        /// The kind of file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// The path is a directory.
    #[error("{what} {path} is a directory: name a file")]
    Directory {
        /// The kind of file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// The path is a device, FIFO or socket: refused before it is opened.
    #[error("{what} {path} is a {kind}, not a regular file (it could be read forever or block): save the data to a file and name that")]
    NotRegular {
        /// The kind of file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// What it is instead: `character device`, `block device`, `FIFO (named pipe)`, `socket`.
        kind: &'static str,
    },
    /// The file is over the caller's limit, by its metadata or by what reading it gave.
    #[error("{what} {path} is {size} bytes, over the limit of {limit} bytes: use a smaller file")]
    TooLarge {
        /// The kind of file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Its size in bytes (when read, the limit plus one: reading stops there).
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Any other I/O error in metadata, open or read (permissions, mostly).
    #[error("cannot read {what} {path}: {source}; check its permissions")]
    Read {
        /// The kind of file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// The bytes of the regular file at `path` (symbolic links followed), at most `max_bytes` of
/// them; `what` names the file in errors ("image file", "batch file").
pub fn read_regular_file(path: &Path, what: &'static str, max_bytes: u64) -> Result<Vec<u8>, InputError> {
    let read_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => InputError::NotFound {
            what,
            path: path.to_owned(),
        },
        _ => InputError::Read {
            what,
            path: path.to_owned(),
            source,
        },
    };
    // The kind is checked before opening: opening a FIFO for reading already blocks.
    check_kind(path, what, &fs::metadata(path).map_err(read_error)?, max_bytes)?;
    let file = File::open(path).map_err(read_error)?;
    // Again on what was opened, in case the path changed in between.
    check_kind(path, what, &file.metadata().map_err(read_error)?, max_bytes)?;
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > max_bytes {
        return Err(InputError::TooLarge {
            what,
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

fn check_kind(path: &Path, what: &'static str, metadata: &fs::Metadata, max_bytes: u64) -> Result<(), InputError> {
    let kind = metadata.file_type();
    if kind.is_dir() {
        return Err(InputError::Directory {
            what,
            path: path.to_owned(),
        });
    }
    if !kind.is_file() {
        return Err(InputError::NotRegular {
            what,
            path: path.to_owned(),
            kind: special_kind(&kind),
        });
    }
    if metadata.len() > max_bytes {
        return Err(InputError::TooLarge {
            what,
            path: path.to_owned(),
            size: metadata.len(),
            limit: max_bytes,
        });
    }
    Ok(())
}

#[cfg(unix)]
fn special_kind(kind: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_fifo() {
        "FIFO (named pipe)"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &fs::FileType) -> &'static str {
    "special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("paligemma-input-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = scratch("regular");
        let file = dir.join("a.bin");
        fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular_file(&file, "image file", 5).unwrap(), b"12345");
        let e = read_regular_file(&file, "image file", 4).unwrap_err();
        assert!(matches!(e, InputError::TooLarge { size: 5, limit: 4, .. }), "{e}");
        let e = read_regular_file(&dir.join("missing"), "image file", 4).unwrap_err();
        assert!(
            e.to_string().starts_with("image file ") && e.to_string().contains("does not exist"),
            "{e}"
        );
        let e = read_regular_file(&dir, "batch file", 4).unwrap_err();
        assert!(matches!(e, InputError::Directory { .. }), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn devices_are_refused_before_reading() {
        for device in ["/dev/zero", "/dev/urandom", "/dev/null"] {
            let e = read_regular_file(Path::new(device), "image file", 1 << 30).unwrap_err();
            assert!(
                matches!(
                    e,
                    InputError::NotRegular {
                        kind: "character device",
                        ..
                    }
                ),
                "{device}: {e}"
            );
        }
    }
}
