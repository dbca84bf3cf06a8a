//! `saida`: the command line of the outbound mail engine.
//!
//! Today it carries the spool demo (`saida demo`), which shows the promise everything else builds
//! on: a message acknowledged by the spool survives `kill -9`. The SMTP daemon (`saida run`) and
//! the admin commands arrive with their issues.

#![forbid(unsafe_code)]

mod config;
mod demo;
mod io;
mod smtp;

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
    /// Spool demo: a writer process appends messages with group commit and is killed with
    /// SIGKILL at random moments; after each kill the spool is recovered and every acknowledged
    /// message is checked.
    Demo(demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
    }
}
