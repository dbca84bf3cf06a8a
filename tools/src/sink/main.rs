//! `saida-sink`: an SMTP server that accepts mail and throws it away (or records it), for load
//! tests and for the end-to-end tests of saida's delivery.
//!
//! Thread-per-core like the engine, on the engine's own crates: one current-thread runtime per
//! thread, each with its own `SO_REUSEPORT` listeners and `saida-net` streams (TLS included).
//! Speaks ESMTP with PIPELINING, CHUNKING (BDAT), 8BITMIME, SMTPUTF8,
//! SIZE and, with `--tls`, STARTTLS on a self-signed certificate.
//!
//! Behaviour comes from a profile (`--profile FILE`, see `profile`): reply mixes per recipient
//! and per message, greylisting, latency distributions at banner / RCPT / end of data,
//! connection and rate caps, random disconnects, and which extensions are offered, per listener
//! and per recipient domain. Beside it, by recipient local part, so a test can ask for an
//! outcome per address:
//! `reject…` → `550 5.1.1`, `defer…` → `451 4.3.0` every time, `busy…` → `421 4.7.0`,
//! `grey…` → `451 4.7.1` on the first attempt of a (sender, recipient) pair and accepted
//! after. `hugereply…` → a `550 5.1.1` of 100 lines of 1,000 bytes (a reply too long to journal
//! whole); `data250…` → accepted, but `DATA` is answered `250` instead of `354` (a broken server
//! that never receives the content). `--greet-421 ADDR` makes a
//! listener refuse every session with a `421` greeting (for failover tests).
//!
//! `--record FILE` appends one JSON line per accepted recipient (connection number, transaction
//! number on that connection, listener, the client's address (`peer`) and EHLO name (`ehlo`),
//! sender, recipient, size, TLS, and the body with
//! `--record-bodies`), written before the end-of-data reply. Counters are printed as JSON on
//! SIGTERM/SIGINT, every 100 ms to `--stats FILE`, and in Prometheus text format on
//! `--metrics ADDR`. Only loopback addresses are bound unless `--allow-remote` is given.

mod profile;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use profile::{Behaviour, Delay, Profile};
use saida_net::Stream;
use saida_net::epoll::EpollStream;
use saida_net::tls::TlsStream;
use smtp_proto::command::{Command, parse_command};
use smtp_proto::content::{BareLineEnd, ContentError, ContentReader, Progress};
use smtp_proto::line::{LineReceiver, Scan};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest command line accepted.
const LINE_MAX: usize = 4096;
/// Longest message line, CRLF included (RFC 5321 §4.5.3.1.6).
const TEXT_LINE_MAX: usize = 1000;
/// Largest message accepted (and announced with SIZE).
const MESSAGE_MAX: usize = 64 << 20;

#[derive(Parser, Debug)]
#[command(name = "saida-sink", about = "An SMTP sink for load tests")]
struct Args {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Listeners (among --listen) that greet with 421 and close.
    #[arg(long)]
    greet_421: Vec<SocketAddr>,
    /// Threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Offer STARTTLS with a self-signed certificate.
    #[arg(long)]
    tls: bool,
    /// Append one JSON line per accepted recipient to this file.
    #[arg(long)]
    record: Option<std::path::PathBuf>,
    /// Include message bodies in the record.
    #[arg(long)]
    record_bodies: bool,
    /// Delay before each end-of-data reply, in milliseconds (a slow mailbox provider).
    #[arg(long, default_value_t = 0)]
    delay_eod_ms: u64,
    /// Rewrite this file every 100 ms with the counters and end-to-end latency percentiles
    /// (from each message's `X-Saida-Sent: <µs since the epoch>` header) as JSON.
    #[arg(long)]
    stats: Option<std::path::PathBuf>,
    /// Behaviour profile (TOML; see the `profile` module docs).
    #[arg(long)]
    profile: Option<std::path::PathBuf>,
    /// Serve the counters in Prometheus text format on this address (`/metrics`).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Allow binding non-loopback addresses.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    transactions: AtomicU64,
    messages: AtomicU64,
    recipients: AtomicU64,
    bytes: AtomicU64,
    last_message_us: AtomicU64,
    /// Connections refused by a connection cap, and messages by a rate cap.
    refused_connections: AtomicU64,
    rate_limited: AtomicU64,
    /// MAIL commands answered by a peer table's deferral.
    deferred_by_profile: AtomicU64,
    /// Messages over DATA whose end came with the next commands in the same read (a client
    /// pipelining the next transaction after the content, RFC 2920).
    pipelined_after_content: AtomicU64,
    disconnects: AtomicU64,
    /// Messages refused for content no conforming client sends (bare CR or LF, NUL, long
    /// lines): the sender is broken.
    bad_content: AtomicU64,
    /// Most transactions seen on one connection.
    transactions_per_connection_max: AtomicU64,
}

struct Shared {
    args: Args,
    profile: Profile,
    /// Open connections per listener (for `connections_max`).
    open: HashMap<SocketAddr, AtomicU64>,
    /// Per listener: (second, messages in it), for `rate_per_second`.
    rate: HashMap<SocketAddr, Mutex<(u64, u64)>>,
    /// End-to-end latency (µs) of messages carrying `X-Saida-Sent`.
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    record: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    greylist: Mutex<HashSet<(String, String)>>,
    counters: Counters,
    /// Per (listener, client address of a peer table): its deferral's state.
    peers: HashMap<(SocketAddr, IpAddr), PeerState>,
}

/// A peer's messages accepted on a listener, and its deferral window (unix µs; 0 = not yet).
#[derive(Default)]
struct PeerState {
    accepted: AtomicU64,
    deferring_until_us: AtomicU64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saida-sink: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if !args.allow_remote {
        if let Some(a) = args.listen.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "{a} is not loopback; pass --allow-remote to bind it"
            ));
        }
    }
    let tls = if args.tls { Some(self_signed()?) } else { None };
    let record = match &args.record {
        Some(p) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        ))),
        None => None,
    };
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let latency =
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
    let mut profile = match &args.profile {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Profile::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Profile::default(),
    };
    if args.delay_eod_ms > 0 {
        profile.set_default_eod(Delay::Fixed {
            value: args.delay_eod_ms as f64,
        });
    }
    let open = args
        .listen
        .iter()
        .map(|a| (*a, AtomicU64::new(0)))
        .collect();
    let rate = args
        .listen
        .iter()
        .map(|a| (*a, Mutex::new((0, 0))))
        .collect();
    let peer_ips = profile.peer_ips();
    let peers = args
        .listen
        .iter()
        .flat_map(|l| {
            peer_ips
                .iter()
                .map(move |ip| ((*l, *ip), PeerState::default()))
        })
        .collect();
    let shared = Arc::new(Shared {
        peers,
        profile,
        open,
        rate,
        args,
        latency: Mutex::new(latency),
        tls,
        record,
        greylist: Mutex::default(),
        counters: Counters::default(),
    });
    // Bind every listener once per thread (SO_REUSEPORT) before reporting readiness.
    let mut per_thread = Vec::new();
    for _ in 0..threads {
        let mut ls = Vec::new();
        for a in &shared.args.listen {
            ls.push(bind(*a).map_err(|e| format!("listening on {a}: {e}"))?);
        }
        per_thread.push(ls);
    }
    for (i, ls) in per_thread.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("sink-{i}"))
            .spawn(move || serve_thread(shared, ls))
            .map_err(|e| e.to_string())?;
    }
    if let Some(path) = shared.args.stats.clone() {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            loop {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, stats_json(&shared).to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
    }
    if let Some(addr) = shared.args.metrics {
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("metrics on {addr}: {e}"))?;
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || serve_metrics(shared, l));
    }
    println!("saida-sink listening on {:?}", shared.args.listen);
    let _ = std::io::stdout().flush();
    wait_for_signal();
    if let Some(r) = &shared.record {
        let _ = r.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
    println!("{}", stats_json(&shared));
    Ok(())
}

/// Counters and latency percentiles (ms) as JSON.
fn stats_json(shared: &Shared) -> serde_json::Value {
    let c = &shared.counters;
    let h = shared.latency.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "connections": c.connections.load(Ordering::Relaxed),
        "transactions": c.transactions.load(Ordering::Relaxed),
        "messages": c.messages.load(Ordering::Relaxed),
        "recipients": c.recipients.load(Ordering::Relaxed),
        "bytes": c.bytes.load(Ordering::Relaxed),
        "last_message_unix_us": c.last_message_us.load(Ordering::Relaxed),
        "refused_connections": c.refused_connections.load(Ordering::Relaxed),
        "rate_limited": c.rate_limited.load(Ordering::Relaxed),
        "deferred_by_profile": c.deferred_by_profile.load(Ordering::Relaxed),
        "pipelined_after_content": c.pipelined_after_content.load(Ordering::Relaxed),
        "disconnects": c.disconnects.load(Ordering::Relaxed),
        "bad_content": c.bad_content.load(Ordering::Relaxed),
        "transactions_per_connection_max":
            c.transactions_per_connection_max.load(Ordering::Relaxed),
        "latency_ms": {
            "count": h.len(),
            "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
            "max": h.max() as f64 / 1000.0,
        },
    })
}

/// `GET /metrics` in Prometheus text format (any other path: 404), served by hyper on its own
/// thread: one connection at a time is enough for a scraper, each within 10 s.
fn serve_metrics(shared: Arc<Shared>, l: std::net::TcpListener) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("saida-sink: no runtime for the metrics endpoint");
        return;
    };
    runtime.block_on(async move {
        let Ok(listener) = l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
        else {
            eprintln!("saida-sink: cannot serve metrics");
            return;
        };
        while let Ok((stream, _)) = listener.accept().await {
            let shared = Arc::clone(&shared);
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let found = req.method() == hyper::Method::GET && req.uri().path() == "/metrics";
                let body = if found {
                    metrics_text(&shared)
                } else {
                    String::new()
                };
                let mut resp =
                    hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
                if !found {
                    *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                }
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn).await;
        }
    });
}

/// The counters in Prometheus text format.
fn metrics_text(shared: &Shared) -> String {
    let c = &shared.counters;
    let mut body = String::new();
    for (name, help, v) in [
        ("connections", "Connections accepted", &c.connections),
        ("transactions", "Transactions answered 250", &c.transactions),
        ("messages", "Messages accepted", &c.messages),
        ("recipients", "Recipients accepted", &c.recipients),
        ("bytes", "Message bytes accepted", &c.bytes),
        (
            "refused_connections",
            "Connections refused by a cap",
            &c.refused_connections,
        ),
        (
            "rate_limited",
            "Messages refused by the rate cap",
            &c.rate_limited,
        ),
        (
            "deferred_by_profile",
            "MAIL commands answered by a peer table's deferral",
            &c.deferred_by_profile,
        ),
        (
            "disconnects",
            "Connections dropped at end of data",
            &c.disconnects,
        ),
        (
            "bad_content",
            "Messages refused for bare CR or LF, NUL or over-long lines",
            &c.bad_content,
        ),
    ] {
        body.push_str(&format!(
            "# HELP saida_sink_{name}_total {help}.\n\
                 # TYPE saida_sink_{name}_total counter\n\
                 saida_sink_{name}_total {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    body
}

/// A fast per-thread random number in [0, 1).
fn uniform() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(unix_micros() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

async fn delay(d: &Delay) {
    let ms = d.sample(uniform(), uniform());
    if ms > 0.0 {
        tokio::time::sleep(std::time::Duration::from_secs_f64(ms / 1000.0)).await;
    }
}

/// The peer table's deferral reply while its window is open: it opens once the peer has had
/// `defer_after_messages` accepted on the listener, and lasts `defer_for_ms`, once.
fn deferral<'b>(
    shared: &Shared,
    b: &'b Behaviour,
    listener: Option<SocketAddr>,
    peer: IpAddr,
) -> Option<&'b str> {
    if b.defer_after_messages == 0 {
        return None;
    }
    let st = shared.peers.get(&(listener?, peer))?;
    if st.accepted.load(Ordering::Relaxed) < b.defer_after_messages {
        return None;
    }
    let now = unix_micros();
    let until = now + b.defer_for_ms * 1000;
    let until =
        match st
            .deferring_until_us
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => until,
            Err(set) => set,
        };
    (now < until).then_some(b.defer_reply.as_str())
}

/// Takes a message slot under the listener's rate cap; false when the second is full.
fn rate_ok(shared: &Shared, listener: Option<SocketAddr>, b: &Behaviour) -> bool {
    if b.rate_per_second == 0 {
        return true;
    }
    let Some(m) = listener.and_then(|l| shared.rate.get(&l)) else {
        return true;
    };
    let sec = unix_micros() / 1_000_000;
    let mut w = m.lock().unwrap_or_else(|p| p.into_inner());
    if w.0 != sec {
        *w = (sec, 0);
    }
    w.1 += 1;
    w.1 <= b.rate_per_second
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The `X-Saida-Sent: <µs>` stamp of a load generator, searched in the first 8 KiB.
fn sent_stamp(body: &[u8]) -> Option<u64> {
    const NAME: &[u8] = b"X-Saida-Sent: ";
    let head = &body[..body.len().min(8192)];
    let at = head.windows(NAME.len()).position(|w| w == NAME)? + NAME.len();
    let digits: &[u8] = &head[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn wait_for_signal() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = rt {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
    }
}

fn self_signed() -> Result<Arc<rustls::ServerConfig>, String> {
    let ck = rcgen::generate_simple_self_signed(vec!["sink.test".into(), "localhost".into()])
        .map_err(|e| e.to_string())?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    saida_net::bind_reuseport(addr)
}

fn serve_thread(shared: Arc<Shared>, listeners: Vec<std::net::TcpListener>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("saida-sink: runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut tasks = Vec::new();
        for l in listeners {
            let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                continue;
            };
            let shared = Arc::clone(&shared);
            tasks.push(tokio::task::spawn_local(async move {
                let local = l.local_addr().ok();
                loop {
                    let Ok((s, peer)) = l.accept().await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    let listener = local;
                    tokio::task::spawn_local(async move {
                        let n = shared.counters.connections.fetch_add(1, Ordering::Relaxed) + 1;
                        let conn = Conn {
                            io: saida_net::Conn::Plain(EpollStream(s)),
                            buf: Vec::with_capacity(8192),
                            out: Vec::with_capacity(1024),
                            tls: false,
                            peer,
                            ehlo: String::new(),
                            after_content: false,
                        };
                        let _ = session(&shared, conn, n, listener).await;
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// A connection on saida's own stream type (plain, or TLS after STARTTLS).
struct Conn {
    io: saida_net::Conn<EpollStream>,
    buf: Vec<u8>,
    out: Vec<u8>,
    tls: bool,
    /// The client's address, and the name it gave in EHLO/HELO (recorded per transaction).
    peer: SocketAddr,
    ehlo: String,
    /// The last content's end came with more bytes in the same read.
    after_content: bool,
}

impl Conn {
    /// Next command line (without its line end), reading more when needed; None at end of
    /// stream, an empty `Err` line for one longer than `LINE_MAX`.
    async fn line(&mut self) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
        let mut lines = LineReceiver::new(LINE_MAX);
        loop {
            match lines.scan(&self.buf) {
                Scan::Line { line, consumed } => {
                    let text = self.buf[line].to_vec();
                    self.buf.drain(..consumed);
                    return Ok(Some(Ok(text)));
                }
                Scan::TooLong { consumed } => {
                    self.buf.drain(..consumed);
                    return Ok(Some(Err(())));
                }
                Scan::Discard { consumed } => {
                    self.buf.drain(..consumed);
                }
                Scan::NeedMore => {}
            }
            // Replies to a pipelined group go out once no further command is buffered.
            self.flush().await?;
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(16384);
        let (r, buf) = self.io.read(buf).await;
        self.buf = buf;
        Ok(r? > 0)
    }

    fn send(&mut self, r: &smtp_proto::reply::Reply) {
        r.encode(&mut self.out);
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let (r, mut out) = self.io.write_all(std::mem::take(&mut self.out)).await;
            out.clear();
            self.out = out;
            r?;
        }
        Ok(())
    }

    /// Content up to the end of data, dot-unstuffed, read by the same strict reader as
    /// saida's server: only `CRLF . CRLF` ends it, and a bare CR or LF, a NUL or a line over
    /// 998 octets is an error (the sender is broken). None at end of stream.
    async fn data(&mut self) -> std::io::Result<Option<Result<Vec<u8>, ContentError>>> {
        let mut reader = ContentReader::new(true, BareLineEnd::Reject, TEXT_LINE_MAX, MESSAGE_MAX);
        let mut body = Vec::new();
        loop {
            match reader.feed(&self.buf, &mut body) {
                Progress::Done { consumed } => {
                    self.buf.drain(..consumed);
                    self.after_content = !self.buf.is_empty();
                    return Ok(Some(reader.error().map_or(Ok(body), Err)));
                }
                Progress::NeedMore => {
                    self.buf.clear();
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn exact(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Ok(None);
            }
        }
        Ok(Some(self.buf.drain(..n).collect()))
    }
}

#[derive(Default)]
struct Txn {
    from: Option<String>,
    rcpts: Vec<String>,
    chunks: Vec<u8>,
    /// A `data250…` recipient was accepted: answer DATA with 250.
    data_250: bool,
}

async fn session(
    shared: &Shared,
    c: Conn,
    conn_no: u64,
    listener: Option<SocketAddr>,
) -> std::io::Result<()> {
    let b = shared
        .profile
        .for_peer(listener, c.peer.ip())
        .unwrap_or_else(|| shared.profile.listener(listener));
    let open = listener.and_then(|l| shared.open.get(&l));
    let now_open = open.map_or(0, |o| o.fetch_add(1, Ordering::Relaxed) + 1);
    // The connection stops counting toward `connections_max` when it ends, or at QUIT before
    // the 221 is sent (a client that waits for it may open the next one at once).
    let counted = std::cell::Cell::new(open);
    let result = if b.connections_max > 0 && now_open as usize > b.connections_max {
        shared
            .counters
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        let mut c = c;
        c.reply("421 4.7.0 sink.test too many connections, try again later");
        c.flush().await
    } else {
        converse(shared, b, c, conn_no, listener, &counted).await
    };
    if let Some(o) = counted.take() {
        o.fetch_sub(1, Ordering::Relaxed);
    }
    result
}

/// The behaviour for a recipient: its domain's layer over the listener's.
fn for_rcpt(shared: &Shared, b: &Behaviour, rcpt: &str) -> Option<Behaviour> {
    let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
    shared.profile.for_domain(b, domain)
}

async fn converse(
    shared: &Shared,
    b: &Behaviour,
    mut c: Conn,
    conn_no: u64,
    listener: Option<SocketAddr>,
    counted: &std::cell::Cell<Option<&AtomicU64>>,
) -> std::io::Result<()> {
    if listener.is_some_and(|l| shared.args.greet_421.contains(&l)) {
        c.reply("421 4.3.2 sink.test not accepting mail here");
        return c.flush().await;
    }
    delay(&b.banner_delay_ms).await;
    c.reply("220 sink.test ESMTP saida-sink");
    let mut txn = Txn::default();
    let mut txn_no = 0u64;
    while let Some(line) = c.line().await? {
        let Ok(line) = line else {
            c.reply("500 5.5.2 line too long");
            continue;
        };
        let command = match parse_command(&line) {
            Ok(cmd) => cmd,
            Err(e) => {
                c.send(&e.reply());
                continue;
            }
        };
        match command {
            Command::Ehlo(name) => {
                c.ehlo = name.to_string();
                txn = Txn::default();
                c.reply("250-sink.test");
                if b.pipelining {
                    c.reply("250-PIPELINING");
                }
                if b.chunking {
                    c.reply("250-CHUNKING");
                }
                c.reply("250-8BITMIME");
                if b.smtputf8 {
                    c.reply("250-SMTPUTF8");
                }
                c.reply("250-ENHANCEDSTATUSCODES");
                if shared.tls.is_some() && b.starttls && !c.tls {
                    c.reply("250-STARTTLS");
                }
                c.reply(&format!("250 SIZE {MESSAGE_MAX}"));
            }
            Command::Helo(name) => {
                c.ehlo = name.to_string();
                c.reply("250 sink.test");
            }
            Command::StartTls if !c.tls && b.starttls => {
                let Some(acceptor) = shared.tls.clone() else {
                    c.reply("502 5.5.1 no TLS here");
                    continue;
                };
                c.reply("220 2.0.0 go ahead");
                c.flush().await?;
                c.buf.clear();
                let plain = match std::mem::replace(&mut c.io, saida_net::Conn::Closed) {
                    saida_net::Conn::Plain(p) => p,
                    _ => return Ok(()),
                };
                let tls = TlsStream::accept(plain, acceptor).await?;
                c = Conn {
                    io: saida_net::Conn::Tls(Box::new(tls)),
                    buf: Vec::with_capacity(8192),
                    out: Vec::new(),
                    tls: true,
                    peer: c.peer,
                    ehlo: String::new(),
                    after_content: false,
                };
                txn = Txn::default();
            }
            Command::Mail { from, .. } => {
                if txn.from.is_some() {
                    // RFC 5321 4.1.4: one transaction at a time; RSET or end it first.
                    c.reply("503 5.5.1 sender already specified");
                    continue;
                }
                if let Some(reply) = deferral(shared, b, listener, c.peer.ip()) {
                    shared
                        .counters
                        .deferred_by_profile
                        .fetch_add(1, Ordering::Relaxed);
                    c.reply(reply);
                    if reply.starts_with("421") {
                        return c.flush().await;
                    }
                    continue;
                }
                if !rate_ok(shared, listener, b) {
                    shared.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    c.reply("451 4.7.1 rate limit exceeded, slow down");
                    continue;
                }
                txn = Txn {
                    from: Some(from.to_string()),
                    ..Txn::default()
                };
                c.reply("250 2.1.0 ok");
            }
            Command::Rcpt { to, .. } => {
                let Some(from) = &txn.from else {
                    c.reply("503 5.5.1 MAIL first");
                    continue;
                };
                let rcpt = to.to_string();
                let local = rcpt.split('@').next().unwrap_or("").to_ascii_lowercase();
                let domain_b = for_rcpt(shared, b, &rcpt);
                let rb = domain_b.as_ref().unwrap_or(b);
                delay(&rb.rcpt_delay_ms).await;
                if local.starts_with("reject") {
                    c.reply("550 5.1.1 no such user here");
                } else if local.starts_with("hugereply") {
                    let line = "x".repeat(1000);
                    for _ in 0..99 {
                        c.reply(&format!("550-5.1.1 {line}"));
                    }
                    c.reply(&format!("550 5.1.1 {line}"));
                } else if local.starts_with("defer") {
                    c.reply("451 4.3.0 try again later");
                } else if local.starts_with("busy") {
                    c.reply("421 4.7.0 too busy for this recipient, try another host");
                } else if (local.starts_with("grey") || rb.greylist)
                    && first_attempt(shared, from, &rcpt)
                {
                    c.reply("451 4.7.1 greylisted, try again later");
                } else if let Some(r) = Behaviour::roll(&rb.rcpt_reply_mix, uniform() * 100.0) {
                    c.reply(r);
                } else {
                    txn.data_250 |= local.starts_with("data250");
                    txn.rcpts.push(rcpt);
                    c.reply("250 2.1.5 ok");
                }
            }
            Command::Data => {
                if txn.rcpts.is_empty() {
                    c.reply("554 5.5.1 no valid recipients");
                    continue;
                }
                if txn.data_250 {
                    // Broken on purpose: "accepted" without the content. The client must not
                    // count it as delivered; the session ends here.
                    c.reply("250 2.0.0 ok");
                    c.flush().await?;
                    return Ok(());
                }
                c.reply("354 go ahead");
                c.flush().await?;
                let body = match c.data().await? {
                    None => return Ok(()),
                    Some(Ok(body)) => {
                        if c.after_content {
                            shared
                                .counters
                                .pipelined_after_content
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        body
                    }
                    Some(Err(e)) => {
                        shared.counters.bad_content.fetch_add(1, Ordering::Relaxed);
                        txn = Txn::default();
                        c.send(&e.reply());
                        continue;
                    }
                };
                txn_no += 1;
                if !end_of_data(
                    shared, b, &mut c, &mut txn, &body, conn_no, txn_no, listener,
                )
                .await
                {
                    return Ok(());
                }
            }
            Command::Bdat { size, last } => {
                let n = usize::try_from(size).unwrap_or(usize::MAX);
                if n > MESSAGE_MAX || txn.chunks.len() + n > MESSAGE_MAX {
                    return Ok(());
                }
                let Some(chunk) = c.exact(n).await? else {
                    return Ok(());
                };
                if txn.rcpts.is_empty() {
                    c.reply("554 5.5.1 no valid recipients");
                    continue;
                }
                txn.chunks.extend_from_slice(&chunk);
                if last {
                    let body = std::mem::take(&mut txn.chunks);
                    txn_no += 1;
                    if !end_of_data(
                        shared, b, &mut c, &mut txn, &body, conn_no, txn_no, listener,
                    )
                    .await
                    {
                        return Ok(());
                    }
                } else {
                    c.reply(&format!("250 2.0.0 {n} octets"));
                }
            }
            Command::Rset => {
                txn = Txn::default();
                c.reply("250 2.0.0 ok");
            }
            Command::Noop => c.reply("250 2.0.0 ok"),
            Command::Quit => {
                if let Some(o) = counted.take() {
                    o.fetch_sub(1, Ordering::Relaxed);
                }
                c.reply("221 2.0.0 bye");
                c.flush().await?;
                return Ok(());
            }
            _ => c.reply("502 5.5.1 not implemented here"),
        }
    }
    Ok(())
}

/// Answers the end of data by the profile: the delay, then a random disconnect, a reply from
/// the message mix, or acceptance. Returns false when the connection is to be dropped.
#[allow(clippy::too_many_arguments)]
async fn end_of_data(
    shared: &Shared,
    b: &Behaviour,
    c: &mut Conn,
    txn: &mut Txn,
    body: &[u8],
    conn_no: u64,
    txn_no: u64,
    listener: Option<SocketAddr>,
) -> bool {
    let domain_b = txn.rcpts.first().and_then(|r| for_rcpt(shared, b, r));
    let mb = domain_b.as_ref().unwrap_or(b);
    delay(&mb.eod_delay_ms).await;
    if mb.disconnect_percent > 0.0 && uniform() * 100.0 < mb.disconnect_percent {
        shared.counters.disconnects.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if let Some(r) = Behaviour::roll(&mb.message_reply_mix, uniform() * 100.0) {
        *txn = Txn::default();
        c.reply(r);
        return true;
    }
    shared
        .counters
        .transactions_per_connection_max
        .fetch_max(txn_no, Ordering::Relaxed);
    accept(shared, c, txn, body, conn_no, txn_no, listener);
    true
}

/// True the first time a (sender, recipient) pair is seen.
fn first_attempt(shared: &Shared, from: &str, rcpt: &str) -> bool {
    let mut seen = shared.greylist.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() > 1_000_000 {
        seen.clear(); // bounded; a cleared pair is simply greylisted once more
    }
    seen.insert((from.to_string(), rcpt.to_string()))
}

fn accept(
    shared: &Shared,
    c: &mut Conn,
    txn: &mut Txn,
    body: &[u8],
    conn_no: u64,
    txn_no: u64,
    listener: Option<SocketAddr>,
) {
    let k = &shared.counters;
    k.transactions.fetch_add(1, Ordering::Relaxed);
    k.messages.fetch_add(1, Ordering::Relaxed);
    k.recipients
        .fetch_add(txn.rcpts.len() as u64, Ordering::Relaxed);
    k.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    let now = unix_micros();
    k.last_message_us.fetch_max(now, Ordering::Relaxed);
    if let Some(st) = listener.and_then(|l| shared.peers.get(&(l, c.peer.ip()))) {
        st.accepted.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(sent) = sent_stamp(body) {
        let mut h = shared.latency.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(now.saturating_sub(sent).max(1));
    }
    if let Some(r) = &shared.record {
        let mut w = r.lock().unwrap_or_else(|p| p.into_inner());
        for rcpt in &txn.rcpts {
            let mut line = serde_json::json!({
                "conn": conn_no,
                "txn": txn_no,
                "listener": listener.map(|l| l.to_string()),
                "from": txn.from.as_deref().unwrap_or(""),
                "rcpt": rcpt,
                "bytes": body.len(),
                "tls": c.tls,
                "peer": c.peer.ip().to_string(),
                "ehlo": c.ehlo,
                "at_us": now,
            });
            if shared.args.record_bodies {
                line["body"] = String::from_utf8_lossy(body).into();
            }
            let _ = writeln!(w, "{line}");
        }
        let _ = w.flush();
    }
    *txn = Txn::default();
    c.reply("250 2.0.0 ok: queued");
}
