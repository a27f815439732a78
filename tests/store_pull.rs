//! End-to-end: the real `sandrun` binary pulling test images (built offline from
//! busybox-static with umoci, pushed with skopeo) from a real loopback registry.

#[path = "support/registry.rs"]
mod registry;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use registry::{tools_present, ImageBuilder, Registry};

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn sandrun(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sandrun"));
        c.env("SANDRUN_HOME", self.path())
            .env("DOCKER_CONFIG", self.path().join("no-docker-config"))
            .env("REGISTRY_AUTH_FILE", self.path().join("no-auth.json"));
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.sandrun().args(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "sandrun {args:?} failed:\n{text}");
        text
    }
    fn index(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.path().join("index.json")).unwrap()).unwrap()
    }
    /// Unpacked layer dirs of `reference`, lowest first (from the stored manifest/config).
    fn layers(&self, reference: &str) -> Vec<PathBuf> {
        let idx = self.index();
        let m = idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
            .unwrap_or_else(|| panic!("{reference} not in index.json: {idx}"));
        let blob = |d: &str| std::fs::read(self.path().join("blobs/sha256").join(&d[7..])).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                self.path()
                    .join("layers/sha256")
                    .join(&d.as_str().unwrap()[7..])
                    .join("rootfs")
            })
            .collect()
    }
}

#[test]
fn pull_busybox_store_is_an_oci_layout() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    let reference = format!("{}/test/busybox:1", reg.addr);
    b.push("1", &reference, &[]);

    let home = Home::new();
    let out = home.ok(&["pull", &reference]);
    assert!(out.contains("pulled"), "{out}");
    let layers = home.layers(&reference);
    assert_eq!(layers.len(), 1);
    let bb = layers[0].join("bin/busybox");
    assert_eq!(
        std::fs::read(&bb).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::read_link(layers[0].join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(std::fs::metadata(&bb).unwrap().mode() & 0o111 != 0);

    // skopeo reads the store as an OCI layout.
    let inspect = registry::run(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{reference}", home.path().display())),
    );
    assert!(inspect.contains("\"Architecture\": \"amd64\""), "{inspect}");

    // Warm: present, no download.
    let out = home.ok(&["pull", &reference]);
    assert!(out.contains("present"), "{out}");
    // --offline with the image present works; an absent one fails clearly.
    home.ok(&["--offline", "pull", &reference]);
    let absent = home.run(&["--offline", "pull", &format!("{}/test/absent:1", reg.addr)]);
    assert!(!absent.status.success());
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("--offline"),
        "{absent:?}"
    );
}

#[test]
fn multi_layer_whiteouts_and_hardlinks() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.new_image("ml", "amd64", |root| {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("etc/gone.d")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        std::fs::write(root.join("etc/removed"), b"old").unwrap();
        std::fs::write(root.join("etc/kept"), b"kept").unwrap();
        std::fs::write(root.join("etc/gone.d/x"), b"x").unwrap();
        std::fs::write(root.join("etc/replaced"), b"file").unwrap();
    });
    b.add_layer("ml", "ml", |root| {
        std::fs::remove_file(root.join("etc/removed")).unwrap();
        std::fs::remove_dir_all(root.join("etc/gone.d")).unwrap();
        std::fs::remove_file(root.join("etc/replaced")).unwrap();
        std::fs::create_dir(root.join("etc/replaced")).unwrap();
        std::fs::write(root.join("etc/replaced/inside"), b"i").unwrap();
        // A hardlink within the layer, and one to a file of the lower layer.
        std::fs::write(root.join("etc/a"), b"linked").unwrap();
        std::fs::hard_link(root.join("etc/a"), root.join("etc/b")).unwrap();
        std::fs::hard_link(root.join("bin/busybox"), root.join("bin/sh")).unwrap();
    });
    let reference = format!("{}/test/multilayer:1", reg.addr);
    b.push("ml", &reference, &[]);

    let home = Home::new();
    home.ok(&["pull", &reference]);
    let layers = home.layers(&reference);
    assert_eq!(layers.len(), 2);
    let upper = &layers[1];
    for gone in ["etc/removed", "etc/gone.d"] {
        let m = std::fs::symlink_metadata(upper.join(gone)).unwrap();
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "{gone} is not a whiteout"
        );
    }
    assert!(upper.join("etc/replaced").is_dir());
    assert!(!std::fs::read_dir(upper.join("etc")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".wh.")));
    let a = std::fs::metadata(upper.join("etc/a")).unwrap();
    let bm = std::fs::metadata(upper.join("etc/b")).unwrap();
    assert_eq!(a.ino(), bm.ino());
    // The cross-layer hardlink: bin/busybox lives in the lower layer; the upper
    // layer must still provide bin/sh with its content.
    let sh = upper.join("bin/sh");
    assert_eq!(
        std::fs::read(&sh).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(std::fs::read(layers[0].join("etc/kept")).unwrap(), b"kept");
}

#[test]
fn multi_arch_index_resolves_this_platform() {
    if !tools_present() {
        return;
    }
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the test index is built for an amd64 host");
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.busybox("amd", "amd64");
    b.new_image("armv7", "arm", |root| {
        std::fs::write(root.join("arch"), b"armv7").unwrap()
    });
    b.new_image("arm64", "arm64", |root| {
        std::fs::write(root.join("arch"), b"arm64").unwrap()
    });
    let index_digest = b.index(
        "multi",
        &[
            ("armv7", "arm", Some("v7")),
            ("amd", "amd64", None),
            ("arm64", "arm64", Some("v8")),
        ],
    );
    let reference = format!("{}/test/multi:1", reg.addr);
    b.push("multi", &reference, &["--all"]);
    let (amd_digest, _, _) = b.descriptor("amd");

    let home = Home::new();
    home.ok(&["pull", &reference]);
    let idx = home.index();
    let entry = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["digest"], amd_digest.as_str());
    assert_eq!(
        entry["annotations"]["io.github.sandrun.index.digest"],
        index_digest.as_str()
    );
    assert!(home.layers(&reference)[0].join("bin/busybox").exists());
}

#[test]
fn zstd_layers() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.busybox("z", "amd64");
    let reference = format!("{}/test/zstd:1", reg.addr);
    b.push(
        "z",
        &reference,
        &["--dest-compress-format", "zstd", "--dest-compress"],
    );
    let raw = registry::run(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}")),
    );
    assert!(
        raw.contains("tar+zstd"),
        "skopeo did not write zstd layers: {raw}"
    );
    let home = Home::new();
    home.ok(&["pull", &reference]);
    assert_eq!(
        std::fs::read(home.layers(&reference)[0].join("bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
}

#[test]
fn basic_auth_from_docker_config() {
    if !tools_present() || !registry::have("htpasswd") {
        return;
    }
    let reg = Registry::start_with_auth("tester", "s3cret-pw");
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    let reference = format!("{}/private/busybox:1", reg.addr);
    b.push("1", &reference, &["--dest-creds", "tester:s3cret-pw"]);

    let home = Home::new();
    let denied = home.run(&["pull", &reference]);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr).to_string();
    assert!(err.contains(&reg.addr), "{err}");

    let cfg = home.path().join("docker");
    std::fs::create_dir_all(&cfg).unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("tester:s3cret-pw");
    std::fs::write(
        cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let out = home
        .sandrun()
        .env("DOCKER_CONFIG", &cfg)
        .args(["pull", &reference])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("s3cret-pw") && !text.contains(&auth),
        "credentials printed: {text}"
    );
}
