//! The executor: walks a stage's step tree and makes it happen.
//!
//! It owns ordering (sequence, parallel blocks, step groups, `when`), the Background
//! lifecycle (start, readiness, early death, stop at stage end), timeouts, failure
//! strategies, output variables and cancellation. It starts processes only through a
//! [`Launcher`] and reports only through [`RunEvent`]s, so it can be driven with host
//! processes in tests and with containers in real runs alike.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{join_all, BoxFuture};
use futures::{stream, FutureExt, StreamExt};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::events::{EventSink, ExitInfo, RunEvent, StageResult, StepResult, Stream, TestCounts};
use super::ports::{exposed_ports, PodPorts};
use crate::junit;
use crate::launch::{LaunchError, LaunchSpec, Launcher, Process, ProcessGroup, StepChild};
use crate::net::StageNetwork;
use crate::pipeline::{Shell, StageStatus};
use crate::plan::{
    Action, CondPlan, ErrorKind, Node, Outputs, PipelineOutputs, Plan, ProcessTemplate, Secrets,
    StagePlan, StepPlan, StepType,
};
use crate::sandbox::in_root::{LastLink, ReadError, RootDir};

/// How many of a step's last output lines are kept for failure reports.
const TAIL_LINES: usize = 20;

/// The largest output variable: it becomes an environment variable of later steps,
/// and Linux refuses a single `NAME=value` string longer than 128 KiB
/// (`MAX_ARG_STRLEN`) at execve.
const MAX_OUTPUT_BYTES: u64 = 128 << 10;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Time between SIGTERM and SIGKILL when stopping a step.
    pub grace: Duration,
    /// How long a Background step's ports may take to open.
    pub ready_timeout: Duration,
    pub skip_unsupported: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            grace: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(60),
            skip_unsupported: false,
        }
    }
}

/// Everything a stage run needs from the outside.
pub struct StageContext<'a> {
    pub plan: &'a Plan,
    pub stage: &'a StagePlan,
    /// Runs steps that have no image.
    pub host: &'a dyn Launcher,
    /// Runs steps that have an image; `None` when containers are unavailable.
    pub containers: Option<&'a dyn Launcher>,
    /// Images of the container steps, by the reference the plan uses.
    pub images: &'a crate::run::images::Images,
    /// The stage network; `None` only when the executor is driven without namespaces.
    pub network: Option<&'a StageNetwork>,
    /// Step key -> the socket its `accept` calls are answered through
    /// ([`crate::net::ProxyServer::accept_listeners`]).
    pub accept_listeners: HashMap<String, PathBuf>,
    /// A private directory for this run's control files; removed by the caller.
    pub state_dir: &'a Path,
    pub options: &'a RunOptions,
    pub events: EventSink,
    /// Cancelled on Ctrl-C / SIGTERM.
    pub cancel: CancellationToken,
    /// Output variables of the run's stages: read (earlier stages) when the stage
    /// starts, and given this stage's own when it ends.
    pub pipeline_outputs: &'a Mutex<PipelineOutputs>,
    /// The stage's `sharedPaths` directories ([`crate::run::pipeline::shared_dirs`]).
    pub shared_paths: Vec<(PathBuf, String)>,
}

/// Run one stage to the end and say how it went. Every process it started is stopped
/// and reaped before this returns.
pub async fn run_stage(ctx: &StageContext<'_>) -> StageResult {
    let started = Instant::now();
    ctx.events.emit(RunEvent::StageStarted {
        stage: ctx.stage.identifier.clone(),
        name: ctx.stage.name.clone(),
        steps: ctx.stage.steps().iter().map(|s| s.key.clone()).collect(),
    });
    for w in &ctx.stage.warnings {
        ctx.events.warn(None, w.clone());
    }
    let pod_ports = PodPorts::for_stage(ctx.stage, ctx.images);
    for w in pod_ports.iter().flat_map(PodPorts::collisions) {
        ctx.events.warn(None, w);
    }
    let earlier = ctx.pipeline_outputs.lock().unwrap().clone();
    let exec = Executor {
        ctx,
        state: Arc::new(StageState {
            pod_ports,
            outputs: Mutex::new(Outputs {
                steps: Default::default(),
                earlier,
            }),
            ..StageState::default()
        }),
        stage_cancel: ctx.cancel.child_token(),
    };
    exec.run_within_stage_timeout().await;
    exec.stop_backgrounds().await;
    exec.stop_leftover_groups().await;
    let own = std::mem::take(&mut exec.state.outputs.lock().unwrap().steps);
    ctx.pipeline_outputs
        .lock()
        .unwrap()
        .insert(ctx.stage.identifier.clone(), own);

    let result = if ctx.cancel.is_cancelled() {
        StageResult::Cancelled
    } else if exec.state.failed.load(Ordering::SeqCst) {
        StageResult::Failed
    } else {
        StageResult::Succeeded
    };
    ctx.events.emit(RunEvent::StageFinished {
        stage: ctx.stage.identifier.clone(),
        result,
        duration: started.elapsed(),
    });
    result
}

#[derive(Default)]
struct StageState {
    failed: AtomicBool,
    outputs: Mutex<Outputs>,
    backgrounds: Mutex<Vec<Background>>,
    /// Process groups of this stage's ended steps (their leaders unreaped, so the
    /// ids are still theirs), killed at its end so that nothing a step left running
    /// survives the stage.
    groups: Mutex<Vec<ProcessGroup>>,
    /// Ports of the services when the stage runs in pod mode.
    pod_ports: Option<PodPorts>,
    /// Set when the stage's own `timeout` stopped it: the steps it stopped then end
    /// as timed out, not cancelled.
    timed_out: AtomicBool,
}

struct Background {
    key: String,
    pid: Option<i32>,
    stop: CancellationToken,
    watcher: JoinHandle<()>,
}

impl StageState {
    /// Keeps an ended step's process group for the stage's end.
    fn keep_group(&self, child: StepChild) {
        if let Some(group) = child.into_group() {
            self.groups.lock().unwrap().push(group);
        }
    }

    /// In pod mode, why a service that just died may have failed to bind its port.
    fn bind_conflict(&self, dead: &str, last_lines: &[String]) -> Option<String> {
        let pods = self.pod_ports.as_ref()?;
        let running: Vec<(String, i32)> = (self.backgrounds.lock().unwrap().iter())
            .filter(|b| b.key != dead)
            .filter_map(|b| Some((b.key.clone(), b.pid?)))
            .collect();
        pods.bind_conflict(dead, last_lines, &crate::net::listening_ports(&running))
    }
}

struct Executor<'a> {
    ctx: &'a StageContext<'a>,
    state: Arc<StageState>,
    /// Cancelled by Ctrl-C (through the parent token), by an Abort action and by the
    /// stage timeout.
    stage_cancel: CancellationToken,
}

/// How one attempt of a process ended.
enum Ending {
    Exited(ExitInfo),
    TimedOut(Option<ExitInfo>),
    Cancelled(Option<ExitInfo>),
    StartFailed(StepError),
}

/// Why a step's process could not be started or followed; kept typed (with its
/// source) until it becomes a step's reason in an event.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("needs image `{image}`, but containers are not available in this run")]
    NoContainers { image: String },
    #[error("cannot write the step's control file {}: {source}", path.display())]
    ControlDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("cannot wait for the step's process: {0}")]
    Wait(#[source] std::io::Error),
}

impl<'a> Executor<'a> {
    /// Runs the stage's steps; past the stage's `timeout`, stops it the way Ctrl-C
    /// does: the steps in flight get SIGTERM, the grace period and SIGKILL, each ends
    /// with its own result (timed out), and the steps not started are skipped.
    async fn run_within_stage_timeout(&self) {
        let body = self.run_nodes(&self.ctx.stage.nodes);
        let Some(limit) = self.ctx.stage.timeout else {
            return body.await;
        };
        let watchdog = async {
            tokio::time::sleep(limit).await;
            self.ctx.events.warn(
                None,
                format!(
                    "stage `{}` ran past its timeout of {}; stopping it",
                    self.ctx.stage.identifier,
                    crate::ui::format_duration(limit)
                ),
            );
            self.state.timed_out.store(true, Ordering::SeqCst);
            self.state.failed.store(true, Ordering::SeqCst);
            self.stage_cancel.cancel();
            // The steps stop on their own now; the body ends the select.
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = body => {}
            () = watchdog => {}
        }
    }

    /// The result of a step stopped by the stage's cancellation: timed out when the
    /// stage's own timeout stopped it, else cancelled (Ctrl-C, an Abort).
    fn stopped_result(&self) -> StepResult {
        match self.ctx.stage.timeout {
            Some(limit)
                if self.state.timed_out.load(Ordering::SeqCst)
                    && !self.ctx.cancel.is_cancelled() =>
            {
                StepResult::TimedOut { limit }
            }
            _ => StepResult::Cancelled,
        }
    }

    /// A sequence's nodes in order. Background steps that follow one another start
    /// together, as Harness starts a service and goes on at once: each waits for its
    /// own ports, and the node after them starts once all of them are ready. (One at a
    /// time, two PostgreSQL services initialised one after the other.)
    async fn run_nodes(&self, nodes: &[Node]) {
        let mut rest = nodes;
        while let Some(first) = rest.first() {
            let services = rest.iter().take_while(|n| is_background(n)).count();
            if services > 1 {
                join_all(rest[..services].iter().map(|n| self.run_node(n))).await;
                rest = &rest[services..];
            } else {
                self.run_node(first).await;
                rest = &rest[1..];
            }
        }
    }

    fn run_node<'b>(&'b self, node: &'b Node) -> BoxFuture<'b, ()> {
        async move {
            match node {
                Node::Step(step) => self.run_step(step).await,
                Node::Parallel { nodes } => {
                    join_all(nodes.iter().map(|n| self.run_node(n))).await;
                }
                Node::Loop(l) => {
                    // Instances start in order, at most `maxConcurrency` at a time.
                    let cap = l.max_concurrency.unwrap_or(l.nodes.len()).max(1);
                    let instances: Vec<BoxFuture<'b, ()>> =
                        l.nodes.iter().map(|n| self.run_node(n)).collect();
                    stream::iter(instances)
                        .buffer_unordered(cap)
                        .collect::<Vec<()>>()
                        .await;
                }
                Node::Group(group) => {
                    match self.blocked_by(group.run_when, group.condition.as_ref()) {
                        None => self.run_nodes(&group.nodes).await,
                        Some(reason) => {
                            for step in node.steps() {
                                self.skip(step, reason.clone());
                            }
                        }
                    }
                }
            }
        }
        .boxed()
    }

    /// Why a step or group with this `when.stageStatus` must not start now.
    fn blocked_by(&self, when: StageStatus, condition: Option<&CondPlan>) -> Option<String> {
        if self.stage_cancel.is_cancelled() {
            return Some(if self.ctx.cancel.is_cancelled() {
                "run cancelled".into()
            } else if self.state.timed_out.load(Ordering::SeqCst) {
                "the stage ran past its timeout".into()
            } else {
                "stage stopped".into()
            });
        }
        let failed = self.state.failed.load(Ordering::SeqCst);
        match (when, failed) {
            (StageStatus::Success, true) => Some("an earlier step failed".into()),
            (StageStatus::Failure, false) => {
                Some("runs only when the stage has failed (when: Failure)".into())
            }
            _ => match condition {
                Some(c) if !c.eval(&self.state.outputs.lock().unwrap()) => {
                    Some(format!("its condition is false: {}", c.display()))
                }
                _ => None,
            },
        }
    }

    fn skip(&self, step: &StepPlan, reason: String) {
        self.ctx.events.emit(RunEvent::StepFinished {
            step: step.key.clone(),
            name: step.name.clone(),
            step_type: step.step_type.clone(),
            result: StepResult::Skipped { reason },
            exit: None,
            duration: Duration::ZERO,
            tests: None,
        });
    }

    async fn run_step(&self, step: &StepPlan) {
        if let Some(why) = &step.unsupported {
            self.skip(step, format!("unsupported here: {why}"));
            return;
        }
        if let Some(reason) = self.blocked_by(step.run_when, step.condition.as_ref()) {
            self.skip(step, reason);
            return;
        }
        match step.step_type {
            StepType::Background => self.start_background(step).await,
            // Unsupported types (`Other`) were skipped above.
            StepType::Run | StepType::Plugin | StepType::Other(_) => self.run_to_end(step).await,
        }
    }

    fn launcher_for(&self, step: &StepPlan) -> Result<&'a dyn Launcher, StepError> {
        match (&step.image, self.ctx.containers) {
            (None, _) => Ok(self.ctx.host),
            (Some(_), Some(c)) => Ok(c),
            (Some(img), None) => Err(StepError::NoContainers {
                image: img.reference.clone(),
            }),
        }
    }

    fn control_dir(&self, step: &StepPlan) -> PathBuf {
        self.ctx.state_dir.join("steps").join(&step.key)
    }

    /// Substitute step outputs and build the process the launcher will start.
    fn resolve(
        &self,
        step: &StepPlan,
        launcher: &dyn Launcher,
        control: &Path,
    ) -> (Process, Vec<(String, String)>) {
        let outputs = self.state.outputs.lock().unwrap().clone();
        let mut missing = Vec::new();
        let own: Vec<(String, String)> = step
            .env
            .iter()
            .map(|(k, t)| (k.clone(), t.render(&outputs, &mut missing)))
            .collect();
        let workspace = launcher.workspace_in_step(&self.ctx.plan.workspace);
        let stage_builtins = [
            (
                "HARNESS_STAGE_ID".to_string(),
                self.ctx.stage.identifier.clone(),
            ),
            (
                "HARNESS_WORKSPACE".to_string(),
                workspace.display().to_string(),
            ),
        ];
        // Harness's built-in variables first; the step's own of the same name win.
        let mut env: Vec<(String, String)> = self
            .ctx
            .plan
            .builtin_env
            .iter()
            .cloned()
            .chain(stage_builtins)
            .filter(|(k, _)| !own.iter().any(|(name, _)| name == k))
            .collect();
        env.extend(own);
        let process = match &step.process {
            ProcessTemplate::Shell { shell, script } => {
                let mut script = script.render(&outputs, &mut missing);
                if !step.output_variables.is_empty() {
                    let dir = launcher.control_dir_in_step(control).join("outputs");
                    script.push_str(&output_trailer(*shell, &step.output_variables, &dir));
                }
                Process::Shell {
                    shell: *shell,
                    script,
                }
            }
            ProcessTemplate::Exec { argv } => Process::Exec {
                argv: argv
                    .iter()
                    .map(|t| t.render(&outputs, &mut missing))
                    .collect(),
            },
            ProcessTemplate::ImageDefault => Process::ImageDefault,
        };
        for m in missing {
            self.ctx.events.warn(
                Some(&step.key),
                format!("output variable `{m}` was not set by its step; using an empty value"),
            );
        }
        (process, env)
    }

    /// Start one process for `step` and pump its output into events. Returns the child
    /// and the tasks reading its output (done once the process closes its pipes).
    fn spawn(&self, step: &StepPlan, attempt: u32) -> Result<Running, StepError> {
        let launcher = self.launcher_for(step)?;
        let control = self.control_dir(step);
        let _ = std::fs::remove_dir_all(&control);
        std::fs::create_dir_all(control.join("outputs")).map_err(|source| {
            StepError::ControlDir {
                path: control.clone(),
                source,
            }
        })?;
        let (process, env) = self.resolve(step, launcher, &control);
        let process = spill_long_script(process, &control, launcher)?;
        let spec = LaunchSpec {
            step,
            process,
            env,
            workspace: &self.ctx.plan.workspace,
            control_dir: &control,
            network: self.ctx.network,
            accept_listener: self
                .ctx
                .accept_listeners
                .get(&step.key)
                .map(PathBuf::as_path),
            shared_paths: &self.ctx.shared_paths,
        };
        self.ctx.events.emit(RunEvent::StepStarted {
            step: step.key.clone(),
            name: step.name.clone(),
            step_type: step.step_type.clone(),
            attempt,
        });
        let mut child = launcher.launch(&spec)?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(self.pump(step, Stream::Stdout, out, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(self.pump(step, Stream::Stderr, err, tail.clone()));
        }
        Ok(Running { child, pumps, tail })
    }

    fn pump(
        &self,
        step: &StepPlan,
        stream: Stream,
        reader: impl AsyncRead + Unpin + Send + 'static,
        tail: Arc<Mutex<VecDeque<String>>>,
    ) -> JoinHandle<()> {
        let events = self.ctx.events.clone();
        let secrets = self.ctx.plan.secrets.clone();
        let key = step.key.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = mask_line(&secrets, &buf);
                {
                    let mut t = tail.lock().unwrap();
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                events.emit(RunEvent::Output {
                    step: key.clone(),
                    stream,
                    line,
                });
            }
        })
    }

    /// A Run or Plugin step: attempts, failure strategy, outputs, reports.
    async fn run_to_end(&self, step: &StepPlan) {
        let started = Instant::now();
        let mut attempt = 1;
        let mut retries_used = 0;
        let (result, exit) = loop {
            let ending = self.attempt(step, attempt).await;
            let (kind, reason, exit) = match ending {
                Ending::Exited(exit) if exit.success() => {
                    break (StepResult::Succeeded, Some(exit))
                }
                Ending::Exited(exit) => (ErrorKind::Failure, exit.describe(), Some(exit)),
                Ending::TimedOut(exit) => (
                    ErrorKind::Timeout,
                    format!(
                        "timed out after {}",
                        crate::ui::format_duration(step.timeout.unwrap_or_default())
                    ),
                    exit,
                ),
                Ending::Cancelled(exit) => break (self.stopped_result(), exit),
                Ending::StartFailed(e) => (ErrorKind::Failure, e.to_string(), None),
            };
            let failed = if kind == ErrorKind::Timeout {
                StepResult::TimedOut {
                    limit: step.timeout.unwrap_or_default(),
                }
            } else {
                StepResult::Failed {
                    reason: reason.clone(),
                }
            };
            let mut action = step.on_failure.action_for(kind).cloned();
            if let Some(Action::Retry {
                count,
                intervals,
                then,
            }) = &action
            {
                if retries_used < *count {
                    let wait = intervals
                        .get(retries_used as usize)
                        .or(intervals.last())
                        .copied()
                        .unwrap_or(Duration::ZERO);
                    retries_used += 1;
                    attempt += 1;
                    self.ctx.events.emit(RunEvent::Retrying {
                        step: step.key.clone(),
                        attempt,
                        after: wait,
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = self.stage_cancel.cancelled() => break (self.stopped_result(), exit),
                    }
                }
                action = Some((**then).clone());
            }
            break match action {
                Some(Action::Ignore) | Some(Action::MarkAsSuccess) => {
                    (StepResult::FailureIgnored { reason }, exit)
                }
                Some(Action::Abort) => {
                    self.state.failed.store(true, Ordering::SeqCst);
                    self.ctx.events.warn(
                        Some(&step.key),
                        "failure strategy Abort: stopping the stage",
                    );
                    self.stage_cancel.cancel();
                    (failed, exit)
                }
                _ => {
                    self.state.failed.store(true, Ordering::SeqCst);
                    (failed, exit)
                }
            };
        };
        if matches!(result, StepResult::Cancelled | StepResult::TimedOut { .. }) {
            self.state.failed.store(true, Ordering::SeqCst);
        }
        if matches!(result, StepResult::Succeeded) {
            self.collect_outputs(step);
        }
        let tests = collect_reports(
            &self.ctx.plan.workspace,
            &self.workspace_in_step(step),
            &step.reports,
            &step.key,
            &self.ctx.events,
        );
        self.ctx.events.emit(RunEvent::StepFinished {
            step: step.key.clone(),
            name: step.name.clone(),
            step_type: step.step_type.clone(),
            result,
            exit,
            duration: started.elapsed(),
            tests,
        });
    }

    async fn attempt(&self, step: &StepPlan, attempt: u32) -> Ending {
        let mut running = match self.spawn(step, attempt) {
            Ok(r) => r,
            Err(e) => {
                self.ctx.events.warn(Some(&step.key), e.to_string());
                return Ending::StartFailed(e);
            }
        };
        let deadline = step.timeout.map(|t| tokio::time::Instant::now() + t);
        let ending = tokio::select! {
            status = running.child.wait() => match status {
                Ok(s) => Ending::Exited(ExitInfo::from_status(s)),
                Err(e) => Ending::StartFailed(StepError::Wait(e)),
            },
            _ = sleep_until(deadline) => {
                Ending::TimedOut(stop_process(&mut running.child, self.ctx.options.grace).await)
            }
            _ = self.stage_cancel.cancelled() => {
                Ending::Cancelled(stop_process(&mut running.child, self.ctx.options.grace).await)
            }
        };
        if matches!(ending, Ending::Exited(_)) && running.child.lingers() {
            // Its output is what is already in the pipes: a daemon holding them open
            // must not hold the step.
            drain_within(std::mem::take(&mut running.pumps), LINGER_DRAIN).await;
            self.ctx.events.warn(
                Some(&step.key),
                "left processes running; they keep running until the stage ends and are then stopped like Background steps".to_string(),
            );
        } else {
            running.drain().await;
        }
        self.state.keep_group(running.child);
        match &ending {
            Ending::Exited(exit) | Ending::TimedOut(Some(exit)) | Ending::Cancelled(Some(exit)) => {
                self.ctx.events.emit(RunEvent::StepExited {
                    step: step.key.clone(),
                    exit: *exit,
                });
            }
            _ => {}
        }
        ending
    }

    /// Where the step sees the stage workspace.
    fn workspace_in_step(&self, step: &StepPlan) -> PathBuf {
        let workspace = &self.ctx.plan.workspace;
        match self.launcher_for(step) {
            Ok(launcher) => launcher.workspace_in_step(workspace),
            Err(_) => workspace.clone(),
        }
    }

    /// Reads the output variables the step's trailer recorded, inside its control
    /// directory as the step sees it: a file the step replaced with a symlink (to
    /// `/etc/shadow`, say) is refused, never followed on the host.
    fn collect_outputs(&self, step: &StepPlan) {
        if step.output_variables.is_empty() {
            return;
        }
        let control = self.control_dir(step);
        let root = match RootDir::open(&control) {
            Ok(root) => root,
            Err(e) => {
                let msg = format!("output variables not read: {}: {e}", control.display());
                return self.ctx.events.warn(Some(&step.key), msg);
            }
        };
        let mut values = std::collections::BTreeMap::new();
        for name in &step.output_variables {
            let path = Path::new("outputs").join(name);
            match root.read(&path, MAX_OUTPUT_BYTES, LastLink::Refuse) {
                Ok(bytes) => {
                    values.insert(name.clone(), String::from_utf8_lossy(&bytes).into_owned());
                }
                Err(ReadError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    self.ctx.events.warn(
                        Some(&step.key),
                        format!("output variable `{name}` was not recorded"),
                    )
                }
                Err(e) => self.ctx.events.warn(
                    Some(&step.key),
                    format!("output variable `{name}` was not read: {e}"),
                ),
            }
        }
        self.state
            .outputs
            .lock()
            .unwrap()
            .steps
            .insert(step.key.clone(), values);
    }

    /// Start a Background step, wait for its ports (if it declares any), and leave a
    /// watcher that reports an early death and stops it at the end of the stage.
    async fn start_background(&self, step: &StepPlan) {
        let started = Instant::now();
        let running = match self.spawn(step, 1) {
            Ok(r) => r,
            Err(e) => {
                self.state.failed.store(true, Ordering::SeqCst);
                self.ctx.events.emit(RunEvent::StepFinished {
                    step: step.key.clone(),
                    name: step.name.clone(),
                    step_type: step.step_type.clone(),
                    result: StepResult::Failed {
                        reason: e.to_string(),
                    },
                    exit: None,
                    duration: started.elapsed(),
                    tests: None,
                });
                return;
            }
        };
        let Running {
            mut child,
            pumps,
            tail,
            ..
        } = running;
        let pid = child.id().map(|p| p as i32);
        let stop = self.stage_cancel.child_token();
        let exited = CancellationToken::new();
        let watcher = {
            let events = self.ctx.events.clone();
            let state = self.state.clone();
            let stop = stop.clone();
            let exited = exited.clone();
            let grace = self.ctx.options.grace;
            let timeout = step.timeout;
            let (key, name) = (step.key.clone(), step.name.clone());
            // Collected when the service ends: the watcher outlives this borrow.
            let (workspace, workspace_in_step, patterns) = (
                self.ctx.plan.workspace.clone(),
                self.workspace_in_step(step),
                step.reports.clone(),
            );
            tokio::spawn(async move {
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                let (result, exit) = tokio::select! {
                    status = child.wait() => {
                        let exit = status.ok().map(ExitInfo::from_status);
                        if child.lingers() && exit.is_some_and(|e| e.success()) {
                            // A service that daemonized (`redis-server --daemonize yes`,
                            // `dockerd &`): its command ended well and what it started
                            // serves on until the stage ends, as on a build machine.
                            drain_within(pumps, LINGER_DRAIN).await;
                            events.warn(
                                Some(&key),
                                "its command ended, leaving processes running: they serve until the stage ends".to_string(),
                            );
                            stop.cancelled().await;
                            (StepResult::Stopped, exit)
                        } else {
                            exited.cancel();
                            drain(pumps).await;
                            let exit = exit.unwrap_or(ExitInfo { code: -1, signal: None });
                            let last_lines: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
                            events.emit(RunEvent::StepExited { step: key.clone(), exit });
                            let conflict = state.bind_conflict(&key, &last_lines);
                            events.emit(RunEvent::BackgroundDied { step: key.clone(), exit, last_lines });
                            if let Some(note) = conflict {
                                events.warn(Some(&key), note);
                            }
                            if exit.success() {
                                (StepResult::Succeeded, Some(exit))
                            } else {
                                state.failed.store(true, Ordering::SeqCst);
                                (StepResult::Failed {
                                    reason: format!("service ended while the stage was running ({})", exit.describe()),
                                }, Some(exit))
                            }
                        }
                    }
                    _ = sleep_until(deadline) => {
                        let exit = stop_process(&mut child, grace).await;
                        exited.cancel();
                        drain(pumps).await;
                        state.failed.store(true, Ordering::SeqCst);
                        (StepResult::TimedOut { limit: timeout.unwrap_or_default() }, exit)
                    }
                    _ = stop.cancelled() => {
                        let exit = stop_process(&mut child, grace).await;
                        exited.cancel();
                        drain(pumps).await;
                        (StepResult::Stopped, exit)
                    }
                };
                state.keep_group(child);
                let tests =
                    collect_reports(&workspace, &workspace_in_step, &patterns, &key, &events);
                events.emit(RunEvent::StepFinished {
                    step: key,
                    name,
                    step_type: StepType::Background,
                    result,
                    exit,
                    duration: started.elapsed(),
                    tests,
                });
            })
        };
        self.state.backgrounds.lock().unwrap().push(Background {
            key: step.key.clone(),
            pid,
            stop,
            watcher,
        });
        self.wait_ready(step, started, &exited).await;
    }

    /// One connection attempt to `port` of a running step.
    async fn probe(&self, step: &StepPlan, port: u16) -> bool {
        let attempt = async {
            match self.ctx.network {
                Some(net) => net.connect(&step.key, port).await.is_ok(),
                None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok(),
            }
        };
        tokio::time::timeout(Duration::from_millis(500), attempt)
            .await
            .unwrap_or(false)
    }

    async fn wait_ready(&self, step: &StepPlan, started: Instant, exited: &CancellationToken) {
        let ports = ready_ports(step, self.ctx.images);
        let limit = self.ctx.options.ready_timeout;
        let mut pending = ports.clone();
        while !pending.is_empty() {
            if exited.is_cancelled() || self.stage_cancel.is_cancelled() {
                return;
            }
            if started.elapsed() >= limit {
                self.ctx.events.emit(RunEvent::ReadyTimeout {
                    step: step.key.clone(),
                    ports: pending,
                    waited: started.elapsed(),
                });
                return;
            }
            let mut still = Vec::new();
            for port in pending {
                if !self.probe(step, port).await {
                    still.push(port);
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                    _ = exited.cancelled() => return,
                    _ = self.stage_cancel.cancelled() => return,
                }
            }
        }
        self.ctx.events.emit(RunEvent::StepReady {
            step: step.key.clone(),
            waited: started.elapsed(),
        });
    }

    async fn stop_backgrounds(&self) {
        let all: Vec<Background> = std::mem::take(&mut *self.state.backgrounds.lock().unwrap());
        for b in &all {
            b.stop.cancel();
        }
        for b in all {
            let _ = b.watcher.await;
        }
    }

    /// Stops what ended steps left running: a host step's daemons get SIGTERM and the
    /// grace period, as services do; everything else is SIGKILLed.
    async fn stop_leftover_groups(&self) {
        let groups: Vec<ProcessGroup> = self.state.groups.lock().unwrap().drain(..).collect();
        let grace = self.ctx.options.grace;
        join_all(
            groups
                .into_iter()
                .map(|g| g.stop(grace, hurry_token().cancelled())),
        )
        .await;
    }
}

/// Parse the JUnit files a step's `reports` globs match, announce each (or why it was
/// ignored), and total their counts; `None` when the step declares no reports.
/// `workspace_in_step`: where the step sees the workspace (absolute report paths are
/// read only below it). Files are read inside the workspace, as the step would see
/// them ([`junit::find_reports`]).
fn collect_reports(
    workspace: &Path,
    workspace_in_step: &Path,
    patterns: &[String],
    key: &str,
    events: &EventSink,
) -> Option<TestCounts> {
    if patterns.is_empty() {
        return None;
    }
    let mut total = TestCounts::default();
    let refused = |path: PathBuf, message: String| {
        events.emit(RunEvent::ReportError {
            step: key.to_string(),
            path,
            message,
        })
    };
    let root = match RootDir::open(workspace) {
        Ok(root) => root,
        Err(e) => {
            refused(
                workspace.to_path_buf(),
                format!("cannot open the workspace: {e}"),
            );
            return Some(total);
        }
    };
    let found = junit::find_reports(&root, workspace_in_step, patterns);
    for (pattern, reason) in found.refused {
        refused(pattern.into(), reason);
    }
    for relative in found.files {
        let path = workspace.join(&relative);
        match junit::read_report(&root, &relative) {
            Ok(report) => {
                let counts = report.counts();
                total.add(&counts);
                events.emit(RunEvent::Report {
                    step: key.to_string(),
                    path,
                    counts,
                    report: Arc::new(report),
                });
            }
            Err(e) => refused(path, e.to_string()),
        }
    }
    Some(total)
}

fn is_background(node: &Node) -> bool {
    matches!(node, Node::Step(step) if step.step_type == StepType::Background)
}

/// The ports a Background step must open before later steps start: its
/// `portBindings`, or else the TCP ports its image declares (`ExposedPorts`).
fn ready_ports(step: &StepPlan, images: &crate::run::images::Images) -> Vec<u16> {
    let mut ports: Vec<u16> = step.port_bindings.iter().map(|(_, c)| *c).collect();
    if ports.is_empty() {
        ports = exposed_ports(step, images);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

struct Running {
    child: StepChild,
    pumps: Vec<JoinHandle<()>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Running {
    async fn drain(&mut self) {
        drain(std::mem::take(&mut self.pumps)).await;
    }
}

/// Wait for the output readers, but not forever: a grandchild that inherited the pipe
/// and outlives the step must not hold the stage hostage.
async fn drain(pumps: Vec<JoinHandle<()>>) {
    drain_within(pumps, Duration::from_secs(2)).await
}

/// How long a step that left a daemon running is read after it ended.
const LINGER_DRAIN: Duration = Duration::from_millis(100);

async fn drain_within(pumps: Vec<JoinHandle<()>>, limit: Duration) {
    let _ = tokio::time::timeout(limit, join_all(pumps)).await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM the child's process group, wait `grace`, then SIGKILL it. Returns how the
/// child ended, when it could be reaped.
pub async fn stop_process(child: &mut StepChild, grace: Duration) -> Option<ExitInfo> {
    child.signal_group(Signal::SIGTERM);
    let hurry = hurry_token();
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        _ = tokio::time::sleep(grace) => None,
        _ = hurry.cancelled() => None,
    };
    let status = match status {
        Some(s) => Some(s),
        None => {
            child.signal_group(Signal::SIGKILL);
            child.wait().await.ok()
        }
    };
    status.map(ExitInfo::from_status)
}

fn hurry_token() -> &'static CancellationToken {
    static HURRY: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();
    HURRY.get_or_init(CancellationToken::new)
}

/// From now on, stopping a step skips the grace period (a second Ctrl-C).
pub fn hurry() {
    hurry_token().cancel();
}

fn mask_line(secrets: &Secrets, bytes: &[u8]) -> String {
    let line = String::from_utf8_lossy(bytes);
    if secrets.is_empty() {
        line.into_owned()
    } else {
        secrets.mask(&line)
    }
}

/// Script text appended to a Run step's command that records its output variables
/// (one file per variable, so values may hold any byte) when the script reaches its end.
/// Scripts longer than this run from a file in the step's control directory: the
/// kernel refuses (E2BIG) any single argument over 128 KiB and an argv and environment
/// over its ARG_MAX together, and `sh -c SCRIPT` passes the script as one argument.
const MAX_INLINE_SCRIPT: usize = 64 << 10;

fn spill_long_script(
    process: Process,
    control: &Path,
    launcher: &dyn Launcher,
) -> Result<Process, StepError> {
    match process {
        Process::Shell { shell, script } if script.len() > MAX_INLINE_SCRIPT => {
            let dir = launcher.control_dir_in_step(control);
            let (name, text, argv) = shell.script_file(&script, &dir.to_string_lossy());
            let host = control.join(name);
            std::fs::write(&host, text).map_err(|source| StepError::ControlDir {
                path: host.clone(),
                source,
            })?;
            Ok(Process::Exec { argv })
        }
        p => Ok(p),
    }
}

pub(crate) fn output_trailer(shell: Shell, names: &[String], dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    let mut s = String::from("\n");
    match shell {
        Shell::Sh | Shell::Bash => {
            for n in names {
                s.push_str(&format!(
                    "printf '%s' \"${{{n}-}}\" > {}\n",
                    sh_quote(&format!("{dir}/{n}"))
                ));
            }
        }
        Shell::Python => {
            let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            s.push_str(&format!(
                "import os as _sandrun_os\nfor _sandrun_n in [{}]:\n    \
                 open(_sandrun_os.path.join({:?}, _sandrun_n), 'w').write(str(globals().get(_sandrun_n, _sandrun_os.environ.get(_sandrun_n, ''))))\n",
                list.join(", "),
                dir
            ));
        }
        Shell::Powershell | Shell::Pwsh => {
            for n in names {
                s.push_str(&format!(
                    "$_sandrun_v = if (Test-Path variable:{n}) {{ ${n} }} else {{ $env:{n} }}; \
                     Set-Content -NoNewline -Path '{}' -Value \"$_sandrun_v\"\n",
                    format!("{dir}/{n}").replace('\'', "''")
                ));
            }
        }
    }
    s
}

pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod scripted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_trailer_quotes_paths_and_reads_unset_as_empty() {
        let t = output_trailer(Shell::Sh, &["A".into()], Path::new("/tmp/it's"));
        assert_eq!(t, "\nprintf '%s' \"${A-}\" > '/tmp/it'\\''s/A'\n");
    }

    #[test]
    fn python_trailer_lists_names() {
        let t = output_trailer(Shell::Python, &["X".into(), "Y".into()], Path::new("/o"));
        assert!(t.contains("[\"X\", \"Y\"]"), "{t}");
        assert!(t.contains("\"/o\""), "{t}");
    }
}
