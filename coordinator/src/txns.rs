//! `twopc-coordinator txns`: the operator's view of in-doubt transactions, through the
//! running coordinator's admin API (the coordinator owns the decision log; a second
//! writer would break it, so the tool never opens the log itself).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Clone, Args)]
pub struct TxnsArgs {
    /// Base URL of the running coordinator.
    #[arg(
        long,
        global = true,
        env = "TWOPC_COORDINATOR_URL",
        default_value = "http://127.0.0.1:7000"
    )]
    pub coordinator: String,
    /// File with the admin API's bearer token (the coordinator's --admin-token-file),
    /// if it requires one. `--api-token-file` is accepted too, but the file must hold
    /// the admin token: the client token never opens the admin API.
    #[arg(
        long,
        global = true,
        alias = "api-token-file",
        env = "TWOPC_ADMIN_TOKEN_FILE"
    )]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Print the raw JSON answers.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: TxnsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TxnsCommand {
    /// Transactions in doubt in the log or prepared on some participant.
    List,
    /// One transaction (client txn id or GID): the log's decision beside each
    /// participant's pg_prepared_xacts row.
    Show {
        /// The client txn id or the GID.
        id: String,
    },
    /// Commit or roll back a transaction by hand: exactly one of --commit and --abort.
    #[command(group = clap::ArgGroup::new("action").required(true).multiple(false).args(["commit", "abort"]))]
    Resolve {
        /// The client txn id or the GID.
        id: String,
        /// COMMIT PREPARED wherever it is prepared (the log records the decision first).
        #[arg(long)]
        commit: bool,
        /// ROLLBACK PREPARED wherever it is prepared.
        #[arg(long)]
        abort: bool,
        /// Say what would be done, do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Contradict the decision: abort a commit, or commit what is recorded or presumed
        /// aborted (breaks atomicity or an answer given; for a lost or wrong log only).
        #[arg(long)]
        force: bool,
    },
}

async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req.send().await.context("reach the coordinator")?;
    let status = resp.status();
    let body: Value = resp.json().await.context("read the coordinator's answer")?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("?").to_owned();
        bail!("{status}: {msg}");
    }
    Ok(body)
}

fn print_view(v: &Value) {
    println!(
        "{}  txn {}  decision {}{}{}",
        v["gid"].as_str().unwrap_or("?"),
        v["txn_id"].as_str().unwrap_or("-"),
        v["decision"].as_str().unwrap_or("?"),
        v["age_ms"]
            .as_u64()
            .map(|a| format!("  age {:.1}s", a as f64 / 1000.0))
            .unwrap_or_default(),
        match v["pending"].as_array() {
            Some(p) if !p.is_empty() => format!(
                "  pending {}",
                p.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ => String::new(),
        }
    );
    for b in v["branches"].as_array().into_iter().flatten() {
        let name = b["participant"].as_str().unwrap_or("?");
        if let Some(e) = b["error"].as_str() {
            println!("    {name:<12} unknown ({e})");
        } else if b["prepared"].is_object() {
            let p = &b["prepared"];
            println!(
                "    {name:<12} PREPARED since {} (owner {}, database {})",
                p["prepared_at"].as_str().unwrap_or("?"),
                p["owner"].as_str().unwrap_or("?"),
                p["database"].as_str().unwrap_or("?"),
            );
        } else {
            println!("    {name:<12} not prepared");
        }
    }
}

pub async fn run(args: TxnsArgs) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(path) = &args.admin_token_file {
        let token = crate::http::read_token_file(path)?;
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .context("token as a header")?,
        );
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .default_headers(headers)
        .build()?;
    let base = args.coordinator.trim_end_matches('/');
    let body = match &args.command {
        TxnsCommand::List => call(http.get(format!("{base}/v1/admin/txns"))).await?,
        TxnsCommand::Show { id } => call(http.get(format!("{base}/v1/admin/txns/{id}"))).await?,
        TxnsCommand::Resolve {
            id,
            commit,
            dry_run,
            force,
            ..
        } => {
            let action = if *commit { "commit" } else { "abort" };
            call(
                http.post(format!("{base}/v1/admin/txns/{id}/resolve"))
                    .json(&json!({ "action": action, "dry_run": dry_run, "force": force })),
            )
            .await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    match &args.command {
        TxnsCommand::List => {
            let list = body["transactions"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("nothing in doubt");
            }
            for v in &list {
                print_view(v);
            }
        }
        TxnsCommand::Show { .. } => print_view(&body),
        TxnsCommand::Resolve { .. } => {
            let verb = if body["dry_run"].as_bool() == Some(true) {
                "would do"
            } else {
                "did"
            };
            println!("{} {}:", body["gid"].as_str().unwrap_or("?"), verb);
            for s in body["steps"].as_array().into_iter().flatten() {
                println!("  {}", s.as_str().unwrap_or("?"));
            }
        }
    }
    Ok(())
}
