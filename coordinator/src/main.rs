//! `twopc-coordinator`: `serve` the client API, or run the `demo`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use twopc_coordinator::config::ServeArgs;
use twopc_coordinator::demo::{self, DemoArgs};

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
    Serve(ServeArgs),
    /// Throwaway local clusters, in-process agents, a bank workload and its audit.
    Demo(DemoArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
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
            let running = twopc_coordinator::server::start(config).await?;
            shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await
        }
        Command::Demo(args) => demo::run(args).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
