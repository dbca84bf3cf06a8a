//! Bounce control end to end: a provider's hard bounce is classified (`bad_mailbox`, in the
//! delivery log, the DSN and the metrics), suppresses the address, and the next message to it
//! is refused at RCPT; the admin API adds, lists and removes entries; HTTP injection reports
//! suppressed recipients. Real sockets, a real sink with a reply profile.

use saida_e2e::{Daemon, Sink, delivery_log, free_port, http_get, http_get_token, http_post_json};

/// RCPT replies for each address over one SMTP session: `250` or the refusal.
fn rcpt_replies(port: u16, rcpts: &[&str]) -> Vec<String> {
    let out = saida_e2e::python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test"); s.mail("a@origin.test")
for r in sys.argv[2:]:
    code, text = s.rcpt(r)
    print(code, text.decode())
s.rset(); s.quit()
"#,
        &[&[port.to_string().as_str()], rcpts].concat(),
    );
    out.lines().map(str::to_string).collect()
}

/// A sink on 127.0.0.9 recording message bodies, answering as the `profile` (TOML) says; its
/// port, and the directory that holds the profile.
fn sink_with(profile: &str) -> (Sink, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.toml");
    std::fs::write(&path, profile).unwrap();
    let port = free_port();
    let sink = Sink::start(
        &[format!("127.0.0.9:{port}")],
        &["--record-bodies", "--profile", &path.display().to_string()],
    );
    (sink, port, dir)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_hard_bounce_is_classified_suppresses_the_address_and_the_next_rcpt_is_refused() {
    let (sink, sink_port, _profile) = sink_with(
        "[domain.\"gone.test\"]\nrcpt_reply_mix = [{ percent = 100.0, reply = \
         \"550 5.1.1 The email account that you tried to reach does not exist. Please try \
         double-checking the recipient's email address for typos\" }]\n",
    );
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "operator-token-0123456789";
    let route =
        |d: &str| format!("[[route]]\ndomain = \"{d}\"\nhosts = [\"127.0.0.9:{sink_port}\"]\n");
    let config = format!(
        "[admin]\naddress = \"{admin}\"\ntoken = \"{token}\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\n\n{}{}{}",
        route("gone.test"),
        route("ok.test"),
        route("origin.test"),
    );
    let d = Daemon::start("epoll", &config);
    assert_eq!(
        saida_e2e::send_messages(d.port, &[("a@origin.test", vec!["x@gone.test".into()])]),
        1
    );
    wait_for("the address to be suppressed", || {
        http_get_token(&admin, "/suppressions/x@gone.test", token).contains("\"suppressed\":true")
    });
    // The bounce says why, in its own words.
    let records = sink.wait_until(30, "the bounce", |r| {
        r.iter().any(|x| x["rcpt"] == "a@origin.test")
    });
    let dsn = records
        .iter()
        .find(|x| x["rcpt"] == "a@origin.test")
        .unwrap();
    let dsn = dsn["body"].as_str().unwrap();
    assert!(dsn.contains("X-Saida-Bounce-Class: bad_mailbox"), "{dsn}");
    // The delivery log is flushed within a scheduler tick.
    wait_for("the classified failure in the delivery log", || {
        delivery_log(&d.dir.path().join("dlog"))
            .iter()
            .any(|l| l["recipient"] == "x@gone.test" && l["bounce_class"] == "bad_mailbox")
    });
    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains(r#"saida_bounce_class_total{class="bad_mailbox",outcome="failed"} 1"#),
        "{metrics}"
    );

    // The next message to the address is refused at RCPT; others are taken.
    let replies = rcpt_replies(d.port, &["X@Gone.test", "y@ok.test"]);
    assert!(replies[0].starts_with("550 5.1.1"), "{replies:?}");
    assert!(replies[1].starts_with("250"), "{replies:?}");

    // The admin API: a whole domain, listed, then an address removed.
    let (status, body) = http_post_json(
        &admin,
        "/suppressions",
        token,
        r#"{"entries": ["@blocked.test", "z@ok.test"], "reason": "complaint"}"#,
    );
    assert_eq!(
        (status, body.contains("\"added\":2")),
        (200, true),
        "{body}"
    );
    let (status, _) = http_post_json(&admin, "/suppressions", token, r#"{"entries": ["nope"]}"#);
    assert_eq!(status, 400, "a malformed entry is refused");
    let listed = http_get_token(&admin, "/suppressions", token);
    for e in ["x@gone.test", "@blocked.test", "z@ok.test"] {
        assert!(listed.contains(e), "{listed}");
    }
    let replies = rcpt_replies(d.port, &["anyone@blocked.test", "z@ok.test"]);
    assert!(
        replies.iter().all(|r| r.starts_with("550 5.1.1")),
        "{replies:?}"
    );
    // HTTP injection reports the suppressed recipients and queues the rest.
    let (status, body) = http_post_json(
        &admin,
        "/messages",
        token,
        r#"{"from": "a@origin.test", "to": ["w@blocked.test", "v@ok.test"], "body": "hi\n"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["suppressed"], serde_json::json!(["w@blocked.test"]));
    assert_eq!(answer["queue_ids"].as_array().map(Vec::len), Some(1));
    sink.wait_until(30, "v@ok.test", |r| {
        r.iter().any(|x| x["rcpt"] == "v@ok.test")
    });
    assert!(!sink.records().iter().any(|x| x["rcpt"] == "w@blocked.test"));

    let (status, body) = http_post_json(
        &admin,
        "/suppressions/remove",
        token,
        r#"{"entries": ["x@gone.test"]}"#,
    );
    assert_eq!(
        (status, body.contains("\"removed\":1")),
        (200, true),
        "{body}"
    );
    let replies = rcpt_replies(d.port, &["x@gone.test"]);
    assert!(replies[0].starts_with("250"), "{replies:?}");
}

#[test]
fn a_recipient_that_asked_gets_one_delay_report_while_it_is_retried() {
    let (sink, sink_port, _profile) = sink_with(
        "[domain.\"slow.test\"]\nrcpt_reply_mix = [{ percent = 100.0, reply = \
         \"451 4.7.1 Try again later\" }]\n",
    );
    let config = format!(
        "[delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\ndelay_dsn_after_secs = 1\n\n\
         [[route]]\ndomain = \"slow.test\"\nhosts = [\"127.0.0.9:{sink_port}\"]\n\
         retry_delays_secs = [1]\n\n\
         [[route]]\ndomain = \"origin.test\"\nhosts = [\"127.0.0.9:{sink_port}\"]\n"
    );
    let d = Daemon::start("epoll", &config);
    // One message, two recipients: only the first asks for delay reports.
    let out = saida_e2e::python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("client.test")
s.mail("a@origin.test")
print(s.rcpt("x@slow.test", ["NOTIFY=DELAY,FAILURE"])[0], s.rcpt("y@slow.test")[0])
print(s.data(b"Subject: slow\r\nMessage-ID: <slow@client.test>\r\n\r\nhi\r\n")[0])
s.quit()
"#,
        &[&d.port.to_string()],
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["250", "250", "250"]
    );
    let reports = |r: &[serde_json::Value]| -> Vec<String> {
        r.iter()
            .filter(|x| x["rcpt"] == "a@origin.test")
            .map(|x| x["body"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let records = sink.wait_until(30, "the delay report", |r| !reports(r).is_empty());
    let report = &reports(&records)[0];
    assert!(report.contains("Action: delayed") && report.contains("Will-Retry-Until:"));
    assert!(
        report.contains("Final-Recipient: rfc822; x@slow.test"),
        "{report}"
    );
    assert!(!report.contains("y@slow.test"), "y did not ask: {report}");
    // Two more deferrals later, still one report.
    wait_for("two more attempts", || {
        delivery_log(&d.dir.path().join("dlog"))
            .iter()
            .any(|l| l["recipient"] == "x@slow.test" && l["attempt"].as_u64() >= Some(4))
    });
    assert_eq!(
        reports(&sink.records()).len(),
        1,
        "one delay report per recipient"
    );
}

#[test]
fn a_providers_connection_and_rate_limits_hold_across_its_domains_and_shards() {
    // The sink refuses a sixth concurrent connection (`421`) and a 201st message in a second
    // (`451`); each end of data takes 10 ms, so 1,000 domains' connections overlap and their
    // messages outrun 200 a second unless saida holds them back.
    let (sink, sink_port, _profile) = sink_with(
        "[default]\nconnections_max = 5\nrate_per_second = 200\n\
         eod_delay_ms = { dist = \"fixed\", value = 10 }\n",
    );
    // 1,000 domains whose MX hosts are all the provider's (`*.bigmail.test`).
    let mut records: Vec<String> = (0..3)
        .map(|k| format!("--host-record=mx{k}.bigmail.test,127.0.0.9"))
        .collect();
    records.extend((0..1000).map(|i| format!("--mx-host=d{i}.test,mx{}.bigmail.test,10", i % 3)));
    let dns = saida_e2e::Dnsmasq::start(&records);
    let config = format!(
        "[delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\nmx_port = {sink_port}\n\
         retry_delays_secs = [1]\n\n\
         [dns]\nnameservers = [\"127.0.0.1:{}\"]\nlocal_networks_allowed = [\"127.0.0.9/32\"]\n\n\
         [[provider]]\nname = \"bigmail\"\nmx_suffixes = [\"bigmail.test\"]\nconnections_max = 5\n\
         rate_per_second = 200\n",
        dns.port
    );
    let d = Daemon::start("epoll", &config);
    let msgs: Vec<(&str, Vec<String>)> = (0..1000)
        .map(|i| ("a@origin.test", vec![format!("r{i}@d{i}.test")]))
        .collect();
    assert_eq!(saida_e2e::send_messages(d.port, &msgs), 1000);
    let delivered = sink.wait_until(120, "1,000 deliveries", |r| r.len() == 1000);
    let log = delivery_log(&d.dir.path().join("dlog"));
    let refused: Vec<_> = log.iter().filter(|l| l["outcome"] != "delivered").collect();
    assert!(
        refused.is_empty(),
        "the sink refused {} attempts (more than 5 connections or 200 messages a second), \
         first: {}",
        refused.len(),
        refused[0]
    );
    let stats = sink.stats();
    assert_eq!(
        (&stats["refused_connections"], &stats["rate_limited"]),
        (&0.into(), &0.into()),
        "{stats}"
    );
    // The rate was the limit's, not lower: 1,000 messages at 200 a second take 5 s.
    let mut at: Vec<u64> = delivered
        .iter()
        .filter_map(|r| r["at_us"].as_u64())
        .collect();
    at.sort_unstable();
    let secs = (at[999] - at[0]) as f64 / 1e6;
    assert!(
        secs >= 4.5,
        "1,000 in {secs:.2} s: faster than 200 a second"
    );
}
