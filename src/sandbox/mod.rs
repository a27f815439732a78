//! The sandbox layer: everything that turns a planned step into isolated processes.
//! `userns` puts a rootless runner into its own user + mount namespace; `container`
//! is the single-threaded `sandrun __container` helper that starts one OCI container
//! per step with libcontainer, from a plain-data [`ContainerSpec`]; `launch` spawns that
//! helper from the (multi-threaded) runner. Namespace and mount system calls live
//! here and in `net/` (network namespaces); the process-lifetime ones (pidfds,
//! waiting, the parent-death signal) and joining a namespace between fork and exec
//! in `crate::sys`.

pub mod container;
pub mod devices;
pub mod error;
pub mod helper;
pub mod host;
pub mod host_init;
pub mod in_root;
pub mod launch;
pub mod launcher;
pub mod mounts;
pub mod oci;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod userns;
pub mod zygote;

pub use container::{ERROR_PREFIX, WARNING_PREFIX};
pub use error::SandboxError;
pub use launcher::ContainerLauncher;
pub use spec::{BindMount, ContainerProcess, ContainerSpec, ImageConfig, ImageSpec, Limits};
pub use state::RunState;
pub use userns::{
    begin_rootless, enter_rootless, prepare_rootless, InvokingUser, PendingRootless,
    PreparedRootless, UsernsInfo,
};
