//! TLS over any [`Stream`] with rustls: both sides of STARTTLS (RFC 3207), implicit TLS
//! (RFC 8314), loading and reloading the server certificate, and the client configurations of
//! the delivery TLS policies.
//!
//! rustls does no I/O itself; this adapter moves ciphertext between it and the owned-buffer
//! stream (`read_tls` / `process_new_packets` / `write_tls`). A failed handshake sends the TLS
//! alert and returns an error; the session then closes the connection.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Stream;

/// Largest ciphertext buffered ahead of rustls.
const TLS_READ_CHUNK: usize = 32 << 10;

/// A TLS session over `S`.
pub struct TlsStream<S> {
    inner: S,
    conn: rustls::Connection,
    /// Ciphertext received and not yet handed to rustls.
    rbuf: Vec<u8>,
}

impl<S: Stream> TlsStream<S> {
    /// Runs the server handshake over `inner`.
    pub async fn accept(inner: S, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        TlsStream::handshake(inner, rustls::Connection::Server(conn)).await
    }

    /// Runs the client handshake over `inner` for `server_name` (SNI and, when the
    /// configuration verifies, the name checked against the certificate).
    pub async fn connect(
        inner: S,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<Self> {
        let conn = rustls::ClientConnection::new(config, server_name).map_err(io::Error::other)?;
        TlsStream::handshake(inner, rustls::Connection::Client(conn)).await
    }

    async fn handshake(inner: S, conn: rustls::Connection) -> io::Result<Self> {
        let mut tls = TlsStream {
            inner,
            conn,
            rbuf: Vec::with_capacity(TLS_READ_CHUNK),
        };
        while tls.conn.is_handshaking() {
            tls.flush_tls().await?;
            if tls.conn.is_handshaking() && tls.conn.wants_read() && tls.read_tls().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        tls.flush_tls().await?;
        Ok(tls)
    }

    /// Negotiated protocol version and cipher suite.
    pub fn info(&self) -> (String, String) {
        let version = self
            .conn
            .protocol_version()
            .map_or("?".into(), |v| format!("{v:?}"));
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .map_or("?".into(), |s| format!("{:?}", s.suite()));
        (version.replace('_', "v").replace("TLSvv", "TLSv"), suite)
    }

    /// Sends whatever rustls has queued.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = Vec::new();
            self.conn.write_tls(&mut out)?;
            let (r, _) = self.inner.write_all(out).await;
            r?;
        }
        Ok(())
    }

    /// Reads ciphertext from the socket and feeds it to rustls. Returns the bytes read (0 at end
    /// of stream).
    async fn read_tls(&mut self) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.reserve(TLS_READ_CHUNK);
        let (r, buf) = self.inner.read(buf).await;
        self.rbuf = buf;
        let n = r?;
        self.feed().await?;
        Ok(n)
    }

    /// Hands buffered ciphertext to rustls for as long as it wants more. rustls refuses input
    /// while it holds a full buffer of unread plaintext, so what it does not take stays in
    /// `rbuf` for the next call (after the session has read some plaintext).
    async fn feed(&mut self) -> io::Result<()> {
        let mut fed = 0;
        while fed < self.rbuf.len() && self.conn.wants_read() {
            let mut rd = &self.rbuf[fed..];
            let used = self.conn.read_tls(&mut rd)?;
            if used == 0 {
                break;
            }
            fed += used;
            if let Err(e) = self.conn.process_new_packets() {
                // Send the alert rustls prepared, then fail.
                let _ = self.flush_tls().await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        self.rbuf.drain(..fed);
        Ok(())
    }
}

impl<S: Stream> Stream for TlsStream<S> {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            let len = buf.len();
            buf.resize(len + TLS_READ_CHUNK, 0);
            let r = self.conn.reader().read(&mut buf[len..]);
            match r {
                Ok(n) => {
                    buf.truncate(len + n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    buf.truncate(len);
                    if let Err(e) = self.flush_tls().await {
                        return (Err(e), buf);
                    }
                    // Ciphertext already received goes first: pipelined records may be there.
                    if !self.rbuf.is_empty() && self.conn.wants_read() {
                        let before = self.rbuf.len();
                        if let Err(e) = self.feed().await {
                            return (Err(e), buf);
                        }
                        if self.rbuf.len() < before {
                            continue;
                        }
                    }
                    match self.read_tls().await {
                        Ok(0) => return (Ok(0), buf), // peer closed without close_notify
                        Ok(_) => continue,
                        Err(e) => return (Err(e), buf),
                    }
                }
                Err(e) => {
                    buf.truncate(len);
                    return (Err(e), buf);
                }
            }
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        // rustls buffers at most 64 KiB of outgoing data: write what fits, send it, repeat.
        let mut off = 0;
        while off < buf.len() {
            match self.conn.writer().write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.flush_tls().await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.flush_tls().await?;
        self.inner.shutdown().await
    }
}

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("certificate and key do not fit together: {0}")]
    Mismatch(rustls::Error),
}

/// Builds a rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let file_err = |path: &Path, e: &dyn std::fmt::Display| TlsSetupError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, &e))?;
    if chain.is_empty() {
        return Err(file_err(cert, &"no certificate in file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(TlsSetupError::Mismatch)?;
    Ok(Arc::new(config))
}

/// The self-signed certificate offered when no `[tls]` is configured (as Debian's Postfix
/// does with its "snakeoil" certificate): `<dir>/self-signed.crt` and `<dir>/self-signed.key`
/// (mode 0600) for `hostname`, made at first start and kept. Returns the two paths.
pub fn ensure_self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsSetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let cert = dir.join("self-signed.crt");
    let key = dir.join("self-signed.key");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let err = |path: &Path, e: &dyn std::fmt::Display| TlsSetupError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let made = rcgen::KeyPair::generate().and_then(|pair| {
        let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname);
        Ok((params.self_signed(&pair)?, pair))
    });
    let (certificate, pair) = made.map_err(|e| err(&cert, &e))?;
    // The key first, then the certificate: a crash in between leaves no certificate, and the
    // next start makes both again.
    for (path, pem, mode) in [
        (&key, pair.serialize_pem(), 0o600),
        (&cert, certificate.pem(), 0o644),
    ] {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| err(&tmp, &e))?;
        f.write_all(pem.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| err(path, &e))?;
    }
    Ok((cert, key))
}

/// A certificate that is reloaded when its files change (checked at most every `interval`).
/// A reload that fails keeps the previous certificate and reports the error once.
pub struct ReloadingTls {
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    current: Arc<rustls::ServerConfig>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingTls {
    /// Loads the files now.
    pub fn load(cert: &Path, key: &Path, interval: Duration) -> Result<Self, TlsSetupError> {
        let current = server_config(cert, key)?;
        Ok(ReloadingTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            interval,
            current,
            stamp: (mtime(cert), mtime(key)),
            checked: Instant::now(),
        })
    }

    /// The configuration to use for a new handshake, reloading first if the files changed.
    pub fn get(&mut self) -> Arc<rustls::ServerConfig> {
        if self.checked.elapsed() >= self.interval {
            self.checked = Instant::now();
            let stamp = (mtime(&self.cert), mtime(&self.key));
            if stamp != self.stamp {
                self.stamp = stamp;
                match server_config(&self.cert, &self.key) {
                    Ok(c) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                        self.current = c;
                    }
                    Err(e) => {
                        let why = "TLS reload failed; keeping the previous certificate";
                        tracing::error!(error = %e, "{why}")
                    }
                }
            }
        }
        Arc::clone(&self.current)
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Trusted roots from a PEM bundle (`/etc/ssl/certs/ca-certificates.crt` on Debian). Returns
/// how many certificates were skipped as unparsable, beside the store.
pub fn roots_from_pem_file(path: &Path) -> Result<(rustls::RootCertStore, usize), TlsSetupError> {
    let err = |e: &dyn std::fmt::Display| TlsSetupError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    let (_, skipped) = roots.add_parsable_certificates(certs);
    Ok((roots, skipped))
}

/// Client configuration for policy `verified`: the certificate must chain to a root in `roots`
/// and match the host name.
pub fn client_config_verified(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    // The ring provider supports the safe defaults; failing here is a build defect.
    Arc::new(config.expect("ring supports the default protocol versions"))
}

/// Client configuration for policies `opportunistic` and `required`: encryption without
/// authentication, as RFC 7435 opportunistic security and most MTAs do (MX certificates are
/// often self-signed or for another name). Handshake signatures are still checked.
pub fn client_config_unverified() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AcceptAnyCertificate(Arc::clone(&provider)));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    Arc::new(config.expect("ring supports the default protocol versions"))
}

/// Accepts any certificate chain, but verifies that the server holds its key.
#[allow(
    dead_code,
    reason = "the provider is kept for the verifier's lifetime, not read"
)]
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
