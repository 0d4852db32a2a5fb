//! `twopc-coordinator demo`: two throwaway PostgreSQL clusters, in-process agents, a
//! coordinator on a local port, a bank workload through its HTTP API, and an audit.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::bank::{audit, setup_bank};
use crate::config::ServeConfig;
use crate::pg_cluster::{ClusterOptions, PgBinaries, PgCluster};
use crate::workload::{self, WorkloadConfig};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long the workload runs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Accounts per database.
    #[arg(long, default_value_t = 1000)]
    pub accounts: u32,
    /// Initial balance of every account.
    #[arg(long, default_value_t = 100)]
    pub balance: i64,
}

/// Runs the demo and prints a summary. Errors if the audit finds a broken invariant.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bins = match PgBinaries::find() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("twopc demo needs PostgreSQL server binaries.\n{e}");
            std::process::exit(2);
        }
    };
    println!(
        "PostgreSQL {} from {}",
        bins.version,
        bins.bin_dir.display()
    );
    println!("starting two throwaway clusters ...");
    let clusters = tokio::task::spawn_blocking(|| -> anyhow::Result<Vec<PgCluster>> {
        ["a", "b"]
            .iter()
            .map(|name| {
                let mut opts = ClusterOptions::new(format!("demo-{name}"));
                opts.fsync = true;
                PgCluster::start(opts).with_context(|| format!("start cluster {name}"))
            })
            .collect()
    })
    .await??;
    let names = ["a".to_owned(), "b".to_owned()];
    let urls: Vec<String> = clusters.iter().map(|c| c.url("postgres")).collect();
    for url in &urls {
        setup_bank(url, args.accounts, args.balance)
            .await
            .context("load bank schema")?;
    }
    let data_dir = tempfile_dir()?;
    let mut config = ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.clone(),
        ..ServeConfig::default()
    };
    for (n, u) in names.iter().zip(&urls) {
        config.participants.insert(n.clone(), u.clone());
    }
    let running = crate::server::start(config).await?;
    let base_url = format!("http://{}", running.addr);
    println!(
        "coordinator on {base_url} (data dir {}), participants a and b in-process",
        data_dir.display()
    );
    println!(
        "running {} clients for {} s: transfers between random accounts on a and b ...",
        args.clients, args.seconds
    );
    let report = workload::run(WorkloadConfig {
        shapes: vec![],
        retry_unknown: false,
        committed_counter: None,
        base_url,
        participants: names.to_vec(),
        accounts_per_db: args.accounts,
        clients: args.clients,
        max_transfers: u64::MAX,
        duration: Duration::from_secs(args.seconds),
        max_amount: args.balance / 2 + 1,
        txn_prefix: "demo".into(),
        request_timeout: Duration::from_secs(30),
        stop_on_no_answer: false,
        stop: None,
    })
    .await?;
    let gid_prefix = running.engine.gid_prefix();
    running.shutdown().await?;

    let per_db = args.accounts as i64 * args.balance;
    let dbs: Vec<(String, String)> = names.iter().cloned().zip(urls.iter().cloned()).collect();
    let initial: Vec<(String, i64)> = names.iter().map(|n| (n.clone(), per_db)).collect();
    let audit = audit(
        &dbs,
        per_db * 2,
        &initial,
        &gid_prefix,
        Some(&report.expectation),
    )
    .await?;

    println!();
    println!(
        "committed  {:>8}  ({:.0}/s)",
        report.committed,
        report.throughput()
    );
    println!(
        "aborted    {:>8}  (insufficient funds: the CHECK constraint voted no)",
        report.aborted
    );
    println!("unknown    {:>8}", report.unknown);
    println!(
        "latency    p50 {:.2} ms, p99 {:.2} ms",
        report.percentile_ms(50.0),
        report.percentile_ms(99.0)
    );
    println!("{audit}");
    let _ = std::fs::remove_dir_all(&data_dir);
    drop(clusters);
    if audit.ok() {
        println!("audit: PASS (total {} conserved)", audit.total);
        Ok(())
    } else {
        anyhow::bail!("audit FAILED: {}", audit.violations().join("; "))
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "twopc-demo-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}
