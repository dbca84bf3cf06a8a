//! Operator control of the queues: the requests every shard answers for the domains it owns
//! ([`Request`], sent over the shards' inboxes), and the local HTTP endpoint that `saida queue`
//! talks to (`server`).

use queue_format::QueueId;
use serde::{Deserialize, Serialize};

/// An operator request, broadcast to every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Queued recipients per domain.
    Summary,
    /// Stop delivering to a domain (queued mail stays; new mail is queued).
    Suspend(String),
    Resume(String),
    /// Retry deferred recipients now (one domain, or all).
    Flush(Option<String>),
    /// Fail queued recipients with a bounce to the sender.
    Bounce(Selector),
    /// Remove queued recipients without a bounce.
    Delete(Selector),
    /// The stored state of one message (answered by the shard whose spool holds it; a message
    /// whose recipients are all done is no longer known).
    Status(QueueId),
}

/// What a bounce or delete applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Message(QueueId),
    Domain(String),
}

/// One domain's queue, as the summary shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub domain: String,
    pub shard: u16,
    pub queued_rcpts: usize,
    pub ready_jobs: usize,
    pub deferred_jobs: usize,
    pub oldest_age_secs: Option<u64>,
    pub next_attempt_in_secs: Option<u64>,
    pub suspended: bool,
    pub connections: usize,
}

/// One shard's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReply {
    pub domains: Vec<DomainSummary>,
    /// Recipients (bounce, delete), jobs (flush) or domains (suspend, resume) affected.
    pub affected: usize,
    /// `Status`: the message, from the shard whose spool holds it.
    pub message: Option<serde_json::Value>,
}

/// `[admin]`: the local HTTP endpoint of `saida queue`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address; empty = no endpoint.
    pub address: String,
    /// Bearer token required for requests that change state; empty = none (allowed only on a
    /// loopback address).
    pub token: String,
    /// Record metrics (counters, histograms). Off: `/metrics` shows zeros; for measuring the
    /// cost of recording.
    pub metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: "127.0.0.1:8025".into(),
            token: String::new(),
            metrics: true,
        }
    }
}

impl AdminConfig {
    /// Checks the address, and that a non-loopback endpoint has a token.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.address.is_empty() {
            return Ok(());
        }
        let addr: std::net::SocketAddr = self
            .address
            .parse()
            .map_err(|_| ("admin.address".to_string(), "not ip:port".to_string()))?;
        if !addr.ip().is_loopback() && self.token.len() < 16 {
            return Err((
                "admin.token".into(),
                "a non-loopback admin address needs a token of 16 characters or more".into(),
            ));
        }
        Ok(())
    }
}

/// Longest request head read by the endpoint.
const REQUEST_HEAD_BYTES_MAX: usize = 8192;
/// How long the endpoint waits for a client, and for the shards to answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses `METHOD PATH` into a request; the error is an HTTP status and a reason.
pub fn route(method: &str, path: &str) -> Result<Request, (u16, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || (404, format!("no route {method} {path}"));
    let id = |s: &str| {
        s.parse::<QueueId>()
            .map_err(|_| (400, format!("`{s}` is not a queue id")))
    };
    match (method, parts.as_slice()) {
        ("GET", ["queue"]) => Ok(Request::Summary),
        ("GET", ["queue", "messages", qid]) => Ok(Request::Status(id(qid)?)),
        ("POST", ["queue", "flush"]) => Ok(Request::Flush(None)),
        ("POST", ["queue", "domains", d, action]) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let valid = !d.is_empty()
                && d.len() <= 255
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
            if !valid {
                return Err((400, format!("`{d}` is not a domain")));
            }
            match *action {
                "suspend" => Ok(Request::Suspend(d)),
                "resume" => Ok(Request::Resume(d)),
                "flush" => Ok(Request::Flush(Some(d))),
                "bounce" => Ok(Request::Bounce(Selector::Domain(d))),
                "delete" => Ok(Request::Delete(Selector::Domain(d))),
                _ => Err(not_found()),
            }
        }
        ("POST", ["queue", "messages", qid, "bounce"]) => {
            Ok(Request::Bounce(Selector::Message(id(qid)?)))
        }
        ("POST", ["queue", "messages", qid, "delete"]) => {
            Ok(Request::Delete(Selector::Message(id(qid)?)))
        }
        _ => Err(not_found()),
    }
}

/// The combined answer of every shard.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub domains: Vec<DomainSummary>,
    pub affected: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<serde_json::Value>,
    /// Shards that did not answer in time.
    pub shards_silent: usize,
}

/// Serves the endpoint on its own thread until the process ends.
/// Compares a presented token with the configured one in constant time (no timing oracle on
/// how many leading characters were right).
fn token_matches(given: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

pub fn serve(
    config: &AdminConfig,
    router: crate::shard::Router,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> std::io::Result<()> {
    if config.address.is_empty() {
        return Ok(());
    }
    let listener = std::net::TcpListener::bind(&config.address)?;
    let token = config.token.clone();
    let idempotency = std::sync::Mutex::new(crate::api::IdempotencyStore::default());
    tracing::info!(address = %config.address, "admin endpoint listening");
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: do not spin.
                        tracing::warn!(error = %e, "admin endpoint accept failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                };
                let _ = conn.set_read_timeout(Some(ADMIN_TIMEOUT));
                let _ = conn.set_write_timeout(Some(ADMIN_TIMEOUT));
                if let Err(e) = handle(conn, &token, &router, &metrics, &idempotency) {
                    tracing::debug!(error = %e, "admin request failed");
                }
            }
        })?;
    Ok(())
}

fn handle(
    mut conn: std::net::TcpStream,
    token: &str,
    router: &crate::shard::Router,
    metrics: &crate::metrics::Metrics,
    idempotency: &std::sync::Mutex<crate::api::IdempotencyStore>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let peer = conn.peer_addr().ok();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // One deadline for the whole head: a client dribbling bytes cannot hold the endpoint.
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if std::time::Instant::now() >= deadline {
            return Ok(());
        }
        let n = conn.read(&mut buf)?;
        if n == 0 || head.len() + n > REQUEST_HEAD_BYTES_MAX {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let split = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |p| p + 4);
    let early_body = head[split..].to_vec();
    let head = String::from_utf8_lossy(&head[..split]).into_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let authorized = token.is_empty()
        || lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("authorization")
                    && v.trim()
                        .strip_prefix("Bearer ")
                        .is_some_and(|given| token_matches(given.trim(), token))
            })
        });
    let plain = |status: u16, body: String| {
        let reason = match status {
            200 => "OK",
            _ => "Service Unavailable",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; version=0.0.4\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        (head, body)
    };
    let special = match (method, path) {
        ("GET", "/metrics") => Some(plain(200, metrics.render(&router.stats))),
        ("GET", "/healthz") => Some(plain(200, "ok\n".into())),
        ("GET", "/readyz") if metrics.ready.load(std::sync::atomic::Ordering::Relaxed) => {
            // A spool that cannot commit makes the node unready: it answers 451/452 to new mail.
            let bad = metrics.unhealthy_spools();
            if bad.is_empty() {
                Some(plain(200, "ready\n".into()))
            } else {
                let mut text = String::from("not ready: spool cannot commit\n");
                for (shard, why) in bad {
                    text.push_str(&format!("shard {shard}: {why}\n"));
                }
                Some(plain(503, text))
            }
        }
        ("GET", "/readyz") => Some(plain(503, "not ready\n".into())),
        _ => None,
    };
    if let Some((head, body)) = special {
        conn.write_all(head.as_bytes())?;
        return conn.write_all(body.as_bytes());
    }
    if (method, path) == ("POST", "/messages") {
        let (status, body) = if !authorized {
            tracing::warn!(client = ?peer, "injection without a valid token refused");
            (401, serde_json::json!({ "error": "token required" }))
        } else {
            let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
            match read_body(&mut conn, early_body, length, deadline) {
                Ok(json) => {
                    let key = header("idempotency-key");
                    inject(router, &json, key, idempotency)
                }
                Err(e) => (400, serde_json::json!({ "error": e })),
            }
        };
        return respond(&mut conn, status, &body.to_string());
    }
    let (status, body) = match route(method, path) {
        Err((status, why)) => (status, serde_json::json!({ "error": why }).to_string()),
        Ok(req) if !matches!(req, Request::Summary | Request::Status(_)) && !authorized => {
            tracing::warn!(client = ?peer, %path, "admin request without a valid token refused");
            (
                401,
                serde_json::json!({ "error": "token required" }).to_string(),
            )
        }
        Ok(req) => {
            tracing::info!(client = ?peer, %method, %path, "admin request");
            let answer = ask_shards(router, &req);
            (200, serde_json::to_string(&answer).unwrap_or_default())
        }
    };
    respond(&mut conn, status, &body)
}

fn respond(conn: &mut std::net::TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    use std::io::Write;
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Reads a request body of `length` bytes (required, bounded), `early` being what came with the
/// head.
fn read_body(
    conn: &mut std::net::TcpStream,
    early: Vec<u8>,
    length: Option<usize>,
    deadline: std::time::Instant,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let length = length.ok_or("content-length is required")?;
    if length > crate::api::REQUEST_BODY_BYTES_MAX {
        return Err(format!(
            "body larger than {} bytes",
            crate::api::REQUEST_BODY_BYTES_MAX
        ));
    }
    let mut body = early;
    let mut buf = vec![0u8; 64 << 10];
    while body.len() < length {
        if std::time::Instant::now() >= deadline {
            return Err("timed out reading the body".into());
        }
        let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("body shorter than content-length".into());
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(length);
    Ok(body)
}

/// Shards take injected messages in turn.
static NEXT_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `POST /messages`: queues the request's messages on one shard, or answers an earlier
/// request's queue ids for a repeated idempotency key.
fn inject(
    router: &crate::shard::Router,
    json: &[u8],
    header_key: Option<String>,
    idempotency: &std::sync::Mutex<crate::api::IdempotencyStore>,
) -> (u16, serde_json::Value) {
    let req = match crate::api::parse(json) {
        Ok(r) => r,
        Err(e) => return (400, serde_json::json!({ "error": e })),
    };
    let key = req.idempotency_key.clone().or(header_key);
    let mut store = idempotency.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ids) = key.as_ref().and_then(|k| store.get(k)) {
        return (
            200,
            serde_json::json!({ "queue_ids": ids, "repeated": true }),
        );
    }
    let now_secs = queue_format::now_micros() / 1_000_000;
    let messages = crate::api::prepare(&req, now_secs);
    let shard = NEXT_SHARD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % router.shards();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let msg = crate::shard::ShardMsg::Inject(messages, tx);
    if router.send_blocking(shard, msg, ADMIN_TIMEOUT).is_err() {
        return (
            503,
            serde_json::json!({ "error": "the shard is busy; retry" }),
        );
    }
    match rx.recv_timeout(ADMIN_TIMEOUT * 3) {
        Ok(Ok(ids)) => {
            if let Some(k) = key {
                store.put(k, ids.clone());
            }
            (200, serde_json::json!({ "queue_ids": ids }))
        }
        Ok(Err(e)) => (503, serde_json::json!({ "error": e })),
        Err(_) => (
            503,
            serde_json::json!({ "error": "no answer from the shard in time" }),
        ),
    }
}

/// Broadcasts a request to every shard and merges their answers.
pub fn ask_shards(router: &crate::shard::Router, req: &Request) -> Answer {
    let (tx, rx) = crossbeam_channel::bounded(router.shards());
    let mut asked = 0;
    for shard in 0..router.shards() {
        let msg = crate::shard::ShardMsg::Admin(req.clone(), tx.clone());
        if router.send_blocking(shard, msg, ADMIN_TIMEOUT).is_ok() {
            asked += 1;
        }
    }
    let mut answer = Answer {
        shards_silent: router.shards() - asked,
        ..Answer::default()
    };
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    for _ in 0..asked {
        match rx.recv_deadline(deadline) {
            Ok(r) => {
                answer.domains.extend(r.domains);
                answer.affected += r.affected;
                if r.message.is_some() {
                    answer.message = r.message;
                }
            }
            Err(_) => answer.shards_silent += 1,
        }
    }
    answer.domains.sort_by(|a, b| {
        b.queued_rcpts
            .cmp(&a.queued_rcpts)
            .then(a.domain.cmp(&b.domain))
    });
    answer
}

/// `saida queue ...`: one request to the endpoint; prints the answer.
pub fn client(address: &str, token: &str, method: &str, path: &str) -> anyhow::Result<Answer> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(address)
        .map_err(|e| anyhow::anyhow!("cannot reach the admin endpoint at {address}: {e}"))?;
    conn.set_read_timeout(Some(ADMIN_TIMEOUT * 2))?;
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("authorization: Bearer {token}\r\n")
    };
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\n{auth}content-length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed response from {address}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        anyhow::bail!("{address} answered {status}: {body}");
    }
    Ok(serde_json::from_str(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_requests() {
        assert_eq!(route("GET", "/queue"), Ok(Request::Summary));
        assert_eq!(
            route("POST", "/queue/domains/Example.COM/suspend"),
            Ok(Request::Suspend("example.com".into()))
        );
        assert_eq!(route("POST", "/queue/flush"), Ok(Request::Flush(None)));
        let id = QueueId(0xABC);
        assert_eq!(
            route("POST", &format!("/queue/messages/{id}/delete")),
            Ok(Request::Delete(Selector::Message(id)))
        );
        assert_eq!(
            route("POST", "/queue/messages/xyz/delete").unwrap_err().0,
            400
        );
        assert_eq!(route("GET", "/queue/domains/x/suspend").unwrap_err().0, 404);
        assert_eq!(
            route("POST", "/queue/domains/x/explode").unwrap_err().0,
            404
        );
    }

    #[test]
    fn tokens_are_compared_whole() {
        assert!(token_matches(
            "token-0123456789abcdef",
            "token-0123456789abcdef"
        ));
        assert!(!token_matches(
            "token-0123456789abcdeX",
            "token-0123456789abcdef"
        ));
        assert!(!token_matches("token", "token-0123456789abcdef"));
        assert!(!token_matches("", "token-0123456789abcdef"));
    }

    #[test]
    fn a_remote_endpoint_needs_a_token() {
        let mut c = AdminConfig {
            address: "0.0.0.0:8025".into(),
            token: String::new(),
            metrics: true,
        };
        assert_eq!(c.validate().unwrap_err().0, "admin.token");
        c.token = "0123456789abcdef".into();
        assert!(c.validate().is_ok());
        c.address = "nonsense".into();
        assert_eq!(c.validate().unwrap_err().0, "admin.address");
    }

    #[test]
    fn every_path_in_the_openapi_document_is_routed() {
        let doc = include_str!("../../docs/openapi.yaml");
        let mut path = None;
        let mut checked = 0;
        for line in doc.lines() {
            if let Some(p) = line.strip_prefix("  /") {
                path = Some(format!("/{}", p.trim_end_matches(':')));
                continue;
            }
            let method = match line.trim() {
                "get:" => "GET",
                "post:" => "POST",
                _ => continue,
            };
            let Some(p) = &path else { continue };
            let concrete = p
                .replace("{domain}", "example.com")
                .replace("{id}", &QueueId(0xABC).to_string());
            let served_before_routing = matches!(
                (method, concrete.as_str()),
                ("GET", "/metrics" | "/healthz" | "/readyz") | ("POST", "/messages")
            );
            assert!(
                served_before_routing || route(method, &concrete).is_ok(),
                "{method} {p} is documented but not routed"
            );
            checked += 1;
        }
        assert!(
            checked >= 14,
            "only {checked} operations found in docs/openapi.yaml"
        );
    }
}
