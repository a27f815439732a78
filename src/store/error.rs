//! What can go wrong in the image store, said precisely: which image, which blob, which
//! file, and what happened to it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid image reference `{reference}`: {reason}")]
    BadReference { reference: String, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("store at {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("image {reference} is not in the store and the pull policy is Never")]
    NotPresent { reference: String },

    #[error("image {reference} is not in the store and --offline forbids contacting {registry}{}", what.as_ref().map(|w| format!(" (missing: {w})")).unwrap_or_default())]
    Offline {
        reference: String,
        registry: String,
        what: Option<String>,
    },

    #[error("registry {registry} ({reference}): {message}")]
    Registry {
        reference: String,
        registry: String,
        message: String,
    },

    #[error("{reference}: blob {digest} is wrong: {reason}; it was not stored")]
    BadBlob {
        reference: String,
        digest: String,
        reason: String,
    },

    #[error("{reference}: {what} is invalid: {reason}")]
    BadManifest {
        reference: String,
        what: String,
        reason: String,
    },

    #[error("{reference}: no image for {platform} in the index (available: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },

    #[error("{reference}: layer {digest} refused: {reason}")]
    BadLayer {
        reference: String,
        digest: String,
        reason: String,
    },

    #[error("{reference}: pinned to {pinned} by the lock file, but {found}")]
    PinMismatch {
        reference: String,
        pinned: String,
        found: String,
    },

    /// The store's filesystem ran out of space (or quota): the local disk, not the
    /// registry, is to blame.
    #[error("no space left in the store {}: writing {what} failed: {reason}; free space (`sandrun gc`) or set SANDRUN_HOME to a larger filesystem", store.display())]
    NoSpace {
        store: PathBuf,
        what: String,
        reason: String,
    },

    #[error("credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },

    #[error("archive {path}: {reason}")]
    Archive { path: PathBuf, reason: String },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}

/// ENOSPC or EDQUOT: the filesystem (or the user's quota on it) is full.
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// `io::Result` -> `StoreError::Io` naming the path.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::io(path, e))
    }
}
