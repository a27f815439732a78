//! JUnit XML: reading the reports steps leave behind, and writing one merged file.
//!
//! Test tools disagree on the details of JUnit XML (a `<testsuites>` root or a bare
//! `<testsuite>`, nested suites, counts in attributes that do not match the cases), so
//! counts come from the `<testcase>` elements themselves, never from attributes. The
//! merged file is written with quick-junit, so its escaping and shape are a maintained
//! writer's, not format strings.

use std::path::{Path, PathBuf};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::run::events::TestCounts;
use crate::sandbox::in_root::{LastLink, ReadError, RootDir};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub suites: Vec<Suite>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Suite {
    pub name: String,
    pub time: Option<String>,
    pub cases: Vec<Case>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Case {
    pub name: String,
    pub classname: Option<String>,
    pub time: Option<String>,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum Outcome {
    #[default]
    Passed,
    Failed {
        message: Option<String>,
        text: String,
    },
    Error {
        message: Option<String>,
        text: String,
    },
    Skipped {
        message: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JunitError {
    #[error("cannot read {0}")]
    Read(#[from] ReadError),
    #[error("not well-formed XML at byte {position}: {message}")]
    Xml { position: u64, message: String },
    #[error("not a JUnit report: the root element is <{0}>, not <testsuites> or <testsuite>")]
    NotJunit(String),
}

impl Report {
    /// Every free text of the report (names, messages, failure output), to be masked.
    pub fn texts_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.suites.iter_mut().flat_map(|suite| {
            let cases = suite.cases.iter_mut().flat_map(|case| {
                let outcome: Vec<&mut String> = match &mut case.outcome {
                    Outcome::Passed => vec![],
                    Outcome::Failed { message, text } | Outcome::Error { message, text } => {
                        message.iter_mut().chain(std::iter::once(text)).collect()
                    }
                    Outcome::Skipped { message } => message.iter_mut().collect(),
                };
                std::iter::once(&mut case.name)
                    .chain(case.classname.iter_mut())
                    .chain(outcome)
            });
            std::iter::once(&mut suite.name).chain(cases)
        })
    }

    pub fn counts(&self) -> TestCounts {
        let mut c = TestCounts::default();
        for case in self.suites.iter().flat_map(|s| &s.cases) {
            c.tests += 1;
            match case.outcome {
                Outcome::Passed => {}
                Outcome::Failed { .. } => c.failures += 1,
                Outcome::Error { .. } => c.errors += 1,
                Outcome::Skipped { .. } => c.skipped += 1,
            }
        }
        c
    }
}

/// The largest report file read (a test tool's output, even for tens of thousands of
/// cases, is far smaller; a step must not make the runner read without end).
pub const MAX_REPORT_BYTES: u64 = 64 << 20;

/// What a step's `reports` paths gave.
#[derive(Debug, Default)]
pub struct Found {
    /// Matching regular files, relative to the workspace, sorted, without duplicates.
    pub files: Vec<PathBuf>,
    /// Patterns that cannot be looked at, each with the reason.
    pub refused: Vec<(String, String)>,
}

/// The files of `workspace` matching any of `patterns`: globs relative to the
/// workspace, or absolute paths inside it as the step sees it (`workspace_in_step`).
/// Expansion never follows a link out of the workspace ([`RootDir::glob`]): the files
/// of a container's own root filesystem are gone when it ends, and the host's are not
/// the step's to read.
pub fn find_reports(workspace: &RootDir, workspace_in_step: &Path, patterns: &[String]) -> Found {
    let mut found = Found::default();
    for p in patterns {
        let relative = if Path::new(p).is_absolute() {
            match Path::new(p).strip_prefix(workspace_in_step) {
                Ok(rest) => rest.to_string_lossy().into_owned(),
                Err(_) => {
                    found.refused.push((
                        p.clone(),
                        format!(
                            "it is outside the workspace ({}); sandrun reads reports only from there",
                            workspace_in_step.display()
                        ),
                    ));
                    continue;
                }
            }
        } else {
            p.clone()
        };
        match workspace.glob(&relative) {
            Ok(files) => found.files.extend(files),
            Err(e) => found
                .refused
                .push((p.clone(), format!("not a valid glob: {e}"))),
        }
    }
    found.files.sort();
    found.files.dedup();
    found
}

/// Reads and parses the report `relative` of `workspace`, resolved inside it and at
/// most [`MAX_REPORT_BYTES`] long.
pub fn read_report(workspace: &RootDir, relative: &Path) -> Result<Report, JunitError> {
    let bytes = workspace.read(relative, MAX_REPORT_BYTES, LastLink::Follow)?;
    parse_str(&String::from_utf8_lossy(&bytes))
}

pub fn parse_str(text: &str) -> Result<Report, JunitError> {
    let mut reader = Reader::from_str(text);
    let mut report = Report::default();
    let mut saw_root = false;
    // Index of the suite that receives cases (nested suites are flattened).
    let mut suite_stack: Vec<usize> = Vec::new();
    let mut case: Option<Case> = None;
    let mut in_outcome = false;
    loop {
        let event = reader.read_event().map_err(|e| JunitError::Xml {
            position: reader.error_position(),
            message: e.to_string(),
        })?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let tag = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if !saw_root {
                    saw_root = true;
                    if tag != "testsuites" && tag != "testsuite" {
                        return Err(JunitError::NotJunit(tag));
                    }
                }
                match tag.as_str() {
                    "testsuite" => {
                        report.suites.push(Suite {
                            name: attr(e, "name").unwrap_or_default(),
                            time: attr(e, "time"),
                            cases: Vec::new(),
                        });
                        if !empty {
                            suite_stack.push(report.suites.len() - 1);
                        }
                    }
                    "testcase" => {
                        let c = Case {
                            name: attr(e, "name").unwrap_or_default(),
                            classname: attr(e, "classname"),
                            time: attr(e, "time"),
                            outcome: Outcome::Passed,
                        };
                        if empty {
                            push_case(&mut report, &suite_stack, c);
                        } else {
                            case = Some(c);
                        }
                    }
                    "failure" | "error" | "skipped" if case.is_some() => {
                        let message = attr(e, "message");
                        let c = case.as_mut().unwrap();
                        c.outcome = match tag.as_str() {
                            "failure" => Outcome::Failed {
                                message,
                                text: String::new(),
                            },
                            "error" => Outcome::Error {
                                message,
                                text: String::new(),
                            },
                            _ => Outcome::Skipped { message },
                        };
                        in_outcome = !empty;
                    }
                    _ => {}
                }
            }
            Event::Text(t) if in_outcome => {
                let s = t.decode().map(|c| c.into_owned()).unwrap_or_default();
                append_text(&mut case, &s);
            }
            Event::GeneralRef(r) if in_outcome => {
                let name = r.decode().map(|c| c.into_owned()).unwrap_or_default();
                let ch = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c),
                    _ => match name.as_str() {
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "amp" => Some('&'),
                        "apos" => Some('\''),
                        "quot" => Some('"'),
                        _ => None,
                    },
                };
                match ch {
                    Some(c) => append_text(&mut case, c.encode_utf8(&mut [0; 4])),
                    None => append_text(&mut case, &format!("&{name};")),
                }
            }
            Event::CData(t) if in_outcome => {
                let s = String::from_utf8_lossy(&t).into_owned();
                append_text(&mut case, &s);
            }
            Event::End(e) => match e.local_name().as_ref() {
                b"testsuite" => {
                    suite_stack.pop();
                }
                b"testcase" => {
                    if let Some(c) = case.take() {
                        push_case(&mut report, &suite_stack, c);
                    }
                }
                b"failure" | b"error" | b"skipped" => in_outcome = false,
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_root {
        return Err(JunitError::NotJunit("(none: the file is empty)".into()));
    }
    Ok(report)
}

fn append_text(case: &mut Option<Case>, s: &str) {
    if let Some(Case {
        outcome: Outcome::Failed { text, .. } | Outcome::Error { text, .. },
        ..
    }) = case
    {
        text.push_str(s);
    }
}

fn push_case(report: &mut Report, stack: &[usize], case: Case) {
    match stack.last() {
        Some(&i) => report.suites[i].cases.push(case),
        None => {
            // A case outside any suite: give it one.
            report.suites.push(Suite {
                name: String::new(),
                time: None,
                cases: vec![case],
            });
        }
    }
}

fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == name.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// Write `reports` (each tagged with the step it came from) as one `<testsuites>` file.
pub fn merge(reports: &[(String, Report)]) -> String {
    use quick_junit::{NonSuccessKind, Property, TestCase, TestCaseStatus, TestSuite};
    let mut merged = quick_junit::Report::new("sandrun");
    for (step, report) in reports {
        for suite in &report.suites {
            let name = if suite.name.is_empty() {
                step
            } else {
                &suite.name
            };
            let mut out = TestSuite::new(name.as_str());
            out.add_property(Property::new("sandrun.step", step.as_str()));
            if let Some(t) = suite.time.as_deref().and_then(seconds) {
                out.set_time(t);
            }
            for case in &suite.cases {
                let status = match &case.outcome {
                    Outcome::Passed => TestCaseStatus::success(),
                    Outcome::Failed { message, text } | Outcome::Error { message, text } => {
                        let kind = match case.outcome {
                            Outcome::Failed { .. } => NonSuccessKind::Failure,
                            _ => NonSuccessKind::Error,
                        };
                        let mut status = TestCaseStatus::non_success(kind);
                        if let Some(m) = message {
                            status.set_message(m.as_str());
                        }
                        if !text.is_empty() {
                            status.set_description(text.as_str());
                        }
                        status
                    }
                    Outcome::Skipped { message } => {
                        let mut status = TestCaseStatus::skipped();
                        if let Some(m) = message {
                            status.set_message(m.as_str());
                        }
                        status
                    }
                };
                let mut c = TestCase::new(case.name.as_str(), status);
                if let Some(cn) = &case.classname {
                    c.set_classname(cn.as_str());
                }
                if let Some(t) = case.time.as_deref().and_then(seconds) {
                    c.set_time(t);
                }
                out.add_test_case(c);
            }
            merged.add_test_suite(out);
        }
    }
    // Serialising into memory fails only on a writer error, which a String never has.
    merged
        .to_string()
        .expect("a JUnit report serialises to a String")
}

/// A JUnit `time` attribute (seconds, fractional) as a duration; `None` when it is not
/// one (tools write odd things there, and the merged file must stay valid).
fn seconds(text: &str) -> Option<std::time::Duration> {
    let s: f64 = text.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| std::time::Duration::from_secs_f64(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4" time="0.1">
<testcase classname="t" name="a" time="0.01"/>
<testcase classname="t" name="b"><failure message="assert 1 == 2">x &lt; y</failure></testcase>
<testcase classname="t" name="c"><skipped message="later"/></testcase>
<testcase classname="t" name="d"><error message="boom"><![CDATA[trace]]></error></testcase>
</testsuite></testsuites>"#;

    #[test]
    fn counts_come_from_cases() {
        let r = parse_str(PYTEST).unwrap();
        let c = r.counts();
        assert_eq!((c.tests, c.failures, c.errors, c.skipped), (4, 1, 1, 1));
        assert_eq!(c.passed(), 1);
        assert_eq!(
            r.suites[0].cases[1].outcome,
            Outcome::Failed {
                message: Some("assert 1 == 2".into()),
                text: "x < y".into()
            }
        );
    }

    #[test]
    fn bare_testsuite_and_nested_suites() {
        let r = parse_str(
            r#"<testsuite name="outer"><testsuite name="inner"><testcase name="x"/></testsuite><testcase name="y"/></testsuite>"#,
        )
        .unwrap();
        assert_eq!(r.counts().tests, 2);
        assert_eq!(r.suites[1].cases[0].name, "x");
        assert_eq!(r.suites[0].cases[0].name, "y");
    }

    #[test]
    fn rejects_non_junit_and_broken_xml() {
        assert!(matches!(parse_str("<html/>"), Err(JunitError::NotJunit(t)) if t == "html"));
        assert!(matches!(
            parse_str("<testsuite><testcase name='a'></testsuite>"),
            Err(JunitError::Xml { .. })
        ));
        assert!(matches!(parse_str(""), Err(JunitError::NotJunit(_))));
    }

    #[test]
    fn merge_round_trips() {
        let r = parse_str(PYTEST).unwrap();
        let merged = merge(&[("tests".into(), r.clone())]);
        let back = parse_str(&merged).unwrap();
        assert_eq!(back.counts(), r.counts());
        assert!(merged.contains("name=\"sandrun.step\" value=\"tests\""));
        let outcomes = |r: &Report| -> Vec<(String, Outcome)> {
            (r.suites[0].cases.iter())
                .map(|c| (c.name.clone(), c.outcome.clone()))
                .collect()
        };
        assert_eq!(outcomes(&back), outcomes(&r));
    }

    #[test]
    fn report_paths_are_found_only_inside_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("a.xml"), PYTEST).unwrap();
        std::fs::write(dir.path().join("out/b.xml"), PYTEST).unwrap();
        let root = RootDir::open(dir.path()).unwrap();
        let patterns = [
            "*.xml".to_string(),
            "/harness/out/*.xml".to_string(),
            "/etc/*.xml".to_string(),
            "[".to_string(),
        ];
        let found = find_reports(&root, Path::new("/harness"), &patterns);
        assert_eq!(found.files, [Path::new("a.xml"), Path::new("out/b.xml")]);
        let refused: Vec<&str> = found.refused.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(refused, ["/etc/*.xml", "["]);
        assert!(found.refused[0]
            .1
            .contains("outside the workspace (/harness)"));
        let report = read_report(&root, Path::new("out/b.xml")).unwrap();
        assert_eq!(report.counts().tests, 4);
    }
}
