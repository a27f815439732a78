//! Talking to registries: resolving a reference to a platform manifest and streaming
//! blobs. `oci-client` negotiates the token; sandrun makes the requests with it, for what
//! oci-client lacks: manifests are fetched with a size cap and kept as the exact bytes
//! received, blobs stream (never buffered whole) and are hashed once, by the store, as
//! they are written, and the platform choice in an index honours the variant.
//!
//! TLS: rustls with the `ring` provider, installed once as the process-wide default, so
//! the build does not pull in aws-lc-sys (slow to compile, needs cmake) or OpenSSL.
//! Plain HTTP is used for `--insecure-registry` hosts and, as Docker does, for registries
//! on loopback.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::auth::{self, Credential};
use super::error::StoreError;
use super::layout::sha256_digest;
use super::reference::{is_loopback_registry, ImageRef};

/// Manifests and indexes larger than this are refused (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs larger than this are refused.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

pub const ACCEPTED_MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

static CRYPTO: Once = Once::new();

/// Installs ring as rustls's process-wide provider (idempotent).
pub fn install_crypto_provider() {
    CRYPTO.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A manifest or index as received.
#[derive(Clone, Debug)]
pub enum Fetched {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// The os/architecture/variant an image must be for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This machine, in OCI's names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Variants this platform runs, best first (`None` = an entry without a variant).
    fn acceptable_variants(&self) -> Vec<Option<&str>> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", _) => vec![Some("v8"), None],
            ("arm", Some("v7")) => vec![Some("v7"), Some("v6"), Some("v5"), None],
            ("arm", Some("v6")) => vec![Some("v6"), Some("v5"), None],
            (_, v) => vec![v, None],
        }
    }

    /// Picks this platform's manifest from an index.
    pub fn choose<'a>(&self, index: &'a ImageIndex) -> Option<&'a Descriptor> {
        let candidates: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == self.os
                        && p.architecture().to_string() == self.architecture
                })
            })
            .collect();
        for want in self.acceptable_variants() {
            if let Some(d) = candidates
                .iter()
                .find(|d| d.platform().as_ref().and_then(|p| p.variant().as_deref()) == want)
            {
                return Some(d);
            }
        }
        None
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Parses manifest bytes as an image manifest or an index.
pub fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<Fetched, StoreError> {
    let bad = |reason: String| StoreError::BadManifest {
        reference: reference.to_string(),
        what: "manifest".into(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(bad(
            "not schemaVersion 2 (Docker schema 1 images are not supported)".into(),
        ));
    }
    if v.get("manifests").is_some() {
        let idx: ImageIndex = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        Ok(Fetched::Index(Box::new(idx)))
    } else {
        let m: ImageManifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        Ok(Fetched::Manifest(Box::new(m)))
    }
}

/// The client of the plain requests (manifests, blobs).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("sandrun/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client builds")
}

/// One client per pull session: credentials and tokens are per registry host.
pub struct Registry {
    client: Client,
    http: reqwest::Client,
    insecure: Vec<String>,
    credentials: BTreeMap<String, Credential>,
    /// registry host/repository -> Authorization header value (None: anonymous).
    headers: Mutex<HashMap<String, Option<String>>>,
}

impl Registry {
    pub fn new(insecure: &[String], credentials: BTreeMap<String, Credential>) -> Registry {
        install_crypto_provider();
        let insecure: Vec<String> = insecure.to_vec();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure.clone()),
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            platform_resolver: None,
            ..Default::default()
        };
        // Each client loads the system's root certificates when built (~10 ms of file
        // reads and PEM parsing): the two are built on both CPUs at once. (Not one client
        // per process: pooled connections belong to the tokio runtime that opened them.)
        let (client, http) = std::thread::scope(|s| {
            let http = s.spawn(http_client);
            let client = Client::new(config);
            (client, http.join().expect("HTTP client thread panicked"))
        });
        Registry {
            client,
            http,
            insecure,
            credentials,
            headers: Mutex::new(HashMap::new()),
        }
    }

    fn plain_http(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    /// The oci-client reference with loopback registries treated as insecure: oci-client
    /// decides the scheme from its list, so loopback hosts are added on first use.
    fn err(r: &ImageRef, message: impl std::fmt::Display) -> StoreError {
        StoreError::Registry {
            reference: r.canonical(),
            registry: r.registry_host().to_string(),
            message: message.to_string(),
        }
    }

    async fn authorization(&self, r: &ImageRef) -> Result<Option<String>, StoreError> {
        let key = format!("{}/{}", r.registry_host(), r.repository());
        if let Some(h) = self.headers.lock().expect("lock").get(&key) {
            return Ok(h.clone());
        }
        let (auth, _source) = auth::lookup(r.registry(), &self.credentials);
        let token = self
            .client
            .auth(r.oci(), &auth, RegistryOperation::Pull)
            .await
            .map_err(|e| {
                if oci_connection_error(&e) {
                    Self::err(r, format!("cannot connect: {}", error_chain(&e)))
                } else {
                    Self::err(r, format!("authentication failed: {}", error_chain(&e)))
                }
            })?;
        let header = match (token, &auth) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, RegistryAuth::Basic(u, p)) => {
                use base64::Engine as _;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                ))
            }
            (None, RegistryAuth::Bearer(t)) => Some(format!("Bearer {t}")),
            (None, RegistryAuth::Anonymous) => None,
        };
        self.headers
            .lock()
            .expect("lock")
            .insert(key, header.clone());
        Ok(header)
    }

    /// A GET of `/v2/REPOSITORY/{path}` with the cached authorization, answered with
    /// success. Errors start with `subject` (`""` for a manifest, `"blob DIGEST: "`);
    /// a 404 says `missing`.
    async fn get(
        &self,
        r: &ImageRef,
        path: &str,
        accept: Option<&str>,
        subject: &str,
        missing: String,
    ) -> Result<reqwest::Response, StoreError> {
        let host = r.registry_host();
        let scheme = if self.plain_http(host) {
            "http"
        } else {
            "https"
        };
        let url = format!("{scheme}://{host}/v2/{}/{path}", r.repository());
        let auth = self.authorization(r).await?;
        let mut req = self.http.get(&url);
        if let Some(accept) = accept {
            req = req.header(reqwest::header::ACCEPT, accept);
        }
        if let Some(a) = &auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.map_err(|e| {
            let what = if is_connection_error(&e) {
                "cannot connect: "
            } else {
                ""
            };
            Self::err(r, format!("{what}{subject}GET {url}: {}", error_chain(&e)))
        })?;
        let status = resp.status();
        if !status.is_success() {
            let what = match status.as_u16() {
                401 | 403 => format!("{subject}access denied (check credentials)"),
                404 => missing,
                _ => format!("{subject}GET {url}: HTTP {status}"),
            };
            return Err(Self::err(r, what));
        }
        Ok(resp)
    }

    /// Fetches the manifest or index named by `reference` (a tag or a digest) as exact
    /// bytes, at most [`MAX_MANIFEST_BYTES`]; returns the bytes and their digest. When
    /// `reference` is a digest, the bytes must hash to it.
    pub async fn fetch_manifest(
        &self,
        r: &ImageRef,
        reference: &str,
    ) -> Result<(Bytes, String), StoreError> {
        let resp = self
            .get(
                r,
                &format!("manifests/{reference}"),
                Some(&ACCEPTED_MANIFESTS.join(", ")),
                "",
                format!("manifest {reference} not found"),
            )
            .await?;
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES)
        {
            return Err(Self::err(
                r,
                format!("manifest larger than {MAX_MANIFEST_BYTES} bytes refused"),
            ));
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| Self::err(r, format!("reading manifest: {}", error_chain(&e))))?;
            if body.len() as u64 + chunk.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(Self::err(
                    r,
                    format!("manifest larger than {MAX_MANIFEST_BYTES} bytes refused"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let digest = sha256_digest(&body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(StoreError::BadBlob {
                    reference: r.canonical(),
                    digest: expected,
                    reason: format!("manifest hashes to {digest}"),
                });
            }
        }
        Ok((Bytes::from(body), digest))
    }

    /// Opens a blob as a stream of chunks. The caller checks size and digest as they come.
    ///
    /// A plain GET with the cached authorization (redirects to a CDN are followed, and
    /// reqwest drops the authorization on a cross-host redirect), not oci-client's
    /// `pull_blob_stream`: that one hashes every chunk on the thread that polls it, and
    /// the store hashes the blob again as it writes it (a second SHA-256 of every
    /// compressed byte, on the one thread that drives all layers' downloads).
    pub async fn blob_stream(
        &self,
        r: &ImageRef,
        digest: &str,
        size: u64,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, StoreError> {
        let resp = self
            .get(
                r,
                &format!("blobs/{digest}"),
                None,
                &format!("blob {digest}: "),
                format!("blob {digest} not found"),
            )
            .await?;
        if let Some(len) = resp.content_length() {
            if len != size {
                return Err(StoreError::BadBlob {
                    reference: r.canonical(),
                    digest: digest.to_string(),
                    reason: format!("registry announces {len} bytes, the manifest says {size}"),
                });
            }
        }
        Ok(resp
            .bytes_stream()
            .map(|c| c.map_err(std::io::Error::other))
            .boxed())
    }
}

/// Builds the insecure-host list: the user's plus every loopback registry named.
pub fn insecure_hosts<'a>(
    given: &[String],
    refs: impl IntoIterator<Item = &'a ImageRef>,
) -> Vec<String> {
    let mut out = given.to_vec();
    for r in refs {
        let h = r.registry_host();
        if is_loopback_registry(h) && !out.iter().any(|x| x == h) {
            out.push(h.to_string());
        }
    }
    out
}

/// Whether `e` (or a cause) says that no connection to the registry could be made or
/// kept: refused, unreachable, timed out, reset. Such failures are not the registry's
/// answer (a refused login, a missing manifest) and are said as such.
pub fn is_connection_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(re) = c.downcast_ref::<reqwest::Error>() {
            if re.is_connect() || re.is_timeout() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
            ) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// [`is_connection_error`] for oci-client's errors, whose request variant is
/// transparent (its `source()` skips the reqwest error itself).
fn oci_connection_error(e: &oci_client::errors::OciDistributionError) -> bool {
    match e {
        oci_client::errors::OciDistributionError::RequestError(re) => is_connection_error(re),
        other => is_connection_error(other),
    }
}

/// An error and its causes on one line (reqwest hides the useful part in `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", format!("{i}").repeat(64)),
                    "size": 1,
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    fn pick(p: &Platform, idx: &ImageIndex) -> Option<usize> {
        p.choose(idx).map(|d| {
            idx.manifests()
                .iter()
                .position(|x| x.digest() == d.digest())
                .unwrap()
        })
    }

    #[test]
    fn platform_variant_is_honoured() {
        let idx = index(&[
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
            ("linux", "amd64", None),
            ("linux", "arm64", Some("v8")),
        ]);
        let arm7 = Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: Some("v7".into()),
        };
        assert_eq!(pick(&arm7, &idx), Some(1));
        let arm6 = Platform {
            variant: Some("v6".into()),
            ..arm7.clone()
        };
        assert_eq!(pick(&arm6, &idx), Some(0));
        let amd = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        assert_eq!(pick(&amd, &idx), Some(2));
        let arm64 = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(pick(&arm64, &idx), Some(3));
        let only_v7 = index(&[("linux", "arm", Some("v7"))]);
        assert_eq!(pick(&arm6, &only_v7), None);
        let windows = index(&[("windows", "amd64", None)]);
        assert_eq!(pick(&amd, &windows), None);
    }

    #[test]
    fn manifests_are_classified() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
        assert!(matches!(parse_manifest("x", m), Ok(Fetched::Manifest(_))));
        assert!(parse_manifest("x", br#"{"schemaVersion":1}"#).is_err());
        assert!(parse_manifest("x", b"not json").is_err());
    }
}
