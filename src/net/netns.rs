//! Network namespaces held by file descriptor only, and the raw syscalls around them.
//!
//! A namespace lives as long as a descriptor or a process refers to it; nothing is
//! bind-mounted under /run/netns. So when sandrun exits, however it exits, the kernel
//! removes the namespaces with every link and address in them: nothing can leak.
//!
//! A torn-down stage network's namespaces are *retired* ([`retire`]) rather than closed
//! at once: the kernel removes a network namespace in a worker that holds the global
//! RTNL lock through several RCU grace periods, and every namespace, link or address
//! being made on the machine meanwhile waits for that lock. Closing a stage's
//! namespaces just before the next stage makes its own made that wait part of the
//! next stage's start (tens to hundreds of milliseconds on a small VM). Retired
//! namespaces hold no process and no socket; they are closed together, as one batch
//! for the kernel, once a new stage network is up and more than [`RETIRED_MAX`] are
//! kept (the kernel then works while that stage runs), and at the latest when the
//! process ends.
//!
//! The runner is multi-threaded (tokio), and a thread may change its own network
//! namespace. Namespaces are therefore made on a short-lived thread that unshares once
//! per namespace; each namespace comes back with a netlink socket created inside it,
//! because a socket keeps the namespace it was created in. The same property lets a
//! long-lived [`SocketFactory`] thread, parked in the run's namespace, hand out TCP
//! sockets for the port proxy to dial from.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sched::{unshare, CloneFlags};

use super::error::NetError;

/// How many retired namespaces are kept before they are closed together.
pub(crate) const RETIRED_MAX: usize = 16;

static RETIRED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Keeps the namespaces of a torn-down stage network (see [`release_past_limit`]).
/// Returns how many are kept now.
pub(crate) fn retire(namespaces: impl IntoIterator<Item = OwnedFd>) -> usize {
    let mut retired = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
    retired.extend(namespaces);
    retired.len()
}

/// Closes the retired namespaces, all together, when more than [`RETIRED_MAX`] are
/// kept: called once a new stage network is up. Returns how many are kept now.
pub(crate) fn release_past_limit() -> usize {
    let mut retired = RETIRED.lock().unwrap_or_else(|e| e.into_inner());
    if retired.len() > RETIRED_MAX {
        retired.clear();
    }
    retired.len()
}

/// Closes the retired namespaces now (the kernel then removes them).
pub fn release_retired() {
    RETIRED.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// A fresh network namespace and a netlink (route) socket that lives in it.
pub(crate) struct FreshNetns {
    pub ns: OwnedFd,
    pub netlink: OwnedFd,
}

fn open_own_netns() -> io::Result<OwnedFd> {
    let file = std::fs::File::open("/proc/thread-self/ns/net")?;
    Ok(OwnedFd::from(file))
}

fn netlink_route_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
    let flags = SockFlag::SOCK_CLOEXEC;
    Ok(socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        flags,
        SockProtocol::NetlinkRoute,
    )?)
}

fn unshare_netns() -> io::Result<FreshNetns> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    Ok(FreshNetns {
        ns: open_own_netns()?,
        netlink: netlink_route_socket()?,
    })
}

/// Creates `count` network namespaces (on a throw-away thread, so that no runtime
/// thread changes namespace).
pub(crate) fn create_namespaces(count: usize) -> io::Result<Vec<FreshNetns>> {
    std::thread::Builder::new()
        .name("sandrun-netns".into())
        .spawn(move || (0..count).map(|_| unshare_netns()).collect())
        .map_err(io::Error::other)?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

type SocketRequest = (
    libc::c_int,
    OwnedFd,
    tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
);

/// A thread, made in the stage's first network namespace (which it keeps alive), that
/// creates TCP sockets in any namespace of the stage on request: it joins that
/// namespace for the `socket()` call, since a socket keeps the namespace it was made
/// in. Dropping the factory ends the thread.
pub(crate) struct SocketFactory {
    requests: Option<mpsc::Sender<SocketRequest>>,
    thread: Option<JoinHandle<()>>,
}

/// A [`SocketFactory`] whose thread is still creating its namespace (see
/// [`SocketFactory::start_in_new_netns`]).
pub(crate) struct PendingFactory {
    factory: SocketFactory,
    ready: tokio::sync::oneshot::Receiver<Result<FreshNetns, NetError>>,
}

impl PendingFactory {
    /// The factory and its namespace, once the thread has made and set it up.
    pub async fn ready(self) -> Result<(SocketFactory, FreshNetns), NetError> {
        match self.ready.await {
            Ok(Ok(fresh)) => Ok((self.factory, fresh)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetError::Os {
                what: "create the stage network namespace".into(),
                source: io::Error::other("namespace thread ended early"),
            }),
        }
    }
}

impl SocketFactory {
    /// Starts the thread inside a *new* namespace, where it runs `setup` first (with
    /// the namespace's netlink socket, blocking: no runtime is needed). Returns at
    /// once; [`PendingFactory::ready`] gives the namespace.
    pub fn start_in_new_netns<F>(setup: F) -> io::Result<PendingFactory>
    where
        F: FnOnce(&FreshNetns) -> Result<(), NetError> + Send + 'static,
    {
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let (tx, rx) = mpsc::channel::<SocketRequest>();
        let thread = std::thread::Builder::new()
            .name("sandrun-netns-dial".into())
            .spawn(move || {
                let fresh = unshare_netns()
                    .map_err(NetError::os("create the stage network namespace"))
                    .and_then(|fresh| setup(&fresh).map(|()| fresh));
                let ok = fresh.is_ok();
                let _ = ready_tx.send(fresh);
                if ok {
                    serve_sockets(rx);
                }
            })
            .map_err(io::Error::other)?;
        Ok(PendingFactory {
            factory: SocketFactory {
                requests: Some(tx),
                thread: Some(thread),
            },
            ready,
        })
    }

    /// A TCP connection to `target` from inside the network namespace `netns`.
    pub async fn connect(
        &self,
        netns: BorrowedFd<'_>,
        target: std::net::SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        self.socket(netns, target).await?.connect(target).await
    }

    /// A TCP socket of `target`'s address family made inside the network namespace
    /// `netns`, not yet connected.
    pub async fn socket(
        &self,
        netns: BorrowedFd<'_>,
        target: std::net::SocketAddr,
    ) -> io::Result<tokio::net::TcpSocket> {
        let domain = if target.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(|| io::Error::other("socket factory stopped"))?
            .send((domain, netns.try_clone_to_owned()?, tx))
            .map_err(|_| io::Error::other("socket factory thread is gone"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("socket factory thread is gone"))??;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// Ends the thread and waits for it (it only ever blocks on its queue).
    pub fn stop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SocketFactory {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_sockets(rx: mpsc::Receiver<SocketRequest>) {
    while let Ok((domain, netns, reply)) = rx.recv() {
        // A network namespace is per thread: join the requested one.
        if let Err(e) = nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET) {
            let _ = reply.send(Err(e.into()));
            continue;
        }
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        let family = match domain {
            libc::AF_INET6 => AddressFamily::Inet6,
            _ => AddressFamily::Inet,
        };
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let result = socket(family, SockType::Stream, flags, None).map_err(io::Error::from);
        let _ = reply.send(result);
    }
}

/// What a child process does, between fork and exec, to join its step's network.
///
/// Built before spawning (everything allocated up front) so that [`StepJoin::enter`]
/// only makes async-signal-safe system calls, as `pre_exec` requires.
#[derive(Debug)]
pub struct StepJoin {
    netns: OwnedFd,
    /// Host steps: bind the step's files over the host's (in a private mount
    /// namespace). Container steps get them as mounts in their OCI spec instead.
    etc_files: Option<EtcFiles>,
}

#[derive(Debug)]
struct EtcFiles {
    hosts: CString,
    resolv_conf: CString,
}

const ETC_HOSTS: &std::ffi::CStr = c"/etc/hosts";
const ETC_RESOLV_CONF: &std::ffi::CStr = c"/etc/resolv.conf";

impl StepJoin {
    pub(crate) fn netns_only(netns: BorrowedFd<'_>) -> io::Result<StepJoin> {
        Ok(StepJoin {
            netns: netns.try_clone_to_owned()?,
            etc_files: None,
        })
    }

    pub(crate) fn with_etc_files(
        netns: BorrowedFd<'_>,
        hosts: &std::path::Path,
        resolv_conf: &std::path::Path,
    ) -> io::Result<StepJoin> {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &std::path::Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        };
        Ok(StepJoin {
            netns: netns.try_clone_to_owned()?,
            etc_files: Some(EtcFiles {
                hosts: c(hosts)?,
                resolv_conf: c(resolv_conf)?,
            }),
        })
    }

    /// Joins the step's network namespace; for host steps also gives the process a
    /// private mount namespace in which the step's `/etc/hosts` and `/etc/resolv.conf`
    /// are bound over the host's.
    ///
    /// Meant for `pre_exec`: no allocation, only system calls.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: raw system calls on descriptors and C strings this value owns.
        unsafe {
            if libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            let Some(files) = &self.etc_files else {
                return Ok(());
            };
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Our binds must not propagate back to the runner's mount namespace.
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            for (source, target) in [
                (&files.hosts, ETC_HOSTS),
                (&files.resolv_conf, ETC_RESOLV_CONF),
            ] {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retired namespaces are kept up to the limit, then closed all at once.
    #[test]
    fn retired_namespaces_are_closed_together_past_the_limit() {
        let open = || OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap());
        for kept in 1..=RETIRED_MAX {
            assert_eq!(retire([open()]), kept);
            assert_eq!(release_past_limit(), kept);
        }
        assert_eq!(retire([open()]), RETIRED_MAX + 1);
        assert_eq!(release_past_limit(), 0);
        assert_eq!(retire([open(), open()]), 2);
        release_retired();
        assert!(RETIRED.lock().unwrap().is_empty());
    }
}
