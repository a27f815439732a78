//! The typed pipeline: what a Harness CI v0 file says, after parsing and validation,
//! before anything is resolved. Every item keeps the location it came from so that later
//! layers (plan, run) can still point at the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A position in a source file (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A `timeout` field: a duration as written, or an expression the plan resolves
/// (`timeout: <+pipeline.variables.build_timeout>`) and then reads as a duration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Timeout {
    Fixed(Duration),
    Expr {
        text: String,
        /// Where the value is written.
        loc: Location,
    },
}

/// A parsed file: either a whole `pipeline:` or a single `stage:`.
#[derive(Clone, Debug)]
pub struct PipelineFile {
    pub path: PathBuf,
    /// `None` when the file holds a single `stage:`.
    pub pipeline: Option<PipelineInfo>,
    pub stages: Vec<Stage>,
    /// Every expression only Harness's server can answer, where it is read.
    pub server_inputs: Vec<ServerInput>,
    /// Fields Harness's editor writes that mean nothing on one machine
    /// (`delegateSelectors`, `tags`, `notificationRules`, an empty `timeout`…),
    /// accepted and left unused: `plan` lists them.
    pub ignored: Vec<IgnoredField>,
    /// Runtime inputs that looping strategies need and nobody answered: one instance
    /// stood in for each while reading; `plan` asks for them before a run.
    pub unanswered: Vec<UnansweredInput>,
}

/// A runtime input a looping strategy needs, unanswered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnansweredInput {
    /// The stage it belongs to (as `--stage` names it); `None` at pipeline level.
    pub stage: Option<String>,
    pub loc: Location,
    /// What to answer, and how.
    pub message: String,
}

/// A field accepted and left unused, where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredField {
    pub loc: Location,
    /// The field's key.
    pub field: String,
    /// What holds it (`pipeline `p``, `step `build``).
    pub within: String,
}

/// A value only Harness's server knows (`<+trigger.branch>`, `<+variable.org.x>`...),
/// read by an expression: the user gives it with `--set KEY=VALUE` or a values file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInput {
    /// The expression's path, the key of its answer (`trigger.branch`).
    pub key: String,
    /// Identifier of the stage the expression is in (`None` at pipeline level).
    pub stage: Option<String>,
    pub loc: Location,
}

#[derive(Clone, Debug)]
pub struct PipelineInfo {
    pub identifier: String,
    pub name: String,
    pub variables: Vec<Variable>,
    /// Pipeline-level `timeout`.
    pub timeout: Option<Timeout>,
    /// Set when the pipeline comes from a pipeline template.
    pub template: Option<TemplateOrigin>,
    pub loc: Location,
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub identifier: String,
    pub name: String,
    /// The stage `type` as written (`CI`, `Deployment`, `Approval`...). Only `CI` runs.
    pub stage_type: String,
    pub variables: Vec<Variable>,
    /// `None` for stages that are not `CI` (they are reported as skipped).
    pub spec: Option<CiStageSpec>,
    pub timeout: Option<Timeout>,
    /// Stage `when`: `stage_status` holds the stage's `pipelineStatus`.
    pub when: Option<When>,
    /// Apply to steps (and groups) that have none of their own.
    pub failure_strategies: Vec<FailureStrategy>,
    /// Set when the stage is one instance of a looping strategy.
    pub instance: Option<StageInstance>,
    /// Set when the stage comes from a stage template.
    pub template: Option<TemplateOrigin>,
    /// The `parallel` block of `stages` this stage belongs to (the index of the block's
    /// first stage); the stages of one block run at the same time.
    pub parallel: Option<usize>,
    pub loc: Location,
}

/// A stage that a looping strategy made: which one, and its place among its siblings
/// (which follow it directly in [`PipelineFile::stages`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StageInstance {
    /// The identifier as written, without the instance's postfix.
    pub of: String,
    pub kind: LoopKind,
    /// 0-based.
    pub index: usize,
    pub count: usize,
    pub max_concurrency: Option<usize>,
}

/// Which looping strategy made a set of instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopKind {
    Matrix,
    Parallelism,
    Repeat,
}

/// The template a pipeline, stage, step group or step was inlined from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateOrigin {
    /// `templateRef` as written (`account.build`, `org.build`, `build`).
    pub reference: String,
    pub version: String,
    /// Where the template file defines it.
    pub loc: Location,
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "template `{}` version `{}` ({})",
            self.reference, self.version, self.loc
        )
    }
}

#[derive(Clone, Debug)]
pub struct CiStageSpec {
    pub infrastructure: Infrastructure,
    /// Stage `sharedPaths` (and those of its step groups).
    pub shared_paths: Vec<String>,
    /// `cloneCodebase` (default false). Locally the workspace already is the codebase.
    pub clone_codebase: bool,
    /// `platform`, when written.
    pub platform: Option<Platform>,
    /// Legacy `serviceDependencies`, as Background steps that start before `steps`.
    pub service_dependencies: Vec<Step>,
    pub steps: Vec<StepItem>,
}

/// Stage `platform`: sandrun runs Linux stages only; `arch` is checked by the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// `Linux` (other systems are refused while parsing).
    pub os: String,
    /// `Amd64` or `Arm64`.
    pub arch: String,
}

/// Where Harness would run the stage: decides the default network mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Infrastructure {
    /// `runtime.type: Cloud`, or nothing said.
    Cloud,
    /// `runtime.type: Docker` (local runner).
    Docker,
    /// `infrastructure.type: VM`.
    Vm,
    /// `infrastructure.type: KubernetesDirect`: steps share one Pod network.
    KubernetesDirect,
    /// `infrastructure.useFromStage`: same as the named stage.
    UseFromStage(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VariableType {
    String,
    Number,
    Secret,
}

#[derive(Clone, Debug)]
pub struct Variable {
    pub name: String,
    pub var_type: VariableType,
    /// The value as written; may hold `<+...>` expressions (e.g. `<+input>`,
    /// `<+secrets.getValue("x")>`). For `Secret` it names a secret.
    pub value: String,
    pub default: Option<String>,
    pub required: bool,
    pub loc: Location,
}

/// One item of a `steps:` list.
// Steps dominate these lists; boxing them would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum StepItem {
    Step(Step),
    Parallel(Vec<StepItem>, Location),
    Group(StepGroup),
    /// The instances a looping strategy made of one step or step group: they run side
    /// by side like a `parallel` block, at most `max_concurrency` at once.
    Loop(Loop),
}

#[derive(Clone, Debug)]
pub struct Loop {
    /// The identifier as written, without the instances' postfixes.
    pub identifier: String,
    pub kind: LoopKind,
    pub max_concurrency: Option<usize>,
    pub instances: Vec<StepItem>,
    pub loc: Location,
}

#[derive(Clone, Debug)]
pub struct StepGroup {
    pub identifier: String,
    pub name: String,
    pub steps: Vec<StepItem>,
    pub variables: Vec<Variable>,
    pub when: Option<When>,
    pub failure_strategies: Vec<FailureStrategy>,
    pub template: Option<TemplateOrigin>,
    pub loc: Location,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub identifier: String,
    pub name: String,
    pub description: Option<String>,
    pub timeout: Option<Timeout>,
    pub when: Option<When>,
    pub failure_strategies: Vec<FailureStrategy>,
    pub kind: StepKind,
    pub template: Option<TemplateOrigin>,
    /// Typed fields written as expressions, for the plan to resolve.
    pub expr_fields: Vec<ExprField>,
    pub loc: Location,
}

#[derive(Clone, Debug)]
pub enum StepKind {
    Run(RunSpec),
    Background(BackgroundSpec),
    Plugin(PluginSpec),
    /// A step type sandrun cannot run (BuildAndPushDockerRegistry, SaveCacheS3, ...).
    Unsupported {
        step_type: String,
        reason: String,
    },
}

impl StepKind {
    pub fn type_name(&self) -> &str {
        match self {
            StepKind::Run(_) => "Run",
            StepKind::Background(_) => "Background",
            StepKind::Plugin(_) => "Plugin",
            StepKind::Unsupported { step_type, .. } => step_type,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Shell {
    Sh,
    Bash,
    Powershell,
    Pwsh,
    Python,
}

impl Shell {
    pub const NAMES: &'static [&'static str] = &["Sh", "Bash", "Powershell", "Pwsh", "Python"];

    /// The shell a `shell` field names, spelled as Harness spells it.
    pub fn from_name(name: &str) -> Option<Shell> {
        Some(match name {
            "Sh" => Shell::Sh,
            "Bash" => Shell::Bash,
            "Powershell" => Shell::Powershell,
            "Pwsh" => Shell::Pwsh,
            "Python" => Shell::Python,
            _ => return None,
        })
    }

    /// The command line that runs `script` in this shell, as Harness runs it: Sh and
    /// Bash fail on the first error (`set -e`); there is no `powershell` on Linux, so
    /// PowerShell 7 (`pwsh`) runs both PowerShell shells.
    pub fn argv(self, script: &str) -> Vec<String> {
        let (program, flag, prefix) = self.parts();
        vec![program.into(), flag.into(), format!("{prefix}{script}")]
    }

    /// Program, inline-script flag and the lines that go before the script.
    fn parts(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Shell::Sh => ("sh", "-c", "set -e\n"),
            Shell::Bash => ("bash", "-c", "set -e\n"),
            Shell::Python => ("python3", "-c", ""),
            Shell::Powershell | Shell::Pwsh => ("pwsh", "-Command", ""),
        }
    }

    /// A script too long for one argument (Linux caps each at 128 KiB) runs from a
    /// file instead: its name (the extension matters to `pwsh -File`), its contents and
    /// the command line that runs it from `dir`.
    pub fn script_file(self, script: &str, dir: &str) -> (&'static str, String, Vec<String>) {
        let (program, _, prefix) = self.parts();
        let name = match self {
            Shell::Sh | Shell::Bash => "script.sh",
            Shell::Python => "script.py",
            Shell::Powershell | Shell::Pwsh => "script.ps1",
        };
        let path = format!("{}/{name}", dir.trim_end_matches('/'));
        let argv = match self {
            Shell::Powershell | Shell::Pwsh => vec![program.into(), "-File".into(), path],
            _ => vec![program.into(), path],
        };
        (name, format!("{prefix}{script}"), argv)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub const NAMES: &'static [&'static str] = &["Always", "IfNotPresent", "Never"];

    pub fn from_name(name: &str) -> Option<PullPolicy> {
        Some(match name {
            "Always" => PullPolicy::Always,
            "IfNotPresent" => PullPolicy::IfNotPresent,
            "Never" => PullPolicy::Never,
            _ => return None,
        })
    }
}

/// A step field written as an expression (`privileged: <+pipeline.variables.dind>`):
/// the plan resolves it before the run and reads the value as the field's type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprField {
    pub field: StepField,
    pub text: String,
    /// Where the value is written.
    pub loc: Location,
}

/// The step fields that may be written as an expression besides strings and `timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepField {
    Privileged,
    PullPolicy,
    RunAsUser,
    Shell,
    Memory,
    Cpu,
}

impl StepField {
    /// The field as the YAML names it.
    pub fn key(self) -> &'static str {
        match self {
            StepField::Privileged => "privileged",
            StepField::PullPolicy => "imagePullPolicy",
            StepField::RunAsUser => "runAsUser",
            StepField::Shell => "shell",
            StepField::Memory => "resources.limits.memory",
            StepField::Cpu => "resources.limits.cpu",
        }
    }
}

/// Fields shared by the container-running step types.
#[derive(Clone, Debug, Default)]
pub struct ContainerFields {
    /// `None`: run the host's binaries (Harness's "leave Image blank").
    pub image: Option<String>,
    /// Where `image` is written (for references checked once their expressions are
    /// resolved).
    pub image_at: Option<Location>,
    pub connector_ref: Option<String>,
    pub pull_policy: Option<PullPolicy>,
    pub privileged: bool,
    pub run_as_user: Option<String>,
    pub resources: Resources,
    pub env: BTreeMap<String, String>,
    pub reports: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Resources {
    /// Bytes.
    pub memory: Option<u64>,
    /// Millicores (`400m` = 400, `0.5` = 500, `2` = 2000).
    pub cpu_millis: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct RunSpec {
    pub container: ContainerFields,
    pub shell: Option<Shell>,
    pub command: String,
    pub output_variables: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct BackgroundSpec {
    pub container: ContainerFields,
    pub shell: Option<Shell>,
    pub command: Option<String>,
    /// When set, it replaces the image entrypoint and `command` is dropped.
    pub entrypoint: Option<Vec<String>>,
    /// host port -> container port.
    pub port_bindings: Vec<(u16, u16)>,
}

#[derive(Clone, Debug)]
pub struct PluginSpec {
    pub container: ContainerFields,
    pub uses: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    /// `settings`, already flattened to `PLUGIN_<KEY>` environment values.
    pub settings: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StageStatus {
    Success,
    Failure,
    All,
}

#[derive(Clone, Debug)]
pub struct When {
    pub stage_status: StageStatus,
    /// A JEXL condition as written; sandrun evaluates the simple forms it supports.
    pub condition: Option<String>,
}

#[derive(Clone, Debug)]
pub struct FailureStrategy {
    /// Error kinds as written (`AllErrors`, `Timeout`, `Unknown`...).
    pub errors: Vec<String>,
    pub action: FailureAction,
}

#[derive(Clone, Debug)]
pub enum FailureAction {
    Ignore,
    Retry {
        count: u32,
        intervals: Vec<Duration>,
        on_retry_failure: Box<FailureAction>,
    },
    MarkAsSuccess,
    MarkAsFailure,
    Abort,
}
