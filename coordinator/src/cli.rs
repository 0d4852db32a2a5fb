//! The `twopc-coordinator` command line (the binary is a thin wrapper over [`run`], so the
//! test kit can build the same program with failpoints).

use crate::config::ServeArgs;
use crate::demo::{self, DemoArgs};
use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use twopc_participant::cli::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "twopc-coordinator",
    version,
    about = "Two-phase commit across PostgreSQL databases"
)]
struct Cli {
    /// Log lines as text (colours only on a terminal) or one JSON object per event.
    #[arg(long, global = true, env = "TWOPC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
    /// Print the API's OpenAPI 3 document (as `GET /v1/openapi.json` serves it).
    Openapi,
}

/// The command line, with each `serve` setting's default (`ServeConfig::default()`) in
/// its help: the flags are optional so that a `--config` file can set them.
fn command() -> clap::Command {
    let defaults = crate::config::ServeConfig::default_texts();
    Cli::command().mut_subcommand("serve", |serve| {
        let ids: Vec<String> = serve
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        ids.iter().fold(serve, |cmd, id| match defaults.get(id) {
            Some(default) => cmd.mut_arg(id, |a| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                a.help(format!("{help} [default: {default}]"))
            }),
            None => cmd,
        })
    })
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Txns(_) | Command::Certs(_) | Command::Openapi => "warn",
        _ => "info",
    };
    twopc_participant::cli::init_logging(cli.log_format, default_filter);
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve().context("read configuration")?;
            let running = crate::server::start(config).await?;
            let signal = twopc_participant::cli::shutdown_signal().await;
            tracing::info!(signal, "shutting down");
            running.shutdown().await?;
            tracing::info!("coordinator stopped");
            Ok(())
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Txns(args) => crate::txns::run(args).await,
        Command::Certs(args) => crate::certs::run(args),
        Command::Openapi => {
            let doc = crate::http::openapi()
                .to_pretty_json()
                .context("serialize the OpenAPI document")?;
            println!("{doc}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let matches = command().try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn txns_flags_may_follow_the_subcommand() {
        let cli = parse(&[
            "twopc-coordinator",
            "txns",
            "list",
            "--coordinator",
            "http://10.0.0.1:7000",
            "--api-token-file",
            "/etc/twopc/admin-token",
        ])
        .unwrap();
        let Command::Txns(args) = cli.command else {
            panic!("not txns");
        };
        assert_eq!(args.coordinator, "http://10.0.0.1:7000");
        assert_eq!(
            args.admin_token_file.as_deref(),
            Some(std::path::Path::new("/etc/twopc/admin-token"))
        );
    }

    #[test]
    fn resolve_demands_exactly_one_of_commit_and_abort() {
        let neither = parse(&["twopc-coordinator", "txns", "resolve", "g1"]).unwrap_err();
        assert_eq!(
            neither.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let text = neither.to_string();
        assert!(
            text.contains("--commit") && text.contains("--abort"),
            "{text}"
        );
        let both = parse(&[
            "twopc-coordinator",
            "txns",
            "resolve",
            "g1",
            "--commit",
            "--abort",
        ])
        .unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["twopc-coordinator", "txns", "resolve", "g1", "--abort"]).is_ok());
    }

    /// Every flag and positional of every command says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "twopc-coordinator", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn serve_help_shows_defaults_and_env_vars() {
        let help = command()
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("[default: 127.0.0.1:7000]"), "{help}");
        assert!(help.contains("[env: TWOPC_LISTEN=]"), "{help}");
        assert!(help.contains("[default: 5000]"), "{help}");
    }
}
