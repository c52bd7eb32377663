//! The sockets the proxy opens and closes itself: connects marked as the proxy's own (which the
//! capture counts apart; it never redirects them because the proxy is in no enrolled pod's
//! cgroup), the byte pump between two connections, and resets. Used by
//! both ends of the L4 path ([`super::upstream`] and [`super::tunnel`]), which is why it stands
//! apart from them.
use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};

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

/// Copies both ways until both sides are done. When one side half-closes, the other side's
/// write half is shut down and the reverse direction keeps flowing.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, PIPE_BUFFER, PIPE_BUFFER).await
}

/// Closes a client connection with a reset, so a refused connection fails at once instead of
/// looking like an empty response.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Each direction's copy buffer of an L4 pipe. Every open pipe holds two: part of what the
/// memory budget (`--memory-budget-mib`) divides into connection caps.
pub const PIPE_BUFFER: usize = 16 * 1024;
