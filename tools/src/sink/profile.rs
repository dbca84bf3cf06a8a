//! The sink's behaviour profile (`--profile FILE`, TOML): how it answers, per listening address
//! and per recipient domain, so that a load test can face what real mailbox providers do.
//!
//! ```toml
//! [default]                          # every listener
//! rcpt_reply_mix = [{ percent = 2.0, reply = "421 4.7.0 try again later" },
//!                   { percent = 1.0, reply = "550 5.1.1 no such user" }]
//! message_reply_mix = [{ percent = 0.5, reply = "451 4.3.0 temporary failure" }]
//! greylist = false                   # first attempt of each (sender, recipient): 451 4.7.1
//! banner_delay_ms = { dist = "fixed", value = 0 }
//! rcpt_delay_ms = { dist = "uniform", min = 0, max = 5 }
//! eod_delay_ms = { dist = "lognormal", median = 20, sigma = 0.5 }
//! connections_max = 0                # 0 = no cap; beyond: 421 4.7.0 too many connections
//! rate_per_second = 0                # messages per second per listener; beyond: 451 4.7.1
//! disconnect_percent = 0.0           # close without a reply at the end of data
//! pipelining = true
//! chunking = true
//! smtputf8 = true
//! starttls = true                    # offered only with --tls
//!
//! [listener."127.0.0.3:2600"]        # any key above, for one listening address
//! connections_max = 5
//!
//! [domain."slow.test"]               # per recipient domain: the reply mixes, greylist, delays
//! eod_delay_ms = { dist = "fixed", value = 200 }
//!
//! [peer."127.0.0.2"]                 # per client address (every listener): what a domain may
//! defer_after_messages = 100         # set, and a deferral: after this many messages accepted
//! defer_reply = "421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred"
//! defer_for_ms = 3000                # from the peer, MAIL gets `defer_reply` for this long
//!                                    # (a 421 also closes the connection), once
//! [listener."127.0.0.3:2600".peer."127.0.0.2"]   # the same, for one listener only
//! defer_after_messages = 50
//! ```
//!
//! Reply mixes are rolled independently per recipient (RCPT) and per message (end of data).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

/// A latency distribution, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Delay {
    #[default]
    None,
    Fixed {
        value: f64,
    },
    Uniform {
        min: f64,
        max: f64,
    },
    /// `median * exp(sigma * N(0, 1))`.
    Lognormal {
        median: f64,
        sigma: f64,
    },
}

/// Longest delay a profile may ask for, so that a typo cannot park connections for hours.
pub const DELAY_MS_MAX: f64 = 600_000.0;

impl Delay {
    /// A sample in milliseconds from two uniform numbers in [0, 1).
    pub fn sample(&self, u1: f64, u2: f64) -> f64 {
        let v = match *self {
            Delay::None => 0.0,
            Delay::Fixed { value } => value,
            Delay::Uniform { min, max } => min + (max - min) * u1,
            Delay::Lognormal { median, sigma } => {
                // Box-Muller: a standard normal from two uniforms.
                let n = (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                median * (sigma * n).exp()
            }
        };
        v.clamp(0.0, DELAY_MS_MAX)
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        let ok = match *self {
            Delay::None => true,
            Delay::Fixed { value } => (0.0..=DELAY_MS_MAX).contains(&value),
            Delay::Uniform { min, max } => 0.0 <= min && min <= max && max <= DELAY_MS_MAX,
            Delay::Lognormal { median, sigma } => {
                (0.0..=DELAY_MS_MAX).contains(&median) && (0.0..=5.0).contains(&sigma)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{key}: values must be within 0 ..= {DELAY_MS_MAX} ms"
            ))
        }
    }
}

/// One entry of a reply mix.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub percent: f64,
    /// `CODE ENHANCED text`, e.g. `550 5.1.1 no such user`.
    pub reply: String,
}

/// Every key, optional, as written in a table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partial {
    pub rcpt_reply_mix: Option<Vec<Weighted>>,
    pub message_reply_mix: Option<Vec<Weighted>>,
    pub greylist: Option<bool>,
    pub banner_delay_ms: Option<Delay>,
    pub rcpt_delay_ms: Option<Delay>,
    pub eod_delay_ms: Option<Delay>,
    pub connections_max: Option<usize>,
    pub rate_per_second: Option<u64>,
    pub disconnect_percent: Option<f64>,
    pub pipelining: Option<bool>,
    pub chunking: Option<bool>,
    pub smtputf8: Option<bool>,
    pub starttls: Option<bool>,
    /// Per client address (listener and default tables only).
    pub peer: Option<HashMap<String, Partial>>,
    /// Peer tables only: the deferral.
    pub defer_after_messages: Option<u64>,
    pub defer_reply: Option<String>,
    pub defer_for_ms: Option<u64>,
}

/// The effective behaviour of a listener, or of a recipient domain on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Behaviour {
    pub rcpt_reply_mix: Vec<Weighted>,
    pub message_reply_mix: Vec<Weighted>,
    pub greylist: bool,
    pub banner_delay_ms: Delay,
    pub rcpt_delay_ms: Delay,
    pub eod_delay_ms: Delay,
    pub connections_max: usize,
    pub rate_per_second: u64,
    pub disconnect_percent: f64,
    pub pipelining: bool,
    pub chunking: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// 0 = no deferral.
    pub defer_after_messages: u64,
    pub defer_reply: String,
    pub defer_for_ms: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            rcpt_reply_mix: Vec::new(),
            message_reply_mix: Vec::new(),
            greylist: false,
            banner_delay_ms: Delay::None,
            rcpt_delay_ms: Delay::None,
            eod_delay_ms: Delay::None,
            connections_max: 0,
            rate_per_second: 0,
            disconnect_percent: 0.0,
            pipelining: true,
            chunking: true,
            smtputf8: true,
            starttls: true,
            defer_after_messages: 0,
            defer_reply: "421 4.7.0 [TSS04] Messages temporarily deferred due to unexpected \
                          volume or user complaints"
                .into(),
            defer_for_ms: 1000,
        }
    }
}

impl Behaviour {
    fn merged(&self, p: &Partial) -> Behaviour {
        let mut b = self.clone();
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = &p.$f { b.$f = v.clone(); } )* };
        }
        take!(
            rcpt_reply_mix,
            message_reply_mix,
            greylist,
            banner_delay_ms,
            rcpt_delay_ms,
            eod_delay_ms,
            connections_max,
            rate_per_second,
            disconnect_percent,
            pipelining,
            chunking,
            smtputf8,
            starttls,
            defer_after_messages,
            defer_reply,
            defer_for_ms
        );
        b
    }

    /// Picks a reply from a mix with a uniform number in [0, 100); `None` = the normal reply.
    pub fn roll(mix: &[Weighted], u: f64) -> Option<&str> {
        let mut acc = 0.0;
        for w in mix {
            acc += w.percent;
            if u < acc {
                return Some(&w.reply);
            }
        }
        None
    }
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    default: Partial,
    #[serde(default)]
    listener: HashMap<String, Partial>,
    #[serde(default)]
    domain: HashMap<String, Partial>,
    #[serde(default)]
    peer: HashMap<String, Partial>,
}

/// A compiled profile.
#[derive(Debug, Default)]
pub struct Profile {
    default: Behaviour,
    listeners: HashMap<SocketAddr, Behaviour>,
    /// Per (lower-case) recipient domain, applied over the listener's behaviour.
    domains: HashMap<String, Partial>,
    /// Per (listener or every listener, client address): the peer's behaviour.
    peers: HashMap<(Option<SocketAddr>, IpAddr), Behaviour>,
}

impl Profile {
    pub fn parse(text: &str) -> Result<Profile, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut f = f;
        if f.default.peer.is_some() || has_defer(&f.default) {
            return Err("default: peer tables are [peer.\"IP\"]; defer_* keys go in them".into());
        }
        let default = Behaviour::default().merged(&f.default);
        validate(&default, "default")?;
        let mut peers = HashMap::new();
        let mut every = Vec::new();
        for (ip, p) in std::mem::take(&mut f.peer) {
            let table = format!("peer.\"{ip}\"");
            let addr = peer_ip(&ip, &table)?;
            peers.insert((None, addr), peer_behaviour(&default, &p, &table)?);
            every.push((addr, p, table));
        }
        let mut listeners = HashMap::new();
        for (addr, p) in &mut f.listener {
            let a: SocketAddr = addr
                .parse()
                .map_err(|_| format!("listener.\"{addr}\": not ip:port"))?;
            if has_defer(p) {
                return Err(format!(
                    "listener.\"{addr}\": defer_* keys go in peer tables"
                ));
            }
            let own_peers = p.peer.take().unwrap_or_default();
            let b = default.merged(p);
            validate(&b, &format!("listener.\"{addr}\""))?;
            for (ip, pp) in own_peers {
                let table = format!("listener.\"{addr}\".peer.\"{ip}\"");
                peers.insert(
                    (Some(a), peer_ip(&ip, &table)?),
                    peer_behaviour(&b, &pp, &table)?,
                );
            }
            // Peer tables for every listener apply over this listener's table too.
            for (ip, pp, table) in &every {
                if let std::collections::hash_map::Entry::Vacant(e) = peers.entry((Some(a), *ip)) {
                    e.insert(peer_behaviour(&b, pp, table)?);
                }
            }
            listeners.insert(a, b);
        }
        let mut domains = HashMap::new();
        for (d, p) in f.domain {
            if p.peer.is_some() || has_defer(&p) {
                return Err(format!(
                    "domain.\"{d}\": no peer tables or defer_* keys here"
                ));
            }
            if p.connections_max.is_some()
                || p.rate_per_second.is_some()
                || p.banner_delay_ms.is_some()
                || p.pipelining.is_some()
                || p.chunking.is_some()
                || p.smtputf8.is_some()
                || p.starttls.is_some()
            {
                return Err(format!(
                    "domain.\"{d}\": only reply mixes, greylist, rcpt/eod delays and \
                     disconnect_percent apply per domain"
                ));
            }
            validate(&default.merged(&p), &format!("domain.\"{d}\""))?;
            domains.insert(d.to_ascii_lowercase(), p);
        }
        Ok(Profile {
            default,
            listeners,
            domains,
            peers,
        })
    }

    /// Sets the default end-of-data delay (the `--delay-eod-ms` shortcut).
    pub fn set_default_eod(&mut self, d: Delay) {
        self.default.eod_delay_ms = d;
        for b in self.listeners.values_mut() {
            b.eod_delay_ms = d;
        }
    }

    /// The behaviour of a listener.
    pub fn listener(&self, addr: Option<SocketAddr>) -> &Behaviour {
        addr.and_then(|a| self.listeners.get(&a))
            .unwrap_or(&self.default)
    }

    /// The behaviour for a client on a listener, if a peer table names it: the listener's own
    /// peer table, else the one for every listener (over the listener's table, if any).
    pub fn for_peer(&self, listener: Option<SocketAddr>, peer: IpAddr) -> Option<&Behaviour> {
        listener
            .and_then(|l| self.peers.get(&(Some(l), peer)))
            .or_else(|| {
                let own_table = listener.is_some_and(|l| self.listeners.contains_key(&l));
                (!own_table)
                    .then(|| self.peers.get(&(None, peer)))
                    .flatten()
            })
    }

    /// The client addresses of every peer table.
    pub fn peer_ips(&self) -> std::collections::HashSet<IpAddr> {
        self.peers.keys().map(|(_, ip)| *ip).collect()
    }

    /// The behaviour for a recipient domain on a listener.
    pub fn for_domain(&self, base: &Behaviour, domain: &str) -> Option<Behaviour> {
        self.domains
            .get(&domain.to_ascii_lowercase())
            .map(|p| base.merged(p))
    }
}

fn has_defer(p: &Partial) -> bool {
    p.defer_after_messages.is_some() || p.defer_reply.is_some() || p.defer_for_ms.is_some()
}

fn peer_ip(ip: &str, table: &str) -> Result<IpAddr, String> {
    ip.parse()
        .map_err(|_| format!("{table}: not an IP address"))
}

/// A peer table over `base`: the keys a domain may set, and the deferral.
fn peer_behaviour(base: &Behaviour, p: &Partial, table: &str) -> Result<Behaviour, String> {
    if p.peer.is_some() || p.connections_max.is_some() || p.rate_per_second.is_some() {
        return Err(format!(
            "{table}: connections_max, rate_per_second and peer tables are per listener"
        ));
    }
    let b = base.merged(p);
    validate(&b, table)?;
    if b.defer_after_messages > 0 {
        let code: Option<u16> = b.defer_reply.get(..3).and_then(|c| c.parse().ok());
        if !code.is_some_and(|c| (400..600).contains(&c)) || b.defer_reply.contains(['\r', '\n']) {
            return Err(format!("{table}.defer_reply: not a 4xx or 5xx SMTP reply"));
        }
        if b.defer_for_ms > DELAY_MS_MAX as u64 {
            return Err(format!("{table}.defer_for_ms: at most {DELAY_MS_MAX} ms"));
        }
    }
    Ok(b)
}

fn validate(b: &Behaviour, table: &str) -> Result<(), String> {
    for (key, mix) in [
        ("rcpt_reply_mix", &b.rcpt_reply_mix),
        ("message_reply_mix", &b.message_reply_mix),
    ] {
        let total: f64 = mix.iter().map(|w| w.percent).sum();
        if mix.iter().any(|w| w.percent < 0.0) || total > 100.0 {
            return Err(format!(
                "{table}.{key}: percentages must be >= 0 and sum to <= 100"
            ));
        }
        for w in mix {
            let code: Option<u16> = w.reply.get(..3).and_then(|c| c.parse().ok());
            if !code.is_some_and(|c| (200..600).contains(&c)) || w.reply.contains(['\r', '\n']) {
                return Err(format!("{table}.{key}: `{}` is not an SMTP reply", w.reply));
            }
        }
    }
    b.banner_delay_ms
        .validate(&format!("{table}.banner_delay_ms"))?;
    b.rcpt_delay_ms
        .validate(&format!("{table}.rcpt_delay_ms"))?;
    b.eod_delay_ms.validate(&format!("{table}.eod_delay_ms"))?;
    if !(0.0..=100.0).contains(&b.disconnect_percent) {
        return Err(format!("{table}.disconnect_percent: 0 ..= 100"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_default_listener_domain() {
        let p = Profile::parse(
            r#"
            [default]
            eod_delay_ms = { dist = "fixed", value = 5 }
            chunking = false
            [listener."127.0.0.3:25"]
            connections_max = 2
            [domain."Slow.test"]
            eod_delay_ms = { dist = "fixed", value = 200 }
            rcpt_reply_mix = [{ percent = 100, reply = "550 5.1.1 gone" }]
            "#,
        )
        .unwrap();
        let l = p.listener(Some("127.0.0.3:25".parse().unwrap()));
        assert_eq!((l.connections_max, l.chunking), (2, false));
        assert_eq!(p.listener(None).connections_max, 0);
        let d = p.for_domain(l, "slow.TEST").unwrap();
        assert_eq!(d.eod_delay_ms, Delay::Fixed { value: 200.0 });
        assert_eq!(d.connections_max, 2);
        assert_eq!(
            Behaviour::roll(&d.rcpt_reply_mix, 99.9),
            Some("550 5.1.1 gone")
        );
        assert!(p.for_domain(l, "other.test").is_none());
    }

    #[test]
    fn peer_tables_apply_per_client_address_and_listener() {
        let p = Profile::parse(
            r#"
            [listener."127.0.0.9:25"]
            chunking = false
            [listener."127.0.0.9:25".peer."127.0.0.2"]
            defer_after_messages = 5
            defer_for_ms = 2000
            [peer."127.0.0.3"]
            rcpt_reply_mix = [{ percent = 100, reply = "451 4.7.1 later" }]
            "#,
        )
        .unwrap();
        let l9 = Some("127.0.0.9:25".parse().unwrap());
        let l10 = Some("127.0.0.10:25".parse().unwrap());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let on9 = p.for_peer(l9, a).unwrap();
        assert_eq!(
            (on9.defer_after_messages, on9.defer_for_ms, on9.chunking),
            (5, 2000, false)
        );
        assert!(on9.defer_reply.starts_with("421 4.7.0 [TSS04]"));
        assert!(p.for_peer(l10, a).is_none(), "that listener only");
        let b9 = p.for_peer(l9, b).unwrap();
        assert_eq!(
            (b9.rcpt_reply_mix.len(), b9.chunking),
            (1, false),
            "over the listener's"
        );
        assert_eq!(p.for_peer(l10, b).unwrap().rcpt_reply_mix.len(), 1);
        assert_eq!(p.peer_ips().len(), 2);
        for bad in [
            "[default]\ndefer_after_messages = 1\n",
            "[peer.\"x\"]\ndefer_after_messages = 1\n",
            "[peer.\"127.0.0.2\"]\nconnections_max = 1\n",
            "[peer.\"127.0.0.2\"]\ndefer_after_messages = 1\ndefer_reply = \"250 ok\"\n",
            "[domain.\"d.test\"]\ndefer_for_ms = 1\n",
        ] {
            assert!(Profile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mixes_roll_by_percentage() {
        let mix = vec![
            Weighted {
                percent: 2.0,
                reply: "421 4.7.0 later".into(),
            },
            Weighted {
                percent: 1.0,
                reply: "550 5.1.1 no".into(),
            },
        ];
        assert_eq!(Behaviour::roll(&mix, 1.5), Some("421 4.7.0 later"));
        assert_eq!(Behaviour::roll(&mix, 2.5), Some("550 5.1.1 no"));
        assert_eq!(Behaviour::roll(&mix, 3.5), None);
    }

    #[test]
    fn delays_follow_their_distribution() {
        assert_eq!(Delay::Fixed { value: 7.0 }.sample(0.3, 0.9), 7.0);
        assert_eq!(
            Delay::Uniform {
                min: 10.0,
                max: 20.0
            }
            .sample(0.5, 0.0),
            15.0
        );
        let ln = Delay::Lognormal {
            median: 20.0,
            sigma: 0.5,
        };
        // u2 = 0.25 makes cos(2πu2) = 0: the median itself.
        assert!((ln.sample(0.5, 0.25) - 20.0).abs() < 1e-9);
        assert!(ln.sample(0.99, 0.0) > 20.0);
    }

    #[test]
    fn bad_profiles_name_the_table_and_key() {
        let e =
            Profile::parse("[default]\nrcpt_reply_mix = [{ percent = 150, reply = \"550 x\" }]")
                .unwrap_err();
        assert!(e.contains("default.rcpt_reply_mix"), "{e}");
        let e = Profile::parse("[domain.\"a.test\"]\nconnections_max = 3").unwrap_err();
        assert!(e.contains("domain.\"a.test\""), "{e}");
        let e = Profile::parse("[default]\nbogus = 1").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e =
            Profile::parse("[default]\nmessage_reply_mix = [{ percent = 1, reply = \"hello\" }]")
                .unwrap_err();
        assert!(e.contains("not an SMTP reply"), "{e}");
    }
}
