//! Harness expressions end to end: outputs of one stage read by the next, fully
//! qualified references inside step groups, values only Harness's server knows answered
//! with `--set` or a values file, and timeouts from expressions. The pipelines are in
//! `testdata/pipelines/expressions/`.

mod prereq;
mod support;

use std::path::Path;

use support::{modes, Sandbox};

fn testdata(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/pipelines/expressions")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_later_stage_reads_outputs_variables_and_names_of_an_earlier_one() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("cross-stage-outputs.yaml"));
        sb.run(["run", "ci.yaml"])
            .assert_code(0)
            // Inside the group: relative, stage-relative and fully qualified forms.
            .assert_stdout("relative=1.4.2")
            .assert_stdout("stage-relative=1.4.2")
            .assert_stdout("qualified=linux-amd64")
            // The next stage: its condition and its command read the first stage.
            .assert_stdout("deploying 1.4.2 for linux-amd64")
            .assert_stdout("after stage Build (linux-amd64)");
        // Run alone, the later stage asks for what it reads of the stage that does not
        // run, keyed by the expression (Harness's "replaced expressions").
        let version = "pipeline.stages.build.spec.execution.steps.pkg.steps.version.output.outputVariables.VERSION";
        sb.run(["run", "ci.yaml", "--stage", "deploy"])
            .assert_code(2)
            .assert_stderr(&format!("--set {version}=VALUE"))
            .assert_stderr("--set build.variables.target=VALUE");
        sb.run([
            "run",
            "ci.yaml",
            "--stage",
            "deploy",
            "--set",
            &format!("{version}=1.4.7"),
            "--set",
            "pipeline.stages.build.variables.target=arm64",
            "--set",
            "build.variables.target=arm64",
        ])
        .assert_code(0)
        .assert_stdout("deploying 1.4.7 for arm64");
    }
}

#[test]
fn server_only_values_are_listed_together_then_answered_by_set_or_a_values_file() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write("ci.yaml", &testdata("server-inputs.yaml"));
        sb.write("answers.yaml", &testdata("server-inputs.values.yaml"));

        // `validate` accepts them and says what a run will need.
        sb.run(["validate", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("ci.yaml: valid")
            .assert_stdout("ci.yaml:28:32: trigger.event")
            .assert_stdout("ci.yaml:34:38: codeql.variables.language");

        // `run` names every unanswered one, each where it is read, and starts nothing.
        let r = sb.run(["run", "ci.yaml", "--set", "trigger.branch=dev"]);
        r.assert_code(2);
        for (at, key) in [
            ("28:32", "trigger.event"),
            ("33:36", "variable.org.region"),
            ("33:64", "variable.account.team"),
            ("33:97", "variable.channel"),
            ("34:38", "codeql.variables.language"),
        ] {
            r.assert_stderr(&format!("ci.yaml:{at}: `<+{key}>` is known only to Harness's server: give it with --set {key}=VALUE"));
        }
        assert!(!r.all().contains("trigger.branch=VALUE"), "{}", r.all());
        assert!(!r.all().contains("started"), "{}", r.all());

        // All of them with --set.
        sb.run([
            "run",
            "ci.yaml",
            "--set",
            "trigger.branch=main",
            "--set",
            "trigger.event=Push",
            "--set",
            "variable.org.region=eu",
            "--set",
            "variable.account.team=qa",
            "--set",
            "variable.channel=builds",
            "--set",
            "codeql.variables.language=go",
        ])
        .assert_code(0)
        .assert_stdout("branch=main")
        .assert_stdout("region=eu team=qa channel=builds")
        .assert_stdout("language=go");

        // From a values file, with --set overriding one of its answers.
        sb.run([
            "run",
            "ci.yaml",
            "--values",
            "answers.yaml",
            "--set",
            "variable.account.team=sre",
        ])
        .assert_code(0)
        .assert_stdout("region=eu-west-1 team=sre channel=#ci")
        .assert_stdout("language=rust");
    }
}

#[test]
fn a_timeout_from_a_variable_limits_the_step() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        sb.write(
            "ci.yaml",
            &support::stage_with_variables(
                &[("limit", "String", "<+input>.default(1s)")],
                support::DOCKER,
                r#"- step:
    type: Run
    name: slow
    identifier: slow
    timeout: <+stage.variables.limit>
    spec:
      command: sleep 30
"#,
            ),
        );
        sb.run(["plan", "ci.yaml"])
            .assert_code(0)
            .assert_stdout("timeout: 1.0s");
        let r = sb.run(["run", "ci.yaml", "--grace", "500ms"]);
        r.assert_code(1).assert_stdout("timed out (limit 1.0s)");
        // An answer that is no duration is refused before the run, at the timeout.
        sb.run(["run", "ci.yaml", "--set", "limit=soon"])
            .assert_code(2)
            .assert_stderr(
                "ci.yaml:19:22: `timeout` is `<+stage.variables.limit>`, which resolves to `soon`",
            );
    }
}

#[test]
fn a_timeout_read_from_a_step_output_is_refused_before_the_run() {
    let sb = Sandbox::new(modes()[0]);
    sb.write("ci.yaml", &testdata("timeout-from-step-output.yaml"));
    for cmd in ["validate", "run"] {
        sb.run([cmd, "ci.yaml"])
            .assert_code(2)
            .assert_stderr("ci.yaml:25:22: `timeout` is `<+steps.pick.output.outputVariables.LIMIT>`, which reads a step output");
    }
}
