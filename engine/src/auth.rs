//! Sender authentication: the credentials file (`user:argon2-hash` per line, made with
//! `saida passwd`), password verification, and the AUTH throttle (the SASL PLAIN and LOGIN
//! decodings are `smtp_proto::sasl`).
//!
//! Verification costs tens of milliseconds of CPU by design (argon2), so sessions run it on the
//! blocking pool, never on a shard thread. Unknown users cost the same as wrong passwords, so
//! timing does not reveal which user names exist.

use std::collections::HashMap;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Users and their password hashes.
pub struct Credentials {
    users: HashMap<String, String>,
    /// Verified against for unknown users, so that they take as long as known ones.
    decoy: String,
}

/// Why the credentials file could not be loaded; names the line.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct CredentialsError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl Credentials {
    /// Loads `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError {
            file: file.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: &str| CredentialsError {
                file: file.clone(),
                line: i + 1,
                message: message.into(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected user:hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            PasswordHash::new(hash)
                .map_err(|_| err("not a PHC password hash (use `saida passwd`)"))?;
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(Credentials {
            users,
            decoy: hash_password("decoy password never matches")?,
        })
    }

    /// Number of users (for the start-up log).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when `password` is `user`'s. Slow on purpose; call from a blocking thread.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    }
}

/// Hashes a password with argon2id and a random salt (PHC string format).
pub fn hash_password(password: &str) -> Result<String, CredentialsError> {
    let mut salt = [0u8; 16];
    let err = |message: String| CredentialsError {
        file: "-".into(),
        line: 0,
        message,
    };
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut salt))
        .map_err(|e| err(format!("reading /dev/urandom: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| err(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_passwords_verify_and_wrong_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let hash = hash_password("s3cret").unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();
        let c = Credentials::load(&path).unwrap();
        assert!(c.verify("alice", "s3cret"));
        assert!(!c.verify("alice", "wrong"));
        assert!(!c.verify("bob", "s3cret"));
    }

    #[test]
    fn bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, "\nalice-no-hash\n").unwrap();
        let e = Credentials::load(&path).err().unwrap();
        assert_eq!(e.line, 2);
    }
}

/// The address a client is counted under: IPv4 as is (IPv4-mapped IPv6 as IPv4), other IPv6
/// by its /64.
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Failed-AUTH accounting shared by all shards, and the bounds on concurrent exchanges and
/// verifications.
///
/// Attempts are counted per client address (IPv6 per /64, since one host owns a whole /64)
/// within `FAILURE_WINDOW`. An attempt counts as a failure from the moment its credentials
/// are decoded, before they are verified, and is taken back only if they prove right: parallel
/// connections cannot guess in parallel past `failures_max`. At most `concurrent_max` AUTH
/// exchanges run at once per address. At most `verify_max` argon2 verifications run at once
/// (each takes ~19 MiB and tens of milliseconds), so a flood of AUTH attempts cannot exhaust
/// memory or the blocking pool.
pub struct AuthThrottle {
    clients: std::sync::Mutex<HashMap<std::net::IpAddr, ClientAttempts>>,
    pub verify: tokio::sync::Semaphore,
}

/// One address's recent attempts.
struct ClientAttempts {
    failures: u32,
    last: std::time::Instant,
    /// Exchanges in progress.
    active: u32,
}

/// Why an AUTH exchange may not begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthRefusal {
    /// `failures_max` recent failures from this address.
    TooManyFailures,
    /// `concurrent_max` exchanges from this address already in progress.
    TooManyConcurrent,
}

/// An AUTH exchange in progress; ends (frees its concurrency slot) when dropped.
pub struct AuthAttempt {
    throttle: std::sync::Arc<AuthThrottle>,
    key: std::net::IpAddr,
    counted: bool,
}

/// How long a failure counts against an address.
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(900);
/// Addresses tracked at most (the oldest idle entry is forgotten first).
pub const FAILURES_TRACKED_MAX: usize = 100_000;

impl AuthThrottle {
    pub fn new(verify_max: usize) -> AuthThrottle {
        AuthThrottle {
            clients: std::sync::Mutex::default(),
            verify: tokio::sync::Semaphore::new(verify_max.max(1)),
        }
    }

    fn key(ip: std::net::IpAddr) -> std::net::IpAddr {
        client_key(ip)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, ClientAttempts>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recent failures from `ip`.
    #[cfg(test)]
    pub fn failures(&self, ip: std::net::IpAddr) -> u32 {
        self.lock()
            .get(&Self::key(ip))
            .filter(|c| c.last.elapsed() < FAILURE_WINDOW)
            .map_or(0, |c| c.failures)
    }

    /// Begins an exchange from `ip`, or says why it may not.
    pub fn begin(
        self: &std::sync::Arc<Self>,
        ip: std::net::IpAddr,
        failures_max: u32,
        concurrent_max: u32,
    ) -> Result<AuthAttempt, AuthRefusal> {
        let key = Self::key(ip);
        let mut map = self.lock();
        if map.len() >= FAILURES_TRACKED_MAX && !map.contains_key(&key) {
            map.retain(|_, c| c.active > 0 || c.last.elapsed() < FAILURE_WINDOW);
            if map.len() >= FAILURES_TRACKED_MAX {
                let oldest = map
                    .iter()
                    .filter(|(_, c)| c.active == 0)
                    .min_by_key(|(_, c)| c.last)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
        }
        let now = std::time::Instant::now();
        let c = map.entry(key).or_insert(ClientAttempts {
            failures: 0,
            last: now,
            active: 0,
        });
        if c.last.elapsed() >= FAILURE_WINDOW {
            c.failures = 0;
        }
        if c.failures >= failures_max {
            return Err(AuthRefusal::TooManyFailures);
        }
        if c.active >= concurrent_max {
            return Err(AuthRefusal::TooManyConcurrent);
        }
        c.active += 1;
        Ok(AuthAttempt {
            throttle: std::sync::Arc::clone(self),
            key,
            counted: false,
        })
    }
}

impl AuthAttempt {
    /// Counts this attempt as a failure before its credentials are verified; returns the
    /// address's recent failures including it.
    pub fn count(&mut self) -> u32 {
        let mut map = self.throttle.lock();
        let Some(c) = map.get_mut(&self.key) else {
            return 0;
        };
        if !self.counted {
            self.counted = true;
            c.failures += 1;
            c.last = std::time::Instant::now();
        }
        c.failures
    }

    /// The credentials were right: the attempt no longer counts as a failure.
    pub fn succeeded(mut self) {
        if std::mem::take(&mut self.counted) {
            if let Some(c) = self.throttle.lock().get_mut(&self.key) {
                c.failures = c.failures.saturating_sub(1);
            }
        }
    }
}

impl Drop for AuthAttempt {
    fn drop(&mut self) {
        if let Some(c) = self.throttle.lock().get_mut(&self.key) {
            c.active = c.active.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn ipv6_failures_count_per_64() {
        let t = Arc::new(AuthThrottle::new(1));
        t.begin("2001:db8::1".parse().unwrap(), 5, 2)
            .unwrap()
            .count();
        let mut a = t.begin("2001:db8::ffff".parse().unwrap(), 5, 2).unwrap();
        assert_eq!(a.count(), 2);
        assert_eq!(t.failures("2001:db8:0:1::1".parse().unwrap()), 0);
        a.succeeded();
        assert_eq!(t.failures("2001:db8::1".parse().unwrap()), 1);
    }

    #[test]
    fn attempts_count_before_verification_and_concurrency_is_bounded() {
        let t = Arc::new(AuthThrottle::new(1));
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let mut a = t.begin(ip, 2, 2).unwrap();
        let mut b = t.begin(ip, 2, 2).unwrap();
        assert_eq!(
            t.begin(ip, 2, 2).err(),
            Some(AuthRefusal::TooManyConcurrent)
        );
        // Both count while still being verified: a third attempt is refused outright.
        a.count();
        b.count();
        drop((a, b));
        assert_eq!(t.begin(ip, 2, 2).err(), Some(AuthRefusal::TooManyFailures));
    }
}
