//! Delivery end to end: the real `saida run` accepts mail over SMTP and delivers it to real
//! `saida-sink` servers on several loopback addresses, resolving MX through a real DNS server on
//! loopback (dnsmasq) where the test is about MX. Sink records prove what arrived, how many
//! connections and transactions carried it, and that nothing arrived twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use saida_e2e::{Daemon, Dnsmasq, Sink, delivery_log, free_port, send_messages};

/// `[delivery]` for tests: the log in the daemon's directory, fast retries.
fn delivery(extra: &str) -> String {
    format!(
        "[delivery]\nlog_dir = \"{{dir}}/log\"\nretry_delays_secs = [1]\nidle_secs = 1\n{extra}\n"
    )
}

fn rcpts(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["rcpt"].as_str().unwrap_or("").to_string())
        .collect()
}

fn log_of(d: &Daemon) -> Vec<serde_json::Value> {
    delivery_log(&d.dir.path().join("log"))
}

/// Waits until the delivery log (flushed every 200 ms) satisfies `pred`.
fn wait_log(
    d: &Daemon,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = log_of(d);
        if pred(&log) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log never showed {what}: {log:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(log: &[serde_json::Value], key: &str, value: &str) -> usize {
    log.iter().filter(|l| l[key] == value).count()
}

#[test]
fn fan_out_pipelining_and_connection_reuse() {
    let port = free_port();
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &[]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\n\n\
         [[route]]\ndomain = \"bulk.test\"\nhosts = [\"127.0.0.2:{port}\"]\n\
         connections_max = 2\nmsgs_per_connection_max = 100\n"
    ));
    let d = Daemon::start("epoll", &config);
    // 250 messages to one domain, and 60 with 3 recipients in 3 different domains.
    let mut msgs: Vec<(&str, Vec<String>)> = (0..250)
        .map(|i| ("s@origin.test", vec![format!("u{i}@bulk.test")]))
        .collect();
    for i in 0..60 {
        let to = (0..3)
            .map(|k| format!("m{i}k{k}@d{}.test", (i + k) % 40))
            .collect();
        msgs.push(("s@origin.test", to));
    }
    assert_eq!(send_messages(d.port, &msgs), 310);
    let expected: HashSet<String> = msgs.iter().flat_map(|(_, r)| r.clone()).collect();
    let records = sink.wait_until(60, "every recipient", |r| {
        rcpts(r).into_iter().collect::<HashSet<_>>() == expected
    });
    // Exactly once each.
    assert_eq!(records.len(), expected.len(), "a recipient arrived twice");
    // Reuse: the bulk domain used at most ceil(250/100) x 2 connections.
    let bulk: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["rcpt"].as_str().unwrap().ends_with("@bulk.test"))
        .collect();
    let conns: HashSet<u64> = bulk.iter().map(|r| r["conn"].as_u64().unwrap()).collect();
    assert!(
        conns.len() <= 6,
        "bulk.test used {} connections",
        conns.len()
    );
    let most = bulk
        .iter()
        .map(|r| r["txn"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        most >= 50,
        "connections carried at most {most} transactions"
    );
    // Fan-out: the three recipients of a message in different domains each got it.
    let log = wait_log(&d, "every delivery", |l| {
        count(l, "outcome", "delivered") >= expected.len()
    });
    assert_eq!(count(&log, "outcome", "delivered"), expected.len());
    assert!(log.iter().all(|l| l["mx_ip"] == "127.0.0.2"));
    // The sink saw each transaction come from saida's address with saida's EHLO name.
    let records = sink.records();
    assert!(
        records
            .iter()
            .all(|r| r["peer"] == "127.0.0.1" && r["ehlo"] == "saida.test"),
        "{:?}",
        records.first()
    );
}

#[test]
fn temporary_failure_is_retried_and_permanent_failure_bounces() {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &["--record-bodies"]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\n\n\
         [admin]\naddress = \"{admin}\"\n"
    ));
    let d = Daemon::start("io_uring", &config);
    let msgs = vec![
        ("sender@origin.test", vec!["grey1@g.test".to_string()]),
        (
            "sender@origin.test",
            vec!["reject1@r.test".to_string(), "ok1@r.test".to_string()],
        ),
        ("", vec!["reject2@r.test".to_string()]),
    ];
    assert_eq!(send_messages(d.port, &msgs), 3);
    let records = sink.wait_until(30, "retry and bounce", |r| {
        let got = rcpts(r);
        got.contains(&"grey1@g.test".into())
            && got.contains(&"ok1@r.test".into())
            && got.contains(&"sender@origin.test".into())
    });
    let bounce = records
        .iter()
        .find(|r| r["rcpt"] == "sender@origin.test")
        .unwrap();
    assert_eq!(bounce["from"], "", "bounces use the null sender");
    let body = bounce["body"].as_str().unwrap();
    assert!(body.contains("multipart/report"), "{body}");
    assert!(
        body.contains("reject1@r.test") && body.contains("5.1.1"),
        "{body}"
    );
    assert!(!body.contains("Final-Recipient: rfc822;ok1@r.test"));
    // No bounce to the null sender (once nothing is live, nothing more can be sent); the
    // greylisted recipient took two attempts.
    saida_e2e::wait_spool_empty(&admin, 30);
    let records = sink.records();
    assert_eq!(records.iter().filter(|r| r["from"] == "").count(), 1);
    let log = wait_log(&d, "two failures", |l| count(l, "outcome", "failed") >= 2);
    let grey: Vec<_> = log
        .iter()
        .filter(|l| l["recipient"] == "grey1@g.test")
        .collect();
    assert_eq!(grey.len(), 2);
    assert_eq!(grey[0]["outcome"], "deferred");
    assert_eq!(grey[0]["enhanced_code"], "4.7.1");
    assert_eq!(
        (grey[1]["outcome"].as_str(), grey[1]["attempt"].as_u64()),
        (Some("delivered"), Some(2))
    );
    let rejected: Vec<_> = log.iter().filter(|l| l["outcome"] == "failed").collect();
    assert_eq!(rejected.len(), 2);
}

#[test]
fn mx_failover_null_mx_nxdomain_and_loopback_refused() {
    let port = free_port();
    // 127.0.0.3 has nothing listening; 127.0.0.4 greets with 421; 127.0.0.2 accepts.
    let good = format!("127.0.0.2:{port}");
    let greets_421 = format!("127.0.0.4:{port}");
    let sink = Sink::start(
        &[good.clone(), greets_421.clone()],
        &["--greet-421", &greets_421],
    );
    let dns = Dnsmasq::start(&[
        "--mx-host=fo.test,mx1.fo.test,10".into(),
        "--mx-host=fo.test,mx2.fo.test,20".into(),
        "--host-record=mx1.fo.test,127.0.0.3".into(),
        "--host-record=mx2.fo.test,127.0.0.2".into(),
        "--mx-host=busy.test,mx1.busy.test,10".into(),
        "--mx-host=busy.test,mx2.busy.test,20".into(),
        "--host-record=mx1.busy.test,127.0.0.4".into(),
        "--host-record=mx2.busy.test,127.0.0.2".into(),
        "--dns-rr=nullmx.test,15,000000".into(),
        "--mx-host=origin.test,mx.origin.test,10".into(),
        "--host-record=mx.origin.test,127.0.0.2".into(),
        // Outside the loopback addresses this test bed allows: refused as a mail loop.
        "--mx-host=loop.test,mx.loop.test,10".into(),
        "--host-record=mx.loop.test,127.0.0.5".into(),
    ]);
    let config = format!(
        "{}mx_port = {port}\n\n[dns]\nnameservers = [\"127.0.0.1:{}\"]\n\
         local_networks_allowed = [\"127.0.0.2/31\", \"127.0.0.4/32\"]\n",
        delivery(""),
        dns.port
    );
    let d = Daemon::start("epoll", &config);
    let msgs = vec![
        ("a@origin.test", vec!["x@fo.test".to_string()]),
        ("a@origin.test", vec!["y@busy.test".to_string()]),
        ("a@origin.test", vec!["z@nullmx.test".to_string()]),
        ("a@origin.test", vec!["w@nx.test".to_string()]),
        ("a@origin.test", vec!["q@loop.test".to_string()]),
    ];
    assert_eq!(send_messages(d.port, &msgs), 5);
    let records = sink.wait_until(30, "failover deliveries and two bounces", |r| {
        let got = rcpts(r);
        got.contains(&"x@fo.test".into())
            && got.contains(&"y@busy.test".into())
            && got.iter().filter(|x| *x == "a@origin.test").count() == 2
    });
    assert!(records.iter().all(|r| r["listener"] == good.as_str()));
    let log = wait_log(&d, "five outcomes", |l| {
        [
            "x@fo.test",
            "y@busy.test",
            "z@nullmx.test",
            "w@nx.test",
            "q@loop.test",
        ]
        .iter()
        .all(|r| count(l, "recipient", r) > 0)
    });
    let failed = |rcpt: &str| {
        log.iter()
            .find(|l| l["recipient"] == rcpt)
            .map(|l| (l["outcome"].clone(), l["enhanced_code"].clone()))
    };
    assert_eq!(
        failed("z@nullmx.test"),
        Some(("failed".into(), "5.1.10".into()))
    );
    assert_eq!(failed("w@nx.test"), Some(("failed".into(), "5.1.2".into())));
    assert_eq!(failed("x@fo.test").unwrap().0, "delivered");
    assert_eq!(
        failed("q@loop.test"),
        Some(("deferred".into(), "4.4.6".into())),
        "an MX on a loopback address is a loop"
    );
}

#[test]
fn tls_opportunistic_accepts_self_signed_and_verified_refuses_it() {
    let port = free_port();
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &["--tls"]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"opp.test\"\nhosts = [\"127.0.0.2:{port}\"]\n\n\
         [[route]]\ndomain = \"ver.test\"\nhosts = [\"127.0.0.2:{port}\"]\ntls = \"verified\"\n"
    ));
    let d = Daemon::start("epoll", &config);
    let msgs = vec![
        ("a@origin.test", vec!["o@opp.test".to_string()]),
        ("a@origin.test", vec!["v@ver.test".to_string()]),
    ];
    assert_eq!(send_messages(d.port, &msgs), 2);
    let records = sink.wait_until(20, "the opportunistic delivery", |r| !r.is_empty());
    assert_eq!(records[0]["rcpt"], "o@opp.test");
    assert_eq!(records[0]["tls"], true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let log = log_of(&d);
        if let Some(l) = log.iter().find(|l| l["recipient"] == "v@ver.test") {
            break l.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no attempt for ver.test"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refused["outcome"], "deferred");
    assert_eq!(refused["enhanced_code"], "4.7.5", "{refused}");
    let opp = wait_log(&d, "o@opp.test", |l| {
        count(l, "recipient", "o@opp.test") > 0
    })
    .into_iter()
    .find(|l| l["recipient"] == "o@opp.test")
    .unwrap();
    assert!(
        opp["tls_version"].as_str().unwrap().starts_with("TLS"),
        "{opp}"
    );
    assert!(sink.records().iter().all(|r| r["rcpt"] != "v@ver.test"));
}

#[test]
fn a_restart_resumes_deferred_recipients_and_redelivers_nothing() {
    let port = free_port();
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &[]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\nretry_delays_secs = [2]\n"
    ));
    let mut d = Daemon::start("epoll", &config);
    let msgs = vec![
        ("a@origin.test", vec!["defer1@x.test".to_string()]),
        (
            "a@origin.test",
            vec!["ok1@x.test".to_string(), "ok2@y.test".to_string()],
        ),
    ];
    assert_eq!(send_messages(d.port, &msgs), 2);
    sink.wait_until(20, "the first deliveries", |r| r.len() == 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !log_of(&d).iter().any(|l| l["recipient"] == "defer1@x.test") {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.terminate().success());
    // Restart on the same spool: the deferred recipient keeps its attempt count.
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let d2 = Daemon::start_in(dir, d.port, &cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempts: Vec<u64> = log_of(&d2)
            .iter()
            .filter(|l| l["recipient"] == "defer1@x.test")
            .filter_map(|l| l["attempt"].as_u64())
            .collect();
        if attempts.contains(&2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "attempts: {attempts:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The retry after the restart came after recovery had handed off every live recipient:
    // a delivered one handed off again would have been sent by now (the sink records a
    // message before it answers 250).
    assert_eq!(
        sink.records().len(),
        2,
        "a delivered recipient was sent again"
    );
}

#[test]
fn sigkill_during_heavy_delivery_loses_no_recipient() {
    let port = free_port();
    // A slow sink (100 ms per message, one connection per domain) keeps deliveries in flight.
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &["--delay-eod-ms", "100"]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\nconnections_max = 1\n"
    ));
    let mut d = Daemon::start("epoll", &config);
    let msgs: Vec<(&str, Vec<String>)> = (0..2000)
        .map(|i| ("a@origin.test", vec![format!("r{i}@d{}.test", i % 50)]))
        .collect();
    let expected: HashSet<String> = msgs.iter().flat_map(|(_, r)| r.clone()).collect();
    assert_eq!(send_messages(d.port, &msgs), 2000);
    // Kill while deliveries are under way.
    sink.wait_until(30, "deliveries to start", |r| r.len() >= 300);
    let _ = d.child.kill();
    let _ = d.child.wait();
    let before_kill = sink.records().len();
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let _d2 = Daemon::start_in(dir, d.port, &cfg);
    let records = sink.wait_until(60, "every recipient after the restart", |r| {
        rcpts(r).into_iter().collect::<HashSet<_>>() == expected
    });
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in rcpts(&records) {
        *counts.entry(r).or_default() += 1;
    }
    let twice = counts.values().filter(|n| **n > 1).count();
    println!("SIGKILL after {before_kill} of 2000 deliveries: 0 lost, {twice} delivered twice");
    // Only recipients whose outcome was not yet journaled can repeat: those in flight at the
    // kill, bounded by the open connections' transactions and the outcomes awaiting commit.
    assert!(before_kill < 2000, "the kill came after the last delivery");
    assert!(
        twice <= 100,
        "{twice} recipients delivered twice (50 connections in flight)"
    );
}

/// Runs `saida queue --admin ADDR ARGS...`; returns its output (panics when it fails).
fn queue_cli(admin: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .args(["queue", "--admin", admin, "--token", "secret-token-0123"])
        .args(args)
        .output()
        .expect("saida queue");
    assert!(
        out.status.success(),
        "saida queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn queue_admin_summary_suspend_resume_delete_and_bounce() {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &[]);
    let config = format!(
        "{}\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\n\n\
         [admin]\naddress = \"{admin}\"\ntoken = \"secret-token-0123\"\n",
        delivery("")
    );
    let d = Daemon::start("epoll", &config);
    for dom in ["held.test", "gone.test", "back.test"] {
        queue_cli(&admin, &["suspend", dom]);
    }
    let msgs: Vec<(&str, Vec<String>)> = ["held.test", "gone.test", "back.test"]
        .iter()
        .flat_map(|dom| (0..3).map(move |i| ("a@origin.test", vec![format!("u{i}@{dom}")])))
        .collect();
    assert_eq!(send_messages(d.port, &msgs), 9);
    // Once all nine are queued behind their suspended domains, none can leave.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let summary: serde_json::Value = loop {
        let s: serde_json::Value =
            serde_json::from_str(&queue_cli(&admin, &["--json", "summary"])).unwrap();
        let queued: u64 = s["domains"].as_array().map_or(0, |d| {
            d.iter().filter_map(|x| x["queued_rcpts"].as_u64()).sum()
        });
        if queued == 9 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "not all queued: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(sink.records().is_empty(), "a suspended domain got mail");
    let held = summary["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["domain"] == "held.test")
        .unwrap()
        .clone();
    assert_eq!(
        (held["queued_rcpts"].as_u64(), held["suspended"].as_bool()),
        (Some(3), Some(true))
    );
    let table = queue_cli(&admin, &["summary"]);
    assert!(
        table.contains("held.test") && table.contains("suspended"),
        "{table}"
    );
    // Suspensions survive a restart.
    let mut d = d;
    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let _d2 = Daemon::start_in(dir, d.port, &cfg);
    let table = queue_cli(&admin, &["summary"]);
    let held = table
        .lines()
        .find(|l| l.starts_with("held.test"))
        .unwrap_or_default();
    assert!(
        held.contains("suspended") && held.contains(" 3 "),
        "{table}"
    );
    // The suspension was restored before recovery queued anything (the summary says so):
    // nothing could have left since the start.
    assert!(
        sink.records().is_empty(),
        "a suspended domain got mail after the restart"
    );
    // Delete one domain's mail, bounce another's, resume the third.
    assert!(queue_cli(&admin, &["delete", "--domain", "gone.test"]).contains("affected: 3"));
    assert!(queue_cli(&admin, &["bounce", "--domain", "back.test"]).contains("affected: 3"));
    assert!(queue_cli(&admin, &["resume", "held.test"]).contains("affected: 1"));
    let records = sink.wait_until(20, "held mail and three bounces", |r| {
        let got = rcpts(r);
        got.iter().filter(|x| x.ends_with("@held.test")).count() == 3
            && got.iter().filter(|x| *x == "a@origin.test").count() == 3
    });
    saida_e2e::wait_spool_empty(&admin, 30);
    assert_eq!(sink.records().len(), records.len());
    assert!(rcpts(&records).iter().all(|r| !r.ends_with("@gone.test")));
    // State changes need the token.
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .args([
            "queue",
            "--admin",
            &admin,
            "--token",
            "wrong-token-0123456789",
        ])
        .args(["suspend", "x.test"])
        .env_remove("SAIDA_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn a_421_sends_only_the_refused_recipients_to_the_next_host() {
    let port = free_port();
    let (a, b) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let sink = Sink::start(&[a.clone(), b.clone()], &[]);
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"{a}\", \"{b}\"]\nretry_delays_secs = [60]\n"
    ));
    let d = Daemon::start("epoll", &config);
    let msgs = vec![(
        "s@origin.test",
        vec!["ok1@x.test".to_string(), "busy1@x.test".to_string()],
    )];
    assert_eq!(send_messages(d.port, &msgs), 1);
    // ok1 is accepted by the first host; busy1 gets 421 there and again on the second host.
    let log = wait_log(&d, "busy1 deferred", |l| {
        l.iter()
            .any(|x| x["recipient"] == "busy1@x.test" && x["outcome"] == "deferred")
    });
    // busy1's attempt is over: ok1's 250 came before it (the sink records before answering).
    let got = rcpts(&sink.records());
    assert_eq!(
        got,
        vec!["ok1@x.test".to_string()],
        "resent after a 2xx or lost"
    );
    let busy: Vec<_> = log
        .iter()
        .filter(|x| x["recipient"] == "busy1@x.test")
        .collect();
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert_eq!(
        busy[0]["mx_ip"], "127.0.0.3",
        "the refused recipient went to the next host"
    );
}

#[test]
fn a_huge_reply_is_truncated_and_a_2xx_to_data_is_not_a_delivery() {
    let port = free_port();
    let profile = tempfile::NamedTempFile::new().unwrap();
    // No CHUNKING, so the content goes over DATA (where a 250 instead of 354 can happen).
    std::fs::write(profile.path(), "[default]\nchunking = false\n").unwrap();
    let sink = Sink::start(
        &[format!("127.0.0.2:{port}")],
        &["--profile", profile.path().to_str().unwrap()],
    );
    let config = delivery(&format!(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\nretry_delays_secs = [60]\n"
    ));
    let d = Daemon::start("epoll", &config);
    let msgs = vec![
        ("s@origin.test", vec!["hugereply1@x.test".to_string()]),
        ("s@origin.test", vec!["data2501@y.test".to_string()]),
        ("s@origin.test", vec!["ok1@z.test".to_string()]),
    ];
    assert_eq!(send_messages(d.port, &msgs), 3);
    let log = wait_log(&d, "three outcomes", |l| {
        ["hugereply1@x.test", "data2501@y.test", "ok1@z.test"]
            .iter()
            .all(|r| l.iter().any(|x| x["recipient"] == *r))
    });
    let of = |r: &str| log.iter().find(|x| x["recipient"] == r).unwrap().clone();
    // A 100 KB reply: the recipient fails with the reply cut to a journal-safe length.
    let huge = of("hugereply1@x.test");
    assert_eq!(huge["outcome"], "failed", "{huge}");
    let text = huge["reply"].as_str().unwrap();
    assert!(
        text.len() <= 1000 && text.starts_with("550 5.1.1") && text.ends_with("[truncated]"),
        "{text}"
    );
    // 250 to DATA: the content was never sent; deferred, never counted as delivered.
    let data = of("data2501@y.test");
    assert_eq!(data["outcome"], "deferred", "{data}");
    assert!(data["reply"].as_str().unwrap().contains("DATA"), "{data}");
    assert_eq!(of("ok1@z.test")["outcome"], "delivered");
    let got: Vec<String> = rcpts(&sink.records())
        .into_iter()
        .filter(|r| r != "s@origin.test")
        .collect();
    assert_eq!(got, vec!["ok1@z.test".to_string()]);
    // The bounce for the huge reply quotes the cut text and is itself delivered.
    sink.wait_until(20, "the bounce", |r| {
        r.iter().any(|x| x["rcpt"] == "s@origin.test")
    });
}

#[test]
fn a_route_back_to_this_server_is_a_mail_loop_and_is_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "[server]\nhostname = \"saida.test\"\nshards = 1\nbackend = \"epoll\"\n\
         shutdown_grace_secs = 2\n\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\n\
         [spool]\ndir = \"{d}/spool\"\n\n[delivery]\nlog_dir = \"{d}/log\"\n\
         retry_delays_secs = [60]\n\n[admin]\naddress = \"\"\n\n\
         [relay]\nnetworks = [\"127.0.0.0/8\"]\n\n\
         [[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:{port}\"]\n",
        d = dir.path().display()
    );
    let d = Daemon::start_in(dir, port, &cfg);
    assert_eq!(
        send_messages(d.port, &[("a@origin.test", vec!["b@loop.test".into()])]),
        1
    );
    let log = wait_log(&d, "the loop deferral", |l| {
        l.iter().any(|x| x["recipient"] == "b@loop.test")
    });
    let entry = log
        .iter()
        .find(|x| x["recipient"] == "b@loop.test")
        .unwrap();
    assert_eq!(entry["outcome"], "deferred", "{entry}");
    assert!(
        entry["reply"].as_str().unwrap_or("").contains("mail loop"),
        "{entry}"
    );
    // The looping copy was never accepted: one message in the whole log.
    assert_eq!(log.len(), 1, "{log:?}");
}

#[test]
fn a_shard_never_runs_more_connections_than_its_cap() {
    let port = free_port();
    // The sink refuses a fifth concurrent connection (saida may hold 2; the sink may count a
    // closing one a moment longer); each end of data takes 100 ms, so connections to
    // different domains overlap unless saida holds them back.
    let profile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        profile.path(),
        "[default]\nconnections_max = 4\neod_delay_ms = { dist = \"fixed\", value = 100 }\n",
    )
    .unwrap();
    let sink = Sink::start(
        &[format!("127.0.0.2:{port}")],
        &["--profile", profile.path().to_str().unwrap()],
    );
    // Two shards, one connection each at most: 2 in all, whatever the number of domains.
    let config = delivery(&format!(
        "workers_per_shard_max = 1\n\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.2:{port}\"]\n"
    ));
    let d = Daemon::start("epoll", &config);
    let msgs: Vec<(&str, Vec<String>)> = (0..30)
        .map(|i| ("a@origin.test", vec![format!("r{i}@d{i}.test")]))
        .collect();
    assert_eq!(send_messages(d.port, &msgs), 30);
    let log = wait_log(&d, "30 deliveries", |l| {
        count(l, "outcome", "delivered") == 30
    });
    let refused: Vec<_> = log.iter().filter(|l| l["outcome"] != "delivered").collect();
    assert!(
        refused.is_empty(),
        "the sink refused {} connections, first: {}",
        refused.len(),
        refused[0]
    );
    assert_eq!(sink.records().len(), 30);
}

#[test]
fn connections_leave_from_their_pools_sources_by_weight() {
    // Both backends: epoll binds before connecting; io_uring connects a bound socket.
    for backend in ["epoll", "io_uring"] {
        sources_by_weight(backend);
    }
}

fn sources_by_weight(backend: &str) {
    let port = free_port();
    let sink = Sink::start(&[format!("127.0.0.9:{port}")], &[]);
    // Pool `p`: four loopback sources weighted 4:3:2:1, each with its EHLO name. Pool `q`: a
    // source whose address is not on this host (TEST-NET-1) beside a good one.
    let mut config = String::new();
    for (i, name) in ["a", "b", "c", "d", "good"].iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        config.push_str(&format!(
            "[[source]]\nname = \"{name}\"\naddress = \"{ip}\"\nehlo = \"{name}.out.test\"\n\n"
        ));
    }
    config.push_str(
        "[[source]]\nname = \"bad\"\naddress = \"192.0.2.1\"\nehlo = \"bad.out.test\"\n\n\
         [[pool]]\nname = \"p\"\nsources = [{ source = \"a\", weight = 4 }, \
         { source = \"b\", weight = 3 }, { source = \"c\", weight = 2 }, \
         { source = \"d\", weight = 1 }]\n\n\
         [[pool]]\nname = \"q\"\nsources = [{ source = \"bad\" }, { source = \"good\" }]\n\n",
    );
    config.push_str(&delivery(&format!(
        "[[route]]\ndomain = \"w.test\"\nhosts = [\"127.0.0.9:{port}\"]\npool = \"p\"\n\
         msgs_per_connection_max = 1\n\n\
         [[route]]\ndomain = \"q.test\"\nhosts = [\"127.0.0.9:{port}\"]\npool = \"q\"\n"
    )));
    let d = Daemon::start(backend, &config);
    let msgs: Vec<(&str, Vec<String>)> = (0..100)
        .map(|i| ("a@origin.test", vec![format!("r{i}@w.test")]))
        .chain((0..10).map(|i| ("a@origin.test", vec![format!("s{i}@q.test")])))
        .collect();
    assert_eq!(send_messages(d.port, &msgs), 110);
    let records = sink.wait_until(30, "110 deliveries", |r| r.len() == 110);
    let mut by_source: HashMap<(String, String), usize> = HashMap::new();
    for r in &records {
        let key = (
            r["peer"].as_str().unwrap_or("").to_string(),
            r["ehlo"].to_string(),
        );
        *by_source.entry(key).or_default() += 1;
    }
    let count = |ip: &str, name: &str| {
        by_source
            .get(&(ip.to_string(), format!("\"{name}.out.test\"")))
            .copied()
            .unwrap_or(0)
    };
    // One connection per message: the weights hold exactly (smooth weighted round robin).
    assert_eq!(
        (
            count("127.0.0.2", "a"),
            count("127.0.0.3", "b"),
            count("127.0.0.4", "c")
        ),
        (40, 30, 20),
        "{by_source:?}"
    );
    assert_eq!(count("127.0.0.5", "d"), 10, "{by_source:?}");
    // The unbindable source is left out alone: q.test all went out from `good`.
    assert_eq!(count("127.0.0.6", "good"), 10, "{by_source:?}");
    assert!(
        d.log().contains("egress source cannot be bound"),
        "{}",
        d.log()
    );
    let log = wait_log(&d, "110 delivered", |l| count_delivered(l) == 110);
    assert!(
        log.iter()
            .filter(|l| l["domain"] == "w.test")
            .all(|l| l["source"] != "")
    );
    assert!(log.iter().any(|l| l["source"] == "good"));
}

fn count_delivered(log: &[serde_json::Value]) -> usize {
    count(log, "outcome", "delivered")
}

/// One connection carries transactions that end well and ones whose recipients were all
/// refused (the server then still holds the sender): RSET comes exactly when it is needed, and
/// the sink (which refuses a second MAIL in a transaction with `503`) never sees one too few.
/// Over DATA (no CHUNKING) and over BDAT.
#[test]
fn transactions_after_a_refused_one_start_clean_over_data_and_bdat() {
    for chunking in [false, true] {
        let port = free_port();
        let profile = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            profile.path(),
            format!("[default]\nchunking = {chunking}\n"),
        )
        .unwrap();
        let sink = Sink::start(
            &[format!("127.0.0.2:{port}")],
            &["--profile", profile.path().to_str().unwrap()],
        );
        let config = delivery(&format!(
            "bounces = false\n\n[[route]]\ndomain = \"x.test\"\nhosts = [\"127.0.0.2:{port}\"]\n\
             retry_delays_secs = [60]\nconnections_max = 1\n"
        ));
        let d = Daemon::start("epoll", &config);
        let one = |r: &[&str]| ("s@origin.test", r.iter().map(|x| x.to_string()).collect());
        let msgs = vec![
            one(&["ok1@x.test"]),
            one(&["reject1@x.test"]),
            one(&["ok2@x.test"]),
            one(&["reject2@x.test", "ok3@x.test"]),
            one(&["reject3@x.test"]),
            one(&["reject4@x.test"]),
            one(&["ok4@x.test"]),
        ];
        assert_eq!(send_messages(d.port, &msgs), 7);
        let log = wait_log(&d, "eight outcomes", |l| l.len() >= 8);
        for l in &log {
            let r = l["recipient"].as_str().unwrap();
            let want = if r.starts_with("ok") {
                "delivered"
            } else {
                "failed"
            };
            assert_eq!(l["outcome"], want, "chunking {chunking}: {l}");
            assert!(!l["reply"].as_str().unwrap_or("").contains("503"), "{l}");
        }
        let mut got = rcpts(&sink.records());
        got.sort();
        assert_eq!(
            got,
            ["ok1@x.test", "ok2@x.test", "ok3@x.test", "ok4@x.test"]
        );
    }
}

/// Over DATA to a pipelining server, the next transaction's envelope goes in the same write
/// as the content's end (RFC 2920): one round trip per message; every message once.
#[test]
fn over_data_the_next_envelope_rides_with_the_end_of_the_content() {
    let port = free_port();
    let profile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        profile.path(),
        "[default]\nchunking = false\neod_delay_ms = { dist = \"fixed\", value = 20 }\n",
    )
    .unwrap();
    let sink = Sink::start(
        &[format!("127.0.0.2:{port}")],
        &["--profile", profile.path().to_str().unwrap()],
    );
    let config = delivery(&format!(
        "[[route]]\ndomain = \"x.test\"\nhosts = [\"127.0.0.2:{port}\"]\nconnections_max = 1\n"
    ));
    let d = Daemon::start("epoll", &config);
    let msgs: Vec<(&str, Vec<String>)> = (0..60)
        .map(|i| ("s@origin.test", vec![format!("r{i}@x.test")]))
        .collect();
    assert_eq!(send_messages(d.port, &msgs), 60);
    let records = sink.wait_until(30, "60 deliveries", |r| r.len() >= 60);
    let mut got = rcpts(&records);
    got.sort();
    got.dedup();
    assert_eq!((records.len(), got.len()), (60, 60), "each once");
    let stats = sink.stats();
    let ahead = stats["pipelined_after_content"].as_u64().unwrap();
    // The queue builds up behind one connection at 20 ms a message: most go ahead.
    assert!(
        ahead >= 30,
        "{ahead} of 60 envelopes went with the last content: {stats}"
    );
    let log = log_of(&d);
    assert!(log.iter().all(|l| l["outcome"] == "delivered"), "{log:?}");
}

/// A route with `spread_over_shards` is delivered by the shard that accepted each message:
/// one hot domain's mail leaves from both shards (each writes its own delivery log), each
/// message once. Without it, the domain's one owner shard delivers everything.
#[test]
fn a_spread_destination_is_delivered_by_every_shard() {
    for spread in [true, false] {
        let port = free_port();
        let sink = Sink::start(&[format!("127.0.0.2:{port}")], &[]);
        let config = delivery(&format!(
            "[[route]]\ndomain = \"hot.test\"\nhosts = [\"127.0.0.2:{port}\"]\n\
             spread_over_shards = {spread}\n"
        ));
        let d = Daemon::start("epoll", &config);
        // 20 client connections, spread by the kernel over both shards' listeners (all on
        // one shard: a chance of 2 in a million).
        let msgs: Vec<(&str, Vec<String>)> = (0..40)
            .map(|i| ("s@origin.test", vec![format!("r{i}@hot.test")]))
            .collect();
        std::thread::scope(|s| {
            for chunk in msgs.chunks(2) {
                s.spawn(|| assert_eq!(send_messages(d.port, chunk), 2));
            }
        });
        let records = sink.wait_until(30, "40 deliveries", |r| r.len() >= 40);
        let mut got = rcpts(&records);
        got.sort();
        got.dedup();
        assert_eq!((records.len(), got.len()), (40, 40), "each once");
        let log = wait_log(&d, "40 outcomes", |l| l.len() >= 40);
        assert_eq!(log.len(), 40);
        let per_shard = |n: usize| {
            let f = d.dir.path().join("log").join(format!("delivery-{n}.jsonl"));
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let (s0, s1) = (per_shard(0), per_shard(1));
        assert_eq!(s0 + s1, 40);
        if spread {
            assert!(s0 > 0 && s1 > 0, "both shards deliver: {s0} + {s1}");
        } else {
            assert!(s0 == 0 || s1 == 0, "one owner shard: {s0} + {s1}");
        }
    }
}
