//! Reading Harness CI v0 pipeline YAML into typed steps.

pub mod model;

pub use model::*;
