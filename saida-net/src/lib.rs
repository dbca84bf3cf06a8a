//! `saida-net`: socket I/O behind one owned-buffer stream type, so that protocol code is the
//! same on both backends: io_uring (`tokio-uring`) and epoll (tokio current-thread).
//!
//! The [`Stream`] shape, `read(buf) -> (result, buf)`, is the one io_uring needs (the kernel owns
//! the buffer while the operation runs) and costs epoll nothing. [`Conn`] adds TLS on top of
//! either backend, so a session can upgrade in place with STARTTLS.
//!
//! Also here: the TLS adapter and configurations (`tls`), the `SO_REUSEPORT` listener every
//! shard binds ([`bind_reuseport`]), and an in-memory stream for transcript tests (`memory`).
//!
//! Not here: protocol, timeouts (the session wraps calls in `tokio::time::timeout`), which
//! listeners exist (the daemon's configuration).

pub mod epoll;
pub mod tls;
pub mod uring;

use std::io;

/// A byte stream with owned buffers.
#[allow(async_fn_in_trait)] // single-threaded runtimes: the futures need not be Send
pub trait Stream {
    /// Appends what arrives to `buf` (at most its spare capacity; reserve first). `Ok(0)` is
    /// end of stream.
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Closes the write side (after a TLS close_notify on TLS streams).
    async fn shutdown(&mut self) -> io::Result<()>;
}

/// A stream that can open an outbound TCP connection (`TCP_NODELAY` set), for delivery.
#[allow(async_fn_in_trait)]
pub trait Dial: Stream + Sized {
    async fn connect(addr: std::net::SocketAddr) -> io::Result<Self>;
    /// Connects from the local address `local` (an egress source), `TCP_NODELAY` set.
    async fn connect_from(local: std::net::IpAddr, addr: std::net::SocketAddr) -> io::Result<Self>;
}

/// A socket bound to `local` (any port), ready to connect to `addr`.
fn bound_socket(
    local: std::net::IpAddr,
    addr: std::net::SocketAddr,
) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&std::net::SocketAddr::new(local, 0).into())?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// A connection: plain, or TLS over the same stream.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tls::TlsStream<S>>),
    /// Transitional state while a STARTTLS handshake owns the stream.
    Closed,
}

impl<S: Stream> Conn<S> {
    /// True once TLS is established.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// TLS protocol version and cipher suite, for `Received:` headers and logs.
    pub fn tls_info(&self) -> Option<(String, String)> {
        match self {
            Conn::Tls(t) => Some(t.info()),
            _ => None,
        }
    }
}

impl<S: Stream> Stream for Conn<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(t) => t.read(buf).await,
            Conn::Closed => (Err(io::ErrorKind::NotConnected.into()), buf),
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Conn::Plain(s) => s.write_all(buf).await,
            Conn::Tls(t) => t.write_all(buf).await,
            Conn::Closed => (Err(io::ErrorKind::NotConnected.into()), buf),
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(t) => t.shutdown().await,
            Conn::Closed => Ok(()),
        }
    }
}

/// Backlog of every listener.
pub const LISTEN_BACKLOG: i32 = 1024;

/// A non-blocking TCP listener on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT` (so every shard
/// binds the same address and the kernel spreads connections), IPv6 listeners IPv6-only.
pub fn bind_reuseport(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// An in-memory stream for transcript tests: reads come from a script, writes are collected.
pub mod memory {
    use super::Stream;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io;
    use std::rc::Rc;

    /// One side of a scripted conversation. Each `read` returns the next scripted chunk; an
    /// empty script is end of stream.
    #[derive(Clone, Default)]
    pub struct MemoryStream {
        pub input: Rc<RefCell<VecDeque<Vec<u8>>>>,
        pub output: Rc<RefCell<Vec<u8>>>,
        /// When the script is exhausted, wait forever instead of reporting end of stream (to
        /// test timeouts).
        pub hang_at_end: bool,
    }

    impl Stream for MemoryStream {
        async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            // Yield so that sessions interleave as on a socket.
            tokio::task::yield_now().await;
            let next = self.input.borrow_mut().pop_front();
            let Some(chunk) = next else {
                if self.hang_at_end {
                    std::future::pending::<()>().await;
                }
                return (Ok(0), buf);
            };
            buf.extend_from_slice(&chunk);
            (Ok(chunk.len()), buf)
        }

        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            self.output.borrow_mut().extend_from_slice(&buf);
            (Ok(()), buf)
        }

        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
