//! The run's private state directory (step control files, later bundles and upper
//! directories), removed when the run ends, and by the next run if this one was killed.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::kill;
use nix::unistd::{getuid, Pid};

pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// `run-<pid>` under `base` (see [`base_dir`]).
    pub fn create_in(base: &Path) -> io::Result<RunDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)?;
        remove_stale(base);
        let path = base.join(format!("run-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `$XDG_RUNTIME_DIR/sandrun`, else `/tmp/sandrun-<uid>`. Ask before entering the
/// rootless user namespace: inside it the uid is 0.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d).join("sandrun"),
        _ => std::env::temp_dir().join(format!("sandrun-{}", getuid())),
    }
}

/// Remove `run-<pid>` directories whose process is gone (a SIGKILLed run).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = !matches!(
            kill(Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
