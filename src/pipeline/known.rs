//! Values known before a pipeline runs, looked up while it is read.
//!
//! Looping strategies are expanded while the file is parsed (the plan needs every
//! instance to allocate the network), so a strategy whose count or list is an
//! expression (`repeat: {items: <+pipeline.variables.targets.split(",")>}`,
//! `parallelism: <+input>`) needs its value then. What can be known by then is what
//! Harness would know before the stage starts and that sandrun has before anything
//! runs: pipeline variables and the variables of the stage being read (their fixed
//! values, or the answers to their `<+input>`), answers given with `--set` / `--values`
//! (also to what only Harness's server knows, by the expression's path), and the
//! pipeline's name and identifier. A step's output, or a later stage's, is only known
//! while the run goes on: those are refused with that reason.

use std::collections::BTreeMap;

use super::expr::{self, Expr, StageAttr, TemplatePart};
use super::model::Variable;

/// How deeply variables may refer to variables before it is taken for a loop.
const MAX_DEPTH: usize = 8;

/// Answers to a pipeline's inputs given before it is read (`--set`, `--values`).
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// Keyed as [`crate::plan::PlanInputs::inputs`]: a variable's name (or
    /// `pipeline.variables.NAME`), `ID.strategy.FIELD` for a strategy's `<+input>`,
    /// an expression's path for what only Harness's server knows.
    pub values: BTreeMap<String, String>,
}

/// Why a strategy's value is not there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Missing {
    /// An input nobody answered (yet): one instance stands in, and the plan asks for
    /// it with the other unanswered inputs (`validate` needs no answers).
    Unanswered(String),
    /// Not known before the run, or not at all.
    NotKnown(String),
}

/// What the parser knows at the place a strategy is read.
pub(crate) struct Known<'a> {
    pub answers: &'a Answers,
    pub pipeline_identifier: Option<&'a str>,
    pub pipeline_name: Option<&'a str>,
    pub pipeline_vars: &'a [Variable],
    /// The stage being read and its variables; `None` for a stage's own strategy,
    /// which is expanded before its variables are.
    pub stage: Option<(&'a str, &'a [Variable])>,
    /// The stages read before it, with their variables (`<+pipeline.stages.S.variables.X>`).
    pub earlier: &'a [(String, Vec<Variable>)],
}

impl Known<'_> {
    /// `text` with its expressions written in, or why it cannot be. `key` is the
    /// `--set` key of a bare `<+input>` in `text`.
    pub fn resolve(&self, text: &str, key: &str) -> Result<String, Missing> {
        self.text(text, key, 0)
    }

    fn text(&self, text: &str, key: &str, depth: usize) -> Result<String, Missing> {
        if depth > MAX_DEPTH {
            return Err(not_known("its variables refer to each other in a loop"));
        }
        let parts = expr::parse_template(text.trim()).map_err(|errors| {
            let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
            not_known(messages.join("; "))
        })?;
        let mut out = String::new();
        for part in parts {
            match part {
                TemplatePart::Literal(l) => out.push_str(&l),
                TemplatePart::Expr(e) => out.push_str(&self.expr(&e, key, depth)?),
            }
        }
        Ok(out)
    }

    fn expr(&self, e: &Expr, key: &str, depth: usize) -> Result<String, Missing> {
        let too_late = |what: String| {
            Err(not_known(format!(
                "{what} is only known while the run goes on, and sandrun expands looping strategies before the stage starts (its instances decide the stage's network)"
            )))
        };
        match e {
            Expr::Input { default, allowed } => {
                self.input(key, key, default.as_deref(), allowed.as_deref())
            }
            Expr::PipelineVariable(name) => {
                match self.pipeline_vars.iter().find(|v| &v.name == name) {
                    Some(v) => self.variable(v, &format!("pipeline.variables.{name}"), depth),
                    None => Err(not_known(format!("the pipeline has no variable `{name}`"))),
                }
            }
            Expr::StageVariable(name) => self.stage_variable(None, name, depth),
            Expr::OtherStage {
                stage,
                attr: StageAttr::Variable(name),
            } => self.stage_variable(Some(stage), name, depth),
            Expr::NodeVariable { node, variable } => {
                let known_stage = self.stage.is_some_and(|(id, _)| id == node)
                    || self.earlier.iter().any(|(id, _)| id == node);
                if known_stage {
                    self.stage_variable(Some(node), variable, depth)
                } else {
                    self.answered(&format!("{node}.variables.{variable}"))
                }
            }
            Expr::Server(path) => self.answered(path),
            Expr::PipelineIdentifier => self
                .pipeline_identifier
                .map(str::to_string)
                .ok_or_else(|| not_known("this file has no pipeline")),
            Expr::PipelineName => self
                .pipeline_name
                .map(str::to_string)
                .ok_or_else(|| not_known("this file has no pipeline")),
            Expr::StepOutput { step, .. } => too_late(format!("the output of step `{step}`")),
            Expr::OtherStage { stage, .. } => too_late(format!("what stage `{stage}` ends with")),
            Expr::Secret(id) => Err(not_known(format!(
                "secret `{id}` is not read before the run; give the value with --set"
            ))),
            _ => Err(not_known(
                "sandrun resolves only variables and inputs in a looping strategy",
            )),
        }
    }

    /// A variable of the stage being read, or of the earlier stage `of` names.
    fn stage_variable(
        &self,
        of: Option<&String>,
        name: &str,
        depth: usize,
    ) -> Result<String, Missing> {
        if let Some(other) = of.filter(|o| self.stage.is_none_or(|(s, _)| s != o.as_str())) {
            let Some((_, vars)) = self.earlier.iter().find(|(s, _)| s == other) else {
                return Err(not_known(format!(
                    "stage `{other}` is not read before this strategy (its variables are known only for earlier stages)"
                )));
            };
            // Its values read `<+stage.variables.X>` as that stage's own.
            let there = Known {
                stage: Some((other.as_str(), vars.as_slice())),
                ..*self
            };
            return there.stage_variable(None, name, depth);
        }
        let Some((stage, vars)) = self.stage else {
            return Err(not_known(format!(
                "a stage's variables are read after its strategy is expanded; give `{name}` as a pipeline variable"
            )));
        };
        match vars.iter().find(|v| v.name == name) {
            Some(v) => self.variable(v, &format!("stage.variables.{name}"), depth),
            None => Err(not_known(format!(
                "stage `{stage}` has no variable `{name}`"
            ))),
        }
    }

    /// A variable's value: its answer when it is an `<+input>`, else its value with
    /// the expressions in it written in.
    fn variable(&self, v: &Variable, long: &str, depth: usize) -> Result<String, Missing> {
        match expr::parse_template(v.value.trim()).as_deref() {
            Ok([TemplatePart::Expr(Expr::Input { default, allowed })]) => {
                let default = default.as_deref().or(v.default.as_deref());
                self.input(long, &v.name, default, allowed.as_deref())
            }
            _ => self.text(&v.value, long, depth + 1),
        }
    }

    /// The answer to an input (`long`, else `short`), else its default.
    fn input(
        &self,
        long: &str,
        short: &str,
        default: Option<&str>,
        allowed: Option<&[String]>,
    ) -> Result<String, Missing> {
        let values = &self.answers.values;
        match values.get(long).or_else(|| values.get(short)) {
            Some(a) => match allowed {
                Some(allowed) if !allowed.contains(a) => Err(not_known(format!(
                    "`{a}` is not an allowed value of `{short}` (allowed: {})",
                    allowed.join(", ")
                ))),
                _ => Ok(a.clone()),
            },
            None => match default {
                Some(d) => Ok(d.to_string()),
                None => Err(Missing::Unanswered(format!(
                    "it is a runtime input: answer it with --set {short}=VALUE"
                ))),
            },
        }
    }

    /// What only Harness's server knows, answered by its path.
    fn answered(&self, path: &str) -> Result<String, Missing> {
        match self.answers.values.get(path) {
            Some(a) => Ok(a.clone()),
            None => Err(Missing::Unanswered(format!(
                "only Harness's server knows it: answer it with --set {path}=VALUE"
            ))),
        }
    }
}

fn not_known(why: impl Into<String>) -> Missing {
    Missing::NotKnown(why.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::model::{Location, VariableType};

    fn var(name: &str, value: &str) -> Variable {
        Variable {
            name: name.into(),
            var_type: VariableType::String,
            value: value.into(),
            default: None,
            required: false,
            loc: Location::default(),
        }
    }

    fn known<'a>(
        answers: &'a Answers,
        pipeline: &'a [Variable],
        stage: Option<(&'a str, &'a [Variable])>,
    ) -> Known<'a> {
        Known {
            answers,
            pipeline_identifier: Some("p"),
            pipeline_name: Some("P"),
            pipeline_vars: pipeline,
            stage,
            earlier: &[],
        }
    }

    #[test]
    fn variables_inputs_and_server_values_resolve() {
        let mut answers = Answers::default();
        answers.values.insert("n".into(), "3".into());
        answers
            .values
            .insert("trigger.branch".into(), "main".into());
        answers
            .values
            .insert("t.strategy.repeat.times".into(), "4".into());
        let pipeline = [
            var("n", "<+input>"),
            var("list", "a,<+pipeline.variables.n>"),
            var("d", "<+input>.default(7)"),
        ];
        let stage_vars = [var("os", "linux")];
        let k = known(&answers, &pipeline, Some(("s", &stage_vars)));
        let get = |t: &str| k.resolve(t, "t.strategy.repeat.times");
        assert_eq!(get("<+pipeline.variables.n>"), Ok("3".into()));
        assert_eq!(get("<+pipeline.variables.list>"), Ok("a,3".into()));
        assert_eq!(get("<+pipeline.variables.d>"), Ok("7".into()));
        assert_eq!(get("<+stage.variables.os>"), Ok("linux".into()));
        assert_eq!(get("<+s.variables.os>"), Ok("linux".into()));
        assert_eq!(get("<+trigger.branch>"), Ok("main".into()));
        assert_eq!(get("<+input>"), Ok("4".into()));
        assert_eq!(
            get("<+input>.allowedValues(1,2)").unwrap_err(),
            not_known("`4` is not an allowed value of `t.strategy.repeat.times` (allowed: 1, 2)")
        );
    }

    #[test]
    fn what_is_not_known_in_time_says_why() {
        let answers = Answers::default();
        let pipeline = [var("n", "<+input>")];
        let k = known(&answers, &pipeline, None);
        let why = |t: &str| match k.resolve(t, "x.strategy.parallelism").unwrap_err() {
            Missing::NotKnown(why) => why,
            Missing::Unanswered(why) => format!("unanswered: {why}"),
        };
        assert!(
            why("<+steps.a.output.outputVariables.N>").contains("only known while the run goes on")
        );
        assert_eq!(
            why("<+pipeline.variables.n>"),
            "unanswered: it is a runtime input: answer it with --set n=VALUE"
        );
        assert!(why("<+input>").contains("--set x.strategy.parallelism=VALUE"));
        assert!(why("<+trigger.branch>").starts_with("unanswered: only Harness's server"));
        assert!(why("<+stage.variables.os>").contains("give `os` as a pipeline variable"));
        assert!(why("<+pipeline.variables.none>").contains("no variable `none`"));
        assert!(why("<+pipeline.stages.later.variables.x>").contains("not read before"));
        let earlier = [("first".to_string(), vec![var("x", "4")])];
        let k = Known {
            earlier: &earlier,
            ..known(&answers, &pipeline, None)
        };
        assert_eq!(
            k.resolve("<+pipeline.stages.first.variables.x>", "k"),
            Ok("4".into())
        );
        assert_eq!(k.resolve("<+first.variables.x>", "k"), Ok("4".into()));
    }
}
