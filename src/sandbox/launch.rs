//! Starting the `sandrun __container` helper from the runner. The runner is a tokio
//! program with many threads, so the child is set up in `pre_exec` with
//! async-signal-safe calls only: join the step's network namespace, ask for SIGKILL
//! when the runner dies, and leave if the runner already died meanwhile. The child gets
//! its own process group so that the executor can stop it (and only it) with SIGTERM,
//! then SIGKILL.

use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::error::SandboxError;
use super::spec::ContainerSpec;

/// Where the helper writes a step's spec: `<state>/specs/<id>.json`.
pub fn spec_path(spec: &ContainerSpec) -> PathBuf {
    spec.state_dir
        .join("specs")
        .join(format!("{}.json", spec.id))
}

/// Writes `spec` under its run's state directory and spawns `binary __container` for
/// it, with stdin from /dev/null and stdout/stderr piped, inside `netns` when given.
/// The child is not reaped behind the caller's back (a `std` child is never waited
/// for on drop): [`crate::launch::StepChild`] waits for it through a pidfd.
///
/// Call it from a runtime worker thread, not from `spawn_blocking`: the helper's
/// parent-death signal fires when the spawning *thread* exits.
pub fn spawn_container(
    binary: &Path,
    spec: &ContainerSpec,
    netns: Option<BorrowedFd<'_>>,
) -> Result<std::process::Child, SandboxError> {
    let path = write_spec(spec)?;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("__container")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let netns = netns.map(|fd| fd.as_raw_fd());
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe system calls run (setns,
    // prctl, getppid), on a descriptor number and a pid copied before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = netns {
                crate::sys::join_network_namespace(fd)?;
            }
            crate::sys::die_with_parent(Some(parent))
        });
    }
    cmd.spawn()
        .map_err(|e| SandboxError::io("start the container helper", binary, e))
}

/// Writes the spec JSON (creating the run's private state directory if needed).
pub fn write_spec(spec: &ContainerSpec) -> Result<PathBuf, SandboxError> {
    let path = spec_path(spec);
    let dir = path.parent().expect("spec path has a parent");
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(|e| SandboxError::io("create", dir, e))?;
    let json = serde_json::to_vec_pretty(spec).expect("a ContainerSpec serialises");
    fs::write(&path, json).map_err(|e| SandboxError::io("write", &path, e))?;
    Ok(path)
}
