//! Debian archives over HTTP, without apt and without root: the signed `InRelease` of
//! each suite (checked with `gpgv` against the source's keyring), the `Packages` index
//! of each component (checked against the Release file's sha256), and `.deb` files
//! (checked against the index or the lock). Everything downloaded is kept by its sha256
//! in the store (`$SANDRUN_HOME/debian/by-hash/`), written through a temp file and
//! renamed into place only once verified, so `--offline` works from what is there and
//! an interrupted download leaves nothing behind. `SANDRUN_DOWNLOAD_CACHE`, when set,
//! names a directory shared by several stores (the tests use one) that is read first
//! and filled too.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::error::RecipeError;
use super::index::{PackageIndex, Release};
use super::model::Source;
use crate::store::Store;

/// Where downloads come from and go to.
pub struct Archives {
    store: Store,
    dir: PathBuf,
    shared: Option<PathBuf>,
    offline: bool,
    client: std::sync::OnceLock<reqwest::blocking::Client>,
    /// Things the user should know (an unverified Release...).
    notes: std::sync::Mutex<Vec<String>>,
}

/// The keyring a source is verified with when it names none.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl Archives {
    pub fn new(store: &Store, offline: bool) -> Result<Archives, RecipeError> {
        let dir = store.root().join("debian");
        for sub in ["by-hash", "releases"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| RecipeError::read(&p, e))?;
        }
        Ok(Archives {
            store: store.clone(),
            dir,
            shared: std::env::var_os("SANDRUN_DOWNLOAD_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            offline,
            client: std::sync::OnceLock::new(),
            notes: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn note(&self, n: String) {
        self.notes.lock().expect("notes lock").push(n);
    }

    /// What the user should be told (unverified Release files, skipped index entries).
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().expect("notes lock"))
    }

    pub fn offline(&self) -> bool {
        self.offline
    }

    fn client(&self) -> Result<&reqwest::blocking::Client, RecipeError> {
        if self.client.get().is_none() {
            crate::store::registry::install_crypto_provider();
            let c = reqwest::blocking::Client::builder()
                .user_agent(concat!("sandrun/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(std::time::Duration::from_secs(20))
                .timeout(std::time::Duration::from_secs(600))
                .build()
                .map_err(|e| RecipeError::Fetch {
                    url: String::new(),
                    reason: e.to_string(),
                })?;
            let _ = self.client.set(c);
        }
        Ok(self.client.get().expect("client set"))
    }

    /// The store path of the file with this sha256 (present or not).
    pub fn by_hash(&self, sha256: &str) -> PathBuf {
        self.dir.join("by-hash").join(sha256)
    }

    /// The verified file with `sha256` (and `size` when known): from the store, from the
    /// shared cache, else downloaded from `url`.
    pub fn fetch(
        &self,
        url: &str,
        sha256: &str,
        size: Option<u64>,
    ) -> Result<PathBuf, RecipeError> {
        let dest = self.by_hash(sha256);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self.store.layout().tmp_path("download");
        let result = (|| {
            if let Some(shared) = self.shared.as_ref().map(|s| s.join(sha256)) {
                if shared.is_file() {
                    let mut src = File::open(&shared).map_err(|e| RecipeError::read(&shared, e))?;
                    if let Ok(()) = copy_verified(&mut src, &tmp, sha256, size, &shared.display().to_string()) {
                        return Ok(());
                    }
                }
            }
            if self.offline {
                return Err(RecipeError::Offline {
                    what: format!("sha256:{sha256}"),
                    url: url.to_string(),
                });
            }
            let resp = self
                .client()?
                .get(url)
                .send()
                .and_then(|r| r.error_for_status())
                .map_err(|e| RecipeError::Fetch {
                    url: url.to_string(),
                    reason: crate::store::registry::error_chain(&e),
                })?;
            let mut resp = resp;
            copy_verified(&mut resp, &tmp, sha256, size, url)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(shared) = &self.shared {
            if fs::create_dir_all(shared).is_ok() && !shared.join(sha256).exists() {
                let part = shared.join(format!(".{sha256}.{}", std::process::id()));
                if fs::copy(&tmp, &part).is_ok() {
                    let _ = fs::rename(&part, shared.join(sha256));
                } else {
                    let _ = fs::remove_file(&part);
                }
            }
        }
        fs::rename(&tmp, &dest).map_err(|e| RecipeError::read(&dest, e))?;
        Ok(dest)
    }

    /// The suite's Release, verified when its keyring and `gpgv` are there.
    pub fn release(&self, source: &Source, suite: &str) -> Result<Release, RecipeError> {
        let url = format!("{}/dists/{suite}/InRelease", source.uri);
        let key = hex::encode(Sha256::digest(url.as_bytes()));
        let saved = self.dir.join("releases").join(&key);
        let signed = if self.offline {
            fs::read(&saved).map_err(|_| RecipeError::Offline {
                what: format!("the Release file of {} {suite}", source.uri),
                url: url.clone(),
            })?
        } else {
            let bytes = self
                .client()?
                .get(&url)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .map_err(|e| RecipeError::Fetch {
                    url: url.clone(),
                    reason: crate::store::registry::error_chain(&e),
                })?;
            bytes.to_vec()
        };
        let keyring = source
            .keyring
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING));
        let text = match verify(&signed, &keyring, &self.store, &url)? {
            Verified::Yes(text) => text,
            Verified::Unchecked { text, why } => {
                self.note(format!("{url} was NOT verified: {why}"));
                text
            }
        };
        if !self.offline {
            let tmp = self.store.layout().tmp_path("release");
            fs::write(&tmp, &signed).map_err(|e| RecipeError::read(&tmp, e))?;
            fs::rename(&tmp, &saved).map_err(|e| RecipeError::read(&saved, e))?;
        }
        Ok(Release::parse(&text))
    }

    /// Loads every `Packages` index of `sources` for `arch` into one index. Returns the
    /// index and the newest Release date (the default timestamp of the lock).
    pub fn load_index(
        &self,
        sources: &[Source],
        arch: &str,
    ) -> Result<(PackageIndex, Option<i64>), RecipeError> {
        let mut index = PackageIndex::default();
        let mut newest = None;
        let mut archive = 0;
        for source in sources {
            for suite in &source.suites {
                let release = self.release(source, suite)?;
                newest = newest.max(release.date);
                for component in &source.components {
                    let (path, compression) = ["xz", "gz"]
                        .iter()
                        .map(|ext| (format!("{component}/binary-{arch}/Packages.{ext}"), *ext))
                        .find(|(p, _)| release.sha256.contains_key(p))
                        .ok_or_else(|| RecipeError::BadContent {
                            what: format!("{} {suite}", source.uri),
                            reason: format!("its Release lists no {component}/binary-{arch}/Packages.xz or .gz"),
                        })?;
                    let (sha, size) = release.sha256[&path].clone();
                    let url = if release.by_hash {
                        let dir = path.rsplit_once('/').map(|x| x.0).unwrap_or("");
                        format!("{}/dists/{suite}/{dir}/by-hash/SHA256/{sha}", source.uri)
                    } else {
                        format!("{}/dists/{suite}/{path}", source.uri)
                    };
                    let file = self.fetch(&url, &sha, Some(size))?;
                    let text = decompress_to_string(&file, compression)?;
                    let problems = index.add(&text, archive, arch);
                    if !problems.is_empty() {
                        self.note(format!(
                            "{url}: {} broken entries skipped (first: {})",
                            problems.len(),
                            problems[0]
                        ));
                    }
                    archive += 1;
                }
            }
        }
        Ok((index, newest))
    }
}

fn copy_verified(
    src: &mut dyn Read,
    tmp: &Path,
    sha256: &str,
    size: Option<u64>,
    what: &str,
) -> Result<(), RecipeError> {
    let mut f = File::create(tmp).map_err(|e| RecipeError::read(tmp, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n_total = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| RecipeError::Fetch {
            url: what.to_string(),
            reason: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        if size.is_some_and(|s| n_total > s) {
            return Err(RecipeError::BadContent {
                what: what.to_string(),
                reason: format!("larger than the {} bytes expected", size.unwrap_or(0)),
            });
        }
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).map_err(|e| RecipeError::read(tmp, e))?;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        return Err(RecipeError::BadContent {
            what: what.to_string(),
            reason: format!("sha256 is {actual}, expected {sha256}; nothing was stored"),
        });
    }
    if let Some(s) = size.filter(|&s| s != n_total) {
        return Err(RecipeError::BadContent {
            what: what.to_string(),
            reason: format!("{n_total} bytes, expected {s}"),
        });
    }
    f.sync_all().map_err(|e| RecipeError::read(tmp, e))?;
    Ok(())
}

fn decompress_to_string(path: &Path, compression: &str) -> Result<String, RecipeError> {
    let f = io::BufReader::new(File::open(path).map_err(|e| RecipeError::read(path, e))?);
    let mut r: Box<dyn Read> = match compression {
        "xz" => Box::new(lzma_rust2::XzReader::new(f, true)),
        _ => Box::new(flate2::read::MultiGzDecoder::new(f)),
    };
    let mut s = String::new();
    r.read_to_string(&mut s).map_err(|e| RecipeError::BadContent {
        what: path.display().to_string(),
        reason: format!("decompressing: {e}"),
    })?;
    Ok(s)
}

enum Verified {
    Yes(String),
    Unchecked { text: String, why: String },
}

/// Checks the clearsigned `InRelease` with `gpgv` and returns exactly the signed text.
/// Without the keyring or `gpgv` the text is taken unverified (the caller says so).
fn verify(signed: &[u8], keyring: &Path, store: &Store, url: &str) -> Result<Verified, RecipeError> {
    if !keyring.is_file() {
        return Ok(Verified::Unchecked {
            text: strip_clearsign(signed),
            why: format!("the keyring {} is not on this host", keyring.display()),
        });
    }
    let input = store.layout().tmp_path("inrelease");
    fs::write(&input, signed).map_err(|e| RecipeError::read(&input, e))?;
    let out = Command::new("gpgv")
        .arg("--keyring")
        .arg(keyring)
        .arg("--output")
        .arg("-")
        .arg(&input)
        .output();
    let _ = fs::remove_file(&input);
    match out {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Verified::Unchecked {
            text: strip_clearsign(signed),
            why: "gpgv is not installed (Debian package gpgv)".into(),
        }),
        Err(e) => Err(RecipeError::BadContent {
            what: url.to_string(),
            reason: format!("running gpgv: {e}"),
        }),
        Ok(o) if o.status.success() => Ok(Verified::Yes(String::from_utf8_lossy(&o.stdout).into_owned())),
        Ok(o) => Err(RecipeError::BadContent {
            what: url.to_string(),
            reason: format!(
                "signature check with {} failed: {}",
                keyring.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        }),
    }
}

/// The body of a clearsigned message (RFC 4880 7.1), dash-escaping undone.
fn strip_clearsign(signed: &[u8]) -> String {
    let text = String::from_utf8_lossy(signed);
    let Some(start) = text.find("-----BEGIN PGP SIGNED MESSAGE-----") else {
        return text.into_owned();
    };
    let body = &text[start..];
    let body = body.split_once("\n\n").map(|x| x.1).unwrap_or("");
    let body = body
        .split("\n-----BEGIN PGP SIGNATURE-----")
        .next()
        .unwrap_or("");
    body.lines()
        .map(|l| l.strip_prefix("- ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The host's configured Debian sources (`/etc/apt/sources.list.d/*.sources` in deb822
/// form, and one-line `deb` entries in `/etc/apt/sources.list` and `*.list`).
pub fn host_sources() -> Vec<Source> {
    host_sources_in(Path::new("/etc/apt"))
}

fn host_sources_in(apt: &Path) -> Vec<Source> {
    let mut out: Vec<Source> = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(apt.join("sources.list.d"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.insert(0, apt.join("sources.list"));
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else { continue };
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".sources") {
            for para in text.split("\n\n") {
                let mut fields = std::collections::HashMap::new();
                for line in para.lines().filter(|l| !l.starts_with('#')) {
                    if let Some((k, v)) = line.split_once(':') {
                        fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let words = |k: &str| -> Vec<String> {
                    fields
                        .get(k)
                        .map(|v| v.split_whitespace().map(str::to_string).collect())
                        .unwrap_or_default()
                };
                if !words("types").iter().any(|t| t == "deb") || fields.get("enabled").is_some_and(|e| e == "no") {
                    continue;
                }
                for uri in words("uris") {
                    out.push(Source {
                        uri: uri.trim_end_matches('/').to_string(),
                        suites: words("suites"),
                        components: words("components"),
                        keyring: fields.get("signed-by").filter(|k| k.starts_with('/')).map(PathBuf::from),
                    });
                }
            }
        } else if name == "sources.list" || name.ends_with(".list") {
            for line in text.lines() {
                let mut w: Vec<&str> = line.split_whitespace().collect();
                if w.first() != Some(&"deb") {
                    continue;
                }
                w.remove(0);
                let mut keyring = None;
                if w.first().is_some_and(|o| o.starts_with('[')) {
                    let opts: Vec<&str> = w.iter().take_while(|o| !o.starts_with("http")).copied().collect();
                    for o in &opts {
                        if let Some(k) = o.trim_matches(['[', ']']).strip_prefix("signed-by=") {
                            keyring = Some(PathBuf::from(k));
                        }
                    }
                    w.drain(..opts.len());
                }
                if w.len() >= 3 {
                    out.push(Source {
                        uri: w[0].trim_end_matches('/').to_string(),
                        suites: vec![w[1].to_string()],
                        components: w[2..].iter().map(|s| s.to_string()).collect(),
                        keyring,
                    });
                }
            }
        }
    }
    // Only Debian-shaped archives over HTTP (not file:, cdrom:, or ppa's without Release).
    out.retain(|s| s.uri.starts_with("http://") || s.uri.starts_with("https://"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearsigned_body() {
        let s = b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\n- -dashed\nDate: x\n-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n";
        assert_eq!(strip_clearsign(s), "Origin: Debian\n-dashed\nDate: x");
    }

    #[test]
    fn apt_sources_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
        fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb-src\nURIs: http://x\nSuites: y\nComponents: main\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("sources.list"),
            "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://security.debian.org/debian-security/ bookworm-security main contrib\ndeb cdrom:[x]/ bookworm main\n",
        )
        .unwrap();
        let s = host_sources_in(dir.path());
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uri, "http://security.debian.org/debian-security");
        assert_eq!(s[0].keyring.as_deref(), Some(Path::new("/k.gpg")));
        assert_eq!(s[0].components, ["main", "contrib"]);
        assert_eq!(s[1].suites, ["bookworm", "bookworm-updates"]);
    }
}
