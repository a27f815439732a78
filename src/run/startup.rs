//! Starting a run: everything `sandrun run` does between its parsed options and the
//! first stage, in the order the kernel and the machine impose (docs/ARCHITECTURE.md,
//! "A run, in order"). Rootless, the runner must enter its user namespace while it is
//! still single-threaded, so the zygote, the id-mapping children and the first stage's
//! network are started before tokio is; the images already in the store are looked up
//! while the id maps are written. `cli` only parses arguments and builds the plan and
//! options; this module owns that sequence, then drives the stages and the reporters.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::net::StageNetwork;
use crate::plan::Plan;
use crate::run::events::{EventSink, RunEvent, StageResult};
use crate::run::executor::RunOptions;
use crate::run::host::HostLauncher;
use crate::run::images::Images;
use crate::run::pipeline::{run_pipeline, PipelineContext};
use crate::sandbox::userns::PreparedRootless;
use crate::sandbox::zygote::Zygote;
use crate::sandbox::InvokingUser;
use crate::store::PullOptions;
use crate::ui::Reporter;

/// The first thing `sandrun run` does, before it reads the pipeline. Rootless, the
/// children that will write the runner's id maps are forked now, while the process is
/// small and single-threaded, so that they are ready when the namespace is entered.
pub struct Startup {
    rootless: Option<PreparedRootless>,
}

/// What a run needs, built by `cli` from the plan and the options.
pub struct RunRequest<'a> {
    pub plan: &'a Plan,
    /// Registry options, with the lock file's pins applied.
    pub pull: PullOptions,
    pub options: RunOptions,
    /// Host paths host steps may write (`--host-writable`).
    pub host_writable: Vec<PathBuf>,
    /// The consumers of the run's events (terminal or `--json`, JUnit).
    pub reporters: Vec<Box<dyn Reporter>>,
    /// Whether image pulls show their progress on the terminal (not with `--json`).
    pub pull_progress: bool,
}

/// How a run ended.
pub struct Finished {
    pub result: StageResult,
    /// Whether every reporter wrote what it had to (a JUnit report, say), or why not.
    pub display: anyhow::Result<()>,
}

impl Startup {
    /// Forks the id-mapping children when sandrun is not root.
    pub fn begin() -> anyhow::Result<Startup> {
        let rootless = if nix::unistd::geteuid().is_root() {
            None
        } else {
            Some(crate::sandbox::prepare_rootless().context("cannot set up rootless mode")?)
        };
        Ok(Startup { rootless })
    }

    /// Enters the rootless user namespace (if any), makes every image present, runs the
    /// plan's stages and waits for every process the run started.
    pub fn run(self, request: RunRequest<'_>) -> anyhow::Result<Finished> {
        let RunRequest {
            plan,
            pull,
            options,
            host_writable,
            reporters,
            pull_progress,
        } = request;
        let needs_images = plan
            .stages
            .iter()
            .any(|s| s.skipped.is_none() && s.steps().iter().any(|st| st.image.is_some()));
        // Asked before entering the rootless user namespace: inside it the uid is 0.
        let state_base = crate::sandbox::state::default_base();
        // What starts before the id maps are written: the zygote, forked while the
        // runner is still single-threaded (it starts each container helper without
        // executing the binary again), and the thread that creates the first stage's
        // network namespace (it needs only the namespace's capabilities, and takes as
        // long as the maps).
        let first = plan.stages.iter().position(|s| s.skipped.is_none());
        let rootless = self.rootless.is_some();
        let mut zygote = None;
        let mut network = None;
        let mut start_early = || {
            if needs_images {
                zygote = match Zygote::start(rootless) {
                    Ok(z) => Some(Arc::new(z)),
                    Err(e) => {
                        tracing::debug!("no zygote, helpers are executed: {e}");
                        None
                    }
                };
            }
            network = match first.and_then(|i| plan.stages[i].net.as_ref()) {
                Some(net) if !net.egress => Some(StageNetwork::start(net)),
                _ => None,
            };
        };
        // Rootless, the runner moves into its own user + mount namespace now, while it
        // is still single-threaded (docs/ARCHITECTURE.md, "Process model"); newuidmap
        // and newgidmap write its id maps while it goes on.
        let pending = match self.rootless {
            Some(p) => Some(
                p.begin_with(start_early)
                    .context("cannot set up rootless mode")?,
            ),
            None => {
                start_early();
                None
            }
        };
        // Images already in the store are looked up meanwhile (no pull: unpacking needs
        // the maps); then the maps are waited for. Both on this thread: no runtime
        // thread competes with the helpers for the CPUs before it is needed.
        let local_images = needs_images
            .then(|| {
                let store = crate::store::Store::open(&crate::store::default_home()?).ok()?;
                crate::run::images::prepare_local(plan, &store, &pull)
            })
            .flatten();
        let userns = pending
            .map(|p| p.finish())
            .transpose()
            .context("cannot set up rootless mode")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let prebuilt = match network {
            Some(Ok(started)) => Some(runtime.block_on(started.finish())),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        };
        let prebuilt = first.zip(prebuilt);
        let run_dir =
            crate::sandbox::RunState::create(&state_base, &format!("run-{}", std::process::id()))
                .context("cannot create the run's state directory")?;
        let host = HostLauncher {
            invoking_user: userns.as_ref().map(InvokingUser::new),
            init_binary: std::env::current_exe().ok(),
            writable: host_writable,
        };
        let (result, display) = runtime.block_on(async {
            let (sink, rx) = EventSink::channel();
            let sink = sink.masking(plan.secrets.clone());
            let ui = tokio::spawn(crate::ui::drive(rx, reporters));
            let cancel = CancellationToken::new();
            let signals = tokio::spawn(watch_signals(cancel.clone(), sink.clone()));
            if let Some(limit) = userns.as_ref().and_then(|u| u.limitation()) {
                sink.warn(None, limit);
            }
            let images = if needs_images {
                // Ctrl-C during a pull ends the run at once; the store keeps only blobs
                // that were verified, so the next pull resumes from them.
                let prepared = tokio::select! {
                    r = prepare_images(plan, &pull, local_images, pull_progress, &sink) => Some(r),
                    _ = cancel.cancelled() => None,
                };
                match prepared {
                    Some(Ok(i)) => i,
                    Some(Err(e)) => {
                        drop(sink);
                        signals.abort();
                        let _ = shown(ui).await;
                        return (Err(e), Ok(()));
                    }
                    None => {
                        drop(sink);
                        signals.abort();
                        return (Ok(StageResult::Cancelled), shown(ui).await);
                    }
                }
            } else {
                Images::default()
            };
            let pipeline = PipelineContext {
                plan,
                options: &options,
                host: &host,
                images: &images,
                zygote: zygote.clone(),
                state_dir: run_dir.dir(),
                events: sink,
                cancel,
            };
            let outcome = run_pipeline(&pipeline, prebuilt).await;
            // The display ends once every sender of events is gone.
            drop(pipeline);
            signals.abort();
            (Ok(outcome), shown(ui).await)
        });
        // Helpers that reported their step's exit status early may still be cleaning up
        // inside the run's state directory.
        crate::launch::reap_reported();
        drop(run_dir);
        // Everything the run started has ended and been awaited: do not wait for idle
        // worker threads to be joined.
        runtime.shutdown_background();
        Ok(Finished {
            result: result?,
            display,
        })
    }
}

/// What the reporters said when they finished.
async fn shown(ui: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    match ui.await {
        Ok(finished) => finished,
        Err(e) => Err(anyhow::Error::new(e).context("the display stopped")),
    }
}

/// Every image of the plan, present and verified, before any stage starts; with
/// `show_progress`, pulls are shown on the terminal.
async fn prepare_images(
    plan: &Plan,
    pull: &PullOptions,
    present: Option<Images>,
    show_progress: bool,
    sink: &EventSink,
) -> anyhow::Result<Images> {
    let images = match present {
        // Found before the namespace was entered: say so as a pull of them would.
        Some(images) => {
            if show_progress {
                let progress = crate::store::progress::TerminalProgress::new();
                for image in images.values() {
                    crate::store::PullProgress::event(
                        &progress,
                        &crate::store::PullEvent::Done {
                            reference: image.reference.clone(),
                            manifest_digest: image.manifest_digest.clone(),
                            pulled: 0,
                        },
                    );
                }
            }
            images
        }
        None => {
            let home = crate::store::default_home()
                .context("no image store directory: set SANDRUN_HOME (or HOME)")?;
            let store = crate::store::Store::open(&home)
                .with_context(|| format!("cannot open the image store at {}", home.display()))?;
            if show_progress {
                let progress = crate::store::progress::TerminalProgress::new();
                crate::run::images::prepare(plan, &store, pull, &progress).await?
            } else {
                crate::run::images::prepare(plan, &store, pull, &crate::store::NoProgress).await?
            }
        }
    };
    for (reference, image) in &images {
        sink.emit(RunEvent::ImageReady {
            reference: reference.clone(),
            digest: image.manifest_digest.clone(),
        });
    }
    Ok(images)
}

/// One place decides what signals mean: the first Ctrl-C or SIGTERM stops every step
/// (SIGTERM, grace period, SIGKILL) and the run ends with 130; a second one skips the
/// grace period. Every child is still reaped before sandrun exits.
async fn watch_signals(cancel: CancellationToken, sink: EventSink) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        count += 1;
        if count == 1 {
            sink.warn(
                None,
                "interrupted: stopping every step (press Ctrl-C again to kill them at once)",
            );
            cancel.cancel();
        } else {
            sink.warn(None, "interrupted again: killing every step now");
            crate::run::executor::hurry();
        }
    }
}
