//! `sandrun export kubernetes`: its options, and what it reads besides the plan (the
//! config file's pull Secrets, the facts of images already in the store).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{ImageFacts, KnownImages, KubeOptions, RecipeImage, DEFAULT_HELPER_IMAGE};
use crate::plan::Plan;
use crate::store::{PullOptions, Store};

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub target: ExportTarget,
}

#[derive(Subcommand, Debug)]
pub enum ExportTarget {
    /// Print a stage as Kubernetes manifests (one Pod per stage, or a Job), as Harness's
    /// Kubernetes build infrastructure runs it, for `kubectl apply -f -`.
    ///
    /// Background steps become native sidecars (Kubernetes 1.29 or later) with a
    /// startup probe on their image's exposed port; Run and Plugin steps run one after
    /// another in their own images, sharing an emptyDir workspace at /harness. What
    /// Kubernetes cannot run (steps without an image, portBindings, two services on one
    /// port) is refused with the reason; what it runs differently is said in comments
    /// at the top of the output. Secret values are never written: an env variable that
    /// is exactly `<+secrets.getValue("ID")>` is taken from a Kubernetes Secret, any
    /// other use of a secret is refused. An image built from a recipe
    /// (`./images/NAME.yaml`) is named by the digest of the image `sandrun build` made
    /// from it with its current lock (in the repository `--recipe-repository` maps it
    /// to), with a comment saying to push it first and how; the export never builds.
    /// See docs/kubernetes.md.
    #[command(name = "kubernetes", visible_alias = "k8s")]
    Kubernetes(KubernetesArgs),
}

#[derive(Args, Debug)]
pub struct KubernetesArgs {
    /// The pipeline file. Default: the only YAML file under `.harness/`.
    pub file: Option<PathBuf>,
    /// Export only this stage (its identifier).
    #[arg(long, value_name = "ID")]
    pub stage: Option<String>,
    /// Print a batch/v1 Job (backoffLimit 0) around each Pod.
    #[arg(long)]
    pub job: bool,
    /// metadata.namespace of every object. Default: none (kubectl's current namespace).
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Answer a runtime input (`<+input>`): a variable's name, or STEP.FIELD.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = crate::cli::parse_pair)]
    pub set: Vec<(String, String)>,
    /// Read answers from a YAML file of `KEY: VALUE` (as `sandrun run --values`).
    #[arg(long, value_name = "FILE")]
    pub values: Option<PathBuf>,
    /// Another directory of Harness template files (repeatable), besides those beside the
    /// pipeline and under `.harness/`.
    #[arg(long = "templates", value_name = "DIR")]
    pub templates: Vec<PathBuf>,
    /// Pull images of steps with this `connectorRef` with this image pull Secret
    /// (repeatable; wins over `kubernetes.pull_secrets` in sandrun's config file).
    #[arg(long = "pull-secret", value_name = "CONNECTOR=SECRET", value_parser = crate::cli::parse_pair)]
    pub pull_secret: Vec<(String, String)>,
    /// Name the image built from the recipe NAME (its `name:`) in this registry
    /// repository, by digest (repeatable; wins over `kubernetes.recipe_repositories` in
    /// sandrun's config file). Push it there first: the output says how.
    #[arg(long = "recipe-repository", value_name = "NAME=REPOSITORY", value_parser = crate::cli::parse_pair)]
    pub recipe_repository: Vec<(String, String)>,
    /// The image the step wrappers' static busybox is copied from.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_HELPER_IMAGE)]
    pub helper_image: String,
}

impl KubernetesArgs {
    /// The options, with the config file's mappings under the command line's, the lock
    /// file's pins and what the store says about the plan's recipe images.
    pub fn options(
        &self,
        plan: &Plan,
        recipes: BTreeMap<String, RecipeImage>,
    ) -> anyhow::Result<KubeOptions> {
        let (pins, lock_file) = lock_pins(plan)?;
        let config = crate::config::Config::load()?.kubernetes;
        let mut pull_secrets = config.pull_secrets;
        pull_secrets.extend(self.pull_secret.iter().cloned());
        let mut recipe_repositories = config.recipe_repositories;
        recipe_repositories.extend(self.recipe_repository.iter().cloned());
        for (name, repository) in &recipe_repositories {
            check_repository(name, repository)?;
        }
        Ok(KubeOptions {
            job: self.job,
            namespace: self.namespace.clone(),
            pull_secrets,
            helper_image: self.helper_image.clone(),
            pins,
            lock_file,
            recipe_repositories,
            recipes,
        })
    }
}

/// A repository the image of recipe `name` is pushed to: a reference without tag or
/// digest, since the export adds the recipe's tag and the image's digest.
fn check_repository(name: &str, repository: &str) -> anyhow::Result<()> {
    let r = crate::store::reference::ImageRef::parse(repository)
        .map_err(|e| anyhow::anyhow!("recipe repository {name}={repository}: {e}"))?;
    let last = repository.rsplit('/').next().unwrap_or(repository);
    if repository.contains('@') || last.contains(':') {
        let bare = format!("{}/{}", r.registry(), r.repository());
        anyhow::bail!(
            "recipe repository {name}={repository}: give the repository only ({bare}), without a tag or digest: the export names the image by the recipe's tag and the digest of the image built from it"
        );
    }
    Ok(())
}

/// The digests the lock file beside the pipeline pins the plan's images to, by
/// `ImagePlan::source`: the index digest of a multi-platform image (so the cluster
/// picks its nodes' platform), else the platform manifest's. Also the lock's path.
pub fn lock_pins(plan: &Plan) -> anyhow::Result<(BTreeMap<String, String>, Option<PathBuf>)> {
    let Some(lock) = crate::store::lock::LockFile::for_pipeline(&plan.source)? else {
        return Ok((BTreeMap::new(), None));
    };
    let mut pins = BTreeMap::new();
    for step in plan.stages.iter().flat_map(|s| s.steps()) {
        let Some(img) = &step.image else { continue };
        let Ok(reference) = crate::store::reference::ImageRef::parse(&img.source) else {
            continue;
        };
        if let Some(pin) = lock.images.get(&reference.canonical()) {
            let digest = pin.index.clone().unwrap_or_else(|| pin.manifest.clone());
            pins.insert(img.source.clone(), digest);
        }
    }
    Ok((pins, Some(crate::store::lock::lock_path(&plan.source))))
}

/// What the store knows about the plan's images, without any network and without
/// building: their exposed ports (startup probes, port collisions) and entrypoints
/// (Plugin steps), and for each image recipe the image built from it with its current
/// lock, if there is one (by `ImagePlan::source`).
pub fn from_store(plan: &Plan, pull: &PullOptions) -> (KnownImages, BTreeMap<String, RecipeImage>) {
    let mut known = KnownImages::new();
    let mut recipes = BTreeMap::new();
    let store = crate::store::default_home()
        .filter(|h| h.is_dir())
        .and_then(|home| Store::open(&home).ok());
    for step in plan.stages.iter().flat_map(|s| s.steps()) {
        let Some(img) = &step.image else { continue };
        if known.contains_key(&img.source) || recipes.contains_key(&img.source) {
            continue;
        }
        let image = if crate::recipe::is_recipe_reference(&img.reference) {
            let Some(store) = &store else {
                recipes.insert(
                    img.source.clone(),
                    RecipeImage::NotBuilt("sandrun's store is empty".into()),
                );
                continue;
            };
            match crate::recipe::find_built(store, std::path::Path::new(&img.source)) {
                Ok(crate::recipe::Lookup::Built { name, tag, image }) => {
                    recipes.insert(
                        img.source.clone(),
                        RecipeImage::Built {
                            name,
                            tag,
                            digest: image.manifest_digest.clone(),
                        },
                    );
                    *image
                }
                Ok(crate::recipe::Lookup::Missing(why)) => {
                    recipes.insert(img.source.clone(), RecipeImage::NotBuilt(why));
                    continue;
                }
                Err(e) => {
                    recipes.insert(img.source.clone(), RecipeImage::NotBuilt(e.to_string()));
                    continue;
                }
            }
        } else {
            let Some(Ok(Some(image))) = store.as_ref().map(|s| s.get(&img.source, pull)) else {
                continue;
            };
            image
        };
        let Some(config) = image.config.config().as_ref() else {
            continue;
        };
        known.insert(
            img.source.clone(),
            ImageFacts {
                exposed_tcp: config
                    .exposed_ports()
                    .as_ref()
                    .map(crate::run::ports::tcp_ports)
                    .unwrap_or_default(),
                entrypoint: config.entrypoint().clone().unwrap_or_default(),
                cmd: config.cmd().clone().unwrap_or_default(),
            },
        );
    }
    (known, recipes)
}
