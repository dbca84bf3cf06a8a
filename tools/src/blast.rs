//! `saida-blast`: an SMTP load generator.
//!
//! Closed loop (`--connections N`, each sending its next message as soon as the last is
//! answered) or **open loop** (`--rate R`: message *i* is due at `start + i / R`; its latency is
//! measured from that intended time, so a stalled server shows up as latency rather than as a
//! politely lower rate — no coordinated omission). Each transaction pipelines MAIL, every RCPT
//! and DATA in one write. Messages: a size or a size mix, recipients per message, recipients
//! spread over domains (`user<n>@d<k>.test`), optional template with per-message fields,
//! STARTTLS and AUTH PLAIN. Bounded by `--count` and/or `--duration`.
//!
//! A progress line every second on stderr; at the end a report (throughput, reply codes,
//! latency percentiles from an HDR histogram) as text or JSON, and optionally the histogram's
//! percentile distribution to a file. Refuses non-loopback targets unless `--allow-remote`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use saida_net::epoll::EpollStream;
use saida_net::tls::TlsStream;
use saida_net::{Dial, Stream};
use smtp_proto::client::{dot_stuff, parse_reply};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "saida-blast",
    about = "An SMTP load generator (closed or open loop)"
)]
struct Args {
    /// Server to load.
    #[arg(long, default_value = "127.0.0.1:2525")]
    target: SocketAddr,
    /// Allow a target outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    allow_remote: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Messages to send (0 = until --duration).
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Stop after this many seconds (0 = until --count).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Open loop: intended messages per second. Without it the load is closed-loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Message size in bytes, or a mix `size:weight,...` (e.g. `2048:70,20480:25,102400:5`).
    #[arg(long, default_value = "2048")]
    size: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// Recipients are spread over this many domains `d<k>.test` (or `--domain-format`).
    #[arg(long, default_value_t = 1000)]
    domains: u64,
    /// Recipient address format; `{n}` is the recipient number, `{k}` the domain number.
    #[arg(long, default_value = "user{n}@d{k}.test")]
    rcpt_format: String,
    /// Envelope sender.
    #[arg(long, default_value = "blast@origin.test")]
    from: String,
    /// Message template file: headers and body; `{n}` (message number), `{rcpt}` (first
    /// recipient), `{date}` and `{msgid}` are replaced; padded to the chosen size.
    #[arg(long)]
    template: Option<std::path::PathBuf>,
    /// Use STARTTLS (the server's certificate is not checked: load tests use self-signed ones).
    #[arg(long)]
    starttls: bool,
    /// AUTH PLAIN as `user:password` (after STARTTLS when given).
    #[arg(long)]
    auth: Option<String>,
    /// Client threads (0 = one per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Write the latency percentile distribution (HDR format, ms) to this file.
    #[arg(long)]
    hdr_log: Option<std::path::PathBuf>,
}

/// Counters shared by every connection.
#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    bytes: AtomicU64,
    codes: Mutex<BTreeMap<u16, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn code(&self, c: u16) {
        *self
            .codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(c)
            .or_default() += 1;
    }

    fn error(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < 100 || m.contains_key(&e) {
            *m.entry(e).or_default() += 1;
        }
    }
}

/// What every connection needs.
struct Plan {
    args: Args,
    sizes: Vec<(usize, u32)>,
    template: Option<String>,
    start: Instant,
    deadline: Option<Instant>,
    next: AtomicU64,
    stats: Stats,
    /// STARTTLS without verifying the certificate (saida-net's opportunistic client config).
    tls: Option<Arc<rustls::ClientConfig>>,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("saida-blast: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn parse_sizes(s: &str) -> Result<Vec<(usize, u32)>, String> {
    let bad = || format!("--size: `{s}` is not a size or a `size:weight,...` mix");
    let mut out = Vec::new();
    for part in s.split(',') {
        let (size, weight) = match part.split_once(':') {
            Some((a, b)) => (a, b.parse::<u32>().map_err(|_| bad())?),
            None => (part, 1),
        };
        let size: usize = size.trim().parse().map_err(|_| bad())?;
        if !(64..=64 << 20).contains(&size) || weight == 0 {
            return Err(bad());
        }
        out.push((size, weight));
    }
    Ok(out)
}

fn run(args: Args) -> Result<std::process::ExitCode, String> {
    if !args.allow_remote && !args.target.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; pass --allow-remote to load a remote server",
            args.target
        ));
    }
    if args.count == 0 && args.duration == 0 {
        return Err("give --count, --duration or both".into());
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number".into());
    }
    let sizes = parse_sizes(&args.size)?;
    let template = match &args.template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let tls = if args.starttls {
        Some(saida_net::tls::client_config_unverified())
    } else {
        None
    };
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(args.connections.max(1));
    let start = Instant::now();
    let plan = Arc::new(Plan {
        deadline: (args.duration > 0).then(|| start + Duration::from_secs(args.duration)),
        args,
        sizes,
        template,
        start,
        next: AtomicU64::new(0),
        stats: Stats::default(),
        tls,
    });
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = (!plan.args.quiet).then(|| {
        let (plan, done) = (Arc::clone(&plan), Arc::clone(&done));
        std::thread::spawn(move || progress_loop(&plan, &done))
    });
    let mut handles = Vec::new();
    for t in 0..threads {
        let plan = Arc::clone(&plan);
        let conns =
            plan.args.connections / threads + usize::from(t < plan.args.connections % threads);
        handles.push(std::thread::spawn(move || run_thread(plan, conns)));
    }
    let mut hist = new_hist();
    for h in handles {
        if let Ok(Ok(part)) = h.join() {
            let _ = hist.add(&part);
        }
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    report(&plan, &hist, elapsed)?;
    let failed = plan.stats.failed.load(Ordering::Relaxed);
    Ok(
        if failed > 0 && plan.stats.ok.load(Ordering::Relaxed) == 0 {
            std::process::ExitCode::from(1)
        } else {
            std::process::ExitCode::SUCCESS
        },
    )
}

fn new_hist() -> Histogram<u64> {
    // 1 µs ..= 1 hour, 3 significant digits; the bounds are constants that are valid.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

fn progress_loop(plan: &Plan, done: &std::sync::atomic::AtomicBool) {
    let mut last = (0u64, Instant::now());
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if last.1.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let ok = plan.stats.ok.load(Ordering::Relaxed);
        let rate = (ok - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (ok, Instant::now());
        eprint!(
            "\r{:>6.1}s  sent {:>9}  ok {:>9}  {:>8.0} msg/s  in flight {:>5}  errors {:>6}   ",
            plan.start.elapsed().as_secs_f64(),
            plan.stats.sent.load(Ordering::Relaxed),
            ok,
            rate,
            plan.stats.in_flight.load(Ordering::Relaxed),
            plan.stats.failed.load(Ordering::Relaxed),
        );
    }
    eprintln!();
}

fn run_thread(plan: Arc<Plan>, conns: usize) -> Result<Histogram<u64>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let plan = Arc::clone(&plan);
            tasks.push(tokio::task::spawn_local(async move {
                let mut hist = new_hist();
                // Reconnect after errors until the work is done (with a pause, bounded).
                let mut failures = 0u32;
                while !finished(&plan, plan.next.load(Ordering::Relaxed)) && failures < 100 {
                    match connection(&plan, &mut hist).await {
                        Ok(()) => break,
                        Err(e) => {
                            plan.stats.error(e);
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                hist
            }));
        }
        let mut hist = new_hist();
        for t in tasks {
            if let Ok(h) = t.await {
                let _ = hist.add(&h);
            }
        }
        Ok(hist)
    })
}

fn finished(plan: &Plan, i: u64) -> bool {
    (plan.args.count > 0 && i >= plan.args.count)
        || plan.deadline.is_some_and(|d| Instant::now() >= d)
}

/// A connection on saida's own stream type (plain, or TLS after STARTTLS).
struct Conn {
    io: saida_net::Conn<EpollStream>,
    buf: Vec<u8>,
    /// Reused for writes (the stream takes owned buffers).
    wbuf: Vec<u8>,
}

impl Conn {
    /// One reply (smtp-proto's bounded parser); returns its code and one-line summary.
    async fn reply(&mut self) -> Result<(u16, String), String> {
        loop {
            if let Some((reply, consumed)) = parse_reply(&self.buf).map_err(|e| e.to_string())? {
                self.buf.drain(..consumed);
                return Ok((reply.code, reply.summary()));
            }
            let mut buf = std::mem::take(&mut self.buf);
            buf.reserve(8192);
            let (r, buf) = self.io.read(buf).await;
            self.buf = buf;
            if r.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed by the server".into());
            }
        }
    }

    /// Writes `buf` without copying it (the stream takes it and gives it back).
    async fn send_owned(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let (r, back) = self.io.write_all(std::mem::take(buf)).await;
        *buf = back;
        r.map_err(|e| e.to_string())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut w = std::mem::take(&mut self.wbuf);
        w.clear();
        w.extend_from_slice(bytes);
        let (r, w) = self.io.write_all(w).await;
        self.wbuf = w;
        r.map_err(|e| e.to_string())
    }

    async fn expect(&mut self, class: u16, what: &str) -> Result<(), String> {
        let (code, text) = self.reply().await?;
        if code / 100 != class {
            return Err(format!("{what}: {text}"));
        }
        Ok(())
    }
}

async fn connection(plan: &Plan, hist: &mut Histogram<u64>) -> Result<(), String> {
    let stream = EpollStream::connect(plan.args.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut c = Conn {
        io: saida_net::Conn::Plain(stream),
        buf: Vec::with_capacity(8192),
        wbuf: Vec::with_capacity(64 << 10),
    };
    c.expect(2, "banner").await?;
    c.send(b"EHLO blast.test\r\n").await?;
    c.expect(2, "EHLO").await?;
    if let Some(tls) = &plan.tls {
        c.send(b"STARTTLS\r\n").await?;
        c.expect(2, "STARTTLS").await?;
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let saida_net::Conn::Plain(plain) = std::mem::replace(&mut c.io, saida_net::Conn::Closed)
        else {
            return Err("TLS: the connection is not plain".into());
        };
        let tls = TlsStream::connect(plain, Arc::clone(tls), name)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        c = Conn {
            io: saida_net::Conn::Tls(Box::new(tls)),
            buf: Vec::with_capacity(8192),
            wbuf: Vec::with_capacity(64 << 10),
        };
        c.send(b"EHLO blast.test\r\n").await?;
        c.expect(2, "EHLO after STARTTLS").await?;
    }
    if let Some(auth) = &plan.args.auth {
        let (user, pass) = auth.split_once(':').ok_or("--auth is user:password")?;
        let token = smtp_proto::sasl::plain_response(user, pass);
        c.send(format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
        c.expect(2, "AUTH").await?;
    }
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if finished(plan, i) {
            break;
        }
        // Open loop: message i is due at start + i / rate; latency counts from then.
        let intended = match plan.args.rate {
            Some(r) => {
                let due = plan.start + Duration::from_secs_f64(i as f64 / r);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        plan.stats.sent.fetch_add(1, Ordering::Relaxed);
        plan.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = transaction(plan, &mut c, i, &mut out).await;
        plan.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(code) => {
                plan.stats.code(code);
                if code / 100 == 2 {
                    plan.stats.ok.fetch_add(1, Ordering::Relaxed);
                    plan.stats
                        .bytes
                        .fetch_add(out.len() as u64, Ordering::Relaxed);
                    hist.saturating_record(intended.elapsed().as_micros().max(1) as u64);
                } else {
                    plan.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let _ = c.send(b"QUIT\r\n").await;
    Ok(())
}

/// One pipelined transaction; returns the final reply code (or the first refusal's).
async fn transaction(plan: &Plan, c: &mut Conn, i: u64, out: &mut Vec<u8>) -> Result<u16, String> {
    let a = &plan.args;
    let mut env = format!("MAIL FROM:<{}>\r\n", a.from);
    let first_rcpt = rcpt(a, i, 0);
    for r in 0..a.rcpts.max(1) {
        env.push_str(&format!("RCPT TO:<{}>\r\n", rcpt(a, i, r as u64)));
    }
    env.push_str("DATA\r\n");
    c.send(env.as_bytes()).await?;
    let mut refused = None;
    let (code, _) = c.reply().await?;
    if code / 100 != 2 {
        refused = Some(code);
    }
    let mut accepted = 0;
    for _ in 0..a.rcpts.max(1) {
        let (code, _) = c.reply().await?;
        if code / 100 == 2 {
            accepted += 1;
        } else if refused.is_none() {
            refused = Some(code);
        }
    }
    let (code, _) = c.reply().await?;
    if code != 354 {
        // The transaction did not end (MAIL may stand without recipients): a new MAIL before
        // RSET is out of sequence (RFC 5321 4.1.4).
        c.send(b"RSET\r\n").await?;
        c.expect(2, "RSET").await?;
        return Ok(refused.unwrap_or(code));
    }
    build_message(plan, i, &first_rcpt, out);
    c.send_owned(out).await?;
    let (code, _) = c.reply().await?;
    Ok(if accepted == 0 {
        refused.unwrap_or(code)
    } else {
        code
    })
}

fn rcpt(a: &Args, i: u64, r: u64) -> String {
    let n = i * a.rcpts.max(1) as u64 + r;
    let k = n % a.domains.max(1);
    a.rcpt_format
        .replace("{n}", &n.to_string())
        .replace("{k}", &k.to_string())
}

/// The message (dot-stuffed, ending with CRLF.CRLF) of about the chosen size.
fn build_message(plan: &Plan, i: u64, rcpt: &str, out: &mut Vec<u8>) {
    let total: u32 = plan.sizes.iter().map(|s| s.1).sum();
    let mut pick = (splitmix(i) % u64::from(total.max(1))) as u32;
    let mut size = plan.sizes[0].0;
    for (s, w) in &plan.sizes {
        if pick < *w {
            size = *s;
            break;
        }
        pick -= w;
    }
    out.clear();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let msgid = format!("<{i}.{now}@blast.test>");
    // Built plain, then dot-stuffed by smtp-proto (as saida's delivery client does).
    let mut plain = Vec::with_capacity(size + 256);
    plain.extend_from_slice(format!("X-Saida-Sent: {now}\r\n").as_bytes());
    match &plan.template {
        Some(t) => {
            let text = t
                .replace("{n}", &i.to_string())
                .replace("{rcpt}", rcpt)
                .replace("{msgid}", &msgid)
                .replace("{date}", &now.to_string());
            for line in text.lines() {
                plain.extend_from_slice(line.as_bytes());
                plain.extend_from_slice(b"\r\n");
            }
        }
        None => plain.extend_from_slice(
            format!(
                "From: <{}>\r\nTo: <{rcpt}>\r\nSubject: saida-blast {i}\r\n\
                 Message-ID: {msgid}\r\n\r\n",
                plan.args.from
            )
            .as_bytes(),
        ),
    }
    let line = b"The quick brown fox jumps over the lazy dog; saida-blast padding line.\r\n";
    while plain.len() + line.len() <= size {
        plain.extend_from_slice(line);
    }
    dot_stuff(&plain, out);
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn report(plan: &Plan, hist: &Histogram<u64>, elapsed: Duration) -> Result<(), String> {
    let s = &plan.stats;
    let ok = s.ok.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let codes = s.codes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let errors = s.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let json = serde_json::json!({
        "target": plan.args.target.to_string(),
        "mode": if plan.args.rate.is_some() { "open" } else { "closed" },
        "intended_rate": plan.args.rate,
        "connections": plan.args.connections,
        "sent": s.sent.load(Ordering::Relaxed),
        "ok": ok,
        "failed": s.failed.load(Ordering::Relaxed),
        "seconds": secs,
        "msgs_per_s": ok as f64 / secs,
        "mb_per_s": s.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        "reply_codes": codes,
        "errors": errors,
        "latency_ms": {
            "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
            "max": hist.max() as f64 / 1000.0, "count": hist.len(),
        },
    });
    if let Some(path) = &plan.args.hdr_log {
        let mut text = String::from("       Value   Percentile   TotalCount\n");
        for v in hist.iter_quantiles(1) {
            text.push_str(&format!(
                "{:12.3} {:12.6} {:12}\n",
                v.value_iterated_to() as f64 / 1000.0,
                v.quantile_iterated_to(),
                v.count_since_last_iteration()
            ));
        }
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if plan.args.json {
        println!("{json}");
    } else {
        println!(
            "{} loop, {} connections: {ok} ok, {} failed in {secs:.2} s = {:.0} msgs/s \
             ({:.1} MB/s)",
            json["mode"].as_str().unwrap_or(""),
            plan.args.connections,
            json["failed"],
            json["msgs_per_s"].as_f64().unwrap_or(0.0),
            json["mb_per_s"].as_f64().unwrap_or(0.0),
        );
        println!(
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            hist.max() as f64 / 1000.0
        );
        println!("reply codes: {codes:?}");
        if !errors.is_empty() {
            println!("errors: {errors:?}");
        }
    }
    Ok(())
}
