//! `saida-dkim`: DKIM signing keys and signing (RFC 6376, RFC 8463), on `mail-auth` with its
//! `ring` backend.
//!
//! A [`Keyring`] holds every signing key: those listed one by one ([`KeyEntry`]: domain,
//! selector, PEM file) and those in a keys directory of `<domain>.<selector>.pem` files, for
//! senders with thousands of domains. Keys are parsed once (RSA PKCS#1 or PKCS#8, Ed25519
//! PKCS#8) and kept; [`Keyring::reload`] re-reads only the files whose size or modification
//! time changed, and a file that no longer parses keeps its last good key and is reported by
//! name. [`Keyring::load`] is strict: any bad or missing key is an error naming the file.
//!
//! [`KeySet::sign`] signs one message (relaxed/relaxed by default) with every key of the most
//! specific domain at or above its `From:` domain, and with the keys of any extra domains asked
//! for (a tenant's, an ESP's), and returns the `DKIM-Signature:` fields to put on top.
//!
//! Not here: which message gets which extra domains (the daemon's tenants), when signing
//! happens (once, at intake, before the message is stored), verification (tests use mail-auth's
//! verifier against keys published in DNS).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// Headers signed by default: those a recipient sees or acts on. Absent ones are signed as
/// empty, so that nobody can add them later without breaking the signature.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Sender",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

/// Largest key file read.
pub const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Most keys in one keyring (entries and directory together).
pub const KEYS_MAX: usize = 1_000_000;

/// One configured key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    pub domain: String,
    pub selector: String,
    pub key: PathBuf,
}

/// How signatures are made.
#[derive(Clone, Debug)]
pub struct SignOptions {
    pub headers: Vec<String>,
    /// `relaxed` (default) or `simple`, for the header and the body.
    pub header_canonicalization: Canonicalization,
    pub body_canonicalization: Canonicalization,
    /// Signature lifetime (`x=` tag) in seconds; 0 = none.
    pub expire_secs: u64,
}

impl Default for SignOptions {
    fn default() -> Self {
        SignOptions {
            headers: DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect(),
            header_canonicalization: Canonicalization::Relaxed,
            body_canonicalization: Canonicalization::Relaxed,
            expire_secs: 0,
        }
    }
}

/// Parses `relaxed`, `simple`, `relaxed/simple`...: (header, body).
pub fn parse_canonicalization(s: &str) -> Option<(Canonicalization, Canonicalization)> {
    let one = |s: &str| match s {
        "relaxed" => Some(Canonicalization::Relaxed),
        "simple" => Some(Canonicalization::Simple),
        _ => None,
    };
    match s.split_once('/') {
        Some((h, b)) => Some((one(h)?, one(b)?)),
        None => Some((one(s)?, Canonicalization::Simple)),
    }
}

/// A key that could not be had, naming its file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("DKIM key {0}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error("DKIM key {0}: {1}")]
    Invalid(PathBuf, String),
    #[error("DKIM keys directory {0}: {1}")]
    Directory(PathBuf, std::io::Error),
    #[error("DKIM key file name {0}: expected <domain>.<selector>.pem")]
    BadName(PathBuf),
    #[error("more than {KEYS_MAX} DKIM keys")]
    TooMany,
}

/// Why a message could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("DKIM signing with {domain} selector {selector}: {why}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub why: String,
}

/// The signature algorithm of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

enum AnySigner {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// One parsed key, ready to sign for its domain and selector.
pub struct Signer {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    signer: AnySigner,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl Signer {
    /// Parses the PEM key in `pem` (named `path` in errors) for `domain` and `selector`.
    pub fn from_pem(
        path: &Path,
        pem: &[u8],
        domain: &str,
        selector: &str,
        options: &SignOptions,
    ) -> Result<Signer, KeyError> {
        let invalid = |why: String| KeyError::Invalid(path.to_path_buf(), why);
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| invalid(format!("no private key in PEM form ({e})")))?;
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let rsa = |der: PrivateKeyDer<'_>| {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| invalid(e.to_string()))?;
            Ok::<_, KeyError>(AnySigner::Rsa(build(key, &domain, selector, options)))
        };
        let (algorithm, signer) = match &der {
            PrivateKeyDer::Pkcs1(_) => (Algorithm::RsaSha256, rsa(der.clone_key())?),
            PrivateKeyDer::Pkcs8(p8) => {
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                    Ok(key) => (
                        Algorithm::Ed25519Sha256,
                        AnySigner::Ed25519(build(key, &domain, selector, options)),
                    ),
                    Err(_) => (Algorithm::RsaSha256, rsa(der.clone_key())?),
                }
            }
            _ => return Err(invalid("not an RSA or Ed25519 private key".into())),
        };
        Ok(Signer {
            domain,
            selector: selector.to_string(),
            algorithm,
            signer,
        })
    }

    /// The DNS TXT record that publishes this key, at `<selector>._domainkey.<domain>`:
    /// `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>` or `v=DKIM1; k=ed25519; p=<32 bytes>`.
    pub fn dns_record(&self) -> String {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        match &self.signer {
            AnySigner::Rsa(s) => {
                let spki = rsa_spki(&s.key.public_key());
                format!("v=DKIM1; k=rsa; p={}", b64(&spki))
            }
            AnySigner::Ed25519(s) => format!("v=DKIM1; k=ed25519; p={}", b64(&s.key.public_key())),
        }
    }

    /// The `DKIM-Signature:` field (with its CRLF) for `message` (headers and body, CRLF).
    pub fn sign(&self, message: &[u8]) -> Result<String, SignError> {
        let signed = match &self.signer {
            AnySigner::Rsa(s) => s.sign(message),
            AnySigner::Ed25519(s) => s.sign(message),
        };
        signed.map(|s| s.to_header()).map_err(|e| SignError {
            domain: self.domain.clone(),
            selector: self.selector.clone(),
            why: e.to_string(),
        })
    }
}

/// Wraps a PKCS#1 `RSAPublicKey` in a SubjectPublicKeyInfo (what `openssl rsa -pubout` and
/// DNS publishers use for `p=`).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let bytes: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    // SEQUENCE { OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL }
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = ALGORITHM.to_vec();
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

fn build<K: mail_auth::common::crypto::SigningKey>(
    key: K,
    domain: &str,
    selector: &str,
    options: &SignOptions,
) -> DkimSigner<K, Done> {
    let s = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(options.headers.iter().cloned());
    configure(s, options)
}

fn configure<K: mail_auth::common::crypto::SigningKey>(
    s: DkimSigner<K, Done>,
    options: &SignOptions,
) -> DkimSigner<K, Done> {
    let mut s = s
        .header_canonicalization(options.header_canonicalization)
        .body_canonicalization(options.body_canonicalization);
    if options.expire_secs > 0 {
        s = s.expiration(options.expire_secs);
    }
    s
}

/// Every key, by signing domain: one immutable snapshot of a [`Keyring`].
#[derive(Debug, Default)]
pub struct KeySet {
    by_domain: HashMap<String, Vec<Arc<Signer>>>,
    count: usize,
}

impl KeySet {
    fn insert(&mut self, signer: Arc<Signer>) {
        let list = self.by_domain.entry(signer.domain.clone()).or_default();
        list.retain(|s| s.selector != signer.selector);
        list.push(signer);
        self.count = self.by_domain.values().map(Vec::len).sum();
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The keys of `domain` itself.
    pub fn keys_of(&self, domain: &str) -> &[Arc<Signer>] {
        self.by_domain.get(domain).map_or(&[], Vec::as_slice)
    }

    /// The keys of the most specific domain at or above `domain` that has any (a `From:` of
    /// `news.example.com` is signed by `example.com`'s keys when it has none of its own:
    /// relaxed alignment for DMARC).
    pub fn keys_for_from(&self, domain: &str) -> &[Arc<Signer>] {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut d = domain.as_str();
        loop {
            let keys = self.keys_of(d);
            if !keys.is_empty() {
                return keys;
            }
            match d.split_once('.') {
                // Never above a two-label name: `com` signs nobody's mail.
                Some((_, parent)) if parent.contains('.') => d = parent,
                _ => return &[],
            }
        }
    }

    /// Signs `message` with the keys for its `From:` domain and those of `extra` domains (each
    /// key once), and returns the signature fields to prepend (empty when no key applies).
    pub fn sign(
        &self,
        message: &[u8],
        from_domain: Option<&str>,
        extra: &[String],
    ) -> Result<String, SignError> {
        let mut out = String::new();
        let mut used: Vec<*const Signer> = Vec::new();
        let from = from_domain.map_or(&[][..], |d| self.keys_for_from(d));
        let extra = extra.iter().flat_map(|d| self.keys_of(d));
        for s in from.iter().chain(extra) {
            if used.contains(&Arc::as_ptr(s)) {
                continue;
            }
            used.push(Arc::as_ptr(s));
            out.push_str(&s.sign(message)?);
        }
        Ok(out)
    }
}

/// Where keys come from.
#[derive(Clone, Debug, Default)]
pub struct KeySources {
    pub entries: Vec<KeyEntry>,
    /// A directory of `<domain>.<selector>.pem` files (the selector has no dot).
    pub dir: Option<PathBuf>,
    pub options: SignOptions,
}

/// What a file was when it was parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// Every signing key, reloaded when its file changes; shared by every shard.
#[derive(Debug)]
pub struct Keyring {
    sources: KeySources,
    current: RwLock<Arc<KeySet>>,
    /// Parsed keys by file, with the stamp they were parsed at.
    parsed: std::sync::Mutex<HashMap<PathBuf, (Stamp, Arc<Signer>)>>,
}

impl Keyring {
    /// A keyring without keys (signs nothing).
    pub fn empty() -> Keyring {
        Keyring {
            sources: KeySources::default(),
            current: RwLock::new(Arc::default()),
            parsed: Default::default(),
        }
    }

    /// Loads every key; any bad or missing one is an error naming its file.
    pub fn load(sources: KeySources) -> Result<Keyring, KeyError> {
        let ring = Keyring {
            sources,
            current: RwLock::new(Arc::default()),
            parsed: Default::default(),
        };
        let errors = ring.reload();
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(ring),
        }
    }

    /// The keys now.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(k) => Arc::clone(&k),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads changed, new and removed key files; returns the files that failed (their last
    /// good key, if any, stays in use).
    pub fn reload(&self) -> Vec<KeyError> {
        let mut errors = Vec::new();
        let mut wanted: Vec<(PathBuf, String, String)> = self
            .sources
            .entries
            .iter()
            .map(|e| {
                let domain = e.domain.trim_end_matches('.').to_ascii_lowercase();
                (e.key.clone(), domain, e.selector.clone())
            })
            .collect();
        if let Some(dir) = &self.sources.dir {
            match directory_keys(dir) {
                Ok((found, bad)) => {
                    wanted.extend(found);
                    errors.extend(bad);
                }
                Err(e) => {
                    // The directory cannot be read now: its keys as last read stay in use.
                    errors.push(e);
                    let parsed = match self.parsed.lock() {
                        Ok(p) => p,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    wanted.extend(
                        parsed
                            .iter()
                            .filter(|(p, _)| p.starts_with(dir))
                            .map(|(p, (_, s))| (p.clone(), s.domain.clone(), s.selector.clone())),
                    );
                }
            }
        }
        if wanted.len() > KEYS_MAX {
            errors.push(KeyError::TooMany);
            return errors;
        }
        let mut parsed = match self.parsed.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = KeySet::default();
        let mut kept: HashMap<PathBuf, (Stamp, Arc<Signer>)> = HashMap::new();
        for (path, domain, selector) in wanted {
            match load_one(
                &path,
                &domain,
                &selector,
                &self.sources.options,
                parsed.get(&path),
            ) {
                Ok(found) => {
                    next.insert(Arc::clone(&found.1));
                    kept.insert(path, found);
                }
                Err(e) => {
                    if let Some(old) = parsed.get(&path) {
                        next.insert(Arc::clone(&old.1));
                        kept.insert(path, old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        *parsed = kept;
        drop(parsed);
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        errors
    }
}

impl Keyring {
    /// Starts a thread that calls [`Keyring::reload`] every `every` and hands each failure to
    /// `on_error`; it ends when the keyring is dropped.
    pub fn watch(
        ring: &Arc<Keyring>,
        every: std::time::Duration,
        on_error: impl Fn(&KeyError) + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(ring);
        std::thread::Builder::new()
            .name("dkim-keys".into())
            .spawn(move || {
                loop {
                    std::thread::park_timeout(every);
                    let Some(ring) = weak.upgrade() else { return };
                    for e in ring.reload() {
                        on_error(&e);
                    }
                }
            })
    }
}

/// A key file's current key: the one parsed before when its stamp is unchanged.
fn load_one(
    path: &Path,
    domain: &str,
    selector: &str,
    options: &SignOptions,
    before: Option<&(Stamp, Arc<Signer>)>,
) -> Result<(Stamp, Arc<Signer>), KeyError> {
    let unreadable = |e| KeyError::Unreadable(path.to_path_buf(), e);
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let stamp = Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    };
    if let Some((s, signer)) = before {
        if *s == stamp && signer.domain == domain && signer.selector == selector {
            return Ok((stamp, Arc::clone(signer)));
        }
    }
    if meta.len() > KEY_FILE_BYTES_MAX {
        let why = format!("larger than {KEY_FILE_BYTES_MAX} bytes");
        return Err(KeyError::Invalid(path.to_path_buf(), why));
    }
    let pem = std::fs::read(path).map_err(unreadable)?;
    let signer = Signer::from_pem(path, &pem, domain, selector, options)?;
    Ok((stamp, Arc::new(signer)))
}

type Found = (Vec<(PathBuf, String, String)>, Vec<KeyError>);

/// The `<domain>.<selector>.pem` files of `dir`: (path, domain, selector), and misnamed files.
fn directory_keys(dir: &Path) -> Result<Found, KeyError> {
    let read = std::fs::read_dir(dir).map_err(|e| KeyError::Directory(dir.to_path_buf(), e))?;
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| KeyError::Directory(dir.to_path_buf(), e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".pem") else {
            continue; // not a key file (a README, a public key...)
        };
        match stem.rsplit_once('.') {
            Some((domain, selector))
                if domain.contains('.') && !selector.is_empty() && !domain.starts_with('.') =>
            {
                found.push((
                    path.clone(),
                    domain.to_ascii_lowercase(),
                    selector.to_string(),
                ));
            }
            _ => bad.push(KeyError::BadName(path.clone())),
        }
    }
    found.sort();
    Ok((found, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_pem() -> Vec<u8> {
        saida_e2e::rsa_key_pem()
    }

    fn ed_pem() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        key.serialize_pem()
    }

    const MESSAGE: &[u8] = b"From: a@news.example.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\n\
        body\r\n.dot line\r\n";

    #[test]
    fn keys_of_both_algorithms_sign_and_the_from_domain_picks_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("example.test.rsa.pem"), rsa_pem()).unwrap();
        std::fs::write(dir.path().join("example.test.ed.pem"), ed_pem()).unwrap();
        std::fs::write(dir.path().join("esp.test.s1.pem"), ed_pem()).unwrap();
        std::fs::write(dir.path().join("README"), "not a key").unwrap();
        let ring = Keyring::load(KeySources {
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        let keys = ring.keys();
        assert_eq!(keys.len(), 3);
        let algos: Vec<Algorithm> = keys
            .keys_for_from("news.example.test")
            .iter()
            .map(|s| s.algorithm)
            .collect();
        assert_eq!(algos.len(), 2);
        assert!(algos.contains(&Algorithm::RsaSha256) && algos.contains(&Algorithm::Ed25519Sha256));
        let sigs = keys
            .sign(MESSAGE, Some("news.example.test"), &["esp.test".into()])
            .unwrap();
        assert_eq!(sigs.matches("DKIM-Signature:").count(), 3, "{sigs}");
        assert!(sigs.contains("a=rsa-sha256") && sigs.contains("a=ed25519-sha256"));
        assert!(sigs.contains("d=esp.test") && sigs.contains("c=relaxed/relaxed"));
        assert!(sigs.ends_with("\r\n"));
        assert!(
            keys.sign(MESSAGE, Some("other.test"), &[])
                .unwrap()
                .is_empty()
        );
        assert!(keys.keys_for_from("test").is_empty());
    }

    #[test]
    fn a_bad_key_is_an_error_naming_its_file_and_a_reload_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let sources = KeySources {
            entries: vec![KeyEntry {
                domain: "example.test".into(),
                selector: "s".into(),
                key: path.clone(),
            }],
            ..Default::default()
        };
        let e = Keyring::load(sources.clone()).unwrap_err().to_string();
        assert!(e.contains("k.pem"), "{e}");
        let missing = KeySources {
            entries: vec![KeyEntry {
                key: dir.path().join("absent.pem"),
                ..sources.entries[0].clone()
            }],
            ..Default::default()
        };
        let e = Keyring::load(missing).unwrap_err().to_string();
        assert!(e.contains("absent.pem"), "{e}");

        std::fs::write(&path, rsa_pem()).unwrap();
        let ring = Keyring::load(sources).unwrap();
        let first = Arc::clone(&ring.keys().keys_of("example.test")[0]);
        assert!(ring.reload().is_empty());
        assert!(
            Arc::ptr_eq(&first, &ring.keys().keys_of("example.test")[0]),
            "an unchanged file is not parsed again"
        );
        std::fs::write(&path, "garbage, and longer than before").unwrap();
        let errors = ring.reload();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("k.pem"));
        assert!(Arc::ptr_eq(&first, &ring.keys().keys_of("example.test")[0]));
        std::fs::write(&path, ed_pem()).unwrap();
        assert!(ring.reload().is_empty());
        let keys = ring.keys();
        let now = &keys.keys_of("example.test")[0];
        assert_eq!(
            now.algorithm,
            Algorithm::Ed25519Sha256,
            "a changed file is read again"
        );
    }

    #[test]
    fn misnamed_directory_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nodomain.pem"), ed_pem()).unwrap();
        let e = Keyring::load(KeySources {
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, KeyError::BadName(_)), "{e}");
    }

    #[test]
    fn canonicalization_names_parse() {
        use Canonicalization::*;
        assert_eq!(
            parse_canonicalization("relaxed/relaxed"),
            Some((Relaxed, Relaxed))
        );
        assert_eq!(parse_canonicalization("relaxed"), Some((Relaxed, Simple)));
        assert_eq!(
            parse_canonicalization("simple/relaxed"),
            Some((Simple, Relaxed))
        );
        assert_eq!(parse_canonicalization("loose"), None);
    }
}
