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

pub mod error;
pub mod expr;
pub mod model;
mod parse;
mod validate;
pub mod values;
pub(crate) mod yaml;

use std::path::Path;

pub use error::{ErrorKind, PipelineError, PipelineErrors};
pub use model::*;
pub use parse::valid_identifier;

/// Read and check a pipeline file.
pub fn load(path: &Path) -> Result<PipelineFile, PipelineErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_str(path, &text),
        Err(e) => {
            let mut errors = PipelineErrors::default();
            errors.push(PipelineError {
                loc: Location {
                    file: path.to_path_buf(),
                    line: 0,
                    column: 0,
                },
                kind: ErrorKind::Io,
                message: format!("cannot read the pipeline file: {e}"),
            });
            Err(errors)
        }
    }
}

/// Parse and check `text` as if read from `path` (which only names it in errors).
pub fn parse_str(path: &Path, text: &str) -> Result<PipelineFile, PipelineErrors> {
    let mut errors = PipelineErrors::default();
    let root = match yaml::parse(text) {
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
    let mut parser = parse::Parser::new(path, &mut errors);
    let file = parser.file(&root);
    let refs = std::mem::take(&mut parser.output_refs);
    if let Some(file) = &file {
        validate::validate(file, &refs, &mut errors);
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
