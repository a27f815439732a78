//! The pipeline corpus: every file in `testdata/pipelines/` must load, and every file in
//! `testdata/pipelines/invalid/` must fail with exactly the errors written next to it
//! in `NAME.errors` (one `file:line:col: message` per line, the file named by its base
//! name).

use std::fs;
use std::path::{Path, PathBuf};

use sandrun::pipeline::{self, StepItem, StepKind};

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
    assert_eq!(steps[2].timeout, Some(std::time::Duration::from_secs(60)));
}
