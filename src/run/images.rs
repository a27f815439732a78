//! Before a run starts: every image its steps need, present in the store and pinned.
//!
//! All images are made present up front (concurrently), so that a missing image, a
//! registry refusing credentials or an unpinned image under `--locked` stops the run
//! before any step has started, and no step waits on a pull mid-stage.

use std::collections::BTreeMap;
use std::path::Path;

use futures::future::join_all;

use crate::plan::{GroupPlan, Node, Plan};
use crate::store::lock::{check_locked, lock_path, LockFile};
use crate::store::{
    resolve_connector, ConnectorResolution, Image, Platform, PullOptions, PullPolicy, PullProgress,
    Store,
};

/// What the plan's container steps need, by where they are pulled from
/// (`ImagePlan::source`: the reference after the step's connector mapping).
pub type Images = BTreeMap<String, Image>;

/// One image to fetch and the steps that use it (for messages).
struct Wanted {
    /// After the step's `connectorRef` mapping.
    source: String,
    policy: PullPolicy,
    steps: Vec<String>,
    /// `source` is the path of an image recipe, built rather than pulled.
    recipe: bool,
}

/// Apply each step's `connectorRef` (mapped by sandrun's config file) to its image:
/// a mapped connector changes where the image is pulled from; an unmapped one falls
/// back to the registry the reference names. Either way `sandrun plan` says so.
pub fn resolve_sources(plan: &mut Plan, opts: &PullOptions) -> anyhow::Result<()> {
    fn walk(nodes: &mut [Node], opts: &PullOptions) -> anyhow::Result<()> {
        for n in nodes {
            match n {
                Node::Step(s) => {
                    let Some(img) = s.image.as_mut() else {
                        continue;
                    };
                    if crate::recipe::is_recipe_reference(&img.reference) {
                        continue;
                    }
                    let resolution =
                        resolve_connector(&img.reference, img.connector_ref.as_deref(), opts)?;
                    match resolution {
                        ConnectorResolution::None => {}
                        ConnectorResolution::Mapped(r) => {
                            img.connector_note = Some(format!(
                                "connector `{}` maps to {r}",
                                img.connector_ref.as_deref().unwrap_or_default()
                            ));
                            img.source = r;
                        }
                        ConnectorResolution::Unmapped {
                            connector,
                            registry,
                        } => {
                            img.connector_note = Some(format!(
                                "connector `{connector}` is not in sandrun's config file ({}); pulling from {registry}, the registry the reference names",
                                crate::config::path()
                                    .map(|p| p.display().to_string())
                                    .unwrap_or_else(|| "none".into())
                            ));
                        }
                    }
                }
                Node::Parallel { nodes }
                | Node::Group(GroupPlan { nodes, .. })
                | Node::Loop(crate::plan::LoopPlan { nodes, .. }) => walk(nodes, opts)?,
            }
        }
        Ok(())
    }
    for stage in &mut plan.stages {
        walk(&mut stage.nodes, opts)?;
    }
    Ok(())
}

/// Every image of the plan's runnable steps, in plan order, merged by reference (the
/// strictest pull policy wins: Always over IfNotPresent over Never).
/// [`prepare`] for a run whose images are all in the store already: no network and no
/// unpacking, so a rootless runner can do it while its id maps are being written.
/// `None` when some image needs a pull, or has a problem that [`prepare`] reports.
pub fn prepare_local(plan: &Plan, store: &Store, opts: &PullOptions) -> Option<Images> {
    let mut images = Images::new();
    for w in wanted(plan) {
        if w.recipe {
            // Built (or found by its digest) in `prepare`.
            return None;
        }
        let image = store.ensure_local(&w.source, w.policy, opts).ok()??;
        images.insert(w.source, image);
    }
    Some(images)
}

fn wanted(plan: &Plan) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = Vec::new();
    for stage in plan.stages.iter().filter(|s| s.skipped.is_none()) {
        for step in stage.steps() {
            let Some(img) = &step.image else { continue };
            if step.unsupported.is_some() {
                continue;
            }
            let source = img.source.clone();
            match out.iter_mut().find(|w| w.source == source) {
                Some(w) => {
                    w.steps.push(step.key.clone());
                    if rank(img.pull_policy) > rank(w.policy) {
                        w.policy = img.pull_policy;
                    }
                }
                None => out.push(Wanted {
                    recipe: crate::recipe::is_recipe_reference(&img.reference),
                    source,
                    policy: img.pull_policy,
                    steps: vec![step.key.clone()],
                }),
            }
        }
    }
    out
}

fn rank(p: PullPolicy) -> u8 {
    match p {
        PullPolicy::Never => 0,
        PullPolicy::IfNotPresent => 1,
        PullPolicy::Always => 2,
    }
}

/// The lock file's pins for `pipeline`, and with `locked` the check that every image
/// is pinned for this platform.
pub fn apply_lock(pipeline: &Path, plan: &Plan, opts: &mut PullOptions) -> anyhow::Result<()> {
    let lock = LockFile::for_pipeline(pipeline)?;
    match (&lock, opts.locked) {
        (None, true) => anyhow::bail!(
            "--locked: there is no lock file {} (write it with `sandrun lock {}`)",
            lock_path(pipeline).display(),
            pipeline.display()
        ),
        (Some(lock), true) => {
            // Recipes are pinned by their own lock files (checked when they are built).
            let images: Vec<String> = wanted(plan)
                .into_iter()
                .filter(|w| !w.recipe)
                .map(|w| w.source)
                .collect();
            check_locked(
                lock,
                &lock_path(pipeline),
                &images,
                &Platform::host().to_string(),
            )?;
        }
        _ => {}
    }
    if let Some(lock) = lock {
        opts.pins = lock.images;
    }
    Ok(())
}

/// Make every image present; all failures are reported together.
pub async fn prepare(
    plan: &Plan,
    store: &Store,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> anyhow::Result<Images> {
    let wanted = wanted(plan);
    let results = join_all(wanted.iter().map(|w| async move {
        if w.recipe {
            build_recipe(store, &w.source, opts, progress).await
        } else {
            store
                .ensure(&w.source, w.policy, opts, progress)
                .await
                .map_err(anyhow::Error::from)
        }
    }))
    .await;
    let mut images = Images::new();
    let mut errors = Vec::new();
    for (w, r) in wanted.into_iter().zip(results) {
        match r {
            Ok(image) => {
                images.insert(w.source, image);
            }
            Err(e) => errors.push(format!(
                "image `{}` (step {}): {e:#}",
                w.source,
                w.steps.join(", ")
            )),
        }
    }
    if errors.is_empty() {
        Ok(images)
    } else {
        anyhow::bail!("{}\nno step was started", errors.join("\n"))
    }
}

/// A step's image recipe, built into the store (or found there by the digest of recipe
/// and lock). `--locked` refuses a missing or stale recipe lock; `--offline` builds from
/// the `.deb` files in the store.
async fn build_recipe(
    store: &Store,
    path: &str,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> anyhow::Result<Image> {
    let build = crate::recipe::BuildOptions {
        offline: opts.offline,
        locked: opts.locked,
        pull: PullOptions {
            locked: false,
            ..opts.clone()
        },
    };
    let built = crate::recipe::build(store, Path::new(path), &build, progress).await?;
    for n in &built.notes {
        progress.event(&crate::store::PullEvent::Warning {
            reference: path.to_string(),
            message: n.clone(),
        });
    }
    Ok(built.image)
}
