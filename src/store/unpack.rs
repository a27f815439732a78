//! The layer applier: turns one image layer (a tar stream) into a directory that
//! overlayfs can stack as a lower layer. This is a security boundary: layers come from
//! registries sandrun does not control, and nothing a layer says may write outside the
//! layer's own directory.
//!
//! How it stays inside:
//! - every parent directory is opened with `openat2(RESOLVE_IN_ROOT)` relative to the
//!   layer root, so `..`, absolute paths and symlinks (even ones the layer just created)
//!   resolve inside the root, never outside; the last path component is created with
//!   `*at` calls and `O_NOFOLLOW`/`O_EXCL`, so a write never follows a symlink;
//! - hardlink targets are resolved the same way (a link "to /etc/shadow" links the
//!   layer's own `etc/shadow`, or nothing);
//! - names are cleaned lexically first (`..` cannot climb above the root), whiteouts
//!   naming `.`, `..` or nothing are refused, and there are caps on the bytes the layer
//!   writes, the number of entries and the path length ([`Limits`]).
//!
//! What it costs the disk: a layer is charged for what it makes the store hold, not for
//! the length of its (decompressed) tar stream, since a 98-byte GNU sparse entry can
//! declare gigabytes and a gzip bomb expands a thousandfold. Every regular file is
//! charged its full length before a byte is written, so a file over the cap is refused
//! up front; runs of zero blocks are written as holes (a sparse entry stays sparse, and
//! so does a file of zeros); a copied cross-layer hardlink is charged its length unless
//! the filesystem shares the blocks (reflink).
//!
//! What it writes:
//! - OCI whiteouts become overlayfs whiteouts (a 0/0 character device, which the kernel
//!   lets anyone create); opaque directories get `user.overlay.opaque=y` (for overlays
//!   mounted with `userxattr`, as rootless mounts are) and, when permitted,
//!   `trusted.overlay.opaque=y` (overlays mounted by real root). `.wh.*` files are never
//!   materialised.
//! - Files, directories, symlinks (kept as symlinks), hardlinks, fifos; modes including
//!   setuid/setgid/sticky; mtimes; xattrs filtered: `user.*` (not `user.overlay.*`),
//!   `security.capability` (file capabilities) and POSIX ACLs; never `trusted.*` or other
//!   `security.*`.
//! - Ownership: when the process is uid 0 (real root, or root of sandrun's rootless user
//!   namespace, where ids are mapped through /etc/subuid) every entry is chowned to the
//!   image's uid/gid. When not uid 0, ownership is not applied and nothing extra is
//!   recorded: every file belongs to the invoking user.
//! - Device nodes are created when uid 0 may create them; otherwise they are skipped
//!   with a warning in the [`UnpackReport`].
//! - A hardlink whose target is in a lower layer (not in this one) cannot be a hardlink
//!   between separate layer directories: it is reported in
//!   [`UnpackReport::cross_layer_links`] and the store copies the file from the image's
//!   lower layers afterwards.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid};

/// Caps that keep a hostile layer from exhausting disk, inodes or memory.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of file contents the layer may write: the length of every regular file
    /// (holes included, so a sparse entry cannot declare what it likes) plus the copies
    /// made for cross-layer hardlinks.
    pub max_written: u64,
    /// Where `max_written` comes from, for the message that refuses a layer
    /// ("64 times the layer's compressed size", "--layer-size-limit").
    pub origin: String,
    pub max_entries: u64,
    /// Bytes in one entry's path (and link target).
    pub max_path: usize,
}

/// Slack of the tar stream over [`Limits::max_written`]: headers, long names and PAX
/// records, which the tar reader holds in memory.
const STREAM_SLACK: u64 = 256 << 20;

impl Limits {
    /// The cap on the decompressed tar stream: what the layer may write plus the slack
    /// its headers need. It bounds memory (PAX records are read whole) and CPU.
    pub fn max_stream(&self) -> u64 {
        self.max_written.saturating_add(STREAM_SLACK)
    }
}

/// The default cap on a layer's writes is this many times its compressed size...
pub const LAYER_RATIO: u64 = 64;
/// ...but never less than this: small layers may hold a few highly compressible files.
pub const LAYER_FLOOR: u64 = 256 << 20;

impl Limits {
    /// The limits for a layer whose blob is `compressed` bytes: `fixed` when the user set
    /// one, else [`LAYER_RATIO`] times the blob, at least [`LAYER_FLOOR`]. Real layers
    /// expand 2-10 times (text compresses best); a gzip bomb a thousand times.
    pub fn for_layer(compressed: u64, fixed: Option<u64>) -> Limits {
        let (max_written, origin) = match fixed {
            Some(n) => (
                n,
                "set by --layer-size-limit, SANDRUN_LAYER_SIZE_LIMIT or the config file's `layer_size_limit`".to_string(),
            ),
            None => (
                compressed.saturating_mul(LAYER_RATIO).max(LAYER_FLOOR),
                format!(
                    "{LAYER_RATIO} times the layer's compressed size of {}, at least {}; \
                     --layer-size-limit raises it",
                    human_bytes(compressed),
                    human_bytes(LAYER_FLOOR)
                ),
            ),
        };
        Limits {
            max_written,
            origin,
            ..Limits::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_written: 64 << 30,
            origin: "the default".into(),
            max_entries: 4_000_000,
            max_path: 4096,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct UnpackOptions {
    pub limits: Limits,
}

/// What applying a layer did besides the plain writes.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct UnpackReport {
    pub entries: u64,
    /// Things skipped or changed, said once each ("device node dev/sda skipped: ...").
    pub warnings: Vec<String>,
    /// (path, target) of hardlinks whose target is not in this layer.
    pub cross_layer_links: Vec<(String, String)>,
    /// Whether owners were applied (uid 0) or left to the invoking user.
    pub owners_applied: bool,
    /// Bytes charged against [`Limits::max_written`] (file lengths, copies).
    #[serde(default)]
    pub written: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry `{path}`: {reason}")]
    Refused { path: String, reason: String },
    #[error("entry `{path}`: {op}: {errno}")]
    Sys {
        path: String,
        op: &'static str,
        errno: Errno,
    },
    #[error("layer exceeds the limit on {0}")]
    Limit(String),
    /// The layer would write more than [`Limits::max_written`].
    #[error("entry `{path}` would take the layer's writes past {} ({limit} bytes, {origin})", human_bytes(*limit))]
    TooLarge {
        path: String,
        limit: u64,
        origin: String,
    },
    #[error("reading the layer stream: {0}")]
    Read(#[from] io::Error),
    #[error("entry `{path}`: writing: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// Whether the layer failed because the store's filesystem is full (ENOSPC, EDQUOT),
    /// not because of anything in the layer.
    pub fn is_no_space(&self) -> bool {
        match self {
            UnpackError::Sys { errno, .. } => matches!(errno, Errno::ENOSPC | Errno::EDQUOT),
            UnpackError::Write { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
            }
            _ => false,
        }
    }
}

type R<T> = Result<T, UnpackError>;

/// Applies the tar stream `input` (already decompressed) to the empty directory `root`.
pub fn apply_layer(input: impl Read, root: &Path, opts: &UnpackOptions) -> R<UnpackReport> {
    let root_fd = File::open(root).map_err(UnpackError::Read)?;
    let counted = Counted {
        inner: input,
        left: opts.limits.max_stream(),
    };
    let mut archive = tar::Archive::new(counted);
    archive.set_ignore_zeros(false);
    let euid = unistd::geteuid();
    let mut applier = Applier {
        root: OwnedFd::from(root_fd),
        limits: opts.limits.clone(),
        owners: euid.is_root(),
        may_mknod: euid.is_root(),
        real_root: euid.is_root() && in_initial_userns(),
        report: UnpackReport {
            owners_applied: euid.is_root(),
            ..Default::default()
        },
        dirs: BTreeMap::new(),
        warned: Default::default(),
        buf: Vec::new(),
    };
    let entries = archive.entries().map_err(limit_or_read)?;
    for entry in entries {
        let mut entry = entry.map_err(limit_or_read)?;
        applier.report.entries += 1;
        if applier.report.entries > applier.limits.max_entries {
            return Err(UnpackError::Limit(format!(
                "entries ({})",
                applier.limits.max_entries
            )));
        }
        applier.entry(&mut entry)?;
    }
    applier.finish_dirs()?;
    Ok(applier.report)
}

fn limit_or_read(e: io::Error) -> UnpackError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        UnpackError::Limit(e.to_string())
    } else {
        UnpackError::Read(e)
    }
}

/// Counts decompressed bytes and fails the stream past the cap.
struct Counted<I> {
    inner: I,
    left: u64,
}

impl<I: Read> Read for Counted<I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "decompressed tar stream size (its files' cap plus 256 MiB for headers)",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// Adds `size` to `written`, refusing to go past the layer's cap.
fn charge(written: u64, size: u64, limits: &Limits, path: &str) -> R<u64> {
    match written.checked_add(size) {
        Some(total) if total <= limits.max_written => Ok(total),
        _ => Err(UnpackError::TooLarge {
            path: path.to_string(),
            limit: limits.max_written,
            origin: limits.origin.clone(),
        }),
    }
}

/// Block size of the hole detection: a run of zeros this long (aligned in the file) is
/// left as a hole.
const HOLE_BLOCK: usize = 4096;
/// Files at least this long have their writeback started as soon as they are written.
const WRITEBACK_MIN: u64 = 1 << 20;
/// Bytes read at a time when writing a file (a whole number of hole blocks).
const COPY_BUFFER: usize = 64 * HOLE_BLOCK;

/// Copies `input` into the empty file `out`, leaving aligned zero blocks as holes (a GNU
/// sparse entry's holes arrive as zeros from the tar reader). The file ends with the
/// input's length even when its tail is a hole.
/// Which side of a copy failed: a read is the layer's fault, a write the store's.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

impl CopyError {
    fn at(self, path: &str) -> UnpackError {
        match self {
            CopyError::Read(e) => limit_or_read(e),
            CopyError::Write(source) => UnpackError::Write {
                path: path.to_string(),
                source,
            },
        }
    }
}

/// `buf` is the caller's, reused from file to file (layers hold many small files).
fn write_sparse(mut input: impl Read, out: &mut File, buf: &mut Vec<u8>) -> Result<u64, CopyError> {
    use std::os::unix::fs::FileExt;
    buf.resize(COPY_BUFFER, 0);
    let mut offset = 0u64;
    loop {
        // Fill the buffer so that blocks stay aligned to the file's offsets.
        let mut filled = 0;
        while filled < buf.len() {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CopyError::Read(e)),
            }
        }
        if filled == 0 {
            break;
        }
        let block_end = |i: usize| (i + HOLE_BLOCK).min(filled);
        let is_zero = |i: usize| buf[i..block_end(i)].iter().all(|b| *b == 0);
        let mut at = 0;
        while at < filled {
            if is_zero(at) {
                at = block_end(at);
                continue;
            }
            // One write per run of data blocks.
            let mut end = block_end(at);
            while end < filled && !is_zero(end) {
                end = block_end(end);
            }
            out.write_all_at(&buf[at..end], offset + at as u64)
                .map_err(CopyError::Write)?;
            at = end;
        }
        offset += filled as u64;
    }
    out.set_len(offset).map_err(CopyError::Write)?;
    Ok(offset)
}

fn in_initial_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| {
            let f: Vec<&str> = m.split_whitespace().collect();
            f == ["0", "0", "4294967295"]
        })
        .unwrap_or(false)
}

struct DirMeta {
    mode: u32,
    mtime: i64,
}

struct Applier {
    root: OwnedFd,
    limits: Limits,
    owners: bool,
    may_mknod: bool,
    real_root: bool,
    report: UnpackReport,
    /// Directory metadata applied at the end (children change mtimes; a 0500 directory
    /// must stay writable until its children exist). Keyed by cleaned path.
    dirs: BTreeMap<Vec<u8>, DirMeta>,
    warned: std::collections::HashSet<&'static str>,
    /// The copy buffer of [`write_sparse`], allocated once per layer.
    buf: Vec<u8>,
}

/// Lexically cleaned path components; `..` cannot climb above the root.
fn clean(raw: &[u8], max: usize) -> Result<Vec<&[u8]>, String> {
    if raw.len() > max {
        return Err(format!("path longer than {max} bytes"));
    }
    if raw.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    let mut out: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(c: &[&[u8]]) -> Vec<u8> {
    c.join(&b'/')
}

fn show(c: &[&[u8]]) -> String {
    String::from_utf8_lossy(&join(c)).into_owned()
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_IN_ROOT
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS)
    .union(ResolveFlag::RESOLVE_NO_XDEV);

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: fd was just returned by a successful open call and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Applier {
    fn sys(&self, path: &[&[u8]], op: &'static str) -> impl Fn(Errno) -> UnpackError {
        let path = show(path);
        move |errno| UnpackError::Sys {
            path: path.clone(),
            op,
            errno,
        }
    }

    fn warn_once(&mut self, key: &'static str, msg: String) {
        if self.warned.insert(key) {
            self.report.warnings.push(msg);
        }
    }

    /// Opens `comps` (a directory) inside the root with `flags`, symlinks resolved in root.
    fn open_in_root(&self, comps: &[&[u8]], flags: OFlag) -> Result<OwnedFd, Errno> {
        let path: Vec<u8> = if comps.is_empty() {
            b".".to_vec()
        } else {
            join(comps)
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY)
            .resolve(RESOLVE);
        loop {
            match openat2(self.root.as_raw_fd(), path.as_slice(), how) {
                Ok(fd) => return Ok(owned(fd)),
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the parent directory `comps`, creating missing directories (0755, like
    /// Docker) on the way.
    fn ensure_dir(&self, comps: &[&[u8]]) -> R<OwnedFd> {
        match self.open_in_root(comps, OFlag::O_PATH) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.sys(comps, "open parent directory")(e)),
        }
        let mut fd = self
            .open_in_root(&[], OFlag::O_PATH)
            .map_err(self.sys(&[], "open layer root"))?;
        for i in 0..comps.len() {
            match self.open_in_root(&comps[..=i], OFlag::O_PATH) {
                Ok(next) => fd = next,
                Err(Errno::ENOENT) => {
                    match stat::mkdirat(
                        Some(fd.as_raw_fd()),
                        comps[i],
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) => {}
                        Err(Errno::EEXIST) => {
                            return Err(UnpackError::Refused {
                                path: show(comps),
                                reason: format!(
                                    "`{}` is a symlink to a missing directory",
                                    show(&comps[..=i])
                                ),
                            })
                        }
                        Err(e) => return Err(self.sys(&comps[..=i], "mkdir")(e)),
                    }
                    fd = self
                        .open_in_root(&comps[..=i], OFlag::O_PATH)
                        .map_err(self.sys(&comps[..=i], "open created directory"))?;
                }
                Err(e) => return Err(self.sys(&comps[..=i], "open parent directory")(e)),
            }
        }
        Ok(fd)
    }

    fn entry<Rd: Read>(&mut self, entry: &mut tar::Entry<'_, Rd>) -> R<()> {
        let raw_path = entry.path_bytes().into_owned();
        let path_str = String::from_utf8_lossy(&raw_path).into_owned();
        let comps =
            clean(&raw_path, self.limits.max_path).map_err(|reason| UnpackError::Refused {
                path: path_str.clone(),
                reason,
            })?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let (mut uid, mut gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let Ok(key) = ext.key() else { continue };
                match key {
                    "uid" => uid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(uid),
                    "gid" => gid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(gid),
                    k if k.starts_with("SCHILY.xattr.") => xattrs.push((
                        k["SCHILY.xattr.".len()..].to_string(),
                        ext.value_bytes().to_vec(),
                    )),
                    _ => {}
                }
            }
        }

        let Some((name, parent)) = comps.split_last() else {
            // The layer root itself ("./"): only its metadata matters.
            if kind.is_dir() {
                self.dirs.insert(Vec::new(), DirMeta { mode, mtime });
            }
            return Ok(());
        };
        let name: &[u8] = name;

        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(parent, target, &path_str);
        }

        let parent_fd = self.ensure_dir(parent)?;
        let pfd = parent_fd.as_raw_fd();

        if kind.is_dir() {
            match stat::fstatat(Some(pfd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st)
                    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
                Ok(_) => {
                    remove_all_at(pfd, name).map_err(self.sys(&comps, "replace with directory"))?;
                    stat::mkdirat(Some(pfd), name, Mode::from_bits_truncate(0o700))
                        .map_err(self.sys(&comps, "mkdir"))?;
                }
                Err(Errno::ENOENT) => {
                    stat::mkdirat(Some(pfd), name, Mode::from_bits_truncate(0o700))
                        .map_err(self.sys(&comps, "mkdir"))?
                }
                Err(e) => return Err(self.sys(&comps, "stat")(e)),
            }
            let dir = openat(
                pfd,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            )
            .map_err(self.sys(&comps, "open directory"))?;
            self.chown_fd(&dir, uid, gid, &comps)?;
            self.set_xattrs(&dir, &xattrs, &comps)?;
            self.dirs.insert(join(&comps), DirMeta { mode, mtime });
            return Ok(());
        }

        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // The entry's full length (a sparse entry's real size), before writing.
                let size = entry.size();
                self.report.written = charge(self.report.written, size, &self.limits, &path_str)?;
                self.replace(pfd, name, &comps)?;
                let fd = openat(
                    pfd,
                    name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                )
                .map_err(self.sys(&comps, "create file"))?;
                let mut file = File::from(fd);
                write_sparse(entry, &mut file, &mut self.buf).map_err(|e| e.at(&path_str))?;
                if size >= WRITEBACK_MIN {
                    // Its writeback runs while the rest of the layer is unpacked: the
                    // layer's one syncfs before its rename then has less left to flush.
                    super::layout::start_writeback(&file, 0, 0);
                }
                let fd = OwnedFd::from(file);
                self.chown_fd(&fd, uid, gid, &comps)?;
                // After chown: chown clears setuid/setgid.
                stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
                    .map_err(self.sys(&comps, "chmod"))?;
                self.set_xattrs(&fd, &xattrs, &comps)?;
                let t = TimeSpec::new(mtime, 0);
                stat::futimens(fd.as_raw_fd(), &t, &t).map_err(self.sys(&comps, "set mtime"))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Refused {
                        path: path_str.clone(),
                        reason: "symlink without a target".into(),
                    })?
                    .into_owned();
                if target.len() > self.limits.max_path || target.contains(&0) {
                    return Err(UnpackError::Refused {
                        path: path_str,
                        reason: "symlink target too long or has a NUL byte".into(),
                    });
                }
                self.replace(pfd, name, &comps)?;
                unistd::symlinkat(target.as_slice(), Some(pfd), name)
                    .map_err(self.sys(&comps, "symlink"))?;
                self.chown_at(pfd, name, uid, gid, &comps)?;
                let t = TimeSpec::new(mtime, 0);
                stat::utimensat(
                    Some(pfd),
                    name,
                    &t,
                    &t,
                    stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(self.sys(&comps, "set symlink mtime"))?;
            }
            tar::EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Refused {
                        path: path_str.clone(),
                        reason: "hardlink without a target".into(),
                    })?
                    .into_owned();
                let target = clean(&raw_target, self.limits.max_path).map_err(|reason| {
                    UnpackError::Refused {
                        path: path_str.clone(),
                        reason: format!("hardlink target: {reason}"),
                    }
                })?;
                self.hardlink(pfd, name, &comps, &target)?;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                let (sflag, dev) = match kind {
                    tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    t => (
                        if t == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        },
                        stat::makedev(
                            header.device_major().ok().flatten().unwrap_or(0) as u64,
                            header.device_minor().ok().flatten().unwrap_or(0) as u64,
                        ),
                    ),
                };
                if sflag != SFlag::S_IFIFO && !self.may_mknod {
                    self.report.warnings.push(format!(
                        "device node {path_str} skipped: not running as root"
                    ));
                    return Ok(());
                }
                self.replace(pfd, name, &comps)?;
                match stat::mknodat(Some(pfd), name, sflag, Mode::from_bits_truncate(mode), dev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if sflag != SFlag::S_IFIFO => {
                        self.report.warnings.push(format!(
                            "device node {path_str} skipped: this user namespace may not create devices"
                        ));
                        return Ok(());
                    }
                    Err(e) => return Err(self.sys(&comps, "mknod")(e)),
                }
                self.chown_at(pfd, name, uid, gid, &comps)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                self.report
                    .warnings
                    .push(format!("entry {path_str} of tar type {other:?} skipped"));
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8], path: &str) -> R<()> {
        if target == b".wh..opq" {
            let dir = self.ensure_dir(parent)?;
            let dir = openat(dir.as_raw_fd(), b".", OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(self.sys(parent, "open opaque directory"))?;
            let trusted = self.real_root && fsetxattr(&dir, "trusted.overlay.opaque", b"y").is_ok();
            let user = fsetxattr(&dir, "user.overlay.opaque", b"y");
            if let (false, Err(e)) = (trusted, user) {
                return Err(self
                    .sys(parent, "set user.overlay.opaque (opaque whiteout)")(
                    e
                ));
            }
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') {
            return Err(UnpackError::Refused {
                path: path.to_string(),
                reason: "whiteout of an invalid name".into(),
            });
        }
        let pfd = self.ensure_dir(parent)?;
        let mut comps = parent.to_vec();
        comps.push(target);
        self.replace(pfd.as_raw_fd(), target, &comps)?;
        stat::mknodat(
            Some(pfd.as_raw_fd()),
            target,
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .map_err(self.sys(&comps, "create whiteout (0/0 character device)"))?;
        Ok(())
    }

    fn hardlink(&mut self, pfd: RawFd, name: &[u8], comps: &[&[u8]], target: &[&[u8]]) -> R<()> {
        let Some((tname, tparent)) = target.split_last() else {
            return Err(UnpackError::Refused {
                path: show(comps),
                reason: "hardlink to the layer root".into(),
            });
        };
        let cross = |me: &mut Applier| {
            me.report
                .cross_layer_links
                .push((show(comps), show(target)));
            Ok(())
        };
        let tdir = match self.open_in_root(tparent, OFlag::O_PATH) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return cross(self),
            Err(e) => return Err(self.sys(target, "open hardlink target directory")(e)),
        };
        match stat::fstatat(
            Some(tdir.as_raw_fd()),
            *tname,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => {
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                    return Err(UnpackError::Refused {
                        path: show(comps),
                        reason: "hardlink to a directory".into(),
                    });
                }
                if let Ok(me) =
                    stat::fstatat(Some(pfd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                {
                    if me.st_ino == st.st_ino && me.st_dev == st.st_dev {
                        return Ok(());
                    }
                }
            }
            Err(Errno::ENOENT) => return cross(self),
            Err(e) => return Err(self.sys(target, "stat hardlink target")(e)),
        }
        self.replace(pfd, name, comps)?;
        unistd::linkat(
            Some(tdir.as_raw_fd()),
            *tname,
            Some(pfd),
            name,
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(self.sys(comps, "hardlink"))?;
        Ok(())
    }

    /// Removes whatever is at `name` (a file replacing a directory, or the reverse).
    fn replace(&self, pfd: RawFd, name: &[u8], comps: &[&[u8]]) -> R<()> {
        match remove_all_at(pfd, name) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.sys(comps, "remove existing entry")(e)),
        }
    }

    fn chown_fd(&mut self, fd: &OwnedFd, uid: u32, gid: u32, comps: &[&[u8]]) -> R<()> {
        if !self.owners {
            return Ok(());
        }
        let r = unistd::fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        );
        self.chown_result(r, uid, gid, comps)
    }

    fn chown_at(&mut self, pfd: RawFd, name: &[u8], uid: u32, gid: u32, comps: &[&[u8]]) -> R<()> {
        if !self.owners {
            return Ok(());
        }
        let r = unistd::fchownat(
            Some(pfd),
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        self.chown_result(r, uid, gid, comps)
    }

    fn chown_result(&mut self, r: nix::Result<()>, uid: u32, gid: u32, comps: &[&[u8]]) -> R<()> {
        match r {
            Ok(()) => Ok(()),
            // The id is not mapped in this user namespace (subuid range too small).
            Err(Errno::EINVAL) => {
                self.warn_once(
                    "unmapped-id",
                    format!(
                        "{}: owner {uid}:{gid} is not mapped in this user namespace; left to root (further such entries not listed)",
                        show(comps)
                    ),
                );
                Ok(())
            }
            Err(e) => Err(self.sys(comps, "chown")(e)),
        }
    }

    fn set_xattrs(&mut self, fd: &OwnedFd, xattrs: &[(String, Vec<u8>)], comps: &[&[u8]]) -> R<()> {
        for (key, value) in xattrs {
            let allowed = (key.starts_with("user.") && !key.starts_with("user.overlay."))
                || key == "security.capability"
                || key == "system.posix_acl_access"
                || key == "system.posix_acl_default";
            if !allowed {
                self.warn_once(
                    "xattr-filtered",
                    format!("{}: xattr {key} dropped (only user.*, file capabilities and ACLs are kept; further drops not listed)", show(comps)),
                );
                continue;
            }
            if let Err(e) = fsetxattr(fd, key, value) {
                self.warn_once(
                    "xattr-failed",
                    format!(
                        "{}: xattr {key} not set: {e} (further failures not listed)",
                        show(comps)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Directory modes and mtimes, deepest first.
    fn finish_dirs(&mut self) -> R<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for (path, meta) in dirs.iter().rev() {
            let comps: Vec<&[u8]> = if path.is_empty() {
                Vec::new()
            } else {
                path.split(|b| *b == b'/').collect()
            };
            let fd = match comps.split_last() {
                None => self.open_in_root(&[], OFlag::O_RDONLY),
                Some((name, parent)) => match self.open_in_root(parent, OFlag::O_PATH) {
                    Ok(p) => openat(
                        p.as_raw_fd(),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    ),
                    Err(e) => Err(e),
                },
            };
            // Replaced by a non-directory later in the layer: nothing to apply.
            let Ok(fd) = fd else { continue };
            stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(meta.mode))
                .map_err(self.sys(&comps, "chmod directory"))?;
            let t = TimeSpec::new(meta.mtime, 0);
            stat::futimens(fd.as_raw_fd(), &t, &t)
                .map_err(self.sys(&comps, "set directory mtime"))?;
        }
        Ok(())
    }
}

fn openat(dirfd: RawFd, name: &[u8], flags: OFlag) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        Some(dirfd),
        name,
        flags | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map(owned)
}

fn fsetxattr(fd: impl AsFd, key: &str, value: &[u8]) -> Result<(), Errno> {
    rustix::fs::fsetxattr(fd, key, value, rustix::fs::XattrFlags::empty())
        .map_err(|e| Errno::from_raw(e.raw_os_error()))
}

/// Removes `name` under `dirfd` without following symlinks; directories recursively.
pub(crate) fn remove_all_at(dirfd: RawFd, name: &[u8]) -> Result<(), Errno> {
    let st = stat::fstatat(Some(dirfd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return unistd::unlinkat(Some(dirfd), name, unistd::UnlinkatFlags::NoRemoveDir);
    }
    let open = || {
        openat(
            dirfd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        )
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(Errno::EACCES) => {
            // A read-only directory of our own (rootless): make it ours to empty.
            stat::fchmodat(
                Some(dirfd),
                name,
                Mode::from_bits_truncate(0o700),
                stat::FchmodatFlags::FollowSymlink,
            )?;
            open()?
        }
        Err(e) => return Err(e),
    };
    let _ = stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700));
    let mut dir = nix::dir::Dir::from_fd(nix::unistd::dup(fd.as_raw_fd())?)?;
    let names: Vec<Vec<u8>> = dir
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    for n in names {
        remove_all_at(fd.as_raw_fd(), &n)?;
    }
    unistd::unlinkat(Some(dirfd), name, unistd::UnlinkatFlags::RemoveDir)
}

/// Removes a directory tree that may contain read-only directories (rootless layers).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no parent")),
    };
    let pfd = File::open(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })?;
    match remove_all_at(pfd.as_raw_fd(), name.as_bytes()) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What [`resolve_cross_layer_links`] did.
#[derive(Debug, Default)]
pub struct CrossLayerLinks {
    /// "path -> target: reason" of links that could not be made.
    pub unresolved: Vec<String>,
    /// Bytes copied (charged against the layer's cap); reflinked copies cost nothing.
    pub copied: u64,
}

/// Gives the cross-layer hardlinks of a freshly unpacked layer their content from the
/// image's lower layers (`lowers`: rootfs directories, topmost first). A layer directory
/// cannot hardlink into another one, so the first link to a target gets a copy (a
/// reflink where the filesystem can share blocks, else a byte copy charged against
/// `limits` on top of the `written` bytes the layer has already written) and every
/// further link to that target becomes a hardlink to the copy: 24 links to one 64 MiB
/// file cost 64 MiB, not 1.5 GiB. The copy has the target's content, mode, owner and
/// mtime.
pub fn resolve_cross_layer_links(
    root: &Path,
    links: &[(String, String)],
    lowers: &[PathBuf],
    limits: &Limits,
    written: u64,
) -> Result<CrossLayerLinks, UnpackError> {
    let mut out = CrossLayerLinks::default();
    let mut written = written;
    let mut buf = Vec::new();
    let root_fd = OwnedFd::from(File::open(root)?);
    let lower_fds = lowers
        .iter()
        .map(|l| File::open(l).map(OwnedFd::from))
        .collect::<io::Result<Vec<_>>>()?;
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(RESOLVE)
    };
    // Target -> the path of its copy in this layer.
    let mut copies: BTreeMap<String, &str> = BTreeMap::new();
    for (path, target) in links {
        let comps = clean(path.as_bytes(), usize::MAX).unwrap_or_default();
        let Some((name, parent)) = comps.split_last() else {
            continue;
        };
        let pfd = match openat2(
            root_fd.as_raw_fd(),
            if parent.is_empty() {
                b".".to_vec()
            } else {
                join(parent)
            }
            .as_slice(),
            how(OFlag::O_PATH | OFlag::O_DIRECTORY),
        ) {
            Ok(fd) => owned(fd),
            Err(e) => {
                out.unresolved.push(format!("{path} -> {target}: {e}"));
                continue;
            }
        };
        let key = show(&clean(target.as_bytes(), usize::MAX).unwrap_or_default());
        if let Some(first) = copies.get(&key) {
            // Another link to a target already copied: link to that copy.
            let first_comps = clean(first.as_bytes(), usize::MAX).unwrap_or_default();
            let linked = match first_comps.split_last() {
                Some((fname, fparent)) => openat2(
                    root_fd.as_raw_fd(),
                    if fparent.is_empty() {
                        b".".to_vec()
                    } else {
                        join(fparent)
                    }
                    .as_slice(),
                    how(OFlag::O_PATH | OFlag::O_DIRECTORY),
                )
                .and_then(|fdir| {
                    let fdir = owned(fdir);
                    let _ = remove_all_at(pfd.as_raw_fd(), name);
                    unistd::linkat(
                        Some(fdir.as_raw_fd()),
                        *fname,
                        Some(pfd.as_raw_fd()),
                        *name,
                        nix::fcntl::AtFlags::empty(),
                    )
                }),
                None => Err(Errno::EINVAL),
            };
            if let Err(e) = linked {
                out.unresolved.push(format!("{path} -> {target}: {e}"));
            }
            continue;
        }
        let found = lower_fds.iter().find_map(|lower| {
            match openat2(
                lower.as_raw_fd(),
                target.as_str(),
                how(OFlag::O_RDONLY | OFlag::O_NOFOLLOW),
            ) {
                Ok(fd) => Some(Ok(File::from(owned(fd)))),
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => None,
                Err(e) => Some(Err(e)),
            }
        });
        let src = match found {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                out.unresolved.push(format!("{path} -> {target}: {e}"));
                continue;
            }
            None => {
                out.unresolved.push(format!(
                    "{path} -> {target}: target not found in any lower layer"
                ));
                continue;
            }
        };
        let meta = src.metadata()?;
        if !meta.is_file() {
            out.unresolved
                .push(format!("{path} -> {target}: not a regular file"));
            continue;
        }
        let _ = remove_all_at(pfd.as_raw_fd(), name);
        let dst = openat(
            pfd.as_raw_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        )
        .map_err(|e| UnpackError::Sys {
            path: path.clone(),
            op: "create copy of cross-layer hardlink",
            errno: e,
        })?;
        let mut dst = File::from(dst);
        if reflink(&src, &dst).is_err() {
            written = charge(written, meta.len(), limits, path)?;
            out.copied += meta.len();
            write_sparse(&src, &mut dst, &mut buf).map_err(|e| e.at(path))?;
        }
        use std::os::unix::fs::MetadataExt;
        if unistd::geteuid().is_root() {
            let _ = unistd::fchown(
                dst.as_raw_fd(),
                Some(Uid::from_raw(meta.uid())),
                Some(Gid::from_raw(meta.gid())),
            );
        }
        let _ = stat::fchmod(
            dst.as_raw_fd(),
            Mode::from_bits_truncate(meta.mode() & 0o7777),
        );
        let t = TimeSpec::new(meta.mtime(), 0);
        let _ = stat::futimens(dst.as_raw_fd(), &t, &t);
        copies.insert(key, path);
    }
    Ok(out)
}

/// Makes `dst` share `src`'s blocks (`FICLONE`: btrfs, XFS, bcachefs...). Fails with
/// `EOPNOTSUPP`/`EXDEV`/`EINVAL` where the filesystem cannot.
fn reflink(src: &File, dst: &File) -> Result<(), Errno> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(|e| Errno::from_raw(e.raw_os_error()))
}

/// Name of a path for messages.
pub fn display(p: &[u8]) -> String {
    OsStr::from_bytes(p).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// Builds a tar in memory from (path, kind, data/target) triples.
    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        FileMode(&'a str, &'a [u8], u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Char(&'a str),
    }

    fn tar_of(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let (path, data): (&str, &[u8]) = match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (p, b"")
                }
                E::File(p, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    (p, d)
                }
                E::FileMode(p, d, m) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*m);
                    (p, d)
                }
                E::Sym(p, t) | E::Hard(p, t) => {
                    h.set_entry_type(if matches!(e, E::Sym(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_mode(0o777);
                    raw_name(&mut h, t.as_bytes(), true);
                    (p, b"")
                }
                E::Char(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o666);
                    h.set_device_major(8).unwrap();
                    h.set_device_minor(0).unwrap();
                    (p, b"")
                }
            };
            raw_name(&mut h, path.as_bytes(), false);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Writes names as-is (the tar crate's setters refuse `..`, which hostile layers use).
    fn raw_name(h: &mut tar::Header, name: &[u8], link: bool) {
        let gnu = h.as_gnu_mut().unwrap();
        let field: &mut [u8] = if link {
            &mut gnu.linkname
        } else {
            &mut gnu.name
        };
        field.fill(0);
        field[..name.len()].copy_from_slice(name);
    }

    fn apply(entries: &[E]) -> (tempfile::TempDir, R<UnpackReport>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let r = apply_layer(
            &tar_of(entries)[..],
            &dir.path().join("root"),
            &UnpackOptions::default(),
        );
        (dir, r)
    }

    fn outside_untouched(dir: &Path) {
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("root")],
            "something written outside the root"
        );
    }

    #[test]
    fn plain_layer() {
        let (d, r) = apply(&[
            E::Dir("etc/"),
            E::File("etc/passwd", b"root:x:0:0"),
            E::FileMode("bin/su", b"x", 0o4755),
            E::Sym("bin/sh", "busybox"),
            E::Hard("bin/login", "bin/su"),
        ]);
        let r = r.unwrap();
        let root = d.path().join("root");
        assert_eq!(
            std::fs::read(root.join("etc/passwd")).unwrap(),
            b"root:x:0:0"
        );
        let su = std::fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(su.mtime(), 1_000_000);
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            std::fs::metadata(root.join("bin/login")).unwrap().ino(),
            su.ino()
        );
        assert_eq!(r.entries, 5);
        assert!(r.cross_layer_links.is_empty());
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (d, r) = apply(&[
            E::Dir("a/"),
            E::File("a/.wh.gone", b""),
            E::File("a/.wh..wh..opq", b""),
            E::File("a/kept", b"k"),
        ]);
        r.unwrap();
        let root = d.path().join("root");
        let wh = std::fs::symlink_metadata(root.join("a/gone")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!root.join("a/.wh.gone").exists());
        assert!(!root.join("a/.wh..wh..opq").exists());
        assert_eq!(std::fs::read(root.join("a/kept")).unwrap(), b"k");
    }

    #[test]
    fn file_replaces_directory_and_back() {
        let (d, r) = apply(&[
            E::Dir("x/"),
            E::File("x/y", b"1"),
            E::File("x", b"file"),
            E::Dir("f/"),
            E::File("f", b"2"),
            E::Dir("f/"),
        ]);
        r.unwrap();
        let root = d.path().join("root");
        assert_eq!(std::fs::read(root.join("x")).unwrap(), b"file");
        assert!(root.join("f").is_dir());
    }

    #[test]
    fn hostile_paths_are_contained() {
        let (d, r) = apply(&[
            E::File("../escape", b"x"),
            E::File("/abs", b"y"),
            E::File("a/../../../up", b"z"),
        ]);
        r.unwrap();
        outside_untouched(d.path());
        let root = d.path().join("root");
        assert!(root.join("escape").is_file());
        assert!(root.join("abs").is_file());
        assert!(root.join("up").is_file());
    }

    #[test]
    fn writes_through_symlinks_stay_inside() {
        let (d, r) = apply(&[
            E::Sym("link", "/"),
            E::File("link/../../owned", b"x"),
            E::Sym("dotdot", "../../.."),
            E::File("dotdot/owned2", b"x"),
            E::Dir("tmp/"),
            E::Sym("abs", "/tmp"),
            E::File("abs/owned3", b"x"),
        ]);
        r.unwrap();
        outside_untouched(d.path());
        let root = d.path().join("root");
        assert!(root.join("owned").is_file());
        assert!(root.join("owned2").is_file());
        assert!(root.join("tmp/owned3").is_file());
        let (d, r) = apply(&[E::Sym("dangling", "/nowhere"), E::File("dangling/x", b"x")]);
        assert!(matches!(r, Err(UnpackError::Refused { .. })), "{r:?}");
        outside_untouched(d.path());
    }

    #[test]
    fn file_over_symlink_replaces_the_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("victim"), b"safe").unwrap();
        let victim = dir.path().join("victim");
        let tar = tar_of(&[
            E::Sym("v", victim.to_str().unwrap()),
            E::File("v", b"pwned"),
        ]);
        apply_layer(
            &tar[..],
            &dir.path().join("root"),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
        assert_eq!(std::fs::read(dir.path().join("root/v")).unwrap(), b"pwned");
    }

    #[test]
    fn hardlinks_cannot_reach_outside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        let tar = tar_of(&[
            E::Hard("h1", "../secret"),
            E::Sym("s", ".."),
            E::Hard("h2", "s/secret"),
        ]);
        let r = apply_layer(
            &tar[..],
            &dir.path().join("root"),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert!(!dir.path().join("root/h1").exists());
        assert!(!dir.path().join("root/h2").exists());
        // Neither resolves inside this layer: reported for the lower layers, not linked.
        assert_eq!(r.cross_layer_links.len(), 2);
        assert_eq!(
            std::fs::metadata(dir.path().join("secret"))
                .unwrap()
                .nlink(),
            1
        );
    }

    #[test]
    fn bad_whiteouts_are_refused() {
        for name in [".wh.", ".wh..", "a/.wh.."] {
            let (_d, r) = apply(&[E::File(name, b"")]);
            assert!(
                matches!(r, Err(UnpackError::Refused { .. })),
                "{name}: {r:?}"
            );
        }
    }

    #[test]
    fn symlink_named_dot_is_contained() {
        // `.` cleans to the root entry, which is not replaced by a symlink.
        let (d, r) = apply(&[E::Sym(".", "/etc"), E::File("x", b"1")]);
        r.unwrap();
        outside_untouched(d.path());
        assert!(d.path().join("root").is_dir());
        assert!(d.path().join("root/x").is_file());
    }

    #[test]
    fn limits_are_enforced() {
        let big = vec![0u8; 10_000];
        let tar = tar_of(&[E::File("a", &big), E::File("b", b"1"), E::File("c", b"2")]);
        let dir = tempfile::tempdir().unwrap();
        let mk = |n: &str| {
            let p = dir.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let opts = |b, e, p| UnpackOptions {
            limits: Limits {
                max_written: b,
                max_entries: e,
                max_path: p,
                origin: "test".into(),
            },
        };
        let r = apply_layer(&tar[..], &mk("1"), &opts(5000, 10, 100));
        assert!(
            matches!(&r, Err(UnpackError::TooLarge { path, limit: 5000, .. }) if path == "a"),
            "{r:?}"
        );
        assert!(!dir.path().join("1/a").exists(), "refused before writing");
        assert!(matches!(
            apply_layer(&tar[..], &mk("2"), &opts(1 << 20, 2, 100)),
            Err(UnpackError::Limit(_))
        ));
        let long = "d/".repeat(60) + "f";
        let tar2 = tar_of(&[E::File(&long[..99], b"")]);
        assert!(matches!(
            apply_layer(&tar2[..], &mk("3"), &opts(1 << 20, 10, 50)),
            Err(UnpackError::Refused { .. })
        ));
    }

    #[test]
    fn device_nodes_rootless_are_skipped_with_a_warning() {
        let (d, r) = apply(&[E::Char("dev/sda")]);
        let r = r.unwrap();
        if !unistd::geteuid().is_root() {
            assert!(!d.path().join("root/dev/sda").exists());
            assert!(r.warnings.iter().any(|w| w.contains("dev/sda")));
        } else {
            eprintln!("running as root: the device node is created");
            assert!(
                std::fs::symlink_metadata(d.path().join("root/dev/sda"))
                    .unwrap()
                    .file_type()
                    .is_block_device()
                    || std::fs::symlink_metadata(d.path().join("root/dev/sda"))
                        .unwrap()
                        .file_type()
                        .is_char_device()
            );
        }
    }

    /// A GNU sparse entry `name` of `real_size` bytes whose only data is `data` at
    /// `offset` (a multiple of 512).
    fn sparse_tar(name: &str, real_size: u64, offset: u64, data: &[u8; 512]) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_mtime(1_000_000);
        h.set_size(512);
        raw_name(&mut h, name.as_bytes(), false);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real_size);
        gnu.sparse[0].set_offset(offset);
        gnu.sparse[0].set_length(512);
        // The map ends with an empty block at the end of the file, as GNU tar writes it.
        gnu.sparse[1].set_offset(real_size);
        gnu.sparse[1].set_length(0);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn sparse_entries_stay_sparse() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let tar = sparse_tar("big", 64 << 20, 32 << 20, &[7u8; 512]);
        let r = apply_layer(
            &tar[..],
            &dir.path().join("root"),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert_eq!(r.written, 64 << 20, "charged its full length");
        let meta = std::fs::metadata(dir.path().join("root/big")).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        use std::os::unix::fs::FileExt;
        let mut at = [0u8; 4];
        File::open(dir.path().join("root/big"))
            .unwrap()
            .read_exact_at(&mut at, (32 << 20) - 2)
            .unwrap();
        assert_eq!(at, [0, 0, 7, 7]);
    }

    #[test]
    fn sparse_entry_past_the_cap_is_refused_before_writing() {
        // 2 GiB declared by a layer of 98 compressed bytes.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let tar = sparse_tar("huge", 2 << 30, 0, &[1u8; 512]);
        let opts = UnpackOptions {
            limits: Limits::for_layer(98, None),
        };
        let e = apply_layer(&tar[..], &dir.path().join("root"), &opts).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, UnpackError::TooLarge { limit, .. } if limit == LAYER_FLOOR));
        assert!(
            msg.contains("`huge`") && msg.contains("256.00 MiB"),
            "{msg}"
        );
        assert!(
            msg.contains("64 times the layer's compressed size of 98 B"),
            "{msg}"
        );
        assert!(!dir.path().join("root/huge").exists());
    }

    #[test]
    fn zero_runs_of_plain_files_become_holes() {
        let mut data = vec![0u8; 1 << 20];
        data[0] = 1;
        data[(1 << 20) - 1] = 2;
        let (d, r) = apply(&[E::File("z", &data)]);
        assert_eq!(r.unwrap().written, 1 << 20);
        let path = d.path().join("root/z");
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 64 << 10);
    }

    #[test]
    fn many_links_to_one_lower_file_share_one_copy_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::write(lower.join("blob"), vec![5u8; 1 << 20]).unwrap();
        let names: Vec<String> = (0..24).map(|i| format!("l{i}")).collect();
        let entries: Vec<E> = names.iter().map(|n| E::Hard(n, "blob")).collect();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let r = apply_layer(&tar_of(&entries)[..], &root, &UnpackOptions::default()).unwrap();
        assert_eq!(r.cross_layer_links.len(), 24);
        // 24 copies would be 24 MiB: a 2 MiB cap holds only if they share one.
        let limits = Limits {
            max_written: 2 << 20,
            ..Limits::default()
        };
        let done = resolve_cross_layer_links(
            &root,
            &r.cross_layer_links,
            std::slice::from_ref(&lower),
            &limits,
            r.written,
        )
        .unwrap();
        assert!(done.unresolved.is_empty(), "{:?}", done.unresolved);
        assert!(done.copied <= 1 << 20);
        let first = std::fs::metadata(root.join("l0")).unwrap();
        assert_eq!(first.nlink(), 24);
        assert_eq!(std::fs::read(root.join("l23")).unwrap(), vec![5u8; 1 << 20]);
        // A copy that does not fit is refused, naming the link.
        let root2 = dir.path().join("root2");
        std::fs::create_dir(&root2).unwrap();
        let small = Limits {
            max_written: 1000,
            origin: "test".into(),
            ..Limits::default()
        };
        let e = resolve_cross_layer_links(&root2, &r.cross_layer_links, &[lower], &small, 0);
        if reflink_supported(&root2) {
            e.unwrap();
        } else {
            let e = e.unwrap_err();
            assert!(
                matches!(&e, UnpackError::TooLarge { path, .. } if path == "l0"),
                "{e}"
            );
        }
    }

    /// Whether the filesystem of `dir` shares blocks (then copies cost nothing).
    fn reflink_supported(dir: &Path) -> bool {
        let a = dir.join(".reflink-probe-a");
        std::fs::write(&a, b"x").unwrap();
        let src = File::open(&a).unwrap();
        let dst = File::create(dir.join(".reflink-probe-b")).unwrap();
        let ok = reflink(&src, &dst).is_ok();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(dir.join(".reflink-probe-b"));
        ok
    }

    #[test]
    fn cross_layer_links_are_copied_from_lowers() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        std::fs::create_dir_all(lower.join("bin")).unwrap();
        std::fs::write(lower.join("bin/tool"), b"tool").unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let tar = tar_of(&[E::Hard("bin/alias", "bin/tool")]);
        let r = apply_layer(
            &tar[..],
            &dir.path().join("root"),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert_eq!(
            r.cross_layer_links,
            vec![("bin/alias".to_string(), "bin/tool".to_string())]
        );
        let done = resolve_cross_layer_links(
            &dir.path().join("root"),
            &r.cross_layer_links,
            &[lower],
            &Limits::default(),
            r.written,
        )
        .unwrap();
        assert!(done.unresolved.is_empty());
        assert_eq!(
            std::fs::read(dir.path().join("root/bin/alias")).unwrap(),
            b"tool"
        );
    }

    #[test]
    fn read_only_directories_can_be_removed() {
        let (d, r) = apply(&[E::Dir("ro/"), E::File("ro/f", b"1")]);
        r.unwrap();
        let root = d.path().join("root");
        std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }
}
