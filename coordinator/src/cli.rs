//! The `twopc-coordinator` command line (the binary is a thin wrapper over [`run`], so the
//! test kit can build the same program with failpoints).

use crate::config::ServeArgs;
use crate::demo::{self, DemoArgs};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "twopc-coordinator",
    version,
    about = "Two-phase commit across PostgreSQL databases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API and drive transactions across the participants.
    Serve(Box<ServeArgs>),
    /// Throwaway local clusters, in-process agents, a bank workload and its audit.
    Demo(DemoArgs),
    /// Inspect and resolve in-doubt transactions (through a running coordinator).
    Txns(crate::txns::TxnsArgs),
    /// Write a development CA and certificates for mutual TLS with the agents.
    Certs(crate::certs::CertsArgs),
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Txns(_) | Command::Certs(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve().context("read configuration")?;
            let running = crate::server::start(config).await?;
            twopc_participant::cli::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Txns(args) => crate::txns::run(args).await,
        Command::Certs(args) => crate::certs::run(args),
    }
}
