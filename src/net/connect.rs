//! Connections from the runner into the stage network (readiness checks of
//! Background steps), made with sockets created inside the network's namespace, as
//! the port proxy's are: the runner itself stays in the host's network namespace.

use tokio::net::{TcpSocket, TcpStream};

use super::{NetError, StageNetwork};

impl StageNetwork {
    /// One TCP connection to `port` of step `key`, dialled from inside the stage
    /// network: from the step's own namespace to its stage address (pod mode: to
    /// localhost), so that it reaches exactly what other steps reach, over the
    /// namespace's loopback device (no bridge or veth on the way).
    pub async fn connect(&self, key: &str, port: u16) -> Result<TcpStream, NetError> {
        let target = self.dial_target(key, port)?;
        let socket = self.dial_socket(key, &target).await?;
        socket
            .connect(target)
            .await
            .map_err(NetError::os("connect inside the stage network"))
    }

    /// A socket in step `key`'s namespace, for connecting to `target`.
    pub(crate) async fn dial_socket(
        &self,
        key: &str,
        target: &std::net::SocketAddr,
    ) -> Result<TcpSocket, NetError> {
        let domain = if target.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = self
            .socket_factory()
            .stream_socket(domain, Some(self.step_netns(key)?))
            .await
            .map_err(NetError::os("create a socket in the stage network"))?;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
    }
}
