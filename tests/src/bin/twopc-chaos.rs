//! `twopc-chaos`: see `twopc_testkit::chaos`. Runs against the topology of
//! docker-compose.yml, which must be up (`docker/chaos.sh` does all of it).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use twopc_testkit::chaos::{self, ChaosConfig, FaultKind, ALL_KINDS};

/// mimalloc: every request allocates (messages, JSON, futures), and glibc's malloc was
/// about a fifth of the coordinator's instructions under callgrind.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "twopc-chaos",
    about = "Bank transfers through twopc while containers die, pause and lose their network; then an audit",
    args_override_self = true
)]
struct Args {
    /// docker-compose project name.
    #[arg(long, default_value = "twopc")]
    project: String,
    /// The coordinator's client API as published on this host.
    #[arg(long, default_value = "http://127.0.0.1:7600")]
    coordinator_url: String,
    /// Control port of the latency proxy, as published on this host.
    #[arg(long, default_value = "127.0.0.1:7610")]
    latency_control: String,
    /// Host of the published PostgreSQL ports.
    #[arg(long, default_value = "127.0.0.1")]
    pg_host: String,
    /// Published ports of pg1, pg2, pg3.
    #[arg(long, value_delimiter = ',', default_value = "55431,55432,55433")]
    pg_ports: Vec<u16>,
    /// Password of the postgres user (POSTGRES_PASSWORD in docker-compose.yml).
    #[arg(long, env = "TWOPC_PG_PASSWORD", default_value = "twopc")]
    pg_password: String,
    /// Fault kinds to inject (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Faults of each kind.
    #[arg(long, default_value_t = 10)]
    faults_per_kind: usize,
    /// Concurrent transfer clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 1_000)]
    accounts: u32,
    /// Shortest and longest time a fault is held, in ms.
    #[arg(long, num_args = 2, default_values_t = [500u64, 2_500])]
    hold_ms: Vec<u64>,
    /// Shortest and longest quiet time between faults, in ms.
    #[arg(long, num_args = 2, default_values_t = [200u64, 1_500])]
    gap_ms: Vec<u64>,
    /// A mid-run 2PC read audit this often, in ms.
    #[arg(long, default_value_t = 5_000)]
    audit_interval_ms: u64,
    /// Per-request timeout of the transfer clients, in ms.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Seed of the fault schedule (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "chaos-results/chaos-report.json")]
    report: PathBuf,
    /// For a run against a deliberately broken build: the rules it must break
    /// (comma-separated). Exit 0 only if at least one of them failed and no other rule.
    #[arg(long, value_delimiter = ',')]
    expect_violation: Vec<String>,
    /// The coordinator runs with --last-agent: that path must have committed transfers.
    #[arg(long)]
    expect_last_agent: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    twopc_testkit::init_tracing();
    let args = Args::parse();
    anyhow::ensure!(args.pg_ports.len() == 3, "--pg-ports wants three ports");
    let kinds: Vec<FaultKind> = if args.kinds.is_empty() {
        ALL_KINDS.to_vec()
    } else {
        args.kinds
            .iter()
            .map(|k| FaultKind::parse(k))
            .collect::<anyhow::Result<_>>()?
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let databases = (1..=3)
        .map(|i| {
            (
                format!("db{i}"),
                format!("agent{i}"),
                format!("pg{i}"),
                format!(
                    "postgresql://postgres:{}@{}:{}/bank",
                    args.pg_password,
                    args.pg_host,
                    args.pg_ports[i - 1]
                ),
            )
        })
        .collect();
    for rule in &args.expect_violation {
        anyhow::ensure!(
            chaos::rules::RULE_NAMES.contains(&rule.as_str()),
            "--expect-violation {rule}: no such rule (rules: {})",
            chaos::rules::RULE_NAMES.join(", ")
        );
    }
    let report = chaos::run(ChaosConfig {
        project: args.project,
        coordinator_url: args.coordinator_url,
        databases,
        coordinator_service: "coordinator".to_owned(),
        latency_control: args.latency_control,
        kinds,
        faults_per_kind: args.faults_per_kind,
        clients: args.clients,
        accounts_per_db: args.accounts,
        initial_balance: 1_000,
        fault_hold_ms: (args.hold_ms[0], args.hold_ms[1].max(args.hold_ms[0])),
        fault_gap_ms: (args.gap_ms[0], args.gap_ms[1].max(args.gap_ms[0])),
        audit_interval_ms: args.audit_interval_ms,
        request_timeout_ms: args.request_timeout_ms,
        seed,
        report_path: args.report.clone(),
        expect_last_agent: args.expect_last_agent,
    })
    .await
    .context("run the chaos scenario")?;
    print!("{}", report.summary());
    println!("report: {}", args.report.display());
    if args.expect_violation.is_empty() {
        anyhow::ensure!(report.pass, "the chaos audit failed");
        return Ok(());
    }
    match chaos::rules::broken_build_caught(&report.rules, &args.expect_violation) {
        Ok(how) => {
            println!("chaos: the audit caught the broken build, as expected: {how}");
            Ok(())
        }
        Err(why) => anyhow::bail!("{why}"),
    }
}
