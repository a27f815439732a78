//! Real registries and real images for the store's tests: Debian's `docker-registry`
//! (distribution 2.8) on 127.0.0.1 with an ephemeral port and a temporary root (config
//! written here, never /etc/docker/registry/config.yml), optionally with htpasswd auth;
//! test images built offline from /bin/busybox (busybox-static) with umoci and pushed
//! with skopeo; and a TCP proxy that can throttle, count blob requests and cut streams.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True when docker-registry, umoci and skopeo are installed; prints why not otherwise.
pub fn tools_present() -> bool {
    for t in ["docker-registry", "umoci", "skopeo"] {
        if !crate::prereq::require(
            have(t),
            format!("`{t}` is not installed (Debian package: {t})"),
        ) {
            return false;
        }
    }
    crate::prereq::require(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing (Debian package: busybox-static)",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `docker-registry serve`.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    /// With htpasswd (bcrypt) basic auth for one user.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, password]));
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, line.trim()).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: sandrun-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let mut r = Registry {
            child: None,
            addr,
            dir,
            config: cfg,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the registry process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address with the same storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The file holding a blob in the registry's storage (to tamper with it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An OCI layout directory where test images are built with umoci.
pub struct ImageBuilder {
    pub dir: tempfile::TempDir,
    pub layout: PathBuf,
}

fn umoci_unpack_args() -> Vec<&'static str> {
    if nix::unistd::geteuid().is_root() {
        vec![]
    } else {
        vec!["--rootless"]
    }
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
        ImageBuilder { dir, layout }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.layout.display())
    }

    /// A new image `tag` whose one layer is what `fill` puts into the rootfs.
    pub fn new_image(&self, tag: &str, arch: &str, fill: impl FnOnce(&Path)) {
        run(Command::new("umoci").args(["new", "--image", &self.image(tag)]));
        run(Command::new("umoci").args([
            "config",
            "--image",
            &self.image(tag),
            "--architecture",
            arch,
            "--os",
            "linux",
            "--config.cmd",
            "/bin/sh",
        ]));
        self.add_layer(tag, tag, fill);
    }

    /// Unpacks `from`, lets `change` edit the rootfs, repacks as `to` (one more layer).
    pub fn add_layer(&self, from: &str, to: &str, change: impl FnOnce(&Path)) {
        let bundle = self
            .dir
            .path()
            .join(format!("bundle-{to}-{}", rand_suffix()));
        let mut args = vec!["unpack"];
        args.extend(umoci_unpack_args());
        run(Command::new("umoci")
            .args(&args)
            .args(["--image", &self.image(from)])
            .arg(&bundle));
        change(&bundle.join("rootfs"));
        if from != to {
            run(Command::new("umoci").args(["tag", "--image", &self.image(from), to]));
        }
        run(Command::new("umoci")
            .args(["repack", "--refresh-bundle", "--image", &self.image(to)])
            .arg(&bundle));
        let _ = std::fs::remove_dir_all(&bundle);
    }

    /// The busybox image: /bin/busybox and /bin/sh -> busybox.
    pub fn busybox(&self, tag: &str, arch: &str) {
        self.new_image(tag, arch, |root| {
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
            std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        });
    }

    /// Pushes `tag` to `registry/repo` with skopeo (`extra` args e.g. zstd, creds).
    pub fn push(&self, tag: &str, dest: &str, extra: &[&str]) {
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci:{}", self.image(tag)))
            .arg(format!("docker://{dest}")));
    }

    /// Manifest descriptor (digest, size) of `tag` in the layout's index.json.
    pub fn descriptor(&self, tag: &str) -> (String, u64, String) {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.layout.join("index.json")).unwrap())
                .unwrap();
        let m = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap_or_else(|| panic!("tag {tag} not in layout"));
        (
            m["digest"].as_str().unwrap().to_string(),
            m["size"].as_u64().unwrap(),
            m["mediaType"]
                .as_str()
                .unwrap_or("application/vnd.oci.image.manifest.v1+json")
                .to_string(),
        )
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(
            self.layout
                .join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
    }

    /// Writes `bytes` as a blob of the layout; returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(self.layout.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
        digest
    }

    /// Names the blob `digest` `tag` in the layout's index.json.
    fn name(&self, tag: &str, media: &str, digest: &str, size: usize) {
        let path = self.layout.join("index.json");
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        if !index["manifests"].is_array() {
            index["manifests"] = serde_json::json!([]);
        }
        index["manifests"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "mediaType": media,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }));
        std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// An image `tag` for this machine's architecture made of hand-built layers, each
    /// (gzip blob, diffID): for layers no tool would write (GNU sparse entries, bombs).
    pub fn raw_image(&self, tag: &str, layers: &[(Vec<u8>, String)]) {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| d).collect::<Vec<_>>()},
        }))
        .unwrap();
        let config_digest = self.put_blob(&config);
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|(blob, _)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": self.put_blob(blob),
                    "size": blob.len(),
                })
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .unwrap();
        let digest = self.put_blob(&manifest);
        self.name(
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &digest,
            manifest.len(),
        );
    }

    /// Writes an index `tag` listing the given (tag, arch, variant) images.
    pub fn index(&self, tag: &str, members: &[(&str, &str, Option<&str>)]) -> String {
        let manifests: Vec<serde_json::Value> = members
            .iter()
            .map(|(t, arch, variant)| {
                let (digest, size, media) = self.descriptor(t);
                let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                serde_json::json!({"mediaType": media, "digest": digest, "size": size, "platform": platform})
            })
            .collect();
        let idx = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        let digest = self.put_blob(&idx);
        self.name(
            tag,
            "application/vnd.oci.image.index.v1+json",
            &digest,
            idx.len(),
        );
        digest
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A loopback TCP proxy in front of a registry: counts blob GETs, can throttle the
/// registry's responses and can be told to cut every connection.
pub struct Proxy {
    pub addr: String,
    pub blob_gets: Arc<Mutex<Vec<String>>>,
    pub bytes_down: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// `throttle`: pause this long after each 64 KiB sent to the client.
    pub fn start(upstream: &str, throttle: Option<Duration>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blob_gets = Arc::new(Mutex::new(Vec::new()));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, b, c, s, up) = (
            blob_gets.clone(),
            bytes_down.clone(),
            cut.clone(),
            stop.clone(),
            upstream.to_string(),
        );
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&up) else {
                            continue;
                        };
                        let (g, b, c) = (g.clone(), b.clone(), c.clone());
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let cut_up = c.clone();
                        // client -> server: watch request lines.
                        std::thread::spawn(move || {
                            let (mut from, mut to) = (c2, s2);
                            let mut buf = vec![0u8; 16 << 10];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if cut_up.load(Ordering::Relaxed) {
                                    break;
                                }
                                let text = String::from_utf8_lossy(&buf[..n]);
                                for line in text
                                    .lines()
                                    .filter(|l| l.starts_with("GET ") && l.contains("/blobs/"))
                                {
                                    g.lock().unwrap().push(
                                        line.split_whitespace().nth(1).unwrap_or("").to_string(),
                                    );
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                        // server -> client: throttle, count, cut.
                        std::thread::spawn(move || {
                            let (mut from, mut to) = (server, client);
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if c.load(Ordering::Relaxed) || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                b.fetch_add(n as u64, Ordering::Relaxed);
                                if let Some(t) = throttle {
                                    std::thread::sleep(t);
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            addr,
            blob_gets,
            bytes_down,
            cut,
            stop,
        }
    }

    /// Breaks every open connection (and every later one) mid-stream.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    pub fn uncut(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }

    /// Blob GETs seen for `digest`.
    pub fn gets_of(&self, digest: &str) -> usize {
        self.blob_gets
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.ends_with(digest))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut.store(true, Ordering::Relaxed);
    }
}

/// Incompressible bytes (a seeded xorshift), for layers whose transfer takes time.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
