//! On-disk state of runs: `$XDG_RUNTIME_DIR/sandrun/<run-id>/` (or a private directory
//! on a tmpfs, see [`default_base`]) holds container bundles, overlay upper dirs and
//! libcontainer's state. A run holds a shared lock on `<run>/lock` for as long as it
//! lives, and so does every container helper of the run; a run directory whose lock
//! nobody holds belongs to a run that was killed, and the next run removes it (with the
//! cgroups its containers left).

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::error::SandboxError;

/// Where runs keep their state: `$XDG_RUNTIME_DIR/sandrun`; without it the user's
/// runtime directory `/run/user/<uid>/sandrun` when it exists, else a private
/// `/dev/shm/sandrun-<uid>`, else `/tmp/sandrun-<uid>`.
///
/// A tmpfs, because every step creates and removes a dozen directories and files
/// there (bundle, overlay upper and work dirs, libcontainer's state): on a disk
/// filesystem (ext4 with `discard` here) that cost a one-step `sandrun run` ~40 ms
/// under load. `$XDG_RUNTIME_DIR` is such a tmpfs where a login session made it.
pub fn default_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("sandrun"),
        _ => default_base_for(nix::unistd::getuid().as_raw()),
    }
}

/// [`default_base`] without `$XDG_RUNTIME_DIR`, for the user `uid`.
pub fn default_base_for(uid: u32) -> PathBuf {
    let session = PathBuf::from(format!("/run/user/{uid}"));
    if owned_dir(&session, uid, false) {
        return session.join("sandrun");
    }
    let shm = PathBuf::from(format!("/dev/shm/sandrun-{uid}"));
    let shm_usable = match fs::symlink_metadata(&shm) {
        // Another user may have made it first (the sticky /dev/shm is everyone's).
        Ok(_) => owned_dir(&shm, uid, true),
        Err(_) => fs::metadata("/dev/shm").is_ok_and(|m| m.is_dir()),
    };
    if shm_usable {
        return shm;
    }
    PathBuf::from(format!("/tmp/sandrun-{uid}"))
}

/// A real directory (not a symlink) owned by `uid`, private to it if `private`.
fn owned_dir(path: &Path, uid: u32, private: bool) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && (!private || m.mode() & 0o077 == 0))
}

/// A live run's state directory. Dropping it removes the directory.
pub struct RunState {
    dir: PathBuf,
    lock: Option<Flock<File>>,
}

impl RunState {
    /// Creates `<base>/<run_id>` and locks it. Removes stale runs' leftovers first.
    pub fn create(base: &Path, run_id: &str) -> Result<RunState, SandboxError> {
        sweep_stale(base);
        let dir = base.join(run_id);
        let lock = hold_run(&dir)?;
        Ok(RunState {
            dir,
            lock: Some(lock),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RunState {
    fn drop(&mut self) {
        drop(self.lock.take());
        kill_unstarted_inits(&self.dir);
        remove_tree(&self.dir);
        remove_run_cgroups(&self.dir);
    }
}

/// Creates the run directory (private) if needed and takes a shared lock on it.
pub fn hold_run(dir: &Path) -> Result<Flock<File>, SandboxError> {
    if let Some(base) = dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)
            .map_err(|e| SandboxError::io("create", base, e))?;
        let euid = nix::unistd::geteuid().as_raw();
        if !owned_dir(base, euid, false) {
            return Err(SandboxError::io(
                "use as sandrun's state directory (not a directory of this user)",
                base,
                std::io::ErrorKind::PermissionDenied.into(),
            ));
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SandboxError::io("create", dir, e))?;
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| SandboxError::io("open", &path, e))?;
    Flock::lock(file, FlockArg::LockSharedNonblock)
        .or_else(|(file, _)| Flock::lock(file, FlockArg::LockShared))
        .map_err(|(_, e)| SandboxError::io("lock", &path, e.into()))
}

/// Removes the directories (and cgroups) of runs that are no longer alive. Returns
/// what it removed.
pub fn sweep_stale(base: &Path) -> Vec<PathBuf> {
    let removed = stale_runs(base);
    for dir in &removed {
        kill_unstarted_inits(dir);
        remove_tree(dir);
        remove_run_cgroups(dir);
    }
    removed
}

/// The run directories under `base` that killed runs left (nobody holds their lock),
/// found without removing anything: a directory listing and a non-blocking lock
/// attempt per run, cheap enough for every command.
pub fn stale_runs(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|entry| match File::open(entry.path().join("lock")) {
            Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
            // A directory being created has no lock yet for a moment.
            Err(_) => entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                SystemTime::now().duration_since(t).unwrap_or_default() > Duration::from_secs(60)
            }),
        })
        .map(|entry| entry.path())
        .collect()
}

/// Run at the start of every command but `run` (which sweeps from inside its own
/// namespace when it creates its state): a SIGKILLed run's overlay upper directories
/// live in the state base, often a tmpfs (RAM), and must not wait for the next run.
/// As root they are removed here; rootless, they hold files of the image's other users
/// (subordinate ids) that only the user namespace can remove, so `sandrun __sweep`
/// does it there, started only when something is stale.
pub fn sweep_before_command() {
    let base = default_base();
    if stale_runs(&base).is_empty() {
        return;
    }
    if nix::unistd::geteuid().is_root() {
        sweep_stale(&base);
        return;
    }
    let swept = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("__sweep")
            .arg(&base)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
    });
    match swept {
        Ok(status) if status.success() => {}
        Ok(_) | Err(_) => eprintln!(
            "sandrun: warning: killed runs left state under {} (removed by the next `sandrun run`)",
            base.display()
        ),
    }
}

/// Kills the container processes of `run_dir` that a killed helper left before their
/// container started: a helper SIGKILLed between libcontainer's create and start (after
/// the grace period, on a host too busy to finish creating in time) leaves its
/// container's init waiting for a start that never comes, in a session of its own (out
/// of reach of the step's process group), holding the helper's descriptors: the step's
/// pipes, the run's lock, its private mounts. Such a process is named `youki:...` and
/// holds the run's lock file open. The processes of the machine are searched only when
/// a container directory was left whose container libcontainer's state does not say
/// started: a helper stopped while it cleaned up after its container (as the runner
/// does at the stage's end) leaves no such process.
pub fn kill_unstarted_inits(run_dir: &Path) {
    let started = |state: PathBuf| {
        fs::read(state)
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .and_then(|state| state.get("status")?.as_str().map(str::to_owned))
            .is_some_and(|status| ["running", "stopped", "paused"].contains(&status.as_str()))
    };
    let left = fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|stage| {
            fs::read_dir(stage.path().join("containers"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|c| {
                    !started(
                        stage
                            .path()
                            .join("youki")
                            .join(c.file_name())
                            .join("state.json"),
                    )
                })
        });
    if !left {
        return;
    }
    let lock = run_dir.join("lock");
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for pid in procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.starts_with("youki:") {
            continue;
        }
        // Checked through the pidfd's process: a pid reused since cannot be hit.
        let Ok(pidfd) = crate::sys::pidfd_open(pid, false) else {
            continue;
        };
        let holds_lock = fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == lock));
        if holds_lock {
            let _ = crate::sys::pidfd_kill(&pidfd);
        }
    }
}

/// Best-effort `rm -rf`, also through directories left without write permission
/// (overlay's `work/work` is mode 000).
pub fn remove_tree(path: &Path) {
    if fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    make_writable(path);
    let _ = fs::remove_dir_all(path);
}

fn make_writable(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

/// Removes the (empty, left by killed helpers) cgroups `/sandrun/<run>-*` in every
/// hierarchy; container ids start with their run's directory name and a dash (so that
/// `run-12` leaves the cgroups of `run-123` alone).
pub fn remove_run_cgroups(run_dir: &Path) {
    let Some(prefix) = run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| format!("{n}-"))
    else {
        return;
    };
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    // cgroup v1 (or hybrid): one hierarchy per directory below; v2 has only the one.
    let unified = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if let (false, Ok(entries)) = (unified, fs::read_dir("/sys/fs/cgroup")) {
        roots.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    for root in roots {
        let Ok(children) = fs::read_dir(root.join("sandrun")) else {
            continue;
        };
        for child in children.flatten() {
            if child
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = fs::remove_dir(child.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container init left by a killed helper (named `youki:...`, holding the run's
    /// lock) is killed when its run ends; other processes are not.
    #[test]
    fn inits_left_before_start_are_killed_and_nothing_else() {
        use std::process::{Command, Stdio};
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run-1");
        let other = tmp.path().join("run-2");
        for dir in [&run, &other] {
            fs::create_dir_all(dir.join("stage/containers/left")).unwrap();
            File::create(dir.join("lock")).unwrap();
        }
        let named = |name: &str| {
            let path = tmp.path().join(name);
            fs::copy("/bin/sleep", &path).unwrap();
            path
        };
        let (init, stranger) = (named("youki:[2:INIT]"), named("not-youki"));
        let spawn = |program: &Path, lock: &Path| {
            Command::new(program)
                .arg("1000")
                .stdin(File::open(lock).unwrap())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(&init, &run.join("lock"));
        let mut theirs = spawn(&init, &other.join("lock"));
        let mut unnamed = spawn(&stranger, &run.join("lock"));
        // Wait until the copies run under their own names.
        for child in [&ours, &theirs, &unnamed] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while fs::read_to_string(format!("/proc/{}/comm", child.id()))
                .is_ok_and(|c| c.starts_with("sleep"))
            {
                assert!(std::time::Instant::now() < deadline, "the copy never ran");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // A container left after it started (its helper stopped while cleaning up)
        // is no reason to search: nothing is killed.
        let state = run.join("stage/youki/left");
        fs::create_dir_all(&state).unwrap();
        fs::write(
            state.join("state.json"),
            r#"{"id":"left","status":"running"}"#,
        )
        .unwrap();
        kill_unstarted_inits(&run);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            ours.try_wait().unwrap().is_none(),
            "searched after a started container"
        );
        // One that was created and never started is.
        fs::write(
            state.join("state.json"),
            r#"{"id":"left","status":"created"}"#,
        )
        .unwrap();
        kill_unstarted_inits(&run);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = ours.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                ours.kill().unwrap();
                panic!("the init left by the run was not killed");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        for child in [&mut theirs, &mut unnamed] {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a process not left by this run was killed"
            );
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    #[test]
    fn default_base_is_private_to_the_user() {
        let uid = nix::unistd::getuid().as_raw();
        let base = default_base_for(uid);
        let allowed = [
            PathBuf::from(format!("/run/user/{uid}/sandrun")),
            PathBuf::from(format!("/dev/shm/sandrun-{uid}")),
            PathBuf::from(format!("/tmp/sandrun-{uid}")),
        ];
        assert!(allowed.contains(&base), "{}", base.display());
        // A directory someone else could have made is never chosen.
        assert!(!owned_dir(Path::new("/tmp"), uid, true));
        assert!(!owned_dir(Path::new("/nonexistent"), uid, false));
    }

    #[test]
    fn live_runs_are_kept_and_dead_ones_swept() {
        let base = tempfile::tempdir().unwrap();
        let live = RunState::create(base.path(), "live").unwrap();
        fs::create_dir_all(live.dir().join("containers/x/work/work")).unwrap();
        // A dead run: its lock file exists but nobody holds it.
        let dead = base.path().join("dead");
        fs::create_dir_all(dead.join("containers/y/work/work")).unwrap();
        fs::set_permissions(
            dead.join("containers/y/work/work"),
            fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        File::create(dead.join("lock")).unwrap();
        assert_eq!(sweep_stale(base.path()), vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live.dir().exists());
        let dir = live.dir().to_path_buf();
        drop(live);
        assert!(!dir.exists());
    }
}
