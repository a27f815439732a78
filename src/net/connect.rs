//! Connections from the runner into the stage network (readiness checks of
//! Background steps), made with sockets created inside the network's namespace, as
//! the port proxy's are: the runner itself stays in the host's network namespace.

use tokio::net::TcpStream;

use super::{NetError, StageNetwork};

impl StageNetwork {
    /// One TCP connection to `port` of step `key`, dialled from inside the stage
    /// network: from the step's own namespace to its stage address (pod mode: to
    /// localhost), so that it reaches exactly what other steps reach, over the
    /// namespace's loopback device (no veth or router on the way).
    pub async fn connect(&self, key: &str, port: u16) -> Result<TcpStream, NetError> {
        let target = self.dial_target(key, port)?;
        self.socket_factory()
            .connect(self.step_netns(key)?, target)
            .await
            .map_err(NetError::os("connect inside the stage network"))
    }
}
