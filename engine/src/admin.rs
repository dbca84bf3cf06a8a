//! The admin endpoint: hyper's HTTP/1.1 server for `saida queue`, `/metrics`, the health
//! checks and `POST /messages`, with its token, and `saida queue`'s client. The requests and
//! answers themselves are `saida_control`'s; shards answer them over their inboxes.

use crate::config::{AdminConfig, TOKEN_CHARS_MIN};
use saida_control::{Answer, Request};

/// Why the admin token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {0}: {1}")]
    Io(std::path::PathBuf, std::io::Error),
    #[error("admin token file {0} is readable by other users (mode {1:o}); chmod 600 it")]
    Exposed(std::path::PathBuf, u32),
    #[error("admin token file {0} holds no token of {TOKEN_CHARS_MIN} characters or more")]
    Short(std::path::PathBuf),
}

/// The token the endpoint requires: `[admin] token`, or the one in the token file, which is
/// generated (32 random bytes, hex) with mode 0600 when it does not exist yet. The second value
/// is true when the token was generated just now.
pub fn load_or_generate_token(
    config: &AdminConfig,
    spool_dir: &std::path::Path,
) -> Result<(String, bool), TokenError> {
    if !config.token.is_empty() {
        return Ok((config.token.clone(), false));
    }
    let path = config.token_path(spool_dir);
    match read_token(&path) {
        Ok(t) => return Ok((t, false)),
        Err(TokenError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let io = |e| TokenError::Io(path.clone(), e);
    let mut random = [0u8; 32];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .map_err(io)?;
    }
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok((token, true))
}

/// Reads a token file, refusing one that others may read.
pub fn read_token(path: &std::path::Path) -> Result<String, TokenError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| TokenError::Io(path.to_path_buf(), e);
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed(path.to_path_buf(), mode));
    }
    let token = std::fs::read_to_string(path)
        .map_err(io)?
        .trim()
        .to_string();
    if token.len() < TOKEN_CHARS_MIN {
        return Err(TokenError::Short(path.to_path_buf()));
    }
    Ok(token)
}

/// Longest time the endpoint waits for a request's head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest time a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the endpoint waits for the shards to answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest a connection is kept, whatever it does (one request per connection).
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// Connections served at once; a connection past it is closed at once.
pub const CONNECTIONS_MAX: usize = 512;
/// Threads that wait on the shards for requests at once (queue requests, injections).
const BLOCKING_THREADS_MAX: usize = 32;
/// Longest answer `saida queue` reads.
const ANSWER_BYTES_MAX: usize = 64 << 20;

/// Compares a presented token with the configured one in constant time (no timing oracle on
/// how many leading characters were right).
fn token_matches(given: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// What every request handler shares.
struct Endpoint {
    token: String,
    limits: crate::api::Limits,
    router: crate::mesh::Router,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    idempotency: std::sync::Mutex<crate::api::IdempotencyStore>,
    /// Tenants: their API tokens may inject their mail (and do nothing else).
    tenants: std::sync::Arc<crate::tenant::Tenants>,
    /// Where the suspended tenants are saved.
    spool_dir: std::path::PathBuf,
    suppressions: std::sync::Arc<crate::suppression::Suppressions>,
    /// Paths in backoff: listed and cancelled here.
    providers: std::sync::Arc<crate::delivery::provider::Providers>,
}

/// Who sent a request.
enum Caller<'a> {
    /// The admin token: every request.
    Operator,
    /// A tenant's API token: `POST /messages` for that tenant only.
    Tenant(&'a crate::tenant::Tenant),
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// Serves the endpoint on its own thread (a single-threaded tokio runtime with hyper) until the
/// process ends. Requests are served concurrently; work that waits on the shards runs on the
/// blocking pool, so `/metrics`, `/healthz` and `/readyz` are never held up by it. At most
/// [`CONNECTIONS_MAX`] connections, one request each, each within [`CONNECTION_TIMEOUT`].
pub fn serve(
    config: &crate::config::Config,
    token: String,
    router: crate::mesh::Router,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    tenants: std::sync::Arc<crate::tenant::Tenants>,
    suppressions: std::sync::Arc<crate::suppression::Suppressions>,
    providers: std::sync::Arc<crate::delivery::provider::Providers>,
) -> std::io::Result<()> {
    let address = &config.admin.address;
    if address.is_empty() {
        return Ok(());
    }
    let journal = config.spool.dir.join("idempotency.jsonl");
    let idempotency = crate::api::IdempotencyStore::open(&journal)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", journal.display())))?;
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let endpoint = std::sync::Arc::new(Endpoint {
        token,
        limits: crate::api::Limits::from_config(config),
        router,
        metrics,
        idempotency: std::sync::Mutex::new(idempotency),
        tenants,
        spool_dir: config.spool.dir.clone(),
        suppressions,
        providers,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()?;
    tracing::info!(%address, "admin endpoint listening");
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(accept_loop(listener, endpoint)))?;
    Ok(())
}

async fn accept_loop(listener: std::net::TcpListener, endpoint: std::sync::Arc<Endpoint>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint cannot listen");
            return;
        }
    };
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(error = %e, "admin endpoint accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = std::sync::Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(client = %peer, "admin endpoint busy; connection closed");
            continue;
        };
        let endpoint = std::sync::Arc::clone(&endpoint);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let endpoint = std::sync::Arc::clone(&endpoint);
                async move { Ok::<_, std::convert::Infallible>(handle(endpoint, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "admin connection"),
                Err(_) => tracing::debug!(client = %peer, "admin connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn response(status: u16, content_type: &str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::from(body));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: u16, value: &serde_json::Value) -> hyper::Response<Body> {
    response(status, "application/json", value.to_string())
}

fn error(status: u16, why: &str) -> hyper::Response<Body> {
    json(status, &serde_json::json!({ "error": why }))
}

async fn handle(
    endpoint: std::sync::Arc<Endpoint>,
    peer: std::net::SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let text = "text/plain; version=0.0.4";
    match (method.as_str(), path.as_str()) {
        ("GET", "/metrics") => {
            let m = &endpoint.metrics;
            return response(200, text, m.render(&endpoint.router.stats));
        }
        ("GET", "/healthz") => return response(200, text, "ok\n".into()),
        ("GET", "/readyz") => {
            let m = &endpoint.metrics;
            if !m.ready.load(std::sync::atomic::Ordering::Relaxed) {
                return response(503, text, "not ready\n".into());
            }
            // A spool that cannot commit makes the node unready: it answers 451/452 to new mail.
            let bad = m.unhealthy_spools();
            if bad.is_empty() {
                return response(200, text, "ready\n".into());
            }
            let mut out = String::from("not ready: spool cannot commit\n");
            for (shard, why) in bad {
                out.push_str(&format!("shard {shard}: {why}\n"));
            }
            return response(503, text, out);
        }
        _ => {}
    }
    let headers = req.headers();
    // A browser sends Origin with cross-site requests; no browser page may drive the queue.
    if headers.contains_key(hyper::header::ORIGIN) {
        tracing::warn!(client = %peer, %path, "admin request from a browser page refused");
        return error(403, "requests from browser pages are refused");
    }
    let given: Vec<&str> = headers
        .get_all(hyper::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .collect();
    let caller = if given.iter().any(|g| token_matches(g, &endpoint.token)) {
        Caller::Operator
    } else if let Some(t) = given.iter().find_map(|g| endpoint.tenants.of_token(g)) {
        Caller::Tenant(t)
    } else {
        let why = "admin request without a valid token refused";
        tracing::warn!(client = %peer, %method, %path, "{why}");
        return error(401, "token required");
    };
    let tenant = match caller {
        Caller::Operator => None,
        Caller::Tenant(t) => Some(t.name().to_string()),
    };
    if tenant.is_some() && (method.as_str(), path.as_str()) != ("POST", "/messages") {
        tracing::warn!(client = %peer, %method, %path, tenant = ?tenant,
            "a tenant's API token may only inject mail");
        return error(403, "this token may only POST /messages");
    }
    if (method.as_str(), path.as_str()) == ("POST", "/messages") {
        let is_json = headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return error(415, "content-type must be application/json");
        }
        let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
            None => None,
            Some(Ok(k)) => Some(k.to_string()),
            Some(Err(_)) => return error(400, "idempotency key: printable ASCII only"),
        };
        let body = match read_body(req.into_body()).await {
            Ok(b) => b,
            Err((status, why)) => return error(status, &why),
        };
        let ep = std::sync::Arc::clone(&endpoint);
        let work = tokio::task::spawn_blocking(move || {
            let tenant = tenant.as_deref().and_then(|t| ep.tenants.named(t));
            inject(&ep, &body, key, tenant)
        });
        return match work.await {
            Ok((status, value)) => json(status, &value),
            Err(_) => error(500, "the injection failed"),
        };
    }
    if path == "/suppressions" || path.starts_with("/suppressions/") {
        let query = req.uri().query().unwrap_or("").to_string();
        let body = match post_body(&method, req).await {
            Ok(b) => b,
            Err((status, why)) => return error(status, &why),
        };
        tracing::info!(client = %peer, %method, %path, "suppression request");
        let ep = std::sync::Arc::clone(&endpoint);
        let work = move || suppression_request(&ep, &method, &path, &query, &body);
        return match tokio::task::spawn_blocking(work).await {
            Ok((status, value)) => json(status, &value),
            Err(_) => error(500, "the request failed"),
        };
    }
    if path == "/backoffs" || path.starts_with("/backoffs/") {
        let body = match post_body(&method, req).await {
            Ok(b) => b,
            Err((status, why)) => return error(status, &why),
        };
        tracing::info!(client = %peer, %method, %path, "backoff request");
        let (status, value) = backoff_request(&endpoint.providers, &method, &path, &body);
        return json(status, &value);
    }
    match saida_control::route(&method, &path) {
        Err((status, why)) => error(status, &why),
        Ok(req) => {
            tracing::info!(client = %peer, %method, %path, "admin request");
            if let Request::SuspendTenant(t)
            | Request::ResumeTenant(t)
            | Request::TenantSummary(t) = &req
            {
                if endpoint.tenants.named(t).is_none() {
                    return error(404, &format!("no tenant `{t}`"));
                }
            }
            let ep = std::sync::Arc::clone(&endpoint);
            let work = move || {
                let answer = ask_shards(&ep.router, &req);
                if matches!(req, Request::SuspendTenant(_) | Request::ResumeTenant(_)) {
                    if let Err(e) = crate::tenant::save_suspended(&ep.tenants, &ep.spool_dir) {
                        tracing::error!(error = %e, "suspended tenants not saved");
                    }
                }
                answer
            };
            match tokio::task::spawn_blocking(work).await {
                Ok(answer) => response(
                    200,
                    "application/json",
                    serde_json::to_string(&answer).unwrap_or_default(),
                ),
                Err(_) => error(500, "the request failed"),
            }
        }
    }
}

/// The body of a POST (none for other methods).
async fn post_body(
    method: &str,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<Vec<u8>, (u16, String)> {
    if method == "POST" {
        read_body(req.into_body()).await
    } else {
        Ok(Vec::new())
    }
}

/// Reads a request body: at most `REQUEST_BODY_BYTES_MAX` bytes within `BODY_TIMEOUT`.
async fn read_body(body: hyper::body::Incoming) -> Result<Vec<u8>, (u16, String)> {
    use http_body_util::BodyExt;
    let max = crate::api::REQUEST_BODY_BYTES_MAX;
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err((408, "timed out reading the body".into())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err((413, format!("body larger than {max} bytes")))
        }
        Ok(Err(e)) => Err((400, format!("reading the body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes().to_vec()),
    }
}

/// Shards take injected messages in turn.
static NEXT_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `POST /messages`: queues the request's messages on one shard, or answers an earlier
/// request's queue ids for a repeated idempotency key.
use crate::tenant::POOL_HEADER;

fn inject(
    endpoint: &Endpoint,
    json: &[u8],
    header_key: Option<String>,
    tenant: Option<&crate::tenant::Tenant>,
) -> (u16, serde_json::Value) {
    use crate::api::KeyState;
    let (router, limits, idempotency) = (&endpoint.router, &endpoint.limits, &endpoint.idempotency);
    let req = match crate::api::parse(json) {
        Ok(r) => r,
        Err(e) => return (400, serde_json::json!({ "error": e })),
    };
    if let Some(t) = tenant {
        if !t.sender_allowed(&req.from) {
            let why = "553 5.7.1 Sender address not allowed for this account";
            return (403, serde_json::json!({ "error": why }));
        }
    }
    let key = req.idempotency_key.clone().or(header_key);
    if let Some(k) = &key {
        let printable = k.bytes().all(|b| b.is_ascii_graphic());
        if k.is_empty() || k.len() > crate::api::IDEMPOTENCY_KEY_CHARS_MAX || !printable {
            let why = format!(
                "idempotency key: 1 ..= {} printable ASCII characters",
                crate::api::IDEMPOTENCY_KEY_CHARS_MAX
            );
            return (400, serde_json::json!({ "error": why }));
        }
    }
    let now_secs = spool::now_micros() / 1_000_000;
    let messages = match crate::api::prepare(&req, now_secs, limits) {
        Ok(m) => m,
        Err(e) => return (400, serde_json::json!({ "error": e })),
    };
    for m in &messages {
        if let Some(pool) = smtp_proto::headers::find_field(&m.content, POOL_HEADER) {
            if !tenant.is_some_and(|t| t.pool_allowed(pool)) {
                let why = format!("553 5.7.1 Pool {pool:?} not allowed for this account");
                return (403, serde_json::json!({ "error": why }));
            }
        }
    }
    if let Some(t) = tenant {
        for m in &messages {
            if !t.header_from_allowed(&m.content) {
                let why = "553 5.7.1 From: header address not allowed for this account";
                return (403, serde_json::json!({ "error": why }));
            }
        }
    }
    // Suppressed recipients are reported, not queued.
    let scope = tenant.map_or("", |t| t.name());
    let mut suppressed = Vec::new();
    let mut messages = messages;
    for m in &mut messages {
        m.to.retain(|a| {
            let gone = endpoint.suppressions.suppressed(scope, a);
            if gone {
                suppressed.push(a.clone());
            }
            !gone
        });
    }
    messages.retain(|m| !m.to.is_empty());
    // Keys are the caller's own: one tenant never sees another's answers (an operator's key,
    // printable ASCII, can never hold the \u{1} that separates a tenant's name from its key).
    let key = match tenant {
        Some(t) => key.map(|k| format!("{}\u{1}{k}", t.name())),
        None => key,
    };
    let lock = || idempotency.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = &key {
        // Recorded before dispatch: a retry while this one runs (or after its outcome was lost)
        // never queues twice.
        let mut store = lock();
        match store.get(k) {
            Some(KeyState::Done(ids)) => {
                return (
                    200,
                    serde_json::json!({ "queue_ids": ids, "repeated": true }),
                );
            }
            Some(KeyState::Pending) => {
                let why = "a request with this idempotency key is under way, or its outcome \
                           was lost; check its messages before sending under a new key";
                return (409, serde_json::json!({ "error": why }));
            }
            None => {
                if let Err(e) = store.begin(k) {
                    let why = format!("cannot record the idempotency key: {e}");
                    return (503, serde_json::json!({ "error": why }));
                }
            }
        }
    }
    let refuse = |status: u16, why: String| {
        if let Some(k) = &key {
            lock().forget(k);
        }
        (status, serde_json::json!({ "error": why }))
    };
    // The rate quota counts requests that will queue something, never a repeated one.
    if let Some(t) = tenant.filter(|_| !messages.is_empty()) {
        let per_minute = t.config.messages_per_minute_max;
        if per_minute > 0 && messages.len() as u64 > per_minute {
            let why = format!(
                "{} messages in one request, more than the account's {per_minute} a minute: \
                 split it",
                messages.len()
            );
            return refuse(400, why);
        }
        if let Err(q) = t.admit_n(messages.len() as u64) {
            endpoint
                .metrics
                .inc(crate::metrics::Counter::TenantQuota, 1);
            return refuse(429, format!("452 4.7.1 {q}"));
        }
    }
    if messages.is_empty() {
        if let Some(k) = key {
            lock().put(k, Vec::new());
        }
        return (
            200,
            serde_json::json!({ "queue_ids": [], "suppressed": suppressed }),
        );
    }
    let shard = NEXT_SHARD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % router.shards();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let msg = crate::mesh::ShardMsg::Inject {
        messages,
        tenant: tenant.map_or("api", |t| t.name()).to_string(),
        reply: tx,
    };
    if router.send_blocking(shard, msg, ADMIN_TIMEOUT).is_err() {
        if let Some(k) = &key {
            lock().forget(k);
        }
        return (
            503,
            serde_json::json!({ "error": "the shard is busy; retry" }),
        );
    }
    match rx.recv_timeout(ADMIN_TIMEOUT * 3) {
        Ok(Ok(ids)) => {
            if let Some(k) = key {
                lock().put(k, ids.clone());
            }
            (
                200,
                serde_json::json!({ "queue_ids": ids, "suppressed": suppressed }),
            )
        }
        Ok(Err(failure)) => {
            // Nothing committed: the key may be used again. Some committed: it stays pending,
            // so a retry cannot queue those twice.
            if let Some(k) = key.as_ref().filter(|_| failure.queued.is_empty()) {
                lock().forget(k);
            }
            let body = serde_json::json!({ "error": failure.reply, "queue_ids": failure.queued });
            (503, body)
        }
        // The key stays pending: the shard may still commit.
        Err(_) => (
            503,
            serde_json::json!({ "error": "no answer from the shard in time" }),
        ),
    }
}

/// The body of `POST /suppressions` and `POST /suppressions/remove`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressionChange {
    /// A tenant's name, or empty (absent) for everyone.
    #[serde(default)]
    scope: String,
    entries: Vec<String>,
    #[serde(default)]
    reason: String,
}

/// `GET /suppressions[?scope=&offset=&limit=]`, `GET /suppressions/ADDRESS[?scope=]`,
/// `POST /suppressions` (add, or bulk import), `POST /suppressions/remove`.
/// `GET /backoffs`: the paths in backoff; `POST /backoffs/cancel` with
/// `{"provider": NAME, "source": NAME}` (source optional: all): ends their backoff.
fn backoff_request(
    providers: &crate::delivery::provider::Providers,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cancel {
        provider: String,
        #[serde(default)]
        source: Option<String>,
    }
    match (method, path) {
        ("GET", "/backoffs") => (200, serde_json::json!({ "backoffs": providers.backoffs() })),
        ("POST", "/backoffs/cancel") => match serde_json::from_slice::<Cancel>(body) {
            Ok(c) => {
                let n = providers.cancel(&c.provider, c.source.as_deref());
                tracing::info!(provider = %c.provider, source = ?c.source, cancelled = n,
                    "backoff cancelled");
                (200, serde_json::json!({ "cancelled": n }))
            }
            Err(e) => {
                let why = format!("expected {{\"provider\": NAME, \"source\": NAME}}: {e}");
                (400, serde_json::json!({ "error": why }))
            }
        },
        (_, "/backoffs" | "/backoffs/cancel") => {
            (405, serde_json::json!({ "error": "method not allowed" }))
        }
        _ => (404, serde_json::json!({ "error": "no such resource" })),
    }
}

fn suppression_request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let list = &endpoint.suppressions;
    let bad = |why: String| (400, serde_json::json!({ "error": why }));
    let scope_ok = |s: &str| s.is_empty() || endpoint.tenants.named(s).is_some();
    match (method, path) {
        ("GET", "/suppressions") => {
            let scope = param("scope");
            let number = |name: &str, default: usize| {
                param(name).map_or(Ok(default), |v| v.parse::<usize>())
            };
            let (Ok(offset), Ok(limit)) = (number("offset", 0), number("limit", 1000)) else {
                return bad("offset and limit are numbers".into());
            };
            let entries = list.list(scope.as_deref(), offset, limit);
            let limit = limit.min(crate::suppression::LIST_MAX);
            let body =
                serde_json::json!({ "entries": entries, "total": list.len(), "limit": limit });
            (200, body)
        }
        ("GET", p) => {
            let address = p.trim_start_matches("/suppressions/");
            let scope = param("scope").unwrap_or_default();
            let suppressed = list.suppressed(&scope, address);
            (
                200,
                serde_json::json!({ "address": address, "suppressed": suppressed }),
            )
        }
        ("POST", "/suppressions" | "/suppressions/remove") => {
            let change: SuppressionChange = match serde_json::from_slice(body) {
                Ok(c) => c,
                Err(e) => return bad(format!("body: {e}")),
            };
            if !scope_ok(&change.scope) {
                return bad(format!("no tenant `{}`", change.scope));
            }
            let done = if path == "/suppressions" {
                list.add(&change.scope, &change.entries, &change.reason, true)
                    .map(|n| serde_json::json!({ "added": n }))
            } else {
                list.remove(&change.scope, &change.entries, true)
                    .map(|n| serde_json::json!({ "removed": n }))
            };
            match done {
                Ok(v) => (200, v),
                Err(e) => bad(e.to_string()),
            }
        }
        _ => (
            404,
            serde_json::json!({ "error": format!("no route {method} {path}") }),
        ),
    }
}

/// Broadcasts a request to every shard and merges their answers.
pub fn ask_shards(router: &crate::mesh::Router, req: &Request) -> Answer {
    let (tx, rx) = std::sync::mpsc::sync_channel(router.shards());
    let mut asked = 0;
    for shard in 0..router.shards() {
        let msg = crate::mesh::ShardMsg::Admin(req.clone(), tx.clone());
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
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
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

/// `saida queue ...`: one request to the endpoint (hyper's HTTP/1.1 client); returns the
/// answer.
pub fn client(address: &str, token: &str, method: &str, path: &str) -> anyhow::Result<Answer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = runtime.block_on(request(address, token, method, path))?;
    Ok(serde_json::from_slice(&body)?)
}

async fn request(address: &str, token: &str, method: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    use http_body_util::BodyExt;
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("cannot reach the admin endpoint at {address}: {e}")
    };
    let stream = tokio::time::timeout(ADMIN_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, address)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let exchange = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), ANSWER_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(ADMIN_TIMEOUT * 4, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {address} in time"))??;
    if status != hyper::StatusCode::OK {
        anyhow::bail!(
            "{address} answered {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_configured_token_must_be_long() {
        let mut c = AdminConfig {
            token: "short".into(),
            ..AdminConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "admin.token");
        c.token = "0123456789abcdef".into();
        assert!(c.validate().is_ok());
        c.address = "nonsense".into();
        assert_eq!(c.validate().unwrap_err().0, "admin.address");
    }

    #[test]
    fn a_token_is_generated_once_with_mode_0600_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = AdminConfig::default();
        let (t1, fresh) = load_or_generate_token(&c, dir.path()).unwrap();
        assert!(fresh && t1.len() == 64, "{t1}");
        let path = dir.path().join("admin.token");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (t2, fresh) = load_or_generate_token(&c, dir.path()).unwrap();
        assert_eq!((t2, fresh), (t1, false), "the same token after a restart");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_generate_token(&c, dir.path()),
            Err(TokenError::Exposed(_, 0o644))
        ));
    }
}
