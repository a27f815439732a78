//! Errors found in a pipeline file. A file usually has more than one mistake, so the
//! parser and the validator collect every error they find (up to a cap) instead of
//! stopping at the first, and each one names its `file:line:col`.

use std::fmt;

use super::model::Location;

/// What sort of problem an error is, so that callers (`sandrun validate`) can group
/// them or treat "sandrun cannot do this" differently from "this is wrong".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Io,
    /// Not valid YAML.
    Syntax,
    /// A key the schema does not have.
    UnknownField,
    /// A required key is absent.
    MissingField,
    /// A value of the wrong shape or out of range.
    InvalidValue,
    /// Valid Harness YAML that sandrun cannot honour locally.
    Unsupported,
    /// An identifier used twice in the same scope.
    Duplicate,
    /// A `<+...>` expression that is malformed or unknown.
    Expression,
    /// A runtime input nobody answered where reading the file needs it (a looping
    /// strategy's count or list): the plan asks for it with the other inputs.
    MissingInput,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineError {
    pub loc: Location,
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.loc.line == 0 {
            write!(f, "{}: {}", self.loc.file.display(), self.message)
        } else {
            write!(f, "{}: {}", self.loc, self.message)
        }
    }
}

impl std::error::Error for PipelineError {}

/// At most this many errors are kept; a file with more is usually not a pipeline at all.
pub const MAX_ERRORS: usize = 100;

/// Every error found in one file, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineErrors {
    pub errors: Vec<PipelineError>,
    /// How many more errors were found beyond [`MAX_ERRORS`].
    pub omitted: usize,
}

impl PipelineErrors {
    /// One error about a whole file (it cannot be read, it is too large): no position.
    pub fn about_file(path: &std::path::Path, message: impl Into<String>) -> PipelineErrors {
        let mut errors = PipelineErrors::default();
        errors.push(PipelineError {
            loc: Location {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
            },
            kind: ErrorKind::Io,
            message: message.into(),
        });
        errors
    }

    pub fn push(&mut self, e: PipelineError) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        } else {
            self.omitted += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len() + self.omitted
    }

    pub fn iter(&self) -> impl Iterator<Item = &PipelineError> {
        self.errors.iter()
    }

    /// Order by position (parse and validation find errors in different passes) and
    /// drop exact repeats.
    pub(crate) fn sort(&mut self) {
        self.errors.sort_by_key(|e| (e.loc.line, e.loc.column));
        self.errors.dedup();
    }
}

impl fmt::Display for PipelineErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.omitted > 0 {
            write!(f, "\n... and {} more errors", self.omitted)?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(line: usize) -> PipelineError {
        PipelineError {
            loc: Location {
                file: "p.yaml".into(),
                line,
                column: 3,
            },
            kind: ErrorKind::InvalidValue,
            message: format!("bad {line}"),
        }
    }

    #[test]
    fn errors_print_in_file_order_and_are_capped() {
        let mut errors = PipelineErrors::default();
        for line in (1..=MAX_ERRORS + 5).rev() {
            errors.push(error(line));
        }
        errors.sort();
        assert_eq!(errors.len(), MAX_ERRORS + 5);
        let text = errors.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), MAX_ERRORS + 1);
        assert_eq!(lines[0], "p.yaml:6:3: bad 6");
        assert_eq!(lines[MAX_ERRORS], "... and 5 more errors");
    }
}
