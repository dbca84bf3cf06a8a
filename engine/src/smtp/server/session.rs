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
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool::{DsnRet, Message, Recipient, Spool, message_flags, now_micros};
use tokio::sync::watch;

use crate::auth::{self, Credentials};
use crate::config::{BareLineEnds, Config, ListenerTls};
use crate::smtp::server::inflight::{Charge, InflightBudget};
use saida_net::tls::{ReloadingTls, TlsStream};
use saida_net::{Conn, Stream};
use smtp_proto::command::{Body, Command, Ret, parse_command};
use smtp_proto::content::{BareLineEnd, ContentReader, Progress};
use smtp_proto::headers;
use smtp_proto::line::{LineReceiver, Scan};
use smtp_proto::reply::Reply;

/// Largest read per call.
const READ_CHUNK: usize = 64 << 10;
/// Longest AUTH exchange line (RFC 4954 §4: at least 12288 octets must be accepted).
const AUTH_LINE_BYTES_MAX: usize = 12_288;

/// What a shard shares with all its sessions.
pub struct ShardContext {
    pub config: Arc<Config>,
    pub shard: u16,
    pub spool: Rc<RefCell<Spool>>,
    pub tls: Option<Rc<RefCell<ReloadingTls>>>,
    pub credentials: Option<Arc<Credentials>>,
    /// Failed AUTH attempts per client address, shared by all shards.
    pub auth_throttle: Arc<auth::AuthThrottle>,
    /// Flips to true on SIGTERM.
    pub shutdown: watch::Receiver<bool>,
    /// Hands accepted recipients to the shards owning their domains.
    pub router: crate::mesh::Router,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Message bytes all sessions may hold in memory at once.
    pub inflight: Arc<InflightBudget>,
    /// Configured tenants and their quotas, shared by all shards.
    pub tenants: Arc<crate::tenant::Tenants>,
    /// DKIM signing keys, shared by all shards (reloaded in the background).
    pub dkim: Arc<saida_dkim::Keyring>,
    /// Addresses never to be mailed, shared by all shards.
    pub suppressions: Arc<crate::suppression::Suppressions>,
}

/// Facts about the connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub listener_tls: ListenerTls,
    /// Admitted into the connection reserve: must authenticate within
    /// `[smtp] reserved_slot_auth_secs` or is closed.
    pub reserved_slot: bool,
}

/// Time given to the last write of a session whose hard deadline has passed.
const FINAL_WRITE_SECS: u64 = 5;

/// The deadline of one message transfer (DATA, or one BDAT chunk): `data_timeout_secs` plus
/// the time its bytes take at `data_rate_min_bytes_per_sec`. A client trickling bytes cannot
/// stretch a transfer past it.
struct TransferClock {
    start: Instant,
    grace: Duration,
    rate: u64,
}

impl TransferClock {
    fn start(config: &Config) -> TransferClock {
        TransferClock {
            start: Instant::now(),
            grace: Duration::from_secs(config.smtp.data_timeout_secs),
            rate: config.smtp.data_rate_min_bytes_per_sec.max(1),
        }
    }

    /// When the transfer must have gone further than `received` bytes.
    fn deadline(&self, received: u64) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.rate as f64);
        self.start + self.grace + earned
    }
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
    chunks: Option<(ContentReader, Vec<u8>, Charge)>,
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
    /// `session_lifetime_secs` after the connection was accepted.
    ends_at: Instant,
}

impl<S: Stream> Session<S> {
    /// A session on an accepted connection (already TLS for implicit-TLS listeners).
    pub fn new(ctx: Rc<ShardContext>, info: ConnInfo, conn: Conn<S>) -> Self {
        let ends_at = Instant::now() + Duration::from_secs(ctx.config.smtp.session_lifetime_secs);
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
            ends_at,
        }
    }

    fn config(&self) -> &Config {
        &self.ctx.config
    }

    fn reply(&mut self, r: Reply) {
        r.encode(&mut self.out);
    }

    /// Sends buffered replies. Bounded by the command timeout: a client that stops reading
    /// cannot hold its connection slot forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let deadline = self.command_deadline();
        match tokio::time::timeout_at(deadline.into(), self.conn.write_all(out)).await {
            Ok((r, mut out)) => {
                out.clear();
                self.out = out;
                r
            }
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Runs the session to its end. Never panics on input; I/O errors end it quietly.
    pub async fn run(mut self) {
        let greeting = format!("{} ESMTP saida", self.config().server.hostname);
        self.reply(Reply::owned(220, "", greeting));
        let why = self.command_loop().await;
        if let Stop::Quit = why {
            let _ = self.flush().await;
        }
        if self.flush().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), self.conn.shutdown()).await;
        }
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
                    let r = self.timeout_reply();
                    self.reply(r);
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

    fn mail(&mut self, from: &str, p: smtp_proto::command::MailParams<'_>) -> Result<(), Stop> {
        if *self.ctx.shutdown.borrow() {
            // No new transaction once shutdown has begun.
            self.reply(Reply::new(421, "4.3.2", "Service shutting down"));
            return Err(Stop::Close);
        }
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
        if p.body == Some(Body::BinaryMime) {
            // Not advertised: binary content would fail the line checks that stop smuggling.
            return self.error(Reply::new(555, "5.5.4", "BODY=BINARYMIME not supported"));
        }
        if p.size
            .is_some_and(|s| s > self.config().smtp.message_bytes_max as u64)
        {
            return self.error(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if let Some(user) = &self.user {
            if !self.config().sender_allowed(user, from) {
                tracing::warn!(client = %self.info.peer.ip(), user = ?user, from = ?from,
                    "sender address not allowed for this user");
                return self.error(Reply::new(
                    553,
                    "5.7.1",
                    "Sender address not allowed for this user",
                ));
            }
        }
        let ctx = Rc::clone(&self.ctx);
        if let Some(t) = self.user.as_deref().and_then(|u| ctx.tenants.of_user(u)) {
            if !t.sender_allowed(from) {
                tracing::warn!(client = %self.info.peer.ip(), tenant = t.name(), from = ?from,
                    "sender address outside the tenant's domains");
                return self.error(Reply::new(
                    553,
                    "5.7.1",
                    "Sender address not allowed for this account",
                ));
            }
            if let Err(q) = t.admit() {
                ctx.metrics.inc(crate::metrics::Counter::TenantQuota, 1);
                tracing::warn!(client = %self.info.peer.ip(), tenant = t.name(), "{q}");
                self.reply(Reply::owned(452, "4.7.1", q.to_string()));
                return Ok(());
            }
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

    fn rcpt(&mut self, to: &str, p: smtp_proto::command::RcptParams<'_>) -> Result<(), Stop> {
        let max = self.config().smtp.rcpt_per_message_max;
        let may_relay = self.user.is_some() || self.config().may_relay(self.info.peer.ip());
        let auth_offered = self.ctx.credentials.is_some();
        let ctx = Rc::clone(&self.ctx);
        let scope = self
            .user
            .as_deref()
            .and_then(|u| ctx.tenants.of_user(u))
            .map_or("", |t| t.name());
        let suppressed = may_relay && ctx.suppressions.suppressed(scope, to);
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
            self.ctx
                .metrics
                .inc(crate::metrics::Counter::RelayRefused, 1);
            tracing::warn!(client = %self.info.peer.ip(), rcpt = to, "relay refused");
            return self.error(if auth_offered {
                Reply::new(530, "5.7.0", "Authentication required")
            } else {
                Reply::new(554, "5.7.1", "Relay access denied")
            });
        }
        if suppressed {
            let client = self.info.peer.ip();
            tracing::info!(%client, rcpt = to, "suppressed recipient refused");
            self.reply(Reply::new(
                550,
                "5.1.1",
                "Recipient address is on the suppression list",
            ));
            return Ok(());
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
            Some(t) if t.chunks.is_some() || t.chunks_failed => {
                return self.error(Reply::new(503, "5.5.1", "DATA after BDAT"));
            }
            Some(t) if t.body == Some(Body::BinaryMime) => {
                return self.error(Reply::new(503, "5.5.1", "BINARYMIME needs BDAT"));
            }
            Some(_) => {}
        }
        if self.ctx.inflight.spent() {
            self.ctx
                .metrics
                .inc(crate::metrics::Counter::InflightRefused, 1);
            self.reply(smtp_proto::content::no_memory_reply());
            return Ok(());
        }
        self.reply(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        let mut reader = self.content_reader(true);
        let mut body = Vec::with_capacity(4096);
        let mut charge = self.ctx.inflight.charge();
        let clock = TransferClock::start(self.config());
        let mut received = 0u64;
        loop {
            let progress = reader.feed(&self.inbuf[self.pos..], &mut body);
            self.charge_for(&mut charge, &mut reader, &mut body);
            match progress {
                Progress::Done { consumed } => {
                    self.pos += consumed;
                    break;
                }
                Progress::NeedMore => {
                    received += (self.inbuf.len() - self.pos) as u64;
                    self.pos = self.inbuf.len();
                    if !self.read_more(clock.deadline(received)).await? {
                        return Err(Stop::Close);
                    }
                }
            }
        }
        if let Some(e) = reader.error() {
            self.tx = None;
            if e == smtp_proto::content::ContentError::NoMemory {
                // Not the client's fault: not counted as an error.
                self.reply(e.reply());
                return Ok(());
            }
            return self.error(e.reply());
        }
        let stored = self.commit(body).await;
        drop(charge);
        stored
    }

    /// Keeps `charge` covering the buffer `body`; when the memory budget cannot, the content
    /// is refused (`452 4.3.1` at its end) and the buffer freed.
    fn charge_for(&self, charge: &mut Charge, reader: &mut ContentReader, body: &mut Vec<u8>) {
        if reader.error().is_some() {
            charge.release();
            return;
        }
        if !charge.cover(body.capacity()) {
            self.ctx
                .metrics
                .inc(crate::metrics::Counter::InflightRefused, 1);
            let why = "message refused: in-flight memory budget spent";
            tracing::warn!(client = %self.info.peer.ip(), "{why}");
            reader.refuse(smtp_proto::content::ContentError::NoMemory, body);
            charge.release();
        }
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
        let (mut reader, mut body, mut charge) =
            match self.tx.as_mut().and_then(|t| t.chunks.take()) {
                Some(c) => c,
                None => (fresh, Vec::new(), self.ctx.inflight.charge()),
            };
        if body.is_empty() && reader.error().is_none() && self.ctx.inflight.spent() {
            // A new message while the budget is spent: its chunks are read and dropped.
            reader.refuse(smtp_proto::content::ContentError::NoMemory, &mut body);
        }
        let clock = TransferClock::start(self.config());
        while left > 0 {
            let received = size - left as u64;
            if self.pos == self.inbuf.len() && !self.read_more(clock.deadline(received)).await? {
                return Err(Stop::Close);
            }
            let n = left.min(self.inbuf.len() - self.pos);
            if state.is_ok() {
                reader.feed(&self.inbuf[self.pos..self.pos + n], &mut body);
                self.charge_for(&mut charge, &mut reader, &mut body);
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
            if e == smtp_proto::content::ContentError::NoMemory {
                self.reply(e.reply());
                return Ok(());
            }
            return self.error(e.reply());
        }
        if !last {
            if let Some(t) = self.tx.as_mut() {
                t.chunks = Some((reader, body, charge));
            }
            self.reply(Reply::owned(
                250,
                "2.0.0",
                format!("{size} octets received"),
            ));
            return Ok(());
        }
        self.commit(body).await
    }

    /// Stores the message durably, then answers. A `421` (the spool is shutting down) ends
    /// the session, as RFC 5321 requires.
    async fn commit(&mut self, mut content: Vec<u8>) -> Result<(), Stop> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let eod = std::time::Instant::now();
        let hops = headers::received_count(&content);
        if hops >= self.config().smtp.received_headers_max {
            tracing::warn!(
                client = %self.info.peer.ip(),
                sender = %tx.from,
                hops,
                "message refused: mail loop"
            );
            self.reply(Reply::owned(554, "5.4.6", headers::loop_refusal(hops)));
            return Ok(());
        }
        if self.ctx.router.queues_full() {
            self.ctx
                .metrics
                .inc(crate::metrics::Counter::RejectedQueueFull, 1);
            tracing::warn!(client = %self.info.peer.ip(), "delivery queues full; message refused");
            self.reply(Reply::new(
                452,
                "4.3.1",
                "Too much mail queued; try again later",
            ));
            return Ok(());
        }
        let ctx = Rc::clone(&self.ctx);
        let account = self.user.as_deref().and_then(|u| ctx.tenants.of_user(u));
        if let Some(t) = account.filter(|t| !t.header_from_allowed(&content)) {
            tracing::warn!(client = %self.info.peer.ip(), tenant = t.name(),
                "From: header outside the tenant's domains");
            self.reply(Reply::new(
                553,
                "5.7.1",
                "From: header address not allowed for this account",
            ));
            return Ok(());
        }
        let chosen = headers::take_field(&mut content, crate::tenant::POOL_HEADER);
        if let Some(pool) = &chosen {
            if !account.is_some_and(|t| t.pool_allowed(pool)) {
                tracing::warn!(client = %self.info.peer.ip(), pool = ?pool,
                    "message refused: pool not allowed");
                self.reply(Reply::owned(
                    553,
                    "5.7.1",
                    format!("Pool {pool:?} not allowed for this account"),
                ));
                return Ok(());
            }
        }
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
        let signing = &ctx.config.signing.dkim_also;
        let body = match crate::intake::dkim_sign(
            &ctx.dkim,
            signing,
            &ctx.tenants,
            account,
            &ctx.metrics,
            ctx.shard,
            body,
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, queue_id = %qid, "message refused: not signed");
                let (code, enhanced, text) = e.reply();
                self.reply(Reply::new(code, enhanced, text));
                return Ok(());
            }
        };
        let mut flags = 0;
        if tx.smtputf8 {
            flags |= message_flags::SMTPUTF8;
        }
        match tx.body {
            Some(Body::EightBitMime) => flags |= message_flags::BODY_8BITMIME,
            Some(Body::BinaryMime) => flags |= message_flags::BODY_BINARYMIME,
            _ => {}
        }
        let tenant = match account {
            Some(t) => crate::tenant::record_field(t.name(), chosen.as_deref()),
            // `user:` keeps a user's name from ever reading as a tenant's.
            None => self
                .user
                .as_ref()
                .map_or(String::new(), |u| format!("user:{u}")),
        };
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
        let appended = std::time::Instant::now();
        let result = crate::intake::commit(&spool, &message, account).await;
        self.ctx.metrics.record(
            self.ctx.shard,
            crate::metrics::Hist::SpoolCommit,
            appended.elapsed().as_micros() as u64,
        );
        match result {
            Ok(base) => {
                let m = &self.ctx.metrics;
                m.inc(crate::metrics::Counter::MessagesAccepted, 1);
                m.inc(
                    crate::metrics::Counter::RecipientsAccepted,
                    tx.rcpts.len() as u64,
                );
                m.inc(crate::metrics::Counter::BytesIn, body.len() as u64);
                m.record(
                    self.ctx.shard,
                    crate::metrics::Hist::Ack,
                    eod.elapsed().as_micros() as u64,
                );
                crate::intake::hand_off(&self.ctx.router, self.ctx.shard, &message, base).await;
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
                self.ctx
                    .metrics
                    .inc(crate::metrics::Counter::RejectedSpool, 1);
                let client = self.info.peer.ip();
                tracing::error!(error = %e, %client, "spool refused a message");
                let (code, enhanced, text) = e.reply();
                self.reply(Reply::new(code, enhanced, text));
                if code == 421 {
                    return Err(Stop::Close);
                }
            }
        }
        Ok(())
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
        let deadline = self.command_deadline();
        match tokio::time::timeout_at(deadline.into(), handshake).await {
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
        let ip = self.info.peer.ip();
        let (failures_max, concurrent_max) = {
            let a = &self.config().auth;
            (a.failures_max, a.concurrent_per_ip_max)
        };
        let mut attempt = match self
            .ctx
            .auth_throttle
            .begin(ip, failures_max, concurrent_max)
        {
            Ok(a) => a,
            Err(auth::AuthRefusal::TooManyFailures) => {
                tracing::warn!(client = %ip, "authentication refused: too many recent failures");
                self.reply(Reply::new(421, "4.7.0", "Too many authentication failures"));
                return Err(Stop::Close);
            }
            Err(auth::AuthRefusal::TooManyConcurrent) => {
                tracing::warn!(client = %ip, "authentication refused: too many at once");
                return self.error(Reply::new(
                    454,
                    "4.7.0",
                    "Too many authentication attempts at once from your address",
                ));
            }
        };
        let creds = match mechanism {
            "PLAIN" => {
                let resp = match initial {
                    Some(i) if i != "=" => i,
                    _ => match self.sasl_step("").await? {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                };
                smtp_proto::sasl::decode_plain(&resp)
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i),
                    None => self.sasl_step(&smtp_proto::sasl::b64("Username:")).await?,
                };
                let Some(user) = user else { return Ok(()) };
                let Some(pass) = self.sasl_step(&smtp_proto::sasl::b64("Password:")).await? else {
                    return Ok(());
                };
                smtp_proto::sasl::decode_b64_text(&user)
                    .zip(smtp_proto::sasl::decode_b64_text(&pass))
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
        // Counted before verifying: parallel connections cannot guess in parallel.
        let failures = attempt.count();
        let ok = {
            // At most `verify` verifications at once, across all shards.
            let Ok(_permit) = self.ctx.auth_throttle.verify.acquire().await else {
                return Err(Stop::Close);
            };
            let verify = tokio::task::spawn_blocking(move || store.verify(&check_user, &pass));
            verify.await.unwrap_or(false)
        };
        if ok {
            attempt.succeeded();
            tracing::info!(client = %ip, user = ?user, "authenticated");
            self.user = Some(user);
            self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            return Ok(());
        }
        self.ctx
            .metrics
            .inc(crate::metrics::Counter::AuthFailures, 1);
        tracing::warn!(client = %ip, user = ?user, failures, "authentication failed");
        // A delay that doubles with each failure from this address slows guessing down.
        let base = self.config().auth.failure_delay_ms;
        let delay = base.saturating_mul(1 << failures.min(6).saturating_sub(1));
        let until = (Instant::now() + Duration::from_millis(delay)).min(self.hard_deadline());
        tokio::time::sleep_until(until.into()).await;
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
        let range = match self.next_line_max(AUTH_LINE_BYTES_MAX).await {
            LineRead::Line(r) => r,
            LineRead::TooLong => {
                self.error(Reply::new(
                    500,
                    "5.5.6",
                    "Authentication exchange line is too long",
                ))?;
                return Ok(None);
            }
            LineRead::Timeout => {
                let r = self.timeout_reply();
                self.reply(r);
                return Err(Stop::Close);
            }
            LineRead::Shutdown => {
                self.reply(Reply::new(421, "4.3.2", "Service shutting down"));
                return Err(Stop::Close);
            }
            LineRead::Eof => return Err(Stop::Close),
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
        self.next_line_max(self.config().smtp.command_line_bytes_max)
            .await
    }

    /// When the session must end whatever it is doing: its lifetime, or for a client in the
    /// connection reserve that has not authenticated, `reserved_slot_auth_secs` after the start.
    fn hard_deadline(&self) -> Instant {
        if self.info.reserved_slot && self.user.is_none() {
            let lifetime = Duration::from_secs(self.config().smtp.session_lifetime_secs);
            let probation = Duration::from_secs(self.config().smtp.reserved_slot_auth_secs);
            return self.ends_at.min(self.ends_at - lifetime + probation);
        }
        self.ends_at
    }

    /// `command_timeout_secs` from now, or the session's hard deadline if sooner (but at least
    /// `FINAL_WRITE_SECS` from now, so that the `421` saying the deadline passed still goes
    /// out): the bound of a write to the client and of a TLS handshake.
    fn command_deadline(&self) -> Instant {
        let now = Instant::now();
        let timeout = Duration::from_secs(self.config().smtp.command_timeout_secs);
        let hard = self
            .hard_deadline()
            .max(now + Duration::from_secs(FINAL_WRITE_SECS));
        (now + timeout).min(hard)
    }

    /// The `421` for a deadline that passed, saying which.
    fn timeout_reply(&self) -> Reply {
        if Instant::now() < self.hard_deadline() {
            Reply::new(421, "4.4.2", "Timeout, closing connection")
        } else if self.info.reserved_slot && self.user.is_none() {
            Reply::new(
                421,
                "4.7.0",
                "Server busy: remaining connections are for authenticated clients",
            )
        } else {
            Reply::new(421, "4.4.2", "Session lasted too long, closing connection")
        }
    }

    /// The next line of at most `max` octets, CRLF included. The whole line must arrive within
    /// `command_timeout_secs` (not each byte of it).
    async fn next_line_max(&mut self, max: usize) -> LineRead {
        let mut lines = LineReceiver::new(max);
        let line_deadline =
            Instant::now() + Duration::from_secs(self.config().smtp.command_timeout_secs);
        loop {
            let start = self.pos;
            match lines.scan(&self.inbuf[start..]) {
                Scan::Line { line, consumed } => {
                    self.pos += consumed;
                    return LineRead::Line(start + line.start..start + line.end);
                }
                Scan::TooLong { consumed } => {
                    self.pos += consumed;
                    return LineRead::TooLong;
                }
                // Too long already: dropped while reading on to the end of the line.
                Scan::Discard { consumed } => self.pos += consumed,
                Scan::NeedMore => {}
            }
            // At shutdown a transaction under way is let finish (within the grace period); a
            // session between transactions is told 421.
            let in_transaction = self.tx.is_some();
            if !in_transaction && *self.ctx.shutdown.borrow() {
                return LineRead::Shutdown;
            }
            if self.flush().await.is_err() {
                return LineRead::Eof;
            }
            let deadline = line_deadline.min(self.hard_deadline());
            let read = if in_transaction {
                self.read_some(deadline).await
            } else {
                self.read_more_cancellable(deadline).await
            };
            match read {
                ReadResult::Data => {}
                ReadResult::Eof => return LineRead::Eof,
                ReadResult::Timeout => return LineRead::Timeout,
                ReadResult::Shutdown => return LineRead::Shutdown,
            }
        }
    }

    /// Reads more input after flushing replies (used inside DATA/BDAT), waiting at most
    /// `data_timeout_secs` and never past `transfer_deadline` or the session's. False at end
    /// of stream; a timeout sends `421` and stops the session.
    async fn read_more(&mut self, transfer_deadline: Instant) -> Result<bool, Stop> {
        if self.flush().await.is_err() {
            return Ok(false);
        }
        let idle = Instant::now() + Duration::from_secs(self.config().smtp.data_timeout_secs);
        let deadline = idle.min(transfer_deadline).min(self.hard_deadline());
        match self.read_some(deadline).await {
            ReadResult::Data => Ok(true),
            ReadResult::Eof | ReadResult::Shutdown => Ok(false),
            ReadResult::Timeout => {
                let r = if Instant::now() >= transfer_deadline {
                    Reply::new(
                        421,
                        "4.4.2",
                        "Message transfer too slow, closing connection",
                    )
                } else {
                    self.timeout_reply()
                };
                self.reply(r);
                Err(Stop::Close)
            }
        }
    }

    /// Like `read_some`, but a shutdown signal ends the wait (between commands only: a message
    /// being received is finished first).
    async fn read_more_cancellable(&mut self, deadline: Instant) -> ReadResult {
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
            r = self.read_some(deadline) => r,
            () = wait_shutdown => ReadResult::Shutdown,
        }
    }

    async fn read_some(&mut self, deadline: Instant) -> ReadResult {
        // Compact: drop consumed bytes so the buffer stays bounded.
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.reserve(READ_CHUNK.min(buf.capacity().max(4096)));
        let read = self.conn.read(buf);
        match tokio::time::timeout_at(deadline.into(), read).await {
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

/// Transcript tests: an in-memory stream drives a session step by step; each test names the
/// behaviour it proves. Real sockets, TLS and external clients are in tests/.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Router;
    use saida_net::memory::MemoryStream;
    use std::time::Instant;

    struct Outcome {
        replies: Vec<String>,
        bodies: Vec<Vec<u8>>,
        elapsed: Duration,
    }

    fn transcript(config: Config, chunks: &[&[u8]]) -> Outcome {
        transcript_with(config, chunks, None, false)
    }

    fn transcript_with(
        mut config: Config,
        chunks: &[&[u8]],
        credentials: Option<Credentials>,
        hang_at_end: bool,
    ) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        config.spool.dir = dir.path().to_path_buf();
        let inflight_max = config.smtp.inflight_message_bytes_max;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let (spool, _) = Spool::open(config.spool_config(0).unwrap()).unwrap();
            let spool = Rc::new(RefCell::new(spool));
            let (router, _inboxes) = Router::new(1, 1_000_000);
            let (_tx, shutdown) = watch::channel(false);
            let ctx = Rc::new(ShardContext {
                config: Arc::new(config),
                shard: 0,
                spool: Rc::clone(&spool),
                tls: None,
                credentials: credentials.map(Arc::new),
                auth_throttle: Arc::new(auth::AuthThrottle::new(2)),
                shutdown,
                router,
                metrics: Arc::new(crate::metrics::Metrics::new(1)),
                inflight: InflightBudget::new(inflight_max),
                tenants: Arc::default(),
                dkim: Arc::new(saida_dkim::Keyring::empty()),
                suppressions: Arc::new(crate::suppression::Suppressions::in_memory()),
            });
            let stream = MemoryStream {
                hang_at_end,
                ..MemoryStream::default()
            };
            stream
                .input
                .borrow_mut()
                .extend(chunks.iter().map(|c| c.to_vec()));
            let info = ConnInfo {
                peer: "127.0.0.1:40000".parse().unwrap(),
                listener_tls: ListenerTls::StartTls,
                reserved_slot: false,
            };
            let start = Instant::now();
            Session::new(ctx, info, Conn::Plain(stream.clone()))
                .run()
                .await;
            let elapsed = start.elapsed();
            let out = String::from_utf8_lossy(&stream.output.borrow()).into_owned();
            // The final line of each reply ("250 2.1.0 Ok"), in order.
            let replies = out
                .split("\r\n")
                .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
                .map(str::to_string)
                .collect();
            let spool = spool.borrow();
            let bodies = spool
                .live()
                .map(|(id, _)| spool.message(id).unwrap().body.to_vec())
                .collect();
            Outcome {
                replies,
                bodies,
                elapsed,
            }
        })
    }

    /// Code and enhanced code (or first word) of each reply: "250 2.1.0", "354 End".
    fn codes(o: &Outcome) -> Vec<String> {
        o.replies
            .iter()
            .map(|r| r.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// Replies to MAIL, RCPT, DATA, end of data and QUIT of one accepted message.
    const ACCEPTED: [&str; 5] = [
        "250 2.1.0",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "221 2.0.0",
    ];

    const ENVELOPE: &[u8] =
        b"EHLO client.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\n";

    #[test]
    fn pipelined_transaction_gets_replies_in_order_and_is_stored() {
        let o = transcript(
            Config::default(),
            &[ENVELOPE, b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"],
        );
        assert!(o.replies[0].starts_with("220 ") && o.replies[1].starts_with("250 "));
        assert_eq!(codes(&o)[2..], ACCEPTED);
        assert!(
            o.replies[5].starts_with("250 2.0.0 Ok: queued as "),
            "{:?}",
            o.replies
        );
        assert_eq!(o.bodies.len(), 1);
        let body = String::from_utf8_lossy(&o.bodies[0]).into_owned();
        assert!(
            body.starts_with("Received: from client.test ([127.0.0.1])"),
            "{body}"
        );
        assert!(body.contains("\r\nMessage-ID: <"), "{body}");
        assert!(body.ends_with("Subject: x\r\n\r\n.dot\r\n"), "{body}");
    }

    #[test]
    fn ehlo_lists_extensions_without_starttls_or_auth_when_unconfigured() {
        let o = transcript(Config::default(), &[b"EHLO c.test\r\nQUIT\r\n"]);
        assert!(o.replies[1].starts_with("250 DSN"), "{:?}", o.replies);
    }

    #[test]
    fn overlong_command_line_gets_500_and_session_stays_usable() {
        let long = format!("NOOP {}\r\nNOOP\r\nQUIT\r\n", "x".repeat(600));
        let o = transcript(Config::default(), &[long.as_bytes()]);
        assert_eq!(codes(&o)[1..], ["500 5.5.2", "250 2.0.0", "221 2.0.0"]);
    }

    #[test]
    fn overlong_line_split_across_reads_is_refused_once() {
        let part = "x".repeat(400);
        let chunks: Vec<Vec<u8>> = vec![
            format!("NOOP {part}").into(),
            part.clone().into(),
            b"\r\nQUIT\r\n".to_vec(),
        ];
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let o = transcript(Config::default(), &refs);
        assert_eq!(codes(&o)[1..], ["500 5.5.2", "221 2.0.0"]);
    }

    #[test]
    fn nul_in_command_is_refused() {
        let o = transcript(Config::default(), &[b"NOOP \0\r\nQUIT\r\n"]);
        assert_eq!(codes(&o)[1..], ["500 5.5.2", "221 2.0.0"]);
    }

    #[test]
    fn smtp_smuggling_sequence_never_ends_the_message() {
        let data: &[u8] = b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\r\n\
            RCPT TO:<v@x.test>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n";
        let o = transcript(Config::default(), &[ENVELOPE, data]);
        assert_eq!(codes(&o)[4..], ["354 End", "550 5.6.0", "221 2.0.0"]);
        assert!(
            o.bodies.is_empty(),
            "nothing of a refused message is stored"
        );
    }

    #[test]
    fn cr_dot_crlf_is_not_an_end_of_data() {
        let data: &[u8] = b"Subject: x\r\n\r\nhi\r.\r\nstill content\r\n.\r\nQUIT\r\n";
        let o = transcript(Config::default(), &[ENVELOPE, data]);
        assert_eq!(codes(&o)[5..], ["550 5.6.0", "221 2.0.0"]);
    }

    #[test]
    fn bare_lf_is_normalised_when_configured() {
        let mut c = Config::default();
        c.smtp.bare_line_ends = BareLineEnds::Normalize;
        let o = transcript(c, &[ENVELOPE, b"Subject: x\n\nhi\n.\r\n.\r\nQUIT\r\n"]);
        assert_eq!(codes(&o)[5..], ["250 2.0.0", "221 2.0.0"]);
        assert!(
            o.bodies[0].ends_with(b"Subject: x\r\n\r\nhi\r\n.\r\n"),
            "{:?}",
            String::from_utf8_lossy(&o.bodies[0])
        );
    }

    #[test]
    fn nul_in_message_is_refused() {
        let o = transcript(
            Config::default(),
            &[ENVELOPE, b"Subject: x\r\n\r\na\0b\r\n.\r\nQUIT\r\n"],
        );
        assert_eq!(codes(&o)[5..], ["550 5.6.0", "221 2.0.0"]);
    }

    #[test]
    fn overlong_text_line_is_refused() {
        let line = format!("Subject: x\r\n\r\n{}\r\n.\r\nQUIT\r\n", "y".repeat(1001));
        let o = transcript(Config::default(), &[ENVELOPE, line.as_bytes()]);
        assert_eq!(codes(&o)[5..], ["550 5.6.0", "221 2.0.0"]);
    }

    #[test]
    fn declared_and_actual_size_limits_give_552() {
        let mut c = Config::default();
        c.smtp.message_bytes_max = 2048;
        let declared = b"EHLO c.test\r\nMAIL FROM:<a@src.test> SIZE=4096\r\nQUIT\r\n";
        assert_eq!(
            codes(&transcript(c.clone(), &[declared]))[2..],
            ["552 5.3.4", "221 2.0.0"]
        );
        let big = format!("{}\r\n.\r\nQUIT\r\n", "z\r\n".repeat(1000));
        let o = transcript(c, &[ENVELOPE, big.as_bytes()]);
        assert_eq!(codes(&o)[5..], ["552 5.3.4", "221 2.0.0"]);
    }

    #[test]
    fn too_many_recipients_get_452_and_the_rest_is_kept() {
        let mut c = Config::default();
        c.smtp.rcpt_per_message_max = 100;
        let mut s = String::from("EHLO c.test\r\nMAIL FROM:<a@src.test>\r\n");
        for i in 0..101 {
            s.push_str(&format!("RCPT TO:<r{i}@dst.test>\r\n"));
        }
        s.push_str("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n");
        let o = transcript(c, &[s.as_bytes()]);
        let c = codes(&o);
        assert_eq!(c[102], "250 2.1.5");
        assert_eq!(c[103], "452 4.5.3");
        assert_eq!(c[105], "250 2.0.0", "{c:?}");
    }

    #[test]
    fn commands_out_of_sequence_get_503() {
        let o = transcript(
            Config::default(),
            &[
                b"MAIL FROM:<a@b.test>\r\nEHLO c.test\r\nRCPT TO:<x@y.test>\r\nDATA\r\n\
                MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\nQUIT\r\n",
            ],
        );
        assert_eq!(
            codes(&o)[1..],
            [
                "503 5.5.1",
                "250 DSN",
                "503 5.5.1",
                "503 5.5.1",
                "250 2.1.0",
                "503 5.5.1",
                "554 5.5.1",
                "221 2.0.0"
            ]
        );
    }

    #[test]
    fn vrfy_discloses_nothing_and_expn_is_refused() {
        let o = transcript(
            Config::default(),
            &[b"EHLO c.test\r\nVRFY root\r\nEXPN staff\r\nQUIT\r\n"],
        );
        assert_eq!(codes(&o)[2..], ["252 2.5.0", "502 5.5.1", "221 2.0.0"]);
    }

    #[test]
    fn too_many_errors_close_the_session_with_421() {
        let mut c = Config::default();
        c.smtp.errors_per_session_max = 3;
        let o = transcript(c, &[b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n"]);
        assert_eq!(
            codes(&o)[1..],
            ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
        );
    }

    #[test]
    fn too_many_commands_close_the_session_with_421() {
        let mut c = Config::default();
        c.smtp.commands_per_session_max = 10;
        let o = transcript(c, &["NOOP\r\n".repeat(12).as_bytes()]);
        assert_eq!(codes(&o).len(), 1 + 10 + 1);
        assert_eq!(codes(&o).last().unwrap(), "421 4.7.0");
    }

    #[test]
    fn idle_client_times_out_with_421() {
        let mut c = Config::default();
        c.smtp.command_timeout_secs = 1;
        let o = transcript_with(c, &[b"EHLO c.test\r\n"], None, true);
        assert_eq!(codes(&o).last().unwrap(), "421 4.4.2");
        assert!(o.elapsed >= Duration::from_secs(1) && o.elapsed < Duration::from_secs(5));
    }

    #[test]
    fn stalled_data_times_out_with_421() {
        let mut c = Config::default();
        c.smtp.data_timeout_secs = 1;
        let o = transcript_with(c, &[ENVELOPE, b"Subject: x\r\n\r\npartial"], None, true);
        assert_eq!(codes(&o)[4..], ["354 End", "421 4.4.2"]);
    }

    #[test]
    fn relay_is_denied_when_no_network_is_allowed() {
        let mut c = Config::default();
        c.relay.networks.clear();
        let o = transcript(
            c,
            &[b"EHLO c.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nQUIT\r\n"],
        );
        assert_eq!(codes(&o)[3..], ["554 5.7.1", "221 2.0.0"]);
    }

    fn users() -> (tempfile::TempDir, Credentials) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(
            &path,
            format!("alice:{}\n", auth::hash_password("s3cret").unwrap()),
        )
        .unwrap();
        let creds = Credentials::load(&path).unwrap();
        (dir, creds)
    }

    fn plain(user: &str, pass: &str) -> String {
        smtp_proto::sasl::plain_response(user, pass)
    }

    #[test]
    fn relay_needs_authentication_when_auth_is_offered() {
        let mut c = Config::default();
        c.relay.networks.clear();
        c.auth.require_tls = false;
        let (_d, creds) = users();
        let s = format!(
            "EHLO c.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nRSET\r\n\
             AUTH PLAIN {}\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nQUIT\r\n",
            plain("alice", "s3cret")
        );
        let o = transcript_with(c, &[s.as_bytes()], Some(creds), false);
        assert_eq!(o.replies[1], "250 AUTH PLAIN LOGIN");
        assert_eq!(
            codes(&o)[3..],
            [
                "530 5.7.0",
                "250 2.0.0",
                "235 2.7.0",
                "250 2.1.0",
                "250 2.1.5",
                "221 2.0.0"
            ]
        );
    }

    #[test]
    fn auth_is_refused_without_tls_by_default() {
        let (_d, creds) = users();
        let s = format!(
            "EHLO c.test\r\nAUTH PLAIN {}\r\nQUIT\r\n",
            plain("alice", "s3cret")
        );
        let o = transcript_with(Config::default(), &[s.as_bytes()], Some(creds), false);
        assert_eq!(
            o.replies[1], "250 DSN",
            "AUTH must not be advertised in clear text"
        );
        assert_eq!(codes(&o)[2..], ["538 5.7.11", "221 2.0.0"]);
    }

    #[test]
    fn auth_login_exchange_works() {
        let b = smtp_proto::sasl::b64;
        let mut c = Config::default();
        c.auth.require_tls = false;
        let (_d, creds) = users();
        let s = format!(
            "EHLO c.test\r\nAUTH LOGIN\r\n{}\r\n{}\r\nQUIT\r\n",
            b("alice"),
            b("s3cret")
        );
        let o = transcript_with(c, &[s.as_bytes()], Some(creds), false);
        assert_eq!(
            codes(&o)[2..],
            [
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 2.7.0",
                "221 2.0.0"
            ]
        );
    }

    #[test]
    fn auth_failures_are_delayed_more_each_time_then_disconnected() {
        let mut c = Config::default();
        c.auth.require_tls = false;
        c.auth.failure_delay_ms = 100;
        c.auth.failures_max = 3;
        let (_d, creds) = users();
        let bad = plain("alice", "wrong");
        let s = format!(
            "EHLO c.test\r\nAUTH PLAIN {bad}\r\nAUTH PLAIN {bad}\r\nAUTH PLAIN {bad}\r\nNOOP\r\n"
        );
        let o = transcript_with(c, &[s.as_bytes()], Some(creds), false);
        assert_eq!(codes(&o)[2..], ["535 5.7.8", "535 5.7.8", "421 4.7.0"]);
        // 100 + 200 + 400 ms of delay.
        assert!(o.elapsed >= Duration::from_millis(700), "{:?}", o.elapsed);
    }

    #[test]
    fn bdat_chunks_are_assembled() {
        let s: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\n\
            BDAT 14\r\nSubject: x\r\n\r\nBDAT 4 LAST\r\nhi\r\nQUIT\r\n";
        let o = transcript(Config::default(), &[s]);
        assert_eq!(codes(&o)[4..], ["250 2.0.0", "250 2.0.0", "221 2.0.0"]);
        assert!(o.replies[4].contains("14 octets received"));
        assert!(o.bodies[0].ends_with(b"Subject: x\r\n\r\nhi\r\n"));
    }

    #[test]
    fn bdat_without_transaction_still_consumes_its_chunk() {
        let o = transcript(
            Config::default(),
            &[b"EHLO c.test\r\nBDAT 6 LAST\r\nNOOP\r\nQUIT\r\n"],
        );
        assert_eq!(codes(&o)[2..], ["503 5.5.1", "221 2.0.0"]);
    }

    #[test]
    fn binarymime_is_refused_and_data_after_a_failed_bdat_too() {
        let s: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@src.test> BODY=BINARYMIME\r\n\
            MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nBDAT 3\r\na\0bDATA\r\nQUIT\r\n";
        let o = transcript(Config::default(), &[s]);
        assert_eq!(
            codes(&o)[2..],
            [
                "555 5.5.4",
                "250 2.1.0",
                "250 2.1.5",
                "550 5.6.0",
                "503 5.5.1",
                "221 2.0.0"
            ]
        );
    }

    #[test]
    fn control_characters_in_addresses_are_refused() {
        let o = transcript(
            Config::default(),
            &[b"EHLO c.test\r\nMAIL FROM:<\"x\\\rBcc: y\"@d.test>\r\nQUIT\r\n"],
        );
        assert_eq!(codes(&o)[2..], ["500 5.5.2", "221 2.0.0"]);
    }

    #[test]
    fn dsn_parameters_are_accepted() {
        let s: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@src.test> RET=HDRS ENVID=abc\r\n\
            RCPT TO:<b@dst.test> NOTIFY=FAILURE ORCPT=rfc822;b@dst.test\r\n\
            DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n";
        let o = transcript(Config::default(), &[s]);
        assert_eq!(codes(&o)[2..], ACCEPTED);
    }
}
