//! `twopc-sim`: runs seeds of the deterministic simulation and reports violations.

use std::process::ExitCode;

use clap::Parser;
use twopc_core::mutation::{Mutation, Mutations};
use twopc_sim::{run_seed, SeedRun};

/// Deterministic simulation of twopc's protocol core with an invariant oracle.
///
/// Exit status: without --mutate, 0 when every seed held every invariant, 1 otherwise
/// (the first failing seed's trace and replay command are printed). With --mutate, 0
/// when the broken core was caught within the seeds, 1 when it was not.
#[derive(Parser, Debug)]
#[command(name = "twopc-sim", version)]
struct Cli {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed (with --seeds 1: replay exactly this seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Events per seed while faults are injected (then the world heals and settles).
    #[arg(long, default_value_t = 3000)]
    steps: u64,
    /// Run a deliberately broken core (see --list-mutations); it must be caught.
    #[arg(long, value_name = "NAME")]
    mutate: Option<String>,
    /// List the mutations and exit (with --model-check: those the model check covers).
    #[arg(long)]
    list_mutations: bool,
    /// Explore every interleaving of two small configurations (2 participants, 2
    /// transactions, the second one's last branch read-only or a last-agent commit, a
    /// coordinator crash, a lost message and a failing branch on any path) instead of
    /// running seeds.
    #[arg(long)]
    model_check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list_mutations {
        for m in Mutation::ALL {
            if !cli.model_check || twopc_sim::model::covers(m) {
                println!("{}", m.name());
            }
        }
        return ExitCode::SUCCESS;
    }
    let mutation = match cli.mutate.as_deref().map(Mutation::from_name) {
        None => None,
        Some(Some(m)) => Some(m),
        Some(None) => {
            eprintln!("unknown mutation; --list-mutations names them");
            return ExitCode::from(2);
        }
    };
    let mutations = mutation.map_or(Mutations::none(), Mutations::of);
    if cli.model_check {
        return model_check(mutation, mutations);
    }
    let mut totals = twopc_sim::Stats::default();
    for seed in cli.seed..cli.seed.saturating_add(cli.seeds) {
        let run = run_seed(seed, cli.steps, mutations);
        add(&mut totals, &run);
        if let Some(v) = &run.violation {
            report(&cli, &run, v);
            return if mutation.is_some() {
                println!(
                    "mutation caught at seed {seed} (after {} seeds)",
                    seed - cli.seed + 1
                );
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    }
    println!(
        "{} seeds, 0 violations ({} steps, {} faults injected, {} transactions ({} last-agent or one-phase): {} told committed, {} told aborted, {} told unknown; {} retries of a txn id, {} refused by the txn-id rule ({} of them answered committed, replayed); {} recovery rollbacks)",
        cli.seeds,
        totals.steps,
        totals.faults,
        totals.txns,
        totals.last_agent_txns,
        totals.told_committed,
        totals.told_aborted,
        totals.told_unknown,
        totals.retries,
        totals.refused,
        totals.replayed,
        totals.recovery_rollbacks
    );
    if let Some(m) = mutation {
        println!("mutation {} NOT caught", m.name());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn model_check(mutation: Option<Mutation>, mutations: Mutations) -> ExitCode {
    let mut caught = false;
    for bounds in twopc_sim::model::configurations() {
        let started = std::time::Instant::now();
        let r = twopc_sim::model::check(bounds, mutations);
        let secs = started.elapsed().as_secs_f64();
        println!(
            "model check ({} participants, {} transactions{}, {} crash, {} lost message, {} failing branch): {} states, {} transitions, {} end states, {secs:.1} s{}",
            bounds.participants,
            bounds.txns,
            if bounds.last_agent { ", the second a last-agent commit" } else { "" },
            bounds.crashes,
            bounds.losses,
            bounds.failures,
            r.states,
            r.transitions,
            r.terminal,
            if r.truncated { " (stopped at the state limit: incomplete)" } else { "" }
        );
        match (&r.violation, mutation) {
            (Some((v, path)), _) => {
                println!("{v}\npath ({} steps):", path.len());
                for step in path {
                    println!("  {step}");
                }
                if mutation.is_none() {
                    return ExitCode::FAILURE;
                }
                caught = true;
                break;
            }
            (None, None) if r.truncated => return ExitCode::FAILURE,
            (None, _) => {}
        }
    }
    match mutation {
        Some(m) if caught => {
            println!("mutation {} caught", m.name());
            ExitCode::SUCCESS
        }
        Some(m) => {
            println!("mutation {} NOT caught", m.name());
            ExitCode::FAILURE
        }
        None => {
            println!("every invariant held in every state");
            ExitCode::SUCCESS
        }
    }
}

fn add(t: &mut twopc_sim::Stats, run: &SeedRun) {
    t.steps += run.stats.steps;
    t.faults += run.stats.faults;
    t.txns += run.stats.txns;
    t.told_committed += run.stats.told_committed;
    t.told_aborted += run.stats.told_aborted;
    t.told_unknown += run.stats.told_unknown;
    t.last_agent_txns += run.stats.last_agent_txns;
    t.retries += run.stats.retries;
    t.refused += run.stats.refused;
    t.replayed += run.stats.replayed;
    t.recovery_rollbacks += run.stats.recovery_rollbacks;
}

fn report(cli: &Cli, run: &SeedRun, v: &twopc_sim::Violation) {
    println!("seed {}: {v}", run.seed);
    println!("last {} events:", run.trace.len());
    for line in &run.trace {
        println!("  {line}");
    }
    let mutate = cli
        .mutate
        .as_deref()
        .map_or(String::new(), |m| format!(" --mutate {m}"));
    println!(
        "replay: twopc-sim --seeds 1 --seed {} --steps {}{mutate}",
        run.seed, cli.steps
    );
}
