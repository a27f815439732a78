//! Pull progress as typed events. The store emits them; reporters consume them: a
//! terminal reporter (an indicatif bar per layer and a total on a TTY, plain lines
//! otherwise) lives here, and the run UI can implement [`PullProgress`] itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullEvent {
    /// Contacting the registry to resolve a reference.
    Resolving { reference: String },
    /// The manifest is known; `download` bytes of `layers` layers must be fetched.
    Resolved {
        reference: String,
        manifest_digest: String,
        layers: usize,
        download: u64,
    },
    LayerStart {
        reference: String,
        digest: String,
        size: u64,
    },
    /// `bytes` more bytes of a layer arrived.
    LayerBytes { digest: String, bytes: u64 },
    /// A layer is verified and unpacked (`cached`: nothing had to be fetched).
    LayerDone { digest: String, cached: bool },
    /// Something was skipped or changed (device nodes rootless, dropped xattrs...).
    Warning { reference: String, message: String },
    /// The image is ready (`pulled`: bytes downloaded for it, 0 when all were present).
    Done {
        reference: String,
        manifest_digest: String,
        pulled: u64,
    },
}

pub trait PullProgress: Send + Sync {
    fn event(&self, event: &PullEvent);
}

/// Discards events.
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn event(&self, _: &PullEvent) {}
}

/// Collects events (tests, JSON output).
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<PullEvent>>);

impl PullProgress for Recorder {
    fn event(&self, e: &PullEvent) {
        self.0.lock().expect("lock").push(e.clone());
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// The reporter `sandrun pull` uses: bars on a terminal (stderr), lines otherwise.
pub struct TerminalProgress {
    bars: Option<MultiProgress>,
    state: Mutex<TermState>,
}

#[derive(Default)]
struct TermState {
    layers: HashMap<String, ProgressBar>,
    total: Option<ProgressBar>,
    started: HashMap<String, Instant>,
}

impl TerminalProgress {
    pub fn new() -> TerminalProgress {
        let tty = console::Term::stderr().is_term();
        TerminalProgress {
            bars: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            state: Mutex::new(TermState::default()),
        }
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl PullProgress for TerminalProgress {
    fn event(&self, e: &PullEvent) {
        let mut st = self.state.lock().expect("lock");
        let Some(multi) = &self.bars else {
            match e {
                PullEvent::Resolving { reference } => {
                    st.started.insert(reference.clone(), Instant::now());
                    eprintln!("{reference}: resolving");
                }
                PullEvent::Resolved {
                    reference,
                    manifest_digest,
                    layers,
                    download,
                } => eprintln!(
                    "{reference}: {manifest_digest}, {layers} layers, {} to download",
                    indicatif::HumanBytes(*download)
                ),
                PullEvent::LayerStart { digest, size, .. } => {
                    eprintln!(
                        "  layer {}: downloading {}",
                        short(digest),
                        indicatif::HumanBytes(*size)
                    )
                }
                PullEvent::LayerDone {
                    digest,
                    cached: false,
                } => eprintln!("  layer {}: done", short(digest)),
                PullEvent::LayerDone { .. } | PullEvent::LayerBytes { .. } => {}
                PullEvent::Warning { reference, message } => {
                    eprintln!("{reference}: warning: {message}")
                }
                PullEvent::Done {
                    reference,
                    manifest_digest,
                    pulled,
                } => {
                    let took = st
                        .started
                        .remove(reference)
                        .map(|t| format!(" in {:.2}s", t.elapsed().as_secs_f64()))
                        .unwrap_or_default();
                    if *pulled == 0 {
                        eprintln!("{reference}: present ({})", short(manifest_digest));
                    } else {
                        eprintln!(
                            "{reference}: pulled {}{took}",
                            indicatif::HumanBytes(*pulled)
                        );
                    }
                }
            }
            return;
        };
        match e {
            PullEvent::Resolving { reference } => {
                st.started.insert(reference.clone(), Instant::now());
            }
            PullEvent::Resolved {
                reference,
                download,
                ..
            } => {
                if *download > 0 {
                    let bar = multi.add(ProgressBar::new(*download));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .expect("template")
                        .progress_chars("=> "),
                    );
                    bar.set_message(reference.clone());
                    st.total = Some(bar);
                }
            }
            PullEvent::LayerStart { digest, size, .. } => {
                let bar = multi.add(ProgressBar::new(*size));
                bar.set_style(
                    ProgressStyle::with_template("  {msg:12} [{bar:30}] {bytes}/{total_bytes}")
                        .expect("template")
                        .progress_chars("=> "),
                );
                bar.set_message(short(digest).to_string());
                st.layers.insert(digest.clone(), bar);
            }
            PullEvent::LayerBytes { digest, bytes } => {
                if let Some(b) = st.layers.get(digest) {
                    b.inc(*bytes);
                }
                if let Some(t) = &st.total {
                    t.inc(*bytes);
                }
            }
            PullEvent::LayerDone { digest, .. } => {
                if let Some(b) = st.layers.remove(digest) {
                    b.finish_and_clear();
                    multi.remove(&b);
                }
            }
            PullEvent::Warning { reference, message } => {
                let _ = multi.println(format!("{reference}: warning: {message}"));
            }
            PullEvent::Done {
                reference,
                manifest_digest,
                pulled,
            } => {
                if let Some(t) = st.total.take() {
                    t.finish_and_clear();
                    multi.remove(&t);
                }
                let took = st
                    .started
                    .remove(reference)
                    .map(|t| format!(" in {:.2}s", t.elapsed().as_secs_f64()))
                    .unwrap_or_default();
                let line = if *pulled == 0 {
                    format!("{reference}: present ({})", short(manifest_digest))
                } else {
                    format!(
                        "{reference}: pulled {}{took}",
                        indicatif::HumanBytes(*pulled)
                    )
                };
                let _ = multi.println(line);
            }
        }
    }
}
