//! `delivery-bench`: end to end, SMTP in → delivered to a sink, for the standard workloads
//! (W1: 200k x 2 KB, 1 recipient, 1000 domains; W2: 20k x 100 KB; W3: 50k x 2 KB x 10
//! recipients in different domains), with the durable spool. The generator is `saida-blast`
//! (closed loop), the sink `saida-sink`.
//!
//! For each workload, in one run and on loopback: the ceiling (the generator straight into
//! `saida-sink`), saida (every domain routed to the sink) and, with `--compare postfix`,
//! Postfix relaying the same load to the same sink (tuned relay, fsync on; see
//! scripts/postfix-bench.sh). End-to-end latency is measured by the sink from a timestamp header
//! the generator writes into each message. Usage:
//! `cargo build --release --workspace && target/release/delivery-bench [--compare postfix]`.
//! `--tools` instead compares the load tools with Postfix's `smtp-source` and `smtp-sink`.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use saida_bench::{KillOnDrop, free_port, postfix_ctl, repo_root, run_load_to, wait_port};

mod real_peers;
mod tools_vs_postfix;
use tools_vs_postfix::tools_bench;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "End-to-end delivery: saida beside the ceiling and Postfix")]
struct Args {
    /// Workloads to run (w4: w1 with every end of data answered after 200 ms; it has no
    /// ceiling row, and is compared with the w1 of the same run).
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4")]
    workloads: Vec<String>,
    /// Scale every message count (0.05 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Client connections of the generator.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Also run Postfix as a relay (installed by scripts/postfix-bench.sh).
    #[arg(long)]
    compare: Option<String>,
    /// Messages for the Postfix runs, as a fraction of the workload (it is much slower).
    #[arg(long, default_value_t = 0.1)]
    postfix_fraction: f64,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the table into docs/benchmarks.md, between the `delivery-bench:begin` and
    /// `delivery-bench:end` markers.
    #[arg(long)]
    update_docs: bool,
    /// Instead of the workloads: queue this many recipients (one per message) for a suspended
    /// domain, report resident memory per queued recipient and the time to recover them all.
    #[arg(long)]
    queue: Option<usize>,
    /// Instead of the workloads: W1 (scaled by --scale) through saida with metrics recording on
    /// and off, alternating, this many rounds each; prints the medians and the difference.
    #[arg(long)]
    metrics_overhead: Option<usize>,
    /// Instead of the workloads: saida-blast vs smtp-source into smtp-sink, and smtp-source into
    /// saida-sink vs smtp-sink (this many 2 KB messages each).
    #[arg(long)]
    tools: Option<usize>,
    /// Instead of the workloads: W1 (scaled by --scale) unsigned, DKIM-signed with one key, and
    /// signed with one key among 10,000 (a keys directory), alternating, this many rounds each;
    /// prints the medians, the ratios to unsigned and saida's resident memory.
    #[arg(long)]
    dkim: Option<usize>,
    /// Key algorithm for --dkim: `rsa` (2048 bits) or `ed25519`.
    #[arg(long, default_value = "ed25519")]
    dkim_algorithm: String,
    /// Instead of the workloads: `postfix-tools`, Postfix's own load tools around saida:
    /// smtp-source → saida → smtp-sink beside smtp-source → Postfix → smtp-sink and the direct
    /// smtp-source → smtp-sink ceiling, `--rounds` rounds of `--peer-messages` 2 KB messages,
    /// with CPU µs per message of each process.
    #[arg(long)]
    peer: Option<String>,
    #[arg(long, default_value_t = 50_000)]
    peer_messages: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// With --peer: saida's route to the sink has `spread_over_shards = true` (the one hot
    /// destination is delivered by every shard).
    #[arg(long)]
    spread: bool,
    /// The sink of the workloads: `saida-sink` (CHUNKING, latency from its timestamps) or
    /// Postfix's `smtp-sink` (PIPELINING without CHUNKING: saida's DATA path; no latency).
    #[arg(long, default_value = "saida-sink")]
    sink: String,
}

/// The sink every workload run delivers to (`--sink`).
static SINK: std::sync::OnceLock<String> = std::sync::OnceLock::new();

struct Workload {
    name: &'static str,
    messages: usize,
    size: usize,
    domains: usize,
    rcpts: usize,
    /// The sink answers each end of data after this long (a provider across the internet).
    eod_delay_ms: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "w1",
        messages: 200_000,
        size: 2048,
        domains: 1000,
        rcpts: 1,
        eod_delay_ms: 0,
    },
    Workload {
        name: "w2",
        messages: 20_000,
        size: 102_400,
        domains: 1000,
        rcpts: 1,
        eod_delay_ms: 0,
    },
    Workload {
        name: "w3",
        messages: 50_000,
        size: 2048,
        domains: 1000,
        rcpts: 10,
        eod_delay_ms: 0,
    },
    // W1 to slow destinations: every end of data answered after 200 ms.
    Workload {
        name: "w4",
        messages: 100_000,
        size: 2048,
        domains: 1000,
        rcpts: 1,
        eod_delay_ms: 200,
    },
];

/// One measured row.
struct Row {
    target: String,
    messages: usize,
    inject_rate: f64,
    /// End of data → 250 at the generator.
    ack: serde_json::Value,
    e2e_rate: f64,
    latency: serde_json::Value,
    rss_mb: Option<f64>,
    cpu_ms_per_1k: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.compare.as_deref().is_some_and(|c| c != "postfix") {
        bail!("--compare takes `postfix`");
    }
    if !["saida-sink", "smtp-sink"].contains(&args.sink.as_str()) {
        bail!("--sink takes `saida-sink` or `smtp-sink`");
    }
    let _ = SINK.set(args.sink.clone());
    let root = repo_root()?;
    // The binaries beside this one: the same build profile (release for real numbers; the CI
    // smoke test runs the debug build).
    let bin = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("executable directory")?;
    for b in ["saida", "saida-sink"] {
        if !bin.join(b).exists() {
            bail!("{b} is missing: cargo build --release --workspace");
        }
    }
    if let Some(n) = args.queue {
        return queue_scale(&bin, n, args.connections);
    }
    if let Some(n) = args.tools {
        return tools_bench(&bin, n, args.connections);
    }
    if let Some(peer) = &args.peer {
        if peer != "postfix-tools" {
            bail!("--peer takes `postfix-tools`");
        }
        return real_peers::peers_bench(
            &bin,
            &root,
            args.peer_messages,
            args.connections,
            args.rounds,
            args.spread,
        );
    }
    if let Some(rounds) = args.dkim {
        return dkim_bench(
            &bin,
            rounds,
            args.scale,
            args.connections,
            &args.dkim_algorithm,
        );
    }
    if let Some(rounds) = args.metrics_overhead {
        let w = &WORKLOADS[0];
        let n = ((w.messages as f64 * args.scale) as usize).max(args.connections);
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            on.push(run_target(&bin, w, n, args.connections, Target::Saida(true))?.e2e_rate);
            off.push(run_target(&bin, w, n, args.connections, Target::Saida(false))?.e2e_rate);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (m_on, m_off) = (median(&mut on.clone()), median(&mut off.clone()));
        println!(
            "{}",
            serde_json::json!({"bench": "metrics-overhead", "workload": "w1", "messages": n,
                "e2e_per_s_metrics_on": on, "e2e_per_s_metrics_off": off,
                "median_on": m_on.round(), "median_off": m_off.round(),
                "drop_percent": ((m_off - m_on) / m_off * 100.0 * 10.0).round() / 10.0})
        );
        return Ok(());
    }
    for b in ["saida-blast"] {
        if !bin.join(b).exists() {
            bail!("{b} is missing: cargo build --release --workspace");
        }
    }
    if !args.json {
        println!(
            "{:<4} {:<8} {:>7} | {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>8} {:>8} | {:>6} {:>9} \
             | {:>8} {:>8}",
            "load",
            "target",
            "msgs",
            "inject/s",
            "e2e/s",
            "ack p50",
            "ack p99",
            "e2e p50",
            "e2e p99",
            "e2e max",
            "RSS MB",
            "CPU ms/1k",
            "x postfix",
            "x ceiling"
        );
    }
    let mut markdown = Vec::new();
    let mut w1_rate = None;
    for w in WORKLOADS
        .iter()
        .filter(|w| args.workloads.iter().any(|n| n == w.name))
    {
        let n = ((w.messages as f64 * args.scale) as usize).max(args.connections);
        if n < w.messages && !args.json {
            eprintln!("{}: scaled to {n} messages", w.name);
        }
        // A closed-loop generator straight into a 200 ms sink measures nothing: no ceiling
        // for W4, which is compared with W1 instead.
        let slow = w.eod_delay_ms > 0;
        let ceiling = if slow {
            None
        } else {
            Some(run_target(&bin, w, n, args.connections, Target::Ceiling)?)
        };
        let saida = run_target(&bin, w, n, args.connections, Target::Saida(true))?;
        if w.name == "w1" {
            w1_rate = Some(saida.e2e_rate);
        }
        if slow {
            let x_w1 = w1_rate.map(|r| saida.e2e_rate / r);
            eprintln!(
                "{}: saida {:.0} msgs/s with every end of data delayed {} ms; x w1 of this run: {}",
                w.name,
                saida.e2e_rate,
                w.eod_delay_ms,
                x_w1.map_or("- (run w1 too)".into(), |x| format!("{x:.2}"))
            );
        }
        let postfix = if args.compare.is_some() {
            let pn = ((n as f64 * args.postfix_fraction) as usize).max(args.connections);
            Some(run_target(
                &bin,
                w,
                pn,
                args.connections,
                Target::Postfix(&root),
            )?)
        } else {
            None
        };
        let mut rows = vec![saida];
        rows.extend(postfix);
        rows.extend(ceiling);
        let pf = rows
            .iter()
            .find(|r| r.target == "postfix")
            .map(|r| r.e2e_rate);
        let ceil = rows
            .iter()
            .find(|r| r.target == "ceiling")
            .map_or(rows[0].e2e_rate, |r| r.e2e_rate);
        for r in &rows {
            markdown.push(markdown_row(w, r, pf, ceil));
        }
        for r in &rows {
            let x_pf = pf.map(|p| r.e2e_rate / p);
            let x_ceil = r.e2e_rate / ceil;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "delivery", "workload": w.name, "target": r.target,
                        "messages": r.messages, "size": w.size, "domains": w.domains,
                        "inject_per_s": r.inject_rate.round(), "e2e_per_s": r.e2e_rate.round(),
                        "rcpts": w.rcpts, "ack_latency_ms": r.ack,
                        "latency_ms": r.latency, "rss_mb": r.rss_mb,
                        "cpu_ms_per_1k": r.cpu_ms_per_1k, "x_postfix": x_pf, "x_ceiling": x_ceil,
                    })
                );
            } else {
                let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
                println!(
                    "{:<4} {:<8} {:>7} | {:>8.0} {:>8.0} | {:>7.1} {:>7.1} | {:>7.1} {:>8.1} \
                     {:>8.1} \
                     | {:>6} {:>9} | {:>8} {:>8.2}",
                    w.name,
                    r.target,
                    r.messages,
                    r.inject_rate,
                    r.e2e_rate,
                    r.ack["p50"].as_f64().unwrap_or(0.0),
                    r.ack["p99"].as_f64().unwrap_or(0.0),
                    r.latency["p50"].as_f64().unwrap_or(0.0),
                    r.latency["p99"].as_f64().unwrap_or(0.0),
                    r.latency["max"].as_f64().unwrap_or(0.0),
                    opt(r.rss_mb, 0),
                    opt(r.cpu_ms_per_1k, 1),
                    opt(x_pf, 1),
                    x_ceil
                );
            }
        }
    }
    if args.update_docs {
        update_docs(&root.join("docs/benchmarks.md"), &markdown)?;
    }
    Ok(())
}

/// One row of the docs table.
fn markdown_row(w: &Workload, r: &Row, pf: Option<f64>, ceil: f64) -> String {
    let f =
        |v: &serde_json::Value, k: &str| v[k].as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
    format!(
        "| {} | {} | {} | {:.0} | {:.0} | {} / {} | {} / {} / {} | {} | {} | {} | {:.2} |",
        w.name.to_uppercase(),
        r.target,
        r.messages,
        r.inject_rate,
        r.e2e_rate,
        f(&r.ack, "p50"),
        f(&r.ack, "p99"),
        f(&r.latency, "p50"),
        f(&r.latency, "p99"),
        f(&r.latency, "max"),
        opt(r.rss_mb, 0),
        opt(r.cpu_ms_per_1k, 0),
        opt(pf.map(|p| r.e2e_rate / p), 1),
        r.e2e_rate / ceil
    )
}

/// Replaces the text between the markers in docs/benchmarks.md with a fresh table.
fn update_docs(path: &Path, rows: &[String]) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- delivery-bench:begin -->";
    const END: &str = "<!-- delivery-bench:end -->";
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} ... {END} markers", path.display());
    };
    let date = Command::new("date").arg("+%F").output()?;
    let mut table = format!(
        "{BEGIN}\nLast `delivery-bench --update-docs` run: {}\n\n\
         | load | target | msgs | inject/s | e2e msgs/s | ack p50 / p99 ms | \
         e2e p50 / p99 / max ms | peak RSS MB | CPU ms / 1000 msgs | x Postfix | x ceiling |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        String::from_utf8_lossy(&date.stdout).trim()
    );
    for r in rows {
        table.push_str(r);
        table.push('\n');
    }
    let updated = format!("{}{table}{}", &text[..a], &text[b..]);
    std::fs::write(path, updated)?;
    println!("updated {}", path.display());
    Ok(())
}

enum Target<'a> {
    Ceiling,
    /// saida, with metrics recording on or off.
    Saida(bool),
    /// saida signing every message with the keys of this directory.
    SaidaSigned(&'a Path),
    Postfix(&'a Path),
}

fn run_target(
    bin: &Path,
    w: &Workload,
    n: usize,
    conns: usize,
    target: Target<'_>,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let sink_port = free_port()?;
    let sink_addr = format!("127.0.0.2:{sink_port}");
    let stats = dir.path().join("sink.json");
    let counter = dir.path().join("smtp-sink.out");
    let smtp_sink = SINK.get().is_some_and(|s| s == "smtp-sink");
    let _sink = if smtp_sink {
        if w.eod_delay_ms > 0 {
            bail!(
                "{}: smtp-sink cannot delay its replies by milliseconds",
                w.name
            );
        }
        real_peers::start_smtp_sink(&sink_addr, &counter)?
    } else {
        let sink = Command::new(bin.join("saida-sink"))
            .args(["--listen", &sink_addr, "--stats"])
            .arg(&stats)
            .args(["--delay-eod-ms", &w.eod_delay_ms.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("saida-sink")?;
        let guard = KillOnDrop(sink);
        wait_addr(&sink_addr)?;
        guard
    };
    let mut saida_pid = None;
    let mut _saida = None;
    let (name, port) = match target {
        Target::Ceiling => ("ceiling".to_string(), None),
        Target::Saida(_) | Target::SaidaSigned(_) => {
            let port = free_port()?;
            let (metrics, signing) = match target {
                Target::SaidaSigned(keys) => (
                    true,
                    format!("[signing]\ndkim_keys_dir = \"{}\"\n", keys.display()),
                ),
                Target::Saida(metrics) => (metrics, String::new()),
                _ => (true, String::new()),
            };
            let extra = format!("[admin]\naddress = \"\"\nmetrics = {metrics}\n{signing}");
            let child = start_saida(bin, dir.path(), port, &sink_addr, &extra, "")?;
            saida_pid = Some(child.0.id());
            _saida = Some(child);
            ("saida".to_string(), Some(port))
        }
        Target::Postfix(root) => {
            postfix_ctl(root, "start", 2526, Some(&sink_addr))?;
            ("postfix".to_string(), Some(2526))
        }
    };
    let start_us = unix_micros();
    let cpu_before = saida_pid.and_then(cpu_ticks);
    // The ceiling: the generator straight into the sink (127.0.0.2).
    let target_addr = port.map_or(sink_addr.clone(), |p| format!("127.0.0.1:{p}"));
    let load = blast(bin, &target_addr, conns, n, w);
    let load = match load {
        Ok(l) => l,
        Err(e) => {
            if matches!(target, Target::Postfix(_)) {
                let _ = postfix_ctl(repo_root()?.as_path(), "stop", 2526, None);
            }
            return Err(e);
        }
    };
    // Wait until the sink has every recipient (or nothing moved for 60 s).
    let mut last = (0, Instant::now());
    let s = loop {
        let mut s: serde_json::Value = std::fs::read_to_string(&stats)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let got = if smtp_sink {
            // smtp-sink counts messages, not recipients; the end is when it counted the last.
            let got = real_peers::sink_count(&counter);
            s = serde_json::json!({ "last_message_unix_us": unix_micros() });
            got
        } else {
            s["recipients"].as_u64().unwrap_or(0) as usize
        };
        if got >= n * w.rcpts {
            break s;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("{name}: stalled at {got} of {n} delivered");
        }
        std::thread::sleep(Duration::from_millis(if smtp_sink { 5 } else { 50 }));
    };
    let end_us = s["last_message_unix_us"].as_u64().unwrap_or(start_us);
    let e2e = n as f64 / ((end_us.saturating_sub(start_us)) as f64 / 1e6).max(1e-6);
    let cpu_ms_per_1k = match (saida_pid.and_then(cpu_ticks), cpu_before) {
        (Some(after), Some(before)) => {
            let ticks_per_s = 100.0; // USER_HZ on Linux
            Some((after - before) as f64 * 1000.0 / ticks_per_s / (n as f64 / 1000.0))
        }
        _ => None,
    };
    let rss_mb = saida_pid.and_then(peak_rss_mb);
    if matches!(target, Target::Postfix(_)) {
        postfix_ctl(repo_root()?.as_path(), "stop", 2526, None)?;
    }
    Ok(Row {
        target: name,
        messages: n,
        inject_rate: load["msgs_per_s"].as_f64().unwrap_or(0.0),
        ack: load["latency_ms"].clone(),
        e2e_rate: e2e,
        latency: s["latency_ms"].clone(),
        rss_mb,
        cpu_ms_per_1k,
    })
}

/// W1 unsigned, signed with one key, and with one key among 10,000, alternating `rounds`
/// times; prints one JSON line with the medians, the ratios and saida's peak RSS. The 10,000
/// key files are copies of 16 distinct keys made by openssl (each file is parsed into a key of
/// its own, so memory and load time are those of 10,000 keys); the messages' `From:` domain
/// (`origin.test`, saida-blast's) is one of them.
fn dkim_bench(
    bin: &Path,
    rounds: usize,
    scale: f64,
    conns: usize,
    algorithm: &str,
) -> anyhow::Result<()> {
    let genpkey: &[&str] = match algorithm {
        "rsa" => &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "ed25519" => &["genpkey", "-algorithm", "ED25519"],
        other => bail!("--dkim-algorithm takes rsa or ed25519, not {other}"),
    };
    let work = tempfile::tempdir()?;
    let mut distinct = Vec::new();
    for _ in 0..16 {
        let out = Command::new("openssl")
            .args(genpkey)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!("openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
        }
        distinct.push(out.stdout);
    }
    let one = work.path().join("one");
    let many = work.path().join("many");
    std::fs::create_dir(&one)?;
    std::fs::create_dir(&many)?;
    std::fs::write(one.join("origin.test.s1.pem"), &distinct[0])?;
    std::fs::write(many.join("origin.test.s1.pem"), &distinct[0])?;
    for i in 1..10_000 {
        std::fs::write(many.join(format!("k{i}.test.s1.pem")), &distinct[i % 16])?;
    }
    let w = &WORKLOADS[0];
    let n = ((w.messages as f64 * scale) as usize).max(conns);
    let mut runs: [Vec<Row>; 3] = Default::default();
    for _ in 0..rounds.max(1) {
        runs[0].push(run_target(bin, w, n, conns, Target::Saida(true))?);
        runs[1].push(run_target(bin, w, n, conns, Target::SaidaSigned(&one))?);
        runs[2].push(run_target(bin, w, n, conns, Target::SaidaSigned(&many))?);
    }
    let median = |rows: &[Row], f: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let e2e = |r: &Row| r.e2e_rate;
    let rss = |r: &Row| r.rss_mb.unwrap_or(0.0);
    let cpu = |r: &Row| r.cpu_ms_per_1k.unwrap_or(0.0);
    let [unsigned, signed, keys10k] = [0, 1, 2].map(|i| median(&runs[i], &e2e));
    let [rss_unsigned, rss_signed, rss_10k] = [0, 1, 2].map(|i| median(&runs[i], &rss));
    let [cpu_unsigned, cpu_signed, cpu_10k] = [0, 1, 2].map(|i| median(&runs[i], &cpu));
    let round1 = |v: f64| (v * 10.0).round() / 10.0;
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "dkim", "workload": "w1", "algorithm": algorithm, "messages": n,
            "rounds": rounds.max(1),
            "e2e_per_s": {"unsigned": unsigned.round(), "one_key": signed.round(),
                "keys_10000": keys10k.round()},
            "x_unsigned": {"one_key": round2(signed / unsigned),
                "keys_10000": round2(keys10k / unsigned)},
            "peak_rss_mb": {"unsigned": round1(rss_unsigned), "one_key": round1(rss_signed),
                "keys_10000": round1(rss_10k)},
            "rss_growth_10000_keys_mb": round1(rss_10k - rss_unsigned),
            "cpu_ms_per_1k": {"unsigned": round1(cpu_unsigned), "one_key": round1(cpu_signed),
                "keys_10000": round1(cpu_10k)},
            "sign_cpu_us_per_msg": round1(cpu_signed - cpu_unsigned),
        })
    );
    Ok(())
}

/// Starts saida in `dir` listening on `port`, every domain routed to `sink_addr` (`route` adds
/// keys to that route), 2 shards, durable spool, logging warnings only; returns once it
/// listens.
fn start_saida(
    bin: &Path,
    dir: &Path,
    port: u16,
    sink_addr: &str,
    extra: &str,
    route: &str,
) -> anyhow::Result<KillOnDrop> {
    let config = format!(
        "[server]\nshards = 2\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\
         [spool]\ndir = \"{d}/spool\"\n[smtp]\nconnections_per_ip_max = 100000\n\
         [log]\nlevel = \"warn\"\n[delivery]\nlog_dir = \"{d}/log\"\n{extra}\
         [[route]]\ndomain = \"*\"\nhosts = [\"{sink_addr}\"]\n{route}",
        d = dir.display()
    );
    let path = dir.join("saida.toml");
    std::fs::write(&path, config)?;
    let child = Command::new(bin.join("saida"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()?;
    let guard = KillOnDrop(child);
    wait_port(port)?;
    Ok(guard)
}

/// Runs saida-blast (closed loop, one thread) and returns its JSON report.
fn blast(
    bin: &Path,
    target: &str,
    conns: usize,
    n: usize,
    w: &Workload,
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(bin.join("saida-blast"))
        .args(["--target", target, "--quiet", "--json", "--threads", "1"])
        .args([
            "--connections",
            &conns.to_string(),
            "--count",
            &n.to_string(),
        ])
        .args([
            "--size",
            &w.size.to_string(),
            "--rcpts",
            &w.rcpts.to_string(),
        ])
        .args(["--domains", &w.domains.to_string()])
        .output()
        .context("saida-blast")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("saida-blast: {}", String::from_utf8_lossy(&out.stderr)))?;
    if report["failed"].as_u64().unwrap_or(0) > 0 {
        bail!("saida-blast against {target}: {report}");
    }
    Ok(report)
}

fn wait_addr(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Queues `n` recipients for a suspended domain, measures anonymous resident memory per queued
/// recipient (the bodies stay on disk), restarts, and times the recovery of all of them.
fn queue_scale(bin: &Path, n: usize, conns: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let config = format!(
        "[server]\nshards = 2\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\
         [spool]\ndir = \"{d}/spool\"\n[smtp]\nconnections_per_ip_max = 100000\n\
         [delivery]\nlog_dir = \"\"\nqueued_rcpts_max = 100000000\n\
         [admin]\naddress = \"{admin}\"\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
        d = dir.path().display()
    );
    let path = dir.path().join("saida.toml");
    std::fs::write(&path, config)?;
    let log = dir.path().join("saida.log");
    let start = |log: &Path| -> anyhow::Result<KillOnDrop> {
        let child = Command::new(bin.join("saida"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        Ok(KillOnDrop(child))
    };
    let queue = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(bin.join("saida"))
            .args(["queue", "--config"])
            .arg(&path)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "saida queue {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let queued = |json: &str| -> usize {
        serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| {
                v["domains"].as_array().map(|a| {
                    a.iter()
                        .map(|d| d["queued_rcpts"].as_u64().unwrap_or(0) as usize)
                        .sum()
                })
            })
            .unwrap_or(0)
    };
    let mut saida = start(&log)?;
    wait_port(port)?;
    queue(&["suspend", "d0.test"])?;
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_anon_mb(saida.0.id()).unwrap_or(0.0);
    let t = Instant::now();
    let load = run_load_to(port, conns, n, 300, 1, false)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while queued(&queue(&["--json", "summary"])?) < n {
        if Instant::now() > deadline {
            bail!("not every recipient was queued");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let inject_s = t.elapsed().as_secs_f64();
    let full = rss_anon_mb(saida.0.id()).unwrap_or(0.0);
    let per_rcpt = (full - base) * 1024.0 * 1024.0 / n as f64;
    let _ = Command::new("kill")
        .args(["-TERM", &saida.0.id().to_string()])
        .status();
    let _ = saida.0.wait();
    let t = Instant::now();
    let log2 = dir.path().join("saida2.log");
    let saida2 = start(&log2)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(out) = queue(&["--json", "summary"]) {
            if queued(&out) >= n {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("recovery did not queue every recipient in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let recover_s = t.elapsed().as_secs_f64();
    let spool_mb = dir_bytes(&dir.path().join("spool")) as f64 / (1 << 20) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "queue-scale", "recipients": n, "inject_s": inject_s,
            "inject_per_s": load.rate.round(), "rss_anon_base_mb": base, "rss_anon_full_mb": full,
            "bytes_per_queued_rcpt": per_rcpt.round(), "recover_all_s": recover_s,
            "spool_mb": spool_mb.round(),
        })
    );
    drop(saida2);
    Ok(())
}

/// Anonymous resident memory (heap, not file-backed maps) of a process, in MiB.
fn rss_anon_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}
