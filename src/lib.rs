//! sandrun: run a Harness CI stage on one Linux machine, rootless, with no daemon.
//!
//! The crate follows the data flow in `docs/ARCHITECTURE.md`: `pipeline` (YAML in,
//! typed steps out) -> `plan` (everything decided up front) -> `run` (the executor,
//! which emits events) -> `ui` (consumers of those events). `store`, `sandbox` and
//! `net` are asked for images, containers and networks by `run`, and never import it:
//! the launch contract they share (`launch`: `LaunchSpec`, `Launcher`, `StepChild`)
//! is a module of its own, implemented by `run::host::HostLauncher` and
//! `sandbox::ContainerLauncher`. `cli` parses arguments and hands plain options to
//! `run::startup` (a run) or to its own store and recipe subcommands. `sys` holds the
//! process-lifetime system calls (pidfds, waiting without reaping, the parent-death
//! signal) that every layer starting processes uses, and the few others that need
//! `unsafe` outside a concern of their own.

// Every `unsafe` block says why it is sound (checked by clippy).
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod config;
pub mod export;
pub mod input;
pub mod junit;
pub mod launch;
pub mod net;
pub mod pipeline;
pub mod plan;
pub mod recipe;
pub mod run;
pub mod sandbox;
pub mod store;
pub mod sys;
pub mod ui;
