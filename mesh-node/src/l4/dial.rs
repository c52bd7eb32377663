//! The sockets the proxy opens and closes itself: connects marked as the proxy's own (which the
//! capture counts apart; it never redirects them because the proxy is in no enrolled pod's
//! cgroup), and resets. Used by both ends of the L4 path ([`super::upstream`] and
//! [`super::tunnel`]), which is why it stands apart from them; the byte pump between two
//! connections is [`super::pipe`].
use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection marked as the proxy's own (counted as `proxy_skipped` by the capture).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket2::SockRef::from(&sock).set_mark(mesh_common::PROXY_MARK)?;
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr} timed out after {timeout:?}"))),
    }
}

/// Closes a client connection with a reset, so a refused connection fails at once instead of
/// looking like an empty response.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
