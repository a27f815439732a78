//! The store's subcommands (`pull`, `images`, `gc`, `fsck`, `lock`, `save`, `load`) and
//! the options every registry-touching command shares. They live in `cli`, not in
//! `store`, so that the store stays a library that knows nothing of the command line.
//! Each handler builds its own tokio runtime so that it can enter a user namespace
//! first (that must happen single-threaded).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::pipeline::{StepItem, StepKind};
use crate::store::lock::LockFile;
use crate::store::progress::TerminalProgress;
use crate::store::{
    default_home, resolve_connector, ConnectorResolution, PullOptions, PullPolicy, Store,
};

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
    /// Bytes one image layer may write when it is unpacked (`2Gi`, `500Mi`): file
    /// lengths (holes included) plus copies of hardlinks into lower layers. By default
    /// 64 times the layer's compressed size, at least 256 MiB, which refuses gzip bombs
    /// and sparse-file tricks while real layers (2-10 times) pass. Also the config
    /// file's `layer_size_limit`.
    #[arg(
        long,
        value_name = "SIZE",
        env = "SANDRUN_LAYER_SIZE_LIMIT",
        global = true,
        value_parser = crate::pipeline::values::parse_memory
    )]
    pub layer_size_limit: Option<u64>,
}

impl RegistryArgs {
    /// These options, then sandrun's config file (connectors, credentials, mirrors).
    pub fn pull_options(&self) -> Result<PullOptions> {
        let mut opts = PullOptions {
            offline: self.offline,
            insecure_registries: self.insecure_registry.clone(),
            layer_size_limit: self.layer_size_limit,
            ..Default::default()
        };
        crate::config::Config::load()?.apply(&mut opts);
        Ok(opts)
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

/// Rootless, store commands that write layers run as uid 0 of sandrun's user namespace
/// (as `run` does), so that layers keep their owners (mapped through /etc/subuid) and
/// the files written that way can be removed again. Must run before any thread starts.
pub(crate) fn enter_userns_if_rootless() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let info = crate::sandbox::enter_rootless().context("cannot set up rootless mode")?;
    if let Some(limit) = info.limitation() {
        eprintln!("warning: {limit}");
    }
    Ok(())
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
    enter_userns_if_rootless()?;
    let store = open_store()?;
    let mut opts = reg.pull_options()?;
    let mut wanted: Vec<(String, PullPolicy)> = Vec::new();
    let always = |p: PullPolicy| if args.always { PullPolicy::Always } else { p };
    for image in &args.images {
        wanted.push((image.clone(), always(PullPolicy::IfNotPresent)));
    }
    if let Some(p) = &args.pipeline {
        for i in pipeline_images(p, &opts)? {
            if crate::recipe::is_recipe_reference(&i.image) {
                let rt = runtime()?;
                let name =
                    super::recipe::build_for_pipeline(&store, &rt, Path::new(&i.image), &opts)?;
                println!("{}: {name}", i.image);
                continue;
            }
            wanted.push((i.image, always(i.policy)));
        }
        if let Some(lock) = LockFile::for_pipeline(p)? {
            opts.pins = lock.images;
        }
    }
    if wanted.is_empty() && args.pipeline.is_none() {
        anyhow::bail!("nothing to pull: name images or a pipeline (-f)");
    }
    let progress = TerminalProgress::new();
    runtime()?.block_on(async {
        let mut failed = 0;
        for (image, policy) in &wanted {
            if let Err(e) = store.ensure(image, *policy, &opts, &progress).await {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
        Ok(if failed > 0 { 1 } else { 0 })
    })
}

/// One image a pipeline needs, after its step's `connectorRef` mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineImage {
    pub image: String,
    pub policy: PullPolicy,
    /// The step that names it (for messages).
    pub step: String,
}

/// Every image the pipeline at `path` names, in file order, without duplicates.
pub fn pipeline_images(path: &Path, opts: &PullOptions) -> Result<Vec<PipelineImage>> {
    let file = crate::pipeline::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out: Vec<PipelineImage> = Vec::new();
    for stage in &file.stages {
        if let Some(spec) = &stage.spec {
            collect(&spec.steps, opts, &mut out)?;
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|i| seen.insert(i.image.clone()));
    Ok(out)
}

fn collect(items: &[StepItem], opts: &PullOptions, out: &mut Vec<PipelineImage>) -> Result<()> {
    for item in items {
        match item {
            StepItem::Step(step) => {
                let c = match &step.kind {
                    StepKind::Run(s) => &s.container,
                    StepKind::Background(s) => &s.container,
                    StepKind::Plugin(s) => &s.container,
                    StepKind::Unsupported { .. } => continue,
                };
                let Some(image) = &c.image else { continue };
                if image.contains("<+") {
                    // Resolved by `plan`; a pipeline-level pull cannot know it.
                    eprintln!(
                        "warning: step {}: image `{image}` is an expression; skipped",
                        step.identifier
                    );
                    continue;
                }
                let image = match resolve_connector(image, c.connector_ref.as_deref(), opts)? {
                    ConnectorResolution::Mapped(i) => i,
                    ConnectorResolution::None | ConnectorResolution::Unmapped { .. } => {
                        image.clone()
                    }
                };
                out.push(PipelineImage {
                    image,
                    policy: c.pull_policy.unwrap_or(PullPolicy::IfNotPresent),
                    step: step.identifier.clone(),
                });
            }
            StepItem::Parallel(items, _)
            | StepItem::Loop(crate::pipeline::Loop {
                instances: items, ..
            }) => collect(items, opts, out)?,
            StepItem::Group(g) => collect(&g.steps, opts, out)?,
        }
    }
    Ok(())
}

/// `sandrun images`: what the store holds.
#[derive(clap::Args, Debug, Clone)]
pub struct ImagesArgs {
    /// Print the SPDX 2.3 SBOM of this image (built from a recipe) instead of the list.
    #[arg(long, value_name = "REF")]
    pub sbom: Option<String>,
}

pub fn images(args: &ImagesArgs) -> Result<i32> {
    let store = open_store()?;
    if let Some(r) = &args.sbom {
        let mut sbom = crate::recipe::sbom_of(&store, r)?;
        sbom.push(b'\n');
        // A closed pipe (`| head`) is not an error.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &sbom);
        return Ok(0);
    }
    let rows = store.images()?;
    println!(
        "{:<60} {:<19} {:>10}  LAST USED",
        "REFERENCE", "DIGEST", "SIZE"
    );
    for r in rows {
        let used = r
            .last_used
            .and_then(|t| t.elapsed().ok())
            .map(|d| format!("{} ago", human_duration(d)))
            .unwrap_or_else(|| "never".into());
        let short = &r.manifest_digest[..r.manifest_digest.len().min(19)];
        let incomplete = if r.complete { "" } else { "  (incomplete)" };
        println!(
            "{:<60} {:<19} {:>10}  {used}{incomplete}",
            r.reference,
            short,
            indicatif::HumanBytes(r.size).to_string()
        );
    }
    Ok(0)
}

fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `sandrun gc`: remove blobs and layers no image or lock file references, and the
/// compiled seccomp programs (made again when a container needs one).
#[derive(clap::Args, Debug, Clone)]
pub struct GcArgs {}

pub fn gc(_args: &GcArgs) -> Result<i32> {
    enter_userns_if_rootless()?;
    let store = open_store()?;
    let r = store.gc()?;
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    println!(
        "removed {} blobs ({}), {} layers, {} abandoned temp files, {} compiled seccomp programs",
        r.blobs,
        indicatif::HumanBytes(r.bytes),
        r.layers,
        r.temp,
        r.seccomp
    );
    Ok(0)
}

/// `sandrun fsck`: verify every blob and layer.
#[derive(clap::Args, Debug, Clone)]
pub struct FsckArgs {
    /// Remove damaged blobs and layers (the next pull fetches them again).
    #[arg(long)]
    pub repair: bool,
}

pub fn fsck(args: &FsckArgs) -> Result<i32> {
    enter_userns_if_rootless()?;
    let store = open_store()?;
    let r = store.fsck(args.repair)?;
    for p in &r.problems {
        println!("damaged: {p}");
    }
    for i in &r.incomplete {
        println!("incomplete: {i}");
    }
    println!(
        "checked {} blobs, {} layers: {} problems{}{}",
        r.blobs,
        r.layers,
        r.problems.len(),
        if r.temp_removed > 0 {
            format!(", removed {} abandoned temp files", r.temp_removed)
        } else {
            String::new()
        },
        if args.repair && r.repaired > 0 {
            format!(", removed {} damaged objects", r.repaired)
        } else {
            String::new()
        },
    );
    Ok(if r.problems.is_empty() || args.repair {
        0
    } else {
        1
    })
}

/// `sandrun lock PIPELINE`: pin every image the pipeline names.
#[derive(clap::Args, Debug, Clone)]
pub struct LockArgs {
    /// The pipeline file; the lock file is written beside it as `<file>.lock`.
    #[arg(value_name = "PIPELINE")]
    pub pipeline: PathBuf,
}

pub fn lock(args: &LockArgs, reg: &RegistryArgs) -> Result<i32> {
    let store = open_store()?;
    let opts = reg.pull_options()?;
    let (recipes, images): (Vec<PipelineImage>, Vec<PipelineImage>) =
        pipeline_images(&args.pipeline, &opts)?
            .into_iter()
            .partition(|i| crate::recipe::is_recipe_reference(&i.image));
    // Recipes are pinned by their own lock files, written here when missing or stale.
    for r in &recipes {
        let path = Path::new(&r.image);
        let (written, notes) = crate::recipe::lock_if_needed(&store, path, opts.offline)?;
        for n in notes {
            eprintln!("note: {n}");
        }
        let lock = crate::recipe::lock_path(path);
        if written {
            println!("wrote {}", lock.display());
        } else {
            println!("{} is up to date", lock.display());
        }
    }
    let progress = TerminalProgress::new();
    let lock = runtime()?.block_on(async {
        let mut lock = LockFile::new(crate::store::Platform::host().to_string());
        for i in &images {
            let pin = store.resolve_pin(&i.image, &opts, &progress).await?;
            let canon = crate::store::ImageRef::parse(&i.image)?.canonical();
            lock.images.insert(canon, pin);
        }
        Ok::<_, crate::store::StoreError>(lock)
    })?;
    let path = crate::store::lock::lock_path(&args.pipeline);
    lock.write(&path)?;
    store.add_root(&path)?;
    println!("wrote {} ({} images)", path.display(), lock.images.len());
    Ok(0)
}

/// `sandrun save -o FILE.tar (PIPELINE | REF...)`.
#[derive(clap::Args, Debug, Clone)]
pub struct SaveArgs {
    /// The OCI archive to write.
    #[arg(short = 'o', long = "output", value_name = "FILE.tar")]
    pub output: PathBuf,
    /// A pipeline file (every image it names) or image references.
    #[arg(value_name = "PIPELINE|REF", required = true)]
    pub what: Vec<String>,
}

pub fn save(args: &SaveArgs, reg: &RegistryArgs) -> Result<i32> {
    enter_userns_if_rootless()?;
    let store = open_store()?;
    let mut opts = reg.pull_options()?;
    let mut images = Vec::new();
    for w in &args.what {
        let p = Path::new(w);
        if p.is_file() {
            if let Some(lock) = LockFile::for_pipeline(p)? {
                opts.pins.extend(lock.images);
            }
            for i in pipeline_images(p, &opts)? {
                if crate::recipe::is_recipe_reference(&i.image) {
                    let rt = runtime()?;
                    let name =
                        super::recipe::build_for_pipeline(&store, &rt, Path::new(&i.image), &opts)?;
                    images.push((name, PullPolicy::IfNotPresent));
                } else {
                    images.push((i.image, i.policy));
                }
            }
        } else {
            images.push((w.clone(), PullPolicy::IfNotPresent));
        }
    }
    // Missing images are pulled first (unless --offline).
    let progress = TerminalProgress::new();
    runtime()?.block_on(async {
        for (i, policy) in &images {
            store.ensure(i, *policy, &opts, &progress).await?;
        }
        Ok::<_, crate::store::StoreError>(())
    })?;
    let names: Vec<String> = images.into_iter().map(|(i, _)| i).collect();
    store.save(&names, &args.output, &opts)?;
    println!("wrote {} ({} images)", args.output.display(), names.len());
    Ok(0)
}

/// `sandrun load FILE.tar`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(value_name = "FILE.tar")]
    pub archive: PathBuf,
}

pub fn load(args: &LoadArgs) -> Result<i32> {
    enter_userns_if_rootless()?;
    let store = open_store()?;
    let opts = PullOptions {
        offline: true,
        ..Default::default()
    };
    let progress = TerminalProgress::new();
    let loaded = runtime()?.block_on(store.load(&args.archive, &opts, &progress))?;
    for i in &loaded {
        println!("loaded {} ({})", i.reference, i.manifest_digest);
    }
    Ok(0)
}
