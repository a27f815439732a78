//! The sandbox layer: everything that turns a planned step into isolated processes.
//! `userns` puts a rootless runner into its own user + mount namespace; the container
//! side (`__container` helper) starts one OCI container per step with libcontainer.
//! Raw syscalls live here (and in `net/`), nowhere else.

pub mod error;
pub mod helper;
pub mod userns;

pub use error::SandboxError;
pub use userns::{enter_rootless, InvokingUser, UsernsInfo};
