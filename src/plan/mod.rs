//! The plan: everything about a run decided before the first step starts.
//!
//! A `Plan` is plain data built from a parsed pipeline plus the user's answers
//! (`--set`, `--secret`, the workspace's git facts). Expressions known up front are
//! substituted here; step outputs, which only exist while the stage runs, stay as
//! [`Template`] parts for the executor. Printing a plan (`sandrun plan`) shows exactly
//! what a run will do, so the executor never has to decide anything the user cannot see.

mod build;
mod display;

pub use build::{build, PlanInputs, RunIds};
pub use display::render;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use crate::net::{NetworkMode, NetworkPlan};
use crate::pipeline::expr::Condition;
use crate::pipeline::{
    Location, LoopKind, PullPolicy, Resources, Shell, StageInstance, StageStatus,
};

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub source: PathBuf,
    pub pipeline: Option<PipelineName>,
    pub workspace: PathBuf,
    pub stages: Vec<StagePlan>,
    /// Harness's built-in variables that every step gets under its own
    /// (`HARNESS_BUILD_ID`, `CI`, the `DRONE_*` commit facts…). The executor adds the two
    /// that depend on the stage and the step's kind: `HARNESS_STAGE_ID` and
    /// `HARNESS_WORKSPACE`.
    pub builtin_env: Vec<(String, String)>,
    /// Fields Harness's editor writes that mean nothing on one machine, accepted and
    /// left unused, each as `file:line:col: `field` in WHAT`.
    pub ignored: Vec<String>,
    /// Every secret value the plan knows: consumers mask them in anything they print.
    #[serde(skip)]
    pub secrets: Secrets,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineName {
    pub identifier: String,
    pub name: String,
    /// The template the pipeline was inlined from (`template `ID` version `V` (file:line)`).
    pub template: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    pub identifier: String,
    pub name: String,
    /// Why the stage will not run (`None` when it runs).
    pub skipped: Option<String>,
    /// Stage `when.pipelineStatus`: whether the stage runs after an earlier stage failed.
    pub run_when: StageStatus,
    /// Stage `when.condition`, evaluated when the stage would start.
    pub condition: Option<CondPlan>,
    /// The `parallel` block of `stages` the stage belongs to: the stages of one block
    /// start together, each on its own network ([`crate::pipeline::Stage::parallel`]).
    pub parallel: Option<usize>,
    pub network: NetworkChoice,
    /// Addresses and names of every step (`None` for a skipped stage).
    pub net: Option<NetworkPlan>,
    /// `sharedPaths`: directories every container step of the stage shares.
    pub shared_paths: Vec<String>,
    /// `cloneCodebase`: Harness clones the repository into the workspace before the
    /// first step; locally the workspace already is the codebase.
    pub clone_codebase: bool,
    /// Things the pipeline asks for that this run cannot honour in full, said before
    /// anything starts (`file:line:col: what`).
    pub warnings: Vec<String>,
    pub timeout: Option<Duration>,
    pub nodes: Vec<Node>,
    /// Set when a looping strategy made this stage.
    pub instance: Option<StageInstance>,
    /// The template the stage was inlined from (`template `ID` version `V` (file:line)`).
    pub template: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetworkChoice {
    pub mode: NetworkMode,
    /// Why this mode: the stage's infrastructure, or `--network`.
    pub reason: String,
}

/// The stage's step tree, in execution order.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "node", rename_all = "lowercase")]
pub enum Node {
    Step(Box<StepPlan>),
    Parallel {
        nodes: Vec<Node>,
    },
    Group(GroupPlan),
    /// The instances of a looped step or step group: side by side, at most
    /// `max_concurrency` at once.
    Loop(LoopPlan),
}

#[derive(Clone, Debug, Serialize)]
pub struct LoopPlan {
    /// The identifier as written, without the instances' postfixes.
    pub identifier: String,
    pub kind: LoopKind,
    /// `None`: every instance at once.
    pub max_concurrency: Option<usize>,
    pub nodes: Vec<Node>,
}

impl Node {
    /// Every step below this node, depth first.
    pub fn steps(&self) -> Vec<&StepPlan> {
        let mut out = Vec::new();
        self.collect_steps(&mut out);
        out
    }

    fn collect_steps<'a>(&'a self, out: &mut Vec<&'a StepPlan>) {
        match self {
            Node::Step(s) => out.push(s),
            Node::Parallel { nodes }
            | Node::Group(GroupPlan { nodes, .. })
            | Node::Loop(LoopPlan { nodes, .. }) => {
                for n in nodes {
                    n.collect_steps(out);
                }
            }
        }
    }
}

impl StagePlan {
    pub fn steps(&self) -> Vec<&StepPlan> {
        self.nodes.iter().flat_map(|n| n.steps()).collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupPlan {
    pub identifier: String,
    pub name: String,
    /// Key of the group: enclosing group identifiers and its own, joined by `.`.
    pub key: String,
    pub run_when: StageStatus,
    pub condition: Option<CondPlan>,
    pub nodes: Vec<Node>,
    /// The template the group was inlined from.
    pub template: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StepType {
    Run,
    Background,
    Plugin,
    /// A step type sandrun does not run (`GitClone`, `BuildAndPushDockerRegistry`…),
    /// by its own name.
    Other(String),
}

impl std::fmt::Display for StepType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepType::Run => "Run",
            StepType::Background => "Background",
            StepType::Plugin => "Plugin",
            StepType::Other(name) => name,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StepPlan {
    /// Unique within the stage: enclosing group identifiers and the step's, joined by `.`.
    pub key: String,
    pub identifier: String,
    pub name: String,
    pub step_type: StepType,
    /// Set when the step cannot run here and `--skip-unsupported` skips it.
    pub unsupported: Option<String>,
    pub image: Option<ImagePlan>,
    pub process: ProcessTemplate,
    /// Stage variables, group variables, then the step's own `envVariables`.
    pub env: Vec<(String, Template)>,
    pub output_variables: Vec<String>,
    /// host port -> container port.
    pub port_bindings: Vec<(u16, u16)>,
    pub reports: Vec<String>,
    pub timeout: Option<Duration>,
    pub run_when: StageStatus,
    /// `when.condition`, evaluated just before the step would start.
    pub condition: Option<CondPlan>,
    pub on_failure: FailurePolicy,
    pub privileged: bool,
    pub run_as_user: Option<String>,
    pub resources: Resources,
    /// Names other steps use for this one (identifier; `Group_Step` inside groups).
    pub hostnames: Vec<String>,
    /// Address on the stage network, once the network layer has allocated one.
    pub address: Option<Ipv4Addr>,
    /// The template the step was inlined from.
    pub template: Option<String>,
    #[serde(skip)]
    pub loc: Location,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImagePlan {
    /// As the pipeline writes it (expressions resolved).
    pub reference: String,
    /// Where it is pulled from, after the step's `connectorRef` mapping
    /// (see [`crate::run::images::resolve_sources`]).
    pub source: String,
    pub pull_policy: PullPolicy,
    pub connector_ref: Option<String>,
    /// What the connector did to the reference, in words, for `sandrun plan`.
    pub connector_note: Option<String>,
}

/// What the step's process runs, before step outputs are substituted.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProcessTemplate {
    /// `command` run by `shell` (`sh -c`, `bash -c`, `python3 -c`, ...).
    Shell { shell: Shell, script: Template },
    /// An explicit argv (a Background step's `entrypoint`).
    Exec { argv: Vec<Template> },
    /// The image's own entrypoint and cmd (Plugin steps, Background steps with only an image).
    ImageDefault,
}

/// A `when.condition` whose operands may still wait for step outputs.
pub type CondPlan = Condition<Template>;

impl Condition<Template> {
    pub fn eval(&self, outputs: &Outputs) -> bool {
        let r = |t: &Template| t.render(outputs, &mut Vec::new());
        match self {
            Condition::Value(t) => r(t).trim() == "true",
            Condition::Not(c) => !c.eval(outputs),
            Condition::And(a, b) => a.eval(outputs) && b.eval(outputs),
            Condition::Or(a, b) => a.eval(outputs) || b.eval(outputs),
            Condition::Compare { left, equal, right } => (r(left) == r(right)) == *equal,
            Condition::Order { left, op, right } => op.holds(&r(left), &r(right)),
            Condition::Test {
                target,
                method,
                arg,
            } => method.holds(&r(target), &r(arg)),
        }
    }

    pub fn display(&self) -> String {
        match self {
            Condition::Value(t) => quote_operand(t),
            Condition::Not(c) => format!("!({})", c.display()),
            Condition::And(a, b) => format!("({} && {})", a.display(), b.display()),
            Condition::Or(a, b) => format!("({} || {})", a.display(), b.display()),
            Condition::Compare { left, equal, right } => format!(
                "{} {} {}",
                quote_operand(left),
                if *equal { "==" } else { "!=" },
                quote_operand(right)
            ),
            Condition::Order { left, op, right } => format!(
                "{} {} {}",
                quote_operand(left),
                op.symbol(),
                quote_operand(right)
            ),
            Condition::Test {
                target,
                method,
                arg,
            } => format!(
                "{}.{}({})",
                quote_operand(target),
                method.name(),
                quote_operand(arg)
            ),
        }
    }
}

fn quote_operand(t: &Template) -> String {
    match t.parts.as_slice() {
        [TemplatePart::Text(s)] => format!("{s:?}"),
        _ => t.display(),
    }
}

/// What happens when a Run step fails, from its `failureStrategies`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailurePolicy {
    pub rules: Vec<FailureRule>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailureRule {
    /// Empty = every error; otherwise `Timeout` and/or `Unknown`-style kinds.
    pub errors: Vec<ErrorKind>,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// The step exited non-zero or could not start.
    Failure,
    /// The step ran past its timeout.
    Timeout,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Action {
    Ignore,
    Retry {
        count: u32,
        intervals: Vec<Duration>,
        then: Box<Action>,
    },
    MarkAsSuccess,
    MarkAsFailure,
    Abort,
}

impl FailurePolicy {
    /// The action for a failure of `kind`, if a rule matches.
    pub fn action_for(&self, kind: ErrorKind) -> Option<&Action> {
        self.rules
            .iter()
            .find(|r| r.errors.is_empty() || r.errors.contains(&kind))
            .map(|r| &r.action)
    }
}

/// A string with holes for step outputs, which are only known while the stage runs
/// (or, for a step of an earlier stage, once that stage has run).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Template {
    pub parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TemplatePart {
    Text(String),
    StepOutput {
        /// The stage of the step when it is not the stage the template belongs to.
        #[serde(skip_serializing_if = "Option::is_none")]
        stage: Option<String>,
        step: String,
        variable: String,
    },
}

impl Template {
    pub fn literal(s: impl Into<String>) -> Template {
        Template {
            parts: vec![TemplatePart::Text(s.into())],
        }
    }

    /// Step keys whose outputs this template reads.
    pub fn step_refs(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            TemplatePart::StepOutput { step, .. } => Some(step.as_str()),
            TemplatePart::Text(_) => None,
        })
    }

    /// Fill the holes from `outputs`. A missing value is an empty string, as in
    /// Harness; `missing` receives what was not found.
    pub fn render(&self, outputs: &Outputs, missing: &mut Vec<String>) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(t) => s.push_str(t),
                TemplatePart::StepOutput {
                    stage,
                    step,
                    variable,
                } => {
                    let steps = match stage {
                        None => Some(&outputs.steps),
                        Some(stage) => outputs.earlier.get(stage),
                    };
                    match steps
                        .and_then(|steps| steps.get(step))
                        .and_then(|vars| vars.get(variable))
                    {
                        Some(v) => s.push_str(v),
                        None => missing.push(match stage {
                            None => format!("{step}.{variable}"),
                            Some(stage) => format!("{stage}: {step}.{variable}"),
                        }),
                    }
                }
            }
        }
        s
    }

    /// The template as the user wrote the holes, for display.
    pub fn display(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(t) => s.push_str(t),
                TemplatePart::StepOutput {
                    stage: None,
                    step,
                    variable,
                } if !step.contains('.') => s.push_str(&format!(
                    "<+steps.{step}.output.outputVariables.{variable}>"
                )),
                // A step inside groups: `G.ID` is written `G.steps.ID`.
                TemplatePart::StepOutput {
                    stage: None,
                    step,
                    variable,
                } => s.push_str(&format!(
                    "<+execution.steps.{}.output.outputVariables.{variable}>",
                    step.replace('.', ".steps.")
                )),
                TemplatePart::StepOutput {
                    stage: Some(stage),
                    step,
                    variable,
                } => s.push_str(&format!(
                    "<+pipeline.stages.{stage}.spec.execution.steps.{}.output.outputVariables.{variable}>",
                    step.replace('.', ".steps.")
                )),
            }
        }
        s
    }
}

/// Output variables of one stage's finished steps: step key -> name -> value.
pub type StageOutputs = BTreeMap<String, BTreeMap<String, String>>;

/// Output variables of every stage that has run, by stage identifier. A run keeps one,
/// shared by its stages: a stage reads the earlier stages' values when it starts and
/// adds its own when it ends ([`crate::run::executor::run_stage`]).
pub type PipelineOutputs = BTreeMap<String, StageOutputs>;

/// What a running stage's templates read: its own finished steps and earlier stages.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    pub steps: StageOutputs,
    pub earlier: PipelineOutputs,
}

/// Secret values to be masked wherever sandrun prints.
///
/// Output is read and masked line by line, so a secret that spans lines (a PEM key, a
/// JSON credential) is also masked by each of its lines on its own: a line of it must
/// never appear, whatever surrounds it.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    values: Vec<String>,
}

/// What replaces a secret.
const MASK: &str = "**************";

impl Secrets {
    pub fn add(&mut self, value: &str) {
        // Masking one-character values would shred every log line; Harness does not either.
        self.insert(value, 2);
        if value.contains('\n') {
            // Lines of a few characters ("-----", "}", "==") are not secret on their
            // own and would shred unrelated output: the line masks start at 4.
            for line in value.lines() {
                self.insert(line.trim(), 4);
            }
        }
    }

    fn insert(&mut self, value: &str, min_len: usize) {
        if value.len() >= min_len && !self.values.iter().any(|v| v == value) {
            self.values.push(value.to_string());
            // Longest first, so that a secret containing another is masked whole.
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        self.mask_in_place(&mut out);
        out
    }

    /// Masks `text` where it stands (no copy when nothing is secret).
    pub fn mask_in_place(&self, text: &mut String) {
        for v in &self.values {
            if text.contains(v.as_str()) {
                *text = text.replace(v.as_str(), MASK);
            }
        }
    }

    pub fn contains(&self, text: &str) -> bool {
        self.values.iter().any(|v| text.contains(v.as_str()))
    }
}

#[cfg(test)]
mod secret_tests {
    use super::Secrets;

    #[test]
    fn every_line_of_a_multi_line_secret_is_masked_on_its_own() {
        let mut s = Secrets::default();
        s.add("-----BEGIN KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n==\n-----END KEY-----\n");
        for line in [
            "MIIEvQIBADANBgkq",
            "hkiG9w0BAQEFAASC",
            "-----BEGIN KEY-----",
        ] {
            assert_eq!(s.mask(&format!("> {line} <")), "> ************** <");
        }
        // Short lines alone are no secret.
        assert_eq!(s.mask("a == b"), "a == b");
        assert!(!s.contains("x\ny"));
    }
}
