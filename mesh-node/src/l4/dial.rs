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
/// write half is shut down and the reverse direction keeps flowing. A pipe with no byte in
/// either direction for [`IDLE_TIMEOUT`] (Istio's TCP `idleTimeout` default) ends with
/// `TimedOut`, so idle connections do not hold their buffers forever.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pipe_with_idle(a, b, IDLE_TIMEOUT).await
}

/// Istio's default `connectionPool.tcp.idleTimeout`: one hour.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

async fn pipe_with_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let seen = Activity::default();
    let (mut a, mut b) = (Touch { inner: a, seen: &seen }, Touch { inner: b, seen: &seen });
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PIPE_BUFFER, PIPE_BUFFER);
    let mut copy = std::pin::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = copy.as_mut() => return r,
            _ = tokio::time::sleep(check) => {
                if seen.idle_for() >= idle {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no bytes either way for {idle:?}")));
                }
            }
        }
    }
}

/// When a pipe last moved a byte (milliseconds since it started).
struct Activity {
    start: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { start: std::time::Instant::now(), last_ms: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed)))
    }
}

/// A stream that notes every read that brought bytes.
struct Touch<'a, T: ?Sized> {
    inner: &'a mut T,
    seen: &'a Activity,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Touch<'_, T> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.seen.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Touch<'_, T> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, data: &[u8]) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut *self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn an_idle_pipe_ends_and_a_busy_one_does_not() {
        let (mut a, mut a_far) = tokio::io::duplex(1024);
        let (mut b, mut b_far) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let pump = tokio::spawn(async move { pipe_with_idle(&mut a, &mut b, idle).await });
        // Bytes every 100 ms for a second: the pipe stays up.
        for _ in 0..10 {
            a_far.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            b_far.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!pump.is_finished(), "a busy pipe was cut");
        // Then nothing: it ends within about the idle time.
        let r = tokio::time::timeout(Duration::from_secs(2), pump).await.expect("the idle pipe ended").unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
