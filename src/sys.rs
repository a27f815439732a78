//! Process-lifetime system calls that need care, written once.
//!
//! A helper, a host step or the zygote must die with the runner, and a child the
//! runner waits for must not be reaped before the runner is done signalling its
//! process group (a reaped leader frees its id, and a reused id would make the next
//! `killpg` hit a stranger). The calls for that (the parent-death signal, pidfds,
//! `waitid` that leaves the child a zombie) go through rustix here, so that their
//! callers hold no `unsafe` and their pitfalls are handled in one place. So do the
//! calls that nix and rustix do not wrap safely and that the runner makes on its
//! processes' behalf: joining a network namespace between fork and exec, and the
//! seccomp user-notification requests that answer a step's `accept` calls
//! (`net::handoff`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, Signal, WaitId, WaitIdOptions};

/// Asks for SIGKILL when the parent process dies, then checks that `parent` (when
/// known: it is the runner's pid read before the fork) has not died already, since
/// the signal is only armed for a parent still alive. Async-signal-safe: it makes
/// two system calls and allocates nothing, so it may run between fork and exec.
pub fn die_with_parent(parent: Option<u32>) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    match parent {
        Some(parent) if rustix::process::getppid().map(Pid::as_raw_pid) != Some(parent as i32) => {
            Err(io::Error::from_raw_os_error(libc::ESRCH))
        }
        _ => Ok(()),
    }
}

/// The running kernel is at least `major.minor` (from `/proc/sys/kernel/osrelease`).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// SIGKILLs the process of `pidfd` (which cannot be another process that got its pid).
pub fn pidfd_kill(pidfd: impl AsFd) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, Signal::KILL)?)
}

/// splice(2) of up to `len` bytes from `from` to `to` (one of them a pipe), without
/// blocking (nix wraps it only behind a feature that would rebuild the tree).
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    // SAFETY: two descriptors borrowed for the call; no offsets, no user memory.
    let n = unsafe {
        libc::splice(
            from.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            to.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A pidfd of process `pid`, non-blocking when `nonblock` (to be polled).
pub fn pidfd_open(pid: u32, nonblock: bool) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let flags = if nonblock {
        PidfdFlags::NONBLOCK
    } else {
        PidfdFlags::empty()
    };
    Ok(rustix::process::pidfd_open(pid, flags)?)
}

/// A duplicate of descriptor `fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: impl AsFd, fd: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(
        pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// How the child behind `pidfd` ended: `None` while it runs (with `block` false).
/// With `reap` false the child stays a zombie, so that its pid and process-group id
/// stay its own until it is reaped (`reap` true, or [`reap`]).
pub fn wait_pidfd(pidfd: impl AsFd, reap: bool, block: bool) -> io::Result<Option<ExitStatus>> {
    let mut options = WaitIdOptions::EXITED;
    if !reap {
        options |= WaitIdOptions::NOWAIT;
    }
    if !block {
        options |= WaitIdOptions::NOHANG;
    }
    let status = loop {
        match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), options) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    Ok(status.map(|s| {
        // The raw wait(2) status: the exit code in the second byte, or the signal
        // (with 0x80 for a core dump).
        let raw = match (s.exit_status(), s.terminating_signal()) {
            (Some(code), _) => (code & 0xff) << 8,
            (None, Some(signal)) => signal | if s.dumped() { 0x80 } else { 0 },
            (None, None) => 0,
        };
        ExitStatus::from_raw(raw)
    }))
}

/// Reaps the child behind `pidfd`, waiting for it to end (the pidfd may be
/// non-blocking). A child already reaped is no error.
pub fn reap(pidfd: impl AsFd) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        match wait_pidfd(pidfd.as_fd(), true, false) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {
                // A pidfd turns readable when its process ends.
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Moves the calling thread into the network namespace open as descriptor `fd`.
/// Async-signal-safe (one system call, no allocation), for a `pre_exec` that got the
/// descriptor's number before the fork.
pub fn join_network_namespace(fd: RawFd) -> io::Result<()> {
    // SAFETY: the descriptor is borrowed only for the one setns call below; a number
    // that is not open, or not a network namespace, makes setns fail with EBADF or
    // EINVAL, not touch memory.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// Clears close-on-exec on descriptor `fd`, so that the program about to be executed
/// inherits it. Async-signal-safe (one system call), for a `pre_exec`.
pub fn keep_across_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: the descriptor is borrowed only for the one fcntl call below; a number
    // that is not open makes it fail with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(())
}

/// The seccomp user-notification requests (seccomp_unotify(2)) on a listener
/// descriptor. nix and rustix do not wrap them; each is one ioctl whose argument is a
/// kernel structure of fixed size, which the kernel checks against the descriptor
/// (anything but a seccomp listener fails with an error).
pub mod seccomp_notify {
    use super::*;

    /// Receives the next pending notification (a system call the filter stopped).
    /// Blocks while none is pending.
    pub fn receive(listener: RawFd) -> io::Result<libc::seccomp_notif> {
        // SAFETY: seccomp_notif is plain integers, for which all zeroes is a value.
        let mut notification: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the request writes exactly one seccomp_notif to the pointer, which
        // points to one that lives across the call.
        let r = unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notification) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(notification)
    }

    /// Installs a descriptor of ours in the stopped process (as `addfd` says), with
    /// `SECCOMP_ADDFD_FLAG_SEND` also answering the call with its number.
    pub fn add_fd(listener: RawFd, addfd: &libc::seccomp_notif_addfd) -> io::Result<()> {
        // SAFETY: the request reads exactly one seccomp_notif_addfd from the pointer,
        // a reference valid across the call.
        let r = unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ADDFD, addfd) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the notification `id` is still pending (its process has not died or
    /// been interrupted by a signal meanwhile).
    pub fn id_valid(listener: RawFd, id: u64) -> bool {
        // SAFETY: the request reads exactly one u64 from the pointer, a reference
        // valid across the call.
        unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 }
    }

    /// Answers a notification: the call's result (`error` as a negative errno), or
    /// with `SECCOMP_USER_NOTIF_FLAG_CONTINUE` in `response.flags`, lets it run.
    pub fn send(listener: RawFd, response: &libc::seccomp_notif_resp) -> io::Result<()> {
        // SAFETY: the request reads exactly one seccomp_notif_resp from the pointer,
        // a reference valid across the call.
        let r = unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND, response) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(
        clippy::zombie_processes,
        reason = "the child is reaped through its pidfd: that is what the test checks"
    )]
    fn a_waited_child_stays_a_zombie_until_reaped() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let pidfd = pidfd_open(pid, false).unwrap();
        let mut status = None;
        while status.is_none() {
            status = wait_pidfd(&pidfd, false, false).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let status = status.unwrap();
        assert_eq!(status.code(), Some(7));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(stat.contains(") Z "), "{stat}");
        reap(&pidfd).unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_dead_parent_is_noticed() {
        assert!(die_with_parent(Some(std::process::id())).is_err());
        // The test's own parent (the harness or a shell) is alive.
        let parent = rustix::process::getppid().unwrap().as_raw_pid() as u32;
        assert!(die_with_parent(Some(parent)).is_ok());
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    /// Destination register in the low four bits, source register in the high four.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to `expected_attach_type`, with
/// the rest of the union zeroed as the kernel requires.
#[repr(C)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u64; 8],
}

/// The `BPF_PROG_ATTACH` member of `union bpf_attr`.
#[repr(C)]
struct BpfProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    rest: [u64; 8],
}

/// Loads `insns` as a `BPF_PROG_TYPE_CGROUP_DEVICE` program (the kernel's verifier
/// checks it; its log is not asked for) and returns the program's descriptor.
pub fn bpf_load_device_program(insns: &[BpfInsn], name: &str) -> io::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    for (to, from) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let attr = BpfProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
        rest: [0; 8],
    };
    // The instructions and the license the attribute points to outlive the call.
    let fd = bpf(BPF_PROG_LOAD, &attr)?;
    // SAFETY: a new descriptor, ours alone (the kernel sets close-on-exec on it).
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// bpf(2) with command `cmd` and its member `attr` of `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `attr`, which lives for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Attaches a device program to the cgroup (v2) directory `cgroup`, alongside any
/// that its ancestors or others attached (`BPF_F_ALLOW_MULTI`: every program must
/// allow an access). The attachment holds the program; its descriptor may be closed.
pub fn bpf_attach_device_program(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
) -> io::Result<()> {
    let attr = BpfProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        rest: [0; 8],
    };
    bpf(BPF_PROG_ATTACH, &attr).map(drop)
}

/// A copy of this process (as fork(2) makes: 0 in the copy, its pid here) that is a
/// child of this process's parent (`CLONE_PARENT`). With `cgroup`, the copy starts in
/// that cgroup (v2) directory (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7) without
/// migrating any process: a migration (a write to `cgroup.procs`) takes the kernel's
/// global cgroup lock for writing, and its first writer after a quiet spell waits for
/// an RCU grace period (~10 ms here). Without, plain clone(2), which every kernel has.
///
/// # Safety
/// As for fork(2): the calling process must be single-threaded.
pub unsafe fn clone_sibling(cgroup: Option<BorrowedFd<'_>>) -> io::Result<i32> {
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    // Both calls: without CLONE_VM and with no stack given, the child runs on a copy of
    // this stack, as after fork(2); the caller guarantees a single thread.
    let pid = match cgroup {
        Some(cgroup) => {
            // SAFETY: a zeroed `clone_args` is valid (no pidfd, tids, stack or set_tid).
            let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
            // With CLONE_PARENT the exit signal must be 0: the child gets the one this
            // process has (SIGCHLD, for the zygote forked by the runner).
            args.flags = libc::CLONE_PARENT as u64 | CLONE_INTO_CGROUP;
            args.cgroup = cgroup.as_raw_fd() as u64;
            // SAFETY: see above; `args` lives for the call.
            unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &mut args as *mut libc::clone_args,
                    std::mem::size_of::<libc::clone_args>(),
                )
            }
        }
        // SAFETY: see above.
        None => unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        },
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid as i32)
}

/// Loads a classic BPF seccomp filter (`struct sock_filter` entries, 8 bytes each) on
/// the calling thread with `seccomp(SECCOMP_SET_MODE_FILTER)`; with `new_listener`,
/// its calls that notify go to the listener returned. The caller needs
/// `no_new_privs` or CAP_SYS_ADMIN, as for any filter.
pub fn seccomp_set_filter(program: &[u8], new_listener: bool) -> io::Result<Option<OwnedFd>> {
    const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
    const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_uint = 1 << 3;
    if program.is_empty() || program.len() % 8 != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let prog = libc::sock_fprog {
        len: (program.len() / 8) as libc::c_ushort,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    let flags = if new_listener {
        SECCOMP_FILTER_FLAG_NEW_LISTENER
    } else {
        0
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: with NEW_LISTENER the result is a new descriptor, ours alone.
    Ok(new_listener
        .then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as RawFd) }))
}
