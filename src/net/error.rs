//! What can go wrong while planning or building a stage network, said precisely.

use super::plan::Subnet;

/// A stage whose network cannot be planned; found before anything starts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetPlanError {
    #[error("unknown network mode `{0}` (expected `bridge` or `pod`)")]
    UnknownMode(String),
    #[error("step key `{0}` appears twice in the stage network")]
    DuplicateStepKey(String),
    #[error("{steps} steps do not fit in the stage subnet {subnet}")]
    TooManySteps { steps: usize, subnet: Subnet },
    #[error("step `{key}`: port 0 in portBindings (host and container ports must be 1-65535)")]
    PortZero { key: String },
    #[error("host port {port} is bound by both step `{first}` and step `{second}`")]
    HostPortTwice {
        port: u16,
        first: String,
        second: String,
    },
    #[error(
        "steps `{first}` and `{second}` both use port {port}: in pod mode (KubernetesDirect) \
         all steps share one network namespace, so they would collide as in a Pod \
         (use `--network bridge` to give each step its own)"
    )]
    PodPortCollision {
        port: u16,
        first: String,
        second: String,
    },
}
