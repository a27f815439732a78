//! Looping strategies (`strategy: matrix | parallelism | repeat`), expanded into the
//! instances Harness would run.
//!
//! Harness runs a stage, step group or step that has a `strategy` as several copies,
//! each a real stage or step of its own: its identifier gets a postfix (`_0`, `_1`, or
//! the matrix indices `_0_1`, or `_` and the `nodeName`), and inside it `<+matrix.AXIS>`,
//! `<+repeat.item>`, `<+strategy.iteration>`, `<+strategy.iterations>` and
//! `<+strategy.identifierPostFix>` (also `<+step.…>` / `<+stage.…>` forms naming the
//! step's or the stage's loop) have that copy's values. Harness's CI stages also give
//! every step of a looped stage or step the environment variables `HARNESS_NODE_INDEX` /
//! `HARNESS_NODE_TOTAL` (the innermost loop), `HARNESS_STAGE_INDEX` / `_TOTAL` and
//! `HARNESS_STEP_INDEX` / `_TOTAL`, which test-splitting tools read.
//!
//! The expansion works on the positioned YAML tree, before typed parsing: each copy is
//! the original mapping with those expressions written in, so that every field of every
//! copy is then parsed and checked like any other (errors still point at the lines of
//! the original), and nothing downstream needs to know about strategies beyond "these
//! items run side by side, at most N at once".
//!
//! A count or a list may be an expression whose value is known before the run (a
//! pipeline or stage variable, an answered `<+input>`): the parser resolves it through
//! [`Resolve`]. A list may be text split with `.split("SEP")`, as Harness's JEXL splits
//! a Java string, or text that reads as a YAML list (`[a, b]`). What is only known while
//! the run goes on (a step's output) cannot make instances: the plan, the network and
//! every hostname are decided before the stage starts.

use std::fmt;

use super::error::ErrorKind;
use super::known::Missing;
use super::model::LoopKind;
use super::yaml::{Node, Pos, Value};

/// More copies than this are refused: Harness itself runs at most 256 stages in
/// parallel, and on one machine so many containers would only thrash.
pub(crate) const MAX_INSTANCES: usize = 256;

/// A problem with a `strategy` mapping, at a position of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub pos: Pos,
    pub kind: ErrorKind,
    pub message: String,
}

/// Looks up a strategy field written as an expression, given the text and the field's
/// path inside `strategy` (`repeat.times`): its value, or why it has none.
pub(crate) type Resolve<'r> = &'r dyn Fn(&str, &str) -> Result<String, Missing>;

/// A strategy, read and expanded.
#[derive(Debug, Clone)]
pub(crate) struct Strategy {
    pub kind: LoopKind,
    /// `maxConcurrency`; `None`: every instance at once, as Harness does.
    pub max_concurrency: Option<usize>,
    pub instances: Vec<Instance>,
    /// Inputs it needs that nobody answered, each standing in as one instance (or
    /// item): the plan asks for them before a run.
    pub unanswered: Vec<Problem>,
}

/// One copy of the looped item.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    /// Appended to the identifier: `_0`, `_1_2`, or `_` + the sanitised `nodeName`.
    pub postfix: String,
    /// The resolved `nodeName`, when the matrix has one: the instance's display name.
    pub label: Option<String>,
    pub iteration: usize,
    pub iterations: usize,
    /// Matrix axis values (`<+matrix.AXIS>`), in axis order.
    pub matrix: Vec<(String, Node)>,
    /// The `repeat.items` value (`<+repeat.item>`).
    pub item: Option<Node>,
    /// Stands in for a whole `matrix: <+input>` left unanswered: every axis is `<input>`.
    pub any_axis: bool,
}

/// Where the looped item sits: it decides which expressions and variables name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Stage,
    /// A step or a step group.
    Step,
}

impl fmt::Display for LoopKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoopKind::Matrix => "matrix",
            LoopKind::Parallelism => "parallelism",
            LoopKind::Repeat => "repeat",
        })
    }
}

fn problem(pos: Pos, kind: ErrorKind, message: impl Into<String>) -> Problem {
    Problem {
        pos,
        kind,
        message: message.into(),
    }
}

fn entries<'n>(node: &'n Node, what: &str, out: &mut Vec<Problem>) -> Option<&'n [(Node, Node)]> {
    match &node.value {
        Value::Map(e) => Some(e),
        Value::Scalar { text, .. } if text.contains("<+") => {
            out.push(problem(
                node.pos,
                ErrorKind::Unsupported,
                format!("{what} is `{text}`: sandrun expands looping strategies before the run and needs this mapping written out (the counts and lists inside it may be expressions)"),
            ));
            None
        }
        _ => {
            out.push(problem(
                node.pos,
                ErrorKind::InvalidValue,
                format!("{what} must be a mapping, not {}", node.kind_name()),
            ));
            None
        }
    }
}

/// A whole number of at least 1, written or given by an expression known before the run.
fn count(
    node: &Node,
    what: &str,
    field: &str,
    resolve: Resolve<'_>,
    out: &mut Vec<Problem>,
) -> Option<usize> {
    let Some(text) = node.as_str() else {
        out.push(problem(
            node.pos,
            ErrorKind::InvalidValue,
            format!("{what} must be a number, not {}", node.kind_name()),
        ));
        return None;
    };
    let (value, shown) = if text.contains("<+") {
        match looked_up(node, text, text, what, field, resolve, out)? {
            Some(v) => (v.clone(), format!("`{text}` (`{v}`)")),
            // An unanswered input while only checking the file: one instance stands in.
            None => return Some(1),
        }
    } else {
        (text.to_string(), format!("`{text}`"))
    };
    match value.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            out.push(problem(
                node.pos,
                ErrorKind::InvalidValue,
                format!("{what} must be a whole number of at least 1, not {shown}"),
            ));
            None
        }
    }
}

/// The values of a list written as an expression (`repeat.items`, a matrix axis):
/// `<+X.split("SEP")>` splits the value of `<+X>`; any other expression must give a
/// YAML list (`[a, b]`). `None` after reporting why not.
fn expr_list(
    node: &Node,
    text: &str,
    what: &str,
    field: &str,
    resolve: Resolve<'_>,
    out: &mut Vec<Problem>,
) -> Option<Vec<Node>> {
    let (target, sep) = split_call(text);
    let Some(value) = looked_up(node, text, &target, what, field, resolve, out)? else {
        return Some(vec![scalar_at(node.pos, "<input>")]);
    };
    let items: Vec<Node> = match sep {
        Some(sep) => {
            // Java's `String.split`: trailing empty strings are dropped.
            let mut parts: Vec<&str> = value.split(sep.as_str()).collect();
            while parts.last().is_some_and(|p| p.is_empty()) {
                parts.pop();
            }
            parts.into_iter().map(|p| scalar_at(node.pos, p)).collect()
        }
        None => match super::yaml::parse(&value) {
            Ok(Node {
                value: Value::Seq(items),
                ..
            }) => items
                .into_iter()
                .map(|mut i| {
                    place(&mut i, node.pos);
                    i
                })
                .collect(),
            _ => {
                out.push(problem(
                    node.pos,
                    ErrorKind::InvalidValue,
                    format!("{what} is `{text}`, whose value `{value}` is not a list: write it as a list (`[a, b]`) or split it (`.split(\",\")`)"),
                ));
                return None;
            }
        },
    };
    if items.is_empty() {
        out.push(problem(
            node.pos,
            ErrorKind::InvalidValue,
            format!("{what} is `{text}`, which is empty: nothing to run"),
        ));
        return None;
    }
    Some(items)
}

/// The value of `target` (the expression `text` written at `node`, or its part to
/// look up): `Some(None)` for an unanswered input, which one instance stands in for
/// (reported as [`ErrorKind::MissingInput`]), `None` after reporting why it is not
/// known before the run.
fn looked_up(
    node: &Node,
    text: &str,
    target: &str,
    what: &str,
    field: &str,
    resolve: Resolve<'_>,
    out: &mut Vec<Problem>,
) -> Option<Option<String>> {
    match resolve(target, field) {
        Ok(v) => Some(Some(v)),
        Err(Missing::Unanswered(why)) => {
            out.push(problem(
                node.pos,
                ErrorKind::MissingInput,
                format!("{what} is `{text}`: {why}"),
            ));
            Some(None)
        }
        Err(Missing::NotKnown(why)) => {
            out.push(problem(
                node.pos,
                ErrorKind::Unsupported,
                format!("{what} is `{text}`: {why}"),
            ));
            None
        }
    }
}

/// `<+X.split("SEP")>` as `<+X>` and the separator; anything else as it is.
fn split_call(text: &str) -> (String, Option<String>) {
    let whole = || (text.to_string(), None);
    let Some(inner) = text
        .trim()
        .strip_prefix("<+")
        .and_then(|t| t.strip_suffix('>'))
    else {
        return whole();
    };
    let Some(at) = inner.rfind(".split(") else {
        return whole();
    };
    let Some(arg) = inner[at + ".split(".len()..].trim().strip_suffix(')') else {
        return whole();
    };
    let arg = arg.trim();
    let unquoted = arg
        .strip_prefix('"')
        .and_then(|a| a.strip_suffix('"'))
        .or_else(|| arg.strip_prefix('\'').and_then(|a| a.strip_suffix('\'')));
    match unquoted {
        Some(sep) if !sep.is_empty() => {
            (format!("<+{}>", inner[..at].trim()), Some(sep.to_string()))
        }
        _ => whole(),
    }
}

/// Every node of a value read from an expression sits where the expression is.
fn place(node: &mut Node, pos: Pos) {
    node.pos = pos;
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|i| place(i, pos)),
        Value::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            place(k, pos);
            place(v, pos);
        }),
        Value::Null | Value::Scalar { .. } => {}
    }
}

/// Read a `strategy` mapping and expand it into instances; expressions among its
/// values are looked up with `resolve`.
pub(crate) fn read(node: &Node, resolve: Resolve<'_>) -> Result<Strategy, Vec<Problem>> {
    let mut out = Vec::new();
    let Some(fields) = entries(node, "`strategy`", &mut out) else {
        return Err(out);
    };
    let mut kinds = Vec::new();
    let mut outer_max = None;
    for (k, v) in fields {
        match k.as_str().unwrap_or_default() {
            "matrix" => kinds.push((LoopKind::Matrix, k.pos, v)),
            "parallelism" => kinds.push((LoopKind::Parallelism, k.pos, v)),
            "repeat" => kinds.push((LoopKind::Repeat, k.pos, v)),
            "maxConcurrency" => {
                outer_max = count(v, "`maxConcurrency`", "maxConcurrency", resolve, &mut out)
            }
            "description" => {}
            key @ ("when" | "onFailure") => out.push(problem(
                k.pos,
                ErrorKind::Unsupported,
                format!("`strategy.{key}` is not supported by sandrun: it runs every instance and stops on failures as the step's own failure strategy says"),
            )),
            other => out.push(problem(
                k.pos,
                ErrorKind::UnknownField,
                format!("unknown field `{other}` in `strategy`: expected `matrix`, `parallelism` or `repeat`"),
            )),
        }
    }
    let strategy = match kinds.as_slice() {
        [] => {
            out.push(problem(
                node.pos,
                ErrorKind::MissingField,
                "`strategy` needs one of `matrix`, `parallelism` or `repeat`",
            ));
            None
        }
        [(kind, _, v)] => match kind {
            LoopKind::Matrix => matrix(v, resolve, &mut out),
            LoopKind::Parallelism => count(v, "`parallelism`", "parallelism", resolve, &mut out)
                .and_then(|n| bounded(n, v.pos, &mut out))
                .map(|n| Strategy {
                    kind: LoopKind::Parallelism,
                    max_concurrency: None,
                    instances: indexed(n),
                    unanswered: Vec::new(),
                }),
            LoopKind::Repeat => repeat(v, resolve, &mut out),
        },
        [_, (_, pos, _), ..] => {
            out.push(problem(
                *pos,
                ErrorKind::InvalidValue,
                "`strategy` holds one of `matrix`, `parallelism` or `repeat`, not several",
            ));
            None
        }
    };
    let (unanswered, errors): (Vec<Problem>, Vec<Problem>) = out
        .into_iter()
        .partition(|p| p.kind == ErrorKind::MissingInput);
    match strategy {
        Some(mut s) if errors.is_empty() => {
            if s.max_concurrency.is_none() {
                s.max_concurrency = outer_max;
            }
            s.unanswered = unanswered;
            Ok(s)
        }
        _ => Err(errors.into_iter().chain(unanswered).collect()),
    }
}

/// `n` instances, if that is not too many.
fn bounded(n: usize, pos: Pos, out: &mut Vec<Problem>) -> Option<usize> {
    if n > MAX_INSTANCES {
        out.push(problem(
            pos,
            ErrorKind::Unsupported,
            format!("this strategy makes {n} instances; sandrun runs at most {MAX_INSTANCES}"),
        ));
        return None;
    }
    Some(n)
}

fn indexed(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance {
            postfix: format!("_{i}"),
            label: None,
            iteration: i,
            iterations: n,
            matrix: Vec::new(),
            item: None,
            any_axis: false,
        })
        .collect()
}

fn repeat(node: &Node, resolve: Resolve<'_>, out: &mut Vec<Problem>) -> Option<Strategy> {
    let fields = entries(node, "`repeat`", out)?;
    let mut max = None;
    let mut instances = None;
    for (k, v) in fields {
        match k.as_str().unwrap_or_default() {
            "times" => {
                instances = count(v, "`repeat.times`", "repeat.times", resolve, out)
                    .and_then(|n| bounded(n, v.pos, out))
                    .map(indexed)
            }
            "items" => match &v.value {
                Value::Seq(items) if !items.is_empty() => instances = itemized(items, v.pos, out),
                Value::Seq(_) => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    "`repeat.items` is empty: nothing to run",
                )),
                Value::Scalar { text, .. } if text.contains("<+") => {
                    instances = expr_list(v, text, "`repeat.items`", "repeat.items", resolve, out)
                        .and_then(|items| itemized(&items, v.pos, out))
                }
                _ => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    format!("`repeat.items` must be a list, not {}", v.kind_name()),
                )),
            },
            "maxConcurrency" => {
                max = count(
                    v,
                    "`repeat.maxConcurrency`",
                    "repeat.maxConcurrency",
                    resolve,
                    out,
                )
            }
            key @ ("start" | "end" | "unit" | "partitionSize") => out.push(problem(
                k.pos,
                ErrorKind::Unsupported,
                format!("`repeat.{key}` partitions a deployment's target hosts; sandrun supports `times` and `items`"),
            )),
            other => out.push(problem(
                k.pos,
                ErrorKind::UnknownField,
                format!("unknown field `{other}` in `repeat`: expected `times`, `items` or `maxConcurrency`"),
            )),
        }
    }
    let has = |key: &str| fields.iter().any(|(k, _)| k.as_str() == Some(key));
    if has("times") && has("items") {
        out.push(problem(
            node.pos,
            ErrorKind::InvalidValue,
            "`repeat` takes `times` or `items`, not both",
        ));
        return None;
    }
    if !has("times") && !has("items") {
        out.push(problem(
            node.pos,
            ErrorKind::MissingField,
            "`repeat` needs `times` or `items`",
        ));
    }
    Some(Strategy {
        kind: LoopKind::Repeat,
        max_concurrency: max,
        instances: instances?,
        unanswered: Vec::new(),
    })
}

/// One instance per item of `repeat.items`.
fn itemized(items: &[Node], pos: Pos, out: &mut Vec<Problem>) -> Option<Vec<Instance>> {
    bounded(items.len(), pos, out).map(|n| {
        let mut all = indexed(n);
        for (inst, item) in all.iter_mut().zip(items) {
            inst.item = Some(item.clone());
        }
        all
    })
}

fn matrix(node: &Node, resolve: Resolve<'_>, out: &mut Vec<Problem>) -> Option<Strategy> {
    // Harness's schema lets the whole matrix be a runtime input: its answer is the
    // mapping of axes, in YAML.
    let answered: Node;
    let node = match &node.value {
        Value::Scalar { text, .. } if text.contains("<+") => {
            let Some(value) = looked_up(node, text, text, "`matrix`", "matrix", resolve, out)?
            else {
                let mut stand_in = indexed(1);
                stand_in[0].any_axis = true;
                return Some(Strategy {
                    kind: LoopKind::Matrix,
                    max_concurrency: None,
                    instances: stand_in,
                    unanswered: Vec::new(),
                });
            };
            match super::yaml::parse(&value) {
                Ok(mut m) if matches!(m.value, Value::Map(_)) => {
                    place(&mut m, node.pos);
                    answered = m;
                    &answered
                }
                _ => {
                    out.push(problem(
                        node.pos,
                        ErrorKind::InvalidValue,
                        format!("`matrix` is `{text}`, whose value `{value}` is not a mapping of axes to lists (`{{os: [linux, mac]}}`)"),
                    ));
                    return None;
                }
            }
        }
        _ => node,
    };
    let fields = entries(node, "`matrix`", out)?;
    let mut axes: Vec<(String, std::borrow::Cow<'_, [Node]>)> = Vec::new();
    let mut max = None;
    let mut node_name = None;
    let mut exclude: &[Node] = &[];
    for (k, v) in fields {
        let key = k.as_str().unwrap_or_default();
        match key {
            "maxConcurrency" => {
                max = count(
                    v,
                    "`matrix.maxConcurrency`",
                    "matrix.maxConcurrency",
                    resolve,
                    out,
                )
            }
            "nodeName" => match v.as_str() {
                Some(text) => node_name = Some((text.to_string(), v.pos)),
                None => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    format!("`matrix.nodeName` must be a string, not {}", v.kind_name()),
                )),
            },
            "exclude" => match &v.value {
                Value::Seq(items) => exclude = items,
                Value::Null => {}
                _ => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    format!("`matrix.exclude` must be a list, not {}", v.kind_name()),
                )),
            },
            axis => match &v.value {
                Value::Seq(values) if !values.is_empty() => {
                    for value in values {
                        if matches!(value.value, Value::Seq(_)) {
                            out.push(problem(
                                value.pos,
                                ErrorKind::InvalidValue,
                                format!("values of matrix axis `{axis}` are strings, numbers or mappings, not lists"),
                            ));
                        }
                    }
                    axes.push((axis.to_string(), values.as_slice().into()));
                }
                Value::Seq(_) => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    format!("matrix axis `{axis}` is empty: the matrix would have no instances"),
                )),
                Value::Scalar { text, .. } if text.contains("<+") => {
                    let what = format!("matrix axis `{axis}`");
                    let field = format!("matrix.{axis}");
                    if let Some(values) = expr_list(v, text, &what, &field, resolve, out) {
                        axes.push((axis.to_string(), values.into()));
                    }
                }
                _ => out.push(problem(
                    v.pos,
                    ErrorKind::InvalidValue,
                    format!(
                        "matrix axis `{axis}` must be a list of values, not {}",
                        v.kind_name()
                    ),
                )),
            },
        }
    }
    if axes.is_empty() {
        out.push(problem(
            node.pos,
            ErrorKind::MissingField,
            "`matrix` has no axis (a key with a list of values)",
        ));
        return None;
    }
    let mut excludes: Vec<Vec<(String, String)>> = Vec::new();
    for e in exclude {
        let Some(pairs) = entries(e, "an item of `matrix.exclude`", out) else {
            continue;
        };
        let mut rule = Vec::new();
        for (k, v) in pairs {
            let axis = k.as_str().unwrap_or_default();
            if !axes.iter().any(|(a, _)| a == axis) {
                let known: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
                out.push(problem(
                    k.pos,
                    ErrorKind::InvalidValue,
                    format!(
                        "`matrix.exclude` names axis `{axis}`, which the matrix does not have (axes: {})",
                        known.join(", ")
                    ),
                ));
            }
            rule.push((axis.to_string(), canonical(v)));
        }
        excludes.push(rule);
    }
    // Every combination, the first axis varying slowest (Harness's order).
    let mut combos: Vec<Vec<usize>> = vec![Vec::new()];
    for (_, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                (0..values.len()).map(move |i| {
                    let mut c = c.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
        if combos.len() > MAX_INSTANCES * 16 {
            out.push(problem(
                node.pos,
                ErrorKind::Unsupported,
                format!("this matrix makes more than {MAX_INSTANCES} instances; sandrun runs at most {MAX_INSTANCES}"),
            ));
            return None;
        }
    }
    combos.retain(|c| {
        !excludes.iter().any(|rule| {
            rule.iter().all(|(axis, value)| {
                axes.iter()
                    .zip(c)
                    .any(|((a, values), &i)| a == axis && canonical(&values[i]) == *value)
            })
        })
    });
    if combos.is_empty() {
        out.push(problem(
            node.pos,
            ErrorKind::InvalidValue,
            "`matrix.exclude` removes every combination: nothing would run",
        ));
        return None;
    }
    let n = bounded(combos.len(), node.pos, out)?;
    let instances = combos
        .into_iter()
        .enumerate()
        .map(|(iteration, c)| {
            let matrix: Vec<(String, Node)> = axes
                .iter()
                .zip(&c)
                .map(|((a, values), &i)| (a.clone(), values[i].clone()))
                .collect();
            let mut inst = Instance {
                postfix: c.iter().map(|i| format!("_{i}")).collect(),
                label: None,
                iteration,
                iterations: n,
                matrix,
                item: None,
                any_axis: false,
            };
            if let Some((name, _)) = &node_name {
                let mut label = substitute_text(name, &Subst::full(&inst, Level::Step))
                    .unwrap_or_else(|| name.clone());
                // Other expressions in it (`<+pipeline.variables.X>`) as far as known now.
                if label.contains("<+") {
                    if let Ok(known) = resolve(&label, "matrix.nodeName") {
                        label = known;
                    }
                }
                inst.postfix = format!("_{}", sanitize(&label));
                inst.label = Some(label);
            }
            inst
        })
        .collect();
    Some(Strategy {
        kind: LoopKind::Matrix,
        max_concurrency: max,
        instances,
        unanswered: Vec::new(),
    })
}

/// A `nodeName` as an identifier postfix: characters identifiers cannot hold become `_`.
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A value as comparable text: scalars as written, mappings and lists as JSON.
fn canonical(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => text.clone(),
        Value::Null => String::new(),
        _ => super::parse::to_json(node).to_string(),
    }
}

/// What an instance substitutes, at one depth of the tree.
struct Subst<'a> {
    inst: &'a Instance,
    level: Level,
    /// False inside a nested item with its own strategy: its `<+strategy.*>` are its own.
    own: bool,
    /// What nested strategies define themselves, hidden from this instance.
    hidden: Hidden,
}

/// The names a nested strategy defines: its matrix axes, and `<+repeat.item>`.
#[derive(Clone, Default)]
struct Hidden {
    axes: Vec<String>,
    item: bool,
}

impl<'a> Subst<'a> {
    fn full(inst: &'a Instance, level: Level) -> Self {
        Subst {
            inst,
            level,
            own: true,
            hidden: Hidden::default(),
        }
    }

    /// The value of the expression body `inner` (without `<+` and `>`), if this
    /// instance defines it.
    fn value(&self, inner: &str) -> Option<Node> {
        let inst = self.inst;
        let scalar = |text: String| Node {
            pos: Pos::default(),
            value: Value::Scalar { text, plain: false },
        };
        let (stage_prefixed, path) = match inner.strip_prefix("stage.matrix.") {
            Some(rest) => (true, rest),
            None => match inner
                .strip_prefix("strategy.matrix.")
                .or_else(|| inner.strip_prefix("matrix."))
            {
                Some(rest) => (false, rest),
                None => {
                    let own = self.own;
                    return match inner {
                        "strategy.iteration" if own => Some(scalar(inst.iteration.to_string())),
                        "strategy.iterations" if own => Some(scalar(inst.iterations.to_string())),
                        "strategy.identifierPostFix" if own => Some(scalar(inst.postfix.clone())),
                        "repeat.item" | "strategy.repeat.item" if !self.hidden.item => {
                            inst.item.clone()
                        }
                        "step.identifierPostFix" if own && self.level == Level::Step => {
                            Some(scalar(inst.postfix.clone()))
                        }
                        "stage.identifierPostFix" if self.level == Level::Stage => {
                            Some(scalar(inst.postfix.clone()))
                        }
                        "stage.iteration" if self.level == Level::Stage => {
                            Some(scalar(inst.iteration.to_string()))
                        }
                        "stage.iterations" if self.level == Level::Stage => {
                            Some(scalar(inst.iterations.to_string()))
                        }
                        "step.iteration" if own && self.level == Level::Step => {
                            Some(scalar(inst.iteration.to_string()))
                        }
                        "step.iterations" if own && self.level == Level::Step => {
                            Some(scalar(inst.iterations.to_string()))
                        }
                        _ => None,
                    };
                }
            },
        };
        if stage_prefixed && self.level != Level::Stage {
            return None;
        }
        let mut parts = path.split('.');
        let axis = parts.next()?;
        if !stage_prefixed && self.hidden.axes.iter().any(|h| h == axis) {
            return None;
        }
        let Some((_, found)) = inst.matrix.iter().find(|(a, _)| a == axis) else {
            return inst.any_axis.then(|| scalar("<input>".into()));
        };
        let mut node = found.clone();
        for key in parts {
            node = node.get(key)?.clone();
        }
        Some(node)
    }
}

/// `text` with every expression this instance defines written in; `None` when
/// nothing changed.
fn substitute_text(text: &str, subst: &Subst<'_>) -> Option<String> {
    if !text.contains("<+") {
        return None;
    }
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some(start) = rest.find("<+") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('>') else { break };
        let inner = after[..end].trim();
        match subst.value(inner) {
            Some(v) => {
                out.push_str(&rest[..start]);
                out.push_str(&canonical(&v));
                changed = true;
            }
            None => out.push_str(&rest[..start + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

fn substitute(node: &mut Node, subst: &Subst<'_>) {
    match &mut node.value {
        Value::Scalar { text, .. } => {
            let trimmed = text.trim();
            // A whole value that is one reference to a mapping or list becomes it.
            if let Some(inner) = trimmed
                .strip_prefix("<+")
                .and_then(|t| t.strip_suffix('>'))
                .filter(|t| !t.contains(['<', '>']))
            {
                if let Some(v) = subst.value(inner.trim()) {
                    if matches!(v.value, Value::Map(_) | Value::Seq(_)) {
                        node.value = v.value;
                        return;
                    }
                }
            }
            if let Some(new) = substitute_text(text, subst) {
                *text = new;
            }
        }
        Value::Seq(items) => items.iter_mut().for_each(|i| substitute(i, subst)),
        Value::Map(entries) => {
            let nested = entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("strategy"))
                .map(|(_, v)| nested_names(v));
            match nested {
                Some(names) => {
                    let mut hidden = subst.hidden.clone();
                    hidden.axes.extend(names.axes);
                    hidden.item |= names.item;
                    let inner = Subst {
                        inst: subst.inst,
                        level: subst.level,
                        own: false,
                        hidden,
                    };
                    for (_, v) in entries.iter_mut() {
                        substitute(v, &inner);
                    }
                }
                None => entries.iter_mut().for_each(|(_, v)| substitute(v, subst)),
            }
        }
        Value::Null => {}
    }
}

/// What a nested `strategy` defines itself.
fn nested_names(strategy: &Node) -> Hidden {
    let axes = strategy
        .get("matrix")
        .and_then(Node::entries)
        .map(|e| {
            e.iter()
                .filter_map(|(k, _)| k.as_str())
                .filter(|k| !matches!(*k, "exclude" | "maxConcurrency" | "nodeName"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let item = strategy
        .get("repeat")
        .is_some_and(|r| r.get("items").is_some());
    Hidden { axes, item }
}

/// `item` without its `strategy`: what is checked of an item whose strategy is wrong.
pub(crate) fn without_strategy(item: &Node) -> Node {
    let mut node = item.clone();
    if let Value::Map(entries) = &mut node.value {
        entries.retain(|(k, _)| k.as_str() != Some("strategy"));
    }
    node
}

/// The instance `inst` of `item` (the mapping under `step:`, `stepGroup:` or `stage:`):
/// without its `strategy`, with its postfixed identifier and name, expressions written
/// in and the loop variables in the environment of each of its steps.
pub(crate) fn instantiate(item: &Node, inst: &Instance, level: Level) -> Node {
    let mut node = without_strategy(item);
    let strategy_pos = item.get("strategy").map_or(item.pos, |s| s.pos);
    substitute(&mut node, &Subst::full(inst, level));
    if let Value::Map(entries) = &mut node.value {
        let base = entries
            .iter()
            .find(|(k, _)| k.as_str() == Some("identifier"))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default()
            .to_string();
        for (k, v) in entries.iter_mut() {
            let Value::Scalar { text, .. } = &mut v.value else {
                continue;
            };
            match k.as_str() {
                Some("identifier") => text.push_str(&inst.postfix),
                Some("name") => match &inst.label {
                    Some(label) => *text = label.clone(),
                    None => text.push_str(&inst.postfix),
                },
                _ => {}
            }
        }
        if !entries.iter().any(|(k, _)| k.as_str() == Some("name")) {
            let name = inst
                .label
                .clone()
                .unwrap_or_else(|| format!("{base}{}", inst.postfix));
            entries.push((
                scalar_at(strategy_pos, "name"),
                scalar_at(strategy_pos, &name),
            ));
        }
    }
    let (index, total) = match level {
        Level::Stage => ("HARNESS_STAGE_INDEX", "HARNESS_STAGE_TOTAL"),
        Level::Step => ("HARNESS_STEP_INDEX", "HARNESS_STEP_TOTAL"),
    };
    let vars = [
        (index, inst.iteration.to_string()),
        (total, inst.iterations.to_string()),
        ("HARNESS_NODE_INDEX", inst.iteration.to_string()),
        ("HARNESS_NODE_TOTAL", inst.iterations.to_string()),
    ];
    match level {
        Level::Stage => inject_below(&mut node, &vars, strategy_pos, false, true),
        Level::Step => {
            // The item itself is a step when it has a `spec` and no `steps`.
            if node.get("steps").is_none() {
                inject(&mut node, &vars, strategy_pos);
            } else {
                inject_below(&mut node, &vars, strategy_pos, false, false);
            }
        }
    }
    node
}

fn scalar_at(pos: Pos, text: &str) -> Node {
    Node {
        pos,
        value: Value::Scalar {
            text: text.to_string(),
            plain: false,
        },
    }
}

/// Give every step below `node` the loop variables (`vars`, the stage's first when
/// `stage`). Below a nested strategy (`nested`) only a stage's own variables are given:
/// the nested loop sets the others when it is expanded.
fn inject_below(node: &mut Node, vars: &[(&str, String)], pos: Pos, nested: bool, stage: bool) {
    let Value::Map(entries) = &mut node.value else {
        if let Value::Seq(items) = &mut node.value {
            for i in items {
                inject_below(i, vars, pos, nested, stage);
            }
        }
        return;
    };
    for (k, v) in entries.iter_mut() {
        let below_nested = nested || v.get("strategy").is_some();
        if k.as_str() == Some("step") && matches!(v.value, Value::Map(_)) {
            if !below_nested {
                inject(v, vars, pos);
            } else if stage {
                inject(v, &vars[..2], pos);
            }
        } else {
            if below_nested && !stage {
                continue;
            }
            inject_below(v, vars, pos, below_nested, stage);
        }
    }
}

/// Add `vars` to the `spec.envVariables` of the step mapping `step`, keeping any the
/// step sets itself.
fn inject(step: &mut Node, vars: &[(&str, String)], pos: Pos) {
    let Value::Map(fields) = &mut step.value else {
        return;
    };
    let Some((_, spec)) = fields.iter_mut().find(|(k, _)| k.as_str() == Some("spec")) else {
        return;
    };
    let Value::Map(spec_fields) = &mut spec.value else {
        return;
    };
    let env = match spec_fields
        .iter()
        .position(|(k, _)| k.as_str() == Some("envVariables"))
    {
        Some(i) => &mut spec_fields[i].1,
        None => {
            spec_fields.push((
                scalar_at(pos, "envVariables"),
                Node {
                    pos,
                    value: Value::Map(Vec::new()),
                },
            ));
            &mut spec_fields.last_mut().expect("just pushed").1
        }
    };
    if env.is_null() {
        env.value = Value::Map(Vec::new());
    }
    let Value::Map(env_entries) = &mut env.value else {
        return;
    };
    for (name, value) in vars {
        if !env_entries.iter().any(|(k, _)| k.as_str() == Some(name)) {
            env_entries.push((scalar_at(pos, name), scalar_at(pos, value)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml;

    fn unknown(text: &str, _: &str) -> Result<String, Missing> {
        Err(Missing::NotKnown(format!("`{text}` is not known here")))
    }

    fn strategy(text: &str) -> Result<Strategy, Vec<Problem>> {
        let root = yaml::parse(text).unwrap();
        read(root.get("strategy").unwrap(), &unknown)
    }

    fn postfixes(s: &Strategy) -> Vec<&str> {
        s.instances.iter().map(|i| i.postfix.as_str()).collect()
    }

    #[test]
    fn matrix_combinations_first_axis_slowest_with_exclude() {
        let s = strategy(
            "strategy:\n  matrix:\n    os: [linux, mac]\n    v: [1, 2, 3]\n    exclude:\n      - os: mac\n        v: 2\n      - v: 3\n    maxConcurrency: 2\n",
        )
        .unwrap();
        assert_eq!(s.kind, LoopKind::Matrix);
        assert_eq!(s.max_concurrency, Some(2));
        assert_eq!(postfixes(&s), ["_0_0", "_0_1", "_1_0"]);
        let values: Vec<String> = s
            .instances
            .iter()
            .map(|i| {
                i.matrix
                    .iter()
                    .map(|(a, v)| format!("{a}={}", v.as_str().unwrap()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(values, ["os=linux,v=1", "os=linux,v=2", "os=mac,v=1"]);
        assert!(s.instances.iter().all(|i| i.iterations == 3));
    }

    #[test]
    fn counts_lists_and_whole_matrices_from_expressions() {
        let answers = |text: &str, field: &str| -> Result<String, Missing> {
            match (text, field) {
                ("<+pipeline.variables.targets>", "repeat.items") => Ok("a,b,,".into()),
                ("<+pipeline.variables.n>", _) => Ok("3".into()),
                ("n<+pipeline.variables.n>-a", "matrix.nodeName") => Ok("n3-a".into()),
                ("<+input>", "matrix") => Ok("{os: [linux, mac], v: [1]}".into()),
                ("<+input>", "matrix.os") => Ok("[x, y]".into()),
                ("<+input>", _) => Err(Missing::Unanswered("answer it".into())),
                _ => Err(Missing::NotKnown("not known".into())),
            }
        };
        let read_with = |text: &str| {
            let root = yaml::parse(text).unwrap();
            read(root.get("strategy").unwrap(), &answers)
        };
        let s = read_with(
            "strategy:\n  repeat:\n    items: <+pipeline.variables.targets.split(\",\")>\n    maxConcurrency: <+pipeline.variables.n>\n",
        )
        .unwrap();
        let items: Vec<_> = s
            .instances
            .iter()
            .map(|i| i.item.as_ref().unwrap().as_str().unwrap())
            .collect();
        assert_eq!(items, ["a", "b"]);
        assert_eq!(s.max_concurrency, Some(3));
        let s = read_with("strategy:\n  matrix: <+input>\n").unwrap();
        assert_eq!(postfixes(&s), ["_0_0", "_1_0"]);
        let s = read_with(
            "strategy:\n  matrix:\n    os: [a]\n    nodeName: n<+pipeline.variables.n>-<+matrix.os>\n",
        )
        .unwrap();
        assert_eq!(postfixes(&s), ["_n3_a"]);
        let s = read_with("strategy:\n  matrix:\n    os: <+input>\n").unwrap();
        assert_eq!(postfixes(&s), ["_0", "_1"]);
        // Unanswered: one stand-in instance, and the input is named.
        let s = read_with("strategy:\n  parallelism: <+input>\n").unwrap();
        assert_eq!(postfixes(&s), ["_0"]);
        assert_eq!(
            s.unanswered[0].message,
            "`parallelism` is `<+input>`: answer it"
        );
        let s = read_with("strategy:\n  repeat:\n    times: <+input>\n").unwrap();
        assert_eq!(s.instances.len(), 1);
        let e = read_with("strategy:\n  repeat:\n    items: <+steps.a.output.outputVariables.L>\n")
            .unwrap_err();
        assert_eq!(e[0].kind, ErrorKind::Unsupported);
        assert_eq!(
            e[0].message,
            "`repeat.items` is `<+steps.a.output.outputVariables.L>`: not known"
        );
        let e =
            read_with("strategy:\n  repeat:\n    items: <+pipeline.variables.n>\n").unwrap_err();
        assert!(
            e[0].message.contains("whose value `3` is not a list"),
            "{e:?}"
        );
    }

    #[test]
    fn a_stand_in_for_an_unanswered_matrix_fills_every_axis() {
        let root = yaml::parse(
            "step:\n  identifier: t\n  strategy:\n    matrix: <+input>\n  spec:\n    command: echo <+matrix.os>\n",
        )
        .unwrap();
        let step = root.get("step").unwrap();
        let unanswered = |_: &str, _: &str| -> Result<String, Missing> {
            Err(Missing::Unanswered("answer it".into()))
        };
        let s = read(step.get("strategy").unwrap(), &unanswered).unwrap();
        let inst = instantiate(step, &s.instances[0], Level::Step);
        let command = inst.get("spec").unwrap().get("command").unwrap();
        assert_eq!(command.as_str(), Some("echo <input>"));
    }

    #[test]
    fn node_name_gives_label_and_postfix() {
        let s = strategy(
            "strategy:\n  matrix:\n    py: [\"3.11\", \"3.12\"]\n    nodeName: py-<+matrix.py>\n",
        )
        .unwrap();
        assert_eq!(postfixes(&s), ["_py_3_11", "_py_3_12"]);
        assert_eq!(s.instances[1].label.as_deref(), Some("py-3.12"));
    }

    #[test]
    fn parallelism_and_repeat() {
        let s = strategy("strategy:\n  parallelism: 3\n  maxConcurrency: 1\n").unwrap();
        assert_eq!(s.kind, LoopKind::Parallelism);
        assert_eq!(postfixes(&s), ["_0", "_1", "_2"]);
        assert_eq!(s.max_concurrency, Some(1));
        let s =
            strategy("strategy:\n  repeat:\n    items: [a, b]\n    maxConcurrency: 1\n").unwrap();
        assert_eq!(s.instances[1].item.as_ref().unwrap().as_str(), Some("b"));
        assert_eq!(s.max_concurrency, Some(1));
        let s = strategy("strategy:\n  repeat:\n    times: 2\n").unwrap();
        assert_eq!(postfixes(&s), ["_0", "_1"]);
    }

    #[test]
    fn bad_strategies_are_reported_where_they_are() {
        let e = strategy("strategy:\n  matrix:\n    os: []\n").unwrap_err();
        assert_eq!(e[0].pos.line, 3);
        let e = strategy("strategy:\n  matrix:\n    os: [a]\n    exclude:\n      - arch: x\n")
            .unwrap_err();
        assert!(e[0].message.contains("axis `arch`"), "{:?}", e);
        let e = strategy("strategy:\n  parallelism: <+input>\n").unwrap_err();
        assert_eq!(e[0].kind, ErrorKind::Unsupported);
        let e = strategy("strategy:\n  parallelism: 0\n").unwrap_err();
        assert!(e[0].message.contains("at least 1"));
        let e = strategy("strategy:\n  parallelism: 2\n  repeat:\n    times: 2\n").unwrap_err();
        assert!(e[0].message.contains("not several"));
        let e = strategy("strategy:\n  parallelism: 300\n").unwrap_err();
        assert!(e[0].message.contains("at most"));
        // Refused before anything is made for them.
        let e = strategy("strategy:\n  repeat:\n    times: 4000000000\n").unwrap_err();
        assert!(e[0].message.contains("at most 256"), "{e:?}");
        let e = strategy("strategy:\n  matrix:\n    a: [1,2,3,4,5,6,7,8]\n    b: [1,2,3,4,5,6,7,8]\n    c: [1,2,3,4,5,6,7,8]\n    d: [1,2,3,4,5,6,7,8]\n    e: [1,2,3,4,5,6,7,8]\n").unwrap_err();
        assert!(e[0].message.contains("more than 256"), "{e:?}");
    }

    #[test]
    fn instances_carry_their_values_ids_and_env() {
        let root = yaml::parse(
            "step:\n  identifier: test\n  name: Test\n  type: Run\n  strategy:\n    matrix:\n      cfg:\n        - {os: linux, arch: x64}\n      tool: [go]\n  spec:\n    command: echo <+matrix.cfg.os> <+matrix.tool> <+strategy.iteration>/<+strategy.iterations> <+strategy.identifierPostFix> <+input> <+matrix.cfg>\n    envVariables:\n      HARNESS_NODE_INDEX: mine\n",
        )
        .unwrap();
        let step = root.get("step").unwrap();
        let s = read(step.get("strategy").unwrap(), &unknown).unwrap();
        let inst = instantiate(step, &s.instances[0], Level::Step);
        assert!(inst.get("strategy").is_none());
        assert_eq!(inst.get("identifier").unwrap().as_str(), Some("test_0_0"));
        assert_eq!(inst.get("name").unwrap().as_str(), Some("Test_0_0"));
        let spec = inst.get("spec").unwrap();
        let command = spec.get("command").unwrap().as_str().unwrap();
        assert!(
            command.starts_with("echo linux go 0/1 _0_0 <+input> {"),
            "{command}"
        );
        assert!(command.contains(r#""os":"linux""#), "{command}");
        let env = spec.get("envVariables").unwrap();
        assert_eq!(
            env.get("HARNESS_NODE_INDEX").unwrap().as_str(),
            Some("mine")
        );
        assert_eq!(env.get("HARNESS_NODE_TOTAL").unwrap().as_str(), Some("1"));
        assert_eq!(env.get("HARNESS_STEP_INDEX").unwrap().as_str(), Some("0"));
    }

    fn parse(text: &str) -> Result<crate::pipeline::PipelineFile, crate::pipeline::PipelineErrors> {
        crate::pipeline::parse_str(std::path::Path::new("p.yaml"), text)
    }

    const STAGE_HEAD: &str =
        "stage:\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n";

    #[test]
    fn a_looped_step_parses_into_a_loop_of_real_steps() {
        let file = parse(&format!(
            "{STAGE_HEAD}        - step:\n            identifier: t\n            type: Run\n            strategy:\n              repeat:\n                items: [a, b]\n                maxConcurrency: 1\n            spec:\n              command: echo <+repeat.item>\n"
        ))
        .unwrap();
        let steps = &file.stages[0].spec.as_ref().unwrap().steps;
        let crate::pipeline::StepItem::Loop(l) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(
            (l.identifier.as_str(), l.kind, l.max_concurrency),
            ("t", LoopKind::Repeat, Some(1))
        );
        assert_eq!(l.loc.line, 7);
        let ids: Vec<String> = l
            .instances
            .iter()
            .map(|i| match i {
                crate::pipeline::StepItem::Step(s) => match &s.kind {
                    crate::pipeline::StepKind::Run(r) => format!("{}:{}", s.identifier, r.command),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["t_0:echo a", "t_1:echo b"]);
    }

    #[test]
    fn errors_shared_by_instances_are_reported_once_and_their_own_each() {
        let errors = parse(&format!(
            "{STAGE_HEAD}        - step:\n            identifier: t\n            type: Run\n            strategy:\n              matrix:\n                sh: [Sh, Zsh, Ksh]\n            spec:\n              comand: x\n              command: x\n              shell: <+matrix.sh>\n"
        ))
        .unwrap_err();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages
                .iter()
                .filter(|m| m.contains("unknown field `comand`"))
                .count(),
            1,
            "{messages:#?}"
        );
        assert_eq!(
            messages
                .iter()
                .filter(|m| m.contains("invalid `shell`"))
                .count(),
            2,
            "{messages:#?}"
        );
        assert!(
            messages.iter().all(|m| m.starts_with("p.yaml:")),
            "{messages:#?}"
        );
    }

    #[test]
    fn steps_of_a_looped_group_read_outputs_of_their_own_instance() {
        let text = format!(
            "{STAGE_HEAD}        - stepGroup:\n            identifier: g\n            strategy:\n              repeat:\n                items: [x, y]\n            steps:\n              - step:\n                  identifier: a\n                  type: Run\n                  spec:\n                    command: V=<+repeat.item>\n                    outputVariables:\n                      - name: V\n              - step:\n                  identifier: b\n                  type: Run\n                  spec:\n                    command: echo <+steps.a.output.outputVariables.V>\n"
        );
        parse(&text).unwrap();
    }

    #[test]
    fn a_looped_stage_becomes_stages_that_know_their_loop() {
        let file = parse(
            "pipeline:\n  identifier: p\n  stages:\n    - stage:\n        identifier: b\n        type: CI\n        strategy:\n          parallelism: 2\n        spec:\n          execution:\n            steps:\n              - step:\n                  identifier: s\n                  type: Run\n                  spec:\n                    command: echo $HARNESS_STAGE_INDEX\n",
        )
        .unwrap();
        let ids: Vec<&str> = file.stages.iter().map(|s| s.identifier.as_str()).collect();
        assert_eq!(ids, ["b_0", "b_1"]);
        let i = file.stages[1].instance.as_ref().unwrap();
        assert_eq!((i.of.as_str(), i.index, i.count), ("b", 1, 2));
    }

    #[test]
    fn nested_strategies_keep_their_own_expressions() {
        let root = yaml::parse(
            "stage:\n  identifier: s\n  strategy:\n    repeat:\n      items: [outer]\n  spec:\n    execution:\n      steps:\n        - step:\n            identifier: a\n            strategy:\n              parallelism: 2\n            spec:\n              command: <+repeat.item> <+stage.matrix.x> <+strategy.iteration> <+stage.iteration>\n        - step:\n            identifier: b\n            spec:\n              command: <+repeat.item> <+strategy.iteration>\n",
        )
        .unwrap();
        let stage = root.get("stage").unwrap();
        let s = read(stage.get("strategy").unwrap(), &unknown).unwrap();
        let inst = instantiate(stage, &s.instances[0], Level::Stage);
        let steps = inst
            .get("spec")
            .unwrap()
            .get("execution")
            .unwrap()
            .get("steps")
            .unwrap();
        let Value::Seq(items) = &steps.value else {
            panic!()
        };
        let a = items[0].get("step").unwrap();
        let b = items[1].get("step").unwrap();
        assert_eq!(
            a.get("spec").unwrap().get("command").unwrap().as_str(),
            Some("outer <+stage.matrix.x> <+strategy.iteration> 0")
        );
        assert_eq!(
            b.get("spec").unwrap().get("command").unwrap().as_str(),
            Some("outer 0")
        );
        let a_env = a.get("spec").unwrap().get("envVariables").unwrap();
        assert_eq!(
            a_env.get("HARNESS_STAGE_INDEX").unwrap().as_str(),
            Some("0")
        );
        assert!(a_env.get("HARNESS_NODE_INDEX").is_none());
        let b_env = b.get("spec").unwrap().get("envVariables").unwrap();
        assert_eq!(b_env.get("HARNESS_NODE_TOTAL").unwrap().as_str(), Some("1"));
    }
}
