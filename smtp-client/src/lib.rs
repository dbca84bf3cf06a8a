//! `smtp-client`: one outbound SMTP connection: banner, EHLO (HELO fallback), STARTTLS by policy,
//! then any number of transactions on the same connection (PIPELINING and CHUNKING when offered),
//! RSET between them, QUIT at the end.
//!
//! Every wait is bounded by a timeout (RFC 5321 §4.5.3.2 defaults in [`Timeouts`]); every error
//! says whether it concerns the connection (try the next MX, retry later) or the message.
//!
//! Not here: which hosts to try, queues, retries, the spool (the daemon's delivery).

use std::sync::Arc;
use std::time::{Duration, Instant};

use saida_net::tls::TlsStream;
use saida_net::{Conn, Stream};
use smtp_proto::client::{
    Capabilities, Envelope, EnvelopeError, EnvelopeOutcome, REPLY_LINE_BYTES_MAX, REPLY_LINES_MAX,
    ReplyError, ServerReply, dot_stuff, match_envelope_replies, parse_reply, transaction_commands,
};

/// Client timeouts (RFC 5321 §4.5.3.2).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Banner, EHLO, MAIL, RCPT, RSET, QUIT replies (5 minutes in the RFC).
    pub command: Duration,
    /// The reply to DATA (2 minutes).
    pub data_start: Duration,
    /// Each write of content (3 minutes per block).
    pub data_block: Duration,
    /// The reply after the end of data (10 minutes).
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(300),
            data_start: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_end: Duration::from_secs(600),
        }
    }
}

/// Per-destination TLS policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS when offered, any certificate; plain text otherwise.
    Opportunistic,
    /// STARTTLS must succeed; any certificate.
    Required,
    /// STARTTLS must succeed with a certificate that chains to a trusted root and names the host.
    Verified,
}

/// How to set up a connection.
pub struct ClientSetup {
    pub helo_name: String,
    /// This server's own host name (its banner's): a peer greeting with it, or with
    /// `helo_name`, is this server (a mail loop).
    pub own_name: String,
    pub policy: TlsPolicy,
    /// Client TLS configuration matching the policy (see `io::tls::client_config_*`).
    pub tls: Arc<rustls::ClientConfig>,
    /// The MX host name, for SNI and certificate checks.
    pub server_name: String,
    pub timeouts: Timeouts,
    /// Whether to use STARTTLS when offered. Only `Opportunistic` may turn it off: the caller
    /// does so to retry a host whose TLS handshake failed ([`ClientError::is_tls_failure`]),
    /// since plain text beats no delivery under that policy (RFC 7435).
    pub use_starttls: bool,
}

/// Why a connection or a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error or end of stream: the connection is unusable; try the next host.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A wait ran out: the connection is unusable.
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    /// The server sent something that is not SMTP.
    #[error("protocol: {0}")]
    Protocol(#[from] ReplyError),
    /// The server refused the session (banner or EHLO/HELO); a 4xx or 421 tries the next host.
    #[error("session refused: {}", .0.summary())]
    Refused(ServerReply),
    /// TLS was required by policy and not offered, or the handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The envelope cannot be sent to this server (size, SMTPUTF8, address).
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// The peer greets with our own host name: a route or MX points back at this server (a
    /// mail loop). Nothing is sent; the recipients are deferred with this reason.
    #[error("mail loop: {what} names this server ({name})")]
    Loop { what: &'static str, name: String },
    /// A reply that the command cannot have (a `2xx` to `DATA` instead of `354`): the server's
    /// state is unknown, nothing counts as delivered, and the connection is dropped.
    #[error("unexpected reply to {command}: {}", .reply.summary())]
    Unexpected {
        command: &'static str,
        reply: ServerReply,
    },
}

impl ClientError {
    /// True when the failure is the connection's (try another MX or later), false when it is
    /// the message's (another server would say the same).
    pub fn is_connection_failure(&self) -> bool {
        !matches!(self, ClientError::Envelope(_))
    }

    /// True when TLS failed; under `Opportunistic` the caller retries without STARTTLS.
    pub fn is_tls_failure(&self) -> bool {
        matches!(self, ClientError::Tls(_))
    }
}

/// How long each phase of the last session set-up or transaction took (for the latency
/// histograms). With a one-write transaction, `mail`, `rcpt` and `end_of_data` count from the end
/// of the write to each reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    pub banner: Option<Duration>,
    pub ehlo: Option<Duration>,
    pub tls_handshake: Option<Duration>,
    pub mail: Option<Duration>,
    pub rcpt: Option<Duration>,
    pub data: Option<Duration>,
    pub end_of_data: Option<Duration>,
}

/// The result of one transaction.
#[derive(Debug)]
pub struct Delivery {
    /// Per recipient: the RCPT reply if it was refused, else the end-of-data reply.
    pub replies: Vec<ServerReply>,
}

/// An established client session.
pub struct ClientSession<S: Stream> {
    conn: Conn<S>,
    inbuf: Vec<u8>,
    pub caps: Capabilities,
    timeouts: Timeouts,
    /// Transactions sent on this connection.
    pub transactions: u64,
    /// Phase timings of the set-up (after `start`) or of the last transaction (after `send`).
    pub phases: Phases,
    /// An error left the conversation in an unknown state: the connection must not be reused.
    broken: bool,
    /// The last transaction did not end with an end-of-data reply: the next one starts with
    /// RSET (a completed transaction leaves the server ready for MAIL, RFC 5321 4.1.1.4).
    needs_rset: bool,
    /// The next transaction's envelope (`MAIL`, `RCPT`s, `DATA`), written after the last
    /// content in the same write (RFC 2920), whose replies are still to be read: its sender
    /// and recipient count, which the next `send` must be for.
    pending: Option<(String, usize)>,
}

/// RCPT commands sent in one pipelined write: RFC 2920 §3.1 warns that a server may stop
/// reading while its replies pile up unread, so long envelopes go in groups.
const RCPTS_PER_WRITE_MAX: usize = 100;
/// Content is written in pieces of this size, each under its own data-block timeout.
const DATA_WRITE_BYTES: usize = 64 << 10;

/// Fails with [`ClientError::Loop`] when the first word of `reply` (the server's name in a
/// banner or an EHLO greeting) is `own` (this server's host name).
fn check_not_self(reply: &ServerReply, what: &'static str, own: &str) -> Result<(), ClientError> {
    let name = reply
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    if !own.is_empty() && name.eq_ignore_ascii_case(own) {
        return Err(ClientError::Loop {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

impl<S: Stream> ClientSession<S> {
    /// Reads the banner, says EHLO (HELO if EHLO is refused) and applies the TLS policy.
    pub async fn start(stream: S, setup: &ClientSetup) -> Result<Self, ClientError> {
        let mut s = ClientSession {
            conn: Conn::Plain(stream),
            inbuf: Vec::with_capacity(4096),
            caps: Capabilities::default(),
            timeouts: setup.timeouts,
            transactions: 0,
            phases: Phases::default(),
            broken: false,
            needs_rset: false,
            pending: None,
        };
        let t = Instant::now();
        let banner = s.reply("the banner", setup.timeouts.command).await?;
        s.phases.banner = Some(t.elapsed());
        if banner.code != 220 {
            return Err(ClientError::Refused(banner));
        }
        check_not_self(&banner, "the banner", &setup.own_name)?;
        check_not_self(&banner, "the banner", &setup.helo_name)?;
        let t = Instant::now();
        s.hello(&setup.helo_name).await?;
        s.phases.ehlo = Some(t.elapsed());
        let plain_allowed = setup.policy == TlsPolicy::Opportunistic;
        let want_tls = !plain_allowed || (s.caps.starttls && setup.use_starttls);
        if want_tls {
            if !s.caps.starttls {
                return Err(ClientError::Tls("STARTTLS not offered".into()));
            }
            s.write(b"STARTTLS\r\n".to_vec()).await?;
            let r = s
                .reply("the STARTTLS reply", setup.timeouts.command)
                .await?;
            if r.code != 220 {
                if setup.policy == TlsPolicy::Opportunistic {
                    // Go on in plain text; the session is still in a defined state.
                    return Ok(s);
                }
                return Err(ClientError::Tls(format!(
                    "STARTTLS refused: {}",
                    r.summary()
                )));
            }
            let name = rustls::pki_types::ServerName::try_from(setup.server_name.clone())
                .map_err(|e| ClientError::Tls(format!("bad server name: {e}")))?;
            let Conn::Plain(stream) = std::mem::replace(&mut s.conn, Conn::Closed) else {
                return Err(ClientError::Tls("not a plain connection".into()));
            };
            s.inbuf.clear();
            let t = Instant::now();
            let handshake = TlsStream::connect(stream, Arc::clone(&setup.tls), name);
            match tokio::time::timeout(setup.timeouts.command, handshake).await {
                Ok(Ok(tls)) => {
                    s.phases.tls_handshake = Some(t.elapsed());
                    s.conn = Conn::Tls(Box::new(tls));
                }
                Ok(Err(e)) => return Err(ClientError::Tls(e.to_string())),
                Err(_) => return Err(ClientError::Timeout("the TLS handshake")),
            }
            s.hello(&setup.helo_name).await?;
        }
        Ok(s)
    }

    /// TLS protocol and cipher when encrypted.
    pub fn tls_info(&self) -> Option<(String, String)> {
        self.conn.tls_info()
    }

    async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        self.write(format!("EHLO {name}\r\n").into_bytes()).await?;
        let r = self.reply("the EHLO reply", self.timeouts.command).await?;
        if r.is_positive() {
            check_not_self(&r, "the EHLO reply", name)?;
            self.caps = Capabilities::from_ehlo(&r);
            return Ok(());
        }
        if r.code == 421 || r.is_transient() {
            return Err(ClientError::Refused(r));
        }
        // RFC 5321 §3.2: a server that does not know EHLO gets HELO.
        self.write(format!("HELO {name}\r\n").into_bytes()).await?;
        let r = self.reply("the HELO reply", self.timeouts.command).await?;
        if !r.is_positive() {
            return Err(ClientError::Refused(r));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// True when the connection may carry another transaction.
    pub fn is_reusable(&self) -> bool {
        !self.broken
    }

    /// Sends one message to the envelope's recipients and returns a reply per recipient. After
    /// any error but an envelope refusal, the connection is marked broken and refuses reuse.
    pub async fn send(
        &mut self,
        env: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Delivery, ClientError> {
        self.send_then(env, message, None).await
    }

    /// Whether [`Self::send_then`] can write the next transaction's envelope with this one's
    /// content: the server pipelines and takes the content over DATA.
    pub fn pipelines_next(&self) -> bool {
        self.caps.pipelining && !self.caps.chunking && !self.broken
    }

    /// [`Self::send`], writing `next`'s envelope (`MAIL`, `RCPT`s, `DATA`) in the same write as
    /// this content's end (RFC 2920: one round trip per transaction over DATA). The next call
    /// must then be `send` for `next` (same sender and recipients); its replies are read there.
    /// If this transaction ends before its content is sent, `next` is not written.
    pub async fn send_then(
        &mut self,
        env: &Envelope<'_>,
        message: &[u8],
        next: Option<&Envelope<'_>>,
    ) -> Result<Delivery, ClientError> {
        if self.broken {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
        }
        let result = self.send_inner(env, message, next).await;
        if matches!(&result, Err(e) if e.is_connection_failure()) {
            self.broken = true;
        }
        result
    }

    async fn send_inner(
        &mut self,
        env: &Envelope<'_>,
        message: &[u8],
        next: Option<&Envelope<'_>>,
    ) -> Result<Delivery, ClientError> {
        let pending = self.pending.take();
        if let Some((sender, n)) = &pending {
            if sender != env.sender || *n != env.recipients.len() {
                // Replies of another envelope are on their way: this one cannot be matched.
                self.broken = true;
                let why = "the envelope sent ahead is not this one";
                return Err(std::io::Error::other(why).into());
            }
        }
        if pending.is_none()
            && self.caps.chunking
            && self.caps.pipelining
            && env.recipients.len() <= RCPTS_PER_WRITE_MAX
        {
            return self.send_one_write(env, message).await;
        }
        let pipelining = self.caps.pipelining;
        // RSET goes in the envelope's write when the server pipelines; an envelope sent ahead
        // followed a completed transaction and needs none.
        let rset = std::mem::replace(&mut self.needs_rset, true) && pending.is_none();
        if rset && !pipelining {
            self.write(b"RSET\r\n".to_vec()).await?;
            let r = self.reply("the RSET reply", self.timeouts.command).await?;
            if r.code == 421 {
                return Ok(self.closing(r, env.recipients.len()));
            }
            if !r.is_positive() {
                return Err(ClientError::Refused(r));
            }
        }
        self.transactions += 1;
        self.phases = Phases::default();
        let started = Instant::now();
        let chunking = self.caps.chunking;
        // DATA is pipelined with the envelope only when PIPELINING is offered.
        let commands = transaction_commands(env, &self.caps, chunking || !pipelining)?;
        let n = env.recipients.len();
        let text = String::from_utf8_lossy(&commands).into_owned();
        let lines: Vec<&str> = text.split_inclusive("\r\n").collect();
        let group = if pipelining { RCPTS_PER_WRITE_MAX } else { 1 };
        let mut replies: Vec<ServerReply> = Vec::with_capacity(n + 1);
        // A 421 to a RCPT: if the connection ends after it, it stands for every recipient.
        let mut closing: Option<ServerReply> = None;
        let mut i = 0;
        while i < lines.len() {
            let end = (i + group).min(lines.len());
            if i > 0 || pending.is_none() {
                let mut out = Vec::with_capacity(text.len() + 6);
                if i == 0 && rset && pipelining {
                    out.extend_from_slice(b"RSET\r\n");
                }
                out.extend(lines[i..end].iter().flat_map(|l| l.bytes()));
                if let Err(e) = self.write(out).await {
                    // A server that answered a RCPT 421 may close before this write.
                    return self.closed_after(closing, e, n);
                }
            }
            if i == 0 && rset && pipelining {
                let r = self.reply("the RSET reply", self.timeouts.command).await?;
                if r.code == 421 {
                    return Ok(self.closing(r, n));
                }
                if !r.is_positive() {
                    return Err(ClientError::Refused(r));
                }
            }
            // Replies to MAIL and RCPT are read here; DATA's, if pipelined, further down.
            for k in i..end.min(1 + n) {
                let r = match self.reply("an envelope reply", self.timeouts.command).await {
                    Ok(r) => r,
                    Err(e) => return self.closed_after(closing, e, n),
                };
                if r.code == 421 {
                    if k == 0 {
                        // MAIL: nothing of the transaction stands.
                        return Ok(self.closing(r, n));
                    }
                    closing = Some(r.clone());
                }
                replies.push(r);
            }
            if self.phases.mail.is_none() {
                self.phases.mail = Some(started.elapsed());
            }
            if !pipelining && !replies[0].is_positive() {
                break; // MAIL refused: no RCPT is sent
            }
            i = end;
        }
        self.phases.rcpt = Some(started.elapsed());
        let mut replies = replies.into_iter();
        let Some(mail) = replies.next() else {
            return Err(ClientError::Refused(ServerReply {
                code: 554,
                enhanced: None,
                lines: vec!["no reply to MAIL".into()],
            }));
        };
        let rcpts: Vec<ServerReply> = replies.collect();
        let (rcpt_replies, proceed) = match match_envelope_replies(mail, rcpts) {
            EnvelopeOutcome::MailRefused(r) => {
                if self.caps.pipelining && !chunking {
                    // The pipelined DATA is answered too (503/554); read it to stay in sync.
                    let data = self
                        .reply("the DATA reply", self.timeouts.data_start)
                        .await?;
                    if data.code == 354 {
                        // A broken server took DATA without a sender: end the empty content.
                        self.write(b".\r\n".to_vec()).await?;
                        let _ = self
                            .reply("the end-of-data reply", self.timeouts.data_end)
                            .await?;
                    }
                }
                return Ok(Delivery {
                    replies: vec![r; n],
                });
            }
            EnvelopeOutcome::Recipients { replies, proceed } => (replies, proceed),
        };
        let final_reply = if chunking {
            if !proceed {
                return Ok(Delivery {
                    replies: rcpt_replies,
                });
            }
            let head = format!("BDAT {} LAST\r\n", message.len()).into_bytes();
            self.write(head).await?;
            self.write_content(message).await?;
            let t = Instant::now();
            let r = self.reply("the BDAT reply", self.timeouts.data_end).await?;
            self.phases.end_of_data = Some(t.elapsed());
            self.needs_rset = false;
            r
        } else {
            if !self.caps.pipelining && proceed {
                if let Err(e) = self.write(b"DATA\r\n".to_vec()).await {
                    return self.closed_after(closing, e, n);
                }
            }
            if !self.caps.pipelining && !proceed {
                return Ok(Delivery {
                    replies: rcpt_replies,
                });
            }
            let t = Instant::now();
            let go = match self.reply("the DATA reply", self.timeouts.data_start).await {
                Ok(r) => r,
                Err(e) => return self.closed_after(closing, e, n),
            };
            self.phases.data = Some(t.elapsed());
            if go.is_positive() {
                // "Accepted" without the content ever being sent: not a delivery.
                return Err(ClientError::Unexpected {
                    command: "DATA",
                    reply: go,
                });
            }
            if go.code != 354 {
                let replies = rcpt_replies
                    .into_iter()
                    .map(|r| if r.is_positive() { go.clone() } else { r })
                    .collect();
                return Ok(Delivery { replies });
            }
            if !proceed {
                // PIPELINING sent DATA although every RCPT failed and the server said 354: end
                // the empty data so the connection stays usable.
                self.write(b".\r\n".to_vec()).await?;
                let _ = self
                    .reply("the end-of-data reply", self.timeouts.data_end)
                    .await?;
                return Ok(Delivery {
                    replies: rcpt_replies,
                });
            }
            let mut out = Vec::new();
            dot_stuff(message, &mut out);
            // The next envelope rides on the content's last write, if it fits in one group.
            let ahead = next
                .filter(|e| {
                    pipelining && !chunking && e.recipients.len() + 2 <= RCPTS_PER_WRITE_MAX
                })
                .and_then(|e| {
                    let commands = transaction_commands(e, &self.caps, false).ok()?;
                    Some((commands, e.sender.to_string(), e.recipients.len()))
                });
            if let Some((commands, _, _)) = &ahead {
                out.extend_from_slice(commands);
            }
            if out.len() <= DATA_WRITE_BYTES {
                // One write of the buffer as it is (no copy into write pieces).
                self.write_timed(out, self.timeouts.data_block).await?;
            } else {
                self.write_content(&out).await?;
            }
            let t = Instant::now();
            let r = self
                .reply("the end-of-data reply", self.timeouts.data_end)
                .await?;
            self.phases.end_of_data = Some(t.elapsed());
            self.needs_rset = false;
            if r.code == 421 {
                // Closing: the envelope sent ahead will not be answered.
                self.broken = true;
            } else if let Some((_, sender, n)) = ahead {
                self.pending = Some((sender, n));
            }
            r
        };
        let replies = rcpt_replies
            .into_iter()
            .map(|r| {
                if r.is_positive() {
                    final_reply.clone()
                } else {
                    r
                }
            })
            .collect();
        Ok(Delivery { replies })
    }

    /// The whole transaction in one write (RFC 2920 with RFC 3030): RSET (from the second
    /// transaction on), MAIL, every RCPT, `BDAT <size> LAST` and the content; then the replies,
    /// in order. One round trip per message. When every recipient is refused the server refuses
    /// the BDAT too and its content is discarded.
    async fn send_one_write(
        &mut self,
        env: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Delivery, ClientError> {
        let commands = transaction_commands(env, &self.caps, true)?;
        let rset = std::mem::replace(&mut self.needs_rset, true);
        self.transactions += 1;
        let mut head =
            Vec::with_capacity(commands.len() + 32 + message.len().min(DATA_WRITE_BYTES));
        if rset {
            head.extend_from_slice(b"RSET\r\n");
        }
        head.extend_from_slice(&commands);
        head.extend_from_slice(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
        if message.len() <= DATA_WRITE_BYTES {
            head.extend_from_slice(message);
            self.write_timed(head, self.timeouts.data_block).await?;
        } else {
            self.write(head).await?;
            self.write_content(message).await?;
        }
        let written = Instant::now();
        self.phases = Phases::default();
        let n = env.recipients.len();
        if rset {
            let r = self.reply("the RSET reply", self.timeouts.command).await?;
            if r.code == 421 {
                return Ok(self.closing(r, n));
            }
            if !r.is_positive() {
                return Err(ClientError::Refused(r));
            }
        }
        let mail = self.reply("the MAIL reply", self.timeouts.command).await?;
        self.phases.mail = Some(written.elapsed());
        if mail.code == 421 {
            return Ok(self.closing(mail, n));
        }
        // A 421 to a RCPT may be followed by the rest of the replies, or by the end of the
        // connection: then that 421 stands for every recipient.
        let mut closing = None;
        let mut rcpts = Vec::with_capacity(n);
        for _ in 0..n {
            let r = match self.reply("a RCPT reply", self.timeouts.command).await {
                Ok(r) => r,
                Err(e) => return self.closed_after(closing, e, n),
            };
            if r.code == 421 {
                closing = Some(r.clone());
            }
            rcpts.push(r);
        }
        self.phases.rcpt = Some(written.elapsed());
        let last = match self.reply("the BDAT reply", self.timeouts.data_end).await {
            Ok(r) => r,
            Err(e) => return self.closed_after(closing, e, n),
        };
        if last.code == 421 {
            self.broken = true;
        }
        self.phases.end_of_data = Some(written.elapsed());
        let replies = match match_envelope_replies(mail, rcpts) {
            EnvelopeOutcome::MailRefused(r) => vec![r; n],
            EnvelopeOutcome::Recipients { replies, proceed } => {
                // The content went to accepted recipients: its reply ended the transaction.
                self.needs_rset = !proceed;
                replies
                    .into_iter()
                    .map(|r| if r.is_positive() { last.clone() } else { r })
                    .collect()
            }
        };
        Ok(Delivery { replies })
    }

    /// A `421` during the transaction: the server is closing the channel (RFC 5321 4.2.2), so
    /// no further reply will come; every recipient gets that reply and the session is done.
    fn closing(&mut self, r: ServerReply, n: usize) -> Delivery {
        self.broken = true;
        Delivery {
            replies: vec![r; n],
        }
    }

    /// A read failed after a `421` (`closing`): the server closed as that reply said, and it
    /// stands for every recipient; without one, the failure is the error.
    fn closed_after(
        &mut self,
        closing: Option<ServerReply>,
        e: ClientError,
        n: usize,
    ) -> Result<Delivery, ClientError> {
        match closing {
            Some(r) if e.is_connection_failure() => Ok(self.closing(r, n)),
            _ => Err(e),
        }
    }

    /// Says QUIT and closes (errors ignored: the transactions are already decided).
    pub async fn quit(mut self) {
        // An envelope sent ahead may have been answered 354: a QUIT now would be content. A
        // close without the end of data makes the server drop that transaction.
        if self.pending.is_none() && self.write(b"QUIT\r\n".to_vec()).await.is_ok() {
            let _ = self.reply("the QUIT reply", Duration::from_secs(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.conn.shutdown()).await;
    }

    /// Writes content in `DATA_WRITE_BYTES` pieces, each bounded by the data-block timeout, so a
    /// slow but moving link finishes a large message.
    async fn write_content(&mut self, content: &[u8]) -> Result<(), ClientError> {
        let mut buf = Vec::with_capacity(DATA_WRITE_BYTES);
        for piece in content.chunks(DATA_WRITE_BYTES) {
            buf.clear();
            buf.extend_from_slice(piece);
            let out = std::mem::take(&mut buf);
            match tokio::time::timeout(self.timeouts.data_block, self.conn.write_all(out)).await {
                Ok((r, back)) => {
                    r?;
                    buf = back;
                }
                Err(_) => return Err(ClientError::Timeout("a data block write")),
            }
        }
        Ok(())
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.write_timed(bytes, self.timeouts.command).await
    }

    async fn write_timed(&mut self, bytes: Vec<u8>, timeout: Duration) -> Result<(), ClientError> {
        match tokio::time::timeout(timeout, self.conn.write_all(bytes)).await {
            Ok((r, _)) => Ok(r?),
            Err(_) => Err(ClientError::Timeout("a write")),
        }
    }

    async fn reply(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<ServerReply, ClientError> {
        // One deadline for the whole reply: a server dribbling bytes cannot stretch it.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut parse = true;
        loop {
            // Parse only when a new line end arrived: re-scanning on every small read would
            // cost the square of the reply's size.
            if parse {
                if let Some((reply, used)) = parse_reply(&self.inbuf)? {
                    self.inbuf.drain(..used);
                    return Ok(reply);
                }
            }
            let before = self.inbuf.len();
            let mut buf = std::mem::take(&mut self.inbuf);
            buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.conn.read(buf)).await {
                Ok((Ok(0), _)) => {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                Ok((Ok(_), buf)) => self.inbuf = buf,
                Ok((Err(e), _)) => return Err(e.into()),
                Err(_) => return Err(ClientError::Timeout(what)),
            }
            parse = self.inbuf[before..].contains(&b'\n');
            // A reply can never be longer than this; a server streaming bytes without line
            // ends must not grow the buffer until the deadline.
            if !parse && self.inbuf.len() > REPLY_LINE_BYTES_MAX * REPLY_LINES_MAX {
                return Err(ReplyError::LineTooLong.into());
            }
        }
    }
}
