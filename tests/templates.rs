//! Harness templates end to end: stage, step-group and step templates read from
//! template files (under `.harness/`, beside the pipeline, in `--templates DIR`) and
//! inlined with their `templateInputs`; mistakes named with the file and line they are
//! in.

mod prereq;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{modes, Sandbox};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/templates")
}

/// The example pipeline and its templates, under the sandbox's `.harness/`.
fn copy_example(sb: &Sandbox) {
    for name in [
        "pipeline.yaml",
        "ci-stage-v1.yaml",
        "ci-stage-v2.yaml",
        "run-tests.yaml",
        "lint-group.yaml",
    ] {
        let text = std::fs::read_to_string(testdata().join(name)).unwrap();
        let dir = if name == "pipeline.yaml" {
            ".harness"
        } else {
            ".harness/templates"
        };
        sb.write(&format!("{dir}/{name}"), &text);
    }
}

fn sandrun(args: &[&str], dir: &Path) -> support::Run {
    let out = Command::new(support::binary())
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    support::Run::from(out)
}

#[test]
fn stage_step_group_and_step_templates_run_with_their_inputs() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        copy_example(&sb);
        // No file given: the one pipeline under .harness/ (template files are not
        // pipelines), with the templates found below .harness/.
        let r = sb.run(["run"]);
        r.assert_code(0);
        for key in ["greet", "unit", "lint.fmt"] {
            assert!(r.summary_row(key).contains("passed"), "{}", r.all());
        }
        let ws = sb.workspace();
        let read = |f: &str| std::fs::read_to_string(ws.join(f)).unwrap();
        assert_eq!(read("out/greet.txt"), "hello from build\n");
        assert_eq!(read("out/unit.txt"), "unit tests of check\n");
        assert_eq!(read("out/fmt.txt"), "fmt ok\n");
    }
}

#[test]
fn plan_names_the_template_each_item_came_from() {
    let r = sandrun(&["plan", "pipeline.yaml"], &testdata());
    r.assert_code(0)
        .assert_stdout("from template `account.ci_stage` version `2` (./ci-stage-v2.yaml:1:1)")
        .assert_stdout("from template `run_tests` version `v1` (./run-tests.yaml:1:1)")
        .assert_stdout("from template `org.lint_group` version `1.0` (./lint-group.yaml:1:1)")
        .assert_stdout("timeout: 1m 00s");
}

#[test]
fn a_missing_template_or_version_is_named_at_the_reference() {
    let r = sandrun(&["validate", "missing-template.yaml"], &testdata());
    r.assert_code(2).assert_stderr(
        "missing-template.yaml:12:28: template `account.run_test` not found: no template file defines identifier `run_test`",
    );
    r.assert_stderr("did you mean `run_tests`?");
    let r = sandrun(&["validate", "missing-version.yaml"], &testdata());
    r.assert_code(2).assert_stderr(
        "missing-version.yaml:13:29: template `run_tests` has no version `v9` (versions found: `v1` at ./run-tests.yaml:1:1)",
    );
}

#[test]
fn mistakes_inside_a_template_point_at_the_template_file() {
    let sb = Sandbox::new(support::Mode::Root);
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            r#"- step:
    identifier: t
    name: t
    template:
      templateRef: broken
      templateInputs:
        spec:
          shell: Zsh
"#,
        ),
    );
    let elsewhere = sb.dir.path().join("shared-templates");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(
        elsewhere.join("broken.yaml"),
        "template:\n  name: broken\n  identifier: broken\n  versionLabel: \"1\"\n  type: Step\n  spec:\n    type: Run\n    spec:\n      shell: <+input>\n      comand: make\n",
    )
    .unwrap();
    // Without `--templates` the file is not found...
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("template `broken` not found");
    // ...with it, the typo is reported in the template file, and the bad input where
    // the pipeline gives it.
    let r = sb.run([
        "validate",
        "ci.yaml",
        "--templates",
        elsewhere.to_str().unwrap(),
    ]);
    r.assert_code(2)
        .assert_stderr(
            "broken.yaml:10:7: unknown field `comand` in Run step `t`; did you mean `command`?",
        )
        .assert_stderr("ci.yaml:15:26: invalid `shell` `Zsh`");
}

#[test]
fn several_versions_without_a_label_ask_for_one() {
    let sb = Sandbox::new(support::Mode::Root);
    for v in ["1", "2"] {
        sb.write(
            &format!(".harness/t{v}.yaml"),
            &format!("template:\n  name: s\n  identifier: s\n  versionLabel: \"{v}\"\n  type: Step\n  spec:\n    type: Run\n    spec:\n      command: echo {v}\n"),
        );
    }
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            "- step:\n    identifier: t\n    name: t\n    template:\n      templateRef: s\n",
        ),
    );
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("template `s` has several versions")
        .assert_stderr("write the `versionLabel` to use");
}

#[test]
fn a_template_reference_may_carry_a_looping_strategy() {
    let sb = Sandbox::new(support::Mode::Root);
    let tpl = std::fs::read_to_string(testdata().join("run-tests.yaml")).unwrap();
    sb.write(".harness/run-tests.yaml", &tpl);
    sb.write(
        "ci.yaml",
        &support::stage(
            "",
            r#"- step:
    identifier: unit
    name: unit
    strategy:
      parallelism: 2
    template:
      templateRef: account.run_tests
      versionLabel: v1
      templateInputs:
        type: Run
        spec:
          command: echo "shard <+strategy.iteration> of $HARNESS_NODE_TOTAL"
"#,
        ),
    );
    let r = sb.run(["plan", "ci.yaml"]);
    r.assert_code(0)
        .assert_stdout("parallelism `unit`: 2 instances, all at once")
        .assert_stdout("Run `unit_1` (unit_1)")
        .assert_stdout("from template `account.run_tests` version `v1`")
        .assert_stdout(r#"echo "shard 1 of $HARNESS_NODE_TOTAL""#);
}

/// A pipeline made from a pipeline template: the template's stages (one of them a
/// stage template) with the pipeline's `templateInputs`, under its own identifier.
#[test]
fn a_pipeline_template_runs_with_its_inputs() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        for name in ["release-pipeline.yaml", "ci-stage-v2.yaml"] {
            let text = std::fs::read_to_string(testdata().join(name)).unwrap();
            sb.write(&format!(".harness/templates/{name}"), &text);
        }
        let text = std::fs::read_to_string(testdata().join("from-pipeline-template.yaml")).unwrap();
        sb.write("release.yaml", &text);
        let r = sb.run(["run", "release.yaml"]);
        r.assert_code(0);
        for key in ["pack", "greet"] {
            assert!(r.summary_row(key).contains("passed"), "{}", r.all());
        }
        let ws = sb.workspace();
        let read = |f: &str| std::fs::read_to_string(ws.join(f)).unwrap();
        assert_eq!(read("out/pack.txt"), "packed arm64 in release\n");
        assert_eq!(read("out/greet.txt"), "released arm64 from announce\n");
    }
}

#[test]
fn plan_names_the_pipeline_template() {
    let r = sandrun(&["plan", "from-pipeline-template.yaml"], &testdata());
    r.assert_code(0)
        .assert_stdout("Pipeline `release` (release)")
        .assert_stdout(
            "from template `org.release_pipeline` version `v1` (./release-pipeline.yaml:5:1)",
        )
        .assert_stdout("from template `account.ci_stage` version `2` (./ci-stage-v2.yaml:1:1)");
    // A pipeline template is not a stage template, and the other way round.
    let sb = Sandbox::new(support::Mode::Root);
    let tpl = std::fs::read_to_string(testdata().join("ci-stage-v2.yaml")).unwrap();
    sb.write(".harness/ci-stage-v2.yaml", &tpl);
    sb.write(
        "ci.yaml",
        "pipeline:\n  identifier: p\n  name: p\n  template:\n    templateRef: ci_stage\n    versionLabel: \"2\"\n  stages: []\n",
    );
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("ci.yaml:5:18: template `ci_stage` is a Stage template")
        .assert_stderr("but it is used as a Pipeline");
    let tpl = std::fs::read_to_string(testdata().join("release-pipeline.yaml")).unwrap();
    sb.write(".harness/release-pipeline.yaml", &tpl);
    sb.write(
        "ci.yaml",
        "pipeline:\n  identifier: p\n  name: p\n  template:\n    templateRef: release_pipeline\n  stages: []\n",
    );
    sb.run(["validate", "ci.yaml"])
        .assert_code(2)
        .assert_stderr("ci.yaml:6:3: `stages` beside `template`: the pipeline takes its stages from template `release_pipeline`");
}
