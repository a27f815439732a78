//! Export: the same stage, on a cluster the team already has.
//!
//! When one machine is not enough, sandrun does not grow a cluster manager of its own:
//! `sandrun export kubernetes` turns a planned stage into the manifests Harness's
//! Kubernetes build infrastructure would run it as, one Pod per stage (or a Job), ready
//! for `kubectl apply -f -`. The input is the [`Plan`](crate::plan::Plan), not the YAML, so
//! the export sees exactly what `sandrun run` would run (resolved expressions, groups,
//! parallel blocks, and, once looping strategies expand in the plan, their instances as
//! more steps). Everything that Kubernetes cannot express is refused before anything is
//! printed (every refusal at once, each with file:line:col), or said in a comment of the
//! output; nothing is dropped silently.

pub mod command;
mod kubernetes;
mod sequence;

pub use kubernetes::{
    kubernetes, manifests, ImageFacts, KnownImages, KubeOptions, Manifest, RecipeImage, Workload,
    DEFAULT_HELPER_IMAGE,
};

use std::collections::BTreeMap;

/// Secret values are never exported: the plan is built with a marker for each secret
/// instead (`PlanInputs::secrets`), and the export turns a value that is exactly one
/// marker into a reference to a Kubernetes Secret. Markers cannot come from YAML text.
const SECRET_MARKER: (&str, &str) = ("\u{1}sandrun-secret:", "\u{1}");

/// The secret identifiers `<+secrets.getValue("ID")>` names in `text` (a pipeline
/// file), each with the marker the plan should resolve it to.
pub fn secret_markers(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(at) = rest.find("secrets.getValue(") {
        rest = &rest[at + "secrets.getValue(".len()..];
        let inner = rest.trim_start();
        let Some(quote) = inner.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            continue;
        };
        if let Some(end) = inner[1..].find(quote) {
            let id = &inner[1..1 + end];
            out.insert(id.to_string(), secret_marker(id));
        }
    }
    out
}

fn secret_marker(id: &str) -> String {
    format!("{}{id}{}", SECRET_MARKER.0, SECRET_MARKER.1)
}

/// The secret a value is exactly the marker of.
fn secret_of(value: &str) -> Option<&str> {
    value
        .strip_prefix(SECRET_MARKER.0)?
        .strip_suffix(SECRET_MARKER.1)
        .filter(|id| !id.contains(SECRET_MARKER.1))
}

/// Whether a value holds a secret anywhere (a marker, or the plan's placeholder for a
/// secret it was given no marker for).
fn holds_secret(value: &str) -> bool {
    value.contains(SECRET_MARKER.0) || value.contains("<secret>")
}

/// Something in the plan that the target cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `file:line:col` of the step (or stage).
    pub loc: String,
    /// The stage's identifier, when the plan has several (a looped stage's instances
    /// share their steps' lines).
    pub stage: Option<String>,
    /// The step's key, when a step is refused.
    pub step: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.loc)?;
        if let Some(stage) = &self.stage {
            write!(f, "stage `{stage}`: ")?;
        }
        match &self.step {
            Some(s) => write!(f, "step `{s}`: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_ids_are_found_and_markers_recognised() {
        let m = secret_markers(
            "a: <+secrets.getValue(\"db_password\")>\nb: x<+secrets.getValue('account.token')>y\nc: secrets.getValue(id)\n",
        );
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            ["account.token", "db_password"]
        );
        assert_eq!(secret_of(&m["db_password"]), Some("db_password"));
        assert_eq!(secret_of(&format!("x{}", m["db_password"])), None);
        assert!(holds_secret(&format!("x{}", m["db_password"])));
        assert!(holds_secret("<secret>"));
        assert!(!holds_secret("plain"));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}\nnothing was exported", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<Refusal>),
    #[error("no stage to export: {0}")]
    NoStage(String),
    #[error("cannot write the manifest as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}
