//! `delivery-bench --tools N`: saida's load tools beside Postfix's, on loopback, 2 KB messages,
//! one message per transaction over reused connections:
//! - generators into the same sink (`smtp-sink`): `smtp-source -d` vs `saida-blast`;
//! - sinks under the same generator (`smtp-source -d`): `smtp-sink` vs `saida-sink`.
//!
//! Rates are messages over the generator's wall time (smtp-source prints no rate).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use saida_bench::{KillOnDrop, free_port, wait_port};

/// Which sink to start.
#[derive(Clone, Copy)]
enum SinkKind {
    Postfix,
    Saida,
}

fn start_sink(bin: &Path, kind: SinkKind, port: u16) -> anyhow::Result<KillOnDrop> {
    let addr = format!("127.0.0.1:{port}");
    let child = match kind {
        SinkKind::Postfix => Command::new("smtp-sink")
            .args(["-u", "nobody", &addr, "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("smtp-sink (Debian package postfix; scripts/postfix-bench.sh installs it)")?,
        SinkKind::Saida => Command::new(bin.join("saida-sink"))
            .args(["--listen", &addr])
            .stdout(Stdio::null())
            .spawn()
            .context("saida-sink")?,
    };
    let guard = KillOnDrop(child);
    wait_port(port)?;
    Ok(guard)
}

/// smtp-source: `conns` sessions in parallel, `n` messages of 2 KB; messages per second.
fn smtp_source(port: u16, conns: usize, n: usize) -> anyhow::Result<f64> {
    let (wall, _cpu) = crate::real_peers::smtp_source(&format!("127.0.0.1:{port}"), conns, n)?;
    Ok(n as f64 / wall)
}

/// saida-blast, closed loop, one client thread like smtp-source's single process.
fn saida_blast(bin: &Path, port: u16, conns: usize, n: usize) -> anyhow::Result<f64> {
    let out = Command::new(bin.join("saida-blast"))
        .args([
            "--target",
            &format!("127.0.0.1:{port}"),
            "--quiet",
            "--json",
        ])
        .args(["--threads", "1", "--connections", &conns.to_string()])
        .args(["--count", &n.to_string(), "--size", "2048"])
        .output()
        .context("saida-blast")?;
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).context("saida-blast output")?;
    if r["failed"].as_u64().unwrap_or(1) > 0 {
        bail!("saida-blast: {r}");
    }
    Ok(r["msgs_per_s"].as_f64().unwrap_or(0.0))
}

/// Runs the four pairings, three rounds each, and prints medians.
pub fn tools_bench(bin: &Path, n: usize, conns: usize) -> anyhow::Result<()> {
    let mut rows: Vec<(&str, &str, Vec<f64>)> = vec![
        ("smtp-source", "smtp-sink", vec![]),
        ("saida-blast", "smtp-sink", vec![]),
        ("smtp-source", "saida-sink", vec![]),
        ("saida-blast", "saida-sink", vec![]),
    ];
    for _round in 0..3 {
        for (generator, sink, rates) in rows.iter_mut() {
            let port = free_port()?;
            let kind = if *sink == "smtp-sink" {
                SinkKind::Postfix
            } else {
                SinkKind::Saida
            };
            let _sink = start_sink(bin, kind, port)?;
            let rate = if *generator == "smtp-source" {
                smtp_source(port, conns, n)?
            } else {
                saida_blast(bin, port, conns, n)?
            };
            rates.push(rate);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = median(&rows[0].2);
    println!(
        "{:<12} -> {:<11} | {:>9} | {:>12}",
        "generator", "sink", "msgs/s", "x source->sink"
    );
    for (g, s, rates) in &rows {
        let m = median(rates);
        println!("{g:<12} -> {s:<11} | {m:>9.0} | {:>12.2}", m / base);
        println!(
            "{}",
            serde_json::json!({"bench": "tools", "generator": g, "sink": s, "messages": n,
                "connections": conns, "msgs_per_s": m.round(), "rounds": rates})
        );
    }
    Ok(())
}
