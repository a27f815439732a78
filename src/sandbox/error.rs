//! Errors of the sandbox layer: each says what happened to what (which file, which
//! image, which step), so that the runner can print it as is.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot enter a user namespace: the process has {threads} threads (unshare(CLONE_NEWUSER) needs a single-threaded process; call it before the tokio runtime starts)")]
    MultiThreaded { threads: usize },
    #[error("cannot {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mapping ids into the user namespace failed: {0}")]
    IdMapping(String),
    #[error("invalid container spec `{}`: {reason}", path.display())]
    InvalidSpec { path: PathBuf, reason: String },
    #[error("image `{image}` has no `{shell}` (needed by step `{step}`'s shell); set `shell:` to one the image has")]
    ShellMissing {
        image: String,
        shell: String,
        step: String,
    },
    #[error("image `{image}` has no executable `{program}` (step `{step}`)")]
    ProgramMissing {
        image: String,
        program: String,
        step: String,
    },
    #[error("step `{step}`: user `{user}` is not in image `{image}`'s /etc/passwd")]
    UnknownUser {
        step: String,
        user: String,
        image: String,
    },
    #[error("step `{step}`: image `{image}` has nothing to run (no entrypoint, command or Cmd)")]
    NothingToRun { step: String, image: String },
    #[error("container for step `{step}`: {what}: {message}")]
    Container {
        step: String,
        what: &'static str,
        message: String,
    },
}

impl SandboxError {
    pub(crate) fn sys(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        SandboxError::Sys {
            what: what.into(),
            source: source.into(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SandboxError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
