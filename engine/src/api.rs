//! HTTP injection (`POST /messages` on the admin endpoint): JSON in, messages queued with the
//! same durability rule as SMTP (the answer comes after the spool commit), queue ids out.
//!
//! ```json
//! {"from": "news@example.com",
//!  "to": ["a@example.org", "b@example.net"],
//!  "headers": {"Subject": "Hello {{name}}"},
//!  "body": "Dear {{name}},\n...",
//!  "vars": [{"name": "Ann"}, {"name": "Bob"}],
//!  "idempotency_key": "campaign-42-batch-7"}
//! ```
//!
//! Without `vars`, one message goes to every recipient in `to`. With `vars` (one object per
//! recipient, same order), each recipient gets its own message with `{{key}}` replaced in the
//! headers and the body. An `idempotency_key` (or an `Idempotency-Key` header) makes a retried
//! request answer with the first request's queue ids instead of queueing again; keys are kept
//! for 24 hours, at most [`IDEMPOTENCY_KEYS_MAX`], journaled in the spool directory
//! ([`IdempotencyStore`]), so a restart keeps them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Largest request body.
pub const REQUEST_BODY_BYTES_MAX: usize = 16 << 20;
/// Idempotency keys remembered (oldest forgotten first).
pub const IDEMPOTENCY_KEYS_MAX: usize = 100_000;
/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Recipients per request.
pub const RECIPIENTS_PER_REQUEST_MAX: usize = 10_000;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    pub from: String,
    pub to: Vec<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub vars: Option<Vec<HashMap<String, String>>>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// One message to queue: recipients and the content (headers and body, CRLF line ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub from: String,
    pub to: Vec<String>,
    pub content: Vec<u8>,
}

/// Parses and checks a request (headers may also be given as a JSON object).
pub fn parse(json: &[u8]) -> Result<InjectRequest, String> {
    // Accept `headers` as an object too: normalise it to pairs first.
    let mut v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if let Some(obj) = v.get("headers").and_then(|h| h.as_object()).cloned() {
        let pairs: Vec<serde_json::Value> = obj
            .into_iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect();
        v["headers"] = serde_json::Value::Array(pairs);
    }
    let r: InjectRequest = serde_json::from_value(v).map_err(|e| e.to_string())?;
    if !valid_address(&r.from, true) {
        return Err(format!("from: `{}` is not an address", r.from));
    }
    if r.to.is_empty() || r.to.len() > RECIPIENTS_PER_REQUEST_MAX {
        return Err(format!("to: 1 ..= {RECIPIENTS_PER_REQUEST_MAX} recipients"));
    }
    if let Some(bad) = r.to.iter().find(|a| !valid_address(a, false)) {
        return Err(format!("to: `{bad}` is not an address"));
    }
    if let Some(vars) = &r.vars {
        if vars.len() != r.to.len() {
            return Err("vars: one object per recipient in `to`".into());
        }
    }
    for (k, v) in &r.headers {
        let name_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !name_ok || v.contains(['\r', '\n']) {
            return Err(format!("headers: `{k}` is not a valid header"));
        }
    }
    Ok(r)
}

fn valid_address(a: &str, empty_ok: bool) -> bool {
    if a.is_empty() {
        return empty_ok;
    }
    a.len() <= 254
        && a.rsplit_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && smtp_proto::command::is_domain_or_literal(d.trim_end_matches('.'))
        })
        && !a
            .bytes()
            .any(|b| b <= b' ' || b == b'<' || b == b'>' || b == 0x7f)
}

/// Why a shard stopped queueing a request's messages, and the ones it queued before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectFailure {
    pub reply: String,
    pub queued: Vec<String>,
}

impl InjectFailure {
    pub fn new(reply: &str, queued: Vec<String>) -> InjectFailure {
        InjectFailure {
            reply: reply.to_string(),
            queued,
        }
    }
}

/// The bounds a built message must keep, from `[smtp]` (the same as for SMTP intake).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub message_bytes_max: usize,
    pub text_line_bytes_max: usize,
    /// Bare CR in the body: refused (false) or made a line end (true).
    pub normalize_bare_cr: bool,
    /// All the messages of one request together.
    pub request_built_bytes_max: usize,
}

impl Limits {
    pub fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            message_bytes_max: c.smtp.message_bytes_max,
            text_line_bytes_max: c.smtp.text_line_bytes_max,
            normalize_bare_cr: c.smtp.bare_line_ends == crate::config::BareLineEnds::Normalize,
            request_built_bytes_max: REQUEST_BUILT_BYTES_MAX,
        }
    }
}

/// All the messages one request builds, together.
pub const REQUEST_BUILT_BYTES_MAX: usize = 256 << 20;

/// `{{name}}` in `text` replaced by the variable's value in one pass: a value is never scanned
/// again, so values cannot expand each other. Unknown names stay as they are.
fn substitute(text: &str, vars: Option<&HashMap<String, String>>) -> String {
    let Some(vars) = vars else {
        return text.to_string();
    };
    let mut out = String::with_capacity(substituted_len(text, Some(vars)));
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after
            .find("}}")
            .and_then(|end| vars.get(&after[..end]).map(|v| (end, v)))
        {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The length `substitute` would produce, without building it.
fn substituted_len(text: &str, vars: Option<&HashMap<String, String>>) -> usize {
    let Some(vars) = vars else {
        return text.len();
    };
    let mut len = 0;
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        len += start;
        let after = &rest[start + 2..];
        match after
            .find("}}")
            .and_then(|end| vars.get(&after[..end]).map(|v| (end, v)))
        {
            Some((end, value)) => {
                len += value.len();
                rest = &after[end + 2..];
            }
            None => {
                len += 2;
                rest = after;
            }
        }
    }
    len + rest.len()
}

/// Fixed header lines `prepare` may add, at most (Date, From, To, MIME fields).
const ADDED_HEADERS_BYTES_MAX: usize = 1024;

/// The messages a request asks for, with `Date`, `From`, `To` (the recipient, or
/// `undisclosed-recipients:;` for several: the list is never disclosed), `MIME-Version` and a
/// UTF-8 text content type added when missing (the queue id based `Message-ID` is added at
/// commit, as for SMTP). Sizes are checked before anything is built: each message within
/// `message_bytes_max`, all together within `request_built_bytes_max`. Header values are
/// checked after substitution (no line breaks, no NUL), and the body follows the rules of SMTP
/// content (no NUL; a bare CR refused unless `bare_line_ends = "normalize"`; lines within
/// `text_line_bytes_max`). An error names the recipient and what is wrong.
pub fn prepare(r: &InjectRequest, now_secs: u64, limits: &Limits) -> Result<Vec<Prepared>, String> {
    let one: [Option<&HashMap<String, String>>; 1] = [None];
    let per_message: Vec<Option<&HashMap<String, String>>> = match &r.vars {
        None => one.to_vec(),
        Some(vars) => vars.iter().map(Some).collect(),
    };
    let mut total = 0usize;
    for (i, vars) in per_message.iter().enumerate() {
        let who = || match &r.vars {
            None => "the message".to_string(),
            Some(_) => format!("the message to {}", r.to[i]),
        };
        // The blank line, the body with its LF line ends doubled, and a last CRLF.
        let mut size = ADDED_HEADERS_BYTES_MAX + 4 + substituted_len(&r.body, *vars) * 2;
        for (k, v) in &r.headers {
            size += k.len() + 4 + substituted_len(v, *vars);
        }
        // The body's LF line ends become CRLF: at most twice its length, counted above.
        if size > limits.message_bytes_max.saturating_mul(2) + ADDED_HEADERS_BYTES_MAX {
            return Err(format!(
                "{}: larger than message_bytes_max ({} bytes)",
                who(),
                limits.message_bytes_max
            ));
        }
        total = total.saturating_add(size);
        if total > limits.request_built_bytes_max {
            return Err(format!(
                "the request would build more than {} bytes of messages; split it",
                limits.request_built_bytes_max
            ));
        }
    }
    let build = |to: Vec<String>, vars: Option<&HashMap<String, String>>| {
        let who = || format!("the message to {}", to.join(", "));
        let mut content = String::new();
        let has = |name: &str| r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        if !has("Date") {
            content.push_str(&format!(
                "Date: {}\r\n",
                smtp_proto::headers::rfc5322_date(now_secs)
            ));
        }
        if !has("From") {
            content.push_str(&format!("From: <{}>\r\n", r.from));
        }
        if !has("To") {
            match to.as_slice() {
                [one] => content.push_str(&format!("To: <{one}>\r\n")),
                _ => content.push_str("To: undisclosed-recipients:;\r\n"),
            }
        }
        if !has("MIME-Version") {
            content.push_str("MIME-Version: 1.0\r\n");
        }
        let body = substitute(&r.body, vars);
        if !has("Content-Type") {
            content.push_str("Content-Type: text/plain; charset=utf-8\r\n");
            if !has("Content-Transfer-Encoding") {
                let cte = if body.is_ascii() { "7bit" } else { "8bit" };
                content.push_str(&format!("Content-Transfer-Encoding: {cte}\r\n"));
            }
        }
        for (k, v) in &r.headers {
            let v = substitute(v, vars);
            if v.contains(['\r', '\n', '\0']) {
                return Err(format!(
                    "{}: header `{k}` holds a line break or NUL after substitution",
                    who()
                ));
            }
            content.push_str(&format!("{k}: {v}\r\n"));
        }
        content.push_str("\r\n");
        if body.contains('\0') {
            return Err(format!("{}: the body holds a NUL byte", who()));
        }
        // LF (or CRLF) ends a line; a bare CR is refused, or made a line end.
        let mut lines = Vec::new();
        for line in body.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.contains('\r') && !limits.normalize_bare_cr {
                return Err(format!(
                    "{}: the body holds a bare CR (use LF or CRLF line ends)",
                    who()
                ));
            }
            lines.extend(line.split('\r'));
        }
        if body.is_empty() || body.ends_with('\n') {
            lines.pop();
        }
        for line in lines {
            if line.len() + 2 > limits.text_line_bytes_max {
                return Err(format!(
                    "{}: a body line is longer than {} bytes",
                    who(),
                    limits.text_line_bytes_max
                ));
            }
            content.push_str(line);
            content.push_str("\r\n");
        }
        if content.len() > limits.message_bytes_max {
            return Err(format!(
                "{}: larger than message_bytes_max ({} bytes)",
                who(),
                limits.message_bytes_max
            ));
        }
        Ok(Prepared {
            from: r.from.clone(),
            to,
            content: content.into_bytes(),
        })
    };
    match &r.vars {
        None => Ok(vec![build(r.to.clone(), None)?]),
        Some(vars) => {
            r.to.iter()
                .zip(vars)
                .map(|(to, v)| build(vec![to.clone()], Some(v)))
                .collect()
        }
    }
}

/// Idempotency keys and what became of their requests, journaled so that a restart keeps
/// them.
///
/// A key is recorded (`pending`, synced to the journal) before its messages are dispatched, and
/// marked `done` with the queue ids once they are committed, or forgotten when nothing was
/// queued. A repeated key answers the first request's ids; a key whose request is still under
/// way, or whose outcome was lost (a timeout, a crash between the spool commit and the journal),
/// is answered 409 and never queues again. Journal lines (JSON):
/// `{"key": K, "state": "pending"|"done"|"failed", "at": unix_secs, "ids": [..]}`; the journal
/// is rewritten with the live entries at start.
#[derive(Default)]
pub struct IdempotencyStore {
    map: HashMap<String, (Instant, KeyState)>,
    order: VecDeque<String>,
    journal: Option<std::fs::File>,
    path: Option<std::path::PathBuf>,
    /// Lines in the journal; it is rewritten with the live keys when they are far fewer.
    lines: usize,
}

/// What became of a key's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Dispatched, outcome not known (yet).
    Pending,
    /// Committed with these queue ids.
    Done(Vec<String>),
}

/// Journal lines allowed beyond twice the live keys before the journal is rewritten.
const JOURNAL_SLACK_LINES: usize = 10_000;

/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 256;

#[derive(serde::Serialize, Deserialize)]
struct JournalLine {
    key: String,
    state: String,
    at: u64,
    #[serde(default)]
    ids: Vec<String>,
}

impl IdempotencyStore {
    /// A store journaled in `path`: the live keys are read back, and the file rewritten with
    /// them.
    pub fn open(path: &std::path::Path) -> std::io::Result<IdempotencyStore> {
        let now = now_secs();
        let mut live: HashMap<String, (u64, KeyState)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            // Unreadable is not empty: refuse to start rather than forget every key.
            Err(e) => return Err(e),
        };
        for line in text.lines() {
            // A torn line (a crash or a failed write mid-line) is skipped.
            let Ok(l) = serde_json::from_str::<JournalLine>(line) else {
                continue;
            };
            if now.saturating_sub(l.at) >= IDEMPOTENCY_TTL.as_secs() {
                continue;
            }
            match l.state.as_str() {
                "pending" => {
                    order.push(l.key.clone());
                    live.insert(l.key, (l.at, KeyState::Pending));
                }
                "done" => {
                    order.push(l.key.clone());
                    live.insert(l.key, (l.at, KeyState::Done(l.ids)));
                }
                _ => {
                    live.remove(&l.key);
                }
            }
        }
        let mut store = IdempotencyStore {
            path: Some(path.to_path_buf()),
            ..IdempotencyStore::default()
        };
        for k in order {
            let Some((at, state)) = live.remove(&k) else {
                continue;
            };
            let age = Duration::from_secs(now.saturating_sub(at));
            let since = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            store.order.push_back(k.clone());
            store.map.insert(k, (since, state));
        }
        store.rewrite()?;
        Ok(store)
    }

    /// Rewrites the journal with the live keys only (temporary file, fsync, rename).
    fn rewrite(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let now = now_secs();
        let tmp = path.with_extension("tmp");
        let mut lines = 0;
        {
            let mut f = std::fs::File::create(&tmp)?;
            for k in &self.order {
                let Some((since, state)) = self.map.get(k) else {
                    continue;
                };
                let at = now.saturating_sub(since.elapsed().as_secs());
                f.write_all(journal_line(k, state, at).as_bytes())?;
                lines += 1;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        self.journal = Some(std::fs::OpenOptions::new().append(true).open(&path)?);
        self.lines = lines;
        Ok(())
    }

    /// Appends one line and syncs it. A failed write is cut back off, so the next line does
    /// not land glued to a torn one.
    fn append(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        let Some(f) = self.journal.as_mut() else {
            return Ok(());
        };
        let len = f.metadata()?.len();
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.sync_data()) {
            let _ = f.set_len(len);
            return Err(e);
        }
        self.lines += 1;
        if self.lines > 2 * self.map.len() + JOURNAL_SLACK_LINES {
            self.rewrite()?;
        }
        Ok(())
    }

    /// The state of an earlier request with this key, if any (and not expired).
    pub fn get(&mut self, key: &str) -> Option<KeyState> {
        self.expire();
        self.map.get(key).map(|(_, s)| s.clone())
    }

    /// Records that a request with `key` is being dispatched (durably, when journaled).
    pub fn begin(&mut self, key: &str) -> std::io::Result<()> {
        self.record(key, KeyState::Pending)
    }

    /// The request's messages are committed as `ids`.
    pub fn put(&mut self, key: String, ids: Vec<String>) {
        if let Err(e) = self.record(&key, KeyState::Done(ids)) {
            tracing::warn!(error = %e, "idempotency journal write failed; the key stays pending");
        }
    }

    /// Nothing of the request was queued: the key is free again.
    pub fn forget(&mut self, key: &str) {
        self.map.remove(key);
        self.order.retain(|k| k != key);
        self.write(&journal_line_failed(key));
    }

    fn record(&mut self, key: &str, state: KeyState) -> std::io::Result<()> {
        self.expire();
        while self.map.len() >= IDEMPOTENCY_KEYS_MAX && !self.map.contains_key(key) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        let line = journal_line(key, &state, now_secs());
        let pending = state == KeyState::Pending;
        let known = self.map.contains_key(key);
        if !known {
            self.order.push_back(key.to_string());
        }
        self.map.insert(key.to_string(), (Instant::now(), state));
        let written = self.append(&line);
        if written.is_err() && pending && !known {
            // Not recorded, so not dispatched: the key stays free.
            self.map.remove(key);
            self.order.retain(|k| k != key);
        }
        written
    }

    fn write(&mut self, line: &str) {
        if let Err(e) = self.append(line) {
            tracing::warn!(error = %e, "idempotency journal write failed");
        }
    }

    fn expire(&mut self) {
        while let Some(k) = self.order.front() {
            match self.map.get(k) {
                Some((t, _)) if t.elapsed() < IDEMPOTENCY_TTL => break,
                _ => {
                    let k = self.order.pop_front().unwrap_or_default();
                    self.map.remove(&k);
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    spool::now_micros() / 1_000_000
}

fn journal_line(key: &str, state: &KeyState, at: u64) -> String {
    let (state, ids) = match state {
        KeyState::Pending => ("pending", Vec::new()),
        KeyState::Done(ids) => ("done", ids.clone()),
    };
    let line = JournalLine {
        key: key.to_string(),
        state: state.to_string(),
        at,
        ids,
    };
    format!("{}\n", serde_json::to_string(&line).unwrap_or_default())
}

fn journal_line_failed(key: &str) -> String {
    let line = JournalLine {
        key: key.to_string(),
        state: "failed".into(),
        at: now_secs(),
        ids: Vec::new(),
    };
    format!("{}\n", serde_json::to_string(&line).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_becomes_one_message_per_recipient() {
        let r = parse(
            br#"{"from":"n@x.test","to":["a@y.test","b@y.test"],
                 "headers":{"Subject":"Hi {{name}}"},"body":"Dear {{name}}\nbye",
                 "vars":[{"name":"Ann"},{"name":"Bob"}]}"#,
        )
        .unwrap();
        let m = prepare(&r, 0, &LIMITS).unwrap();
        assert_eq!(m.len(), 2);
        let text = String::from_utf8(m[1].content.clone()).unwrap();
        assert!(text.contains("Subject: Hi Bob\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nDear Bob\r\nbye\r\n"), "{text}");
        assert_eq!(m[1].to, vec!["b@y.test".to_string()]);
    }

    #[test]
    fn without_vars_one_message_goes_to_everyone() {
        let r = parse(br#"{"from":"","to":["a@y.test","b@z.test"],"body":"x"}"#).unwrap();
        let m = prepare(&r, 0, &LIMITS).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].to.len(), 2);
        let text = String::from_utf8(m[0].content.clone()).unwrap();
        assert!(
            text.contains("To: undisclosed-recipients:;\r\n"),
            "never the list: {text}"
        );
        assert!(!text.contains("a@y.test"), "{text}");
        assert!(text.contains("MIME-Version: 1.0\r\n"));
        assert!(text.contains("Content-Type: text/plain; charset=utf-8\r\n"));
        assert!(text.contains("Content-Transfer-Encoding: 7bit\r\n"));
    }

    const LIMITS: Limits = Limits {
        message_bytes_max: 1 << 20,
        text_line_bytes_max: 1000,
        normalize_bare_cr: false,
        request_built_bytes_max: 4 << 20,
    };

    fn built(json: &str, limits: &Limits) -> Result<Vec<Prepared>, String> {
        prepare(&parse(json.as_bytes()).unwrap(), 0, limits)
    }

    #[test]
    fn values_do_not_expand_each_other() {
        let m = built(
            r#"{"from":"a@b.test","to":["c@d.test"],"body":"{{a}}|{{b}}|{{c}}",
                "vars":[{"a":"{{b}}{{b}}","b":"x"}]}"#,
            &LIMITS,
        )
        .unwrap();
        let text = String::from_utf8(m[0].content.clone()).unwrap();
        assert!(text.ends_with("\r\n\r\n{{b}}{{b}}|x|{{c}}\r\n"), "{text}");
    }

    #[test]
    fn sizes_are_bounded_before_building() {
        let big = "x".repeat(900);
        let body = vec![big.as_str(); 2000].join("\n");
        let json = serde_json::json!({"from":"a@b.test","to":["c@d.test"],"body":body});
        let e = built(&json.to_string(), &LIMITS).unwrap_err();
        assert!(e.contains("message_bytes_max"), "{e}");
        // 10 recipients x a 600 KiB body: each fits, together they do not.
        let body = vec![big.as_str(); 680].join("\n");
        let to: Vec<String> = (0..10).map(|i| format!("r{i}@d.test")).collect();
        let vars: Vec<serde_json::Value> = (0..10).map(|_| serde_json::json!({})).collect();
        let json = serde_json::json!({"from":"a@b.test","to":to,"body":body,"vars":vars});
        let e = built(&json.to_string(), &LIMITS).unwrap_err();
        assert!(e.contains("split it"), "{e}");
    }

    #[test]
    fn substituted_headers_and_bodies_follow_the_content_rules() {
        let e = built(
            r#"{"from":"a@b.test","to":["c@d.test"],"headers":{"Subject":"{{s}}"},
                "vars":[{"s":"hi\r\nBcc: victim@x.test"}]}"#,
            &LIMITS,
        )
        .unwrap_err();
        assert!(e.contains("Subject") && e.contains("line break"), "{e}");
        let bare = r#"{"from":"a@b.test","to":["c@d.test"],"body":"a\r.\r\nb"}"#;
        assert!(built(bare, &LIMITS).unwrap_err().contains("bare CR"));
        let normalize = Limits {
            normalize_bare_cr: true,
            ..LIMITS
        };
        let m = built(bare, &normalize).unwrap();
        let text = String::from_utf8(m[0].content.clone()).unwrap();
        assert!(text.ends_with("\r\n\r\na\r\n.\r\nb\r\n"), "{text:?}");
        let nul = r#"{"from":"a@b.test","to":["c@d.test"],"body":"a\u0000b"}"#;
        assert!(built(nul, &LIMITS).unwrap_err().contains("NUL"));
        let long = serde_json::json!({"from":"a@b.test","to":["c@d.test"],"body":"y".repeat(999)});
        assert!(
            built(&long.to_string(), &LIMITS)
                .unwrap_err()
                .contains("longer")
        );
        let utf8 = r#"{"from":"a@b.test","to":["c@d.test"],"body":"café"}"#;
        let m = built(utf8, &LIMITS).unwrap();
        let text = String::from_utf8(m[0].content.clone()).unwrap();
        assert!(
            text.contains("Content-Transfer-Encoding: 8bit\r\n"),
            "{text}"
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let e = |j: &str| parse(j.as_bytes()).unwrap_err();
        assert!(e(r#"{"from":"x","to":["a@b.test"]}"#).contains("from"));
        assert!(e(r#"{"from":"a@b.test","to":[]}"#).contains("to"));
        assert!(e(r#"{"from":"a@b.test","to":["a b@c.test"]}"#).contains("to"));
        assert!(
            e(r#"{"from":"a@b.test","to":["c@d.test"],"headers":{"X":"a\r\nBcc: x"}}"#)
                .contains("headers")
        );
        assert!(e(r#"{"from":"a@b.test","to":["c@d.test"],"vars":[]}"#).contains("vars"));
        assert!(e(r#"{"from":"a@b.test","to":["c@d.test"],"bogus":1}"#).contains("bogus"));
    }

    #[test]
    fn idempotency_keys_return_the_first_answer_and_are_bounded() {
        let mut s = IdempotencyStore::default();
        assert_eq!(s.get("k"), None);
        s.put("k".into(), vec!["A".into()]);
        assert_eq!(s.get("k"), Some(KeyState::Done(vec!["A".into()])));
        for i in 0..IDEMPOTENCY_KEYS_MAX {
            s.put(format!("x{i}"), vec![]);
        }
        assert_eq!(s.get("k"), None, "the oldest key is forgotten at the bound");
        assert!(s.map.len() <= IDEMPOTENCY_KEYS_MAX);
    }

    #[test]
    fn a_forgotten_key_can_be_used_again_without_a_stale_entry() {
        let mut s = IdempotencyStore::default();
        for _ in 0..3 {
            s.begin("k").unwrap();
            s.forget("k");
        }
        s.begin("k").unwrap();
        assert_eq!(s.order.len(), 1, "{:?}", s.order);
        assert_eq!(s.get("k"), Some(KeyState::Pending));
    }

    #[test]
    fn keys_survive_a_restart_and_a_lost_outcome_stays_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        {
            let mut s = IdempotencyStore::open(&path).unwrap();
            s.begin("done").unwrap();
            s.put("done".into(), vec!["ID1".into()]);
            s.begin("lost").unwrap();
            s.begin("failed").unwrap();
            s.forget("failed");
        }
        // A torn last line from a crash mid-write is skipped.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"key\":\"torn").unwrap();
        let mut s = IdempotencyStore::open(&path).unwrap();
        assert_eq!(s.get("done"), Some(KeyState::Done(vec!["ID1".into()])));
        assert_eq!(s.get("lost"), Some(KeyState::Pending));
        assert_eq!(s.get("failed"), None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().count(),
            2,
            "rewritten with the live keys: {text}"
        );
    }
}
