//! Running the real binary as the unprivileged test user `sandrun-test` (with
//! /etc/subuid and /etc/subgid ranges), so that rootless paths are exercised for real
//! when the suite runs as root. Creating the user is idempotent and serialised with a
//! file lock, because test binaries run concurrently.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

pub const USER: &str = "sandrun-test";

#[derive(Clone, Debug)]
pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The test user, created when absent. `None` (with the reason printed) when the tests
/// do not run as root.
pub fn test_user() -> Option<TestUser> {
    if !nix::unistd::geteuid().is_root() {
        crate::prereq::missing(format!("creating and switching to `{USER}` needs root"));
        return None;
    }
    let lock = File::create("/tmp/sandrun-test-user.lock").expect("create lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|guard| {
            ensure_user();
            drop(guard);
        })
        .expect("lock /tmp/sandrun-test-user.lock");
    let user = nix::unistd::User::from_name(USER)
        .expect("read passwd")
        .expect("test user exists");
    Some(TestUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

fn ensure_user() {
    if nix::unistd::User::from_name(USER).ok().flatten().is_none() {
        run(Command::new("useradd").args(["-m", USER]));
    }
    let has_range = |file: &str| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{USER}:200000:")))
    };
    if !has_range("/etc/subuid") || !has_range("/etc/subgid") {
        run(Command::new("usermod").args([
            "--add-subuids",
            "200000-265535",
            "--add-subgids",
            "200000-265535",
            USER,
        ]));
    }
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("run user setup command");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

impl TestUser {
    /// A command that runs `program` as the test user (no supplementary groups), in
    /// its home directory, with a minimal environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &self.home)
            .env("USER", USER)
            .current_dir(&self.home);
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: setgroups/setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// The first host id of the user's subordinate uid range (inside uid 1).
    pub fn first_subuid(&self) -> u32 {
        std::fs::read_to_string("/etc/subuid")
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut p = l.split(':');
                (p.next() == Some(USER)).then(|| p.next().unwrap().parse().unwrap())
            })
            .expect("test user has a subuid range")
    }
}
