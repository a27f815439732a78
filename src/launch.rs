//! The launch contract: how the executor starts a step's process, whatever it runs in.
//!
//! The executor does not know about containers or namespaces: it hands a [`LaunchSpec`]
//! to a [`Launcher`] and gets back a child process with piped stdout and stderr, in a
//! process group of its own so that stopping it (SIGTERM to the group, then SIGKILL)
//! reaches everything it started. Both sides use this module and neither reaches into
//! the other: `run::host::HostLauncher` runs host binaries (Harness's "leave Image
//! blank"), `sandbox::ContainerLauncher` runs containers.

use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use futures::future::BoxFuture;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest};

use crate::net::StageNetwork;
use crate::pipeline::Shell;
use crate::plan::StepPlan;

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
    /// The stage's `sharedPaths`: a directory of the stage (host side) for each path
    /// every step of the stage sees there.
    pub shared_paths: &'a [(PathBuf, String)],
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
    #[error("cannot start the container of step `{step}`: {source}")]
    Container {
        step: String,
        source: crate::sandbox::SandboxError,
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

/// Output of a step's process as the executor reads it.
pub type StepOutput = Box<dyn AsyncRead + Send + Unpin>;

/// A started step: its piped stdout and stderr, and the process behind them.
pub struct StepChild {
    pub stdout: Option<StepOutput>,
    pub stderr: Option<StepOutput>,
    process: Box<dyn StepProcess>,
}

/// What the executor needs of a step's running process: the seam between the
/// executor and the system, where its tests put a scripted process.
pub trait StepProcess: Send {
    /// The pid, while the process runs.
    fn id(&self) -> Option<u32>;
    /// Waits for the process to end. Cancel-safe; once it has ended, returns the same
    /// status again.
    fn wait(&mut self) -> BoxFuture<'_, io::Result<ExitStatus>>;
    /// Sends `signal` to the step's process group, while the process runs.
    fn signal_group(&self, signal: Signal);
    /// The step's process group, for the stage's end to kill.
    fn into_group(self: Box<Self>) -> Option<ProcessGroup>;
    /// See [`StepChild::lingers`].
    fn lingers(&self) -> bool {
        false
    }
}

impl StepChild {
    pub fn new(stdout: StepOutput, stderr: StepOutput, process: Box<dyn StepProcess>) -> Self {
        StepChild {
            stdout: Some(stdout),
            stderr: Some(stderr),
            process,
        }
    }

    /// Wraps a child spawned by `std` with piped stdout and stderr. (A `std` child is
    /// never reaped behind our back, unlike a tokio one.)
    pub fn from_std(child: std::process::Child) -> io::Result<StepChild> {
        StepChild::from_std_lingering(child, None)
    }

    /// [`StepChild::from_std`] for a host step's init (`sandbox::host_init`), which
    /// reports the command's exit status on `report` and then keeps what the command
    /// left running (a daemon, `cmd &`) until the stage's end stops it gracefully
    /// ([`ProcessGroup::stop`]).
    pub fn from_std_lingering(
        mut child: std::process::Child,
        report: Option<OwnedFd>,
    ) -> io::Result<StepChild> {
        let lingers = report.is_some();
        let pipes = child.stdout.take().zip(child.stderr.take());
        let wrapped = match pipes {
            Some((out, err)) => {
                StepChild::build(child.id(), out.into(), err.into(), report, lingers)
            }
            None => Err(io::Error::other(
                "the step's stdout and stderr are not piped",
            )),
        };
        if wrapped.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wrapped
    }

    /// A child of this process known by pid (it must not have been waited for yet, so
    /// the pid cannot have been reused), with the read ends of its output pipes and,
    /// for a container helper, the pipe it reports its step's exit status to before
    /// it cleans up (see `sandbox::container::report_status_to`).
    pub fn from_pid(
        pid: u32,
        stdout: OwnedFd,
        stderr: OwnedFd,
        report: Option<OwnedFd>,
    ) -> io::Result<StepChild> {
        StepChild::build(pid, stdout, stderr, report, false)
    }

    fn build(
        pid: u32,
        stdout: OwnedFd,
        stderr: OwnedFd,
        report: Option<OwnedFd>,
        lingers: bool,
    ) -> io::Result<StepChild> {
        let pipe = |fd: OwnedFd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd);
        let pidfd = crate::sys::pidfd_open(pid, true)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps this same open
        // descriptor until it is dropped or taken back with `into_inner`.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let process = ChildProcess {
            pid,
            pidfd: Some(pidfd),
            status: None,
            report: report.map(pipe).transpose()?,
            lingers,
            reported: false,
        };
        Ok(StepChild::new(
            Box::new(pipe(stdout)?),
            Box::new(pipe(stderr)?),
            Box::new(process),
        ))
    }

    /// The pid, while the process runs.
    pub fn id(&self) -> Option<u32> {
        self.process.id()
    }

    /// Waits for the process to end (see [`StepProcess::wait`]).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.process.wait().await
    }

    /// Sends `signal` to the step's process group, while the process runs.
    pub fn signal_group(&self, signal: Signal) {
        self.process.signal_group(signal)
    }

    /// The step's process group, for the stage's end to kill.
    pub fn into_group(self) -> Option<ProcessGroup> {
        self.process.into_group()
    }

    /// Whether the step has ended but left processes running that live on until the
    /// stage ends (a host step's daemon).
    pub fn lingers(&self) -> bool {
        self.process.lingers()
    }
}

/// A step process that is the runner's own child, waited for through a pidfd
/// without being reaped: the leader stays a zombie, so its pid, which is also its
/// group's id, cannot be given to another process while the runner may still signal
/// the group. [`StepProcess::into_group`] hands the group over for the stage's end,
/// which kills it and only then reaps the leader.
struct ChildProcess {
    pid: u32,
    /// The leader's pidfd, until the group is handed over (or reaped on drop).
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    report: Option<tokio::net::unix::pipe::Receiver>,
    /// A host step's init: it outlives the command while what the command left runs.
    lingers: bool,
    /// The status came from the report pipe, not from the leader's end.
    reported: bool,
}

/// Leaders whose groups were killed but that had not ended yet (a helper still
/// cleaning up, a process just SIGKILLed): [`reap_reported`] waits for them.
static UNREAPED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

fn reap_later(pidfd: OwnedFd) {
    UNREAPED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pidfd);
}

/// Waits for every step leader not reaped yet (helpers that reported their step's
/// exit status early clean up meanwhile). Call before removing the run's state.
pub fn reap_reported() {
    let pending = std::mem::take(&mut *UNREAPED.lock().unwrap_or_else(|e| e.into_inner()));
    for pidfd in pending {
        // ECHILD: already reaped; nothing else can fail for our own child.
        let _ = crate::sys::reap(&pidfd);
    }
}

/// A step's process group whose leader is known to be the runner's unreaped child, so
/// that the group's id is still the step's: what the stage's end may kill.
pub struct ProcessGroup {
    leader: OwnedFd,
    pgid: u32,
    /// The leader lingers by design (a host step's init keeping what the command left
    /// running): it is stopped as a service is, SIGTERM first.
    graceful: bool,
}

impl ProcessGroup {
    /// Stops what is left in the group. A lingering host step's init gets SIGTERM (it
    /// passes it to every process of its step, see `sandbox::host_init`) and `grace`
    /// to end, as a Background step does, or until `hurry` (a second Ctrl-C); then, as
    /// every group, SIGKILL.
    pub async fn stop(
        self,
        grace: std::time::Duration,
        hurry: impl std::future::Future<Output = ()>,
    ) {
        let running = || matches!(crate::sys::wait_pidfd(&self.leader, false, false), Ok(None));
        if self.graceful && running() {
            let _ = killpg(Pid::from_raw(self.pgid as i32), Signal::SIGTERM);
            if let Ok(fd) = self.leader.try_clone() {
                // SAFETY: the AsyncFd owns this duplicate until it is dropped below.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
                if let Ok(fd) = fd {
                    tokio::select! {
                        _ = tokio::time::timeout(grace, fd.readable()) => {}
                        _ = hurry => {}
                    }
                }
            }
        }
        self.kill();
    }

    /// SIGKILLs whatever is left in the group, then reaps the leader (now, or at the
    /// end of the run when it has not ended yet).
    pub fn kill(self) {
        // ESRCH (the group is empty but for the zombie leader) is the usual, good case.
        let _ = killpg(Pid::from_raw(self.pgid as i32), Signal::SIGKILL);
        match crate::sys::wait_pidfd(&self.leader, true, false) {
            Ok(Some(_)) => {}
            _ => reap_later(self.leader),
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Dropped without its group handed over: a step abandoned while running is
        // killed (its leader is unreaped, so the group is still its own).
        if let Some(group) = self.take_group() {
            if self.status.is_none() {
                group.kill();
            } else {
                reap_later(group.leader);
            }
        }
    }
}

impl ChildProcess {
    fn take_group(&mut self) -> Option<ProcessGroup> {
        self.pidfd.take().map(|fd| ProcessGroup {
            leader: fd.into_inner(),
            pgid: self.pid,
            graceful: self.lingers,
        })
    }

    async fn wait_unreaped(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            let Some(pidfd) = self.pidfd.as_ref() else {
                return Err(io::Error::other("the step's process group was handed over"));
            };
            let report = &mut self.report;
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
            tokio::select! {
                code = early => match code {
                    // The exit code, as the helper would have exited with it; the
                    // helper itself ends (and is reaped) later.
                    Some(code) => {
                        let code = i32::from_ne_bytes(code);
                        self.status = Some(ExitStatus::from_raw((code & 0xff) << 8));
                        self.reported = true;
                    }
                    // The helper ended (or failed) before reporting: its exit status
                    // says.
                    None => self.report = None,
                },
                ready = pidfd.readable() => {
                    let mut ready = ready?;
                    match crate::sys::wait_pidfd(pidfd.get_ref(), false, false)? {
                        Some(status) => {
                            self.status = Some(status);
                            self.report = None;
                        }
                        None => ready.clear_ready(),
                    }
                }
            }
        }
    }
}

impl StepProcess for ChildProcess {
    fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid)
    }

    fn wait(&mut self) -> BoxFuture<'_, io::Result<ExitStatus>> {
        Box::pin(self.wait_unreaped())
    }

    fn signal_group(&self, signal: Signal) {
        // Only while the leader runs: after, the group may be gone, and its id is
        // kept for the stage's end (see ProcessGroup). ESRCH is harmless.
        if self.status.is_none() && self.pidfd.is_some() {
            let _ = killpg(Pid::from_raw(self.pid as i32), signal);
        }
    }

    fn into_group(mut self: Box<Self>) -> Option<ProcessGroup> {
        self.take_group()
    }

    fn lingers(&self) -> bool {
        // A host step's init reports only when the command left processes running.
        self.lingers && self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncBufReadExt;

    fn state_of(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(") ").next()?.chars().next()
    }

    /// A step that ended long ago keeps its group id (its leader is an unreaped
    /// zombie) until the stage's end kills what it left, so that kill can never reach
    /// a process that was given the same id since.
    #[tokio::test]
    async fn an_ended_step_keeps_its_group_id_until_its_group_is_killed() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = StepChild::from_std(cmd.spawn().unwrap()).unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        let left: u32 = line.trim().parse().unwrap();
        let leader = child.id().unwrap();
        assert!(child.wait().await.unwrap().success());
        assert_eq!(child.id(), None);
        assert_eq!(state_of(leader), Some('Z'), "the leader must stay unreaped");

        child.into_group().unwrap().kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(state_of(left), None | Some('Z')) {
            assert!(Instant::now() < deadline, "the step's leftover survived");
            std::thread::sleep(Duration::from_millis(10));
        }
        reap_reported();
        assert_eq!(state_of(leader), None, "the leader is reaped at the end");
    }
}
