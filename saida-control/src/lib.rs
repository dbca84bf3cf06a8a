//! `saida-control`: the operator and API contract shared by the daemon, `saida queue` and the
//! tests: the requests every shard answers ([`Request`], [`Selector`]), what they answer
//! ([`ShardReply`], [`DomainSummary`], the merged [`Answer`]), and which HTTP path is which
//! request ([`route`]). The documented form is `docs/openapi.yaml`; a test checks that every
//! path there is routed.
//!
//! Not here: serving HTTP, authorization, talking to shards (the daemon's `admin` module).

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use spool_format::QueueId;

/// An operator request, broadcast to every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Queued recipients per domain.
    Summary,
    /// Queued recipients per domain of one tenant.
    TenantSummary(String),
    /// Stop delivering a tenant's mail (queued mail stays; new mail is queued), and resume.
    SuspendTenant(String),
    ResumeTenant(String),
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
    /// The configured tenant whose queue this is; empty for mail of no tenant.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// The egress source this queue's mail leaves from; empty without a pool.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// The destination's mailbox provider (`[[provider]]`), once its MX is known; empty if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
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

/// Parses `METHOD PATH` into a request; the error is an HTTP status and a reason.
pub fn route(method: &str, path: &str) -> Result<Request, (u16, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || (404, format!("no route {method} {path}"));
    let id = |s: &str| {
        s.parse::<QueueId>()
            .map_err(|_| (400, format!("`{s}` is not a queue id")))
    };
    let tenant = |s: &str| {
        let valid = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if valid {
            Ok(s.to_string())
        } else {
            Err((400, format!("`{s}` is not a tenant name")))
        }
    };
    match (method, parts.as_slice()) {
        ("GET", ["queue"]) => Ok(Request::Summary),
        ("GET", ["queue", "messages", qid]) => Ok(Request::Status(id(qid)?)),
        ("GET", ["queue", "tenants", t]) => Ok(Request::TenantSummary(tenant(t)?)),
        ("POST", ["queue", "tenants", t, "suspend"]) => Ok(Request::SuspendTenant(tenant(t)?)),
        ("POST", ["queue", "tenants", t, "resume"]) => Ok(Request::ResumeTenant(tenant(t)?)),
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
        assert_eq!(
            route("POST", "/queue/tenants/acme/suspend"),
            Ok(Request::SuspendTenant("acme".into()))
        );
        assert_eq!(
            route("GET", "/queue/tenants/acme"),
            Ok(Request::TenantSummary("acme".into()))
        );
        assert_eq!(route("GET", "/queue/tenants/a%20b").unwrap_err().0, 400);
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
                .replace("{tenant}", "acme")
                .replace("{id}", &QueueId(0xABC).to_string());
            let served_before_routing = matches!(
                (method, concrete.as_str()),
                ("GET", "/metrics" | "/healthz" | "/readyz") | ("POST", "/messages")
            ) || concrete.starts_with("/suppressions")
                || concrete.starts_with("/backoffs");
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
