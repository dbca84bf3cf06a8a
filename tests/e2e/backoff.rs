//! Adaptive backoff end to end: a provider answers `421 4.7.0 [TSS04]` to one source; that
//! (source, provider) path stops at once, sits out its suspension, resumes at the cut rate and
//! ramps back, while the same source to another provider and another source to the same
//! provider keep their rate; nothing is lost, duplicated or bounced. A long suspension is
//! listed by the admin API, survives a restart and is cancelled. Real sockets, a real sink
//! whose profile defers one client address on one listener.

use saida_e2e::{Daemon, Sink, delivery_log, free_port, http_get, http_get_token, http_post_json};

const TSS04: &str = "421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred due to \
                     unexpected volume or user complaints - 4.16.55.1";

/// A sink on 127.0.0.9 (`bigmail`) and 127.0.0.10 (`othermail`), one port, recording bodies,
/// with `profile` (`{port}` replaced); its port and the profile's directory.
fn two_provider_sink(profile: &str) -> (Sink, u16, tempfile::TempDir) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.toml");
    std::fs::write(&path, profile.replace("{port}", &port.to_string())).unwrap();
    let sink = Sink::start(
        &[format!("127.0.0.9:{port}"), format!("127.0.0.10:{port}")],
        &["--profile", &path.display().to_string()],
    );
    (sink, port, dir)
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Acceptance times (µs) of the messages from `peer` on the listener at `ip`.
fn times(records: &[serde_json::Value], peer: &str, ip: &str) -> Vec<u64> {
    let mut t: Vec<u64> = records
        .iter()
        .filter(|r| r["peer"] == peer && r["listener"].as_str().is_some_and(|l| l.starts_with(ip)))
        .filter_map(|r| r["at_us"].as_u64())
        .collect();
    t.sort_unstable();
    t
}

fn within(t: &[u64], from: u64, to: u64) -> usize {
    t.iter().filter(|&&x| x >= from && x < to).count()
}

#[test]
fn a_tss04_deferral_stops_one_path_and_it_resumes_and_ramps_while_the_others_keep_their_rate() {
    let (sink, port, _profile) = two_provider_sink(&format!(
        "[listener.\"127.0.0.9:{{port}}\".peer.\"127.0.0.2\"]\n\
         defer_after_messages = 40\ndefer_for_ms = 500\ndefer_reply = \"{TSS04}\"\n"
    ));
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "operator-token-0123456789";
    // Source a (127.0.0.2) mails b0-b4 (bigmail) and o0-o4 (othermail), source b (127.0.0.3)
    // b5-b9 and o5-o9: four paths, each limited to 40 messages a second and 2 connections.
    let mut config = format!(
        "[admin]\naddress = \"{admin}\"\ntoken = \"{token}\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\nretry_delays_secs = [1]\n\n\
         [[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nehlo = \"a.out.test\"\n\n\
         [[source]]\nname = \"b\"\naddress = \"127.0.0.3\"\nehlo = \"b.out.test\"\n\n\
         [[pool]]\nname = \"pa\"\nsources = [{{ source = \"a\" }}]\n\n\
         [[pool]]\nname = \"pb\"\nsources = [{{ source = \"b\" }}]\n\n\
         [[backoff_rule]]\nname = \"tss04\"\nproviders = [\"bigmail\"]\ncode = \"421\"\n\
         text = '\\[TSS04\\]'\nsuspend_secs = 3\nfactor = 0.5\nfloor = 0.25\nramp_secs = 2\n\n"
    );
    for (provider, ip, prefix) in [
        ("bigmail", "127.0.0.9", "b"),
        ("othermail", "127.0.0.10", "o"),
    ] {
        let domains: Vec<String> = (0..10).map(|i| format!("\"{prefix}{i}.test\"")).collect();
        config.push_str(&format!(
            "[[provider]]\nname = \"{provider}\"\ndomains = [{}]\nconnections_max = 2\n\
             rate_per_second = 40\n\n",
            domains.join(", ")
        ));
        for i in 0..10 {
            let pool = if i < 5 { "pa" } else { "pb" };
            config.push_str(&format!(
                "[[route]]\ndomain = \"{prefix}{i}.test\"\nhosts = [\"{ip}:{port}\"]\n\
                 pool = \"{pool}\"\n\n"
            ));
        }
    }
    let d = Daemon::start("epoll", &config);
    // 1,200 messages, 300 per path, interleaved.
    let msgs: Vec<(&str, Vec<String>)> = (0..1200)
        .map(|i| {
            let prefix = if i % 2 == 0 { "b" } else { "o" };
            (
                "s@origin.test",
                vec![format!("r{i}@{prefix}{}.test", (i / 2) % 10)],
            )
        })
        .collect();
    assert_eq!(saida_e2e::send_messages(d.port, &msgs), 1200);

    // The backoff is listed while it holds.
    wait_for("the backoff to be listed", 30, || {
        http_get_token(&admin, "/backoffs", token).contains("\"rule\":\"tss04\"")
    });
    let listed: serde_json::Value =
        serde_json::from_str(&http_get_token(&admin, "/backoffs", token)).unwrap();
    let listed = listed["backoffs"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (&listed[0]["provider"], &listed[0]["source"]),
        (&"bigmail".into(), &"a".into())
    );

    let records = sink.wait_until(90, "1,200 deliveries", |r| r.len() >= 1200);
    let mut rcpts: Vec<&str> = records.iter().filter_map(|r| r["rcpt"].as_str()).collect();
    rcpts.sort_unstable();
    rcpts.dedup();
    assert_eq!(
        (records.len(), rcpts.len()),
        (1200, 1200),
        "each delivered once"
    );
    wait_for("the delivery log", 30, || {
        delivery_log(&d.dir.path().join("dlog"))
            .iter()
            .filter(|l| l["outcome"] == "delivered")
            .count()
            == 1200
    });
    let log = delivery_log(&d.dir.path().join("dlog"));
    assert!(
        !log.iter().any(|l| l["outcome"] == "failed"),
        "nothing bounced"
    );

    let a_big = times(&records, "127.0.0.2", "127.0.0.9:");
    let b_big = times(&records, "127.0.0.3", "127.0.0.9:");
    let a_other = times(&records, "127.0.0.2", "127.0.0.10:");
    assert_eq!((a_big.len(), b_big.len(), a_other.len()), (300, 300, 300));
    // A→bigmail stopped at the first deferral: the sink refused only the transactions in
    // flight then (its deferral lasts 0.5 s; had saida kept trying, it would have refused
    // every attempt in that time), and nothing was accepted for the 3 s suspension.
    let stats = sink.stats();
    let deferred = stats["deferred_by_profile"].as_u64().unwrap();
    assert!((1..=4).contains(&deferred), "{deferred} deferrals");
    let (gap_at, gap) = a_big
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i, w[1] - w[0]))
        .max_by_key(|&(_, g)| g)
        .unwrap();
    let (stop, resume) = (a_big[gap_at], a_big[gap_at + 1]);
    assert!(
        (40..=43).contains(&(gap_at + 1)),
        "{} before the stop",
        gap_at + 1
    );
    assert!(
        (2_800_000..5_000_000).contains(&gap),
        "suspended for {gap} µs"
    );
    // Meanwhile B→bigmail and A→othermail kept their 40 a second.
    let secs = gap as f64 / 1e6;
    for (name, t) in [("b→bigmail", &b_big), ("a→othermail", &a_other)] {
        let n = within(t, stop, resume) as f64;
        assert!(
            n >= 0.6 * 40.0 * secs && n <= 40.0 * secs + 10.0,
            "{name}: {n} in {secs:.1} s"
        );
    }
    // A resumed at half its rate (20 a second) for 2 s, then stepped back to 40.
    let cut = within(&a_big, resume, resume + 1_800_000);
    assert!(
        (12..=42).contains(&cut),
        "{cut} in the first 1.8 s after resuming"
    );
    let full = within(&a_big, resume + 2_500_000, resume + 4_500_000);
    eprintln!(
        "deferred {deferred}, stopped after {}, gap {gap} µs, meanwhile b→bigmail {} and \
         a→othermail {}, {cut} in 1.8 s after resuming, {full} in 2 s once ramped",
        gap_at + 1,
        within(&b_big, stop, resume),
        within(&a_other, stop, resume)
    );
    assert!((48..=86).contains(&full), "{full} in 2 s once ramped back");

    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("saida_backoff_matches_total{rule=\"tss04\"}"),
        "{metrics}"
    );
}

#[test]
fn a_long_suspension_is_listed_survives_a_restart_and_is_cancelled() {
    let reply = "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred";
    // Without CHUNKING: the DATA path's reading of a 421 (then a closed connection).
    let (sink, port, _profile) = two_provider_sink(&format!(
        "[listener.\"127.0.0.9:{{port}}\"]\nchunking = false\n\
         [listener.\"127.0.0.9:{{port}}\".peer.\"127.0.0.1\"]\n\
         defer_after_messages = 1\ndefer_for_ms = 100\ndefer_reply = \"{reply}\"\n"
    ));
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "operator-token-0123456789";
    // The shipped rule (yahoo-tss) suspends for 15 minutes.
    let config = format!(
        "[admin]\naddress = \"{admin}\"\ntoken = \"{token}\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\nretry_delays_secs = [1]\n\n\
         [[provider]]\nname = \"bigmail\"\ndomains = [\"b.test\"]\n\n\
         [[route]]\ndomain = \"b.test\"\nhosts = [\"127.0.0.9:{port}\"]\n"
    );
    let mut d = Daemon::start("epoll", &config);
    let one = |i: usize| ("s@origin.test", vec![format!("r{i}@b.test")]);
    assert_eq!(saida_e2e::send_messages(d.port, &[one(0)]), 1);
    sink.wait_until(30, "the first message", |r| r.len() == 1);
    let rest: Vec<_> = (1..6).map(one).collect();
    assert_eq!(saida_e2e::send_messages(d.port, &rest), 5);
    wait_for("the suspension", 30, || {
        http_get_token(&admin, "/backoffs", token).contains("\"rule\":\"yahoo-tss\"")
    });
    let body = http_get_token(&admin, "/backoffs", token);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b = &v["backoffs"][0];
    assert_eq!(
        (&b["provider"], &b["source"]),
        (&"bigmail".into(), &"".into()),
        "{body}"
    );
    let until = b["backoff"]["suspended_until_micros"].as_u64().unwrap();
    let since = b["backoff"]["since_micros"].as_u64().unwrap();
    assert!(until - since >= 899_000_000, "{body}");

    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let d = Daemon::start_in(dir, d.port, &cfg);
    let after = http_get_token(&admin, "/backoffs", token);
    assert!(after.contains("\"rule\":\"yahoo-tss\""), "{after}");
    let v: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(v["backoffs"][0]["backoff"]["suspended_until_micros"], until);
    assert_eq!(sink.records().len(), 1, "held while suspended");

    let (status, body) = http_post_json(&admin, "/backoffs/cancel", token, r#"{"provider": "x"}"#);
    assert_eq!(
        (status, body.contains("\"cancelled\":0")),
        (200, true),
        "{body}"
    );
    let (status, _) = http_post_json(&admin, "/backoffs/cancel", token, "{}");
    assert_eq!(status, 400);
    let (status, body) = http_post_json(
        &admin,
        "/backoffs/cancel",
        token,
        r#"{"provider": "bigmail"}"#,
    );
    assert_eq!(
        (status, body.contains("\"cancelled\":1")),
        (200, true),
        "{body}"
    );
    sink.wait_until(30, "the held messages", |r| r.len() == 6);
    assert!(http_get_token(&admin, "/backoffs", token).contains("\"backoffs\":[]"));
    drop(d);
}
