//! `--report-dir`: every JUnit file the steps produced, merged into one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::Reporter;
use crate::junit;
use crate::run::events::RunEvent;

pub struct JunitWriter {
    dir: PathBuf,
    /// Reports in the order first seen, one per file: a file that two steps' `reports`
    /// globs both match is merged once, as the later step left it.
    found: Vec<(PathBuf, String, Arc<junit::Report>)>,
}

impl JunitWriter {
    pub fn new(dir: PathBuf) -> Self {
        JunitWriter {
            dir,
            found: Vec::new(),
        }
    }

    pub fn output_path(&self) -> PathBuf {
        self.dir.join("junit.xml")
    }

    /// Checks, before anything runs, that `dir` exists or can be created and that a
    /// file can be written in it: a report that cannot be written must stop the run
    /// before it starts, not vanish after it.
    pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the report directory {}", dir.display()))?;
        let probe = dir.join(format!(".sandrun-write-test-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .with_context(|| format!("cannot write in the report directory {}", dir.display()))?;
        std::fs::remove_file(&probe)
            .with_context(|| format!("cannot remove {}", probe.display()))?;
        Ok(())
    }
}

impl Reporter for JunitWriter {
    fn event(&mut self, event: &RunEvent) {
        if let RunEvent::Report {
            step, path, report, ..
        } = event
        {
            let entry = (path.clone(), step.clone(), report.clone());
            match self.found.iter_mut().find(|(p, ..)| p == path) {
                Some(seen) => *seen = entry,
                None => self.found.push(entry),
            }
        }
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        // The reports as the steps left them, read (and masked) when each step ended;
        // files that failed to parse were reported then.
        let reports: Vec<(String, junit::Report)> = (self.found.iter())
            .map(|(_, step, report)| (step.clone(), (**report).clone()))
            .collect();
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create report directory {}", self.dir.display()))?;
        let out = self.output_path();
        std::fs::write(&out, junit::merge(&reports))
            .with_context(|| format!("cannot write {}", out.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::events::TestCounts;

    fn report_event(step: &str, path: &str, case: &str) -> RunEvent {
        let report = junit::parse_str(&format!(
            r#"<testsuite name="s"><testcase name="{case}"/></testsuite>"#
        ))
        .unwrap();
        RunEvent::Report {
            step: step.into(),
            path: path.into(),
            counts: TestCounts::default(),
            report: Arc::new(report),
        }
    }

    #[test]
    fn a_file_reported_by_two_steps_is_merged_once_as_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JunitWriter::new(dir.path().to_path_buf());
        w.event(&report_event("a", "/w/r.xml", "first"));
        w.event(&report_event("b", "/w/other.xml", "other"));
        w.event(&report_event("c", "/w/r.xml", "second"));
        w.finish().unwrap();
        let xml = std::fs::read_to_string(w.output_path()).unwrap();
        let merged = junit::parse_str(&xml).unwrap();
        let cases: Vec<&str> = (merged.suites.iter())
            .flat_map(|s| s.cases.iter().map(|c| c.name.as_str()))
            .collect();
        assert_eq!(cases, ["second", "other"], "{xml}");
    }
}
