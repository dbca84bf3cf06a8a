//! The daemon keeps every acknowledged message through the faults production meets: a second
//! instance on the same spool, a change of shard count, a spool that cannot commit.

use saida_e2e::{Daemon, binary};

#[test]
fn a_second_instance_on_the_same_spool_exits_naming_the_directory_and_the_holder() {
    let d = Daemon::start("epoll", "");
    let config = d.dir.path().join("saida.toml");
    let out = std::process::Command::new(binary("saida"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run a second saida");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second instance started:\n{stderr}"
    );
    let spool = d.dir.path().join("spool");
    assert!(
        stderr.contains(&spool.display().to_string())
            && stderr.contains(&format!("pid {}", d.child.id())),
        "the error names the directory and the holder's pid:\n{stderr}"
    );
    // The first instance still serves.
    assert_eq!(
        saida_e2e::send_messages(d.port, &[("a@origin.test", vec!["b@x.test".into()])]),
        1
    );
}

/// A complete configuration with `shards` shards, delivering everything to `sink`.
fn shard_config(dir: &std::path::Path, port: u16, shards: usize, sink: &str) -> String {
    format!(
        "[server]\nhostname = \"saida.test\"\nshards = {shards}\nbackend = \"epoll\"\n\
         shutdown_grace_secs = 2\n\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\n\
         [spool]\ndir = \"{d}/spool\"\n\n[delivery]\nlog_dir = \"{d}/log\"\n\
         retry_delays_secs = [1]\nidle_secs = 1\n\n[admin]\naddress = \"\"\n\n\
         [[route]]\ndomain = \"*\"\nhosts = [\"{sink}\"]\n",
        d = dir.display()
    )
}

/// Queues 20 messages while the route is dead with `before` shards, restarts with `after`
/// shards and a live route: every message is delivered exactly once and the spools of the
/// larger count are removed once drained.
fn change_shard_count(before: usize, after: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sink_addr = format!("127.0.0.2:{}", saida_e2e::free_port());
    let port = saida_e2e::free_port();
    let cfg = shard_config(dir.path(), port, before, &sink_addr);
    let root = dir.path().to_path_buf();
    let mut d = Daemon::start_in(dir, port, &cfg);
    let msgs: Vec<(&str, Vec<String>)> = (0..20)
        .map(|i| ("a@origin.test", vec![format!("u{i}@d{i}.test")]))
        .collect();
    assert_eq!(saida_e2e::send_messages(d.port, &msgs), 20);
    // Every message tried once and deferred (nothing listens on the route yet).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while saida_e2e::delivery_log(&root.join("log"))
        .iter()
        .filter(|l| l["outcome"] == "deferred")
        .map(|l| l["recipient"].as_str().unwrap_or("").to_string())
        .collect::<std::collections::HashSet<_>>()
        .len()
        < 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "20 deferrals never logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(d.terminate().success());
    let used: Vec<usize> = (0..before)
        .filter(|n| root.join(format!("spool/shard-{n}")).exists())
        .collect();
    assert_eq!(used.len(), before, "every shard had a spool");
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let sink = saida_e2e::Sink::start(std::slice::from_ref(&sink_addr), &[]);
    let cfg = shard_config(dir.path(), port, after, &sink_addr);
    let d2 = Daemon::start_in(dir, port, &cfg);
    let records = sink.wait_until(30, "all 20 messages after the shard change", |r| {
        r.iter()
            .map(|x| x["rcpt"].as_str().unwrap_or(""))
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= 20
    });
    // The spools of the larger count drain and are removed (waited for, bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while (after..before).any(|n| root.join(format!("spool/shard-{n}")).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "an adopted spool was never removed:\n{}",
            d2.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        (0..after).all(|n| root.join(format!("spool/shard-{n}")).exists()),
        "a current shard's spool is missing"
    );
    let _ = records;
    let got = sink.records();
    assert_eq!(got.len(), 20, "delivered twice: {got:?}");
    if after < before {
        assert!(
            d2.log().contains("adopted spool drained and removed"),
            "{}",
            d2.log()
        );
    }
}

#[test]
fn shrinking_from_two_shards_to_one_delivers_everything() {
    change_shard_count(2, 1);
}

#[test]
fn growing_from_one_shard_to_two_delivers_everything() {
    change_shard_count(1, 2);
}

#[test]
fn shrinking_from_four_shards_to_two_delivers_everything() {
    change_shard_count(4, 2);
}

/// SIGTERM during a transaction: the transaction finishes (250, and the message is kept), the
/// next MAIL is refused with 421, and the daemon then exits cleanly.
#[test]
fn sigterm_lets_a_running_transaction_finish_and_refuses_new_ones() {
    use std::io::{BufRead, Write};
    let mut d = Daemon::start("epoll", "");
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
s.mail("a@origin.test"); s.rcpt("b@x.test")
print("in-transaction", flush=True)
sys.stdin.readline()
code, _ = s.data(b"Subject: deploy\r\n\r\nsent during shutdown\r\n")
print("data", code, flush=True)
try:
    code, msg = s.mail("a@origin.test")
    print("mail", code, msg.decode(), flush=True)
except smtplib.SMTPServerDisconnected:
    print("mail closed", flush=True)
"#;
    let mut py = std::process::Command::new("python3")
        .args(["-c", script, &d.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "in-transaction");
    let pid = d.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Wait for the state: the daemon has begun its shutdown.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !d.log().contains("shutting down") {
        assert!(
            std::time::Instant::now() < deadline,
            "no shutdown:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    py.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    for _ in 0..2 {
        out.read_line(&mut rest).unwrap();
    }
    assert!(
        rest.contains("data 250"),
        "the running transaction was cut:\n{rest}"
    );
    assert!(
        rest.contains("mail 421") || rest.contains("mail closed"),
        "a new transaction was started during shutdown:\n{rest}"
    );
    let _ = py.wait();
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{}", d.log());
    // The message taken during shutdown is in the spool at the next start.
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let d2 = Daemon::start_in(dir, d.port, &cfg);
    assert!(
        d2.log().contains("live=1") || d2.log().contains("live: 1"),
        "{}",
        d2.log()
    );
}
