//! `portBindings`: a host port on the host's loopback forwarded to a step's port.
//!
//! Listeners are bound in the runner's (host) network namespace before any step
//! starts, so a busy port fails the stage up front, naming the step. Each accepted
//! connection is dialled from inside the stage network with a socket created there (a
//! socket keeps the namespace it was made in), so this needs no /dev/net/tun and no
//! privileges beyond those the runner already has. Bytes are copied both ways until
//! either side closes or the stage ends.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::error::NetError;
use super::netns::SocketFactory;
use super::plan::{NetworkPlan, PortBinding};
use super::stage::StageNetwork;

/// Copy buffer per direction: large enough that the proxy keeps up with loopback.
const COPY_BUFFER: usize = 256 * 1024;

struct BoundPort {
    key: String,
    binding: PortBinding,
    listener: StdListener,
}

/// Listeners for every port binding of a stage, bound but not yet serving.
pub struct HostPortProxy {
    ports: Vec<BoundPort>,
}

impl HostPortProxy {
    /// Binds `host_addr:host_port` for every binding in the plan. Call it before any
    /// step starts; a port already in use is an error naming the step and the port.
    pub fn bind(host_addr: IpAddr, plan: &NetworkPlan) -> Result<HostPortProxy, NetError> {
        let mut ports = Vec::new();
        for step in &plan.steps {
            for binding in &step.port_bindings {
                let addr = SocketAddr::new(host_addr, binding.host_port);
                let listener = StdListener::bind(addr).map_err(|source| {
                    if source.kind() == io::ErrorKind::AddrInUse {
                        NetError::HostPortBusy {
                            key: step.key.clone(),
                            addr: host_addr,
                            port: binding.host_port,
                        }
                    } else {
                        NetError::HostPortBind {
                            key: step.key.clone(),
                            addr: host_addr,
                            port: binding.host_port,
                            source,
                        }
                    }
                })?;
                listener
                    .set_nonblocking(true)
                    .map_err(NetError::os("make a port-binding listener non-blocking"))?;
                ports.push(BoundPort {
                    key: step.key.clone(),
                    binding: *binding,
                    listener,
                });
            }
        }
        Ok(HostPortProxy { ports })
    }

    /// The host addresses actually bound, with the step each belongs to.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.ports
            .iter()
            .filter_map(|p| Some((p.key.clone(), p.listener.local_addr().ok()?)))
            .collect()
    }

    /// Starts forwarding into `network`. Connections that arrive before the step
    /// listens are closed (as Docker's proxy does); later ones go through.
    pub fn serve(self, network: &StageNetwork) -> Result<ProxyServer, NetError> {
        let mut tasks = Vec::new();
        for port in self.ports {
            let target = network.dial_target(&port.key, port.binding.container_port)?;
            let listener = TcpListener::from_std(port.listener)
                .map_err(NetError::os("register a port-binding listener"))?;
            let sockets = network.socket_factory();
            tasks.push(tokio::spawn(accept_loop(
                listener, sockets, target, port.key,
            )));
        }
        Ok(ProxyServer { tasks })
    }
}

/// Running port forwarders; stopping (or dropping) it closes every listener and every
/// forwarded connection.
pub struct ProxyServer {
    tasks: Vec<JoinHandle<()>>,
}

impl ProxyServer {
    pub async fn shutdown(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    sockets: Arc<SocketFactory>,
    target: SocketAddr,
    key: String,
) {
    // Connections live in this set: aborting the loop drops them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let sockets = sockets.clone();
                    let key = key.clone();
                    connections.spawn(async move {
                        if let Err(e) = forward(client, &sockets, target).await {
                            tracing::debug!(step = %key, %target, "port binding connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(step = %key, "accepting on a port binding failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(
    mut client: TcpStream,
    sockets: &SocketFactory,
    target: SocketAddr,
) -> io::Result<()> {
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd: OwnedFd = sockets.stream_socket(domain).await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let mut upstream = socket.connect(target).await?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
        .await?;
    Ok(())
}
