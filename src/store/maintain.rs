//! Looking after the store: `images` (what is there), `gc` (remove what nothing
//! references) and `fsck` (verify every blob and layer, say what is wrong).
//!
//! GC roots are the names in `index.json` and the pins of every lock file that
//! `sandrun lock` wrote (registered under `roots/`, one symlink per lock file; a root
//! whose lock file is gone is dropped). `gc` holds `store.lock` exclusively, so it never
//! races a pull; temp files of dead processes are removed by both `gc` and `fsck`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::error::{IoContext, StoreError};
use super::layout::{digest_hex, ref_name, Layout, INDEX_DIGEST};
use super::lock::LockFile;
use super::pull::{parse_config, unpack_stream, LayerMeta};
use super::registry::{parse_manifest, Fetched, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};
use super::unpack::{self, UnpackOptions};
use super::Store;

/// One row of `sandrun images`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSummary {
    pub reference: String,
    pub manifest_digest: String,
    /// Compressed size: config + layer blobs.
    pub size: u64,
    pub last_used: Option<std::time::SystemTime>,
    /// Everything needed to run it is present.
    pub complete: bool,
}

/// What one manifest keeps alive.
#[derive(Default)]
struct Reach {
    blobs: BTreeSet<String>,
    layers: BTreeSet<String>,
}

impl Store {
    /// Images named in the store, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let l = self.layout();
        let mut out = Vec::new();
        for d in l.read_index()?.manifests() {
            let Some(name) = ref_name(d) else { continue };
            let digest = d.digest().to_string();
            let mut reach = Reach::default();
            let complete = reach_manifest(l, &digest, &mut reach).unwrap_or(false);
            let size = reach
                .blobs
                .iter()
                .filter(|b| **b != digest)
                .filter_map(|b| l.blob_path(b).ok())
                .filter_map(|p| fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            out.push(ImageSummary {
                reference: name.to_string(),
                manifest_digest: digest.clone(),
                size,
                last_used: l.last_used(&digest),
                complete,
            });
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Registers a lock file as a GC root (its pins are kept by `gc`).
    pub fn add_root(&self, lock_file: &Path) -> Result<(), StoreError> {
        let abs = fs::canonicalize(lock_file).at(lock_file)?;
        let dir = self.root().join("roots");
        fs::create_dir_all(&dir).at(&dir)?;
        let name = hex::encode(&Sha256::digest(abs.as_os_str().as_encoded_bytes())[..16]);
        let link = dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&abs, &link).at(&link)
    }

    /// Removes blobs, layers and temp files that nothing references.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let l = self.layout();
        let _excl = l.lock_store_exclusive()?;
        let mut report = GcReport::default();
        let mut reach = Reach::default();
        let mut roots: Vec<String> = Vec::new();
        for d in l.read_index()?.manifests() {
            roots.push(d.digest().to_string());
            if let Some(i) = d.annotations().as_ref().and_then(|a| a.get(INDEX_DIGEST)) {
                reach.blobs.insert(i.clone());
            }
        }
        let roots_dir = self.root().join("roots");
        if let Ok(entries) = fs::read_dir(&roots_dir) {
            for e in entries.flatten() {
                match LockFile::read(&e.path()) {
                    Ok(lock) => {
                        for pin in lock.images.values() {
                            roots.push(pin.manifest.clone());
                            if let Some(i) = &pin.index {
                                reach.blobs.insert(i.clone());
                            }
                        }
                    }
                    Err(_) if !e.path().exists() => {
                        let _ = fs::remove_file(e.path());
                    }
                    Err(err) => report.notes.push(format!(
                        "GC root {}: {err}; its pins are not kept",
                        e.path().display()
                    )),
                }
            }
        }
        for m in &roots {
            let _ = reach_manifest(l, m, &mut reach);
        }
        for (digest, path) in list_blobs(l)? {
            if !reach.blobs.contains(&digest) {
                report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).at(&path)?;
                let _ = fs::remove_file(self.root().join("used").join(&digest[7..]));
                report.blobs += 1;
            }
        }
        for (diff_id, path) in list_layers(l)? {
            if !reach.layers.contains(&diff_id) {
                unpack::remove_tree(&path).at(&path)?;
                report.layers += 1;
            }
        }
        report.temp = clean_tmp(l, true)?;
        // Compiled seccomp programs (`sandbox::seccomp::compiled`) are a cache, made
        // again by the next container that needs one.
        if let Ok(entries) = fs::read_dir(self.root().join("seccomp")) {
            for e in entries.flatten() {
                if fs::remove_file(e.path()).is_ok() {
                    report.seccomp += 1;
                }
            }
        }
        Ok(report)
    }

    /// Verifies every blob (content hashes to its name) and every layer (its tree equals a
    /// fresh unpack of its blob), and that every named image is complete. With `repair`,
    /// damaged blobs and layers are removed so that the next pull fetches them again.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport, StoreError> {
        let l = self.layout();
        let _shared = l.lock_store_shared()?;
        let mut report = FsckReport {
            temp_removed: clean_tmp(l, false)?,
            ..Default::default()
        };
        let mut bad_blobs = BTreeSet::new();
        for (digest, path) in list_blobs(l)? {
            report.blobs += 1;
            match hash_file(&path) {
                Ok(actual) if actual == digest => {}
                Ok(actual) => {
                    report
                        .problems
                        .push(format!("blob {digest}: content hashes to {actual}"));
                    bad_blobs.insert(digest.clone());
                }
                Err(e) => {
                    report.problems.push(format!("blob {digest}: {e}"));
                    bad_blobs.insert(digest.clone());
                }
            }
        }
        let mut bad_layers = BTreeSet::new();
        for (diff_id, path) in list_layers(l)? {
            report.layers += 1;
            if let Some(problem) = check_layer(l, &diff_id, &path, &bad_blobs) {
                report.problems.push(format!("layer {diff_id}: {problem}"));
                bad_layers.insert(path);
            }
        }
        for d in l.read_index()?.manifests() {
            let name = ref_name(d).unwrap_or("(unnamed)");
            let mut reach = Reach::default();
            match reach_manifest(l, d.digest().as_ref(), &mut reach) {
                Ok(true) => {}
                Ok(false) => report.incomplete.push(format!(
                    "{name}: blobs or layers missing (the next pull fetches them)"
                )),
                Err(e) => report.problems.push(format!("{name}: {e}")),
            }
        }
        if repair {
            for d in &bad_blobs {
                let p = l.blob_path(d)?;
                fs::remove_file(&p).at(&p)?;
            }
            for p in &bad_layers {
                unpack::remove_tree(p).at(p)?;
            }
            report.repaired = bad_blobs.len() + bad_layers.len();
        }
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub blobs: usize,
    pub bytes: u64,
    pub layers: usize,
    pub temp: usize,
    /// Compiled seccomp programs removed (a cache).
    pub seccomp: usize,
    pub notes: Vec<String>,
}

#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs: usize,
    pub layers: usize,
    pub problems: Vec<String>,
    /// Named images with missing parts (not damage: an interrupted pull, a gc'ed layer).
    pub incomplete: Vec<String>,
    pub temp_removed: usize,
    pub repaired: usize,
}

/// Walks manifest -> config -> layers; returns whether everything is present.
fn reach_manifest(l: &Layout, digest: &str, reach: &mut Reach) -> Result<bool, StoreError> {
    reach.blobs.insert(digest.to_string());
    if !l.has_blob(digest) {
        return Ok(false);
    }
    let bytes = l.read_blob(digest, MAX_MANIFEST_BYTES)?;
    let manifest = match parse_manifest(digest, &bytes)? {
        Fetched::Manifest(m) => m,
        Fetched::Index(idx) => {
            // An index named directly (e.g. written by skopeo): keep all its members.
            let mut all = true;
            for m in idx.manifests() {
                all &= reach_manifest(l, m.digest().as_ref(), reach)?;
            }
            return Ok(all);
        }
    };
    let cd = manifest.config().digest().to_string();
    reach.blobs.insert(cd.clone());
    // The SBOM of an image built from a recipe lives and dies with the image.
    if let Some(sbom) = manifest
        .annotations()
        .as_ref()
        .and_then(|a| a.get(crate::recipe::SBOM_ANNOTATION))
    {
        reach.blobs.insert(sbom.clone());
    }
    let mut complete = true;
    for layer in manifest.layers() {
        let d = layer.digest().to_string();
        complete &= l.has_blob(&d);
        reach.blobs.insert(d);
    }
    if !l.has_blob(&cd) {
        return Ok(false);
    }
    let config = parse_config(digest, &l.read_blob(&cd, MAX_CONFIG_BYTES)?, &manifest)?;
    for d in config.rootfs().diff_ids() {
        complete &= l.has_layer(d);
        reach.layers.insert(d.clone());
    }
    Ok(complete)
}

fn list_blobs(l: &Layout) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let dir = l.root().join("blobs/sha256");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).at(&dir)? {
        let e = e.at(&dir)?;
        let digest = format!("sha256:{}", e.file_name().to_string_lossy());
        if digest_hex(&digest).is_ok() {
            out.push((digest, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn list_layers(l: &Layout) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let dir = l.root().join("layers/sha256");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).at(&dir)? {
        let e = e.at(&dir)?;
        out.push((
            format!("sha256:{}", e.file_name().to_string_lossy()),
            e.path(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Removes `tmp/` entries whose writer is gone (all of them with `all`, under the
/// exclusive lock). Every pull runs it too (under the shared lock), so a killed pull's
/// temp files last only until the next one.
pub(crate) fn clean_tmp(l: &Layout, all: bool) -> Result<usize, StoreError> {
    let dir = l.root().join("tmp");
    let mut n = 0;
    for e in fs::read_dir(&dir).at(&dir)? {
        let e = e.at(&dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> = name.split('-').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if all || !alive {
            let p = e.path();
            if p.is_dir() {
                unpack::remove_tree(&p).at(&p)?;
            } else {
                fs::remove_file(&p).at(&p)?;
            }
            n += 1;
        }
    }
    Ok(n)
}

pub(crate) fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// A layer is right when a fresh unpack of its blob gives the same tree.
fn check_layer(
    l: &Layout,
    diff_id: &str,
    path: &Path,
    bad_blobs: &BTreeSet<String>,
) -> Option<String> {
    if digest_hex(diff_id).is_err() {
        return Some("directory name is not a digest".into());
    }
    let rootfs = path.join("rootfs");
    if !rootfs.is_dir() {
        return Some("rootfs/ missing".into());
    }
    let meta: LayerMeta = match fs::read(path.join("layer.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => return Some(format!("layer.json: {e}")),
    };
    if meta.diff_id != diff_id {
        return Some(format!("layer.json names {}", meta.diff_id));
    }
    if !l.has_blob(&meta.blob) || bad_blobs.contains(&meta.blob) {
        return None; // nothing to compare with; the blob's own check reports damage
    }
    // The media type is not recorded with the blob: sniff the compression.
    let blob_path = l.blob_path(&meta.blob).ok()?;
    let comp = sniff_compression(&blob_path).ok()?;
    let file = fs::File::open(&blob_path).ok()?;
    let fresh = match unpack_stream(
        l,
        "fsck",
        &meta.blob,
        diff_id,
        comp,
        io::BufReader::new(file),
        &UnpackOptions::default(),
        true,
    ) {
        Ok((Some(s), _)) => s,
        Ok((None, _)) => return None,
        Err(e) => return Some(format!("re-unpacking its blob failed: {e}")),
    };
    // Copies of cross-layer hardlink targets come from lower layers, not this blob.
    let ignore: BTreeSet<PathBuf> = meta
        .report
        .cross_layer_links
        .iter()
        .map(|(p, _)| PathBuf::from(p))
        .collect();
    let diff = tree_difference(&rootfs, &fresh.tmp.join("rootfs"), &ignore);
    let _ = unpack::remove_tree(&fresh.tmp);
    diff
}

fn sniff_compression(path: &Path) -> io::Result<super::pull::Compression> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => super::pull::Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => super::pull::Compression::Zstd,
        _ => super::pull::Compression::None,
    })
}

/// A listing of a tree: path -> (type, mode, uid, gid, size, content hash or target).
pub fn tree_listing(root: &Path) -> io::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let rel_path = rel.join(e.file_name());
            let p = e.path();
            let m = fs::symlink_metadata(&p)?;
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(rel_path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink {}", fs::read_link(&p)?.display())
            } else if ft.is_file() {
                format!("file {} {}", m.len(), hash_file(&p)?)
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("dev {}", m.rdev())
            } else {
                "other".to_string()
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            out.insert(
                rel_path,
                format!("{what} mode={mode:o} owner={}:{}", m.uid(), m.gid()),
            );
        }
    }
    Ok(out)
}

fn tree_difference(a: &Path, b: &Path, ignore: &BTreeSet<PathBuf>) -> Option<String> {
    let (la, lb) = match (tree_listing(a), tree_listing(b)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => return Some(format!("cannot read the tree: {e}")),
    };
    let mut diffs = Vec::new();
    for (p, v) in la.iter().filter(|(p, _)| !ignore.contains(*p)) {
        match lb.get(p) {
            None => diffs.push(format!("{} is extra", p.display())),
            Some(w) if w != v => diffs.push(format!("{} differs ({v}, expected {w})", p.display())),
            _ => {}
        }
    }
    for p in lb.keys().filter(|p| !la.contains_key(*p)) {
        diffs.push(format!("{} is missing", p.display()));
    }
    if diffs.is_empty() {
        None
    } else {
        let n = diffs.len();
        diffs.truncate(5);
        Some(format!(
            "{n} differences from its blob: {}",
            diffs.join("; ")
        ))
    }
}
