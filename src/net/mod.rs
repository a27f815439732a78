//! The stage network: every step of a run gets a private address and finds the other
//! steps by identifier, services stay private to the run, and `portBindings` reach
//! the host's loopback through an in-process proxy.
//!
//! `plan` and `files` are pure (addresses, names, file contents); the live network is
//! built from a [`NetworkPlan`] by the modules that talk to the kernel.

pub mod error;
pub mod files;
pub mod plan;

pub use error::NetPlanError;
pub use files::{render_hosts, render_resolv_conf};
pub use plan::{
    allocate, step_hostnames, NetworkMode, NetworkPlan, PortBinding, SkipReason, SkippedName,
    StepEndpoint, StepRequest, Subnet,
};
