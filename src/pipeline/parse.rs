//! From the positioned YAML tree to the typed model, field by field.
//!
//! Harness's schema is large and real pipelines carry many fields that only matter on
//! Harness's servers. Every mapping is checked against the fields the schema has at
//! that place: unknown ones are errors (with a did-you-mean), fields that cannot change
//! a local run (tags, org/project ids, notification rules, delegate selectors, caching
//! switches...) are accepted and dropped, and fields that would change the run but that
//! sandrun cannot honour (rollback actions, template variables...) are "unsupported"
//! errors. Nothing is silently ignored. Parsing continues after an error so that one
//! pass reports as many mistakes as possible.
//!
//! Templates are inlined before this (`template`); a stage, step group or step with a
//! looping `strategy` is parsed once per instance (`strategy`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ErrorKind, PipelineError, PipelineErrors};
use super::expr;
use super::known::{Answers, Known};
use super::model::*;
use super::strategy::{self, Level, Problem};
use super::values;
use super::yaml::{Node, Pos, Value};

/// An expression and where it was written, kept for validation (which needs the
/// whole file: variables declared later, steps of other stages).
#[derive(Clone, Debug)]
pub(crate) struct ExprSite {
    /// Location of the step the expression is in (`None` outside steps).
    pub from_step: Option<Location>,
    /// Location of the expression itself (its `<+`).
    pub at: Location,
    /// Identifier of the stage the expression is in (`None` at pipeline level).
    pub stage: Option<String>,
    /// The step groups enclosing the expression, outermost first.
    pub groups: Vec<String>,
    pub expr: expr::Expr,
}

pub(crate) struct Parser<'e> {
    file: PathBuf,
    /// Path of each source a position may come from: the pipeline file, then the
    /// template files inlined into it.
    sources: Vec<PathBuf>,
    /// Items inlined from templates, by the position of their mapping.
    origins: HashMap<Pos, TemplateOrigin>,
    pub errors: &'e mut PipelineErrors,
    pub expr_sites: Vec<ExprSite>,
    /// Editor-only fields accepted and left unused (`PipelineFile::ignored`).
    pub ignored: Vec<IgnoredField>,
    /// The source text, to place expressions inside multi-line scalars.
    source: super::yaml::Source,
    /// The step whose fields are being read (for `ExprSite::from_step`).
    current_step: Option<Location>,
    /// The stage being read.
    current_stage: Option<String>,
    /// The step groups being read, outermost first.
    current_groups: Vec<String>,
    /// Typed fields of the step being read that are written as expressions.
    step_expr_fields: Vec<ExprField>,
    /// Infrastructure of the stage being read.
    current_infra: Infrastructure,
    /// Host ports bound so far in the stage being read.
    host_ports: HashSet<u16>,
    /// Infrastructure of each stage read so far, for `useFromStage`.
    stage_infra: Vec<(String, Infrastructure)>,
    /// (mapping position, field) for unknown keys that look like a typo of that field:
    /// the field is then not also reported as missing.
    typo_targets: Vec<(Pos, String)>,
    /// Answers given before reading, for strategies written as expressions.
    answers: Answers,
    /// The pipeline's identifier, name and variables, once read.
    pipeline_head: Option<(String, String)>,
    pipeline_vars: Vec<Variable>,
    /// The stage whose steps are being read, and its variables.
    stage_vars: Option<(String, Vec<Variable>)>,
    /// Every stage read so far, with its variables.
    earlier_stage_vars: Vec<(String, Vec<Variable>)>,
    /// Inputs strategies need that nobody answered (`PipelineFile::unanswered`).
    pub unanswered: Vec<UnansweredInput>,
}

/// The fields of one mapping, with the description used in messages about it
/// (`Run step `build``, `stage `ci``...).
struct Fields<'n> {
    entries: &'n [(Node, Node)],
    what: String,
    pos: Pos,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    fn key_pos(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k.pos)
    }
}

/// Fields that are never meaningful for a local run, accepted wherever Harness has them.
const HARMLESS: &[&str] = &["description", "tags", "delegateSelectors"];

/// The closest candidate to `word`, if it is close enough to be a likely typo: a few
/// edits (transpositions count as one) or a long shared prefix.
/// Where a file shows the shape of Harness's v1 YAML, whether or not it says
/// `version: 1`: a top-level `version`, `kind` or `spec` (`kind: pipeline`,
/// `spec: {stages}`), or a `pipeline:` whose stages are not v0's `stage:`/`parallel:`
/// wrappers or that lists `steps` itself.
fn v1_shape(f: &Fields<'_>) -> Option<Pos> {
    let has = |node: &Node, key: &str| match &node.value {
        Value::Map(entries) => entries
            .iter()
            .any(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key)),
        _ => false,
    };
    for key in ["version", "kind", "spec"] {
        if let Some(p) = f.key_pos(key) {
            return Some(p);
        }
    }
    let pipeline = f.get("pipeline")?;
    let Value::Map(entries) = &pipeline.value else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match &k.value {
        Value::Scalar { text, .. } if text == "steps" => Some(k.pos),
        Value::Scalar { text, .. } if text == "stages" => match &v.value {
            Value::Seq(items) => items
                .iter()
                .find(|i| !has(i, "stage") && !has(i, "parallel") && !has(i, "template"))
                .filter(|i| has(i, "steps") || has(i, "spec") || has(i, "type"))
                .map(|i| i.pos),
            _ => None,
        },
        _ => None,
    })
}

pub(crate) fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let max_edits = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| {
            (
                strsim::osa_distance(word, c),
                strsim::jaro_winkler(word, c),
                *c,
            )
        })
        .filter(|(d, jw, _)| *d <= max_edits || *jw > 0.85)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
}

pub(crate) fn suggestion(word: &str, candidates: &[&str]) -> String {
    match did_you_mean(word, candidates) {
        Some(c) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

fn scalar_text(node: &Node) -> Option<String> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Cloud-only step types, with why sandrun cannot run them.
fn unsupported_reason(step_type: &str) -> Option<&'static str> {
    Some(match step_type {
        "BuildAndPushDockerRegistry" | "BuildAndPushECR" | "BuildAndPushGCR"
        | "BuildAndPushACR" | "BuildAndPushGAR" => {
            "it builds and pushes an image with Harness's build infrastructure and a registry connector"
        }
        "SaveCacheS3" | "RestoreCacheS3" | "SaveCacheGCS" | "RestoreCacheGCS" => {
            "it stores its cache in a cloud bucket through a Harness connector"
        }
        "S3Upload" | "GCSUpload" | "ArtifactoryUpload" => {
            "it uploads to a cloud store through a Harness connector"
        }
        "RunTests" => "Test Intelligence runs only on Harness",
        "Action" => "GitHub Actions steps run through Harness's actions adapter",
        "Bitrise" => "Bitrise steps run through Harness's Bitrise adapter",
        "GitClone" => "it clones a repository through a Harness connector",
        "Security" | "AquaTrivy" | "Snyk" | "Sonarqube" | "Grype" | "Bandit" | "Checkmarx"
        | "BlackDuck" | "Burp" | "Gitleaks" | "Semgrep" | "Wiz" | "Zap" | "Prowler"
        | "Mend" | "Veracode" | "Fossa" | "CodeQL" | "Custom Ingest" | "CustomIngest"
        | "Nikto" | "Nmap" | "Brakeman" | "AWSECR" | "AWSSecurityHub" | "Owasp"
        | "Osv" | "Twistlock" | "PrismaCloud" | "Traceable" | "Anchore" | "SysdigScan" => {
            "it is a Harness Security Testing Orchestration step"
        }
        "ProvenanceStep" | "Provenance" | "SscaOrchestration" | "SscaEnforcement"
        | "SlsaVerification" => "it is a Harness supply-chain step",
        "ShellScript" | "Http" | "Wait" | "Barrier" | "HarnessApproval" | "JiraApproval"
        | "Email" | "JiraCreate" | "JiraUpdate" | "ServiceNowApproval" | "Queue"
        | "Policy" | "Container" => "it is not a CI step (it runs on a Harness delegate)",
        _ => return None,
    })
}

/// Fields of a step `spec`, per type (Harness v0 schema).
const RUN_FIELDS: &[&str] = &[
    "connectorRef",
    "image",
    "shell",
    "command",
    "envVariables",
    "outputVariables",
    "reports",
    "imagePullPolicy",
    "privileged",
    "resources",
    "runAsUser",
];

/// Fields of a step `spec`, per type (Harness v0 schema).
const BACKGROUND_FIELDS: &[&str] = &[
    "connectorRef",
    "image",
    "shell",
    "command",
    "entrypoint",
    "envVariables",
    "portBindings",
    "reports",
    "imagePullPolicy",
    "privileged",
    "resources",
    "runAsUser",
];

/// Fields of a step `spec`, per type (Harness v0 schema).
const PLUGIN_FIELDS: &[&str] = &[
    "connectorRef",
    "image",
    "uses",
    "settings",
    "entrypoint",
    "envVariables",
    "reports",
    "imagePullPolicy",
    "privileged",
    "resources",
    "runAsUser",
];

const STEP_TYPES: &[&str] = &["Run", "Background", "Plugin"];

const ERROR_KINDS: &[&str] = &[
    "AllErrors",
    "Unknown",
    "Timeout",
    "Authentication",
    "Authorization",
    "Connectivity",
    "DelegateProvisioning",
    "Verification",
    "PolicyEvaluationFailure",
    "InputTimeoutError",
    "ApprovalRejection",
    "DelegateRestart",
    "UserMarkedFailure",
];

impl<'e> Parser<'e> {
    pub fn new(file: &Path, errors: &'e mut PipelineErrors) -> Self {
        Parser {
            file: file.to_path_buf(),
            sources: vec![file.to_path_buf()],
            origins: HashMap::new(),
            errors,
            expr_sites: Vec::new(),
            ignored: Vec::new(),
            source: Default::default(),
            current_step: None,
            current_stage: None,
            current_groups: Vec::new(),
            step_expr_fields: Vec::new(),
            current_infra: Infrastructure::Cloud,
            host_ports: HashSet::new(),
            stage_infra: Vec::new(),
            typo_targets: Vec::new(),
            answers: Answers::default(),
            pipeline_head: None,
            pipeline_vars: Vec::new(),
            stage_vars: None,
            earlier_stage_vars: Vec::new(),
            unanswered: Vec::new(),
        }
    }

    /// Answers to inputs that strategies written as expressions may need.
    pub fn with_answers(mut self, answers: &Answers) -> Self {
        self.answers = answers.clone();
        self
    }

    /// Positions may also come from these template files (`sources[0]` is the
    /// pipeline file), and these items were inlined from templates.
    pub fn with_templates(
        mut self,
        sources: Vec<PathBuf>,
        origins: HashMap<Pos, TemplateOrigin>,
    ) -> Self {
        self.sources = sources;
        self.origins = origins;
        self
    }

    /// The text the nodes come from, so that errors inside multi-line strings point
    /// at their own line.
    pub fn with_source(mut self, text: &str) -> Self {
        self.source = super::yaml::Source::new(text);
        self
    }

    pub fn loc(&self, pos: Pos) -> Location {
        Location {
            file: (self.sources.get(pos.src as usize))
                .unwrap_or(&self.file)
                .clone(),
            line: pos.line,
            column: pos.col,
        }
    }

    /// Report a problem found by the template or strategy expansion.
    pub fn report(&mut self, p: Problem) {
        self.error(p.pos, p.kind, p.message);
    }

    fn read_strategy(&mut self, item: &Node) -> Option<strategy::Strategy> {
        let node = item.get("strategy")?;
        let id = item
            .get("identifier")
            .and_then(Node::as_str)
            .unwrap_or_default();
        let known = Known {
            answers: &self.answers,
            pipeline_identifier: self.pipeline_head.as_ref().map(|(i, _)| i.as_str()),
            pipeline_name: self.pipeline_head.as_ref().map(|(_, n)| n.as_str()),
            pipeline_vars: &self.pipeline_vars,
            stage: self
                .stage_vars
                .as_ref()
                .map(|(s, vars)| (s.as_str(), vars.as_slice())),
            earlier: &self.earlier_stage_vars,
        };
        let read = strategy::read(node, &|text, field| {
            known.resolve(text, &format!("{id}.strategy.{field}"))
        });
        match read {
            Ok(mut s) => {
                // A stage's own strategy belongs to the stage as `--stage` names it.
                let stage = self.stage_vars.as_ref().map_or(id, |(s, _)| s).to_string();
                for p in std::mem::take(&mut s.unanswered) {
                    let input = UnansweredInput {
                        stage: Some(stage.clone()),
                        loc: self.loc(p.pos),
                        message: p.message,
                    };
                    // Each instance of an enclosing loop reads the strategy again.
                    if !self.unanswered.contains(&input) {
                        self.unanswered.push(input);
                    }
                }
                Some(s)
            }
            Err(problems) => {
                problems.into_iter().for_each(|p| self.report(p));
                None
            }
        }
    }

    /// Parse each instance of a looped item with `parse`. Errors the copies share with
    /// the first one are reported once.
    fn instances<T>(
        &mut self,
        item: &Node,
        strategy: &strategy::Strategy,
        level: Level,
        mut parse: impl FnMut(&mut Self, &Node) -> Option<T>,
    ) -> Vec<T> {
        let before = self.errors.errors.len();
        let mut first: Vec<(Location, ErrorKind)> = Vec::new();
        let mut out = Vec::new();
        for (i, inst) in strategy.instances.iter().enumerate() {
            let start = self.errors.errors.len();
            let copy = strategy::instantiate(item, inst, level);
            if let Some(t) = parse(self, &copy) {
                out.push(t);
            }
            if i == 0 {
                first = self.errors.errors[before..]
                    .iter()
                    .map(|e| (e.loc.clone(), e.kind))
                    .collect();
            } else {
                let mut k = start;
                while k < self.errors.errors.len() {
                    let e = &self.errors.errors[k];
                    if first.iter().any(|(l, kind)| *l == e.loc && *kind == e.kind) {
                        self.errors.errors.remove(k);
                    } else {
                        k += 1;
                    }
                }
            }
        }
        out
    }

    fn error(&mut self, pos: Pos, kind: ErrorKind, message: impl Into<String>) {
        let loc = self.loc(pos);
        self.errors.push(PipelineError {
            loc,
            kind,
            message: message.into(),
        });
    }

    fn invalid(&mut self, pos: Pos, message: impl Into<String>) {
        self.error(pos, ErrorKind::InvalidValue, message);
    }

    /// The node as a mapping, or an error saying what it should have been.
    /// The mapping under `key` of `f`, when it is there and not null.
    fn optional_map<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<Fields<'n>> {
        let node = f.get(key).filter(|n| !n.is_null())?;
        self.map(node, &format!("`{key}` of {}", f.what))
    }

    fn map<'n>(&mut self, node: &'n Node, what: &str) -> Option<Fields<'n>> {
        match &node.value {
            Value::Map(entries) => Some(Fields {
                entries,
                what: what.to_string(),
                pos: node.pos,
            }),
            _ => {
                self.invalid(
                    node.pos,
                    format!("{what} must be a mapping, not {}", node.kind_name()),
                );
                None
            }
        }
    }

    /// Report keys that are not in `known`; refuse those in `unsupported`
    /// (key, why); accept `ignored` ones. Returns nothing: callers read known fields.
    fn check_fields(
        &mut self,
        f: &Fields<'_>,
        known: &[&str],
        ignored: &[&str],
        unsupported: &[(&str, &str)],
    ) {
        for (k, _) in f.entries {
            let Some(key) = k.as_str() else { continue };
            if ignored.contains(&key) && key != "description" {
                self.ignored.push(IgnoredField {
                    loc: self.loc(k.pos),
                    field: key.to_string(),
                    within: f.what.clone(),
                });
            }
            if known.contains(&key) || ignored.contains(&key) {
                continue;
            }
            if let Some((_, why)) = unsupported.iter().find(|(u, _)| *u == key) {
                self.error(
                    k.pos,
                    ErrorKind::Unsupported,
                    format!("`{key}` in {} is not supported by sandrun: {why}", f.what),
                );
                continue;
            }
            let mut all: Vec<&str> = known.to_vec();
            all.extend(ignored);
            all.extend(unsupported.iter().map(|(u, _)| *u));
            let hint = suggestion(key, &all);
            if let Some(target) = did_you_mean(key, &all) {
                self.typo_targets.push((f.pos, target.to_string()));
            }
            self.error(
                k.pos,
                ErrorKind::UnknownField,
                format!("unknown field `{key}` in {}{hint}", f.what),
            );
        }
    }

    /// Whether an unknown key of this mapping was already reported as a typo of `key`.
    fn typo_of(&self, f: &Fields<'_>, key: &str) -> bool {
        self.typo_targets
            .iter()
            .any(|(p, t)| *p == f.pos && t == key)
    }

    fn missing(&mut self, f: &Fields<'_>, key: &str) {
        if self.typo_of(f, key) {
            return;
        }
        let pos = f.pos;
        self.error(
            pos,
            ErrorKind::MissingField,
            format!("missing field `{key}` in {}", f.what),
        );
    }

    /// A scalar field as text (numbers and booleans as written).
    fn opt_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        let node = f.get(key)?;
        match &node.value {
            Value::Null => None,
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.invalid(
                    node.pos,
                    format!(
                        "`{key}` in {} must be a string, not {}",
                        f.what,
                        node.kind_name()
                    ),
                );
                None
            }
        }
    }

    fn req_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        if f.get(key).is_none_or(|n| n.is_null()) {
            self.missing(f, key);
            return None;
        }
        self.opt_string(f, key)
    }

    /// A string that may hold `<+...>` expressions: each is checked.
    fn opt_template(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        let s = self.opt_string(f, key)?;
        let pos = f.get(key).map(|n| n.pos).unwrap_or_default();
        self.check_template(pos, &s);
        Some(s)
    }

    /// Check the expressions in a string value located at `pos`: every bad one is
    /// reported at its own line and column, the good ones kept for validation.
    fn check_template(&mut self, pos: Pos, text: &str) {
        if !expr::has_expressions(text) {
            return;
        }
        let (located, errors) = expr::scan(text);
        for e in errors {
            let at = self.expr_pos(pos, text, e.offset);
            self.error(at, ErrorKind::Expression, e.message);
        }
        for (offset, e) in located {
            self.record(pos, text, offset, e);
        }
    }

    /// The position of the expression at byte `offset` of the scalar at `pos`. A
    /// scalar inlined from a template file is placed at its own start in that file (the
    /// parser holds only the pipeline's text).
    fn expr_pos(&self, pos: Pos, text: &str, offset: usize) -> Pos {
        if pos.src != 0 {
            return pos;
        }
        super::yaml::expression_pos(&self.source, pos, text, offset)
    }

    fn record(&mut self, pos: Pos, text: &str, offset: usize, expr: expr::Expr) {
        let at = self.loc(self.expr_pos(pos, text, offset));
        self.expr_sites.push(ExprSite {
            from_step: self.current_step.clone(),
            at,
            stage: self.current_stage.clone(),
            groups: self.current_groups.clone(),
            expr,
        });
    }

    /// A field that must be a literal (no expression): refuses `<+...>`.
    fn literal(&mut self, f: &Fields<'_>, key: &str) -> Option<(String, Pos)> {
        let s = self.opt_string(f, key)?;
        let pos = f.get(key).map(|n| n.pos).unwrap_or_default();
        // Harness's editor writes `timeout: ""` for a timeout left blank: no timeout.
        if s.trim().is_empty() {
            self.ignored.push(IgnoredField {
                loc: self.loc(pos),
                field: format!("{key}: \"\""),
                within: f.what.clone(),
            });
            return None;
        }
        if expr::has_expressions(&s) {
            self.error(
                pos,
                ErrorKind::Unsupported,
                format!(
                    "`{key}` in {} is `{s}`: sandrun needs a literal value here, not an expression",
                    f.what
                ),
            );
            return None;
        }
        Some((s, pos))
    }

    fn opt_bool(&mut self, f: &Fields<'_>, key: &str) -> Option<bool> {
        let (s, pos) = self.literal(f, key)?;
        match s.as_str() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => {
                self.invalid(
                    pos,
                    format!("`{key}` in {} must be true or false, not `{s}`", f.what),
                );
                None
            }
        }
    }

    /// A typed step field written as an expression: checked, and kept for the plan to
    /// resolve and read as its type. False when the field is absent or a literal.
    fn expr_field(&mut self, f: &Fields<'_>, key: &str, field: StepField) -> bool {
        let Some(node) = f.get(key) else {
            return false;
        };
        let Some(text) = node.as_str() else {
            return false;
        };
        if !expr::has_expressions(text) || self.current_step.is_none() {
            return false;
        }
        self.check_template(node.pos, text);
        self.step_expr_fields.push(ExprField {
            field,
            text: text.to_string(),
            loc: self.loc(node.pos),
        });
        true
    }

    /// A `timeout`: a duration, or an expression the plan resolves.
    fn opt_timeout(&mut self, f: &Fields<'_>, key: &str) -> Option<Timeout> {
        let s = self.opt_string(f, key)?;
        let pos = f.get(key).map(|n| n.pos).unwrap_or_default();
        if expr::has_expressions(&s) {
            self.check_template(pos, &s);
            return Some(Timeout::Expr {
                text: s,
                loc: self.loc(pos),
            });
        }
        self.opt_duration(f, key).map(Timeout::Fixed)
    }

    fn opt_duration(&mut self, f: &Fields<'_>, key: &str) -> Option<Duration> {
        let (s, pos) = self.literal(f, key)?;
        match values::parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.invalid(pos, format!("invalid `{key}` in {}: {e}", f.what));
                None
            }
        }
    }

    /// One of `allowed`, spelled exactly.
    fn opt_enum(&mut self, f: &Fields<'_>, key: &str, allowed: &[&str]) -> Option<String> {
        let (s, pos) = self.literal(f, key)?;
        if allowed.contains(&s.as_str()) {
            return Some(s);
        }
        let hint = suggestion(&s, allowed);
        self.invalid(
            pos,
            format!(
                "invalid `{key}` `{s}` in {}: expected one of {}{hint}",
                f.what,
                allowed.join(", ")
            ),
        );
        None
    }

    fn list<'n>(&mut self, f: &Fields<'n>, key: &str) -> &'n [Node] {
        match f.get(key) {
            None => &[],
            Some(n) => match &n.value {
                Value::Seq(items) => items,
                Value::Null => &[],
                _ => {
                    self.invalid(
                        n.pos,
                        format!(
                            "`{key}` in {} must be a list, not {}",
                            f.what,
                            n.kind_name()
                        ),
                    );
                    &[]
                }
            },
        }
    }

    /// A list of strings (each checked for expressions).
    fn string_list(&mut self, f: &Fields<'_>, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for item in self.list(f, key) {
            match scalar_text(item) {
                Some(s) => {
                    self.check_template(item.pos, &s);
                    out.push(s);
                }
                None => self.invalid(
                    item.pos,
                    format!(
                        "items of `{key}` in {} must be strings, not {}",
                        f.what,
                        item.kind_name()
                    ),
                ),
            }
        }
        out
    }

    fn identifier(&mut self, f: &Fields<'_>) -> Option<String> {
        let id = self.req_string(f, "identifier")?;
        let pos = f.get("identifier").map(|n| n.pos).unwrap_or(f.pos);
        if !valid_identifier(&id) {
            self.invalid(
                pos,
                format!(
                    "invalid identifier `{id}`: identifiers match ^[a-zA-Z_][0-9a-zA-Z_]{{0,127}}$"
                ),
            );
        }
        Some(id)
    }

    // ---- file, pipeline, stages ----

    pub fn file(&mut self, root: &Node) -> Option<PipelineFile> {
        let Value::Map(entries) = &root.value else {
            self.invalid(
                root.pos,
                "a pipeline file holds `pipeline:` or `stage:` at the top level",
            );
            return None;
        };
        let f = Fields {
            entries,
            what: "the file".into(),
            pos: root.pos,
        };
        if let Some(p) = v1_shape(&f) {
            self.error(
                p,
                ErrorKind::Unsupported,
                "this is a Harness v1 pipeline, which sandrun does not read; it reads v0 pipelines (`pipeline:` or `stage:` with `identifier`s and `stage:`/`step:` wrappers)",
            );
            return None;
        }
        self.check_fields(&f, &["pipeline", "stage"], &[], &[]);
        match (f.get("pipeline"), f.get("stage")) {
            (Some(_), Some(_)) => {
                let p = f.key_pos("stage").unwrap_or(root.pos);
                self.invalid(p, "a file holds either `pipeline:` or `stage:`, not both");
                None
            }
            (Some(p), None) => {
                let (info, stages) = self.pipeline(p)?;
                Some(PipelineFile {
                    path: self.file.clone(),
                    pipeline: Some(info),
                    stages,
                    server_inputs: Vec::new(),
                    ignored: Vec::new(),
                    unanswered: Vec::new(),
                })
            }
            (None, Some(s)) => {
                let key = f.key_pos("stage").unwrap_or(root.pos);
                let stage = self.stage(s, key)?;
                Some(PipelineFile {
                    path: self.file.clone(),
                    pipeline: None,
                    stages: vec![stage],
                    server_inputs: Vec::new(),
                    ignored: Vec::new(),
                    unanswered: Vec::new(),
                })
            }
            (None, None) => {
                if f.entries.is_empty() {
                    self.invalid(
                        root.pos,
                        "the file is empty: expected `pipeline:` or `stage:`",
                    );
                }
                None
            }
        }
    }

    fn pipeline(&mut self, node: &Node) -> Option<(PipelineInfo, Vec<Stage>)> {
        let f = self.map(node, "`pipeline`")?;
        let identifier = self.identifier(&f).unwrap_or_default();
        let what = format!("pipeline `{identifier}`");
        let f = Fields { what, ..f };
        self.check_fields(
            &f,
            &[
                "identifier",
                "name",
                "stages",
                "variables",
                "timeout",
                "template",
            ],
            &[
                "description",
                "tags",
                "orgIdentifier",
                "projectIdentifier",
                "properties",
                "notificationRules",
                "delegateSelectors",
                "allowStageExecutions",
                "fixedInputsOnRerun",
                "flowControl",
                "labels",
            ],
            &[],
        );
        if f.get("template").is_some() {
            // A template reference left in place: why was reported when inlining.
            return None;
        }
        let name = self
            .opt_string(&f, "name")
            .unwrap_or_else(|| identifier.clone());
        let variables = self.variables(&f);
        self.pipeline_head = Some((identifier.clone(), name.clone()));
        self.pipeline_vars = variables.clone();
        let timeout = self.opt_timeout(&f, "timeout");
        let mut stages = Vec::new();
        if f.get("stages").is_none() {
            self.missing(&f, "stages");
        }
        for item in self.list(&f, "stages") {
            self.stage_item(item, &mut stages, None);
        }
        let info = PipelineInfo {
            identifier,
            name,
            variables,
            timeout,
            template: self.origins.get(&node.pos).cloned(),
            loc: self.loc(node.pos),
        };
        Some((info, stages))
    }

    /// `- stage:` or `- parallel: [- stage: ...]`. The stages of one `parallel` block
    /// share its `parallel` number (the position of its first stage), which tells the
    /// runner to start them together.
    fn stage_item(&mut self, item: &Node, out: &mut Vec<Stage>, block: Option<usize>) {
        let Some(f) = self.map(item, "an item of `stages`") else {
            return;
        };
        self.check_fields(&f, &["stage", "parallel"], &[], &[]);
        if let Some(s) = f.get("stage") {
            let key = f.key_pos("stage").unwrap_or(item.pos);
            if s.get("template").is_some() {
                // A template reference left in place: why was reported when inlining.
            } else if s.get("strategy").is_some() {
                self.looped_stages(s, key, out, block);
            } else if let Some(mut stage) = self.stage(s, key) {
                stage.parallel = block;
                out.push(stage);
            }
        }
        let block = block.unwrap_or(out.len());
        for p in self.list(&f, "parallel") {
            self.stage_item(p, out, Some(block));
        }
        if f.get("stage").is_none() && f.get("parallel").is_none() && !f.entries.is_empty() {
            // Already reported as unknown fields.
        } else if f.entries.is_empty() {
            self.invalid(
                item.pos,
                "empty item in `stages`: expected `stage:` or `parallel:`",
            );
        }
    }

    /// The instances of a stage with a `strategy`, in `out`. As on Harness they run at
    /// the same time (a `parallel` block of their own, or the block they sit in), at
    /// most `maxConcurrency` at once (the runner keeps that cap).
    fn looped_stages(&mut self, node: &Node, key: Pos, out: &mut Vec<Stage>, block: Option<usize>) {
        let Some(st) = self.read_strategy(node) else {
            // Still check the rest of the stage.
            self.stage(&strategy::without_strategy(node), key);
            return;
        };
        let of = node
            .get("identifier")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_string();
        let count = st.instances.len();
        let own_block = out.len();
        let stages = self.instances(node, &st, Level::Stage, |p, copy| p.stage(copy, key));
        for (index, mut stage) in stages.into_iter().enumerate() {
            stage.parallel = block.or(Some(own_block));
            stage.instance = Some(StageInstance {
                of: of.clone(),
                kind: st.kind,
                index,
                count,
                max_concurrency: st.max_concurrency,
            });
            out.push(stage);
        }
    }

    fn stage(&mut self, node: &Node, key_pos: Pos) -> Option<Stage> {
        let f = self.map(node, "`stage`")?;
        let identifier = self.identifier(&f).unwrap_or_default();
        let stage_type = self.req_string(&f, "type").unwrap_or_default();
        let what = format!("stage `{identifier}`");
        let f = Fields { what, ..f };
        let name = self
            .opt_string(&f, "name")
            .unwrap_or_else(|| identifier.clone());
        let loc = self.loc(key_pos);
        self.current_stage = Some(identifier.clone());
        self.current_groups.clear();
        if stage_type != "CI" {
            // Only far enough to report it as skipped.
            return Some(Stage {
                identifier,
                name,
                stage_type,
                variables: Vec::new(),
                spec: None,
                timeout: None,
                when: None,
                failure_strategies: Vec::new(),
                instance: None,
                template: self.origins.get(&node.pos).cloned(),
                parallel: None,
                loc,
            });
        }
        self.check_fields(
            &f,
            &[
                "identifier",
                "name",
                "type",
                "spec",
                "variables",
                "when",
                "failureStrategies",
                "timeout",
            ],
            HARMLESS,
            &[],
        );
        let variables = self.variables(&f);
        self.stage_vars = Some((identifier.clone(), variables.clone()));
        let timeout = self.opt_timeout(&f, "timeout");
        let when = f
            .get("when")
            .and_then(|w| self.when(w, &f.what, "pipelineStatus"));
        let failure_strategies = self.failure_strategies(&f);
        self.current_infra = Infrastructure::Cloud;
        self.host_ports.clear();
        let spec = match f.get("spec") {
            Some(s) => self.ci_spec(s, &identifier),
            None => {
                self.missing(&f, "spec");
                None
            }
        };
        if let Some(spec) = &spec {
            self.stage_infra
                .push((identifier.clone(), spec.infrastructure.clone()));
        }
        self.current_stage = None;
        self.earlier_stage_vars.extend(self.stage_vars.take());
        Some(Stage {
            identifier,
            name,
            stage_type,
            variables,
            spec,
            timeout,
            when,
            failure_strategies,
            instance: None,
            template: self.origins.get(&node.pos).cloned(),
            parallel: None,
            loc,
        })
    }

    fn ci_spec(&mut self, node: &Node, stage_id: &str) -> Option<CiStageSpec> {
        let f = self.map(node, &format!("`spec` of stage `{stage_id}`"))?;
        self.check_fields(
            &f,
            &[
                "execution",
                "cloneCodebase",
                "platform",
                "runtime",
                "infrastructure",
                "sharedPaths",
                "serviceDependencies",
                "caching",
                "buildIntelligence",
            ],
            // These only speed Harness builds up or record provenance there.
            &["slsa_provenance", "sbom", "cache"],
            &[],
        );
        let clone_codebase = self.opt_bool(&f, "cloneCodebase").unwrap_or(false);
        let platform = f.get("platform").and_then(|p| self.platform(p, stage_id));
        let infrastructure = self.infrastructure(&f, stage_id);
        self.current_infra = infrastructure.clone();
        let mut shared_paths = self.string_list(&f, "sharedPaths");
        for key in ["caching", "buildIntelligence"] {
            if let Some(n) = f.get(key) {
                // Accepted: they only make Harness builds faster. Their shape is checked.
                if let Some(c) = self.map(n, &format!("`{key}` of stage `{stage_id}`")) {
                    self.check_fields(
                        &c,
                        &["enabled", "paths", "key", "override", "policy"],
                        &[],
                        &[],
                    );
                }
            }
        }
        let mut service_dependencies = Vec::new();
        for dep in self.list(&f, "serviceDependencies") {
            if let Some(step) = self.service_dependency(dep) {
                service_dependencies.push(step);
            }
        }
        let mut steps = Vec::new();
        match f.get("execution") {
            None => self.missing(&f, "execution"),
            Some(e) => {
                if let Some(ef) = self.map(e, &format!("`execution` of stage `{stage_id}`")) {
                    self.check_fields(
                        &ef,
                        &["steps"],
                        &[],
                        &[(
                            "rollbackSteps",
                            "rollback steps belong to deployment stages",
                        )],
                    );
                    if ef.get("steps").is_none() {
                        self.missing(&ef, "steps");
                    }
                    steps = self.step_items(&ef, &mut shared_paths, &[]);
                }
            }
        }
        Some(CiStageSpec {
            infrastructure,
            shared_paths,
            clone_codebase,
            platform,
            service_dependencies,
            steps,
        })
    }

    fn platform(&mut self, node: &Node, stage_id: &str) -> Option<Platform> {
        let f = self.map(node, &format!("`platform` of stage `{stage_id}`"))?;
        self.check_fields(&f, &["os", "arch"], &[], &[]);
        let os = self.opt_enum(&f, "os", &["Linux", "MacOS", "Windows"]);
        let arch = self.opt_enum(&f, "arch", &["Amd64", "Arm64"]);
        if let Some(os) = &os {
            if os != "Linux" {
                let pos = f.get("os").map(|n| n.pos).unwrap_or(f.pos);
                self.error(
                    pos,
                    ErrorKind::Unsupported,
                    format!("stage `{stage_id}` runs on {os}: sandrun runs Linux stages only"),
                );
            }
        }
        Some(Platform {
            os: os.unwrap_or_else(|| "Linux".into()),
            arch: arch.unwrap_or_else(|| "Amd64".into()),
        })
    }

    fn infrastructure(&mut self, f: &Fields<'_>, stage_id: &str) -> Infrastructure {
        let runtime = f.get("runtime");
        let infra = f.get("infrastructure");
        if let (Some(_), Some(_)) = (runtime, infra) {
            let pos = f.key_pos("infrastructure").unwrap_or(f.pos);
            self.invalid(
                pos,
                format!("stage `{stage_id}` has both `runtime` and `infrastructure`; keep one"),
            );
        }
        if let Some(r) = runtime {
            let Some(rf) = self.map(r, &format!("`runtime` of stage `{stage_id}`")) else {
                return Infrastructure::Cloud;
            };
            // `spec` says which machine size Harness Cloud should use: meaningless here.
            self.check_fields(&rf, &["type", "spec"], &[], &[]);
            if rf.get("type").is_none() {
                self.missing(&rf, "type");
            }
            return match self.opt_enum(&rf, "type", &["Cloud", "Docker"]).as_deref() {
                Some("Docker") => Infrastructure::Docker,
                _ => Infrastructure::Cloud,
            };
        }
        let Some(i) = infra else {
            return Infrastructure::Cloud;
        };
        let Some(inf) = self.map(i, &format!("`infrastructure` of stage `{stage_id}`")) else {
            return Infrastructure::Cloud;
        };
        if let Some(n) = inf.get("useFromStage") {
            self.check_fields(&inf, &["useFromStage"], &[], &[]);
            let from = scalar_text(n).unwrap_or_default();
            return match self.stage_infra.iter().find(|(id, _)| *id == from) {
                Some(_) => Infrastructure::UseFromStage(from),
                None => {
                    self.invalid(
                        n.pos,
                        format!(
                            "`useFromStage` in stage `{stage_id}` names `{from}`, which is not an earlier CI stage of this pipeline"
                        ),
                    );
                    Infrastructure::UseFromStage(from)
                }
            };
        }
        // `spec` describes the remote cluster or VM pool (namespace, connector, node
        // selectors...): where Harness would run the stage, not what the stage does.
        self.check_fields(&inf, &["type", "spec"], &[], &[]);
        if inf.get("type").is_none() {
            self.missing(&inf, "type");
        }
        match self
            .opt_enum(&inf, "type", &["KubernetesDirect", "VM"])
            .as_deref()
        {
            Some("KubernetesDirect") => Infrastructure::KubernetesDirect,
            Some("VM") => Infrastructure::Vm,
            _ => Infrastructure::Cloud,
        }
    }

    /// The infrastructure a stage really runs on, following `useFromStage`.
    fn effective_infra(&self) -> Infrastructure {
        let mut infra = self.current_infra.clone();
        for _ in 0..self.stage_infra.len() + 1 {
            match &infra {
                Infrastructure::UseFromStage(from) => {
                    match self.stage_infra.iter().find(|(id, _)| id == from) {
                        Some((_, i)) => infra = i.clone(),
                        None => break,
                    }
                }
                _ => break,
            }
        }
        infra
    }

    // ---- variables, when, failure strategies ----

    fn variables(&mut self, f: &Fields<'_>) -> Vec<Variable> {
        let what = f.what.clone();
        let mut out = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for item in self.list(f, "variables") {
            let Some(vf) = self.map(item, &format!("a variable of {what}")) else {
                continue;
            };
            self.check_fields(
                &vf,
                &["name", "type", "value", "default", "required"],
                &["description"],
                &[],
            );
            let Some(name) = self.req_string(&vf, "name") else {
                continue;
            };
            let vf = Fields {
                what: format!("variable `{name}` of {what}"),
                ..vf
            };
            let name_pos = vf.get("name").map(|n| n.pos).unwrap_or(item.pos);
            if !seen.insert(name.clone()) {
                self.error(
                    name_pos,
                    ErrorKind::Duplicate,
                    format!("variable `{name}` is defined twice in {what}"),
                );
            }
            if !is_env_name(&name) {
                self.invalid(
                    name_pos,
                    format!(
                        "variable name `{name}` in {what} cannot be an environment variable name"
                    ),
                );
            }
            if vf.get("type").is_none() {
                self.missing(&vf, "type");
            }
            let var_type = match self
                .opt_enum(&vf, "type", &["String", "Number", "Secret"])
                .as_deref()
            {
                Some("Number") => VariableType::Number,
                Some("Secret") => VariableType::Secret,
                _ => VariableType::String,
            };
            let value = match vf.get("value") {
                None => {
                    self.missing(&vf, "value");
                    String::new()
                }
                Some(_) => self.opt_template(&vf, "value").unwrap_or_default(),
            };
            let default = self.opt_template(&vf, "default");
            let required = self.opt_bool(&vf, "required").unwrap_or(false);
            if var_type == VariableType::Number
                && !expr::has_expressions(&value)
                && !value.is_empty()
                && value.trim().parse::<f64>().is_err()
            {
                let pos = vf.get("value").map(|n| n.pos).unwrap_or(item.pos);
                self.invalid(
                    pos,
                    format!("variable `{name}` of {what} is a Number, but its value `{value}` is not a number"),
                );
            }
            out.push(Variable {
                name,
                var_type,
                value,
                default,
                required,
                loc: self.loc(item.pos),
            });
        }
        out
    }

    fn when(&mut self, node: &Node, owner: &str, status_key: &str) -> Option<When> {
        let f = self.map(node, &format!("`when` of {owner}"))?;
        self.check_fields(&f, &[status_key, "condition"], &[], &[]);
        if f.get(status_key).is_none() {
            self.missing(&f, status_key);
        }
        let status = match self
            .opt_enum(&f, status_key, &["Success", "Failure", "All"])
            .as_deref()
        {
            Some("Failure") => StageStatus::Failure,
            Some("All") => StageStatus::All,
            _ => StageStatus::Success,
        };
        let condition = self.opt_string(&f, "condition");
        if let Some(c) = &condition {
            let pos = f.get("condition").map(|n| n.pos).unwrap_or(f.pos);
            match expr::parse_condition(c) {
                Ok(cond) => {
                    let mut offsets = c.match_indices("<+").map(|(i, _)| i);
                    for e in cond.exprs() {
                        let offset = offsets.next().unwrap_or(0);
                        self.record(pos, c, offset, e.clone());
                    }
                }
                Err(e) => {
                    let at = self.expr_pos(pos, c, e.offset);
                    self.error(
                        at,
                        ErrorKind::Unsupported,
                        format!(
                            "`when.condition` of {owner} cannot be evaluated by sandrun: {}",
                            e.message
                        ),
                    )
                }
            }
        }
        Some(When {
            stage_status: status,
            condition,
        })
    }

    fn failure_strategies(&mut self, f: &Fields<'_>) -> Vec<FailureStrategy> {
        let owner = f.what.clone();
        let mut out = Vec::new();
        for item in self.list(f, "failureStrategies") {
            let Some(sf) = self.map(item, &format!("a failure strategy of {owner}")) else {
                continue;
            };
            self.check_fields(&sf, &["onFailure"], &[], &[]);
            let Some(of) = sf.get("onFailure") else {
                self.missing(&sf, "onFailure");
                continue;
            };
            let Some(of) = self.map(of, &format!("`onFailure` of {owner}")) else {
                continue;
            };
            self.check_fields(&of, &["errors", "action"], &[], &[]);
            let mut errors = Vec::new();
            for e in self.list(&of, "errors") {
                let Some(kind) = scalar_text(e) else {
                    self.invalid(e.pos, format!("error kinds in {owner} must be strings"));
                    continue;
                };
                if !ERROR_KINDS.contains(&kind.as_str()) {
                    let hint = suggestion(&kind, ERROR_KINDS);
                    self.invalid(
                        e.pos,
                        format!("unknown error kind `{kind}` in failure strategy of {owner}{hint}"),
                    );
                }
                errors.push(kind);
            }
            if of.get("errors").is_none() {
                self.missing(&of, "errors");
            }
            let action = match of.get("action") {
                Some(a) => self.failure_action(a, &owner, true),
                None => {
                    self.missing(&of, "action");
                    None
                }
            };
            if let Some(action) = action {
                out.push(FailureStrategy { errors, action });
            }
        }
        out
    }

    fn failure_action(&mut self, node: &Node, owner: &str, top: bool) -> Option<FailureAction> {
        let f = self.map(node, &format!("a failure action of {owner}"))?;
        self.check_fields(&f, &["type", "spec"], &[], &[]);
        let Some((ty, ty_pos)) = self.literal(&f, "type") else {
            if f.get("type").is_none() {
                self.missing(&f, "type");
            }
            return None;
        };
        const SUPPORTED: &[&str] = &["Ignore", "Retry", "MarkAsSuccess", "MarkAsFailure", "Abort"];
        const REFUSED: &[&str] = &[
            "StageRollback",
            "StepGroupRollback",
            "PipelineRollback",
            "ManualIntervention",
            "ProceedWithDefaultValues",
            "RetryStepGroup",
        ];
        let action = match ty.as_str() {
            "Ignore" => FailureAction::Ignore,
            "MarkAsSuccess" => FailureAction::MarkAsSuccess,
            "MarkAsFailure" => FailureAction::MarkAsFailure,
            "Abort" => FailureAction::Abort,
            "Retry" if !top => {
                self.error(
                    ty_pos,
                    ErrorKind::InvalidValue,
                    format!("`onRetryFailure` of {owner} cannot be Retry again"),
                );
                return None;
            }
            "Retry" => {
                let Some(spec) = f.get("spec") else {
                    self.missing(&f, "spec");
                    return None;
                };
                let sf = self.map(spec, &format!("the Retry action of {owner}"))?;
                self.check_fields(
                    &sf,
                    &["retryCount", "retryIntervals", "onRetryFailure"],
                    &[],
                    &[],
                );
                let count = match self.literal(&sf, "retryCount") {
                    None => {
                        if sf.get("retryCount").is_none() {
                            self.missing(&sf, "retryCount");
                        }
                        0
                    }
                    Some((s, pos)) => match s.parse::<u32>() {
                        Ok(n) if n >= 1 => n,
                        _ => {
                            self.invalid(pos, format!("`retryCount` of {owner} must be a whole number of at least 1, not `{s}`"));
                            0
                        }
                    },
                };
                let mut intervals = Vec::new();
                for i in self.list(&sf, "retryIntervals") {
                    match scalar_text(i).map(|s| (values::parse_duration(&s), s)) {
                        Some((Ok(d), _)) => intervals.push(d),
                        Some((Err(e), _)) => {
                            self.invalid(i.pos, format!("invalid retry interval in {owner}: {e}"))
                        }
                        None => self.invalid(
                            i.pos,
                            format!("retry intervals in {owner} must be durations"),
                        ),
                    }
                }
                let on_retry_failure = match sf.get("onRetryFailure") {
                    None => FailureAction::MarkAsFailure,
                    Some(n) => {
                        let rf = self.map(n, &format!("`onRetryFailure` of {owner}"))?;
                        self.check_fields(&rf, &["action"], &[], &[]);
                        match rf.get("action") {
                            Some(a) => self.failure_action(a, owner, false)?,
                            None => {
                                self.missing(&rf, "action");
                                return None;
                            }
                        }
                    }
                };
                FailureAction::Retry {
                    count,
                    intervals,
                    on_retry_failure: Box::new(on_retry_failure),
                }
            }
            t if REFUSED.contains(&t) => {
                self.error(
                    ty_pos,
                    ErrorKind::Unsupported,
                    format!("failure action `{t}` in {owner} is not supported by sandrun (it supports {})", SUPPORTED.join(", ")),
                );
                return None;
            }
            t => {
                let mut all = SUPPORTED.to_vec();
                all.extend(REFUSED);
                let hint = suggestion(t, &all);
                self.invalid(
                    ty_pos,
                    format!("unknown failure action `{t}` in {owner}{hint}"),
                );
                return None;
            }
        };
        if !matches!(action, FailureAction::Retry { .. })
            && f.get("spec").is_some_and(|s| !s.is_null())
        {
            // e.g. ManualIntervention's spec on a supported action: tolerate an empty one only.
            let pos = f.key_pos("spec").unwrap_or(f.pos);
            self.invalid(pos, format!("the {ty} action of {owner} takes no `spec`"));
        }
        Some(action)
    }

    // ---- steps ----

    fn step_items(
        &mut self,
        f: &Fields<'_>,
        shared_paths: &mut Vec<String>,
        group_path: &[String],
    ) -> Vec<StepItem> {
        let mut out = Vec::new();
        for item in self.list(f, "steps") {
            if let Some(i) = self.step_item(item, shared_paths, group_path) {
                out.push(i);
            }
        }
        out
    }

    fn step_item(
        &mut self,
        node: &Node,
        shared_paths: &mut Vec<String>,
        group_path: &[String],
    ) -> Option<StepItem> {
        let f = self.map(node, "an item of `steps`")?;
        self.check_fields(
            &f,
            &["step", "parallel", "stepGroup"],
            &[],
            &[(
                "insert",
                "`insert` blocks come from Harness templates; inline the steps",
            )],
        );
        if f.entries.len() != 1 {
            self.invalid(
                node.pos,
                "each item of `steps` holds exactly one of `step`, `parallel` or `stepGroup`",
            );
        }
        if let Some(s) = f.get("step") {
            let key = f.key_pos("step").unwrap_or(node.pos);
            if s.get("template").is_some() {
                return None; // reported when inlining
            }
            if s.get("strategy").is_some() {
                let Some(st) = self.read_strategy(s) else {
                    // Still check the rest of the step.
                    return self.step(&strategy::without_strategy(s), key).and(None);
                };
                let steps = self.instances(s, &st, Level::Step, |p, copy| {
                    p.step(copy, key).map(StepItem::Step)
                });
                return self.looped(s, key, &st, steps);
            }
            return self.step(s, key).map(StepItem::Step);
        }
        if let Some(p) = f.get("parallel") {
            let key = f.key_pos("parallel").unwrap_or(node.pos);
            let Value::Seq(items) = &p.value else {
                self.invalid(
                    p.pos,
                    format!("`parallel` must be a list, not {}", p.kind_name()),
                );
                return None;
            };
            let mut inner = Vec::new();
            for i in items {
                if let Some(it) = self.step_item(i, shared_paths, group_path) {
                    inner.push(it);
                }
            }
            return Some(StepItem::Parallel(inner, self.loc(key)));
        }
        if let Some(g) = f.get("stepGroup") {
            let key = f.key_pos("stepGroup").unwrap_or(node.pos);
            if g.get("template").is_some() {
                return None; // reported when inlining
            }
            if g.get("strategy").is_some() {
                let Some(st) = self.read_strategy(g) else {
                    let plain = strategy::without_strategy(g);
                    return self
                        .step_group(&plain, key, shared_paths, group_path)
                        .and(None);
                };
                let groups = self.instances(g, &st, Level::Step, |p, copy| {
                    p.step_group(copy, key, shared_paths, group_path)
                        .map(StepItem::Group)
                });
                // Each instance lists the group's `sharedPaths` again.
                let mut seen = HashSet::new();
                shared_paths.retain(|p| seen.insert(p.clone()));
                return self.looped(g, key, &st, groups);
            }
            return self
                .step_group(g, key, shared_paths, group_path)
                .map(StepItem::Group);
        }
        None
    }

    fn looped(
        &mut self,
        item: &Node,
        key: Pos,
        st: &strategy::Strategy,
        instances: Vec<StepItem>,
    ) -> Option<StepItem> {
        if instances.len() != st.instances.len() {
            return None;
        }
        Some(StepItem::Loop(Loop {
            identifier: item
                .get("identifier")
                .and_then(Node::as_str)
                .unwrap_or_default()
                .to_string(),
            kind: st.kind,
            max_concurrency: st.max_concurrency,
            instances,
            loc: self.loc(key),
        }))
    }

    fn step_group(
        &mut self,
        node: &Node,
        key_pos: Pos,
        shared_paths: &mut Vec<String>,
        group_path: &[String],
    ) -> Option<StepGroup> {
        let f = self.map(node, "`stepGroup`")?;
        let identifier = self.identifier(&f).unwrap_or_default();
        let f = Fields {
            what: format!("step group `{identifier}`"),
            ..f
        };
        self.check_fields(
            &f,
            &[
                "identifier",
                "name",
                "steps",
                "variables",
                "when",
                "failureStrategies",
                "sharedPaths",
            ],
            HARMLESS,
            &[(
                "stepGroupInfra",
                "containerized step groups run on a Harness-managed cluster",
            )],
        );
        let name = self
            .opt_string(&f, "name")
            .unwrap_or_else(|| identifier.clone());
        // The group's `when` is decided where the group starts, outside it.
        let when = f
            .get("when")
            .and_then(|w| self.when(w, &f.what, "stageStatus"));
        let mut path = group_path.to_vec();
        path.push(identifier.clone());
        let outer_groups = std::mem::replace(&mut self.current_groups, path.clone());
        let variables = self.variables(&f);
        let failure_strategies = self.failure_strategies(&f);
        shared_paths.extend(self.string_list(&f, "sharedPaths"));
        if f.get("steps").is_none() {
            self.missing(&f, "steps");
        }
        let steps = self.step_items(&f, shared_paths, &path);
        self.current_groups = outer_groups;
        Some(StepGroup {
            identifier,
            name,
            steps,
            variables,
            when,
            failure_strategies,
            template: self.origins.get(&node.pos).cloned(),
            loc: self.loc(key_pos),
        })
    }

    fn step(&mut self, node: &Node, key_pos: Pos) -> Option<Step> {
        let f = self.map(node, "`step`")?;
        let identifier = self.identifier(&f).unwrap_or_default();
        let step_type = {
            let g = Fields {
                what: format!("step `{identifier}`"),
                entries: f.entries,
                pos: f.pos,
            };
            self.req_string(&g, "type").unwrap_or_default()
        };
        let what = format!("{step_type} step `{identifier}`");
        let f = Fields { what, ..f };
        self.check_fields(
            &f,
            &[
                "identifier",
                "name",
                "type",
                "spec",
                "description",
                "timeout",
                "when",
                "failureStrategies",
            ],
            &["delegateSelectors", "enforce"],
            &[],
        );
        let loc = self.loc(key_pos);
        self.current_step = Some(loc.clone());
        self.step_expr_fields.clear();
        let name = self
            .opt_string(&f, "name")
            .unwrap_or_else(|| identifier.clone());
        let description = self.opt_string(&f, "description");
        let timeout = self.opt_timeout(&f, "timeout");
        let when = f
            .get("when")
            .and_then(|w| self.when(w, &f.what, "stageStatus"));
        let failure_strategies = self.failure_strategies(&f);
        let spec = f.get("spec");
        if spec.is_none() && STEP_TYPES.contains(&step_type.as_str()) {
            self.missing(&f, "spec");
        }
        let kind = match step_type.as_str() {
            "Run" => spec
                .and_then(|s| self.run_spec(s, &f.what))
                .map(StepKind::Run),
            "Background" => spec
                .and_then(|s| self.background_spec(s, &f.what))
                .map(StepKind::Background),
            "Plugin" => spec
                .and_then(|s| self.plugin_spec(s, &f.what))
                .map(StepKind::Plugin),
            "" => None,
            other => Some(StepKind::Unsupported {
                step_type: other.to_string(),
                reason: match unsupported_reason(other) {
                    Some(r) => r.to_string(),
                    None => {
                        let hint = suggestion(other, STEP_TYPES);
                        format!("unknown step type{hint}")
                    }
                },
            }),
        };
        if matches!(kind, Some(StepKind::Background(_))) && !failure_strategies.is_empty() {
            let pos = f.key_pos("failureStrategies").unwrap_or(f.pos);
            self.error(
                pos,
                ErrorKind::Unsupported,
                format!("`failureStrategies` on {}: Harness Background steps do not support failure strategies", f.what),
            );
        }
        self.current_step = None;
        Some(Step {
            identifier,
            name,
            description,
            timeout,
            when,
            failure_strategies,
            kind: kind?,
            template: self.origins.get(&node.pos).cloned(),
            expr_fields: std::mem::take(&mut self.step_expr_fields),
            loc,
        })
    }

    fn container_fields(&mut self, f: &Fields<'_>) -> ContainerFields {
        let image_pos = f.get("image").map(|n| n.pos).unwrap_or(f.pos);
        // An empty image is refused but kept, so that it is not reported a second time
        // as missing.
        let image = self.opt_template(f, "image");
        match &image {
            Some(s) if s.trim().is_empty() => self.invalid(
                image_pos,
                format!(
                    "`image` of {} is empty: to run the step on the host, leave `image` out",
                    f.what
                ),
            ),
            Some(s) if !expr::has_expressions(s) => {
                if let Err(e) = check_image_reference(s) {
                    self.invalid(image_pos, format!("`image` of {}: {e}", f.what));
                }
            }
            _ => {}
        }
        let image_at = image.as_ref().map(|_| self.loc(image_pos));
        let connector_ref = self.opt_string(f, "connectorRef");
        let pull_policy = if self.expr_field(f, "imagePullPolicy", StepField::PullPolicy) {
            None
        } else {
            self.opt_enum(f, "imagePullPolicy", PullPolicy::NAMES)
                .and_then(|s| PullPolicy::from_name(&s))
        };
        let privileged = !self.expr_field(f, "privileged", StepField::Privileged)
            && self.opt_bool(f, "privileged").unwrap_or(false);
        let run_as_user = if self.expr_field(f, "runAsUser", StepField::RunAsUser) {
            None
        } else {
            self.literal(f, "runAsUser").map(|(s, _)| s)
        };
        let resources = f
            .get("resources")
            .map(|r| self.resources(r, &f.what))
            .unwrap_or_default();
        let env = self.env(f);
        let reports = f
            .get("reports")
            .map(|r| self.reports(r, &f.what))
            .unwrap_or_default();
        ContainerFields {
            image,
            image_at,
            connector_ref,
            pull_policy,
            privileged,
            run_as_user,
            resources,
            env,
            reports,
        }
    }

    fn env(&mut self, f: &Fields<'_>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(ef) = self.optional_map(f, "envVariables") else {
            return env;
        };
        for (k, v) in ef.entries {
            let Some(key) = k.as_str() else { continue };
            if !is_env_name(key) {
                self.invalid(
                    k.pos,
                    format!(
                        "`{key}` in `envVariables` of {} is not a valid environment variable name",
                        f.what
                    ),
                );
            }
            let value = match &v.value {
                Value::Null => String::new(),
                Value::Scalar { text, .. } => text.clone(),
                _ => {
                    self.invalid(
                        v.pos,
                        format!(
                            "environment variable `{key}` of {} must be a string, not {}",
                            f.what,
                            v.kind_name()
                        ),
                    );
                    continue;
                }
            };
            self.check_template(v.pos, &value);
            env.insert(key.to_string(), value);
        }
        env
    }

    fn resources(&mut self, node: &Node, owner: &str) -> Resources {
        let mut res = Resources::default();
        let Some(f) = self.map(node, &format!("`resources` of {owner}")) else {
            return res;
        };
        self.check_fields(&f, &["limits"], &[], &[]);
        let Some(l) = f.get("limits") else {
            return res;
        };
        let Some(lf) = self.map(l, &format!("`resources.limits` of {owner}")) else {
            return res;
        };
        self.check_fields(&lf, &["memory", "cpu"], &[], &[]);
        let memory = if self.expr_field(&lf, "memory", StepField::Memory) {
            None
        } else {
            self.literal(&lf, "memory")
        };
        if let Some((s, pos)) = memory {
            match values::parse_memory(&s) {
                Ok(b) => res.memory = Some(b),
                Err(e) => self.invalid(pos, format!("invalid memory limit in {owner}: {e}")),
            }
        }
        let cpu = if self.expr_field(&lf, "cpu", StepField::Cpu) {
            None
        } else {
            self.literal(&lf, "cpu")
        };
        if let Some((s, pos)) = cpu {
            match values::parse_cpu(&s) {
                Ok(m) => res.cpu_millis = Some(m),
                Err(e) => self.invalid(pos, format!("invalid cpu limit in {owner}: {e}")),
            }
        }
        res
    }

    fn reports(&mut self, node: &Node, owner: &str) -> Vec<String> {
        let Some(f) = self.map(node, &format!("`reports` of {owner}")) else {
            return Vec::new();
        };
        self.check_fields(&f, &["type", "spec"], &[], &[]);
        if f.get("type").is_none() {
            self.missing(&f, "type");
        }
        self.opt_enum(&f, "type", &["JUnit"]);
        let Some(s) = f.get("spec") else {
            self.missing(&f, "spec");
            return Vec::new();
        };
        let Some(sf) = self.map(s, &format!("`reports.spec` of {owner}")) else {
            return Vec::new();
        };
        self.check_fields(&sf, &["paths"], &[], &[]);
        if sf.get("paths").is_none() {
            self.missing(&sf, "paths");
        }
        self.string_list(&sf, "paths")
    }

    fn shell(&mut self, f: &Fields<'_>) -> Option<Shell> {
        if self.expr_field(f, "shell", StepField::Shell) {
            return None;
        }
        self.opt_enum(f, "shell", Shell::NAMES)
            .and_then(|s| Shell::from_name(&s))
    }

    /// `entrypoint`: a list, or a string split into words (with shell-like quotes).
    fn entrypoint(&mut self, f: &Fields<'_>) -> Option<Vec<String>> {
        let n = f.get("entrypoint")?;
        match &n.value {
            Value::Null => None,
            Value::Seq(_) => Some(self.string_list(f, "entrypoint")),
            Value::Scalar { text, .. } => {
                self.check_template(n.pos, text);
                match split_words(text) {
                    Ok(words) if !words.is_empty() => Some(words),
                    Ok(_) => None,
                    Err(e) => {
                        self.invalid(n.pos, format!("`entrypoint` of {}: {e}", f.what));
                        None
                    }
                }
            }
            Value::Map(_) => {
                self.invalid(
                    n.pos,
                    format!("`entrypoint` of {} must be a list or a string", f.what),
                );
                None
            }
        }
    }

    /// A step's `spec` mapping, checked against `known`, described as the step itself.
    fn spec_fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
        unsupported: &[(&str, &str)],
    ) -> Option<Fields<'n>> {
        let f = self.map(node, &format!("`spec` of {what}"))?;
        let f = Fields {
            what: what.to_string(),
            ..f
        };
        self.check_fields(&f, known, &[], unsupported);
        Some(f)
    }

    fn run_spec(&mut self, node: &Node, what: &str) -> Option<RunSpec> {
        let f = self.spec_fields(node, what, RUN_FIELDS, &[])?;
        let container = self.container_fields(&f);
        let shell = self.shell(&f);
        let command = self
            .opt_template(&f, "command")
            .filter(|c| !c.trim().is_empty());
        if command.is_none() && !self.typo_of(&f, "command") {
            let pos = f.key_pos("command").unwrap_or(f.pos);
            self.error(
                pos,
                ErrorKind::MissingField,
                format!("{what} has no `command`"),
            );
        }
        let mut output_variables = Vec::new();
        for item in self.list(&f, "outputVariables") {
            let Some(of) = self.map(item, &format!("an output variable of {what}")) else {
                continue;
            };
            self.check_fields(&of, &["name", "type", "value"], &[], &[]);
            let Some(name) = self.req_string(&of, "name") else {
                continue;
            };
            let name_pos = of.get("name").map(|n| n.pos).unwrap_or(item.pos);
            if !is_env_name(&name) {
                self.invalid(
                    name_pos,
                    format!("output variable `{name}` of {what} is not a shell variable name"),
                );
            }
            if output_variables.contains(&name) {
                self.error(
                    name_pos,
                    ErrorKind::Duplicate,
                    format!("output variable `{name}` is listed twice in {what}"),
                );
            }
            if let Some(t) = self.opt_enum(&of, "type", &["String", "Secret"]) {
                if t == "Secret" {
                    let pos = of.get("type").map(|n| n.pos).unwrap_or(item.pos);
                    self.error(
                        pos,
                        ErrorKind::Unsupported,
                        format!(
                            "secret output variable `{name}` of {what} is not supported by sandrun"
                        ),
                    );
                }
            }
            if let Some(v) = self.opt_string(&of, "value") {
                if v != name {
                    let pos = of.get("value").map(|n| n.pos).unwrap_or(item.pos);
                    self.error(pos, ErrorKind::Unsupported, format!("output variable `{name}` of {what} reads shell variable `{v}`: sandrun reads the variable named like the output; rename one of them"));
                }
            }
            output_variables.push(name);
        }
        Some(RunSpec {
            container,
            shell,
            command: command.unwrap_or_default(),
            output_variables,
        })
    }

    fn background_spec(&mut self, node: &Node, what: &str) -> Option<BackgroundSpec> {
        let f = self.spec_fields(
            node,
            what,
            BACKGROUND_FIELDS,
            &[(
                "outputVariables",
                "Harness Background steps have no output variables",
            )],
        )?;
        let container = self.container_fields(&f);
        let shell = self.shell(&f);
        let command = self
            .opt_template(&f, "command")
            .filter(|c| !c.trim().is_empty());
        let entrypoint = self.entrypoint(&f);
        let typo = ["image", "command", "entrypoint"]
            .iter()
            .any(|k| self.typo_of(&f, k));
        if container.image.is_none() && command.is_none() && entrypoint.is_none() && !typo {
            self.error(
                f.pos,
                ErrorKind::MissingField,
                format!("{what} has no `image`, `command` or `entrypoint`: nothing to run"),
            );
        }
        let port_bindings = self.port_bindings(&f);
        Some(BackgroundSpec {
            container,
            shell,
            command,
            entrypoint,
            port_bindings,
        })
    }

    fn port_bindings(&mut self, f: &Fields<'_>) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let Some(pf) = self.optional_map(f, "portBindings") else {
            return out;
        };
        if !pf.entries.is_empty() && self.effective_infra() == Infrastructure::KubernetesDirect {
            let pos = f.key_pos("portBindings").unwrap_or(pf.pos);
            self.error(
                pos,
                ErrorKind::InvalidValue,
                format!(
                    "`portBindings` in {} on a KubernetesDirect stage: Harness refuses port bindings on Kubernetes (steps share the pod network; use localhost)",
                    f.what
                ),
            );
            return out;
        }
        for (k, v) in pf.entries {
            let host = self.port(k, "host", &f.what);
            let container = self.port(v, "container", &f.what);
            if let (Some(h), Some(c)) = (host, container) {
                if !self.host_ports.insert(h) {
                    self.error(
                        k.pos,
                        ErrorKind::Duplicate,
                        format!(
                            "host port {h} of {} is already bound by another step of this stage",
                            f.what
                        ),
                    );
                }
                out.push((h, c));
            }
        }
        out
    }

    fn port(&mut self, n: &Node, side: &str, owner: &str) -> Option<u16> {
        let Some(text) = scalar_text(n) else {
            self.invalid(
                n.pos,
                format!("{side} port in `portBindings` of {owner} must be a number"),
            );
            return None;
        };
        if expr::has_expressions(&text) {
            self.error(
                n.pos,
                ErrorKind::Unsupported,
                format!("{side} port `{text}` in {owner}: sandrun needs a literal port number"),
            );
            return None;
        }
        match text.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Some(p as u16),
            Ok(p) => {
                self.invalid(
                    n.pos,
                    format!(
                        "{side} port {p} in `portBindings` of {owner} is out of range (1-65535)"
                    ),
                );
                None
            }
            Err(_) => {
                self.invalid(
                    n.pos,
                    format!("{side} port `{text}` in `portBindings` of {owner} is not a number"),
                );
                None
            }
        }
    }

    fn plugin_spec(&mut self, node: &Node, what: &str) -> Option<PluginSpec> {
        let f = self.spec_fields(node, what, PLUGIN_FIELDS, &[])?;
        let container = self.container_fields(&f);
        let uses = self.opt_template(&f, "uses");
        if container.image.is_none() && uses.is_none() {
            self.error(
                f.pos,
                ErrorKind::MissingField,
                format!("{what} has no `image`"),
            );
        }
        let entrypoint = self.entrypoint(&f);
        let mut settings = BTreeMap::new();
        if let Some(n) = f.get("settings").filter(|n| !n.is_null()) {
            if let Some(sf) = self.map(n, &format!("`settings` of {what}")) {
                for (k, v) in sf.entries {
                    let Some(key) = k.as_str() else { continue };
                    self.check_settings_value(v);
                    settings.insert(format!("PLUGIN_{}", key.to_uppercase()), setting_value(v));
                }
            }
        }
        Some(PluginSpec {
            container,
            uses,
            entrypoint,
            settings,
        })
    }

    fn check_settings_value(&mut self, v: &Node) {
        match &v.value {
            Value::Scalar { text, .. } => self.check_template(v.pos, text),
            Value::Seq(items) => items.iter().for_each(|i| self.check_settings_value(i)),
            Value::Map(entries) => entries
                .iter()
                .for_each(|(_, i)| self.check_settings_value(i)),
            Value::Null => {}
        }
    }

    /// A legacy `serviceDependencies` item, as the Background step it is equivalent to.
    fn service_dependency(&mut self, node: &Node) -> Option<Step> {
        let f = self.map(node, "a service dependency")?;
        let identifier = self.identifier(&f).unwrap_or_default();
        let what = format!("service dependency `{identifier}`");
        let f = Fields { what, ..f };
        self.check_fields(&f, &["identifier", "name", "type", "spec"], HARMLESS, &[]);
        self.opt_enum(&f, "type", &["Service"]);
        let name = self
            .opt_string(&f, "name")
            .unwrap_or_else(|| identifier.clone());
        let loc = self.loc(node.pos);
        self.current_step = Some(loc.clone());
        self.step_expr_fields.clear();
        let spec = match f.get("spec") {
            None => {
                self.missing(&f, "spec");
                None
            }
            Some(s) => self.map(s, &format!("`spec` of {}", f.what)),
        };
        let spec = spec.map(|s| Fields {
            what: f.what.clone(),
            ..s
        });
        let kind = spec.map(|sf| {
            self.check_fields(
                &sf,
                &[
                    "connectorRef",
                    "image",
                    "envVariables",
                    "entrypoint",
                    "args",
                    "privileged",
                    "resources",
                    "imagePullPolicy",
                    "runAsUser",
                    "portBindings",
                ],
                &[],
                &[],
            );
            let container = self.container_fields(&sf);
            if container.image.is_none() {
                self.missing(&sf, "image");
            }
            let mut entrypoint = self.entrypoint(&sf);
            let args = self.string_list(&sf, "args");
            if !args.is_empty() {
                match &mut entrypoint {
                    Some(e) => e.extend(args),
                    None => {
                        let pos = sf.key_pos("args").unwrap_or(sf.pos);
                        self.error(pos, ErrorKind::Unsupported, format!("`args` without `entrypoint` in {}: write the image's entrypoint in `entrypoint` too", sf.what));
                    }
                }
            }
            let port_bindings = self.port_bindings(&sf);
            StepKind::Background(BackgroundSpec {
                container,
                shell: None,
                command: None,
                entrypoint,
                port_bindings,
            })
        });
        self.current_step = None;
        Some(Step {
            identifier,
            name,
            description: None,
            timeout: None,
            when: None,
            failure_strategies: Vec::new(),
            kind: kind?,
            template: None,
            expr_fields: std::mem::take(&mut self.step_expr_fields),
            loc,
        })
    }
}

/// Drone's plugin convention: scalars as written, lists of scalars comma-joined,
/// anything else as JSON.
fn setting_value(v: &Node) -> String {
    match &v.value {
        Value::Null => String::new(),
        Value::Scalar { text, .. } => text.clone(),
        Value::Seq(items)
            if items
                .iter()
                .all(|i| matches!(i.value, Value::Scalar { .. })) =>
        {
            items
                .iter()
                .filter_map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(",")
        }
        _ => to_json(v).to_string(),
    }
}

pub(crate) fn to_json(v: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.value {
        Value::Null => J::Null,
        Value::Scalar { text, plain } => {
            if *plain {
                match text.as_str() {
                    "true" | "True" | "TRUE" => return J::Bool(true),
                    "false" | "False" | "FALSE" => return J::Bool(false),
                    _ => {}
                }
                if let Ok(i) = text.parse::<i64>() {
                    return J::from(i);
                }
                if let Ok(f) = text.parse::<f64>() {
                    if let Some(n) = serde_json::Number::from_f64(f) {
                        return J::Number(n);
                    }
                }
            }
            J::String(text.clone())
        }
        Value::Seq(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

/// Split a command line into words: whitespace separates, single and double quotes group.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in `{s}`"));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `^[a-zA-Z_][0-9a-zA-Z_]{0,127}$`, Harness's identifier rule.
pub fn valid_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    id.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A name usable as an environment variable (POSIX portable: letters, digits, `_`).
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks an image reference as the store will parse it; a path (`./images/x.yaml`,
/// an image recipe) is not a reference and is left to whoever builds it.
pub fn check_image_reference(image: &str) -> Result<(), crate::store::StoreError> {
    let path_like = image.starts_with("./")
        || image.starts_with("../")
        || image.starts_with('/')
        || image.ends_with(".yaml")
        || image.ends_with(".yml");
    if path_like {
        return Ok(());
    }
    crate::store::ImageRef::parse(image).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(valid_identifier("build_1"));
        assert!(valid_identifier("_x"));
        assert!(!valid_identifier("1x"));
        assert!(!valid_identifier("a-b"));
        assert!(!valid_identifier(""));
        assert!(valid_identifier(&"a".repeat(128)));
        assert!(!valid_identifier(&"a".repeat(129)));
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words("python3 -m 'http server' \"a b\"").unwrap(),
            vec!["python3", "-m", "http server", "a b"]
        );
        assert!(split_words("a 'b").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("comand", &["command", "image"]),
            Some("command")
        );
        assert_eq!(did_you_mean("zzz", &["command", "image"]), None);
    }
}
