//! Harness expressions (`<+...>`) inside pipeline strings, parsed into a typed [`Expr`].
//!
//! Harness evaluates a JEXL dialect on its servers; sandrun only understands the
//! expressions a CI stage can mean locally (pipeline/stage facts and variables, step
//! outputs, codebase facts, secrets, runtime inputs). Anything else is an error with the
//! expression quoted, so that a pipeline never runs with a `<+...>` left in a command.
//! `plan` resolves what is known up front and leaves step outputs for the executor.

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
    /// An output variable of an earlier step. `group_path` lists the step groups from
    /// the stage's `execution` down to the step (empty for a top-level step):
    /// `<+steps.ID.output.outputVariables.X>`,
    /// `<+execution.steps.ID.output.outputVariables.X>`,
    /// `<+execution.steps.G.steps.ID.output.outputVariables.X>` (groups nest).
    StepOutput {
        group_path: Vec<String>,
        step: String,
        variable: String,
    },
    Codebase(CodebaseField),
    /// `<+secrets.getValue("ID")>`.
    Secret(String),
    /// `<+input>`, optionally `.default(v)` and/or `.allowedValues(a,b)`.
    Input {
        default: Option<String>,
        allowed: Option<Vec<String>>,
    },
}

impl Expr {
    /// The step this expression reads an output of, as (group path, step id).
    pub fn step_output_ref(&self) -> Option<(&[String], &str)> {
        match self {
            Expr::StepOutput {
                group_path, step, ..
            } => Some((group_path, step)),
            _ => None,
        }
    }
}

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
                group_path,
                step,
                variable,
            } => {
                write!(f, "<+execution.steps.")?;
                for g in group_path {
                    write!(f, "{g}.steps.")?;
                }
                write!(f, "{step}.output.outputVariables.{variable}>")
            }
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
}

fn err<T>(message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        message: message.into(),
    })
}

/// True when `text` holds at least one `<+`.
pub fn has_expressions(text: &str) -> bool {
    text.contains("<+")
}

/// Split `text` into literal text and expressions.
pub fn parse_template(text: &str) -> Result<Vec<TemplatePart>, ExprError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<+") {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = find_close(after).ok_or_else(|| ExprError {
            message: format!(
                "expression `{}` has no closing `>`",
                shorten(&rest[start..])
            ),
        })?;
        let inner = &after[..end];
        rest = &after[end + 1..];
        let expr = if inner.trim() == "input" {
            let (expr, consumed) = parse_input_suffix(rest)?;
            rest = &rest[consumed..];
            expr
        } else {
            parse_inner(inner.trim())?
        };
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
        }
        parts.push(TemplatePart::Expr(expr));
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(TemplatePart::Literal(literal));
    }
    Ok(parts)
}

/// Every expression in `text`, in order.
pub fn expressions(text: &str) -> Result<Vec<Expr>, ExprError> {
    Ok(parse_template(text)?
        .into_iter()
        .filter_map(|p| match p {
            TemplatePart::Expr(e) => Some(e),
            TemplatePart::Literal(_) => None,
        })
        .collect())
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
    let unknown = || err(format!("unknown expression `<+{inner}>`"));
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
    match parts.as_slice() {
        ["pipeline", "name"] => Ok(Expr::PipelineName),
        ["pipeline", "identifier"] => Ok(Expr::PipelineIdentifier),
        ["pipeline", "sequenceId"] => Ok(Expr::PipelineSequenceId),
        ["pipeline", "executionId"] => Ok(Expr::PipelineExecutionId),
        ["pipeline", "variables", v] => Ok(Expr::PipelineVariable(v.to_string())),
        ["stage", "name"] => Ok(Expr::StageName),
        ["stage", "identifier"] => Ok(Expr::StageIdentifier),
        ["stage", "variables", v] => Ok(Expr::StageVariable(v.to_string())),
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
        ["steps", rest @ ..] | ["execution", "steps", rest @ ..] => step_output(inner, rest),
        _ => unknown(),
    }
}

/// `G.steps.H.steps.ID.output.outputVariables.X` (groups optional).
fn step_output(inner: &str, rest: &[&str]) -> Result<Expr, ExprError> {
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
}

impl<O> Condition<O> {
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
        }
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
    if p.pos != p.tokens.len() {
        return err(format!(
            "condition `{}`: unexpected `{}`",
            text.trim(),
            p.tokens[p.pos]
        ));
    }
    Ok(c)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Operand(Operand),
    Eq,
    Ne,
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
            Tok::Eq => write!(f, "=="),
            Tok::Ne => write!(f, "!="),
            Tok::And => write!(f, "&&"),
            Tok::Or => write!(f, "||"),
            Tok::Not => write!(f, "!"),
            Tok::Open => write!(f, "("),
            Tok::Close => write!(f, ")"),
        }
    }
}

fn tokenize_condition(text: &str) -> Result<Vec<Tok>, ExprError> {
    let mut out = Vec::new();
    let mut s = text.trim_start();
    while !s.is_empty() {
        let (tok, rest): (Tok, &str) = if let Some(r) = s.strip_prefix("<+") {
            let end = find_close(r).ok_or_else(|| ExprError {
                message: format!("expression `{}` has no closing `>`", shorten(s)),
            })?;
            let inner = r[..end].trim();
            let mut rest = &r[end + 1..];
            let expr = if inner == "input" {
                let (e, used) = parse_input_suffix(rest)?;
                rest = &rest[used..];
                e
            } else {
                parse_inner(inner)?
            };
            (Tok::Operand(Operand::Expr(expr)), rest)
        } else if let Some(r) = s.strip_prefix("==") {
            (Tok::Eq, r)
        } else if let Some(r) = s.strip_prefix("!=") {
            (Tok::Ne, r)
        } else if let Some(r) = s.strip_prefix("&&") {
            (Tok::And, r)
        } else if let Some(r) = s.strip_prefix("||") {
            (Tok::Or, r)
        } else if let Some(r) = s.strip_prefix('!') {
            (Tok::Not, r)
        } else if let Some(r) = s.strip_prefix('(') {
            (Tok::Open, r)
        } else if let Some(r) = s.strip_prefix(')') {
            (Tok::Close, r)
        } else if s.starts_with(['"', '\'']) {
            let q = s.chars().next().unwrap_or('"');
            let body = &s[1..];
            let end = body.find(q).ok_or_else(|| ExprError {
                message: format!("condition `{}`: unterminated string", text.trim()),
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
                return err(format!(
                    "condition `{}`: sandrun cannot evaluate `{}` (it supports ==, !=, &&, ||, ! and parentheses over <+...> references and literals)",
                    text.trim(),
                    shorten(s)
                ));
            }
            (Tok::Operand(Operand::Text(s[..end].to_string())), &s[end..])
        };
        out.push(tok);
        s = rest.trim_start();
    }
    if out.is_empty() {
        return err("empty condition");
    }
    Ok(out)
}

struct CondParser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl CondParser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
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
                    return err("condition: missing `)`");
                }
                self.pos += 1;
                Ok(c)
            }
            Some(Tok::Operand(left)) => {
                self.pos += 1;
                let equal = match self.peek() {
                    Some(Tok::Eq) => true,
                    Some(Tok::Ne) => false,
                    _ => return Ok(Condition::Value(left)),
                };
                self.pos += 1;
                match self.peek().cloned() {
                    Some(Tok::Operand(right)) => {
                        self.pos += 1;
                        Ok(Condition::Compare { left, equal, right })
                    }
                    _ => err("condition: a comparison needs a value on its right"),
                }
            }
            Some(t) => err(format!("condition: unexpected `{t}`")),
            None => err("condition: unexpected end"),
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
        assert!(e.message.contains("outputVariables"), "{}", e.message);
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
        assert_eq!(e.message, "unknown expression `<+pipeline.nmae>`");
        let e = parse_template("x <+pipeline.name").unwrap_err();
        assert_eq!(e.message, "expression `<+pipeline.name` has no closing `>`");
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
}
