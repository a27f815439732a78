//! `--report-dir`: every JUnit file the steps produced, merged into one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::Reporter;
use crate::junit;
use crate::run::events::RunEvent;

pub struct JunitWriter {
    dir: PathBuf,
    found: Vec<(String, Arc<junit::Report>)>,
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
        if let RunEvent::Report { step, report, .. } = event {
            self.found.push((step.clone(), report.clone()));
        }
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let reports: Vec<(String, junit::Report)> = self
            .found
            .iter()
            .map(|(step, report)| (step.clone(), (**report).clone()))
            .collect();
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create report directory {}", self.dir.display()))?;
        let out = self.output_path();
        std::fs::write(&out, junit::merge(&reports))
            .with_context(|| format!("cannot write {}", out.display()))?;
        Ok(())
    }
}
