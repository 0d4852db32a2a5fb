//! `twopc-bench`: see `twopc_testkit::bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use twopc_testkit::bench::{self, BenchConfig, ALL_PATHS};

/// mimalloc: every request allocates (messages, JSON, futures), and glibc's malloc was
/// about a fifth of the coordinator's instructions under callgrind.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "twopc-bench",
    about = "The same transfer through direct 2PC, non-atomic commits and twopc, side by side"
)]
struct Args {
    /// Paths to run (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Measured seconds per path and concurrency.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Accounts per database.
    #[arg(long, default_value_t = 10_000)]
    accounts: u32,
    /// Use these two databases instead of starting clusters (both must have
    /// max_prepared_transactions > 0; the bank tables are (re)created).
    #[arg(long, num_args = 2, value_names = ["URL_A", "URL_B"])]
    databases: Option<Vec<String>>,
    /// Started clusters run with fsync=off (faster, less realistic).
    #[arg(long)]
    pg_no_fsync: bool,
    /// Runs of every point, interleaved; the median (by throughput) is reported with the
    /// range. This machine's noise between runs is ±15 %: use 3 or more to compare.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Where bench.json and bench.svg go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Coordinators without the one-phase optimization.
    #[arg(long)]
    no_one_phase: bool,
    /// Coordinators without the read-only vote.
    #[arg(long)]
    no_read_only: bool,
    /// Only the decision log: forced appends per second with this many appenders.
    #[arg(long)]
    log_only: Option<usize>,
    /// Only redraw bench.svg beside this bench.json (written by an earlier run).
    #[arg(long, value_name = "BENCH_JSON")]
    replot: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    twopc_testkit::init_tracing();
    let args = Args::parse();
    if let Some(json) = args.replot {
        bench::replot(&json)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(appenders) = args.log_only {
        let dir = std::env::current_dir()?.join(".twopc-log-bench");
        bench::log_bench(appenders, Duration::from_secs(args.seconds), dir).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let paths = if args.paths.is_empty() {
        ALL_PATHS.iter().map(|s| s.to_string()).collect()
    } else {
        args.paths
    };
    let urls = args.databases.map(|v| (v[0].clone(), v[1].clone()));
    let run = bench::run(BenchConfig {
        paths,
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.seconds),
        warmup: Duration::from_secs(args.warmup_seconds),
        accounts: args.accounts,
        urls,
        pg_fsync: !args.pg_no_fsync,
        rounds: args.rounds,
        out_dir: args.out,
        one_phase: !args.no_one_phase,
        read_only: !args.no_read_only,
    });
    // Ctrl-C or SIGTERM drops the run, and with it the clusters it started (PgCluster's
    // Drop stops them). Returning, rather than exiting, lets the runtime wait for a
    // cluster still starting in a blocking task and drop (stop) it too. `biased`: the
    // signals are listened to (first poll) before the run is first polled.
    tokio::select! {
        biased;
        name = twopc_participant::cli::shutdown_signal() => {
            eprintln!("\n{name}: stopping what this run started");
            // The exit status a shell gives the signal.
            Ok(ExitCode::from(if name == "terminated" { 143 } else { 130 }))
        }
        done = run => {
            done?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
