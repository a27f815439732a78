//! End-to-end: layers built to fill the disk, pulled by the real `sandrun` binary from
//! a loopback registry, as root and rootless. Each layer is generated here (tar and
//! gzip written by hand, since no image tool writes them) and pushed with skopeo.
//! A layer is charged for the bytes it writes, against a cap proportional to its
//! compressed size (or `--layer-size-limit`), and is refused with a message naming the
//! layer and the limit.

#[path = "support/registry.rs"]
mod registry;

#[path = "support/mod.rs"]
mod e2e;
mod prereq;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use registry::{tools_present, ImageBuilder, Registry};
use sha2::Digest;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(tar)))
}

fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_mtime(1_000_000);
    h.set_size(size);
    h
}

/// A layer of one GNU sparse file `name` declaring `real_size` bytes, whose only data
/// is one block of 0x55 at the middle.
fn sparse_layer(name: &str, real_size: u64) -> (Vec<u8>, String) {
    let mut h = header(name, tar::EntryType::GNUSparse, 512);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(real_size);
    gnu.sparse[0].set_offset(real_size / 2);
    gnu.sparse[0].set_length(512);
    gnu.sparse[1].set_offset(real_size);
    gnu.sparse[1].set_length(0);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0x55; 512]);
    tar.extend_from_slice(&[0; 1024]);
    (gzip(&tar), diff_id(&tar))
}

/// Pushes an image of `layers` as `<registry>/test/<repo>:1`.
fn push(reg: &Registry, repo: &str, layers: &[(Vec<u8>, String)]) -> (String, Vec<String>) {
    let b = ImageBuilder::new();
    b.raw_image("1", layers);
    let reference = format!("{}/test/{repo}:1", reg.addr);
    b.push("1", &reference, &[]);
    let digests = layers
        .iter()
        .map(|(blob, _)| format!("sha256:{}", hex::encode(sha2::Sha256::digest(blob))))
        .collect();
    (reference, digests)
}

fn pull(sb: &e2e::Sandbox, args: &[&str]) -> (bool, String) {
    let out = sb.command(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn layer_dir(sb: &e2e::Sandbox, diff_id: &str) -> PathBuf {
    sb.home()
        .join("store/layers/sha256")
        .join(&diff_id[7..])
        .join("rootfs")
}

fn no_layers_left(sb: &e2e::Sandbox) {
    let store = sb.home().join("store");
    for dir in ["layers/sha256", "tmp"] {
        if let Ok(mut d) = std::fs::read_dir(store.join(dir)) {
            assert!(d.next().is_none(), "{dir} is not empty after a refusal");
        }
    }
}

#[test]
fn sparse_entry_declaring_2gib_is_refused_or_kept_sparse() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let huge = sparse_layer("huge", 2 << 30);
    assert!(huge.0.len() < 200, "{} bytes", huge.0.len());
    let (reference, digests) = push(&reg, "sparse", std::slice::from_ref(&huge));
    let small = sparse_layer("var/log/lastlog", 256 << 20);
    let (reference2, _) = push(&reg, "sparse-ok", std::slice::from_ref(&small));
    for mode in e2e::modes() {
        let sb = e2e::Sandbox::new(mode);
        let (ok, text) = pull(&sb, &["pull", &reference]);
        assert!(
            !ok,
            "{mode:?}: a 2 GiB sparse file from a tiny layer was accepted"
        );
        assert!(
            text.contains(&digests[0]),
            "{mode:?}: no layer digest: {text}"
        );
        assert!(
            text.contains("256.00 MiB") && text.contains("--layer-size-limit"),
            "{mode:?}: no limit in: {text}"
        );
        no_layers_left(&sb);

        // Under a cap that allows it, the file is written with its holes.
        let (ok, text) = pull(&sb, &["pull", "--layer-size-limit", "300Mi", &reference2]);
        assert!(ok, "{mode:?}: {text}");
        let file = layer_dir(&sb, &small.1).join("var/log/lastlog");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "{mode:?}: {} bytes allocated",
            meta.blocks() * 512
        );
    }
}

#[test]
fn gzip_bomb_is_refused_by_the_proportional_cap() {
    if !tools_present() {
        return;
    }
    // 1 GiB of zeros in eight 128 MiB files, about 1 MB compressed: gzip members of one
    // 16 MiB run of zeros repeated (multi-member gzip is valid, and layers use it).
    let zeros = gzip(&vec![0u8; 16 << 20]);
    let mut blob = Vec::new();
    for i in 0..8 {
        let mut h = header(&format!("zero{i}"), tar::EntryType::Regular, 128 << 20);
        h.set_cksum();
        blob.extend(gzip(h.as_bytes()));
        for _ in 0..8 {
            blob.extend_from_slice(&zeros);
        }
    }
    blob.extend(gzip(&[0u8; 1024]));
    assert!(blob.len() < 2 << 20, "{} bytes", blob.len());
    // The diffID is never reached (the refusal comes first), so it is not computed
    // over the gigabyte.
    let fake_diff_id = diff_id(b"never checked");
    let reg = Registry::start();
    let (reference, digests) = push(&reg, "bomb", &[(blob, fake_diff_id)]);
    for mode in e2e::modes() {
        let sb = e2e::Sandbox::new(mode);
        let (ok, text) = pull(&sb, &["pull", &reference]);
        assert!(!ok, "{mode:?}: the bomb was accepted: {text}");
        assert!(text.contains(&digests[0]), "{mode:?}: {text}");
        assert!(
            text.contains("64 times the layer's compressed size") && text.contains("256.00 MiB"),
            "{mode:?}: {text}"
        );
        assert!(
            text.contains("`zero2`"),
            "{mode:?}: the third file passes the cap: {text}"
        );
        no_layers_left(&sb);
    }
}

#[test]
fn hardlinks_into_a_lower_layer_share_one_copy() {
    if !tools_present() {
        return;
    }
    // Layer 1: an 8 MiB file. Layer 2 (a few hundred bytes): 24 hardlinks to it.
    let data = registry::noise(8 << 20, 7);
    let mut b1 = tar::Builder::new(Vec::new());
    let mut h = header("big", tar::EntryType::Regular, data.len() as u64);
    h.set_cksum();
    b1.append(&h, &data[..]).unwrap();
    let t1 = b1.into_inner().unwrap();
    let mut b2 = tar::Builder::new(Vec::new());
    for i in 0..24 {
        let mut h = header(&format!("l{i}"), tar::EntryType::Link, 0);
        h.set_link_name("big").unwrap();
        h.set_cksum();
        b2.append(&h, &[][..]).unwrap();
    }
    let t2 = b2.into_inner().unwrap();
    let layers = [(gzip(&t1), diff_id(&t1)), (gzip(&t2), diff_id(&t2))];
    let reg = Registry::start();
    let (reference, _) = push(&reg, "links", &layers);
    for mode in e2e::modes() {
        let sb = e2e::Sandbox::new(mode);
        // 24 copies would write 192 MiB; the cap allows one.
        let (ok, text) = pull(&sb, &["pull", "--layer-size-limit", "20Mi", &reference]);
        assert!(ok, "{mode:?}: {text}");
        let dir = layer_dir(&sb, &layers[1].1);
        let first = std::fs::metadata(dir.join("l0")).unwrap();
        assert_eq!(
            first.nlink(),
            24,
            "{mode:?}: the links do not share one copy"
        );
        assert_eq!(first.len(), 8 << 20);
        assert_eq!(std::fs::read(dir.join("l23")).unwrap(), data);
    }
}
