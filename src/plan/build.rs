//! From a parsed pipeline and the user's answers to a [`Plan`].
//!
//! Resolves every expression known before the run (names, variables, `<+input>`,
//! secrets, codebase facts), checks that step-output references point at steps that
//! will have finished, and decides hostnames and the network mode. All problems are
//! collected and reported together, each with the location it comes from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::pipeline::expr::{self, CodebaseField, Expr, Operand, StageAttr, TemplatePart as Part};
use crate::pipeline::{
    ExprField, FailureAction, FailureStrategy, Infrastructure, Location, PipelineFile, PullPolicy,
    Shell, Stage, StageStatus, Step, StepField, StepItem, StepKind, Timeout, Variable,
    VariableType,
};

use crate::net::{StepEndpoint, StepRequest};

use super::{
    Action, CondPlan, ErrorKind, FailurePolicy, FailureRule, GroupPlan, ImagePlan, LoopPlan,
    NetworkChoice, NetworkMode, Node, PipelineName, Plan, ProcessTemplate, Secrets, StagePlan,
    StepPlan, StepType, Template, TemplatePart,
};

/// What the user tells sandrun besides the pipeline file.
#[derive(Clone, Debug, Default)]
pub struct PlanInputs {
    pub workspace: PathBuf,
    /// Answers to `<+input>` (variable names, or `STEP.FIELD` for step fields) and to
    /// what only Harness's server knows (the expression's path: `trigger.branch`).
    pub inputs: BTreeMap<String, String>,
    /// Secret values by secret identifier.
    pub secrets: BTreeMap<String, String>,
    /// Only this stage (by identifier).
    pub stage: Option<String>,
    /// `--network`, overriding the stage's infrastructure.
    pub network: Option<NetworkMode>,
    /// `--network egress`: let steps open outbound connections.
    pub egress: bool,
    /// Resolve unanswered inputs and secrets to placeholders instead of failing
    /// (`sandrun validate` checks the file, not the answers).
    pub placeholders: bool,
    /// This run's numbers.
    pub run: RunIds,
}

/// What tells one run of a pipeline from another.
#[derive(Clone, Debug)]
pub struct RunIds {
    /// `<+pipeline.sequenceId>`: the pipeline's build number (`crate::run::sequence`).
    pub sequence_id: u64,
    /// `<+pipeline.executionId>`: unique to this run.
    pub execution_id: String,
}

impl RunIds {
    /// Run number `sequence_id`, with an execution id of its own.
    pub fn new(sequence_id: u64) -> RunIds {
        RunIds {
            sequence_id,
            execution_id: execution_id(),
        }
    }
}

impl Default for RunIds {
    fn default() -> RunIds {
        RunIds::new(1)
    }
}

#[derive(Clone, Debug)]
pub struct PlanError {
    pub loc: Location,
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.loc, self.message)
    }
}

#[derive(Debug)]
pub struct PlanErrors(pub Vec<PlanError>);

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PlanErrors {}

pub fn build(file: &PipelineFile, inputs: &PlanInputs) -> Result<Plan, PlanErrors> {
    let mut b = Builder {
        file,
        inputs,
        errors: Vec::new(),
        secrets: Secrets::default(),
        codebase: None,
        pipeline_vars: BTreeMap::new(),
        stages_run: BTreeMap::new(),
    };
    let plan = b.plan();
    if b.errors.is_empty() {
        Ok(plan)
    } else {
        Err(PlanErrors(b.errors))
    }
}

struct Builder<'a> {
    file: &'a PipelineFile,
    inputs: &'a PlanInputs,
    errors: Vec<PlanError>,
    secrets: Secrets,
    codebase: Option<Result<Codebase, String>>,
    pipeline_vars: BTreeMap<String, String>,
    /// Stages planned so far (they run before the one being planned): their resolved
    /// variables and the keys of their steps.
    stages_run: BTreeMap<String, StageFacts>,
}

struct StageFacts {
    variables: BTreeMap<String, String>,
    steps: HashSet<String>,
}

/// What expressions inside one step (or stage, or group) may refer to.
#[derive(Clone, Default)]
struct Scope {
    stage_id: String,
    stage_name: String,
    stage_vars: BTreeMap<String, String>,
    group_vars: BTreeMap<String, String>,
    /// Key of the enclosing group (`""` at the top of the stage).
    group_key: String,
    /// The enclosing groups' own variables, outermost first, by group identifier.
    groups: Vec<(String, BTreeMap<String, String>)>,
    step_id: String,
    step_name: String,
    /// Keys of the steps that have finished before this point.
    done: DoneSteps,
}

/// The steps finished before a point of the stage, as one set updated in place while
/// the plan walks the stage: nothing copies it per step, group or parallel branch, so
/// planning stays linear in the number of steps (a copy per step made a stage of 16,000
/// steps take seconds). A parallel branch is rolled back before the next branch is
/// walked, since branches do not see each other.
#[derive(Clone, Debug, Default)]
struct DoneSteps {
    keys: HashSet<String>,
    /// The same keys in the order they finished (what a rollback undoes).
    order: Vec<String>,
    /// Keys by their last part, the step identifier (`<+steps.ID>` finds a step by
    /// identifier alone when only one has it).
    by_id: HashMap<String, Vec<String>>,
}

fn identifier_of(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

impl DoneSteps {
    fn insert(&mut self, key: String) {
        if self.keys.insert(key.clone()) {
            self.by_id
                .entry(identifier_of(&key).to_string())
                .or_default()
                .push(key.clone());
            self.order.push(key);
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// The keys of finished steps whose identifier is `id`.
    fn with_identifier(&self, id: &str) -> &[String] {
        self.by_id.get(id).map_or(&[], Vec::as_slice)
    }

    /// A point to [`DoneSteps::rollback`] to.
    fn mark(&self) -> usize {
        self.order.len()
    }

    /// Forgets the steps finished since `mark` and returns them.
    fn rollback(&mut self, mark: usize) -> Vec<String> {
        let since = self.order.split_off(mark);
        // Latest first: each key is then the last of its identifier's list.
        for k in since.iter().rev() {
            self.keys.remove(k);
            if let Some(keys) = self.by_id.get_mut(identifier_of(k)) {
                if keys.last() == Some(k) {
                    keys.pop();
                }
            }
        }
        since
    }
}

#[derive(Debug)]
struct Codebase {
    branch: String,
    sha: String,
    repo_url: String,
    message: String,
    author_name: String,
    author_email: String,
}

impl<'a> Builder<'a> {
    fn error(&mut self, loc: &Location, message: impl Into<String>) {
        self.errors.push(PlanError {
            loc: loc.clone(),
            message: message.into(),
        });
    }

    fn plan(&mut self) -> Plan {
        let pipeline = self.file.pipeline.as_ref().map(|p| PipelineName {
            identifier: p.identifier.clone(),
            name: p.name.clone(),
            template: p.template.as_ref().map(ToString::to_string),
        });
        self.unanswered_server_inputs();
        if let Some(p) = &self.file.pipeline {
            let scope = Scope::default();
            self.pipeline_vars = self.variables(&p.variables, &scope, "pipeline.variables");
        }
        if let Some(want) = &self.inputs.stage {
            if !self.file.stages.iter().any(|s| {
                &s.identifier == want || s.instance.as_ref().is_some_and(|i| &i.of == want)
            }) {
                let known: Vec<&str> = self
                    .file
                    .stages
                    .iter()
                    .map(|s| s.identifier.as_str())
                    .collect();
                let loc = Location {
                    file: self.file.path.clone(),
                    line: 1,
                    column: 1,
                };
                self.error(
                    &loc,
                    format!("there is no stage `{want}` (stages: {})", known.join(", ")),
                );
            }
        }
        let stages = self
            .file
            .stages
            .iter()
            .filter(|s| {
                self.inputs.stage.as_ref().is_none_or(|w| {
                    w == &s.identifier || s.instance.as_ref().is_some_and(|i| &i.of == w)
                })
            })
            .map(|s| self.stage(s))
            .collect();
        Plan {
            source: self.file.path.clone(),
            pipeline,
            workspace: self.inputs.workspace.clone(),
            stages,
            builtin_env: self.builtin_env(),
            ignored: self
                .file
                .ignored
                .iter()
                .map(|i| format!("{}: `{}` in {}", i.loc, i.field, i.within))
                .collect(),
            secrets: self.secrets.clone(),
        }
    }

    /// `<+pipeline.sequenceId>`, Harness's build number.
    fn sequence_id(&self) -> String {
        self.inputs.run.sequence_id.to_string()
    }

    /// The variables Harness's runners give every step of a run (its page "CI
    /// environment variables reference"), but for the stage's and the workspace's,
    /// which the executor adds. Account, organization and project identifiers are
    /// answered like `<+account.identifier>` (`--set account.identifier=…`), else they
    /// read `local`. Commit facts come from the workspace's git and are left out when
    /// it has none, as Harness leaves out what a build does not know.
    fn builtin_env(&mut self) -> Vec<(String, String)> {
        let pipeline = self
            .file
            .pipeline
            .as_ref()
            .map_or(String::new(), |p| p.identifier.clone());
        let scope_id = |key: &str| {
            self.inputs
                .inputs
                .get(key)
                .cloned()
                .unwrap_or_else(|| "local".to_string())
        };
        let sequence = self.sequence_id();
        let mut env = vec![
            ("CI".to_string(), "true".to_string()),
            ("HARNESS_ACCOUNT_ID".into(), scope_id("account.identifier")),
            ("HARNESS_ORG_ID".into(), scope_id("org.identifier")),
            ("HARNESS_PROJECT_ID".into(), scope_id("project.identifier")),
            ("HARNESS_PIPELINE_ID".into(), pipeline),
            ("HARNESS_BUILD_ID".into(), sequence.clone()),
            ("DRONE_BUILD_NUMBER".into(), sequence),
            (
                "HARNESS_EXECUTION_ID".into(),
                self.inputs.run.execution_id.clone(),
            ),
        ];
        if let Ok(c) = self.codebase() {
            env.extend(drone_commit_env(c));
        }
        env
    }

    /// Every value only Harness's server knows that this run reads and nobody
    /// answered, each where it is read, before anything else is said.
    fn unanswered_server_inputs(&mut self) {
        if self.inputs.placeholders {
            return;
        }
        let wanted = |stage: &Option<String>| match (stage, &self.inputs.stage) {
            (Some(s), Some(only)) => s == only,
            _ => true,
        };
        let missing: Vec<(Location, String)> = self
            .file
            .server_inputs
            .iter()
            .filter(|i| wanted(&i.stage) && !self.inputs.inputs.contains_key(&i.key))
            .map(|i| (i.loc.clone(), i.key.clone()))
            .collect();
        for (loc, key) in missing {
            self.error(
                &loc,
                format!(
                    "`<+{key}>` is known only to Harness's server: give it with --set {key}=VALUE or in a --values file"
                ),
            );
        }
        // What looping strategies need: asked for here, with every other input.
        let selected = |stage: &Option<String>| match (stage, &self.inputs.stage) {
            (Some(s), Some(only)) => {
                s == only
                    || self.file.stages.iter().any(|st| {
                        &st.identifier == s && st.instance.as_ref().is_some_and(|i| &i.of == only)
                    })
            }
            _ => true,
        };
        let mut strategies: Vec<(Location, String)> = Vec::new();
        for u in self.file.unanswered.iter().filter(|u| selected(&u.stage)) {
            // Every instance of a looped stage reads its steps' strategies again.
            let input = (u.loc.clone(), u.message.clone());
            if !strategies.contains(&input) {
                strategies.push(input);
            }
        }
        for (loc, message) in strategies {
            self.error(&loc, message);
        }
    }

    fn stage(&mut self, stage: &Stage) -> StagePlan {
        let mut scope = Scope {
            stage_id: stage.identifier.clone(),
            stage_name: stage.name.clone(),
            ..Scope::default()
        };
        let network = self.network_choice(stage);
        let Some(spec) = &stage.spec else {
            return StagePlan {
                identifier: stage.identifier.clone(),
                name: stage.name.clone(),
                run_when: StageStatus::Success,
                condition: None,
                parallel: stage.parallel,
                skipped: Some(format!(
                    "`{}` stages do not run locally; only CI stages do",
                    stage.stage_type
                )),
                network,
                net: None,
                shared_paths: Vec::new(),
                clone_codebase: false,
                warnings: Vec::new(),
                timeout: None,
                nodes: Vec::new(),
                instance: stage.instance.clone(),
                template: stage.template.as_ref().map(ToString::to_string),
            };
        };
        scope.stage_vars = self.variables(&stage.variables, &scope, "stage.variables");
        let timeout = self.timeout(stage.timeout.as_ref(), &scope);
        let condition = stage
            .when
            .as_ref()
            .and_then(|w| w.condition.as_deref())
            .and_then(|c| self.condition(c, &scope, &stage.loc));
        let mut nodes = Vec::new();
        // Legacy `serviceDependencies` start before the steps, as Background steps.
        for dep in &spec.service_dependencies {
            nodes.push(self.step(dep, &mut scope, &[], &stage.failure_strategies));
        }
        let items = self.items(&spec.steps, &mut scope, &[], &stage.failure_strategies);
        nodes.extend(items);
        let mut plan = StagePlan {
            identifier: stage.identifier.clone(),
            name: stage.name.clone(),
            skipped: None,
            run_when: stage
                .when
                .as_ref()
                .map_or(StageStatus::Success, |w| w.stage_status),
            condition,
            parallel: stage.parallel,
            network,
            net: None,
            shared_paths: spec.shared_paths.clone(),
            clone_codebase: spec.clone_codebase,
            warnings: Vec::new(),
            timeout,
            nodes,
            instance: stage.instance.clone(),
            template: stage.template.as_ref().map(ToString::to_string),
        };
        self.stages_run.insert(
            stage.identifier.clone(),
            StageFacts {
                variables: scope.stage_vars.clone(),
                steps: plan.steps().iter().map(|s| s.key.clone()).collect(),
            },
        );
        plan.warnings = stage_warnings(&plan, spec.platform.as_ref(), &stage.loc);
        match address_steps(&mut plan, self.inputs.egress) {
            Ok(()) => {}
            Err(e) => self.error(&stage.loc, format!("stage `{}`: {e}", stage.identifier)),
        }
        plan
    }

    fn network_choice(&self, stage: &Stage) -> NetworkChoice {
        if let Some(mode) = self.inputs.network {
            return NetworkChoice {
                mode,
                reason: "chosen with --network".into(),
            };
        }
        let mut infra = stage.spec.as_ref().map(|s| s.infrastructure.clone());
        let mut via = String::new();
        if let Some(Infrastructure::UseFromStage(other)) = &infra {
            via = format!(" (used from stage `{other}`)");
            infra = self
                .file
                .stages
                .iter()
                .find(|s| &s.identifier == other)
                .and_then(|s| s.spec.as_ref().map(|sp| sp.infrastructure.clone()));
        }
        match infra {
            Some(Infrastructure::KubernetesDirect) => NetworkChoice {
                mode: NetworkMode::Pod,
                reason: format!(
                    "the stage runs on KubernetesDirect infrastructure{via}: steps share one Pod network and call services on localhost"
                ),
            },
            Some(i) => NetworkChoice {
                mode: NetworkMode::Bridge,
                reason: format!(
                    "the stage runs on {} infrastructure{via}: steps call services by step identifier",
                    match i {
                        Infrastructure::Docker => "Docker (local runner)",
                        Infrastructure::Vm => "VM",
                        _ => "Cloud",
                    }
                ),
            },
            None => NetworkChoice {
                mode: NetworkMode::Bridge,
                reason: "default".into(),
            },
        }
    }

    /// Resolve variables in order (later ones may refer to earlier ones).
    fn variables(
        &mut self,
        vars: &[Variable],
        scope: &Scope,
        prefix: &str,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for v in vars {
            let value = match v.var_type {
                VariableType::Secret => {
                    // A Secret variable's value names a secret (or is an expression for one).
                    let id = v.value.trim();
                    let resolved = if expr::has_expressions(id) {
                        self.static_text(id, scope, &v.loc, &v.name)
                    } else {
                        self.secret(id, &v.loc)
                    };
                    self.secrets.add(&resolved);
                    resolved
                }
                _ => {
                    let answer_key = format!("{prefix}.{}", v.name);
                    let text = if is_bare_input(&v.value) {
                        let (default, allowed) =
                            match expr::parse_template(v.value.trim()).ok().as_deref() {
                                Some([Part::Expr(Expr::Input { default, allowed })]) => {
                                    (default.clone(), allowed.clone())
                                }
                                _ => (None, None),
                            };
                        match self.answer(&v.name, &answer_key) {
                            Some(a) => {
                                if let Some(allowed) = allowed.filter(|al| !al.contains(&a)) {
                                    self.error(
                                        &v.loc,
                                        format!(
                                            "`{a}` is not an allowed value for variable `{}` (allowed: {})",
                                            v.name,
                                            allowed.join(", ")
                                        ),
                                    );
                                }
                                a
                            }
                            None => match default.or_else(|| v.default.clone()) {
                                Some(d) => d,
                                None if self.inputs.placeholders => "<input>".to_string(),
                                None => {
                                    self.error(
                                            &v.loc,
                                            format!(
                                                "variable `{}` is a runtime input: answer it with --set {}=VALUE",
                                                v.name, v.name
                                            ),
                                        );
                                    String::new()
                                }
                            },
                        }
                    } else {
                        let mut s = scope.clone();
                        s.stage_vars.extend(out.clone());
                        self.static_text(&v.value, &s, &v.loc, &v.name)
                    };
                    if v.required && text.is_empty() {
                        self.error(
                            &v.loc,
                            format!("variable `{}` is required but has no value", v.name),
                        );
                    }
                    if v.var_type == VariableType::Number
                        && !text.is_empty()
                        && text.parse::<f64>().is_err()
                    {
                        self.error(
                            &v.loc,
                            format!(
                                "variable `{}` is a Number but its value is `{text}`",
                                v.name
                            ),
                        );
                    }
                    text
                }
            };
            out.insert(v.name.clone(), value);
        }
        out
    }

    fn answer(&self, short: &str, long: &str) -> Option<String> {
        self.inputs
            .inputs
            .get(long)
            .or_else(|| self.inputs.inputs.get(short))
            .cloned()
    }

    fn secret(&mut self, id: &str, loc: &Location) -> String {
        // Harness scopes secrets as `account.x`, `org.x` or `x`; answers may use either.
        let bare = id.rsplit('.').next().unwrap_or(id);
        match self
            .inputs
            .secrets
            .get(id)
            .or_else(|| self.inputs.secrets.get(bare))
        {
            Some(v) => {
                let v = v.clone();
                self.secrets.add(&v);
                v
            }
            None if self.inputs.placeholders => "<secret>".to_string(),
            None => {
                self.error(
                    loc,
                    format!("secret `{id}` has no value: give it with --secret {id}=VALUE or --secrets-file"),
                );
                String::new()
            }
        }
    }

    /// Resolve a string that must be fully known before the run (no step outputs).
    fn static_text(&mut self, text: &str, scope: &Scope, loc: &Location, field: &str) -> String {
        let t = self.template(text, scope, loc, field);
        if t.step_refs().next().is_some() {
            self.error(
                loc,
                format!("`{field}` cannot use a step output: its value must be known before the run starts"),
            );
        }
        t.display()
    }

    /// Resolve every expression in `text` except step outputs, which stay as holes.
    fn template(&mut self, text: &str, scope: &Scope, loc: &Location, field: &str) -> Template {
        if !expr::has_expressions(text) {
            return Template::literal(text);
        }
        let parts = match expr::parse_template(text) {
            Ok(p) => p,
            Err(errors) => {
                for e in errors {
                    self.error(loc, format!("in `{field}`: {e}"));
                }
                return Template::literal(text);
            }
        };
        let mut out = Template::default();
        for part in parts {
            match part {
                Part::Literal(s) => push_text(&mut out, &s),
                Part::Expr(e) => match self.resolve(&e, scope, loc, field) {
                    Resolved::Text(s) => push_text(&mut out, &s),
                    Resolved::Output {
                        stage,
                        step,
                        variable,
                    } => out.parts.push(TemplatePart::StepOutput {
                        stage,
                        step,
                        variable,
                    }),
                },
            }
        }
        out
    }

    fn resolve(&mut self, e: &Expr, scope: &Scope, loc: &Location, field: &str) -> Resolved {
        let text = |s: &str| Resolved::Text(s.to_string());
        let other_stage = match e {
            Expr::StepOutput {
                stage: Some(stage), ..
            }
            | Expr::OtherStage {
                stage,
                attr: StageAttr::Variable(_),
            }
            | Expr::NodeVariable { node: stage, .. } => Some(stage),
            _ => None,
        };
        if let Some(answer) = other_stage.and_then(|stage| self.replaced(stage, e)) {
            return match answer {
                Ok(v) => Resolved::Text(v),
                Err(why) => self.unknown(loc, field, e, &why),
            };
        }
        match e {
            Expr::PipelineName => text(self.file.pipeline.as_ref().map_or("", |p| p.name.as_str())),
            Expr::PipelineIdentifier => text(
                self.file
                    .pipeline
                    .as_ref()
                    .map_or("", |p| p.identifier.as_str()),
            ),
            Expr::PipelineSequenceId => Resolved::Text(self.sequence_id()),
            Expr::PipelineExecutionId => Resolved::Text(self.inputs.run.execution_id.clone()),
            Expr::PipelineVariable(v) => match self.pipeline_vars.get(v) {
                Some(x) => Resolved::Text(x.clone()),
                None => self.unknown(loc, field, e, "the pipeline has no such variable"),
            },
            Expr::StageName => text(&scope.stage_name),
            Expr::StageIdentifier => text(&scope.stage_id),
            Expr::StageVariable(v) => match scope.stage_vars.get(v) {
                Some(x) => Resolved::Text(x.clone()),
                None => self.unknown(loc, field, e, "the stage has no such variable"),
            },
            Expr::StepGroupVariable(v) => match scope.group_vars.get(v) {
                Some(x) => Resolved::Text(x.clone()),
                None => self.unknown(
                    loc,
                    field,
                    e,
                    "the enclosing step group has no such variable",
                ),
            },
            Expr::StepName => text(&scope.step_name),
            Expr::StepIdentifier => text(&scope.step_id),
            Expr::StepOutput {
                stage,
                group_path,
                step,
                variable,
            } => {
                let other = stage.as_ref().filter(|s| **s != scope.stage_id);
                let found = match other {
                    None => self.output_ref(group_path, step, scope),
                    Some(s) => self.earlier_output_ref(s, group_path, step),
                };
                match found {
                    Ok(key) => Resolved::Output {
                        stage: other.cloned(),
                        step: key,
                        variable: variable.clone(),
                    },
                    Err(why) => self.unknown(loc, field, e, &why),
                }
            }
            Expr::OtherStage { stage, attr } => match attr {
                StageAttr::Name | StageAttr::Identifier => {
                    match self.file.stages.iter().find(|s| &s.identifier == stage) {
                        Some(s) => text(if *attr == StageAttr::Name {
                            &s.name
                        } else {
                            &s.identifier
                        }),
                        None => self.unknown(loc, field, e, "the pipeline has no such stage"),
                    }
                }
                StageAttr::Variable(v) => match self.stage_variable(stage, v, scope) {
                    Ok(x) => Resolved::Text(x),
                    Err(why) => self.unknown(loc, field, e, &why),
                },
            },
            Expr::NodeVariable { node, variable } => {
                if self.file.stages.iter().any(|s| &s.identifier == node) {
                    match self.stage_variable(node, variable, scope) {
                        Ok(x) => Resolved::Text(x),
                        Err(why) => self.unknown(loc, field, e, &why),
                    }
                } else if let Some((_, vars)) = scope.groups.iter().find(|(g, _)| g == node) {
                    match vars.get(variable) {
                        Some(x) => Resolved::Text(x.clone()),
                        None => self.unknown(loc, field, e, "the step group has no such variable"),
                    }
                } else {
                    Resolved::Text(self.server_value(&format!("{node}.variables.{variable}")))
                }
            }
            Expr::Server(key) => Resolved::Text(self.server_value(key)),
            Expr::Codebase(f) => match self.codebase() {
                Ok(c) => Resolved::Text(match f {
                    CodebaseField::Branch => c.branch.clone(),
                    CodebaseField::CommitSha => c.sha.clone(),
                    CodebaseField::ShortCommitSha => c.sha.chars().take(7).collect(),
                    CodebaseField::RepoUrl => c.repo_url.clone(),
                }),
                Err(why) => self.unknown(loc, field, e, &why),
            },
            Expr::Secret(id) => Resolved::Text(self.secret(id, loc)),
            Expr::Input { default, allowed } => {
                let key = format!("{}.{field}", scope_step_key(scope));
                let value = match self.answer(&key, &key).or_else(|| default.clone()) {
                    Some(v) => v,
                    // Nothing to check against `allowed` while only checking the file.
                    None if self.inputs.placeholders => return Resolved::Text("<input>".into()),
                    None => {
                        self.error(
                            loc,
                            format!("`{field}` of step `{}` is a runtime input: answer it with --set {key}=VALUE", scope.step_id),
                        );
                        String::new()
                    }
                };
                if let Some(allowed) = allowed {
                    if !value.is_empty() && !allowed.contains(&value) {
                        self.error(
                            loc,
                            format!(
                                "`{value}` is not an allowed value for `{key}` (allowed: {})",
                                allowed.join(", ")
                            ),
                        );
                    }
                }
                Resolved::Text(value)
            }
        }
    }

    /// The answer to a value only Harness's server knows. Unanswered ones were all
    /// reported up front (`unanswered_server_inputs`).
    fn server_value(&self, key: &str) -> String {
        match self.inputs.inputs.get(key) {
            Some(v) => v.clone(),
            None if self.inputs.placeholders => "<input>".to_string(),
            None => String::new(),
        }
    }

    /// With `--stage`, what an expression reads of a stage that does not run is asked
    /// for, as Harness's selective stage execution asks for "replaced expressions":
    /// keyed by the expression's path. `None` when stage `stage` runs (or is unknown).
    fn replaced(&self, stage: &str, e: &Expr) -> Option<Result<String, String>> {
        let only = self.inputs.stage.as_ref()?;
        if only == stage || !self.file.stages.iter().any(|s| s.identifier == stage) {
            return None;
        }
        let text = e.to_string();
        let key = text
            .strip_prefix("<+")
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(&text);
        Some(match self.inputs.inputs.get(key) {
            Some(v) => Ok(v.clone()),
            None if self.inputs.placeholders => Ok("<input>".to_string()),
            None => Err(format!(
                "stage `{stage}` does not run when only stage `{only}` is run (--stage): give the value with --set {key}=VALUE"
            )),
        })
    }

    /// Variable `name` of stage `stage`: the stage being planned or an earlier one.
    fn stage_variable(&self, stage: &str, name: &str, scope: &Scope) -> Result<String, String> {
        let vars = if stage == scope.stage_id {
            &scope.stage_vars
        } else {
            &self.stage_facts(stage)?.variables
        };
        vars.get(name)
            .cloned()
            .ok_or_else(|| format!("stage `{stage}` has no such variable"))
    }

    /// What is known of stage `stage` once it has run, if it runs before this point.
    fn stage_facts(&self, stage: &str) -> Result<&StageFacts, String> {
        if let Some(f) = self.stages_run.get(stage) {
            return Ok(f);
        }
        if !self.file.stages.iter().any(|s| s.identifier == stage) {
            return Err(format!("the pipeline has no stage `{stage}`"));
        }
        Err(format!("stage `{stage}` runs after this point"))
    }

    /// The key of the step of an earlier stage an output expression names.
    fn earlier_output_ref(
        &self,
        stage: &str,
        group_path: &[String],
        step: &str,
    ) -> Result<String, String> {
        let facts = self.stage_facts(stage)?;
        let found: Vec<&String> = facts
            .steps
            .iter()
            .filter(|k| key_matches(k, group_path, step))
            .collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("stage `{stage}` has no such step")),
            _ => Err(format!(
                "more than one step of stage `{stage}` matches; name its step groups"
            )),
        }
    }

    /// Typed step fields written as expressions: resolved, then read as their type.
    fn expr_fields(&mut self, plan: &mut StepPlan, fields: &[ExprField], scope: &Scope) {
        for f in fields {
            let key = f.field.key();
            let value = self.static_text(&f.text, scope, &f.loc, key);
            if self.inputs.placeholders && value.contains("<input>") {
                continue;
            }
            let v = value.trim();
            let parsed: Result<(), String> = match f.field {
                StepField::Privileged => match v {
                    "true" | "false" => {
                        plan.privileged = v == "true";
                        Ok(())
                    }
                    _ => Err("it must be true or false".into()),
                },
                StepField::RunAsUser => {
                    plan.run_as_user = Some(v.to_string());
                    Ok(())
                }
                StepField::PullPolicy => match PullPolicy::from_name(v) {
                    Some(p) => {
                        if let Some(image) = plan.image.as_mut() {
                            image.pull_policy = p;
                        }
                        Ok(())
                    }
                    None => Err(format!(
                        "it must be one of {}",
                        PullPolicy::NAMES.join(", ")
                    )),
                },
                StepField::Shell => match Shell::from_name(v) {
                    Some(sh) => {
                        if let ProcessTemplate::Shell { shell, .. } = &mut plan.process {
                            *shell = sh;
                        }
                        Ok(())
                    }
                    None => Err(format!("it must be one of {}", Shell::NAMES.join(", "))),
                },
                StepField::Memory => crate::pipeline::values::parse_memory(v).map(|b| {
                    plan.resources.memory = Some(b);
                }),
                StepField::Cpu => crate::pipeline::values::parse_cpu(v).map(|m| {
                    plan.resources.cpu_millis = Some(m);
                }),
            };
            if let Err(why) = parsed {
                self.error(
                    &f.loc,
                    format!(
                        "`{key}` is `{}`, which resolves to `{value}`: {why}",
                        f.text
                    ),
                );
            }
        }
    }

    /// The duration of a `timeout`, resolving its expressions.
    fn timeout(&mut self, t: Option<&Timeout>, scope: &Scope) -> Option<std::time::Duration> {
        let (text, loc) = match t? {
            Timeout::Fixed(d) => return Some(*d),
            Timeout::Expr { text, loc } => (text, loc),
        };
        let resolved = self.template(text, scope, loc, "timeout");
        if resolved.step_refs().next().is_some() {
            self.error(
                loc,
                format!(
                    "`timeout` is `{text}`, which reads a step output: sandrun sets a timeout before the step or stage starts, when no step output is known yet; use a variable or a literal duration"
                ),
            );
            return None;
        }
        let value = resolved.display();
        if self.inputs.placeholders && value.contains("<input>") {
            return None;
        }
        match crate::pipeline::values::parse_duration(&value) {
            Ok(d) => Some(d),
            Err(why) => {
                self.error(
                    loc,
                    format!("`timeout` is `{text}`, which resolves to `{value}`: {why}"),
                );
                None
            }
        }
    }

    fn unknown(&mut self, loc: &Location, field: &str, e: &Expr, why: &str) -> Resolved {
        self.error(loc, format!("in `{field}`: cannot resolve `{e}`: {why}"));
        Resolved::Text(String::new())
    }

    /// The key of the step an output expression names, if it will have finished.
    fn output_ref(
        &self,
        group_path: &[String],
        step: &str,
        scope: &Scope,
    ) -> Result<String, String> {
        let candidates: Vec<String> = if group_path.is_empty() {
            let mut c = Vec::new();
            if !scope.group_key.is_empty() {
                c.push(format!("{}.{step}", scope.group_key));
            }
            c.push(step.to_string());
            c
        } else {
            vec![format!("{}.{step}", group_path.join("."))]
        };
        for c in &candidates {
            if scope.done.contains(c) {
                return Ok(c.clone());
            }
        }
        // `<+G.steps.ID...>` is relative: G may sit inside other groups.
        if !group_path.is_empty() {
            let found: Vec<&String> = scope
                .done
                .with_identifier(step)
                .iter()
                .filter(|k| key_matches(k, group_path, step))
                .collect();
            if found.len() == 1 {
                return Ok(found[0].clone());
            }
        }
        // Harness lets `<+steps.ID>` find a step by identifier alone when it is unique.
        if group_path.is_empty() {
            if let [only] = scope.done.with_identifier(step) {
                return Ok(only.clone());
            }
        }
        Err(format!(
            "no step `{}` has finished before this point (a step can only read outputs of steps that ran before it, not of itself, later steps or steps in the same parallel block)",
            candidates.last().unwrap()
        ))
    }

    fn codebase(&mut self) -> Result<&Codebase, String> {
        if self.codebase.is_none() {
            self.codebase = Some(read_codebase(&self.inputs.workspace));
        }
        self.codebase
            .as_ref()
            .unwrap()
            .as_ref()
            .map_err(Clone::clone)
    }

    fn items(
        &mut self,
        items: &[StepItem],
        scope: &mut Scope,
        groups: &[&str],
        inherited: &[FailureStrategy],
    ) -> Vec<Node> {
        items
            .iter()
            .map(|item| self.item(item, scope, groups, inherited))
            .collect()
    }

    /// Items that run side by side (a parallel block, a loop's instances): each sees
    /// only what finished before them.
    fn side_by_side(
        &mut self,
        items: &[StepItem],
        scope: &mut Scope,
        groups: &[&str],
        inherited: &[FailureStrategy],
    ) -> Vec<Node> {
        let before = scope.done.mark();
        let mut nodes = Vec::new();
        let mut finished = Vec::new();
        for i in items {
            nodes.push(self.item(i, scope, groups, inherited));
            finished.extend(scope.done.rollback(before));
        }
        for k in finished {
            scope.done.insert(k);
        }
        nodes
    }

    fn item(
        &mut self,
        item: &StepItem,
        scope: &mut Scope,
        groups: &[&str],
        inherited: &[FailureStrategy],
    ) -> Node {
        match item {
            StepItem::Step(step) => self.step(step, scope, groups, inherited),
            StepItem::Parallel(items, _) => Node::Parallel {
                nodes: self.side_by_side(items, scope, groups, inherited),
            },
            StepItem::Loop(l) => Node::Loop(LoopPlan {
                identifier: l.identifier.clone(),
                kind: l.kind,
                max_concurrency: l.max_concurrency,
                nodes: self.side_by_side(&l.instances, scope, groups, inherited),
            }),
            StepItem::Group(g) => {
                let mut path: Vec<&str> = groups.to_vec();
                path.push(&g.identifier);
                let key = path.join(".");
                // The group's scope is this one with its key and variables, restored
                // afterwards (the finished steps stay finished).
                let outer_key = std::mem::replace(&mut scope.group_key, key.clone());
                let outer_vars = scope.group_vars.clone();
                let vars = self.variables(&g.variables, scope, "stepGroup.variables");
                scope.group_vars.extend(vars.clone());
                scope.groups.push((g.identifier.clone(), vars));
                let strategies = if g.failure_strategies.is_empty() {
                    inherited
                } else {
                    &g.failure_strategies
                };
                let nodes = self.items(&g.steps, scope, &path, strategies);
                scope.group_key = outer_key;
                scope.group_vars = outer_vars;
                scope.groups.pop();
                Node::Group(GroupPlan {
                    identifier: g.identifier.clone(),
                    name: g.name.clone(),
                    key,
                    run_when: g
                        .when
                        .as_ref()
                        .map_or(StageStatus::Success, |w| w.stage_status),
                    condition: g
                        .when
                        .as_ref()
                        .and_then(|w| w.condition.as_deref())
                        .and_then(|c| self.condition(c, scope, &g.loc)),
                    nodes,
                    template: g.template.as_ref().map(ToString::to_string),
                })
            }
        }
    }

    fn step(
        &mut self,
        step: &Step,
        scope: &mut Scope,
        groups: &[&str],
        inherited: &[FailureStrategy],
    ) -> Node {
        let key = if groups.is_empty() {
            step.identifier.clone()
        } else {
            format!("{}.{}", groups.join("."), step.identifier)
        };
        // The step's own scope: this one with its identifier and name, restored below.
        let outer_id = std::mem::replace(&mut scope.step_id, step.identifier.clone());
        let outer_name = std::mem::replace(&mut scope.step_name, step.name.clone());
        let s: &Scope = scope;
        let loc = &step.loc;

        let mut env: Vec<(String, Template)> = Vec::new();
        for (k, v) in scope.stage_vars.iter().chain(scope.group_vars.iter()) {
            env.push((k.clone(), Template::literal(v.clone())));
        }

        let (step_type, container, unsupported) = match &step.kind {
            StepKind::Run(r) => (StepType::Run, Some(&r.container), None),
            StepKind::Background(b) => (StepType::Background, Some(&b.container), None),
            StepKind::Plugin(p) => (StepType::Plugin, Some(&p.container), None),
            StepKind::Unsupported { step_type, reason } => (
                StepType::Other(step_type.clone()),
                None,
                Some(format!("`{step_type}` steps cannot run locally: {reason}")),
            ),
        };
        if let Some(c) = container {
            for (k, v) in &c.env {
                let t = self.template(v, s, loc, &format!("envVariables.{k}"));
                env.retain(|(name, _)| name != k);
                env.push((k.clone(), t));
            }
        }
        let image = container.and_then(|c| {
            c.image.as_ref().map(|i| {
                let reference = self.static_text(i, s, loc, "image");
                let at = c.image_at.as_ref().unwrap_or(loc);
                // A reference made by expressions is checked once they are resolved;
                // placeholders of unanswered inputs (`<input>`) are not references yet.
                if expr::has_expressions(i)
                    && !reference.contains('<')
                    && !crate::recipe::is_recipe_reference(&reference)
                {
                    if let Err(e) = crate::pipeline::check_image_reference(&reference) {
                        self.error(
                            at,
                            format!("`image` of step `{}` (`{i}`): {e}", step.identifier),
                        );
                    }
                }
                // A recipe (`./images/pg.yaml`) is built from the workspace's file.
                let source = if crate::recipe::is_recipe_reference(&reference) {
                    let path: std::path::PathBuf = self
                        .inputs
                        .workspace
                        .join(&reference)
                        .components()
                        .collect();
                    if !path.is_file() {
                        self.error(
                            at,
                            format!("image recipe {} does not exist", path.display()),
                        );
                    }
                    path.display().to_string()
                } else {
                    reference.clone()
                };
                ImagePlan {
                    source,
                    reference,
                    pull_policy: c.pull_policy.unwrap_or(PullPolicy::IfNotPresent),
                    connector_ref: c.connector_ref.clone(),
                    connector_note: None,
                }
            })
        });
        let mut output_variables = Vec::new();
        let mut port_bindings = Vec::new();
        let process = match &step.kind {
            StepKind::Run(r) => {
                output_variables = r.output_variables.clone();
                ProcessTemplate::Shell {
                    shell: r.shell.unwrap_or(Shell::Sh),
                    script: self.template(&r.command, s, loc, "command"),
                }
            }
            StepKind::Background(b) => {
                port_bindings = b.port_bindings.clone();
                if let Some(ep) = &b.entrypoint {
                    ProcessTemplate::Exec {
                        argv: ep
                            .iter()
                            .map(|a| self.template(a, s, loc, "entrypoint"))
                            .collect(),
                    }
                } else if let Some(cmd) = &b.command {
                    ProcessTemplate::Shell {
                        shell: b.shell.unwrap_or(Shell::Sh),
                        script: self.template(cmd, s, loc, "command"),
                    }
                } else {
                    if image.is_none() {
                        self.error(loc, format!("Background step `{}` has no image, command or entrypoint: nothing to run", step.identifier));
                    }
                    ProcessTemplate::ImageDefault
                }
            }
            StepKind::Plugin(p) => {
                if image.is_none() {
                    self.error(loc, format!("Plugin step `{}` needs an `image` (sandrun runs plugins as images, as Drone does)", step.identifier));
                }
                for (k, v) in &p.settings {
                    let t = self.template(v, s, loc, &format!("settings ({k})"));
                    env.retain(|(name, _)| name != k);
                    env.push((k.clone(), t));
                }
                match &p.entrypoint {
                    Some(ep) => ProcessTemplate::Exec {
                        argv: ep
                            .iter()
                            .map(|a| self.template(a, s, loc, "entrypoint"))
                            .collect(),
                    },
                    None => ProcessTemplate::ImageDefault,
                }
            }
            StepKind::Unsupported { .. } => ProcessTemplate::ImageDefault,
        };

        let strategies = if step.failure_strategies.is_empty() {
            inherited
        } else {
            &step.failure_strategies
        };
        let mut plan = StepPlan {
            key: key.clone(),
            identifier: step.identifier.clone(),
            name: step.name.clone(),
            step_type,
            unsupported,
            image,
            process,
            env,
            output_variables,
            port_bindings,
            reports: container.map(|c| c.reports.clone()).unwrap_or_default(),
            timeout: self.timeout(step.timeout.as_ref(), s),
            run_when: step
                .when
                .as_ref()
                .map_or(StageStatus::Success, |w| w.stage_status),
            condition: step
                .when
                .as_ref()
                .and_then(|w| w.condition.as_deref())
                .and_then(|c| self.condition(c, s, loc)),
            on_failure: failure_policy(strategies),
            privileged: container.is_some_and(|c| c.privileged),
            run_as_user: container.and_then(|c| c.run_as_user.clone()),
            resources: container.map(|c| c.resources.clone()).unwrap_or_default(),
            hostnames: Vec::new(),
            address: None,
            template: step.template.as_ref().map(ToString::to_string),
            loc: loc.clone(),
        };
        self.expr_fields(&mut plan, &step.expr_fields, s);
        scope.done.insert(key);
        scope.step_id = outer_id;
        scope.step_name = outer_name;
        Node::Step(Box::new(plan))
    }

    /// A `when.condition`, with what is known now substituted.
    fn condition(&mut self, text: &str, scope: &Scope, loc: &Location) -> Option<CondPlan> {
        match expr::parse_condition(text) {
            Ok(c) => Some(c.map(&mut |o| self.operand(o, scope, loc))),
            Err(e) => {
                self.error(loc, format!("in `when.condition`: {e}"));
                None
            }
        }
    }

    fn operand(&mut self, o: &Operand, scope: &Scope, loc: &Location) -> Template {
        match o {
            Operand::Text(t) => Template::literal(t.clone()),
            Operand::Expr(e) => match self.resolve(e, scope, loc, "when.condition") {
                Resolved::Text(t) => Template::literal(t),
                Resolved::Output {
                    stage,
                    step,
                    variable,
                } => Template {
                    parts: vec![TemplatePart::StepOutput {
                        stage,
                        step,
                        variable,
                    }],
                },
            },
        }
    }
}

enum Resolved {
    Text(String),
    Output {
        stage: Option<String>,
        step: String,
        variable: String,
    },
}

/// Whether step key `key` (`G.H.ID`) names step `step` inside groups ending with
/// `group_path` (any groups when it is empty).
fn key_matches(key: &str, group_path: &[String], step: &str) -> bool {
    let mut parts: Vec<&str> = key.split('.').collect();
    if parts.pop() != Some(step) {
        return false;
    }
    parts.ends_with(&group_path.iter().map(String::as_str).collect::<Vec<_>>())
}

fn push_text(t: &mut Template, s: &str) {
    if let Some(TemplatePart::Text(last)) = t.parts.last_mut() {
        last.push_str(s);
    } else {
        t.parts.push(TemplatePart::Text(s.to_string()));
    }
}

fn is_bare_input(v: &str) -> bool {
    matches!(
        expr::parse_template(v.trim()).as_deref(),
        Ok([Part::Expr(Expr::Input { .. })])
    )
}

fn scope_step_key(scope: &Scope) -> String {
    if scope.group_key.is_empty() {
        scope.step_id.clone()
    } else {
        format!("{}.{}", scope.group_key, scope.step_id)
    }
}

fn execution_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("local-{:x}-{:x}", std::process::id(), nanos)
}

fn failure_policy(strategies: &[FailureStrategy]) -> FailurePolicy {
    FailurePolicy {
        rules: strategies
            .iter()
            .map(|s| FailureRule {
                // `AllErrors` (or no list) matches everything; `Timeout` only timeouts;
                // every other Harness error type is what a failed process is locally.
                errors: if s.errors.is_empty() || s.errors.iter().any(|e| e == "AllErrors") {
                    Vec::new()
                } else {
                    let mut kinds: Vec<ErrorKind> = s
                        .errors
                        .iter()
                        .map(|e| {
                            if e == "Timeout" {
                                ErrorKind::Timeout
                            } else {
                                ErrorKind::Failure
                            }
                        })
                        .collect();
                    kinds.dedup();
                    kinds
                },
                action: action(&s.action),
            })
            .collect(),
    }
}

fn action(a: &FailureAction) -> Action {
    match a {
        FailureAction::Ignore => Action::Ignore,
        FailureAction::MarkAsSuccess => Action::MarkAsSuccess,
        FailureAction::MarkAsFailure => Action::MarkAsFailure,
        FailureAction::Abort => Action::Abort,
        FailureAction::Retry {
            count,
            intervals,
            on_retry_failure,
        } => Action::Retry {
            count: *count,
            intervals: intervals.clone(),
            then: Box::new(action(on_retry_failure)),
        },
    }
}

/// What the stage asks for that a local run cannot give in full. These never stop the
/// run; they are printed by `plan` and before `run` starts.
fn stage_warnings(
    stage: &StagePlan,
    platform: Option<&crate::pipeline::Platform>,
    loc: &Location,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = platform {
        let host = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        if !p.arch.eq_ignore_ascii_case(host) {
            out.push(format!(
                "{loc}: stage `{}` asks for platform {}/{}, but this machine is {host}: images are pulled for {host}",
                stage.identifier, p.os, p.arch
            ));
        }
    }
    let host_steps: Vec<&str> = (stage.steps().into_iter())
        .filter(|s| s.image.is_none() && s.unsupported.is_none())
        .map(|s| s.key.as_str())
        .collect();
    // Host steps see the host's filesystem: the stage's directory is bound over a
    // shared path only where that directory exists on this machine.
    let missing: Vec<&str> = (stage.shared_paths.iter())
        .filter(|p| p.starts_with('/') && !Path::new(p).is_dir())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() && !host_steps.is_empty() {
        out.push(format!(
            "{loc}: stage `{}`: `sharedPaths` {} are not directories on this machine, so its host steps ({}) do not share them (container steps do); sandrun does not create paths on the host",
            stage.identifier,
            missing.join(", "),
            host_steps.join(", ")
        ));
    }
    for s in stage.steps() {
        if s.image.is_some() || s.unsupported.is_some() {
            continue;
        }
        let mut ignored = Vec::new();
        if s.privileged {
            ignored.push("`privileged`");
        }
        if s.run_as_user.is_some() {
            ignored.push("`runAsUser`");
        }
        if s.resources.memory.is_some() || s.resources.cpu_millis.is_some() {
            ignored.push("`resources.limits`");
        }
        if !ignored.is_empty() {
            out.push(format!(
                "{}: step `{}` has no image, so it runs the host's binaries as you: {} cannot apply and {} ignored",
                s.loc,
                s.key,
                ignored.join(", "),
                if ignored.len() == 1 { "is" } else { "are" }
            ));
        }
    }
    out
}

/// Give every step that will run its names and its address on the stage network.
///
/// Names follow Harness: the identifier, and `GroupId_StepId` inside step groups (the
/// innermost group; with nested groups also the whole path joined by `_`). The network
/// layer leaves out names that would mean two steps.
fn address_steps(stage: &mut StagePlan, egress: bool) -> Result<(), crate::net::NetPlanError> {
    let requests: Vec<StepRequest> = stage
        .steps()
        .into_iter()
        .filter(|s| s.unsupported.is_none())
        .map(|s| {
            let parts: Vec<&str> = s.key.split('.').collect();
            let mut hostnames = vec![s.identifier.clone()];
            if parts.len() >= 2 {
                hostnames.push(parts[parts.len() - 2..].join("_"));
            }
            if parts.len() > 2 {
                hostnames.push(parts.join("_"));
            }
            StepRequest {
                key: s.key.clone(),
                hostnames,
                port_bindings: s.port_bindings.iter().map(|&b| b.into()).collect(),
                on_machine: s.image.is_none(),
            }
        })
        .collect();
    let mut net = crate::net::allocate(stage.network.mode, &requests)?;
    net.egress = egress;
    // Indexed once: a search of the step list per step made large stages quadratic.
    let by_key: HashMap<&str, &StepEndpoint> =
        net.steps.iter().map(|e| (e.key.as_str(), e)).collect();
    fn walk(nodes: &mut [Node], net: &HashMap<&str, &StepEndpoint>) {
        for n in nodes {
            match n {
                Node::Step(s) => {
                    if let Some(e) = net.get(s.key.as_str()) {
                        s.hostnames = e.hostnames.clone();
                        s.address = Some(e.address);
                    }
                }
                Node::Parallel { nodes }
                | Node::Group(GroupPlan { nodes, .. })
                | Node::Loop(LoopPlan { nodes, .. }) => walk(nodes, net),
            }
        }
    }
    walk(&mut stage.nodes, &by_key);
    drop(by_key);
    stage.net = Some(net);
    Ok(())
}

/// The `DRONE_*` commit, branch and repository variables that the workspace's git
/// answers. The repository's owner and name come from the `origin` remote's URL
/// (`https://host/OWNER/NAME.git`, `git@host:OWNER/NAME.git`).
fn drone_commit_env(c: &Codebase) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("DRONE_COMMIT_SHA", &c.sha),
        ("DRONE_COMMIT", &c.sha),
        ("DRONE_COMMIT_BRANCH", &c.branch),
        ("DRONE_BRANCH", &c.branch),
        ("DRONE_SOURCE_BRANCH", &c.branch),
        ("DRONE_TARGET_BRANCH", &c.branch),
        ("DRONE_COMMIT_MESSAGE", &c.message),
        ("DRONE_COMMIT_AUTHOR_NAME", &c.author_name),
        ("DRONE_COMMIT_AUTHOR_EMAIL", &c.author_email),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    if c.repo_url.is_empty() {
        return env;
    }
    env.push(("DRONE_REMOTE_URL".into(), c.repo_url.clone()));
    let url_kind = if c.repo_url.starts_with("http://") || c.repo_url.starts_with("https://") {
        "DRONE_GIT_HTTP_URL"
    } else {
        "DRONE_GIT_SSH_URL"
    };
    env.push((url_kind.into(), c.repo_url.clone()));
    let path = c.repo_url.trim_end_matches('/').trim_end_matches(".git");
    let mut parts = path.rsplit(['/', ':']);
    if let Some(name) = parts.next().filter(|n| !n.is_empty()) {
        env.push(("DRONE_REPO_NAME".into(), name.to_string()));
        if let Some(owner) = parts.next().filter(|o| !o.is_empty() && !o.contains('@')) {
            env.push(("DRONE_REPO_OWNER".into(), owner.to_string()));
            env.push(("DRONE_REPO_NAMESPACE".into(), owner.to_string()));
            env.push(("DRONE_REPO".into(), format!("{owner}/{name}")));
        }
    }
    env
}

fn read_codebase(workspace: &Path) -> Result<Codebase, String> {
    let not_a_repository = |why: &str| {
        format!(
            "the workspace {} is not a git repository with a commit ({why})",
            workspace.display()
        )
    };
    // No `.git` in the workspace or above it: not a repository, said without starting
    // git (a process start is a large share of a short run's start-up). With GIT_DIR
    // set, git decides.
    if std::env::var_os("GIT_DIR").is_none()
        && !workspace.ancestors().any(|dir| dir.join(".git").exists())
    {
        return Err(not_a_repository("no .git directory"));
    }
    // The four questions at once: one git start's wait instead of four in a row.
    let ask = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let asked = [
        ask(&["rev-parse", "HEAD"]),
        ask(&["rev-parse", "--abbrev-ref", "HEAD"]),
        ask(&["config", "--get", "remote.origin.url"]),
        ask(&["log", "-1", "--format=%an%x00%ae%x00%B"]),
    ];
    let [sha, branch, repo_url, head] = asked.map(|child| -> Result<String, String> {
        let out = child
            .and_then(|c| c.wait_with_output())
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(not_a_repository(
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let (sha, branch, head) = (sha?, branch?, head?);
    let repo_url = repo_url.unwrap_or_default();
    let mut head = head.splitn(3, '\0');
    let mut field = || head.next().unwrap_or_default().trim().to_string();
    let (author_name, author_email, message) = (field(), field(), field());
    Ok(Codebase {
        branch,
        sha,
        repo_url,
        message,
        author_name,
        author_email,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::plan::Outputs;

    fn plan(yaml: &str, answers: &[(&str, &str)]) -> Result<Plan, String> {
        let file =
            crate::pipeline::parse_str(Path::new("p.yaml"), yaml).map_err(|e| e.to_string())?;
        let inputs = PlanInputs {
            inputs: answers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..PlanInputs::default()
        };
        build(&file, &inputs).map_err(|e| e.to_string())
    }

    fn script<'p>(plan: &'p Plan, stage: usize, key: &str) -> &'p Template {
        let step = plan.stages[stage]
            .steps()
            .into_iter()
            .find(|s| s.key == key)
            .unwrap();
        match &step.process {
            ProcessTemplate::Shell { script, .. } => script,
            other => panic!("{other:?}"),
        }
    }

    const TWO_STAGES: &str = r#"pipeline:
  name: p
  identifier: p
  stages:
    - stage:
        name: a
        identifier: a
        type: CI
        variables:
          - name: v
            type: String
            value: from-a
        spec:
          execution:
            steps:
              - stepGroup:
                  name: outer
                  identifier: outer
                  variables:
                    - name: gv
                      type: String
                      value: group-value
                  steps:
                    - stepGroup:
                        name: inner
                        identifier: inner
                        steps:
                          - step:
                              type: Run
                              name: s
                              identifier: s
                              spec:
                                command: X=1
                                outputVariables:
                                  - name: X
                    - step:
                        type: Run
                        name: t
                        identifier: t
                        spec:
                          command: echo <+inner.steps.s.output.outputVariables.X> <+outer.variables.gv> <+a.variables.v>
    - stage:
        name: b
        identifier: b
        type: CI
        spec:
          execution:
            steps:
              - step:
                  type: Run
                  name: u
                  identifier: u
                  timeout: <+pipeline.stages.a.variables.v.length>
                  spec:
                    command: echo <+pipeline.stages.a.spec.execution.steps.inner.steps.s.output.outputVariables.X> <+pipeline.stages.a.name>
"#;

    #[test]
    fn an_answer_outside_allowed_values_is_refused() {
        let yaml = "pipeline:\n  identifier: p\n  variables:\n    - name: env\n      type: String\n      value: <+input>.allowedValues(dev,prod)\n  stages:\n    - stage:\n        identifier: s\n        type: CI\n        spec:\n          execution:\n            steps:\n              - step:\n                  identifier: t\n                  type: Run\n                  spec:\n                    command: echo <+pipeline.variables.env>\n";
        let e = plan(yaml, &[("env", "qa")]).unwrap_err();
        assert!(
            e.contains("`qa` is not an allowed value for variable `env` (allowed: dev, prod)"),
            "{e}"
        );
        let ok = plan(yaml, &[("env", "prod")]).unwrap();
        assert_eq!(
            script(&ok, 0, "t").render(&Outputs::default(), &mut Vec::new()),
            "echo prod"
        );
    }

    #[test]
    fn an_unanswered_step_input_with_allowed_values_passes_validation() {
        let yaml = "stage:\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n        - step:\n            identifier: t\n            type: Run\n            spec:\n              shell: <+input>.allowedValues(Sh,Bash)\n              command: \"true\"\n";
        let file = crate::pipeline::parse_str(Path::new("p.yaml"), yaml).unwrap();
        let inputs = PlanInputs {
            placeholders: true,
            ..PlanInputs::default()
        };
        build(&file, &inputs).unwrap();
        let e = plan(yaml, &[("t.shell", "Zsh")]).unwrap_err();
        assert!(
            e.contains("`Zsh` is not an allowed value for `t.shell`"),
            "{e}"
        );
    }

    /// The codebase comes from the workspace's git, asked once; a workspace without
    /// `.git` in it or above it is no repository, said without starting git.
    #[test]
    fn the_codebase_is_read_from_the_workspaces_git() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_codebase(dir.path()).unwrap_err();
        assert!(err.contains("no .git directory"), "{err}");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_AUTHOR_NAME", "Ada")
                .env("GIT_AUTHOR_EMAIL", "ada@example.com")
                .env("GIT_COMMITTER_NAME", "Ada")
                .env("GIT_COMMITTER_EMAIL", "ada@example.com")
                .output()
                .expect("git (scripts/setup.sh installs it)");
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        git(&["init", "-q", "-b", "trunk"]);
        git(&[
            "remote",
            "add",
            "origin",
            "https://git.example.com/acme/widgets.git",
        ]);
        git(&["commit", "-q", "--allow-empty", "-m", "first light"]);
        let sha = git(&["rev-parse", "HEAD"]);
        let c = read_codebase(&dir.path().join(".")).unwrap();
        assert_eq!(
            (c.sha.as_str(), c.branch.as_str(), c.repo_url.as_str()),
            (
                sha.as_str(),
                "trunk",
                "https://git.example.com/acme/widgets.git"
            )
        );
        assert_eq!(
            (
                c.author_name.as_str(),
                c.author_email.as_str(),
                c.message.as_str()
            ),
            ("Ada", "ada@example.com", "first light")
        );
    }

    #[test]
    fn drone_repository_variables_come_from_the_origin_url() {
        let env = |url: &str| -> BTreeMap<String, String> {
            drone_commit_env(&Codebase {
                branch: "main".into(),
                sha: "abc".into(),
                repo_url: url.into(),
                message: "m".into(),
                author_name: "a".into(),
                author_email: "a@e".into(),
            })
            .into_iter()
            .collect()
        };
        let ssh = env("git@github.com:acme/widgets.git");
        assert_eq!(ssh["DRONE_REPO"], "acme/widgets");
        assert_eq!(ssh["DRONE_REPO_NAME"], "widgets");
        assert_eq!(ssh["DRONE_GIT_SSH_URL"], "git@github.com:acme/widgets.git");
        let http = env("https://git.example.com/acme/widgets/");
        assert_eq!(http["DRONE_REPO_OWNER"], "acme");
        assert!(http.contains_key("DRONE_GIT_HTTP_URL"));
        let none = env("");
        assert_eq!(none["DRONE_COMMIT_SHA"], "abc");
        assert!(!none.contains_key("DRONE_REPO_NAME"));
    }

    #[test]
    fn references_resolve_to_the_right_stage_and_step() {
        let yaml = TWO_STAGES.replace(
            "                  timeout: <+pipeline.stages.a.variables.v.length>\n",
            "",
        );
        let p = plan(&yaml, &[]).unwrap();
        let hole = |stage: Option<&str>| TemplatePart::StepOutput {
            stage: stage.map(String::from),
            step: "outer.inner.s".into(),
            variable: "X".into(),
        };
        assert_eq!(
            script(&p, 0, "outer.t").parts,
            vec![
                TemplatePart::Text("echo ".into()),
                hole(None),
                TemplatePart::Text(" group-value from-a".into()),
            ]
        );
        assert_eq!(
            script(&p, 1, "u").parts,
            vec![
                TemplatePart::Text("echo ".into()),
                hole(Some("a")),
                TemplatePart::Text(" a".into()),
            ]
        );
        // The earlier stage's value is read from what it gave the run.
        let mut outputs = Outputs::default();
        outputs.earlier.insert(
            "a".into(),
            [(
                "outer.inner.s".to_string(),
                [("X".to_string(), "42".to_string())].into(),
            )]
            .into(),
        );
        assert_eq!(
            script(&p, 1, "u").render(&outputs, &mut Vec::new()),
            "echo 42 a"
        );
    }

    #[test]
    fn timeouts_resolve_before_the_run() {
        let yaml = TWO_STAGES.replace(
            "<+pipeline.stages.a.variables.v.length>",
            "<+pipeline.variables.t>",
        );
        let yaml = yaml.replace(
            "  identifier: p\n",
            "  identifier: p\n  variables:\n    - name: t\n      type: String\n      value: <+input>\n",
        );
        let p = plan(&yaml, &[("t", "1m 30s")]).unwrap();
        assert_eq!(
            p.stages[1].steps()[0].timeout,
            Some(Duration::from_secs(90))
        );
        let e = plan(&yaml, &[("t", "soon")]).unwrap_err();
        assert!(
            e.starts_with(
                "p.yaml:57:28: `timeout` is `<+pipeline.variables.t>`, which resolves to `soon`"
            ),
            "{e}"
        );
    }

    #[test]
    fn server_values_are_answered_or_all_listed() {
        let yaml = r#"stage:
  name: s
  identifier: s
  type: CI
  spec:
    execution:
      steps:
        - step:
            type: Run
            name: r
            identifier: r
            spec:
              command: |
                echo <+trigger.branch>
                echo <+variable.org.x> <+elsewhere.variables.y>
"#;
        let e = plan(yaml, &[("variable.org.x", "1")]).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(lines[0].starts_with("p.yaml:14:22: `<+trigger.branch>` is known only to Harness's server: give it with --set trigger.branch=VALUE"), "{e}");
        assert!(
            lines[1].starts_with("p.yaml:15:40: `<+elsewhere.variables.y>`"),
            "{e}"
        );
        let p = plan(
            yaml,
            &[
                ("variable.org.x", "1"),
                ("trigger.branch", "main"),
                ("elsewhere.variables.y", "2"),
            ],
        )
        .unwrap();
        assert_eq!(
            script(&p, 0, "r").parts,
            vec![TemplatePart::Text("echo main\necho 1 2\n".into())]
        );
    }

    #[test]
    fn typed_fields_may_be_expressions() {
        let yaml = r#"stage:
  name: s
  identifier: s
  type: CI
  variables:
    - name: dind
      type: String
      value: <+input>.default(true)
    - name: mem
      type: String
      value: 1Gi
  spec:
    execution:
      steps:
        - step:
            type: Run
            name: r
            identifier: r
            spec:
              image: docker:27
              imagePullPolicy: <+input>.allowedValues(Always,Never)
              shell: <+pipeline.variables.nope>
              privileged: <+stage.variables.dind>
              command: "true"
              resources:
                limits:
                  memory: <+stage.variables.mem>
                  cpu: <+stage.variables.dind>
"#;
        // The parser checks the expressions of these fields like any other.
        let e = plan(yaml, &[]).unwrap_err();
        assert_eq!(
            e,
            "p.yaml:22:22: `<+pipeline.variables.nope>`: the file holds a single stage, which has no pipeline variables"
        );
        let yaml = yaml.replace("              shell: <+pipeline.variables.nope>\n", "");
        let e = plan(&yaml, &[("r.imagePullPolicy", "Never")]).unwrap_err();
        assert_eq!(
            e,
            "p.yaml:27:24: `resources.limits.cpu` is `<+stage.variables.dind>`, which resolves to `true`: `true` is not a quantity"
        );
        let yaml = yaml.replace("                  cpu: <+stage.variables.dind>\n", "");
        let p = plan(&yaml, &[("r.imagePullPolicy", "Never")]).unwrap();
        let step = p.stages[0].steps()[0].clone();
        assert!(step.privileged);
        assert_eq!(step.resources.memory, Some(1 << 30));
        assert_eq!(
            step.image.as_ref().map(|i| i.pull_policy),
            Some(PullPolicy::Never)
        );
        let e = plan(&yaml, &[("r.imagePullPolicy", "Never"), ("dind", "yes")]).unwrap_err();
        assert!(
            e.starts_with("p.yaml:22:27: `privileged` is `<+stage.variables.dind>`, which resolves to `yes`: it must be true or false"),
            "{e}"
        );
    }

    #[test]
    fn done_steps_roll_back_a_parallel_branch() {
        let mut d = DoneSteps::default();
        d.insert("a".into());
        let mark = d.mark();
        d.insert("g.b".into());
        assert_eq!(d.with_identifier("b"), ["g.b"]);
        assert_eq!(d.rollback(mark), ["g.b"]);
        assert!(d.contains("a") && !d.contains("g.b"));
        assert!(d.with_identifier("b").is_empty());
    }

    /// A stage of 21,000 steps (7,000 groups of a parallel pair and a step reading both
    /// outputs) plans in one pass: the finished-steps set is updated in place, never
    /// copied per step, group or branch, and every lookup goes through an index.
    #[test]
    fn a_stage_of_twenty_thousand_steps_plans() {
        let groups = 7000;
        let mut text = String::from(
            "stage:\n  name: s\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n",
        );
        let out = "{ command: echo, outputVariables: [{ name: V }] }";
        for i in 0..groups {
            text.push_str(&format!(
                "        - stepGroup:\n            name: g{i}\n            identifier: g{i}\n            steps:\n              - parallel:\n                  - step: {{ type: Run, name: a, identifier: a, spec: {out} }}\n                  - step: {{ type: Run, name: b, identifier: b, spec: {out} }}\n              - step: {{ type: Run, name: c, identifier: c, spec: {{ command: \"echo <+steps.a.output.outputVariables.V> <+steps.b.output.outputVariables.V>\" }} }}\n"
            ));
        }
        let file = crate::pipeline::parse_str(Path::new("big.yaml"), &text).unwrap();
        let workspace = tempfile::tempdir().unwrap();
        let plan = build(
            &file,
            &PlanInputs {
                workspace: workspace.path().to_path_buf(),
                ..Default::default()
            },
        )
        .unwrap();
        let steps = plan.stages[0].steps();
        assert_eq!(steps.len(), 3 * groups);
        let last = steps.last().unwrap();
        assert_eq!(last.key, format!("g{}.c", groups - 1));
        let ProcessTemplate::Shell { script, .. } = &last.process else {
            panic!("{:?}", last.process)
        };
        let refs: Vec<&str> = script.step_refs().collect();
        assert_eq!(
            refs,
            [format!("g{}.a", groups - 1), format!("g{}.b", groups - 1)]
        );
    }
}
