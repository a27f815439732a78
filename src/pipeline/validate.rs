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

use std::collections::{HashMap, HashSet};

use super::error::{ErrorKind, PipelineError, PipelineErrors};
use super::model::*;
use super::parse::OutputRef;

pub(crate) fn validate(file: &PipelineFile, refs: &[OutputRef], errors: &mut PipelineErrors) {
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
}

/// Where a step is written: the key of the indexes below (one file, so line and
/// column are enough). Lookups go through indexes, never a scan of every step per step
/// or per reference, so that validating stays linear in the size of the stage.
type At = (usize, usize);

fn at(loc: &Location) -> At {
    (loc.line, loc.column)
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
    let mut steps = Vec::new();
    for item in &spec.steps {
        members(item, &[], &mut steps);
    }
    let by_loc: HashMap<At, &Member> = steps.iter().map(|m| (at(&m.loc), m)).collect();
    // The first step (in file order) with an identifier, and the first that also
    // declares a variable; each by identifier alone and by group path and identifier.
    let mut first: HashMap<(Option<&[String]>, &str), &Member> = HashMap::new();
    let mut first_declaring: HashMap<(Option<&[String]>, &str, &str), &Member> = HashMap::new();
    for m in &steps {
        for path in [None, Some(m.path.as_slice())] {
            first.entry((path, m.id.as_str())).or_insert(m);
            if let StepKind::Run(run) = &m.kind {
                for v in &run.output_variables {
                    first_declaring
                        .entry((path, m.id.as_str(), v.as_str()))
                        .or_insert(m);
                }
            }
        }
    }
    for r in refs {
        let Some(from) = by_loc.get(&at(&r.from_step)) else {
            continue;
        };
        let path = (!r.group_path.is_empty()).then_some(r.group_path.as_slice());
        let target = if r.group_path.is_empty() {
            format!("step `{}`", r.step)
        } else {
            format!("step `{}` in group `{}`", r.step, r.group_path.join("."))
        };
        let reads_itself = from.id == r.step && path.is_none_or(|p| p == from.path);
        let problem = if !first.contains_key(&(path, r.step.as_str())) {
            format!(
                "output `{}` of {target} is read here, but stage `{}` has no such step",
                r.variable, stage.identifier
            )
        } else if reads_itself {
            format!("step `{}` reads its own output `{}`", from.id, r.variable)
        } else if let Some(t) = first_declaring.get(&(path, r.step.as_str(), r.variable.as_str())) {
            if siblings.contains(&(at(&from.loc), at(&t.loc))) || t.loc.line < from.loc.line {
                continue;
            }
            format!(
                "step `{}` reads output `{}` of {target}, which runs after it",
                from.id, r.variable
            )
        } else {
            let t = first[&(path, r.step.as_str())];
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
            StepItem::Parallel(inner, _) => check_scope(inner, ids, scope, errors),
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
        StepItem::Parallel(inner, _) => inner.iter().for_each(|i| members(i, path, out)),
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
            StepItem::Parallel(inner, _) => {
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
                            let target = by_id
                                .get(r.step.as_str())
                                .into_iter()
                                .flatten()
                                .find(|(j, t)| {
                                    *j != i && (r.group_path.is_empty() || r.group_path == t.path)
                                })
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
        StepItem::Parallel(_, loc) => loc.line,
        _ => 0,
    }
}
