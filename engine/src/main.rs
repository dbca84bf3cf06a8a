//! `saida`: the command line of the outbound mail engine.
//!
//! - `saida run [--config FILE]`: the daemon (embedded defaults without a file);
//! - `saida check-config FILE`: validates a configuration and exits;
//! - `saida passwd USER`: reads a password on standard input and prints a credentials line;
//! - `saida queue ...`: queue summary and control through the daemon's admin endpoint;
//! - `saida dkim-record KEY`: prints the DNS TXT record that publishes a DKIM key;
//! - `saida demo`: the spool crash demo.

#![forbid(unsafe_code)]

mod admin;
mod api;
mod auth;
mod cidr;
mod config;
mod delivery;
mod demo;
mod dns;
mod intake;
mod mesh;
mod metrics;
mod names;
mod shard;
mod smtp;
mod state_file;
mod suppression;
mod tenant;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "saida", version, about = "saida: an outbound mail engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mail server until SIGTERM or SIGINT.
    Run {
        /// TOML configuration; without it, embedded defaults (SMTP on 127.0.0.1:2525, spool in
        /// var/spool, relaying for loopback clients only).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit (0 valid, 1 invalid).
    CheckConfig { file: PathBuf },
    /// Print a credentials-file line for USER; the password is read from standard input.
    Passwd { user: String },
    /// Print docs/metrics.md, generated from the metric declarations.
    MetricsDoc,
    /// Benchmarks of bounce control: the suppression list built with ENTRIES addresses and
    /// LOOKUPS lookups timed; the classification of every published reply, ROUNDS times.
    /// Prints JSON (docs/benchmarks.md).
    DeliverabilityBench {
        #[arg(long, default_value_t = 10_000_000)]
        entries: usize,
        #[arg(long, default_value_t = 1_000_000)]
        lookups: usize,
        #[arg(long, default_value_t = 100)]
        rounds: usize,
    },
    /// Print the DNS TXT record (`v=DKIM1; k=...; p=...`) that publishes the public half of a
    /// DKIM private key file (PEM: RSA or Ed25519), for `<selector>._domainkey.<domain>`.
    DkimRecord { key: PathBuf },
    /// Inspect and control the running daemon's queues through its admin endpoint.
    Queue(QueueArgs),
    /// Spool demo: a writer process appends messages with group commit and is killed with
    /// SIGKILL at random moments; after each kill the spool is recovered and every acknowledged
    /// message is checked.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args)]
struct QueueArgs {
    /// The daemon's configuration: its `[admin]` address and token (embedded defaults
    /// without it, as for `saida run`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's admin endpoint; default: `[admin] address` of the configuration.
    #[arg(long)]
    admin: Option<String>,
    /// The admin token; default: `[admin] token`, or the token file the daemon generated
    /// (`[admin] token_file`, `<spool.dir>/admin.token`). Also read from SAIDA_ADMIN_TOKEN.
    #[arg(long, env = "SAIDA_ADMIN_TOKEN")]
    token: Option<String>,
    /// A file holding the admin token (instead of the configuration's).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Queued recipients per destination domain (and tenant).
    Summary {
        /// Only this tenant's queues.
        #[arg(long)]
        tenant: Option<String>,
        /// `provider`: one line per mailbox provider (`[[provider]]`), summed over its
        /// domains' queues.
        #[arg(long)]
        by: Option<String>,
    },
    /// Stop delivering a tenant's mail (it stays queued; new mail is still taken).
    SuspendTenant { tenant: String },
    /// Deliver a suspended tenant's mail again.
    ResumeTenant { tenant: String },
    /// Stop delivering to a domain (mail stays queued).
    Suspend { domain: String },
    /// Deliver to a suspended domain again.
    Resume { domain: String },
    /// Retry deferred recipients now (of one domain, or all).
    Flush { domain: Option<String> },
    /// Fail queued recipients with a bounce to their senders.
    Bounce(Target),
    /// Remove queued recipients without a bounce.
    Delete(Target),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A queue id (as in `queued as ...`).
    #[arg(long)]
    id: Option<String>,
    /// Every queued recipient of a domain.
    #[arg(long)]
    domain: Option<String>,
}

fn queue(args: QueueArgs) -> anyhow::Result<()> {
    let target = |t: &Target, action: &str| match (&t.id, &t.domain) {
        (Some(id), _) => format!("/queue/messages/{id}/{action}"),
        (_, Some(d)) => format!("/queue/domains/{d}/{action}"),
        _ => unreachable!("clap requires one of --id and --domain"),
    };
    let (method, path) = match &args.action {
        QueueAction::Summary { by: Some(b), .. } if b != "provider" => {
            anyhow::bail!("--by takes `provider`")
        }
        QueueAction::Summary { tenant: None, .. } => ("GET", "/queue".to_string()),
        QueueAction::Summary {
            tenant: Some(t), ..
        } => ("GET", format!("/queue/tenants/{t}")),
        QueueAction::SuspendTenant { tenant } => {
            ("POST", format!("/queue/tenants/{tenant}/suspend"))
        }
        QueueAction::ResumeTenant { tenant } => ("POST", format!("/queue/tenants/{tenant}/resume")),
        QueueAction::Suspend { domain } => ("POST", format!("/queue/domains/{domain}/suspend")),
        QueueAction::Resume { domain } => ("POST", format!("/queue/domains/{domain}/resume")),
        QueueAction::Flush { domain: None } => ("POST", "/queue/flush".to_string()),
        QueueAction::Flush { domain: Some(d) } => ("POST", format!("/queue/domains/{d}/flush")),
        QueueAction::Bounce(t) => ("POST", target(t, "bounce")),
        QueueAction::Delete(t) => ("POST", target(t, "delete")),
    };
    let config = match &args.config {
        Some(p) => config::Config::load(p)?,
        None => config::Config::default(),
    };
    let address = args.admin.clone().unwrap_or(config.admin.address.clone());
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => admin::read_token(f)?,
        (None, None) if !config.admin.token.is_empty() => config.admin.token.clone(),
        (None, None) => admin::read_token(&config.admin.token_path(&config.spool.dir))?,
    };
    let answer = admin::client(&address, &token, method, &path)?;
    let by_provider = matches!(&args.action, QueueAction::Summary { by: Some(_), .. });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if by_provider {
        let mut rows: std::collections::BTreeMap<&str, [usize; 5]> = Default::default();
        for d in &answer.domains {
            let name = if d.provider.is_empty() {
                "-"
            } else {
                &d.provider
            };
            let r = rows.entry(name).or_default();
            for (i, v) in [
                1,
                d.queued_rcpts,
                d.ready_jobs,
                d.deferred_jobs,
                d.connections,
            ]
            .into_iter()
            .enumerate()
            {
                r[i] += v;
            }
        }
        println!(
            "{:<24} {:>8} {:>10} {:>8} {:>9} {:>6}",
            "provider", "queues", "rcpts", "ready", "deferred", "conns"
        );
        for (name, r) in rows {
            println!(
                "{:<24} {:>8} {:>10} {:>8} {:>9} {:>6}",
                name, r[0], r[1], r[2], r[3], r[4]
            );
        }
    } else if matches!(args.action, QueueAction::Summary { .. }) {
        println!(
            "{:<40} {:<16} {:<16} {:>10} {:>8} {:>9} {:>11} {:>6} state",
            "domain", "tenant", "source", "rcpts", "ready", "deferred", "oldest(s)", "conns"
        );
        for d in &answer.domains {
            println!(
                "{:<40} {:<16} {:<16} {:>10} {:>8} {:>9} {:>11} {:>6} {}",
                d.domain,
                if d.tenant.is_empty() { "-" } else { &d.tenant },
                if d.source.is_empty() { "-" } else { &d.source },
                d.queued_rcpts,
                d.ready_jobs,
                d.deferred_jobs,
                d.oldest_age_secs.map_or("-".into(), |a| a.to_string()),
                d.connections,
                if d.suspended { "suspended" } else { "active" }
            );
        }
    } else {
        println!("affected: {}", answer.affected);
    }
    if answer.shards_silent > 0 {
        anyhow::bail!("{} shard(s) did not answer", answer.shards_silent);
    }
    Ok(())
}

fn dkim_record(key: &std::path::Path) -> anyhow::Result<()> {
    let pem = std::fs::read(key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let options = saida_dkim::SignOptions::default();
    let signer = saida_dkim::Signer::from_pem(key, &pem, "example.invalid", "s", &options)?;
    println!("{}", signer.dns_record());
    Ok(())
}

fn deliverability_bench(entries: usize, lookups: usize, rounds: usize) -> anyhow::Result<()> {
    let (replies, p50, p99, max) =
        delivery::bounce_class::bench(rounds).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "{}",
        serde_json::json!({"bench": "bounce-classification", "replies": replies,
            "rounds": rounds, "classify_ns": {"p50": p50, "p99": p99, "max": max}})
    );
    println!("{}", suppression::bench(entries, lookups));
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => match config::Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        Command::Passwd { user } => passwd(&user),
        Command::Queue(args) => queue(args),
        Command::DkimRecord { key } => dkim_record(&key),
        Command::DeliverabilityBench {
            entries,
            lookups,
            rounds,
        } => deliverability_bench(entries, lookups, rounds),
        Command::MetricsDoc => {
            print!("{}", metrics::docs_markdown());
            Ok(())
        }
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saida: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match &config_path {
        Some(p) => config::Config::load(p)?,
        None => config::Config::default(),
    };
    init_logging(&config.log)?;
    // Signal handlers are installed before anything listens, so that a SIGTERM arriving during
    // start-up is a clean shutdown, not the default "terminate now".
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let server = shard::Server::start(config.clone())?;
    let token = if config.admin.address.is_empty() {
        String::new()
    } else {
        let (token, generated) = admin::load_or_generate_token(&config.admin, &config.spool.dir)?;
        if generated {
            // Printed once; `saida queue` reads it from the file.
            let file = config.admin.token_path(&config.spool.dir);
            eprintln!(
                "saida: admin token generated: {token}\n       kept in {} (mode 0600), \
                 where `saida queue` reads it",
                file.display()
            );
        }
        token
    };
    admin::serve(
        &config,
        token,
        server.router.clone(),
        std::sync::Arc::clone(&server.metrics),
        std::sync::Arc::clone(&server.tenants),
        std::sync::Arc::clone(&server.suppressions),
        std::sync::Arc::clone(&server.providers),
    )
    .map_err(|e| anyhow::anyhow!("admin endpoint {}: {e}", config.admin.address))?;
    tracing::info!(
        listeners = ?server.local_addrs,
        shards = server.backends.len(),
        backends = ?server.backends,
        spool = %config.spool.dir.display(),
        "saida running"
    );
    let backend = match server.backends.first() {
        Some(shard::RunningBackend::IoUring) => "io_uring",
        _ => "epoll",
    };
    *server
        .metrics
        .backend
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = backend.into();
    server
        .metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    server
        .metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("shutting down");
    let stats = std::sync::Arc::clone(&server.router_stats);
    server.stop();
    tracing::info!(
        handoffs_sent = stats.sent.load(std::sync::atomic::Ordering::Relaxed),
        handoffs_dropped = stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        delivered = stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        deferred = stats.deferred.load(std::sync::atomic::Ordering::Relaxed),
        failed = stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        "totals"
    );
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(log: &config::Log) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = if log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("logging: {e}"))
}

fn passwd(user: &str) -> anyhow::Result<()> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
        anyhow::bail!("user names must be non-empty, without ':' or spaces");
    }
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    println!("{user}:{}", auth::hash_password(password)?);
    Ok(())
}
