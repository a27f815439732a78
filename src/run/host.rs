//! Steps without an image: the host's own binaries (Harness's "leave Image blank"),
//! started through the [launch contract](crate::launch).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::launch::{LaunchError, LaunchSpec, Launcher, Process, StepChild};
use crate::net::StageNetwork;
use crate::sandbox::InvokingUser;

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
        // namespaces, the init moves the command back to the invoking user and keeps
        // what the command leaves running until the stage ends, reporting the
        // command's exit status on a pipe; without it (no stage network: executor
        // tests), the user switch happens here.
        let mut report = None;
        let (argv, user): (Vec<std::ffi::OsString>, _) = match (&self.init_binary, spec.network) {
            (Some(binary), Some(_)) => {
                let pipe = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
                let (read, write) = pipe.map_err(|e| LaunchError::Spawn {
                    step: spec.step.key.clone(),
                    program: binary.display().to_string(),
                    source: e.into(),
                })?;
                let init = crate::sandbox::host_init::HostInit {
                    binary,
                    hostname: &spec.step.identifier,
                    user: self.invoking_user.as_ref(),
                    writable: std::iter::once(spec.workspace)
                        .chain(self.writable.iter().map(PathBuf::as_path))
                        .collect(),
                    accept_listener: spec.accept_listener,
                    report_fd: Some(write.as_raw_fd()),
                    shared: spec.shared_paths,
                };
                let argv = crate::sandbox::host_init::wrap(&init, &argv);
                report = Some((read, write));
                (argv, None)
            }
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
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: die_with_parent makes two async-signal-safe system calls (prctl,
        // getppid) on a pid copied before the fork. A SIGKILLed sandrun then takes the
        // step down with it (only the direct child; stage teardown kills whole
        // groups), and a runner that died before the prctl is noticed.
        unsafe {
            cmd.pre_exec(move || crate::sys::die_with_parent(Some(parent)));
        }
        if let Some(fd) = report.as_ref().map(|(_, write)| write.as_raw_fd()) {
            // SAFETY: one fcntl on a descriptor that stays open until after the spawn.
            // The init alone gets the pipe's write end.
            unsafe {
                cmd.pre_exec(move || crate::sys::keep_across_exec(fd));
            }
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
        let (read, write) = report.unzip();
        let spawned = cmd.spawn();
        drop(write);
        spawned
            .and_then(|child| StepChild::from_std_lingering(child, read))
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
