//! Starting a run: everything `sandrun run` does between its options and the first
//! stage, in the order the kernel and the machine impose (docs/ARCHITECTURE.md, "A run,
//! in order").

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::plan::Plan;
use crate::run::events::{EventSink, RunEvent};

/// Every image of the plan, present and verified, before any stage starts.
pub(crate) async fn prepare_images(
    plan: &Plan,
    pull: &crate::store::PullOptions,
    present: Option<crate::run::images::Images>,
    json: bool,
    sink: &EventSink,
) -> anyhow::Result<crate::run::images::Images> {
    let images = match present {
        // Found before the namespace was entered: say so as a pull of them would.
        Some(images) => {
            if !json {
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
            if json {
                crate::run::images::prepare(plan, &store, pull, &crate::store::NoProgress).await?
            } else {
                let progress = crate::store::progress::TerminalProgress::new();
                crate::run::images::prepare(plan, &store, pull, &progress).await?
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
pub(crate) async fn watch_signals(cancel: CancellationToken, sink: EventSink) {
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
