//! The mounts the helper makes itself inside a step's root filesystem before
//! libcontainer starts the container: /dev, /dev/pts, /dev/shm, /sys and the step's
//! bind mounts (workspace, /etc/hosts, ...). None of them depends on the container's
//! own namespaces, and libcontainer carries them into the container with its
//! recursive bind of the root. libcontainer verifies every path of every mount it makes
//! through a fresh procfs handle (about 40 system calls a mount); made here, with each
//! target resolved once inside the root, they cost a few calls each (docs/performance.md
//! has the figures).
//!
//! Targets are resolved with openat2(2) `RESOLVE_IN_ROOT` ([`RootDir`]): a symlink in the image
//! (`/etc/resolv.conf -> ../run/resolv.conf`) is followed as the container would see
//! it, never out to the host. Missing targets are created the same way (directories
//! 0755, files 0644, as runc does). All of it happens in the helper's private mount
//! namespace, so nothing is left mounted when the helper ends.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use oci_spec::runtime::Mount;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use super::in_root::RootDir;

/// Makes `mounts` (OCI mount entries: binds and fresh filesystems) inside `root`, in
/// order. The error names the mount's destination.
pub fn mount_in_root(root: &Path, mounts: &[Mount]) -> Result<(), (PathBuf, io::Error)> {
    let root_fd = RootDir::open(root).map_err(|e| (root.to_path_buf(), e))?;
    for m in mounts {
        mount_one(&root_fd, m).map_err(|e| (m.destination().clone(), e))?;
    }
    Ok(())
}

/// What a mount's OCI options ask for.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    flags: MsFlags,
    bind: bool,
    recursive: bool,
    /// Filesystem-specific options (`mode=755`, `newinstance`, ...), comma-joined.
    data: String,
}

fn parse_options(options: &[String]) -> Options {
    let mut out = Options {
        flags: MsFlags::empty(),
        bind: false,
        recursive: false,
        data: String::new(),
    };
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "nosuid" => out.flags |= MsFlags::MS_NOSUID,
            "noexec" => out.flags |= MsFlags::MS_NOEXEC,
            "nodev" => out.flags |= MsFlags::MS_NODEV,
            "ro" => out.flags |= MsFlags::MS_RDONLY,
            "strictatime" => out.flags |= MsFlags::MS_STRICTATIME,
            "relatime" => out.flags |= MsFlags::MS_RELATIME,
            "rw" => {}
            "bind" => out.bind = true,
            "rbind" => {
                out.bind = true;
                out.recursive = true;
            }
            other => data.push(other),
        }
    }
    out.data = data.join(",");
    out
}

fn mount_one(root: &RootDir, m: &Mount) -> io::Result<()> {
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let source = m
        .source()
        .as_ref()
        .ok_or_else(|| io::Error::other("the mount has no source"))?;
    let dest = m.destination();
    if options.bind {
        let target = if source.is_dir() {
            make_dir(root, dest)?
        } else {
            make_file(root, dest)?
        };
        bind(source, &target, &options)
    } else {
        let target = make_dir(root, dest)?;
        let fstype = m.typ().as_deref().unwrap_or_default();
        fresh(fstype, source, &target, &options)
    }
}

/// A new instance of `fstype` on `target`. For sysfs, as libcontainer does, the
/// read-only and other flags are attributes of the mount, not of the superblock: sysfs
/// shares one superblock per network namespace between all its mounts.
fn fresh(fstype: &str, source: &Path, target: &OwnedFd, options: &Options) -> io::Result<()> {
    if fstype != "sysfs" {
        // A superblock of its own (tmpfs, devpts with newinstance): one mount(2) onto
        // the target's descriptor, through its /proc/self/fd link.
        return nix::mount::mount(
            Some(source),
            Path::new(&format!("/proc/self/fd/{}", target.as_raw_fd())),
            Some(fstype),
            options.flags,
            (!options.data.is_empty()).then_some(options.data.as_str()),
        )
        .map_err(io::Error::from);
    }
    let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_set_string(&fs, "source", source)?;
    for option in options.data.split(',').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some((key, value)) => rustix::mount::fsconfig_set_string(&fs, key, value)?,
            None => rustix::mount::fsconfig_set_flag(&fs, option)?,
        }
    }
    rustix::mount::fsconfig_create(&fs)?;
    let attributes = MountAttrFlags::from_bits_retain(mount_attributes(options.flags) as u32);
    let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attributes)?;
    move_mount(&mnt, target)
}

/// The `MOUNT_ATTR_*` bits of mount flags.
fn mount_attributes(flags: MsFlags) -> u64 {
    [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_STRICTATIME, libc::MOUNT_ATTR_STRICTATIME),
    ]
    .into_iter()
    .filter(|(flag, _)| flags.contains(*flag))
    .fold(0, |attrs, (_, attr)| attrs | attr)
}

/// mount_setattr(2): sets `set` and clears `clear` (`MOUNT_ATTR_*`) on the mount at
/// `path` relative to `dirfd` (`at`: `AT_*` flags such as `AT_RECURSIVE`).
pub(crate) fn mount_setattr(
    dirfd: RawFd,
    path: &CStr,
    at: libc::c_uint,
    set: u64,
    clear: u64,
) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid C string and a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            at,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches the detached mount `mnt` on `target`.
fn move_mount(mnt: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    rustix::mount::move_mount(
        mnt,
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// A recursive (or not) bind of `source` onto `target`, read-only when asked, with the
/// new mount API: the copy of the tree gets its attributes before it is attached.
fn bind(source: &Path, target: &OwnedFd, options: &Options) -> io::Result<()> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if options.recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, source, flags)?;
    let attr_set = mount_attributes(options.flags);
    if attr_set != 0 {
        let mut at = libc::AT_EMPTY_PATH as libc::c_uint;
        if options.recursive {
            at |= libc::AT_RECURSIVE as libc::c_uint;
        }
        mount_setattr(tree.as_raw_fd(), c"", at, attr_set, 0)?;
    }
    move_mount(&tree, target)
}

/// The directory `path` inside `root`, created (with its parents) where missing.
fn make_dir(root: &RootDir, path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY;
    match root.resolve(path, flags) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        found => return found,
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    };
    let dir = make_dir(root, parent)?;
    if rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)).is_ok() {
        // The directory just made, following nothing.
        return Ok(rustix::fs::openat(
            &dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
    }
    // Something is there already: a link, resolved inside the root, or an error.
    root.resolve(path, flags)
        .map_err(|e| dangling(&dir, name, e))
}

/// The file `path` inside `root`, created empty (0644) where missing.
fn make_file(root: &RootDir, path: &Path) -> io::Result<OwnedFd> {
    match root.resolve(path, OFlags::PATH) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        found => return found,
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let dir = make_dir(root, parent)?;
    // O_EXCL|O_NOFOLLOW never follows a link there (a dangling one is reported below).
    match rustix::fs::openat(
        &dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    ) {
        Err(Errno::EXIST) => root
            .resolve(path, OFlags::PATH)
            .map_err(|e| dangling(&dir, name, e)),
        made => Ok(made?),
    }
}

/// Says why a name that exists cannot be resolved: a link to something missing.
fn dangling(dir: &OwnedFd, name: &std::ffi::OsStr, e: io::Error) -> io::Error {
    match nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name) {
        Ok(link) if e.raw_os_error() == Some(libc::ENOENT) => io::Error::new(
            e.kind(),
            format!(
                "it is a symlink to `{}`, which the image does not have",
                link.to_string_lossy()
            ),
        ),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let tmpfs = o(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(tmpfs.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(tmpfs.data, "mode=755,size=65536k");
        assert!(!tmpfs.bind);
        let ro_bind = o(&["rbind", "ro"]);
        assert!(ro_bind.bind && ro_bind.recursive);
        assert_eq!(ro_bind.flags, MsFlags::MS_RDONLY);
        assert_eq!(ro_bind.data, "");
    }

    #[test]
    fn targets_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // The same path inside the root, where the link below must lead.
        std::fs::create_dir_all(root.join(outside.strip_prefix("/").unwrap())).unwrap();
        // Absolute and `..` links that would leave the root if followed on the host.
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../../run/resolv", root.join("etc/resolv.conf")).unwrap();
        let root_fd = RootDir::open(&root).unwrap();

        make_dir(&root_fd, Path::new("/escape/deeper")).unwrap();
        assert!(root
            .join(outside.strip_prefix("/").unwrap())
            .join("deeper")
            .is_dir());
        assert!(!outside.join("deeper").exists());

        // A dangling link inside the image: its in-root target is not created.
        assert!(make_file(&root_fd, Path::new("/etc/resolv.conf")).is_err());
        std::fs::write(root.join("run/resolv"), "").unwrap();
        make_file(&root_fd, Path::new("/etc/resolv.conf")).unwrap();

        make_file(&root_fd, Path::new("/new/dir/file")).unwrap();
        assert!(root.join("new/dir/file").is_file());
    }
}
