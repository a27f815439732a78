//! The seccomp filter of a container step.
//!
//! A non-privileged step gets the allow-list that container engines apply by default
//! (Docker's and Podman's profile): the system calls ordinary programs make, grouped
//! below by what they are for, and nothing that reaches past the container (mount,
//! new namespaces, kernel modules, keyrings, BPF, perf, clock setting, reboot...).
//! Anything else fails with EPERM, as under those engines, so programs see a plain
//! "operation not permitted". The list follows the default capability set
//! ([`super::oci::DEFAULT_CAPS`]): calls those engines grant only with a capability a
//! non-privileged step lacks are left out, `chroot` (CAP_SYS_CHROOT) is in.
//!
//! A step whose `portBindings` hand host connections to its own `accept`
//! (`net::handoff`) needs `accept`/`accept4` to notify the runner: that is one more
//! rule of the same filter (a process gets one filter from the runtime, and both must
//! hold). A privileged step gets no filter but that notification.

use std::path::Path;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

type Result<T> = std::result::Result<T, oci_spec::OciSpecError>;

/// Opening, reading, writing, linking and describing files and directories.
#[rustfmt::skip]
const FILES: &[&str] = &[
    "access", "chdir", "chmod", "chown", "chown32", "close", "close_range",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "faccessat", "faccessat2",
    "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod",
    "fchmodat", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync", "flock",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futimesat", "getcwd", "getdents", "getdents64", "lchown", "lchown32",
    "link", "linkat", "_llseek", "lseek", "lstat", "lstat64", "mkdir", "mkdirat", "mknod",
    "mknodat", "name_to_handle_at", "newfstatat", "open", "openat", "openat2", "pread64",
    "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "rename", "renameat", "renameat2", "rmdir", "sendfile",
    "sendfile64", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "tee", "truncate", "truncate64",
    "umask", "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes",
    "vmsplice", "write", "writev",
];

/// Extended attributes (capabilities of files, ACLs, security labels).
#[rustfmt::skip]
const XATTRS: &[&str] = &[
    "fgetxattr", "flistxattr", "fremovexattr", "fsetxattr", "getxattr", "lgetxattr",
    "listxattr", "llistxattr", "lremovexattr", "lsetxattr", "removexattr", "setxattr",
];

/// Starting, waiting for and inspecting processes and threads (`clone` is below: only
/// without namespace flags).
#[rustfmt::skip]
const PROCESSES: &[&str] = &[
    "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork", "futex",
    "futex_time64", "futex_waitv", "get_robust_list", "get_thread_area", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrlimit", "getrusage", "getsid",
    "gettid", "ioprio_get", "ioprio_set", "membarrier", "pidfd_open", "pidfd_send_signal",
    "prctl", "prlimit64", "process_mrelease", "process_vm_readv", "process_vm_writev",
    "ptrace", "restart_syscall", "rseq", "set_robust_list", "set_thread_area",
    "set_tid_address", "setpgid", "setpriority", "setrlimit", "setsid", "times",
    "ugetrlimit", "vfork", "wait4", "waitid", "waitpid",
];

/// CPU placement and scheduling policy of the step's own processes.
#[rustfmt::skip]
const SCHEDULING: &[&str] = &[
    "getcpu", "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity",
    "sched_getattr", "sched_getparam", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr", "sched_setparam",
    "sched_setscheduler", "sched_yield",
];

/// User and group ids (within what the step's capabilities allow).
#[rustfmt::skip]
const IDENTITY: &[&str] = &[
    "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getresgid", "getresgid32", "getresuid", "getresuid32", "getuid",
    "getuid32", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32",
    "setgroups", "setgroups32", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setuid", "setuid32",
];

/// The process's own memory.
#[rustfmt::skip]
const MEMORY: &[&str] = &[
    "brk", "madvise", "memfd_create", "memfd_secret", "mincore", "mlock", "mlock2",
    "mlockall", "mmap", "mmap2", "mprotect", "mremap", "msync", "munlock", "munlockall",
    "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
];

/// Sending, blocking and handling signals.
#[rustfmt::skip]
const SIGNALS: &[&str] = &[
    "alarm", "kill", "pause", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sigaltstack", "signalfd", "signalfd4",
    "sigprocmask", "sigreturn", "tgkill", "tkill",
];

/// Reading clocks, sleeping and timers (setting the clock needs CAP_SYS_TIME; adjtimex
/// without it only reads).
#[rustfmt::skip]
const TIME: &[&str] = &[
    "adjtimex", "clock_adjtime", "clock_adjtime64", "clock_getres", "clock_getres_time64",
    "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64",
    "getitimer", "gettimeofday", "nanosleep", "setitimer", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64",
];

/// Waiting on many descriptors, asynchronous I/O, and device controls (`ioctl`: what a
/// device allows is the device cgroup's and the driver's business).
#[rustfmt::skip]
const EVENTS: &[&str] = &[
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel",
    "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64", "io_setup",
    "io_submit", "io_uring_enter", "io_uring_register", "io_uring_setup", "ioctl",
    "_newselect", "poll", "ppoll", "ppoll_time64", "pselect6", "pselect6_time64", "select",
];

/// Sockets (`socket` itself is below: any family but AF_VSOCK, which reaches the
/// hypervisor).
#[rustfmt::skip]
const NETWORK: &[&str] = &[
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send",
    "sendmmsg", "sendmsg", "sendto", "setsockopt", "shutdown", "socketcall", "socketpair",
];

/// Pipes, System V IPC and POSIX message queues (the step has its own IPC namespace).
#[rustfmt::skip]
const IPC: &[&str] = &[
    "ipc", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "msgctl",
    "msgget", "msgrcv", "msgsnd", "pipe", "pipe2", "semctl", "semget", "semop",
    "semtimedop", "semtimedop_time64", "shmat", "shmctl", "shmdt", "shmget",
];

/// Facts about the system, randomness, and confining oneself further.
#[rustfmt::skip]
const SYSTEM: &[&str] = &[
    "getrandom", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "seccomp", "sysinfo", "uname",
];

/// Granted by a capability of the default set: CAP_SYS_CHROOT.
const DEFAULT_CAPABILITIES: &[&str] = &["chroot"];

/// Calls only this machine's architecture has.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURE: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
const ARCHITECTURE: &[&str] = &[
    "arm_fadvise64_64", "arm_sync_file_range", "breakpoint", "cacheflush", "set_tls",
    "sync_file_range2",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURE: &[&str] = &[];

/// Every group above.
const ALLOWED: &[&[&str]] = &[
    FILES,
    XATTRS,
    PROCESSES,
    SCHEDULING,
    IDENTITY,
    MEMORY,
    SIGNALS,
    TIME,
    EVENTS,
    NETWORK,
    IPC,
    SYSTEM,
    DEFAULT_CAPABILITIES,
    ARCHITECTURE,
];

/// `clone` flags that create namespaces (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET): a step may fork and start threads, never new namespaces.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// `personality` values programs set: Linux, 32-bit addresses, UNAME26 (and both),
/// and 0xffffffff (a query).
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

/// The filter for a container step: the default profile unless `privileged`, with
/// `accept`/`accept4` notifying the listener at `accept_listener` when there is one;
/// `None` when the step gets no filter at all (privileged, no hand-off).
pub fn filter(privileged: bool, accept_listener: Option<&Path>) -> Result<Option<LinuxSeccomp>> {
    match (privileged, accept_listener) {
        (true, None) => Ok(None),
        (true, Some(listener)) => accept_notify(listener).map(Some),
        (false, listener) => default_profile(listener).map(Some),
    }
}

/// A filter that lets every system call through but `accept` and `accept4`, which wait
/// for the runner's answer on the listener sent to `listener` (see `net::handoff`):
/// privileged steps and host steps with port bindings.
pub fn accept_notify(listener: &Path) -> Result<LinuxSeccomp> {
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(architectures())
        .listener_path(listener)
        .syscalls(vec![rule(NOTIFY, LinuxSeccompAction::ScmpActNotify)?])
        .build()
}

/// The calls the runner answers for a step with port bindings.
const NOTIFY: &[&str] = &["accept", "accept4"];

/// The allow-list, denying the rest with EPERM; `accept`/`accept4` notify `listener`
/// instead of being allowed when there is one.
fn default_profile(listener: Option<&Path>) -> Result<LinuxSeccomp> {
    let allowed: Vec<&str> = (ALLOWED.iter().flat_map(|group| group.iter().copied()))
        .filter(|name| listener.is_none() || !NOTIFY.contains(name))
        .collect();
    let mut rules = vec![rule(&allowed, LinuxSeccompAction::ScmpActAllow)?];
    rules.extend(argument_rules()?);
    let mut builder = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .architectures(architectures());
    if let Some(listener) = listener {
        builder = builder.listener_path(listener);
        rules.push(rule(NOTIFY, LinuxSeccompAction::ScmpActNotify)?);
    }
    builder.syscalls(rules).build()
}

/// Calls allowed only with some arguments.
fn argument_rules() -> Result<Vec<LinuxSyscall>> {
    let arg = |index: usize, op: LinuxSeccompOperator, value: u64, value_two: Option<u64>| {
        let mut b = LinuxSeccompArgBuilder::default()
            .index(index)
            .op(op)
            .value(value);
        if let Some(v2) = value_two {
            b = b.value_two(v2);
        }
        b.build()
    };
    let allow_with = |name: &str, args| -> Result<LinuxSyscall> {
        LinuxSyscallBuilder::default()
            .names(vec![name.to_string()])
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(args)
            .build()
    };
    let mut rules = vec![
        allow_with(
            "socket",
            vec![arg(0, LinuxSeccompOperator::ScmpCmpNe, AF_VSOCK, None)?],
        )?,
        // libcontainer hands `value_two` to libseccomp as the mask and `value` as the
        // result: (flags & NAMESPACE_FLAGS) == 0.
        allow_with(
            "clone",
            vec![arg(
                0,
                LinuxSeccompOperator::ScmpCmpMaskedEq,
                0,
                Some(NAMESPACE_FLAGS),
            )?],
        )?,
    ];
    for p in PERSONALITIES {
        rules.push(allow_with(
            "personality",
            vec![arg(0, LinuxSeccompOperator::ScmpCmpEq, p, None)?],
        )?);
    }
    // clone3 passes its flags in memory, where a filter cannot look: "not
    // implemented" makes the C library fall back to clone, which is checked above.
    rules.push(
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::ENOSYS as u32)
            .build()?,
    );
    Ok(rules)
}

fn rule(names: &[&str], action: LinuxSeccompAction) -> Result<LinuxSyscall> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .action(action)
        .build()
}

/// The machine's ABIs: all are listed so that their programs run under the filter
/// (an unlisted ABI would be killed by libseccomp).
fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchNative]
    }
}

/// A step's filter as the kernel takes it: the classic BPF program libseccomp makes of
/// a [`LinuxSeccomp`], and whether its calls notify a listener.
///
/// libcontainer would make the program in every container's init, and for the default
/// profile (three ABIs, ~370 calls) that takes libseccomp ~7 ms of CPU: a third of a
/// one-step stage. The program depends only on the filter, libseccomp's version and
/// the machine, so the helper makes it once and keeps it in the store, and the
/// container's init loads it with one system call (`StepExecutor` in
/// `sandbox::container`, right before it executes the step's program). The store, not
/// the state base: a program there decides what later containers may do, and host
/// steps may write the scratch directories (/dev/shm, /tmp) the state base can be in,
/// not the store (`sandbox::host_init`: the host is read-only to them but for the
/// workspace and scratch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// `struct sock_filter` entries, 8 bytes each.
    pub program: Vec<u8>,
    /// Some calls notify (`accept`/`accept4` of a step with port bindings): the filter
    /// is loaded with a new listener, which goes to the runner.
    pub notifies: bool,
}

/// The program of `filter`, from `<cache_dir>/seccomp-<digest>.bpf` when an earlier
/// helper made it, else made now and stored there (written whole, then renamed into
/// place, so that a reader never sees part of one). The digest covers the filter,
/// libseccomp's version and the architecture. A cache that cannot be written costs
/// only the time.
pub fn compiled(filter: &LinuxSeccomp, cache_dir: &Path) -> std::io::Result<Compiled> {
    use sha2::{Digest, Sha256};
    let notifies = notifies(filter);
    let version = libseccomp::ScmpVersion::current()
        .map(|v| format!("{}.{}.{}", v.major, v.minor, v.micro))
        .unwrap_or_default();
    // Where a listener goes is not part of the program (and differs every run).
    let mut program_of = filter.clone();
    program_of.set_listener_path(None);
    let mut digest = Sha256::new();
    digest.update(serde_json::to_vec(&program_of).map_err(std::io::Error::other)?);
    digest.update(version.as_bytes());
    digest.update(std::env::consts::ARCH.as_bytes());
    let hex: String = digest.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = cache_dir.join(format!("seccomp-{hex}.bpf"));
    if let Ok(program) = std::fs::read(&path) {
        // BPF_MAXINSNS: anything else is not a program this code wrote.
        if !program.is_empty() && program.len() % 8 == 0 && program.len() / 8 <= 4096 {
            return Ok(Compiled { program, notifies });
        }
    }
    let program = compile(filter)?;
    let _ = std::fs::create_dir_all(cache_dir);
    let partial = cache_dir.join(format!(".seccomp-{hex}.{}", std::process::id()));
    if std::fs::write(&partial, &program).is_ok() && std::fs::rename(&partial, &path).is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    Ok(Compiled { program, notifies })
}

/// A filter ready to load in the process it is for: compiled, and, when its calls
/// notify, connected to the runner's socket its listener goes to (`net::handoff`).
/// The socket is connected beforehand: a filter nobody listens to would fail every
/// `accept`, and a container's init no longer sees the socket's path once it has
/// changed its root. Both a container step (`sandbox::container`, in its init right
/// before the step's program) and a host step (`sandbox::host_init`) load theirs so.
pub struct Loadable {
    compiled: Compiled,
    runner: Option<std::os::unix::net::UnixStream>,
}

impl Loadable {
    /// Compiles `filter` (kept in `cache_dir` when given, see [`compiled`]) and
    /// connects to its listener's socket.
    pub fn prepare(filter: &LinuxSeccomp, cache_dir: Option<&Path>) -> std::io::Result<Loadable> {
        let compiled = match cache_dir {
            Some(dir) => compiled(filter, dir)?,
            None => Compiled {
                program: compile(filter)?,
                notifies: notifies(filter),
            },
        };
        let runner = match filter.listener_path() {
            Some(path) => Some(std::os::unix::net::UnixStream::connect(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot reach the runner's socket {}: {e}", path.display()),
                )
            })?),
            None => None,
        };
        Ok(Loadable { compiled, runner })
    }

    /// Loads the filter on the calling thread (which needs no_new_privs or
    /// CAP_SYS_ADMIN) and sends its listener to the runner. On failure, the error and
    /// whether the filter is in place already.
    pub fn install(&self) -> std::result::Result<(), (std::io::Error, bool)> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let listener =
            crate::sys::seccomp_set_filter(&self.compiled.program, self.compiled.notifies)
                .map_err(|e| (e, false))?;
        if let (Some(listener), Some(runner)) = (listener, &self.runner) {
            sendmsg::<()>(
                runner.as_raw_fd(),
                &[std::io::IoSlice::new(b"seccomp")],
                &[ControlMessage::ScmRights(&[listener.as_raw_fd()])],
                MsgFlags::empty(),
                None,
            )
            .map_err(|e| (e.into(), true))?;
        }
        Ok(())
    }
}

/// Some of the filter's calls notify a listener.
fn notifies(filter: &LinuxSeccomp) -> bool {
    filter
        .syscalls()
        .iter()
        .flatten()
        .any(|r| r.action() == LinuxSeccompAction::ScmpActNotify)
}

/// libseccomp's program for `filter`, made as libcontainer makes it (the same
/// translation of actions, architectures and argument checks), but exported instead
/// of loaded. Calls this machine's libseccomp does not know are left out, as
/// libcontainer does.
fn compile(filter: &LinuxSeccomp) -> std::io::Result<Vec<u8>> {
    use libseccomp::{
        ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
    };
    use std::io::{Read, Seek};
    let unsupported =
        |what: String| std::io::Error::other(format!("seccomp: {what} is not supported"));
    let action = |a: LinuxSeccompAction, errno: Option<u32>| -> std::io::Result<ScmpAction> {
        Ok(match a {
            LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
            LinuxSeccompAction::ScmpActErrno => {
                ScmpAction::Errno(errno.map_or(libc::EPERM, |e| e as i32))
            }
            LinuxSeccompAction::ScmpActNotify => ScmpAction::Notify,
            LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
            other => return Err(unsupported(format!("action {other:?}"))),
        })
    };
    let seccomp =
        |e: libseccomp::error::SeccompError| std::io::Error::other(format!("seccomp: {e}"));
    let default = action(filter.default_action(), filter.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(seccomp)?;
    for arch in filter.architectures().iter().flatten() {
        let arch = match arch {
            Arch::ScmpArchNative => ScmpArch::Native,
            Arch::ScmpArchX86_64 => ScmpArch::X8664,
            Arch::ScmpArchX86 => ScmpArch::X86,
            Arch::ScmpArchX32 => ScmpArch::X32,
            Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
            Arch::ScmpArchArm => ScmpArch::Arm,
            other => return Err(unsupported(format!("architecture {other:?}"))),
        };
        ctx.add_arch(arch).map_err(seccomp)?;
    }
    // The runtime decides about no_new_privs (set for a non-privileged step).
    ctx.set_ctl_nnp(false).map_err(seccomp)?;
    for rule in filter.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let compares = rule
            .args()
            .iter()
            .flatten()
            .map(|a| {
                let op = match a.op() {
                    LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
                    LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
                    LinuxSeccompOperator::ScmpCmpMaskedEq => {
                        ScmpCompareOp::MaskedEqual(a.value_two().unwrap_or(0))
                    }
                    other => return Err(unsupported(format!("operator {other:?}"))),
                };
                Ok(ScmpArgCompare::new(a.index() as u32, op, a.value()))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        for name in rule.names() {
            let Ok(call) = ScmpSyscall::from_name(name) else {
                continue;
            };
            if compares.is_empty() {
                ctx.add_rule(act, call).map_err(seccomp)?;
            } else {
                ctx.add_rule_conditional(act, call, &compares)
                    .map_err(seccomp)?;
            }
        }
    }
    let mut out = std::fs::File::from(rustix::fs::memfd_create(
        "sandrun-seccomp",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?);
    ctx.export_bpf(&out).map_err(seccomp)?;
    out.rewind()?;
    let mut program = Vec::new();
    out.read_to_end(&mut program)?;
    Ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The program is made once and read back after: the same bytes, a whole number of
    /// BPF instructions; a damaged file is made again; another filter has a file of
    /// its own.
    #[test]
    fn compiled_programs_are_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let plain = filter(false, None).unwrap().unwrap();
        let first = compiled(&plain, dir.path()).unwrap();
        assert!(!first.notifies);
        assert_eq!(first.program.len() % 8, 0);
        assert!(
            first.program.len() / 8 > 100,
            "{} instructions",
            first.program.len() / 8
        );
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(std::fs::read(&files[0]).unwrap(), first.program);
        assert_eq!(compiled(&plain, dir.path()).unwrap(), first);

        std::fs::write(&files[0], b"short").unwrap();
        assert_eq!(compiled(&plain, dir.path()).unwrap(), first);
        assert_eq!(std::fs::read(&files[0]).unwrap(), first.program);

        let notify = filter(false, Some(Path::new("/run/x.sock")))
            .unwrap()
            .unwrap();
        let with_listener = compiled(&notify, dir.path()).unwrap();
        assert!(with_listener.notifies);
        assert_ne!(with_listener.program, first.program);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // The listener's path (another one every run) is not part of the program.
        let elsewhere = filter(false, Some(Path::new("/run/y.sock")))
            .unwrap()
            .unwrap();
        assert_eq!(compiled(&elsewhere, dir.path()).unwrap(), with_listener);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    fn names(s: &LinuxSeccomp, action: LinuxSeccompAction) -> HashSet<String> {
        s.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == action && r.args().is_none())
            .flat_map(|r| r.names().iter().cloned())
            .collect()
    }

    #[test]
    fn default_profile_denies_what_reaches_past_the_container() {
        let s = filter(false, None).unwrap().unwrap();
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.default_errno_ret(), Some(libc::EPERM as u32));
        let allowed = names(&s, LinuxSeccompAction::ScmpActAllow);
        for denied in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "bpf",
            "perf_event_open",
            "init_module",
            "kexec_load",
            "keyctl",
            "add_key",
            "reboot",
            "settimeofday",
            "open_by_handle_at",
            "userfaultfd",
            "clone3",
        ] {
            assert!(!allowed.contains(denied), "{denied} is allowed");
        }
        for needed in [
            "execve", "openat", "mknodat", "accept4", "ptrace", "chroot", "wait4",
        ] {
            assert!(allowed.contains(needed), "{needed} is denied");
        }
        // Each name once: libseccomp refuses two unconditional rules for one call.
        let all: Vec<&str> = ALLOWED.iter().flat_map(|g| g.iter().copied()).collect();
        assert_eq!(all.len(), all.iter().collect::<HashSet<_>>().len());
        let clone = (s.syscalls().iter().flatten())
            .find(|r| r.names().as_slice() == ["clone"])
            .unwrap();
        let arg = &clone.args().as_ref().unwrap()[0];
        assert_eq!((arg.value(), arg.value_two()), (0, Some(NAMESPACE_FLAGS)));
        assert_eq!(NAMESPACE_FLAGS, 0x7e02_0000);
        assert!(s.listener_path().is_none());
    }

    #[test]
    fn accept_notification_joins_the_default_profile() {
        let listener = Path::new("/run/x/accept-web.sock");
        let s = filter(false, Some(listener)).unwrap().unwrap();
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.listener_path().as_deref(), Some(listener));
        let notify = names(&s, LinuxSeccompAction::ScmpActNotify);
        assert_eq!(notify, HashSet::from(["accept".into(), "accept4".into()]));
        let allowed = names(&s, LinuxSeccompAction::ScmpActAllow);
        assert!(!allowed.contains("accept") && !allowed.contains("accept4"));
        assert!(allowed.contains("bind"));
    }

    #[test]
    fn privileged_steps_get_only_the_notification() {
        assert!(filter(true, None).unwrap().is_none());
        let s = filter(true, Some(Path::new("/l"))).unwrap().unwrap();
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActAllow);
        let rules = s.syscalls().clone().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].names(), &["accept", "accept4"]);
        assert_eq!(rules[0].action(), LinuxSeccompAction::ScmpActNotify);
    }
}
