//! What can go wrong with a recipe, said precisely: the recipe file and line, the field,
//! the package and the chain of dependencies that led to it.

use std::path::PathBuf;

use crate::store::StoreError;

/// A place in a recipe file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{loc}: {message}")]
    Invalid { loc: Loc, message: String },

    #[error("{loc}: recipe cycle: {}", .chain.join(" -> "))]
    Cycle { loc: Loc, chain: Vec<String> },

    #[error("{loc}: host file {path}: {reason}")]
    HostFile {
        loc: Loc,
        path: PathBuf,
        reason: String,
    },

    #[error("{loc}: unknown package `{name}`{}", .suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownPackage {
        loc: Loc,
        name: String,
        suggestion: Option<String>,
    },

    #[error("{loc}: cannot satisfy {dep}{}: {reason}", chain_text(.chain))]
    Unsatisfiable {
        loc: Loc,
        chain: Vec<String>,
        dep: String,
        reason: String,
    },

    #[error("{loc}: conflicting packages{}: {reason}", chain_text(.chain))]
    Conflict {
        loc: Loc,
        chain: Vec<String>,
        reason: String,
    },

    #[error("lock file {path}: {reason}")]
    Lock { path: PathBuf, reason: String },

    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },

    #[error("{what}: not in the store, and --offline forbids downloading it from {url}")]
    Offline { what: String, url: String },

    #[error("{what}: {reason}")]
    BadContent { what: String, reason: String },

    #[error(transparent)]
    Store(#[from] StoreError),
}

fn chain_text(chain: &[String]) -> String {
    if chain.is_empty() {
        String::new()
    } else {
        format!(" (needed by {})", chain.join(" -> "))
    }
}

impl RecipeError {
    pub(crate) fn read(path: impl Into<PathBuf>, source: std::io::Error) -> RecipeError {
        RecipeError::Read {
            path: path.into(),
            source,
        }
    }
}
