//! `sandrun __host-init HOSTNAME -- PROGRAM ARGS...`: how a host step (no image) gets
//! its own PID, UTS and IPC namespaces.
//!
//! The runner starts host steps through this small init instead of running the
//! command directly. It unshares the namespaces, and a forked child becomes PID 1 of
//! the new PID namespace: it names the host, mounts a /proc that shows only the step's
//! processes, starts the command as PID 2 and reaps whatever the command leaves.
//!
//! When the command ends and has left processes running, PID 1 reports its exit status
//! to the runner (`--report-fd`; otherwise it just exits with it). Then, as on
//! Harness's VM runner, where a step's `cmd &` or daemon keeps running on
//! the build machine, whatever the command left running lives on: PID 1 stays and
//! reaps until the last of it ends, or until the runner stops it at the stage's end
//! with SIGTERM, which PID 1 passes to every process of the namespace (a second stop
//! signal: SIGKILL). When PID 1 ends, the kernel kills whatever is left in the
//! namespace, so nothing a host step started outlives the stage, not even when sandrun
//! itself is SIGKILLed (PID 1 has a parent-death signal).
//!
//! Stopping: the runner signals the step's whole process group. This wrapper ignores
//! those signals (it waits for PID 1); PID 1 blocks them while the command runs and
//! takes them once it has ended (a step stopped while running has its leftovers
//! stopped too); the command receives them directly, with their default meaning.
//!
//! `--share SOURCE TARGET` binds the stage's `sharedPaths` directories over the host's
//! own directories of those paths, for this step only.

use std::ffi::{CString, OsString};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, fork, sethostname, ForkResult, Pid};

use super::userns::InvokingUser;

const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// How a host step is to be started through this init (see [`wrap`]).
pub struct HostInit<'a> {
    /// The sandrun executable.
    pub binary: &'a std::path::Path,
    /// The step's hostname (its identifier).
    pub hostname: &'a str,
    /// Rootless: the invoking user the command runs as again.
    pub user: Option<&'a InvokingUser>,
    /// Host directories the step may write besides the scratch directories.
    pub writable: Vec<&'a std::path::Path>,
    /// The runner's socket for the step's `accept` calls (`net::handoff`).
    pub accept_listener: Option<&'a std::path::Path>,
    /// The descriptor the command's exit status is reported on when it leaves
    /// processes running.
    pub report_fd: Option<std::os::fd::RawFd>,
    /// The stage's `sharedPaths`: (stage directory, path on the host).
    pub shared: &'a [(std::path::PathBuf, String)],
}

/// The argv that runs `command` as the host step `init` describes.
pub fn wrap(init: &HostInit<'_>, command: &[String]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        init.binary.as_os_str().to_owned(),
        "__host-init".into(),
        init.hostname.into(),
    ];
    if let Some(u) = init.user {
        let (uid, gid) = u.ids();
        argv.push("--as".into());
        argv.push(format!("{uid}:{gid}").into());
    }
    for w in &init.writable {
        argv.push("--writable".into());
        argv.push(w.as_os_str().to_owned());
    }
    if let Some(path) = init.accept_listener {
        argv.push("--accept-listener".into());
        argv.push(path.as_os_str().to_owned());
    }
    if let Some(fd) = init.report_fd {
        argv.push("--report-fd".into());
        argv.push(fd.to_string().into());
    }
    for (source, target) in init.shared {
        argv.push("--share".into());
        argv.push(source.as_os_str().to_owned());
        argv.push(target.into());
    }
    argv.push("--".into());
    argv.extend(command.iter().map(OsString::from));
    argv
}

/// Entry point of `sandrun __host-init`; returns the exit code.
pub fn main(args: &[OsString]) -> i32 {
    let usage = || {
        eprintln!(
            "usage: sandrun __host-init HOSTNAME [--as UID:GID] [--writable PATH]... [--accept-listener SOCKET] [--report-fd FD] [--share SOURCE TARGET]... -- PROGRAM [ARGS...]"
        );
        125
    };
    let Some((hostname, mut rest)) = args.split_first() else {
        return usage();
    };
    let mut user = None;
    let mut writable: Vec<CString> = Vec::new();
    let mut accept_listener = None;
    let mut report = None;
    let mut shared: Vec<(CString, CString)> = Vec::new();
    loop {
        match rest {
            [sep, command @ ..] if sep == "--" && !command.is_empty() => {
                rest = command;
                break;
            }
            [flag, ids, more @ ..] if flag == "--as" => {
                let parsed = ids
                    .to_str()
                    .and_then(|s| s.split_once(':'))
                    .and_then(|(u, g)| {
                        Some(InvokingUser::from_ids(u.parse().ok()?, g.parse().ok()?))
                    });
                let Some(u) = parsed else { return usage() };
                user = Some(u);
                rest = more;
            }
            [flag, path, more @ ..] if flag == "--accept-listener" => {
                accept_listener = Some(std::path::PathBuf::from(path));
                rest = more;
            }
            [flag, fd, more @ ..] if flag == "--report-fd" => {
                let Some(fd) = fd.to_str().and_then(|f| f.parse::<i32>().ok()) else {
                    return usage();
                };
                // SAFETY: the runner passed this descriptor for this process alone.
                report = Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
                rest = more;
            }
            [flag, source, target, more @ ..] if flag == "--share" => {
                let (Ok(source), Ok(target)) = (
                    CString::new(source.as_bytes()),
                    CString::new(target.as_bytes()),
                ) else {
                    return usage();
                };
                shared.push((source, target));
                rest = more;
            }
            [flag, path, more @ ..] if flag == "--writable" => {
                let Ok(c) = CString::new(path.as_bytes()) else {
                    return usage();
                };
                writable.push(c);
                rest = more;
            }
            _ => return usage(),
        }
    }
    let command = rest;
    let fail = |what: &str, e: nix::Error| {
        eprintln!("sandrun: host step: cannot {what}: {e}");
        125
    };
    if let Err(e) = unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    ) {
        return fail("create its PID, UTS and IPC namespaces", e);
    }
    for sig in STOP_SIGNALS {
        // SAFETY: setting a disposition, no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // SAFETY: single-threaded process (hidden subcommands run before any thread).
    match unsafe { fork() } {
        Err(e) => fail("fork its init", e),
        Ok(ForkResult::Child) => init(
            hostname,
            user.as_ref(),
            &writable,
            &shared,
            accept_listener.as_deref(),
            report,
            command,
        ),
        Ok(ForkResult::Parent { child }) => {
            // Only PID 1 reports: the runner sees the pipe's end when PID 1 ends.
            drop(report);
            exit_code(wait_for(child))
        }
    }
}

/// PID 1 of the step's PID namespace.
fn init(
    hostname: &OsString,
    user: Option<&InvokingUser>,
    writable: &[CString],
    shared: &[(CString, CString)],
    accept_listener: Option<&std::path::Path>,
    report: Option<std::os::fd::OwnedFd>,
    command: &[OsString],
) -> ! {
    let die = |what: &str, e: nix::Error| -> ! {
        eprintln!("sandrun: host step: cannot {what}: {e}");
        std::process::exit(125)
    };
    // The parent is outside this PID namespace, so getppid() cannot tell whether it
    // already died: that window is the few instructions since fork.
    let _ = crate::sys::die_with_parent(None);
    if let Err(e) = sethostname(hostname) {
        die("set its hostname", e);
    }
    let private = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    );
    if let Err(e) = private {
        die("make its mounts private", e);
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>) {
        die("mount /proc for its PID namespace", e);
    }
    // Stop signals wait until the command has ended (see the module's docs); SIGCHLD
    // too, for the wait on leftovers.
    let mut held = SigSet::empty();
    for sig in STOP_SIGNALS.iter().chain([&Signal::SIGCHLD]) {
        held.add(*sig);
    }
    if let Err(e) = held.thread_block() {
        die("block its stop signals", e);
    }
    for sig in STOP_SIGNALS {
        // SAFETY: setting a disposition, no handler code. Blocked signals are queued
        // whatever the disposition; the default one lets `sigwait` take them.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let mut open: Vec<CString> = writable.to_vec();
    for (source, target) in shared {
        match share(source, target) {
            Ok(()) => open.push(target.clone()),
            Err(e) => eprintln!(
                "sandrun: warning: host step: sharedPaths `{}` is not shared: {e}",
                target.to_string_lossy()
            ),
        }
    }
    if let Err(e) = read_only_host(&open) {
        die("make the host's filesystems read-only", e);
    }
    // The working directory still points into the mounts as they were before: enter
    // it again through the new ones (the workspace is writable there).
    if let Ok(cwd) = std::env::current_dir() {
        if let Err(e) = nix::unistd::chdir(&cwd) {
            die("enter its working directory", e);
        }
    }
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    // SAFETY: still single-threaded.
    let child = match unsafe { fork() } {
        Err(e) => die("start its command", e),
        Ok(ForkResult::Child) => {
            // The command starts with nothing blocked (the mask survives exec).
            let _ = held.thread_unblock();
            // Before the switch to the user: loading a filter without no_new_privs
            // takes CAP_SYS_ADMIN.
            if let Some(path) = accept_listener {
                match send_accept_calls(path) {
                    Ok(()) => {}
                    // Nothing is filtered yet: the port binding is proxied instead.
                    Err((e, false)) => {
                        eprintln!("sandrun: warning: host step: {e}; its bound ports are proxied")
                    }
                    // Filtered, and nobody would answer: every accept would fail.
                    Err((e, true)) => {
                        eprintln!("sandrun: host step: {e}");
                        std::process::exit(125);
                    }
                }
            }
            if let Some(u) = user {
                // SAFETY: a freshly forked, single-threaded child.
                if let Err(e) = unsafe { u.enter() } {
                    eprintln!("sandrun: host step: cannot run as the invoking user: {e}");
                    std::process::exit(125);
                }
            }
            let e = execvp(&argv[0], &argv).unwrap_err();
            eprintln!(
                "sandrun: cannot run `{}`: {e}",
                command[0].to_string_lossy()
            );
            std::process::exit(if e == nix::errno::Errno::ENOENT {
                127
            } else {
                126
            });
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    if let Some(fd) = &report {
        // The command must not hold the runner's pipe open.
        use std::os::fd::AsRawFd;
        let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
        let _ = nix::fcntl::fcntl(fd.as_raw_fd(), cloexec);
    }
    // Reap every orphan of the namespace until the command itself ends.
    let code = loop {
        match waitpid(None, None) {
            Ok(status) if status.pid() == Some(child) => break exit_code(status),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::process::exit(125),
        }
    };
    if !reap_ended() {
        // Nothing is left: the runner learns the status from this process's end.
        std::process::exit(code);
    }
    // The command left processes running: the step has ended all the same.
    if let Some(fd) = report {
        let _ = nix::unistd::write(&fd, &code.to_ne_bytes());
    }
    linger(&held, code)
}

/// Reaps whatever has ended; whether processes are left in the namespace.
fn reap_ended() -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // ECHILD: every process of the namespace has ended.
            Err(_) => return false,
        }
    }
}

/// After the command: reap what it left until nothing is left (then exit with the
/// command's code), passing a stop signal on to every process of the namespace.
fn linger(held: &SigSet, code: i32) -> ! {
    let mut stops = 0;
    loop {
        if !reap_ended() {
            std::process::exit(code);
        }
        match held.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(_) => {
                let signal = if stops == 0 {
                    Signal::SIGTERM
                } else {
                    Signal::SIGKILL
                };
                stops += 1;
                // -1: every process of the namespace but this one.
                let _ = nix::sys::signal::kill(Pid::from_raw(-1), signal);
            }
        }
    }
}

/// Binds the stage's directory `source` over the host's `target` (which must be a
/// directory there: a host step sees the host's filesystem, and sandrun does not
/// create paths on it).
fn share(source: &CString, target: &CString) -> nix::Result<()> {
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(target.to_bytes()));
    if !path.is_dir() {
        return Err(nix::errno::Errno::ENOENT);
    }
    mount(
        Some(source.as_c_str()),
        target.as_c_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
}

/// Sends the command's `accept` and `accept4` calls to the runner (`net::handoff`): a
/// seccomp filter that waits for the runner's answer on them, whose listener goes to
/// the runner's socket at `path`, loaded as a container step's is
/// (`seccomp::Loadable`). On failure, the message and whether the filter is already in
/// place.
fn send_accept_calls(path: &std::path::Path) -> Result<(), (String, bool)> {
    let filter = super::seccomp::accept_notify(path)
        .map_err(|e| (format!("cannot describe the accept filter: {e}"), false))?;
    let loadable =
        super::seccomp::Loadable::prepare(&filter, None).map_err(|e| (e.to_string(), false))?;
    loadable.install().map_err(|(e, in_place)| match in_place {
        false => (format!("cannot install the accept filter: {e}"), false),
        true => (
            format!("cannot send the accept filter to the runner: {e}"),
            true,
        ),
    })
}

/// Directories a host step may always write: scratch space every tool expects.
const SCRATCH: [&std::ffi::CStr; 4] = [c"/tmp", c"/var/tmp", c"/dev/shm", c"/proc"];

/// The whole host filesystem read-only for the step, except the scratch directories and
/// `writable` (the workspace, and what the user opened with `--host-writable`).
fn read_only_host(writable: &[CString]) -> nix::Result<()> {
    let open: Vec<&std::ffi::CStr> = SCRATCH
        .iter()
        .copied()
        .chain(writable.iter().map(CString::as_c_str))
        .filter(|p| std::path::Path::new(std::ffi::OsStr::from_bytes(p.to_bytes())).is_dir())
        .collect();
    // Each writable place becomes a mount of its own, so that it can stay writable
    // under a read-only root.
    for p in &open {
        if *p != c"/proc" {
            mount(
                Some(*p),
                *p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
        }
    }
    mount_setattr(c"/", libc::MOUNT_ATTR_RDONLY, 0)?;
    for p in &open {
        mount_setattr(p, 0, libc::MOUNT_ATTR_RDONLY)?;
    }
    Ok(())
}

/// Set and clear attributes on `path` and every mount below it (Linux 5.12+).
fn mount_setattr(path: &std::ffi::CStr, set: u64, clear: u64) -> nix::Result<()> {
    super::mounts::mount_setattr(
        libc::AT_FDCWD,
        path,
        libc::AT_RECURSIVE as libc::c_uint,
        set,
        clear,
    )
    .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

fn wait_for(pid: Pid) -> WaitStatus {
    loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(s) => return s,
            Err(_) => return WaitStatus::Exited(pid, 125),
        }
    }
}

/// Exit code as a shell reports it: the code, or 128+N for signal N.
fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 125,
    }
}
