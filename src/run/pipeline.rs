//! The pipeline's stages, in the order and under the conditions Harness runs them.
//!
//! Harness decides for each stage, when its turn comes, whether it runs: its
//! `when.pipelineStatus` (`Success`, the default: only while no stage has failed;
//! `Failure`: only after one has; `All`: always) and its `when.condition` must both
//! hold. A stage skipped that way is not a failure of the pipeline. The stages of a
//! `parallel` block start together, each on its own network, and one that fails does
//! not stop its siblings. The pipeline fails when any stage that ran failed. The
//! instances of a looped stage form such a block of their own (or join the block the
//! looped stage sits in); with a `maxConcurrency`, at most that many of them run at
//! once, the next starting, in order, as one ends.
//!
//! Output variables of every finished stage are kept by stage identifier
//! ([`PipelineOutputs`]) and handed to each later stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::events::{EventSink, RunEvent, StageResult};
use super::executor::{run_stage, RunOptions, StageContext};
use super::host::HostLauncher;
use super::images::Images;
use crate::launch::Launcher;
use crate::net::{HostPortProxy, NetError, ProxyServer, StageNetwork};
use crate::pipeline::StageStatus;
use crate::plan::{Outputs, PipelineOutputs, Plan, StagePlan};
use crate::sandbox::zygote::Zygote;
use crate::sandbox::ContainerLauncher;

/// Everything the stages of a run share.
pub struct PipelineContext<'a> {
    pub plan: &'a Plan,
    pub options: &'a RunOptions,
    /// Runs steps that have no image.
    pub host: &'a HostLauncher,
    /// Every image of the plan, in the store.
    pub images: &'a Images,
    /// Starts container helpers (see `sandbox::zygote`).
    pub zygote: Option<Arc<Zygote>>,
    /// The run's state directory; each stage gets `<dir>/<stage identifier>`.
    pub state_dir: &'a Path,
    pub events: EventSink,
    /// Cancelled on Ctrl-C / SIGTERM.
    pub cancel: CancellationToken,
}

/// The network of the first stage to run, built while the runner entered its
/// namespaces: the stage's index in `plan.stages`, and the network.
pub type Prebuilt = (usize, Result<StageNetwork, NetError>);

/// Run every stage of the plan and say how the pipeline ended.
pub async fn run_pipeline(
    ctx: &PipelineContext<'_>,
    mut prebuilt: Option<Prebuilt>,
) -> StageResult {
    let mut failed = false;
    let outputs = Mutex::new(PipelineOutputs::new());
    for block in blocks(&ctx.plan.stages) {
        // Every stage of a block sees the pipeline as it was when the block began.
        let mut starting = Vec::new();
        for &i in &block {
            let stage = &ctx.plan.stages[i];
            let earlier = outputs.lock().unwrap().clone();
            match skip_reason(stage, failed, ctx.cancel.is_cancelled(), earlier) {
                Some(reason) => ctx.events.emit(RunEvent::StageSkipped {
                    stage: stage.identifier.clone(),
                    reason,
                }),
                None => {
                    let network = match prebuilt.take() {
                        Some((at, net)) if at == i => Some(net),
                        other => {
                            prebuilt = other;
                            None
                        }
                    };
                    starting.push((stage, network));
                }
            }
        }
        let beside_others = starting.len() > 1;
        let shared = &outputs;
        let caps = loop_caps(starting.iter().map(|(stage, _)| *stage));
        let runs = starting.into_iter().map(|(stage, network)| {
            let events = if beside_others {
                ctx.events.for_parallel_stage(&stage.identifier)
            } else {
                ctx.events.clone()
            };
            let cap = stage
                .instance
                .as_ref()
                .and_then(|i| caps.get(i.of.as_str()));
            async move {
                // The semaphore is fair: waiting instances start in their order.
                let _permit = match cap {
                    Some(cap) => Some(cap.acquire().await.expect("never closed")),
                    None => None,
                };
                if ctx.cancel.is_cancelled() {
                    events.emit(RunEvent::StageSkipped {
                        stage: stage.identifier.clone(),
                        reason: "run cancelled".into(),
                    });
                    return StageResult::Skipped;
                }
                run_one(ctx, stage, network, events, shared).await
            }
        });
        let finished = join_all(runs).await;
        for result in finished {
            match result {
                StageResult::Failed | StageResult::Cancelled => failed = true,
                StageResult::Succeeded | StageResult::Skipped => {}
            }
        }
    }
    if ctx.cancel.is_cancelled() {
        StageResult::Cancelled
    } else if failed {
        StageResult::Failed
    } else {
        StageResult::Succeeded
    }
}

/// Indices of `stages` in the groups that start together: a `parallel` block, or a
/// single stage.
fn blocks(stages: &[StagePlan]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let joins_previous =
            i > 0 && stage.parallel.is_some() && stages[i - 1].parallel == stage.parallel;
        match out.last_mut() {
            Some(block) if joins_previous => block.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// For each looped stage of a block whose `maxConcurrency` is below the number of its
/// instances, the semaphore its instances take a place from before they start.
fn loop_caps<'s>(stages: impl Iterator<Item = &'s StagePlan>) -> BTreeMap<&'s str, Semaphore> {
    let mut caps = BTreeMap::new();
    for stage in stages {
        if let Some(i) = &stage.instance {
            if let Some(max) = i.max_concurrency.filter(|&m| m < i.count) {
                caps.entry(i.of.as_str())
                    .or_insert_with(|| Semaphore::new(max.max(1)));
            }
        }
    }
    caps
}

/// Why `stage` does not run, given whether an earlier stage failed; `None` when it runs.
fn skip_reason(
    stage: &StagePlan,
    failed: bool,
    cancelled: bool,
    earlier: PipelineOutputs,
) -> Option<String> {
    if let Some(reason) = &stage.skipped {
        return Some(reason.clone());
    }
    if cancelled {
        return Some("run cancelled".into());
    }
    match (stage.run_when, failed) {
        (StageStatus::Success, true) => return Some("an earlier stage failed".into()),
        (StageStatus::Failure, false) => {
            return Some(
                "runs only after a stage has failed (when: pipelineStatus: Failure)".into(),
            )
        }
        _ => {}
    }
    match &stage.condition {
        Some(c)
            if !c.eval(&Outputs {
                steps: Default::default(),
                earlier,
            }) =>
        {
            Some(format!("its condition is false: {}", c.display()))
        }
        _ => None,
    }
}

/// One stage: its network and host ports, its launchers, the executor; everything
/// it started is gone when this returns.
async fn run_one(
    ctx: &PipelineContext<'_>,
    stage: &StagePlan,
    prebuilt: Option<Result<StageNetwork, NetError>>,
    events: EventSink,
    outputs: &Mutex<PipelineOutputs>,
) -> StageResult {
    let stage_dir = ctx.state_dir.join(&stage.identifier);
    let network = match start_network(stage, &stage_dir, prebuilt).await {
        Ok(n) => n,
        Err(e) => {
            events.emit(RunEvent::StageSkipped {
                stage: stage.identifier.clone(),
                reason: format!("{e:#}; no step was started"),
            });
            return StageResult::Failed;
        }
    };
    let result = run_in_network(ctx, stage, &stage_dir, network.as_ref(), events, outputs).await;
    // The one way out once the network exists: it is torn down whatever happened.
    if let Some((network, proxy)) = network {
        proxy.shutdown().await;
        network.teardown().await;
    }
    result
}

/// The stage's launchers and its executor, inside the stage's network (if any).
async fn run_in_network(
    ctx: &PipelineContext<'_>,
    stage: &StagePlan,
    stage_dir: &Path,
    network: Option<&(StageNetwork, ProxyServer)>,
    events: EventSink,
    outputs: &Mutex<PipelineOutputs>,
) -> StageResult {
    let shared_paths = match shared_dirs(stage_dir, &stage.shared_paths) {
        Ok(dirs) => dirs,
        Err(e) => {
            events.emit(RunEvent::StageSkipped {
                stage: stage.identifier.clone(),
                reason: format!(
                    "cannot make the stage's sharedPaths under {}: {e}; no step was started",
                    stage_dir.display()
                ),
            });
            return StageResult::Failed;
        }
    };
    let containers = if ctx.images.is_empty() {
        None
    } else {
        match std::env::current_exe() {
            Ok(exe) => Some(
                ContainerLauncher::new(exe, stage_dir.to_path_buf(), ctx.images.clone())
                    .with_zygote(ctx.zygote.clone())
                    .with_cache_dir(crate::store::default_home().map(|h| h.join("seccomp"))),
            ),
            Err(e) => {
                events.warn(
                    None,
                    format!("cannot find the sandrun executable to start containers: {e}"),
                );
                None
            }
        }
    };
    let stage_ctx = StageContext {
        plan: ctx.plan,
        stage,
        host: ctx.host,
        containers: containers.as_ref().map(|c| c as &dyn Launcher),
        images: ctx.images,
        network: network.map(|(n, _)| n),
        accept_listeners: network
            .map(|(_, proxy)| proxy.accept_listeners())
            .unwrap_or_default(),
        state_dir: stage_dir,
        options: ctx.options,
        events,
        cancel: ctx.cancel.clone(),
        pipeline_outputs: outputs,
        shared_paths,
    };
    run_stage(&stage_ctx).await
}

/// A directory of the stage's own for each of `paths`, which every step sees at that
/// path (Harness's `sharedPaths`: empty when the stage starts, written by any step, seen
/// by every later one). Paths that are not absolute lie in the workspace, which every
/// step shares already.
pub fn shared_dirs(stage_dir: &Path, paths: &[String]) -> std::io::Result<Vec<(PathBuf, String)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        if !path.starts_with('/') || path == "/" {
            continue;
        }
        let dir = stage_dir.join("shared").join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        // Any user of any step may write there, as in Harness's emptyDir volumes.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        dirs.push((dir, path.clone()));
    }
    Ok(dirs)
}

/// The stage's network and its host port bindings. Ports are bound first, so that a
/// busy host port stops the stage before anything starts.
async fn start_network(
    stage: &StagePlan,
    stage_dir: &Path,
    prebuilt: Option<Result<StageNetwork, NetError>>,
) -> anyhow::Result<Option<(StageNetwork, ProxyServer)>> {
    let Some(net) = &stage.net else {
        return Ok(None);
    };
    let proxy = HostPortProxy::bind(std::net::Ipv4Addr::LOCALHOST.into(), net)?;
    std::fs::create_dir_all(stage_dir)
        .with_context(|| format!("cannot create {}", stage_dir.display()))?;
    let network = match prebuilt {
        Some(built) => {
            let mut network = built.context("cannot create the stage network")?;
            network
                .write_files(stage_dir)
                .context("cannot create the stage network")?;
            network
        }
        None => StageNetwork::create(net, stage_dir)
            .await
            .context("cannot create the stage network")?,
    };
    // Host connections are handed to container services directly unless turned off
    // (the benchmark compares both ways).
    let handoff = std::env::var_os("SANDRUN_PORT_HANDOFF").is_none_or(|v| v != "off");
    let mut proxy = proxy;
    proxy
        .bind_for_machine(&network)
        .await
        .context("cannot bind the port bindings for host steps")?;
    let server = proxy.serve(&network, handoff.then_some(stage_dir))?;
    Ok(Some((network, server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{CondPlan, NetworkChoice, NetworkMode, Template};

    fn stage(id: &str, parallel: Option<usize>, run_when: StageStatus) -> StagePlan {
        StagePlan {
            identifier: id.into(),
            name: id.into(),
            skipped: None,
            run_when,
            condition: None,
            parallel,
            network: NetworkChoice {
                mode: NetworkMode::Bridge,
                reason: "default".into(),
            },
            net: None,
            shared_paths: Vec::new(),
            clone_codebase: false,
            warnings: Vec::new(),
            timeout: None,
            nodes: Vec::new(),
            instance: None,
            template: None,
        }
    }

    #[test]
    fn parallel_blocks_group_adjacent_stages_only() {
        let stages = vec![
            stage("a", None, StageStatus::Success),
            stage("b", Some(1), StageStatus::Success),
            stage("c", Some(1), StageStatus::Success),
            stage("d", None, StageStatus::Success),
            stage("e", Some(4), StageStatus::Success),
            stage("f", Some(5), StageStatus::Success),
        ];
        assert_eq!(
            blocks(&stages),
            vec![vec![0], vec![1, 2], vec![3], vec![4], vec![5]]
        );
    }

    #[test]
    fn pipeline_status_decides_which_stages_run() {
        let success = stage("s", None, StageStatus::Success);
        let failure = stage("f", None, StageStatus::Failure);
        let all = stage("a", None, StageStatus::All);
        assert_eq!(
            skip_reason(&success, false, false, PipelineOutputs::new()),
            None
        );
        assert!(skip_reason(&success, true, false, PipelineOutputs::new()).is_some());
        assert!(skip_reason(&failure, false, false, PipelineOutputs::new()).is_some());
        assert_eq!(
            skip_reason(&failure, true, false, PipelineOutputs::new()),
            None
        );
        assert_eq!(skip_reason(&all, true, false, PipelineOutputs::new()), None);
        assert_eq!(
            skip_reason(&all, false, false, PipelineOutputs::new()),
            None
        );
        assert_eq!(
            skip_reason(&all, false, true, PipelineOutputs::new()).as_deref(),
            Some("run cancelled")
        );
    }

    #[test]
    fn a_false_condition_skips_even_an_all_stage() {
        let mut all = stage("a", None, StageStatus::All);
        all.condition = Some(CondPlan::Compare {
            left: Template::literal("main"),
            equal: true,
            right: Template::literal("dev"),
        });
        let why = skip_reason(&all, true, false, PipelineOutputs::new()).unwrap();
        assert!(why.contains("condition is false"), "{why}");
        all.condition = Some(CondPlan::Value(Template::literal("true")));
        assert_eq!(skip_reason(&all, true, false, PipelineOutputs::new()), None);
    }
}
