//! Whole runs with container steps: images pulled from a real loopback registry into
//! the store, steps started by libcontainer, services reached by step identifier from
//! containers and from host steps, as root and rootless.

mod prereq;
mod support;

#[path = "support/registry.rs"]
mod registry;

use registry::{tools_present, ImageBuilder, Registry};
use support::{assert_no_process, free_port, modes, spawn_until, Sandbox};

struct Fixture {
    _registry: Registry,
    _images: ImageBuilder,
    busybox: String,
    /// The same busybox, with `ExposedPorts: 8080/tcp` in its config.
    web: String,
}

fn fixture() -> Option<Fixture> {
    if !tools_present() {
        return None;
    }
    let registry = Registry::start();
    let images = ImageBuilder::new();
    images.busybox("bb", "amd64");
    let busybox = format!("{}/test/busybox:1", registry.addr);
    images.push("bb", &busybox, &[]);
    registry::run(
        std::process::Command::new("umoci")
            .args(["config", "--image"])
            .arg(format!("{}:bb", images.layout.display()))
            .args(["--tag", "web", "--config.exposedports", "8080/tcp"]),
    );
    let web = format!("{}/test/web:1", registry.addr);
    images.push("web", &web, &[]);
    Some(Fixture {
        _registry: registry,
        _images: images,
        busybox,
        web,
    })
}

/// A container step that links its output-variable file and its reports to a host
/// file gets nothing of it: the runner reads them as the step would see them.
#[test]
fn output_and_report_symlinks_are_not_followed_out() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let secret = support::plant_secret(&sb);
        let steps = support::symlink_leak_steps(Some(&fx.busybox), &secret);
        sb.write("ci.yaml", &support::stage(support::DOCKER, &steps));
        support::assert_symlinks_do_not_leak(&sb);
    }
}

/// A device of this host outside the OCI default allow-list (`c`/`b`, major, minor).
fn restricted_device() -> Option<(char, u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    [
        "/dev/hwrng",
        "/dev/kvm",
        "/dev/vda",
        "/dev/sda",
        "/dev/nvme0n1",
    ]
    .iter()
    .find_map(|p| {
        let m = std::fs::metadata(p).ok()?;
        let kind = if m.file_type().is_char_device() {
            'c'
        } else {
            'b'
        };
        let dev = m.rdev();
        Some((kind, nix::sys::stat::major(dev), nix::sys::stat::minor(dev)))
    })
}

/// A non-privileged container step is confined as podman and docker confine one: it
/// has no_new_privs and a seccomp filter, cannot make a user namespace and mount in
/// it, and as root cannot open a device node it made outside the default allow-list.
/// `privileged: true` lifts all of it.
#[test]
fn non_privileged_steps_are_confined_and_privileged_ones_are_not() {
    let Some(fx) = fixture() else { return };
    let (kind, major, minor) = restricted_device().expect("a block or character device to try");
    let probe = |id: &str, privileged: bool| {
        format!(
            r#"- step:
    type: Run
    name: {id}
    identifier: {id}
    spec:
      image: {image}
      privileged: {privileged}
      shell: Sh
      command: |
        mkdir -p /tmp
        grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status | tr -d ' \t'
        if unshare -U -r -m mount -t tmpfs none /tmp; then echo userns=yes; else echo userns=no; fi
        if mknod /tmp/dev {kind} {major} {minor} && (: < /tmp/dev); then echo device=yes; else echo device=no; fi
        echo "cgroups=$(grep -c sandrun /proc/self/cgroup)"
        if grep -q '^0::/sandrun/.*+devices$' /proc/self/cgroup; then echo group=yes; else echo group=no; fi
"#,
            image = fx.busybox
        )
    };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        // `again` has the same filter as `plain`: its helper loads the program the
        // first one compiled and kept (`sandbox::seccomp::compiled`).
        let steps = probe("plain", false) + &probe("privileged", true) + &probe("again", false);
        sb.write("ci.yaml", &support::stage(support::DOCKER, &steps));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0);
        let said = |step: &str, line: &str| {
            let found = r.stdout.lines().any(|l| {
                l.split_once(" | ")
                    .is_some_and(|(s, rest)| s.trim() == step && rest == line)
            });
            assert!(found, "{step} did not print {line}\n{}", r.all());
        };
        for line in ["NoNewPrivs:1", "Seccomp:2", "userns=no", "device=no"] {
            said("plain", line);
            said("again", line);
        }
        // The compiled filter is kept in the store, which host steps cannot write (not
        // in the state base, which can be in /dev/shm): one program for `plain` and
        // `again`.
        let kept: Vec<_> = std::fs::read_dir(sb.home().join("store/seccomp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            kept.len() == 1 && kept[0].starts_with("seccomp-") && kept[0].ends_with(".bpf"),
            "{kept:?}"
        );
        // It is a cache: `sandrun gc` removes it.
        let gc = sb.command(["gc"]).output().unwrap();
        let gc_out = String::from_utf8_lossy(&gc.stdout).to_string();
        assert!(
            gc.status.success() && gc_out.contains("1 compiled seccomp programs"),
            "{gc_out}"
        );
        let left = std::fs::read_dir(sb.home().join("store/seccomp"))
            .unwrap()
            .count();
        assert_eq!(left, 0);
        // As root, a step without limits is confined by the stage's device group (a
        // cgroup v2 group with a device program, `sandbox::devices`), not by cgroups
        // of its own; a privileged one has no cgroup of sandrun's at all. Rootless,
        // there are none either.
        let root = mode == support::Mode::Root;
        said("plain", if root { "cgroups=1" } else { "cgroups=0" });
        said("plain", if root { "group=yes" } else { "group=no" });
        said("privileged", "cgroups=0");
        said("privileged", "group=no");
        // Rootless, the kernel refuses device nodes in a user namespace, privileged or not.
        let device = if mode == support::Mode::Root {
            "yes"
        } else {
            "no"
        };
        for line in [
            "NoNewPrivs:0",
            "Seccomp:0",
            "userns=yes",
            &format!("device={device}"),
        ] {
            said("privileged", line);
        }
    }
}

#[test]
fn container_service_is_reached_by_name_from_containers_and_host_steps() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let host_port = free_port();
        let image = &fx.busybox;
        sb.write(
            "ci.yaml",
            &format!(
                r#"pipeline:
  name: containers
  identifier: containers
  stages:
    - stage:
        name: build
        identifier: build
        type: CI
        spec:
          runtime:
            type: Docker
            spec: {{}}
          execution:
            steps:
              - step:
                  type: Background
                  name: web
                  identifier: web
                  spec:
                    image: {image}
                    shell: Sh
                    command: |
                      mkdir -p /www{host_port}
                      echo "hello from $(hostname)" > /www{host_port}/index.html
                      exec busybox httpd -f -p 8080 -h /www{host_port}
                    portBindings:
                      "{host_port}": "8080"
              - step:
                  type: Run
                  name: client
                  identifier: client
                  spec:
                    image: {image}
                    shell: Sh
                    command: |
                      busybox wget -qO- http://web:8080/index.html
                      echo "pid1=$(cat /proc/1/comm) in $(pwd)"
                      echo shared > from-container.txt
                      ANSWER=42
                    outputVariables:
                      - name: ANSWER
              - step:
                  type: Run
                  name: host
                  identifier: host
                  spec:
                    shell: Sh
                    command: |
                      curl -sf http://web:8080/index.html
                      echo "via localhost: $(curl -sf http://localhost:{host_port}/index.html)"
                      echo "answer=<+steps.client.output.outputVariables.ANSWER> file=$(cat from-container.txt)"
"#
            ),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("hello from web")
            .assert_stdout("pid1=sh in /harness")
            // Harness's VM runner: a host step reaches a port binding on localhost.
            .assert_stdout("via localhost: hello from web")
            .assert_stdout("answer=42 file=shared");
        assert!(r.summary_row("web").contains("stopped"), "{}", r.all());
        let service = format!("httpd -f -p 8080 -h /www{host_port}");
        assert_no_process(&service);
    }
}

#[test]
fn a_missing_image_stops_the_run_before_any_step() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let missing = fx.busybox.replace("busybox:1", "nothing-here:1");
        sb.write(
            "ci.yaml",
            &support::stage("", &format!(
                "- step:\n    type: Run\n    name: first\n    identifier: first\n    spec:\n      command: touch ran\n- step:\n    type: Run\n    name: second\n    identifier: second\n    spec:\n      image: {missing}\n      command: true\n"
            )),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(2)
            .assert_stderr("nothing-here")
            .assert_stderr("no step was started");
        assert!(!sb.workspace().join("ran").exists());
    }
}

#[test]
fn a_service_is_ready_when_its_exposed_ports_accept_connections() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        // No portBindings: readiness comes from the image's ExposedPorts, and the
        // client does not retry, so it only passes if sandrun waited.
        sb.write(
            "ci.yaml",
            &support::stage("", &format!(
                "- step:\n    type: Background\n    name: slow\n    identifier: slow\n    spec:\n      image: {web}\n      command: sleep 1; mkdir -p /w; echo up > /w/i; exec busybox httpd -f -p 8080 -h /w\n- step:\n    type: Run\n    name: client\n    identifier: client\n    spec:\n      image: {bb}\n      command: busybox wget -qO- http://slow:8080/i\n",
                web = fx.web,
                bb = fx.busybox
            )),
        );
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout("ready after")
            .assert_stdout("client | up");
    }
}

/// The air-gapped flow: lock and save where the registry is, load where it is not,
/// then run locked and offline (with the registry stopped).
#[test]
fn locked_images_carried_in_an_archive_run_offline() {
    let Some(mut fx) = fixture() else { return };
    let mut prepared = Vec::new();
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let pipeline = support::stage("", &format!(
            "- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      image: {}\n      command: echo hello from the archive\n",
            fx.busybox
        ));
        sb.write("ci.yaml", &pipeline);
        sb.run(["lock", "ci.yaml"]).assert_code(0);
        assert!(sb.workspace().join("ci.yaml.lock").exists());
        let archive = sb.dir.path().join("images.tar");
        sb.run(["save", "-o", archive.to_str().unwrap(), "ci.yaml"])
            .assert_code(0);
        prepared.push((sb, pipeline, archive));
    }
    fx._registry.kill();
    for (sb, pipeline, archive) in prepared {
        // A fresh store, as on the air-gapped host.
        let airgapped = |args: &[&str]| {
            let mut cmd = sb.command(args);
            cmd.env("SANDRUN_HOME", sb.home().join("airgapped"));
            support::Run::from(cmd.output().unwrap())
        };
        airgapped(&["load", archive.to_str().unwrap()]).assert_code(0);
        airgapped(&["run", "ci.yaml", "--locked", "--offline"])
            .assert_code(0)
            .assert_stdout("hello from the archive");
        // An image the lock does not pin is refused under --locked.
        sb.write("ci.yaml", &pipeline.replace("busybox:1", "web:1"));
        airgapped(&["run", "ci.yaml", "--locked", "--offline"])
            .assert_code(2)
            .assert_stderr("web:1");
    }
}

#[test]
fn plugin_steps_get_their_settings_as_plugin_env() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                &format!(
                    r#"- step:
    type: Plugin
    name: notify
    identifier: notify
    spec:
      image: {}
      entrypoint: ["sh", "-c", "echo \"$PLUGIN_MESSAGE|$PLUGIN_TAGS|$PLUGIN_EXTRA\""]
      settings:
        message: built <+stage.name>
        tags: [a, b]
        extra:
          k: v
"#,
                    fx.busybox
                ),
            ),
        );
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            .assert_stdout(r#"built test|a,b|{"k":"v"}"#);
    }
}

#[test]
fn ctrl_c_stops_containers_and_removes_their_state() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let tag = free_port();
        sb.write(
            "ci.yaml",
            &support::stage("", &format!(
                "- step:\n    type: Background\n    name: svc\n    identifier: svc\n    spec:\n      image: {bb}\n      command: exec busybox sleep 6{tag}\n- step:\n    type: Run\n    name: long\n    identifier: long\n    spec:\n      image: {bb}\n      command: exec busybox sleep 7{tag}\n",
                bb = fx.busybox
            )),
        );
        let long = format!("sleep 7{tag}");
        let child = spawn_until(&sb, &["run", "ci.yaml", "--grace", "2s"], &long);
        let pid = child.id();
        kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
        let r = support::Run::from(child.wait_with_output().unwrap());
        r.assert_code(130);
        let uid = sb.uid();
        let run_dir = sandrun::sandbox::state::default_base_for(uid).join(format!("run-{pid}"));
        assert!(!run_dir.exists(), "{} was left behind", run_dir.display());
        for m in [format!("sleep 6{tag}"), format!("sleep 7{tag}")] {
            assert_no_process(&m);
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains("sandrun"),
            "a mount was left behind:\n{mounts}"
        );
    }
}

#[test]
fn connectors_map_to_registries_through_the_config_file() {
    let Some(fx) = fixture() else { return };
    let registry = fx.busybox.split('/').next().unwrap().to_string();
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let config = sb.write(
            "sandrun-config.yaml",
            &format!("connectors:\n  account.harnessImage:\n    registry: {registry}\n"),
        );
        // As a Harness pipeline writes it: a Docker Hub style name and a connector.
        sb.write(
            "ci.yaml",
            &support::stage("", "- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      connectorRef: account.harnessImage\n      image: test/busybox:1\n      command: echo pulled through the connector\n- step:\n    type: Run\n    name: other\n    identifier: other\n    spec:\n      connectorRef: account.unknown\n      image: test/busybox:1\n      command: echo same image\n"),
        );
        let with_config = |args: &[&str]| {
            let mut cmd = sb.command(args);
            cmd.env("SANDRUN_CONFIG", &config);
            support::Run::from(cmd.output().unwrap())
        };
        with_config(&["plan", "ci.yaml"])
            .assert_code(0)
            .assert_stdout(&format!(
                "connector `account.harnessImage` maps to {registry}/test/busybox:1"
            ))
            .assert_stdout("connector `account.unknown` is not in sandrun's config file");
        // The mapped step runs from the mirror; the unmapped one would go to Docker
        // Hub, which this machine cannot reach, so it is planned only.
        sb.write(
            "run.yaml",
            std::fs::read_to_string(sb.workspace().join("ci.yaml"))
                .unwrap()
                .split("        - step:\n            type: Run\n            name: other")
                .next()
                .unwrap(),
        );
        with_config(&["run", "run.yaml"])
            .assert_code(0)
            .assert_stdout("pulled through the connector");
        let bad = sb.write("bad.yaml", "conectors: {}\n");
        let mut cmd = sb.command(["plan", "ci.yaml"]);
        cmd.env("SANDRUN_CONFIG", &bad);
        support::Run::from(cmd.output().unwrap())
            .assert_code(2)
            .assert_stderr("bad.yaml:1:1: unknown field `conectors`");
    }
}

#[test]
fn ctrl_c_during_a_pull_ends_the_run_and_the_store_stays_sound() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::time::{Duration, Instant};
    let Some(fx) = fixture() else { return };
    // A large layer, served slowly, so that the pull is still running when Ctrl-C comes.
    fx._images.new_image("big", "amd64", |root| {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("noise"), registry::noise(16 << 20, 11)).unwrap();
    });
    let registry_addr = fx.busybox.split('/').next().unwrap().to_string();
    fx._images
        .push("big", &format!("{registry_addr}/test/big:1"), &[]);
    let slow = registry::Proxy::start(&registry_addr, Some(Duration::from_millis(20)));
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage("", &format!(
                "- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      image: {}/test/big:1\n      command: touch ran\n",
                slow.addr
            )),
        );
        let child = sb.spawn(["run", "ci.yaml"]);
        let start = slow.bytes_down.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while slow.bytes_down.load(std::sync::atomic::Ordering::SeqCst) < start + (1 << 20) {
            assert!(Instant::now() < deadline, "the pull never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let interrupted = Instant::now();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        let r = support::Run::from(child.wait_with_output().unwrap());
        r.assert_code(130);
        // Finishing the pull (15 MiB more at 64 KiB per 20 ms) would take about 5 s.
        assert!(
            interrupted.elapsed() < Duration::from_secs(3),
            "{}",
            r.all()
        );
        assert!(!sb.workspace().join("ran").exists());
        sb.run(["fsck"]).assert_code(0);
    }
}

/// A container helper reports its step's exit status before it cleans up, and the
/// runner goes on at once: the step's output still arrives whole, its exit code is the
/// container's, and when the run ends nothing of it is left (the last helper of each
/// stage is stopped with the stage and the run removes what it left).
#[test]
fn early_exit_status_keeps_output_and_exit_codes_and_leaves_nothing() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let tag = free_port();
        let step = |id: &str, command: &str| {
            format!(
                "              - step:\n                  type: Run\n                  name: {id}\n                  identifier: {id}\n                  spec:\n                    image: {bb}\n                    shell: Sh\n                    command: {command}\n",
                bb = fx.busybox
            )
        };
        let stage = |id: &str, steps: &str| {
            format!(
                "    - stage:\n        name: {id}\n        identifier: {id}\n        type: CI\n        spec:\n          execution:\n            steps:\n{steps}"
            )
        };
        let pipeline = format!(
            "pipeline:\n  name: p\n  identifier: p\n  stages:\n{}{}",
            stage(
                "one",
                &(step("many", &format!("seq 1 20000; echo last-{tag}"))
                    + &step("fails", "exit 3"))
            ),
            stage("two", &step("after", &format!("echo two-{tag}"))),
        );
        sb.write("ci.yaml", &pipeline);
        let child = sb.spawn(["run", "ci.yaml"]);
        let pid = child.id();
        let r = support::Run::from(child.wait_with_output().unwrap());
        // `fails` fails the first stage; the second is skipped.
        r.assert_code(1);
        let out = r.all();
        assert!(out.contains("many  | 20000\n"), "{out}");
        assert!(out.contains(&format!("many  | last-{tag}")), "{out}");
        assert!(out.contains("exit code 3"), "{out}");
        let run_dir =
            sandrun::sandbox::state::default_base_for(sb.uid()).join(format!("run-{pid}"));
        assert!(!run_dir.exists(), "{} was left behind", run_dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&format!("run-{pid}")), "{mounts}");
        // Both stages run when the first passes; the second's output is whole too.
        sb.write("ci.yaml", &pipeline.replace("exit 3", "true"));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0)
            .assert_stdout(&format!("after | two-{tag}"));
    }
}

#[test]
fn a_sigkilled_run_leaves_no_process_and_the_next_run_sweeps_its_state() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let tag = free_port();
        let (service, long) = (format!("sleep 8{tag}"), format!("sleep 9{tag}"));
        sb.write(
            "ci.yaml",
            &support::stage("", &format!(
                "- step:\n    type: Background\n    name: svc\n    identifier: svc\n    spec:\n      command: {service} & wait\n- step:\n    type: Run\n    name: long\n    identifier: long\n    spec:\n      image: {}\n      command: exec busybox {long}\n",
                fx.busybox
            )),
        );
        let mut child = spawn_until(&sb, &["run", "ci.yaml"], &long);
        let pid = child.id();
        // The runner's own children: the zygote, the container helpers it cloned (the
        // runner's children too), the host step's init.
        let children = support::children_of(pid);
        assert!(children.len() >= 3, "children of the runner: {children:?}");
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        // Looked at right away: runs that other tests start meanwhile sweep it.
        let uid = sb.uid();
        let stale = sandrun::sandbox::state::default_base_for(uid).join(format!("run-{pid}"));
        let left_state = stale.exists();
        // The service's `sleep` is a grandchild of the runner (sh runs it in the
        // background): the host step's PID namespace takes it down with its init, and
        // parent-death signals take the init and the container down with the runner.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Zombies waiting for init to reap them are gone.
        let alive = |p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
            })
        };
        while !(support::processes_with(&service).is_empty()
            && support::processes_with(&long).is_empty()
            && !children.iter().any(alive))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "processes outlived a SIGKILLed run"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            left_state,
            "expected the killed run's state at {}",
            stale.display()
        );
        sb.write("ci.yaml", &support::stage("", "- step:\n    type: Run\n    name: hi\n    identifier: hi\n    spec:\n      command: echo next\n"));
        sb.run(["run", "ci.yaml"]).assert_code(0);
        assert!(
            !stale.exists(),
            "the next run left {} behind",
            stale.display()
        );
    }
}

/// A root runner on a host whose /sys/fs/cgroup is cgroup2 (a v2-only host), seen
/// here through a private mount namespace with this hybrid host's cgroup2 tree bound
/// over /sys/fs/cgroup: the container gets a cgroup namespace of its own, and limits
/// that the tree cannot give (its memory and cpu controllers belong to the v1
/// hierarchies here) are named in one warning while the step still runs.
#[test]
fn a_root_runner_on_a_cgroup2_only_tree_runs_and_says_which_limits_it_cannot_give() {
    use std::path::Path;
    if !nix::unistd::geteuid().is_root() {
        prereq::missing("needs root to make the mount namespace");
        return;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.controllers").exists() {
        // Not a missing prerequisite: on a cgroup2-only host, every run is this case.
        eprintln!("not applicable: not a hybrid cgroup host (a v2-only host runs this for real)");
        return;
    }
    let Some(fx) = fixture() else { return };
    let sb = Sandbox::new(support::Mode::Root);
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            &format!(
                "- step:\n    type: Run\n    name: v2\n    identifier: v2\n    spec:\n      image: {}\n      command: stat -f -c %t /sys/fs/cgroup; tail -1 /proc/self/cgroup\n      resources:\n        limits:\n          memory: 64Mi\n          cpu: 500m\n",
                fx.busybox
            ),
        ),
    );
    let direct = sb.command(["run", "ci.yaml"]);
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "sh", "-c"])
        .arg("mount --make-rprivate / && mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup && exec \"$0\" \"$@\"")
        .arg(direct.get_program())
        .args(direct.get_args());
    if let Some(dir) = direct.get_current_dir() {
        cmd.current_dir(dir);
    }
    for (k, v) in direct.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let r = support::Run::from(cmd.output().unwrap());
    r.assert_code(0)
        // The step sees cgroup2 (its magic number) and sits at the root of its own
        // cgroup namespace.
        .assert_stdout("| 63677270")
        .assert_stdout("| 0::/");
    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap();
    let missing: Vec<&str> = ["memory", "cpu"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|have| have == *c))
        .collect();
    if !missing.is_empty() {
        let warnings: Vec<&str> = r
            .stdout
            .lines()
            .filter(|l| l.contains("sandrun: warning: ") && l.contains("not enforced"))
            .collect();
        assert_eq!(warnings.len(), 1, "{}", r.all());
        assert!(warnings[0].contains(&missing.join(", ")), "{}", r.all());
    }
}

/// Pod mode (KubernetesDirect infrastructure): two container services whose image
/// declares the same port (ExposedPorts 8080/tcp) cannot both listen on it, as in a
/// Pod; sandrun names both steps and the port before they start.
#[test]
fn pod_mode_names_services_whose_images_expose_the_same_port() {
    let Some(fx) = fixture() else { return };
    let sb = Sandbox::new(support::Mode::Root);
    let service = |id: &str| {
        format!(
            "- step:\n    type: Background\n    name: {id}\n    identifier: {id}\n    spec:\n      image: {}\n      command: sleep 30\n",
            fx.web
        )
    };
    sb.write(
        "ci.yaml",
        &support::stage(
            support::KUBERNETES,
            &format!(
                "{}{}- step:\n    type: Run\n    name: done\n    identifier: done\n    spec:\n      command: \"true\"\n",
                service("api"),
                service("worker")
            ),
        ),
    );
    // The services never listen: readiness gives up at once and the stage goes on.
    let r = sb.run(["run", "--ready-timeout", "1s", "ci.yaml"]);
    r.assert_code(0);
    let warning = r
        .stdout
        .lines()
        .find(|l| l.contains("port 8080 is claimed by"))
        .unwrap_or_else(|| panic!("no collision warning\n{}", r.all()));
    assert!(
        warning.contains("`api`")
            && warning.contains("`worker`")
            && warning.contains("ExposedPorts"),
        "{warning}"
    );
}

#[test]
fn host_connections_to_a_bound_port_are_handed_to_the_container_service() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        // A privileged service gets no filter but the hand-off's, which it loads with
        // all its capabilities and without no_new_privs.
        for (handoff, privileged) in [(true, false), (false, false), (true, true)] {
            if handoff && support::handoff_unsupported() {
                continue;
            }
            let sb = Sandbox::new(mode);
            let host_port = free_port();
            let image = &fx.busybox;
            let tag = free_port();
            let big: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(sb.workspace().join("big"), &big).unwrap();
            // busybox httpd accepts with a blocking accept(2); its CGI script says which
            // peer address the connection came from.
            sb.write(
                "ci.yaml",
                &support::stage(
                    support::DOCKER,
                    &format!(
                        r#"- step:
    type: Background
    name: web
    identifier: web
    spec:
      image: {image}
      privileged: {privileged}
      shell: Sh
      command: |
        mkdir -p /www/cgi-bin
        printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "peer=$REMOTE_ADDR"\n' > /www/cgi-bin/peer
        chmod +x /www/cgi-bin/peer
        cp /harness/big /www/big
        exec busybox httpd -f -p 8080 -h /www
      portBindings:
        "{host_port}": "8080"
- step:
    type: Run
    name: client
    identifier: client
    spec:
      image: {image}
      shell: Sh
      command: |
        busybox wget -qO- http://web:8080/cgi-bin/peer
        echo "client=$(hostname -i)"
        while [ ! -f /harness/done ]; do sleep 0.1; done # wait{tag}
"#
                    ),
                ),
            );
            let handoff_env = if handoff { "on" } else { "off" };
            let child = support::spawn_with_until(
                &sb,
                &["run", "ci.yaml"],
                &[("SANDRUN_PORT_HANDOFF", handoff_env)],
                &format!("wait{tag}"),
            );
            let peers: Vec<String> = (0..3)
                .map(|_| String::from_utf8(support::http_get(host_port, "/cgi-bin/peer")).unwrap())
                .collect();
            let got = support::http_get(host_port, "/big");
            std::fs::write(sb.workspace().join("done"), "").unwrap();
            let r = child.finish();
            r.assert_code(0);
            assert!(got == big, "the 4 MiB body arrived changed\n{}", r.all());
            // From another step: the connection is the service's own, as it came.
            let out = r.all();
            let client = out
                .lines()
                .find_map(|l| l.split("client=").nth(1))
                .expect("client address")
                .trim()
                .to_string();
            r.assert_stdout(&format!("peer=[::ffff:{client}]"));
            for peer in &peers {
                if handoff {
                    // Handed over: the service talks to the host's client itself.
                    // (busybox httpd listens on IPv6, dual-stack: the address is mapped.)
                    assert_eq!(peer.trim(), "peer=[::ffff:127.0.0.1]", "{}", r.all());
                } else {
                    // Proxied: the connection comes from inside the stage network.
                    assert!(peer.starts_with("peer=[::ffff:10."), "{peer}\n{}", r.all());
                }
            }
        }
    }
}

/// Container steps get Harness's built-in variables too, with the workspace where they
/// see it (`/harness`).
#[test]
fn container_steps_get_harness_builtin_variables() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let steps = format!(
            r#"- step:
    type: Run
    name: show
    identifier: show
    spec:
      image: {image}
      shell: Sh
      command: echo "ws=$HARNESS_WORKSPACE stage=$HARNESS_STAGE_ID ci=$CI account=$HARNESS_ACCOUNT_ID"
"#,
            image = fx.busybox
        );
        sb.write("ci.yaml", &support::stage(support::DOCKER, &steps));
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("ws=/harness stage=test ci=true account=local");
    }
}

/// `sharedPaths`: every container step of the stage sees the same directory at each
/// shared path, empty when the stage starts and writable by any user of the step.
#[test]
fn shared_paths_are_shared_by_every_container_step() {
    let Some(fx) = fixture() else { return };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage(
                "    sharedPaths:\n      - /shared/cache\n",
                &format!(
                    r#"- step:
    type: Run
    name: write
    identifier: write
    spec:
      image: {bb}
      shell: Sh
      runAsUser: "1000"
      command: echo from-write > /shared/cache/note
- step:
    type: Run
    name: read
    identifier: read
    spec:
      image: {bb}
      shell: Sh
      command: echo "read $(cat /shared/cache/note)"
"#,
                    bb = fx.busybox
                ),
            ),
        );
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("read from-write");
    }
}

/// `sandrun __seccomp-profile` (what `bench/start.sh` gives crun) prints the filter of a
/// non-privileged step: EPERM by default, the ordinary calls allowed, nothing that
/// reaches past the container.
#[test]
fn the_printed_seccomp_profile_is_the_steps_filter() {
    let out = std::process::Command::new(support::binary())
        .arg("__seccomp-profile")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let profile: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
        .flat_map(|r| {
            r["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
        })
        .collect();
    for call in ["read", "write", "execve", "openat"] {
        assert!(allowed.contains(&call), "{call} not allowed");
    }
    for call in ["mount", "unshare", "setns", "bpf", "init_module"] {
        assert!(!allowed.contains(&call), "{call} allowed");
    }
}
