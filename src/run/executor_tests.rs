//! The executor driven in-process, without root or real processes: a scripted
//! launcher whose steps end, fail or ignore SIGTERM at given (virtual) times, with
//! tokio's clock paused so that retries, timeouts and grace periods run instantly and
//! exactly.

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::launch::{LaunchError, LaunchSpec, Launcher, ProcessGroup, StepChild, StepProcess};
use crate::run::events::{EventSink, RunEvent, StageResult, StepResult};

/// What a scripted step does.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Exits with `code` after `after`.
    Exit { after: Duration, code: i32 },
    /// Runs until signalled: SIGTERM ends it with `Some(code)` (a trap), or is ignored.
    UntilSignalled { on_term: Option<i32> },
    /// Cannot be started.
    Refused,
}

/// What happened, when (virtual time since the test began).
type Log = Arc<Mutex<Vec<(Duration, String)>>>;

struct ScriptedLauncher {
    /// Scripts of each step's attempts, in order; a step without one exits 0 at once.
    scripts: Mutex<HashMap<String, VecDeque<Script>>>,
    log: Log,
    began: Instant,
    /// Loopback ports to start listening on when a step starts (its key -> port), and
    /// the listeners, kept open: what makes a Background step's port ready.
    opens: Mutex<HashMap<String, u16>>,
    listeners: Mutex<Vec<std::net::TcpListener>>,
}

impl ScriptedLauncher {
    fn new(scripts: &[(&str, &[Script])]) -> ScriptedLauncher {
        ScriptedLauncher {
            scripts: Mutex::new(
                (scripts.iter())
                    .map(|(k, s)| (k.to_string(), s.iter().copied().collect()))
                    .collect(),
            ),
            log: Log::default(),
            began: Instant::now(),
            opens: Mutex::default(),
            listeners: Mutex::default(),
        }
    }

    fn log(&self) -> Vec<(Duration, String)> {
        self.log.lock().unwrap().clone()
    }
}

fn note(log: &Log, began: Instant, what: String) {
    log.lock().unwrap().push((began.elapsed(), what));
}

impl Launcher for ScriptedLauncher {
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<StepChild, LaunchError> {
        let key = spec.step.key.clone();
        let script = (self.scripts.lock().unwrap().get_mut(&key))
            .and_then(VecDeque::pop_front)
            .unwrap_or(Script::Exit {
                after: Duration::ZERO,
                code: 0,
            });
        if let Script::Refused = script {
            return Err(LaunchError::Spawn {
                step: key,
                program: "scripted".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        note(&self.log, self.began, format!("start {key}"));
        if let Some(port) = self.opens.lock().unwrap().get(&key) {
            let listener = std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
            self.listeners.lock().unwrap().push(listener);
        }
        let out = format!("hello from {key}\n").into_bytes();
        let process = ScriptedProcess {
            key,
            script,
            ends: Instant::now(),
            status: Mutex::new(None),
            signalled: Notify::new(),
            log: self.log.clone(),
            began: self.began,
        };
        Ok(StepChild::new(
            Box::new(std::io::Cursor::new(out)),
            Box::new(tokio::io::empty()),
            Box::new(process),
        ))
    }

    fn control_dir_in_step(&self, host_path: &std::path::Path) -> PathBuf {
        host_path.to_path_buf()
    }

    fn workspace_in_step(&self, host_path: &std::path::Path) -> PathBuf {
        host_path.to_path_buf()
    }
}

struct ScriptedProcess {
    key: String,
    script: Script,
    /// When it started (an `Exit` ends `after` that).
    ends: Instant,
    status: Mutex<Option<ExitStatus>>,
    signalled: Notify,
    log: Log,
    began: Instant,
}

impl StepProcess for ScriptedProcess {
    fn id(&self) -> Option<u32> {
        None
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<ExitStatus>> {
        Box::pin(async move {
            loop {
                if let Some(status) = *self.status.lock().unwrap() {
                    return Ok(status);
                }
                let exit = async {
                    match self.script {
                        Script::Exit { after, code } => {
                            tokio::time::sleep_until(self.ends + after).await;
                            code
                        }
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    code = exit => {
                        *self.status.lock().unwrap() = Some(ExitStatus::from_raw(code << 8));
                    }
                    () = self.signalled.notified() => {}
                }
            }
        })
    }

    fn signal_group(&self, signal: Signal) {
        let mut status = self.status.lock().unwrap();
        if status.is_some() {
            return;
        }
        note(
            &self.log,
            self.began,
            format!("{} {}", signal.as_str(), self.key),
        );
        *status = match (signal, self.script) {
            (Signal::SIGKILL, _) => Some(ExitStatus::from_raw(libc::SIGKILL)),
            (
                Signal::SIGTERM,
                Script::UntilSignalled {
                    on_term: Some(code),
                },
            ) => Some(ExitStatus::from_raw(code << 8)),
            (Signal::SIGTERM, Script::Exit { .. }) => Some(ExitStatus::from_raw(libc::SIGTERM)),
            _ => None,
        };
        self.signalled.notify_one();
    }

    fn into_group(self: Box<Self>) -> Option<ProcessGroup> {
        None
    }
}

/// Runs the only stage of `yaml` (a `stage:` document) with `launcher` for its steps;
/// returns its result and every event.
async fn run(yaml: &str, launcher: &ScriptedLauncher) -> (StageResult, Vec<RunEvent>) {
    let dir = tempfile::tempdir().unwrap();
    let file = crate::pipeline::parse_str(&dir.path().join("ci.yaml"), yaml).unwrap();
    let inputs = crate::plan::PlanInputs {
        workspace: dir.path().to_path_buf(),
        ..Default::default()
    };
    let plan = crate::plan::build(&file, &inputs).unwrap();
    let (events, mut rx) = EventSink::channel();
    let options = RunOptions {
        grace: Duration::from_secs(10),
        ready_timeout: Duration::from_secs(60),
        skip_unsupported: false,
    };
    let images = Default::default();
    let pipeline_outputs = Default::default();
    let ctx = StageContext {
        plan: &plan,
        stage: &plan.stages[0],
        host: launcher,
        containers: None,
        images: &images,
        network: None,
        accept_listeners: HashMap::new(),
        shared_paths: Vec::new(),
        state_dir: dir.path(),
        options: &options,
        events,
        cancel: CancellationToken::new(),
        pipeline_outputs: &pipeline_outputs,
    };
    let result = run_stage(&ctx).await;
    drop(ctx);
    let mut all = Vec::new();
    while let Some(e) = rx.recv().await {
        all.push(e);
    }
    (result, all)
}

fn stage(extra: &str, steps: &str) -> String {
    let steps: String = steps.lines().map(|l| format!("        {l}\n")).collect();
    format!(
        "stage:\n  name: s\n  identifier: s\n  type: CI\n{extra}  spec:\n    execution:\n      steps:\n{steps}"
    )
}

fn run_step(id: &str, extra: &str) -> String {
    format!("- step:\n    type: Run\n    name: {id}\n    identifier: {id}\n{extra}    spec:\n      command: run {id}\n")
}

/// The final result of `step`.
fn result_of(events: &[RunEvent], step: &str) -> StepResult {
    events
        .iter()
        .find_map(|e| match e {
            RunEvent::StepFinished {
                step: s, result, ..
            } if s == step => Some(result.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no result for `{step}`: {events:#?}"))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn at(t: u64, what: &str) -> (Duration, String) {
    (secs(t), what.to_string())
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_retried_after_its_interval() {
    let fail = Script::Exit {
        after: secs(1),
        code: 1,
    };
    let ok = Script::Exit {
        after: secs(1),
        code: 0,
    };
    let launcher = ScriptedLauncher::new(&[("flaky", &[fail, fail, ok])]);
    let strategy = "    failureStrategies:\n      - onFailure:\n          errors: [AllErrors]\n          action:\n            type: Retry\n            spec:\n              retryCount: 3\n              retryIntervals: [10s]\n              onRetryFailure:\n                action:\n                  type: MarkAsFailure\n";
    let (result, events) = run(&stage("", &run_step("flaky", strategy)), &launcher).await;
    assert_eq!(result, StageResult::Succeeded);
    assert_eq!(result_of(&events, "flaky"), StepResult::Succeeded);
    // 1 s per attempt, 10 s between them.
    assert_eq!(
        launcher.log(),
        [
            at(0, "start flaky"),
            at(11, "start flaky"),
            at(22, "start flaky")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn abort_stops_the_steps_in_flight_and_skips_the_rest() {
    let launcher = ScriptedLauncher::new(&[
        (
            "fatal",
            &[Script::Exit {
                after: secs(2),
                code: 9,
            }],
        ),
        ("busy", &[Script::UntilSignalled { on_term: Some(143) }]),
    ]);
    let abort = "    failureStrategies:\n      - onFailure:\n          errors: [AllErrors]\n          action:\n            type: Abort\n";
    let steps = format!(
        "- parallel:\n{}{}{}",
        indent(&run_step("fatal", abort)),
        indent(&run_step("busy", "")),
        run_step("next", "")
    );
    let (result, events) = run(&stage("", &steps), &launcher).await;
    assert_eq!(result, StageResult::Failed);
    assert!(matches!(
        result_of(&events, "fatal"),
        StepResult::Failed { .. }
    ));
    assert_eq!(result_of(&events, "busy"), StepResult::Cancelled);
    assert!(matches!(
        result_of(&events, "next"),
        StepResult::Skipped { .. }
    ));
    assert_eq!(
        launcher.log(),
        [
            at(0, "start fatal"),
            at(0, "start busy"),
            at(2, "SIGTERM busy")
        ]
    );
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[tokio::test(start_paused = true)]
async fn when_decides_from_the_stage_status() {
    let launcher = ScriptedLauncher::new(&[(
        "broken",
        &[Script::Exit {
            after: secs(1),
            code: 2,
        }],
    )]);
    let steps = [
        run_step("broken", ""),
        run_step("on_success", ""),
        run_step("on_failure", "    when:\n      stageStatus: Failure\n"),
        run_step("always", "    when:\n      stageStatus: All\n"),
    ]
    .concat();
    let (result, events) = run(&stage("", &steps), &launcher).await;
    assert_eq!(result, StageResult::Failed);
    assert!(matches!(
        result_of(&events, "on_success"),
        StepResult::Skipped { .. }
    ));
    assert_eq!(result_of(&events, "on_failure"), StepResult::Succeeded);
    assert_eq!(result_of(&events, "always"), StepResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_step_past_its_timeout_gets_sigterm_then_sigkill_after_the_grace() {
    let launcher = ScriptedLauncher::new(&[("stuck", &[Script::UntilSignalled { on_term: None }])]);
    let (result, events) = run(
        &stage("", &run_step("stuck", "    timeout: 5s\n")),
        &launcher,
    )
    .await;
    assert_eq!(result, StageResult::Failed);
    assert_eq!(
        result_of(&events, "stuck"),
        StepResult::TimedOut { limit: secs(5) }
    );
    assert_eq!(
        launcher.log(),
        [
            at(0, "start stuck"),
            at(5, "SIGTERM stuck"),
            at(15, "SIGKILL stuck")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stage_past_its_timeout_stops_each_step_in_flight_as_timed_out() {
    let launcher = ScriptedLauncher::new(&[
        ("trapping", &[Script::UntilSignalled { on_term: Some(3) }]),
        ("stubborn", &[Script::UntilSignalled { on_term: None }]),
    ]);
    let steps = format!(
        "- parallel:\n{}{}{}",
        indent(&run_step("trapping", "")),
        indent(&run_step("stubborn", "")),
        run_step("after", "")
    );
    let (result, events) = run(&stage("  timeout: 3s\n", &steps), &launcher).await;
    assert_eq!(result, StageResult::Failed);
    for step in ["trapping", "stubborn"] {
        assert_eq!(
            result_of(&events, step),
            StepResult::TimedOut { limit: secs(3) }
        );
    }
    assert!(matches!(
        result_of(&events, "after"),
        StepResult::Skipped { .. }
    ));
    let mut log = launcher.log();
    log.sort();
    assert_eq!(
        log,
        [
            at(0, "start stubborn"),
            at(0, "start trapping"),
            at(3, "SIGTERM stubborn"),
            at(3, "SIGTERM trapping"),
            at(13, "SIGKILL stubborn"),
        ]
    );
    let exits: Vec<i32> = (events.iter())
        .filter_map(|e| match e {
            RunEvent::StepExited { exit, .. } => Some(exit.code),
            _ => None,
        })
        .collect();
    assert!(exits.contains(&3) && exits.contains(&137), "{exits:?}");
}

#[tokio::test(start_paused = true)]
async fn a_background_step_that_crashes_fails_the_stage_and_is_reported() {
    let launcher = ScriptedLauncher::new(&[
        (
            "svc",
            &[Script::Exit {
                after: secs(2),
                code: 1,
            }],
        ),
        (
            "tests",
            &[Script::Exit {
                after: secs(10),
                code: 0,
            }],
        ),
    ]);
    let steps = format!(
        "- step:\n    type: Background\n    name: svc\n    identifier: svc\n    spec:\n      command: serve\n{}",
        run_step("tests", "")
    );
    let (result, events) = run(&stage("", &steps), &launcher).await;
    assert_eq!(result, StageResult::Failed);
    assert!(
        events.iter().any(|e| matches!(
            e,
            RunEvent::BackgroundDied { step, exit, .. } if step == "svc" && exit.code == 1
        )),
        "{events:#?}"
    );
    assert!(matches!(
        result_of(&events, "svc"),
        StepResult::Failed { .. }
    ));
    assert_eq!(result_of(&events, "tests"), StepResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn parallel_steps_run_at_the_same_time() {
    let five = Script::Exit {
        after: secs(5),
        code: 0,
    };
    let launcher = ScriptedLauncher::new(&[("left", &[five]), ("right", &[five])]);
    let steps = format!(
        "- parallel:\n{}{}{}",
        indent(&run_step("left", "")),
        indent(&run_step("right", "")),
        run_step("then", "")
    );
    let (result, _) = run(&stage("", &steps), &launcher).await;
    assert_eq!(result, StageResult::Succeeded);
    assert_eq!(
        launcher.log(),
        [
            at(0, "start left"),
            at(0, "start right"),
            at(5, "start then")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_that_cannot_start_fails_with_the_launch_error_and_its_cause() {
    let launcher = ScriptedLauncher::new(&[("missing", &[Script::Refused])]);
    let (result, events) = run(&stage("", &run_step("missing", "")), &launcher).await;
    assert_eq!(result, StageResult::Failed);
    let StepResult::Failed { reason } = result_of(&events, "missing") else {
        panic!("{events:#?}");
    };
    assert!(
        reason.contains("cannot start `scripted`") && reason.contains("No such file"),
        "{reason}"
    );
    let error = StepError::from(LaunchError::Refused {
        step: "s".into(),
        message: "no".into(),
    });
    assert!(std::error::Error::source(&StepError::Wait(std::io::Error::other("x"))).is_some());
    assert!(error.to_string().contains("no"));
}

#[tokio::test(start_paused = true)]
async fn background_steps_in_a_row_start_together_and_the_next_step_waits_for_all() {
    // db1's port opens only when db2 starts: started one after the other, db1 would
    // never be ready (until the ready timeout) and db2 would wait for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = Script::UntilSignalled { on_term: Some(0) };
    let launcher = ScriptedLauncher::new(&[("db1", &[serve]), ("db2", &[serve])]);
    launcher.opens.lock().unwrap().insert("db2".into(), port);
    let db1 = format!(
        "- step:\n    type: Background\n    name: db1\n    identifier: db1\n    spec:\n      command: serve\n      portBindings:\n        \"{port}\": \"{port}\"\n"
    );
    let db2 = "- step:\n    type: Background\n    name: db2\n    identifier: db2\n    spec:\n      command: serve\n";
    let steps = format!("{db1}{db2}{}", run_step("tests", ""));
    let (result, events) = run(&stage("", &steps), &launcher).await;
    assert_eq!(result, StageResult::Succeeded, "{events:#?}");
    let started: Vec<String> = (launcher.log().into_iter())
        .map(|(_, what)| what)
        .filter(|what| what.starts_with("start"))
        .collect();
    assert_eq!(started, ["start db1", "start db2", "start tests"]);
    let ready = |step: &str| {
        events
            .iter()
            .position(|e| matches!(e, RunEvent::StepReady { step: s, .. } if s == step))
            .unwrap_or_else(|| panic!("`{step}` never ready: {events:#?}"))
    };
    let tests_started = events
        .iter()
        .position(|e| matches!(e, RunEvent::StepStarted { step, .. } if step == "tests"))
        .unwrap();
    assert!(
        ready("db1") < tests_started && ready("db2") < tests_started,
        "{events:#?}"
    );
}
