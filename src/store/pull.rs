//! What `Store::ensure` does: find an image locally (lock pin, digest, or tag as last
//! pulled), or resolve it at the registry and fetch what is missing. Layers are fetched
//! concurrently; each one streams through a worker thread that writes the blob, hashes
//! it, decompresses it, hashes the tar (diffID) and unpacks it, all in one pass. Nothing
//! is renamed into the store until its digest, size and diffID are right, so a broken
//! connection or a tampered blob leaves the store as it was, and the next pull starts
//! from the blobs already verified.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::{
    Descriptor, DescriptorBuilder, ImageConfiguration, ImageManifest, MediaType,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::error::{IoContext, StoreError};
use super::layout::{
    digest_hex, BlobCommitError, BlobWriter, FileLock, Layout, INDEX_DIGEST, REF_NAME,
};
use super::lock::Pin;
use super::progress::{PullEvent, PullProgress};
use super::reference::ImageRef;
use super::registry::{
    self, parse_manifest, Fetched, Platform, Registry, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES,
};
use super::unpack::{self, UnpackOptions, UnpackReport};
use super::{Image, PullOptions, PullPolicy, Store};

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn compression(reference: &str, desc: &Descriptor) -> Result<Compression, StoreError> {
    let mt = desc.media_type().to_string();
    let bad = |reason: &str| StoreError::BadLayer {
        reference: reference.to_string(),
        digest: desc.digest().to_string(),
        reason: format!("{reason} ({mt})"),
    };
    if mt.contains("nondistributable") || mt.contains("foreign") {
        return Err(bad("foreign (non-distributable) layers are not supported"));
    }
    if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") || mt.ends_with(".tar.gz") {
        Ok(Compression::Gzip)
    } else if mt.ends_with("tar+zstd") {
        Ok(Compression::Zstd)
    } else if mt.ends_with(".tar") || mt.ends_with("rootfs.diff.tar") {
        Ok(Compression::None)
    } else {
        Err(bad("unsupported layer media type"))
    }
}

pub(crate) fn decompressor<'a>(
    c: Compression,
    r: impl Read + 'a,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(128 << 10, r),
        )),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
    })
}

/// Hashes what passes through (the diffID of a decompressed layer).
pub(crate) struct HashReader<R> {
    pub inner: R,
    pub hasher: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn desc_digest(d: &Descriptor) -> String {
    d.digest().to_string()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

pub(crate) async fn ensure(
    store: &Store,
    image: &str,
    policy: PullPolicy,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<Image, StoreError> {
    let r = ImageRef::parse(image)?;
    let lay = store.layout().clone();
    let _shared = blocking(move || lay.lock_store_shared()).await?;
    if let Some(img) = local_if_allowed(store, &r, policy, opts)? {
        progress.event(&PullEvent::Done {
            reference: img.reference.clone(),
            manifest_digest: img.manifest_digest.clone(),
            pulled: 0,
        });
        return Ok(img);
    }
    let pin = opts.pins.get(&r.canonical()).cloned();
    if policy == PullPolicy::Never {
        return Err(StoreError::NotPresent {
            reference: r.canonical(),
        });
    }
    if opts.offline {
        return Err(StoreError::Offline {
            reference: r.canonical(),
            registry: r.registry_host().to_string(),
            what: local_missing(store, &r, opts),
        });
    }
    // What a killed pull left in tmp/ (its pid is gone) goes before this one adds more.
    let lay = store.layout().clone();
    let swept = blocking(move || super::maintain::clean_tmp(&lay, false)).await;
    if let Err(e) = swept {
        tracing::debug!("temp files of earlier pulls not removed: {e}");
    }
    pull(store, &r, pin.as_ref(), opts, progress).await
}

/// The local half of [`ensure`]: the image when `policy` lets the store's copy serve
/// and that copy is complete (it is marked as used), `None` when a pull is needed.
/// Never touches the network.
pub(crate) fn ensure_local(
    store: &Store,
    image: &str,
    policy: PullPolicy,
    opts: &PullOptions,
) -> Result<Option<Image>, StoreError> {
    let r = ImageRef::parse(image)?;
    let _shared = store.layout().lock_store_shared()?;
    local_if_allowed(store, &r, policy, opts)
}

fn local_if_allowed(
    store: &Store,
    r: &ImageRef,
    policy: PullPolicy,
    opts: &PullOptions,
) -> Result<Option<Image>, StoreError> {
    if opts.locked && !opts.pins.contains_key(&r.canonical()) && r.digest().is_none() {
        return Err(StoreError::PinMismatch {
            reference: r.canonical(),
            pinned: "nothing".into(),
            found: "--locked requires every image to be pinned; run `sandrun lock`".into(),
        });
    }
    if policy == PullPolicy::Always && !opts.offline {
        return Ok(None);
    }
    let Some(img) = local(store, r, opts)? else {
        return Ok(None);
    };
    store.layout().touch_used(&img.manifest_digest)?;
    Ok(Some(img))
}

/// The manifest digest the store would use for `r` without a network.
fn local_manifest(
    store: &Store,
    r: &ImageRef,
    opts: &PullOptions,
) -> Result<Option<(String, Option<String>)>, StoreError> {
    let l = store.layout();
    if let Some(pin) = opts.pins.get(&r.canonical()) {
        return Ok(l
            .has_blob(&pin.manifest)
            .then(|| (pin.manifest.clone(), pin.index.clone())));
    }
    if let Some(d) = r.digest() {
        if !l.has_blob(d) {
            return Ok(None);
        }
        let bytes = l.read_blob(d, MAX_MANIFEST_BYTES)?;
        return match parse_manifest(&r.canonical(), &bytes)? {
            Fetched::Manifest(_) => Ok(Some((d.to_string(), None))),
            Fetched::Index(idx) => {
                let platform = opts.platform.clone().unwrap_or_else(Platform::host);
                Ok(platform
                    .choose(&idx)
                    .map(|m| (desc_digest(m), Some(d.to_string()))))
            }
        };
    }
    Ok(l.find_ref(&r.canonical())?.map(|desc| {
        let index = desc
            .annotations()
            .as_ref()
            .and_then(|a| a.get(INDEX_DIGEST))
            .cloned();
        (desc_digest(&desc), index)
    }))
}

/// A one-line account of what is missing locally (for `--offline` errors).
fn local_missing(store: &Store, r: &ImageRef, opts: &PullOptions) -> Option<String> {
    match local_manifest(store, r, opts) {
        Ok(None) => Some("manifest".into()),
        Ok(Some((m, _))) => Some(format!("layers of {m}")),
        Err(e) => Some(e.to_string()),
    }
}

/// The image, if it is complete in the store.
pub(crate) fn local(
    store: &Store,
    r: &ImageRef,
    opts: &PullOptions,
) -> Result<Option<Image>, StoreError> {
    let Some((manifest_digest, index_digest)) = local_manifest(store, r, opts)? else {
        return Ok(None);
    };
    let l = store.layout();
    if !l.has_blob(&manifest_digest) {
        return Ok(None);
    }
    let (manifest, config) = read_manifest_and_config(l, &r.canonical(), &manifest_digest)?;
    let Some(config) = config else {
        return Ok(None);
    };
    let diff_ids = config.rootfs().diff_ids();
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (d, _) in diff_ids.iter().zip(manifest.layers()) {
        if !l.has_layer(d) {
            return Ok(None);
        }
        layers.push(l.layer_dir(d)?.join("rootfs"));
    }
    Ok(Some(Image {
        reference: r.canonical(),
        manifest_digest,
        index_digest,
        config,
        layers,
    }))
}

fn read_manifest_and_config(
    l: &Layout,
    reference: &str,
    manifest_digest: &str,
) -> Result<(ImageManifest, Option<ImageConfiguration>), StoreError> {
    let bytes = l.read_blob(manifest_digest, MAX_MANIFEST_BYTES)?;
    let manifest = match parse_manifest(reference, &bytes)? {
        Fetched::Manifest(m) => *m,
        Fetched::Index(_) => {
            return Err(StoreError::BadManifest {
                reference: reference.to_string(),
                what: format!("manifest {manifest_digest}"),
                reason: "is an index, expected an image manifest".into(),
            })
        }
    };
    let cd = desc_digest(manifest.config());
    if !l.has_blob(&cd) {
        return Ok((manifest, None));
    }
    let config = parse_config(reference, &l.read_blob(&cd, MAX_CONFIG_BYTES)?, &manifest)?;
    Ok((manifest, Some(config)))
}

/// Parses an image config and checks it against its manifest (one diffID per layer).
pub fn parse_config(
    reference: &str,
    bytes: &[u8],
    manifest: &ImageManifest,
) -> Result<ImageConfiguration, StoreError> {
    let config: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| StoreError::BadManifest {
            reference: reference.to_string(),
            what: "image config".into(),
            reason: e.to_string(),
        })?;
    if config.rootfs().diff_ids().len() != manifest.layers().len() {
        return Err(StoreError::BadManifest {
            reference: reference.to_string(),
            what: "image config".into(),
            reason: format!(
                "{} diff_ids for {} layers",
                config.rootfs().diff_ids().len(),
                manifest.layers().len()
            ),
        });
    }
    for d in config.rootfs().diff_ids() {
        digest_hex(d).map_err(|_| StoreError::BadManifest {
            reference: reference.to_string(),
            what: "image config".into(),
            reason: format!("diff_id {d} is not a sha256 digest"),
        })?;
    }
    Ok(config)
}

/// A reference resolved at the registry for one platform.
pub(crate) struct Resolved {
    pub manifest_bytes: Bytes,
    pub manifest_digest: String,
    pub index_digest: Option<String>,
    /// The index as received, when the reference named one.
    pub index_bytes: Option<Bytes>,
}

/// Resolves `r` (or its pin) to this platform's manifest, fetching manifests only.
pub(crate) async fn resolve(
    reg: &Registry,
    r: &ImageRef,
    pin: Option<&Pin>,
    platform: &Platform,
) -> Result<Resolved, StoreError> {
    let reference = r.canonical();
    let target = match (pin, r.digest(), r.tag()) {
        (Some(p), _, _) => p.manifest.clone(),
        (None, Some(d), _) => d.to_string(),
        (None, None, Some(t)) => t.to_string(),
        (None, None, None) => "latest".to_string(),
    };
    let (bytes, digest) = reg.fetch_manifest(r, &target).await?;
    let resolved = match parse_manifest(&reference, &bytes)? {
        Fetched::Manifest(_) => Resolved {
            manifest_bytes: bytes,
            manifest_digest: digest,
            index_digest: pin.and_then(|p| p.index.clone()),
            index_bytes: None,
        },
        Fetched::Index(idx) => {
            let chosen = platform
                .choose(&idx)
                .ok_or_else(|| StoreError::NoPlatform {
                    reference: reference.clone(),
                    platform: platform.to_string(),
                    available: idx
                        .manifests()
                        .iter()
                        .filter_map(|d| d.platform().as_ref())
                        .map(|p| match p.variant() {
                            Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
                            None => format!("{}/{}", p.os(), p.architecture()),
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let (mb, md) = reg.fetch_manifest(r, &desc_digest(chosen)).await?;
            Resolved {
                manifest_bytes: mb,
                manifest_digest: md,
                index_digest: Some(digest),
                index_bytes: Some(bytes),
            }
        }
    };
    if let Some(p) = pin {
        if p.manifest != resolved.manifest_digest {
            return Err(StoreError::PinMismatch {
                reference,
                pinned: p.manifest.clone(),
                found: format!("the registry resolved {}", resolved.manifest_digest),
            });
        }
    }
    Ok(resolved)
}

pub(crate) async fn resolve_pin(
    store: &Store,
    image: &str,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<Pin, StoreError> {
    let r = ImageRef::parse(image)?;
    // A lock is re-resolved from scratch: existing pins do not apply.
    let fresh = PullOptions {
        pins: Default::default(),
        ..opts.clone()
    };
    if opts.offline {
        return match local_manifest(store, &r, &fresh)? {
            Some((manifest, index)) => Ok(Pin { manifest, index }),
            None => Err(StoreError::Offline {
                reference: r.canonical(),
                registry: r.registry_host().to_string(),
                what: Some("manifest".into()),
            }),
        };
    }
    progress.event(&PullEvent::Resolving {
        reference: r.canonical(),
    });
    let insecure = registry::insecure_hosts(&opts.insecure_registries, [&r]);
    let reg = Registry::new(&insecure, opts.all_credentials());
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let resolved = resolve(&reg, &r, None, &platform).await?;
    Ok(Pin {
        manifest: resolved.manifest_digest,
        index: resolved.index_digest,
    })
}

async fn pull(
    store: &Store,
    r: &ImageRef,
    pin: Option<&Pin>,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<Image, StoreError> {
    progress.event(&PullEvent::Resolving {
        reference: r.canonical(),
    });
    let insecure = registry::insecure_hosts(&opts.insecure_registries, [r]);
    let reg = Registry::new(&insecure, opts.all_credentials());
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let resolved = resolve(&reg, r, pin, &platform).await?;
    if let Some(i) = &resolved.index_bytes {
        store.layout().put_blob(i)?;
    }
    assemble(store, r, Some(&reg), &resolved, opts, progress).await
}

/// Makes the image of a resolved manifest complete (config, layer blobs, unpacked
/// layers; from the registry when `reg` is given, else from local blobs only), then
/// stores the manifest and names it in `index.json` as `r`.
pub(crate) async fn assemble(
    store: &Store,
    r: &ImageRef,
    reg: Option<&Registry>,
    resolved: &Resolved,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<Image, StoreError> {
    let l = store.layout().clone();
    let reference = r.canonical();
    let manifest_digest = resolved.manifest_digest.clone();
    let manifest = match parse_manifest(&reference, &resolved.manifest_bytes)? {
        Fetched::Manifest(m) => m,
        Fetched::Index(_) => {
            return Err(StoreError::BadManifest {
                reference,
                what: format!("manifest {manifest_digest}"),
                reason: "an index where an image manifest was expected".into(),
            })
        }
    };

    // Config: small, fetched whole (capped) before the layers so their diffIDs are known.
    let config_desc = manifest.config().clone();
    let cd = desc_digest(&config_desc);
    if config_desc.size() > MAX_CONFIG_BYTES {
        return Err(StoreError::BadManifest {
            reference,
            what: "image config".into(),
            reason: format!(
                "declared size {} exceeds {MAX_CONFIG_BYTES}",
                config_desc.size()
            ),
        });
    }
    let mut pulled = 0u64;
    if !l.has_blob(&cd) {
        let reg = reg.ok_or_else(|| missing_blob(&reference, &cd))?;
        let stream = reg.blob_stream(r, &cd, config_desc.size()).await?;
        pulled += fetch_blob_only(&l, r, &cd, config_desc.size(), stream).await?;
    }
    let config = parse_config(&reference, &l.read_blob(&cd, MAX_CONFIG_BYTES)?, &manifest)?;
    let diff_ids: Vec<String> = config.rootfs().diff_ids().to_vec();

    let to_download: u64 = manifest
        .layers()
        .iter()
        .filter(|d| !l.has_blob(&desc_digest(d)))
        .map(|d| d.size())
        .sum();
    progress.event(&PullEvent::Resolved {
        reference: reference.clone(),
        manifest_digest: manifest_digest.clone(),
        layers: manifest.layers().len(),
        download: to_download,
    });

    // Layers, concurrently.
    let jobs = manifest
        .layers()
        .iter()
        .zip(&diff_ids)
        .map(|(desc, diff_id)| {
            ensure_layer(&l, reg, r, desc.clone(), diff_id.clone(), opts, progress)
        });
    let outcomes = futures_util::future::join_all(jobs).await;
    let mut finals: Vec<PathBuf> = Vec::new();
    let mut first_err = None;
    let mut pending: Vec<Option<PendingLayer>> = Vec::new();
    for o in outcomes {
        match o {
            Ok((bytes, p)) => {
                pulled += bytes;
                pending.push(p);
            }
            Err(e) => {
                first_err.get_or_insert(e);
                pending.push(None);
            }
        }
    }
    if let Some(e) = first_err {
        for p in pending.into_iter().flatten() {
            p.discard();
        }
        return Err(e);
    }
    // Layers with hardlinks into lower layers are finished in order, lowest first.
    let mut pending = pending.into_iter().enumerate();
    while let Some((i, p)) = pending.next() {
        if let Some(p) = p {
            let lowers: Vec<PathBuf> = finals.iter().rev().cloned().collect();
            let warnings = match blocking(move || p.finish(&lowers)).await {
                Ok(w) => w,
                Err(e) => {
                    for (_, p) in pending.by_ref() {
                        if let Some(p) = p {
                            p.discard();
                        }
                    }
                    return Err(e);
                }
            };
            for message in warnings {
                progress.event(&PullEvent::Warning {
                    reference: reference.clone(),
                    message,
                });
            }
        }
        finals.push(l.layer_dir(&diff_ids[i])?.join("rootfs"));
    }

    // Manifest last, then the name: index.json never names incomplete content.
    l.put_blob(&resolved.manifest_bytes)?;
    let media_type = manifest
        .media_type()
        .clone()
        .unwrap_or(MediaType::ImageManifest);
    let mut annotations = HashMap::new();
    annotations.insert(REF_NAME.to_string(), reference.clone());
    if let Some(i) = &resolved.index_digest {
        annotations.insert(INDEX_DIGEST.to_string(), i.clone());
    }
    let desc = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(
            manifest_digest
                .parse::<oci_spec::image::Digest>()
                .map_err(|e| StoreError::BadManifest {
                    reference: reference.clone(),
                    what: "manifest digest".into(),
                    reason: e.to_string(),
                })?,
        )
        .size(resolved.manifest_bytes.len() as u64)
        .annotations(annotations)
        .build()
        .expect("descriptor builds");
    let l2 = l.clone();
    blocking(move || l2.set_ref(desc)).await?;
    l.touch_used(&manifest_digest)?;
    for w in layer_warnings(&l, &diff_ids) {
        progress.event(&PullEvent::Warning {
            reference: reference.clone(),
            message: w,
        });
    }
    progress.event(&PullEvent::Done {
        reference: reference.clone(),
        manifest_digest: manifest_digest.clone(),
        pulled,
    });
    Ok(Image {
        reference,
        manifest_digest,
        index_digest: resolved.index_digest.clone(),
        config,
        layers: finals,
    })
}

fn missing_blob(reference: &str, digest: &str) -> StoreError {
    StoreError::BadManifest {
        reference: reference.to_string(),
        what: format!("blob {digest}"),
        reason: "is missing and no registry may be asked".into(),
    }
}

/// Warnings recorded when the image's layers were unpacked (device nodes skipped...).
fn layer_warnings(l: &Layout, diff_ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for d in diff_ids {
        let Ok(dir) = l.layer_dir(d) else { continue };
        if let Ok(bytes) = std::fs::read(dir.join("layer.json")) {
            if let Ok(meta) = serde_json::from_slice::<LayerMeta>(&bytes) {
                out.extend(meta.report.warnings);
            }
        }
    }
    out
}

/// A layer unpacked into `tmp/` that still needs its cross-layer hardlinks copied from
/// the image's lower layers before it is renamed into place. Holds the layer lock.
pub(crate) struct PendingLayer {
    reference: String,
    /// The layer's limits: its copies count against the same cap as its files.
    limits: unpack::Limits,
    tmp: PathBuf,
    dest: PathBuf,
    report: UnpackReport,
    meta: LayerMeta,
    _locks: Vec<FileLock>,
}

impl PendingLayer {
    fn finish(mut self, lowers: &[PathBuf]) -> Result<Vec<String>, StoreError> {
        let links = unpack::resolve_cross_layer_links(
            &self.tmp.join("rootfs"),
            &self.report.cross_layer_links,
            lowers,
            &self.limits,
            self.report.written,
        );
        let links = match links {
            Ok(l) => l,
            Err(e) => {
                let _ = unpack::remove_tree(&self.tmp);
                return Err(StoreError::BadLayer {
                    reference: self.reference.clone(),
                    digest: self.meta.blob.clone(),
                    reason: e.to_string(),
                });
            }
        };
        self.report.written += links.copied;
        let mut warnings = Vec::new();
        for u in links.unresolved {
            warnings.push(format!("hardlink {u}"));
            self.report.warnings.push(format!("hardlink {u}"));
        }
        self.meta.report = self.report.clone();
        publish_layer(&self.tmp, &self.dest, &self.meta)?;
        Ok(warnings)
    }

    fn discard(self) {
        let _ = unpack::remove_tree(&self.tmp);
    }
}

/// `layers/sha256/<hex>/layer.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct LayerMeta {
    pub diff_id: String,
    /// The blob it was unpacked from.
    pub blob: String,
    pub report: UnpackReport,
}

fn publish_layer(
    tmp: &std::path::Path,
    dest: &std::path::Path,
    meta: &LayerMeta,
) -> Result<(), StoreError> {
    let meta_path = tmp.join("layer.json");
    std::fs::write(
        &meta_path,
        serde_json::to_vec_pretty(meta).expect("meta serialises"),
    )
    .at(&meta_path)?;
    // One syncfs for the whole tree instead of an fsync per file.
    let f = File::open(tmp).at(tmp)?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f))
        .map_err(|e| StoreError::io(tmp, e.into()))?;
    if dest.join("rootfs").is_dir() {
        let _ = unpack::remove_tree(tmp);
        return Ok(());
    }
    if dest.exists() {
        // A damaged leftover without rootfs/ (should not happen: renames are atomic).
        unpack::remove_tree(dest).at(dest)?;
    }
    std::fs::rename(tmp, dest).at(dest)
}

/// Makes one layer present: blob in `blobs/`, tree in `layers/`. Returns bytes
/// downloaded and, when the layer has hardlinks into lower layers, the unfinished layer.
async fn ensure_layer(
    l: &Layout,
    reg: Option<&Registry>,
    r: &ImageRef,
    desc: Descriptor,
    diff_id: String,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<(u64, Option<PendingLayer>), StoreError> {
    let reference = r.canonical();
    let digest = desc_digest(&desc);
    let comp = compression(&reference, &desc)?;
    if l.has_blob(&digest) && l.has_layer(&diff_id) {
        progress.event(&PullEvent::LayerDone {
            digest,
            cached: true,
        });
        return Ok((0, None));
    }
    // Blob lock, then layer lock (always this order; see layout.rs).
    let locks = {
        let (l2, d2, i2) = (
            l.clone(),
            digest_hex(&digest)?.to_string(),
            digest_hex(&diff_id)?.to_string(),
        );
        blocking(move || -> Result<Vec<FileLock>, StoreError> {
            Ok(vec![
                l2.lock(&format!("blob-{d2}"))?,
                l2.lock(&format!("layer-{i2}"))?,
            ])
        })
        .await?
    };
    let have_blob = l.has_blob(&digest);
    let have_layer = l.has_layer(&diff_id);
    if have_blob && have_layer {
        progress.event(&PullEvent::LayerDone {
            digest,
            cached: true,
        });
        return Ok((0, None));
    }
    let dest = l.layer_dir(&diff_id)?;
    let unpack_opts = UnpackOptions {
        limits: unpack::Limits {
            max_entries: opts.limits.max_entries,
            max_path: opts.limits.max_path,
            ..unpack::Limits::for_layer(desc.size(), opts.layer_size_limit)
        },
    };
    let limits = unpack_opts.limits.clone();

    if have_blob {
        // Unpack from the local blob (e.g. after `gc` of layers, or a load).
        let (l2, digest2, diff2, reference2) = (
            l.clone(),
            digest.clone(),
            diff_id.clone(),
            reference.clone(),
        );
        let staged = blocking(move || -> Result<Option<Staged>, StoreError> {
            let path = l2.blob_path(&digest2)?;
            let f = File::open(&path).at(&path)?;
            let src = io::BufReader::with_capacity(256 << 10, f);
            let (staged, _) = unpack_stream(
                &l2,
                &reference2,
                &digest2,
                &diff2,
                comp,
                src,
                &unpack_opts,
                true,
            )?;
            Ok(staged)
        })
        .await?;
        progress.event(&PullEvent::LayerDone {
            digest: digest.clone(),
            cached: true,
        });
        return Ok((
            0,
            finish_staged(staged, dest, &reference, digest, diff_id, limits, locks)?,
        ));
    }

    progress.event(&PullEvent::LayerStart {
        reference: reference.clone(),
        digest: digest.clone(),
        size: desc.size(),
    });
    let reg = reg.ok_or_else(|| missing_blob(&reference, &digest))?;
    let stream = reg.blob_stream(r, &digest, desc.size()).await?;
    let writer = l.blob_writer(&digest, Some(desc.size()))?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(32);
    let (l2, digest2, diff2, reference2) = (
        l.clone(),
        digest.clone(),
        diff_id.clone(),
        reference.clone(),
    );
    let want_layer = !have_layer;
    let registry2 = r.registry_host().to_string();
    let worker = tokio::task::spawn_blocking(move || -> Result<Option<Staged>, StoreError> {
        let mut src = ChannelReader {
            rx,
            cur: Bytes::new(),
            blob: Some(writer),
            write_failed: None,
        };
        let result = if want_layer {
            unpack_stream(
                &l2,
                &reference2,
                &digest2,
                &diff2,
                comp,
                &mut src,
                &unpack_opts,
                false,
            )
            .map(|(s, _)| s)
        } else {
            Ok(None)
        };
        // Whatever happened to the unpack, read the blob to its end: a tampered or
        // truncated blob is reported as such, not as the unpack error it caused.
        let drained = io::copy(&mut src, &mut io::sink());
        let writer = src.blob.take().expect("writer");
        let drained = match (src.write_failed.take(), drained) {
            (Some(e), _) => Err(store_write_error(&l2, &reference2, &digest2, e)),
            (None, Err(e)) => Err(StoreError::Registry {
                reference: reference2.clone(),
                registry: registry2,
                message: format!("blob {digest2}: {e}"),
            }),
            (None, Ok(_)) => Ok(()),
        };
        let commit = match drained {
            Ok(()) => writer.commit(),
            Err(e) => {
                drop(writer);
                if let Ok(Some(s)) = result {
                    let _ = unpack::remove_tree(&s.tmp);
                }
                return Err(e);
            }
        };
        match commit {
            Ok(()) => result,
            Err(e) => {
                if let Ok(Some(s)) = result {
                    let _ = unpack::remove_tree(&s.tmp);
                }
                Err(match e {
                    BlobCommitError::Io(e) => e,
                    other => StoreError::BadBlob {
                        reference: reference2,
                        digest: digest2,
                        reason: other.to_string(),
                    },
                })
            }
        }
    });
    let pumped = pump(stream, tx, desc.size(), &digest, progress).await;
    let staged = worker.await.expect("layer worker panicked");
    let staged = match (pumped, staged) {
        (Err(msg), Ok(s)) => {
            if let Some(s) = s {
                let _ = unpack::remove_tree(&s.tmp);
            }
            return Err(StoreError::Registry {
                reference: reference.clone(),
                registry: r.registry_host().to_string(),
                message: msg,
            });
        }
        (_, Err(e @ StoreError::NoSpace { .. })) => return Err(e),
        (Err(msg), Err(StoreError::Registry { .. })) => {
            return Err(StoreError::Registry {
                reference: reference.clone(),
                registry: r.registry_host().to_string(),
                message: msg,
            })
        }
        (_, Err(e)) => return Err(e),
        (Ok(()), Ok(s)) => s,
    };
    progress.event(&PullEvent::LayerDone {
        digest: digest.clone(),
        cached: false,
    });
    Ok((
        desc.size(),
        finish_staged(staged, dest, &reference, digest, diff_id, limits, locks)?,
    ))
}

fn finish_staged(
    staged: Option<Staged>,
    dest: PathBuf,
    reference: &str,
    blob: String,
    diff_id: String,
    limits: unpack::Limits,
    locks: Vec<FileLock>,
) -> Result<Option<PendingLayer>, StoreError> {
    let Some(s) = staged else { return Ok(None) };
    let meta = LayerMeta {
        diff_id,
        blob,
        report: s.report.clone(),
    };
    if s.report.cross_layer_links.is_empty() {
        publish_layer(&s.tmp, &dest, &meta)?;
        return Ok(None);
    }
    Ok(Some(PendingLayer {
        reference: reference.to_string(),
        limits,
        tmp: s.tmp,
        dest,
        report: s.report,
        meta,
        _locks: locks,
    }))
}

/// Sends the registry's chunks to the worker, checking the size as they come.
async fn pump(
    mut stream: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    tx: mpsc::Sender<Result<Bytes, String>>,
    size: u64,
    digest: &str,
    progress: &dyn PullProgress,
) -> Result<(), String> {
    let mut seen = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                seen += b.len() as u64;
                if seen > size {
                    let msg = format!("blob {digest} is larger than its declared {size} bytes");
                    let _ = tx.send(Err(msg.clone())).await;
                    return Err(msg);
                }
                progress.event(&PullEvent::LayerBytes {
                    digest: digest.to_string(),
                    bytes: b.len() as u64,
                });
                if tx.send(Ok(b)).await.is_err() {
                    // The worker stopped early (it reports why).
                    return Ok(());
                }
            }
            Err(e) => {
                let msg = format!(
                    "blob {digest}: connection failed after {seen} of {size} bytes: {}",
                    registry::error_chain(&e)
                );
                let _ = tx.send(Err(msg.clone())).await;
                return Err(msg);
            }
        }
    }
    if seen < size {
        let msg = format!("blob {digest}: stream ended after {seen} of {size} bytes");
        let _ = tx.send(Err(msg.clone())).await;
        return Err(msg);
    }
    Ok(())
}

/// Reads chunks from the async side, writing each to the blob writer as it passes.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    blob: Option<BlobWriter>,
    /// Writing the blob into the store failed (a full disk): the store's fault, kept
    /// apart from the network's so that the message blames the right one.
    write_failed: Option<io::Error>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.write_failed.is_some() {
            return Err(io::Error::other("writing the blob into the store failed"));
        }
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(msg)) => return Err(io::Error::other(msg)),
                Some(Ok(b)) => {
                    if let Some(w) = self.blob.as_mut() {
                        if let Err(e) = w.write_all(&b) {
                            self.write_failed = Some(e);
                            return Err(io::Error::other("writing the blob into the store failed"));
                        }
                    }
                    self.cur = b;
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// An unpacked, diffID-verified layer waiting in `tmp/`.
pub(crate) struct Staged {
    pub tmp: PathBuf,
    pub report: UnpackReport,
}

/// Decompresses `src`, unpacks it into a fresh `tmp/` dir and checks the diffID. With
/// `to_end`, also reads `src` to its end (a local blob); a network source is drained by
/// the caller so that its digest is checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn unpack_stream(
    l: &Layout,
    reference: &str,
    digest: &str,
    diff_id: &str,
    comp: Compression,
    mut src: impl Read,
    opts: &UnpackOptions,
    to_end: bool,
) -> Result<(Option<Staged>, u64), StoreError> {
    let tmp = l.tmp_path("layer");
    let rootfs = tmp.join("rootfs");
    std::fs::create_dir_all(&rootfs).at(&rootfs)?;
    let bad = |reason: String| StoreError::BadLayer {
        reference: reference.to_string(),
        digest: digest.to_string(),
        reason,
    };
    let result = (|| -> Result<(UnpackReport, String, u64), StoreError> {
        let dec = decompressor(comp, &mut src).map_err(|e| bad(format!("decompressing: {e}")))?;
        let mut hr = HashReader {
            inner: dec,
            hasher: Sha256::new(),
        };
        let report = unpack::apply_layer(&mut hr, &rootfs, opts).map_err(|e| {
            if e.is_no_space() {
                StoreError::NoSpace {
                    store: l.root().to_path_buf(),
                    what: format!("layer {digest} of {reference}"),
                    reason: e.to_string(),
                }
            } else {
                bad(e.to_string())
            }
        })?;
        // The tar may end before the stream does (padding): the diffID covers it all.
        let rest =
            io::copy(&mut hr, &mut io::sink()).map_err(|e| bad(format!("decompressing: {e}")))?;
        Ok((
            report,
            format!("sha256:{}", hex::encode(hr.hasher.finalize())),
            rest,
        ))
    })();
    if to_end {
        let _ = io::copy(&mut src, &mut io::sink());
    }
    match result {
        Ok((report, actual, rest)) if actual == diff_id => Ok((Some(Staged { tmp, report }), rest)),
        Ok((_, actual, _)) => {
            let _ = unpack::remove_tree(&tmp);
            Err(bad(format!(
                "uncompressed content hashes to {actual}, the image config says {diff_id}"
            )))
        }
        Err(e) => {
            let _ = unpack::remove_tree(&tmp);
            Err(e)
        }
    }
}

/// Downloads a blob into the store without unpacking it (configs, manifests' blobs).
pub(crate) async fn fetch_blob_only(
    l: &Layout,
    r: &ImageRef,
    digest: &str,
    size: u64,
    mut stream: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
) -> Result<u64, StoreError> {
    let reference = r.canonical();
    let mut w = l.blob_writer(digest, Some(size))?;
    while let Some(chunk) = stream.next().await {
        let b = chunk.map_err(|e| StoreError::Registry {
            reference: reference.clone(),
            registry: r.registry_host().to_string(),
            message: format!("blob {digest}: {}", registry::error_chain(&e)),
        })?;
        w.write_all(&b)
            .map_err(|e| store_write_error(l, &reference, digest, e))?;
    }
    let n = w.written();
    w.commit().map_err(|e| match e {
        BlobCommitError::Io(e) => e,
        other => StoreError::BadBlob {
            reference: reference.clone(),
            digest: digest.to_string(),
            reason: other.to_string(),
        },
    })?;
    Ok(n)
}

/// Writing blob `digest` into the store failed: the blob's fault (larger than declared),
/// or the store's (a full filesystem is said as such).
fn store_write_error(l: &Layout, reference: &str, digest: &str, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::InvalidData {
        StoreError::BadBlob {
            reference: reference.to_string(),
            digest: digest.to_string(),
            reason: e.to_string(),
        }
    } else if super::error::is_no_space(&e) {
        StoreError::NoSpace {
            store: l.root().to_path_buf(),
            what: format!("blob {digest} of {reference}"),
            reason: e.to_string(),
        }
    } else {
        StoreError::Io {
            path: l.root().join("tmp"),
            source: e,
        }
    }
}
