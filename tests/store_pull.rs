//! End-to-end: the real `sandrun` binary pulling test images (built offline from
//! busybox-static with umoci, pushed with skopeo) from a real loopback registry.

mod prereq;
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

/// busybox (one layer, image "1" of the builder) pushed as `<registry>/test/<repo>:1`.
fn pushed_busybox(reg: &Registry, repo: &str) -> (ImageBuilder, String) {
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    let reference = format!("{}/test/{repo}:1", reg.addr);
    b.push("1", &reference, &[]);
    (b, reference)
}

#[test]
fn pull_busybox_store_is_an_oci_layout() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let (_b, reference) = pushed_busybox(&reg, "busybox");

    let home = Home::new();
    let out = home.ok(&["pull", &reference]);
    assert!(out.contains("pulled"), "{out}");
    // Private: other users reach no setuid binary or device node of an image.
    let mode = std::fs::metadata(home.path()).unwrap().mode();
    assert_eq!(mode & 0o777, 0o700, "store mode {mode:o}");
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
        prereq::missing("the test index is built for an amd64 host");
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
    if !tools_present()
        || !prereq::require(
            registry::have("htpasswd"),
            "`htpasswd` is not installed (Debian package: apache2-utils)",
        )
    {
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

/// A pipeline file naming `images` in Run steps.
fn pipeline_with(dir: &Path, images: &[&str]) -> PathBuf {
    let mut steps = String::new();
    for (i, img) in images.iter().enumerate() {
        steps.push_str(&format!(
            "                - step:\n                    type: Run\n                    name: s{i}\n                    identifier: s{i}\n                    spec:\n                      image: {img}\n                      shell: Sh\n                      command: \"true\"\n"
        ));
    }
    let text = format!(
        "pipeline:\n  name: p\n  identifier: p\n  projectIdentifier: x\n  orgIdentifier: default\n  stages:\n    - stage:\n        name: build\n        identifier: build\n        type: CI\n        spec:\n          cloneCodebase: false\n          platform:\n            os: Linux\n            arch: Amd64\n          runtime:\n            type: Docker\n            spec: {{}}\n          execution:\n            steps:\n{steps}"
    );
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn lock_save_load_gc_fsck() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    b.add_layer("1", "2", |root| {
        std::fs::write(root.join("v2"), b"two").unwrap()
    });
    let one = format!("{}/test/app:1", reg.addr);
    let two = format!("{}/test/app:2", reg.addr);
    b.push("1", &one, &[]);
    b.push("2", &two, &[]);

    let work = tempfile::tempdir().unwrap();
    let pipeline = pipeline_with(work.path(), &[&one, &two]);
    let home = Home::new();
    let out = home.ok(&["lock", pipeline.to_str().unwrap()]);
    assert!(out.contains("2 images"), "{out}");
    let lock_text = std::fs::read_to_string(work.path().join("pipeline.yaml.lock")).unwrap();
    let (d1, _, _) = b.descriptor("1");
    assert!(lock_text.contains(&d1), "{lock_text}");
    // Deterministic: locking again writes the same bytes.
    home.ok(&["lock", pipeline.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(work.path().join("pipeline.yaml.lock")).unwrap(),
        lock_text
    );

    // Retag :1 at the registry: the lock still pins the old manifest.
    b.push("2", &one, &[]);
    home.ok(&["pull", "-f", pipeline.to_str().unwrap()]);
    let idx = home.index();
    let entry = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == one.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["digest"], d1.as_str(), "pull -f ignored the lock pin");

    // save -> load into an empty store, fully offline.
    let archive = work.path().join("images.tar");
    home.ok(&[
        "--offline",
        "save",
        "-o",
        archive.to_str().unwrap(),
        pipeline.to_str().unwrap(),
    ]);
    let inspect = registry::run(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}:{two}", archive.display())),
    );
    assert!(inspect.contains("amd64"), "{inspect}");
    let airgapped = Home::new();
    let out = airgapped.ok(&["load", archive.to_str().unwrap()]);
    assert!(out.contains(&one) && out.contains(&two), "{out}");
    airgapped.ok(&["--offline", "pull", &one, &two]);
    assert!(airgapped.layers(&two)[1].join("v2").exists());
    let listing = airgapped.ok(&["images"]);
    assert!(
        listing.contains(&one) && listing.contains(&two),
        "{listing}"
    );

    // gc keeps everything referenced; fsck finds nothing wrong.
    let out = home.ok(&["gc"]);
    assert!(out.contains("removed 0 blobs"), "{out}");
    let out = home.ok(&["fsck"]);
    assert!(out.contains("0 problems"), "{out}");

    // Damage a layer and a blob: fsck says what and where, --repair removes them,
    // the next pull restores them.
    let layers = home.layers(&two);
    std::fs::write(layers[1].join("v2"), b"tampered").unwrap();
    let bad = home.run(&["fsck"]);
    let text = String::from_utf8_lossy(&bad.stdout).to_string();
    assert!(!bad.status.success(), "{text}");
    assert!(text.contains("v2 differs"), "{text}");
    home.ok(&["fsck", "--repair"]);
    home.ok(&["pull", &two]);
    assert_eq!(
        std::fs::read(home.layers(&two)[1].join("v2")).unwrap(),
        b"two"
    );
    home.ok(&["fsck"]);
}

/// An image with one ~24 MiB incompressible layer (slow enough to interrupt through a
/// throttled proxy) on top of busybox.
fn big_image(reg: &Registry, name: &str) -> (ImageBuilder, String) {
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    b.add_layer("1", "big", |root| {
        std::fs::write(root.join("noise"), registry::noise(24 << 20, 7)).unwrap()
    });
    let reference = format!("{}/test/{name}:1", reg.addr);
    b.push("big", &reference, &[]);
    (b, reference)
}

fn layer_digests(b: &ImageBuilder, tag: &str) -> Vec<String> {
    let (m, _, _) = b.descriptor(tag);
    let manifest: serde_json::Value = serde_json::from_slice(&b.blob(&m)).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

fn store_blobs(home: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Layer blobs are requested by sandrun itself (not through oci-client): a blob the
/// registry does not have is said as such, naming it, and nothing enters the store.
#[test]
fn blob_missing_at_the_registry_is_named() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let (b, reference) = pushed_busybox(&reg, "missing");
    let layer = layer_digests(&b, "1")[0].clone();
    std::fs::remove_file(reg.blob_file(&layer)).unwrap();

    let home = Home::new();
    let out = home.run(&["pull", &reference]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("blob {layer} not found")),
        "error does not say which blob is missing: {err}"
    );
    assert!(!home.path().join("blobs/sha256").join(&layer[7..]).exists());
}

#[test]
fn tampered_blob_never_enters_the_store() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let (b, reference) = pushed_busybox(&reg, "tampered");
    let layer = layer_digests(&b, "1")[0].clone();
    // Same size, one byte changed.
    let file = reg.blob_file(&layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let home = Home::new();
    let out = home.run(&["pull", &reference]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&layer), "error does not name the blob: {err}");
    assert!(!home.path().join("blobs/sha256").join(&layer[7..]).exists());
    assert!(std::fs::read_dir(home.path().join("layers/sha256"))
        .unwrap()
        .next()
        .is_none());
    assert!(
        std::fs::read_dir(home.path().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "temp files left"
    );
    assert!(home.index()["manifests"].as_array().unwrap().is_empty());
}

#[test]
fn registry_killed_mid_pull_then_resume() {
    if !tools_present() {
        return;
    }
    let mut reg = Registry::start();
    let (b, reference) = big_image(&reg, "killed");
    let layers = layer_digests(&b, "big");
    let proxy = registry::Proxy::start(&reg.addr, Some(std::time::Duration::from_millis(20)));
    let via_proxy = reference.replacen(&reg.addr, &proxy.addr, 1);

    let home = Home::new();
    let child = home
        .sandrun()
        .args(["pull", &via_proxy])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the big layer to start", || {
        proxy.bytes_down.load(std::sync::atomic::Ordering::Relaxed) > 4 << 20
    });
    reg.kill();
    proxy.cut();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "pull succeeded with the registry dead: {err}"
    );
    assert!(err.contains(&proxy.addr), "{err}");
    // Nothing partial in the store; what was verified stays.
    assert!(!home
        .path()
        .join("blobs/sha256")
        .join(&layers[1][7..])
        .exists());
    assert!(home.index()["manifests"].as_array().unwrap().is_empty());
    let small_kept = home
        .path()
        .join("blobs/sha256")
        .join(&layers[0][7..])
        .exists();
    let fsck = home.ok(&["fsck"]);
    assert!(fsck.contains("0 problems"), "{fsck}");

    // The registry is back: the pull completes, fetching only what is missing.
    reg.restart();
    proxy.uncut();
    let before = proxy.blob_gets.lock().unwrap().len();
    home.ok(&["pull", &via_proxy]);
    let small_again = proxy.blob_gets.lock().unwrap()[before..]
        .iter()
        .filter(|p| p.ends_with(&layers[0]))
        .count();
    if small_kept {
        assert_eq!(small_again, 0, "a verified blob was downloaded again");
    } else {
        eprintln!("note: the small layer had not finished before the kill");
    }
    assert_eq!(
        std::fs::read(home.layers(&via_proxy)[1].join("noise"))
            .unwrap()
            .len(),
        24 << 20
    );
}

/// Starts `sandrun pull` of a big image through a slow proxy and SIGKILLs it once
/// bytes flow; returns the proxied reference and the killed pull's pid (its temp files
/// are in `tmp/`).
fn killed_pull(reg: &Registry, home: &Home, name: &str) -> (registry::Proxy, String, u32) {
    let (_b, reference) = big_image(reg, name);
    let proxy = registry::Proxy::start(&reg.addr, Some(std::time::Duration::from_millis(20)));
    let via_proxy = reference.replacen(&reg.addr, &proxy.addr, 1);
    let mut child = home
        .sandrun()
        .args(["pull", &via_proxy])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("bytes to flow", || {
        proxy.bytes_down.load(std::sync::atomic::Ordering::Relaxed) > 4 << 20
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    assert!(
        std::fs::read_dir(home.path().join("tmp"))
            .unwrap()
            .next()
            .is_some(),
        "expected an interrupted write in tmp/"
    );
    (proxy, via_proxy, child.id())
}

#[test]
fn sigkill_mid_pull_then_fsck_and_pull() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let home = Home::new();
    let (_proxy, via_proxy, _) = killed_pull(&reg, &home, "sigkill");
    let out = home.ok(&["fsck"]);
    assert!(
        out.contains("0 problems") && out.contains("removed"),
        "{out}"
    );
    assert!(std::fs::read_dir(home.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    home.ok(&["pull", &via_proxy]);
    home.ok(&["fsck"]);
}

/// The next pull removes what a killed one left in `tmp/`, without `fsck` or `gc`.
#[test]
fn the_next_pull_sweeps_a_killed_pulls_temp_files() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let home = Home::new();
    let (_proxy, _, killed) = killed_pull(&reg, &home, "swept");
    let (_b, other) = pushed_busybox(&reg, "other");
    home.ok(&["pull", &other]);
    let left: Vec<String> = std::fs::read_dir(home.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{killed}-")))
        .collect();
    assert!(left.is_empty(), "temp files of the killed pull: {left:?}");
}

#[test]
fn eight_concurrent_pulls_download_each_blob_once() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.busybox("1", "amd64");
    b.add_layer("1", "2", |root| {
        std::fs::write(root.join("more"), registry::noise(4 << 20, 3)).unwrap()
    });
    let reference = format!("{}/test/concurrent:1", reg.addr);
    b.push("2", &reference, &[]);
    let proxy = registry::Proxy::start(&reg.addr, Some(std::time::Duration::from_millis(2)));
    let via_proxy = reference.replacen(&reg.addr, &proxy.addr, 1);
    let home = Home::new();
    let children: Vec<_> = (0..8)
        .map(|_| {
            home.sandrun()
                .args(["pull", &via_proxy])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in layer_digests(&b, "2") {
        assert_eq!(proxy.gets_of(&d), 1, "layer {d} downloaded more than once");
    }
    assert_eq!(store_blobs(&home).len(), 4, "manifest, config, 2 layers");
    home.ok(&["fsck"]);
}

#[path = "support/mod.rs"]
mod e2e;

/// Rootless for real: `sandrun pull` as the unprivileged test user unpacks inside its
/// user namespace, so a file the image gives to uid 1000 belongs on disk to the user's
/// subordinate uid for 1000, and the user can gc its own store.
#[test]
fn rootless_pull_keeps_owners_through_subuids() {
    if !tools_present() {
        return;
    }
    if !e2e::is_root() || e2e::test_user().is_none() {
        prereq::missing(
            "needs root to build an image with owned files and the `sandrun-test` user",
        );
        return;
    }
    let reg = Registry::start();
    let b = ImageBuilder::new();
    b.new_image("owned", "amd64", |root| {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        std::fs::create_dir_all(root.join("home/app")).unwrap();
        std::fs::write(root.join("home/app/data"), b"d").unwrap();
        std::os::unix::fs::chown(root.join("home/app"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(root.join("home/app/data"), Some(1000), Some(1000)).unwrap();
    });
    let reference = format!("{}/test/owned:1", reg.addr);
    b.push("owned", &reference, &[]);

    let sb = e2e::Sandbox::new(e2e::Mode::Rootless);
    let out = sb.command(["pull", &reference]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let store = sb.home().join("store");
    let idx = std::fs::read_to_string(store.join("index.json")).unwrap();
    assert!(idx.contains("test/owned:1"), "{idx}");
    let layers: Vec<PathBuf> = std::fs::read_dir(store.join("layers/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path().join("rootfs"))
        .collect();
    assert_eq!(layers.len(), 1);
    let (uid, _) = e2e::test_user().unwrap();
    let data = std::fs::metadata(layers[0].join("home/app/data")).unwrap();
    let mapped = e2e::subordinate_id(e2e::TEST_USER);
    match mapped {
        Some(start) => assert_eq!(
            data.uid(),
            start + 999,
            "uid 1000 inside should be subuid start + 999"
        ),
        None => assert_eq!(data.uid(), uid),
    }
    assert_eq!(
        std::fs::metadata(layers[0].join("bin/busybox"))
            .unwrap()
            .uid(),
        uid,
        "root-owned files belong to the user"
    );
    // The user can remove what it unpacked (gc inside the same namespace).
    let out = sb.command(["fsck"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_file(store.join("index.json")).unwrap();
    let out = sb.command(["gc"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_dir(store.join("layers/sha256"))
        .unwrap()
        .next()
        .is_none());
}
