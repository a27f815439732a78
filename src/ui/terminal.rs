//! The terminal display: each step's output prefixed with its name, a spinner per
//! running step on a terminal, services that die called out loudly, and a summary
//! table per stage. Plain lines (no colour, no spinners) when piped or with NO_COLOR.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use console::Style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{format_duration, Reporter};
use crate::plan::StepType;
use crate::run::events::{RunEvent, StageResult, StepResult, Stream, TestCounts};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// One finished step, for the summary table.
struct Row {
    step: String,
    step_type: StepType,
    result: StepResult,
    exit: Option<i32>,
    duration: Duration,
    tests: Option<TestCounts>,
}

pub struct TerminalReporter {
    color: bool,
    progress: Option<MultiProgress>,
    spinners: HashMap<String, ProgressBar>,
    styles: HashMap<String, Style>,
    width: usize,
    rows: Vec<Row>,
    /// Steps in the order they were first seen, so the summary follows the plan.
    order: Vec<String>,
    /// The step keys of each stage that started: stages in a `parallel` block finish
    /// in any order, and each summary shows only its own steps.
    stage_steps: HashMap<String, Vec<String>>,
    palette_next: usize,
}

const PALETTE: [u8; 6] = [6, 5, 3, 4, 2, 14];

impl TerminalReporter {
    pub fn new(choice: ColorChoice) -> Self {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => tty && !no_color,
        };
        console::set_colors_enabled(color);
        let progress =
            (tty && color).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        TerminalReporter {
            color,
            progress,
            spinners: HashMap::new(),
            styles: HashMap::new(),
            width: 8,
            rows: Vec::new(),
            order: Vec::new(),
            stage_steps: HashMap::new(),
            palette_next: 0,
        }
    }

    fn line(&self, text: &str) {
        match &self.progress {
            Some(mp) => {
                let _ = mp.println(text);
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
            }
        }
    }

    fn style_for(&mut self, step: &str) -> Style {
        if let Some(s) = self.styles.get(step) {
            return s.clone();
        }
        let s = Style::new().color256(PALETTE[self.palette_next % PALETTE.len()]);
        self.palette_next += 1;
        self.styles.insert(step.to_string(), s.clone());
        s
    }

    fn prefixed(&mut self, step: &str, text: &str) {
        if !self.order.iter().any(|k| k == step) {
            self.order.push(step.to_string());
        }

        let style = self.style_for(step);
        let prefix = format!("{step:<w$} |", w = self.width);
        let line = format!("{} {text}", style.apply_to(prefix));
        self.line(&line);
    }

    fn bold(&self, s: &str) -> String {
        Style::new().bold().apply_to(s).to_string()
    }

    fn red(&self, s: &str) -> String {
        Style::new().red().bold().apply_to(s).to_string()
    }

    fn green(&self, s: &str) -> String {
        Style::new().green().apply_to(s).to_string()
    }

    fn yellow(&self, s: &str) -> String {
        Style::new().yellow().apply_to(s).to_string()
    }

    fn start_spinner(&mut self, step: &str, step_type: &StepType) {
        let Some(mp) = &self.progress else { return };
        let pb = mp.add(ProgressBar::new_spinner());
        pb.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {msg} {elapsed:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_prefix(step.to_string());
        pb.set_message(match step_type {
            StepType::Background => "service starting",
            _ => "running",
        });
        pb.enable_steady_tick(Duration::from_millis(100));
        if let Some(old) = self.spinners.insert(step.to_string(), pb) {
            old.finish_and_clear();
        }
    }

    fn stop_spinner(&mut self, step: &str) {
        if let Some(pb) = self.spinners.remove(step) {
            pb.finish_and_clear();
        }
    }

    fn summary(&mut self, stage: &str, result: StageResult, duration: Duration) {
        let verdict = match result {
            StageResult::Succeeded => self.green("succeeded"),
            StageResult::Failed => self.red("FAILED"),
            StageResult::Cancelled => self.yellow("cancelled"),
            StageResult::Skipped => "skipped".to_string(),
        };
        let own = self.stage_steps.remove(stage).unwrap_or_default();
        let (mut rows, others) = std::mem::take(&mut self.rows)
            .into_iter()
            .partition(|r| own.contains(&r.step));
        self.rows = others;
        let (order, others): (Vec<String>, Vec<String>) = std::mem::take(&mut self.order)
            .into_iter()
            .partition(|k| own.contains(k));
        self.order = others;
        rows.sort_by_key(|r| order.iter().position(|k| k == &r.step));
        self.line("");
        self.line(&format!(
            "{} `{stage}` {verdict} in {}",
            self.bold("Stage"),
            format_duration(duration)
        ));
        let w = rows.iter().map(|r| r.step.len()).max().unwrap_or(4).max(4);
        // Unsupported steps keep their own type names, some longer than `Background`.
        let tw = rows
            .iter()
            .map(|r| r.step_type.to_string().len())
            .max()
            .unwrap_or(4)
            .max(10);
        self.line(&self.bold(&format!(
            "  {:<w$}  {:<tw$}  {:<16}  {:>8}  {:>4}  TESTS",
            "STEP", "TYPE", "RESULT", "TIME", "EXIT"
        )));
        for r in rows {
            let label = format!("{:<16}", r.result.label());
            let label = if r.result.is_failure() {
                self.red(&label)
            } else if matches!(r.result, StepResult::Succeeded | StepResult::Stopped) {
                self.green(&label)
            } else {
                self.yellow(&label)
            };
            let tests = r
                .tests
                .map(|t| {
                    let mut s = format!("{} passed, {} failed", t.passed(), t.failures + t.errors);
                    if t.skipped > 0 {
                        s.push_str(&format!(", {} skipped", t.skipped));
                    }
                    s
                })
                .unwrap_or_default();
            let exit = r.exit.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            self.line(&format!(
                "  {:<w$}  {:<tw$}  {label}  {:>8}  {:>4}  {tests}",
                r.step,
                r.step_type.to_string(),
                format_duration(r.duration),
                exit
            ));
            if let StepResult::Failed { reason }
            | StepResult::FailureIgnored { reason }
            | StepResult::Skipped { reason } = &r.result
            {
                self.line(&format!(
                    "  {:<w$}  {}",
                    "",
                    Style::new().dim().apply_to(reason)
                ));
            }
        }
    }
}

impl Reporter for TerminalReporter {
    fn event(&mut self, event: &RunEvent) {
        match event {
            RunEvent::StageStarted { stage, name, steps } => {
                self.stage_steps.insert(stage.clone(), steps.clone());
                let title = if name.is_empty() || name == stage {
                    format!("`{stage}`")
                } else {
                    format!("`{stage}` ({name})")
                };
                self.line(&format!(
                    "{} {title}: {} steps",
                    self.bold("Stage"),
                    steps.len()
                ));
                // Align every prefix of the stage from the start.
                self.width = steps
                    .iter()
                    .map(|k| k.len().min(24))
                    .max()
                    .unwrap_or(8)
                    .max(4)
                    // Beside a stage still running, keep its prefixes aligned too.
                    .max(if self.stage_steps.len() > 1 {
                        self.width
                    } else {
                        0
                    });
                self.order.extend(steps.iter().cloned());
            }
            // The store's own progress display already said where each image came from.
            RunEvent::ImageReady { .. } => {}
            RunEvent::StageSkipped { stage, reason } => {
                self.line(&format!(
                    "{} `{stage}` skipped: {reason}",
                    self.bold("Stage")
                ));
            }
            RunEvent::StepStarted {
                step,
                step_type,
                attempt,
                ..
            } => {
                let what = match (step_type, attempt) {
                    (StepType::Background, _) => "starting service".to_string(),
                    (_, 1) => "started".to_string(),
                    (_, n) => format!("started (attempt {n})"),
                };
                let text = Style::new().dim().apply_to(format!("▶ {what}")).to_string();
                self.prefixed(step, &text);
                self.start_spinner(step, step_type);
            }
            RunEvent::Output { step, stream, line } => {
                let text = match stream {
                    Stream::Stdout => line.clone(),
                    Stream::Stderr if self.color => Style::new().dim().apply_to(line).to_string(),
                    Stream::Stderr => line.clone(),
                };
                self.prefixed(step, &text);
            }
            RunEvent::StepReady { step, waited } => {
                self.stop_spinner(step);
                let t = self.green(&format!("● ready after {}", format_duration(*waited)));
                self.prefixed(step, &t);
            }
            RunEvent::ReadyTimeout {
                step,
                ports,
                waited,
            } => {
                self.stop_spinner(step);
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                let t = self.yellow(&format!(
                    "! port {} not accepting connections after {}; proceeding anyway",
                    ports.join(", "),
                    format_duration(*waited)
                ));
                self.prefixed(step, &t);
            }
            RunEvent::StepExited { .. } => {}
            RunEvent::BackgroundDied {
                step,
                exit,
                last_lines,
            } => {
                self.stop_spinner(step);
                if exit.success() {
                    let t = self.yellow("! service exited (code 0) while the stage was running");
                    self.prefixed(step, &t);
                } else {
                    let t = self.red(&format!(
                        "✘ service died while the stage was running: {}",
                        exit.describe()
                    ));
                    self.prefixed(step, &t);
                    if !last_lines.is_empty() {
                        self.prefixed(step, "  its last lines were:");
                        for l in last_lines {
                            self.prefixed(step, &format!("  │ {l}"));
                        }
                    }
                }
            }
            RunEvent::Retrying {
                step,
                attempt,
                after,
            } => {
                let t = self.yellow(&format!(
                    "↻ retrying (attempt {attempt}) in {}",
                    format_duration(*after)
                ));
                self.prefixed(step, &t);
            }
            RunEvent::Report {
                step, path, counts, ..
            } => {
                let t = format!(
                    "report {}: {} tests, {} passed, {} failed",
                    path.display(),
                    counts.tests,
                    counts.passed(),
                    counts.failures + counts.errors
                );
                self.prefixed(step, &t);
            }
            RunEvent::ReportError {
                step,
                path,
                message,
            } => {
                let t = self.yellow(&format!("! report {} ignored: {message}", path.display()));
                self.prefixed(step, &t);
            }
            RunEvent::StepFinished {
                step,
                step_type,
                result,
                exit,
                duration,
                tests,
                ..
            } => {
                self.stop_spinner(step);
                let text = match result {
                    StepResult::Succeeded => {
                        self.green(&format!("✔ passed in {}", format_duration(*duration)))
                    }
                    StepResult::Stopped => self.green("■ stopped at the end of the stage"),
                    StepResult::Skipped { reason } => self.yellow(&format!("○ skipped: {reason}")),
                    StepResult::FailureIgnored { reason } => self.yellow(&format!(
                        "✘ failed ({reason}); ignored by its failure strategy"
                    )),
                    StepResult::Failed { reason } => self.red(&format!("✘ failed: {reason}")),
                    StepResult::TimedOut { limit } => self.red(&format!(
                        "✘ timed out (limit {}) and was stopped after {}",
                        format_duration(*limit),
                        format_duration(*duration)
                    )),
                    StepResult::Cancelled => self.yellow("■ cancelled"),
                };
                self.prefixed(step, &text);
                self.rows.push(Row {
                    step: step.clone(),
                    step_type: step_type.clone(),
                    result: result.clone(),
                    exit: exit.map(|e| e.code),
                    duration: *duration,
                    tests: *tests,
                });
            }
            RunEvent::Warning { step, message } => {
                let t = self.yellow(&format!("warning: {message}"));
                match step {
                    Some(s) => self.prefixed(s, &t),
                    None => self.line(&t),
                }
            }
            RunEvent::StageFinished {
                stage,
                result,
                duration,
            } => {
                let own = self.stage_steps.get(stage).cloned().unwrap_or_default();
                for key in &own {
                    self.stop_spinner(key);
                }
                self.summary(stage, *result, *duration);
            }
        }
    }
}
