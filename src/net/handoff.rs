//! Host connections to a bound port handed to the service itself.
//!
//! The port proxy (`proxy`) moves every byte through a second TCP connection and a
//! third busy party: on two cores that costs about 40% of the throughput of a direct
//! loopback connection. The runner does better by answering the service's `accept`
//! calls: the step runs under a seccomp filter that sends `accept` and `accept4` to a
//! user-notification listener, which reaches a unix socket of the runner's
//! ([`Handoff::listen`]). A container's filter is in its OCI spec and libcontainer
//! sends the listener; a host step's `__host-init` loads the same filter itself.
//!
//! When the service accepts on a listener of a bound port, the runner accepts on its
//! behalf, on a duplicate of that listener (`pidfd_getfd`), and installs the result in
//! the service as the call's return value (`SECCOMP_IOCTL_NOTIF_ADDFD`):
//! - a connection the runner dialled as a *placeholder* for a host connection is
//!   exchanged for that host connection, which then belongs to the service: client
//!   and service talk over the host's loopback, with nothing in between;
//! - any other connection (from another step) is given as it came.
//!
//! The placeholder is what wakes the service: a server waits for its listener to
//! become readable (epoll, poll, a blocking `accept`) before it accepts, and only a
//! connection to that listener makes it so. Everything else is answered "go on"
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`): other listeners, other ABIs.
//!
//! Nothing depends on the exchange happening. A host connection that no `accept` of
//! the service claimed within [`CLAIM_TIMEOUT`] (a server that accepts through
//! io_uring, say) is proxied to its placeholder, which the service then accepts as an
//! ordinary connection; so is an IPv6 client of a service that listens on IPv4 only.
//! An IPv4 client of a dual-stack IPv6 listener is handed over with its IPv4-mapped
//! address, as the kernel would report it; the socket itself stays IPv4.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpStream as StdStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixListener;
use tokio::sync::oneshot;

/// How long a host connection waits for the service's `accept` before it is proxied.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a runner waiting for a connection on behalf of a blocking `accept` checks
/// that the call is still there (a signal or the end of the thread withdraws it).
const WITHDRAWN_CHECK: Duration = Duration::from_millis(200);

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH_NATIVE: u32 = 0;

/// What the task holding a placeholder learns: `None` when the service took the host
/// connection, `Some(host)` when it is to be proxied after all.
pub type Verdict = Option<StdStream>;

type Waiting = (StdStream, oneshot::Sender<Verdict>);

/// One step's bound ports and the host connections waiting for its `accept`.
pub struct Handoff {
    key: String,
    ports: Vec<u16>,
    attached: AtomicBool,
    /// Placeholder address (IPv4 as such, even where a dual-stack listener sees it
    /// mapped) -> host connection.
    waiting: Mutex<HashMap<SocketAddr, Waiting>>,
    /// Connections accepted for an `accept` that was withdrawn before it got them, by
    /// listener (socket inode): the next `accept` on that listener gets them first.
    stash: Mutex<HashMap<u64, VecDeque<(OwnedFd, SocketAddr)>>>,
    /// Wakes the calls waiting for a connection when one goes to the stash.
    stashed: tokio::sync::Notify,
    /// One accept at a time per step: two calls woken by one connection must not both
    /// accept, or the second would block on a listener with nothing queued.
    accepting: tokio::sync::Mutex<()>,
}

impl Handoff {
    pub fn new(key: &str, ports: Vec<u16>) -> Arc<Handoff> {
        Arc::new(Handoff {
            key: key.to_string(),
            ports,
            attached: AtomicBool::new(false),
            waiting: Mutex::new(HashMap::new()),
            stash: Mutex::new(HashMap::new()),
            stashed: tokio::sync::Notify::new(),
            accepting: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether the step's `accept` calls reach the runner (its container has started
    /// with the filter), so that a placeholder will be claimed.
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Parks `host` until the service accepts the placeholder connected from
    /// `placeholder`.
    pub fn park(&self, placeholder: SocketAddr, host: StdStream) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(placeholder, (host, tx));
        rx
    }

    /// Takes back a host connection that is still parked (nobody claimed it).
    pub fn unpark(&self, placeholder: &SocketAddr) -> Option<StdStream> {
        lock(&self.waiting)
            .remove(placeholder)
            .map(|(host, _)| host)
    }

    /// Binds the unix socket libcontainer sends the step's seccomp listener to, and
    /// answers the step's `accept` calls from then on (the task ends with the proxy
    /// server; the calls of a live step are still answered by their own tasks).
    pub fn listen(self: &Arc<Handoff>, path: &Path) -> io::Result<tokio::task::JoinHandle<()>> {
        let _ = std::fs::remove_file(path);
        let listener = StdUnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let handoff = self.clone();
        let path = path.to_path_buf();
        Ok(tokio::spawn(async move {
            loop {
                let notify = match receive_listener(&listener).await {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::warn!(step = %handoff.key, socket = %path.display(), "no seccomp listener from the step: {e}");
                        // Whatever failed (descriptors run out, say) may go on failing.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tracing::debug!(step = %handoff.key, "accept calls of the step reach the runner");
                handoff.attached.store(true, Ordering::Release);
                tokio::spawn(handoff.clone().supervise(notify));
            }
        }))
    }

    /// Receives the step's notifications until the last process under the filter is
    /// gone. Each one is answered on a task of its own: an `accept` on a blocking
    /// listener may wait for a connection.
    async fn supervise(self: Arc<Handoff>, notify: OwnedFd) {
        // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
        let notify = match unsafe { AsyncFd::register_with_interest(notify, Interest::READABLE) } {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                tracing::warn!(step = %self.key, "cannot watch the seccomp listener: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = notify.readable().await else {
                return;
            };
            loop {
                let fd = notify.get_ref().as_raw_fd();
                match pending(fd) {
                    Pending::Notification => {}
                    Pending::Nothing => {
                        guard.clear_ready();
                        break;
                    }
                    Pending::Gone => return,
                }
                // A notification is pending (POLLIN): this does not block.
                let n = match crate::sys::seccomp_notify::receive(fd) {
                    Ok(n) => n,
                    // Withdrawn between poll and receive, or a signal.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {
                        continue
                    }
                    Err(e) => {
                        tracing::warn!(step = %self.key, "seccomp listener failed: {e}");
                        return;
                    }
                };
                tokio::spawn(self.clone().answer(notify.clone(), n));
            }
        }
    }

    async fn answer(self: Arc<Handoff>, notify: Arc<AsyncFd<OwnedFd>>, n: libc::seccomp_notif) {
        let fd = notify.get_ref().as_raw_fd();
        let call = AcceptCall::from(&n);
        tracing::trace!(step = %self.key, nr = n.data.nr, pid = n.pid, fd = n.data.args[0], "accept call of the step");
        let Some(call) = call else {
            go_on(fd, n.id);
            return;
        };
        let Some((listener, local)) = self.bound_listener(fd, &call) else {
            go_on(fd, n.id);
            return;
        };
        let inode = socket_inode(&listener);
        let blocking = fd_flags(&listener) & libc::O_NONBLOCK == 0;
        // Registered with the runtime only if the call has to wait for a connection.
        let mut watch: Option<AsyncFd<OwnedFd>> = None;
        loop {
            // A call withdrawn meanwhile (a signal) takes nothing: the caller makes it
            // again, and that call is answered.
            if !id_valid(fd, n.id) {
                return;
            }
            let accepted = {
                let _one = self.accepting.lock().await;
                let stashed = lock(&self.stash)
                    .get_mut(&inode)
                    .and_then(VecDeque::pop_front);
                match stashed {
                    Some(got) => Ok(got),
                    None if blocking => accept_ready(&listener).await,
                    // A non-blocking listener never blocks accept(2): no thread needed.
                    None => accept_now(listener.as_raw_fd()),
                }
            };
            match accepted {
                Ok((conn, peer)) => {
                    let (conn, peer) = self.exchange(conn, peer, local.is_ipv4());
                    if let Err(back) = install(fd, &call, conn, peer) {
                        lock(&self.stash).entry(inode).or_default().push_back(back);
                        self.stashed.notify_waiters();
                    }
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && blocking => {
                    if watch.is_none() {
                        let dup = match listener.try_clone() {
                            Ok(d) => d,
                            Err(e) => return fail(fd, n.id, e.raw_os_error().unwrap_or(libc::EIO)),
                        };
                        // SAFETY: the AsyncFd owns the duplicate while it is registered.
                        match unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) } {
                            Ok(w) => watch = Some(w),
                            Err(_) => return fail(fd, n.id, libc::EIO),
                        }
                    }
                    let Some(w) = &watch else { return };
                    tokio::select! {
                        ready = w.readable() => match ready {
                            Ok(mut g) => g.clear_ready(),
                            Err(_) => return fail(fd, n.id, libc::EIO),
                        },
                        _ = self.stashed.notified() => {}
                        // Checked at the top of the loop.
                        _ = tokio::time::sleep(WITHDRAWN_CHECK) => {}
                    }
                }
                Err(e) => {
                    return fail(fd, n.id, e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
    }

    /// The listener the call is about, when it is one of a bound port (a duplicate of
    /// the service's descriptor).
    fn bound_listener(&self, notify: RawFd, call: &AcceptCall) -> Option<(OwnedFd, SocketAddr)> {
        let listener = match take_fd(call.pid, call.fd) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(step = %self.key, "cannot take descriptor {} of process {}: {e}", call.fd, call.pid);
                return None;
            }
        };
        // The pid could have been reused if the call was withdrawn meanwhile.
        if !id_valid(notify, call.id) {
            return None;
        }
        if !socket::getsockopt(&listener, sockopt::AcceptConn).unwrap_or(false) {
            return None;
        }
        let local = local_addr(listener.as_raw_fd())?;
        self.ports
            .contains(&local.port())
            .then_some((listener, local))
    }

    /// The connection the service gets for `conn`, accepted from `peer`: the host
    /// connection parked behind that placeholder, or `conn` itself.
    fn exchange(
        &self,
        conn: OwnedFd,
        peer: SocketAddr,
        listener_v4: bool,
    ) -> (OwnedFd, SocketAddr) {
        let Some((host, verdict)) = lock(&self.waiting).remove(&unmapped(peer)) else {
            return (conn, peer);
        };
        let host_peer = host.peer_addr().unwrap_or(peer);
        // The peer as the service's listener would have said it: an IPv4 client of a
        // dual-stack IPv6 listener is an IPv4-mapped address.
        let said = match (unmapped(host_peer), listener_v4) {
            (SocketAddr::V4(a), false) => SocketAddr::from((a.ip().to_ipv6_mapped(), a.port())),
            (SocketAddr::V6(_), true) => {
                // An IPv6 client cannot reach an IPv4 listener: proxy it instead.
                let _ = verdict.send(Some(host));
                return (conn, peer);
            }
            (same, _) => same,
        };
        let _ = verdict.send(None);
        (OwnedFd::from(host), said)
    }
}

/// `addr` with an IPv4-mapped IPv6 address (as a dual-stack listener reports an IPv4
/// peer) turned back into IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// An `accept` or `accept4` of the native ABI, as the notification describes it.
struct AcceptCall {
    id: u64,
    pid: u32,
    fd: i32,
    addr: u64,
    addrlen: u64,
    flags: i32,
}

impl AcceptCall {
    fn from(n: &libc::seccomp_notif) -> Option<AcceptCall> {
        if n.data.arch != AUDIT_ARCH_NATIVE {
            return None;
        }
        let nr = n.data.nr as libc::c_long;
        let flags = if nr == libc::SYS_accept4 {
            n.data.args[3] as i32
        } else if nr == libc::SYS_accept {
            0
        } else {
            return None;
        };
        Some(AcceptCall {
            id: n.id,
            pid: n.pid,
            fd: n.data.args[0] as i32,
            addr: n.data.args[1],
            addrlen: n.data.args[2],
            flags,
        })
    }
}

/// Installs `conn` in the calling process as the return value of the call, with the
/// peer address written where it asked. On failure (the call was withdrawn) the
/// connection comes back, for the next `accept`.
fn install(
    notify: RawFd,
    call: &AcceptCall,
    conn: OwnedFd,
    peer: SocketAddr,
) -> Result<(), (OwnedFd, SocketAddr)> {
    // O_NONBLOCK lives on the open file, which the service now shares.
    let _ = set_nonblocking(&conn, call.flags & libc::SOCK_NONBLOCK != 0);
    if call.addr != 0 {
        if let Err(e) = write_peer(call, peer) {
            // As the kernel would: the call fails, the connection is dropped.
            fail(notify, call.id, e.raw_os_error().unwrap_or(libc::EFAULT));
            return Ok(());
        }
    }
    let addfd = libc::seccomp_notif_addfd {
        id: call.id,
        flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
        srcfd: conn.as_raw_fd() as u32,
        newfd: 0,
        newfd_flags: if call.flags & libc::SOCK_CLOEXEC != 0 {
            libc::O_CLOEXEC as u32
        } else {
            0
        },
    };
    // The kernel duplicates `srcfd` into the caller and answers the call with its
    // number.
    if let Err(e) = crate::sys::seccomp_notify::add_fd(notify, &addfd) {
        if e.raw_os_error() == Some(libc::ENOENT) {
            // Withdrawn (a signal): the next accept gets it.
            return Err((conn, peer));
        }
        // Never leave the service waiting: servers retry after this error.
        tracing::warn!("cannot give a connection from {peer} to the service: {e}");
        fail(notify, call.id, libc::ECONNABORTED);
    }
    Ok(())
}

/// Writes `peer` to the caller's `addr` (at most `*addrlen` bytes) and its full size
/// to `*addrlen`, as accept(2) does.
fn write_peer(call: &AcceptCall, peer: SocketAddr) -> io::Result<()> {
    let mut room = [0u8; 4];
    remote_io(call.pid, call.addrlen, &mut room, false)?;
    let room = u32::from_ne_bytes(room) as usize;
    let addr = SockaddrStorage::from(peer);
    let len = addr.len() as usize;
    // SAFETY: `addr` holds `len` initialised bytes of a sockaddr_in or sockaddr_in6.
    let bytes = unsafe { std::slice::from_raw_parts(addr.as_ptr().cast::<u8>(), len) };
    let mut head = bytes[..len.min(room)].to_vec();
    remote_io(call.pid, call.addr, &mut head, true)?;
    let mut size = (len as u32).to_ne_bytes();
    remote_io(call.pid, call.addrlen, &mut size, true)
}

/// Reads or writes `buf` at `addr` in process `pid`.
fn remote_io(pid: u32, addr: u64, buf: &mut [u8], write: bool) -> io::Result<()> {
    use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let n = if write {
        process_vm_writev(pid, &[io::IoSlice::new(buf)], &remote)
    } else {
        process_vm_readv(pid, &mut [io::IoSliceMut::new(buf)], &remote)
    }?;
    if n != len {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

/// A duplicate of descriptor `fd` of process `pid`.
fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    crate::sys::pidfd_getfd(crate::sys::pidfd_open(pid, false)?, fd)
}

/// Accepts a connection if one is queued (EAGAIN if not), without touching the
/// listener's own O_NONBLOCK, which the service shares: accept(2) on a blocking
/// listener blocks whatever flags it gets, so it runs on a thread of its own, after
/// poll(2) has seen a connection. (Only a process accepting behind the runner's back,
/// through io_uring say, could take it first: then that thread waits for the next.)
async fn accept_ready(listener: &OwnedFd) -> io::Result<(OwnedFd, SocketAddr)> {
    if poll_now(listener.as_raw_fd()) & libc::POLLIN == 0 {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    let listener = listener.try_clone()?;
    tokio::task::spawn_blocking(move || accept_now(listener.as_raw_fd()))
        .await
        .map_err(io::Error::other)?
}

/// Accepts on `listener` (blocking if it is blocking: see [`accept_ready`]); the
/// connection's flags are set when it is installed.
fn accept_now(listener: RawFd) -> io::Result<(OwnedFd, SocketAddr)> {
    let (conn, peer) = borrow_listener(listener).accept()?;
    Ok((OwnedFd::from(conn), peer))
}

/// The local address of socket `fd`.
fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    borrow_listener(fd).local_addr().ok()
}

/// `fd`, a descriptor this process holds, as std's listener, which parses socket
/// addresses; not closed when dropped.
fn borrow_listener(fd: RawFd) -> std::mem::ManuallyDrop<std::net::TcpListener> {
    // SAFETY: `fd` stays open for the borrow's life; ManuallyDrop never closes it.
    std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

fn socket_inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .map(|s| s.st_ino)
        .unwrap_or(0)
}

fn fd_flags(fd: &OwnedFd) -> i32 {
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0)
}

fn set_nonblocking(fd: &OwnedFd, on: bool) -> io::Result<()> {
    let flags = fd_flags(fd);
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    let flags = nix::fcntl::OFlag::from_bits_retain(flags);
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

enum Pending {
    Notification,
    Nothing,
    Gone,
}

/// Whether a notification waits, without blocking (RECV itself would block).
fn pending(notify: RawFd) -> Pending {
    let revents = poll_now(notify);
    if revents & libc::POLLIN != 0 {
        Pending::Notification
    } else if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Pending::Gone
    } else {
        Pending::Nothing
    }
}

/// What poll(2) says of `fd` for reading right now (its revents; 0 for nothing).
fn poll_now(fd: RawFd) -> libc::c_short {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: the caller holds `fd` open for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0].revents().map_or(0, |r| r.bits()),
        _ => 0,
    }
}

fn id_valid(notify: RawFd, id: u64) -> bool {
    crate::sys::seccomp_notify::id_valid(notify, id)
}

fn respond(notify: RawFd, id: u64, error: i32, flags: u32) {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags,
    };
    // ENOENT (withdrawn) is fine.
    let _ = crate::sys::seccomp_notify::send(notify, &resp);
}

/// Lets the call run as if nothing had watched it.
fn go_on(notify: RawFd, id: u64) {
    respond(notify, id, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32);
}

fn fail(notify: RawFd, id: u64, errno: i32) {
    respond(notify, id, -errno, 0);
}

/// Accepts libcontainer's connection on `listener` and takes the descriptor it sends
/// (its message, the container's state, is not needed).
async fn receive_listener(listener: &UnixListener) -> io::Result<OwnedFd> {
    let (conn, _) = listener.accept().await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        conn.readable().await?;
        let got = conn.try_io(Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let msg = socket::recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(got) = c {
                    fds.extend(got);
                }
            }
            Ok((msg.bytes, fds))
        });
        match got {
            Ok((_, fds)) if !fds.is_empty() => {
                let mut owned: Vec<OwnedFd> = fds
                    .into_iter()
                    // SAFETY: SCM_RIGHTS installed these descriptors for us alone.
                    .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
                    .collect();
                return Ok(owned.swap_remove(0));
            }
            Ok((0, _)) => return Err(io::Error::other("closed without a descriptor")),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether this machine can hand connections over:
/// - seccomp's ADDFD with the SEND flag came with Linux 5.14;
/// - the kernel must offer user notification (`user_notif`; a sandbox may not);
/// - sandrun must not run under a seccomp filter itself (inside a step of another
///   sandrun with bound ports, say): the kernel allows one listener per filter chain,
///   and a second would fail the step instead of falling back to the proxy;
/// - the calls are told apart on x86_64 and aarch64 only.
pub fn supported() -> bool {
    if AUDIT_ARCH_NATIVE == 0 {
        return false;
    }
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let notify = read("/proc/sys/kernel/seccomp/actions_avail")
        .split_whitespace()
        .any(|a| a == "user_notif");
    let filtered = read("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .is_none_or(|mode| mode.trim() != "0");
    crate::sys::kernel_at_least(5, 14) && notify && !filtered
}

/// Where the step's listener socket goes: in the stage's private state directory.
pub fn socket_path(state_dir: &Path, key: &str) -> PathBuf {
    state_dir.join(format!("accept-{key}.sock"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
