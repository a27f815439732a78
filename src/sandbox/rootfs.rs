//! A step's root filesystem: an overlay of the image's unpacked layers (read-only,
//! shared by every container of that image) with a per-step writable upper directory,
//! so no step copies an image. Also the lookups a runtime does inside an image before
//! starting it: where a program is on the image's PATH, who a user is in its
//! /etc/passwd. Symlinks are resolved inside the root, never on the host.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::error::SandboxError;

/// Mounts `lowest..highest` layers + `upper`/`work` as an overlay at `target`.
pub fn mount_overlay(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), SandboxError> {
    for p in layers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let bytes = p.as_os_str().as_bytes();
        if bytes.iter().any(|b| matches!(b, b':' | b',' | b'\\')) {
            return Err(SandboxError::io(
                "use as an overlay layer (':', ',' or '\\' in the path)",
                p,
                std::io::ErrorKind::InvalidInput.into(),
            ));
        }
    }
    // Overlay lists the top layer first. Long layer lists overflow the one-page mount
    // data: name the layers relative to their common parent then.
    let mut lower: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    let parent = common_parent(&lower);
    let joined = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut cwd_guard = None;
    if joined(&lower).len() > 3000 {
        if let Some(parent) = parent {
            let old = std::env::current_dir()
                .map_err(|e| SandboxError::sys("read the current directory", e))?;
            std::env::set_current_dir(&parent)
                .map_err(|e| SandboxError::io("enter", &parent, e))?;
            cwd_guard = Some(old);
            lower = lower
                .iter()
                .map(|p| PathBuf::from(p.file_name().unwrap_or_default()))
                .collect();
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        joined(&lower),
        upper.display(),
        work.display()
    );
    // `volatile`: the upper directory is thrown away with the step, so overlay need not
    // sync it; without it, unmounting syncs the whole upper filesystem, which took
    // 8-200 ms per step on a busy machine (kernels before 5.10 lack it: plain then).
    // Inside a user namespace overlay may need its metadata in user.* xattrs.
    let userns = super::userns::in_user_namespace();
    let mut result = Err(nix::errno::Errno::EINVAL);
    for options in [",volatile", ",volatile,userxattr", "", ",userxattr"] {
        if options.contains("userxattr") && !userns {
            continue;
        }
        result = mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(format!("{data}{options}").as_str()),
        );
        if result != Err(nix::errno::Errno::EINVAL) {
            break;
        }
    }
    if let Some(old) = cwd_guard {
        let _ = std::env::set_current_dir(old);
    }
    result.map_err(|e| SandboxError::io("mount the overlay root filesystem at", target, e.into()))
}

fn common_parent(paths: &[PathBuf]) -> Option<PathBuf> {
    let first = paths.first()?.parent()?;
    paths
        .iter()
        .all(|p| p.parent() == Some(first))
        .then(|| first.to_path_buf())
}

/// Resolves `path` (absolute, as seen inside the container) under `root`, following
/// symlinks as the container would see them. `None` when it does not exist.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut hops = 0;
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut inside: Vec<String> = Vec::new();
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                inside.pop();
                continue;
            }
            _ => {}
        }
        let host = root.join(inside.iter().chain([&part]).collect::<PathBuf>());
        let meta = fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                inside.clear();
            }
            let mut more = components(&target);
            more.reverse();
            pending.extend(more);
        } else {
            inside.push(part);
        }
    }
    Some(root.join(inside.iter().collect::<PathBuf>()))
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Finds `program` as `execvp` in the container would: a path with a `/` as is,
/// otherwise on `path_var` (the container's PATH). Returns the path inside.
pub fn find_program(root: &Path, program: &str, path_var: &str) -> Option<String> {
    let executable = |inside: &str| {
        resolve_in_root(root, inside)
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let inside = if program.starts_with('/') {
            program.to_string()
        } else {
            format!("/{program}")
        };
        return executable(&inside).then(|| program.to_string());
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .find(|p| executable(p))
}

/// A user resolved inside an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub additional_gids: Vec<u32>,
}

/// Resolves `user[:group]` (names or ids) against the image's /etc/passwd and
/// /etc/group, as Docker does: a numeric uid without an entry runs with gid 0 and
/// home `/`. `Err` names the part that is not found.
pub fn lookup_user(root: &Path, spec: &str) -> Result<ImageUser, String> {
    let read = |file: &str| {
        resolve_in_root(root, file)
            .and_then(|p| fs::read(p).ok())
            .map(|b| OsStr::from_bytes(&b).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let passwd = read("/etc/passwd");
    let group = read("/etc/group");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, mut gid, home, name) = match (&entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().map_err(|_| user.to_string())?,
            f[3].parse().map_err(|_| user.to_string())?,
            f[5].to_string(),
            Some(f[0].to_string()),
        ),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        (None, Err(_)) => return Err(user.to_string()),
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| g.to_string())?,
        };
    }
    let additional_gids = match (&name, grp) {
        (Some(name), None) => group
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok(ImageUser {
        uid,
        gid,
        home,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn image_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["bin", "usr/bin", "etc", "sbin"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(r.join("bin/busybox"), "").unwrap();
        fs::set_permissions(r.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
        symlink("/etc/nothing", r.join("bin/dangling")).unwrap();
        // A symlink that would escape to the host's /bin/bash if followed naively.
        symlink("/../../../../bin/bash", r.join("usr/bin/bash")).unwrap();
        fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999::/var/lib/postgresql:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            r.join("etc/group"),
            "root:x:0:\npostgres:x:999:\nssl:x:101:postgres\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn programs_are_found_through_symlinks_inside_the_root() {
        let root = image_root();
        let r = root.path();
        assert_eq!(
            find_program(r, "sh", "/usr/bin:/bin").as_deref(),
            Some("/bin/sh")
        );
        assert_eq!(
            find_program(r, "env", "/usr/bin:/bin").as_deref(),
            Some("/usr/bin/env")
        );
        assert_eq!(find_program(r, "/bin/sh", "").as_deref(), Some("/bin/sh"));
        assert_eq!(find_program(r, "dangling", "/bin"), None);
        assert_eq!(find_program(r, "bash", "/usr/bin:/bin"), None);
        assert_eq!(find_program(r, "python3", "/usr/bin:/bin"), None);
    }

    #[test]
    fn users_resolve_by_name_id_and_group() {
        let root = image_root();
        let r = root.path();
        let pg = lookup_user(r, "postgres").unwrap();
        assert_eq!(
            (pg.uid, pg.gid, pg.home.as_str()),
            (999, 999, "/var/lib/postgresql")
        );
        assert_eq!(pg.additional_gids, vec![101]);
        assert_eq!(lookup_user(r, "999").unwrap().uid, 999);
        let anon = lookup_user(r, "1234").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home.as_str()), (1234, 0, "/"));
        assert_eq!(lookup_user(r, "postgres:ssl").unwrap().gid, 101);
        assert_eq!(lookup_user(r, "0:7").unwrap().gid, 7);
        assert_eq!(lookup_user(r, "nobody"), Err("nobody".to_string()));
        assert_eq!(lookup_user(r, "root:wheel"), Err("wheel".to_string()));
    }

    #[test]
    fn long_layer_lists_share_a_parent() {
        let layers: Vec<PathBuf> = (0..3)
            .map(|i| PathBuf::from(format!("/s/layers/{i}")))
            .collect();
        assert_eq!(common_parent(&layers), Some(PathBuf::from("/s/layers")));
        assert_eq!(
            common_parent(&[PathBuf::from("/a/1"), PathBuf::from("/b/2")]),
            None
        );
    }
}
