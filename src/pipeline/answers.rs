//! Answers to a pipeline's inputs read from a values file (`--values FILE`).
//!
//! A run on Harness gets its inputs from the user, from an input set, and from what
//! only Harness's server knows (the trigger, project/org/account variables). Locally
//! all of them are answers keyed as `--set` keys them: a variable's name, `STEP.FIELD`
//! for a step's `<+input>`, or an expression's path (`trigger.branch`,
//! `variable.org.region`). A values file is a YAML map of such keys; nested maps join
//! their keys with `.`, so `trigger: {branch: main}` answers `trigger.branch`. A
//! Harness input set (`inputSet: {pipeline: {variables: [{name, value}]}}`) is read as
//! the answers to those pipeline variables.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::error::{ErrorKind, PipelineError, PipelineErrors};
use super::model::Location;
use super::yaml::{self, Node, Pos, Value};

/// Values files are short lists of answers; anything larger is a mistake.
pub const MAX_VALUES_FILE: u64 = 1 << 20;

/// Read the answers in a values file.
pub fn load_values(path: &Path) -> Result<BTreeMap<String, String>, PipelineErrors> {
    let mut text = String::new();
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_VALUES_FILE + 1).read_to_string(&mut text));
    match read {
        Err(e) => {
            return Err(PipelineErrors::about_file(
                path,
                format!("cannot read the values file: {e}"),
            ))
        }
        Ok(n) if n as u64 > MAX_VALUES_FILE => {
            return Err(PipelineErrors::about_file(
                path,
                format!("the values file is larger than {MAX_VALUES_FILE} bytes"),
            ))
        }
        Ok(_) => {}
    }
    let mut errors = PipelineErrors::default();
    let mut reader = Reader {
        path,
        errors: &mut errors,
        out: BTreeMap::new(),
    };
    match yaml::parse(&text) {
        Err(e) => reader.error(e.pos, format!("invalid YAML: {}", e.message)),
        Ok(root) => reader.root(&root),
    }
    let out = reader.out;
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

struct Reader<'a> {
    path: &'a Path,
    errors: &'a mut PipelineErrors,
    out: BTreeMap<String, String>,
}

impl Reader<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(PipelineError {
            loc: Location {
                file: self.path.to_path_buf(),
                line: pos.line,
                column: pos.col,
            },
            kind: ErrorKind::InvalidValue,
            message: message.into(),
        });
    }

    fn root(&mut self, root: &Node) {
        match &root.value {
            Value::Null => {}
            Value::Map(entries) => {
                if let [(k, v)] = entries.as_slice() {
                    if k.as_str() == Some("inputSet") {
                        return self.input_set(v);
                    }
                }
                self.map("", root);
            }
            _ => self.error(
                root.pos,
                format!(
                    "a values file is a mapping of KEY: VALUE, not {}",
                    root.kind_name()
                ),
            ),
        }
    }

    /// Flatten a mapping into dotted keys.
    fn map(&mut self, prefix: &str, node: &Node) {
        let Value::Map(entries) = &node.value else {
            return;
        };
        for (k, v) in entries {
            let key = match k.as_str() {
                Some(k) if prefix.is_empty() => k.to_string(),
                Some(k) => format!("{prefix}.{k}"),
                None => continue,
            };
            match &v.value {
                Value::Map(_) => self.map(&key, v),
                Value::Scalar { text, .. } => self.answer(key, text.clone(), k.pos),
                Value::Null => self.answer(key, String::new(), k.pos),
                Value::Seq(_) => self.error(
                    v.pos,
                    format!("the answer to `{key}` must be a string, not a list"),
                ),
            }
        }
    }

    fn answer(&mut self, key: String, value: String, pos: Pos) {
        match self.out.entry(key) {
            std::collections::btree_map::Entry::Occupied(e) => {
                let message = format!("`{}` is answered twice", e.key());
                self.error(pos, message);
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(value);
            }
        }
    }

    /// A Harness input set: the pipeline's variables are the answers.
    fn input_set(&mut self, node: &Node) {
        let variables = node.get("pipeline").and_then(|p| p.get("variables"));
        let Some(variables) = variables else {
            return self.error(
                node.pos,
                "an input set is read for `pipeline.variables` and has none",
            );
        };
        let Value::Seq(items) = &variables.value else {
            return self.error(variables.pos, "`pipeline.variables` must be a list");
        };
        for item in items {
            let name = item.get("name").and_then(Node::as_str);
            let value = item.get("value");
            match (name, value) {
                (Some(name), Some(v)) if v.as_str().is_some() || v.is_null() => {
                    let text = v.as_str().unwrap_or_default().to_string();
                    self.answer(name.to_string(), text, item.pos);
                }
                _ => self.error(
                    item.pos,
                    "each input set variable needs a `name` and a string `value`",
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<BTreeMap<String, String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values.yaml");
        std::fs::write(&path, text).unwrap();
        load_values(&path).map_err(|e| {
            e.to_string()
                .replace(&format!("{}", path.display()), "values.yaml")
        })
    }

    #[test]
    fn nested_maps_answer_dotted_keys() {
        let got = load("tag: v1\ntrigger:\n  branch: main\nvariable:\n  org:\n    region: eu\nbuild.variables.x: \"7\"\n").unwrap();
        let want: BTreeMap<String, String> = [
            ("tag", "v1"),
            ("trigger.branch", "main"),
            ("variable.org.region", "eu"),
            ("build.variables.x", "7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn input_sets_answer_pipeline_variables() {
        let got = load(
            "inputSet:\n  identifier: nightly\n  pipeline:\n    identifier: p\n    variables:\n      - name: tag\n        type: String\n        value: v2\n",
        )
        .unwrap();
        assert_eq!(got.get("tag").map(String::as_str), Some("v2"));
    }

    #[test]
    fn mistakes_name_their_line() {
        assert_eq!(
            load("a: [1, 2]\ntrigger:\n  branch: x\ntrigger.branch: y\n").unwrap_err(),
            "values.yaml:1:4: the answer to `a` must be a string, not a list\nvalues.yaml:4:1: `trigger.branch` is answered twice"
        );
        assert!(load("- a\n").unwrap_err().contains("mapping"));
        let big = format!("a: \"{}\"\n", "x".repeat(MAX_VALUES_FILE as usize));
        assert!(load(&big).unwrap_err().contains("larger than"));
    }
}
