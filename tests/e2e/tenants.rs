//! Dedicated and shared sending end to end: three tenants authenticated over SMTP AUTH (and one
//! over its API token), two egress pools of loopback sources, quotas, sender domains, tenant
//! suspension, and DKIM signatures that mail-auth's verifier checks against keys published by
//! dnsmasq; a tenant's queued mail moved by spool compaction (stale locations re-offered, the
//! quota released). Real sockets, a real sink, a real DNS server.

use std::collections::HashMap;

use saida_e2e::{Daemon, Dnsmasq, Sink, delivery_log, free_port, http_get, http_post_json, python};

/// Sends messages as `user` (AUTH PLAIN without TLS) over one connection. Each message is
/// (envelope sender, recipient, `From:` header, body); prints one result per message: `250`,
/// or the refusal's code and text. A refused MAIL leaves the connection usable.
fn send_as(port: u16, user: &str, messages: &[(String, String, String, String)]) -> Vec<String> {
    send_as_with(port, user, messages, "")
}

/// [`send_as`] with `extra` header lines (CRLF-terminated) in every message.
fn send_as_with(
    port: u16,
    user: &str,
    messages: &[(String, String, String, String)],
    extra: &str,
) -> Vec<String> {
    let spec: Vec<serde_json::Value> = messages
        .iter()
        .map(|(f, t, h, b)| serde_json::json!({"from": f, "to": t, "header_from": h, "body": b}))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::Value::from(spec).to_string()).unwrap();
    let out = python(
        r#"
import json, smtplib, sys
port, user = int(sys.argv[1]), sys.argv[2]
spec = json.load(open(sys.argv[3])); extra = sys.argv[4]
s = smtplib.SMTP("127.0.0.1", port, timeout=60)
s.ehlo("client.test"); s.login(user, "pw-" + user)
for i, m in enumerate(spec):
    msg = ("From: <%s>\r\nTo: <%s>\r\nSubject: tenant test %d\r\n"
           "Message-ID: <t%d.%s@client.test>\r\n%sMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n%s"
           % (m["header_from"], m["to"], i, i, user, extra, m["body"]))
    try:
        s.sendmail(m["from"], [m["to"]], msg.encode("utf-8"), mail_options=["BODY=8BITMIME"])
        print("250")
    except smtplib.SMTPSenderRefused as e:
        print(e.smtp_code, e.smtp_error.decode())
    except smtplib.SMTPDataError as e:
        print(e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[
            &port.to_string(),
            user,
            &file.path().display().to_string(),
            extra,
        ],
    );
    out.lines().map(str::to_string).collect()
}

fn msg(from: &str, to: &str) -> (String, String, String, String) {
    let body = "Grüße, 8-bit body\r\n.a line that starts with a dot\r\n..two dots\r\nend\r\n";
    (from.into(), to.into(), from.into(), body.into())
}

/// `saida dkim-record`: the TXT record publishing a key file's public key.
fn dkim_record(key: &std::path::Path) -> String {
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .arg("dkim-record")
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// dnsmasq's argument publishing `record` at `name` (split in strings of at most 200 bytes:
/// one DNS character-string holds 255; given without a shell, quotes would be kept literally).
fn txt_arg(name: &str, record: &str) -> String {
    let parts: Vec<String> = record
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

/// Checks every DKIM signature of `message` with mail-auth's verifier, resolving keys through
/// the dnsmasq on `dns_port`; returns (domain, algorithm) of each signature that passed, and
/// panics on any that did not.
fn verified_signatures(message: &[u8], dns_port: u16) -> Vec<(String, String)> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut udp = ConnectionConfig::udp();
        udp.port = dns_port;
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = dns_port;
        let ns = NameServerConfig::new([127, 0, 0, 1].into(), true, vec![udp, tcp]);
        let config = ResolverConfig::from_name_servers(vec![ns]);
        let auth = MessageAuthenticator::new(config, Default::default()).unwrap();
        let parsed = AuthenticatedMessage::parse(message).expect("a parsable message");
        let results = auth.verify_dkim(&parsed).await;
        assert!(!results.is_empty(), "no DKIM signature");
        results
            .iter()
            .map(|r| {
                assert_eq!(r.result(), &DkimResult::Pass, "{:?}", r);
                let s = r.signature().expect("a signature");
                (s.d.clone(), format!("{:?}", s.a))
            })
            .collect()
    })
}

#[test]
fn tenants_send_from_their_pools_within_quotas_and_every_message_verifies() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    // acme.test signs with RSA and Ed25519 (two selectors), globex.test with Ed25519; the
    // ESP's own domain (esp.test) signs acme's mail too.
    std::fs::write(keys.join("acme.test.r1.pem"), saida_e2e::rsa_key_pem()).unwrap();
    for file in ["acme.test.e1.pem", "globex.test.e1.pem", "esp.test.esp.pem"] {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(keys.join(file), key.serialize_pem()).unwrap();
    }
    let mut records = Vec::new();
    for (file, name) in [
        ("acme.test.r1.pem", "r1._domainkey.acme.test"),
        ("acme.test.e1.pem", "e1._domainkey.acme.test"),
        ("globex.test.e1.pem", "e1._domainkey.globex.test"),
        ("esp.test.esp.pem", "esp._domainkey.esp.test"),
    ] {
        records.push(txt_arg(name, &dkim_record(&keys.join(file))));
    }
    let dns = Dnsmasq::start(&records);

    let users = work.path().join("users");
    let mut lines = Vec::new();
    for u in ["alice", "bob", "carol", "dave"] {
        lines.extend(saida_e2e::passwd_line(u, &format!("pw-{u}")));
    }
    std::fs::write(&users, lines).unwrap();

    let sink_port = free_port();
    let sink = Sink::start(&[format!("127.0.0.9:{sink_port}")], &["--record-bodies"]);
    let admin = format!("127.0.0.1:{}", free_port());
    let mut config = String::new();
    for (i, name) in ["a1", "a2", "g1", "g2", "t1"].iter().enumerate() {
        config.push_str(&format!(
            "[[source]]\nname = \"{name}\"\naddress = \"127.0.0.{n}\"\n\
             ehlo = \"{name}.out.test\"\n\n",
            n = i + 2
        ));
    }
    config.push_str(&format!(
        "[[pool]]\nname = \"acme-tx\"\nsources = [{{ source = \"t1\" }}]\n\n\
         [[pool]]\nname = \"acme-ips\"\nsources = [{{ source = \"a1\", weight = 3 }}, \
         {{ source = \"a2\", weight = 1 }}]\n\n\
         [[pool]]\nname = \"globex-ips\"\n\
         sources = [{{ source = \"g1\" }}, {{ source = \"g2\" }}]\n\n\
         [[tenant]]\nname = \"acme\"\nusers = [\"alice\"]\n\
         api_tokens = [\"acme-api-token-0123456789\"]\n\
         sender_domains = [\"acme.test\"]\npool = \"acme-ips\"\ndkim_also = [\"esp.test\"]\n\
         pools_allowed = [\"acme-tx\"]\n\n\
         [[tenant]]\nname = \"globex\"\nusers = [\"bob\"]\nsender_domains = [\"globex.test\"]\n\
         pool = \"globex-ips\"\n\n\
         [[tenant]]\nname = \"initech\"\nusers = [\"carol\"]\nmessages_per_minute_max = 3\n\n\
         [auth]\ncredentials_file = \"{users}\"\nrequire_tls = false\n\n\
         [signing]\ndkim_keys_dir = \"{keys}\"\n\n\
         [dns]\nnameservers = [\"127.0.0.1:{dns}\"]\n\n\
         [admin]\naddress = \"{admin}\"\ntoken = \"operator-token-0123456789\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\n\n\
         [[route]]\ndomain = \"dest.test\"\nhosts = [\"127.0.0.9:{sink_port}\"]\n\
         msgs_per_connection_max = 1\n",
        users = users.display(),
        keys = keys.display(),
        dns = dns.port,
    ));
    let d = Daemon::start("epoll", &config);

    // Sender domains: alice may not use another domain, in the envelope or in From:.
    let mut forged = msg("alice@acme.test", "x@dest.test");
    forged.2 = "ceo@elsewhere.test".into();
    let refused = send_as(
        d.port,
        "alice",
        &[msg("alice@elsewhere.test", "x@dest.test"), forged],
    );
    assert!(refused[0].starts_with("553 5.7.1"), "{refused:?}");
    assert!(refused[1].starts_with("553 5.7.1"), "{refused:?}");

    // The rate quota: initech's fourth message in a minute is refused, others keep sending.
    let carol: Vec<_> = (0..5)
        .map(|i| msg("carol@initech.test", &format!("c{i}@dest.test")))
        .collect();
    let out = send_as(d.port, "carol", &carol);
    assert_eq!(out[..3], ["250", "250", "250"], "{out:?}");
    assert!(
        out[3].starts_with("452 4.7.1") && out[4].starts_with("452 4.7.1"),
        "{out:?}"
    );

    let alice: Vec<_> = (0..40)
        .map(|i| msg("alice@acme.test", &format!("a{i}@dest.test")))
        .collect();
    assert!(send_as(d.port, "alice", &alice).iter().all(|r| r == "250"));
    let bob: Vec<_> = (0..20)
        .map(|i| msg("bob@globex.test", &format!("b{i}@dest.test")))
        .collect();
    assert!(send_as(d.port, "bob", &bob).iter().all(|r| r == "250"));
    // dave belongs to no tenant: the default path (kernel's address, no pool).
    let dave: Vec<_> = (0..5)
        .map(|i| msg("dave@else.test", &format!("d{i}@dest.test")))
        .collect();
    assert!(send_as(d.port, "dave", &dave).iter().all(|r| r == "250"));

    // acme over HTTP with its own token: same pool, same checks.
    let token = "acme-api-token-0123456789";
    let body = |from: &str| {
        format!(
            r#"{{"from": "{from}", "to": ["h1@dest.test", "h2@dest.test"],
                "headers": {{"Subject": "api"}}, "body": "over http\n.dot line\n"}}"#
        )
    };
    let (status, answer) = http_post_json(&admin, "/messages", token, &body("news@acme.test"));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = http_post_json(&admin, "/messages", token, &body("x@globex.test"));
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("5.7.1"), "{answer}");
    let (status, _) = http_post_json(&admin, "/queue/flush", token, "{}");
    assert_eq!(status, 403, "a tenant's token does nothing but inject");

    // A message may choose one of its tenant's allowed pools with X-Saida-Pool (taken out);
    // a tenant that is allowed none is refused.
    let chosen: Vec<_> = (0..4)
        .map(|i| msg("alice@acme.test", &format!("p{i}@dest.test")))
        .collect();
    let header = "X-Saida-Pool: acme-tx\r\n";
    assert!(
        send_as_with(d.port, "alice", &chosen, header)
            .iter()
            .all(|r| r == "250")
    );
    let out = send_as_with(d.port, "bob", &bob[..1], header);
    assert!(out[0].starts_with("553 5.7.1"), "{out:?}");

    let total = 3 + 40 + 20 + 5 + 2 + 4;
    let records = sink.wait_until(60, "every message", |r| r.len() == total);
    let mut by_from: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r["rcpt"].as_str().is_some_and(|t| t.starts_with('p')))
    {
        assert_eq!(
            (&r["peer"], &r["ehlo"]),
            (&"127.0.0.6".into(), &"t1.out.test".into())
        );
        let body = r["body"].as_str().unwrap();
        assert!(
            !body.contains("X-Saida-Pool"),
            "the header is taken out: {body}"
        );
    }
    for r in records
        .iter()
        .filter(|r| !r["rcpt"].as_str().is_some_and(|t| t.starts_with('p')))
    {
        let from = r["from"].as_str().unwrap_or("").to_string();
        let domain = from.rsplit('@').next().unwrap_or("").to_string();
        by_from.entry(domain).or_default().push(r);
    }
    let peers = |domain: &str| -> HashMap<(String, String), usize> {
        let mut m = HashMap::new();
        for r in &by_from[domain] {
            let key = (
                r["peer"].as_str().unwrap().to_string(),
                r["ehlo"].as_str().unwrap().to_string(),
            );
            *m.entry(key).or_default() += 1;
        }
        m
    };
    // acme: 42 messages, one connection each, from its pool only, weighted 3:1 (smooth weighted
    // round robin: within one message of 31.5/10.5).
    let acme = peers("acme.test");
    let a1 = acme
        .get(&("127.0.0.2".into(), "a1.out.test".into()))
        .copied()
        .unwrap_or(0);
    let a2 = acme
        .get(&("127.0.0.3".into(), "a2.out.test".into()))
        .copied()
        .unwrap_or(0);
    assert_eq!(a1 + a2, 42, "{acme:?}");
    assert!((31..=32).contains(&a1), "{acme:?}");
    let globex = peers("globex.test");
    let g1 = globex
        .get(&("127.0.0.4".into(), "g1.out.test".into()))
        .copied()
        .unwrap_or(0);
    let g2 = globex
        .get(&("127.0.0.5".into(), "g2.out.test".into()))
        .copied()
        .unwrap_or(0);
    assert_eq!((g1, g2), (10, 10), "{globex:?}");
    for other in ["initech.test", "else.test"] {
        assert!(
            peers(other).keys().all(|(ip, _)| ip == "127.0.0.1"),
            "{other} left from a tenant's pool: {:?}",
            peers(other)
        );
    }

    // Every signed message verifies; acme's carry acme.test (both algorithms) and esp.test.
    for r in &records {
        let from = r["from"].as_str().unwrap();
        let body = r["body"].as_str().unwrap();
        let domain = from.rsplit('@').next().unwrap();
        match domain {
            "acme.test" => {
                let mut sigs = verified_signatures(body.as_bytes(), dns.port);
                sigs.sort();
                let want = [
                    ("acme.test".to_string(), "Ed25519Sha256".to_string()),
                    ("acme.test".to_string(), "RsaSha256".to_string()),
                    ("esp.test".to_string(), "Ed25519Sha256".to_string()),
                ];
                assert_eq!(sigs, want, "{body}");
            }
            "globex.test" => {
                let sigs = verified_signatures(body.as_bytes(), dns.port);
                assert_eq!(
                    sigs,
                    [("globex.test".to_string(), "Ed25519Sha256".to_string())]
                );
            }
            _ => assert!(!body.contains("DKIM-Signature"), "no key for {domain}"),
        }
        if body.contains("Subject: tenant test") {
            assert!(body.contains("\r\n.a line that starts with a dot\r\n..two dots\r\n"));
            assert!(body.contains("Grüße"), "the 8-bit body arrived intact");
        }
    }

    // The tenant is in the delivery log and the metrics.
    let log = delivery_log(&d.dir.path().join("dlog"));
    assert!(
        log.iter()
            .any(|l| l["tenant"] == "acme" && l["source"] == "a1")
    );
    assert!(
        log.iter()
            .any(|l| l["tenant"] == "globex" && l["source"] == "g2")
    );
    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains(r#"saida_tenant_outcomes_total{tenant="acme",outcome="delivered"} 46"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"saida_messages_rejected_total{reason="tenant_quota"} 2"#));
    let g = |source: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "saida_source_outcomes_total{{source=\"{source}\",outcome=\"delivered\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!((g("g1"), g("g2")), (Some(10), Some(10)), "{metrics}");
    assert!(
        metrics.contains("saida_dkim_sign_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn a_suspended_tenant_keeps_its_mail_queued_while_others_deliver_and_resumes() {
    let work = tempfile::tempdir().unwrap();
    let users = work.path().join("users");
    let mut lines = saida_e2e::passwd_line("alice", "pw-alice");
    lines.extend(saida_e2e::passwd_line("bob", "pw-bob"));
    std::fs::write(&users, lines).unwrap();
    let sink_port = free_port();
    let sink = Sink::start(&[format!("127.0.0.9:{sink_port}")], &[]);
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "operator-token-0123456789";
    let config = format!(
        "[[tenant]]\nname = \"acme\"\nusers = [\"alice\"]\nqueued_rcpts_max = 5\n\n\
         [[tenant]]\nname = \"globex\"\nusers = [\"bob\"]\n\n\
         [auth]\ncredentials_file = \"{users}\"\nrequire_tls = false\n\n\
         [admin]\naddress = \"{admin}\"\ntoken = \"{token}\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{{dir}}/dlog\"\n\n\
         [[route]]\ndomain = \"dest.test\"\nhosts = [\"127.0.0.9:{sink_port}\"]\n",
        users = users.display(),
    );
    let mut d = Daemon::start("epoll", &config);
    let (status, _) = http_post_json(&admin, "/queue/tenants/acme/suspend", token, "");
    assert_eq!(status, 200);
    let (status, _) = http_post_json(&admin, "/queue/tenants/nobody/suspend", token, "");
    assert_eq!(status, 404);
    let acme: Vec<_> = (0..7)
        .map(|i| msg("alice@acme.test", &format!("a{i}@dest.test")))
        .collect();
    let out = send_as(d.port, "alice", &acme);
    // The queue quota: five recipients queued (and held), then 452 for acme only.
    assert_eq!(out.iter().filter(|r| *r == "250").count(), 5, "{out:?}");
    assert!(out[5].starts_with("452 4.7.1"), "{out:?}");
    let bob: Vec<_> = (0..3)
        .map(|i| msg("bob@globex.test", &format!("b{i}@dest.test")))
        .collect();
    assert!(send_as(d.port, "bob", &bob).iter().all(|r| r == "250"));
    sink.wait_until(30, "globex's mail", |r| r.len() == 3);
    let summary = saida_e2e::http_get_token(&admin, "/queue/tenants/acme", token);
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let rows = v["domains"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{summary}");
    assert_eq!(rows[0]["tenant"], "acme");
    assert_eq!(rows[0]["queued_rcpts"], 5);
    assert_eq!(rows[0]["suspended"], true);
    // Suspension survives a restart.
    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let d = Daemon::start_in(dir, d.port, &cfg);
    let summary = saida_e2e::http_get_token(&admin, "/queue/tenants/acme", token);
    assert!(summary.contains("\"suspended\":true"), "{summary}");
    // The recovered recipients count in the quota again.
    let gauge = r#"saida_tenant_queued_recipients{tenant="acme"} 5"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !http_get(&admin, "/metrics").contains(gauge) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            http_get(&admin, "/metrics")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = send_as(d.port, "alice", &acme[..1]);
    assert!(out[0].starts_with("452 4.7.1"), "{out:?}");
    assert_eq!(
        sink.records().len(),
        3,
        "held mail stays held after the restart"
    );
    let (status, _) = http_post_json(&admin, "/queue/tenants/acme/resume", token, "");
    assert_eq!(status, 200);
    let records = sink.wait_until(30, "acme's mail after resume", |r| r.len() == 8);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["from"] == "alice@acme.test")
            .count(),
        5
    );
    drop(d);
}

/// Compaction moves a queued message while its domain is suspended: the queued job's location
/// goes stale, the reading shard re-offers it (the spool's shard hands back the recipients
/// still live, at the new location), each held message is delivered once, and the tenant's
/// queue count ends at zero.
#[test]
fn a_queued_message_moved_by_compaction_is_delivered_once_and_its_quota_released() {
    let work = tempfile::tempdir().unwrap();
    let users = work.path().join("users");
    std::fs::write(&users, saida_e2e::passwd_line("alice", "pw-alice")).unwrap();
    let sink_port = free_port();
    let sink_addr = format!("127.0.0.9:{sink_port}");
    let sink = Sink::start(std::slice::from_ref(&sink_addr), &[]);
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "operator-token-0123456789";
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // One shard, so that the held messages and the churn share one spool; 1 MiB segments, so
    // that a few MiB of delivered churn pushes the spool past its segment bound.
    let config = format!(
        "[server]\nhostname = \"saida.test\"\nshards = 1\nshutdown_grace_secs = 2\n\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\n\n\
         [spool]\ndir = \"{d}/spool\"\nsegment_bytes = 1048576\n\n\
         [smtp]\nmessage_bytes_max = 524288\n\n\
         [[tenant]]\nname = \"acme\"\nusers = [\"alice\"]\nqueued_rcpts_max = 1000\n\n\
         [auth]\ncredentials_file = \"{users}\"\nrequire_tls = false\n\n\
         [admin]\naddress = \"{admin}\"\ntoken = \"{token}\"\n\n\
         [delivery]\nenabled = true\nlog_dir = \"{d}/dlog\"\n\n\
         [[route]]\ndomain = \"held.test\"\nhosts = [\"{sink_addr}\"]\n\n\
         [[route]]\ndomain = \"fast.test\"\nhosts = [\"{sink_addr}\"]\n",
        d = dir.path().display(),
        users = users.display(),
    );
    let d = Daemon::start_in(dir, port, &config);
    let (status, _) = http_post_json(&admin, "/queue/domains/held.test/suspend", token, "");
    assert_eq!(status, 200);
    let segments = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    };
    // Where the held messages go: the segment receiving appends now (the lowest-numbered one).
    let first = segments(&d.shard_dir(0))[0].clone();
    let held: Vec<_> = (0..5)
        .map(|i| msg("alice@acme.test", &format!("h{i}@held.test")))
        .collect();
    let filler = "x".repeat(76) + "\r\n";
    let churn: Vec<_> = (0..120)
        .map(|i| {
            let (f, t, h, _) = msg("alice@acme.test", &format!("f{i}@fast.test"));
            (f, t, h, filler.repeat(800))
        })
        .collect();
    let mut all = held.clone();
    all.extend(churn);
    let out = send_as(d.port, "alice", &all);
    assert!(out.iter().all(|r| r == "250"), "{out:?}");
    sink.wait_until(60, "the churn", |r| r.len() == 120);
    // Reclamation runs every second: wait until it has copied the held messages out of the
    // oldest segment (the churn's dead segments behind it can then go).
    let metric = |name: &str| -> u64 {
        http_get(&admin, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    // Polls `done` for up to 60 s.
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            let metrics = http_get(&admin, "/metrics");
            assert!(std::time::Instant::now() < deadline, "{what}: {metrics}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let queued = || metric("saida_tenant_queued_recipients{tenant=\"acme\"} ");
    wait_for("no compaction", &|| {
        metric("saida_spool_messages_rehomed_total ") >= 5
    });
    // ... and deleted that segment, so the queued jobs' locations are stale.
    wait_for("the first segment is kept", &|| !first.exists());
    // The churn's last recipients leave the count when saida reads the sink's 250 (just after
    // the sink recorded them): the held five remain.
    wait_for("the held recipients are not counted", &|| queued() == 5);
    let (status, _) = http_post_json(&admin, "/queue/domains/held.test/resume", token, "");
    assert_eq!(status, 200);
    let records = sink.wait_until(60, "the held mail after resume", |r| r.len() >= 125);
    assert_eq!(records.len(), 125, "nothing delivered twice");
    let mut held_to: Vec<String> = records
        .iter()
        .filter_map(|r| r["rcpt"].as_str().map(str::to_string))
        .filter(|t| t.ends_with("@held.test"))
        .collect();
    held_to.sort();
    let want: Vec<String> = (0..5).map(|i| format!("h{i}@held.test")).collect();
    assert_eq!(held_to, want, "each held message once");
    wait_for("the quota was not released", &|| queued() == 0);
    drop(d);
}
