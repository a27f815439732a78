//! The zygote: a copy of the runner, forked while the runner is still single-threaded,
//! that starts container helpers without executing the sandrun binary again.
//!
//! libcontainer must run in a single-threaded process, and the runner is a tokio
//! program; the plain way is to execute `sandrun __container SPEC` for every step.
//! Loading and relocating the binary again for every step, and forking the big
//! multi-threaded runner to do it, cost more than the rest of a short step's start
//! (docs/performance.md). So `run::startup` forks the zygote right after entering its
//! user namespace, before any thread exists. The
//! zygote waits on a socket; for each request (the spec's path, the step's stdout and
//! stderr pipes, the step's network namespace, and as root the stage's device group
//! of `sandbox::devices`, which the helper then starts in) it clones a helper with
//! `CLONE_PARENT`,
//! so that the helper is the *runner's* child: the runner waits for it, signals its
//! process group and gets its exit status exactly as for an executed helper. The
//! helper then runs the same code as `sandrun __container`.
//!
//! The zygote dies with the runner (parent-death signal, and end of file on its
//! socket when the runner drops it).

use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{getpid, Pid};

use super::error::SandboxError;

/// Longest spec path a request carries.
const MAX_PATH: usize = 4096;

/// A request's first byte: which optional descriptors follow the three pipes.
const WITH_NETNS: u8 = 1;
const WITH_CGROUP: u8 = 2;

/// The runner's end of the zygote.
pub struct Zygote {
    socket: Mutex<OwnedFd>,
    pid: Pid,
}

impl Zygote {
    /// Forks the zygote. The caller must be single-threaded (the child runs Rust code,
    /// allocates and later clones helpers). `rootless`: the caller is in its own user
    /// namespace, whose maps may still be being written; each helper then sets its
    /// ids to 0 of that namespace first, as the runner does to itself.
    pub fn start(rootless: bool) -> Result<Zygote, SandboxError> {
        super::userns::require_single_thread()?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::sys("create the zygote's socket", e))?;
        let runner = getpid();
        // SAFETY: the caller guarantees a single thread, so the child is a complete copy.
        match unsafe { nix::unistd::fork() }.map_err(|e| SandboxError::sys("fork the zygote", e))? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                serve(theirs, runner, rootless)
            }
            nix::unistd::ForkResult::Parent { child } => Ok(Zygote {
                socket: Mutex::new(ours),
                pid: child,
            }),
        }
    }

    /// Starts a helper for the spec at `spec_path`, with `stdout` and `stderr` as its
    /// output and, when given, inside `netns` and in the cgroup (v2) directory
    /// `cgroup` from its first instruction on. The helper is a child of the calling
    /// process, in a process group of its own; returns its pid.
    pub fn spawn(
        &self,
        spec_path: &Path,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
        status: BorrowedFd<'_>,
        netns: Option<BorrowedFd<'_>>,
        cgroup: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<Pid> {
        let path = spec_path.as_os_str().as_bytes();
        if path.len() > MAX_PATH {
            return Err(std::io::Error::other("spec path too long"));
        }
        let mut fds = vec![stdout.as_raw_fd(), stderr.as_raw_fd(), status.as_raw_fd()];
        fds.extend(netns.map(|n| n.as_raw_fd()));
        fds.extend(cgroup.map(|c| c.as_raw_fd()));
        let what = [netns.map_or(0, |_| WITH_NETNS) | cgroup.map_or(0, |_| WITH_CGROUP)];
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&what), IoSlice::new(path)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )?;
        let mut reply = [0u8; 4];
        let got = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut [IoSliceMut::new(&mut reply)],
            None,
            MsgFlags::empty(),
        )?
        .bytes;
        if got != 4 {
            return Err(std::io::Error::other("the zygote is gone"));
        }
        let pid = match i32::from_ne_bytes(reply) {
            pid if pid > 0 => Pid::from_raw(pid),
            errno => return Err(std::io::Error::from_raw_os_error(-errno)),
        };
        // The helper makes its own process group too; doing it here as well (we are
        // its parent) means the group exists before anyone signals it.
        let _ = nix::unistd::setpgid(pid, pid);
        Ok(pid)
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing our end makes the zygote leave; reap it.
        let socket = self.socket.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// The zygote's loop; never returns.
fn serve(socket: OwnedFd, runner: Pid, rootless: bool) -> ! {
    if crate::sys::die_with_parent(Some(runner.as_raw() as u32)).is_err() {
        // SAFETY: leave without running the runner's exit handlers.
        unsafe { libc::_exit(0) }
    }
    // Ctrl-C in a terminal reaches the runner's whole process group, the zygote
    // included; the runner decides what it means. Helpers reset these.
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: setting a signal to be ignored installs no handler.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let mut path = vec![0u8; MAX_PATH];
    let mut what = [0u8];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 5]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut what), IoSliceMut::new(&mut path)];
            match recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().into_iter().flatten() {
                        if let ControlMessageOwned::ScmRights(r) = c {
                            // SAFETY: descriptors just received are ours alone.
                            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                        }
                    }
                    (msg.bytes, fds)
                }
                Err(nix::errno::Errno::EINTR) => continue,
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(0) },
            }
        };
        if len == 0 {
            // SAFETY: the runner closed its end.
            unsafe { libc::_exit(0) }
        }
        let expected =
            3 + usize::from(what[0] & WITH_NETNS != 0) + usize::from(what[0] & WITH_CGROUP != 0);
        let reply = if fds.len() != expected {
            -libc::EINVAL
        } else {
            let request = Request {
                spec: Path::new(OsStr::from_bytes(&path[..len - 1])),
                pipes: &fds[..3],
                netns: (what[0] & WITH_NETNS != 0).then(|| fds[3].as_fd()),
                cgroup: (what[0] & WITH_CGROUP != 0).then(|| fds[expected - 1].as_fd()),
            };
            clone_helper(&request, runner, rootless, &socket)
        };
        drop(fds);
        let _ = sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&reply.to_ne_bytes())],
            &[],
            MsgFlags::empty(),
            None,
        );
    }
}

/// One request: the spec, the step's stdout, stderr and status pipes, and the
/// optional network namespace and cgroup directory.
struct Request<'a> {
    spec: &'a Path,
    pipes: &'a [OwnedFd],
    netns: Option<BorrowedFd<'a>>,
    cgroup: Option<BorrowedFd<'a>>,
}

/// Clones a helper as a sibling of the zygote (a child of the runner), in the
/// request's cgroup when it names one. Returns its pid or a negative errno.
fn clone_helper(request: &Request, runner: Pid, rootless: bool, socket: &OwnedFd) -> i32 {
    // SAFETY: the zygote is single-threaded; the copy returns here with 0, and
    // CLONE_PARENT makes it the runner's child.
    match unsafe { crate::sys::clone_sibling(request.cgroup) } {
        Ok(0) => {}
        Ok(pid) => return pid,
        Err(e) => return -e.raw_os_error().unwrap_or(libc::EIO),
    }
    // The helper.
    if request.cgroup.is_some() {
        super::container::started_in_device_group();
    }
    let code = match helper_setup(request, runner, rootless, socket) {
        Ok(()) => {
            super::helper::debug_logging();
            super::container::main(request.spec)
        }
        Err(e) => {
            eprintln!("{}{e}", super::ERROR_PREFIX);
            125
        }
    };
    std::process::exit(code)
}

/// What `spawn_container`'s `pre_exec` and the exec give an executed helper: its own
/// process group, stdin from /dev/null, the step's pipes, the step's network
/// namespace, death with the runner, and ids 0 in a rootless runner's namespace.
fn helper_setup(
    request: &Request,
    runner: Pid,
    rootless: bool,
    socket: &OwnedFd,
) -> Result<(), SandboxError> {
    let fds = request.pipes;
    let sys = |what: &'static str| move |e| SandboxError::sys(what, e);
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: restoring the default action installs no handler.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    // SAFETY: the zygote's socket is not this helper's to use; closing the number
    // leaves the OwnedFd, which the helper never drops (it execs or exits), dangling
    // but unused.
    unsafe {
        libc::close(socket.as_raw_fd());
    }
    if crate::sys::die_with_parent(Some(runner.as_raw() as u32)).is_err() {
        return Err(SandboxError::sys(
            "start",
            std::io::Error::other("the runner exited"),
        ));
    }
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
        .map_err(sys("make a process group"))?;
    // The runner's own stderr, for what the helper says after it has reported the
    // step's exit status (its fd 2 is the step's pipe until then).
    // (Kept open as a number: the helper never returns from here.)
    let runner_stderr = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 3)
        .map_or(-1, std::os::fd::IntoRawFd::into_raw_fd);
    super::container::report_status_to(fds[2].as_raw_fd(), runner_stderr);
    let null = std::fs::File::open("/dev/null")
        .map_err(|e| SandboxError::io("open", Path::new("/dev/null"), e))?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (fds[0].as_raw_fd(), 1),
        (fds[1].as_raw_fd(), 2),
    ] {
        // dup2 clears close-on-exec on the new descriptor.
        nix::unistd::dup2(from, to).map_err(sys("set up the helper's standard streams"))?;
    }
    // Only 1 and 2 may hold the step's pipes: when the helper reports the exit status
    // early, it points them elsewhere, and the runner then sees the end of the output.
    // (The helper never returns from here, so these descriptors are not dropped.)
    for fd in &fds[..2] {
        // SAFETY: closing this helper's copies, which nothing uses or drops after.
        unsafe { libc::close(fd.as_raw_fd()) };
    }
    if let Some(netns) = request.netns {
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(sys("join the step's network namespace"))?;
    }
    if rootless {
        // Supplementary groups can be dropped unless a single-id map denied setgroups.
        let may_setgroups =
            std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "allow");
        super::userns::become_root(may_setgroups)?;
    }
    Ok(())
}
