//! The delivery client (`smtp_client`) against saida's own server sessions on real loopback
//! sockets: greeting, EHLO, STARTTLS by policy, pipelined transactions, BDAT and DATA, the
//! refusals each step can meet.

#[cfg(test)]
mod tests {
    use crate::config::{Config, ListenerTls};
    use crate::mesh::Router;
    use crate::smtp::server::session::{ConnInfo, Session, ShardContext};
    use saida_net::Conn;
    use saida_net::epoll::EpollStream;
    use saida_net::tls::{ReloadingTls, client_config_unverified, client_config_verified};
    use smtp_client::*;
    use smtp_proto::client::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Duration;

    struct Server {
        port: u16,
        spool: Rc<RefCell<spool::Spool>>,
        _dir: tempfile::TempDir,
    }

    async fn server(with_tls: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.spool.dir = dir.path().join("spool");
        config.server.hostname = "mx.test".into();
        let (spool, _) = spool::Spool::open(config.spool_config(0).unwrap()).unwrap();
        let spool = Rc::new(RefCell::new(spool));
        let tls = with_tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
            let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
            std::fs::write(&c, ck.cert.pem()).unwrap();
            std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
            Rc::new(RefCell::new(
                ReloadingTls::load(&c, &k, Duration::from_secs(60)).unwrap(),
            ))
        });
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        std::mem::forget(_tx); // keep the channel open for the test's lifetime
        let ctx = Rc::new(ShardContext {
            config: Arc::new(config),
            shard: 0,
            spool: Rc::clone(&spool),
            tls,
            credentials: None,
            auth_throttle: Arc::new(crate::auth::AuthThrottle::new(1)),
            shutdown,
            router: Router::new(1, 1_000_000).0,
            metrics: Arc::new(crate::metrics::Metrics::new(1)),
            inflight: crate::smtp::server::inflight::InflightBudget::new(1 << 30),
            tenants: Arc::default(),
            dkim: Arc::new(saida_dkim::Keyring::empty()),
            suppressions: Arc::new(crate::suppression::Suppressions::in_memory()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::task::spawn_local(async move {
            while let Ok((s, peer)) = listener.accept().await {
                let info = ConnInfo {
                    peer,
                    listener_tls: ListenerTls::StartTls,
                    reserved_slot: false,
                };
                let session = Session::new(Rc::clone(&ctx), info, Conn::Plain(EpollStream(s)));
                tokio::task::spawn_local(session.run());
            }
        });
        Server {
            port,
            spool,
            _dir: dir,
        }
    }

    fn setup(policy: TlsPolicy, tls: Arc<rustls::ClientConfig>) -> ClientSetup {
        ClientSetup {
            own_name: String::new(),
            helo_name: "client.test".into(),
            policy,
            tls,
            server_name: "mx.test".into(),
            timeouts: Timeouts::default(),
            use_starttls: true,
        }
    }

    async fn connect(port: u16) -> EpollStream {
        EpollStream(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        )
    }

    fn envelope<'a>(rcpts: &[&'a str], size: usize) -> Envelope<'a> {
        Envelope {
            sender: "a@origin.test",
            recipients: rcpts.iter().map(|r| (*r, 0, "")).collect(),
            size,
            eight_bit: false,
            smtputf8: false,
            ret: None,
            envid: "",
        }
    }

    /// saida's server without TLS and an opportunistic client session connected to it.
    async fn plain_session() -> (Server, ClientSession<EpollStream>) {
        let srv = server(false).await;
        let s = setup(TlsPolicy::Opportunistic, client_config_unverified());
        let c = ClientSession::start(connect(srv.port).await, &s)
            .await
            .unwrap();
        (srv, c)
    }

    fn run<F: std::future::Future<Output = ()>>(f: F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    #[test]
    fn delivers_several_messages_on_one_connection_with_pipelining_and_chunking() {
        run(async {
            let (srv, mut c) = plain_session().await;
            assert!(c.caps.pipelining && c.caps.chunking && c.tls_info().is_none());
            let body = b"Subject: t\r\n\r\n.dot line\r\nbody\r\n";
            for _ in 0..3 {
                let d = c
                    .send(&envelope(&["x@dest.test", "y@dest.test"], body.len()), body)
                    .await
                    .unwrap();
                assert_eq!(d.replies.len(), 2);
                assert!(d.replies.iter().all(|r| r.code == 250), "{:?}", d.replies);
            }
            assert_eq!(c.transactions, 3);
            c.quit().await;
            let spool = srv.spool.borrow();
            assert_eq!(spool.len(), 3);
            for (id, _) in spool.live() {
                assert!(spool.message(id).unwrap().body.ends_with(body));
            }
        });
    }

    #[test]
    fn long_envelopes_are_pipelined_in_groups_and_every_recipient_gets_a_reply() {
        run(async {
            let (_srv, mut c) = plain_session().await;
            let addrs: Vec<String> = (0..250).map(|i| format!("r{i}@dest.test")).collect();
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let body = b"Subject: t\r\n\r\nhi\r\n";
            let d = c.send(&envelope(&refs, body.len()), body).await.unwrap();
            assert_eq!(d.replies.len(), 250);
            assert!(d.replies.iter().all(|r| r.code == 250));
            assert!(c.is_reusable());
        });
    }

    #[test]
    fn opportunistic_tls_accepts_a_self_signed_server_and_verified_refuses_it() {
        run(async {
            let srv = server(true).await;
            let s = setup(TlsPolicy::Opportunistic, client_config_unverified());
            let mut c = ClientSession::start(connect(srv.port).await, &s)
                .await
                .unwrap();
            let (version, _) = c.tls_info().expect("TLS was negotiated");
            assert!(version.contains("TLS"), "{version}");
            let body = b"Subject: t\r\n\r\nhi\r\n";
            let d = c
                .send(&envelope(&["x@dest.test"], body.len()), body)
                .await
                .unwrap();
            assert_eq!(d.replies[0].code, 250);
            c.quit().await;

            let s = setup(
                TlsPolicy::Verified,
                client_config_verified(rustls::RootCertStore::empty()),
            );
            match ClientSession::start(connect(srv.port).await, &s).await {
                Err(ClientError::Tls(why)) => assert!(
                    why.contains("certificate") || why.contains("Unknown"),
                    "{why}"
                ),
                Err(e) => panic!("wrong error: {e}"),
                Ok(_) => panic!("verified policy accepted a self-signed certificate"),
            }
        });
    }

    /// A server that offers STARTTLS and then breaks the handshake.
    async fn broken_tls_server() -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::task::spawn_local(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 broken ESMTP\r\n").await;
                    let mut line = String::new();
                    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let reply: &[u8] = if line.starts_with("EHLO") {
                            b"250-broken\r\n250 STARTTLS\r\n"
                        } else if line.starts_with("STARTTLS") {
                            b"220 go ahead\r\nthis is not TLS\r\n"
                        } else {
                            b"250 ok\r\n"
                        };
                        let _ = w.write_all(reply).await;
                        line.clear();
                    }
                });
            }
        });
        port
    }

    #[test]
    fn opportunistic_tls_failure_is_retried_in_plain_text_and_required_is_not() {
        run(async {
            let port = broken_tls_server().await;
            let mut s = setup(TlsPolicy::Opportunistic, client_config_unverified());
            let err = ClientSession::start(connect(port).await, &s)
                .await
                .err()
                .unwrap();
            assert!(err.is_tls_failure(), "{err}");
            s.use_starttls = false;
            let c = ClientSession::start(connect(port).await, &s).await.unwrap();
            assert!(c.tls_info().is_none());
            let mut s = setup(TlsPolicy::Required, client_config_unverified());
            s.use_starttls = false; // ignored: Required never goes plain
            assert!(ClientSession::start(connect(port).await, &s).await.is_err());
        });
    }

    #[test]
    fn required_tls_fails_when_the_server_offers_none() {
        run(async {
            let srv = server(false).await;
            let s = setup(TlsPolicy::Required, client_config_unverified());
            assert!(matches!(
                ClientSession::start(connect(srv.port).await, &s).await,
                Err(ClientError::Tls(_))
            ));
        });
    }

    #[test]
    fn refused_recipients_get_their_own_reply() {
        run(async {
            let (_srv, mut c) = plain_session().await;
            // saida refuses a non-ASCII address without SMTPUTF8 at RCPT... but the client
            // refuses to send it in the first place; use a syntactically bad one instead.
            let body = b"Subject: t\r\n\r\nhi\r\n";
            let d = c
                .send(
                    &envelope(&["ok@dest.test", "bad@@dest.test"], body.len()),
                    body,
                )
                .await
                .unwrap();
            assert_eq!(d.replies[0].code, 250);
            assert_eq!(d.replies[1].code, 501);
            assert_eq!(d.replies[1].enhanced.as_deref(), Some("5.1.3"));
        });
    }

    #[test]
    fn a_transaction_with_every_recipient_refused_leaves_the_connection_in_step() {
        run(async {
            let (_srv, mut c) = plain_session().await;
            let body = b"Subject: t\r\n\r\nhi\r\n";
            // One write: MAIL, RCPT, BDAT and content; the server refuses the RCPT and the BDAT.
            let d = c
                .send(&envelope(&["bad@@dest.test"], body.len()), body)
                .await
                .unwrap();
            assert_eq!(d.replies[0].code, 501);
            assert!(c.is_reusable());
            let d = c
                .send(&envelope(&["ok@dest.test"], body.len()), body)
                .await
                .unwrap();
            assert_eq!(d.replies[0].code, 250, "{:?}", d.replies[0]);
            assert_eq!(c.transactions, 2);
        });
    }
}
