//! The io_uring backend: `tokio-uring`'s `TcpStream`. Kept behind [`Stream`] so that another
//! io_uring runtime (monoio, compio) could replace it without touching protocol code.

use std::io;

use tokio_uring::buf::BoundedBuf;

use super::{Dial, Stream};

/// A TCP stream driven by io_uring.
pub struct UringStream(pub tokio_uring::net::TcpStream);

impl Stream for UringStream {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        // Read into the spare capacity only: a read into the whole Vec would start at 0.
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, slice) = self.0.read(buf.slice(len..cap)).await;
        (r, slice.into_inner())
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        self.0.write_all(buf).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }
}

impl Dial for UringStream {
    async fn connect(addr: std::net::SocketAddr) -> io::Result<Self> {
        let s = tokio_uring::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(UringStream(s))
    }

    /// tokio-uring cannot bind before connecting, so the bound socket connects on the blocking
    /// pool (bounded by the caller's connect timeout) and is then handed to io_uring.
    async fn connect_from(local: std::net::IpAddr, addr: std::net::SocketAddr) -> io::Result<Self> {
        let socket = super::bound_socket(local, addr)?;
        let connected = tokio::task::spawn_blocking(move || {
            socket.connect(&addr.into())?;
            io::Result::Ok(std::net::TcpStream::from(socket))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(UringStream(tokio_uring::net::TcpStream::from_std(
            connected,
        )))
    }
}
