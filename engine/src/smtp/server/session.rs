//! One SMTP server session over any [`Stream`]: greeting, command loop, transactions, DATA and
//! BDAT, STARTTLS, AUTH, relay control, and durable acceptance.
//!
//! The grammar is sans-IO (`smtp::command`, `smtp::data`); this module adds the state machine
//! and the I/O. Replies are buffered and sent when the session is about to wait for input, which
//! is what PIPELINING (RFC 2920) needs: a client that sends MAIL, RCPT x N and DATA in one
//! packet gets all their replies in one packet, in order.
//!
//! # Bounds
//! Command lines (`command_line_bytes_max`), text lines, message size, recipients per message,
//! commands and errors per session, and every wait (command and data timeouts) are bounded by
//! the configuration. Input beyond a bound gets its reply code with an enhanced status code; the
//! session goes on wherever RFC 5321 allows it, and closes with `421` otherwise.
//!
//! # Durability
//! The reply to the end of data is `250` only after the spool's commit ticket completed; a spool
//! error becomes its `4xx` reply and the message is forgotten (the client keeps it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_format::{DsnRet, Message, Recipient, Spool, message_flags, now_micros};
use tokio::sync::watch;

use crate::auth::{self, Credentials};
use crate::config::{BareLineEnds, Config, ListenerTls};
use crate::io::tls::{ReloadingTls, TlsStream};
use crate::io::{Conn, Stream};
use crate::smtp::command::{Body, Command, Ret, parse_command};
use crate::smtp::data::{BareLineEnd, ContentReader, Progress};
use crate::smtp::reply::Reply;
use crate::smtp::server::headers;

/// Largest read per call.
const READ_CHUNK: usize = 64 << 10;
/// Auth-failure entries remembered per shard (oldest forgotten first).
const AUTH_FAILURES_TRACKED_MAX: usize = 10_000;

/// What a shard shares with all its sessions.
pub struct ShardContext {
    pub config: Arc<Config>,
    pub shard: u16,
    pub spool: Rc<RefCell<Spool>>,
    pub tls: Option<Rc<RefCell<ReloadingTls>>>,
    pub credentials: Option<Arc<Credentials>>,
    /// Failed AUTH attempts per client IP: (count, last failure).
    pub auth_failures: RefCell<HashMap<IpAddr, (u32, Instant)>>,
    /// Flips to true on SIGTERM.
    pub shutdown: watch::Receiver<bool>,
    /// Hands accepted recipients to the shards owning their domains.
    pub router: crate::shard::Router,
}

/// Facts about the connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub listener_tls: ListenerTls,
}

/// The envelope being built.
#[derive(Default)]
struct Transaction {
    from: String,
    smtputf8: bool,
    body: Option<Body>,
    ret: Option<Ret>,
    envid: Option<String>,
    rcpts: Vec<(String, u8, String)>,
    /// BDAT in progress: content so far and its checker.
    chunks: Option<(ContentReader, Vec<u8>)>,
    /// A BDAT chunk failed: later chunks are refused until RSET (RFC 3030 §2).
    chunks_failed: bool,
}

/// Why the command loop stops.
enum Stop {
    Quit,
    Close,
}

/// A line read from the client.
enum LineRead {
    Line(std::ops::Range<usize>),
    TooLong,
    Eof,
    Timeout,
    Shutdown,
}

/// One session.
pub struct Session<S: Stream> {
    ctx: Rc<ShardContext>,
    info: ConnInfo,
    conn: Conn<S>,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    helo: Option<String>,
    esmtp: bool,
    user: Option<String>,
    tx: Option<Transaction>,
    commands: u32,
    errors: u32,
}

impl<S: Stream> Session<S> {
    /// A session on an accepted connection (already TLS for implicit-TLS listeners).
    pub fn new(ctx: Rc<ShardContext>, info: ConnInfo, conn: Conn<S>) -> Self {
        Session {
            ctx,
            info,
            conn,
            inbuf: Vec::with_capacity(4096),
            pos: 0,
            out: Vec::with_capacity(1024),
            helo: None,
            esmtp: false,
            user: None,
            tx: None,
            commands: 0,
            errors: 0,
        }
    }

    fn config(&self) -> &Config {
        &self.ctx.config
    }

    fn reply(&mut self, r: Reply) {
        r.encode(&mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let (r, mut out) = self.conn.write_all(out).await;
        out.clear();
        self.out = out;
        r
    }

    /// Runs the session to its end. Never panics on input; I/O errors end it quietly.
    pub async fn run(mut self) {
        let greeting = format!("{} ESMTP saida", self.config().server.hostname);
        self.reply(Reply::owned(220, "", greeting));
        let why = self.command_loop().await;
        if let Stop::Quit = why {
            let _ = self.flush().await;
        }
        let _ = self.flush().await;
        let _ = self.conn.shutdown().await;
    }

    async fn command_loop(&mut self) -> Stop {
        loop {
            let range = match self.next_line().await {
                LineRead::Line(r) => r,
                LineRead::TooLong => {
                    self.reply(Reply::new(500, "5.5.2", "Line too long"));
                    if self.count_error() {
                        return Stop::Close;
                    }
                    continue;
                }
                LineRead::Eof => return Stop::Close,
                LineRead::Timeout => {
                    self.reply(Reply::new(421, "4.4.2", "Timeout, closing connection"));
                    return Stop::Close;
                }
                LineRead::Shutdown => {
                    self.reply(Reply::new(421, "4.3.2", "Service shutting down"));
                    return Stop::Close;
                }
            };
            self.commands += 1;
            if self.commands > self.config().smtp.commands_per_session_max {
                self.reply(Reply::new(
                    421,
                    "4.7.0",
                    "Too many commands, closing connection",
                ));
                return Stop::Close;
            }
            let line = self.inbuf[range].to_vec();
            match self.dispatch(&line).await {
                Ok(()) => {}
                Err(stop) => return stop,
            }
        }
    }

    /// Counts a protocol error; true when the session must close (after a `421`).
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        if self.errors >= self.config().smtp.errors_per_session_max {
            self.reply(Reply::new(
                421,
                "4.7.0",
                "Too many errors, closing connection",
            ));
            return true;
        }
        false
    }

    /// Replies with an error that counts towards `errors_per_session_max`.
    fn error(&mut self, r: Reply) -> Result<(), Stop> {
        self.reply(r);
        if self.count_error() {
            Err(Stop::Close)
        } else {
            Ok(())
        }
    }

    async fn dispatch(&mut self, line: &[u8]) -> Result<(), Stop> {
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.error(e.reply()),
        };
        match cmd {
            Command::Ehlo(d) => self.ehlo(d, true),
            Command::Helo(d) => self.ehlo(d, false),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => self.data().await,
            Command::Bdat { size, last } => self.bdat(size, last).await,
            Command::Rset => {
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Ok(())
            }
            Command::Noop => {
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Ok(())
            }
            Command::Quit => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                Err(Stop::Quit)
            }
            Command::Vrfy => {
                // No disclosure of which addresses exist (RFC 5321 §3.5.3).
                self.reply(Reply::new(
                    252,
                    "2.5.0",
                    "Cannot VRFY user; send mail and delivery will be attempted",
                ));
                Ok(())
            }
            Command::Expn => self.error(Reply::new(502, "5.5.1", "EXPN not supported")),
            Command::Help => {
                self.reply(Reply::new(214, "2.0.0", "saida: see RFC 5321"));
                Ok(())
            }
            Command::StartTls => self.starttls().await,
            Command::Auth { mechanism, initial } => {
                let mechanism = mechanism.to_ascii_uppercase();
                let initial = initial.map(str::to_string);
                self.auth(&mechanism, initial).await
            }
        }
    }

    fn starttls_available(&self) -> bool {
        self.ctx.tls.is_some()
            && self.info.listener_tls == ListenerTls::StartTls
            && !self.conn.is_tls()
    }

    fn auth_available(&self) -> bool {
        self.ctx.credentials.is_some() && (self.conn.is_tls() || !self.config().auth.require_tls)
    }

    fn ehlo(&mut self, domain: &str, esmtp: bool) -> Result<(), Stop> {
        // EHLO resets any transaction (RFC 5321 §4.1.4).
        self.tx = None;
        self.helo = Some(domain.to_string());
        self.esmtp = esmtp;
        let hostname = self.config().server.hostname.clone();
        if !esmtp {
            self.reply(Reply::owned(250, "", hostname));
            return Ok(());
        }
        let mut r = Reply::owned(250, "", format!("{hostname} greets {domain}"));
        r.lines = vec![
            "PIPELINING".into(),
            format!("SIZE {}", self.config().smtp.message_bytes_max),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        if self.starttls_available() {
            r.lines.push("STARTTLS".into());
        }
        if self.auth_available() && self.user.is_none() {
            r.lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(r);
        Ok(())
    }

    fn mail(&mut self, from: &str, p: crate::smtp::command::MailParams<'_>) -> Result<(), Stop> {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if !self.esmtp
            && (p.size.is_some()
                || p.body.is_some()
                || p.smtputf8
                || p.ret.is_some()
                || p.envid.is_some())
        {
            return self.error(Reply::new(555, "5.5.4", "ESMTP parameters need EHLO"));
        }
        if p.size
            .is_some_and(|s| s > self.config().smtp.message_bytes_max as u64)
        {
            return self.error(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        self.tx = Some(Transaction {
            from: from.to_string(),
            smtputf8: p.smtputf8,
            body: p.body,
            ret: p.ret,
            envid: p.envid.map(str::to_string),
            ..Transaction::default()
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
        Ok(())
    }

    fn rcpt(&mut self, to: &str, p: crate::smtp::command::RcptParams<'_>) -> Result<(), Stop> {
        let max = self.config().smtp.rcpt_per_message_max;
        let may_relay = self.user.is_some() || self.config().may_relay(self.info.peer.ip());
        let auth_offered = self.ctx.credentials.is_some();
        let Some(tx) = self.tx.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if !tx.smtputf8 && !to.is_ascii() {
            return self.error(Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"));
        }
        if tx.rcpts.len() >= max {
            // 452 keeps the transaction usable (RFC 5321 §4.5.3.1.10).
            self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
            return Ok(());
        }
        if !may_relay {
            tracing::warn!(client = %self.info.peer.ip(), rcpt = to, "relay refused");
            return self.error(if auth_offered {
                Reply::new(530, "5.7.0", "Authentication required")
            } else {
                Reply::new(554, "5.7.1", "Relay access denied")
            });
        }
        tx.rcpts.push((
            to.to_string(),
            p.notify.unwrap_or(0),
            p.orcpt.unwrap_or("").to_string(),
        ));
        self.reply(Reply::new(250, "2.1.5", "Ok"));
        Ok(())
    }

    fn content_reader(&self, dot_stuffed: bool) -> ContentReader {
        let s = &self.config().smtp;
        let bare = match s.bare_line_ends {
            BareLineEnds::Reject => BareLineEnd::Reject,
            BareLineEnds::Normalize => BareLineEnd::Normalize,
        };
        let binary = self
            .tx
            .as_ref()
            .is_some_and(|t| t.body == Some(Body::BinaryMime));
        // BINARYMIME content has no line structure; only the size bound applies.
        let line_max = if binary && !dot_stuffed {
            usize::MAX
        } else {
            s.text_line_bytes_max
        };
        ContentReader::new(dot_stuffed, bare, line_max, s.message_bytes_max)
    }

    async fn data(&mut self) -> Result<(), Stop> {
        match &self.tx {
            None => return self.error(Reply::new(503, "5.5.1", "Need MAIL before DATA")),
            Some(t) if t.rcpts.is_empty() => {
                return self.error(Reply::new(554, "5.5.1", "No valid recipients"));
            }
            Some(t) if t.chunks.is_some() => {
                return self.error(Reply::new(503, "5.5.1", "DATA after BDAT"));
            }
            Some(t) if t.body == Some(Body::BinaryMime) => {
                return self.error(Reply::new(503, "5.5.1", "BINARYMIME needs BDAT"));
            }
            Some(_) => {}
        }
        self.reply(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        let mut reader = self.content_reader(true);
        let mut body = Vec::with_capacity(4096);
        loop {
            let progress = reader.feed(&self.inbuf[self.pos..], &mut body);
            match progress {
                Progress::Done { consumed } => {
                    self.pos += consumed;
                    break;
                }
                Progress::NeedMore => {
                    self.pos = self.inbuf.len();
                    if !self.read_more(self.config().smtp.data_timeout_secs).await? {
                        return Err(Stop::Close);
                    }
                }
            }
        }
        if let Some(e) = reader.error() {
            self.tx = None;
            return self.error(e.reply());
        }
        self.commit(body).await;
        Ok(())
    }

    async fn bdat(&mut self, size: u64, last: bool) -> Result<(), Stop> {
        let max = self.config().smtp.message_bytes_max as u64;
        let state = match &self.tx {
            None => Err(Reply::new(503, "5.5.1", "Need MAIL before BDAT")),
            Some(t) if t.rcpts.is_empty() => Err(Reply::new(554, "5.5.1", "No valid recipients")),
            Some(t) if t.chunks_failed => {
                Err(Reply::new(503, "5.5.1", "Earlier BDAT failed; send RSET"))
            }
            Some(_) => Ok(()),
        };
        if size > max {
            // The chunk cannot be accepted, and skipping that many bytes would let a client
            // hold the session forever: close.
            self.reply(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
            return Err(Stop::Close);
        }
        // The chunk follows the command whatever the state, so it is always consumed.
        let mut left = size as usize;
        let fresh = self.content_reader(false);
        let (mut reader, mut body) = match self.tx.as_mut().and_then(|t| t.chunks.take()) {
            Some(c) => c,
            None => (fresh, Vec::new()),
        };
        while left > 0 {
            if self.pos == self.inbuf.len()
                && !self.read_more(self.config().smtp.data_timeout_secs).await?
            {
                return Err(Stop::Close);
            }
            let n = left.min(self.inbuf.len() - self.pos);
            if state.is_ok() {
                reader.feed(&self.inbuf[self.pos..self.pos + n], &mut body);
            }
            self.pos += n;
            left -= n;
        }
        if let Err(r) = state {
            return self.error(r);
        }
        if last {
            reader.finish_chunks(&mut body);
        }
        if let Some(e) = reader.error() {
            if let Some(t) = self.tx.as_mut() {
                t.chunks_failed = true;
            }
            return self.error(e.reply());
        }
        if !last {
            if let Some(t) = self.tx.as_mut() {
                t.chunks = Some((reader, body));
            }
            self.reply(Reply::owned(
                250,
                "2.0.0",
                format!("{size} octets received"),
            ));
            return Ok(());
        }
        self.commit(body).await;
        Ok(())
    }

    /// Stores the message durably, then answers.
    async fn commit(&mut self, content: Vec<u8>) {
        let Some(tx) = self.tx.take() else { return };
        let received_at = now_micros();
        let spool = Rc::clone(&self.ctx.spool);
        let queue_id = spool.borrow_mut().next_queue_id(received_at);
        let qid = queue_id.to_string();
        let hostname = self.config().server.hostname.clone();
        let single_rcpt = (tx.rcpts.len() == 1).then(|| tx.rcpts[0].0.as_str());
        let received = headers::received(&headers::ReceivedInfo {
            helo: self.helo.as_deref().unwrap_or("unknown"),
            client_ip: self.info.peer.ip(),
            hostname: &hostname,
            esmtp: self.esmtp,
            tls: self.conn.tls_info(),
            authenticated: self.user.is_some(),
            queue_id: &qid,
            sender: &tx.from,
            single_rcpt,
            unix_secs: received_at / 1_000_000,
        });
        let mut body = Vec::with_capacity(received.len() + 80 + content.len());
        body.extend_from_slice(received.as_bytes());
        if self.config().smtp.add_message_id && !headers::has_message_id(&content) {
            body.extend_from_slice(headers::message_id(&qid, &hostname).as_bytes());
        }
        body.extend_from_slice(&content);
        drop(content);
        let mut flags = 0;
        if tx.smtputf8 {
            flags |= message_flags::SMTPUTF8;
        }
        match tx.body {
            Some(Body::EightBitMime) => flags |= message_flags::BODY_8BITMIME,
            Some(Body::BinaryMime) => flags |= message_flags::BODY_BINARYMIME,
            _ => {}
        }
        let tenant = self.user.clone().unwrap_or_default();
        let message = Message {
            queue_id,
            received_at_micros: received_at,
            flags,
            dsn_ret: match tx.ret {
                None => DsnRet::Unspecified,
                Some(Ret::Full) => DsnRet::Full,
                Some(Ret::Hdrs) => DsnRet::Headers,
            },
            tenant: &tenant,
            sender: &tx.from,
            envid: tx.envid.as_deref().unwrap_or(""),
            recipients: tx
                .rcpts
                .iter()
                .map(|(a, n, o)| Recipient {
                    notify: *n,
                    orcpt: o,
                    ..Recipient::new(a)
                })
                .collect(),
            body: &body,
        };
        let ticket = spool.borrow_mut().accept(&message);
        let result = match ticket {
            Ok(t) => t.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                let rcpts: Vec<&str> = tx.rcpts.iter().map(|r| r.0.as_str()).collect();
                self.ctx.router.hand_off(self.ctx.shard, queue_id, &rcpts);
                tracing::info!(
                    queue_id = %qid,
                    client = %self.info.peer.ip(),
                    from = %tx.from,
                    rcpts = tx.rcpts.len(),
                    bytes = body.len(),
                    "accepted"
                );
                self.reply(Reply::owned(250, "2.0.0", format!("Ok: queued as {qid}")));
            }
            Err(e) => {
                spool.borrow_mut().abandon(queue_id);
                tracing::error!(error = %e, client = %self.info.peer.ip(), "spool refused a message");
                let (code, enhanced, text) = e.reply();
                self.reply(Reply::new(code, enhanced, text));
            }
        }
    }

    async fn starttls(&mut self) -> Result<(), Stop> {
        if self.conn.is_tls() {
            return self.error(Reply::new(503, "5.5.1", "TLS already active"));
        }
        let Some(tls) = self.ctx.tls.clone().filter(|_| self.starttls_available()) else {
            return self.error(Reply::new(502, "5.5.1", "STARTTLS not available"));
        };
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        if self.flush().await.is_err() {
            return Err(Stop::Close);
        }
        // Anything the client pipelined after STARTTLS arrived in plaintext and is discarded,
        // never answered after the handshake (CVE-2011-0411).
        self.inbuf.clear();
        self.pos = 0;
        let Conn::Plain(stream) = std::mem::replace(&mut self.conn, Conn::Closed) else {
            return Err(Stop::Close);
        };
        let config = tls.borrow_mut().get();
        let handshake = TlsStream::accept(stream, config);
        let timeout = Duration::from_secs(self.config().smtp.command_timeout_secs);
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(t)) => {
                self.conn = Conn::Tls(Box::new(t));
                // RFC 3207 §4.2: forget everything learnt before TLS.
                self.helo = None;
                self.esmtp = false;
                self.user = None;
                self.tx = None;
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.info.peer.ip(), error = %e, "TLS handshake failed");
                Err(Stop::Close)
            }
            Err(_) => Err(Stop::Close),
        }
    }

    async fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Result<(), Stop> {
        if self.ctx.credentials.is_none() {
            return self.error(Reply::new(502, "5.5.1", "AUTH not available"));
        }
        if !self.auth_available() {
            return self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.user.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Already authenticated"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a transaction",
            ));
        }
        let creds = match mechanism {
            "PLAIN" => {
                let resp = match initial {
                    Some(i) if i != "=" => i,
                    _ => match self.sasl_step("").await? {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                };
                auth::decode_plain(&resp)
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i),
                    None => self.sasl_step(&auth::b64("Username:")).await?,
                };
                let Some(user) = user else { return Ok(()) };
                let Some(pass) = self.sasl_step(&auth::b64("Password:")).await? else {
                    return Ok(());
                };
                auth::decode_b64_text(&user).zip(auth::decode_b64_text(&pass))
            }
            _ => {
                return self.error(Reply::new(
                    504,
                    "5.5.4",
                    "Unrecognized authentication mechanism",
                ));
            }
        };
        let Some((user, pass)) = creds else {
            return self.error(Reply::new(501, "5.5.2", "Cannot decode response"));
        };
        let store = Arc::clone(self.ctx.credentials.as_ref().expect("checked at the top"));
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || store.verify(&check_user, &pass))
            .await
            .unwrap_or(false);
        let ip = self.info.peer.ip();
        if ok {
            self.ctx.auth_failures.borrow_mut().remove(&ip);
            tracing::info!(client = %ip, user = %user, "authenticated");
            self.user = Some(user);
            self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            return Ok(());
        }
        let failures = {
            let mut map = self.ctx.auth_failures.borrow_mut();
            if map.len() >= AUTH_FAILURES_TRACKED_MAX && !map.contains_key(&ip) {
                let oldest = map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
            let e = map.entry(ip).or_insert((0, Instant::now()));
            e.0 += 1;
            e.1 = Instant::now();
            e.0
        };
        tracing::warn!(client = %ip, user = %user, failures, "authentication failed");
        // A delay that doubles with each failure from this address slows guessing down.
        let base = self.config().auth.failure_delay_ms;
        let delay = base.saturating_mul(1 << failures.min(6).saturating_sub(1));
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if failures >= self.config().auth.failures_max {
            self.reply(Reply::new(421, "4.7.0", "Too many authentication failures"));
            return Err(Stop::Close);
        }
        self.error(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid",
        ))
    }

    /// Sends a `334` challenge and reads the response line; `None` when the client cancelled.
    async fn sasl_step(&mut self, challenge: &str) -> Result<Option<String>, Stop> {
        self.reply(Reply::owned(334, "", challenge.to_string()));
        let range = match self.next_line().await {
            LineRead::Line(r) => r,
            LineRead::TooLong => {
                self.error(Reply::new(
                    500,
                    "5.5.6",
                    "Authentication exchange line is too long",
                ))?;
                return Ok(None);
            }
            _ => return Err(Stop::Close),
        };
        let line = String::from_utf8_lossy(&self.inbuf[range]).into_owned();
        if line.trim() == "*" {
            self.error(Reply::new(501, "5.0.0", "Authentication cancelled"))?;
            return Ok(None);
        }
        Ok(Some(line))
    }

    /// The next command line (without its line end). Flushes replies before waiting.
    async fn next_line(&mut self) -> LineRead {
        let max = self.config().smtp.command_line_bytes_max;
        let mut discarding = false;
        loop {
            if let Some(i) = self.inbuf[self.pos..].iter().position(|&b| b == b'\n') {
                let start = self.pos;
                let end = start + i;
                self.pos = end + 1;
                if discarding {
                    return LineRead::TooLong;
                }
                let end = if end > start && self.inbuf[end - 1] == b'\r' {
                    end - 1
                } else {
                    end
                };
                if end - start + 2 > max {
                    return LineRead::TooLong;
                }
                return LineRead::Line(start..end);
            }
            if self.inbuf.len() - self.pos > max {
                // Too long already: drop what we have and skip to the end of the line.
                discarding = true;
                self.pos = self.inbuf.len();
            }
            if *self.ctx.shutdown.borrow() {
                return LineRead::Shutdown;
            }
            if self.flush().await.is_err() {
                return LineRead::Eof;
            }
            let timeout = self.config().smtp.command_timeout_secs;
            match self.read_more_cancellable(timeout).await {
                ReadResult::Data => {}
                ReadResult::Eof => return LineRead::Eof,
                ReadResult::Timeout => return LineRead::Timeout,
                ReadResult::Shutdown => return LineRead::Shutdown,
            }
        }
    }

    /// Reads more input after flushing replies (used inside DATA/BDAT). False at end of stream;
    /// a timeout sends `421` and stops the session.
    async fn read_more(&mut self, timeout_secs: u64) -> Result<bool, Stop> {
        if self.flush().await.is_err() {
            return Ok(false);
        }
        match self.read_some(timeout_secs).await {
            ReadResult::Data => Ok(true),
            ReadResult::Eof | ReadResult::Shutdown => Ok(false),
            ReadResult::Timeout => {
                self.reply(Reply::new(421, "4.4.2", "Timeout, closing connection"));
                Err(Stop::Close)
            }
        }
    }

    /// Like `read_some`, but a shutdown signal ends the wait (between commands only: a message
    /// being received is finished first).
    async fn read_more_cancellable(&mut self, timeout_secs: u64) -> ReadResult {
        let mut shutdown = self.ctx.shutdown.clone();
        let wait_shutdown = async move {
            loop {
                if *shutdown.borrow_and_update() {
                    return;
                }
                if shutdown.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            r = self.read_some(timeout_secs) => r,
            () = wait_shutdown => ReadResult::Shutdown,
        }
    }

    async fn read_some(&mut self, timeout_secs: u64) -> ReadResult {
        // Compact: drop consumed bytes so the buffer stays bounded.
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.reserve(READ_CHUNK.min(buf.capacity().max(4096)));
        let read = self.conn.read(buf);
        match tokio::time::timeout(Duration::from_secs(timeout_secs), read).await {
            Ok((Ok(0), buf)) => {
                self.inbuf = buf;
                ReadResult::Eof
            }
            Ok((Ok(_), buf)) => {
                self.inbuf = buf;
                ReadResult::Data
            }
            Ok((Err(_), buf)) => {
                self.inbuf = buf;
                ReadResult::Eof
            }
            Err(_) => ReadResult::Timeout,
        }
    }
}

enum ReadResult {
    Data,
    Eof,
    Timeout,
    Shutdown,
}
