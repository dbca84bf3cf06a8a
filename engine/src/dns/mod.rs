//! MX resolution for delivery (RFC 5321 §5.1, RFC 7505) with `hickory-resolver`, and a
//! per-shard cache of the results that honours TTLs and has a bound on entries.
//!
//! [`MxResolver::resolve`] turns a recipient domain into one of:
//! - the mail hosts to try, by MX preference, equal preferences in random order, each with its
//!   addresses (hosts without an address are skipped);
//! - implicit MX: no MX records but A/AAAA for the domain itself → that host, preference 0;
//! - null MX (a single MX of preference 0 pointing at `.`): the domain accepts no mail
//!   (permanent failure);
//! - NXDOMAIN, or neither MX nor address records: permanent failure;
//! - SERVFAIL, timeouts, MX hosts without any address: [`DnsError`], a deferral.
//!
//! Not here: routes that override MX (delivery configuration), connecting (the client).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// Default bound on cached domains per shard.
pub const CACHE_ENTRIES_MAX_DEFAULT: usize = 100_000;
/// How long "no such domain" and "null MX" are remembered when the answer has no TTL to go by.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// How long an answer is kept when some MX host's address lookup failed (so it is retried soon).
pub const PARTIAL_TTL: Duration = Duration::from_secs(60);
/// MX hosts looked up per domain (the best-preference ones).
pub const MX_HOSTS_MAX: usize = 10;

/// One mail host to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
}

/// Where mail for a domain goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Hosts in the order to try them.
    Hosts(Vec<MxHost>),
    /// RFC 7505: the domain accepts no mail.
    NullMx,
    /// NXDOMAIN, or no MX and no address records.
    NoSuchDomain,
}

/// A temporary DNS failure (SERVFAIL, timeout, unreachable server, MX without addresses).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DNS lookup for {domain} failed temporarily: {reason}")]
pub struct DnsError {
    pub domain: String,
    pub reason: String,
}

/// Resolver settings.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// Name servers (`ip:port`); empty = the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: usize,
    pub cache_entries_max: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            cache_entries_max: CACHE_ENTRIES_MAX_DEFAULT,
        }
    }
}

/// A shard's MX resolver and result cache.
pub struct MxResolver {
    resolver: TokioResolver,
    /// Shard-local; never borrowed across an await, so concurrent lookups on one shard are fine.
    cache: RefCell<HashMap<String, (Instant, Resolution)>>,
    cache_entries_max: usize,
    rng: Cell<u64>,
}

impl MxResolver {
    /// Builds a resolver (inside a tokio runtime).
    pub fn new(settings: &DnsSettings) -> Result<MxResolver, String> {
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("system resolver configuration: {e}"))?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|sa| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = sa.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = sa.port();
                    NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = settings.attempts;
        opts.ndots = 0; // recipient domains are always absolute
        let resolver = builder.build().map_err(|e| format!("resolver: {e}"))?;
        Ok(MxResolver {
            resolver,
            cache: RefCell::new(HashMap::new()),
            cache_entries_max: settings.cache_entries_max.max(1),
            rng: Cell::new(spool::now_micros() | 1),
        })
    }

    /// Number of cached domains.
    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }

    /// Where mail for `domain` goes. Cached results are returned until their TTL runs out.
    pub async fn resolve(&self, domain: &str) -> Result<Resolution, DnsError> {
        let key = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cache.borrow().get(&key).cloned();
        if let Some((expires, mut r)) = cached {
            if Instant::now() < expires {
                self.shuffle(&mut r);
                return Ok(r);
            }
        }
        let (resolution, expires) = self.lookup(&key).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= self.cache_entries_max && !cache.contains_key(&key) {
            let now = Instant::now();
            cache.retain(|_, (e, _)| *e > now);
            if cache.len() >= self.cache_entries_max {
                // Still full of live entries: forget the one closest to expiry.
                let victim = cache
                    .iter()
                    .min_by_key(|(_, (e, _))| *e)
                    .map(|(k, _)| k.clone());
                if let Some(k) = victim {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(key, (expires, resolution.clone()));
        drop(cache);
        let mut resolution = resolution;
        self.shuffle(&mut resolution);
        Ok(resolution)
    }

    /// Hosts of equal preference in a fresh random order, on every answer (cached or not), so
    /// that load spreads over them for the whole TTL.
    fn shuffle(&self, r: &mut Resolution) {
        let Resolution::Hosts(hosts) = r else { return };
        let mut start = 0;
        while start < hosts.len() {
            let pref = hosts[start].preference;
            let end = start
                + hosts[start..]
                    .iter()
                    .take_while(|h| h.preference == pref)
                    .count();
            for i in (start + 1..end).rev() {
                let mut x = self.rng.get();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.rng.set(x);
                let j = start + (x % (i - start + 1) as u64) as usize;
                hosts.swap(i, j);
            }
            start = end;
        }
    }

    async fn lookup(&self, domain: &str) -> Result<(Resolution, Instant), DnsError> {
        let fqdn = format!("{domain}.");
        let temporary = |reason: String| DnsError {
            domain: domain.to_string(),
            reason,
        };
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut expires = lookup.valid_until();
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                let null = |h: &str| h == "." || h.is_empty();
                if !mx.is_empty() && mx.iter().all(|(_, h)| null(h)) {
                    // RFC 7505 (and, for a non-zero preference, RFC 5321 §5.1: MX records
                    // exist, so the domain's own address must not be used).
                    return Ok((
                        Resolution::NullMx,
                        expires.max(Instant::now() + NEGATIVE_TTL),
                    ));
                }
                mx.retain(|(_, h)| !null(h));
                if mx.is_empty() {
                    return self.implicit_mx(domain).await;
                }
                mx.sort_by_key(|(p, _)| *p);
                mx.truncate(MX_HOSTS_MAX);
                let mut hosts = Vec::with_capacity(mx.len());
                let mut last_error = None;
                for (preference, name) in mx {
                    match self.resolver.lookup_ip(name.as_str()).await {
                        Ok(ips) => {
                            expires = expires.min(ips.valid_until());
                            let addrs: Vec<IpAddr> = ips.iter().collect();
                            if !addrs.is_empty() {
                                let name = name.trim_end_matches('.').to_string();
                                hosts.push(MxHost {
                                    name,
                                    preference,
                                    addrs,
                                });
                            }
                        }
                        Err(e) => last_error = Some(e.to_string()),
                    }
                }
                if hosts.is_empty() {
                    let why = last_error.unwrap_or_else(|| "no MX host has an address".into());
                    return Err(temporary(format!("MX hosts without addresses: {why}")));
                }
                if last_error.is_some() {
                    // Some host's address is missing for now: ask again soon.
                    expires = expires.min(Instant::now() + PARTIAL_TTL);
                }
                Ok((Resolution::Hosts(hosts), expires))
            }
            Err(e) if e.is_nx_domain() => {
                Ok((Resolution::NoSuchDomain, Instant::now() + NEGATIVE_TTL))
            }
            Err(e) if e.is_no_records_found() => self.implicit_mx(domain).await,
            Err(e) => Err(temporary(e.to_string())),
        }
    }

    /// RFC 5321 §5.1: without MX records, the domain's own address is the mail host. A and
    /// AAAA are asked separately: the domain has no mail host only if the name does not exist or
    /// both answer "no records"; any other failure of either is temporary.
    async fn implicit_mx(&self, domain: &str) -> Result<(Resolution, Instant), DnsError> {
        let fqdn = format!("{domain}.");
        let temporary = |e: String| DnsError {
            domain: domain.to_string(),
            reason: e,
        };
        let v4 = self.resolver.ipv4_lookup(fqdn.as_str()).await;
        let v6 = self.resolver.ipv6_lookup(fqdn.as_str()).await;
        let mut addrs = Vec::new();
        let mut expires = Instant::now() + NEGATIVE_TTL;
        let (mut absent, mut nx, mut failure) = (0, false, None);
        for result in [v4, v6] {
            match result {
                Ok(lookup) => {
                    expires = expires.min(lookup.valid_until());
                    addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    }));
                }
                Err(e) if e.is_nx_domain() => nx = true,
                Err(e) if e.is_no_records_found() => absent += 1,
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if !addrs.is_empty() {
            // One family answering is enough, whatever happened to the other.
            let host = MxHost {
                name: domain.to_string(),
                preference: 0,
                addrs,
            };
            return Ok((Resolution::Hosts(vec![host]), expires));
        }
        if nx || absent == 2 {
            return Ok((Resolution::NoSuchDomain, Instant::now() + NEGATIVE_TTL));
        }
        if let Some(why) = failure {
            return Err(temporary(why));
        }
        Err(temporary("no address answer".into()))
    }
}

/// Against a real DNS server on loopback: `dnsmasq`, started by the test on a free port
/// (scripts/test.sh installs the `dnsmasq-base` package).
#[cfg(test)]
mod tests {
    use super::*;

    /// dnsmasq on loopback (`saida_e2e::Dnsmasq`, shared with the end-to-end tests) with the
    /// records these tests ask about.
    fn dnsmasq() -> saida_e2e::Dnsmasq {
        let records = [
            "--mx-host=multi.test,mx1.multi.test,10",
            "--mx-host=multi.test,mx2.multi.test,10",
            "--mx-host=multi.test,mx3.multi.test,20",
            "--host-record=mx1.multi.test,127.0.0.2",
            "--host-record=mx2.multi.test,127.0.0.3",
            "--host-record=mx3.multi.test,127.0.0.4",
            "--host-record=implicit.test,127.0.0.5",
            "--dns-rr=nullmx.test,15,000000",
            "--mx-host=noaddr.test,ghost.noaddr.test,10",
        ];
        let records: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        saida_e2e::Dnsmasq::start(&records)
    }

    fn resolver(port: u16) -> MxResolver {
        let settings = DnsSettings {
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            timeout: Duration::from_millis(500),
            attempts: 1,
            cache_entries_max: 3,
        };
        MxResolver::new(&settings).unwrap()
    }

    fn run<F: std::future::Future<Output = ()>>(f: F) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f);
    }

    #[test]
    fn mx_hosts_by_preference_with_equal_ones_shuffled() {
        let dns = dnsmasq();
        run(async {
            let r = resolver(dns.port);
            let mut firsts = std::collections::HashSet::new();
            for _ in 0..40 {
                r.cache.borrow_mut().clear();
                let Resolution::Hosts(hosts) = r.resolve("multi.test").await.unwrap() else {
                    panic!("no hosts")
                };
                let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                assert_eq!(names.len(), 3);
                assert_eq!(names[2], "mx3.multi.test", "{names:?}");
                assert_eq!(hosts[2].addrs, vec![IpAddr::from([127, 0, 0, 4])]);
                firsts.insert(names[0].to_string());
            }
            assert_eq!(
                firsts.len(),
                2,
                "equal preferences must be tried in random order"
            );
        });
    }

    #[test]
    fn implicit_null_and_missing_domains() {
        let dns = dnsmasq();
        run(async {
            let r = resolver(dns.port);
            let Resolution::Hosts(h) = r.resolve("implicit.test").await.unwrap() else {
                panic!()
            };
            assert_eq!(
                (h[0].name.as_str(), h[0].addrs[0]),
                ("implicit.test", IpAddr::from([127, 0, 0, 5]))
            );
            assert_eq!(r.resolve("nullmx.test").await.unwrap(), Resolution::NullMx);
            assert_eq!(
                r.resolve("missing.test").await.unwrap(),
                Resolution::NoSuchDomain
            );
            assert!(
                r.resolve("noaddr.test").await.is_err(),
                "an MX without address is temporary"
            );
        });
    }

    #[test]
    fn unreachable_server_is_a_temporary_failure() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        run(async {
            let r = resolver(port);
            let e = r.resolve("multi.test").await.unwrap_err();
            assert_eq!(e.domain, "multi.test");
        });
    }

    #[test]
    fn cache_answers_without_asking_and_stays_bounded() {
        let dns = dnsmasq();
        run(async {
            let r = resolver(dns.port);
            // Five answers (negative ones are cached too) into a cache of three.
            for d in ["x1.test", "x2.test", "x3.test", "x4.test", "x5.test"] {
                assert_eq!(r.resolve(d).await.unwrap(), Resolution::NoSuchDomain);
                assert!(r.cached() <= 3, "{}", r.cached());
            }
            let first = r.resolve("implicit.test").await.unwrap();
            // The server is gone: the cached answer is still served until its TTL runs out.
            drop(dns);
            assert_eq!(r.resolve("IMPLICIT.test.").await.unwrap(), first);
        });
    }
}
