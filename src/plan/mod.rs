//! The plan: everything about a run decided before the first step starts.
//!
//! A `Plan` is plain data built from a parsed pipeline plus the user's answers
//! (`--set`, `--secret`, the workspace's git facts). Expressions known up front are
//! substituted here; step outputs, which only exist while the stage runs, stay as
//! [`Template`] parts for the executor. Printing a plan (`sandrun plan`) shows exactly
//! what a run will do, so the executor never has to decide anything the user cannot see.

mod build;
mod display;

pub use build::{build, PlanInputs};
pub use display::render;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use crate::net::{NetworkMode, NetworkPlan};
use crate::pipeline::expr::Condition;
use crate::pipeline::{Location, PullPolicy, Resources, Shell, StageStatus};

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub source: PathBuf,
    pub pipeline: Option<PipelineName>,
    pub workspace: PathBuf,
    pub stages: Vec<StagePlan>,
    /// Every secret value the plan knows: consumers mask them in anything they print.
    #[serde(skip)]
    pub secrets: Secrets,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineName {
    pub identifier: String,
    pub name: String,
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
    /// Things the pipeline asks for that this run cannot honour in full, said before
    /// anything starts (`file:line:col: what`).
    pub warnings: Vec<String>,
    pub timeout: Option<Duration>,
    pub nodes: Vec<Node>,
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
    Parallel { nodes: Vec<Node> },
    Group(GroupPlan),
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
            Node::Parallel { nodes } | Node::Group(GroupPlan { nodes, .. }) => {
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum StepType {
    Run,
    Background,
    Plugin,
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

/// A string with holes for step outputs, which are only known while the stage runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Template {
    pub parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TemplatePart {
    Text(String),
    StepOutput { step: String, variable: String },
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

    /// Fill the holes from `outputs` (step key -> variable -> value). A missing value is
    /// an empty string, as in Harness; `missing` receives what was not found.
    pub fn render(&self, outputs: &Outputs, missing: &mut Vec<String>) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Text(t) => s.push_str(t),
                TemplatePart::StepOutput { step, variable } => {
                    match outputs.get(step).and_then(|vars| vars.get(variable)) {
                        Some(v) => s.push_str(v),
                        None => missing.push(format!("{step}.{variable}")),
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
                TemplatePart::StepOutput { step, variable } => s.push_str(&format!(
                    "<+steps.{step}.output.outputVariables.{variable}>"
                )),
            }
        }
        s
    }
}

/// Output variables of finished steps: step key -> name -> value.
pub type Outputs = BTreeMap<String, BTreeMap<String, String>>;

/// Output variables of the stages that finished before: stage identifier -> outputs.
pub type PipelineOutputs = BTreeMap<String, Outputs>;

/// Secret values to be masked wherever sandrun prints.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    pub fn add(&mut self, value: &str) {
        // Masking one-character values would shred every log line; Harness does not either.
        if value.len() >= 2 && !self.values.iter().any(|v| v == value) {
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
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "**************");
            }
        }
        out
    }

    pub fn contains(&self, text: &str) -> bool {
        self.values.iter().any(|v| text.contains(v.as_str()))
    }
}
