//! The executor and what it needs: launching processes, run state, events.

pub mod events;
pub mod executor;
pub mod images;
pub mod launch;
pub mod ports;
