//! Observability end to end: the real `saida run` delivers to `saida-sink` while `/metrics`,
//! `/healthz` and `/readyz` are scraped from its admin endpoint; counters and histogram counts
//! must match what was sent and what the sink received, and the exposition must pass
//! `promtool check metrics` (Debian package `prometheus`, installed by scripts/test.sh).

use std::time::Duration;

use saida_e2e::{Daemon, Sink, free_port, python, send_messages};

fn get(url: &str) -> (u16, String) {
    let out = python(
        r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#,
        &[url],
    );
    let (code, body) = out.split_once('\n').unwrap_or((&out, ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_match_the_traffic_and_pass_promtool() {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &[]);
    let config = format!(
        "[delivery]\nlog_dir = \"{{dir}}/log\"\n\n[[route]]\ndomain = \"*\"\n\
         hosts = [\"127.0.0.2:{port}\"]\n\n[admin]\naddress = \"{admin}\"\n"
    );
    let d = Daemon::start("epoll", &config);
    let base = format!("http://{admin}");
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    let msgs: Vec<(&str, Vec<String>)> = (0..40)
        .map(|i| {
            (
                "a@origin.test",
                vec![format!("u{i}@d{}.test", i % 7), format!("v{i}@e.test")],
            )
        })
        .chain(std::iter::once((
            "a@origin.test",
            vec!["reject1@r.test".to_string()],
        )))
        .collect();
    assert_eq!(send_messages(d.port, &msgs), 41);
    // 80 deliveries and one bounce to a@origin.test.
    sink.wait_until(30, "every delivery", |r| r.len() >= 81);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (code, text) = get(&format!("{base}/metrics"));
        assert_eq!(code, 200);
        if value(
            &text,
            "saida_delivery_outcomes_total{outcome=\"delivered\"}",
        ) >= 81.0
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outcomes never reached 81:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // 41 client messages plus the bounce, which saida queues itself.
    assert_eq!(value(&text, "saida_messages_accepted_total"), 41.0);
    assert_eq!(value(&text, "saida_recipients_accepted_total"), 81.0);
    assert_eq!(value(&text, "saida_ack_latency_seconds_count"), 41.0);
    assert_eq!(
        value(
            &text,
            "saida_delivery_outcomes_total{outcome=\"delivered\"}"
        ),
        sink.records().len() as f64
    );
    assert_eq!(
        value(&text, "saida_delivery_outcomes_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(value(&text, "saida_bounces_total"), 1.0);
    assert_eq!(value(&text, "saida_end_to_end_seconds_count"), 81.0);
    assert_eq!(value(&text, "saida_queue_wait_seconds_count"), 82.0);
    assert!(value(&text, "saida_smtp_connections_total") >= 1.0);
    assert_eq!(value(&text, "saida_spool_commit_seconds_count"), 41.0);
    assert!(value(&text, "saida_spool_commits_total") >= 1.0);
    assert!(value(&text, "saida_spool_records_total") >= 41.0);
    assert!(
        text.contains("saida_queue_recipients{state=\"deferred\"}"),
        "{text}"
    );
    assert!(text.contains("saida_destination_queued_recipients{destination=\"other\"}"));
    assert!(text.contains("# TYPE saida_oldest_message_age_seconds gauge"));
    // Outbound phases: every transaction timed its end of data; every connection its banner.
    assert!(value(&text, "saida_smtp_end_of_data_seconds_count") >= 81.0);
    assert!(value(&text, "saida_smtp_banner_seconds_count") >= 1.0);
    assert_eq!(
        value(&text, "saida_tls_handshake_seconds_count"),
        0.0,
        "the sink offers no TLS"
    );
    // Per destination (top 20 by volume, here all) and per tenant (no AUTH: `none`).
    assert_eq!(
        value(
            &text,
            "saida_destination_outcomes_total{destination=\"e.test\",outcome=\"delivered\"}"
        ),
        40.0
    );
    assert_eq!(
        value(
            &text,
            "saida_destination_outcomes_total{destination=\"r.test\",outcome=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "saida_tenant_outcomes_total{tenant=\"none\",outcome=\"delivered\"}"
        ),
        81.0
    );
    assert_eq!(value(&text, "saida_backend_info{backend=\"epoll\"}"), 1.0);
    assert!(value(&text, "saida_spool_segments") >= 1.0);
    // The dashboard and the alert rules use only metrics that exist.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["docs/grafana/saida.json", "docs/prometheus/alerts.yml"] {
        let doc = std::fs::read_to_string(root.join(file)).unwrap();
        for name in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !name.starts_with("saida_") {
                continue;
            }
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "{file} uses {name}, which /metrics does not export"
            );
        }
    }
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root.join("docs/prometheus/alerts.yml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The exposition is valid for Prometheus.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool is needed (scripts/test.sh installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends an HTTP request with Python; returns (status, body).
fn http(method: &str, url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let hdrs = serde_json::Value::from(
        headers
            .iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect::<Vec<_>>(),
    );
    let out = python(
        r#"
import json, sys, urllib.request, urllib.error
method, url, body, headers = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
req = urllib.request.Request(url, data=body.encode() if body else None, method=method)
if body:
    req.add_header("Content-Type", "application/json")
for k, v in headers:
    req.add_header(k, v)
try:
    r = urllib.request.urlopen(req, timeout=30)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#,
        &[method, url, body, &hdrs.to_string()],
    );
    let (code, body) = out.split_once('\n').unwrap_or((&out, ""));
    (code.trim().parse().unwrap_or(0), body.trim().to_string())
}

/// A sink recording bodies, and a daemon routing everything to it with an admin endpoint
/// whose token is `token-0123456789abcdef`; returns them and the endpoint's address.
fn injection_bed() -> (Sink, Daemon, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let sink = Sink::start(&[format!("127.0.0.2:{port}")], &["--record-bodies"]);
    let config = format!(
        "[delivery]\nlog_dir = \"{{dir}}/log\"\n\n[[route]]\ndomain = \"*\"\n\
         hosts = [\"127.0.0.2:{port}\"]\n\n[admin]\naddress = \"{admin}\"\n\
         token = \"token-0123456789abcdef\"\n"
    );
    (sink, Daemon::start("epoll", &config), admin)
}

#[test]
fn http_injection_is_durable_idempotent_and_needs_the_token() {
    let (sink, _d, admin) = injection_bed();
    let url = format!("http://{admin}/messages");
    let body = r#"{"from":"news@origin.test","to":["ann@a.test","bob@b.test"],
        "headers":{"Subject":"Hello {{name}}"},"body":"Dear {{name}},\nhi.",
        "vars":[{"name":"Ann"},{"name":"Bob"}],"idempotency_key":"batch-1"}"#;
    let auth = ("Authorization", "Bearer token-0123456789abcdef");
    // Without the token, with a wrong one, from a browser page, or not as JSON: refused,
    // nothing queued.
    let (code, _) = http("POST", &url, body, &[]);
    assert_eq!(code, 401);
    let wrong = ("Authorization", "Bearer token-0123456789abcdeX");
    assert_eq!(http("POST", &url, body, &[wrong]).0, 401);
    let origin = ("Origin", "https://evil.example");
    assert_eq!(http("POST", &url, body, &[auth, origin]).0, 403);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    assert_eq!(http("POST", &url, body, &[auth, form]).0, 415);
    let (code, first) = http("POST", &url, body, &[auth]);
    assert_eq!(code, 200, "{first}");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["queue_ids"].as_array().unwrap().len(), 2);
    // The same key again: the same ids, nothing queued twice.
    let (code, again) = http("POST", &url, body, &[auth]);
    assert_eq!(code, 200);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["queue_ids"], first["queue_ids"]);
    assert_eq!(again["repeated"], true);
    let records = sink.wait_until(20, "both messages", |r| r.len() >= 2);
    // Wait for the state that settles the question: nothing left in the spool. A message queued
    // again by the repeated key would still be live, or delivered and counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let (_, text) = get(&format!("http://{admin}/metrics"));
        let live = value(&text, "saida_spool_live_messages");
        let delivered = value(
            &text,
            "saida_delivery_outcomes_total{outcome=\"delivered\"}",
        );
        if live == 0.0 && delivered >= 2.0 {
            break delivered;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spool never drained:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(delivered, 2.0, "a repeated key queued again");
    assert_eq!(sink.records().len(), 2, "a repeated key queued again");
    let bob = records.iter().find(|r| r["rcpt"] == "bob@b.test").unwrap();
    let text = bob["body"].as_str().unwrap();
    assert!(
        text.contains("Subject: Hello Bob") && text.contains("Dear Bob,"),
        "{text}"
    );
    // A bad request names its problem.
    let (code, err) = http("POST", &url, r#"{"from":"x","to":["a@b.test"]}"#, &[auth]);
    assert_eq!(code, 400);
    assert!(err.contains("from"), "{err}");
    // Status of a message by queue id (it may already be delivered and forgotten: 200 either way).
    let id = first["queue_ids"][0].as_str().unwrap();
    let status_url = format!("http://{admin}/queue/messages/{id}");
    assert_eq!(
        http("GET", &status_url, "", &[]).0,
        401,
        "status needs the token"
    );
    assert_eq!(http("GET", &status_url, "", &[auth]).0, 200);
}

#[test]
fn admin_endpoint_is_concurrent_bounded_and_uses_a_generated_token() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let admin = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start("epoll", &format!("[admin]\naddress = \"{admin}\"\n"));
    // The token was generated at first start, kept with mode 0600 and printed once.
    let file = d.dir.path().join("spool/admin.token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    assert!(
        d.log().contains(&token),
        "the token is printed at generation"
    );
    // Idle connections and a request whose head never ends do not hold the endpoint up.
    let idle: Vec<_> = (0..10)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    let mut slow = std::net::TcpStream::connect(&admin).unwrap();
    slow.write_all(b"GET /queue HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert_eq!(get(&format!("http://{admin}/healthz")).0, 200);
    assert_eq!(get(&format!("http://{admin}/metrics")).0, 200);
    // `saida queue` finds the token through the configuration; without it, 401.
    let config = d.dir.path().join("saida.toml");
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .args(["queue", "--config"])
        .arg(&config)
        .arg("summary")
        .env_remove("SAIDA_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("domain"));
    assert_eq!(
        http("GET", &format!("http://{admin}/queue"), "", &[]).0,
        401
    );
    // The dribbling request is cut off by the head deadline: its connection ends.
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut rest = Vec::new();
    let ended = slow.read_to_end(&mut rest);
    assert!(
        ended.is_ok(),
        "the slow connection was not closed: {ended:?}"
    );
    drop(idle);
}

#[test]
fn http_injection_is_bounded_safe_and_its_keys_survive_a_restart() {
    let (sink, mut d, admin) = injection_bed();
    let url = format!("http://{admin}/messages");
    let auth = ("Authorization", "Bearer token-0123456789abcdef");
    let post = |body: &serde_json::Value| http("POST", &url, &body.to_string(), &[auth]);
    // One message to two recipients: neither sees the other's address.
    let first = serde_json::json!({"from": "n@origin.test", "to": ["ann@a.test", "bob@b.test"],
        "body": "hello", "idempotency_key": "restart-1"});
    let (code, answer) = post(&first);
    assert_eq!(code, 200, "{answer}");
    let records = sink.wait_until(20, "both recipients", |r| r.len() == 2);
    let text = records[0]["body"].as_str().unwrap();
    assert!(text.contains("To: undisclosed-recipients:;\r\n"), "{text}");
    assert!(
        !text.contains("ann@a.test") && !text.contains("bob@b.test"),
        "{text}"
    );
    assert!(text.contains("MIME-Version: 1.0\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: text/plain; charset=utf-8\r\n"),
        "{text}"
    );
    // A header line smuggled through a variable, a bare CR, a NUL: refused, nothing queued.
    let smuggle = serde_json::json!({"from": "n@origin.test", "to": ["c@c.test"],
        "headers": {"Subject": "{{s}}"}, "vars": [{"s": "x\r\nBcc: victim@v.test"}]});
    let (code, why) = post(&smuggle);
    assert!(code == 400 && why.contains("line break"), "{code} {why}");
    let bare = serde_json::json!({"from": "n@origin.test", "to": ["c@c.test"],
        "body": "a\r.\r\nb"});
    let (code, why) = post(&bare);
    assert!(code == 400 && why.contains("bare CR"), "{code} {why}");
    // 300 recipients x a 1 MiB body would build 300 MiB: refused before building.
    let to: Vec<String> = (0..300).map(|i| format!("r{i}@big.test")).collect();
    let vars: Vec<serde_json::Value> = (0..300).map(|_| serde_json::json!({})).collect();
    let big = serde_json::json!({"from": "n@origin.test", "to": to, "vars": vars,
        "body": format!("{}\n", "y".repeat(900)).repeat(1100)});
    let token = "token-0123456789abcdef";
    let (code, why) = saida_e2e::http_post_json(&admin, "/messages", token, &big.to_string());
    assert!(code == 400 && why.contains("split it"), "{code} {why}");
    // After a restart the key still answers the first request's ids.
    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let cfg = std::fs::read_to_string(dir.path().join("saida.toml")).unwrap();
    let _d2 = Daemon::start_in(dir, d.port, &cfg);
    let (code, again) = post(&first);
    assert_eq!(code, 200, "{again}");
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&answer).unwrap(),
        serde_json::from_str(&again).unwrap(),
    );
    assert_eq!(a["queue_ids"], b["queue_ids"]);
    assert_eq!(b["repeated"], true);
    assert_eq!(sink.records().len(), 2, "nothing was queued again");
}
