//! Harness's built-in environment variables (`HARNESS_*`, `DRONE_*`, `CI`) in every
//! step of a real run, and the run numbers behind them.

mod prereq;
mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::{modes, Sandbox};

const PIPELINE: &str = r#"pipeline:
  name: builtins
  identifier: builtins
  stages:
    - stage:
        name: build
        identifier: build
        type: CI
        spec:
          runtime:
            type: Docker
            spec: {}
          execution:
            steps:
              - step:
                  type: Run
                  name: show
                  identifier: show
                  spec:
                    shell: Sh
                    command: env > builtins.env
              - step:
                  type: Run
                  name: own
                  identifier: own
                  spec:
                    shell: Sh
                    envVariables:
                      CI: mine
                      HARNESS_STAGE_ID: also-mine
                    command: env > own.env
"#;

fn git(sb: &Sandbox, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(sb.workspace())
        .args(["-c", "safe.directory=*", "-c", "user.name=Ada Tester"])
        .args(["-c", "user.email=ada@example.com"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `KEY=VALUE` lines of a file the step wrote with `env`.
fn env_file(sb: &Sandbox, name: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(sb.workspace().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn host_steps_get_harness_builtin_variables() {
    let have_git = Command::new("git").arg("--version").output().is_ok();
    if !prereq::require(have_git, "git") {
        return;
    }
    for mode in modes() {
        let sb = Sandbox::new(mode);
        git(&sb, &["init", "-q", "-b", "feature/env"]);
        git(
            &sb,
            &[
                "remote",
                "add",
                "origin",
                "https://git.example.com/acme/widgets.git",
            ],
        );
        sb.write("ci.yaml", PIPELINE);
        git(&sb, &["add", "ci.yaml"]);
        git(&sb, &["commit", "-q", "-m", "Add the pipeline"]);
        let sha = git(&sb, &["rev-parse", "HEAD"]);
        // Hands the repository to the user sandrun runs as.
        sb.write(".gitignore", "*.env\n");

        sb.run(["run", "ci.yaml", "--set", "project.identifier=widgets_ci"])
            .assert_code(0);
        let env = env_file(&sb, "builtins.env");
        let workspace = sb.workspace().display().to_string();
        for (key, want) in [
            ("CI", "true"),
            ("HARNESS_STAGE_ID", "build"),
            ("HARNESS_PIPELINE_ID", "builtins"),
            ("HARNESS_WORKSPACE", workspace.as_str()),
            ("HARNESS_PROJECT_ID", "widgets_ci"),
            ("HARNESS_ACCOUNT_ID", "local"),
            ("HARNESS_ORG_ID", "local"),
            ("DRONE_COMMIT_SHA", sha.as_str()),
            ("DRONE_COMMIT_BRANCH", "feature/env"),
            ("DRONE_COMMIT_MESSAGE", "Add the pipeline"),
            ("DRONE_COMMIT_AUTHOR_EMAIL", "ada@example.com"),
            ("DRONE_REPO_NAME", "widgets"),
            ("DRONE_REPO_OWNER", "acme"),
            ("DRONE_REPO", "acme/widgets"),
            (
                "DRONE_REMOTE_URL",
                "https://git.example.com/acme/widgets.git",
            ),
        ] {
            assert_eq!(
                env.get(key).map(String::as_str),
                Some(want),
                "{key} in {mode:?}: {env:?}"
            );
        }
        let build = env.get("HARNESS_BUILD_ID").expect("HARNESS_BUILD_ID");
        assert!(build.parse::<u64>().is_ok(), "HARNESS_BUILD_ID={build}");
        assert_eq!(env.get("DRONE_BUILD_NUMBER"), Some(build));
        assert!(!env["HARNESS_EXECUTION_ID"].is_empty());

        // A step's own variables win over the built-in ones.
        let own = env_file(&sb, "own.env");
        assert_eq!(own.get("CI").map(String::as_str), Some("mine"));
        assert_eq!(
            own.get("HARNESS_STAGE_ID").map(String::as_str),
            Some("also-mine")
        );
        assert_eq!(
            own.get("HARNESS_EXECUTION_ID"),
            env.get("HARNESS_EXECUTION_ID")
        );
    }
}

/// `<+pipeline.sequenceId>` grows with each run of the pipeline and `HARNESS_BUILD_ID`
/// says the same; `plan` shows the next number without taking it; every run has an
/// execution id of its own.
#[test]
fn build_numbers_grow_with_each_run() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            r#"pipeline:
  name: numbered
  identifier: numbered
  stages:
    - stage:
        name: build
        identifier: build
        type: CI
        spec:
          execution:
            steps:
              - step:
                  type: Run
                  name: show
                  identifier: show
                  spec:
                    shell: Sh
                    command: echo "seq=<+pipeline.sequenceId> env=$HARNESS_BUILD_ID exec=<+pipeline.executionId>"
"#,
        );
        let said = |r: &support::Run| -> (String, String) {
            let line = r
                .stdout
                .lines()
                .find_map(|l| l.split_once("seq=").map(|(_, rest)| rest.to_string()))
                .unwrap_or_else(|| panic!("no seq= line\n{}", r.all()));
            let (seq, rest) = line.split_once(' ').unwrap();
            let exec = rest.split_once("exec=").unwrap().1.to_string();
            assert_eq!(rest.split_once(' ').unwrap().0, format!("env={seq}"));
            (seq.to_string(), exec)
        };
        let first = sb.run(["run", "ci.yaml"]);
        first.assert_code(0);
        let second = sb.run(["run", "ci.yaml"]);
        second.assert_code(0);
        let (seq1, exec1) = said(&first);
        let (seq2, exec2) = said(&second);
        assert_eq!((seq1.as_str(), seq2.as_str()), ("1", "2"), "{mode:?}");
        assert_ne!(exec1, exec2);
        for _ in 0..2 {
            sb.run(["plan", "ci.yaml"])
                .assert_code(0)
                .assert_stdout("seq=3 ");
        }
        let (seq3, _) = said(&sb.run(["run", "ci.yaml"]));
        assert_eq!(seq3, "3");
    }
}

/// Fields Harness's editor writes that mean nothing on one machine are accepted, the
/// run goes on, and `plan` names each with its place.
#[test]
fn plan_names_the_editor_fields_it_ignores() {
    let sb = Sandbox::new(modes()[0]);
    sb.write(
        "ci.yaml",
        r#"pipeline:
  name: edited
  identifier: edited
  tags:
    team: ci
  notificationRules: []
  delegateSelectors:
    - big-delegate
  stages:
    - stage:
        name: build
        identifier: build
        type: CI
        delegateSelectors:
          - big-delegate
        spec:
          execution:
            steps:
              - step:
                  type: Run
                  name: hi
                  identifier: hi
                  timeout: ""
                  spec:
                    shell: Sh
                    command: echo hi
"#,
    );
    let plan = sb.run(["plan", "ci.yaml"]);
    plan.assert_code(0)
        .assert_stdout("Ignored (Harness-only fields that mean nothing on one machine):")
        .assert_stdout("ci.yaml:4:3: `tags` in pipeline `edited`")
        .assert_stdout("ci.yaml:6:3: `notificationRules` in pipeline `edited`")
        .assert_stdout("ci.yaml:7:3: `delegateSelectors` in pipeline `edited`")
        .assert_stdout("ci.yaml:14:9: `delegateSelectors` in stage `build`")
        .assert_stdout("ci.yaml:23:28: `timeout: \"\"` in Run step `hi`");
    sb.run(["run", "ci.yaml"]).assert_code(0);
}
