//! Image references as Docker writes them (`alpine`, `library/postgres:16`,
//! `ghcr.io/o/r:tag`, `host:5000/x@sha256:...`), normalised to one canonical spelling so
//! that the store, the lock file and the UI agree on what an image is called.
//!
//! Parsing and the Docker Hub defaults (`docker.io`, `library/`, `:latest`) come from
//! `oci_spec::distribution::Reference`; this module adds the canonical name, the
//! sha256-only rule of the store and the registry host that credentials belong to.

use std::fmt;

use oci_client::Reference;

use super::error::StoreError;

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, StoreError> {
        let trimmed = s.trim();
        let inner = Reference::try_from(trimmed).map_err(|e| StoreError::BadReference {
            reference: s.to_string(),
            reason: e.to_string(),
        })?;
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(StoreError::BadReference {
                reference: s.to_string(),
                reason: "repository name must be lowercase".into(),
            });
        }
        if let Some(d) = inner.digest() {
            if !d.starts_with("sha256:") {
                return Err(StoreError::BadReference {
                    reference: s.to_string(),
                    reason: "only sha256 digests are supported".into(),
                });
            }
        }
        Ok(ImageRef { inner })
    }

    /// The registry as named in the reference (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host sandrun connects to (`index.docker.io` for Docker Hub).
    pub fn registry_host(&self) -> &str {
        self.inner.resolve_registry()
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The canonical name: `docker.io/library/alpine:latest`, `host:5000/x@sha256:...`.
    pub fn canonical(&self) -> String {
        self.inner.whole()
    }

    /// The same repository pinned to `digest` (the tag is dropped).
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            inner: Reference::with_digest(
                self.inner.registry().to_string(),
                self.inner.repository().to_string(),
                digest.to_string(),
            ),
        }
    }

    /// The same reference pointing at another registry host (connector mapping).
    pub fn with_registry(&self, registry: &str) -> ImageRef {
        let inner = match (self.tag(), self.digest()) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(
                registry.to_string(),
                self.repository().to_string(),
                t.to_string(),
                d.to_string(),
            ),
            (None, Some(d)) => Reference::with_digest(
                registry.to_string(),
                self.repository().to_string(),
                d.to_string(),
            ),
            (t, None) => Reference::with_tag(
                registry.to_string(),
                self.repository().to_string(),
                t.unwrap_or("latest").to_string(),
            ),
        };
        ImageRef { inner }
    }

    pub(crate) fn oci(&self) -> &Reference {
        &self.inner
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// Docker treats registries on loopback as plain HTTP without being told; so does sandrun.
pub fn is_loopback_registry(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        ImageRef::parse(s).unwrap().canonical()
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(canon("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            canon("library/postgres:16"),
            "docker.io/library/postgres:16"
        );
        assert_eq!(canon("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(
            ImageRef::parse("alpine").unwrap().registry_host(),
            "index.docker.io"
        );
    }

    #[test]
    fn other_registries() {
        assert_eq!(canon("ghcr.io/o/r:tag"), "ghcr.io/o/r:tag");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("host:5000/x@{d}")).unwrap();
        assert_eq!(r.registry(), "host:5000");
        assert_eq!(r.repository(), "x");
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.tag(), None);
        assert_eq!(
            canon("123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1.2"),
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1.2"
        );
        assert_eq!(canon("gcr.io/project/img:v1"), "gcr.io/project/img:v1");
        assert_eq!(canon("localhost/img"), "localhost/img:latest");
    }

    #[test]
    fn refuses_bad_references() {
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("UPPER/case").is_err());
        assert!(ImageRef::parse("x@sha256:abc").is_err());
        assert!(ImageRef::parse(&format!("x@sha512:{}", "a".repeat(128))).is_err());
    }

    #[test]
    fn registry_rewrites() {
        let r = ImageRef::parse("alpine:3")
            .unwrap()
            .with_registry("mirror:5000");
        assert_eq!(r.canonical(), "mirror:5000/library/alpine:3");
    }

    #[test]
    fn loopback_registries() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost:5000"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("ghcr.io"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
    }
}
