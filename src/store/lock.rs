//! The lock file: every image reference a pipeline uses, pinned to the manifest digest
//! (and the index digest it was chosen from) for this platform. It sits beside the
//! pipeline as `<pipeline file name>.lock` (`build.yaml` -> `build.yaml.lock`), is YAML
//! with sorted keys so that it diffs cleanly, and is what makes `--locked` and
//! air-gapped runs reproducible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::StoreError;
use super::reference::ImageRef;

pub const LOCK_VERSION: u32 = 1;

/// One image's pin.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Pin {
    /// The platform manifest digest.
    pub manifest: String,
    /// The index digest, when the reference named a multi-platform index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct LockFile {
    pub version: u32,
    /// The platform the manifests were chosen for (`linux/amd64`).
    pub platform: String,
    /// Canonical reference -> pin.
    pub images: BTreeMap<String, Pin>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Input(#[from] crate::input::InputError),
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("--locked: {} not pinned in {lock}; run `sandrun lock`", .unpinned.join(", "))]
    Unpinned {
        lock: PathBuf,
        unpinned: Vec<String>,
    },
    #[error("--locked: the lock file {lock} is for {locked}, this machine is {host}")]
    Platform {
        lock: PathBuf,
        locked: String,
        host: String,
    },
}

/// `build.yaml` -> `build.yaml.lock`.
pub fn lock_path(pipeline: &Path) -> PathBuf {
    let mut name = pipeline.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    pipeline.with_file_name(name)
}

impl LockFile {
    pub fn new(platform: String) -> LockFile {
        LockFile {
            version: LOCK_VERSION,
            platform,
            images: BTreeMap::new(),
        }
    }

    pub fn read(path: &Path) -> Result<LockFile, LockError> {
        let text = crate::input::read_text(path, "lock file", crate::input::MAX_SMALL_FILE_BYTES)?;
        let lock: LockFile = serde_yaml::from_str(&text).map_err(|e| LockError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if lock.version != LOCK_VERSION {
            return Err(LockError::Read {
                path: path.to_path_buf(),
                reason: format!(
                    "lock file version {} is not supported (expected {LOCK_VERSION})",
                    lock.version
                ),
            });
        }
        Ok(lock)
    }

    /// Reads the lock file beside `pipeline`, if there is one.
    pub fn for_pipeline(pipeline: &Path) -> Result<Option<LockFile>, LockError> {
        let p = lock_path(pipeline);
        if p.exists() {
            Self::read(&p).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("lock file serialises");
        format!("# sandrun lock file: image references pinned to digests. Written by `sandrun lock`.\n{body}")
    }

    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, self.to_yaml()).map_err(|e| StoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))
    }

    /// The pin of `image` (any Docker spelling).
    pub fn pin(&self, image: &str) -> Option<&Pin> {
        let canon = ImageRef::parse(image).ok()?.canonical();
        self.images.get(&canon)
    }
}

/// What the executor calls for `--locked`: every image must be pinned, and the lock
/// must be for this platform. References that carry their own digest are pinned by
/// themselves.
pub fn check_locked(
    lock: &LockFile,
    lock_file: &Path,
    images: &[String],
    host: &str,
) -> Result<(), LockError> {
    if lock.platform != host {
        return Err(LockError::Platform {
            lock: lock_file.to_path_buf(),
            locked: lock.platform.clone(),
            host: host.to_string(),
        });
    }
    let mut unpinned: Vec<String> = images
        .iter()
        .filter(|i| {
            let pinned_by_digest = ImageRef::parse(i)
                .ok()
                .and_then(|r| r.digest().map(|_| ()))
                .is_some();
            !pinned_by_digest && lock.pin(i).is_none()
        })
        .cloned()
        .collect();
    unpinned.sort();
    unpinned.dedup();
    if unpinned.is_empty() {
        Ok(())
    } else {
        Err(LockError::Unpinned {
            lock: lock_file.to_path_buf(),
            unpinned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn round_trip_is_deterministic() {
        let mut l = LockFile::new("linux/amd64".into());
        l.images.insert(
            "docker.io/library/redis:7".into(),
            Pin {
                manifest: d('b'),
                index: None,
            },
        );
        l.images.insert(
            "docker.io/library/alpine:3".into(),
            Pin {
                manifest: d('a'),
                index: Some(d('c')),
            },
        );
        let y = l.to_yaml();
        assert!(y.find("alpine").unwrap() < y.find("redis").unwrap());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        l.write(&p).unwrap();
        assert_eq!(LockFile::read(&p).unwrap(), l);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), y);
        assert_eq!(l.pin("alpine:3").unwrap().manifest, d('a'));
    }

    #[test]
    fn locked_refuses_unpinned() {
        let mut l = LockFile::new("linux/amd64".into());
        l.images.insert(
            "docker.io/library/alpine:3".into(),
            Pin {
                manifest: d('a'),
                index: None,
            },
        );
        let p = Path::new("p.yaml.lock");
        assert!(check_locked(&l, p, &["alpine:3".into()], "linux/amd64").is_ok());
        let by_digest = format!("redis@{}", d('e'));
        assert!(check_locked(&l, p, &[by_digest], "linux/amd64").is_ok());
        let e =
            check_locked(&l, p, &["alpine:3".into(), "redis".into()], "linux/amd64").unwrap_err();
        assert!(e.to_string().contains("redis"), "{e}");
        assert!(check_locked(&l, p, &["alpine:3".into()], "linux/arm64/v8").is_err());
        assert_eq!(
            lock_path(Path::new("/a/build.yaml")),
            PathBuf::from("/a/build.yaml.lock")
        );
    }
}
