//! Image references as Docker writes them (`alpine`, `library/postgres:16`,
//! `ghcr.io/o/r:tag`, `host:5000/x@sha256:...`), normalised to one canonical spelling so
//! that the store, the lock file and the UI agree on what an image is called.
//!
//! Parsing (with the Docker Hub defaults `docker.io`, `library/`, `:latest`) is written
//! here rather than with oci-spec's regex, whose compilation costs more than a whole
//! warm look-up; the parsed parts are kept as an `oci_client::Reference`. This module
//! also adds the canonical name, the sha256-only rule of the store and the registry
//! host that credentials belong to.

use std::fmt;

use oci_client::Reference;

use super::error::StoreError;

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses a reference as Docker does (`docker.io` and `library/` and `:latest`
    /// defaults), without oci-spec's regex (see the module docs).
    pub fn parse(s: &str) -> Result<ImageRef, StoreError> {
        let bad = |reason: &str| StoreError::BadReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("empty"));
        }
        let (rest, digest) = match t.rsplit_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (t, None),
        };
        if let Some(d) = digest {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("only sha256 digests are supported"))?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad("a sha256 digest has 64 lowercase hex digits"));
            }
        }
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
                });
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first.to_string(), path.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        let registry = match registry.as_str() {
            "index.docker.io" => "docker.io".to_string(),
            _ => registry,
        };
        let domain_ok = registry.split(':').next().is_some_and(|h| {
            !h.is_empty()
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'[' || b == b']'
                })
        }) && registry
            .split_once(':')
            .is_none_or(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        if !domain_ok {
            return Err(bad("invalid registry host"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("repository name must be lowercase"));
        }
        if repository.len() + registry.len() > 255 || !repository.split('/').all(path_component_ok)
        {
            return Err(bad("invalid repository name"));
        }
        let inner = match (tag, digest) {
            (Some(t), Some(d)) => {
                Reference::with_tag_and_digest(registry, repository, t.to_string(), d.to_string())
            }
            (None, Some(d)) => Reference::with_digest(registry, repository, d.to_string()),
            (t, None) => {
                Reference::with_tag(registry, repository, t.unwrap_or("latest").to_string())
            }
        };
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

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, Docker's rule for one path component.
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_lowercase() || b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && !b[i].is_ascii_alphanumeric() {
            i += 1;
        }
        let sep = &c[sep_start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
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
        assert_eq!(
            canon("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            canon("my_org/sub__x/app-1.2:v1.0-rc_1"),
            "docker.io/my_org/sub__x/app-1.2:v1.0-rc_1"
        );
        let both = format!("alpine:3@sha256:{}", "b".repeat(64));
        assert_eq!(
            canon(&both),
            format!("docker.io/library/alpine:3@sha256:{}", "b".repeat(64))
        );
    }

    #[test]
    fn refuses_bad_references() {
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("upper/Case").is_err());
        assert!(ImageRef::parse("x@sha256:abc").is_err());
        assert!(ImageRef::parse(&format!("x@sha512:{}", "a".repeat(128))).is_err());
        assert!(ImageRef::parse("a//b").is_err());
        assert!(ImageRef::parse("a/b-").is_err());
        assert!(ImageRef::parse("a:").is_err());
        assert!(ImageRef::parse("a:-x").is_err());
        assert!(ImageRef::parse("host:port/x").is_err());
        assert!(ImageRef::parse("a b").is_err());
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
