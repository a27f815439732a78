//! Reading Harness CI v0 pipeline YAML into typed steps.
//!
//! [`load`] reads a file holding a whole `pipeline:` or a single `stage:`, exactly as
//! Harness stores it, and returns the typed [`PipelineFile`] or every error it found,
//! each with `file:line:col`. Parsing (`parse`) checks every field against Harness's v0
//! schema; validation (`validate`) checks what needs the whole stage. Expressions
//! (`<+...>`) are checked here and parsed by [`expr`]; `plan` resolves them.
//!
//! Step types only Harness's cloud can run become [`StepKind::Unsupported`] rather than
//! errors: `sandrun validate` lists them and `sandrun run` refuses (or skips) them.
//!
//! Before the typed parse, template references are replaced by the templates they name
//! ([`template`]); looping strategies are expanded into their instances while parsing
//! ([`strategy`]).

mod answers;
pub mod error;
pub mod expr;
mod known;
pub mod model;
mod parse;
mod strategy;
mod template;
mod validate;
pub mod values;
pub(crate) mod yaml;

use std::path::Path;

pub use answers::{load_values, MAX_VALUES_FILE};
pub use error::{ErrorKind, PipelineError, PipelineErrors};
pub use known::Answers;
pub use model::*;
pub use parse::{check_image_reference, valid_identifier};
pub use template::{is_template_file, TemplateSearch};

/// Read and check a pipeline file; templates are looked for beside it and under
/// `.harness/` of the current directory. No inputs are answered: a looping strategy
/// that needs one makes a single instance, and the input is listed in
/// [`PipelineFile::unanswered`].
pub fn load(path: &Path) -> Result<PipelineFile, PipelineErrors> {
    let search = TemplateSearch::for_pipeline(path, Path::new("."), &[]);
    load_with(path, &search, &Answers::default())
}

/// Read and check a pipeline file, with templates from `search` and the `answers`
/// that looping strategies written as expressions may need.
pub fn load_with(
    path: &Path,
    search: &TemplateSearch,
    answers: &Answers,
) -> Result<PipelineFile, PipelineErrors> {
    match crate::input::read_text(path, "pipeline file", crate::input::MAX_PIPELINE_BYTES) {
        Ok(text) => parse_with(path, &text, search, answers),
        Err(e) => Err(PipelineErrors::about_file(path, e.reason())),
    }
}

/// Parse and check `text` as if read from `path` (which only names it in errors),
/// with no template files and no answers.
pub fn parse_str(path: &Path, text: &str) -> Result<PipelineFile, PipelineErrors> {
    parse_with(path, text, &TemplateSearch::none(), &Answers::default())
}

/// Parse and check `text` as if read from `path`, with templates from `search`.
pub fn parse_with(
    path: &Path,
    text: &str,
    search: &TemplateSearch,
    answers: &Answers,
) -> Result<PipelineFile, PipelineErrors> {
    let mut errors = PipelineErrors::default();
    let mut root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            errors.push(PipelineError {
                loc: Location {
                    file: path.to_path_buf(),
                    line: e.pos.line,
                    column: e.pos.col,
                },
                kind: ErrorKind::Syntax,
                message: format!("invalid YAML: {}", e.message),
            });
            return Err(errors);
        }
    };
    let mut sources = vec![path.to_path_buf()];
    let inlined = template::uses_templates(text).then(|| {
        let library = template::Library::load(search, &mut sources);
        template::inline(&mut root, &library, &sources)
    });
    let mut parser = parse::Parser::new(path, &mut errors)
        .with_source(text)
        .with_answers(answers);
    if let Some(inlined) = inlined {
        parser = parser.with_templates(sources, inlined.origins);
        inlined.problems.into_iter().for_each(|p| parser.report(p));
    }
    let mut file = parser.file(&root);
    let sites = std::mem::take(&mut parser.expr_sites);
    let mut ignored = std::mem::take(&mut parser.ignored);
    // In the order of the file (a step's fields are read in no particular order).
    ignored.sort_by(|a, b| {
        (&a.loc.file, a.loc.line, a.loc.column).cmp(&(&b.loc.file, b.loc.line, b.loc.column))
    });
    let unanswered = std::mem::take(&mut parser.unanswered);
    if let Some(file) = &mut file {
        file.server_inputs = validate::validate(file, &sites, &mut errors);
        file.ignored = ignored;
        file.unanswered = unanswered;
    }
    errors.sort();
    match file {
        Some(file) if errors.is_empty() => Ok(file),
        _ => {
            if errors.is_empty() {
                // `file()` returns None only after reporting why; keep that promise visible.
                errors.push(PipelineError {
                    loc: Location {
                        file: path.to_path_buf(),
                        line: 1,
                        column: 1,
                    },
                    kind: ErrorKind::InvalidValue,
                    message: "not a pipeline: expected `pipeline:` or `stage:`".into(),
                });
            }
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_fields_are_listed_in_file_order() {
        let file = parse_str(
            Path::new("p.yaml"),
            "stage:\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n        - step:\n            identifier: a\n            type: Run\n            timeout: \"\"\n            delegateSelectors: [x]\n            spec:\n              command: \"true\"\n",
        )
        .unwrap();
        let lines: Vec<usize> = file.ignored.iter().map(|i| i.loc.line).collect();
        assert_eq!(lines, [10, 11]);
    }
}
