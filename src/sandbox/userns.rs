//! Rootless mode: the runner moves itself into a fresh user + mount namespace before
//! it starts any thread, and becomes uid 0 there (the way `podman unshare` and
//! rootlesskit work). Everything it does afterwards (unpacking layers with their real
//! owners, mounting overlays, creating network namespaces, starting containers) runs as
//! that namespaced root, and the kernel takes the namespaces down when sandrun dies.
//!
//! Ids: uid 0 inside is the invoking user; 1..=N are the user's `/etc/subuid` range
//! (and `/etc/subgid` for groups), mapped by Debian's setuid helpers
//! `newuidmap`/`newgidmap`. Those can only write the map of *another* process, so two
//! forked children (one per helper) map their parent once the parent has unshared. Without the helpers or a
//! range, only the invoking user is mapped (as root): that runs most images, but not
//! those whose services switch to another user; [`UsernsInfo::limitation`] says so.
//!
//! The network namespace is deliberately kept: port-binding listeners must live on the
//! host's loopback and registries must stay reachable (see docs/ARCHITECTURE.md).

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{getgid, getpid, getuid, Gid, Pid, Uid, User};

use super::error::SandboxError;

/// A range of subordinate ids on the host (`start`, `count`), from /etc/subuid or
/// /etc/subgid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// How ids inside the namespace map to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdMapping {
    /// 0 = the invoking user, 1..=N = the subordinate ranges, in order.
    Subordinate {
        uids: Vec<IdRange>,
        gids: Vec<IdRange>,
    },
    /// Only 0 = the invoking user (and its primary group); `reason` says why.
    Single { reason: String },
}

/// What the processes in the namespace see at /sys/fs/cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupView {
    /// The host's own hierarchy, untouched.
    Host,
    /// A hybrid (v1 + v2) host whose `/sys/fs/cgroup/unified` was bind-mounted over
    /// `/sys/fs/cgroup` inside the private mount namespace, so that libcontainer sees a
    /// cgroup2-only host and does not try the v1 controllers it cannot use rootless.
    UnifiedOverHybrid,
}

/// The result of [`enter_rootless`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsernsInfo {
    /// The invoking user on the host (uid 0 inside).
    pub outside_uid: u32,
    pub outside_gid: u32,
    pub user_name: Option<String>,
    pub mapping: IdMapping,
    pub cgroups: CgroupView,
}

impl UsernsInfo {
    /// Number of uids usable inside (0..count).
    pub fn mapped_uids(&self) -> u64 {
        match &self.mapping {
            IdMapping::Subordinate { uids, .. } => {
                1 + uids.iter().map(|r| u64::from(r.count)).sum::<u64>()
            }
            IdMapping::Single { .. } => 1,
        }
    }

    /// What will not work with this mapping, in words for the user; `None` when the
    /// mapping covers what images normally use (0..=65534).
    pub fn limitation(&self) -> Option<String> {
        let user = self
            .user_name
            .clone()
            .unwrap_or_else(|| self.outside_uid.to_string());
        let fix = format!(
            "install `uidmap` and give {user} ranges in /etc/subuid and /etc/subgid \
             (e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`)"
        );
        match &self.mapping {
            IdMapping::Single { reason } => Some(format!(
                "only one id is mapped ({user} is root inside the containers) because {reason}: \
                 images whose services switch to another user (postgres and redis as uid 999, \
                 nginx workers as 101...) cannot run, and files their layers give to other \
                 users belong to root; {fix}"
            )),
            IdMapping::Subordinate { .. } if self.mapped_uids() < 65535 => Some(format!(
                "only uids 0..{} are mapped: images using higher ids (e.g. `nobody`, 65534) \
                 cannot run them; {fix}",
                self.mapped_uids() - 1
            )),
            IdMapping::Subordinate { .. } => None,
        }
    }
}

/// Marks every mount of the caller's (new) mount namespace private, so that nothing
/// mounted here propagates back to the namespace it was copied from.
pub(crate) fn make_mounts_private() -> Result<(), SandboxError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("make mounts private in the new mount namespace", e))
}

/// Moves the calling process into a new user + mount namespace as its uid 0.
///
/// Must be called while the process is single-threaded (before the tokio runtime) and
/// only when the effective uid is not 0. The network namespace is kept.
pub fn enter_rootless() -> Result<UsernsInfo, SandboxError> {
    begin_rootless()?.finish()
}

/// A user + mount namespace entered, whose id maps may still be being written by
/// newuidmap and newgidmap. Until [`PendingRootless::finish`] returns, the process may
/// start threads and do what needs only the namespace's capabilities (create network
/// namespaces, configure links), but must not rely on its ids (they read as the
/// overflow id) nor create files meant for the mapped ids.
pub struct PendingRootless {
    uid: u32,
    gid: u32,
    user_name: Option<String>,
    helpers: Option<(Vec<IdRange>, Vec<IdRange>, MapHelpers)>,
    /// Why subordinate ranges are not used, when they are not.
    single_reason: Option<String>,
}

/// The id-mapping children of [`prepare_rootless`], forked and waiting for
/// [`PreparedRootless::begin`].
pub struct PreparedRootless {
    uid: u32,
    gid: u32,
    user_name: Option<String>,
    /// The mapping children, or why subordinate ranges are not used.
    mapper: Result<(Vec<IdRange>, Vec<IdRange>, Mapper), String>,
}

/// The first part of [`enter_rootless`], for a process that will enter later: forks
/// the two children that are to execute newuidmap and newgidmap (they wait, already
/// scheduled, for [`PreparedRootless::begin`]). Call it early, while the process is
/// small and single-threaded.
pub fn prepare_rootless() -> Result<PreparedRootless, SandboxError> {
    require_single_thread()?;
    let uid = getuid().as_raw();
    let gid = getgid().as_raw();
    let user_name = User::from_uid(getuid()).ok().flatten().map(|u| u.name);
    let mapper = match plan_mapping(uid, user_name.as_deref()) {
        Ok((uids, gids, newuidmap, newgidmap)) => {
            let mapper = fork_mapper(uid, gid, &uids, &gids, &newuidmap, &newgidmap)?;
            Ok((uids, gids, mapper))
        }
        Err(reason) => Err(reason),
    };
    Ok(PreparedRootless {
        uid,
        gid,
        user_name,
        mapper,
    })
}

/// [`prepare_rootless`] and [`PreparedRootless::begin`] at once.
pub fn begin_rootless() -> Result<PendingRootless, SandboxError> {
    prepare_rootless()?.begin()
}

impl PreparedRootless {
    /// The part of [`enter_rootless`] that must happen while the process is
    /// single-threaded: unshare the namespaces and let the id-mapping helpers go,
    /// without waiting for them.
    pub fn begin(self) -> Result<PendingRootless, SandboxError> {
        self.begin_with(|| ())
    }

    /// [`PreparedRootless::begin`], running `before_go` in the new namespaces right
    /// before the id-mapping helpers are let go (not at all if unsharing failed): what
    /// must be forked while single-threaded, or should start before the helpers take
    /// the CPUs.
    pub fn begin_with(self, before_go: impl FnOnce()) -> Result<PendingRootless, SandboxError> {
        require_single_thread()?;
        let unshared = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS);
        if unshared.is_ok() {
            before_go();
        }
        let (helpers, single_reason) = match self.mapper {
            Ok((uids, gids, mapper)) => {
                let helpers = mapper.go(unshared.is_ok());
                (Some((uids, gids, helpers)), None)
            }
            Err(reason) => (None, Some(reason)),
        };
        if let Err(e) = unshared {
            if let Some((_, _, helpers)) = helpers {
                let _ = helpers.wait();
            }
            return Err(SandboxError::sys("unshare a user and mount namespace", e));
        }
        Ok(PendingRootless {
            uid: self.uid,
            gid: self.gid,
            user_name: self.user_name,
            helpers,
            single_reason,
        })
    }
}

impl PendingRootless {
    /// Waits for the id maps (writing a single-id map if the helpers failed), becomes
    /// uid 0 of the namespace and prepares its mounts. Any thread may call it.
    pub fn finish(self) -> Result<UsernsInfo, SandboxError> {
        let (uid, gid) = (self.uid, self.gid);
        let mapping = match self.helpers {
            Some((uids, gids, helpers)) => match helpers.wait() {
                Ok(()) => IdMapping::Subordinate { uids, gids },
                Err(failure) => {
                    write_single_mapping(uid, gid)?;
                    IdMapping::Single { reason: failure }
                }
            },
            None => {
                write_single_mapping(uid, gid)?;
                IdMapping::Single {
                    reason: self.single_reason.unwrap_or_default(),
                }
            }
        };

        become_root(matches!(mapping, IdMapping::Subordinate { .. }))?;
        make_mounts_private()?;
        let cgroups = if is_hybrid_cgroup_host() {
            mount(
                Some("/sys/fs/cgroup/unified"),
                "/sys/fs/cgroup",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| SandboxError::sys("bind /sys/fs/cgroup/unified over /sys/fs/cgroup", e))?;
            CgroupView::UnifiedOverHybrid
        } else {
            CgroupView::Host
        };

        Ok(UsernsInfo {
            outside_uid: uid,
            outside_gid: gid,
            user_name: self.user_name,
            mapping,
            cgroups,
        })
    }
}

/// True when the calling process runs in a user namespace other than the initial one.
pub fn in_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map")
        .map(|m| !is_initial_map(&m))
        .unwrap_or(false)
}

fn is_initial_map(map: &str) -> bool {
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// `true` when /sys/fs/cgroup is a v1 (or hybrid) tree with a cgroup2 mount at
/// /sys/fs/cgroup/unified.
pub fn is_hybrid_cgroup_host() -> bool {
    let top_is_v2 = statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    let unified_is_v2 = statfs("/sys/fs/cgroup/unified")
        .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    !top_is_v2 && unified_is_v2
}

type Plan = (Vec<IdRange>, Vec<IdRange>, PathBuf, PathBuf);

/// Decides whether subordinate ranges can be mapped; `Err` holds the reason why not.
fn plan_mapping(uid: u32, user: Option<&str>) -> Result<Plan, String> {
    let newuidmap = find_in_path("newuidmap");
    let newgidmap = find_in_path("newgidmap");
    let (Some(newuidmap), Some(newgidmap)) = (newuidmap, newgidmap) else {
        return Err("newuidmap/newgidmap (Debian package `uidmap`) are not in PATH".into());
    };
    let who = user.map(str::to_owned).unwrap_or_else(|| uid.to_string());
    let uids = read_subids("/etc/subuid", uid, user);
    let gids = read_subids("/etc/subgid", uid, user);
    if uids.is_empty() {
        return Err(format!("/etc/subuid has no range for {who}"));
    }
    if gids.is_empty() {
        return Err(format!("/etc/subgid has no range for {who}"));
    }
    Ok((uids, gids, newuidmap, newgidmap))
}

fn read_subids(path: &str, uid: u32, user: Option<&str>) -> Vec<IdRange> {
    fs::read_to_string(path)
        .map(|text| parse_subids(&text, uid, user))
        .unwrap_or_default()
}

/// Parses /etc/subuid-style lines (`name-or-uid:start:count`) for one user.
pub fn parse_subids(text: &str, uid: u32, user: Option<&str>) -> Vec<IdRange> {
    let uid_text = uid.to_string();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut parts = line.split(':');
            let owner = parts.next()?;
            let start = parts.next()?.trim().parse().ok()?;
            let count = parts.next()?.trim().parse().ok()?;
            let ours = owner == uid_text || Some(owner) == user;
            (ours && count > 0).then_some(IdRange { start, count })
        })
        .collect()
}

/// The argument list of newuidmap/newgidmap after the pid: `0 <own> 1` then each
/// range at the next free inside id.
pub fn map_arguments(own: u32, ranges: &[IdRange]) -> Vec<String> {
    let mut args = vec!["0".to_string(), own.to_string(), "1".to_string()];
    let mut inside: u64 = 1;
    for r in ranges {
        args.extend([inside.to_string(), r.start.to_string(), r.count.to_string()]);
        inside += u64::from(r.count);
    }
    args
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Unsharing a user namespace, and forking a child that goes on running Rust code,
/// both need a process with one thread.
pub(crate) fn require_single_thread() -> Result<(), SandboxError> {
    match thread_count() {
        threads if threads > 1 => Err(SandboxError::MultiThreaded { threads }),
        _ => Ok(()),
    }
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// The two children running newuidmap and newgidmap on this process.
struct MapHelpers {
    children: Vec<MapChild>,
}

/// A forked child that executes newuidmap or newgidmap once told to.
struct MapChild {
    pid: Pid,
    /// The program, for messages.
    program: String,
    /// The read end of the child's standard error.
    stderr: fs::File,
    /// What the child reads until it executes (it shares our memory).
    _start: Box<ChildStart>,
}

impl MapHelpers {
    /// `Err`: a helper failed (the message says how); the caller falls back.
    fn wait(self) -> Result<(), String> {
        let mut failures = Vec::new();
        for child in self.children {
            if let Err(failure) = child.wait() {
                failures.push(failure);
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }
}

impl MapChild {
    fn wait(mut self) -> Result<(), String> {
        let status = waitpid(self.pid, None);
        let mut message = String::new();
        let _ = self.stderr.read_to_string(&mut message);
        let program = &self.program;
        match status {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(WaitStatus::Exited(_, code)) => Err(format!(
                "{program} failed (exit status: {code}): {}",
                message.trim()
            )),
            other => Err(format!("{program} ended with {other:?}")),
        }
    }
}

/// The children that run newuidmap and newgidmap on this process once told to.
struct Mapper {
    children: Vec<MapChild>,
    /// Written to once per child to let them go; `None` once told (see [`Mapper::go`]).
    go: Option<fs::File>,
}

impl Mapper {
    /// Tells the children to map (`unshared`) or to leave.
    fn go(mut self, unshared: bool) -> MapHelpers {
        let mut go = self.go.take().expect("a mapper is told once");
        if unshared {
            let _ = go.write_all(&vec![b'g'; self.children.len()]);
        }
        MapHelpers {
            children: std::mem::take(&mut self.children),
        }
    }
}

impl Drop for Mapper {
    /// Never told (the run stopped before entering): the children leave on end of file.
    fn drop(&mut self) {
        drop(self.go.take());
        for child in &self.children {
            let _ = waitpid(child.pid, None);
        }
    }
}

/// Starts one child per helper, each waiting until this process has unshared and then
/// executing newuidmap or newgidmap on it. Started ahead and already scheduled, the two
/// run at once when told, each where a CPU is free; spawning them only then (from a
/// single child, one vfork after the other) measured slower on two CPUs.
///
/// The children share this process's memory (`CLONE_VM`, as posix_spawn's children do)
/// instead of getting a copy: a fork of the runner costs ~0.1 ms of page-table copying,
/// and every page the runner writes afterwards would fault to be copied. So a child
/// only reads what was prepared for it here ([`ChildStart`], kept until it is waited
/// for) and makes plain system calls until it executes the helper.
fn fork_mapper(
    uid: u32,
    gid: u32,
    uids: &[IdRange],
    gids: &[IdRange],
    newuidmap: &Path,
    newgidmap: &Path,
) -> Result<Mapper, SandboxError> {
    let parent = getpid().as_raw().to_string();
    let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("create a pipe", e))?;
    let go_write_fd = go_write.as_raw_fd();
    // On an error below, dropping it lets the children already started leave, and
    // waits for them before their memory goes.
    let mut mapper = Mapper {
        children: Vec::with_capacity(2),
        go: Some(fs::File::from(go_write)),
    };
    for (program, own, ranges) in [(newuidmap, uid, uids), (newgidmap, gid, gids)] {
        let argv: Vec<CString> = std::iter::once(program.as_os_str().as_bytes())
            .chain(std::iter::once(parent.as_bytes()))
            .map(<[u8]>::to_vec)
            .chain(
                map_arguments(own, ranges)
                    .into_iter()
                    .map(String::into_bytes),
            )
            .map(|a| CString::new(a).expect("no NUL in a path or number"))
            .collect();
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::sys("create a pipe", e))?;
        let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        pointers.push(std::ptr::null());
        let start = Box::new(ChildStart {
            go: go_read.as_raw_fd(),
            go_write: go_write_fd,
            stderr: err_write.as_raw_fd(),
            _argv: argv,
            pointers,
            stack: vec![0u8; CHILD_STACK],
        });
        // The stack grows down from its (16-byte aligned) end.
        let top = (start.stack.as_ptr() as usize + CHILD_STACK) & !15;
        // SAFETY: the child runs `map_child` on its own stack with `start`, which lives
        // in `MapChild` until the child has been waited for; it makes only system calls
        // (no allocation, no locks) before executing or leaving.
        let pid = unsafe {
            libc::clone(
                map_child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::SIGCHLD,
                (&*start as *const ChildStart).cast_mut().cast(),
            )
        };
        if pid < 0 {
            return Err(SandboxError::sys(
                "start an id-mapping child",
                io::Error::last_os_error(),
            ));
        }
        drop(err_write);
        mapper.children.push(MapChild {
            pid: Pid::from_raw(pid),
            program: program.display().to_string(),
            stderr: fs::File::from(err_read),
            _start: start,
        });
    }
    Ok(mapper)
}

/// Stack of an id-mapping child: a few system calls deep.
const CHILD_STACK: usize = 16 * 1024;

/// What an id-mapping child reads, prepared before it is started.
struct ChildStart {
    go: RawFd,
    go_write: RawFd,
    stderr: RawFd,
    /// Owns the strings `pointers` points into.
    _argv: Vec<CString>,
    /// `argv` as execv(3) takes it, null-terminated.
    pointers: Vec<*const libc::c_char>,
    stack: Vec<u8>,
}

/// The id-mapping child: waits for its byte on `go` (end of file: leave, so it closes
/// its copy of the write end first), then executes its helper with standard error on
/// its pipe. Never returns. It shares the parent's memory: plain system calls only.
extern "C" fn map_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildStart the parent keeps alive for this child.
    let start = unsafe { &*(arg as *const ChildStart) };
    // SAFETY: system calls on descriptors of this child's own table and on memory
    // prepared for it.
    unsafe {
        libc::close(start.go_write);
        let mut byte = 0u8;
        if libc::read(start.go, (&mut byte as *mut u8).cast(), 1) != 1 {
            libc::_exit(2);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
        }
        libc::dup2(start.stderr, 2);
        libc::execv(start.pointers[0], start.pointers.as_ptr());
        let message = b"could not be started\n";
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(127)
    }
}

/// Maps only the invoking user (and group) to 0, as an unprivileged process may do for
/// itself. Parts already written (a uid map by newuidmap before newgidmap failed) stay.
fn write_single_mapping(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let write = |path: &str, text: String| {
        fs::write(path, text).map_err(|e| SandboxError::io("write", path, e))
    };
    if fs::read_to_string("/proc/self/uid_map")
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    }
    if fs::read_to_string("/proc/self/gid_map")
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
    }
    Ok(())
}

pub(crate) fn become_root(may_setgroups: bool) -> Result<(), SandboxError> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    // With the maps written, the invoking user usually is 0:0 of the namespace
    // already: the calls would change nothing, yet glibc signals every thread of the
    // process to apply them, which costs a runner with threads a third of a
    // millisecond.
    let all = |r: nix::unistd::ResUid| [r.real, r.effective, r.saved] == [root_uid; 3];
    let all_g = |r: nix::unistd::ResGid| [r.real, r.effective, r.saved] == [root_gid; 3];
    let ids_done = nix::unistd::getresuid().is_ok_and(all)
        && nix::unistd::getresgid().is_ok_and(all_g)
        && (!may_setgroups || nix::unistd::getgroups().is_ok_and(|g| g.is_empty()));
    if ids_done {
        return Ok(());
    }
    nix::unistd::setresgid(root_gid, root_gid, root_gid)
        .map_err(|e| SandboxError::sys("become gid 0 in the user namespace", e))?;
    if may_setgroups {
        nix::unistd::setgroups(&[])
            .map_err(|e| SandboxError::sys("drop supplementary groups", e))?;
    }
    nix::unistd::setresuid(root_uid, root_uid, root_uid)
        .map_err(|e| SandboxError::sys("become uid 0 in the user namespace", e))
}

/// Runs a process as the invoking user again, from inside the rootless namespace: a
/// nested user namespace maps the invoking user's uid/gid back onto namespaced root
/// (which *is* the invoking user on the host). Host steps use it so that `id`, file
/// ownership and tools like ssh see the user they expect.
#[derive(Clone, Debug)]
pub struct InvokingUser {
    uid: u32,
    gid: u32,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl InvokingUser {
    pub fn new(info: &UsernsInfo) -> Self {
        Self::from_ids(info.outside_uid, info.outside_gid)
    }

    /// The invoking user's ids on the host (uid 0 of sandrun's user namespace).
    pub fn from_ids(uid: u32, gid: u32) -> Self {
        InvokingUser {
            uid,
            gid,
            uid_map: format!("{uid} 0 1\n").into_bytes(),
            gid_map: format!("{gid} 0 1\n").into_bytes(),
        }
    }

    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Unshares a nested user namespace and maps the invoking user in it. Only
    /// async-signal-safe calls: meant for `pre_exec`, after any `setns` (joining a
    /// namespace owned by the outer user namespace needs the outer capabilities).
    ///
    /// # Safety
    /// Call only in a freshly forked child (e.g. from `pre_exec`).
    pub unsafe fn enter(&self) -> io::Result<()> {
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return Err(io::Error::last_os_error());
        }
        write_proc(c"/proc/self/setgroups", b"deny")?;
        write_proc(c"/proc/self/uid_map", &self.uid_map)?;
        write_proc(c"/proc/self/gid_map", &self.gid_map)
    }
}

/// open + write + close with raw calls (async-signal-safe).
unsafe fn write_proc(path: &CStr, data: &[u8]) -> io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = libc::write(fd, data.as_ptr().cast(), data.len());
    let err = io::Error::last_os_error();
    libc::close(fd);
    if n != data.len() as isize {
        return Err(err);
    }
    Ok(())
}

/// For diagnostics: the current process's uid_map as text.
pub fn current_uid_map() -> String {
    fs::read("/proc/self/uid_map")
        .map(|b| {
            std::ffi::OsStr::from_bytes(&b)
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subids_match_name_or_uid_and_skip_others() {
        let text = "alice:100000:65536\n# comment\nbob:165536:65536\n1000:300000:10\nbad\n";
        assert_eq!(
            parse_subids(text, 1000, Some("alice")),
            vec![
                IdRange {
                    start: 100000,
                    count: 65536
                },
                IdRange {
                    start: 300000,
                    count: 10
                }
            ]
        );
        assert_eq!(parse_subids(text, 1001, Some("carol")), vec![]);
    }

    #[test]
    fn map_arguments_stack_ranges_after_root() {
        let ranges = [
            IdRange {
                start: 100000,
                count: 5,
            },
            IdRange {
                start: 300000,
                count: 10,
            },
        ];
        assert_eq!(
            map_arguments(1000, &ranges),
            ["0", "1000", "1", "1", "100000", "5", "6", "300000", "10"]
        );
    }

    #[test]
    fn limitation_names_the_cause() {
        let mut info = UsernsInfo {
            outside_uid: 1000,
            outside_gid: 1000,
            user_name: Some("alice".into()),
            mapping: IdMapping::Single {
                reason: "/etc/subuid has no range for alice".into(),
            },
            cgroups: CgroupView::Host,
        };
        let text = info.limitation().unwrap();
        assert!(
            text.contains("/etc/subuid has no range for alice"),
            "{text}"
        );
        assert!(text.contains("uid 999"), "{text}");
        info.mapping = IdMapping::Subordinate {
            uids: vec![IdRange {
                start: 100000,
                count: 65536,
            }],
            gids: vec![IdRange {
                start: 100000,
                count: 65536,
            }],
        };
        assert_eq!(info.limitation(), None);
        info.mapping = IdMapping::Subordinate {
            uids: vec![IdRange {
                start: 100000,
                count: 1000,
            }],
            gids: vec![],
        };
        assert!(info.limitation().unwrap().contains("0..1000"));
    }

    #[test]
    fn initial_map_is_recognised() {
        assert!(is_initial_map("         0          0 4294967295\n"));
        assert!(!is_initial_map("0 1000 1\n1 100000 65536\n"));
    }
}
