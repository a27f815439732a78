//! What can go wrong while building, joining or serving a live stage network, said
//! precisely (what can go wrong while planning one is `plan::NetPlanError`).

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
