//! Images made on this machine (from recipes, see `crate::recipe`) enter the store the
//! way pulled ones do: their layer and config blobs are written first, then
//! [`Store::add_built`] unpacks the layers by diffID and names the manifest in
//! `index.json` last, so an interrupted build leaves only unnamed, verified blobs.

use oci_spec::image::ImageManifest;

use super::error::StoreError;
use super::pull::{assemble, Resolved};
use super::registry::{parse_manifest, Fetched, MAX_MANIFEST_BYTES};
use super::{Image, ImageRef, PullOptions, PullProgress, Store};

impl Store {
    /// Stores `bytes` as a blob (content-addressed, verified, renamed into place).
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        self.layout().put_blob(bytes)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.layout().has_blob(digest)
    }

    /// A small blob (manifest, config, SBOM), checked against its digest.
    pub fn read_blob(&self, digest: &str, cap: u64) -> Result<Vec<u8>, StoreError> {
        self.layout().read_blob(digest, cap)
    }

    /// The image manifest stored under `digest`.
    pub fn manifest(&self, digest: &str) -> Result<ImageManifest, StoreError> {
        let bytes = self.layout().read_blob(digest, MAX_MANIFEST_BYTES)?;
        match parse_manifest(digest, &bytes)? {
            Fetched::Manifest(m) => Ok(*m),
            Fetched::Index(_) => Err(StoreError::BadManifest {
                reference: digest.to_string(),
                what: "manifest".into(),
                reason: "is an index, expected an image manifest".into(),
            }),
        }
    }

    /// Names the manifest `manifest_bytes` (whose config and layer blobs are in the
    /// store already) `reference`, unpacking its layers first.
    pub async fn add_built(
        &self,
        reference: &str,
        manifest_bytes: Vec<u8>,
        progress: &dyn PullProgress,
    ) -> Result<Image, StoreError> {
        let r = ImageRef::parse(reference)?;
        let resolved = Resolved {
            manifest_digest: super::layout::sha256_digest(&manifest_bytes),
            manifest_bytes: manifest_bytes.into(),
            index_digest: None,
            index_bytes: None,
        };
        let opts = PullOptions {
            offline: true,
            ..Default::default()
        };
        let l = self.layout().clone();
        let _shared = tokio::task::spawn_blocking(move || l.lock_store_shared())
            .await
            .expect("lock task")?;
        assemble(self, &r, None, &resolved, &opts, progress).await
    }
}
