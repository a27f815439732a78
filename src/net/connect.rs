//! Connections from the runner into the stage network (readiness checks of
//! Background steps), made with sockets created inside the network's namespace, as
//! the port proxy's are: the runner itself stays in the host's network namespace.

use tokio::net::{TcpSocket, TcpStream};

use super::{NetError, StageNetwork};

impl StageNetwork {
    /// One TCP connection to `port` of step `key`, dialled from inside the stage
    /// network (the bridge in bridge mode, the shared namespace in pod mode).
    pub async fn connect(&self, key: &str, port: u16) -> Result<TcpStream, NetError> {
        let target = self.dial_target(key, port)?;
        let domain = if target.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = self
            .socket_factory()
            .stream_socket(domain)
            .await
            .map_err(NetError::os("create a socket in the stage network"))?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket
            .connect(target)
            .await
            .map_err(NetError::os("connect inside the stage network"))
    }
}
