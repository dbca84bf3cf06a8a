//! `delivery-bench --peer postfix-tools`: saida between Postfix's own load tools, the way MTAs
//! are usually compared. In one run, `--rounds` times each, 2 KB messages, one recipient, all
//! to one domain (smtp-source varies only the local part: a hot single destination):
//! - ceiling: `smtp-source` straight into `smtp-sink`;
//! - saida: `smtp-source` → saida (durable spool, 2 shards) → `smtp-sink`;
//! - postfix: `smtp-source` → Postfix (tuned relay, fsync on; scripts/postfix-bench.sh) →
//!   `smtp-sink`, when Postfix is installed.
//!
//! `smtp-sink` offers PIPELINING but not CHUNKING, so saida's DATA path is what it measures.
//! Figures: injection rate (messages over smtp-source's wall time), end-to-end rate (messages
//! over the time until `smtp-sink` counted the last one), and CPU µs per message of saida, of
//! smtp-source (its children's times, from the shell) and of smtp-sink (/proc).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use saida_bench::{KillOnDrop, free_port, postfix_ctl, wait_port};

/// One run's figures.
struct Run {
    inject: f64,
    e2e: f64,
    saida_us: Option<f64>,
    source_us: f64,
    sink_us: f64,
}

/// `smtp-sink -c` on `addr`, its counter lines going to `out`. `-m 4096`: smtp-sink serves at
/// most 256 sessions at once by default and leaves the others waiting for their banner in the
/// listen queue until one ends (W1 opens a connection for each of its 1,000 domains, which then
/// delivered in bursts every `idle_secs`).
pub(crate) fn start_smtp_sink(addr: &str, out: &Path) -> anyhow::Result<KillOnDrop> {
    let file = std::fs::File::create(out)?;
    let child = Command::new("smtp-sink")
        .args(["-c", "-m", "4096", "-u", "nobody", addr, "1024"])
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .context("smtp-sink (Debian package postfix; scripts/postfix-bench.sh installs it)")?;
    let guard = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("smtp-sink did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(guard)
}

/// The last `mesg=N` that `smtp-sink -c` printed. Only the file's tail is read: it grows by a
/// line per message, and reading all of it every few milliseconds would take CPU from the
/// processes being measured.
pub(crate) fn sink_count(out: &Path) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = Vec::with_capacity(256);
    if let Ok(mut f) = std::fs::File::open(out) {
        let len = f.metadata().map_or(0, |m| m.len());
        if f.seek(SeekFrom::Start(len.saturating_sub(256))).is_ok() {
            let _ = f.read_to_end(&mut tail);
        }
    }
    let text = String::from_utf8_lossy(&tail);
    text.rsplit("mesg=")
        .next()
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// smtp-source, `conns` sessions, `n` messages of 2 KB to `target`; (wall seconds, CPU seconds
/// of smtp-source from the shell's `times`).
pub(crate) fn smtp_source(target: &str, conns: usize, n: usize) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let out = Command::new("bash")
        .args([
            "-c",
            "smtp-source \"$@\" >/dev/null || exit 1; times",
            "smtp-source",
        ])
        .args([
            "-d",
            "-s",
            &conns.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            "2048",
        ])
        .args(["-f", "bench@origin.test", "-t", "user@hot.test", target])
        .stderr(Stdio::inherit())
        .output()
        .context("smtp-source")?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("smtp-source failed: {}", out.status);
    }
    // `times`: the shell's user and system time, then its children's: `0m1.234s 0m0.567s`.
    let text = String::from_utf8_lossy(&out.stdout);
    let children = text.lines().nth(1).unwrap_or("");
    let secs = |f: &str| -> f64 {
        let (m, s) = f
            .trim_end_matches('s')
            .split_once('m')
            .unwrap_or(("0", "0"));
        m.parse::<f64>().unwrap_or(0.0) * 60.0 + s.parse::<f64>().unwrap_or(0.0)
    };
    let cpu = children.split_whitespace().map(secs).sum();
    Ok((wall, cpu))
}

fn ticks(pid: u32) -> u64 {
    crate::cpu_ticks(pid).unwrap_or(0)
}

/// One run of `target` (`ceiling`, `saida` or `postfix`).
fn run(
    bin: &Path,
    root: &Path,
    target: &str,
    n: usize,
    conns: usize,
    spread: bool,
) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let sink_addr = format!("127.0.0.2:{}", free_port()?);
    let counter = dir.path().join("smtp-sink.out");
    let sink = start_smtp_sink(&sink_addr, &counter)?;
    let mut saida = None;
    let inject_addr = match target {
        "ceiling" => sink_addr.clone(),
        "saida" => {
            let port = free_port()?;
            // 50 connections to the one destination, as Postfix's relay gets in its bench.
            let child = crate::start_saida(
                bin,
                dir.path(),
                port,
                &sink_addr,
                "[admin]\naddress = \"\"\n",
                &format!("connections_max = 50\nspread_over_shards = {spread}\n"),
            )?;
            saida = Some(child);
            format!("127.0.0.1:{port}")
        }
        _ => {
            postfix_ctl(root, "start", 2526, Some(&sink_addr))?;
            wait_port(2526)?;
            "127.0.0.1:2526".to_string()
        }
    };
    let saida_pid = saida.as_ref().map(|s| s.0.id());
    let (saida_before, sink_before) = (saida_pid.map(ticks), ticks(sink.0.id()));
    let start = Instant::now();
    let result = smtp_source(&inject_addr, conns, n);
    let (wall, source_cpu) = match result {
        Ok(r) => r,
        Err(e) => {
            if target == "postfix" {
                let _ = postfix_ctl(root, "stop", 2526, None);
            }
            return Err(e);
        }
    };
    // The end: smtp-sink has counted every message (or nothing moved for 60 s).
    let mut last = (0, Instant::now());
    let done = loop {
        let got = sink_count(&counter);
        if got >= n {
            break start.elapsed();
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("{target}: stalled at {got} of {n} delivered");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let per_msg = |t: u64| t as f64 * 10_000.0 / n as f64; // USER_HZ 100: 10,000 µs a tick
    let run = Run {
        inject: n as f64 / wall,
        e2e: n as f64 / done.as_secs_f64(),
        saida_us: saida_pid.map(|p| per_msg(ticks(p) - saida_before.unwrap_or(0))),
        source_us: source_cpu * 1e6 / n as f64,
        sink_us: per_msg(ticks(sink.0.id()) - sink_before),
    };
    if target == "postfix" {
        postfix_ctl(root, "stop", 2526, None)?;
    }
    Ok(run)
}

pub fn peers_bench(
    bin: &Path,
    root: &Path,
    n: usize,
    conns: usize,
    rounds: usize,
    spread: bool,
) -> anyhow::Result<()> {
    let postfix = Command::new("sh")
        .args(["-c", "command -v postfix"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut targets = vec!["ceiling", "saida"];
    if postfix {
        targets.push("postfix");
    } else {
        eprintln!("postfix is not installed (scripts/postfix-bench.sh start installs it): no row");
    }
    let mut runs: Vec<(&str, Vec<Run>)> = targets.iter().map(|t| (*t, Vec::new())).collect();
    for _ in 0..rounds.max(1) {
        for (target, done) in runs.iter_mut() {
            // Postfix is much slower: a tenth of the messages.
            let m = if *target == "postfix" {
                (n / 10).max(conns)
            } else {
                n
            };
            done.push(run(bin, root, target, m, conns, spread)?);
        }
    }
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let rate_of = |name: &str| {
        runs.iter()
            .find(|(t, _)| *t == name)
            .map(|(_, r)| med(r, &|x| x.e2e))
    };
    let ceiling = rate_of("ceiling").unwrap_or(1.0);
    let postfix_rate = rate_of("postfix");
    println!(
        "{:<8} | {:>9} {:>9} | {:>8} {:>8} {:>9} | {:>10} {:>9} {:>8}",
        "target",
        "inject/s",
        "e2e/s",
        "e2e/inj",
        "x ceil",
        "x postfix",
        "saida µs",
        "source µs",
        "sink µs"
    );
    for (target, r) in &runs {
        let (inject, e2e) = (med(r, &|x| x.inject), med(r, &|x| x.e2e));
        let saida_us = r[0]
            .saida_us
            .map(|_| med(r, &|x| x.saida_us.unwrap_or(0.0)));
        let (source_us, sink_us) = (med(r, &|x| x.source_us), med(r, &|x| x.sink_us));
        let x_pf = postfix_rate.map(|p| e2e / p);
        println!(
            "{target:<8} | {inject:>9.0} {e2e:>9.0} | {:>8.2} {:>8.2} {:>9} | {:>10} \
             {source_us:>9.1} {sink_us:>8.1}",
            e2e / inject,
            e2e / ceiling,
            x_pf.map_or("-".into(), |x| format!("{x:.1}")),
            saida_us.map_or("-".into(), |u| format!("{u:.1}")),
        );
        println!(
            "{}",
            serde_json::json!({"bench": "peers", "peer": "postfix-tools", "target": target,
                "messages": if *target == "postfix" { (n / 10).max(conns) } else { n },
                "connections": conns, "inject_per_s": inject.round(), "e2e_per_s": e2e.round(),
                "x_ceiling": e2e / ceiling, "x_postfix": x_pf,
                "saida_cpu_us_per_msg": saida_us, "source_cpu_us_per_msg": source_us,
                "sink_cpu_us_per_msg": sink_us, "rounds": r.len(),
                "e2e_rounds": r.iter().map(|x| x.e2e.round()).collect::<Vec<_>>()})
        );
    }
    // saida is an SMTP server and an SMTP client for each message; so is the tools' pair.
    let tools_us = |name: &str| {
        runs.iter()
            .find(|(t, _)| *t == name)
            .map(|(_, r)| med(r, &|x| x.source_us) + med(r, &|x| x.sink_us))
    };
    let saida_us = runs
        .iter()
        .find(|(t, _)| *t == "saida")
        .map(|(_, r)| med(r, &|x| x.saida_us.unwrap_or(0.0)));
    if let (Some(saida), Some(pair), Some(beside)) =
        (saida_us, tools_us("ceiling"), tools_us("saida"))
    {
        println!(
            "saida CPU per message {saida:.1} µs: {:.2}x the tools' pair on its own \
             (smtp-source + smtp-sink, ceiling row: {pair:.1} µs), {:.2}x the tools around saida \
             (saida row: {beside:.1} µs)",
            saida / pair,
            saida / beside
        );
        println!(
            "{}",
            serde_json::json!({"bench": "peers", "peer": "postfix-tools", "target": "cpu-ratio",
                "saida_cpu_us_per_msg": saida, "tools_pair_cpu_us_per_msg": pair,
                "tools_beside_saida_cpu_us_per_msg": beside, "x_tools_pair": saida / pair,
                "x_tools_beside_saida": saida / beside})
        );
    }
    Ok(())
}
