//! Checks that need the whole stage rather than one field: identifiers unique in their
//! scope, parallel steps that read each other's outputs, and expressions that name
//! something of the file (a variable, stage, step group or step): it must exist and be
//! known where the expression is read.
//!
//! Harness addresses a step by its fully qualified name
//! (`pipeline.stages.S.spec.execution.steps.G.steps.ID`): a `parallel` block adds no
//! level to that name, a step group does. So identifiers must be unique among the items
//! of one `steps` list including everything inside its `parallel` blocks (Harness
//! rejects such duplicates when the pipeline is saved), while steps in different step
//! groups may share an identifier; their hostnames (`GroupId_StepId`) and expressions
//! (`<+execution.steps.G.steps.ID...>`) stay distinct.

use std::collections::{HashMap, HashSet};

use super::error::{ErrorKind, PipelineError, PipelineErrors};
use super::expr::{Expr, StageAttr};
use super::model::*;
use super::parse::{did_you_mean, suggestion, ExprSite};

/// A reference from a step to another step's output of the same stage.
struct OutputRef {
    from_step: Location,
    at: Location,
    group_path: Vec<String>,
    step: String,
    variable: String,
}

/// Check the file; returns the values only Harness's server knows that its
/// expressions read.
pub(crate) fn validate(
    file: &PipelineFile,
    sites: &[ExprSite],
    errors: &mut PipelineErrors,
) -> Vec<ServerInput> {
    let server_inputs = check_references(file, sites, errors);
    let refs: Vec<OutputRef> = sites
        .iter()
        .filter_map(|site| match (&site.from_step, &site.expr) {
            (
                Some(from),
                Expr::StepOutput {
                    stage,
                    group_path,
                    step,
                    variable,
                },
            ) if stage.is_none() || stage == &site.stage => Some(OutputRef {
                from_step: from.clone(),
                at: site.at.clone(),
                group_path: group_path.clone(),
                step: step.clone(),
                variable: variable.clone(),
            }),
            _ => None,
        })
        .collect();
    let refs = &refs[..];
    let mut refs_by_step: HashMap<At, Vec<&OutputRef>> = HashMap::new();
    for r in refs {
        refs_by_step.entry(at(&r.from_step)).or_default().push(r);
    }
    let mut stage_ids: HashMap<&str, &Location> = HashMap::new();
    for stage in &file.stages {
        if let Some(first) = stage_ids.get(stage.identifier.as_str()) {
            errors.push(dup(
                &stage.loc,
                "stage",
                &stage.identifier,
                "pipeline",
                first,
            ));
        } else {
            stage_ids.insert(&stage.identifier, &stage.loc);
        }
        let Some(spec) = &stage.spec else { continue };
        let scope = format!("stage `{}`", stage.identifier);
        let mut ids: HashMap<String, Location> = HashMap::new();
        for dep in &spec.service_dependencies {
            unique(&mut ids, &dep.identifier, &dep.loc, "step", &scope, errors);
        }
        check_scope(&spec.steps, &mut ids, &scope, errors);
        let mut siblings = HashSet::new();
        check_parallel(&spec.steps, &[], &refs_by_step, errors, &mut siblings);
        check_output_refs(stage, spec, refs, &siblings, errors);
    }
    server_inputs
}

/// Where a step is written: the key of the indexes below. Lookups go through
/// indexes, never a scan of every step per step or per reference, so that validating
/// stays linear in the size of the stage. (Instances of a looping strategy share their
/// step's location; as before, the first one answers for all.)
type At = Location;

fn at(loc: &Location) -> At {
    loc.clone()
}

/// Every `<+steps.ID.output.outputVariables.X>` in a stage names an earlier Run step
/// of that stage that declares `X`.
fn check_output_refs(
    stage: &Stage,
    spec: &CiStageSpec,
    refs: &[OutputRef],
    siblings: &HashSet<(At, At)>,
    errors: &mut PipelineErrors,
) {
    let steps = StageSteps::of(Some(spec));
    let mut by_loc: HashMap<&Location, &Member> = HashMap::new();
    for m in &steps.steps {
        by_loc.entry(&m.loc).or_insert(m);
    }
    for r in refs {
        let Some(from) = by_loc.get(&r.from_step) else {
            continue;
        };
        let candidates: Vec<&Member> = steps.named(&r.step, &r.group_path).collect();
        let target = if r.group_path.is_empty() {
            format!("step `{}`", r.step)
        } else {
            format!("step `{}` in group `{}`", r.step, r.group_path.join("."))
        };
        let problem = if candidates.is_empty() {
            format!(
                "output `{}` of {target} is read here, but stage `{}` has no such step",
                r.variable, stage.identifier
            )
        } else if candidates.iter().any(|m| m.loc == from.loc) {
            format!("step `{}` reads its own output `{}`", from.id, r.variable)
        } else if let Some(t) = candidates.iter().find(|m| declares(m, &r.variable)) {
            if siblings.contains(&(at(&from.loc), at(&t.loc))) || t.loc.line < from.loc.line {
                continue;
            }
            format!(
                "step `{}` reads output `{}` of {target}, which runs after it",
                from.id, r.variable
            )
        } else {
            let t = candidates[0];
            match &t.kind {
                StepKind::Run(run) => format!(
                    "{target} has no output variable `{}` (its outputVariables: {}){}",
                    r.variable,
                    if run.output_variables.is_empty() {
                        "none".to_string()
                    } else {
                        run.output_variables.join(", ")
                    },
                    {
                        let names: Vec<&str> =
                            run.output_variables.iter().map(String::as_str).collect();
                        match did_you_mean(&r.variable, &names) {
                            Some(n) => format!("; did you mean `{n}`?"),
                            None => String::new(),
                        }
                    }
                ),
                other => format!(
                    "{target} is a {} step; only Run steps have output variables",
                    other.type_name()
                ),
            }
        };
        errors.push(PipelineError {
            loc: r.at.clone(),
            kind: ErrorKind::Expression,
            message: problem,
        });
    }
}

fn declares(m: &Member, variable: &str) -> bool {
    matches!(&m.kind, StepKind::Run(run) if run.output_variables.iter().any(|v| v == variable))
}

fn dup(at: &Location, what: &str, id: &str, scope: &str, first: &Location) -> PipelineError {
    PipelineError {
        loc: at.clone(),
        kind: ErrorKind::Duplicate,
        message: format!(
            "duplicate {what} identifier `{id}` in {scope} (first used at line {})",
            first.line
        ),
    }
}

fn unique(
    ids: &mut HashMap<String, Location>,
    id: &str,
    loc: &Location,
    what: &str,
    scope: &str,
    errors: &mut PipelineErrors,
) {
    if let Some(first) = ids.get(id) {
        errors.push(dup(loc, what, id, scope, first));
    } else {
        ids.insert(id.to_string(), loc.clone());
    }
}

fn check_scope(
    items: &[StepItem],
    ids: &mut HashMap<String, Location>,
    scope: &str,
    errors: &mut PipelineErrors,
) {
    for item in items {
        match item {
            StepItem::Step(s) => unique(ids, &s.identifier, &s.loc, "step", scope, errors),
            StepItem::Parallel(inner, _)
            | StepItem::Loop(Loop {
                instances: inner, ..
            }) => check_scope(inner, ids, scope, errors),
            StepItem::Group(g) => {
                unique(ids, &g.identifier, &g.loc, "step group", scope, errors);
                let mut inner_ids = HashMap::new();
                let inner_scope = format!("step group `{}`", g.identifier);
                check_scope(&g.steps, &mut inner_ids, &inner_scope, errors);
            }
        }
    }
}

/// A step inside an item of a parallel block: its group path, identifier, location.
struct Member {
    path: Vec<String>,
    id: String,
    loc: Location,
    kind: StepKind,
}

/// Every step of a stage (inside groups, parallel blocks and loops too), found the way
/// an expression names one: by identifier and the path of groups around it
/// (`<+pipeline.stages.S.spec.execution.steps.GROUP.steps.ID...>`, or the shorter
/// `<+steps.ID...>` within the stage).
struct StageSteps {
    steps: Vec<Member>,
    by_id: HashMap<String, Vec<usize>>,
}

impl StageSteps {
    fn of(spec: Option<&CiStageSpec>) -> StageSteps {
        let mut steps = Vec::new();
        for item in spec.map_or(&[][..], |sp| &sp.steps[..]) {
            members(item, &[], &mut steps);
        }
        let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, m) in steps.iter().enumerate() {
            by_id.entry(m.id.clone()).or_default().push(i);
        }
        StageSteps { steps, by_id }
    }

    /// The steps called `id` whose enclosing groups end with `group_path`, in file
    /// order.
    fn named<'s>(&'s self, id: &str, group_path: &'s [String]) -> impl Iterator<Item = &'s Member> {
        self.by_id
            .get(id)
            .into_iter()
            .flatten()
            .map(|&i| &self.steps[i])
            .filter(move |m| m.path.ends_with(group_path))
    }
}

fn members(item: &StepItem, path: &[String], out: &mut Vec<Member>) {
    match item {
        StepItem::Step(s) => out.push(Member {
            path: path.to_vec(),
            id: s.identifier.clone(),
            loc: s.loc.clone(),
            kind: s.kind.clone(),
        }),
        StepItem::Parallel(inner, _)
        | StepItem::Loop(Loop {
            instances: inner, ..
        }) => inner.iter().for_each(|i| members(i, path, out)),
        StepItem::Group(g) => {
            let mut p = path.to_vec();
            p.push(g.identifier.clone());
            g.steps.iter().for_each(|i| members(i, &p, out));
        }
    }
}

/// Report steps reading outputs of their parallel siblings; `siblings` collects the
/// (reader, target) pairs so that they are not reported again as "runs after".
fn check_parallel(
    items: &[StepItem],
    path: &[String],
    refs: &HashMap<At, Vec<&OutputRef>>,
    errors: &mut PipelineErrors,
    siblings: &mut HashSet<(At, At)>,
) {
    for item in items {
        match item {
            StepItem::Step(_) => {}
            StepItem::Group(g) => {
                let mut p = path.to_vec();
                p.push(g.identifier.clone());
                check_parallel(&g.steps, &p, refs, errors, siblings);
            }
            StepItem::Parallel(inner, _)
            | StepItem::Loop(Loop {
                instances: inner, ..
            }) => {
                let branches: Vec<Vec<Member>> = inner
                    .iter()
                    .map(|i| {
                        let mut m = Vec::new();
                        members(i, path, &mut m);
                        m
                    })
                    .collect();
                // The block's steps by identifier, with the branch each is in.
                let mut by_id: HashMap<&str, Vec<(usize, &Member)>> = HashMap::new();
                for (i, branch) in branches.iter().enumerate() {
                    for m in branch {
                        by_id.entry(m.id.as_str()).or_default().push((i, m));
                    }
                }
                for (i, branch) in branches.iter().enumerate() {
                    for from in branch {
                        for r in refs.get(&at(&from.loc)).into_iter().flatten() {
                            let same_id = by_id.get(r.step.as_str()).into_iter().flatten();
                            // A step of its own branch (its own group) answers first,
                            // as in the plan: e.g. a sibling in a looped group instance.
                            let local = r.group_path.is_empty()
                                && same_id.clone().any(|(j, m)| {
                                    *j == i && m.path == from.path && m.loc != from.loc
                                });
                            if local {
                                continue;
                            }
                            let target = same_id
                                .clone()
                                .find(|(j, t)| *j != i && t.path.ends_with(&r.group_path))
                                .map(|(_, t)| *t);
                            if let Some(t) = target {
                                siblings.insert((at(&from.loc), at(&t.loc)));
                                errors.push(PipelineError {
                                    loc: r.at.clone(),
                                    kind: ErrorKind::InvalidValue,
                                    message: format!(
                                        "step `{}` reads an output of step `{}`, which runs in parallel with it (same `parallel` block at line {}): the output does not exist yet",
                                        from.id,
                                        t.id,
                                        parallel_line(item)
                                    ),
                                });
                            }
                        }
                    }
                }
                check_parallel(inner, path, refs, errors, siblings);
            }
        }
    }
}

fn parallel_line(item: &StepItem) -> usize {
    match item {
        StepItem::Parallel(_, loc) | StepItem::Loop(Loop { loc, .. }) => loc.line,
        _ => 0,
    }
}

/// Variables, stages and steps of other stages named by expressions. Returns the
/// expressions that name nothing of the file but a value Harness's server has.
fn check_references(
    file: &PipelineFile,
    sites: &[ExprSite],
    errors: &mut PipelineErrors,
) -> Vec<ServerInput> {
    let stage_index = |id: &str| file.stages.iter().position(|s| s.identifier == id);
    let mut server = Vec::new();
    let mut server_input = |key: String, site: &ExprSite| {
        server.push(ServerInput {
            key,
            stage: site.stage.clone(),
            loc: site.at.clone(),
        })
    };
    for site in sites {
        let current = site.stage.as_deref().and_then(stage_index);
        let problem = match &site.expr {
            Expr::PipelineVariable(v) => match &file.pipeline {
                None => Some("the file holds a single stage, which has no pipeline variables".into()),
                Some(p) => missing_variable(&p.variables, v, "the pipeline"),
            },
            Expr::StageVariable(v) => current.and_then(|i| {
                let stage = &file.stages[i];
                missing_variable(&stage.variables, v, &format!("stage `{}`", stage.identifier))
            }),
            Expr::StepGroupVariable(v) => {
                let groups = enclosing_groups(file, current, &site.groups);
                if groups.is_empty() {
                    Some("it is not inside a step group".into())
                } else if groups.iter().any(|g| g.variables.iter().any(|x| &x.name == v)) {
                    None
                } else {
                    let names: Vec<&str> = groups
                        .iter()
                        .flat_map(|g| g.variables.iter().map(|x| x.name.as_str()))
                        .collect();
                    Some(format!(
                        "step group `{}` has no variable `{v}`{}",
                        groups.last().map_or("", |g| g.identifier.as_str()),
                        suggestion(v, &names)
                    ))
                }
            }
            Expr::OtherStage { stage, attr } => {
                other_stage(file, current, stage, matches!(attr, StageAttr::Variable(_)))
                    .or_else(|| match attr {
                        StageAttr::Variable(v) => stage_index(stage).and_then(|i| {
                            missing_variable(
                                &file.stages[i].variables,
                                v,
                                &format!("stage `{stage}`"),
                            )
                        }),
                        _ => None,
                    })
            }
            Expr::NodeVariable { node, variable } => {
                if let Some(i) = stage_index(node) {
                    other_stage(file, current, node, true).or_else(|| {
                        missing_variable(
                            &file.stages[i].variables,
                            variable,
                            &format!("stage `{node}`"),
                        )
                    })
                } else if site.groups.contains(node) {
                    let groups = enclosing_groups(file, current, &site.groups);
                    groups
                        .iter()
                        .find(|g| &g.identifier == node)
                        .and_then(|g| {
                            missing_variable(&g.variables, variable, &format!("step group `{node}`"))
                        })
                } else {
                    // Not a node of this pipeline: a value Harness's server would have,
                    // asked for as an input.
                    server_input(format!("{node}.variables.{variable}"), site);
                    None
                }
            }
            Expr::Server(key) => {
                server_input(key.clone(), site);
                None
            }
            Expr::StepOutput {
                stage: Some(stage),
                group_path,
                step,
                variable,
            } if site.stage.as_ref() != Some(stage) => other_stage(file, current, stage, true)
                .or_else(|| {
                    let s = &file.stages[stage_index(stage)?];
                    match StageSteps::of(s.spec.as_ref()).named(step, group_path).next() {
                        None => Some(format!(
                            "stage `{stage}` has no step `{}`",
                            group_path
                                .iter()
                                .chain(std::iter::once(step))
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(".steps.")
                        )),
                        Some(m) if !declares(m, variable) => Some(format!(
                            "step `{step}` of stage `{stage}` declares no output variable `{variable}`"
                        )),
                        Some(_) => None,
                    }
                }),
            _ => None,
        };
        if let Some(message) = problem {
            errors.push(PipelineError {
                loc: site.at.clone(),
                kind: ErrorKind::Expression,
                message: format!("`{}`: {message}", site.expr),
            });
        }
    }
    server
}

fn missing_variable(vars: &[Variable], name: &str, owner: &str) -> Option<String> {
    if vars.iter().any(|v| v.name == name) {
        return None;
    }
    let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    Some(format!(
        "{owner} has no variable `{name}`{}",
        suggestion(name, &names)
    ))
}

/// Why stage `id` cannot be read from the stage at index `current`: it does not exist,
/// or (for what is only known once it has run: `needs_run`) it runs later.
fn other_stage(
    file: &PipelineFile,
    current: Option<usize>,
    id: &str,
    needs_run: bool,
) -> Option<String> {
    let Some(i) = file.stages.iter().position(|s| s.identifier == id) else {
        let names: Vec<&str> = file.stages.iter().map(|s| s.identifier.as_str()).collect();
        return Some(format!(
            "the pipeline has no stage `{id}`{}",
            suggestion(id, &names)
        ));
    };
    match current {
        Some(c) if needs_run && i > c => Some(format!(
            "stage `{id}` runs after stage `{}`, so its values are not known here",
            file.stages[c].identifier
        )),
        _ => None,
    }
}

/// The step groups at `path` in the stage at index `stage`, outermost first.
fn enclosing_groups<'f>(
    file: &'f PipelineFile,
    stage: Option<usize>,
    path: &[String],
) -> Vec<&'f StepGroup> {
    let Some(spec) = stage.and_then(|i| file.stages[i].spec.as_ref()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut items = &spec.steps[..];
    for id in path {
        let Some(g) = find_group(items, id) else {
            break;
        };
        out.push(g);
        items = &g.steps;
    }
    out
}

fn find_group<'f>(items: &'f [StepItem], id: &str) -> Option<&'f StepGroup> {
    items.iter().find_map(|item| match item {
        StepItem::Group(g) if g.identifier == id => Some(g),
        StepItem::Parallel(inner, _) => find_group(inner, id),
        _ => None,
    })
}
