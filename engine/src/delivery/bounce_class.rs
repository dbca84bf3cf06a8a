//! Bounce classification: which kind of failure a reply reports (bad mailbox, bad domain,
//! mailbox full, policy or spam block, content rejected, rate limited, routing, protocol,
//! other), so that the delivery log, the metrics and the DSN say it, and hard bounces can feed
//! the suppression list.
//!
//! [`Classifier`] holds ordered rules: `[[bounce_rule]]` entries first, then the built-in set
//! ([`BUILTIN_RULES`], written from the large providers' published replies). A rule matches on
//! the reply code (exact, or a class like `5xx`), a prefix of the enhanced status code, and a
//! case-insensitive regular expression on the text; the first rule whose parts all match
//! decides. The built-in expressions are lowercase ASCII and run as one `RegexSet` pass over
//! the lowercased text (configured ones, case-insensitive, one by one). A reply no rule
//! matches is classified by its enhanced code (RFC 3463 subject and detail), then `other`.
//!
//! Not here: what is done with the class (`delivery::engine`).

use serde::Deserialize;

/// What a failed or deferred reply means for the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceClass {
    /// The address does not exist or is disabled: a hard bounce to suppress.
    BadMailbox,
    /// The domain does not exist or takes no mail.
    BadDomain,
    MailboxFull,
    /// Reputation, spam, blocklists, authentication (SPF, DKIM, DMARC), sender policy.
    Policy,
    /// The content: malware, spam content, attachment, size, headers.
    Content,
    /// Too much too fast: volume, connections, throttling.
    RateLimited,
    /// Relaying refused, no route, MX problems, loops.
    Routing,
    /// Syntax, sequence, TLS required, an extension missing.
    Protocol,
    Other,
}

impl BounceClass {
    pub const ALL: [BounceClass; 9] = [
        BounceClass::BadMailbox,
        BounceClass::BadDomain,
        BounceClass::MailboxFull,
        BounceClass::Policy,
        BounceClass::Content,
        BounceClass::RateLimited,
        BounceClass::Routing,
        BounceClass::Protocol,
        BounceClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::BadMailbox => "bad_mailbox",
            BounceClass::BadDomain => "bad_domain",
            BounceClass::MailboxFull => "mailbox_full",
            BounceClass::Policy => "policy",
            BounceClass::Content => "content",
            BounceClass::RateLimited => "rate_limited",
            BounceClass::Routing => "routing",
            BounceClass::Protocol => "protocol",
            BounceClass::Other => "other",
        }
    }

    /// A permanent failure of this class means the address should not be mailed again.
    pub fn is_hard(self) -> bool {
        matches!(self, BounceClass::BadMailbox | BounceClass::BadDomain)
    }
}

/// `[[bounce_rule]]`: one classification rule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BounceRule {
    pub class: BounceClass,
    /// `550`, or `5xx` / `4xx`; empty = any.
    #[serde(default)]
    pub code: String,
    /// A prefix of the enhanced status code (`5.1.1`, `5.7.`); empty = any.
    #[serde(default)]
    pub enhanced: String,
    /// A regular expression searched in the reply text, case-insensitive; empty = any.
    #[serde(default)]
    pub text: String,
}

/// Longest rule expression (a bound on compile time and memory).
pub const RULE_TEXT_CHARS_MAX: usize = 1000;
/// Most configured rules.
pub const RULES_MAX: usize = 1000;

/// The built-in rules: (class, code, enhanced prefix, text expression). Order matters: the
/// first match decides, so provider-specific texts come first, then the classes whose words
/// other classes' replies also use (a rate limit "because SPF failed" is a policy matter, a
/// "policy" refusal that names an attachment is about content), then the broad ones.
/// `bounce_replies.tsv` holds the published replies they are checked against.
pub const BUILTIN_RULES: &[(BounceClass, &str, &str, &str)] = {
    use BounceClass::*;
    &[
        // Provider codes and phrasings whose class their words would hide.
        (Protocol, "", "", r"not using a tls connection"),
        (Policy, "", "", r"rate limited because"),
        (RateLimited, "", "", r"submission quota exceeded"),
        (
            MailboxFull,
            "",
            "",
            r"mailbox (is )?full|mailbox size|\b[45]\.2\.2\b",
        ),
        (
            Content,
            "",
            "",
            concat!(
                r"\bph0\d\b|\bofr_506\b|policy violation detected \(as345\)|",
                r"nature of the content|links within|rfc ?5322|message-id: header|",
                r"in the from: header|disallowed header|duplicate headers|encoded-word|",
                r"security policies|size exceeded|email size",
            ),
        ),
        // GMX and WEB.DE refuse misconfigured senders with a syntax error.
        (
            Policy,
            "550",
            "",
            r"^550 <[a-z0-9\\._%+@-]*>: syntax error in parameters",
        ),
        (Policy, "", "5.7.506", ""),
        (Policy, "4xx", "", r"antispam policy"),
        (
            Other,
            "",
            "",
            concat!(
                r"may not exist|too many errors|greylist|unverified address|",
                r"temporarily rejected this message",
            ),
        ),
        (
            BadDomain,
            "",
            "",
            r"no mail-enabled subscriptions|inbounds disabled",
        ),
        (
            Routing,
            "",
            "",
            r"relay(ing)? (access )?denied|unable to relay",
        ),
        // Microsoft (5.4.1, 5.7.504) and gateways (554 5.7.1) refuse unknown recipients so.
        (BadMailbox, "", "5.4.1", r"recipient address rejected"),
        (BadMailbox, "", "5.7.504", ""),
        (
            BadMailbox,
            "554",
            "5.7.1",
            r"recipient address rejected: access denied",
        ),
        (BadMailbox, "", "5.1.1", r"not our customer"),
        (RateLimited, "", "4.7.65", ""),
        (
            RateLimited,
            "",
            "",
            concat!(
                r"\b4\.7\.28\b|limit exceeded|exceeded the (rate|connection) limit|",
                r"\brp-00\d\b|per hour|per day|too many concurrent|too much mail from|",
                r"account service is temporarily unavailable|aup#cxcnct|\brl\d{6}\b|",
                r"\btss0[1-8]\b|4\.7\.650|\(as761\)|submission quota exceeded|",
                r"receiving (e-?mail|mail) (too quickly|at a rate)|too much (e-?mail|",
                r"mail) in a short|exceeded permitted limits|daily limit|per (session|",
                r"connection)|thread limit|concurrent (server )?connections|",
                r"too many (open )?connections|too many login attempts|",
                r"size per transaction exceeded",
            ),
        ),
        (
            BadMailbox,
            "",
            "",
            concat!(
                r"doesn't have an? [a-z\\.]{1,30} account|banned recipient|5\.7\.505|",
                r"as\(201806281\)|recipient account is ?blocked|archived recipient|",
                r"mailbox is frozen|is no longer valid|",
                r"not a valid rfc ?5321 address[ -~]{0,20}$|5\.1\.3",
            ),
        ),
        (
            Protocol,
            "",
            "",
            concat!(
                r"protocol violation|5\.7\.10\b|need (mail|rcpt|helo|ehlo)|",
                r"client not authenticated|authentication unsuccessful|5\.7\.57|",
                r"5\.1\.7\b|(requires|required|require) (tls|encryption|starttls)|",
                r"over a tls connection|not using a tls connection|",
                r"must issue a starttls|tls version|starttls is required|smtputf8|",
                r"eight ?bit data|8-?bit data|bare ?linefeed|smtplf|\bhelo\b|\behlo\b|",
                r"synchronization error|multiple destination domains per transaction|",
                r"syntax|command (not )?(recognized|implemented)|unrecognized command|",
                r"bad sequence|out of sequence|line too long|invalid command",
            ),
        ),
        // Sending-side reputation and authentication: policy, even in rate-limit words.
        (Policy, "5xx", "", r"unusual rate"),
        (
            Policy,
            "",
            "",
            concat!(
                r"reputation|\bptr\b|ptr record|reverse dns|rdns|forward dns|\bspf\b|",
                r"dkim|dmarc|authenticat|sender id|spoof|cannot find your hostname|",
                r"\btss09\b|permanently deferred|4\.16\.50|",
                r"unresolvable [ -~]{0,20}from domain|sender address rejected|",
                r"domain of sender|\b[45]\.1\.[78]\b|invalid recipients|",
                r"unknown recipients|policy restrictions|due to policy|blacklist|",
                r"blocklist|block list|black list|spamhaus|spamcop|barracuda|\brbl\b|",
                r"\bdnsbl\b|listed (at|on|in|by)|\(bl\)|dynamically[ -~]assigned|",
                r"dynamic ip|dy-00\d|administrative prohibition|aup#cx|sender verify|",
                r"blocked (using|by|from)|client blocked|traffic not accepted|\(as770\)",
            ),
        ),
        (
            MailboxFull,
            "",
            "",
            concat!(
                r"over ?quota|quota exceeded|exceeded (the |its |their )?(storage|",
                r"quota)|mailbox (is )?full|mailbox size|storage (space|limit|",
                r"allocation)|storage space|speichervolumen|disk quota|full mailbox|",
                r"inbox is full|mail ?box has exceeded|user is over|too many (messages|",
                r"mails) on the server|\b[45]\.2\.2\b",
            ),
        ),
        (
            RateLimited,
            "",
            "",
            concat!(
                r"unusual rate|rate limit|ratelimit|rate-limit|",
                r"temporarily (rate )?limited|too many (messages|recipients|emails|",
                r"sessions)|temporarily deferred|deferred due to|throttl|slow down|",
                r"unexpected volume|high (mail )?volume|too fast|message rate|",
                r"max(imum)? (number of )?messages",
            ),
        ),
        (
            BadDomain,
            "",
            "",
            concat!(
                r"domain (name )?(does not|doesn't|didn't) exist|",
                r"dns domain [ -~]{0,80}does not exist|no such domain|",
                r"nonexistent ?domain|non-existent domain|domain (not found|unknown|",
                r"is not valid|invalid)|unknown domain|host (or domain name )?not found|",
                r"domain (name )?not (found|registered)|does not accept (any )?mail|",
                r"accepts no mail|null mx|nullmx|\bno mx\b|single label domain|",
                r"unrouteable address|unroutable address|reserved by rfc ?2606|",
                r"inbounds disabled|no mail-enabled subscriptions|\b5\.1\.2\b|",
                r"domain [ -~]{0,40}(has no|without) (valid )?(mx|mail)",
            ),
        ),
        (Content, "5xx", "", r"antispam policy"),
        (
            Content,
            "",
            "",
            concat!(
                r"size exceeds|exceeds (the )?(maximum )?(message )?size|",
                r"message (is )?too (large|big)|message size|\b5\.3\.4\b|\b5\.2\.3\b|",
                r"virus|malware|infected|phishing|attachment|file (type|extension)|",
                r"x-msdownload|executable|banned:|message (content|body)|",
                r"content (rejected|filter|policy|judged)|judged to be spam|",
                r"spam content|looks like spam|detected as spam|considered (as )?spam|",
                r"identified as spam|flagged as spam|suspicion of spam|spam message|",
                r"unsolicited mail|likely unsolicited|rfc ?5322 section|valid from|",
                r"blank from|from: address|\bmime\b|\b5\.6\.\d|potential security issue|",
                r"dangerous content",
            ),
        ),
        (
            Routing,
            "",
            "",
            concat!(
                r"relay(ing)? (access )?(denied|not permitted|not allowed|prohibited)|",
                r"relay denied|not permitted to relay|unable to relay|open relay|",
                r"we do not relay|rcpthosts|not our customer|no route|unroutable|",
                r"mail loop|loop detected|too many hops|over ipv6|incorrect hostname|",
                r"connection refused|mx (record|lookup|problem)|misconfigured|",
                r"lookup (failed|error)|host unreachable|domain isn't in my list|",
                r"not local",
            ),
        ),
        (
            BadMailbox,
            "",
            "",
            concat!(
                r"(user|recipient|mailbox|address|account|",
                r"addressee)( name)? (is )?(unknown|not found|does not exist|",
                r"doesn't exist|not exist|invalid|unavailable|disabled|deactivated|",
                r"inactive|suspended|closed|not valid|not listed|no longer (active|",
                r"available|exists|valid))|(unknown|invalid|no such|nonexistent|",
                r"non-existent|inactive|disabled) (user|recipient|mailbox|address|",
                r"account|local part|addressee)|does not exist|doesn't exist|",
                r"not a valid (user|mailbox|recipient|address)|no mailbox|",
                r"mailbox not found|mailbox unavailable|user not found|",
                r"recipient not found|recipientnotfound|unknown or illegal alias|",
                r"no such person|account (has been )?(disabled|suspended|deleted|",
                r"expired)|\b5\.1\.1\b|\b5\.1\.10\b|\b5\.1\.6\b|\b5\.2\.1\b",
            ),
        ),
        (
            Other,
            "",
            "",
            concat!(
                r"try (again )?later|service (unavailable|refus)|",
                r"temporarily unavailable|internal resources|agent busy|server busy|",
                r"timeout|connection (expired|closed|was closed)|insufficient (system|",
                r"disk)|disk space|message expired",
            ),
        ),
        (
            Policy,
            "",
            "",
            concat!(
                r"banned|blocked|reputation|policy|not allowed|denied|",
                r"rejected for policy|complaint|spam|junk|abuse|prohibited|refused|",
                r"rejected|\bcs0\d\b|\bhm0\d\b|\bbl\d{6}\b|\bipts0\d\b|5\.7\.\d",
            ),
        ),
        (
            Protocol,
            "",
            "",
            concat!(
                r"starttls|\btls\b|encryption|pipelining|chunking|bdat|protocol|",
                r"parameter|command rejected|\b5\.5\.\d\b|\b5\.3\.3\b",
            ),
        ),
    ]
};

struct Compiled {
    class: BounceClass,
    code: Code,
    enhanced: String,
    /// None when the rule has no text part.
    text: Option<regex::Regex>,
    /// A built-in rule: lowercase and ASCII, matched case-sensitively against the lowercased
    /// text (which lets the regex engine search for its literals directly).
    lower: bool,
}

/// The reply-code part of a rule: any, exact (`550`) or a class (`5xx`).
#[derive(Clone, Copy, Debug)]
pub enum Code {
    Any,
    Exact(u16),
    Class(u16),
}

impl Code {
    pub fn parse(s: &str) -> Result<Code, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Code::Any);
        }
        if let Some(c) = s.strip_suffix("xx").and_then(|d| d.parse::<u16>().ok()) {
            if (2..=5).contains(&c) {
                return Ok(Code::Class(c));
            }
        }
        match s.parse::<u16>() {
            Ok(c) if (200..=599).contains(&c) => Ok(Code::Exact(c)),
            _ => Err(format!("`{s}`: a reply code (550) or class (5xx)")),
        }
    }

    pub fn matches(self, code: u16) -> bool {
        match self {
            Code::Any => true,
            Code::Exact(c) => c == code,
            Code::Class(c) => code / 100 == c,
        }
    }
}

/// The ordered rules, compiled.
pub struct Classifier {
    rules: Vec<Compiled>,
    /// The built-in rules' expressions, run in one pass over the lowercased text; index `k`
    /// is rule `builtin_from + k`'s.
    set: regex::RegexSet,
    builtin_from: usize,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Classifier({} rules)", self.rules.len())
    }
}

impl Classifier {
    /// `configured` rules (checked: the error names the rule and what is wrong), then the
    /// built-in ones.
    pub fn new(configured: &[BounceRule]) -> Result<Classifier, String> {
        if configured.len() > RULES_MAX {
            return Err(format!("at most {RULES_MAX} rules"));
        }
        // The built-in expressions are lowercase ASCII: matched without Unicode classes
        // (`(?-u)`) against the lowercased text.
        let builtin = BUILTIN_RULES
            .iter()
            .map(|(class, code, enhanced, text)| BounceRule {
                class: *class,
                code: code.to_string(),
                enhanced: enhanced.to_string(),
                text: text.to_string(),
            });
        let configured_rules = configured.len();
        let mut rules = Vec::new();
        for (i, r) in configured.iter().cloned().chain(builtin).enumerate() {
            let which = || format!("rule {}", i + 1);
            let code = Code::parse(&r.code).map_err(|e| format!("{}: code {e}", which()))?;
            if r.text.len() > RULE_TEXT_CHARS_MAX {
                return Err(format!(
                    "{}: text longer than {RULE_TEXT_CHARS_MAX}",
                    which()
                ));
            }
            let text = if r.text.is_empty() {
                None
            } else {
                let pattern = if i < configured_rules {
                    format!("(?i){}", r.text)
                } else {
                    format!("(?-u:{})", r.text)
                };
                let re = regex::RegexBuilder::new(&pattern)
                    .size_limit(16 << 20)
                    .dfa_size_limit(16 << 20)
                    .build()
                    .map_err(|e| format!("{}: text: {e}", which()))?;
                Some(re)
            };
            rules.push(Compiled {
                class: r.class,
                code,
                enhanced: r.enhanced,
                text,
                lower: i >= configured_rules,
            });
        }
        let patterns: Vec<String> = rules[configured_rules..]
            .iter()
            .map(|r| {
                r.text
                    .as_ref()
                    .map_or(String::from("^$^"), |re| re.as_str().to_string())
            })
            .collect();
        let set = regex::RegexSetBuilder::new(&patterns)
            .size_limit(64 << 20)
            .dfa_size_limit(64 << 20)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Classifier {
            rules,
            set,
            builtin_from: configured_rules,
        })
    }

    /// The class of a reply: `code`, its enhanced status code if any, and its text.
    pub fn classify(&self, code: u16, enhanced: Option<&str>, text: &str) -> BounceClass {
        let enhanced = enhanced.unwrap_or("");
        let lower = text.to_ascii_lowercase();
        let matched = self.set.matches(&lower);
        for (i, r) in self.rules.iter().enumerate() {
            let text_matches = match &r.text {
                None => true,
                Some(_) if r.lower => matched.matched(i - self.builtin_from),
                Some(re) => re.is_match(text),
            };
            if r.code.matches(code) && enhanced.starts_with(r.enhanced.as_str()) && text_matches {
                return r.class;
            }
        }
        by_enhanced_code(enhanced)
    }
}

/// The published replies the built-in rules are checked against (code, enhanced, text, class).
pub const PUBLISHED_REPLIES: &str = include_str!("bounce_replies.tsv");

/// `saida deliverability-bench`: classifies every published reply once untimed (the lazy DFA
/// builds its states), then `rounds` times, one by one, timing each; returns (replies, p50 ns,
/// p99 ns, max ns).
pub fn bench(rounds: usize) -> Result<(usize, u64, u64, u64), String> {
    let c = Classifier::new(&[])?;
    let rows: Vec<(u16, Option<String>, String)> = PUBLISHED_REPLIES
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let code: u16 = cols.first()?.parse().ok()?;
            let enhanced = cols.get(1).filter(|e| **e != "-").map(|e| e.to_string());
            let text = format!("{code} {}", cols.get(2)?);
            Some((code, enhanced, text))
        })
        .collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)
        .map_err(|e| e.to_string())?;
    // The lazy DFA builds its states on first use: one untimed pass, as a running daemon has.
    for (code, enhanced, text) in &rows {
        std::hint::black_box(c.classify(*code, enhanced.as_deref(), text));
    }
    for _ in 0..rounds.max(1) {
        for (code, enhanced, text) in &rows {
            let t = std::time::Instant::now();
            std::hint::black_box(c.classify(*code, enhanced.as_deref(), text));
            let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
        }
    }
    Ok((
        rows.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max(),
    ))
}

/// RFC 3463: the subject and detail of an enhanced status code.
fn by_enhanced_code(enhanced: &str) -> BounceClass {
    let mut parts = enhanced.splitn(3, '.').skip(1);
    let (subject, detail) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (subject, detail) {
        ("1", "1" | "6" | "10") | ("2", "1") => BounceClass::BadMailbox,
        ("1", "2") => BounceClass::BadDomain,
        ("2", "2") => BounceClass::MailboxFull,
        ("3", "4") | ("6", _) => BounceClass::Content,
        ("4", _) => BounceClass::Routing,
        ("5", _) => BounceClass::Protocol,
        ("7", _) => BounceClass::Policy,
        _ => BounceClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_rules_come_first_and_bad_ones_are_named() {
        let mine = BounceRule {
            class: BounceClass::Routing,
            code: "5xx".into(),
            enhanced: "5.1.1".into(),
            text: "special".into(),
        };
        let c = Classifier::new(std::slice::from_ref(&mine)).unwrap();
        let t = "550 5.1.1 special no such user";
        assert_eq!(c.classify(550, Some("5.1.1"), t), BounceClass::Routing);
        let builtin = Classifier::new(&[]).unwrap();
        assert_eq!(
            builtin.classify(550, Some("5.1.1"), t),
            BounceClass::BadMailbox
        );
        let bad = BounceRule {
            text: "(unclosed".into(),
            ..mine.clone()
        };
        assert!(
            Classifier::new(&[bad])
                .unwrap_err()
                .starts_with("rule 1: text")
        );
        let bad = BounceRule {
            code: "6xx".into(),
            ..mine
        };
        assert!(
            Classifier::new(&[bad])
                .unwrap_err()
                .starts_with("rule 1: code")
        );
    }

    #[test]
    fn unmatched_replies_fall_back_to_the_enhanced_code() {
        let c = Classifier::new(&[]).unwrap();
        assert_eq!(
            c.classify(550, Some("5.1.1"), "550 5.1.1 x"),
            BounceClass::BadMailbox
        );
        assert_eq!(
            c.classify(451, Some("4.3.0"), "451 4.3.0 x"),
            BounceClass::Other
        );
        assert_eq!(c.classify(451, None, "451 x"), BounceClass::Other);
    }

    /// Real replies of mailbox providers and common MTAs (bounce_replies.tsv, with the
    /// documents they come from), each with the class it must get.
    #[test]
    fn published_provider_replies_get_their_class() {
        let c = Classifier::new(&[]).unwrap();
        let table = PUBLISHED_REPLIES;
        let mut wrong = Vec::new();
        let mut rows = 0;
        for line in table.lines() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 4, "bad row: {line}");
            let code: u16 = cols[0].parse().unwrap();
            let enhanced = (cols[1] != "-").then_some(cols[1]);
            let full = format!(
                "{} {}{}",
                cols[0],
                enhanced.map_or(String::new(), |e| format!("{e} ")),
                cols[2]
            );
            let want = BounceClass::ALL
                .into_iter()
                .find(|k| k.as_str() == cols[3])
                .unwrap_or_else(|| panic!("unknown class in: {line}"));
            let got = c.classify(code, enhanced, &full);
            if got != want {
                wrong.push(format!("{} (want {}): {full}", got.as_str(), want.as_str()));
            }
            rows += 1;
        }
        assert!(rows >= 200, "only {rows} replies in the table");
        assert!(
            wrong.is_empty(),
            "{} of {rows} misclassified:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
}
