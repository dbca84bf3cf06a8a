//! Helpers for saida's end-to-end tests: finding the workspace's built binaries.
//!
//! The tests run the real `saida` and tool binaries as separate processes. They are built by
//! `cargo build --workspace --bins`, which `scripts/test.sh` runs before `cargo test`.

use std::path::PathBuf;

/// Path of the workspace binary `name`, built in the same profile as this test.
///
/// Panics with the command to run when the binary has not been built: a missing binary is a
/// broken test setup, never a reason to pass.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A running `saida run` with its own configuration, spool and log; killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts saida with `extra` TOML appended to a config that sets the listener (plus any
    /// listeners `extra` adds), the spool directory and 2 shards, and waits until it accepts
    /// connections. `{dir}` in `extra` is replaced by the daemon's directory.
    pub fn start(backend: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = format!(
            "[server]\nhostname = \"saida.test\"\nshards = 2\nbackend = \"{backend}\"\n\
             shutdown_grace_secs = 2\n\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\n\
             [spool]\ndir = \"{d}/spool\"\n\n{delivery}{admin}{extra}\n",
            // Tests that do not test delivery never deliver (no traffic off loopback).
            delivery = if extra.contains("[delivery]") {
                ""
            } else {
                "[delivery]\nenabled = false\n\n"
            },
            // Daemons run in parallel: no shared admin port unless a test asks for one.
            admin = if extra.contains("[admin]") {
                ""
            } else {
                "[admin]\naddress = \"\"\n\n"
            },
            d = dir.path().display(),
            extra = extra.replace("{dir}", &dir.path().display().to_string()),
        );
        Daemon::start_in(dir, port, &config)
    }

    /// Starts saida on a complete configuration in `dir` (listening on `port`).
    pub fn start_in(dir: tempfile::TempDir, port: u16, config: &str) -> Daemon {
        let path = dir.path().join("saida.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("saida.log")).expect("log file");
        let child = std::process::Command::new(binary("saida"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(log)
            .spawn()
            .expect("start saida");
        let daemon = Daemon { child, port, dir };
        // Ready means every shard has recovered its spool and serves ("saida running" is logged
        // after that), not merely that the kernel accepts connections on the port.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !daemon.log().contains("saida running") {
            let log = daemon.log();
            assert!(
                std::time::Instant::now() < deadline,
                "saida did not start:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        daemon
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("saida.log")).unwrap_or_default()
    }

    /// The spool directory of shard `n`.
    pub fn shard_dir(&self, n: usize) -> std::path::PathBuf {
        self.dir.path().join("spool").join(format!("shard-{n}"))
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        self.child.wait().expect("wait for saida")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on `address` over plain HTTP/1.1; returns the body (panics unless 200).
pub fn http_get(address: &str, path: &str) -> String {
    get(address, path, "")
}

/// `GET path` on `address` with a bearer `token`; returns the body (panics unless 200).
pub fn http_get_token(address: &str, path: &str, token: &str) -> String {
    get(address, path, &format!("authorization: Bearer {token}\r\n"))
}

fn get(address: &str, path: &str, more_headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {address}\r\n{more_headers}connection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the answer");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_string()
}

/// Waits until the daemon whose admin endpoint is `admin` holds no live message in any spool
/// (everything delivered, failed or bounced, and every bounce delivered): from then on nothing
/// more can be sent. Panics after `secs`.
pub fn wait_spool_empty(admin: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let text = http_get(admin, "/metrics");
        let live = text
            .lines()
            .find_map(|l| l.strip_prefix("saida_spool_live_messages "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if live == Some(0.0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spool never emptied (live: {live:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `POST path` of a JSON `body` on `address` with a bearer `token`; returns the status and
/// the answer's body.
pub fn http_post_json(address: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("read timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .and_then(|()| s.write_all(body.as_bytes()))
    .expect("send the request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the answer");
    let (head, answer) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    (status.unwrap_or(0), answer.to_string())
}

/// Runs a Python 3 script with arguments; returns its standard output, panicking with its
/// error output if it fails.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is required for the end-to-end tests");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a self-signed certificate for `saida.test` and its key into `dir`; returns their
/// paths.
pub fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["saida.test".to_string()]).expect("rcgen");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, signing_key.serialize_pem()).expect("write key");
    (c, k)
}

/// Queue ids in `250 2.0.0 Ok: queued as <id>` lines of `text`.
pub fn queued_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split("queued as ").nth(1))
        .map(|id| id.trim().trim_end_matches('\'').to_string())
        .collect()
}

/// A `[tls]` section with a fresh self-signed certificate written into `dir`, plus `more` keys.
pub fn tls_config(dir: &std::path::Path, more: &str) -> String {
    let (cert, key) = self_signed(dir);
    format!(
        "[tls]\ncertificate = \"{}\"\nkey = \"{}\"\n{more}",
        cert.display(),
        key.display()
    )
}

/// A running `saida-sink` recording every accepted recipient; killed on drop.
pub struct Sink {
    pub child: std::process::Child,
    pub record: PathBuf,
    /// Its counters, rewritten every 100 ms (`--stats`).
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sink {
    /// Starts the sink on `addrs` with extra arguments, waiting until it listens.
    pub fn start(addrs: &[String], args: &[&str]) -> Sink {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("record.jsonl");
        let mut cmd = std::process::Command::new(binary("saida-sink"));
        for a in addrs {
            cmd.args(["--listen", a]);
        }
        let stats = dir.path().join("stats.json");
        let mut child = cmd
            .args(["--threads", "2", "--record"])
            .arg(&record)
            .arg("--stats")
            .arg(&stats)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start saida-sink");
        let mut line = String::new();
        let out = child.stdout.take().expect("sink stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .expect("sink output");
        assert!(line.contains("listening"), "sink did not start: {line}");
        Sink {
            child,
            record,
            stats,
            _dir: dir,
        }
    }

    /// Its counters as last written (at most 100 ms old; the first write follows the start).
    pub fn stats(&self) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(v) = std::fs::read(&self.stats)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "no sink stats");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Every recorded recipient so far (one JSON object each).
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `pred` holds for the records (panics after `secs`).
    pub fn wait_until(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let r = self.records();
            if pred(&r) {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; {} records",
                r.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `dnsmasq` answering for `*.test` on a free loopback port; killed on drop.
pub struct Dnsmasq {
    child: std::process::Child,
    pub port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq with extra record arguments (`--mx-host=...`, `--host-record=...`). The
    /// port is one that was free a moment ago; if another process took it meanwhile (dnsmasq
    /// exits), it starts again on another one.
    pub fn start(records: &[String]) -> Dnsmasq {
        for _ in 0..5 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("free UDP port")
                .port();
            let mut child = std::process::Command::new("dnsmasq")
                .args([
                    "--no-daemon",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                ])
                .args(["--no-resolv", "--no-hosts", "--pid-file=", "--local=/test/"])
                .arg("--local-ttl=300")
                .arg(format!("--port={port}"))
                .args(records)
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("dnsmasq is needed (scripts/test.sh installs dnsmasq-base)");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Dnsmasq { child, port };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken: try another
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "dnsmasq did not start"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        panic!("dnsmasq exited at start five times (ports taken?)");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends messages with Python's smtplib over one connection. Each message is
/// `(sender, [recipients])`; the body names its index. Returns the number accepted.
pub fn send_messages(port: u16, messages: &[(&str, Vec<String>)]) -> usize {
    let spec: Vec<serde_json::Value> = messages
        .iter()
        .map(|(f, r)| serde_json::json!({"from": f, "to": r}))
        .collect();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::Value::from(spec).to_string()).expect("write spec");
    let out = python(
        r#"
import json, smtplib, sys
port = int(sys.argv[1]); spec = json.load(open(sys.argv[2]))
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
ok = 0
for i, m in enumerate(spec):
    body = "Subject: test %d\r\nMessage-ID: <m%d@client.test>\r\n\r\nmessage %d\r\n" % (i, i, i)
    s.sendmail(m["from"], m["to"], body)
    ok += 1
s.quit()
print(ok)
"#,
        &[&port.to_string(), &file.path().display().to_string()],
    );
    out.trim().parse().expect("count")
}

/// Lines of the daemon's delivery logs (all shards), parsed.
pub fn delivery_log(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// A credentials file line for `user` made by `saida passwd`.
pub fn passwd_line(user: &str, password: &str) -> Vec<u8> {
    use std::io::Write;
    let out = std::process::Command::new(binary("saida"))
        .args(["passwd", user])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(format!("{password}\n").as_bytes())?;
            }
            c.wait_with_output()
        })
        .expect("saida passwd");
    assert!(out.status.success());
    out.stdout
}

/// A new RSA-2048 private key in PEM (openssl makes it: ring cannot, and scripts/test.sh
/// installs openssl).
pub fn rsa_key_pem() -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
