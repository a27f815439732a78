//! sandrun: run a Harness CI stage on one Linux machine, rootless, with no daemon.
//!
//! The crate follows the data flow in `docs/ARCHITECTURE.md`: `pipeline` (YAML in,
//! typed steps out) -> `plan` (everything decided up front) -> `run` (the executor,
//! which emits events) -> `ui` (consumers of those events). `store`, `sandbox` and
//! `net` are asked for images, containers and networks by `run`; they never call back.

pub mod cli;
pub mod config;
pub mod export;
pub mod junit;
pub mod net;
pub mod pipeline;
pub mod recipe;
pub mod plan;
pub mod run;
pub mod sandbox;
pub mod store;
pub mod ui;
