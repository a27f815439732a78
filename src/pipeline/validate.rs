//! Checks that need the whole stage rather than one field: identifiers unique in their
//! scope, and parallel steps that read each other's outputs.
//!
//! Harness addresses a step by its fully qualified name
//! (`pipeline.stages.S.spec.execution.steps.G.steps.ID`): a `parallel` block adds no
//! level to that name, a step group does. So identifiers must be unique among the items
//! of one `steps` list including everything inside its `parallel` blocks (Harness
//! rejects such duplicates when the pipeline is saved), while steps in different step
//! groups may share an identifier; their hostnames (`GroupId_StepId`) and expressions
//! (`<+execution.steps.G.steps.ID...>`) stay distinct.

use std::collections::HashMap;

use super::error::{ErrorKind, PipelineError, PipelineErrors};
use super::model::*;
use super::parse::OutputRef;

pub(crate) fn validate(file: &PipelineFile, refs: &[OutputRef], errors: &mut PipelineErrors) {
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
        let mut siblings = Vec::new();
        check_parallel(&spec.steps, &[], refs, errors, &mut siblings);
        check_output_refs(stage, spec, refs, &siblings, errors);
    }
}

/// Every `<+steps.ID.output.outputVariables.X>` in a stage names an earlier Run step
/// of that stage that declares `X`.
fn check_output_refs(
    stage: &Stage,
    spec: &CiStageSpec,
    refs: &[OutputRef],
    siblings: &[(Location, Location)],
    errors: &mut PipelineErrors,
) {
    let mut steps = Vec::new();
    for item in &spec.steps {
        members(item, &[], &mut steps);
    }
    let by_loc = |loc: &Location| steps.iter().find(|m| m.loc == *loc);
    for r in refs {
        let Some(from) = by_loc(&r.from_step) else {
            continue;
        };
        let candidates: Vec<&Member> = steps
            .iter()
            .filter(|m| m.id == r.step && (r.group_path.is_empty() || r.group_path == m.path))
            .collect();
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
            if siblings.contains(&(from.loc.clone(), t.loc.clone())) || t.loc.line < from.loc.line {
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
                        match super::parse::did_you_mean(&r.variable, &names) {
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
    refs: &[OutputRef],
    errors: &mut PipelineErrors,
    siblings: &mut Vec<(Location, Location)>,
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
                for (i, branch) in branches.iter().enumerate() {
                    for from in branch {
                        for r in refs.iter().filter(|r| r.from_step == from.loc) {
                            // A step of its own branch (its own group) answers first,
                            // as in the plan: e.g. a sibling in a looped group instance.
                            let local = r.group_path.is_empty()
                                && branch.iter().any(|m| {
                                    m.id == r.step && m.path == from.path && m.loc != from.loc
                                });
                            if local {
                                continue;
                            }
                            let target = branches
                                .iter()
                                .enumerate()
                                .filter(|(j, _)| *j != i)
                                .flat_map(|(_, b)| b.iter())
                                .find(|t| {
                                    t.id == r.step
                                        && (r.group_path.is_empty() || r.group_path == t.path)
                                });
                            if let Some(t) = target {
                                siblings.push((from.loc.clone(), t.loc.clone()));
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
