//! `--report-dir`: every JUnit file the steps produced, merged into one.

use std::path::PathBuf;
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
