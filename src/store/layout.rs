//! The on-disk store: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) that skopeo, umoci and podman read and write, plus sandrun's
//! own rooms beside it:
//!
//! ```text
//! $SANDRUN_HOME/
//!   oci-layout  index.json  blobs/sha256/<hex>     OCI image layout (content + tags)
//!   layers/sha256/<diffid-hex>/rootfs/             unpacked layer, shared read-only
//!   layers/sha256/<diffid-hex>/layer.json          what unpacking it did (warnings, links)
//!   used/<manifest-hex>                            mtime = last time an image was used
//!   locks/<name>.lock  store.lock                  flock(2) files, never deleted
//!   tmp/<pid>-<n>...                               writes in progress (renamed when verified)
//! ```
//!
//! The root is mode 0700: what is unpacked below it (setuid binaries, device nodes of
//! images) is reachable by its owner only.
//!
//! Content is named by its digest and is verified before it is renamed into place; a
//! file under `blobs/` or `layers/` is therefore complete. Every writer holds
//! `store.lock` shared and a per-object lock exclusive; `gc` holds `store.lock`
//! exclusive, so it never removes what a running pull is writing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use sha2::{Digest as _, Sha256};

use super::error::{IoContext, StoreError};

pub const OCI_LAYOUT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Annotation naming an image in `index.json` (the canonical reference).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation recording the index (manifest list) a platform manifest was chosen from.
pub const INDEX_DIGEST: &str = "io.github.sandrun.index.digest";

/// `sha256:<64 hex>` -> `<64 hex>`, refusing anything else (it becomes a file name).
pub fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(StoreError::Corrupt {
            path: PathBuf::from(digest),
            reason: "not a sha256 digest".into(),
        }),
    }
}

/// Creates `dir` mode 0700 (its parents as usual), or takes the group's and others'
/// access away from an existing one of ours.
fn make_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).at(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other.at(dir)?,
    }
    let meta = fs::metadata(dir).at(dir)?;
    if meta.mode() & 0o077 != 0 && meta.uid() == nix::unistd::geteuid().as_raw() {
        fs::set_permissions(dir, fs::Permissions::from_mode(meta.mode() & 0o7700)).at(dir)?;
    }
    Ok(())
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The layout rooted at one directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

/// An exclusive or shared flock(2), released on drop.
pub struct FileLock {
    _lock: Flock<File>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Layout {
    /// Opens (creating if needed) the layout at `root`. The root is private (0700):
    /// unpacked layers keep their setuid bits and device nodes, which no other user
    /// may reach; a store made by an older sandrun (0755) is made private too.
    pub fn open(root: &Path) -> Result<Layout, StoreError> {
        make_private_dir(root)?;
        for sub in ["blobs/sha256", "layers/sha256", "used", "locks", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).at(&p)?;
        }
        let layout = Layout {
            root: root.to_path_buf(),
        };
        let marker = root.join("oci-layout");
        if !marker.exists() {
            layout.write_atomic(&marker, OCI_LAYOUT.as_bytes())?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            let _l = layout.lock("index")?;
            if !index.exists() {
                let empty = empty_index();
                layout.write_atomic(
                    &index,
                    &serde_json::to_vec(&empty).expect("index serialises"),
                )?;
            }
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Reads a small blob (manifest, config), refusing one larger than `cap`, and checks
    /// its digest (a damaged store must not hand out wrong metadata).
    pub fn read_blob(&self, digest: &str, cap: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let f = File::open(&path).at(&path)?;
        let mut buf = Vec::new();
        f.take(cap + 1).read_to_end(&mut buf).at(&path)?;
        if buf.len() as u64 > cap {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("larger than {cap} bytes"),
            });
        }
        let actual = sha256_digest(&buf);
        if actual != digest {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("content hashes to {actual}; run `sandrun fsck`"),
            });
        }
        Ok(buf)
    }

    /// Stores `bytes` as a blob (exact bytes), returning its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = sha256_digest(bytes);
        if !self.has_blob(&digest) {
            let mut w = self.blob_writer(&digest, Some(bytes.len() as u64))?;
            w.write_all(bytes).at(&w.tmp)?;
            w.commit().map_err(|e| match e {
                BlobCommitError::Io(e) => e,
                other => StoreError::Corrupt {
                    path: self.root.clone(),
                    reason: other.to_string(),
                },
            })?;
        }
        Ok(digest)
    }

    /// A writer for the blob `digest`: bytes go to a temp file, are hashed and counted as
    /// they come, and `commit` renames the file into place only when both match.
    pub fn blob_writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter, StoreError> {
        let dest = self.blob_path(digest)?;
        let tmp = self.tmp_path("blob");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .at(&tmp)?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest,
            hasher: Sha256::new(),
            written: 0,
            expected_digest: digest.to_string(),
            expected_size: size,
        })
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("layers/sha256").join(digest_hex(diff_id)?))
    }

    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id)
            .map(|p| p.join("rootfs").is_dir())
            .unwrap_or(false)
    }

    /// A fresh name under `tmp/` (on the store's filesystem, so a rename is atomic).
    /// The pid prefix lets `gc` tell abandoned temp files from live ones.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        self.root
            .join("tmp")
            .join(format!("{}-{n}-{nanos:08x}.{what}", std::process::id()))
    }

    /// Takes `locks/<name>.lock` exclusively, waiting for other holders.
    pub fn lock(&self, name: &str) -> Result<FileLock, StoreError> {
        self.flock(
            &self.root.join("locks").join(format!("{name}.lock")),
            FlockArg::LockExclusive,
        )
    }

    /// `store.lock` shared: held by every reader and writer for as long as they work.
    pub fn lock_store_shared(&self) -> Result<FileLock, StoreError> {
        self.flock(&self.root.join("store.lock"), FlockArg::LockShared)
    }

    /// `store.lock` exclusive: held by `gc` while it deletes.
    pub fn lock_store_exclusive(&self) -> Result<FileLock, StoreError> {
        self.flock(&self.root.join("store.lock"), FlockArg::LockExclusive)
    }

    fn flock(&self, path: &Path, arg: FlockArg) -> Result<FileLock, StoreError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .at(path)?;
        loop {
            match Flock::lock(f.try_clone().at(path)?, arg) {
                Ok(lock) => return Ok(FileLock { _lock: lock }),
                Err((_, nix::errno::Errno::EINTR)) => continue,
                Err((_, e)) => return Err(StoreError::io(path, e.into())),
            }
        }
    }

    pub fn read_index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).at(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Finds the `index.json` entry named `name`.
    pub fn find_ref(&self, name: &str) -> Result<Option<Descriptor>, StoreError> {
        Ok(self
            .read_index()?
            .manifests()
            .iter()
            .find(|d| ref_name(d) == Some(name))
            .cloned())
    }

    /// Replaces (or adds) the entry named by `desc`'s ref-name annotation.
    pub fn set_ref(&self, desc: Descriptor) -> Result<(), StoreError> {
        let name = ref_name(&desc).map(str::to_string);
        self.update_index(|entries| {
            entries.retain(|d| name.is_none() || ref_name(d) != name.as_deref());
            entries.push(desc);
        })
    }

    /// Read-modify-write of `index.json` under its lock, written atomically.
    pub fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<(), StoreError> {
        let _l = self.lock("index")?;
        let mut index = self.read_index()?;
        let mut entries = index.manifests().clone();
        f(&mut entries);
        index.set_manifests(entries);
        let bytes = serde_json::to_vec_pretty(&index).expect("index serialises");
        self.write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Writes a small file through a temp file + fsync + rename.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path("write");
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        Ok(())
    }

    /// Records that the image with manifest `digest` was used now.
    pub fn touch_used(&self, digest: &str) -> Result<(), StoreError> {
        let path = self.root.join("used").join(digest_hex(digest)?);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        f.set_modified(std::time::SystemTime::now()).at(&path)?;
        Ok(())
    }

    pub fn last_used(&self, digest: &str) -> Option<std::time::SystemTime> {
        let path = self.root.join("used").join(digest_hex(digest).ok()?);
        fs::metadata(path).and_then(|m| m.modified()).ok()
    }
}

pub fn empty_index() -> ImageIndex {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::new())
        .build()
        .expect("empty index builds")
}

pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

/// Why a blob was refused at commit time.
#[derive(Debug, thiserror::Error)]
pub enum BlobCommitError {
    #[error("expected {expected} bytes, received {actual}")]
    Size { expected: u64, actual: u64 },
    #[error("content hashes to {actual}")]
    Digest { actual: String },
    #[error(transparent)]
    Io(StoreError),
}

/// Starts writing `len` bytes of `file` from `offset` (0: to its end) back to disk and
/// returns without waiting. The store's later `fsync`/`syncfs` then finds the data on
/// disk already instead of flushing it all at once; on tmpfs it does nothing. A failure
/// only means the final sync does the work, so it is not reported.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes a valid, open descriptor (borrowed from `file`) and
    // plain integers; it touches no memory of this process.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Bytes a blob writer lets pile up before it starts their writeback.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// See [`Layout::blob_writer`]. Dropped without `commit`, it removes its temp file.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    hasher: Sha256,
    written: u64,
    expected_digest: String,
    expected_size: Option<u64>,
}

impl BlobWriter {
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn commit(mut self) -> Result<(), BlobCommitError> {
        if let Some(expected) = self.expected_size {
            if expected != self.written {
                return Err(BlobCommitError::Size {
                    expected,
                    actual: self.written,
                });
            }
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.expected_digest {
            return Err(BlobCommitError::Digest { actual });
        }
        let file = self.file.take().expect("commit once");
        file.sync_all().at(&self.tmp).map_err(BlobCommitError::Io)?;
        drop(file);
        fs::rename(&self.tmp, &self.dest)
            .at(&self.dest)
            .map_err(BlobCommitError::Io)?;
        Ok(())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(expected) = self.expected_size {
            if self.written + buf.len() as u64 > expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob is larger than its declared {expected} bytes"),
                ));
            }
        }
        let f = self.file.as_mut().expect("not committed");
        f.write_all(buf)?;
        self.hasher.update(buf);
        let before = self.written;
        self.written += buf.len() as u64;
        if before / WRITEBACK_CHUNK != self.written / WRITEBACK_CHUNK {
            let start = before / WRITEBACK_CHUNK * WRITEBACK_CHUNK;
            start_writeback(f, start, self.written - start);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("data/sandrun");
        Layout::open(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        // One made by an older sandrun, open to all, is closed.
        let old = dir.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        Layout::open(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
    }

    #[test]
    fn blob_writer_checks_digest_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open(dir.path()).unwrap();
        let data = b"hello";
        let d = sha256_digest(data);
        let mut w = l.blob_writer(&d, Some(5)).unwrap();
        w.write_all(b"hellx").unwrap();
        assert!(matches!(w.commit(), Err(BlobCommitError::Digest { .. })));
        assert!(!l.has_blob(&d));
        let mut w = l.blob_writer(&d, Some(4)).unwrap();
        assert!(w.write_all(data).is_err());
        drop(w);
        let mut w = l.blob_writer(&d, Some(6)).unwrap();
        w.write_all(data).unwrap();
        assert!(matches!(w.commit(), Err(BlobCommitError::Size { .. })));
        assert!(!l.has_blob(&d));
        assert_eq!(l.put_blob(data).unwrap(), d);
        assert_eq!(l.read_blob(&d, 100).unwrap(), data);
        assert!(l.read_blob(&d, 2).is_err());
        // nothing left behind in tmp/
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn index_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open(dir.path()).unwrap();
        assert!(l.find_ref("a").unwrap().is_none());
        let d = l.put_blob(b"{}").unwrap();
        let desc = oci_spec::image::DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(d.parse::<oci_spec::image::Digest>().unwrap())
            .size(2u64)
            .annotations(
                [(REF_NAME.to_string(), "a".to_string())]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            )
            .build()
            .unwrap();
        l.set_ref(desc.clone()).unwrap();
        l.set_ref(desc).unwrap();
        assert_eq!(l.read_index().unwrap().manifests().len(), 1);
        assert!(l.find_ref("a").unwrap().is_some());
        assert!(digest_hex("sha256:../x").is_err());
    }
}
