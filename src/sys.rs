//! Process-lifetime system calls that need care, written once.
//!
//! A helper, a host step or the zygote must die with the runner, and a child the
//! runner waits for must not be reaped before the runner is done signalling its
//! process group (a reaped leader frees its id, and a reused id would make the next
//! `killpg` hit a stranger). The calls for that (the parent-death signal, pidfds,
//! `waitid` that leaves the child a zombie) go through rustix here, so that their
//! callers hold no `unsafe` and their pitfalls are handled in one place.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
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

/// A pipe whose two ends are closed on exec: (read, write).
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Lets `fd` survive the coming exec (clears its close-on-exec flag). Async-signal-safe:
/// meant for `pre_exec`.
pub fn keep_across_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller keeps `fd` open across this call (it is the child's copy of
    // a descriptor the parent holds).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
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
