//! What a test does when something it needs is missing on this machine (root, the
//! `sandrun-test` user, a Debian tool, a kernel feature).
//!
//! On a developer's machine it says what is missing and skips its checks, so that the
//! rest of the suite stays useful. Under CI (`CI=true`, as every CI service sets it)
//! the machine is prepared by `scripts/test.sh`, so a missing prerequisite is a broken
//! set-up and the test fails: a test that silently returns would count as passed.

#![allow(dead_code)]

use std::fmt::Display;

/// True under CI, where every prerequisite must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Reports that `what` is missing: fails the test under CI, else says it skips.
/// The caller returns right after.
#[track_caller]
pub fn missing(what: impl Display) {
    if in_ci() {
        panic!("missing prerequisite under CI=true: {what} (scripts/test.sh sets this machine up)");
    }
    eprintln!("skipped: {what}");
}

/// `present`, after reporting `what` as missing when it is not.
#[track_caller]
pub fn require(present: bool, what: impl Display) -> bool {
    if !present {
        missing(what);
    }
    present
}
