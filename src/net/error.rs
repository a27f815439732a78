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

/// A live stage network that could not be built, joined or served.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot {what}: {source}{}", permission_hint(source))]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the links of step(s) {} did not come up within {waited_ms} ms", .keys.join(", "))]
    LinksDown { keys: Vec<String>, waited_ms: u64 },
    #[error("no step `{0}` on this stage network")]
    UnknownStep(String),
    #[error("cannot write {}: {source}", .path.display())]
    WriteFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "step `{key}`: host port {addr}:{port} (portBindings) is already in use by another program"
    )]
    HostPortBusy {
        key: String,
        addr: std::net::IpAddr,
        port: u16,
    },
    #[error("step `{key}`: cannot listen on host port {addr}:{port} (portBindings): {source}{}",
        if .port < &1024 { " (ports below 1024 need root, or a lower net.ipv4.ip_unprivileged_port_start)" } else { "" })]
    HostPortBind {
        key: String,
        addr: std::net::IpAddr,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("--network egress is not available: {0}")]
    EgressUnavailable(String),
}

fn permission_hint(err: &std::io::Error) -> &'static str {
    if err.kind() == std::io::ErrorKind::PermissionDenied {
        " (network namespaces need root, or sandrun's rootless user namespace)"
    } else {
        ""
    }
}

impl NetError {
    pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Os { what, source }
    }

    pub(crate) fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Netlink { what, source }
    }
}
