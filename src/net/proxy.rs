//! `portBindings`: a host port on the host's loopback forwarded to a step's port.
//!
//! Listeners are bound in the runner's (host) network namespace before any step
//! starts, so a busy port fails the stage up front, naming the step. Each accepted
//! connection is dialled from inside the stage network with a socket created there (a
//! socket keeps the namespace it was made in), so this needs no /dev/net/tun and no
//! privileges beyond those the runner already has. Bytes are copied both ways until
//! either side closes or the stage ends.
//!
//! That copying is the fallback: where it can, the runner gives the host's connection
//! to the service's own `accept` instead (`handoff`), and this module only dials the
//! placeholder connection that wakes the service.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::error::NetError;
use super::handoff::{self, Handoff};
use super::netns::SocketFactory;
use super::plan::{NetworkMode, NetworkPlan, PortBinding};
use super::stage::StageNetwork;

/// Pipe size for splice(2) (1 MiB is the unprivileged maximum by default).
const PIPE_SIZE: usize = 1 << 20;

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

    /// Binds every binding of a container step at `127.0.0.1:HOST_PORT` inside the
    /// machine's namespace too (bridge mode, a stage with host steps): on Harness's VM
    /// and local runners host steps reach a service through `localhost:HOST_PORT`, the
    /// host port Docker publishes. In pod mode the machine is the pod itself, where the
    /// service's own port already answers on localhost.
    pub async fn bind_for_machine(&mut self, network: &StageNetwork) -> Result<(), NetError> {
        let plan = network.plan();
        let Some(netns) = network
            .machine_netns()
            .filter(|_| plan.mode == NetworkMode::Bridge)
        else {
            return Ok(());
        };
        let sockets = network.socket_factory();
        let mut bound = Vec::new();
        for port in &self.ports {
            if plan.step(&port.key).is_none_or(|s| s.on_machine) {
                continue;
            }
            let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port.binding.host_port);
            let bind_error = |source: io::Error| NetError::HostPortBind {
                key: port.key.clone(),
                addr: addr.ip(),
                port: port.binding.host_port,
                source,
            };
            let socket = sockets.socket(netns, addr).await.map_err(bind_error)?;
            socket.set_reuseaddr(true).map_err(bind_error)?;
            socket.bind(addr).map_err(bind_error)?;
            let listener = socket
                .listen(1024)
                .and_then(TcpListener::into_std)
                .map_err(bind_error)?;
            bound.push(BoundPort {
                key: port.key.clone(),
                binding: port.binding,
                listener,
            });
        }
        self.ports.extend(bound);
        Ok(())
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
    ///
    /// With `handoff_dir`, each step with bindings also gets a socket there for the
    /// seccomp listener of its `accept` calls ([`ProxyServer::accept_listeners`]), and
    /// host connections are handed to the service itself once that listener has come
    /// (`handoff`); until then, and for the other steps, they are proxied.
    pub fn serve(
        self,
        network: &StageNetwork,
        handoff_dir: Option<&Path>,
    ) -> Result<ProxyServer, NetError> {
        let mut tasks = Vec::new();
        let mut handoffs: HashMap<String, Arc<Handoff>> = HashMap::new();
        let mut accept_listeners = HashMap::new();
        if let Some(dir) = handoff_dir.filter(|_| handoff::supported()) {
            let mut ports: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
            for port in &self.ports {
                ports
                    .entry(&port.key)
                    .or_default()
                    .push(port.binding.container_port);
            }
            for (key, ports) in ports {
                let handoff = Handoff::new(key, ports);
                let path = handoff::socket_path(dir, key);
                match handoff.listen(&path) {
                    Ok(task) => {
                        tasks.push(task);
                        accept_listeners.insert(key.to_string(), path);
                        handoffs.insert(key.to_string(), handoff);
                    }
                    // A path too long for a unix socket, say: that step is proxied.
                    Err(e) => tracing::debug!(step = %key, "no accept hand-off: {e}"),
                }
            }
        }
        for port in self.ports {
            let target = network.dial_target(&port.key, port.binding.container_port)?;
            let listener = TcpListener::from_std(port.listener)
                .map_err(NetError::os("register a port-binding listener"))?;
            let dial = Dial {
                sockets: network.socket_factory(),
                netns: Arc::new(
                    network
                        .step_netns(&port.key)?
                        .try_clone_to_owned()
                        .map_err(NetError::os("duplicate a namespace descriptor"))?,
                ),
                target,
                spare: Default::default(),
            };
            let handoff = handoffs.get(&port.key).cloned();
            tasks.push(tokio::spawn(accept_loop(listener, dial, handoff, port.key)));
        }
        Ok(ProxyServer {
            tasks,
            accept_listeners,
        })
    }
}

/// Running port forwarders; stopping (or dropping) it closes every listener and every
/// forwarded connection.
pub struct ProxyServer {
    tasks: Vec<JoinHandle<()>>,
    accept_listeners: HashMap<String, PathBuf>,
}

impl ProxyServer {
    /// Step key -> the socket the step (its container, or `__host-init`) sends the
    /// seccomp listener of its `accept` calls to (see `handoff`).
    pub fn accept_listeners(&self) -> HashMap<String, PathBuf> {
        self.accept_listeners.clone()
    }

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

/// Where a port binding's connections go: `target`, dialled with a socket made in
/// the step's own namespace (its stage address then routes over that namespace's
/// loopback device, without the veth and router).
#[derive(Clone)]
struct Dial {
    sockets: Arc<SocketFactory>,
    netns: Arc<OwnedFd>,
    target: SocketAddr,
    /// A socket made ahead, for the next connection.
    spare: Arc<std::sync::Mutex<Option<tokio::net::TcpSocket>>>,
}

impl Dial {
    /// A socket made in the step's namespace: the one made ahead when there is one
    /// (the namespace's thread makes the next meanwhile), so that a connection does
    /// not wait for that thread.
    async fn socket(&self) -> io::Result<tokio::net::TcpSocket> {
        let ready = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let dial = self.clone();
        tokio::spawn(async move {
            if let Ok(s) = dial.sockets.socket(dial.netns.as_fd(), dial.target).await {
                dial.spare
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(s);
            }
        });
        match ready {
            Some(socket) => Ok(socket),
            None => self.sockets.socket(self.netns.as_fd(), self.target).await,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    dial: Dial,
    handoff: Option<Arc<Handoff>>,
    key: String,
) {
    // Connections live in this set: aborting the loop drops them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let dial = dial.clone();
                    let key = key.clone();
                    let handoff = handoff.clone();
                    connections.spawn(async move {
                        let done = match handoff.filter(|h| h.attached()) {
                            Some(handoff) => hand_over(client, &dial, &handoff).await,
                            None => forward(client, &dial).await,
                        };
                        if let Err(e) = done {
                            tracing::debug!(step = %key, target = %dial.target, "port binding connection ended: {e}");
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

/// Gives `client` to the service: a placeholder connection from inside the stage
/// network wakes its `accept`, which the runner answers with `client` (`handoff`).
/// When nobody claims it in time, or it is an IPv6 client of an IPv4-only listener,
/// `client` is proxied to the placeholder instead.
async fn hand_over(client: TcpStream, dial: &Dial, handoff: &Handoff) -> io::Result<()> {
    let socket = dial.socket().await?;
    // Bound first, so that the placeholder is known before the service can accept it.
    socket.bind(SocketAddr::new(dial.target.ip(), 0))?;
    let placeholder = socket.local_addr()?;
    let mut verdict = handoff.park(placeholder, client.into_std()?);
    let upstream = match socket.connect(dial.target).await {
        Ok(upstream) => upstream,
        Err(e) => {
            // Not listening yet: the client's connection is closed, as when proxied.
            handoff.unpark(&placeholder);
            return Err(e);
        }
    };
    let outcome = tokio::select! {
        v = &mut verdict => v,
        _ = tokio::time::sleep(handoff::CLAIM_TIMEOUT) => match handoff.unpark(&placeholder) {
            Some(host) => Ok(Some(host)),
            // Claimed just now.
            None => verdict.await,
        },
    };
    match outcome {
        Ok(Some(host)) => splice_both_ways(TcpStream::from_std(host)?, upstream).await,
        // The service has the connection; the placeholder is not needed.
        _ => Ok(()),
    }
}

async fn forward(client: TcpStream, dial: &Dial) -> io::Result<()> {
    let upstream = dial.socket().await?.connect(dial.target).await?;
    splice_both_ways(client, upstream).await
}

async fn splice_both_ways(client: TcpStream, upstream: TcpStream) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::try_join!(
        splice_one_way(&client, &upstream),
        splice_one_way(&upstream, &client),
    )?;
    Ok(())
}

/// Moves bytes from `from` to `to` through a pipe with splice(2), so the data never
/// passes through user space (a read/write copy loop reached only about half of the
/// loopback throughput on a 2-core host). At end of input it shuts down the write
/// side of `to`, as a TCP proxy must for half-closed connections.
async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_read, pipe_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(io::Error::from)?;
    // A bigger pipe means fewer system calls; the default (64 KiB) works too.
    let bigger = nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int);
    let _ = nix::fcntl::fcntl(pipe_write.as_raw_fd(), bigger);
    loop {
        from.readable().await?;
        // The pipe is empty here, so EAGAIN can only mean "socket not readable".
        let moved = match from.try_io(Interest::READABLE, || {
            crate::sys::splice(from, &pipe_write, PIPE_SIZE)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut pending = moved;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                crate::sys::splice(&pipe_read, to, pending)
            }) {
                Ok(n) => pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    Ok(())
}
