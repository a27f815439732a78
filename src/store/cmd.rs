//! The store's subcommands (`pull`, and the options every registry-touching command
//! shares). `cli.rs` hooks these in; each handler builds its own tokio runtime so that
//! the caller can enter a user namespace first (that must happen single-threaded).

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::progress::TerminalProgress;
use super::{default_home, PullOptions, PullPolicy, Store};

/// Options for every command that may touch a registry (`pull`, `lock`, `save`, `run`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Never open a network connection; fail clearly when an image is missing.
    #[arg(long, global = true)]
    pub offline: bool,
    /// Speak plain HTTP to this registry (HOST:PORT); repeatable. Loopback registries
    /// always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT", global = true)]
    pub insecure_registry: Vec<String>,
}

impl RegistryArgs {
    pub fn pull_options(&self) -> PullOptions {
        PullOptions {
            offline: self.offline,
            insecure_registries: self.insecure_registry.clone(),
            ..Default::default()
        }
    }
}

/// `sandrun pull`: fetch images into the store.
#[derive(clap::Args, Debug, Clone)]
pub struct PullArgs {
    /// Image references as Docker writes them (`alpine`, `ghcr.io/o/r:tag`, `x@sha256:...`).
    #[arg(value_name = "REF")]
    pub images: Vec<String>,
    /// Pull every image this pipeline names.
    #[arg(short = 'f', long = "file", value_name = "PIPELINE")]
    pub pipeline: Option<PathBuf>,
    /// Re-resolve tags at the registry even when the image is present.
    #[arg(long)]
    pub always: bool,
}

pub(crate) fn open_store() -> Result<Store> {
    let home = default_home().context("no store directory: set SANDRUN_HOME (or HOME)")?;
    Store::open(&home).with_context(|| format!("opening the store at {}", home.display()))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn pull(args: &PullArgs, reg: &RegistryArgs) -> Result<i32> {
    let store = open_store()?;
    let images = args.images.clone();
    if let Some(p) = &args.pipeline {
        anyhow::bail!(
            "`pull -f {}`: reading pipelines is not wired yet; name the images",
            p.display()
        );
    }
    if images.is_empty() {
        anyhow::bail!("nothing to pull: name images or a pipeline (-f)");
    }
    let opts = reg.pull_options();
    let policy = if args.always {
        PullPolicy::Always
    } else {
        PullPolicy::IfNotPresent
    };
    let progress = TerminalProgress::new();
    runtime()?.block_on(async {
        let mut failed = 0;
        for image in &images {
            if let Err(e) = store.ensure(image, policy, &opts, &progress).await {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
        Ok(if failed > 0 { 1 } else { 0 })
    })
}
