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
//! for 24 hours, at most [`IDEMPOTENCY_KEYS_MAX`], in memory (a restart forgets them).

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
        && a.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !a
            .bytes()
            .any(|b| b <= b' ' || b == b'<' || b == b'>' || b == 0x7f)
}

fn substitute(text: &str, vars: Option<&HashMap<String, String>>) -> String {
    let Some(vars) = vars else {
        return text.to_string();
    };
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

/// The messages a request asks for, with `Date`, `From`, `To` added when missing (the queue id
/// based `Message-ID` is added at commit, as for SMTP).
pub fn prepare(r: &InjectRequest, now_secs: u64) -> Vec<Prepared> {
    let build = |to: Vec<String>, vars: Option<&HashMap<String, String>>| {
        let mut content = String::new();
        let has = |name: &str| r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        if !has("Date") {
            content.push_str(&format!(
                "Date: {}\r\n",
                crate::smtp::server::headers::rfc5322_date(now_secs)
            ));
        }
        if !has("From") {
            content.push_str(&format!("From: <{}>\r\n", r.from));
        }
        if !has("To") {
            content.push_str(&format!("To: {}\r\n", to.join(", ")));
        }
        for (k, v) in &r.headers {
            content.push_str(&format!("{k}: {}\r\n", substitute(v, vars)));
        }
        content.push_str("\r\n");
        for line in substitute(&r.body, vars).lines() {
            content.push_str(line);
            content.push_str("\r\n");
        }
        Prepared {
            from: r.from.clone(),
            to,
            content: content.into_bytes(),
        }
    };
    match &r.vars {
        None => vec![build(r.to.clone(), None)],
        Some(vars) => {
            r.to.iter()
                .zip(vars)
                .map(|(to, v)| build(vec![to.clone()], Some(v)))
                .collect()
        }
    }
}

/// Idempotency keys and the queue ids they produced.
#[derive(Default)]
pub struct IdempotencyStore {
    map: HashMap<String, (Instant, Vec<String>)>,
    order: VecDeque<String>,
}

impl IdempotencyStore {
    /// The queue ids of an earlier request with this key, if any (and not expired).
    pub fn get(&mut self, key: &str) -> Option<Vec<String>> {
        self.expire();
        self.map.get(key).map(|(_, ids)| ids.clone())
    }

    pub fn put(&mut self, key: String, ids: Vec<String>) {
        self.expire();
        while self.map.len() >= IDEMPOTENCY_KEYS_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        self.order.push_back(key.clone());
        self.map.insert(key, (Instant::now(), ids));
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
        let m = prepare(&r, 0);
        assert_eq!(m.len(), 2);
        let text = String::from_utf8(m[1].content.clone()).unwrap();
        assert!(text.contains("Subject: Hi Bob\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nDear Bob\r\nbye\r\n"), "{text}");
        assert_eq!(m[1].to, vec!["b@y.test".to_string()]);
    }

    #[test]
    fn without_vars_one_message_goes_to_everyone() {
        let r = parse(br#"{"from":"","to":["a@y.test","b@z.test"],"body":"x"}"#).unwrap();
        let m = prepare(&r, 0);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].to.len(), 2);
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
        assert_eq!(s.get("k"), Some(vec!["A".into()]));
        for i in 0..IDEMPOTENCY_KEYS_MAX {
            s.put(format!("x{i}"), vec![]);
        }
        assert_eq!(s.get("k"), None, "the oldest key is forgotten at the bound");
        assert!(s.map.len() <= IDEMPOTENCY_KEYS_MAX);
    }
}
