//! Shared pieces of saida's benchmarks: the closed-loop SMTP load generator (N connections, each
//! pipelining MAIL, RCPT and DATA; latency from end of DATA to the reply in an HDR histogram),
//! process helpers, and the Postfix peer's control script.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What one load run measured.
#[derive(Clone, Debug)]
pub struct LoadResult {
    /// Replies per second over the run.
    pub rate: f64,
    /// End of DATA → reply, milliseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub errors: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Sends `n` messages of `size` bytes over `conns` connections to 127.0.0.1:`port`.
pub fn run_load(port: u16, conns: usize, n: usize, size: usize) -> anyhow::Result<LoadResult> {
    run_load_to(port, conns, n, size, 1000, false)
}

/// Like [`run_load`], spreading recipients over `domains` domains (`user<i>@d<i % domains>.test`)
/// and, with `stamp`, starting each message with `X-Saida-Sent: <µs since the epoch>` so that a
/// sink can measure end-to-end latency.
pub fn run_load_to(
    port: u16,
    conns: usize,
    n: usize,
    size: usize,
    domains: usize,
    stamp: bool,
) -> anyhow::Result<LoadResult> {
    run_load_at(
        ([127, 0, 0, 1], port).into(),
        conns,
        n,
        size,
        domains,
        stamp,
    )
}

/// [`run_load_to`] against any address.
pub fn run_load_at(
    addr: SocketAddr,
    conns: usize,
    n: usize,
    size: usize,
    domains: usize,
    stamp: bool,
) -> anyhow::Result<LoadResult> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address; benchmarks only send to 127.0.0.0/8 and ::1");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let next = Arc::new(AtomicUsize::new(0));
        let body = Arc::new(message_body(size));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (next, body) = (Arc::clone(&next), Arc::clone(&body));
            tasks.push(tokio::task::spawn_local(async move {
                connection(addr, next, n, body, domains, stamp).await
            }));
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut errors = 0;
        for t in tasks {
            match t.await? {
                Ok((h, e)) => {
                    hist.add(&h)?;
                    errors += e;
                }
                Err(e) => bail!("client connection failed: {e:#}"),
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let ms = |q| hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(LoadResult {
            elapsed: start.elapsed(),
            rate: hist.len() as f64 / elapsed,
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            errors,
        })
    })
}

/// A message of about `size` bytes, dot-stuffed and terminated for DATA (smtp-proto).
pub fn message_body(size: usize) -> Vec<u8> {
    let mut b =
        b"From: bench@origin.test\r\nTo: rcpt@dest.test\r\nSubject: benchmark\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while b.len() + line.len() <= size {
        b.extend_from_slice(line);
    }
    let mut stuffed = Vec::with_capacity(b.len() + 8);
    smtp_proto::client::dot_stuff(&b, &mut stuffed);
    stuffed
}

/// Reads replies from a server with smtp-proto's bounded parser.
struct Replies {
    r: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

impl Replies {
    /// The next reply.
    async fn next(&mut self) -> anyhow::Result<smtp_proto::client::ServerReply> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((reply, consumed)) = smtp_proto::client::parse_reply(&self.buf)? {
                self.buf.drain(..consumed);
                return Ok(reply);
            }
            let mut chunk = [0u8; 8192];
            let n = self.r.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed by server");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One closed-loop connection: takes message numbers until `n` are sent. Returns the latency
/// histogram (µs, end of DATA → reply) and the count of non-250 replies.
async fn connection(
    addr: SocketAddr,
    next: Arc<AtomicUsize>,
    n: usize,
    body: Arc<Vec<u8>>,
    domains: usize,
    stamp: bool,
) -> anyhow::Result<(Histogram<u64>, usize)> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut errors = 0;
    let stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = Replies {
        r,
        buf: Vec::with_capacity(4096),
    };
    r.next().await?;
    w.write_all(b"EHLO bench.test\r\n").await?;
    r.next().await?;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let envelope = format!(
            "MAIL FROM:<bench@origin.test>\r\nRCPT TO:<user{i}@d{}.test>\r\nDATA\r\n",
            i % domains.max(1)
        );
        w.write_all(envelope.as_bytes()).await?;
        let mut last = 0;
        for _ in 0..3 {
            last = r.next().await?.code;
        }
        if last != 354 {
            errors += 1;
            w.write_all(b"RSET\r\n").await?;
            r.next().await?;
            continue;
        }
        out.clear();
        if stamp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            out.extend_from_slice(format!("X-Saida-Sent: {now}\r\n").as_bytes());
        }
        out.extend_from_slice(&body);
        w.write_all(&out).await?;
        let t0 = Instant::now();
        if r.next().await?.code == 250 {
            hist.saturating_record(t0.elapsed().as_micros() as u64);
        } else {
            errors += 1;
        }
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok((hist, errors))
}

/// Kills and reaps a child process when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs scripts/postfix-bench.sh `cmd port [relay]`.
pub fn postfix_ctl(root: &Path, cmd: &str, port: u16, relay: Option<&str>) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(root.join("scripts/postfix-bench.sh"))
        .args([cmd, &port.to_string()])
        .args(relay)
        .status()
        .context("scripts/postfix-bench.sh")?;
    if !status.success() {
        bail!("scripts/postfix-bench.sh {cmd} failed");
    }
    Ok(())
}

/// The repository root, found from the running executable's path.
pub fn repo_root() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/release/smtp-bench -> repository root
    exe.ancestors()
        .find(|p| p.join("Cargo.toml").exists() && p.join("engine").exists())
        .map(Path::to_path_buf)
        .context("run smtp-bench from the repository's target directory")
}
