//! The SMTP server end to end: the real `saida run` on loopback, on both I/O backends, driven by
//! real clients (Python's smtplib, swaks, raw sockets), with real TLS handshakes.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use saida_e2e::{Daemon, python, queued_ids, self_signed, tls_config};

const BACKENDS: [&str; 2] = ["io_uring", "epoll"];

/// smtplib: EHLO, optional STARTTLS (unverified: the certificate is self-signed), optional
/// AUTH, then N messages on one connection. Prints each `queued as` reply.
const SEND: &str = r#"
import smtplib, ssl, sys
port, n, tls, user, pw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
if tls == "implicit":
    s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
else:
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo("client.test")
if tls == "starttls":
    s.starttls(context=ctx); s.ehlo("client.test")
if user:
    s.login(user, pw)
for i in range(n):
    s.mail("sender@origin.test")
    s.rcpt("rcpt%d@dest%d.test" % (i, i % 7))
    code, msg = s.data(b"Subject: message %d\r\n\r\nBody %d\r\n.leading dot\r\n" % (i, i))
    print(code, msg.decode())
s.quit()
"#;

fn send(port: u16, n: usize, tls: &str, user: &str, pw: &str) -> Vec<String> {
    let out = python(SEND, &[&port.to_string(), &n.to_string(), tls, user, pw]);
    let ids = queued_ids(&out);
    assert_eq!(ids.len(), n, "{out}");
    ids
}

/// Reads one (possibly multi-line) reply.
fn reply(r: &mut impl BufRead) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

#[test]
fn smtplib_messages_are_queued_durably_on_both_backends() {
    for backend in BACKENDS {
        let mut d = Daemon::start(backend, "");
        let ids = send(d.port, 20, "none", "", "");
        assert!(
            d.log().contains(&format!("running on {backend}")),
            "{}",
            d.log()
        );
        assert!(d.terminate().success(), "{}", d.log());
        // Every acknowledged message is in one of the shards' spools, with the headers saida
        // adds and the content unstuffed.
        let mut found = 0;
        for shard in 0..2 {
            let (spool, report) =
                spool::Spool::open(spool::SpoolConfig::new(d.shard_dir(shard))).unwrap();
            assert!(report.is_clean());
            for id in &ids {
                if let Ok(m) = spool.message(id.parse().unwrap()) {
                    let body = String::from_utf8_lossy(m.body);
                    assert!(
                        body.starts_with("Received: from client.test ([127.0.0.1])"),
                        "{body}"
                    );
                    assert!(body.contains("Message-ID: <"), "{body}");
                    assert!(body.ends_with("\r\n.leading dot\r\n"), "{body}");
                    found += 1;
                }
            }
        }
        assert_eq!(found, ids.len(), "{backend}");
    }
}

/// STARTTLS, then AUTH with smtplib; prints `ACCEPTED` or the refusal's code and text.
fn login_after_starttls(port: u16, user: &str, password: &str) -> String {
    python(
        r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.starttls(context=ctx); s.ehlo("c.test")
try:
    s.login(sys.argv[2], sys.argv[3]); print("ACCEPTED")
except smtplib.SMTPAuthenticationError as e:
    print(e.smtp_code, e.smtp_error.decode())
"#,
        &[&port.to_string(), user, password],
    )
}

#[test]
fn starttls_implicit_tls_and_auth_work_with_real_handshakes() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(tmp.path());
        let users = tmp.path().join("users");
        let line = std::process::Command::new(saida_e2e::binary("saida"))
            .args(["passwd", "alice"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(b"s3cret\n")?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(line.status.success());
        std::fs::write(&users, &line.stdout).unwrap();
        let implicit = saida_e2e::free_port();
        let extra = format!(
            "[[listener]]\naddress = \"127.0.0.1:{implicit}\"\ntls = \"implicit\"\n\n\
             [tls]\ncertificate = \"{}\"\nkey = \"{}\"\n\n[auth]\ncredentials_file = \"{}\"\n\n\
             [relay]\nnetworks = []\n",
            cert.display(),
            key.display(),
            users.display()
        );
        let d = Daemon::start(backend, &extra);
        // Relaying needs AUTH, and AUTH needs TLS: STARTTLS then AUTH PLAIN via smtplib.
        send(d.port, 3, "starttls", "alice", "s3cret");
        send(implicit, 3, "implicit", "alice", "s3cret");
        // A wrong password is refused with 535 5.7.8.
        let out = login_after_starttls(d.port, "alice", "wrong");
        assert!(out.starts_with("535 5.7.8"), "{out}");
        // A user name carrying a line break cannot forge a log line.
        let out = login_after_starttls(d.port, "eve\nFORGED authenticated user=root", "x");
        assert!(out.starts_with("535"), "{out}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !d.log().contains("authentication failed") || !d.log().contains("FORGED") {
            assert!(std::time::Instant::now() < deadline, "{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !d.log().lines().any(|l| l.starts_with("FORGED")),
            "a forged log line:\n{}",
            d.log()
        );
        // Without TLS, AUTH is neither offered nor accepted, and relaying is refused.
        let out = python(
            r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20); s.ehlo("c.test")
print("auth" in s.esmtp_features)
print(s.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==")[0])
s.mail("a@b.test"); print(s.rcpt("x@y.test")[0])
"#,
            &[&d.port.to_string()],
        );
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["False", "538", "530"],
            "{out}"
        );
    }
}

#[test]
fn plaintext_pipelined_after_starttls_is_never_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = tls_config(tmp.path(), "");
    let d = Daemon::start("epoll", &extra);
    // CVE-2011-0411: "STARTTLS\r\nRSET\r\n" in one packet. The RSET arrived in plaintext and must
    // be discarded; the first reply after the handshake must be the EHLO's.
    let out = python(
        r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
f = s.makefile("rb")
f.readline()
s.sendall(b"EHLO c.test\r\n")
while True:
    l = f.readline()
    if l[3:4] == b" ": break
s.sendall(b"STARTTLS\r\nRSET\r\n")
print(f.readline().decode().strip())
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname="saida.test")
t.sendall(b"EHLO c.test\r\n")
tf = t.makefile("rb")
print(tf.readline().decode().strip())
"#,
        &[&d.port.to_string()],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "220 2.0.0 Ready to start TLS");
    assert!(
        lines[1].starts_with("250-saida.test greets c.test"),
        "{out}"
    );
}

#[test]
fn swaks_sends_with_starttls_and_pipelining() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = tls_config(tmp.path(), "");
    for backend in BACKENDS {
        let d = Daemon::start(backend, &extra);
        let out = std::process::Command::new("swaks")
            .args([
                "--server",
                &format!("127.0.0.1:{}", d.port),
                "--from",
                "a@origin.test",
            ])
            .args([
                "--to",
                "b@dest.test,c@other.test",
                "--tls",
                "--pipeline",
                "--ehlo",
                "swaks.test",
            ])
            .args(["--timeout", "20"])
            .output()
            .expect("swaks is installed by scripts/test.sh");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            queued_ids(&text.replace("<~  ", "").replace("<~ ", "")).len(),
            1,
            "{text}"
        );
    }
}

#[test]
fn connections_beyond_the_per_ip_limit_get_421() {
    // Relay networks are not limited per address: loopback is not one here.
    let d = Daemon::start(
        "epoll",
        "[smtp]\nconnections_per_ip_max = 2\n\n[relay]\nnetworks = [\"10.0.0.0/8\"]\n",
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        assert!(reply(&mut r).starts_with("220 "));
        held.push(s);
    }
    let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(
        reply(&mut r).trim_end(),
        "421 4.7.0 Too many connections from your address"
    );
}

#[test]
fn sigterm_answers_idle_sessions_with_421_and_exits_cleanly() {
    for backend in BACKENDS {
        let mut d = Daemon::start(backend, "");
        let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s);
        assert!(reply(&mut r).starts_with("220 "));
        let status = d.terminate();
        assert!(status.success(), "{status:?}\n{}", d.log());
        assert_eq!(reply(&mut r).trim_end(), "421 4.3.2 Service shutting down");
    }
}

#[test]
fn sigkill_after_acknowledgements_loses_nothing() {
    for backend in BACKENDS {
        let mut d = Daemon::start(backend, "");
        let ids = send(d.port, 200, "none", "", "");
        d.child.kill().unwrap(); // SIGKILL, right after the last 250
        d.child.wait().unwrap();
        let mut present = 0;
        for shard in 0..2 {
            let (spool, _) =
                spool::Spool::open(spool::SpoolConfig::new(d.shard_dir(shard))).unwrap();
            present += ids
                .iter()
                .filter(|id| spool.get(id.parse().unwrap()).is_some())
                .count();
        }
        assert_eq!(present, ids.len(), "{backend}: acknowledged messages lost");
    }
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[smtp]\nrcpt_per_message_max = 5\n").unwrap();
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:2: smtp.rcpt_per_message_max: 5 is outside 100..=100000"),
        "{err}"
    );
}

#[test]
fn changed_certificate_files_are_served_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = tls_config(
        tmp.path(),
        "reload_secs = 1
",
    );
    let d = Daemon::start("epoll", &extra);
    let fingerprint = || {
        python(
            r#"
import smtplib, ssl, sys, hashlib
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20); s.starttls(context=ctx)
print(hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest()); s.quit()
"#,
            &[&d.port.to_string()],
        )
    };
    let before = fingerprint();
    // A new certificate replaces the files, stamped later than the old ones (whatever the
    // file system's time granularity), so the reload check sees a change.
    let (cert, key) = self_signed(tmp.path());
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    for f in [cert, key] {
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_modified(later).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = fingerprint();
        if now != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
    }
    assert!(d.log().contains("TLS certificate reloaded"), "{}", d.log());
}

#[test]
fn large_messages_and_pipelined_bursts_survive_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = tls_config(tmp.path(), "");
    for backend in BACKENDS {
        let d = Daemon::start(backend, &extra);
        // A 1 MB body in one go (many TLS records per socket read), then 2000 pipelined NOOPs
        // whose replies exceed rustls' 64 KiB send buffer.
        let out = python(
            r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.starttls(context=ctx); s.ehlo("c.test")
body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000
print(s.sendmail("a@origin.test", ["b@dest.test"], body))
s.sock.sendall(b"NOOP\r\n" * 2000)
f = s.sock.makefile("rb")
print(sum(1 for _ in range(2000) if f.readline().startswith(b"250 2.0.0")))
"#,
            &[&d.port.to_string()],
        );
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["{}", "2000"],
            "{backend}: {out}"
        );
    }
}

/// A message that already went through too many hops (a mail loop) is refused with
/// `554 5.4.6` at SMTP and at HTTP intake; one under the bound is taken.
#[test]
fn a_looping_message_is_refused_at_smtp_and_http_intake() {
    let admin = format!("127.0.0.1:{}", saida_e2e::free_port());
    let d = Daemon::start(
        "epoll",
        &format!(
            "[smtp]\nreceived_headers_max = 5\n\n[admin]\naddress = \"{admin}\"\n\
             token = \"token-0123456789abcdef\"\n"
        ),
    );
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.ehlo("client.test")
for hops in (4, 5):
    hop = "Received: from hop%d.test by relay.test; Thu, 3 Dec 2026 00:00:00 +0000\r\n"
    hdrs = "".join(hop % i for i in range(hops))
    s.mail("a@origin.test"); s.rcpt("b@x.test")
    try:
        code, msg = s.data((hdrs + "Subject: loop\r\n\r\nbody\r\n").encode())
    except smtplib.SMTPDataError as e:
        code, msg = e.smtp_code, e.smtp_error
    print(hops, code, msg.decode())
s.quit()
"#,
        &[&d.port.to_string()],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("4 250"), "{out}");
    assert!(
        lines[1].starts_with("5 554") && lines[1].contains("5.4.6"),
        "{out}"
    );
    let hops: Vec<serde_json::Value> = (0..5)
        .map(|i| serde_json::json!(["Received", format!("from hop{i}.test by relay.test")]))
        .collect();
    let body = serde_json::json!({"from": "a@origin.test", "to": ["b@x.test"],
        "headers": hops, "body": "loop"})
    .to_string();
    let out = python(
        r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST")
req.add_header("Authorization", "Bearer token-0123456789abcdef")
req.add_header("Content-Type", "application/json")
try:
    r = urllib.request.urlopen(req, timeout=20); print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"#,
        &[&format!("http://{admin}/messages"), &body],
    );
    assert!(
        out.contains("5.4.6"),
        "HTTP intake took a looping message: {out}"
    );
}

/// Sends `bytes` one at a time, `gap` apart, until the server answers or closes; returns the
/// reply and how many bytes went out before it.
fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) -> (String, usize) {
    s.set_nonblocking(false).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    r.get_ref().set_read_timeout(Some(gap)).unwrap();
    for (i, b) in bytes.iter().enumerate() {
        if s.write_all(&[*b]).is_err() {
            return (String::new(), i);
        }
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return (line, i + 1),
            Ok(_) => return (line, i + 1),
            Err(_) => continue,
        }
    }
    (String::new(), bytes.len())
}

/// Connects, reads the greeting and sends `setup`, reading one reply per line of it.
fn session_after(port: u16, setup: &[&str]) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    assert!(reply(&mut r).starts_with("220 "));
    let mut w = s.try_clone().unwrap();
    for cmd in setup {
        w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let got = reply(&mut r);
        assert!(got.starts_with('2') || got.starts_with('3'), "{cmd}: {got}");
    }
    s
}

#[test]
fn a_trickled_command_line_is_cut_off_by_its_deadline() {
    let d = Daemon::start("epoll", "[smtp]\ncommand_timeout_secs = 2\n");
    let mut s = session_after(d.port, &[]);
    // One byte every 200 ms never trips a per-read timeout of 2 s; the whole line must still
    // arrive within 2 s.
    let line = format!("EHLO {}\r\n", "c".repeat(100));
    let (got, sent) = trickle(&mut s, line.as_bytes(), Duration::from_millis(200));
    assert!(got.starts_with("421 4.4.2"), "{got:?} after {sent} bytes");
    assert!(sent < line.len(), "the whole line went out: no deadline");
}

#[test]
fn a_trickled_message_is_cut_off_at_the_minimum_rate() {
    let d = Daemon::start(
        "epoll",
        "[smtp]\ndata_timeout_secs = 2\ndata_rate_min_bytes_per_sec = 100\n",
    );
    let mut s = session_after(
        d.port,
        &[
            "EHLO c.test",
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<b@x.test>",
            "DATA",
        ],
    );
    // 5 bytes a second against a floor of 100: cut off a little after the 2 s grace.
    let body = "x".repeat(200);
    let (got, sent) = trickle(&mut s, body.as_bytes(), Duration::from_millis(200));
    assert!(
        got.starts_with("421 4.4.2 Message transfer too slow"),
        "{got:?}"
    );
    assert!(sent < body.len());
}

#[test]
fn a_session_ends_at_its_lifetime() {
    let d = Daemon::start("epoll", "[smtp]\nsession_lifetime_secs = 2\n");
    let s = session_after(d.port, &["EHLO c.test"]);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    // A busy, well-behaved client still ends: NOOPs until the server says goodbye.
    loop {
        w.write_all(b"NOOP\r\n").unwrap();
        let got = reply(&mut r);
        if got.starts_with("250") {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert!(
            got.starts_with("421 4.4.2 Session lasted too long"),
            "{got:?}"
        );
        break;
    }
}

#[test]
fn the_connection_reserve_is_kept_for_clients_that_authenticate() {
    // 3 slots, the last one reserved; loopback is not a relay network here.
    let d = Daemon::start(
        "epoll",
        "[smtp]\nconnections_max = 3\nconnections_reserved = 1\nreserved_slot_auth_secs = 1\n\n\
         [relay]\nnetworks = [\"10.0.0.0/8\"]\n",
    );
    let _a = session_after(d.port, &["EHLO a.test"]);
    let _b = session_after(d.port, &["EHLO b.test"]);
    // The third gets the reserved slot: it must authenticate, and does not.
    let c = session_after(d.port, &["EHLO c.test"]);
    let mut r = BufReader::new(c);
    let got = reply(&mut r);
    assert!(got.starts_with("421 4.7.0 Server busy"), "{got:?}");
    // Once the slot is free (the session's end releases it), the next client gets it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let held = loop {
        let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let got = reply(&mut BufReader::new(s.try_clone().unwrap()));
        if got.starts_with("220 ") {
            break s;
        }
        assert_eq!(got.trim_end(), "421 4.7.0 Too many connections");
        assert!(
            std::time::Instant::now() < deadline,
            "the reserved slot was never freed"
        );
    };
    // All three slots taken: the next one is refused outright.
    let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(reply(&mut r).trim_end(), "421 4.7.0 Too many connections");
    drop(held);
}

/// A daemon whose only user is alice (password `s3cret`), AUTH allowed without TLS, with
/// `more` appended to `[auth]`; the credentials' directory lives as long as the daemon.
fn with_alice(more: &str) -> (Daemon, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let users = tmp.path().join("users");
    std::fs::write(&users, saida_e2e::passwd_line("alice", "s3cret")).unwrap();
    let config = format!(
        "[auth]\ncredentials_file = \"{}\"\nrequire_tls = false\n{more}",
        users.display()
    );
    (Daemon::start("epoll", &config), tmp)
}

#[test]
fn parallel_auth_guesses_are_counted_before_verification() {
    let admin = format!("127.0.0.1:{}", saida_e2e::free_port());
    let (d, _users) = with_alice(&format!(
        "failures_max = 2\nfailure_delay_ms = 0\n\n[admin]\naddress = \"{admin}\"\n"
    ));
    // "\0alice\0wrong", base64.
    let guess = "AUTH PLAIN AGFsaWNlAHdyb25n\r\n";
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|_| session_after(d.port, &["EHLO c.test"]))
        .collect();
    // Four guesses at once from one address.
    for c in &mut conns {
        c.write_all(guess.as_bytes()).unwrap();
    }
    let replies: Vec<String> = conns
        .iter()
        .map(|c| reply(&mut BufReader::new(c.try_clone().unwrap())))
        .collect();
    // Verifications that failed are counted in the metrics; refusals before verifying are not.
    let metrics = saida_e2e::http_get(&admin, "/metrics");
    let verified: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("saida_auth_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no auth failure count in:\n{metrics}"));
    assert!(
        verified <= 2.0,
        "{verified} guesses verified, more than failures_max: {replies:?}"
    );
    assert!(
        replies.iter().all(|r| r.starts_with("535 ")
            || r.starts_with("421 4.7.0")
            || r.starts_with("454 4.7.0")),
        "{replies:?}"
    );
    // The address is now locked out, and the right password does not help before the window.
    let mut s = session_after(d.port, &["EHLO c.test"]);
    s.write_all(b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n").unwrap();
    let got = reply(&mut BufReader::new(s));
    assert!(
        got.starts_with("421 4.7.0 Too many authentication failures"),
        "{got:?}"
    );
}

#[test]
fn message_bytes_in_memory_are_bounded_across_sessions() {
    let d = Daemon::start("epoll", "[smtp]\ninflight_message_bytes_max = 1048576\n");
    let s = session_after(
        d.port,
        &[
            "EHLO c.test",
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<b@x.test>",
            "DATA",
        ],
    );
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    // 2 MiB of content, more than all sessions together may hold.
    let line = format!("{}\r\n", "x".repeat(98));
    let big: String = line.repeat((2 << 20) / line.len());
    w.write_all(big.as_bytes()).unwrap();
    w.write_all(b".\r\n").unwrap();
    let got = reply(&mut r);
    assert!(got.starts_with("452 4.3.1"), "{got:?}");
    // The memory was given back: the next message is taken.
    for cmd in ["MAIL FROM:<a@origin.test>", "RCPT TO:<b@x.test>", "DATA"] {
        w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let got = reply(&mut r);
        assert!(got.starts_with('2') || got.starts_with('3'), "{cmd}: {got}");
    }
    w.write_all(b"Subject: small\r\n\r\nhi\r\n.\r\n").unwrap();
    let got = reply(&mut r);
    assert!(got.starts_with("250 2.0.0"), "{got:?}");
}

#[test]
fn embedded_defaults_offer_starttls_with_a_self_signed_certificate() {
    // No [tls]: a certificate for the hostname is made at first start and STARTTLS works.
    let d = Daemon::start("epoll", "");
    let out = python(
        r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.ehlo("c.test")
print("offered" if s.has_extn("starttls") else "not offered")
s.starttls(context=ctx)
print(s.sock.version(), len(s.sock.getpeercert(binary_form=True)))
s.quit()
"#,
        &[&d.port.to_string()],
    );
    assert!(out.starts_with("offered\nTLSv1."), "{out}");
    let tls = d.dir.path().join("spool/tls");
    let cert = std::fs::read_to_string(tls.join("self-signed.crt")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(tls.join("self-signed.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
}

#[test]
fn authenticated_users_can_be_bound_to_their_sender_domains() {
    let (d, _users) = with_alice("\n[auth.sender_domains]\nalice = [\"origin.test\"]\n");
    // "\0alice\0s3cret", base64.
    let s = session_after(d.port, &["EHLO c.test", "AUTH PLAIN AGFsaWNlAHMzY3JldA=="]);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    w.write_all(b"MAIL FROM:<ceo@bank.test>\r\n").unwrap();
    let got = reply(&mut r);
    assert!(got.starts_with("553 5.7.1"), "{got:?}");
    for (from, want) in [("news@mail.origin.test", "250"), ("a@origin.test", "250")] {
        w.write_all(format!("RSET\r\nMAIL FROM:<{from}>\r\n").as_bytes())
            .unwrap();
        assert!(reply(&mut r).starts_with("250"));
        let got = reply(&mut r);
        assert!(got.starts_with(want), "{from}: {got:?}");
    }
}
