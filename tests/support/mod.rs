//! Running the real `sandrun` binary in tests, as root and rootless.
//!
//! CI runs the suite as root; every end-to-end test then runs twice: once as root and
//! once as the unprivileged user `sandrun-test` that `scripts/test.sh` creates (with
//! /etc/subuid and /etc/subgid ranges), so the rootless paths run for real. Run as an
//! ordinary user, the tests run once, rootless, as that user.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const TEST_USER: &str = "sandrun-test";

/// The spec lines that give a stage the Docker runtime (bridge network).
pub const DOCKER: &str = "    runtime:\n      type: Docker\n      spec: {}\n";
/// The spec lines that put a stage on Kubernetes infrastructure (pod network).
pub const KUBERNETES: &str = "    infrastructure:\n      type: KubernetesDirect\n      spec:\n        connectorRef: k8s\n        namespace: ci\n";

/// A CI stage `test` whose spec starts with `infra` (lines indented for it, or "")
/// and runs `steps` (a step list written from column 0).
pub fn stage(infra: &str, steps: &str) -> String {
    stage_with_variables(&[], infra, steps)
}

/// [`stage`] with stage variables, each `(name, type, value)`, declared before its
/// spec (so that a step's line in the file is the same as in a stage written out).
pub fn stage_with_variables(variables: &[(&str, &str, &str)], infra: &str, steps: &str) -> String {
    let variables: String = if variables.is_empty() {
        String::new()
    } else {
        let each: String = variables
            .iter()
            .map(|(name, kind, value)| {
                format!("    - name: {name}\n      type: {kind}\n      value: {value}\n")
            })
            .collect();
        format!("  variables:\n{each}")
    };
    let body: String = steps
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("        {l}\n")
            }
        })
        .collect();
    format!(
        "stage:\n  name: test\n  identifier: test\n  type: CI\n{variables}  spec:\n{infra}    execution:\n      steps:\n{body}"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Root,
    Rootless,
}

/// The modes this test process can exercise.
pub fn modes() -> Vec<Mode> {
    if !is_root() {
        return vec![Mode::Rootless];
    }
    assert!(
        test_user().is_some(),
        "running as root, the tests also run rootless as user `{TEST_USER}`: create it with scripts/test.sh"
    );
    vec![Mode::Root, Mode::Rootless]
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The first subordinate uid of `user` (/etc/subuid).
pub fn subordinate_id(user: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/subuid").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user)
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

/// uid and gid of the rootless test user, when running as root.
pub fn test_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        nix::unistd::User::from_name(TEST_USER)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    })
}

/// The text of `testdata/pipelines/NAME`.
pub fn testdata(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/pipelines")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The binary under test, copied where the unprivileged user can execute it (the
/// build directory may sit under a home directory it cannot enter). One copy per
/// build, shared by every test process (nextest runs each test in its own process),
/// and copies of older builds are removed.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_sandrun"));
        if !is_root() {
            return built;
        }
        let meta = std::fs::metadata(&built).unwrap();
        let mtime = meta
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let key = format!("sandrun-test-bin-{}-{mtime}", meta.len());
        let base = std::env::temp_dir();
        let dir = base.join(&key);
        let copy = dir.join("sandrun");
        if !copy.exists() {
            remove_old_copies(&base, &key);
            // Copy under a private name, then rename: concurrent test processes
            // never see a half-written binary.
            let staging = base.join(format!("{key}.{}", std::process::id()));
            std::fs::create_dir_all(&staging).unwrap();
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::copy(&built, staging.join("sandrun")).unwrap();
            std::fs::set_permissions(
                staging.join("sandrun"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            if std::fs::rename(&staging, &dir).is_err() {
                // Another test process won the race; use its copy.
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        copy
    })
    .clone()
}

/// Copies of other builds, left by earlier test runs (a few minutes old at least, so
/// that a test still running from one keeps it).
fn remove_old_copies(base: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("sandrun-test-bin-") || name == keep {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(300));
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A scratch workspace (and home) for one run of sandrun in one mode.
pub struct Sandbox {
    pub mode: Mode,
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new(mode: Mode) -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("sandrun-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("ws")).unwrap();
        let sb = Sandbox { mode, dir };
        sb.give_to_user(sb.dir.path());
        sb
    }

    pub fn workspace(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Write a file under the workspace (owned by the user sandrun runs as).
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.workspace().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        self.give_to_user(self.dir.path());
        p
    }

    fn give_to_user(&self, path: &Path) {
        if self.mode != Mode::Rootless || !is_root() {
            return;
        }
        let (uid, gid) = test_user().expect("test user");
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// `sandrun ARGS` in the workspace, as the mode's user, with a private home.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .current_dir(self.workspace())
            .env("HOME", self.home())
            .env("SANDRUN_HOME", self.home().join("store"))
            .env("NO_COLOR", "1")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_DATA_HOME");
        if self.mode == Mode::Rootless && is_root() {
            let (uid, gid) = test_user().expect("test user");
            cmd.uid(uid).gid(gid).env("USER", TEST_USER);
        }
        cmd
    }

    /// `sandrun ARGS` in the background, its output captured (for tests that act while
    /// it runs).
    pub fn spawn<I, S>(&self, args: I) -> std::process::Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start sandrun")
    }

    /// The uid sandrun runs as in this mode (whose state directory it uses).
    pub fn uid(&self) -> u32 {
        match self.mode {
            Mode::Rootless if is_root() => test_user().expect("test user").0,
            _ => nix::unistd::getuid().as_raw(),
        }
    }

    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.command(args).output().expect("cannot run sandrun");
        Run::from(out)
    }
}

/// The outcome of one sandrun invocation.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: o
                .status
                .code()
                .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Both streams, for assertion messages.
    pub fn all(&self) -> String {
        format!(
            "--- exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code\n{}", self.all());
        self
    }

    pub fn assert_stdout(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n{}",
            self.all()
        );
        self
    }

    pub fn assert_stderr(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n{}",
            self.all()
        );
        self
    }

    /// The summary row of a step (`  KEY  TYPE  RESULT ...`).
    pub fn summary_row(&self, step: &str) -> String {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step) && l.starts_with("  "))
            .unwrap_or_else(|| panic!("no summary row for {step}\n{}", self.all()))
            .to_string()
    }
}

/// A TCP port that was free a moment ago (for services the tests start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Processes whose command line contains `marker` (to prove nothing was left behind).
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{}: {}", name.to_string_lossy(), cmd));
            }
        }
    }
    found
}

/// Fails the test when a process whose command line contains `marker` still exists.
/// Pids of the live processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

pub fn assert_no_process(marker: &str) {
    let left = processes_with(marker);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Starts `sandrun ARGS` in the background and returns once a process whose command
/// line contains `marker` exists (a step has started), for tests that interrupt runs.
pub fn spawn_until(sb: &Sandbox, args: &[&str], marker: &str) -> std::process::Child {
    let child = sb.spawn(args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while processes_with(marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no process `{marker}` started within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

/// GET `path` from the host's loopback port, retrying while the service is not up;
/// the body.
pub fn http_get(port: u16, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = (|| -> std::io::Result<Vec<u8>> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut all = Vec::new();
            c.read_to_end(&mut all)?;
            // busybox httpd passes a CGI script's bare "\n\n" on.
            let (head, gap) = match all.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(i) => (i, 4),
                None => (
                    all.windows(2)
                        .position(|w| w == b"\n\n")
                        .ok_or_else(|| std::io::Error::other("no HTTP answer"))?,
                    2,
                ),
            };
            if !all.starts_with(b"HTTP/1.0 200") && !all.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&all[..head]).into_owned(),
                ));
            }
            Ok(all[head + gap..].to_vec())
        })();
        match got {
            Ok(body) => return body,
            Err(e) if std::time::Instant::now() > deadline => panic!("GET {path}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// A run in the background that is interrupted (SIGINT, as Ctrl-C) and reaped when the
/// test fails before it waits for it, so that a failed test leaves no run behind.
pub struct Background(Option<std::process::Child>);

impl Background {
    /// Waits for the run to end.
    pub fn finish(mut self) -> Run {
        let child = self.0.take().expect("a running sandrun");
        Run::from(child.wait_with_output().unwrap())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// `sandrun ARGS` with `env` in the background, once a process whose command line
/// contains `marker` runs; its output is in the panic message when it ends first.
pub fn spawn_with_until(
    sb: &Sandbox,
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> Background {
    let mut child = sb
        .command(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start sandrun");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while processes_with(marker).is_empty() {
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let r = Run::from(child.wait_with_output().unwrap());
            panic!("no process `{marker}` started:\n{}", r.all());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Background(Some(child))
}

/// Says so when the port hand-off cannot work here (kernel, seccomp, architecture):
/// tests of it then skip that half.
pub fn handoff_unsupported() -> bool {
    !crate::prereq::require(
        sandrun::net::port_handoff_supported(),
        "the hand-off is not supported here (kernel, seccomp, architecture)",
    )
}

/// What a hostile step tries to read through sandrun: a JUnit report outside the
/// workspace (in `<sandbox>/secret/`) that the runner itself could read in `sb`'s mode
/// (root-only as root; the test user's own file rootless), but the step must not get
/// through sandrun. Returns the directory holding it.
pub fn plant_secret(sb: &Sandbox) -> PathBuf {
    let dir = sb.dir.path().join("secret");
    sb.write(
        "../secret/secret.xml",
        r#"<testsuite name="TOPSECRET"><testcase name="x"/></testsuite>"#,
    );
    if sb.mode == Mode::Root {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(
            dir.join("secret.xml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    dir
}

/// Step list: `leak` (on `image`, or on the host) replaces its output-variable file
/// and its JUnit reports with symlinks to [`plant_secret`]'s file and directory, and
/// exits before the trailer that records outputs runs; `show` prints the output.
/// The step finds its output file's path in its own command line (the trailer).
pub fn symlink_leak_steps(image: Option<&str>, secret_dir: &Path) -> String {
    let image = image
        .map(|i| format!("\n      image: {i}"))
        .unwrap_or_default();
    let s = secret_dir.display();
    format!(
        r#"- step:
    type: Run
    name: leak
    identifier: leak
    spec:{image}
      shell: Sh
      command: |
        ln -sf {s}/secret.xml rep1.xml
        ln -sfn {s} reps
        out=$(tr '\0' '\n' < /proc/$$/cmdline | grep -o "'/[^']*/outputs/LEAK'" | head -n1 | tr -d "'")
        ln -sf {s}/secret.xml "$out"
        exit 0
      outputVariables:
        - name: LEAK
      reports:
        type: JUnit
        spec:
          paths:
            - rep*.xml
            - reps/*.xml
- step:
    type: Run
    name: show
    identifier: show
    spec:
      shell: Sh
      command: echo "got=<+steps.leak.output.outputVariables.LEAK>"
"#
    )
}

/// Runs [`symlink_leak_steps`]'s stage (written to `ci.yaml`) and checks that nothing
/// of the secret came through: not as an output variable, not in `--report-dir`.
pub fn assert_symlinks_do_not_leak(sb: &Sandbox) {
    let out = sb.dir.path().join("out");
    let r = sb.run(["run", "ci.yaml", "--report-dir", out.to_str().unwrap()]);
    r.assert_code(0)
        .assert_stdout("got=\n")
        .assert_stdout("is a symbolic link");
    assert!(!r.stdout.contains("TOPSECRET"), "{}", r.all());
    let merged = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert!(!merged.contains("TOPSECRET"), "{merged}");
}

/// Debian downloads shared by every test that builds an image recipe (sandrun verifies
/// them by hash whenever they are read), so the suite fetches each `.deb` once.
pub fn download_cache() -> PathBuf {
    let dir = std::env::temp_dir().join("sandrun-test-downloads");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        // The rootless test user fills it too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    dir
}

/// `sandrun ARGS` in `sb`, with the shared download cache.
pub fn sandrun_with_downloads(sb: &Sandbox, args: &[&str]) -> Run {
    Run::from(
        sb.command(args)
            .env("SANDRUN_DOWNLOAD_CACHE", download_cache())
            .output()
            .expect("cannot run sandrun"),
    )
}
