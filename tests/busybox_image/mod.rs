//! A two-layer busybox image generated on the fly from the host's busybox-static
//! (Debian `busybox-static`): layer 1 is busybox with its applet symlinks and an
//! /etc/passwd with root and `svc` (uid 999); layer 2 adds /etc/marker and replaces
//! /etc/motd, to prove that layers stack in order.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BUSYBOX: &str = "/bin/busybox";

/// Writes the layers under `dir` (world-readable) and returns them lowest first.
/// `owner`: for a rootless user, (its uid, its first subordinate uid): files then
/// belong to root inside the user namespace, and /home/svc to uid 999, as a rootless
/// store unpacks them.
pub fn layers(dir: &Path, owner: Option<(u32, u32)>) -> Vec<PathBuf> {
    let l1 = dir.join("layer1");
    let l2 = dir.join("layer2");
    for d in ["bin", "etc", "root", "home/svc", "tmp"] {
        fs::create_dir_all(l1.join(d)).unwrap();
    }
    fs::create_dir_all(l2.join("etc")).unwrap();
    fs::copy(BUSYBOX, l1.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            symlink("busybox", l1.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(
        l1.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsvc:x:999:999:svc:/home/svc:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        l1.join("etc/group"),
        "root:x:0:\ntty:x:5:\naudio:x:29:svc\nsvc:x:999:\n",
    )
    .unwrap();
    fs::write(l1.join("etc/motd"), "layer1\n").unwrap();
    fs::set_permissions(l1.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(l2.join("etc/marker"), "layer2\n").unwrap();
    fs::write(l2.join("etc/motd"), "layer2\n").unwrap();
    for d in [dir, &l1, &l2] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let home = l1.join("home/svc");
    let (root, svc) = match owner {
        Some((uid, first_subuid)) => (uid, first_subuid + 998),
        None => (0, 999),
    };
    chown_tree(&l1, root);
    chown_tree(&l2, root);
    std::os::unix::fs::lchown(&home, Some(svc), Some(svc)).unwrap();
    vec![l1, l2]
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for e in fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), id);
        }
    }
}
