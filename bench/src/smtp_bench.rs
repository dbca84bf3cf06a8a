//! `smtp-bench`: SMTP injection throughput and end-of-DATA → `250` latency, for saida on both
//! I/O backends, beside a discarding sink (the ceiling: the same client, no storage) and, with
//! `--compare postfix`, Postfix's smtpd accepting the same load with fsync on, all in one run.
//!
//! Every target runs as its own process on loopback; the client is one closed-loop process with
//! N connections, each pipelining MAIL, RCPT and DATA. Usage:
//! `cargo run --release -p saida-bench --bin smtp-bench -- [--compare postfix] [--json]`.
//! Results are recorded in docs/benchmarks.md.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "SMTP injection: saida (io_uring, epoll) beside a discarding sink and Postfix")]
struct Args {
    /// Message sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [2048usize, 102400])]
    sizes: Vec<usize>,
    /// Concurrent connections.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 50, 500])]
    connections: Vec<usize>,
    /// Messages per saida/sink run (halved for 100 KB and above).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Messages per Postfix run (it is much slower).
    #[arg(long, default_value_t = 2_000)]
    postfix_messages: usize,
    /// Also measure Postfix (installed and configured by scripts/postfix-bench.sh).
    #[arg(long)]
    compare: Option<String>,
    /// Print one JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
    /// Internal: run the discarding sink on this port.
    #[arg(long, hide = true)]
    sink: Option<u16>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.sink {
        return run_sink(port);
    }
    if args.compare.as_deref().is_some_and(|c| c != "postfix") {
        bail!("--compare takes `postfix`");
    }
    let root = repo_root()?;
    let saida = root.join("target/release/saida");
    if !saida.exists() {
        bail!(
            "{} is missing: cargo build --release -p saida",
            saida.display()
        );
    }
    if !args.json {
        println!(
            "{:>7} {:>5} {:<16} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>9}",
            "size",
            "conns",
            "target",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "x postfix",
            "x sink"
        );
    }
    for &size in &args.sizes {
        for &conns in &args.connections {
            let n = if size >= 100_000 {
                args.messages / 2
            } else {
                args.messages
            }
            .max(conns);
            let sink = {
                let port = free_port()?;
                let exe = std::env::current_exe()?;
                let child = Command::new(exe)
                    .args(["--sink", &port.to_string()])
                    .spawn()?;
                let _guard = KillOnDrop(child);
                wait_port(port)?;
                run_load(port, conns, n, size)?
            };
            let postfix = if args.compare.is_some() {
                let port = 2526;
                postfix_ctl(&root, "start", port)?;
                let r = run_load(port, conns, args.postfix_messages.max(conns), size);
                postfix_ctl(&root, "stop", port)?;
                Some(r?)
            } else {
                None
            };
            let mut rows = Vec::new();
            for backend in ["io_uring", "epoll"] {
                let dir = tempfile::tempdir()?;
                let port = free_port()?;
                let config = format!(
                    "[server]\nshards = 2\nbackend = \"{backend}\"\n\
                     [[listener]]\naddress = \"127.0.0.1:{port}\"\n[spool]\ndir = \"{}\"\n\
                     [smtp]\nconnections_per_ip_max = 100000\n[log]\nlevel = \"warn\"\n",
                    dir.path().join("spool").display()
                );
                let path = dir.path().join("saida.toml");
                std::fs::write(&path, config)?;
                let child = Command::new(&saida)
                    .args(["run", "--config"])
                    .arg(&path)
                    .stderr(Stdio::null())
                    .spawn()?;
                let _guard = KillOnDrop(child);
                wait_port(port)?;
                rows.push((
                    format!("saida ({backend})"),
                    run_load(port, conns, n, size)?,
                ));
            }
            if let Some(p) = &postfix {
                rows.push(("postfix smtpd".into(), p.clone()));
            }
            rows.push(("sink (ceiling)".into(), sink.clone()));
            for (name, r) in &rows {
                let vs_postfix = postfix.as_ref().map(|p| r.rate / p.rate);
                let vs_sink = r.rate / sink.rate;
                if args.json {
                    println!(
                        "{{\"bench\":\"smtp-inject\",\"size\":{size},\"connections\":{conns},\
                         \"target\":\"{name}\",\"msgs_per_s\":{:.0},\"p50_ms\":{:.3},\
                         \"p99_ms\":{:.3},\"p999_ms\":{:.3},\"errors\":{},\"x_postfix\":{},\
                         \"x_sink\":{vs_sink:.3}}}",
                        r.rate,
                        r.p50,
                        r.p99,
                        r.p999,
                        r.errors,
                        vs_postfix.map_or("null".into(), |v| format!("{v:.2}"))
                    );
                } else {
                    println!(
                        "{size:>7} {conns:>5} {name:<16} | {:>9.0} {:>8.2} {:>8.2} {:>8.2} \
                         | {:>9} {:>9.2}{}",
                        r.rate,
                        r.p50,
                        r.p99,
                        r.p999,
                        vs_postfix.map_or("-".into(), |v| format!("{v:.1}")),
                        vs_sink,
                        if r.errors > 0 {
                            format!("  ({} errors)", r.errors)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone)]
struct LoadResult {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: usize,
}

/// Sends `n` messages of `size` bytes over `conns` connections to 127.0.0.1:`port`.
fn run_load(port: u16, conns: usize, n: usize, size: usize) -> anyhow::Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let next = Arc::new(AtomicUsize::new(0));
        let body = Arc::new(message_body(size));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (next, body) = (Arc::clone(&next), Arc::clone(&body));
            tasks.push(tokio::task::spawn_local(async move {
                connection(addr, next, n, body).await
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
            rate: hist.len() as f64 / elapsed,
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            errors,
        })
    })
}

fn message_body(size: usize) -> Vec<u8> {
    let mut b =
        b"From: bench@origin.test\r\nTo: rcpt@dest.test\r\nSubject: benchmark\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while b.len() + line.len() <= size {
        b.extend_from_slice(line);
    }
    b.extend_from_slice(b".\r\n");
    b
}

/// One closed-loop connection: takes message numbers until `n` are sent. Returns the latency
/// histogram (µs, end of DATA → reply) and the count of non-250 replies.
async fn connection(
    addr: SocketAddr,
    next: Arc<AtomicUsize>,
    n: usize,
    body: Arc<Vec<u8>>,
) -> anyhow::Result<(Histogram<u64>, usize)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut errors = 0;
    let stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    read_reply(&mut r, &mut line).await?;
    w.write_all(b"EHLO bench.test\r\n").await?;
    read_reply(&mut r, &mut line).await?;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let envelope = format!(
            "MAIL FROM:<bench@origin.test>\r\nRCPT TO:<user{i}@d{}.test>\r\nDATA\r\n",
            i % 1000
        );
        w.write_all(envelope.as_bytes()).await?;
        for _ in 0..3 {
            read_reply(&mut r, &mut line).await?;
        }
        if !line.starts_with("354") {
            errors += 1;
            w.write_all(b"RSET\r\n").await?;
            read_reply(&mut r, &mut line).await?;
            continue;
        }
        w.write_all(&body).await?;
        let t0 = Instant::now();
        read_reply(&mut r, &mut line).await?;
        if line.starts_with("250") {
            hist.saturating_record(t0.elapsed().as_micros() as u64);
        } else {
            errors += 1;
        }
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok((hist, errors))
}

/// Reads one reply; leaves its last line in `line`.
async fn read_reply(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut String,
) -> anyhow::Result<()> {
    loop {
        line.clear();
        if r.read_line(line).await? == 0 {
            bail!("connection closed by server");
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(());
        }
    }
}

/// The ceiling: an SMTP responder that accepts and discards everything, as cheaply as possible.
fn run_sink(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            tokio::spawn(async move {
                let _ = sink_session(s).await;
            });
        }
    })
}

async fn sink_session(s: TcpStream) -> anyhow::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let upper = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match &upper[..] {
            b"EHLO" => out.extend_from_slice(b"250-sink\r\n250 PIPELINING\r\n"),
            b"DATA" => {
                w.write_all(&out).await?;
                out.clear();
                w.write_all(b"354 go\r\n").await?;
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                out.extend_from_slice(b"250 2.0.0 Ok: queued as SINK\r\n");
            }
            b"QUIT" => {
                out.extend_from_slice(b"221 bye\r\n");
                w.write_all(&out).await?;
                return Ok(());
            }
            _ => out.extend_from_slice(b"250 ok\r\n"),
        }
        if r.buffer().is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn postfix_ctl(root: &Path, cmd: &str, port: u16) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(root.join("scripts/postfix-bench.sh"))
        .args([cmd, &port.to_string()])
        .status()
        .context("scripts/postfix-bench.sh")?;
    if !status.success() {
        bail!("scripts/postfix-bench.sh {cmd} failed");
    }
    Ok(())
}

fn repo_root() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/release/smtp-bench -> repository root
    exe.ancestors()
        .find(|p| p.join("Cargo.toml").exists() && p.join("engine").exists())
        .map(Path::to_path_buf)
        .context("run smtp-bench from the repository's target directory")
}
