//! The pipeline corpus: every file in `testdata/pipelines/` must load, and every file in
//! `testdata/pipelines/invalid/` must fail with exactly the errors written next to it
//! in `NAME.errors` (one `file:line:col: message` per line, the file named by its base
//! name).

use std::fs;
use std::path::{Path, PathBuf};

use sandrun::pipeline::{self, StepItem, StepKind, Timeout};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_pipeline_loads() {
    let files = yaml_files(&corpus_dir());
    assert!(files.len() >= 4, "corpus is missing: {files:?}");
    let mut failures = Vec::new();
    for f in &files {
        if let Err(e) = pipeline::load(f) {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_invalid_pipeline_fails_with_its_exact_errors() {
    let dir = corpus_dir().join("invalid");
    let files = yaml_files(&dir);
    assert!(!files.is_empty());
    let mut mismatches = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap();
        let text = fs::read_to_string(f).unwrap();
        let expected_path = f.with_extension("errors");
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no {}", f.display(), expected_path.display()));
        match pipeline::parse_str(Path::new(name), &text) {
            Ok(_) => mismatches.push(format!("{}: loaded without errors", name.to_string_lossy())),
            Err(e) => {
                let got = e.to_string();
                if got.trim_end() != expected.trim_end() {
                    mismatches.push(format!(
                        "{}:\n--- expected\n{}\n--- got\n{}",
                        name.to_string_lossy(),
                        expected.trim_end(),
                        got
                    ));
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

fn all_steps(items: &[StepItem]) -> Vec<&pipeline::Step> {
    let mut out = Vec::new();
    for i in items {
        match i {
            StepItem::Step(s) => out.push(s),
            StepItem::Parallel(inner, _) => out.extend(all_steps(inner)),
            StepItem::Group(g) => out.extend(all_steps(&g.steps)),
            StepItem::Loop(l) => out.extend(all_steps(&l.instances)),
        }
    }
    out
}

#[test]
fn python_http_server_is_host_steps_with_a_port_binding() {
    let file = pipeline::load(&corpus_dir().join("python-http-server.yaml")).unwrap();
    let stage = &file.stages[0];
    let steps = all_steps(&stage.spec.as_ref().unwrap().steps);
    assert_eq!(steps.len(), 3);
    let StepKind::Background(bg) = &steps[1].kind else {
        panic!("{:?}", steps[1].kind)
    };
    assert_eq!(steps[1].identifier, "http_server");
    assert!(bg.container.image.is_none());
    assert_eq!(bg.port_bindings, vec![(8000, 8000)]);
    assert_eq!(
        steps[2].timeout,
        Some(Timeout::Fixed(std::time::Duration::from_secs(60)))
    );
}

fn find<'a>(items: &'a [StepItem], id: &str) -> &'a pipeline::Step {
    all_steps(items)
        .into_iter()
        .find(|s| s.identifier == id)
        .unwrap_or_else(|| panic!("no step {id}"))
}

#[test]
fn full_pipeline_keeps_every_field() {
    use pipeline::{FailureAction, Infrastructure, PullPolicy, Shell, StageStatus, VariableType};
    use std::time::Duration;

    let file = pipeline::load(&corpus_dir().join("full-pipeline.yaml")).unwrap();
    let info = file.pipeline.as_ref().unwrap();
    assert_eq!(info.identifier, "everything");
    assert_eq!(
        info.timeout,
        Some(Timeout::Fixed(Duration::from_secs(7200)))
    );
    let vars: Vec<_> = info
        .variables
        .iter()
        .map(|v| (v.name.as_str(), &v.var_type))
        .collect();
    assert_eq!(
        vars,
        [
            ("image_tag", &VariableType::String),
            ("replicas", &VariableType::Number),
            ("registry_token", &VariableType::Secret)
        ]
    );
    assert!(info.variables[0].required);
    assert_eq!(info.variables[1].value, "3");

    let ids: Vec<_> = file
        .stages
        .iter()
        .map(|s| (s.identifier.as_str(), s.stage_type.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("build_and_test", "CI"),
            ("lint", "CI"),
            ("docs", "CI"),
            ("deploy", "Deployment"),
            ("approve", "Approval")
        ]
    );
    assert!(file.stages[3].spec.is_none() && file.stages[4].spec.is_none());
    let lint = file.stages[1].spec.as_ref().unwrap();
    assert_eq!(lint.infrastructure, Infrastructure::KubernetesDirect);
    let docs = file.stages[2].spec.as_ref().unwrap();
    assert_eq!(
        docs.infrastructure,
        Infrastructure::UseFromStage("lint".into())
    );

    let stage = &file.stages[0];
    assert_eq!(
        stage.timeout,
        Some(Timeout::Fixed(Duration::from_secs(5400)))
    );
    assert_eq!(stage.variables.len(), 3);
    assert_eq!(stage.variables[2].default.as_deref(), Some("fallback"));
    let when = stage.when.as_ref().unwrap();
    assert_eq!(when.stage_status, StageStatus::Success);
    assert!(when.condition.as_ref().unwrap().contains("!= \"skip\""));
    assert!(matches!(
        stage.failure_strategies[0].action,
        FailureAction::Abort
    ));
    let spec = stage.spec.as_ref().unwrap();
    assert_eq!(spec.infrastructure, Infrastructure::Docker);
    assert!(spec.clone_codebase);
    assert_eq!(spec.platform.as_ref().unwrap().arch, "Amd64");
    assert_eq!(spec.shared_paths, ["/var/run", "/root/.cache", "/cache"]);
    let dep = &spec.service_dependencies[0];
    let StepKind::Background(dep_bg) = &dep.kind else {
        panic!()
    };
    assert_eq!(
        dep_bg.entrypoint.as_deref().unwrap(),
        ["redis-server", "--port", "6380"]
    );

    let run = find(&spec.steps, "every_run_field");
    assert_eq!(run.timeout, Some(Timeout::Fixed(Duration::from_secs(600))));
    assert_eq!(
        run.description.as_deref(),
        Some("uses every field of a Run step")
    );
    let StepKind::Run(r) = &run.kind else {
        panic!()
    };
    assert_eq!(r.shell, Some(Shell::Bash));
    assert_eq!(r.output_variables, ["VERSION", "SHA"]);
    let c = &r.container;
    assert_eq!(c.image.as_deref(), Some("rust:1.85"));
    assert_eq!(c.connector_ref.as_deref(), Some("account.harnessImage"));
    assert_eq!(c.pull_policy, Some(PullPolicy::IfNotPresent));
    assert!(!c.privileged);
    assert_eq!(c.run_as_user.as_deref(), Some("1000"));
    assert_eq!(c.resources.memory, Some(1 << 30));
    assert_eq!(c.resources.cpu_millis, Some(1500));
    assert_eq!(c.reports, ["target/junit/*.xml", "**/report.xml"]);
    let env: Vec<_> = c
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [
            ("EMPTY", ""),
            ("ENABLED", "true"),
            ("JOBS", "2"),
            ("RATIO", "1.50"),
            ("REPO", "<+codebase.repoUrl>"),
            ("RUST_LOG", "debug")
        ]
    );
    let [first, second] = run.failure_strategies.as_slice() else {
        panic!()
    };
    assert_eq!(first.errors, ["Timeout", "Unknown"]);
    match &first.action {
        FailureAction::Retry {
            count,
            intervals,
            on_retry_failure,
        } => {
            assert_eq!(*count, 2);
            assert_eq!(
                intervals,
                &[Duration::from_secs(5), Duration::from_secs(60)]
            );
            assert!(matches!(**on_retry_failure, FailureAction::MarkAsSuccess));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(second.action, FailureAction::Ignore));

    let bg = find(&spec.steps, "every_background_field");
    let StepKind::Background(b) = &bg.kind else {
        panic!()
    };
    assert_eq!(
        b.entrypoint.as_deref().unwrap(),
        [
            "docker-entrypoint.sh",
            "postgres",
            "-c",
            "log_statement=all"
        ]
    );
    assert!(b.command.is_some());
    assert_eq!(b.port_bindings, [(5432, 15432), (8080, 80)]);
    assert!(b.container.privileged);
    assert_eq!(b.container.pull_policy, Some(PullPolicy::Always));
    assert_eq!(b.container.resources.memory, Some(500 << 20));
    assert_eq!(b.container.resources.cpu_millis, Some(400));
    assert_eq!(b.container.run_as_user.as_deref(), Some("postgres"));

    let plugin = find(&spec.steps, "every_plugin_field");
    let StepKind::Plugin(p) = &plugin.kind else {
        panic!()
    };
    assert_eq!(p.entrypoint.as_deref().unwrap(), ["/bin/drone-slack"]);
    assert_eq!(p.container.resources.memory, Some(256_000_000));
    assert_eq!(p.container.resources.cpu_millis, Some(250));
    let settings: Vec<_> = p
        .settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        settings,
        [
            ("PLUGIN_CHANNEL", "builds"),
            ("PLUGIN_RECIPIENTS", "alice,bob"),
            ("PLUGIN_RETRIES", "3"),
            (
                "PLUGIN_TEMPLATE",
                r#"{"fields":["a","b"],"title":"build <+steps.every_run_field.output.outputVariables.VERSION>"}"#
            ),
            ("PLUGIN_WEBHOOK", "<+secrets.getValue('slack_webhook')>"),
        ]
    );

    let push = find(&spec.steps, "push");
    match &push.kind {
        StepKind::Unsupported { step_type, reason } => {
            assert_eq!(step_type, "BuildAndPushDockerRegistry");
            assert!(reason.contains("builds and pushes"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // Step groups nest, and a step id may repeat in another group.
    let StepItem::Group(outer) = &spec.steps[2] else {
        panic!("{:?}", spec.steps[2])
    };
    assert_eq!(outer.identifier, "outer");
    assert_eq!(outer.variables[0].name, "LEVEL");
    assert_eq!(outer.when.as_ref().unwrap().stage_status, StageStatus::All);
    assert!(matches!(
        outer.failure_strategies[0].action,
        FailureAction::MarkAsFailure
    ));
    let StepItem::Group(inner) = &outer.steps[1] else {
        panic!()
    };
    assert_eq!(inner.identifier, "inner");
    assert!(matches!(&inner.steps[0], StepItem::Step(s) if s.identifier == "first"));
    let StepItem::Parallel(branches, _) = &inner.steps[1] else {
        panic!()
    };
    assert_eq!(branches.len(), 2);
    let right = find(&inner.steps, "right");
    let StepKind::Run(rr) = &right.kind else {
        panic!()
    };
    assert_eq!(rr.shell, Some(Shell::Powershell));
    let after = find(&spec.steps, "after_groups");
    assert_eq!(
        after.when.as_ref().unwrap().stage_status,
        StageStatus::Failure
    );
}

#[test]
fn a_single_stage_file_has_no_pipeline() {
    let file = pipeline::load(&corpus_dir().join("single-stage.yaml")).unwrap();
    assert!(file.pipeline.is_none());
    assert_eq!(file.stages.len(), 1);
    assert_eq!(file.stages[0].identifier, "unit_tests");
    assert_eq!(file.stages[0].loc.line, 3);
}

#[test]
fn anchors_aliases_and_merge_keys_apply() {
    let file = pipeline::load(&corpus_dir().join("anchors.yaml")).unwrap();
    let steps = &file.stages[0].spec.as_ref().unwrap().steps;
    let run = |id| match &find(steps, id).kind {
        StepKind::Run(r) => r.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(run("two").command, run("one").command);
    let three = run("three");
    assert_eq!(three.command, "echo overridden");
    assert_eq!(three.shell, Some(pipeline::Shell::Bash));
    assert_eq!(three.container.env["A"], "1");
    assert_eq!(three.container.env["B"], "3");
}

#[test]
fn unknown_step_types_parse_as_unsupported() {
    let text = "stage:\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n        - step:\n            identifier: x\n            type: Rnu\n            spec: {}\n";
    let file = pipeline::parse_str(Path::new("t.yaml"), text).unwrap();
    let StepItem::Step(s) = &file.stages[0].spec.as_ref().unwrap().steps[0] else {
        panic!()
    };
    match &s.kind {
        StepKind::Unsupported { step_type, reason } => {
            assert_eq!(step_type, "Rnu");
            assert_eq!(reason, "unknown step type; did you mean `Run`?");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let e = pipeline::load(Path::new("/nonexistent/p.yaml")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("/nonexistent/p.yaml: cannot read the pipeline file: "),
        "{text}"
    );
}
