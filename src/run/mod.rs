//! Running a plan: the pipeline's stages in order, the executor of each stage, and
//! what they need: launching processes, images, events.

pub mod events;
pub mod executor;
pub mod host;
pub mod images;
pub mod pipeline;
pub mod ports;
pub mod sequence;
pub mod startup;
