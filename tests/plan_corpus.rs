//! `sandrun plan` on every valid pipeline of the corpus: each is planned, and every
//! step it names appears in the plan, with secrets masked.

use std::process::Command;

const SECRETS: [(&str, &str); 3] = [
    ("registry_token", "tok-123456"),
    ("db_password", "pw-123456"),
    ("slack_webhook", "https://hooks.example/123456"),
];

#[test]
fn every_valid_pipeline_plans() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines");
    let mut planned = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandrun"));
        cmd.arg("plan").arg(&path).env("NO_COLOR", "1");
        for (id, value) in SECRETS {
            cmd.arg("--secret").arg(format!("{id}={value}"));
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every step of every CI stage is in the plan (non-CI stages are listed as
        // skipped, without their steps).
        let file = sandrun::pipeline::load(&path).unwrap();
        for stage in &file.stages {
            assert!(
                stdout.contains(&format!("Stage `{}`", stage.identifier)),
                "{stdout}"
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let non_ci = file.stages.iter().any(|s| s.spec.is_none());
        for line in text.lines() {
            if let Some(id) = line.trim().strip_prefix("identifier: ") {
                assert!(
                    stdout.contains(id.trim()) || (non_ci && stdout.contains("skipped: `")),
                    "{}: `{id}` missing from\n{stdout}",
                    path.display()
                );
            }
        }
        for (_, value) in SECRETS {
            assert!(
                !stdout.contains(value),
                "{}: a secret was printed",
                path.display()
            );
        }
        planned += 1;
    }
    assert!(
        planned >= 7,
        "only {planned} pipelines found in {}",
        dir.display()
    );
}
