//! `sandrun __container <spec.json>`: the single-threaded helper that runs one
//! container. libcontainer clones the calling process and runs Rust code in the child,
//! which is unsafe from a multi-threaded tokio runner, so every container step gets a
//! helper of its own: cloned by the zygote (`sandbox::zygote`, the usual way, no exec)
//! or, when no zygote could be started, the runner's binary executed as
//! `sandrun __container` (`sandbox::launch`).
//!
//! The helper takes a private mount namespace (so the overlay root filesystem goes
//! away with it, whatever happens), mounts the image layers, resolves the process,
//! user and environment inside the image, writes the OCI bundle, starts the container
//! with stdout/stderr = its own, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT, waits,
//! deletes the container and its directories, and exits with the container's exit code
//! (128+N when killed by signal N). Its own problems go to stderr as one line starting
//! with [`ERROR_PREFIX`] (exit 125, or 127 when the program is missing from the
//! image); things it cannot do but runs on without start with [`WARNING_PREFIX`].

use std::fs;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use super::error::SandboxError;
use super::host;
use super::mounts;
use super::oci::{self, HostFacts};
use super::rootfs::{self, ImageUser};
use super::seccomp;
use super::spec::{self, ContainerProcess, ContainerSpec};
use super::state;
use super::userns;

/// Start of a line on the helper's stderr that reports a failure of sandrun itself.
pub const ERROR_PREFIX: &str = "sandrun: error: ";
/// Start of a line on the helper's stderr that reports something sandrun could not
/// do but ran on without (e.g. limits not enforceable rootless).
pub const WARNING_PREFIX: &str = "sandrun: warning: ";

/// Where a helper cloned by the zygote reports the step's exit status as soon as the
/// container has exited (a pipe to the runner), and the runner's stderr for what it
/// says afterwards; -1 for an executed helper, whose exit status is the report.
static REPORT_TO: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

/// Set in a helper that the zygote cloned into the stage's device group
/// (`sandbox::devices`): only then may a spec ask for no cgroups of its own.
static IN_DEVICE_GROUP: AtomicBool = AtomicBool::new(false);

/// Records that this helper started in the stage's device group.
pub(crate) fn started_in_device_group() {
    IN_DEVICE_GROUP.store(true, Ordering::SeqCst);
}

/// Makes [`run`] report the exit status on `status` and go on cleaning up quietly
/// (its output then goes to `runner_stderr`): the runner goes on with the stage
/// meanwhile, and waits for the helper only before it removes the run's state.
pub(crate) fn report_status_to(status: RawFd, runner_stderr: RawFd) {
    REPORT_TO[0].store(status, Ordering::SeqCst);
    REPORT_TO[1].store(runner_stderr, Ordering::SeqCst);
}

/// Sends `code` to the runner when it asked for an early report: the step's output
/// pipes are closed here (the container's processes are gone), its stderr becomes
/// the runner's.
fn report_early(code: i32) {
    let status = REPORT_TO[0].swap(-1, Ordering::SeqCst);
    if status < 0 {
        return;
    }
    let runner_stderr = REPORT_TO[1].load(Ordering::SeqCst);
    // SAFETY: writes and dup2s on descriptors this helper holds.
    unsafe {
        let bytes = code.to_ne_bytes();
        libc::write(status, bytes.as_ptr().cast(), bytes.len());
        libc::close(status);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
        if runner_stderr >= 0 {
            libc::dup2(runner_stderr, 2);
        }
    }
}

/// Entry point of `sandrun __container <spec.json>`.
pub fn main(spec_path: &Path) -> i32 {
    match run(spec_path) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{ERROR_PREFIX}{e}");
            match e {
                SandboxError::ShellMissing { .. } | SandboxError::ProgramMissing { .. } => 127,
                _ => 125,
            }
        }
    }
}

fn run(spec_path: &Path) -> Result<i32, SandboxError> {
    // Whoever started us (the runner, normally) takes us down when it dies; the
    // container's init gets the same from us (see `DeathSignalExecutor`).
    if crate::sys::die_with_parent(None).is_err() || nix::unistd::getppid().as_raw() == 1 {
        return Err(SandboxError::sys(
            "start",
            std::io::Error::other("the parent process is gone"),
        ));
    }
    let text = fs::read_to_string(spec_path).map_err(|e| SandboxError::io("read", spec_path, e))?;
    let spec: ContainerSpec =
        serde_json::from_str(&text).map_err(|e| SandboxError::InvalidSpec {
            path: spec_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if spec.id.is_empty()
        || !spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(SandboxError::InvalidSpec {
            path: spec_path.to_path_buf(),
            reason: format!("container id `{}` must be [A-Za-z0-9_.-]+", spec.id),
        });
    }
    // Started directly by an unprivileged user (not by a rootless runner, which is
    // already uid 0 of its namespace): enter a namespace of our own.
    if !nix::unistd::geteuid().is_root() {
        let info = userns::enter_rootless()?;
        if let Some(limit) = info.limitation() {
            eprintln!("{WARNING_PREFIX}{limit}");
        }
    }
    install_signal_forwarding()?;

    let _run_lock = state::hold_run(&spec.state_dir)?;
    let dirs = ContainerDirs::create(&spec)?;
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare a private mount namespace", e))?;
    super::userns::make_mounts_private()?;
    if !userns::in_user_namespace() {
        hide_cgroups_unless_own(&spec)?;
    }
    let mut layers = spec.image.layers.clone();
    if layers.is_empty() {
        layers.push(dirs.empty.clone());
    }
    rootfs::mount_overlay(&layers, &dirs.upper, &dirs.work, &dirs.rootfs)?;

    let (mut runtime_spec, facts) = prepare(&spec, &dirs.rootfs)?;
    let filter = take_filter(&spec, &mut runtime_spec)?;
    let own_mounts = oci::helper_mounts(&spec, &facts)
        .map_err(|e| container_error(&spec, "plan the mounts", e))?;
    mounts::mount_in_root(&dirs.rootfs, &own_mounts).map_err(|(dest, e)| {
        SandboxError::Container {
            step: spec.step.clone(),
            what: "mount",
            message: format!(
                "`{}` in image `{}`: {e}",
                dest.display(),
                spec.image.reference
            ),
        }
    })?;
    runtime_spec
        .save(dirs.bundle.join("config.json"))
        .map_err(|e| {
            SandboxError::io(
                "write",
                dirs.bundle.join("config.json"),
                std::io::Error::other(e),
            )
        })?;
    let mut container = build(
        &spec,
        &dirs,
        StepExecutor {
            filter: filter.clone(),
        },
    )?;
    if let Some(sig) = take_pending_signal() {
        let _ = container.delete(true);
        return Ok(128 + sig);
    }
    let started = container.start();
    if let Err(e) = started {
        let _ = container.delete(true);
        return Err(container_error(&spec, "start", e));
    }
    // The container's init holds its own copy of the listener connection.
    drop(filter);
    let pid = container.pid().ok_or_else(|| SandboxError::Container {
        step: spec.step.clone(),
        what: "start",
        message: "no pid after start".into(),
    })?;
    let (status, emulated) = wait_forwarding_signals(pid)?;
    let code = match (status, emulated) {
        (WaitStatus::Signaled(_, Signal::SIGKILL, _), Some(sig)) => 128 + sig as i32,
        (WaitStatus::Exited(_, code), _) => code,
        (WaitStatus::Signaled(_, sig, _), _) => 128 + sig as i32,
        (other, _) => {
            return Err(SandboxError::Container {
                step: spec.step.clone(),
                what: "wait",
                message: format!("unexpected status {other:?}"),
            })
        }
    };
    // The OOM killer may have hit any process of the step, not only its PID 1.
    if let (true, Some(bytes)) = (code != 0, facts.limits.memory_bytes) {
        if host::oom_killed(&facts.cgroups_path) {
            eprintln!(
                "{WARNING_PREFIX}step `{}` was killed by the kernel's out-of-memory killer (memory limit {} MiB)",
                spec.step,
                bytes / (1024 * 1024)
            );
        }
    }
    report_early(code);
    container
        .delete(true)
        .map_err(|e| container_error(&spec, "delete", e))?;
    drop(dirs);
    Ok(code)
}

/// As root, for a container without cgroups of its own (`sandbox::devices`): checks
/// that a step confined by the stage's device group really started in it, and hides
/// the cgroup hierarchies from libcontainer in this private mount namespace (an
/// empty, read-only tmpfs at /sys/fs/cgroup), so that it makes no cgroups and moves
/// no process. The container then sees an empty /sys/fs/cgroup, as rootless.
fn hide_cgroups_unless_own(spec: &ContainerSpec) -> Result<(), SandboxError> {
    use super::devices::CgroupMode;
    match spec.cgroups {
        CgroupMode::Own => return Ok(()),
        CgroupMode::InDeviceGroup if !IN_DEVICE_GROUP.load(Ordering::SeqCst) => {
            return Err(SandboxError::Container {
                step: spec.step.clone(),
                what: "start",
                message: "the helper was not started in the stage's device group".into(),
            })
        }
        CgroupMode::InDeviceGroup | CgroupMode::None => {}
    }
    let cgroup = Path::new("/sys/fs/cgroup");
    umount2(cgroup, MntFlags::MNT_DETACH)
        .map_err(|e| SandboxError::sys("hide /sys/fs/cgroup from the runtime", e))?;
    nix::mount::mount(
        Some("tmpfs"),
        cgroup,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=0555"),
    )
    .map_err(|e| SandboxError::sys("hide /sys/fs/cgroup from the runtime", e))
}

fn container_error(
    spec: &ContainerSpec,
    what: &'static str,
    e: impl std::error::Error,
) -> SandboxError {
    // libcontainer's errors wrap their causes: say all of them.
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    SandboxError::Container {
        step: spec.step.clone(),
        what,
        message,
    }
}

/// The helper's directories: `<state>/containers/<id>/{rootfs,upper,work}` (the bundle
/// is the container directory itself). Removed on drop, after unmounting the rootfs.
struct ContainerDirs {
    bundle: PathBuf,
    rootfs: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    empty: PathBuf,
    youki_root: PathBuf,
}

impl ContainerDirs {
    fn create(spec: &ContainerSpec) -> Result<Self, SandboxError> {
        let bundle = spec.state_dir.join("containers").join(&spec.id);
        let youki_root = spec.state_dir.join("youki");
        // A helper with the same id that was SIGKILLed left these behind.
        if bundle.exists() {
            state::remove_tree(&bundle);
        }
        let stale = youki_root.join(&spec.id);
        if stale.exists() {
            state::remove_tree(&stale);
        }
        let dirs = ContainerDirs {
            rootfs: bundle.join("rootfs"),
            upper: bundle.join("upper"),
            work: bundle.join("work"),
            empty: bundle.join("empty"),
            bundle,
            youki_root,
        };
        for d in [
            &dirs.rootfs,
            &dirs.upper,
            &dirs.work,
            &dirs.empty,
            &dirs.youki_root,
        ] {
            fs::create_dir_all(d).map_err(|e| SandboxError::io("create", d, e))?;
        }
        Ok(dirs)
    }
}

impl Drop for ContainerDirs {
    fn drop(&mut self) {
        let _ = umount2(&self.rootfs, MntFlags::MNT_DETACH);
        state::remove_tree(&self.bundle);
    }
}

/// Resolves what runs and as whom inside the mounted image, decides what the host
/// allows, and builds the OCI spec.
fn prepare(spec: &ContainerSpec, root: &Path) -> Result<(Spec, HostFacts), SandboxError> {
    let image = &spec.image.config;
    let user_spec = spec.user.clone().or_else(|| image.user.clone());
    let mut user = match &user_spec {
        Some(u) => rootfs::lookup_user(root, u).map_err(|missing| SandboxError::UnknownUser {
            step: spec.step.clone(),
            user: missing,
            image: spec.image.reference.clone(),
        })?,
        None => rootfs::lookup_user(root, "0").unwrap_or(ImageUser {
            uid: 0,
            gid: 0,
            home: "/root".into(),
            additional_gids: vec![],
        }),
    };
    let mapped = host::mapped_ids();
    if let Some(max) = mapped {
        if u64::from(user.uid) >= max || u64::from(user.gid) >= max {
            return Err(SandboxError::Container {
                step: spec.step.clone(),
                what: "choose the user",
                message: format!(
                    "image `{}` runs as uid {}:{}, but only ids 0..{} are mapped in sandrun's user namespace{}",
                    spec.image.reference,
                    user.uid,
                    user.gid,
                    max,
                    if max == 1 { " (install `uidmap` and give the user a range in /etc/subuid and /etc/subgid)" } else { "" }
                ),
            });
        }
    }
    if let Some(max) = mapped {
        let (kept, dropped): (Vec<u32>, Vec<u32>) = user
            .additional_gids
            .iter()
            .partition(|g| u64::from(**g) < max);
        if !dropped.is_empty() {
            eprintln!(
                "{WARNING_PREFIX}step `{}` runs without its supplementary groups {} from image `{}`: only ids 0..{} are mapped in sandrun's user namespace",
                spec.step,
                dropped.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
                spec.image.reference,
                max
            );
        }
        user.additional_gids = kept;
    }
    let argv = spec::argv(&spec.process, image);
    if argv.is_empty() {
        return Err(SandboxError::NothingToRun {
            step: spec.step.clone(),
            image: spec.image.reference.clone(),
        });
    }
    let env = spec::environment(image, &spec.env, &spec.hostname, &user.home);
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(spec::DEFAULT_PATH);
    if rootfs::find_program(root, &argv[0], path_var).is_none() {
        return Err(match &spec.process {
            ContainerProcess::Shell { .. } => SandboxError::ShellMissing {
                image: spec.image.reference.clone(),
                shell: argv[0].clone(),
                step: spec.step.clone(),
            },
            _ => SandboxError::ProgramMissing {
                image: spec.image.reference.clone(),
                program: argv[0].clone(),
                step: spec.step.clone(),
            },
        });
    }
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/".into());

    let facts = host::facts(spec);
    for warning in &facts.1 {
        eprintln!("{WARNING_PREFIX}{warning}");
    }
    let facts = facts.0;
    let process = oci::Process {
        argv,
        env,
        cwd: &cwd,
        user: &user,
    };
    let runtime = oci::runtime_spec(spec, root, &process, &facts)
        .map_err(|e| container_error(spec, "write the OCI runtime spec", e))?;
    Ok((runtime, facts))
}

fn build(
    spec: &ContainerSpec,
    dirs: &ContainerDirs,
    executor: StepExecutor,
) -> Result<Container, SandboxError> {
    ContainerBuilder::new(spec.id.clone(), SyscallType::Linux)
        .with_executor(executor)
        .with_root_path(&dirs.youki_root)
        .and_then(|b| b.validate_id())
        .and_then(|b| {
            b.as_init(&dirs.bundle)
                .with_systemd(false)
                .with_detach(false)
                .build()
        })
        .map_err(|e| container_error(spec, "create", e))
}

/// Takes the step's seccomp filter out of `runtime` and prepares it for sandrun's
/// executor to load (`seccomp::Loadable`): libcontainer is not given it, since it would
/// compile it again in every container.
fn take_filter(
    spec: &ContainerSpec,
    runtime: &mut Spec,
) -> Result<Option<Arc<seccomp::Loadable>>, SandboxError> {
    let Some(filter) = runtime
        .linux_mut()
        .as_mut()
        .and_then(|l| l.seccomp_mut().take())
    else {
        return Ok(None);
    };
    let cache = spec.cache_dir.as_deref().unwrap_or(&spec.state_dir);
    let loadable = seccomp::Loadable::prepare(&filter, Some(cache))
        .map_err(|e| container_error(spec, "prepare the seccomp filter", e))?;
    Ok(Some(Arc::new(loadable)))
}

/// libcontainer's default executor, plus, in the container's init just before it
/// execs: `PR_SET_PDEATHSIG(SIGKILL)` (if the helper is SIGKILLed because the runner
/// died, the container's PID 1 dies, and with it its whole PID namespace), default
/// signal dispositions, and the step's seccomp filter, loaded last.
#[derive(Clone)]
struct StepExecutor {
    filter: Option<Arc<seccomp::Loadable>>,
}

impl Executor for StepExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // The helper is alive here (it waits for this init), so no check is needed.
        let _ = crate::sys::die_with_parent(None);
        // Start with default signal dispositions and an empty mask.
        reset_signal_handlers();
        if let Some(filter) = &self.filter {
            filter
                .install()
                .map_err(|(e, _)| ExecutorError::Other(format!("load the seccomp filter: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

const FORWARDED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Write end of the self-pipe that the signal handler writes signal numbers to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_READ: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

fn install_signal_forwarding() -> Result<(), SandboxError> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| SandboxError::sys("create the signal pipe", e))?;
    SIGNAL_READ.store(std::os::fd::IntoRawFd::into_raw_fd(read), Ordering::Relaxed);
    SIGNAL_PIPE.store(
        std::os::fd::IntoRawFd::into_raw_fd(write),
        Ordering::Relaxed,
    );
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler only calls write(2).
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .map_err(|e| SandboxError::sys(format!("handle {sig}"), e))?;
    }
    Ok(())
}

fn reset_signal_handlers() {
    for sig in FORWARDED {
        // SAFETY: restoring the default disposition.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// A signal received so far (before the container started), if any.
fn take_pending_signal() -> Option<i32> {
    read_signals().into_iter().last()
}

fn read_signals() -> Vec<i32> {
    let fd = SIGNAL_READ.load(Ordering::Relaxed);
    let mut out = Vec::new();
    let mut buf = [0u8; 16];
    // The pipe is non-blocking: EAGAIN once it is empty.
    while let Ok(n @ 1..) = nix::unistd::read(fd, &mut buf) {
        out.extend(buf[..n].iter().map(|b| i32::from(*b)));
    }
    out
}

/// Waits for the container's init, forwarding signals to it meanwhile. pidfd + poll so
/// that no signal is lost between checking and waiting. Also returns the signal the
/// init was killed in place of (see `host::signal_container`).
fn wait_forwarding_signals(pid: Pid) -> Result<(WaitStatus, Option<Signal>), SandboxError> {
    let pidfd = crate::sys::pidfd_open(pid.as_raw() as u32, false)
        .map_err(|e| SandboxError::sys("open a pidfd for the container", e))?;
    // SAFETY: the signal pipe's read end is opened once, before this, and never
    // closed while the helper lives.
    let signal_fd = unsafe { BorrowedFd::borrow_raw(SIGNAL_READ.load(Ordering::Relaxed)) };
    let mut emulated = None;
    loop {
        for sig in read_signals() {
            if let Ok(sig) = Signal::try_from(sig) {
                emulated = emulated.or(host::signal_container(pid, sig));
            }
        }
        let mut fds = [
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd, PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::sys("wait for the container", e)),
        }
        if fds[0].any() == Some(true) {
            loop {
                match waitpid(pid, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(status) => return Ok((status, emulated)),
                    Err(e) => return Err(SandboxError::sys("wait for the container", e)),
                }
            }
        }
    }
}
