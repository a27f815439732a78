//! The recipe subcommands: `sandrun build [RECIPE...]` and the recipe half of
//! `sandrun lock` (which `cli` dispatches here when the file is a recipe).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::store::RegistryArgs;
use crate::store::progress::TerminalProgress;

/// `sandrun build`: build image recipes into the store.
#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// Recipe files (`images/NAME.yaml`). Default: every `images/*.yaml` of the current
    /// directory.
    #[arg(value_name = "RECIPE")]
    pub recipes: Vec<PathBuf>,
    /// Refuse to build when a recipe's lock file is missing or out of date (instead of
    /// resolving the packages and writing it).
    #[arg(long)]
    pub locked: bool,
}

fn default_recipes() -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("images")
        .context("no recipes given and no images/ directory here")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    found.sort();
    if found.is_empty() {
        anyhow::bail!("no recipes given and none found under images/");
    }
    Ok(found)
}

pub fn build(args: &BuildArgs, reg: &RegistryArgs) -> Result<i32> {
    super::store::enter_userns_if_rootless()?;
    let store = super::store::open_store()?;
    let recipes = if args.recipes.is_empty() {
        default_recipes()?
    } else {
        args.recipes.clone()
    };
    let opts = crate::recipe::BuildOptions {
        offline: reg.offline,
        locked: args.locked,
        pull: reg.pull_options()?,
    };
    let progress = TerminalProgress::new();
    let rt = super::store::runtime()?;
    let mut failed = 0;
    for r in &recipes {
        let started = std::time::Instant::now();
        match rt.block_on(crate::recipe::build(&store, r, &opts, &progress)) {
            Ok(b) => {
                for n in &b.notes {
                    eprintln!("note: {n}");
                }
                println!(
                    "{} {} {} ({:.2}s{})",
                    if b.cached { "unchanged" } else { "built" },
                    b.image.reference,
                    b.image.manifest_digest,
                    started.elapsed().as_secs_f64(),
                    if b.cached { ", from the store" } else { "" }
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `sandrun lock RECIPE`: resolve the recipe's packages and write `NAME.lock`.
pub fn lock(path: &Path, reg: &RegistryArgs) -> Result<i32> {
    let store = super::store::open_store()?;
    let (lock, notes) = crate::recipe::lock(&store, path, reg.offline)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    println!(
        "wrote {} ({} packages)",
        crate::recipe::lock_path(path).display(),
        lock.packages.len()
    );
    Ok(0)
}

/// A pipeline's recipe image, built (or found) for `pull -f` and `save`; returns the
/// name it has in the store.
pub fn build_for_pipeline(
    store: &crate::store::Store,
    rt: &tokio::runtime::Runtime,
    recipe: &Path,
    opts: &crate::store::PullOptions,
) -> Result<String> {
    let build = crate::recipe::BuildOptions {
        offline: opts.offline,
        locked: opts.locked,
        pull: opts.clone(),
    };
    let progress = TerminalProgress::new();
    let built = rt
        .block_on(crate::recipe::build(store, recipe, &build, &progress))
        .with_context(|| format!("image recipe {}", recipe.display()))?;
    for n in &built.notes {
        eprintln!("note: {n}");
    }
    Ok(built.image.reference)
}
