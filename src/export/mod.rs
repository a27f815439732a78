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
    kubernetes, manifests, ImageFacts, KnownImages, KubeOptions, Manifest, Workload,
    DEFAULT_HELPER_IMAGE,
};

/// Something in the plan that the target cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `file:line:col` of the step (or stage).
    pub loc: String,
    /// The step's key, when a step is refused.
    pub step: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(s) => write!(f, "{}: step `{s}`: {}", self.loc, self.message),
            None => write!(f, "{}: {}", self.loc, self.message),
        }
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
