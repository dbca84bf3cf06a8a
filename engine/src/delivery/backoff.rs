//! Adaptive backoff (what PowerMTA calls backoff mode): when a mailbox provider says "slow
//! down" in a reply (`421 4.7.0 [TSS04]`, `421 4.7.28`, `451 4.7.650`), the (source, provider)
//! path that got it is suspended for a while and/or has its connections and message rate cut
//! by a factor, down to a floor, then ramped back up in steps while no reply matches again.
//!
//! This module is the pure part: the ordered rules ([`Rules`]: `[[backoff_rule]]` entries
//! first, then the shipped [`BUILTIN_RULES`] unless `[delivery] backoff_builtin_rules = false`)
//! and the state of one path in backoff ([`Backoff`]), which is what `delivery::provider`
//! keeps per path, lists, cancels and saves across restarts.

use serde::{Deserialize, Serialize};

use crate::delivery::bounce_class::Code;

/// Most configured rules.
pub const RULES_MAX: usize = 1000;
/// Longest rule expression.
const TEXT_CHARS_MAX: usize = 1000;
/// Longest suspension a rule may ask for (a day).
pub const SUSPEND_SECS_MAX: u64 = 86_400;
/// A match within this long of the last cut of the same path cuts nothing more: one pipelined
/// transaction's replies are one signal, not many.
pub const CUT_INTERVAL_MICROS: u64 = 1_000_000;
/// Longest reply text kept in a backoff's state.
const REPLY_CHARS_MAX: usize = 300;

/// `[[backoff_rule]]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackoffRule {
    pub name: String,
    /// Providers (`[[provider]]` names, or destination domains of none) it applies to; empty =
    /// every destination.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Reply code (`421`) or class (`4xx`); empty = any failure (4xx or 5xx).
    #[serde(default)]
    pub code: String,
    /// Prefix of the enhanced status code (`4.7.28`); empty = any.
    #[serde(default)]
    pub enhanced: String,
    /// Case-insensitive regular expression on the reply text; empty = any.
    #[serde(default)]
    pub text: String,
    /// Open no connection and send nothing on the path for this long; 0 = no suspension.
    #[serde(default)]
    pub suspend_secs: u64,
    /// Each match multiplies the path's connections and message rate by this (0 < f <= 1).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// The lowest multiplier cuts reach (0 < floor <= 1).
    #[serde(default = "default_floor")]
    pub floor: f64,
    /// Every this long without a new match (and after any suspension), the multiplier is
    /// divided by `factor` again, up to 1: then the backoff ends.
    #[serde(default = "default_ramp_secs")]
    pub ramp_secs: u64,
}

fn default_factor() -> f64 {
    0.5
}
fn default_floor() -> f64 {
    0.1
}
fn default_ramp_secs() -> u64 {
    300
}

/// The shipped rules, from the large providers' published deferral replies (see
/// docs/deliverability.md for the source of each): (name, code, enhanced, text, suspend_secs,
/// factor, ramp_secs). Texts are lowercase and matched case-insensitively.
pub const BUILTIN_RULES: &[(&str, &str, &str, &str, u64, f64, u64)] = &[
    // Yahoo / AOL: "[TSS04] Messages from x temporarily deferred due to unexpected volume or
    // user complaints"; TS01/TS02/TSS05 the same family.
    ("yahoo-tss", "421", "", r"\[tss?0[1-5]\]", 900, 0.5, 600),
    // Gmail: "unusual rate of (unsolicited) email ... temporarily rate limited".
    ("gmail-rate", "421", "4.7.28", "", 600, 0.5, 600),
    // Microsoft (Outlook.com, Exchange Online): "temporarily rate limited due to IP reputation".
    ("microsoft-reputation", "4xx", "4.7.65", "", 300, 0.5, 600),
    // Microsoft: "Server busy. Please try again later" (AS761 and others).
    ("microsoft-busy", "4xx", "4.7.500", "", 0, 0.5, 300),
    // Outlook.com: RP-001 (hourly/daily limits), RP-002 (rate), RP-003 (connections).
    ("outlook-rp", "421", "", r"\brp-00[1-3]\b", 300, 0.5, 600),
    // Apple iCloud: "deferred due to excessive volume".
    (
        "icloud-volume",
        "421",
        "",
        r"deferred due to excessive volume",
        300,
        0.5,
        600,
    ),
    // Comcast: "Throttled - try again later ... RL0000xx".
    (
        "comcast-throttle",
        "421",
        "",
        r"\brl0000\d\d\b|throttled - try again later",
        0,
        0.5,
        600,
    ),
    // Generic connection limits (Postfix, Exim, Orange, many MX): fewer connections.
    (
        "too-many-connections",
        "4xx",
        "",
        concat!(
            r"too many (concurrent |open |simultaneous )?(smtp )?(connections|sessions)",
            r"|connection (rate )?limit"
        ),
        0,
        0.5,
        300,
    ),
    // Generic rate limits.
    (
        "rate-limited",
        "4xx",
        "",
        concat!(
            r"rate limit|slow down|too much mail|too many messages|sending too fast",
            r"|try again later\b.*\b(volume|rate)"
        ),
        0,
        0.5,
        300,
    ),
];

/// One rule, compiled.
#[derive(Debug)]
struct Compiled {
    rule: BackoffRule,
    code: Code,
    text: Option<regex::Regex>,
}

/// The ordered rules; the first whose parts all match a reply decides.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
}

impl Rules {
    /// `configured` rules (the error names the rule and the key), then the built-in ones if
    /// `builtin`.
    pub fn new(configured: &[BackoffRule], builtin: bool) -> Result<Rules, (String, String)> {
        if configured.len() > RULES_MAX {
            return Err(("backoff_rule".into(), format!("at most {RULES_MAX} rules")));
        }
        let shipped = BUILTIN_RULES.iter().filter(|_| builtin).map(
            |&(name, code, enhanced, text, suspend_secs, factor, ramp_secs)| BackoffRule {
                name: name.into(),
                providers: Vec::new(),
                code: code.into(),
                enhanced: enhanced.into(),
                text: text.into(),
                suspend_secs,
                factor,
                floor: default_floor(),
                ramp_secs,
            },
        );
        let mut names = std::collections::HashSet::new();
        let mut rules = Vec::new();
        for r in configured.iter().cloned().chain(shipped) {
            let bad = |key: &str, why: String| {
                Err((
                    format!("backoff_rule.{key}"),
                    format!("rule `{}`: {why}", r.name),
                ))
            };
            if !crate::names::is_name(&r.name) || !names.insert(r.name.clone()) {
                return bad(
                    "name",
                    "1 to 64 of A-Za-z0-9-_., unique (also among the built-in rules)".into(),
                );
            }
            let code = match Code::parse(&r.code) {
                Ok(c) => c,
                Err(e) => return bad("code", e),
            };
            if matches!(code, Code::Exact(c) if c < 400) || matches!(code, Code::Class(c) if c < 4)
            {
                return bad("code", "only 4xx and 5xx replies are failures".into());
            }
            if r.text.len() > TEXT_CHARS_MAX {
                return bad("text", format!("longer than {TEXT_CHARS_MAX}"));
            }
            if !(r.factor > 0.0 && r.factor <= 1.0) {
                return bad("factor", "0 < factor <= 1".into());
            }
            if !(r.floor > 0.0 && r.floor <= 1.0) {
                return bad("floor", "0 < floor <= 1".into());
            }
            if r.suspend_secs > SUSPEND_SECS_MAX {
                return bad("suspend_secs", format!("at most {SUSPEND_SECS_MAX}"));
            }
            if r.ramp_secs == 0 || r.ramp_secs > SUSPEND_SECS_MAX {
                return bad("ramp_secs", format!("1 to {SUSPEND_SECS_MAX}"));
            }
            if r.suspend_secs == 0 && r.factor >= 1.0 {
                return bad("factor", "the rule neither suspends nor cuts".into());
            }
            let text = if r.text.is_empty() {
                None
            } else {
                match regex::RegexBuilder::new(&r.text)
                    .case_insensitive(true)
                    .size_limit(4 << 20)
                    .build()
                {
                    Ok(re) => Some(re),
                    Err(e) => return bad("text", e.to_string()),
                }
            };
            rules.push(Compiled {
                rule: r,
                code,
                text,
            });
        }
        Ok(Rules { rules })
    }

    /// The first rule matching a failure reply to `provider` (its name; a destination of no
    /// provider is named by its domain).
    pub fn matching(
        &self,
        provider: &str,
        code: u16,
        enhanced: Option<&str>,
        text: &str,
    ) -> Option<&BackoffRule> {
        if code < 400 {
            return None;
        }
        let enhanced = enhanced.unwrap_or("");
        self.rules
            .iter()
            .find(|c| {
                let r = &c.rule;
                (r.providers.is_empty() || r.providers.iter().any(|p| p == provider))
                    && c.code.matches(code)
                    && enhanced.starts_with(r.enhanced.as_str())
                    && c.text.as_ref().is_none_or(|re| re.is_match(text))
            })
            .map(|c| &c.rule)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }
}

/// The backoff state of one path; saved as JSON in `<spool>/backoffs.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Backoff {
    /// The rule that matched last.
    pub rule: String,
    /// The reply that matched last (cut to 300 characters).
    pub reply: String,
    pub since_micros: u64,
    pub last_match_micros: u64,
    pub matches: u64,
    /// Nothing is sent before this time (0 = not suspended).
    pub suspended_until_micros: u64,
    /// The multiplier of the path's limits, in `[floor, 1]`.
    pub level: f64,
    pub factor: f64,
    pub floor: f64,
    pub ramp_secs: u64,
    /// The next step up (after any suspension).
    pub next_ramp_micros: u64,
    /// The connections and messages per minute the level multiplies: the path's configured
    /// limits, else what it had open and sent when first cut.
    pub base_connections: usize,
    pub base_per_minute: u64,
}

impl Backoff {
    /// A first match of `rule` on a path with `base_connections` and `base_per_minute`.
    pub fn start(
        rule: &BackoffRule,
        reply: &str,
        now: u64,
        base_connections: usize,
        base_per_minute: u64,
    ) -> Backoff {
        let mut b = Backoff {
            rule: rule.name.clone(),
            reply: String::new(),
            since_micros: now,
            last_match_micros: 0,
            matches: 0,
            suspended_until_micros: 0,
            level: 1.0,
            factor: rule.factor,
            floor: rule.floor,
            ramp_secs: rule.ramp_secs,
            next_ramp_micros: 0,
            base_connections: base_connections.max(1),
            base_per_minute: base_per_minute.max(1),
        };
        b.matched(rule, reply, now);
        b
    }

    /// Another match: suspends (or extends the suspension) and cuts the level, at most once
    /// per [`CUT_INTERVAL_MICROS`]. Returns whether anything changed beyond the counts.
    pub fn matched(&mut self, rule: &BackoffRule, reply: &str, now: u64) -> bool {
        self.matches += 1;
        self.rule = rule.name.clone();
        self.reply = reply.chars().take(REPLY_CHARS_MAX).collect();
        if self.last_match_micros > 0
            && now.saturating_sub(self.last_match_micros) < CUT_INTERVAL_MICROS
        {
            return false;
        }
        self.last_match_micros = now;
        self.factor = rule.factor;
        self.floor = rule.floor;
        self.ramp_secs = rule.ramp_secs;
        if rule.suspend_secs > 0 {
            let until = now + rule.suspend_secs * 1_000_000;
            self.suspended_until_micros = self.suspended_until_micros.max(until);
        }
        // Never up: a rule with a higher floor leaves a deeper cut as it is.
        self.level = (self.level * rule.factor)
            .max(rule.floor.min(self.level))
            .min(1.0);
        self.next_ramp_micros = self.suspended_until_micros.max(now) + self.ramp_secs * 1_000_000;
        true
    }

    /// Moves the state to `now`: the suspension ends, the level steps up once per `ramp_secs`
    /// without a match. Returns false when the backoff is over.
    pub fn refresh(&mut self, now: u64) -> bool {
        if self.suspended_until_micros > 0 && now >= self.suspended_until_micros {
            self.suspended_until_micros = 0;
        }
        let step = self.ramp_secs.max(1) * 1_000_000;
        while self.suspended_until_micros == 0 && self.level < 1.0 && now >= self.next_ramp_micros {
            self.level = if self.factor < 1.0 {
                (self.level / self.factor).min(1.0)
            } else {
                1.0
            };
            self.next_ramp_micros += step;
        }
        self.suspended_until_micros > 0 || self.level < 1.0
    }

    pub fn suspended(&self, now: u64) -> bool {
        now < self.suspended_until_micros
    }

    /// Connections allowed now (at least 1).
    pub fn connections_max(&self) -> usize {
        ((self.base_connections as f64 * self.level).floor() as usize).max(1)
    }

    /// Messages per minute allowed now (at least 1).
    pub fn per_minute(&self) -> u64 {
        ((self.base_per_minute as f64 * self.level).floor() as u64).max(1)
    }

    /// The rate limit that enforces [`Self::per_minute`]: per second when that is at least one
    /// a second (so it is spread evenly), else per minute.
    pub fn rate_limit(&self, now: u64) -> crate::delivery::throttle::RateLimit {
        let m = self.per_minute();
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if m >= 60 {
            crate::delivery::throttle::RateLimit::new(Some(clamp(m / 60)), None, None, now)
        } else {
            crate::delivery::throttle::RateLimit::new(None, Some(clamp(m)), None, now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn rule(name: &str, text: &str, suspend_secs: u64, factor: f64) -> BackoffRule {
        BackoffRule {
            name: name.into(),
            providers: vec![],
            code: "4xx".into(),
            enhanced: String::new(),
            text: text.into(),
            suspend_secs,
            factor,
            floor: 0.25,
            ramp_secs: 10,
        }
    }

    #[test]
    fn the_shipped_rules_match_the_providers_published_deferrals() {
        let rules = Rules::new(&[], true).unwrap();
        let name = |code, enhanced, text| {
            rules
                .matching("any", code, enhanced, text)
                .map(|r| r.name.as_str())
        };
        let yahoo = "421 4.7.0 [TSS04] Messages from 203.0.113.25 temporarily deferred due to \
                     unexpected volume or user complaints - 4.16.55.1";
        assert_eq!(name(421, Some("4.7.0"), yahoo), Some("yahoo-tss"));
        let gmail = "421 4.7.28 Gmail has detected an unusual rate of unsolicited email \
                     originating from your IP address. To protect our users from spam, email \
                     sent from your IP address has been temporarily rate limited.";
        assert_eq!(name(421, Some("4.7.28"), gmail), Some("gmail-rate"));
        let ms = "451 4.7.650 The mail server [203.0.113.25] has been temporarily rate limited \
                  due to IP reputation.";
        assert_eq!(name(451, Some("4.7.650"), ms), Some("microsoft-reputation"));
        assert_eq!(
            name(
                421,
                None,
                "421 RP-003 (SNT004-MC2F2) exceeded the connection limit allowed"
            ),
            Some("outlook-rp")
        );
        assert_eq!(
            name(
                421,
                Some("4.7.0"),
                "421 4.7.0 mx.example.org Error: too many connections from 203.0.113.25"
            ),
            Some("too-many-connections")
        );
        // Not a slow-down: no rule.
        assert_eq!(name(450, Some("4.2.1"), "450 4.2.1 mailbox busy"), None);
        assert_eq!(name(550, Some("5.1.1"), "550 5.1.1 no such user"), None);
        assert_eq!(
            name(250, None, "250 rate limit"),
            None,
            "successes never match"
        );
        assert!(
            Rules::new(&[], false)
                .unwrap()
                .matching("any", 421, Some("4.7.0"), yahoo)
                .is_none()
        );
    }

    #[test]
    fn configured_rules_come_first_and_may_name_providers() {
        let mut only_yahoo = rule("mine", r"\[TSS04\]", 60, 0.5);
        only_yahoo.providers = vec!["yahoo".into()];
        let rules = Rules::new(&[only_yahoo], true).unwrap();
        let text = "421 4.7.0 [TSS04] deferred";
        assert_eq!(
            rules
                .matching("yahoo", 421, Some("4.7.0"), text)
                .unwrap()
                .name,
            "mine"
        );
        assert_eq!(
            rules
                .matching("other", 421, Some("4.7.0"), text)
                .unwrap()
                .name,
            "yahoo-tss"
        );
    }

    #[test]
    fn bad_rules_are_named_with_their_key() {
        let key = |r: BackoffRule| Rules::new(&[r], true).map(|_| ()).map_err(|e| e.0);
        assert_eq!(key(rule("ok", "x", 1, 0.5)), Ok(()));
        assert_eq!(
            key(rule("yahoo-tss", "x", 1, 0.5)),
            Err("backoff_rule.name".into())
        );
        assert_eq!(key(rule("r", "(", 1, 0.5)), Err("backoff_rule.text".into()));
        assert_eq!(
            key(rule("r", "", 1, 0.0)),
            Err("backoff_rule.factor".into())
        );
        assert_eq!(
            key(rule("r", "", 0, 1.0)),
            Err("backoff_rule.factor".into())
        );
        assert_eq!(
            key(BackoffRule {
                code: "250".into(),
                ..rule("r", "", 1, 0.5)
            }),
            Err("backoff_rule.code".into())
        );
        assert_eq!(
            key(BackoffRule {
                ramp_secs: 0,
                ..rule("r", "", 1, 0.5)
            }),
            Err("backoff_rule.ramp_secs".into())
        );
    }

    #[test]
    fn a_path_is_suspended_cut_to_the_floor_and_ramped_back_while_clean() {
        let r = rule("r", "", 5, 0.5);
        let mut b = Backoff::start(&r, "421 slow down", 100 * S, 8, 600);
        assert!(b.suspended(100 * S) && b.suspended(104 * S) && !b.suspended(105 * S));
        assert_eq!(
            (b.level, b.connections_max(), b.per_minute()),
            (0.5, 4, 300)
        );
        // Replies of the same pipelined burst cut once.
        assert!(!b.matched(&r, "421 again", 100 * S + 10));
        assert_eq!(b.level, 0.5);
        assert!(b.matched(&r, "421 again", 102 * S));
        assert_eq!(b.level, 0.25, "the floor");
        assert!(b.matched(&r, "421 again", 104 * S));
        assert_eq!(b.level, 0.25, "never under the floor");
        let higher_floor = BackoffRule {
            floor: 0.5,
            ..r.clone()
        };
        let mut deep = b.clone();
        deep.matched(&higher_floor, "421", 106 * S);
        assert_eq!(deep.level, 0.25, "a cut never raises the limits");
        assert_eq!(b.connections_max(), 2);
        // Suspended until 109 s; a step every 10 s after that: 0.5 at 119 s, 1 (over) at 129 s.
        assert!(b.refresh(110 * S) && b.level == 0.25 && !b.suspended(110 * S));
        assert!(b.refresh(119 * S) && b.level == 0.5);
        assert!(!b.refresh(129 * S), "back to full: over");
        assert_eq!(b.level, 1.0);
    }

    #[test]
    fn the_rate_is_spread_per_second_or_per_minute() {
        let r = rule("r", "", 0, 0.5);
        let mut fast = Backoff::start(&r, "x", 0, 1, 12_000);
        let mut limit = fast.rate_limit(0);
        let sent = (0..1000).filter(|_| limit.try_take(0).is_ok()).count();
        assert_eq!(sent, 13, "100 per second, an eighth at once: {sent}");
        fast.level = 0.1;
        let slow = Backoff {
            base_per_minute: 100,
            ..fast
        };
        assert_eq!(slow.per_minute(), 10);
        let mut limit = slow.rate_limit(0);
        assert_eq!((0..100).filter(|_| limit.try_take(0).is_ok()).count(), 2);
    }
}
