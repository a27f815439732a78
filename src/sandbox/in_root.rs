//! Opening files inside a directory as a step would see them.
//!
//! The runner touches files a step controls: it mounts into the step's root filesystem
//! (`sandbox::mounts`), and it reads what the step leaves behind (output variables in
//! its control directory, JUnit reports in the workspace). A step can plant symlinks
//! there (`outputs/LEAK -> /etc/shadow`), and the runner, resolving paths on the host
//! with more rights than the step, would follow them out. [`RootDir`] resolves every
//! path with openat2(2) `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: the directory acts as
//! `/`, so `..` and absolute links stay inside it and /proc's magic links are refused.
//! Reads are bounded, refuse what is not a regular file (a FIFO would block the
//! runner), and glob expansion lists directories through the same resolution.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// A directory that paths are resolved in as if it were `/`.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    /// Where it is on the host, for messages.
    path: PathBuf,
}

/// Why a file inside a [`RootDir`] was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is a symbolic link; sandrun reads only the regular file the step wrote")]
    Symlink { path: PathBuf },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than the limit of {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
}

/// Whether the last component of a path may be a symlink (resolved inside the root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastLink {
    Follow,
    Refuse,
}

impl RootDir {
    /// Opens `path` (a host path, trusted) as the root for later lookups.
    pub fn open(path: &Path) -> io::Result<RootDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root's host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// openat2(2) of `path` below the root as if the root were `/` (symlinks, `..` and
    /// absolute links stay inside it; magic links of /proc are refused). `O_CLOEXEC` is
    /// added to `flags`.
    pub fn resolve(&self, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let relative = path.strip_prefix("/").unwrap_or(path);
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        // The kernel answers EAGAIN when a `..` was resolved while any mount or rename
        // happened on the system (it cannot then prove the walk stayed inside): retry.
        let mut attempts = 0;
        loop {
            match rustix::fs::openat2(
                &self.fd,
                relative,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::AGAIN) if attempts < 1000 => attempts += 1,
                result => return Ok(result?),
            }
        }
    }

    /// The contents of the regular file `path`, at most `limit` bytes. With
    /// [`LastLink::Refuse`] the file itself must not be a symlink (a step replaced the
    /// file the runner expects with a link).
    pub fn read(&self, path: &Path, limit: u64, last: LastLink) -> Result<Vec<u8>, ReadError> {
        let shown = self.path.join(path.strip_prefix("/").unwrap_or(path));
        let io_err = |source| ReadError::Io {
            path: shown.clone(),
            source,
        };
        // O_NONBLOCK: opening a FIFO the step left there must not wait for a writer.
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY;
        if last == LastLink::Refuse {
            flags |= OFlags::NOFOLLOW;
        }
        let fd = match self.resolve(path, flags) {
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) && last == LastLink::Refuse => {
                return Err(ReadError::Symlink { path: shown });
            }
            other => other.map_err(io_err)?,
        };
        let mut file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(ReadError::NotRegular {
                path: shown,
                kind: kind(&meta.file_type()),
            });
        }
        let mut bytes = Vec::new();
        (&mut file)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() as u64 > limit {
            return Err(ReadError::TooLarge { path: shown, limit });
        }
        Ok(bytes)
    }

    /// Regular files matching the glob `pattern` (`*`, `?`, `[...]` within a
    /// component, `**` for any number of directories), relative to the root. Matching
    /// lists directories resolved inside the root; `**` does not descend through
    /// symlinks (no loops). Sorted, without duplicates.
    pub fn glob(&self, pattern: &str) -> Result<Vec<PathBuf>, glob::PatternError> {
        let parts: Vec<&str> = pattern
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let mut found = Vec::new();
        self.glob_from(PathBuf::new(), &parts, &mut found)?;
        found.sort();
        found.dedup();
        Ok(found)
    }

    fn glob_from(
        &self,
        dir: PathBuf,
        parts: &[&str],
        found: &mut Vec<PathBuf>,
    ) -> Result<(), glob::PatternError> {
        let Some((first, rest)) = parts.split_first() else {
            if self.is_regular_file(&dir) {
                found.push(dir);
            }
            return Ok(());
        };
        if *first == "**" {
            self.glob_from(dir.clone(), rest, found)?;
            for (name, is_dir) in self.entries(&dir) {
                if is_dir {
                    self.glob_from(dir.join(name), parts, found)?;
                }
            }
        } else if first.contains(['*', '?', '[']) {
            let pattern = glob::Pattern::new(first)?;
            for (name, _) in self.entries(&dir) {
                if pattern.matches(&name.to_string_lossy()) {
                    self.glob_from(dir.join(name), rest, found)?;
                }
            }
        } else {
            self.glob_from(dir.join(first), rest, found)?;
        }
        Ok(())
    }

    fn is_regular_file(&self, path: &Path) -> bool {
        self.resolve(path, OFlags::PATH)
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .is_some_and(|m| m.is_file())
    }

    /// The names in directory `dir` (resolved inside the root), each with whether it is
    /// a directory itself (a symlink is not); empty when `dir` cannot be listed.
    fn entries(&self, dir: &Path) -> Vec<(std::ffi::OsString, bool)> {
        let Ok(fd) = self.resolve(dir, OFlags::RDONLY | OFlags::DIRECTORY) else {
            return Vec::new();
        };
        // `Dir` owns the descriptor from here (and closes it when it fails).
        let Ok(mut listing) = nix::dir::Dir::from_fd(fd.into_raw_fd()) else {
            return Vec::new();
        };
        let dir_fd = listing.as_raw_fd();
        listing
            .iter()
            .flatten()
            .filter_map(|e| {
                let name = OsStr::from_bytes(e.file_name().to_bytes());
                if name == "." || name == ".." {
                    return None;
                }
                let is_dir = match e.file_type() {
                    Some(t) => t == nix::dir::Type::Directory,
                    None => nix::sys::stat::fstatat(
                        Some(dir_fd),
                        name,
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
                };
                Some((name.to_os_string(), is_dir))
            })
            .collect()
    }
}

impl AsFd for RootDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("reports/deep")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.xml"), "secret").unwrap();
        (dir, root, outside)
    }

    #[test]
    fn links_out_of_the_root_are_not_followed() {
        let (_dir, root, outside) = tree();
        symlink(outside.join("secret.xml"), root.join("abs")).unwrap();
        symlink("../../outside/secret.xml", root.join("rel")).unwrap();
        symlink(&outside, root.join("reports/out")).unwrap();
        let r = RootDir::open(&root).unwrap();
        for p in ["abs", "rel", "reports/out/secret.xml"] {
            let err = r.read(Path::new(p), 100, LastLink::Follow).unwrap_err();
            assert!(
                matches!(&err, ReadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
                "{p}: {err}"
            );
        }
        // The same absolute link, read as the step would: inside the root.
        let inside = root.join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("secret.xml"), "the step's own").unwrap();
        assert_eq!(
            r.read(Path::new("abs"), 100, LastLink::Follow).unwrap(),
            b"the step's own"
        );
        assert!(matches!(
            r.read(Path::new("abs"), 100, LastLink::Refuse),
            Err(ReadError::Symlink { .. })
        ));
    }

    #[test]
    fn reads_are_bounded_and_regular_files_only() {
        let (_dir, root, _) = tree();
        std::fs::write(root.join("big"), "0123456789").unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let r = RootDir::open(&root).unwrap();
        assert_eq!(
            r.read(Path::new("big"), 10, LastLink::Refuse).unwrap(),
            b"0123456789"
        );
        let err = r.read(Path::new("big"), 9, LastLink::Refuse).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("big is larger than the limit of 9 bytes"),
            "{err}"
        );
        assert!(matches!(
            r.read(Path::new("fifo"), 10, LastLink::Refuse),
            Err(ReadError::NotRegular { kind: "a FIFO", .. })
        ));
        assert!(matches!(
            r.read(Path::new("reports"), 10, LastLink::Refuse),
            Err(ReadError::NotRegular {
                kind: "a directory",
                ..
            })
        ));
    }

    #[test]
    fn globs_expand_inside_the_root() {
        let (_dir, root, outside) = tree();
        std::fs::write(root.join("reports/a.xml"), "").unwrap();
        std::fs::write(root.join("reports/deep/b.xml"), "").unwrap();
        std::fs::write(root.join("reports/c.txt"), "").unwrap();
        symlink(&outside, root.join("reports/out")).unwrap();
        symlink(outside.join("secret.xml"), root.join("reports/leak.xml")).unwrap();
        symlink("a.xml", root.join("reports/alias.xml")).unwrap();
        let r = RootDir::open(&root).unwrap();
        let g = |p: &str| r.glob(p).unwrap();
        let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            g("reports/*.xml"),
            paths(&["reports/a.xml", "reports/alias.xml"])
        );
        assert_eq!(
            g("**/*.xml"),
            paths(&["reports/a.xml", "reports/alias.xml", "reports/deep/b.xml"])
        );
        assert_eq!(g("reports/out/*.xml"), Vec::<PathBuf>::new());
        assert_eq!(g("/reports/./deep/b.xml"), paths(&["reports/deep/b.xml"]));
        assert!(r.glob("reports/[.xml").is_err());
    }
}
