//! A stage as a Kubernetes Pod (or Job), the way Harness's Kubernetes build
//! infrastructure runs it: every step a container of one Pod, sharing its network and
//! an `emptyDir` workspace at `/harness`; Background steps as native sidecars (init
//! containers with `restartPolicy: Always`, Kubernetes 1.29+), probed on their ports
//! before the steps start; Run and Plugin steps one after another (see `sequence`).
//! Objects are k8s-openapi's typed structs, serialised with serde_yaml.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostAlias, LocalObjectReference, Pod,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretKeySelector, SecurityContext,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::sequence::{self, StepScript};
use super::{ExportError, Refusal};
use crate::pipeline::{PullPolicy, StageStatus};
use crate::plan::{
    CondPlan, GroupPlan, LoopPlan, Node, Plan, ProcessTemplate, StagePlan, StepPlan, StepType,
    Template, TemplatePart,
};
use crate::run::executor::output_trailer;

/// The image whose static busybox runs the step wrappers (override: `--helper-image`).
/// Its musl variant is statically linked, so the copy runs in any step image.
pub const DEFAULT_HELPER_IMAGE: &str = "docker.io/library/busybox:1.37.0-musl";

/// Harness's defaults for a step container ("Resource allocation" in Harness's CI
/// docs): limits 400m CPU / 500Mi memory unless the step sets them; requests at the
/// minimum, 10m / 10Mi, since steps run one after another.
const STEP_CPU_LIMIT_MILLIS: u64 = 400;
const STEP_MEMORY_LIMIT: u64 = 500 * MI;
const STEP_CPU_REQUEST_MILLIS: u64 = 10;
const STEP_MEMORY_REQUEST: u64 = 10 * MI;
/// Harness's "add on" container (its lite-engine): 100m / 100Mi, requests = limits.
const ADDON_CPU_MILLIS: u64 = 100;
const ADDON_MEMORY: u64 = 100 * MI;
const MI: u64 = 1024 * 1024;

const WORKSPACE: &str = "/harness";

/// What the export options say beyond the plan.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Wrap each Pod in a `batch/v1` Job.
    pub job: bool,
    pub namespace: Option<String>,
    /// Harness connector identifier -> name of a `kubernetes.io/dockerconfigjson` Secret.
    pub pull_secrets: BTreeMap<String, String>,
    /// The image the static busybox is copied from.
    pub helper_image: String,
    /// Digests the lock file pins images to, by `ImagePlan::source`.
    pub pins: BTreeMap<String, String>,
    /// The lock file they come from, for the comment that says so.
    pub lock_file: Option<std::path::PathBuf>,
    /// Image recipe name -> the registry repository its image was pushed to.
    pub recipe_repositories: BTreeMap<String, String>,
    /// What sandrun's store holds for each image recipe, by `ImagePlan::source`.
    pub recipes: BTreeMap<String, RecipeImage>,
}

/// The image built from a recipe (`image: ./images/NAME.yaml`), as sandrun's store has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipeImage {
    /// Built from the recipe and its lock as they are now.
    Built {
        /// The recipe's `name` and `tag`: the store names the image `localhost/NAME:TAG`.
        name: String,
        tag: String,
        /// Its manifest digest: what `sandrun save` writes and a push that keeps digests
        /// (`skopeo copy --preserve-digests`) gives the registry.
        digest: String,
    },
    /// Not in the store as the recipe and its lock now say: why.
    NotBuilt(String),
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            job: false,
            namespace: None,
            pull_secrets: BTreeMap::new(),
            helper_image: DEFAULT_HELPER_IMAGE.into(),
            pins: BTreeMap::new(),
            lock_file: None,
            recipe_repositories: BTreeMap::new(),
            recipes: BTreeMap::new(),
        }
    }
}

/// What sandrun's store knows about an image (present only when it was pulled).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageFacts {
    /// TCP ports of the image's `ExposedPorts`.
    pub exposed_tcp: Vec<u16>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// By [`crate::plan::ImagePlan::source`].
pub type KnownImages = BTreeMap<String, ImageFacts>;

/// One stage's object and the comments printed above it.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub stage: String,
    pub notes: Vec<String>,
    pub workload: Workload,
}

#[derive(Clone, Debug)]
pub enum Workload {
    Pod(Box<Pod>),
    Job(Box<Job>),
}

/// Every stage of the plan that runs, as YAML documents with their comments.
pub fn kubernetes(
    plan: &Plan,
    opts: &KubeOptions,
    images: &KnownImages,
) -> Result<String, ExportError> {
    let manifests = manifests(plan, opts, images)?;
    let mut out = String::new();
    let mut header = vec![format!(
        "Generated by `sandrun export kubernetes` from {}.",
        plan.source.display()
    )];
    for stage in &plan.stages {
        if let Some(why) = &stage.skipped {
            header.push(format!(
                "Stage `{}` is not exported: {why}.",
                stage.identifier
            ));
        }
    }
    if manifests.len() > 1 {
        header.push(
            "Harness runs these stages one after another; each is its own Pod here: apply \
             the next one when the one before has succeeded (or export one with --stage)."
                .into(),
        );
    }
    push_comments(&mut out, &header);
    for (i, m) in manifests.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        push_comments(&mut out, &m.notes);
        let yaml = match &m.workload {
            Workload::Pod(p) => serde_yaml::to_string(p)?,
            Workload::Job(j) => serde_yaml::to_string(j)?,
        };
        out.push_str(&plan.secrets.mask(&yaml));
    }
    Ok(out)
}

fn push_comments(out: &mut String, notes: &[String]) {
    for note in notes {
        for line in wrap(note, 88) {
            out.push_str(if line.is_empty() { "#" } else { "# " });
            out.push_str(&line);
            out.push('\n');
        }
    }
}

/// Break `text` into lines of at most `width` characters at spaces (continuations indented).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
            line.push_str("  ");
        } else if !line.is_empty() && line != "  " {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

/// Every stage of the plan that runs, as typed objects; all refusals of all stages at once.
pub fn manifests(
    plan: &Plan,
    opts: &KubeOptions,
    images: &KnownImages,
) -> Result<Vec<Manifest>, ExportError> {
    let mut refusals = Vec::new();
    let mut out = Vec::new();
    for stage in plan.stages.iter().filter(|s| s.skipped.is_none()) {
        let mut builder = StageBuilder {
            plan,
            stage,
            opts,
            images,
            refusals: &mut refusals,
            notes: Vec::new(),
        };
        if let Some(m) = builder.build() {
            out.push(m);
        }
    }
    if !refusals.is_empty() {
        return Err(ExportError::Refused(refusals));
    }
    if out.is_empty() {
        return Err(ExportError::NoStage(
            "every stage of the pipeline is skipped".into(),
        ));
    }
    Ok(out)
}

/// A step in the order the Pod runs it.
struct Placed<'a> {
    step: &'a StepPlan,
    /// Keys of the steps that must be done before it starts.
    after: Vec<String>,
    /// `when` of the step and of every enclosing group.
    guards: Vec<(StageStatus, Option<&'a CondPlan>)>,
}

/// Walk the step tree as Harness runs it: a sequence chains, a parallel block's
/// branches all start after what came before, and what follows waits for every branch.
fn place<'a>(
    nodes: &'a [Node],
    mut prev: Vec<String>,
    guards: &[(StageStatus, Option<&'a CondPlan>)],
    out: &mut Vec<Placed<'a>>,
) -> Vec<String> {
    for node in nodes {
        match node {
            Node::Step(s) => {
                let mut g = guards.to_vec();
                g.push((s.run_when, s.condition.as_ref()));
                out.push(Placed {
                    step: s,
                    after: prev.clone(),
                    guards: g,
                });
                if s.step_type != StepType::Background {
                    prev = vec![s.key.clone()];
                }
            }
            Node::Group(GroupPlan {
                run_when,
                condition,
                nodes,
                ..
            }) => {
                let mut g = guards.to_vec();
                g.push((*run_when, condition.as_ref()));
                prev = place(nodes, prev, &g, out);
            }
            Node::Parallel { nodes } => {
                let mut ends = Vec::new();
                for branch in nodes {
                    let end = place(std::slice::from_ref(branch), prev.clone(), guards, out);
                    for k in end {
                        if !ends.contains(&k) {
                            ends.push(k);
                        }
                    }
                }
                prev = ends;
            }
            Node::Loop(LoopPlan {
                max_concurrency,
                nodes,
                ..
            }) => {
                // Instances start together, as a parallel block; with `maxConcurrency: m`
                // instance i also waits for instance i-m, so at most m run at once.
                let window = max_concurrency.unwrap_or(nodes.len()).max(1);
                let mut instance_ends: Vec<Vec<String>> = Vec::new();
                let mut ends = Vec::new();
                for (i, instance) in nodes.iter().enumerate() {
                    let mut after = prev.clone();
                    if i >= window {
                        for k in &instance_ends[i - window] {
                            if !after.contains(k) {
                                after.push(k.clone());
                            }
                        }
                    }
                    let end = place(std::slice::from_ref(instance), after, guards, out);
                    for k in &end {
                        if !ends.contains(k) {
                            ends.push(k.clone());
                        }
                    }
                    instance_ends.push(end);
                }
                prev = ends;
            }
        }
    }
    prev
}

struct StageBuilder<'a, 'r> {
    plan: &'a Plan,
    stage: &'a StagePlan,
    opts: &'a KubeOptions,
    images: &'a KnownImages,
    refusals: &'r mut Vec<Refusal>,
    notes: Vec<String>,
}

impl StageBuilder<'_, '_> {
    fn refuse(&mut self, step: &StepPlan, message: impl Into<String>) {
        self.refusals.push(Refusal {
            loc: step.loc.to_string(),
            stage: (self.plan.stages.len() > 1).then(|| self.stage.identifier.clone()),
            step: Some(step.key.clone()),
            message: message.into(),
        });
    }

    fn build(&mut self) -> Option<Manifest> {
        let stage = self.stage;
        let before = self.refusals.len();
        let mut placed = Vec::new();
        place(&stage.nodes, Vec::new(), &[], &mut placed);
        // Stage flow belongs to the pipeline, which Kubernetes does not have: say what
        // decides whether and when this Pod is applied.
        let mut when = Vec::new();
        match stage.run_when {
            StageStatus::Success => {}
            StageStatus::Failure => when.push("only after an earlier stage failed".to_string()),
            StageStatus::All => when.push("whatever the earlier stages did".to_string()),
        }
        if let Some(c) = &stage.condition {
            when.push(format!("only if {}", c.display()));
        }
        if !when.is_empty() {
            self.notes.push(format!(
                "Stage `when`: Harness runs this stage {}. Kubernetes has no pipeline to \
                 decide it: apply this Pod only when that holds.",
                when.join(", and ")
            ));
        }
        if let Some(block) = stage.parallel {
            let siblings: Vec<String> = (self.plan.stages.iter())
                .filter(|s| s.parallel == Some(block) && s.identifier != stage.identifier)
                .map(|s| format!("`{}`", s.identifier))
                .collect();
            self.notes.push(format!(
                "Runs at the same time as stage(s) {}: apply their Pods together.",
                siblings.join(", ")
            ));
        }
        self.notes.push(format!(
            "Stage `{}` ({}) as one Pod, as Harness's Kubernetes build infrastructure runs \
             it: every step is a container of the Pod; they share its network (services \
             answer on localhost and, through hostAliases, on their step identifiers) and \
             an emptyDir workspace at {WORKSPACE}.",
            stage.identifier, stage.name
        ));
        self.notes.push(format!(
            "Order: Kubernetes starts a Pod's containers together, so each Run and Plugin \
             step runs under a small shell script (a static busybox copied from {} by the \
             init container `sandrun-tools`) that waits for the done markers of the steps \
             before it in {}, applies `when` and the failure strategy, and writes its exit \
             code and output variables there. Steps of a parallel block start together. A \
             step container killed before it finishes (OOM, image pull error) leaves no \
             marker: the steps after it wait until the Pod's activeDeadlineSeconds.",
            self.opts.helper_image,
            sequence::STATE_DIR
        ));

        if stage.clone_codebase {
            self.notes.push(format!(
                "The stage clones its codebase (cloneCodebase: true): Harness clones the \
                 repository into {WORKSPACE} before the first step, with the codebase \
                 connector's credentials, which the export does not have; here {WORKSPACE} \
                 starts empty: clone it in the first step."
            ));
        }
        let mut names = Names::default();
        let mut sidecars = Vec::new();
        let mut containers = Vec::new();
        let mut listening: BTreeMap<u16, String> = BTreeMap::new();
        let mut order_lines = Vec::new();
        let mut seen_step = false;
        for p in &placed {
            let step = p.step;
            for (_, cond) in &p.guards {
                let mut operands = Vec::new();
                if let Some(c) = cond {
                    c.walk(&mut |t| operands.push(t));
                }
                if let Some(stage) = earlier_stage_read(operands) {
                    self.refuse(step, cross_stage_reason(stage));
                }
            }
            if let Some(stage) = earlier_stage_read(step_templates(step)) {
                self.refuse(step, cross_stage_reason(stage));
            }
            let Some(container) = self.container(step, &mut names) else {
                continue;
            };
            match step.step_type {
                StepType::Background => {
                    let mut c = container;
                    c.restart_policy = Some("Always".into());
                    let ports = self.listening_ports(step);
                    for &port in &ports {
                        if let Some(other) = listening.get(&port) {
                            let message = format!(
                                "steps `{other}` and `{}` both listen on port {port} (their images' ExposedPorts): the containers of a Pod share one network, so only one of them can have it, as on Harness's Kubernetes infrastructure (move one to another port with its entrypoint or command, or run them in separate stages)",
                                step.key
                            );
                            self.refuse(step, message);
                        } else {
                            listening.insert(port, step.key.clone());
                        }
                    }
                    if let Some(&first) = ports.first() {
                        c.startup_probe = Some(Probe {
                            tcp_socket: Some(TCPSocketAction {
                                port: IntOrString::Int(i32::from(first)),
                                host: None,
                            }),
                            period_seconds: Some(1),
                            failure_threshold: Some(120),
                            ..Default::default()
                        });
                    }
                    order_lines.push(format!(
                        "sidecar `{}`: Background step `{}`{}",
                        c.name,
                        step.key,
                        match ports.as_slice() {
                            [] =>
                                " (no port known: no startup probe; the steps do not wait for it)"
                                    .to_string(),
                            [p] => format!(" (startup probe: TCP {p})"),
                            [p, rest @ ..] => format!(
                                " (startup probe: TCP {p}; also exposes {})",
                                rest.iter()
                                    .map(u16::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        }
                    ));
                    if seen_step {
                        self.notes.push(format!(
                            "Background step `{}` comes after other steps in the pipeline; as a native sidecar it starts with the Pod, before them.",
                            step.key
                        ));
                    }
                    if step.timeout.is_some() {
                        self.notes.push(format!(
                            "Background step `{}` has a timeout: a sidecar runs until the Pod ends, so it does not apply (Harness runs a Background step for the whole stage too).",
                            step.key
                        ));
                    }
                    sidecars.push(c);
                }
                StepType::Run | StepType::Plugin | StepType::Other(_) => {
                    seen_step = true;
                    let Some(c) = self.wrapped(step, p, container) else {
                        continue;
                    };
                    order_lines.push(format!(
                        "container `{}`: {} step `{}`{}",
                        c.name,
                        step.step_type,
                        step.key,
                        if p.after.is_empty() {
                            ", first".to_string()
                        } else {
                            format!(", after {}", quoted_list(&p.after))
                        }
                    ));
                    containers.push(c);
                }
            }
        }
        if self.refusals.len() > before {
            return None;
        }
        if containers.is_empty() {
            self.refusals.push(Refusal {
                loc: stage
                    .steps()
                    .first()
                    .map(|s| s.loc.to_string())
                    .unwrap_or_else(|| self.plan.source.display().to_string()),
                stage: None,
                step: None,
                message: format!(
                    "stage `{}` has no Run or Plugin step: a Pod needs at least one container besides its sidecars",
                    stage.identifier
                ),
            });
            return None;
        }
        self.notes.extend(order_lines);
        if !sidecars.is_empty() {
            self.notes.push(
                "Background steps run as sidecars until the last step has ended; one that exits \
                 early is started again by the kubelet (Harness marks it successful and goes on; \
                 `sandrun run` reports it failed)."
                    .into(),
            );
        }

        let (host_aliases, other_names) = self.host_aliases();
        let mut init = vec![self.tools_container(&other_names)];
        init.extend(sidecars);
        let spec = PodSpec {
            active_deadline_seconds: stage.timeout.map(|t| t.as_secs().max(1) as i64),
            containers,
            init_containers: Some(init),
            host_aliases,
            image_pull_secrets: self.pull_secrets(),
            restart_policy: Some("Never".into()),
            volumes: Some(self.volumes()),
            ..Default::default()
        };
        if stage.timeout.is_none() {
            self.notes
                .push("The stage has no timeout: the Pod has no activeDeadlineSeconds.".into());
        }
        let workload = self.workload(spec);
        Some(Manifest {
            stage: stage.identifier.clone(),
            notes: std::mem::take(&mut self.notes),
            workload,
        })
    }

    /// The container fields every step has, or `None` (refused).
    fn container(&mut self, step: &StepPlan, names: &mut Names) -> Option<Container> {
        if let Some(why) = &step.unsupported {
            self.refuse(step, format!("{why}; Kubernetes cannot run it either"));
            return None;
        }
        let Some(image) = &step.image else {
            self.refuse(
                step,
                "has no image: on Kubernetes there is no host to run it on (Harness requires an image on Kubernetes build infrastructure; give the step an `image`)",
            );
            return None;
        };
        if let Some(&(host, container)) = step.port_bindings.first() {
            self.refuse(
                step,
                format!(
                    "`portBindings` (host {host} -> container {container}): Harness refuses port bindings on Kubernetes: every step shares the Pod's network, so there is no host port to bind; remove them and call the service at localhost:{container}"
                ),
            );
        }
        if let Some(problem) = placeholder(&image.reference) {
            self.refuse(step, format!("its image {problem}"));
            return None;
        }
        let image_name = if crate::recipe::is_recipe_reference(&image.reference) {
            self.recipe_image(step, &image.reference, &image.source)?
        } else {
            self.image_name(&image.source)
        };
        let run_as_user = match &step.run_as_user {
            None => None,
            Some(u) => {
                match u.trim().parse::<i64>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.refuse(
                        step,
                        format!("runAsUser `{u}` is not a number: Kubernetes takes a numeric user id"),
                    );
                        return None;
                    }
                }
            }
        };
        let mut env = Vec::new();
        for (name, value) in &step.env {
            if value.step_refs().next().is_some() {
                continue;
            }
            let text = value.display();
            if let Some(id) = super::secret_of(&text) {
                env.push(self.secret_env(name, id));
                continue;
            }
            if let Some(problem) = placeholder(&text) {
                self.refuse(step, format!("env `{name}` {problem}"));
                continue;
            }
            env.push(EnvVar {
                name: name.clone(),
                value: Some(sequence::kubelet_literal(&text)),
                value_from: None,
            });
        }
        if !step.reports.is_empty() {
            self.notes.push(format!(
                "Step `{}` writes JUnit reports ({}): nothing collects them from the Pod; copy them out before it is deleted (kubectl cp).",
                step.key,
                step.reports.join(", ")
            ));
        }
        let security_context =
            (step.privileged || run_as_user.is_some()).then(|| SecurityContext {
                privileged: step.privileged.then_some(true),
                run_as_user,
                ..Default::default()
            });
        let mut mounts = vec![mount("harness", WORKSPACE)];
        for (i, path) in self.stage.shared_paths.iter().enumerate() {
            mounts.push(mount(&format!("shared-{i}"), path));
        }
        let mut c = Container {
            name: names.claim(&step.key),
            image: Some(image_name),
            image_pull_policy: Some(
                match image.pull_policy {
                    PullPolicy::Always => "Always",
                    PullPolicy::IfNotPresent => "IfNotPresent",
                    PullPolicy::Never => "Never",
                }
                .into(),
            ),
            env: (!env.is_empty()).then_some(env),
            resources: Some(step_resources(step)),
            security_context,
            volume_mounts: Some(mounts),
            working_dir: Some(WORKSPACE.into()),
            ..Default::default()
        };
        if step.step_type == StepType::Background {
            // A sidecar starts with the Pod: its command cannot wait for outputs.
            if !self.background_command_ok(step) {
                return None;
            }
            c.command = self.background_command(step);
        }
        Some(c)
    }

    /// The image as the cluster pulls it: by the lock file's digest when it pins it
    /// (the tag stays for readers; the kubelet pulls by the digest).
    fn image_name(&mut self, source: &str) -> String {
        match self.opts.pins.get(source) {
            Some(digest) if !source.contains('@') => {
                if let Some(lock) = &self.opts.lock_file {
                    let note = format!(
                        "Images pinned in {} are named by digest (a multi-platform image by its index).",
                        lock.display()
                    );
                    if !self.notes.contains(&note) {
                        self.notes.push(note);
                    }
                }
                format!("{source}@{digest}")
            }
            _ => source.to_string(),
        }
    }

    /// The image of a recipe step, by the digest of the image sandrun built from the
    /// recipe with its current lock: in the repository mapped to the recipe's name, else
    /// under the store's own name, with a note saying to push it first and how.
    ///
    /// An image not built yet is refused rather than built: the export only reads the
    /// plan and the store (as it does for a Plugin step's entrypoint, it never pulls or
    /// builds), its output goes straight to `kubectl apply`, and a build may download
    /// packages for minutes. The image has to be built and pushed before the cluster can
    /// pull it anyway, so the refusal names the command that comes first.
    fn recipe_image(&mut self, step: &StepPlan, reference: &str, source: &str) -> Option<String> {
        let opts = self.opts;
        let (name, tag, digest) = match opts.recipes.get(source) {
            Some(RecipeImage::Built { name, tag, digest }) => (name, tag, digest),
            other => {
                let why = match other {
                    Some(RecipeImage::NotBuilt(why)) => why.as_str(),
                    _ => "sandrun's store was not searched",
                };
                self.refuse(
                    step,
                    format!(
                        "image `{reference}` is a recipe whose image is not in sandrun's store ({why}); the export names it by that image's digest and never builds it: build it with `sandrun build {reference}`, export again and push the image as the comments of the output say"
                    ),
                );
                return None;
            }
        };
        let local = format!("localhost/{name}:{tag}");
        let archive = format!("{name}.tar");
        let push = |dest: &str| {
            format!(
                "sandrun save -o {archive} {local} && skopeo copy --preserve-digests oci-archive:{archive}:{local} docker://{dest}:{tag}"
            )
        };
        let (repository, note) = match opts.recipe_repositories.get(name) {
            Some(repository) => (
                repository.clone(),
                format!(
                    "Image recipe `{name}` ({reference}) is named {repository}:{tag} by the digest of the image sandrun built from it with its current lock ({local}). Push it there first, keeping that digest: {}",
                    push(repository)
                ),
            ),
            None => (
                format!("localhost/{name}"),
                format!(
                    "Image recipe `{name}` ({reference}) is named as sandrun's store names it, {local}, by the digest of the image built from it with its current lock: no registry has it, so the cluster cannot pull it yet. Push it first, keeping that digest: {}; then name the repository with --recipe-repository {name}=REGISTRY/REPOSITORY (or `kubernetes: recipe_repositories:` in sandrun's config file) and export again.",
                    push("REGISTRY/REPOSITORY")
                ),
            ),
        };
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
        Some(format!("{repository}:{tag}@{digest}"))
    }

    /// An environment variable from the Kubernetes Secret that stands for a Harness
    /// secret: named after the secret's identifier without its scope, key `value`.
    fn secret_env(&mut self, name: &str, id: &str) -> EnvVar {
        let bare = id.rsplit('.').next().unwrap_or(id);
        let secret = dns_label(bare);
        let note = format!(
            "Secret `{id}` comes from the Kubernetes Secret `{secret}` (key `value`); create it before applying: kubectl create secret generic {secret} --from-literal=value=...",
        );
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret,
                    key: "value".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        }
    }

    fn background_command_ok(&mut self, step: &StepPlan) -> bool {
        let reads_outputs = step.env.iter().any(|(_, t)| t.step_refs().next().is_some())
            || match &step.process {
                ProcessTemplate::Shell { script, .. } => script.step_refs().next().is_some(),
                ProcessTemplate::Exec { argv } => {
                    argv.iter().any(|t| t.step_refs().next().is_some())
                }
                ProcessTemplate::ImageDefault => false,
            };
        if reads_outputs {
            self.refuse(
                step,
                "reads other steps' output variables: as a native sidecar it starts with the Pod, before any step has run",
            );
        }
        !reads_outputs
    }

    fn background_command(&mut self, step: &StepPlan) -> Option<Vec<String>> {
        let argv: Vec<String> = match &step.process {
            ProcessTemplate::ImageDefault => return None,
            ProcessTemplate::Shell { shell, script } => shell.argv(&script.display()),
            ProcessTemplate::Exec { argv } => argv.iter().map(Template::display).collect(),
        };
        for a in &argv {
            if let Some(problem) = placeholder(a) {
                self.refuse(step, format!("its command {problem}"));
            }
        }
        Some(argv.iter().map(|a| sequence::kubelet_literal(a)).collect())
    }

    /// The ports a Background step listens on: its image's `ExposedPorts`, when the step
    /// runs the image's own entrypoint and the store has the image.
    fn listening_ports(&self, step: &StepPlan) -> Vec<u16> {
        // With its own entrypoint or command a service may listen anywhere (Harness's
        // "multiple PostgreSQL instances" moves one with its entrypoint).
        if !matches!(step.process, ProcessTemplate::ImageDefault) {
            return Vec::new();
        }
        step.image
            .as_ref()
            .and_then(|i| self.images.get(&i.source))
            .map(|f| f.exposed_tcp.clone())
            .unwrap_or_default()
    }

    /// A Run or Plugin step's container: its command runs under the sequencing wrapper.
    fn wrapped(&mut self, step: &StepPlan, p: &Placed<'_>, mut c: Container) -> Option<Container> {
        let out_dir = sequence::output_dir(&step.key);
        let argv: Vec<Template> = match &step.process {
            ProcessTemplate::Shell { shell, script } => {
                let mut full = shell.argv("");
                let prefix = full.pop().unwrap_or_default();
                let mut body = Template::literal(prefix);
                body.parts.extend(script.parts.iter().cloned());
                if !step.output_variables.is_empty() {
                    body.parts.push(TemplatePart::Text(output_trailer(
                        *shell,
                        &step.output_variables,
                        std::path::Path::new(&out_dir),
                    )));
                }
                full.into_iter()
                    .map(Template::literal)
                    .chain([body])
                    .collect()
            }
            ProcessTemplate::Exec { argv } => argv.clone(),
            ProcessTemplate::ImageDefault => {
                let facts = step.image.as_ref().and_then(|i| self.images.get(&i.source));
                match facts {
                    Some(f) if !f.entrypoint.is_empty() || !f.cmd.is_empty() => f
                        .entrypoint
                        .iter()
                        .chain(&f.cmd)
                        .map(|s| Template::literal(s.as_str()))
                        .collect(),
                    _ => {
                        self.refuse(
                            step,
                            format!(
                                "runs its image's own entrypoint, which sandrun does not know for `{}` (not in sandrun's store): `sandrun pull` the pipeline first, so that the step's wrapper can start that entrypoint after the steps before it",
                                step.image.as_ref().map(|i| i.source.as_str()).unwrap_or_default()
                            ),
                        );
                        return None;
                    }
                }
            }
        };
        if !step.output_variables.is_empty()
            && !matches!(step.process, ProcessTemplate::Shell { .. })
        {
            self.refuse(step, "has output variables but no script to read them from");
            return None;
        }
        for a in &argv {
            if let Some(problem) = placeholder(&a.display()) {
                self.refuse(step, format!("its command {problem}"));
                return None;
            }
        }
        let dynamic_env: Vec<(String, Template)> = step
            .env
            .iter()
            .filter(|(_, t)| t.step_refs().next().is_some())
            .cloned()
            .collect();
        for (name, value) in &dynamic_env {
            if let Some(problem) = placeholder(&value.display()) {
                self.refuse(step, format!("env `{name}` {problem}"));
                return None;
            }
        }
        let script = sequence::script(&StepScript {
            key: &step.key,
            after: &p.after,
            guards: &p.guards,
            dynamic_env: &dynamic_env,
            argv: &argv,
            timeout: step.timeout,
            on_failure: &step.on_failure,
        });
        c.command = Some(vec![
            sequence::BUSYBOX.into(),
            "sh".into(),
            "-c".into(),
            script,
        ]);
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount("sandrun", sequence::STATE_MOUNT));
        Some(c)
    }

    /// The init container that copies the wrappers' busybox into the `sandrun` volume
    /// and adds the step names hostAliases cannot hold to the Pod's /etc/hosts.
    fn tools_container(&self, other_names: &[String]) -> Container {
        let bin = std::path::Path::new(sequence::BUSYBOX);
        let dir = bin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        // Steps may run as other users (runAsUser): all of them write their markers.
        let mut script = format!(
            "mkdir -p {dir} {state}/out && chmod 1777 {state} {state}/out && cp /bin/busybox {bin}",
            state = sequence::STATE_DIR,
            bin = sequence::BUSYBOX
        );
        if !other_names.is_empty() {
            let names = other_names.join(" ");
            script.push_str(&format!(
                "\n{{ echo '127.0.0.1 {names}' >> /etc/hosts; }} 2>/dev/null || echo 'sandrun: /etc/hosts is read-only: call {names} on localhost' >&2"
            ));
        }
        Container {
            name: "sandrun-tools".into(),
            image: Some(self.opts.helper_image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                script,
            ]),
            resources: Some(requirements(
                (ADDON_CPU_MILLIS, ADDON_MEMORY),
                (ADDON_CPU_MILLIS, ADDON_MEMORY),
            )),
            volume_mounts: Some(vec![mount("sandrun", sequence::STATE_MOUNT)]),
            ..Default::default()
        }
    }

    /// Every step's names on 127.0.0.1, since the Pod's containers share its network:
    /// hostAliases for those Kubernetes accepts there (lowercase DNS names), and the
    /// rest (identifiers with `_`, `Group_Step`) for the tools container to add.
    fn host_aliases(&mut self) -> (Option<Vec<HostAlias>>, Vec<String>) {
        let mut names = BTreeSet::new();
        let mut other = BTreeSet::new();
        for step in self.stage.steps() {
            for name in &step.hostnames {
                let lower = name.to_ascii_lowercase();
                if is_dns_subdomain(&lower) {
                    names.insert(lower);
                } else if valid_hosts_name(name) {
                    other.insert(name.clone());
                }
            }
        }
        let other: Vec<String> = other.into_iter().collect();
        if !other.is_empty() {
            self.notes.push(format!(
                "Kubernetes takes only lowercase DNS names in hostAliases: {} are added to the Pod's /etc/hosts (one file, written by the kubelet, shared by its containers) by the init container `sandrun-tools`; where the runtime mounts it read-only, call them on localhost, as Harness's docs say for Kubernetes.",
                quoted_list(&other)
            ));
        }
        let aliases = (!names.is_empty()).then(|| {
            vec![HostAlias {
                ip: "127.0.0.1".into(),
                hostnames: Some(names.into_iter().collect()),
            }]
        });
        (aliases, other)
    }

    fn pull_secrets(&mut self) -> Option<Vec<LocalObjectReference>> {
        let mut secrets = BTreeSet::new();
        let mut unmapped: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for step in self.stage.steps() {
            let Some(connector) = step.image.as_ref().and_then(|i| i.connector_ref.as_ref()) else {
                continue;
            };
            match self.opts.pull_secrets.get(connector) {
                Some(secret) => {
                    secrets.insert(secret.clone());
                }
                None => unmapped
                    .entry(connector)
                    .or_default()
                    .push(step.key.clone()),
            }
        }
        for (connector, steps) in unmapped {
            self.notes.push(format!(
                "Connector `{connector}` (steps {}) has no pull Secret: those images are pulled without credentials (map it with --pull-secret {connector}=SECRET or `kubernetes: pull_secrets:` in sandrun's config file).",
                quoted_list(&steps)
            ));
        }
        (!secrets.is_empty()).then(|| {
            secrets
                .into_iter()
                .map(|name| LocalObjectReference { name })
                .collect()
        })
    }

    fn volumes(&self) -> Vec<Volume> {
        let empty = |name: String| Volume {
            name,
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        };
        let mut v = vec![empty("harness".into()), empty("sandrun".into())];
        for i in 0..self.stage.shared_paths.len() {
            v.push(empty(format!("shared-{i}")));
        }
        v
    }

    fn metadata(&self, with_name: bool) -> ObjectMeta {
        let stage = self.stage;
        let mut labels = BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            "sandrun".to_string(),
        )]);
        let label = dns_label(&stage.identifier);
        labels.insert("sandrun.dev/stage".into(), label.clone());
        let mut annotations = BTreeMap::from([(
            "sandrun.dev/stage-identifier".to_string(),
            stage.identifier.clone(),
        )]);
        if let Some(p) = &self.plan.pipeline {
            annotations.insert(
                "sandrun.dev/pipeline-identifier".into(),
                p.identifier.clone(),
            );
        }
        ObjectMeta {
            name: with_name.then(|| object_name(&label)),
            namespace: if with_name {
                self.opts.namespace.clone()
            } else {
                None
            },
            labels: Some(labels),
            annotations: with_name.then_some(annotations),
            ..Default::default()
        }
    }

    fn workload(&self, spec: PodSpec) -> Workload {
        if !self.opts.job {
            return Workload::Pod(Box::new(Pod {
                metadata: self.metadata(true),
                spec: Some(spec),
                status: None,
            }));
        }
        Workload::Job(Box::new(Job {
            metadata: self.metadata(true),
            spec: Some(JobSpec {
                // Harness does not run a failed stage again on its own.
                backoff_limit: Some(0),
                active_deadline_seconds: spec.active_deadline_seconds,
                template: PodTemplateSpec {
                    metadata: Some(self.metadata(false)),
                    spec: Some(spec),
                },
                ..Default::default()
            }),
            status: None,
        }))
    }
}

/// Limits as the step sets them, else Harness's defaults; requests at Harness's minimum
/// (never above the limit).
fn step_resources(step: &StepPlan) -> ResourceRequirements {
    let cpu = step.resources.cpu_millis.unwrap_or(STEP_CPU_LIMIT_MILLIS);
    let memory = step.resources.memory.unwrap_or(STEP_MEMORY_LIMIT);
    requirements(
        (
            STEP_CPU_REQUEST_MILLIS.min(cpu),
            STEP_MEMORY_REQUEST.min(memory),
        ),
        (cpu, memory),
    )
}

fn requirements(requests: (u64, u64), limits: (u64, u64)) -> ResourceRequirements {
    let list = |(cpu, mem): (u64, u64)| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu_quantity(cpu))),
            ("memory".to_string(), Quantity(memory_quantity(mem))),
        ])
    };
    ResourceRequirements {
        requests: Some(list(requests)),
        limits: Some(list(limits)),
        claims: None,
    }
}

/// Whole cores as Kubernetes writes them back (`1`, not `1000m`).
fn cpu_quantity(millis: u64) -> String {
    if millis > 0 && millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

fn memory_quantity(bytes: u64) -> String {
    for (unit, size) in [("Gi", 1024 * MI), ("Mi", MI), ("Ki", 1024)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

/// Why a value cannot go into a manifest: the plan holds a placeholder (the export
/// never writes secret values; an unanswered `<+input>`).
fn placeholder(text: &str) -> Option<String> {
    if text.contains("<secret>") {
        Some("uses a secret the export cannot name (a Secret variable whose value is not `<+secrets.getValue(\"ID\")>`); sandrun never writes secret values into manifests".into())
    } else if super::holds_secret(text) {
        Some("uses a secret inside other text: sandrun never writes secret values into manifests, and Kubernetes can only give a whole environment variable from a Secret (set an env variable to exactly `<+secrets.getValue(\"ID\")>` and use that variable instead)".into())
    } else if text.contains("<input>") {
        Some("is a runtime input without an answer: give it with --set".into())
    } else {
        None
    }
}

/// Container names: DNS labels, unique in the Pod.
#[derive(Default)]
struct Names {
    used: BTreeSet<String>,
}

impl Names {
    fn claim(&mut self, key: &str) -> String {
        let base = dns_label(key);
        let mut name = base.clone();
        let mut n = 2;
        while !self.used.insert(name.clone()) || name == "sandrun-tools" {
            let suffix = format!("-{n}");
            let keep = 63 - suffix.len();
            name = format!(
                "{}{suffix}",
                base[..base.len().min(keep)].trim_end_matches('-')
            );
            n += 1;
        }
        name
    }
}

/// `sandrun-STAGE`, at most 63 characters: a Job's name becomes its Pods' `job-name`
/// label, which Kubernetes caps at 63.
fn object_name(stage_label: &str) -> String {
    let mut name = format!("sandrun-{stage_label}");
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// A DNS-1123 label from an identifier: lowercase, `_` and `.` as `-`, at most 63.
fn dns_label(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let mut out: String = trimmed.chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        "step".into()
    } else {
        out
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// A name safe to write into /etc/hosts unquoted (Harness identifiers always are).
fn valid_hosts_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every template of a step's command and environment.
fn step_templates(step: &StepPlan) -> Vec<&Template> {
    let mut out: Vec<&Template> = step.env.iter().map(|(_, t)| t).collect();
    match &step.process {
        ProcessTemplate::Shell { script, .. } => out.push(script),
        ProcessTemplate::Exec { argv } => out.extend(argv),
        ProcessTemplate::ImageDefault => {}
    }
    out
}

/// The first earlier stage whose step outputs one of `templates` reads.
fn earlier_stage_read<'a>(templates: impl IntoIterator<Item = &'a Template>) -> Option<&'a str> {
    templates
        .into_iter()
        .flat_map(|t| &t.parts)
        .find_map(|p| match p {
            TemplatePart::StepOutput {
                stage: Some(stage), ..
            } => Some(stage.as_str()),
            _ => None,
        })
}

fn cross_stage_reason(stage: &str) -> String {
    format!(
        "reads output variables of stage `{stage}`: every stage is a Pod of its own, and \
         outputs do not cross Pods (pass the value as a stage variable with `--set`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_and_unique() {
        let mut n = Names::default();
        assert_eq!(n.claim("Build.unit_Tests"), "build-unit-tests");
        assert_eq!(n.claim("build.unit-tests"), "build-unit-tests-2");
        assert_eq!(n.claim("_x_"), "x");
        assert_eq!(n.claim("sandrun_tools"), "sandrun-tools-2");
        assert_eq!(n.claim(&"a".repeat(80)).len(), 63);
        assert_eq!(object_name(&"b".repeat(63)).len(), 63);
        assert_eq!(
            object_name(&format!("{}-c", "b".repeat(54))),
            format!("sandrun-{}", "b".repeat(54))
        );
    }

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        assert_eq!(memory_quantity(500 * MI), "500Mi");
        assert_eq!(memory_quantity(2 * 1024 * MI), "2Gi");
        assert_eq!(memory_quantity(1000), "1000");
        assert_eq!(memory_quantity(1536), "1536");
        assert_eq!(cpu_quantity(2000), "2");
        assert_eq!(cpu_quantity(1500), "1500m");
        assert!(is_dns_subdomain("users-db"));
        assert!(!is_dns_subdomain("users_db"));
    }

    #[test]
    fn comments_wrap_at_spaces() {
        let lines = wrap(&"word ".repeat(30), 20);
        assert!(lines.iter().all(|l| l.len() <= 22), "{lines:?}");
        assert!(lines[1].starts_with("  word"));
    }
}
