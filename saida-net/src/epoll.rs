//! The epoll backend: tokio's `TcpStream` on a current-thread runtime.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Dial, Stream};

/// A TCP stream driven by epoll.
pub struct EpollStream(pub tokio::net::TcpStream);

impl Stream for EpollStream {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        let r = self.0.read_buf(&mut buf).await;
        (r, buf)
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let r = self.0.write_all(&buf).await;
        (r, buf)
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

impl Dial for EpollStream {
    async fn connect(addr: std::net::SocketAddr) -> io::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(EpollStream(s))
    }

    async fn connect_from(local: std::net::IpAddr, addr: std::net::SocketAddr) -> io::Result<Self> {
        let socket = super::bound_socket(local, addr)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        Ok(EpollStream(socket.connect(addr).await?))
    }
}
