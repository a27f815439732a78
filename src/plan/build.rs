//! From a parsed pipeline and the user's answers to a [`Plan`].
//!
//! Resolves every expression known before the run (names, variables, `<+input>`,
//! secrets, codebase facts), checks that step-output references point at steps that
//! will have finished, and decides hostnames and the network mode. All problems are
//! collected and reported together, each with the location it comes from.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::pipeline::expr::{self, CodebaseField, Expr, Operand, TemplatePart as Part};
use crate::pipeline::{
    FailureAction, FailureStrategy, Infrastructure, Location, PipelineFile, PullPolicy, Shell,
    Stage, StageStatus, Step, StepItem, StepKind, Variable, VariableType,
};

use crate::net::StepRequest;

use super::{
    Action, CondPlan, ErrorKind, FailurePolicy, FailureRule, GroupPlan, ImagePlan, NetworkChoice,
    NetworkMode, NetworkPlan, Node, PipelineName, Plan, ProcessTemplate, Secrets, StagePlan,
    StepPlan, StepType, Template, TemplatePart,
};

/// What the user tells sandrun besides the pipeline file.
#[derive(Clone, Debug, Default)]
pub struct PlanInputs {
    pub workspace: PathBuf,
    /// Answers to `<+input>`: variable names, or `STEP.FIELD` for step fields.
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
    step_id: String,
    step_name: String,
    /// Keys of the steps that have finished before this point.
    done: HashSet<String>,
}

struct Codebase {
    branch: String,
    sha: String,
    repo_url: String,
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
        });
        if let Some(p) = &self.file.pipeline {
            let scope = Scope::default();
            self.pipeline_vars = self.variables(&p.variables, &scope, "pipeline.variables");
        }
        if let Some(want) = &self.inputs.stage {
            if !self.file.stages.iter().any(|s| &s.identifier == want) {
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
                self.inputs
                    .stage
                    .as_ref()
                    .is_none_or(|w| w == &s.identifier)
            })
            .map(|s| self.stage(s))
            .collect();
        Plan {
            source: self.file.path.clone(),
            pipeline,
            workspace: self.inputs.workspace.clone(),
            stages,
            secrets: self.secrets.clone(),
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
                warnings: Vec::new(),
                timeout: stage.timeout,
                nodes: Vec::new(),
            };
        };
        scope.stage_vars = self.variables(&stage.variables, &scope, "stage.variables");
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
            warnings: Vec::new(),
            timeout: stage.timeout,
            nodes,
        };
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
                        match self.answer(&v.name, &answer_key) {
                            Some(a) => a,
                            None => {
                                let parsed = expr::parse_template(&v.value).ok();
                                let default = parsed.and_then(|p| match p.first() {
                                    Some(Part::Expr(Expr::Input { default, .. })) => {
                                        default.clone()
                                    }
                                    _ => None,
                                });
                                match default.or_else(|| v.default.clone()) {
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
                                }
                            }
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
            Err(e) => {
                self.error(loc, format!("in `{field}`: {e}"));
                return Template::literal(text);
            }
        };
        let mut out = Template::default();
        for part in parts {
            match part {
                Part::Literal(s) => push_text(&mut out, &s),
                Part::Expr(e) => match self.resolve(&e, scope, loc, field) {
                    Resolved::Text(s) => push_text(&mut out, &s),
                    Resolved::Output { step, variable } => {
                        out.parts.push(TemplatePart::StepOutput { step, variable })
                    }
                },
            }
        }
        out
    }

    fn resolve(&mut self, e: &Expr, scope: &Scope, loc: &Location, field: &str) -> Resolved {
        let text = |s: &str| Resolved::Text(s.to_string());
        match e {
            Expr::PipelineName => text(self.file.pipeline.as_ref().map_or("", |p| p.name.as_str())),
            Expr::PipelineIdentifier => text(
                self.file
                    .pipeline
                    .as_ref()
                    .map_or("", |p| p.identifier.as_str()),
            ),
            Expr::PipelineSequenceId => text("1"),
            Expr::PipelineExecutionId => Resolved::Text(execution_id()),
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
                group_path,
                step,
                variable,
            } => match self.output_ref(group_path, step, scope) {
                Ok(key) => Resolved::Output {
                    step: key,
                    variable: variable.clone(),
                },
                Err(why) => self.unknown(loc, field, e, &why),
            },
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
                    None if self.inputs.placeholders => "<input>".to_string(),
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
        // Harness lets `<+steps.ID>` find a step by identifier alone when it is unique.
        if group_path.is_empty() {
            let found: Vec<&String> = scope
                .done
                .iter()
                .filter(|k| k.rsplit('.').next() == Some(step))
                .collect();
            if found.len() == 1 {
                return Ok(found[0].clone());
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

    fn item(
        &mut self,
        item: &StepItem,
        scope: &mut Scope,
        groups: &[&str],
        inherited: &[FailureStrategy],
    ) -> Node {
        match item {
            StepItem::Step(step) => self.step(step, scope, groups, inherited),
            StepItem::Parallel(items, _) => {
                // Every branch sees only what finished before the block.
                let before = scope.done.clone();
                let mut nodes = Vec::new();
                let mut finished = before.clone();
                for i in items {
                    let mut s = scope.clone();
                    s.done = before.clone();
                    nodes.push(self.item(i, &mut s, groups, inherited));
                    finished.extend(s.done);
                }
                scope.done = finished;
                Node::Parallel { nodes }
            }
            StepItem::Group(g) => {
                let mut path: Vec<&str> = groups.to_vec();
                path.push(&g.identifier);
                let key = path.join(".");
                let mut s = scope.clone();
                s.group_key = key.clone();
                let vars = self.variables(&g.variables, &s, "stepGroup.variables");
                s.group_vars.extend(vars);
                let strategies = if g.failure_strategies.is_empty() {
                    inherited
                } else {
                    &g.failure_strategies
                };
                let nodes = self.items(&g.steps, &mut s, &path, strategies);
                scope.done = s.done;
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
        let mut s = scope.clone();
        s.step_id = step.identifier.clone();
        s.step_name = step.name.clone();
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
                StepType::Run,
                None,
                Some(format!("`{step_type}` steps cannot run locally: {reason}")),
            ),
        };
        if let Some(c) = container {
            for (k, v) in &c.env {
                let t = self.template(v, &s, loc, &format!("envVariables.{k}"));
                env.retain(|(name, _)| name != k);
                env.push((k.clone(), t));
            }
        }
        let image = container.and_then(|c| {
            c.image.as_ref().map(|i| {
                let reference = self.static_text(i, &s, loc, "image");
                ImagePlan {
                    source: reference.clone(),
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
                    script: self.template(&r.command, &s, loc, "command"),
                }
            }
            StepKind::Background(b) => {
                port_bindings = b.port_bindings.clone();
                if let Some(ep) = &b.entrypoint {
                    ProcessTemplate::Exec {
                        argv: ep
                            .iter()
                            .map(|a| self.template(a, &s, loc, "entrypoint"))
                            .collect(),
                    }
                } else if let Some(cmd) = &b.command {
                    ProcessTemplate::Shell {
                        shell: b.shell.unwrap_or(Shell::Sh),
                        script: self.template(cmd, &s, loc, "command"),
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
                    let t = self.template(v, &s, loc, &format!("settings ({k})"));
                    env.retain(|(name, _)| name != k);
                    env.push((k.clone(), t));
                }
                match &p.entrypoint {
                    Some(ep) => ProcessTemplate::Exec {
                        argv: ep
                            .iter()
                            .map(|a| self.template(a, &s, loc, "entrypoint"))
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
        let plan = StepPlan {
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
            timeout: step.timeout,
            run_when: step
                .when
                .as_ref()
                .map_or(StageStatus::Success, |w| w.stage_status),
            condition: step
                .when
                .as_ref()
                .and_then(|w| w.condition.as_deref())
                .and_then(|c| self.condition(c, &s, loc)),
            on_failure: failure_policy(strategies),
            privileged: container.is_some_and(|c| c.privileged),
            run_as_user: container.and_then(|c| c.run_as_user.clone()),
            resources: container.map(|c| c.resources.clone()).unwrap_or_default(),
            hostnames: Vec::new(),
            address: None,
            loc: loc.clone(),
        };
        scope.done.insert(key);
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
                Resolved::Output { step, variable } => Template {
                    parts: vec![TemplatePart::StepOutput { step, variable }],
                },
            },
        }
    }
}

enum Resolved {
    Text(String),
    Output { step: String, variable: String },
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
            }
        })
        .collect();
    let mut net = crate::net::allocate(stage.network.mode, &requests)?;
    net.egress = egress;
    fn walk(nodes: &mut [Node], net: &NetworkPlan) {
        for n in nodes {
            match n {
                Node::Step(s) => {
                    if let Some(e) = net.step(&s.key) {
                        s.hostnames = e.hostnames.clone();
                        s.address = Some(e.address);
                    }
                }
                Node::Parallel { nodes } | Node::Group(GroupPlan { nodes, .. }) => walk(nodes, net),
            }
        }
    }
    walk(&mut stage.nodes, &net);
    stage.net = Some(net);
    Ok(())
}

fn read_codebase(workspace: &Path) -> Result<Codebase, String> {
    let git = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the workspace {} is not a git repository with a commit ({})",
                workspace.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let sha = git(&["rev-parse", "HEAD"])?;
    let branch = git(&["rev-parse", "--abbrev-ref", "HEAD"])?;
    let repo_url = git(&["config", "--get", "remote.origin.url"]).unwrap_or_default();
    Ok(Codebase {
        branch,
        sha,
        repo_url,
    })
}
