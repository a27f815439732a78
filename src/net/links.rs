//! Links and addresses, through rtnetlink in process (no `ip` binary: forking it per
//! step costs ~20x more than the netlink requests themselves).
//!
//! Each [`Netlink`] talks to one namespace: the one its socket was created in.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage, State,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::TokioSocket;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// MTU of the veths: as large as veth allows (like slirp4netns's 65520), so
/// that step-to-step traffic costs about what loopback does; 1500 halves throughput.
pub(crate) const STAGE_MTU: u32 = 65520;

/// Segment size for loopback devices of the stage's namespaces (see `loopback_up`).
const BIG_TCP_SIZE: u32 = 256 * 1024;

/// The loopback device is always index 1 in a new network namespace.
pub(crate) const LOOPBACK_INDEX: u32 = 1;

pub(crate) type NlResult<T> = Result<T, rtnetlink::Error>;

/// A route-netlink connection bound to the namespace its socket was created in.
pub(crate) struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Takes a netlink socket made inside the target namespace. Needs a tokio runtime.
    pub fn new(socket: OwnedFd) -> std::io::Result<Netlink> {
        // SAFETY: ownership of the descriptor moves into the TokioSocket.
        let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    /// Sets `lo` up, with "BIG TCP" segments where the kernel has them (6.3 and
    /// later for IPv4): the port proxy's connections into a step run over the step's
    /// loopback, and 256 KiB segments instead of 64 KiB cost that half of the proxy
    /// about a third less CPU per byte.
    pub async fn loopback_up(&self) -> NlResult<()> {
        match self
            .handle
            .link()
            .set(loopback_big_tcp_up())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            // Older kernels refuse the attributes: plain up.
            Err(_) => self.set_up(LOOPBACK_INDEX).await,
        }
    }

    pub async fn set_up(&self, index: u32) -> NlResult<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
    }

    pub async fn add_address(&self, index: u32, address: Ipv4Addr, prefix_len: u8) -> NlResult<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(address), prefix_len)
            .execute()
            .await
    }

    pub async fn index_of(&self, name: &str) -> NlResult<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        Ok(links.try_next().await?.map(|l| l.header.index))
    }

    /// `address/prefix_len` on link `index` without the route to its subnet the kernel
    /// would add (`noprefixroute`): the subnet is reached through a gateway instead.
    pub async fn add_address_routed(
        &self,
        index: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> NlResult<()> {
        let mut request = self
            .handle
            .address()
            .add(index, IpAddr::V4(address), prefix_len);
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        request.execute().await
    }

    /// A route to `network/prefix_len` through `gateway`, on link `index` (whose
    /// subnet need not hold the gateway: `onlink`).
    pub async fn add_subnet_route(
        &self,
        network: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        index: u32,
    ) -> NlResult<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network, prefix_len)
            .gateway(gateway)
            .output_interface(index)
            .onlink()
            .build();
        self.handle.route().add(route).execute().await
    }

    /// A route to the single address `to` through link `index` (no gateway).
    pub async fn add_host_route(&self, to: Ipv4Addr, index: u32) -> NlResult<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(to, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.handle.route().add(route).execute().await
    }

    /// Creates a veth pair in one request: `name` here, up; its peer `peer_name`
    /// directly inside the namespace `peer_ns`.
    pub async fn add_veth_to(
        &self,
        name: &str,
        peer_name: &str,
        peer_ns: &OwnedFd,
    ) -> NlResult<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(STAGE_MTU)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .mtu(STAGE_MTU)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(message).execute().await
    }

    /// All links of the namespace.
    pub async fn links(&self) -> NlResult<Vec<LinkMessage>> {
        self.handle.link().get().execute().try_collect().await
    }

    /// Waits until every link named in `names` reports operational state up; returns
    /// the names still down when `timeout` passes.
    pub async fn wait_up(&self, names: &[String], timeout: Duration) -> NlResult<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let links = self.links().await?;
            let down: Vec<String> = names
                .iter()
                .filter(|name| !links.iter().any(|l| is_named(l, name) && is_oper_up(l)))
                .cloned()
                .collect();
            if down.is_empty() || Instant::now() >= deadline {
                return Ok(down);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

/// `lo` up with 256 KiB GSO/GRO segments (see [`Netlink::loopback_up`]).
fn loopback_big_tcp_up() -> LinkMessage {
    LinkUnspec::new_with_index(LOOPBACK_INDEX)
        .up()
        .append_extra_attribute(LinkAttribute::GsoMaxSize(BIG_TCP_SIZE))
        .append_extra_attribute(LinkAttribute::GroMaxSize(BIG_TCP_SIZE))
        .append_extra_attribute(LinkAttribute::GsoIpv4MaxSize(BIG_TCP_SIZE))
        .append_extra_attribute(LinkAttribute::GroIpv4MaxSize(BIG_TCP_SIZE))
        .build()
}

/// The loopback device set up as [`Netlink::loopback_up`] does, with blocking requests
/// on a route-netlink `socket` of the namespace: for the namespace's own thread, before
/// any runtime exists (three tokio hand-offs per request cost more than the request).
pub(crate) fn loopback_up_blocking(socket: BorrowedFd<'_>) -> std::io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    match request_blocking(
        socket,
        RouteNetlinkMessage::SetLink(loopback_big_tcp_up()),
        flags,
    ) {
        Ok(()) => Ok(()),
        // Older kernels refuse the attributes: plain up.
        Err(_) => {
            let plain = LinkUnspec::new_with_index(LOOPBACK_INDEX).up().build();
            request_blocking(socket, RouteNetlinkMessage::SetLink(plain), flags)
        }
    }
}

/// `address/prefix_len` on link `index`, as [`Netlink::add_address`] does, blocking.
pub(crate) fn add_address_blocking(
    socket: BorrowedFd<'_>,
    index: u32,
    address: Ipv4Addr,
    prefix_len: u8,
) -> std::io::Result<()> {
    let message = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(index)
        .address(address, prefix_len)
        .build();
    request_blocking(
        socket,
        RouteNetlinkMessage::NewAddress(message),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
    )
}

/// Sends one request to the kernel and waits for its acknowledgement.
fn request_blocking(
    socket: BorrowedFd<'_>,
    message: RouteNetlinkMessage,
    flags: u16,
) -> std::io::Result<()> {
    let mut request = NetlinkMessage::from(message);
    request.header.flags = flags;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    use nix::sys::socket::{recv, sendto, MsgFlags, NetlinkAddr};
    // Pid 0: the kernel.
    sendto(
        socket.as_raw_fd(),
        &buf,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut reply = vec![0u8; 8192];
    loop {
        let n = match recv(socket.as_raw_fd(), &mut reply, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
            .map_err(|e| std::io::Error::other(format!("netlink reply: {e}")))?;
        if message.header.sequence_number != 1 {
            continue;
        }
        return match message.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(()),
        };
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn is_named(link: &LinkMessage, name: &str) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
}

fn is_oper_up(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::OperState(State::Up)))
}
