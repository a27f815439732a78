//! The image side of sandrun: a content-addressed store of OCI images, filled from
//! registries (pull) or archives (load), with every layer unpacked once, by diffID, into
//! a directory that container steps stack read-only with overlayfs.
//!
//! The rest of sandrun asks one question: [`Store::ensure`] — "give me this image, per
//! this pull policy" — and gets back plain data ([`Image`]): the pinned digests, the
//! image configuration, and the unpacked layer directories, lowest first. How it gets
//! there (locks, registry protocol, verification, unpacking) stays in this module.
//!
//! Layer directories and overlayfs: whiteouts are 0/0 character devices; opaque
//! directories carry `user.overlay.opaque=y` (and, when written by real root,
//! `trusted.overlay.opaque=y`). Mount rootless overlays with `userxattr`; real root's
//! overlays read `trusted.*`. See [`unpack`] for ownership and the security rules.
//!
//! Files: `reference` (names), `layout` (the on-disk OCI layout, blobs, locks),
//! `registry` (network), `auth` (credentials), `unpack` (layer applier), `pull` (the
//! orchestration behind `ensure`), `lock` (lock files), `archive` (save/load),
//! `maintain` (images, gc, fsck), `progress` (events and the terminal reporter),
//! `cmd` (the CLI subcommands), `built` (images built here, from recipes).

pub mod archive;
pub mod auth;
mod built;
mod error;
pub mod layout;
pub mod lock;
pub mod maintain;
pub mod progress;
mod pull;
pub mod reference;
pub mod registry;
pub mod unpack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::pipeline::PullPolicy;
pub use auth::Credential;
pub use error::StoreError;
pub use lock::{LockFile, Pin};
pub use progress::{NoProgress, PullEvent, PullProgress};
pub use pull::parse_config;
pub use reference::ImageRef;
pub use registry::Platform;

use layout::Layout;

/// An image ready to run: plain data, no handles.
#[derive(Clone, Debug)]
pub struct Image {
    /// The canonical reference (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The index (manifest list) it was chosen from, when the reference named one.
    pub index_digest: Option<String>,
    pub config: oci_spec::image::ImageConfiguration,
    /// Unpacked layer directories (overlayfs lower dirs), lowest first.
    pub layers: Vec<PathBuf>,
}

/// A Harness connector mapped to a registry by sandrun's config file.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ConnectorMapping {
    /// Registry host (`registry.example.com`, `127.0.0.1:5000`).
    pub registry: String,
    #[serde(default)]
    pub credentials: Option<Credential>,
}

/// How to pull: everything that is per run rather than per image.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Never open a network connection; fail when something is missing.
    pub offline: bool,
    /// Registry hosts (`host:port`) spoken to over plain HTTP. Loopback hosts always are.
    pub insecure_registries: Vec<String>,
    /// Credentials by registry host; they win over Docker's and podman's config files.
    pub credentials: BTreeMap<String, Credential>,
    /// Harness connector identifier -> registry.
    pub connectors: BTreeMap<String, ConnectorMapping>,
    /// Lock-file pins by canonical reference: pulls resolve to exactly these digests.
    pub pins: BTreeMap<String, Pin>,
    /// Refuse any image without a pin (`--locked`).
    pub locked: bool,
    /// The platform to choose from an index; `None`: this machine's.
    pub platform: Option<Platform>,
    /// Caps for the layer applier other than its size (entries, path length).
    pub limits: unpack::Limits,
    /// Bytes one layer may write when unpacked; `None`: proportional to its compressed
    /// size ([`unpack::Limits::for_layer`]).
    pub layer_size_limit: Option<u64>,
}

impl PullOptions {
    /// Registry credentials including those of mapped connectors.
    pub(crate) fn all_credentials(&self) -> BTreeMap<String, Credential> {
        let mut creds = self.credentials.clone();
        for m in self.connectors.values() {
            if let Some(c) = &m.credentials {
                creds.entry(m.registry.clone()).or_insert_with(|| c.clone());
            }
        }
        creds
    }
}

/// What a step's `connectorRef` does to its image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectorResolution {
    /// No connector named.
    None,
    /// Mapped: the image is pulled from this reference.
    Mapped(String),
    /// Named but not in the config: the image's own registry is used (say so in `plan`).
    Unmapped { connector: String, registry: String },
}

/// Applies a connector mapping to an image reference. A reference that names its own
/// registry keeps it; one that relies on the Docker Hub default (`alpine`,
/// `myorg/app:1`) is pulled from the connector's registry instead.
pub fn resolve_connector(
    image: &str,
    connector: Option<&str>,
    opts: &PullOptions,
) -> Result<ConnectorResolution, StoreError> {
    let Some(connector) = connector else {
        return Ok(ConnectorResolution::None);
    };
    let r = ImageRef::parse(image)?;
    match opts.connectors.get(connector) {
        Some(m) => {
            let explicit = image.split('/').next().is_some_and(|first| {
                image.contains('/')
                    && (first.contains('.') || first.contains(':') || first == "localhost")
            });
            if explicit {
                Ok(ConnectorResolution::Mapped(r.canonical()))
            } else {
                Ok(ConnectorResolution::Mapped(
                    r.with_registry(&m.registry).canonical(),
                ))
            }
        }
        None => Ok(ConnectorResolution::Unmapped {
            connector: connector.to_string(),
            registry: r.registry().to_string(),
        }),
    }
}

/// The store directory: `$SANDRUN_HOME`, else `$XDG_DATA_HOME/sandrun`, else
/// `~/.local/share/sandrun`.
pub fn default_home() -> Option<PathBuf> {
    home_from(
        std::env::var_os("SANDRUN_HOME"),
        std::env::var_os("XDG_DATA_HOME"),
        std::env::var_os("HOME"),
    )
}

fn home_from(
    sandrun: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let nonempty = |v: Option<std::ffi::OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    nonempty(sandrun)
        .or_else(|| nonempty(xdg).map(|x| x.join("sandrun")))
        .or_else(|| nonempty(home).map(|h| h.join(".local/share/sandrun")))
}

/// The image store. Cheap to clone; safe to share between tasks and processes.
#[derive(Clone, Debug)]
pub struct Store {
    layout: Layout,
}

impl Store {
    /// Opens (creating if needed) the store at `home`.
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            layout: Layout::open(home)?,
        })
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Makes `image` present per `policy` and returns it. `IfNotPresent`: a local copy
    /// (the lock pin, or the tag as last pulled) is used without contacting the
    /// registry; `Always`: the tag is re-resolved and blobs already present are reused;
    /// `Never`: absent is an error. `opts.offline` never contacts a registry.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<Image, StoreError> {
        pull::ensure(self, image, policy, opts, progress).await
    }

    /// The pin for `image`: resolved at the registry (manifests only, no layers), or
    /// from the store with `opts.offline`.
    pub async fn resolve_pin(
        &self,
        image: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<Pin, StoreError> {
        pull::resolve_pin(self, image, opts, progress).await
    }

    /// [`Store::ensure`] without the network: the image when `policy` lets the
    /// store's complete copy serve, `None` when it would have to be pulled.
    pub fn ensure_local(
        &self,
        image: &str,
        policy: PullPolicy,
        opts: &PullOptions,
    ) -> Result<Option<Image>, StoreError> {
        pull::ensure_local(self, image, policy, opts)
    }

    /// The image named `image` if it is complete in the store, without any network.
    pub fn get(&self, image: &str, opts: &PullOptions) -> Result<Option<Image>, StoreError> {
        pull::local(self, &ImageRef::parse(image)?, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn home_defaults() {
        let s = |x: &str| Some(OsString::from(x));
        assert_eq!(
            home_from(s("/h"), s("/x"), s("/u")),
            Some(PathBuf::from("/h"))
        );
        assert_eq!(
            home_from(None, s("/x"), s("/u")),
            Some(PathBuf::from("/x/sandrun"))
        );
        assert_eq!(
            home_from(s(""), None, s("/u")),
            Some(PathBuf::from("/u/.local/share/sandrun"))
        );
        assert_eq!(home_from(None, None, None), None);
    }

    #[test]
    fn connectors_rewrite_default_registry_only() {
        let mut opts = PullOptions::default();
        opts.connectors.insert(
            "account.harnessImage".into(),
            ConnectorMapping {
                registry: "mirror.local:5000".into(),
                credentials: None,
            },
        );
        let r = |i: &str, c: Option<&str>| resolve_connector(i, c, &opts).unwrap();
        assert_eq!(r("alpine", None), ConnectorResolution::None);
        assert_eq!(
            r("myorg/app:1", Some("account.harnessImage")),
            ConnectorResolution::Mapped("mirror.local:5000/myorg/app:1".into())
        );
        assert_eq!(
            r("ghcr.io/o/r:1", Some("account.harnessImage")),
            ConnectorResolution::Mapped("ghcr.io/o/r:1".into())
        );
        assert_eq!(
            r("alpine", Some("org.dockerhub")),
            ConnectorResolution::Unmapped {
                connector: "org.dockerhub".into(),
                registry: "docker.io".into()
            }
        );
    }
}
