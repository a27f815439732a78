//! Image references as Docker writes them (`alpine`, `library/postgres:16`,
//! `ghcr.io/o/r:tag`, `host:5000/x@sha256:...`), normalised to one canonical spelling so
//! that the store, the lock file and the UI agree on what an image is called.
//!
//! The grammar is Docker's (distribution's `reference` package), checked by hand:
//! `oci_spec`'s parser compiles a Unicode regex on first use, which cost ~60 ms of
//! every `sandrun run`. The Docker Hub defaults (`docker.io`, `library/`, `:latest`)
//! follow distribution's `normalize.go`; the result is an `oci_spec` `Reference`. This
//! module adds the canonical name, the sha256-only rule of the store and the registry
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
    pub fn parse(s: &str) -> Result<ImageRef, StoreError> {
        let inner = parse_reference(s.trim()).map_err(|reason| StoreError::BadReference {
            reference: s.to_string(),
            reason: reason.into(),
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

/// Longest repository name Docker accepts (without the registry).
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// `[domain/]remote-name[:tag][@digest]`, Docker's reference grammar, normalised.
fn parse_reference(s: &str) -> Result<Reference, &'static str> {
    if s.is_empty() {
        return Err("repository name must have at least one component");
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (s, None),
    };
    let (name, tag) = match rest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        if !is_tag(tag) {
            return Err("invalid reference format");
        }
    }
    let valid_name = is_remote_name(name)
        || name
            .split_once('/')
            .is_some_and(|(domain, remote)| is_domain(domain) && is_remote_name(remote));
    if !valid_name {
        return Err("invalid reference format");
    }
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err("repository name must not be more than 255 characters");
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[\w][\w.-]{0,127}`
fn is_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `host[:port]`, host = dot-separated labels of letters, digits and inner dashes.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

/// Path components separated by `/`: lowercase alphanumeric runs joined by `.`, `_`,
/// `__` or any number of `-`.
fn is_remote_name(n: &str) -> bool {
    n.split('/').all(|component| {
        let b = component.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &b[start..i];
            let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
            if !ok {
                return false;
            }
        }
        true
    })
}

/// `algorithm:hex` with at least 32 hex digits, and the right length for sha256/384/512.
fn check_digest(d: &str) -> Result<(), &'static str> {
    let Some((algorithm, hex)) = d.split_once(':') else {
        return Err("invalid reference format");
    };
    let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err("invalid reference format");
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length");
    }
    Ok(())
}

/// distribution's `splitDockerDomain`: the first component is a registry when it has a
/// `.` or `:` or is `localhost`; Docker Hub's official images live under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
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

    /// The cases oci_spec's regex parser is tested with: same results by hand.
    #[test]
    fn docker_grammar() {
        let f = "f".repeat(64);
        for (input, registry, repository, tag, digest) in [
            ("busybox", "docker.io", "library/busybox", Some("latest"), None),
            ("test.com:tag", "docker.io", "library/test.com", Some("tag"), None),
            ("test.com:5000", "docker.io", "library/test.com", Some("5000"), None),
            ("test.com/repo:tag", "test.com", "repo", Some("tag"), None),
            ("test:5000/repo", "test:5000", "repo", Some("latest"), None),
            ("lowercase:Uppercase", "docker.io", "library/lowercase", Some("Uppercase"), None),
            ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux", Some("some-long-tag"), None),
            ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app", Some("test.example.com"), None),
            ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", Some("xn--n3h.com"), None),
            ("foo_bar.com:8080", "docker.io", "library/foo_bar.com", Some("8080"), None),
            ("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", Some("8080"), None),
            ("index.docker.io/x/y__z---w", "docker.io", "x/y__z---w", Some("latest"), None),
            ("127.0.0.1:5000/a/b:1@sha256:FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF", "127.0.0.1:5000", "a/b", Some("1"), Some("sha256:FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF")),
        ] {
            let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (registry, repository, tag, digest),
                "{input}"
            );
        }
        let r = ImageRef::parse(&format!("test:5000/repo:tag@sha256:{f}")).unwrap();
        assert_eq!(r.canonical(), format!("test:5000/repo:tag@sha256:{f}"));
        for bad in [
            ":justtag".to_string(),
            format!("@sha256:{f}"),
            "repo@sha256:ffffffffffffffffffffffffffffffffff".into(),
            format!("validname@invaliddigest:{f}"),
            "Uppercase:tag".into(),
            "test:5000/Uppercase/lowercase:tag".into(),
            "a".repeat(256),
            "aa/asdf$$^/aa".into(),
            "a//b".into(),
            "a/b/".into(),
            "-a".into(),
            "a-".into(),
            "a...b".into(),
            "host:port/x".into(),
            "-host.com/x".into(),
            format!("x:{}", "t".repeat(129)),
            "x:.tag".into(),
        ] {
            assert!(ImageRef::parse(&bad).is_err(), "{bad} parsed");
        }
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
