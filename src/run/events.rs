//! What the executor tells the world, as typed events.
//!
//! The executor only emits [`RunEvent`]s; the terminal display, the `--json` stream, the
//! JUnit writer and the summary are consumers of the same events, so adding an output
//! never touches the executor (the shape nextest's reporters have). Secret values are
//! masked in every text an event carries as it is emitted ([`EventSink::masking`]), so
//! no reporter can print one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::plan::{Secrets, StepType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// The exit code, or 128+N for a process killed by signal N (as shells report it).
    pub code: i32,
    pub signal: Option<i32>,
}

impl ExitInfo {
    pub fn from_status(status: std::process::ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo { code, signal: None },
            (None, Some(sig)) => ExitInfo {
                code: 128 + sig,
                signal: Some(sig),
            },
            (None, None) => ExitInfo {
                code: -1,
                signal: None,
            },
        }
    }

    pub fn success(&self) -> bool {
        self.code == 0
    }

    pub fn describe(&self) -> String {
        match self.signal {
            Some(sig) => format!("killed by {} (exit code {})", signal_name(sig), self.code),
            None => format!("exit code {}", self.code),
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// The final word on a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StepResult {
    Succeeded,
    Failed {
        reason: String,
    },
    TimedOut {
        #[serde(with = "duration_ms")]
        limit: Duration,
    },
    /// Failed, but a failure strategy said Ignore or MarkAsSuccess.
    FailureIgnored {
        reason: String,
    },
    Skipped {
        reason: String,
    },
    /// Stopped by Ctrl-C/SIGTERM or an Abort.
    Cancelled,
    /// A Background step that was still serving when the stage ended.
    Stopped,
}

impl StepResult {
    /// Whether the step counts against the stage.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            StepResult::Failed { .. } | StepResult::TimedOut { .. } | StepResult::Cancelled
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            StepResult::Succeeded => "passed",
            StepResult::Failed { .. } => "FAILED",
            StepResult::TimedOut { .. } => "TIMED OUT",
            StepResult::FailureIgnored { .. } => "failed (ignored)",
            StepResult::Skipped { .. } => "skipped",
            StepResult::Cancelled => "cancelled",
            StepResult::Stopped => "stopped",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageResult {
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

/// Test counts from one JUnit file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    pub tests: u64,
    pub failures: u64,
    pub errors: u64,
    pub skipped: u64,
}

impl TestCounts {
    pub fn passed(&self) -> u64 {
        self.tests
            .saturating_sub(self.failures + self.errors + self.skipped)
    }

    pub fn add(&mut self, o: &TestCounts) {
        self.tests += o.tests;
        self.failures += o.failures;
        self.errors += o.errors;
        self.skipped += o.skipped;
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    /// An image a step needs is present (pulled or already in the store).
    ImageReady {
        reference: String,
        digest: String,
    },
    StageStarted {
        stage: String,
        name: String,
        /// Keys of every step of the stage, in plan order.
        steps: Vec<String>,
    },
    StageSkipped {
        stage: String,
        reason: String,
    },
    StepStarted {
        step: String,
        name: String,
        step_type: StepType,
        attempt: u32,
    },
    Output {
        step: String,
        stream: Stream,
        line: String,
    },
    /// A Background step's ports accept connections (or it has none to wait for).
    StepReady {
        step: String,
        #[serde(with = "duration_ms")]
        waited: Duration,
    },
    /// A Background step's ports did not open in time; the stage proceeds anyway.
    ReadyTimeout {
        step: String,
        ports: Vec<u16>,
        #[serde(with = "duration_ms")]
        waited: Duration,
    },
    /// A process ended (a Run step's attempt, or a Background service).
    StepExited {
        step: String,
        exit: ExitInfo,
    },
    /// A Background service ended while the stage was still running.
    BackgroundDied {
        step: String,
        exit: ExitInfo,
        last_lines: Vec<String>,
    },
    Retrying {
        step: String,
        attempt: u32,
        #[serde(with = "duration_ms")]
        after: Duration,
    },
    /// A JUnit report a step left, as read when the step ended (the `--report-dir`
    /// writer merges these, and never reads the step's files again).
    Report {
        step: String,
        path: PathBuf,
        counts: TestCounts,
        /// The parsed file: consumers never read the step's file again (it may have
        /// been replaced since).
        #[serde(skip)]
        report: std::sync::Arc<crate::junit::Report>,
    },
    ReportError {
        step: String,
        path: PathBuf,
        message: String,
    },
    StepFinished {
        step: String,
        name: String,
        step_type: StepType,
        result: StepResult,
        exit: Option<ExitInfo>,
        #[serde(with = "duration_ms")]
        duration: Duration,
        tests: Option<TestCounts>,
    },
    Warning {
        step: Option<String>,
        message: String,
    },
    StageFinished {
        stage: String,
        result: StageResult,
        #[serde(with = "duration_ms")]
        duration: Duration,
    },
}

impl RunEvent {
    /// Masks `secrets` in every text the event carries.
    fn mask(&mut self, secrets: &Secrets) {
        let texts: Vec<&mut String> = match self {
            RunEvent::ImageReady { reference, .. } => vec![reference],
            RunEvent::StageSkipped { reason, .. } => vec![reason],
            RunEvent::Output { line, .. } => vec![line],
            RunEvent::BackgroundDied { last_lines, .. } => last_lines.iter_mut().collect(),
            RunEvent::ReportError { message, .. } | RunEvent::Warning { message, .. } => {
                vec![message]
            }
            RunEvent::Report { report, .. } => Arc::make_mut(report).texts_mut().collect(),
            RunEvent::StepFinished { result, .. } => match result {
                StepResult::Failed { reason }
                | StepResult::FailureIgnored { reason }
                | StepResult::Skipped { reason } => vec![reason],
                _ => vec![],
            },
            RunEvent::StageStarted { .. }
            | RunEvent::StepStarted { .. }
            | RunEvent::StepReady { .. }
            | RunEvent::ReadyTimeout { .. }
            | RunEvent::StepExited { .. }
            | RunEvent::Retrying { .. }
            | RunEvent::StageFinished { .. } => vec![],
        };
        for text in texts {
            secrets.mask_in_place(text);
        }
    }
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl RunEvent {
    /// The step key this event names, if any, to be rewritten in place.
    fn step_mut(&mut self) -> Option<&mut String> {
        match self {
            RunEvent::StepStarted { step, .. }
            | RunEvent::Output { step, .. }
            | RunEvent::StepReady { step, .. }
            | RunEvent::ReadyTimeout { step, .. }
            | RunEvent::StepExited { step, .. }
            | RunEvent::BackgroundDied { step, .. }
            | RunEvent::Retrying { step, .. }
            | RunEvent::Report { step, .. }
            | RunEvent::ReportError { step, .. }
            | RunEvent::StepFinished { step, .. } => Some(step),
            RunEvent::Warning { step, .. } => step.as_mut(),
            RunEvent::ImageReady { .. }
            | RunEvent::StageStarted { .. }
            | RunEvent::StageSkipped { .. }
            | RunEvent::StageFinished { .. } => None,
        }
    }
}

/// Where the executor sends its events; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<RunEvent>,
    secrets: Arc<Secrets>,
    /// Put before every step key (`STAGE/`), for stages that run beside others.
    step_prefix: Option<Arc<str>>,
}

impl EventSink {
    pub fn channel() -> (EventSink, mpsc::UnboundedReceiver<RunEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let secrets = Arc::default();
        (
            EventSink {
                tx,
                secrets,
                step_prefix: None,
            },
            rx,
        )
    }

    /// This sink, masking `secrets` in every event it carries from now on.
    pub fn masking(self, secrets: Secrets) -> EventSink {
        EventSink {
            secrets: Arc::new(secrets),
            ..self
        }
    }

    /// A sink for a stage that runs at the same time as other stages: its step keys
    /// become `STAGE/KEY`, so that the output, the summary and the reports of two
    /// stages with a step of the same name stay apart.
    pub fn for_parallel_stage(&self, stage: &str) -> EventSink {
        EventSink {
            tx: self.tx.clone(),
            secrets: self.secrets.clone(),
            step_prefix: Some(format!("{stage}/").into()),
        }
    }

    pub fn emit(&self, mut event: RunEvent) {
        if !self.secrets.is_empty() {
            event.mask(&self.secrets);
        }
        if let Some(prefix) = &self.step_prefix {
            if let Some(step) = event.step_mut() {
                step.insert_str(0, prefix);
            }
            if let RunEvent::StageStarted { steps, .. } = &mut event {
                for step in steps {
                    step.insert_str(0, prefix);
                }
            }
        }
        // The receiver only goes away when the process is exiting.
        let _ = self.tx.send(event);
    }

    pub fn warn(&self, step: Option<&str>, message: impl Into<String>) {
        self.emit(RunEvent::Warning {
            step: step.map(str::to_string),
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_text_an_event_carries_is_masked() {
        let mut secrets = Secrets::default();
        secrets.add("line-one-of-it\nline-two-of-it");
        let (sink, mut rx) = EventSink::channel();
        let sink = sink.masking(secrets);
        sink.warn(Some("s"), "cannot start: line-two-of-it");
        sink.emit(RunEvent::StepFinished {
            step: "s".into(),
            name: "s".into(),
            step_type: StepType::Run,
            result: StepResult::Failed {
                reason: "bad line-one-of-it".into(),
            },
            exit: None,
            duration: Duration::ZERO,
            tests: None,
        });
        sink.emit(RunEvent::ReportError {
            step: "s".into(),
            path: "r.xml".into(),
            message: "at line-one-of-it".into(),
        });
        drop(sink);
        let mut seen = 0;
        while let Ok(event) = rx.try_recv() {
            let json = serde_json::to_string(&event).unwrap();
            assert!(!json.contains("-of-it"), "{json}");
            seen += 1;
        }
        assert_eq!(seen, 3);
    }
}
