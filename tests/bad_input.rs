//! End-to-end: bad input is refused by the real binary with exit code 2 and a message
//! that says what is wrong and where (file:line:col), before anything runs; failures of
//! the network and of the local disk are blamed on the right one.

#[path = "support/registry.rs"]
mod registry;

mod prereq;
#[path = "support/mod.rs"]
mod support;

use support::{modes, stage, Sandbox};

/// A sandbox in the first mode this process can run (these checks do not differ by mode).
fn sandbox() -> Sandbox {
    Sandbox::new(modes()[0])
}

fn run_step(image: &str) -> String {
    stage(
        "",
        &format!(
            "- step:\n    type: Run\n    name: s\n    identifier: s\n    spec:\n{image}      command: echo hi\n"
        ),
    )
}

#[test]
fn endless_input_is_cut_off_at_the_limit() {
    let sb = sandbox();
    for cmd in ["validate", "run"] {
        sb.run([cmd, "/dev/zero"])
            .assert_code(2)
            .assert_stderr("/dev/zero: the pipeline file is larger than 64.00 MiB");
    }
    let secrets = sb.write("ci.yaml", &run_step(""));
    sb.run([
        "plan",
        secrets.to_str().unwrap(),
        "--secrets-file",
        "/dev/zero",
    ])
    .assert_code(2)
    .assert_stderr("/dev/zero: the secrets file is larger than 16.00 MiB");
}

#[test]
fn an_empty_image_is_an_error_not_a_host_step() {
    let sb = sandbox();
    sb.write("ci.yaml", &run_step("      image: \"\"\n"));
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("ci.yaml:13:22:")
        .assert_stderr(
            "`image` of Run step `s` is empty: to run the step on the host, leave `image` out",
        );
    sb.run(["run", "ci.yaml"]).assert_code(2);
}

#[test]
fn a_second_yaml_document_is_refused() {
    let sb = sandbox();
    let text = format!("{}---\n{}", run_step(""), run_step(""));
    sb.write("ci.yaml", &text);
    let second = text.lines().position(|l| l == "---").unwrap() + 2;
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr(&format!("ci.yaml:{second}:1:"))
        .assert_stderr("second YAML document");
}

#[test]
fn invalid_image_references_fail_validate_at_the_field() {
    let sb = sandbox();
    for (image, reason) in [
        ("UPPER/Case", "repository name must be lowercase"),
        ("foo::bar", "invalid"),
    ] {
        sb.write("ci.yaml", &run_step(&format!("      image: {image}\n")));
        sb.run(["validate", "ci.yaml"])
            .assert_code(2)
            .assert_stderr("ci.yaml:13:22:")
            .assert_stderr(&format!("invalid image reference `{image}`"))
            .assert_stderr(reason);
    }
    // Built by an expression: checked once resolved, still pointing at the field.
    let pipeline = "pipeline:
  name: p
  identifier: p
  variables:
    - name: img
      type: String
      value: Not/Lower
  stages:
    - stage:
        name: s
        identifier: s
        type: CI
        spec:
          execution:
            steps:
              - step:
                  type: Run
                  name: s
                  identifier: s
                  spec:
                    image: <+pipeline.variables.img>
                    command: echo hi
";
    sb.write("p.yaml", pipeline);
    sb.run(["validate", "p.yaml"])
        .assert_code(2)
        .assert_stderr("p.yaml:21:28:")
        .assert_stderr("invalid image reference `Not/Lower`");
}

#[test]
fn a_refused_connection_is_not_called_an_authentication_failure() {
    let sb = sandbox();
    let port = support::free_port();
    let r = sb.run(["pull", &format!("127.0.0.1:{port}/test/x:1")]);
    assert_ne!(r.code, 0, "{}", r.all());
    r.assert_stderr(&format!("registry 127.0.0.1:{port} ("))
        .assert_stderr("cannot connect")
        .assert_stderr("Connection refused");
    assert!(!r.stderr.contains("authentication"), "{}", r.all());
}

/// A tmpfs of `size` mounted for the test's lifetime (root only).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount a tmpfs");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_is_blamed_on_the_store_not_the_registry() {
    if !registry::tools_present() {
        return;
    }
    if !support::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test mounts a small tmpfs and needs root"
        );
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let reg = registry::Registry::start();
    let b = registry::ImageBuilder::new();
    b.busybox("1", "amd64");
    let reference = format!("{}/test/full:1", reg.addr);
    b.push("1", &reference, &[]);
    // busybox is about 2 MB: it does not fit in 1 MiB.
    let disk = SmallDisk::mount("1m");
    let store = disk.dir.path().join("store");
    let out = std::process::Command::new(support::binary())
        .args(["pull", &reference])
        .env("SANDRUN_HOME", &store)
        .env("DOCKER_CONFIG", disk.dir.path().join("none"))
        .output()
        .unwrap();
    let r = support::Run::from(out);
    assert_ne!(r.code, 0, "{}", r.all());
    r.assert_stderr(&format!("no space left in the store {}", store.display()))
        .assert_stderr("No space left on device");
    assert!(!r.stderr.contains("registry "), "{}", r.all());
}

/// A `command` far over Linux's 128 KiB limit on one argument (it used to end in exit
/// 255 and no reason): the script runs from a file, in a host step and in a container.
#[test]
fn a_command_of_megabytes_runs() {
    // 2 MiB of shell, then a line that proves the end was reached.
    let mut script = String::new();
    while script.len() < 2 << 20 {
        script.push_str("            : padding padding padding padding padding padding\n");
    }
    script.push_str("            echo \"long script done in $0\"\n");
    let image = if registry::tools_present() {
        let reg = registry::Registry::start();
        let b = registry::ImageBuilder::new();
        b.busybox("1", "amd64");
        let reference = format!("{}/test/long:1", reg.addr);
        b.push("1", &reference, &[]);
        Some((reg, b, reference))
    } else {
        None
    };
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let mut steps = format!(
            "- step:\n    type: Run\n    name: host\n    identifier: host\n    spec:\n      command: |\n{script}"
        );
        if let Some((_, _, reference)) = &image {
            steps.push_str(&format!(
                "- step:\n    type: Run\n    name: box\n    identifier: box\n    spec:\n      image: {reference}\n      command: |\n{script}"
            ));
        }
        sb.write("ci.yaml", &stage("", &steps));
        let r = sb.run(["run", "ci.yaml"]);
        r.assert_code(0);
        let done = r.stdout.matches("long script done in").count();
        assert_eq!(
            done,
            1 + image.is_some() as usize,
            "{mode:?}: {}",
            &r.stdout[..r.stdout.len().min(4000)]
        );
    }
}

#[test]
fn an_unwritable_report_dir_fails_before_the_run() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &stage(
                "",
                "- step:\n    type: Run\n    name: s\n    identifier: s\n    spec:\n      command: touch ran\n",
            ),
        );
        sb.run(["run", "ci.yaml", "--report-dir", "/dev/null/reports"])
            .assert_code(2)
            .assert_stderr("cannot create the report directory /dev/null/reports: Not a directory");
        assert!(
            !sb.workspace().join("ran").exists(),
            "{mode:?}: the step ran"
        );
        if mode == support::Mode::Rootless && support::is_root() {
            // A directory the test user may not write in (root owns it).
            let ro = tempfile::tempdir().unwrap();
            std::fs::set_permissions(
                ro.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o555),
            )
            .unwrap();
            sb.run([
                "run",
                "ci.yaml",
                "--report-dir",
                ro.path().to_str().unwrap(),
            ])
            .assert_code(2)
            .assert_stderr(&format!(
                "cannot write in the report directory {}: Permission denied",
                ro.path().display()
            ));
            assert!(!sb.workspace().join("ran").exists());
        }
    }
}
