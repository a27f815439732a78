//! The stage network: every step of a run gets a private address and finds the other
//! steps by identifier, services stay private to the run, and `portBindings` reach
//! the host's loopback through an in-process proxy.
//!
//! `plan` and `files` are pure (addresses, names, file contents). `stage` builds the
//! live network from a [`NetworkPlan`] (`netns` and `links` hold the system calls),
//! `proxy` serves port bindings (`handoff` gives host connections to the service's own
//! `accept`, the proxy copies the rest), `egress` is the opt-in way out, `listeners` reads
//! which ports a running step listens on (to explain pod-mode port collisions).
//!
//! How the executor uses it: `allocate` at plan time; before the first step
//! `HostPortProxy::bind` (fails early on a busy port), `StageNetwork::create`, then
//! `HostPortProxy::serve`; a host step's child calls `StepJoin::enter` (`host_join`)
//! in `pre_exec`, a container helper is handed the step's namespace (`step_netns`) and
//! enters it itself; at the end `ProxyServer::shutdown` and
//! `StageNetwork::teardown`.

mod connect;
mod egress;
pub mod error;
pub mod files;
mod handoff;
mod links;
mod listeners;
mod netns;
pub mod plan;
mod proxy;
mod stage;

pub use error::NetError;
pub use files::{render_hosts, render_resolv_conf};
pub use handoff::supported as port_handoff_supported;
pub use listeners::listening_ports;
pub use netns::{release_retired, StepJoin};
pub use plan::NetPlanError;
pub use plan::{
    allocate, step_hostnames, NetworkMode, NetworkPlan, PortBinding, SkipReason, SkippedName,
    StepEndpoint, StepRequest, Subnet,
};
pub use proxy::{HostPortProxy, ProxyServer};
pub use stage::StageNetwork;
