//! `smtp-bench`: SMTP injection throughput and end-of-DATA → `250` latency, for saida on both
//! I/O backends, beside a discarding sink (the ceiling: the same client, no storage) and, with
//! `--compare postfix`, Postfix's smtpd accepting the same load with fsync on, all in one run.
//!
//! Every target runs as its own process on loopback; the client is one closed-loop process with
//! N connections, each pipelining MAIL, RCPT and DATA. Usage:
//! `cargo run --release -p saida-bench --bin smtp-bench -- [--compare postfix] [--json]`.
//! Results are recorded in docs/benchmarks.md.

#![forbid(unsafe_code)]

use anyhow::bail;
use clap::Parser;
use saida_bench::{KillOnDrop, free_port, postfix_ctl, repo_root, run_load, wait_port};
use std::process::{Command, Stdio};
use tokio::io::AsyncWriteExt;
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
                postfix_ctl(&root, "start", port, None)?;
                let r = run_load(port, conns, args.postfix_messages.max(conns), size);
                postfix_ctl(&root, "stop", port, None)?;
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
    use smtp_proto::command::{Command, parse_command};
    use smtp_proto::content::{BareLineEnd, ContentReader, Progress};
    use smtp_proto::line::{LineReceiver, Scan};
    use tokio::io::AsyncReadExt;
    let (mut r, mut w) = s.into_split();
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut out = Vec::new();
    let mut lines = LineReceiver::new(4096);
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    // Bytes still to read: `false` when the peer closed.
    let mut fill = async |buf: &mut Vec<u8>| -> anyhow::Result<bool> {
        let n = r.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    };
    loop {
        let line = match lines.scan(&buf) {
            Scan::Line { line, consumed } => {
                let cmd = buf[line].to_vec();
                buf.drain(..consumed);
                cmd
            }
            Scan::TooLong { consumed } | Scan::Discard { consumed } => {
                buf.drain(..consumed);
                out.extend_from_slice(b"500 5.5.2 line too long\r\n");
                continue;
            }
            Scan::NeedMore => {
                if !out.is_empty() {
                    w.write_all(&out).await?;
                    out.clear();
                }
                if !fill(&mut buf).await? {
                    return Ok(());
                }
                continue;
            }
        };
        match parse_command(&line) {
            Ok(Command::Ehlo(_)) => out.extend_from_slice(b"250-sink\r\n250 PIPELINING\r\n"),
            Ok(Command::Data) => {
                w.write_all(&out).await?;
                out.clear();
                w.write_all(b"354 go\r\n").await?;
                let mut content = ContentReader::new(true, BareLineEnd::Reject, 1000, 64 << 20);
                loop {
                    match content.feed(&buf, &mut body) {
                        Progress::Done { consumed } => {
                            buf.drain(..consumed);
                            break;
                        }
                        Progress::NeedMore => {
                            buf.clear();
                            if !fill(&mut buf).await? {
                                return Ok(());
                            }
                        }
                    }
                }
                body.clear();
                out.extend_from_slice(match content.error() {
                    None => b"250 2.0.0 Ok: queued as SINK\r\n".as_slice(),
                    Some(_) => b"550 5.6.0 bad content\r\n".as_slice(),
                });
            }
            Ok(Command::Quit) => {
                out.extend_from_slice(b"221 bye\r\n");
                w.write_all(&out).await?;
                return Ok(());
            }
            _ => out.extend_from_slice(b"250 ok\r\n"),
        }
    }
}
