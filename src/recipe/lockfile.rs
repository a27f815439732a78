//! `NAME.lock` beside `NAME.yaml`: every package of the closure pinned by name, version,
//! architecture and the sha256 of its `.deb`, sorted by name, so that a build needs no
//! package index at all (only the `.deb` files, by hash) and gives the same image on
//! any machine. `sandrun lock images/NAME.yaml` writes it; `sandrun build` refuses a
//! `.deb` whose hash differs from it.

use std::path::{Path, PathBuf};

use super::error::RecipeError;

pub const RECIPE_LOCK_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub sha256: String,
    pub size: u64,
    /// Where the `.deb` is downloaded from (archive URI + pool path).
    pub url: String,
    /// The source package it was built from.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RecipeLock {
    pub version: u32,
    pub architecture: String,
    /// The timestamp of files the recipe itself adds (and the image's `created`) when
    /// SOURCE_DATE_EPOCH is not set: the newest Release date at lock time.
    pub source_date_epoch: i64,
    /// The recipe's `packages:` as written, sorted: a change means the lock is stale.
    pub requested: Vec<String>,
    pub packages: Vec<LockedPackage>,
}

/// `images/pg.yaml` -> `images/pg.lock`.
pub fn lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl RecipeLock {
    pub fn read(path: &Path) -> Result<RecipeLock, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::read(path, e))?;
        let bad = |reason: String| RecipeError::Lock {
            path: path.to_path_buf(),
            reason,
        };
        let lock: RecipeLock = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if lock.version != RECIPE_LOCK_VERSION {
            return Err(bad(format!("version {} is not supported (expected {RECIPE_LOCK_VERSION})", lock.version)));
        }
        for p in &lock.packages {
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Err(bad(format!("package {}: sha256 `{}` is not 64 lowercase hex digits", p.name, p.sha256)));
            }
        }
        if !lock.packages.windows(2).all(|w| w[0].name < w[1].name) {
            return Err(bad("packages are not sorted by name, or one is listed twice".into()));
        }
        Ok(lock)
    }

    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("lock serialises");
        format!("# sandrun recipe lock: every package pinned by the sha256 of its .deb.\n# Written by `sandrun lock`; do not edit by hand.\n{body}")
    }

    pub fn write(&self, path: &Path) -> Result<(), RecipeError> {
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, self.to_yaml()).map_err(|e| RecipeError::read(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| RecipeError::read(path, e))
    }
}
