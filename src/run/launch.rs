//! How the executor starts a step's process, whatever it runs in.
//!
//! The executor does not know about containers or namespaces: it hands a [`LaunchSpec`]
//! to a [`Launcher`] and gets back a child process with piped stdout and stderr, in a
//! process group of its own so that stopping it (SIGTERM to the group, then SIGKILL)
//! reaches everything it started. [`HostLauncher`] runs host binaries (Harness's
//! "leave Image blank"); the sandbox layer provides the container launcher.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest};
use tokio::process::{Child, Command};

use crate::net::StageNetwork;
use crate::pipeline::Shell;
use crate::plan::StepPlan;
use crate::sandbox::InvokingUser;

/// A step's process, with step outputs already substituted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Process {
    /// A script for `shell`; [`Shell::argv`] turns it into a command line.
    Shell { shell: Shell, script: String },
    /// An explicit argv (a Background step's `entrypoint`).
    Exec { argv: Vec<String> },
    /// The image's own entrypoint and cmd.
    ImageDefault,
}

/// Everything a launcher needs to start one step.
pub struct LaunchSpec<'a> {
    pub step: &'a StepPlan,
    pub process: Process,
    /// Variables for the step (stage, group, then step), over the image's or host's own.
    pub env: Vec<(String, String)>,
    /// The stage workspace, shared by every step.
    pub workspace: &'a Path,
    /// A directory private to this step on the host (output variables are written here).
    pub control_dir: &'a Path,
    /// The stage network the step joins (`None` only in executor tests).
    pub network: Option<&'a StageNetwork>,
    /// The runner's socket for the seccomp listener of the step's `accept` calls, when
    /// host connections to its bound ports are to be handed to it (`net::handoff`).
    pub accept_listener: Option<&'a Path>,
}

impl<'a> LaunchSpec<'a> {
    /// What `part` gives for this step from the stage network (`None` without one),
    /// its error told as the step's.
    pub fn network_part<T>(
        &self,
        part: impl FnOnce(&'a StageNetwork, &str) -> Result<T, crate::net::NetError>,
    ) -> Result<Option<T>, LaunchError> {
        self.network
            .map(|net| part(net, &self.step.key))
            .transpose()
            .map_err(|source| LaunchError::Network {
                step: self.step.key.clone(),
                source,
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start `{program}` for step `{step}`: {source}")]
    Spawn {
        step: String,
        program: String,
        source: io::Error,
    },
    #[error("step `{step}`: {message}")]
    Refused { step: String, message: String },
    #[error("step `{step}` cannot join the stage network: {source}")]
    Network {
        step: String,
        source: crate::net::NetError,
    },
}

/// Starts step processes. Implementations must return a child whose stdout and stderr
/// are piped and which leads its own process group.
pub trait Launcher: Send + Sync {
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<StepChild, LaunchError>;

    /// Where `LaunchSpec::control_dir` appears to the step's process.
    fn control_dir_in_step(&self, host_path: &Path) -> PathBuf;

    /// Where `LaunchSpec::workspace` appears to the step's process.
    fn workspace_in_step(&self, host_path: &Path) -> PathBuf;
}

/// Runs host binaries in the workspace, with the host's environment plus the step's,
/// inside the step's network namespace (seeing the step's `/etc/hosts` and
/// `/etc/resolv.conf`). Rootless, the process is moved back to the invoking user's own
/// uid, so that host tools see the user they expect and files they create are the
/// user's.
pub struct HostLauncher {
    pub invoking_user: Option<InvokingUser>,
    /// The sandrun executable: with a stage network, host steps run through its
    /// `__host-init` (own PID, UTS and IPC namespaces; nothing outlives the step;
    /// the host read-only but for the workspace, scratch dirs and `writable`).
    pub init_binary: Option<PathBuf>,
    /// Host paths host steps may write besides the workspace and scratch dirs
    /// (`--host-writable`).
    pub writable: Vec<PathBuf>,
}
impl Launcher for HostLauncher {
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<StepChild, LaunchError> {
        let argv = match &spec.process {
            Process::Shell { shell, script } => shell.argv(script),
            Process::Exec { argv } => argv.clone(),
            Process::ImageDefault => {
                return Err(LaunchError::Refused {
                    step: spec.step.key.clone(),
                    message: "has neither an image nor a command to run on the host".into(),
                })
            }
        };
        // Through sandrun's host init, the step gets its own PID, UTS and IPC
        // namespaces and the init moves the command back to the invoking user; without
        // it (no stage network: executor tests), the user switch happens here.
        let (argv, user): (Vec<std::ffi::OsString>, _) = match (&self.init_binary, spec.network) {
            (Some(binary), Some(_)) => (
                crate::sandbox::host_init::wrap(
                    binary,
                    &spec.step.identifier,
                    self.invoking_user.as_ref(),
                    &std::iter::once(spec.workspace)
                        .chain(self.writable.iter().map(PathBuf::as_path))
                        .collect::<Vec<_>>(),
                    spec.accept_listener,
                    &argv,
                ),
                None,
            ),
            _ => (
                argv.iter().map(Into::into).collect(),
                self.invoking_user.clone(),
            ),
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(spec.workspace)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. A SIGKILLed sandrun then takes the step
        // down with it (only the direct child; stage teardown kills whole groups).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let join = spec.network_part(StageNetwork::host_join)?;
        if join.is_some() || user.is_some() {
            // SAFETY: both only make async-signal-safe system calls on data prepared
            // before the fork. The network is joined first: that needs the runner's
            // capabilities, which the nested user namespace gives up.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(j) = &join {
                        j.enter()?;
                    }
                    if let Some(u) = &user {
                        u.enter()?;
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn()
            .map(StepChild::from)
            .map_err(|e| LaunchError::Spawn {
                step: spec.step.key.clone(),
                program: argv[0].to_string_lossy().into_owned(),
                source: e,
            })
    }

    fn control_dir_in_step(&self, host_path: &Path) -> PathBuf {
        host_path.to_path_buf()
    }

    fn workspace_in_step(&self, host_path: &Path) -> PathBuf {
        host_path.to_path_buf()
    }
}

/// Output of a step's process as the executor reads it.
pub type StepOutput = Box<dyn AsyncRead + Send + Unpin>;

/// A started step process: a child of the runner in a process group of its own, with
/// its stdout and stderr piped to the runner. Either spawned by tokio (host steps, an
/// executed helper) or cloned by the zygote as the runner's child and waited for
/// through a pidfd.
pub struct StepChild {
    pub stdout: Option<StepOutput>,
    pub stderr: Option<StepOutput>,
    kind: ChildKind,
}

enum ChildKind {
    Tokio(Child),
    Pidfd {
        pid: u32,
        pidfd: Option<AsyncFd<OwnedFd>>,
        status: Option<ExitStatus>,
        /// Where a container helper reports its step's exit status before it cleans
        /// up (see `sandbox::container::report_status_to`).
        report: Option<tokio::net::unix::pipe::Receiver>,
    },
}

/// Helpers that reported their step's exit status and were not reaped yet (they are
/// still cleaning up): [`reap_reported`] waits for them.
static REPORTED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Waits for every helper that reported its step's exit status early to end (it
/// cleans up after its container meanwhile). Call before removing the run's state.
pub fn reap_reported() {
    let pending = std::mem::take(&mut *REPORTED.lock().unwrap_or_else(|e| e.into_inner()));
    for pidfd in pending {
        // SAFETY: waitid(2) on a pidfd of our child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            let r = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED,
                )
            };
            if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
    }
}

impl Drop for StepChild {
    fn drop(&mut self) {
        // Reported but not reaped: the helper is still cleaning up; keep its pidfd so
        // that the run waits for it (reap_reported).
        if let ChildKind::Pidfd { pidfd, status, .. } = &mut self.kind {
            if status.is_some() {
                if let Some(fd) = pidfd.take() {
                    let fd = fd.into_inner();
                    REPORTED.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
                }
            }
        }
    }
}

impl From<Child> for StepChild {
    fn from(mut child: Child) -> StepChild {
        StepChild {
            stdout: child.stdout.take().map(|o| Box::new(o) as StepOutput),
            stderr: child.stderr.take().map(|e| Box::new(e) as StepOutput),
            kind: ChildKind::Tokio(child),
        }
    }
}

impl StepChild {
    /// A child of this process known by pid (it must not have been waited for yet, so
    /// the pid cannot have been reused), with the read ends of its output pipes.
    pub fn from_pid(pid: u32, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<StepChild> {
        // SAFETY: pidfd_open(2) returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_pidfd_open,
                pid as libc::pid_t,
                libc::PIDFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let pipe = |fd: OwnedFd| -> io::Result<StepOutput> {
            Ok(Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(
                fd,
            )?))
        };
        // SAFETY: an OwnedFd keeps the same open descriptor for its whole life.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(StepChild {
            stdout: Some(pipe(stdout)?),
            stderr: Some(pipe(stderr)?),
            kind: ChildKind::Pidfd {
                pid,
                pidfd: Some(pidfd),
                status: None,
                report: None,
            },
        })
    }

    /// Takes the step's exit status from `status` (a pipe the helper writes it to
    /// before cleaning up) when it comes before the helper's own exit.
    pub fn with_status_pipe(mut self, status: OwnedFd) -> io::Result<StepChild> {
        if let ChildKind::Pidfd { report, .. } = &mut self.kind {
            *report = Some(tokio::net::unix::pipe::Receiver::from_owned_fd(status)?);
        }
        Ok(self)
    }

    /// The pid, until the process has been waited for.
    pub fn id(&self) -> Option<u32> {
        match &self.kind {
            ChildKind::Tokio(c) => c.id(),
            ChildKind::Pidfd { pid, status, .. } => status.is_none().then_some(*pid),
        }
    }

    /// Waits for the process to end and reaps it. Cancel-safe; once it has ended,
    /// returns the same status again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.kind {
            ChildKind::Tokio(c) => c.wait().await,
            ChildKind::Pidfd {
                pidfd: slot,
                status,
                report,
                ..
            } => loop {
                if let Some(s) = status {
                    return Ok(*s);
                }
                let Some(pidfd) = slot.as_ref() else {
                    return Err(io::Error::other("the helper was already waited for"));
                };
                let early = async {
                    match report.as_mut() {
                        Some(pipe) => {
                            use tokio::io::AsyncReadExt;
                            let mut code = [0u8; 4];
                            pipe.read_exact(&mut code).await.ok().map(|_| code)
                        }
                        None => std::future::pending().await,
                    }
                };
                let reaped = tokio::select! {
                    code = early => {
                        match code {
                            // The exit code, as the helper would have exited with it;
                            // the helper is reaped later (see `reap_reported`).
                            Some(code) => {
                                let code = i32::from_ne_bytes(code);
                                *status = Some(ExitStatus::from_raw((code & 0xff) << 8));
                            }
                            // The helper ended (or failed) before reporting: its exit
                            // status says.
                            None => *report = None,
                        }
                        None
                    }
                    ready = pidfd.readable() => {
                        let mut ready = ready?;
                        // SAFETY: waitid(2) on a pidfd of our child fills `info`.
                        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                        let r = unsafe {
                            libc::waitid(
                                libc::P_PIDFD,
                                pidfd.as_raw_fd() as libc::id_t,
                                &mut info,
                                libc::WEXITED | libc::WNOHANG,
                            )
                        };
                        if r < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        // SAFETY: waitid filled the child fields (si_pid 0: not yet ended).
                        let (pid, code, value) =
                            unsafe { (info.si_pid(), info.si_code, info.si_status()) };
                        if pid == 0 {
                            ready.clear_ready();
                            None
                        } else {
                            // The raw wait(2) status: exit code in the second byte, or
                            // the signal (with 0x80 for a core dump).
                            Some(match code {
                                libc::CLD_EXITED => (value & 0xff) << 8,
                                libc::CLD_DUMPED => value | 0x80,
                                _ => value,
                            })
                        }
                    }
                };
                if let Some(raw) = reaped {
                    *status = Some(ExitStatus::from_raw(raw));
                    // Reaped: nothing to wait for later.
                    *slot = None;
                    *report = None;
                }
            },
        }
    }
}
