//! Harness expressions (`<+...>`) inside pipeline strings, parsed into a typed [`Expr`].
//!
//! Harness evaluates a JEXL dialect on its servers; sandrun only understands the
//! expressions a CI stage can mean locally (pipeline/stage facts and variables, step
//! outputs of this stage or of an earlier one, codebase facts, secrets, runtime inputs).
//! What only Harness's server knows (triggers, project/org/account variables) parses as
//! [`Expr::Server`]: an input the user answers with `--set`. Anything else is an error
//! with the expression quoted, so that a pipeline never runs with a `<+...>` left in a
//! command. Every bad expression of a string is reported, each with its byte offset, so
//! that the caller can point at its own line and column.
//! `plan` resolves what is known up front and leaves step outputs for the executor.
//!
//! A new namespace (`<+matrix.*>`...) is one variant of [`Expr`] and one arm of
//! `parse_path`; the plan's resolver has one matching arm.

use std::fmt;

/// A piece of a string value: text as written, or an expression to substitute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Expr(Expr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodebaseField {
    Branch,
    CommitSha,
    ShortCommitSha,
    RepoUrl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    PipelineName,
    PipelineIdentifier,
    /// `<+pipeline.sequenceId>`: the run number.
    PipelineSequenceId,
    /// `<+pipeline.executionId>`: a unique id of the run.
    PipelineExecutionId,
    PipelineVariable(String),
    StageName,
    StageIdentifier,
    StageVariable(String),
    /// `<+stepGroup.variables.X>`: a variable of the step group enclosing the step.
    StepGroupVariable(String),
    /// `<+step.name>` of the step the expression is in.
    StepName,
    /// `<+step.identifier>` of the step the expression is in.
    StepIdentifier,
    /// An output variable of an earlier step. `stage` is `None` for the stage the
    /// expression is in. `group_path` lists the step groups from the stage's `execution`
    /// down to the step (empty for a top-level step):
    /// `<+steps.ID.output.outputVariables.X>`,
    /// `<+execution.steps.ID.output.outputVariables.X>`,
    /// `<+stage.spec.execution.steps.ID.output.outputVariables.X>`,
    /// `<+execution.steps.G.steps.ID.output.outputVariables.X>` (groups nest),
    /// `<+G.steps.ID.output.outputVariables.X>` (relative to an enclosing group), and
    /// fully qualified `<+pipeline.stages.S.spec.execution.steps.ID.output.outputVariables.X>`.
    StepOutput {
        stage: Option<String>,
        group_path: Vec<String>,
        step: String,
        variable: String,
    },
    /// `<+pipeline.stages.S.name>`, `.identifier`, `.variables.X`: a fact of stage `S`.
    OtherStage {
        stage: String,
        attr: StageAttr,
    },
    /// `<+ID.variables.X>`: Harness resolves a first segment that is not a namespace as
    /// the identifier of an enclosing or earlier node of the run (a stage or a step
    /// group). The plan looks `ID` up; when the pipeline has no such node, the value is
    /// one Harness's server would supply and it is asked for as the input `ID.variables.X`.
    NodeVariable {
        node: String,
        variable: String,
    },
    /// A value only Harness's server knows: `<+trigger.*>`, `<+variable.X>`,
    /// `<+variable.org.X>`, `<+variable.account.X>`, `<+account|org|project.*>`,
    /// `<+pipeline.triggeredBy.*>`, `<+pipeline.triggerType>`. The path (without `<+ >`)
    /// is the key the user answers it with (`--set trigger.branch=main`).
    Server(String),
    Codebase(CodebaseField),
    /// `<+secrets.getValue("ID")>`.
    Secret(String),
    /// `<+input>`, optionally `.default(v)` and/or `.allowedValues(a,b)`.
    Input {
        default: Option<String>,
        allowed: Option<Vec<String>>,
    },
}

/// What `<+pipeline.stages.S.…>` reads of stage `S` besides step outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageAttr {
    Name,
    Identifier,
    Variable(String),
}

/// Namespaces whose values only Harness's server has (first path segment).
const SERVER_NAMESPACES: &[&str] = &["trigger", "variable", "account", "org", "project"];

/// First path segments that are namespaces of their own, never node identifiers.
const NAMESPACES: &[&str] = &[
    "pipeline",
    "stage",
    "stepGroup",
    "step",
    "steps",
    "execution",
    "codebase",
    "secrets",
    "input",
    "env",
    "serviceVariables",
    "artifact",
    "artifacts",
    "infra",
    "service",
    "matrix",
    "strategy",
    "repeat",
];

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::PipelineName => write!(f, "<+pipeline.name>"),
            Expr::PipelineIdentifier => write!(f, "<+pipeline.identifier>"),
            Expr::PipelineSequenceId => write!(f, "<+pipeline.sequenceId>"),
            Expr::PipelineExecutionId => write!(f, "<+pipeline.executionId>"),
            Expr::PipelineVariable(v) => write!(f, "<+pipeline.variables.{v}>"),
            Expr::StageName => write!(f, "<+stage.name>"),
            Expr::StageIdentifier => write!(f, "<+stage.identifier>"),
            Expr::StageVariable(v) => write!(f, "<+stage.variables.{v}>"),
            Expr::StepGroupVariable(v) => write!(f, "<+stepGroup.variables.{v}>"),
            Expr::StepName => write!(f, "<+step.name>"),
            Expr::StepIdentifier => write!(f, "<+step.identifier>"),
            Expr::StepOutput {
                stage,
                group_path,
                step,
                variable,
            } => {
                match stage {
                    Some(s) => write!(f, "<+pipeline.stages.{s}.spec.execution.steps.")?,
                    None => write!(f, "<+execution.steps.")?,
                }
                for g in group_path {
                    write!(f, "{g}.steps.")?;
                }
                write!(f, "{step}.output.outputVariables.{variable}>")
            }
            Expr::OtherStage { stage, attr } => match attr {
                StageAttr::Name => write!(f, "<+pipeline.stages.{stage}.name>"),
                StageAttr::Identifier => write!(f, "<+pipeline.stages.{stage}.identifier>"),
                StageAttr::Variable(v) => write!(f, "<+pipeline.stages.{stage}.variables.{v}>"),
            },
            Expr::NodeVariable { node, variable } => write!(f, "<+{node}.variables.{variable}>"),
            Expr::Server(path) => write!(f, "<+{path}>"),
            Expr::Codebase(c) => {
                let name = match c {
                    CodebaseField::Branch => "branch",
                    CodebaseField::CommitSha => "commitSha",
                    CodebaseField::ShortCommitSha => "shortCommitSha",
                    CodebaseField::RepoUrl => "repoUrl",
                };
                write!(f, "<+codebase.{name}>")
            }
            Expr::Secret(id) => write!(f, "<+secrets.getValue(\"{id}\")>"),
            Expr::Input { default, allowed } => {
                write!(f, "<+input>")?;
                if let Some(d) = default {
                    write!(f, ".default({d})")?;
                }
                if let Some(a) = allowed {
                    write!(f, ".allowedValues({})", a.join(","))?;
                }
                Ok(())
            }
        }
    }
}

/// A malformed or unknown expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    pub message: String,
    /// Byte offset, in the text given to the parser, of the `<+` (or condition token)
    /// the error is about.
    pub offset: usize,
}

fn err<T>(message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        message: message.into(),
        offset: 0,
    })
}

impl ExprError {
    fn at(mut self, offset: usize) -> ExprError {
        self.offset += offset;
        self
    }
}

/// True when `text` holds at least one `<+`.
pub fn has_expressions(text: &str) -> bool {
    text.contains("<+")
}

/// Split `text` into literal text and expressions. Every malformed or unknown
/// expression is reported, each with the offset of its `<+`.
pub fn parse_template(text: &str) -> Result<Vec<TemplatePart>, Vec<ExprError>> {
    let split = split(text);
    if split.errors.is_empty() {
        Ok(split.parts)
    } else {
        Err(split.errors)
    }
}

/// Every expression in `text` with the offset of its `<+`, and every error: the good
/// expressions of a string with a bad one are still there to check.
pub fn scan(text: &str) -> (Vec<(usize, Expr)>, Vec<ExprError>) {
    let split = split(text);
    (split.located, split.errors)
}

struct Split {
    parts: Vec<TemplatePart>,
    located: Vec<(usize, Expr)>,
    errors: Vec<ExprError>,
}

fn split(text: &str) -> Split {
    let mut out = Split {
        parts: Vec::new(),
        located: Vec::new(),
        errors: Vec::new(),
    };
    let mut literal = String::new();
    let mut pos = 0;
    while let Some(found) = text[pos..].find("<+") {
        let start = pos + found;
        literal.push_str(&text[pos..start]);
        let after = start + 2;
        let Some(end) = find_close(&text[after..]) else {
            out.errors.push(ExprError {
                message: format!(
                    "expression `{}` has no closing `>`",
                    shorten(&text[start..])
                ),
                offset: start,
            });
            // The rest of the line cannot be split reliably; go on with the next line.
            pos = text[start..].find('\n').map_or(text.len(), |n| start + n);
            continue;
        };
        let inner = &text[after..after + end];
        pos = after + end + 1;
        let parsed = if inner.trim() == "input" {
            parse_input_suffix(&text[pos..]).map(|(expr, used)| {
                pos += used;
                expr
            })
        } else {
            parse_inner(inner.trim())
        };
        match parsed {
            Ok(expr) => {
                if !literal.is_empty() {
                    out.parts
                        .push(TemplatePart::Literal(std::mem::take(&mut literal)));
                }
                out.parts.push(TemplatePart::Expr(expr.clone()));
                out.located.push((start, expr));
            }
            Err(e) => out.errors.push(ExprError {
                message: e.message,
                offset: start,
            }),
        }
    }
    literal.push_str(&text[pos..]);
    if !literal.is_empty() {
        out.parts.push(TemplatePart::Literal(literal));
    }
    out
}

fn shorten(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > 40 {
        format!("{}...", line.chars().take(40).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Index of the `>` closing an expression body, skipping quoted text.
fn find_close(s: &str) -> Option<usize> {
    find_unquoted(s, '>')
}

fn find_paren_close(s: &str) -> Option<usize> {
    find_unquoted(s, ')')
}

/// Index of the first `target` outside quotes, on the first line.
fn find_unquoted(s: &str, target: char) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c == target => return Some(i),
            (None, '\n') => return None,
            _ => {}
        }
    }
    None
}

/// `.default(v)` and `.allowedValues(a,b)` after `<+input>`; returns bytes consumed.
fn parse_input_suffix(s: &str) -> Result<(Expr, usize), ExprError> {
    let mut default = None;
    let mut allowed = None;
    let mut pos = 0;
    loop {
        let rest = &s[pos..];
        let (method, args_start) = if let Some(r) = rest.strip_prefix(".default(") {
            ("default", rest.len() - r.len())
        } else if let Some(r) = rest.strip_prefix(".allowedValues(") {
            ("allowedValues", rest.len() - r.len())
        } else if rest.starts_with(".executionInput()") || rest.starts_with(".regex(") {
            let name = rest[1..].split('(').next().unwrap_or("");
            return err(format!(
                "`<+input>.{name}(...)` is not supported by sandrun; answer inputs with --set"
            ));
        } else {
            break;
        };
        let body = &rest[args_start..];
        let close = find_paren_close(body).ok_or_else(|| ExprError {
            message: format!("`<+input>.{method}(` has no closing `)`"),
            offset: 0,
        })?;
        let args = split_args(&body[..close]);
        if method == "default" {
            if args.len() != 1 {
                return err("`<+input>.default(...)` takes exactly one value");
            }
            default = args.into_iter().next();
        } else {
            if args.is_empty() {
                return err("`<+input>.allowedValues(...)` needs at least one value");
            }
            allowed = Some(args);
        }
        pos += args_start + close + 1;
    }
    if let (Some(d), Some(a)) = (&default, &allowed) {
        if !a.contains(d) {
            return err(format!(
                "the default `{d}` of `<+input>` is not one of its allowed values ({})",
                a.join(", ")
            ));
        }
    }
    Ok((Expr::Input { default, allowed }, pos))
}

/// Split `a, "b,c", 'd'` on commas outside quotes, trimming and unquoting each value.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut was_quoted = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                was_quoted = true;
            }
            (None, ',') => {
                out.push(finish_arg(&cur, was_quoted));
                cur.clear();
                was_quoted = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.trim().is_empty() || was_quoted || !out.is_empty() {
        out.push(finish_arg(&cur, was_quoted));
    }
    out
}

fn finish_arg(s: &str, quoted: bool) -> String {
    if quoted {
        s.to_string()
    } else {
        s.trim().to_string()
    }
}

fn parse_inner(inner: &str) -> Result<Expr, ExprError> {
    if let Some(rest) = inner.strip_prefix("secrets.getValue(") {
        let Some(arg) = rest.strip_suffix(')') else {
            return err(format!("malformed secret reference `<+{inner}>`"));
        };
        let arg = arg.trim();
        let id = arg
            .strip_prefix('"')
            .and_then(|a| a.strip_suffix('"'))
            .or_else(|| arg.strip_prefix('\'').and_then(|a| a.strip_suffix('\'')));
        return match id {
            Some(id) if !id.is_empty() => Ok(Expr::Secret(id.to_string())),
            _ => err(format!(
                "`<+{inner}>`: the secret id must be a quoted string, e.g. <+secrets.getValue(\"token\")>"
            )),
        };
    }
    if inner.contains(['(', ')', ' ', '"', '\'', '[', '?', '=', '!', '&', '|', '+']) {
        return err(format!(
            "`<+{inner}>`: sandrun supports only plain references, not JEXL operators or method calls"
        ));
    }
    let parts: Vec<&str> = inner.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return err(format!("malformed expression `<+{inner}>`"));
    }
    parse_path(inner, &parts)
}

/// A dotted reference, by its first segment (the namespace).
fn parse_path(inner: &str, parts: &[&str]) -> Result<Expr, ExprError> {
    let unknown = || err(format!("unknown expression `<+{inner}>`"));
    match parts {
        ["pipeline", "name"] => Ok(Expr::PipelineName),
        ["pipeline", "identifier"] => Ok(Expr::PipelineIdentifier),
        ["pipeline", "sequenceId"] => Ok(Expr::PipelineSequenceId),
        ["pipeline", "executionId"] => Ok(Expr::PipelineExecutionId),
        ["pipeline", "variables", v] => Ok(Expr::PipelineVariable(v.to_string())),
        ["pipeline", "triggerType"] | ["pipeline", "triggeredBy", ..] => {
            Ok(Expr::Server(inner.to_string()))
        }
        ["pipeline", "stages", stage, rest @ ..] => match rest {
            ["name"] => Ok(Expr::OtherStage {
                stage: stage.to_string(),
                attr: StageAttr::Name,
            }),
            ["identifier"] => Ok(Expr::OtherStage {
                stage: stage.to_string(),
                attr: StageAttr::Identifier,
            }),
            ["variables", v] => Ok(Expr::OtherStage {
                stage: stage.to_string(),
                attr: StageAttr::Variable(v.to_string()),
            }),
            ["spec", "execution", "steps", steps @ ..] => {
                step_output(inner, Some(stage.to_string()), steps)
            }
            _ => err(format!(
                "unknown expression `<+{inner}>`: sandrun reads a stage's name, identifier, \
                 variables.X and spec.execution.steps.ID.output.outputVariables.X"
            )),
        },
        ["stage", "name"] => Ok(Expr::StageName),
        ["stage", "identifier"] => Ok(Expr::StageIdentifier),
        ["stage", "variables", v] => Ok(Expr::StageVariable(v.to_string())),
        ["stage", "spec", "execution", "steps", rest @ ..] => step_output(inner, None, rest),
        ["stepGroup", "variables", v] => Ok(Expr::StepGroupVariable(v.to_string())),
        ["step", "name"] => Ok(Expr::StepName),
        ["step", "identifier"] => Ok(Expr::StepIdentifier),
        ["codebase", field] => match *field {
            "branch" => Ok(Expr::Codebase(CodebaseField::Branch)),
            "commitSha" => Ok(Expr::Codebase(CodebaseField::CommitSha)),
            "shortCommitSha" => Ok(Expr::Codebase(CodebaseField::ShortCommitSha)),
            "repoUrl" => Ok(Expr::Codebase(CodebaseField::RepoUrl)),
            other => err(format!(
                "`<+codebase.{other}>` is not supported: sandrun knows codebase.branch, \
                 codebase.commitSha, codebase.shortCommitSha and codebase.repoUrl"
            )),
        },
        ["steps", rest @ ..] | ["execution", "steps", rest @ ..] => step_output(inner, None, rest),
        [ns, _, ..] if SERVER_NAMESPACES.contains(ns) => Ok(Expr::Server(inner.to_string())),
        [node, "variables", v] if !NAMESPACES.contains(node) => Ok(Expr::NodeVariable {
            node: node.to_string(),
            variable: v.to_string(),
        }),
        // Relative to a step group: `<+G.steps.ID.output.outputVariables.X>`.
        [group, "steps", _, ..] if !NAMESPACES.contains(group) => step_output(inner, None, parts),
        _ => unknown(),
    }
}

/// `G.steps.H.steps.ID.output.outputVariables.X` (groups optional).
fn step_output(inner: &str, stage: Option<String>, rest: &[&str]) -> Result<Expr, ExprError> {
    let n = rest.len();
    if n < 4 || rest[n - 3] != "output" || rest[n - 2] != "outputVariables" {
        return err(format!(
            "unknown expression `<+{inner}>`: a step's outputs are read as \
             <+steps.ID.output.outputVariables.NAME>"
        ));
    }
    let path = &rest[..n - 3];
    // path = G1 steps G2 steps ... ID
    if path.len() % 2 == 0 {
        return err(format!("malformed step reference `<+{inner}>`"));
    }
    let mut group_path = Vec::new();
    for pair in path[..path.len() - 1].chunks(2) {
        if pair[1] != "steps" {
            return err(format!(
                "malformed step reference `<+{inner}>`: expected `{}.steps.`",
                pair[0]
            ));
        }
        group_path.push(pair[0].to_string());
    }
    Ok(Expr::StepOutput {
        stage,
        group_path,
        step: path[path.len() - 1].to_string(),
        variable: rest[n - 1].to_string(),
    })
}

/// A parsed `when.condition`: the forms sandrun can evaluate locally. The operands are
/// expressions as parsed here; the plan maps them to what it resolved (`map`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Condition<O = Operand> {
    /// A single operand: true when it is the text `true` (as JEXL does for booleans).
    Value(O),
    Not(Box<Condition<O>>),
    And(Box<Condition<O>>, Box<Condition<O>>),
    Or(Box<Condition<O>>, Box<Condition<O>>),
    /// `left == right` (`equal`) or `left != right`, compared as strings.
    Compare {
        left: O,
        equal: bool,
        right: O,
    },
    /// `<`, `<=`, `>`, `>=`: as numbers when both sides are numbers, else as strings.
    Order {
        left: O,
        op: OrderOp,
        right: O,
    },
    /// A string test: `<+x>.contains("a")`, `.startsWith(..)`, `.endsWith(..)`,
    /// `.equals(..)`, `.equalsIgnoreCase(..)`, and JEXL's `=^` / `=$` operators.
    Test {
        target: O,
        method: StrMethod,
        arg: O,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum OrderOp {
    Lt,
    Le,
    Gt,
    Ge,
}

impl OrderOp {
    pub fn symbol(self) -> &'static str {
        match self {
            OrderOp::Lt => "<",
            OrderOp::Le => "<=",
            OrderOp::Gt => ">",
            OrderOp::Ge => ">=",
        }
    }

    /// Compare as JEXL does: numerically when both sides are numbers.
    pub fn holds(self, left: &str, right: &str) -> bool {
        let ord = match (left.trim().parse::<f64>(), right.trim().parse::<f64>()) {
            (Ok(l), Ok(r)) => l.partial_cmp(&r),
            _ => Some(left.cmp(right)),
        };
        let Some(ord) = ord else { return false };
        match self {
            OrderOp::Lt => ord.is_lt(),
            OrderOp::Le => ord.is_le(),
            OrderOp::Gt => ord.is_gt(),
            OrderOp::Ge => ord.is_ge(),
        }
    }
}

/// The Java string methods real conditions call, all of them tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StrMethod {
    Contains,
    StartsWith,
    EndsWith,
    Equals,
    EqualsIgnoreCase,
}

impl StrMethod {
    const ALL: &'static [(&'static str, StrMethod)] = &[
        ("contains", StrMethod::Contains),
        ("startsWith", StrMethod::StartsWith),
        ("endsWith", StrMethod::EndsWith),
        ("equals", StrMethod::Equals),
        ("equalsIgnoreCase", StrMethod::EqualsIgnoreCase),
    ];

    fn by_name(name: &str) -> Option<StrMethod> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("", |(n, _)| n)
    }

    pub fn holds(self, target: &str, arg: &str) -> bool {
        match self {
            StrMethod::Contains => target.contains(arg),
            StrMethod::StartsWith => target.starts_with(arg),
            StrMethod::EndsWith => target.ends_with(arg),
            StrMethod::Equals => target == arg,
            StrMethod::EqualsIgnoreCase => target.to_lowercase() == arg.to_lowercase(),
        }
    }
}

impl<O> Condition<O> {
    /// Visit every operand, left to right.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a O)) {
        match self {
            Condition::Value(o) => f(o),
            Condition::Not(c) => c.walk(f),
            Condition::And(a, b) | Condition::Or(a, b) => {
                a.walk(f);
                b.walk(f);
            }
            Condition::Compare { left, right, .. } | Condition::Order { left, right, .. } => {
                f(left);
                f(right);
            }
            Condition::Test { target, arg, .. } => {
                f(target);
                f(arg);
            }
        }
    }

    /// The same condition with every operand replaced by `f(operand)`.
    pub fn map<P>(&self, f: &mut impl FnMut(&O) -> P) -> Condition<P> {
        match self {
            Condition::Value(o) => Condition::Value(f(o)),
            Condition::Not(c) => Condition::Not(Box::new(c.map(f))),
            Condition::And(a, b) => Condition::And(Box::new(a.map(f)), Box::new(b.map(f))),
            Condition::Or(a, b) => Condition::Or(Box::new(a.map(f)), Box::new(b.map(f))),
            Condition::Compare { left, equal, right } => Condition::Compare {
                left: f(left),
                equal: *equal,
                right: f(right),
            },
            Condition::Order { left, op, right } => Condition::Order {
                left: f(left),
                op: *op,
                right: f(right),
            },
            Condition::Test {
                target,
                method,
                arg,
            } => Condition::Test {
                target: f(target),
                method: *method,
                arg: f(arg),
            },
        }
    }
}

impl Condition<Operand> {
    /// The expressions of the condition, in the order they are written.
    pub fn exprs(&self) -> Vec<&Expr> {
        let mut out = Vec::new();
        self.walk(&mut |o| {
            if let Operand::Expr(e) = o {
                out.push(e);
            }
        });
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    Expr(Expr),
    Text(String),
}

/// Parse a `when.condition` such as `<+codebase.branch> == "main" && !<+pipeline.variables.skip>`.
pub fn parse_condition(text: &str) -> Result<Condition, ExprError> {
    let tokens = tokenize_condition(text)?;
    let mut p = CondParser { tokens, pos: 0 };
    let c = p.or()?;
    if let Some((tok, at)) = p.tokens.get(p.pos) {
        return Err(ExprError {
            message: format!("condition `{}`: unexpected `{tok}`", text.trim()),
            offset: *at,
        });
    }
    Ok(c)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Operand(Operand),
    Eq,
    Ne,
    Order(OrderOp),
    /// `.method(arg)` after an operand, or `=^` / `=$` (negated: `!^`, `!$`).
    Method(StrMethod, bool),
    /// The argument of a `.method(...)` call, already split off.
    Call(StrMethod, Operand),
    And,
    Or,
    Not,
    Open,
    Close,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Operand(Operand::Expr(e)) => write!(f, "{e}"),
            Tok::Operand(Operand::Text(t)) => write!(f, "{t}"),
            Tok::Call(m, _) => write!(f, ".{}(...)", m.name()),
            other => {
                let symbol = OPERATORS
                    .iter()
                    .find(|(_, t)| t == other)
                    .map_or("?", |(s, _)| s);
                write!(f, "{symbol}")
            }
        }
    }
}

/// Operators, longest first so that `<=` is not read as `<`.
const OPERATORS: &[(&str, Tok)] = &[
    ("==", Tok::Eq),
    ("!=", Tok::Ne),
    ("=^", Tok::Method(StrMethod::StartsWith, false)),
    ("!^", Tok::Method(StrMethod::StartsWith, true)),
    ("=$", Tok::Method(StrMethod::EndsWith, false)),
    ("!$", Tok::Method(StrMethod::EndsWith, true)),
    ("<=", Tok::Order(OrderOp::Le)),
    (">=", Tok::Order(OrderOp::Ge)),
    ("&&", Tok::And),
    ("||", Tok::Or),
    ("<", Tok::Order(OrderOp::Lt)),
    (">", Tok::Order(OrderOp::Gt)),
    ("!", Tok::Not),
    ("(", Tok::Open),
    (")", Tok::Close),
];

/// JEXL's word operators.
fn word_operator(word: &str) -> Option<Tok> {
    Some(match word {
        "and" => Tok::And,
        "or" => Tok::Or,
        "not" => Tok::Not,
        "eq" => Tok::Eq,
        "ne" => Tok::Ne,
        "lt" => Tok::Order(OrderOp::Lt),
        "le" => Tok::Order(OrderOp::Le),
        "gt" => Tok::Order(OrderOp::Gt),
        "ge" => Tok::Order(OrderOp::Ge),
        "startsWith" => Tok::Method(StrMethod::StartsWith, false),
        "endsWith" => Tok::Method(StrMethod::EndsWith, false),
        _ => return None,
    })
}

/// A `.method(arg)` call at the start of `s`: the method, its one argument (a quoted
/// string, a number or an expression) and the bytes consumed.
fn method_call(
    s: &str,
    text: &str,
    at: usize,
) -> Result<Option<(StrMethod, Operand, usize)>, ExprError> {
    let Some(rest) = s.strip_prefix('.') else {
        return Ok(None);
    };
    let name_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let name = &rest[..name_len];
    let Some(args) = rest[name_len..].strip_prefix('(') else {
        return Ok(None);
    };
    let Some(method) = StrMethod::by_name(name) else {
        return Err(ExprError {
            message: format!(
                "condition `{}`: sandrun cannot evaluate the method `.{name}(...)` (it knows {})",
                text.trim(),
                StrMethod::ALL
                    .iter()
                    .map(|(n, _)| format!(".{n}()"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            offset: at,
        });
    };
    let close = find_paren_close(args).ok_or_else(|| ExprError {
        message: format!("condition `{}`: `.{name}(` has no closing `)`", text.trim()),
        offset: at,
    })?;
    let body = args[..close].trim();
    let arg = if body.starts_with("<+") {
        let inner = body
            .strip_prefix("<+")
            .and_then(|b| b.strip_suffix('>'))
            .unwrap_or(body);
        Operand::Expr(parse_inner(inner.trim()).map_err(|e| e.at(at))?)
    } else {
        match split_args(body).as_slice() {
            [one] => Operand::Text(one.clone()),
            _ => {
                return Err(ExprError {
                    message: format!(
                        "condition `{}`: `.{name}(...)` takes one value",
                        text.trim()
                    ),
                    offset: at,
                })
            }
        }
    };
    let used = 1 + name_len + 1 + close + 1;
    Ok(Some((method, arg, used)))
}

fn tokenize_condition(text: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    let mut out = Vec::new();
    let mut s = text.trim_start();
    while !s.is_empty() {
        let at = text.len() - s.len();
        let (tok, rest): (Tok, &str) = if let Some(r) = s.strip_prefix("<+") {
            let end = find_close(r).ok_or_else(|| ExprError {
                message: format!("expression `{}` has no closing `>`", shorten(s)),
                offset: at,
            })?;
            let inner = r[..end].trim();
            let mut rest = &r[end + 1..];
            let expr = if inner == "input" {
                let (e, used) = parse_input_suffix(rest).map_err(|e| e.at(at))?;
                rest = &rest[used..];
                e
            } else {
                match split_inner_method(inner) {
                    // `<+codebase.branch.startsWith("release")>`: the call inside.
                    Some((head, call)) => {
                        let e = parse_inner(head).map_err(|e| e.at(at))?;
                        if let Some((m, arg, _)) = method_call(call, text, at)? {
                            out.push((Tok::Operand(Operand::Expr(e)), at));
                            out.push((Tok::Call(m, arg), at));
                            s = rest.trim_start();
                            continue;
                        }
                        parse_inner(inner).map_err(|e| e.at(at))?
                    }
                    None => parse_inner(inner).map_err(|e| e.at(at))?,
                }
            };
            (Tok::Operand(Operand::Expr(expr)), rest)
        } else if let Some((m, arg, used)) = method_call(s, text, at)? {
            (Tok::Call(m, arg), &s[used..])
        } else if let Some((op, tok)) = OPERATORS.iter().find(|(op, _)| s.starts_with(op)) {
            (tok.clone(), &s[op.len()..])
        } else if s.starts_with(['"', '\'']) {
            let q = s.chars().next().unwrap_or('"');
            let body = &s[1..];
            let end = body.find(q).ok_or_else(|| ExprError {
                message: format!("condition `{}`: unterminated string", text.trim()),
                offset: at,
            })?;
            (
                Tok::Operand(Operand::Text(body[..end].to_string())),
                &body[end + 1..],
            )
        } else {
            let end = s
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'))
                .unwrap_or(s.len());
            if end == 0 {
                return Err(ExprError {
                    message: format!(
                        "condition `{}`: sandrun cannot evaluate `{}` (it supports ==, !=, <, <=, >, >=, =^, =$, &&, ||, !, parentheses and .contains/.startsWith/.endsWith/.equals/.equalsIgnoreCase over <+...> references and literals)",
                        text.trim(),
                        shorten(s)
                    ),
                    offset: at,
                });
            }
            let word = &s[..end];
            let tok = word_operator(word)
                .unwrap_or_else(|| Tok::Operand(Operand::Text(word.to_string())));
            (tok, &s[end..])
        };
        out.push((tok, at));
        s = rest.trim_start();
    }
    if out.is_empty() {
        return err("empty condition");
    }
    Ok(out)
}

/// `head.method(args)` inside an expression body, when `method` is a known test.
fn split_inner_method(inner: &str) -> Option<(&str, &str)> {
    if !inner.ends_with(')') {
        return None;
    }
    let open = inner.find('(')?;
    let dot = inner[..open].rfind('.')?;
    StrMethod::by_name(&inner[dot + 1..open])?;
    Some((&inner[..dot], &inner[dot..]))
}

struct CondParser {
    tokens: Vec<(Tok, usize)>,
    pos: usize,
}

impl CondParser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, ExprError> {
        let offset = self
            .tokens
            .get(self.pos)
            .or(self.tokens.last())
            .map_or(0, |(_, at)| *at);
        Err(ExprError {
            message: message.into(),
            offset,
        })
    }

    fn or(&mut self) -> Result<Condition, ExprError> {
        self.chain(Tok::Or, Self::and, Condition::Or)
    }

    fn and(&mut self) -> Result<Condition, ExprError> {
        self.chain(Tok::And, Self::unary, Condition::And)
    }

    /// `operand (op operand)*`, left-associative.
    fn chain(
        &mut self,
        op: Tok,
        operand: fn(&mut Self) -> Result<Condition, ExprError>,
        join: fn(Box<Condition>, Box<Condition>) -> Condition,
    ) -> Result<Condition, ExprError> {
        let mut left = operand(self)?;
        while self.peek() == Some(&op) {
            self.pos += 1;
            let right = operand(self)?;
            left = join(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Condition, ExprError> {
        match self.peek().cloned() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Condition::Not(Box::new(self.unary()?)))
            }
            Some(Tok::Open) => {
                self.pos += 1;
                let c = self.or()?;
                if self.peek() != Some(&Tok::Close) {
                    return self.fail("condition: missing `)`");
                }
                self.pos += 1;
                Ok(c)
            }
            Some(Tok::Operand(left)) => {
                self.pos += 1;
                let next = self.peek().cloned();
                if let Some(Tok::Call(method, arg)) = next {
                    self.pos += 1;
                    return Ok(Condition::Test {
                        target: left,
                        method,
                        arg,
                    });
                }
                let right = |p: &mut Self| match p.peek().cloned() {
                    Some(Tok::Operand(right)) => {
                        p.pos += 1;
                        Ok(right)
                    }
                    _ => p.fail("condition: a comparison needs a value on its right"),
                };
                match next {
                    Some(Tok::Eq | Tok::Ne) => {
                        self.pos += 1;
                        let right = right(self)?;
                        Ok(Condition::Compare {
                            left,
                            equal: next == Some(Tok::Eq),
                            right,
                        })
                    }
                    Some(Tok::Order(op)) => {
                        self.pos += 1;
                        let right = right(self)?;
                        Ok(Condition::Order { left, op, right })
                    }
                    Some(Tok::Method(method, negated)) => {
                        self.pos += 1;
                        let arg = right(self)?;
                        let test = Condition::Test {
                            target: left,
                            method,
                            arg,
                        };
                        Ok(if negated {
                            Condition::Not(Box::new(test))
                        } else {
                            test
                        })
                    }
                    _ => Ok(Condition::Value(left)),
                }
            }
            Some(t) => self.fail(format!("condition: unexpected `{t}`")),
            None => self.fail("condition: unexpected end"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Expr {
        match parse_template(text).unwrap().as_slice() {
            [TemplatePart::Expr(e)] => e.clone(),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn literal_and_expressions() {
        let parts = parse_template("echo <+pipeline.name> and <+stage.variables.x>!").unwrap();
        assert_eq!(
            parts,
            vec![
                TemplatePart::Literal("echo ".into()),
                TemplatePart::Expr(Expr::PipelineName),
                TemplatePart::Literal(" and ".into()),
                TemplatePart::Expr(Expr::StageVariable("x".into())),
                TemplatePart::Literal("!".into()),
            ]
        );
        assert_eq!(parse_template("").unwrap(), vec![]);
        assert_eq!(
            parse_template("a > b < c").unwrap(),
            vec![TemplatePart::Literal("a > b < c".into())]
        );
    }

    #[test]
    fn simple_references() {
        assert_eq!(one("<+pipeline.identifier>"), Expr::PipelineIdentifier);
        assert_eq!(
            one("<+pipeline.variables.tag>"),
            Expr::PipelineVariable("tag".into())
        );
        assert_eq!(one("<+stage.name>"), Expr::StageName);
        assert_eq!(one("<+stage.identifier>"), Expr::StageIdentifier);
        assert_eq!(one("<+step.identifier>"), Expr::StepIdentifier);
        assert_eq!(one("<+step.name>"), Expr::StepName);
        assert_eq!(
            one("<+stepGroup.variables.v>"),
            Expr::StepGroupVariable("v".into())
        );
        assert_eq!(
            one("<+codebase.shortCommitSha>"),
            Expr::Codebase(CodebaseField::ShortCommitSha)
        );
        assert_eq!(
            one("<+codebase.repoUrl>"),
            Expr::Codebase(CodebaseField::RepoUrl)
        );
        assert_eq!(one("<+pipeline.sequenceId>"), Expr::PipelineSequenceId);
    }

    #[test]
    fn step_outputs() {
        let out = |g: &[&str], s: &str, v: &str| Expr::StepOutput {
            stage: None,
            group_path: g.iter().map(|x| x.to_string()).collect(),
            step: s.into(),
            variable: v.into(),
        };
        assert_eq!(
            one("<+steps.build.output.outputVariables.VERSION>"),
            out(&[], "build", "VERSION")
        );
        assert_eq!(
            one("<+execution.steps.build.output.outputVariables.V>"),
            out(&[], "build", "V")
        );
        assert_eq!(
            one("<+execution.steps.g1.steps.s.output.outputVariables.V>"),
            out(&["g1"], "s", "V")
        );
        assert_eq!(
            one("<+execution.steps.g1.steps.g2.steps.s.output.outputVariables.V>"),
            out(&["g1", "g2"], "s", "V")
        );
        let e = parse_template("<+steps.build.output.V>").unwrap_err();
        assert!(e[0].message.contains("outputVariables"), "{}", e[0].message);
        assert!(parse_template("<+execution.steps.g.stepz.s.output.outputVariables.V>").is_err());
    }

    #[test]
    fn secrets_with_either_quote() {
        assert_eq!(
            one("<+secrets.getValue(\"db_pass\")>"),
            Expr::Secret("db_pass".into())
        );
        assert_eq!(
            one("<+secrets.getValue('account.tok')>"),
            Expr::Secret("account.tok".into())
        );
        assert!(parse_template("<+secrets.getValue(x)>").is_err());
    }

    #[test]
    fn inputs() {
        assert_eq!(
            one("<+input>"),
            Expr::Input {
                default: None,
                allowed: None
            }
        );
        assert_eq!(
            one("<+input>.default(main)"),
            Expr::Input {
                default: Some("main".into()),
                allowed: None
            }
        );
        assert_eq!(
            one("<+input>.allowedValues(a, b,c)"),
            Expr::Input {
                default: None,
                allowed: Some(vec!["a".into(), "b".into(), "c".into()])
            }
        );
        assert_eq!(
            one("<+input>.default(b).allowedValues(a,b)"),
            Expr::Input {
                default: Some("b".into()),
                allowed: Some(vec!["a".into(), "b".into()])
            }
        );
        assert_eq!(
            one("<+input>.default(\"x, y\")"),
            Expr::Input {
                default: Some("x, y".into()),
                allowed: None
            }
        );
        assert!(parse_template("<+input>.default(z).allowedValues(a,b)").is_err());
        assert!(parse_template("<+input>.executionInput()").is_err());
    }

    #[test]
    fn unknown_and_malformed() {
        let e = parse_template("x <+pipeline.nmae> y").unwrap_err();
        assert_eq!(e[0].message, "unknown expression `<+pipeline.nmae>`");
        let e = parse_template("x <+pipeline.name").unwrap_err();
        assert_eq!(
            e[0].message,
            "expression `<+pipeline.name` has no closing `>`"
        );
        assert!(parse_template("<+pipeline.variables.x.toLowerCase()>").is_err());
        assert!(parse_template("<+codebase.prNumber>").is_err());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "<+pipeline.variables.x>",
            "<+execution.steps.g.steps.s.output.outputVariables.V>",
            "<+secrets.getValue(\"k\")>",
            "<+input>.default(a).allowedValues(a,b)",
        ] {
            assert_eq!(one(text).to_string(), text);
        }
    }

    #[test]
    fn conditions() {
        let c = parse_condition("<+codebase.branch> == \"main\" && !<+pipeline.variables.skip>")
            .unwrap();
        assert_eq!(
            c,
            Condition::And(
                Box::new(Condition::Compare {
                    left: Operand::Expr(Expr::Codebase(CodebaseField::Branch)),
                    equal: true,
                    right: Operand::Text("main".into()),
                }),
                Box::new(Condition::Not(Box::new(Condition::Value(Operand::Expr(
                    Expr::PipelineVariable("skip".into())
                ))))),
            )
        );
        assert_eq!(
            parse_condition("true").unwrap(),
            Condition::Value(Operand::Text("true".into()))
        );
        assert!(parse_condition("(<+stage.name> != 'a' || false)").is_ok());
        assert!(parse_condition("<+stage.name> =~ \"a.*\"").is_err());
        assert!(parse_condition("<+stage.name> == ").is_err());
        assert!(parse_condition("").is_err());
    }

    #[test]
    fn every_bad_expression_of_a_string_is_reported_with_its_offset() {
        let text = "a <+pipeline.nmae> b <+stage.name> c\nd <+steps.x.out> <+codebase.nope>";
        let errors = parse_template(text).unwrap_err();
        let offsets: Vec<usize> = errors.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            vec![
                text.find("<+pipeline").unwrap(),
                text.find("<+steps").unwrap(),
                text.find("<+codebase").unwrap()
            ]
        );
        // An unclosed one stops its line only.
        let errors = parse_template("<+stage.name\n<+bad.thing.x.y>").unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[1].offset, 13);
    }

    #[test]
    fn fully_qualified_and_relative_references() {
        let out = |stage: Option<&str>, g: &[&str], s: &str, v: &str| Expr::StepOutput {
            stage: stage.map(String::from),
            group_path: g.iter().map(|x| x.to_string()).collect(),
            step: s.into(),
            variable: v.into(),
        };
        assert_eq!(
            one("<+pipeline.stages.build.spec.execution.steps.compile.output.outputVariables.V>"),
            out(Some("build"), &[], "compile", "V")
        );
        assert_eq!(
            one("<+pipeline.stages.b.spec.execution.steps.g.steps.s.output.outputVariables.V>"),
            out(Some("b"), &["g"], "s", "V")
        );
        assert_eq!(
            one("<+stage.spec.execution.steps.g.steps.s.output.outputVariables.V>"),
            out(None, &["g"], "s", "V")
        );
        assert_eq!(
            one("<+g.steps.s.output.outputVariables.V>"),
            out(None, &["g"], "s", "V")
        );
        assert_eq!(
            one("<+pipeline.stages.b.variables.v>"),
            Expr::OtherStage {
                stage: "b".into(),
                attr: StageAttr::Variable("v".into())
            }
        );
        assert_eq!(
            one("<+pipeline.stages.b.name>"),
            Expr::OtherStage {
                stage: "b".into(),
                attr: StageAttr::Name
            }
        );
        assert_eq!(
            one("<+build.variables.v>"),
            Expr::NodeVariable {
                node: "build".into(),
                variable: "v".into()
            }
        );
        assert!(parse_template("<+pipeline.stages.b.spec.infrastructure>").is_err());
        for text in [
            "<+pipeline.stages.b.spec.execution.steps.g.steps.s.output.outputVariables.V>",
            "<+pipeline.stages.b.variables.v>",
            "<+build.variables.v>",
        ] {
            assert_eq!(one(text).to_string(), text);
        }
    }

    #[test]
    fn server_values_are_inputs() {
        for path in [
            "trigger.branch",
            "trigger.payload.pull_request.number",
            "variable.region",
            "variable.org.region",
            "variable.account.region",
            "project.identifier",
            "pipeline.triggeredBy.email",
            "pipeline.triggerType",
        ] {
            assert_eq!(one(&format!("<+{path}>")), Expr::Server(path.into()));
        }
        // `stage` is a namespace, not a node identifier.
        assert!(parse_template("<+stage.varables.x>").is_err());
        assert!(parse_template("<+trigger>").is_err());
    }

    #[test]
    fn conditions_of_real_pipelines() {
        let branch = || Operand::Expr(Expr::Codebase(CodebaseField::Branch));
        let text = |s: &str| Operand::Text(s.into());
        assert_eq!(
            parse_condition("<+codebase.branch>.startsWith(\"release/\")").unwrap(),
            Condition::Test {
                target: branch(),
                method: StrMethod::StartsWith,
                arg: text("release/")
            }
        );
        assert_eq!(
            parse_condition("<+codebase.branch.contains('feat')>").unwrap(),
            Condition::Test {
                target: branch(),
                method: StrMethod::Contains,
                arg: text("feat")
            }
        );
        assert_eq!(
            parse_condition("<+trigger.event> == \"PR\" || !(<+codebase.branch> =^ \"dev\")")
                .unwrap(),
            Condition::Or(
                Box::new(Condition::Compare {
                    left: Operand::Expr(Expr::Server("trigger.event".into())),
                    equal: true,
                    right: text("PR"),
                }),
                Box::new(Condition::Not(Box::new(Condition::Test {
                    target: branch(),
                    method: StrMethod::StartsWith,
                    arg: text("dev"),
                }))),
            )
        );
        assert_eq!(
            parse_condition("<+pipeline.variables.n> >= 3 and <+stage.name> ne 'x'").unwrap(),
            Condition::And(
                Box::new(Condition::Order {
                    left: Operand::Expr(Expr::PipelineVariable("n".into())),
                    op: OrderOp::Ge,
                    right: text("3"),
                }),
                Box::new(Condition::Compare {
                    left: Operand::Expr(Expr::StageName),
                    equal: false,
                    right: text("x"),
                }),
            )
        );
        // Seen in a real pipeline: JEXL's word operator.
        assert_eq!(
            parse_condition(
                "<+codebase.branch> == \"main\" || <+codebase.branch> startsWith \"release/\""
            )
            .unwrap(),
            Condition::Or(
                Box::new(Condition::Compare {
                    left: branch(),
                    equal: true,
                    right: text("main"),
                }),
                Box::new(Condition::Test {
                    target: branch(),
                    method: StrMethod::StartsWith,
                    arg: text("release/"),
                }),
            )
        );
        assert!(parse_condition("<+pipeline.variables.branch>==\"main\"").is_ok());
        let e = parse_condition("<+stage.name>.matches(\"a.*\")").unwrap_err();
        assert!(e.message.contains(".matches"), "{}", e.message);
        assert_eq!(e.offset, 13);
    }

    #[test]
    fn order_and_string_tests_evaluate_as_jexl() {
        assert!(OrderOp::Lt.holds("9", "10"));
        assert!(!OrderOp::Lt.holds("b", "a"));
        assert!(OrderOp::Ge.holds("2.0", "2"));
        assert!(StrMethod::EqualsIgnoreCase.holds("Main", "mAIN"));
        assert!(StrMethod::EndsWith.holds("v1.2-rc", "-rc"));
    }
}
