//! Reading the files a user hands sandrun: pipelines and templates, lock files, the
//! config file, secrets files. Each is read whole into memory, so each read is bounded:
//! `sandrun run /dev/zero` (or a generator gone wrong behind `/dev/stdin`) stops at
//! the limit with an error naming the file, instead of growing until the kernel's
//! out-of-memory killer picks a victim. Pipes and devices stay readable (`sandrun run
//! /dev/stdin`): the bound is on what is read, not on what `stat` says.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Pipeline files and templates: room for tens of thousands of steps and for scripts
/// of tens of megabytes inline.
pub const MAX_PIPELINE_BYTES: u64 = 64 << 20;
/// Lock files, the config file and secrets files: a few lines each in practice.
pub const MAX_SMALL_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug)]
pub enum InputError {
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    TooLarge {
        what: &'static str,
        path: PathBuf,
        limit: u64,
    },
}

impl InputError {
    pub fn path(&self) -> &Path {
        match self {
            InputError::Io { path, .. } | InputError::TooLarge { path, .. } => path,
        }
    }

    /// What went wrong, without the path (for messages that put it first already).
    pub fn reason(&self) -> String {
        match self {
            InputError::Io { what, source, .. } => format!("cannot read the {what}: {source}"),
            InputError::TooLarge { what, limit, .. } => format!(
                "the {what} is larger than {} ({limit} bytes), the most sandrun reads",
                indicatif::HumanBytes(*limit)
            ),
        }
    }
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path().display(), self.reason())
    }
}

impl std::error::Error for InputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InputError::Io { source, .. } => Some(source),
            InputError::TooLarge { .. } => None,
        }
    }
}

/// Reads `path` (a `what`: "pipeline file", "lock file"...) as UTF-8 text, refusing more
/// than `limit` bytes.
pub fn read_text(path: &Path, what: &'static str, limit: u64) -> Result<String, InputError> {
    let io = |source| InputError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(InputError::TooLarge {
            what,
            path: path.to_path_buf(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {}", e.utf8_error()),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_small_files_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(read_text(&p, "test file", 3).unwrap(), "abc");
        let e = read_text(&p, "test file", 2).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "{}: the test file is larger than 2 B (2 bytes)",
                p.display()
            )),
            "{e}"
        );
        // A device that never ends is cut off at the limit.
        let e = read_text(Path::new("/dev/zero"), "pipeline file", 1 << 20).unwrap_err();
        assert!(matches!(e, InputError::TooLarge { .. }), "{e}");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        let e = read_text(&p, "test file", 10).unwrap_err();
        assert!(e.to_string().contains("not UTF-8 text"), "{e}");
    }
}
