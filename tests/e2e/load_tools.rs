//! The load-test tools end to end: `saida-blast` against `saida-sink` (and Python's smtplib
//! where a behaviour is easier to see from a plain client), on loopback. Each sink behaviour of
//! a profile is proven by what a client receives.

use std::time::Duration;

use saida_e2e::{Sink, binary, free_port, python};

/// Runs saida-blast with `args` against `target`; returns its JSON report.
fn blast(target: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(binary("saida-blast"))
        .args(["--target", target, "--quiet", "--json"])
        .args(args)
        .output()
        .expect("saida-blast");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "blast output is not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn profile(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn ms(report: &serde_json::Value, q: &str) -> f64 {
    report["latency_ms"][q].as_f64().unwrap()
}

#[test]
fn open_loop_latency_counts_from_the_intended_send_time() {
    let addr = format!("127.0.0.1:{}", free_port());
    let _sink = Sink::start(std::slice::from_ref(&addr), &["--delay-eod-ms", "50"]);
    // Within capacity (10 connections x 20/s each = 200/s > 100/s): latency is the 50 ms.
    let r = blast(
        &addr,
        &["--rate", "100", "--count", "200", "--connections", "10"],
    );
    assert_eq!(r["ok"], 200);
    assert!(ms(&r, "p50") >= 50.0 && ms(&r, "p50") < 150.0, "{r}");
    // Beyond capacity (5 x 20/s = 100/s < 1000/s): the backlog shows up as latency, growing to
    // seconds, while a closed loop on the same sink reports only the service time.
    let r = blast(
        &addr,
        &["--rate", "1000", "--count", "300", "--connections", "5"],
    );
    assert!(ms(&r, "p90") > 1000.0, "open loop hid the backlog: {r}");
    let closed = blast(&addr, &["--count", "300", "--connections", "5"]);
    assert!(ms(&closed, "p90") < 500.0, "{closed}");
    assert!(ms(&closed, "p50") >= 50.0, "{closed}");
}

#[test]
fn reply_mixes_greylisting_and_extensions_follow_the_profile() {
    let addr = format!("127.0.0.1:{}", free_port());
    let p = profile(
        r#"
        [default]
        pipelining = false
        smtputf8 = false
        [domain."bad.test"]
        rcpt_reply_mix = [{ percent = 100, reply = "550 5.1.1 no such user" }]
        [domain."half.test"]
        message_reply_mix = [{ percent = 50, reply = "451 4.3.0 try later" }]
        [domain."grey.test"]
        greylist = true
        "#,
    );
    let sink = Sink::start(
        std::slice::from_ref(&addr),
        &["--profile", p.path().to_str().unwrap()],
    );
    let bad = blast(
        &addr,
        &[
            "--count",
            "20",
            "--connections",
            "1",
            "--domains",
            "1",
            "--rcpt-format",
            "u{n}@bad.test",
        ],
    );
    assert_eq!(bad["reply_codes"]["550"], 20, "{bad}");
    let half = blast(
        &addr,
        &["--count", "400", "--rcpt-format", "u{n}@half.test"],
    );
    let temp = half["reply_codes"]["451"].as_u64().unwrap_or(0);
    assert!(
        (120..=280).contains(&temp),
        "50 % of 400 gave {temp}: {half}"
    );
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10)
s.ehlo("t")
f = s.esmtp_features
print("pipelining" in f, "smtputf8" in f, "chunking" in f)
codes = []
for _ in range(2):
    s.mail("a@origin.test")
    codes.append(s.rcpt("x@grey.test")[0])
    s.rset()
print(codes)
"#,
        &[addr.rsplit(':').next().unwrap()],
    );
    assert_eq!(out.lines().next(), Some("False False True"), "{out}");
    assert_eq!(out.lines().nth(1), Some("[451, 250]"), "{out}");
    drop(sink);
}

#[test]
fn caps_latency_disconnects_tls_and_metrics() {
    let (a, b, c) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let p = profile(&format!(
        r#"
        [listener."{a}"]
        connections_max = 2
        banner_delay_ms = {{ dist = "fixed", value = 300 }}
        [listener."{b}"]
        rate_per_second = 20
        [listener."{c}"]
        disconnect_percent = 100
        "#
    ));
    let sink = Sink::start(
        &[a.clone(), b.clone(), c.clone()],
        &[
            "--tls",
            "--profile",
            p.path().to_str().unwrap(),
            "--metrics",
            &metrics,
        ],
    );
    // Connection cap: with 2 connections held open, a third is refused with 421.
    let out = python(
        r#"
import socket, sys, time
host, port = "127.0.0.1", int(sys.argv[1])
t = time.time()
held = [socket.create_connection((host, port)) for _ in range(2)]
time.sleep(0.1)
third = socket.create_connection((host, port)).makefile("rb").readline()
print(third.decode().strip()[:3])
print(held[0].makefile("rb").readline().decode()[:3], round((time.time() - t) * 1000))
"#,
        &[a.rsplit(':').next().unwrap()],
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("421"), "{out}");
    // The banner came after the profile's 300 ms delay.
    let banner: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(banner[0], "220");
    assert!(banner[1].parse::<u64>().unwrap() >= 290, "{out}");
    // Rate cap: 100 messages as fast as possible into 20/s.
    let r = blast(&b, &["--count", "100", "--connections", "4"]);
    assert!(r["reply_codes"]["451"].as_u64().unwrap_or(0) >= 50, "{r}");
    // Disconnects at end of data: every message fails with a closed connection.
    let r = blast(&c, &["--count", "5", "--connections", "1"]);
    assert_eq!(r["ok"], 0, "{r}");
    assert!(r["errors"].to_string().contains("closed"), "{r}");
    // STARTTLS with the self-signed certificate.
    let r = blast(&a, &["--count", "3", "--connections", "1", "--starttls"]);
    assert_eq!(r["ok"], 3, "{r}");
    assert!(sink.records().iter().any(|x| x["tls"] == true));
    // Prometheus text on /metrics.
    let text = python(
        r#"
import sys, urllib.request
print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=5).read().decode())
"#,
        &[&metrics],
    );
    assert!(
        text.contains("# TYPE saida_sink_messages_total counter"),
        "{text}"
    );
    assert!(
        text.contains("saida_sink_refused_connections_total 1"),
        "{text}"
    );
    assert!(text.contains("saida_sink_disconnects_total"), "{text}");
}

#[test]
fn tools_refuse_non_loopback_addresses() {
    let out = std::process::Command::new(binary("saida-blast"))
        .args(["--target", "192.0.2.1:25", "--count", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
    let out = std::process::Command::new(binary("saida-sink"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn the_sink_reads_content_as_strictly_as_saida() {
    // A sender whose line ends are wrong is caught: `\n.\n` never ends the message, and the
    // message is refused at the real end of data.
    let addr = format!("127.0.0.1:{}", free_port());
    let sink = Sink::start(std::slice::from_ref(&addr), &[]);
    let out = python(
        r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=20)
f = s.makefile("rb")
def reply():
    while True:
        line = f.readline().decode()
        if len(line) < 4 or line[3] == " ":
            return line.strip()
reply()
for cmd in ["EHLO c.test", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA"]:
    s.sendall((cmd + "\r\n").encode()); reply()
s.sendall(b"Subject: x\r\n\r\nbare\n.\nstill content\r\n.\r\n")
print(reply())
for cmd in ["MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA"]:
    s.sendall((cmd + "\r\n").encode()); reply()
s.sendall(b"Subject: y\r\n\r\nfine\r\n..dot\r\n.\r\n")
print(reply())
"#,
        &[&addr],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("550 5.6.0"), "{out}");
    assert!(lines[1].starts_with("250"), "{out}");
    let records = sink.records();
    assert_eq!(records.len(), 1, "only the well-formed message is recorded");
}
