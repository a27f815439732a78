//! The `sandrun __container` helper, for real: containers from a generated busybox
//! image, as root and rootless (as the test user `sandrun-test`, see tests/rootless).
//! Every scenario runs in both modes where the mode matters.

mod busybox_image;
mod prereq;
mod rootless;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sandrun::pipeline::Shell;
use sandrun::sandbox::{
    BindMount, ContainerProcess, ContainerSpec, ImageConfig, ImageSpec, Limits,
};

const SANDRUN: &str = env!("CARGO_BIN_EXE_sandrun");

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Root,
    Rootless,
}

/// One test's world: image layers, a workspace and a run state dir, owned by the user
/// the helper runs as.
/// This test process's run directory name (and its containers' id prefix): tests
/// run in processes of their own at the same time, and a run's cleanup removes the
/// cgroups of its own ids.
fn run_name() -> String {
    format!("run{}", std::process::id())
}

struct World {
    _tmp: tempfile::TempDir,
    mode: Mode,
    user: Option<rootless::TestUser>,
    layers: Vec<PathBuf>,
    workspace: PathBuf,
    state: PathBuf,
}

impl World {
    fn new(mode: Mode) -> Option<World> {
        if !nix::unistd::geteuid().is_root() {
            prereq::missing(
                "these tests start containers as root and as `sandrun-test`; run them as root",
            );
            return None;
        }
        let user = match mode {
            Mode::Root => None,
            Mode::Rootless => Some(rootless::test_user()?),
        };
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let layers = busybox_image::layers(
            &tmp.path().join("image"),
            user.as_ref().map(|u| (u.uid, u.first_subuid())),
        );
        let workspace = tmp.path().join("workspace");
        let state = tmp.path().join("state");
        fs::create_dir_all(&workspace).unwrap();
        fs::create_dir_all(&state).unwrap();
        if let Some(u) = &user {
            for d in [&workspace, &state] {
                std::os::unix::fs::chown(d, Some(u.uid), Some(u.gid)).unwrap();
            }
        }
        Some(World {
            _tmp: tmp,
            mode,
            user,
            layers,
            workspace,
            state,
        })
    }

    fn spec(&self, step: &str, process: ContainerProcess) -> ContainerSpec {
        ContainerSpec {
            id: format!("{}-{step}", run_name()),
            step: step.into(),
            hostname: step.into(),
            image: ImageSpec {
                reference: "busybox:test".into(),
                layers: self.layers.clone(),
                config: ImageConfig {
                    entrypoint: vec![],
                    cmd: vec!["sh".into()],
                    env: vec!["FROM_IMAGE=yes".into(), "OVERRIDDEN=image".into()],
                    working_dir: None,
                    user: None,
                },
            },
            process,
            env: vec![],
            user: None,
            working_dir: Some("/harness".into()),
            mounts: vec![BindMount {
                source: self.workspace.clone(),
                destination: "/harness".into(),
                readonly: false,
            }],
            resources: Limits::default(),
            privileged: false,
            cgroups: Default::default(),
            cache_dir: None,
            accept_listener: None,
            state_dir: self.state.join(run_name()),
        }
    }

    /// The helper command for `spec` (spec written to a file the helper can read).
    fn command(&self, spec: &ContainerSpec) -> Command {
        let path = self._tmp.path().join(format!("{}.json", spec.id));
        fs::write(&path, serde_json::to_vec(spec).unwrap()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = match &self.user {
            Some(u) => u.command(SANDRUN),
            None => Command::new(SANDRUN),
        };
        cmd.arg("__container").arg(path).stdin(Stdio::null());
        cmd
    }

    fn run(&self, spec: &ContainerSpec) -> Output {
        self.command(spec).output().unwrap()
    }

    fn sh(&self, step: &str, script: &str) -> Output {
        self.run(&self.spec(step, shell(script)))
    }

    /// Nothing of the run is left: no container directories, no libcontainer state.
    fn assert_clean(&self) {
        let run = self.state.join(run_name());
        for sub in ["containers", "youki"] {
            let left: Vec<_> = fs::read_dir(run.join(sub))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left behind in {sub}: {left:?}");
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(run.to_str().unwrap()),
            "mount left behind:\n{mounts}"
        );
    }
}

fn shell(script: &str) -> ContainerProcess {
    ContainerProcess::Shell {
        shell: Shell::Sh,
        script: script.into(),
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(
        out.status.success(),
        "status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn both(test: impl Fn(&World)) {
    for mode in [Mode::Root, Mode::Rootless] {
        if let Some(world) = World::new(mode) {
            eprintln!("mode: {mode:?}");
            test(&world);
            world.assert_clean();
        }
    }
}

#[test]
fn isolation_is_real() {
    both(|w| {
        fs::write(w.workspace.join("from-host"), "hi").unwrap();
        let out = ok(&w.sh(
            "isolated",
            "echo pid=$$; echo host=$(hostname); echo procs=$(ls /proc | grep -c '^[0-9]'); \
             cat /etc/marker /etc/motd; cat /harness/from-host; echo; \
             test -e /work && echo host-files-visible; test -e /bin/busybox && echo ok-busybox; \
             echo uid=$(id -u); touch /harness/made-inside; pwd",
        ));
        assert!(out.contains("pid=1\n"), "{out}");
        assert!(out.contains("host=isolated\n"), "{out}");
        // sh, the $(...) subshell, ls and grep: nothing else.
        let procs: u32 = out
            .split("procs=")
            .nth(1)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(procs <= 4, "{out}");
        assert!(
            out.contains("layer2\nlayer2\n"),
            "layers stack in order: {out}"
        );
        assert!(out.contains("hi\n"), "{out}");
        assert!(!out.contains("host-files-visible"), "{out}");
        assert!(out.contains("ok-busybox"), "{out}");
        assert!(out.contains("uid=0\n"), "{out}");
        assert!(out.ends_with("/harness\n"), "{out}");
        // uid 0 inside is the invoking user outside.
        let owner = fs::metadata(w.workspace.join("made-inside")).unwrap().uid();
        let expected = w.user.as_ref().map_or(0, |u| u.uid);
        assert_eq!(owner, expected);
    });
}

#[test]
fn image_config_and_harness_rules() {
    both(|w| {
        // The image's Entrypoint + Cmd.
        let mut spec = w.spec("default", ContainerProcess::ImageDefault);
        spec.image.config.entrypoint = vec!["echo".into(), "ep".into()];
        spec.image.config.cmd = vec!["cmd".into()];
        assert_eq!(ok(&w.run(&spec)), "ep cmd\n");
        // A step entrypoint replaces both.
        spec.process = ContainerProcess::Exec {
            argv: vec!["echo".into(), "mine".into()],
        };
        assert_eq!(ok(&w.run(&spec)), "mine\n");
        // Env: image, then stage variables, then step envVariables.
        let mut spec = w.spec("env", shell("echo $FROM_IMAGE $OVERRIDDEN $HOSTNAME"));
        spec.env = vec![
            ("OVERRIDDEN".into(), "stage".into()),
            ("OVERRIDDEN".into(), "step".into()),
        ];
        assert_eq!(ok(&w.run(&spec)), "yes step env\n");
        // Sh runs with set -e.
        let out = w.sh("sete", "false\necho after");
        assert_eq!(out.status.code(), Some(1));
        assert!(!text(&out).0.contains("after"));
        // Working directory: the image's when the step has none.
        let mut spec = w.spec("wd", shell("pwd"));
        spec.working_dir = None;
        spec.image.config.working_dir = Some("/etc".into());
        assert_eq!(ok(&w.run(&spec)), "/etc\n");
    });
}

#[test]
fn users_from_the_image() {
    both(|w| {
        let mut spec = w.spec(
            "user",
            shell("echo $(id -u):$(id -g) $HOME; touch /tmp/x && stat -c %u /tmp/x; id -G"),
        );
        spec.user = Some("svc".into());
        // svc's supplementary group (audio, 29, from the image's /etc/group) too,
        // rootless as well: newgidmap leaves setgroups(2) allowed.
        assert_eq!(ok(&w.run(&spec)), "999:999 /home/svc\n999\n999 29\n");
        spec.user = Some("1234".into());
        assert_eq!(ok(&w.run(&spec)).lines().next(), Some("1234:0 /"));
        // The image's User applies when the step sets none.
        spec.user = None;
        spec.image.config.user = Some("svc".into());
        assert!(ok(&w.run(&spec)).starts_with("999:999"));
        spec.user = Some("nobody-here".into());
        let out = w.run(&spec);
        assert_eq!(out.status.code(), Some(125));
        let (_, err) = text(&out);
        assert!(
            err.starts_with("sandrun: error: ")
                && err.contains("nobody-here")
                && err.contains("busybox:test"),
            "{err}"
        );
    });
}

#[test]
fn missing_shell_is_named_with_the_image() {
    both(|w| {
        let spec = w.spec(
            "bash",
            ContainerProcess::Shell {
                shell: Shell::Bash,
                script: "true".into(),
            },
        );
        let out = w.run(&spec);
        assert_eq!(out.status.code(), Some(127));
        let (_, err) = text(&out);
        assert!(
            err.contains("image `busybox:test` has no `bash`") && err.contains("`bash`"),
            "{err}"
        );
        let spec = w.spec(
            "py",
            ContainerProcess::Shell {
                shell: Shell::Python,
                script: "1".into(),
            },
        );
        assert!(text(&w.run(&spec)).1.contains("has no `python3`"));
    });
}

#[test]
fn workspace_is_shared_between_containers() {
    both(|w| {
        ok(&w.sh(
            "first",
            "echo from-first > /harness/shared; mkdir -p /harness/dir",
        ));
        assert_eq!(
            ok(&w.sh("second", "cat /harness/shared; ls -d /harness/dir")),
            "from-first\n/harness/dir\n"
        );
        // The per-step upper dir is not shared.
        ok(&w.sh("third", "echo private > /etc/private"));
        assert!(!w.sh("fourth", "cat /etc/private").status.success());
    });
}

#[test]
fn mount_targets_are_resolved_inside_the_image() {
    both(|w| {
        // A layer whose mount targets are symlinks: relative, and absolute with `..`
        // that would leave the root filesystem if followed on the host.
        let layer = w._tmp.path().join("links");
        fs::create_dir_all(layer.join("etc")).unwrap();
        fs::create_dir_all(layer.join("run")).unwrap();
        fs::create_dir_all(layer.join("srv")).unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", layer.join("etc/resolv.conf")).unwrap();
        std::os::unix::fs::symlink("/../../../srv", layer.join("data")).unwrap();
        std::os::unix::fs::symlink("../nowhere", layer.join("etc/dangling")).unwrap();
        fs::write(layer.join("run/resolv.conf"), "from the image\n").unwrap();
        let owner = w.user.as_ref().map_or(0, |u| u.uid);
        for p in [
            "",
            "etc",
            "run",
            "srv",
            "etc/resolv.conf",
            "run/resolv.conf",
            "data",
            "etc/dangling",
        ] {
            std::os::unix::fs::lchown(layer.join(p), Some(owner), Some(owner)).unwrap();
        }
        let resolv = w._tmp.path().join("resolv.conf");
        fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
        fs::set_permissions(&resolv, fs::Permissions::from_mode(0o644)).unwrap();
        let mut spec = w.spec(
            "links",
            shell("cat /run/resolv.conf; ls /srv/in; echo in > /srv/in/made"),
        );
        spec.image.layers.push(layer);
        spec.mounts.push(BindMount {
            source: resolv.clone(),
            destination: "/etc/resolv.conf".into(),
            readonly: true,
        });
        spec.mounts.push(BindMount {
            source: w.workspace.clone(),
            destination: "/data/in".into(),
            readonly: false,
        });
        fs::write(w.workspace.join("seen"), "").unwrap();
        let out = ok(&w.run(&spec));
        assert_eq!(out, "nameserver 192.0.2.1\nseen\n");
        assert_eq!(
            fs::read_to_string(w.workspace.join("made")).unwrap(),
            "in\n"
        );
        assert!(!Path::new("/srv/in").exists());
        // Read-only where asked.
        spec.process = shell("echo x > /etc/resolv.conf");
        assert!(!w.run(&spec).status.success());
        // A link to nothing is not followed out of the image, and the error says so.
        spec.mounts.push(BindMount {
            source: resolv.clone(),
            destination: "/etc/dangling".into(),
            readonly: true,
        });
        let out = w.run(&spec);
        assert_eq!(out.status.code(), Some(125));
        assert!(
            text(&out).1.contains("`/etc/dangling` in image `busybox:test`: it is a symlink to `../nowhere`, which the image does not have"),
            "{}",
            text(&out).1
        );
    });
}

#[test]
fn exit_codes_and_signals() {
    both(|w| {
        assert_eq!(w.sh("three", "exit 3").status.code(), Some(3));
        // A step killed from outside by SIGKILL reports 137.
        let marker = format!("7{}.5", std::process::id());
        let child = w
            .command(&w.spec(
                "killed",
                shell(&format!("touch /harness/started; sleep {marker}")),
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_file(&w.workspace.join("started"));
        // The shell touches the file before it forks the sleep: look until it is there.
        let sleep = wait_for(|| {
            processes_with(&marker).into_iter().find(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
            })
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleep),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert_eq!(wait_bounded(child).code(), Some(137));
        fs::remove_file(w.workspace.join("started")).unwrap();
    });
}

/// The first `Some` that `probe` returns, within 10 seconds.
fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "not found within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exit status of `child`, which must end within 20 seconds (it is killed
/// otherwise, so that a broken helper fails the test instead of hanging it).
fn wait_bounded(mut child: std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the helper did not end within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn processes_with(marker: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

#[test]
fn sigterm_stops_the_container_and_cleans_up() {
    both(|w| {
        let marker = format!("9{}.5", std::process::id());
        let script = format!("touch /harness/started; sleep {marker}");
        let child = w
            .command(&w.spec("term", shell(&script)))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_file(&w.workspace.join("started"));
        // The shell is PID 1 and ignores SIGTERM: a signal that came between `touch` and
        // the start of `sleep` would reach no process that ends. Wait for the sleep.
        wait_for(|| (!processes_with(&marker).is_empty()).then_some(()));
        let started = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_bounded(child);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM took {:?}",
            started.elapsed()
        );
        // sh (PID 1, no handler) sees its sleep killed by SIGTERM.
        assert_eq!(status.code(), Some(143), "{status}");
        assert!(processes_with(&marker).is_empty());
        fs::remove_file(w.workspace.join("started")).unwrap();
    });
}

#[test]
fn sigkilled_helper_takes_its_container_down_and_the_next_run_sweeps() {
    both(|w| {
        let marker = format!("8{}.5", std::process::id());
        let script = format!("touch /harness/started; sleep {marker}");
        let mut child = w
            .command(&w.spec("killed", shell(&script)))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_file(&w.workspace.join("started"));
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_with(&marker).is_empty() {
            assert!(Instant::now() < deadline, "container outlived its helper");
            std::thread::sleep(Duration::from_millis(20));
        }
        let run = w.state.join(run_name());
        assert!(
            run.join(format!("containers/{}-killed", run_name()))
                .exists(),
            "a SIGKILLed helper cannot clean up"
        );
        // The next run (as the same user) removes the leftovers.
        let sweep = match &w.user {
            Some(u) => u.command(SANDRUN),
            None => Command::new(SANDRUN),
        }
        .arg("__sweep")
        .arg(&w.state)
        .output()
        .unwrap();
        assert!(ok(&sweep).contains(&run_name()));
        assert!(!run.exists(), "stale run not swept");
        fs::remove_file(w.workspace.join("started")).unwrap();
    });
}

#[test]
fn limits_are_enforced_or_said_not_to_be() {
    both(|w| {
        let mut spec = w.spec(
            "limited",
            shell("dd if=/dev/zero of=/dev/null bs=48M count=1 2>/dev/null && echo survived"),
        );
        spec.resources = Limits {
            memory_bytes: Some(24 << 20),
            cpu_millis: Some(500),
        };
        let out = w.run(&spec);
        let (stdout, stderr) = text(&out);
        let hybrid = fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(" - cgroup ");
        match w.mode {
            Mode::Root => {
                assert_ne!(out.status.code(), Some(0), "{stdout}{stderr}");
                assert!(stderr.contains("out-of-memory"), "{stderr}");
            }
            Mode::Rootless if hybrid => {
                assert!(stdout.contains("survived"), "{stdout}{stderr}");
                let warnings: Vec<&str> = stderr
                    .lines()
                    .filter(|l| l.starts_with("sandrun: warning: "))
                    .collect();
                assert_eq!(warnings.len(), 1, "{stderr}");
                assert!(
                    warnings[0].contains("not enforced")
                        && warnings[0].contains("memory 24 MiB, cpu 500m"),
                    "{stderr}"
                );
            }
            // On a cgroup2-only host rootless limits hold only in a delegated subtree:
            // either they are enforced, or sandrun says once that they are not.
            Mode::Rootless => {
                let enforced = out.status.code() != Some(0) && stderr.contains("out-of-memory");
                let warnings: Vec<&str> = stderr
                    .lines()
                    .filter(|l| l.starts_with("sandrun: warning: ") && l.contains("not enforced"))
                    .collect();
                let said_not = stdout.contains("survived") && warnings.len() == 1;
                assert!(
                    enforced ^ said_not,
                    "neither enforced nor said not to be: {stdout}{stderr}"
                );
            }
        }
    });
}

#[test]
fn privileged_gets_all_capabilities() {
    both(|w| {
        let script = "grep -E 'Cap(Eff|Bnd)' /proc/self/status; mkdir -p /mnt; mount -t tmpfs none /mnt && echo mounted";
        let normal = w.sh("normal", script);
        let (stdout, _) = text(&normal);
        assert!(stdout.contains("CapEff:\t00000000a80425fb"), "{stdout}");
        assert!(!stdout.contains("mounted"));
        let mut spec = w.spec("privileged", shell(script));
        spec.privileged = true;
        let out = w.run(&spec);
        let (stdout, stderr) = text(&out);
        let cap = |name: &str| {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{stdout}{stderr}"));
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(cap("CapEff:"), cap("CapBnd:"), "{stdout}");
        assert_ne!(cap("CapEff:") & (1 << 21), 0, "CAP_SYS_ADMIN: {stdout}");
        assert!(stdout.contains("mounted"), "{stdout}{stderr}");
        if w.mode == Mode::Rootless {
            assert!(
                stderr.contains("sandrun: warning: ") && stderr.contains("rootless"),
                "{stderr}"
            );
        }
    });
}
