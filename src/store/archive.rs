//! Carrying images to air-gapped hosts: `save` writes images as one OCI archive (a tar
//! of an OCI image layout, what `skopeo ... oci-archive:FILE.tar` reads), `load` imports
//! one, verifying every blob's digest and size on the way in exactly as a pull does.
//! With the lock file, this moves a pipeline's exact images to a host with no registry.
//!
//! The archive is deterministic: entries sorted, owner 0:0, mtime 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex};

use super::error::{IoContext, StoreError};
use super::layout::{
    digest_hex, empty_index, ref_name, BlobCommitError, INDEX_DIGEST, OCI_LAYOUT, REF_NAME,
};
use super::progress::PullProgress;
use super::pull::{assemble, Resolved};
use super::reference::ImageRef;
use super::registry::{parse_manifest, Fetched, Platform, MAX_MANIFEST_BYTES};
use super::{Image, PullOptions, Store};

/// Caps index.json in an archive (it lists names, not content).
const MAX_INDEX_BYTES: u64 = 16 << 20;

fn archive_err(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Archive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn header(path: &str, size: u64, dir: bool) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).expect("short ascii path");
    h.set_size(size);
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

impl Store {
    /// Writes the images (by any Docker spelling; they must be in the store) to `out`.
    pub fn save(
        &self,
        images: &[String],
        out: &Path,
        opts: &PullOptions,
    ) -> Result<(), StoreError> {
        let l = self.layout();
        let _shared = l.lock_store_shared()?;
        let mut blobs: BTreeSet<String> = BTreeSet::new();
        let mut entries: Vec<Descriptor> = Vec::new();
        for image in images {
            let r = ImageRef::parse(image)?;
            let img = self
                .get(image, opts)?
                .ok_or_else(|| StoreError::NotPresent {
                    reference: r.canonical(),
                })?;
            let manifest_bytes = l.read_blob(&img.manifest_digest, MAX_MANIFEST_BYTES)?;
            let Fetched::Manifest(m) = parse_manifest(&img.reference, &manifest_bytes)? else {
                return Err(archive_err(
                    out,
                    format!("{}: manifest is an index", img.reference),
                ));
            };
            blobs.insert(img.manifest_digest.clone());
            blobs.insert(m.config().digest().to_string());
            if let Some(sbom) = m
                .annotations()
                .as_ref()
                .and_then(|a| a.get(crate::recipe::SBOM_ANNOTATION))
            {
                blobs.insert(sbom.clone());
            }
            for layer in m.layers() {
                blobs.insert(layer.digest().to_string());
            }
            if let Some(i) = &img.index_digest {
                if l.has_blob(i) {
                    blobs.insert(i.clone());
                }
            }
            let desc = l
                .find_ref(&img.reference)?
                .filter(|d| d.digest().to_string() == img.manifest_digest)
                .unwrap_or_else(|| {
                    descriptor(&img, manifest_bytes.len() as u64, m.media_type().clone())
                });
            entries.retain(|d| ref_name(d) != Some(&img.reference));
            entries.push(desc);
        }
        for b in &blobs {
            if !l.has_blob(b) {
                return Err(archive_err(out, format!("blob {b} is not in the store (its layer was unpacked but the blob removed); pull the image again")));
            }
        }
        entries.sort_by(|a, b| ref_name(a).cmp(&ref_name(b)));
        let mut index = empty_index();
        index.set_manifests(entries);
        let index_bytes = serde_json::to_vec_pretty(&index).expect("index serialises");

        let tmp = out.with_extension("tar.partial");
        let file = File::create(&tmp).at(&tmp)?;
        let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
        let add = |tar: &mut tar::Builder<_>, path: &str, data: &mut dyn Read, size: u64| {
            tar.append(&header(path, size, false), data).at(&tmp)
        };
        add(
            &mut tar,
            "oci-layout",
            &mut OCI_LAYOUT.as_bytes(),
            OCI_LAYOUT.len() as u64,
        )?;
        add(
            &mut tar,
            "index.json",
            &mut &index_bytes[..],
            index_bytes.len() as u64,
        )?;
        tar.append(&header("blobs/", 0, true), io::empty())
            .at(&tmp)?;
        tar.append(&header("blobs/sha256/", 0, true), io::empty())
            .at(&tmp)?;
        for b in &blobs {
            let p = l.blob_path(b)?;
            let f = File::open(&p).at(&p)?;
            let size = f.metadata().at(&p)?.len();
            add(
                &mut tar,
                &format!("blobs/sha256/{}", digest_hex(b)?),
                &mut io::BufReader::new(f),
                size,
            )?;
        }
        let mut w = tar.into_inner().at(&tmp)?;
        w.flush().at(&tmp)?;
        w.get_ref().sync_all().at(&tmp)?;
        std::fs::rename(&tmp, out).at(out)
    }

    /// Imports an OCI archive: every blob is verified against its name and size, then
    /// every named image is made complete (layers unpacked) and named in the store.
    pub async fn load(
        &self,
        archive: &Path,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<Vec<Image>, StoreError> {
        let l = self.layout().clone();
        // Held until the images are named: gc cannot remove the imported blobs meanwhile.
        let _shared = {
            let l2 = l.clone();
            tokio::task::spawn_blocking(move || l2.lock_store_shared())
                .await
                .expect("lock task")?
        };
        let (l2, path) = (l.clone(), archive.to_path_buf());
        let index: ImageIndex = tokio::task::spawn_blocking(move || import_blobs(&l2, &path))
            .await
            .expect("import task panicked")?;
        let platform = opts.platform.clone().unwrap_or_else(Platform::host);
        let mut loaded = Vec::new();
        for d in index.manifests() {
            let Some(name) = ref_name(d) else {
                progress.event(&super::PullEvent::Warning {
                    reference: archive.display().to_string(),
                    message: format!("{} has no reference name; skipped", d.digest()),
                });
                continue;
            };
            // Archives from other tools name images by tag only (`oci-archive:x.tar:1.0`).
            let r = ImageRef::parse(name).map_err(|_| {
                archive_err(
                    archive,
                    format!("image name `{name}` is not a reference sandrun can use"),
                )
            })?;
            let digest = d.digest().to_string();
            let bytes = l.read_blob(&digest, MAX_MANIFEST_BYTES)?;
            let mut resolved = Resolved {
                manifest_bytes: bytes.clone().into(),
                manifest_digest: digest.clone(),
                index_digest: d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(INDEX_DIGEST))
                    .cloned(),
                index_bytes: None,
            };
            if let Fetched::Index(idx) = parse_manifest(name, &bytes)? {
                let chosen = platform
                    .choose(&idx)
                    .ok_or_else(|| StoreError::NoPlatform {
                        reference: name.to_string(),
                        platform: platform.to_string(),
                        available: "see the archive".into(),
                    })?;
                let md = chosen.digest().to_string();
                resolved = Resolved {
                    manifest_bytes: l.read_blob(&md, MAX_MANIFEST_BYTES)?.into(),
                    manifest_digest: md,
                    index_digest: Some(digest),
                    index_bytes: None,
                };
            }
            loaded.push(assemble(self, &r, None, &resolved, opts, progress).await?);
        }
        Ok(loaded)
    }
}

fn descriptor(img: &Image, size: u64, media: Option<oci_spec::image::MediaType>) -> Descriptor {
    let mut annotations = HashMap::new();
    annotations.insert(REF_NAME.to_string(), img.reference.clone());
    if let Some(i) = &img.index_digest {
        annotations.insert(INDEX_DIGEST.to_string(), i.clone());
    }
    oci_spec::image::DescriptorBuilder::default()
        .media_type(media.unwrap_or(oci_spec::image::MediaType::ImageManifest))
        .digest(
            img.manifest_digest
                .parse::<oci_spec::image::Digest>()
                .expect("stored digest parses"),
        )
        .size(size)
        .annotations(annotations)
        .build()
        .expect("descriptor builds")
}

/// Streams every blob of the archive into the store (verified), returns its index.json.
fn import_blobs(l: &super::layout::Layout, path: &Path) -> Result<ImageIndex, StoreError> {
    let _shared = l.lock_store_shared()?;
    let file = File::open(path).at(path)?;
    let mut tar = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    let mut index: Option<ImageIndex> = None;
    let mut saw_layout = false;
    let mut bad: BTreeMap<String, String> = BTreeMap::new();
    for entry in tar
        .entries()
        .map_err(|e| archive_err(path, e.to_string()))?
    {
        let mut entry = entry.map_err(|e| archive_err(path, e.to_string()))?;
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_string();
        match name.as_str() {
            "oci-layout" => saw_layout = true,
            "index.json" => {
                let mut buf = Vec::new();
                (&mut entry)
                    .take(MAX_INDEX_BYTES + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| archive_err(path, e.to_string()))?;
                if buf.len() as u64 > MAX_INDEX_BYTES {
                    return Err(archive_err(path, "index.json is too large"));
                }
                index = Some(
                    serde_json::from_slice(&buf)
                        .map_err(|e| archive_err(path, format!("index.json: {e}")))?,
                );
            }
            n if n.starts_with("blobs/sha256/") && entry.header().entry_type().is_file() => {
                let digest = format!("sha256:{}", &n["blobs/sha256/".len()..]);
                if digest_hex(&digest).is_err() {
                    return Err(archive_err(path, format!("{n}: not a sha256 blob name")));
                }
                if l.has_blob(&digest) {
                    continue;
                }
                let size = entry.size();
                let _lock = l.lock(&format!("blob-{}", &digest[7..]))?;
                if l.has_blob(&digest) {
                    continue;
                }
                let mut w = l.blob_writer(&digest, Some(size))?;
                io::copy(&mut entry, &mut w).map_err(|e| archive_err(path, format!("{n}: {e}")))?;
                match w.commit() {
                    Ok(()) => {}
                    Err(BlobCommitError::Io(e)) => return Err(e),
                    Err(e) => {
                        bad.insert(digest, e.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    if let Some((d, why)) = bad.into_iter().next() {
        return Err(StoreError::BadBlob {
            reference: path.display().to_string(),
            digest: d,
            reason: why,
        });
    }
    if !saw_layout {
        return Err(archive_err(path, "no oci-layout file: not an OCI archive"));
    }
    index.ok_or_else(|| archive_err(path, "no index.json"))
}
