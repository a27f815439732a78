//! Harness templates (`template: {templateRef, versionLabel, templateInputs}`), inlined
//! from the template files of the workspace before the pipeline is parsed.
//!
//! On Harness a whole pipeline, a stage, step group or step may be a reference to a
//! template kept on its server. Teams that keep their pipelines in git (Harness's "Git
//! Experience") keep the templates beside them, as files holding `template: {name,
//! identifier, versionLabel, type: Pipeline | Stage | StepGroup | Step, spec}`. sandrun reads those files (under the
//! workspace's `.harness/`, beside the pipeline file, and in `--templates DIR`), finds
//! the one a reference names (`account.` and `org.` prefixes name a scope on Harness's
//! server; here every file is one scope, so only the identifier counts), fills its
//! `<+input>` fields from `templateInputs`, and puts the result in place of the
//! reference. The reference's own fields (`identifier`, `name`, and the overrides Harness
//! allows: `when`, `strategy`, `failureStrategies`...) win over the template's.
//!
//! The inlined nodes keep the positions of the template file (each file is a source
//! of its own, see [`super::yaml::Pos::src`]), so a mistake inside a template is
//! reported at the template's line, and a missing template or version at the line of
//! the reference.
//!
//! When `versionLabel` is left out, Harness uses the version marked stable on its
//! server; template files do not record which one that is. sandrun uses the only version
//! it finds, and with several it asks for a `versionLabel` rather than guess.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::ErrorKind;
use super::model::{Location, TemplateOrigin};
use super::parse::did_you_mean;
use super::strategy::Problem;
use super::yaml::{self, Node, Pos, Value};

/// Template files larger than this are not read (a template is a few kilobytes).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// How deep directories are searched, and how many files at most.
const MAX_DEPTH: usize = 8;
const MAX_FILES: usize = 10_000;
/// Templates that use templates: deeper than this is a loop or a mistake.
const MAX_NESTING: usize = 16;

/// Where template files are looked for.
#[derive(Clone, Debug, Default)]
pub struct TemplateSearch {
    dirs: Vec<(PathBuf, bool)>,
}

impl TemplateSearch {
    /// No template files at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Harness's places: the directory of the pipeline file, the workspace's
    /// `.harness/` (and below), then each of `extra` (and below).
    pub fn for_pipeline(pipeline: &Path, workspace: &Path, extra: &[PathBuf]) -> Self {
        let beside = match pipeline.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut search = Self::default();
        search.dirs.push((beside, false));
        search.dirs.push((workspace.join(".harness"), true));
        for d in extra {
            search.dirs.push((d.clone(), true));
        }
        search
    }

    fn describe(&self) -> String {
        if self.dirs.is_empty() {
            return "no template directories were given".into();
        }
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|(d, recursive)| {
                let d = d.display();
                if *recursive {
                    format!("{d}/ (and below)")
                } else {
                    format!("{d}/")
                }
            })
            .collect();
        format!("searched {}", dirs.join(", "))
    }
}

/// One template file's definition.
struct Template {
    identifier: String,
    version: String,
    kind: String,
    spec: Option<Node>,
    /// Position of its `template:` key (its source says which file).
    pos: Pos,
    /// Position of template-level `variables`, which sandrun does not support.
    variables: Option<Pos>,
}

/// Every template definition found.
pub(crate) struct Library {
    templates: Vec<Template>,
    /// Files that looked like templates but could not be read, with why.
    unreadable: Vec<String>,
    searched: String,
}

impl Library {
    /// Read every template file `search` finds. Each file read becomes a source:
    /// its path is pushed to `sources` and its nodes carry that index.
    pub(crate) fn load(search: &TemplateSearch, sources: &mut Vec<PathBuf>) -> Library {
        let mut files = Vec::new();
        for (dir, recursive) in &search.dirs {
            collect_yaml(dir, *recursive, 0, &mut files);
        }
        let mut seen = Vec::new();
        let mut lib = Library {
            templates: Vec::new(),
            unreadable: Vec::new(),
            searched: search.describe(),
        };
        for path in files {
            let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
            if seen.contains(&canonical) || sources.iter().any(|s| same_file(s, &canonical)) {
                continue;
            }
            seen.push(canonical);
            let text = match crate::input::read_text(
                &path,
                "template file",
                crate::input::MAX_PIPELINE_BYTES,
            ) {
                Ok(text) => text,
                // A YAML file that cannot be read may be a template: say so if one is
                // then missing, rather than leave it out without a word.
                Err(e @ crate::input::InputError::TooLarge { .. }) => {
                    lib.unreadable
                        .push(format!("{}: {}", path.display(), e.reason()));
                    continue;
                }
                Err(_) => continue,
            };
            if !text.contains("template:") {
                continue;
            }
            let mut root = match yaml::parse(&text) {
                Ok(root) => root,
                Err(e) => {
                    if text.lines().any(|l| l.starts_with("template:")) {
                        lib.unreadable.push(format!(
                            "{}:{}:{}: {}",
                            path.display(),
                            e.pos.line,
                            e.pos.col,
                            e.message
                        ));
                    }
                    continue;
                }
            };
            let src = sources.len() as u32;
            root.set_source(src);
            let Some(entries) = root.entries() else {
                continue;
            };
            let Some((key, body)) = entries.iter().find(|(k, _)| k.as_str() == Some("template"))
            else {
                continue;
            };
            let text_of = |k: &str| body.get(k).and_then(Node::as_str).map(str::to_string);
            let Some(identifier) = text_of("identifier") else {
                continue;
            };
            sources.push(path.clone());
            lib.templates.push(Template {
                identifier,
                version: text_of("versionLabel").unwrap_or_default(),
                kind: text_of("type").unwrap_or_default(),
                spec: body.get("spec").cloned(),
                pos: key.pos,
                variables: body
                    .entries()
                    .and_then(|e| e.iter().find(|(k, _)| k.as_str() == Some("variables")))
                    .filter(|(_, v)| matches!(&v.value, Value::Seq(items) if !items.is_empty()))
                    .map(|(k, _)| k.pos),
            });
        }
        lib
    }
}

fn same_file(a: &Path, canonical: &Path) -> bool {
    a.canonicalize().is_ok_and(|a| a == canonical)
}

fn collect_yaml(dir: &Path, recursive: bool, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = read.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= MAX_FILES {
            return;
        }
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            if recursive && depth < MAX_DEPTH {
                collect_yaml(&path, true, depth + 1, out);
            }
        } else if kind.is_file()
            && matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml")
            )
            && e.metadata().is_ok_and(|m| m.len() <= MAX_FILE_BYTES)
        {
            out.push(path);
        }
    }
}

/// What inlining found: where each inlined item came from (by the position of its
/// mapping in the file that uses it), and what went wrong.
pub(crate) struct Inlined {
    pub origins: HashMap<Pos, TemplateOrigin>,
    pub problems: Vec<Problem>,
}

/// Whether the file at `path` is a Harness template file rather than a pipeline (so
/// that `.harness/` may hold templates beside the one pipeline).
pub fn is_template_file(path: &Path) -> bool {
    crate::input::read_text(path, "file", crate::input::MAX_PIPELINE_BYTES).is_ok_and(|text| {
        text.lines().any(|l| l.starts_with("template:"))
            && !text
                .lines()
                .any(|l| l.starts_with("pipeline:") || l.starts_with("stage:"))
    })
}

/// Whether `text` uses templates at all (then the template files are read, and a
/// `template:` without `templateRef` is reported as such).
pub(crate) fn uses_templates(text: &str) -> bool {
    text.contains("templateRef") || text.contains("template:")
}

/// Replace every template reference under `root` by the template it names.
pub(crate) fn inline(root: &mut Node, lib: &Library, sources: &[PathBuf]) -> Inlined {
    let mut inliner = Inliner {
        lib,
        sources,
        out: Inlined {
            origins: HashMap::new(),
            problems: Vec::new(),
        },
    };
    inliner.walk(root, &mut Vec::new());
    inliner.out
}

struct Inliner<'a> {
    lib: &'a Library,
    sources: &'a [PathBuf],
    out: Inlined,
}

impl Inliner<'_> {
    fn problem(&mut self, pos: Pos, kind: ErrorKind, message: String) {
        self.out.problems.push(Problem { pos, kind, message });
    }

    fn loc(&self, pos: Pos) -> Location {
        Location {
            file: self
                .sources
                .get(pos.src as usize)
                .cloned()
                .unwrap_or_default(),
            line: pos.line,
            column: pos.col,
        }
    }

    /// `chain`: the templates being inlined around this node, against loops.
    fn walk(&mut self, node: &mut Node, chain: &mut Vec<String>) {
        match &mut node.value {
            Value::Seq(items) => items.iter_mut().for_each(|i| self.walk(i, chain)),
            Value::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    let expected = match k.as_str() {
                        Some("pipeline") => "Pipeline",
                        Some("step") => "Step",
                        Some("stepGroup") => "StepGroup",
                        Some("stage") => "Stage",
                        _ => "",
                    };
                    if !expected.is_empty() && v.get("template").is_some() {
                        if let Some((merged, key)) = self.resolve(v, expected, chain) {
                            *v = merged;
                            chain.push(key);
                            self.walk(v, chain);
                            chain.pop();
                        }
                    } else {
                        self.walk(v, chain);
                    }
                }
            }
            Value::Null | Value::Scalar { .. } => {}
        }
    }

    /// The item `usage` (a mapping with `template:`) with its template inlined, and the
    /// template's `identifier@version`.
    fn resolve(
        &mut self,
        usage: &Node,
        expected: &str,
        chain: &[String],
    ) -> Option<(Node, String)> {
        let link = usage.get("template")?;
        let Some(fields) = link.entries() else {
            self.problem(
                link.pos,
                ErrorKind::InvalidValue,
                format!(
                    "`template` must be a mapping with `templateRef`, not {}",
                    link.kind_name()
                ),
            );
            return None;
        };
        for (k, _) in fields {
            let key = k.as_str().unwrap_or_default();
            match key {
                "templateRef" | "versionLabel" | "templateInputs" | "gitBranch" => {}
                "templateVariables" | "templateOverrides" => self.problem(
                    k.pos,
                    ErrorKind::Unsupported,
                    format!("`template.{key}` is not supported by sandrun; give values through `templateInputs`"),
                ),
                other => {
                    let hint = did_you_mean(other, &["templateRef", "versionLabel", "templateInputs"])
                        .map(|c| format!("; did you mean `{c}`?"))
                        .unwrap_or_default();
                    self.problem(
                        k.pos,
                        ErrorKind::UnknownField,
                        format!("unknown field `{other}` in `template`{hint}"),
                    );
                }
            }
        }
        let Some(reference) = link.get("templateRef") else {
            self.problem(
                link.pos,
                ErrorKind::MissingField,
                "missing field `templateRef` in `template`".into(),
            );
            return None;
        };
        let ref_pos = reference.pos;
        let Some(ref_text) = reference.as_str().map(str::to_string) else {
            self.problem(
                ref_pos,
                ErrorKind::InvalidValue,
                "`templateRef` must be a string".into(),
            );
            return None;
        };
        let id = ref_text
            .strip_prefix("account.")
            .or_else(|| ref_text.strip_prefix("org."))
            .unwrap_or(&ref_text)
            .to_string();
        let version = link
            .get("versionLabel")
            .and_then(|v| v.as_str().map(|s| (s.to_string(), v.pos)));
        let candidates: Vec<&Template> = self
            .lib
            .templates
            .iter()
            .filter(|t| t.identifier == id)
            .collect();
        if candidates.is_empty() {
            let known: Vec<&str> = self
                .lib
                .templates
                .iter()
                .map(|t| t.identifier.as_str())
                .collect();
            let hint = did_you_mean(&id, &known)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            let mut message = format!(
                "template `{ref_text}` not found: no template file defines identifier `{id}` ({}){hint}",
                self.lib.searched
            );
            for u in &self.lib.unreadable {
                message.push_str(&format!("; unreadable template file {u}"));
            }
            self.problem(ref_pos, ErrorKind::InvalidValue, message);
            return None;
        }
        let found = |t: &Template| format!("`{}` at {}", t.version, self.loc(t.pos));
        let chosen: Vec<&Template> = match &version {
            Some((v, _)) => candidates
                .iter()
                .copied()
                .filter(|t| t.version == *v)
                .collect(),
            None => candidates.clone(),
        };
        let template = match (chosen.as_slice(), &version) {
            ([one], _) => *one,
            ([], Some((v, pos))) => {
                let list: Vec<String> = candidates.iter().map(|t| found(t)).collect();
                self.problem(
                    *pos,
                    ErrorKind::InvalidValue,
                    format!(
                        "template `{ref_text}` has no version `{v}` (versions found: {})",
                        list.join(", ")
                    ),
                );
                return None;
            }
            (several, Some((v, pos))) => {
                let list: Vec<String> = several
                    .iter()
                    .map(|t| self.loc(t.pos).to_string())
                    .collect();
                self.problem(
                    *pos,
                    ErrorKind::Duplicate,
                    format!(
                        "template `{ref_text}` version `{v}` is defined more than once: {}",
                        list.join(", ")
                    ),
                );
                return None;
            }
            (several, None) => {
                let list: Vec<String> = several.iter().map(|t| found(t)).collect();
                self.problem(
                    ref_pos,
                    ErrorKind::MissingField,
                    format!(
                        "template `{ref_text}` has several versions ({}) and this reference gives no `versionLabel`: Harness would use the version marked stable on its server, which template files do not record; write the `versionLabel` to use",
                        list.join(", ")
                    ),
                );
                return None;
            }
        };
        let key = format!("{}@{}", template.identifier, template.version);
        if chain.contains(&key) || chain.len() >= MAX_NESTING {
            self.problem(
                ref_pos,
                ErrorKind::InvalidValue,
                format!(
                    "template `{ref_text}` uses itself (through {})",
                    chain.join(" -> ")
                ),
            );
            return None;
        }
        if template.kind != expected {
            self.problem(
                ref_pos,
                ErrorKind::InvalidValue,
                format!(
                    "template `{ref_text}` is a {} template ({}), but it is used as a {expected}",
                    if template.kind.is_empty() {
                        "typeless"
                    } else {
                        &template.kind
                    },
                    self.loc(template.pos)
                ),
            );
            return None;
        }
        if let Some(pos) = template.variables {
            self.problem(
                pos,
                ErrorKind::Unsupported,
                format!(
                    "template `{}` has template variables (`<+template.variables.X>`), which sandrun does not support; move them into the template's `spec` as `<+input>` fields",
                    template.identifier
                ),
            );
        }
        let Some(mut body) = template.spec.clone().filter(|s| s.entries().is_some()) else {
            self.problem(
                template.pos,
                ErrorKind::InvalidValue,
                format!("template `{}` has no `spec` mapping", template.identifier),
            );
            return None;
        };
        if let Some(inputs) = link.get("templateInputs").filter(|i| !i.is_null()) {
            self.fill(&mut body, inputs, "templateInputs", &ref_text);
        }
        let Value::Map(body_entries) = body.value else {
            return None;
        };
        let usage_entries = usage.entries().unwrap_or_default();
        let mut merged: Vec<(Node, Node)> = Vec::new();
        for (k, v) in usage_entries {
            match k.as_str().unwrap_or_default() {
                "template" => {}
                key @ "stages" if expected == "Pipeline" => self.problem(
                    k.pos,
                    ErrorKind::InvalidValue,
                    format!("`{key}` beside `template`: the pipeline takes its stages from template `{ref_text}`; give values through `templateInputs`"),
                ),
                key @ ("type" | "spec") => self.problem(
                    k.pos,
                    ErrorKind::InvalidValue,
                    format!("`{key}` beside `template`: the {expected} takes its `{key}` from template `{ref_text}`; give values through `templateInputs`"),
                ),
                _ => merged.push((k.clone(), v.clone())),
            }
        }
        for (k, v) in body_entries {
            let key_text = k.as_str().unwrap_or_default();
            // `stageType` says which stages a step group template fits: not a field of
            // the group itself.
            if expected == "StepGroup" && key_text == "stageType" {
                continue;
            }
            if !merged.iter().any(|(m, _)| m.as_str() == Some(key_text)) {
                merged.push((k, v));
            }
        }
        self.out.origins.insert(
            usage.pos,
            TemplateOrigin {
                reference: ref_text,
                version: template.version.clone(),
                loc: self.loc(template.pos),
            },
        );
        Some((
            Node {
                pos: usage.pos,
                value: Value::Map(merged),
            },
            key,
        ))
    }

    /// Put the values of `inputs` into the `<+input>` fields of `target`, which must
    /// mirror its shape; `path` names the place for messages.
    fn fill(&mut self, target: &mut Node, inputs: &Node, path: &str, reference: &str) {
        if let Value::Scalar { text, .. } = &target.value {
            if text.trim_start().starts_with("<+input>") {
                *target = inputs.clone();
                return;
            }
        }
        match (&mut target.value, &inputs.value) {
            (Value::Map(t), Value::Map(i)) => {
                for (k, iv) in i {
                    let key = k.as_str().unwrap_or_default();
                    match t.iter_mut().find(|(tk, _)| tk.as_str() == Some(key)) {
                        Some((_, tv)) => self.fill(tv, iv, &format!("{path}.{key}"), reference),
                        None => self.problem(
                            k.pos,
                            ErrorKind::UnknownField,
                            format!("`{path}.{key}` is not a field of template `{reference}`"),
                        ),
                    }
                }
            }
            (Value::Seq(t), Value::Seq(i)) => {
                for (n, iv) in i.iter().enumerate() {
                    let slot = match item_key(iv) {
                        Some(key) => t.iter().position(|tv| item_key(tv).as_ref() == Some(&key)),
                        None => (n < t.len()).then_some(n),
                    };
                    match slot {
                        Some(s) => self.fill(&mut t[s], iv, &format!("{path}[{n}]"), reference),
                        None => self.problem(
                            iv.pos,
                            ErrorKind::InvalidValue,
                            format!("item {n} of `{path}` matches no item of template `{reference}`"),
                        ),
                    }
                }
            }
            (Value::Scalar { text: a, .. }, Value::Scalar { text: b, .. }) if a == b => {}
            (Value::Null, Value::Null) => {}
            _ => self.problem(
                inputs.pos,
                ErrorKind::InvalidValue,
                format!("`{path}` is fixed by template `{reference}`: only its `<+input>` fields take inputs"),
            ),
        }
    }
}

/// What identifies an item of a list in `templateInputs`: its `identifier` (also inside
/// a `step:`/`stepGroup:`/`stage:` wrapper), else its `name`.
fn item_key(item: &Node) -> Option<String> {
    let own = |n: &Node, k: &str| n.get(k).and_then(Node::as_str).map(str::to_string);
    if let Some(id) = own(item, "identifier") {
        return Some(id);
    }
    if let Some(name) = own(item, "name") {
        return Some(name);
    }
    match item.entries() {
        Some([(_, inner)]) => own(inner, "identifier"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(files: &[(&str, &str)]) -> (tempfile::TempDir, Library, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut sources = vec![PathBuf::from("p.yaml")];
        let search = TemplateSearch {
            dirs: vec![(dir.path().to_path_buf(), true)],
        };
        let lib = Library::load(&search, &mut sources);
        (dir, lib, sources)
    }

    const STEP_V1: &str = "template:\n  name: t\n  identifier: run_tests\n  versionLabel: v1\n  type: Step\n  spec:\n    type: Run\n    timeout: 5m\n    spec:\n      shell: Sh\n      command: <+input>\n      envVariables:\n        A: fixed\n        B: <+input>.default(b)\n";
    const STEP_V2: &str = "template:\n  name: t\n  identifier: run_tests\n  versionLabel: v2\n  type: Step\n  spec:\n    type: Run\n    spec:\n      command: echo two\n";

    fn inline_text(lib: &Library, sources: &[PathBuf], text: &str) -> (Node, Inlined) {
        let mut root = yaml::parse(text).unwrap();
        let out = inline(&mut root, lib, sources);
        (root, out)
    }

    #[test]
    fn step_template_inputs_fill_input_fields_and_usage_wins() {
        let (_d, lib, sources) = library(&[("a.yaml", STEP_V1), ("b.yml", STEP_V2)]);
        let (root, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  name: T1\n  timeout: 1m\n  template:\n    templateRef: account.run_tests\n    versionLabel: v1\n    templateInputs:\n      type: Run\n      spec:\n        command: make test\n",
        );
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let step = root.get("step").unwrap();
        assert!(step.get("template").is_none());
        assert_eq!(step.get("identifier").unwrap().as_str(), Some("t1"));
        assert_eq!(step.get("timeout").unwrap().as_str(), Some("1m"));
        assert_eq!(step.get("type").unwrap().as_str(), Some("Run"));
        let spec = step.get("spec").unwrap();
        let command = spec.get("command").unwrap();
        assert_eq!(command.as_str(), Some("make test"));
        assert_eq!(command.pos.src, 0, "the value comes from the pipeline");
        let b = spec.get("envVariables").unwrap().get("B").unwrap();
        assert_eq!(
            b.as_str(),
            Some("<+input>.default(b)"),
            "unanswered inputs stay inputs"
        );
        assert_ne!(spec.pos.src, 0, "the rest comes from the template file");
        let origin = out.origins.get(&step.pos).unwrap();
        assert_eq!(origin.version, "v1");
        assert!(origin.loc.file.ends_with("a.yaml"), "{origin}");
        assert_eq!(origin.loc.line, 1);
    }

    #[test]
    fn missing_templates_and_versions_point_at_the_reference() {
        let (_d, lib, sources) = library(&[("a.yaml", STEP_V1), ("b.yaml", STEP_V2)]);
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: run_test\n",
        );
        assert_eq!(out.problems[0].pos.line, 4);
        assert!(
            out.problems[0].message.contains("did you mean `run_tests`"),
            "{:?}",
            out.problems
        );
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: org.run_tests\n    versionLabel: v3\n",
        );
        assert_eq!(out.problems[0].pos.line, 5);
        assert!(
            out.problems[0].message.contains("no version `v3`"),
            "{:?}",
            out.problems
        );
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: run_tests\n",
        );
        assert!(
            out.problems[0].message.contains("several versions"),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn the_only_version_is_used_without_a_label() {
        let (_d, lib, sources) = library(&[("b.yaml", STEP_V2)]);
        let (root, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: run_tests\n",
        );
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let step = root.get("step").unwrap();
        assert_eq!(out.origins.get(&step.pos).unwrap().version, "v2");
    }

    #[test]
    fn inputs_may_fill_only_input_fields_and_lists_match_by_identifier() {
        let (_d, lib, sources) = library(&[("a.yaml", STEP_V1)]);
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: run_tests\n    templateInputs:\n      spec:\n        envVariables:\n          A: mine\n        nope: 1\n",
        );
        let messages: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(messages[0].contains("fixed by template"), "{messages:?}");
        assert!(messages[1].contains("not a field"), "{messages:?}");
        let mut target =
            yaml::parse("- step: {identifier: a, c: x}\n- step: {identifier: b, c: <+input>}\n")
                .unwrap();
        let inputs = yaml::parse("- step: {identifier: b, c: filled}\n").unwrap();
        let mut inliner = Inliner {
            lib: &lib,
            sources: &sources,
            out: Inlined {
                origins: HashMap::new(),
                problems: Vec::new(),
            },
        };
        inliner.fill(&mut target, &inputs, "templateInputs", "x");
        assert!(
            inliner.out.problems.is_empty(),
            "{:?}",
            inliner.out.problems
        );
        let Value::Seq(items) = &target.value else {
            panic!()
        };
        assert_eq!(
            items[1].get("step").unwrap().get("c").unwrap().as_str(),
            Some("filled")
        );
    }

    #[test]
    fn a_reference_does_not_bring_its_own_spec() {
        let (_d, lib, sources) = library(&[("a.yaml", STEP_V1)]);
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  spec:\n    command: x\n  template:\n    templateRef: run_tests\n",
        );
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert_eq!(out.problems[0].pos.line, 3);
        assert!(out.problems[0].message.contains("`spec` beside `template`"));
    }

    #[test]
    fn template_variables_are_refused_where_the_template_has_them() {
        let with_vars = STEP_V2.replace(
            "  type: Step\n",
            "  type: Step\n  variables:\n    - name: x\n      type: String\n      value: a\n",
        );
        let (_d, lib, sources) = library(&[("a.yaml", &with_vars)]);
        let (_, out) = inline_text(
            &lib,
            &sources,
            "step:\n  identifier: t1\n  template:\n    templateRef: run_tests\n",
        );
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert_eq!((out.problems[0].pos.line, out.problems[0].pos.src), (6, 1));
    }

    #[test]
    fn a_template_of_the_wrong_type_is_refused() {
        let (_d, lib, sources) = library(&[("a.yaml", STEP_V1)]);
        let (_, out) = inline_text(
            &lib,
            &sources,
            "stage:\n  identifier: s\n  template:\n    templateRef: run_tests\n",
        );
        assert!(
            out.problems[0].message.contains("used as a Stage"),
            "{:?}",
            out.problems
        );
    }
}
