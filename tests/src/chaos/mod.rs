//! `twopc-chaos`: bank transfers across three databases through the coordinator of a
//! running docker-compose topology, while faults are injected one after another (kill -9
//! and restart of the coordinator, an agent or a PostgreSQL server; pause; network cut;
//! added latency). Every fault is healed and the system must come back (a probe, a
//! transfer that writes on all three databases through the decision path, commits)
//! before the next. At the end: heal
//! everything, wait for recovery, resolve every unknown outcome, and audit.
//!
//! Audit rules: see [`rules`] (what each says, and the bounds, with their reasons, in
//! one place) and ARCHITECTURE.md (each rule beside the broken build that fails it).

pub mod docker;
pub mod proxy;
pub mod rules;

use rules::{Facts, FinalRead};

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use twopc_coordinator::bank::{self, Expectation};
use twopc_coordinator::workload::{self, WorkloadConfig};

use docker::{Container, Docker};

/// Longest the driver waits for anything (a probe to commit, in-doubt transactions to
/// resolve, commits to resume) before it records "never" and goes on: it only bounds a
/// run. What the system must meet are the tighter bounds in [`rules`].
const WAIT_LIMIT_MS: u64 = 90_000;
/// Concurrent GETs when asking the coordinator about outcomes.
const STATUS_CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    KillCoordinator,
    KillAgent,
    KillPostgres,
    Pause,
    Partition,
    Latency,
}

pub const ALL_KINDS: [FaultKind; 6] = [
    FaultKind::KillCoordinator,
    FaultKind::KillAgent,
    FaultKind::KillPostgres,
    FaultKind::Pause,
    FaultKind::Partition,
    FaultKind::Latency,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillCoordinator => "kill_coordinator",
            FaultKind::KillAgent => "kill_agent",
            FaultKind::KillPostgres => "kill_postgres",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Latency => "latency",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<FaultKind> {
        ALL_KINDS
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| format!("unknown fault kind {s:?}"))
    }
}

/// Where the topology is and how hard to push it.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// docker-compose project name (`-p`).
    pub project: String,
    /// The coordinator's client API, as published on this host.
    pub coordinator_url: String,
    /// `(participant name, compose service of its agent, compose service of its
    /// PostgreSQL, database URL as published on this host)`, three of them.
    pub databases: Vec<(String, String, String, String)>,
    pub coordinator_service: String,
    /// Control port of the latency proxy on the coordinator-to-agent links (its links
    /// are named after the participants).
    pub latency_control: String,
    pub kinds: Vec<FaultKind>,
    pub faults_per_kind: usize,
    pub clients: usize,
    pub accounts_per_db: u32,
    pub initial_balance: i64,
    /// How long a fault lasts before it is healed, drawn from this range.
    pub fault_hold_ms: (u64, u64),
    /// Quiet time after a recovery before the next fault, drawn from this range.
    pub fault_gap_ms: (u64, u64),
    /// A mid-run 2PC read audit this often.
    pub audit_interval_ms: u64,
    pub request_timeout_ms: u64,
    pub seed: u64,
    pub report_path: PathBuf,
    /// The coordinator runs with `--last-agent`: the run must show that path committed
    /// transfers (rule `last_agent_path_ran`), not a silent fallback.
    pub expect_last_agent: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub target: String,
    /// From the start of the run.
    pub at_ms: u64,
    pub held_ms: u64,
    /// From the heal until a probe over every database committed; `None`: never, within
    /// the limit.
    pub recovery_ms: Option<u64>,
    /// From the heal until every transaction of ours that was prepared at the heal had
    /// been resolved (committed or rolled back); `None`: not within the limit.
    pub in_doubt_resolved_ms: Option<u64>,
    /// From the recovery until `rules::PROGRESS_COMMITS` more transfers committed;
    /// `None`: not within the driver's wait limit.
    pub progress_ms: Option<u64>,
    /// The fault could not be injected (the rule `faults_injected` fails).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    pub name: &'static str,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Transfers {
    pub attempted: u64,
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
    pub unknown_resolved_committed: u64,
    pub unknown_resolved_aborted: u64,
    pub unknown_unresolved: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadAudits {
    pub attempted: u64,
    pub consistent: u64,
    pub inconsistent: u64,
    /// Could not complete (a fault was in the way, or a lock wait timed out).
    pub incomplete: u64,
    /// What each audit's client was told of its own transaction (`committed`, or
    /// `aborted` once its rollback was answered): `coordinator_agrees` asks about these
    /// too.
    #[serde(skip)]
    pub told: Vec<(String, &'static str)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoveryStats {
    pub count: usize,
    pub min_ms: u64,
    pub p50_ms: u64,
    pub max_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub pass: bool,
    pub seed: u64,
    pub duration_s: f64,
    pub transfers: Transfers,
    pub faults_by_kind: BTreeMap<&'static str, usize>,
    /// Heal → a probe over every database committed.
    pub recovery_by_kind: BTreeMap<&'static str, RecoveryStats>,
    /// Heal → every transaction prepared at the heal resolved.
    pub in_doubt_resolved_by_kind: BTreeMap<&'static str, RecoveryStats>,
    pub faults: Vec<FaultRecord>,
    pub read_audits: ReadAudits,
    /// From the end of the load until no prepared transaction of ours remained.
    pub prepared_cleared_ms: Option<u64>,
    pub total_expected: i64,
    pub total_found: i64,
    pub rules: Vec<Rule>,
}

impl ChaosReport {
    /// The readable summary.
    pub fn summary(&self) -> String {
        let t = &self.transfers;
        let mut s = format!(
            "chaos run (seed {}): {:.0} s\n\
             transfers: {} attempted, {} committed, {} aborted, {} unknown \
             (resolved: {} committed, {} aborted, {} unresolved)\n",
            self.seed,
            self.duration_s,
            t.attempted,
            t.committed,
            t.aborted,
            t.unknown,
            t.unknown_resolved_committed,
            t.unknown_resolved_aborted,
            t.unknown_unresolved
        );
        s.push_str(
            "faults: count; ms from heal to serving, and to in-doubt resolved (min/p50/max)\n",
        );
        let mmm = |r: Option<&RecoveryStats>| {
            r.map_or("-".to_owned(), |r| {
                format!("{}/{}/{}", r.min_ms, r.p50_ms, r.max_ms)
            })
        };
        for (kind, n) in &self.faults_by_kind {
            s.push_str(&format!(
                "  {kind:<17} {n:>3}   serving {:<16} in-doubt resolved {}\n",
                mmm(self.recovery_by_kind.get(kind)),
                mmm(self.in_doubt_resolved_by_kind.get(kind)),
            ));
        }
        let r = &self.read_audits;
        s.push_str(&format!(
            "2PC read audits: {} attempted, {} consistent, {} inconsistent, {} incomplete\n",
            r.attempted, r.consistent, r.inconsistent, r.incomplete
        ));
        match self.prepared_cleared_ms {
            Some(ms) => s.push_str(&format!(
                "prepared transactions cleared {ms} ms after the load stopped\n"
            )),
            None => s.push_str("prepared transactions NOT cleared\n"),
        }
        s.push_str(&format!(
            "total: expected {}, found {}\n",
            self.total_expected, self.total_found
        ));
        for rule in &self.rules {
            s.push_str(&format!(
                "  [{}] {}: {}\n",
                if rule.pass { "pass" } else { "FAIL" },
                rule.name,
                rule.detail
            ));
        }
        s.push_str(if self.pass {
            "chaos: PASS\n"
        } else {
            "chaos: FAIL\n"
        });
        s
    }
}

struct Topology {
    coordinator: Container,
    agents: Vec<Container>,
    postgres: Vec<Container>,
}

impl Topology {
    fn all(&self) -> Vec<&Container> {
        let mut v = vec![&self.coordinator];
        v.extend(self.agents.iter());
        v.extend(self.postgres.iter());
        v
    }
}

/// Runs the whole chaos scenario against an already running topology.
pub async fn run(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(
        config.databases.len() >= 2,
        "chaos needs at least two databases"
    );
    let docker = Docker::new(&config.project);
    let topo = Topology {
        coordinator: docker.container(&config.coordinator_service).await?,
        agents: futures::future::try_join_all(
            config.databases.iter().map(|d| docker.container(&d.1)),
        )
        .await?,
        postgres: futures::future::try_join_all(
            config.databases.iter().map(|d| docker.container(&d.2)),
        )
        .await?,
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .build()?;
    // Probes, read audits and outcome questions go through the application's client;
    // one attempt each, so what it is told is the coordinator's first answer.
    let api = twopc_client::Client::builder(&config.coordinator_url)
        .request_timeout(Duration::from_millis(config.request_timeout_ms))
        .retry(twopc_client::RetryPolicy {
            attempts_max: 1,
            settle_timeout: Duration::ZERO,
            ..twopc_client::RetryPolicy::default()
        })
        .build()?;
    let names: Vec<String> = config.databases.iter().map(|d| d.0.clone()).collect();
    let dbs: Vec<(String, String)> = config
        .databases
        .iter()
        .map(|d| (d.0.clone(), d.3.clone()))
        .collect();

    // A clean slate: nothing left over from an earlier run, then the bank (straight on
    // each database), then a probe that writes through the coordinator.
    heal_all(&docker, &topo, &config).await?;
    eprintln!(
        "chaos: waiting for the databases; loading {} accounts per database",
        config.accounts_per_db
    );
    let started_wait = Instant::now();
    for (name, url) in &dbs {
        set_up_bank(url, &config, WAIT_LIMIT_MS)
            .await
            .with_context(|| format!("set up the bank on {name}"))?;
    }
    let per_db = config.accounts_per_db as i64 * config.initial_balance;
    let initial: Vec<(String, i64)> = names.iter().map(|n| (n.clone(), per_db)).collect();
    let expected_total = per_db * names.len() as i64;
    let mut probes = Probes::new(&names, config.accounts_per_db, config.seed);
    probes
        .wait_recovered(&api, WAIT_LIMIT_MS)
        .await
        .context("the topology did not come up")?;
    eprintln!(
        "chaos: topology up after {} ms",
        started_wait.elapsed().as_millis()
    );

    let started = Instant::now();
    let stop = CancellationToken::new();
    let commits = Arc::new(AtomicU64::new(0));
    let txn_prefix = format!("chaos{}-{}", config.seed, now_ms());
    let load = tokio::spawn(workload::run(WorkloadConfig {
        base_url: config.coordinator_url.clone(),
        participants: names.clone(),
        accounts_per_db: config.accounts_per_db,
        clients: config.clients,
        max_transfers: u64::MAX,
        duration: Duration::from_secs(24 * 3600),
        max_amount: 100,
        txn_prefix,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        stop_on_no_answer: false,
        stop: Some(stop.clone()),
        // What users send, not only two-leg transfers; an unknown answer is followed by
        // GET and, if aborted, a retry with the same txn id.
        shapes: workload::Shape::ALL.to_vec(),
        retry_unknown: true,
        committed_counter: Some(commits.clone()),
    }));
    // A read audit's SHARE locks stall every writer until it ends (by design: they make
    // its sums one cut), and an audit waiting for a lock behind a transfer that waits for
    // the audit's other lock stalls them until a lock timeout breaks the cycle (seconds).
    // The commit rates are measured while no audit runs, or they measure the auditor.
    let quiet = Arc::new(tokio::sync::Mutex::new(()));
    let auditor = {
        let quiet = quiet.clone();
        let api = api.clone();
        let names = names.clone();
        let initial = initial.clone();
        let stop = stop.clone();
        let every = Duration::from_millis(config.audit_interval_ms);
        tokio::spawn(async move {
            let mut out = ReadAudits::default();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let _quiet = quiet.lock().await;
                out.attempted += 1;
                match read_audit(&api, &names, &initial, &mut out.told).await {
                    Ok(Ok(())) => out.consistent += 1,
                    Ok(Err(why)) => {
                        eprintln!("chaos: 2PC read audit INCONSISTENT: {why}");
                        out.inconsistent += 1;
                    }
                    Err(e) => {
                        eprintln!("chaos: 2PC read audit incomplete: {e:#}");
                        out.incomplete += 1;
                    }
                }
            }
            out
        })
    };

    // The fault-free rate, to judge the healed one by.
    let baseline_rate = commit_rate(&commits, RATE_WINDOW, &quiet).await;
    eprintln!("chaos: fault-free rate {baseline_rate:.1} commits/s");

    // The faults, in a random order, each healed and recovered from before the next.
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut plan: Vec<FaultKind> = config
        .kinds
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, config.faults_per_kind))
        .collect();
    plan.shuffle(&mut rng);
    let mut faults = Vec::with_capacity(plan.len());
    let total = plan.len();
    for (i, kind) in plan.into_iter().enumerate() {
        let gap = rng.gen_range(config.fault_gap_ms.0..=config.fault_gap_ms.1);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        // Latency is added on the coordinator's link to one participant; every other
        // fault hits a container.
        let target: Target = match kind {
            FaultKind::KillCoordinator => Target::Container(&topo.coordinator),
            FaultKind::KillAgent => {
                Target::Container(topo.agents.choose(&mut rng).context("no agents")?)
            }
            FaultKind::KillPostgres => {
                Target::Container(topo.postgres.choose(&mut rng).context("no databases")?)
            }
            FaultKind::Pause | FaultKind::Partition => {
                Target::Container(topo.all().choose(&mut rng).context("no containers")?)
            }
            FaultKind::Latency => Target::Link(names.choose(&mut rng).context("no links")?),
        };
        let target_name = match target {
            Target::Container(c) => c.service.clone(),
            Target::Link(l) => format!("link to {l}"),
        };
        let hold = rng.gen_range(config.fault_hold_ms.0..=config.fault_hold_ms.1);
        let delay_ms = rng.gen_range(50..=250);
        let at_ms = started.elapsed().as_millis() as u64;
        let error = inject(
            &docker,
            &config.latency_control,
            kind,
            target,
            hold,
            delay_ms,
        )
        .await
        .err();
        if let Some(e) = &error {
            eprintln!("chaos: {} on {target_name}: {e:#}", kind.name());
        }
        // Heal whatever state the fault left, even after an error.
        match target {
            Target::Container(c) => docker
                .heal(c)
                .await
                .with_context(|| format!("heal {}", c.service))?,
            Target::Link(l) => proxy::set_delay(&config.latency_control, l, 0)
                .await
                .with_context(|| format!("heal the link to {l}"))?,
        }
        let healed = Instant::now();
        let recovery_ms = probes
            .wait_recovered(&api, WAIT_LIMIT_MS)
            .await
            .ok()
            .map(|_| healed.elapsed().as_millis() as u64);
        let in_doubt_resolved_ms = wait_prepared_resolved(&dbs, healed, WAIT_LIMIT_MS).await;
        let progress_ms = wait_commits(&commits, rules::PROGRESS_COMMITS, WAIT_LIMIT_MS).await;
        eprintln!(
            "chaos: [{:>3}/{total}] {:>6.1}s {:<16} {:<12} held {:>4} ms, serving in {}, in-doubt resolved in {}, committing in {}",
            i + 1,
            started.elapsed().as_secs_f64(),
            kind.name(),
            target_name,
            hold,
            recovery_ms.map_or("NEVER".to_owned(), |ms| format!("{ms} ms")),
            in_doubt_resolved_ms.map_or("NEVER".to_owned(), |ms| format!("{ms} ms")),
            progress_ms.map_or("NEVER".to_owned(), |ms| format!("{ms} ms"))
        );
        faults.push(FaultRecord {
            kind,
            target: target_name,
            at_ms,
            held_ms: hold,
            recovery_ms,
            in_doubt_resolved_ms,
            progress_ms,
            error: error.map(|e| format!("{e:#}")),
        });
    }

    // Heal everything (again), stop the load, and let recovery finish.
    heal_all(&docker, &topo, &config).await?;
    let _ = probes.wait_recovered(&api, WAIT_LIMIT_MS).await;
    let healed_rate = commit_rate(&commits, RATE_WINDOW, &quiet).await;
    let last_agent_commits = if config.expect_last_agent {
        Some(
            metric(
                &http,
                &config.coordinator_url,
                "twopc_txns_committed_last_agent_total",
            )
            .await
            .unwrap_or(0),
        )
    } else {
        None
    };
    stop.cancel();
    let mut report = load.await.context("join the workload")??;
    // The probes are transfers too: what their senders were told is audited alike.
    probes.add_to(&mut report);
    let read_audits_mid = auditor.await.context("join the auditor")?;
    eprintln!(
        "chaos: load stopped: {} committed, {} aborted, {} unknown; waiting for recovery",
        report.committed, report.aborted, report.unknown
    );
    let load_stopped = Instant::now();
    let prepared_cleared_ms = wait_no_prepared(&dbs, load_stopped, WAIT_LIMIT_MS).await;
    let nothing_open = wait_nothing_open(
        &http,
        &config.coordinator_url,
        &dbs,
        rules::LEFTOVER_LIMIT_MS,
    )
    .await;

    // What became of every transfer whose client got no answer.
    let resolved = resolve_outcomes(&api, &report.unknown_ids).await;
    let mut unknown_committed = HashSet::new();
    let mut unknown_aborted = HashSet::new();
    let mut unresolved = Vec::new();
    for (id, outcome) in &resolved {
        match outcome.as_deref() {
            Some("committed") => unknown_committed.insert(id.clone()),
            Some("aborted") => unknown_aborted.insert(id.clone()),
            _ => {
                unresolved.push(id.clone());
                true
            }
        };
    }
    let mid_run_consistent = read_audits_mid.consistent;
    let mut read_audits = read_audits_mid;
    read_audits.attempted += 1;
    let mut final_told = Vec::new();
    let final_read = match read_audit(&api, &names, &initial, &mut final_told).await {
        Ok(Ok(())) => {
            read_audits.consistent += 1;
            FinalRead::Consistent
        }
        Ok(Err(why)) => {
            read_audits.inconsistent += 1;
            FinalRead::Inconsistent(why)
        }
        Err(e) => {
            read_audits.incomplete += 1;
            FinalRead::Incomplete(format!("{e:#}"))
        }
    };
    // The coordinator must still say what it told: `committed` for every acknowledged
    // commit, `aborted` for every acknowledged abort.
    let mut disagree = Vec::new();
    let mut asked = 0;
    // The read audits' own transactions too (they write nothing, so the bank audit
    // cannot check them; only the coordinator's answer can).
    let audits_told = |outcome: &str| -> HashSet<String> {
        read_audits
            .told
            .iter()
            .chain(&final_told)
            .filter(|(_, o)| *o == outcome)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let (audits_committed, audits_aborted) = (audits_told("committed"), audits_told("aborted"));
    let audits_asked = audits_committed.len() + audits_aborted.len();
    for (told, outcome) in [
        (&report.expectation.committed, "committed"),
        (&report.expectation.aborted, "aborted"),
        (&audits_committed, "committed"),
        (&audits_aborted, "aborted"),
    ] {
        let ids: Vec<String> = told.iter().cloned().collect();
        let answers = resolve_outcomes(&api, &ids).await;
        asked += answers.len();
        disagree.extend(
            answers
                .iter()
                .filter(|(_, o)| o.as_deref() != Some(outcome))
                .map(|(id, o)| format!("{id}={}", o.as_deref().unwrap_or("no answer"))),
        );
    }

    let expect = Expectation {
        committed: report
            .expectation
            .committed
            .union(&unknown_committed)
            .cloned()
            .collect(),
        aborted: report
            .expectation
            .aborted
            .union(&unknown_aborted)
            .cloned()
            .collect(),
    };
    let audit = bank::audit(&dbs, expected_total, &initial, "twopc_", Some(&expect))
        .await
        .context("audit the databases")?;
    let audit_total = audit.total;
    let facts = Facts {
        expected_total,
        audit,
        told_committed: report.expectation.committed.clone(),
        told_aborted: report.expectation.aborted.clone(),
        unknown: report.unknown,
        unknown_committed: unknown_committed.clone(),
        unknown_aborted: unknown_aborted.clone(),
        unresolved: unresolved.clone(),
        disagree,
        asked,
        audits_asked,
        prepared_cleared_ms,
        nothing_open,
        faults: faults.clone(),
        read_audits: read_audits.clone(),
        mid_run_consistent,
        final_read: Some(final_read),
        baseline_rate,
        healed_rate,
        last_agent_commits,
    };
    let rules = rules::evaluate(&facts);

    let mut faults_by_kind = BTreeMap::new();
    for f in &faults {
        *faults_by_kind.entry(f.kind.name()).or_insert(0) += 1;
    }
    let recovery_by_kind = stats_by_kind(&faults, |f| f.recovery_ms);
    let in_doubt_resolved_by_kind = stats_by_kind(&faults, |f| f.in_doubt_resolved_ms);
    let out = ChaosReport {
        pass: rules.iter().all(|r| r.pass),
        seed: config.seed,
        duration_s: started.elapsed().as_secs_f64(),
        transfers: Transfers {
            attempted: report.committed + report.aborted + report.unknown,
            committed: report.committed,
            aborted: report.aborted,
            unknown: report.unknown,
            unknown_resolved_committed: unknown_committed.len() as u64,
            unknown_resolved_aborted: unknown_aborted.len() as u64,
            unknown_unresolved: unresolved.len() as u64,
        },
        faults_by_kind,
        recovery_by_kind,
        in_doubt_resolved_by_kind,
        faults,
        read_audits,
        prepared_cleared_ms,
        total_expected: expected_total,
        total_found: audit_total,
        rules,
    };
    let json = serde_json::to_string_pretty(&out)?;
    if let Some(dir) = config.report_path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
    }
    std::fs::write(&config.report_path, json)
        .with_context(|| format!("write {}", config.report_path.display()))?;
    Ok(out)
}

/// How long the fault-free and the healed commit rates are measured.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Commits per second over `window`, counted by the workload, with no read audit
/// running (`quiet` is held meanwhile).
async fn commit_rate(commits: &AtomicU64, window: Duration, quiet: &tokio::sync::Mutex<()>) -> f64 {
    let _quiet = quiet.lock().await;
    let before = commits.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let after = commits.load(Ordering::Relaxed);
    (after - before) as f64 / window.as_secs_f64()
}

/// Milliseconds until `n` more commits were counted, or None within `limit_ms`.
async fn wait_commits(commits: &AtomicU64, n: u64, limit_ms: u64) -> Option<u64> {
    let start = Instant::now();
    let target = commits.load(Ordering::Relaxed) + n;
    while start.elapsed() < Duration::from_millis(limit_ms) {
        if commits.load(Ordering::Relaxed) >= target {
            return Some(start.elapsed().as_millis() as u64);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A counter from the coordinator's `/metrics` (None if it does not answer).
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> Option<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[derive(Clone, Copy)]
enum Target<'a> {
    Container(&'a Container),
    /// The coordinator's link to this participant, through the latency proxy.
    Link(&'a str),
}

/// Every container running, unpaused and attached; no added latency.
async fn heal_all(docker: &Docker, topo: &Topology, config: &ChaosConfig) -> anyhow::Result<()> {
    for c in topo.all() {
        docker
            .heal(c)
            .await
            .with_context(|| format!("heal {}", c.service))?;
    }
    for (name, ..) in &config.databases {
        proxy::set_delay(&config.latency_control, name, 0)
            .await
            .with_context(|| format!("heal the link to {name}"))?;
    }
    Ok(())
}

/// Does one fault and holds it for `hold_ms`; the caller heals.
async fn inject(
    docker: &Docker,
    latency_control: &str,
    kind: FaultKind,
    target: Target<'_>,
    hold_ms: u64,
    delay_ms: u64,
) -> anyhow::Result<()> {
    let hold = Duration::from_millis(hold_ms);
    match (kind, target) {
        (
            FaultKind::KillCoordinator | FaultKind::KillAgent | FaultKind::KillPostgres,
            Target::Container(c),
        ) => {
            docker.kill(c).await?;
            tokio::time::sleep(hold).await;
            docker.start(c).await?;
        }
        (FaultKind::Pause, Target::Container(c)) => {
            docker.pause(c).await?;
            tokio::time::sleep(hold).await;
            docker.unpause(c).await?;
        }
        (FaultKind::Partition, Target::Container(c)) => {
            docker.disconnect(c).await?;
            tokio::time::sleep(hold).await;
            docker.connect(c).await?;
        }
        (FaultKind::Latency, Target::Link(l)) => {
            proxy::set_delay(latency_control, l, delay_ms).await?;
            tokio::time::sleep(hold).await;
            proxy::set_delay(latency_control, l, 0).await?;
        }
        _ => anyhow::bail!("fault {} has no such target", kind.name()),
    }
    Ok(())
}

/// The probes that say whether the system serves: each a transfer through the
/// coordinator that writes on every database (a debit on one, a credit on each other),
/// so it takes the decision path (every branch votes YES, the decision is forced) and
/// the bank audit checks it like any other transfer. What each probe's sender was told
/// is kept and audited with the workload's.
struct Probes {
    names: Vec<String>,
    accounts_per_db: u32,
    rng: StdRng,
    sent: u64,
    committed: Vec<String>,
    aborted: Vec<String>,
    unknown: Vec<String>,
}

impl Probes {
    fn new(names: &[String], accounts_per_db: u32, seed: u64) -> Probes {
        Probes {
            names: names.to_vec(),
            accounts_per_db,
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            sent: 0,
            committed: Vec::new(),
            aborted: Vec::new(),
            unknown: Vec::new(),
        }
    }

    /// The next probe: a transfer across every database. The debited one rotates.
    fn next(&mut self) -> twopc_client::Transaction {
        self.sent += 1;
        let txn_id = format!("probe-{}-{}", now_ms(), self.sent);
        let n = self.names.len();
        let debited = (self.sent as usize) % n;
        let mut txn = twopc_client::Transaction::with_id(&txn_id);
        for (i, name) in self.names.iter().enumerate() {
            let account = self.rng.gen_range(1..=self.accounts_per_db as i32);
            let statements = if i == debited {
                bank::debit_statements(&txn_id, account, n as i64 - 1)
            } else {
                bank::credit_statements(&txn_id, account, 1)
            };
            for (sql, params) in statements {
                txn = txn.statement(name, &sql, params);
            }
        }
        txn
    }

    /// Until a probe commits through the coordinator (Ok), or `limit_ms` passed.
    async fn wait_recovered(
        &mut self,
        api: &twopc_client::Client,
        limit_ms: u64,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(limit_ms);
        let mut last = String::new();
        while Instant::now() < deadline {
            let txn = self.next();
            let txn_id = txn.txn_id().to_owned();
            let answer = api.run(&txn).await;
            if let Err(e) = &answer {
                last = e.to_string();
            }
            match workload::told_of(&answer) {
                workload::Told::Committed => {
                    self.committed.push(txn_id);
                    return Ok(());
                }
                workload::Told::Aborted => self.aborted.push(txn_id),
                workload::Told::Unknown => self.unknown.push(txn_id),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("no probe committed within {limit_ms} ms (last: {last})")
    }

    /// Adds what the probes' sender was told to the workload's report.
    fn add_to(&self, report: &mut workload::WorkloadReport) {
        report.committed += self.committed.len() as u64;
        report.aborted += self.aborted.len() as u64;
        report.unknown += self.unknown.len() as u64;
        report
            .expectation
            .committed
            .extend(self.committed.iter().cloned());
        report
            .expectation
            .aborted
            .extend(self.aborted.iter().cloned());
        report.unknown_ids.extend(self.unknown.iter().cloned());
    }
}

/// Loads the bank on one database, retrying while it does not answer yet (bounded).
async fn set_up_bank(url: &str, config: &ChaosConfig, limit_ms: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(limit_ms);
    loop {
        match bank::setup_bank(url, config.accounts_per_db, config.initial_balance).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A read audit gives up a lock wait after this long. Longer than the agents' lock
/// timeout (2 s), so that in a deadlock with a transfer (the audit holds one database's
/// SHARE lock and waits behind the transfer on another, where the transfer waits for the
/// first) the transfer loses and the audit completes. The price: writers on the locked
/// database stop for up to a few seconds per audit, which the bounds in `rules` allow.
/// (Tried: 250 ms with ten attempts stalled nothing, but only 3 of 29 audits completed.)
const AUDIT_LOCK_TIMEOUT: &str = "5s";

/// A consistent read through twopc: one interactive distributed transaction that takes
/// SHARE locks on the bank tables of every database (each waits for the prepared
/// transfers there to finish) and reads the sums, and only then commits. Every lock is
/// taken before any is released, so the sums are one cut. (A single-shot request would
/// not do: each branch runs and votes in one round trip, and a read-only branch commits,
/// releasing its locks, when it votes.) `Ok(Err(why))`: the read completed and the books
/// do not balance.
async fn read_audit(
    api: &twopc_client::Client,
    names: &[String],
    initial: &[(String, i64)],
    told: &mut Vec<(String, &'static str)>,
) -> anyhow::Result<Result<(), String>> {
    let txn_id = format!("audit-{}", now_ms());
    let t = api
        .begin_with(&txn_id, None, Some(30_000))
        .await
        .context("begin the read audit")?;
    let reads = async {
        let mut sums = Vec::with_capacity(names.len());
        for p in names {
            for sql in [
                format!("SET LOCAL lock_timeout = '{AUDIT_LOCK_TIMEOUT}'"),
                "LOCK TABLE acct, ledger IN SHARE MODE".to_owned(),
            ] {
                t.execute(p, &sql, vec![])
                    .await
                    .with_context(|| format!("{sql} on {p}"))?;
            }
            let r = t
                .execute(
                    p,
                    "SELECT (SELECT COALESCE(sum(bal), 0) FROM acct)::bigint AS bal, \
                     (SELECT COALESCE(sum(delta), 0) FROM ledger)::bigint AS ledger",
                    vec![],
                )
                .await
                .with_context(|| format!("read the sums on {p}"))?;
            let row = r.rows.first().context("no row in the answer")?;
            let bal = row
                .get("bal")
                .and_then(Value::as_i64)
                .context("no balance in the answer")?;
            let ledger = row
                .get("ledger")
                .and_then(Value::as_i64)
                .context("no ledger sum in the answer")?;
            sums.push((p.clone(), bal, ledger));
        }
        Ok::<_, anyhow::Error>(sums)
    }
    .await;
    let sums = match reads {
        Ok(s) => s,
        Err(e) => {
            if t.rollback().await.is_ok() {
                told.push((txn_id, "aborted"));
            }
            return Err(e);
        }
    };
    t.commit().await.context("commit the read audit")?;
    told.push((txn_id.clone(), "committed"));
    let mut total = 0i64;
    let mut expected = 0i64;
    let mut problems = Vec::new();
    for (name, bal, ledger) in sums {
        let init = initial
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, t)| *t);
        if bal != init + ledger {
            problems.push(format!(
                "{name}: balances {bal} != {init} + ledger {ledger}"
            ));
        }
        total += bal;
        expected += init;
    }
    if total != expected {
        problems.push(format!("total {total} != {expected}"));
    }
    Ok(if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    })
}

/// Until no database holds a prepared transaction of ours; the time since `since`, or
/// `None` past the limit.
/// What is left open of finished transactions: the coordinator's live transactions and,
/// per database, sessions idle in a transaction or idle holding a lock. Empty when
/// nothing is.
async fn leftovers(
    http: &reqwest::Client,
    coordinator_url: &str,
    dbs: &[(String, String)],
) -> Vec<String> {
    let mut left = Vec::new();
    let metrics = match http.get(format!("{coordinator_url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("unreachable: {e}"),
    };
    let open = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twopc_txns_open "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    match open {
        Some(0) => {}
        Some(n) => left.push(format!("coordinator: {n} live transactions")),
        None => left.push("coordinator: twopc_txns_open not readable".into()),
    }
    for (name, url) in dbs {
        let sql = "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%'), \
                   count(*) FILTER (WHERE state = 'idle' AND EXISTS \
                     (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype <> 'virtualxid')) \
                   FROM pg_stat_activity a \
                   WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let counts = async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let row = client.query_one(sql, &[]).await?;
            Ok::<_, tokio_postgres::Error>((row.get::<_, i64>(0), row.get::<_, i64>(1)))
        };
        match counts.await {
            Ok((0, 0)) => {}
            Ok((idle_in_txn, locking)) => left.push(format!(
                "{name}: {idle_in_txn} sessions idle in a transaction, {locking} idle sessions holding locks"
            )),
            Err(e) => left.push(format!("{name}: cannot ask: {e}")),
        }
    }
    left
}

/// Waits until nothing is left open (see [`leftovers`]); how long it took, or what was
/// still open at the limit.
async fn wait_nothing_open(
    http: &reqwest::Client,
    coordinator_url: &str,
    dbs: &[(String, String)],
    limit_ms: u64,
) -> Result<u64, Vec<String>> {
    let since = Instant::now();
    let deadline = since + Duration::from_millis(limit_ms);
    loop {
        let left = leftovers(http, coordinator_url, dbs).await;
        if left.is_empty() {
            return Ok(since.elapsed().as_millis() as u64);
        }
        if Instant::now() >= deadline {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_no_prepared(dbs: &[(String, String)], since: Instant, limit_ms: u64) -> Option<u64> {
    let deadline = since + Duration::from_millis(limit_ms);
    loop {
        if prepared_gids(dbs).await.is_ok_and(|g| g.is_empty()) {
            return Some(since.elapsed().as_millis() as u64);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stats_by_kind(
    faults: &[FaultRecord],
    value: impl Fn(&FaultRecord) -> Option<u64>,
) -> BTreeMap<&'static str, RecoveryStats> {
    let mut by: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for f in faults {
        if let Some(ms) = value(f) {
            by.entry(f.kind.name()).or_default().push(ms);
        }
    }
    by.into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            let stats = RecoveryStats {
                count: v.len(),
                min_ms: v[0],
                p50_ms: v[v.len() / 2],
                max_ms: v[v.len() - 1],
            };
            (k, stats)
        })
        .collect()
}

/// Until every transaction of ours prepared at `since` (on any database) is resolved;
/// the time since `since`, or `None` past the limit. New ones may come and go meanwhile:
/// the load goes on.
async fn wait_prepared_resolved(
    dbs: &[(String, String)],
    since: Instant,
    limit_ms: u64,
) -> Option<u64> {
    let deadline = since + Duration::from_millis(limit_ms);
    // Every database must answer for the snapshot to be complete.
    let at_heal = loop {
        if let Ok(g) = prepared_gids(dbs).await {
            break g;
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if let Ok(now) = prepared_gids(dbs).await {
            if at_heal.is_disjoint(&now) {
                return Some(since.elapsed().as_millis() as u64);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn prepared_gids(dbs: &[(String, String)]) -> anyhow::Result<HashSet<String>> {
    Ok(bank::prepared_gids(dbs, "twopc_")
        .await?
        .into_iter()
        .collect())
}

/// The coordinator's answer for each txn id: `Some("committed" | "aborted")`, or `None`
/// if it gave no definite one within the limit.
async fn resolve_outcomes(
    api: &twopc_client::Client,
    ids: &[String],
) -> Vec<(String, Option<String>)> {
    use futures::stream::{self, StreamExt};
    use twopc_client::Outcome;
    let deadline = Instant::now() + Duration::from_millis(rules::RESOLVE_LIMIT_MS);
    stream::iter(ids.iter().cloned())
        .map(|id| async move {
            loop {
                let outcome = api.status(&id).await.ok().and_then(|s| s.outcome);
                match outcome {
                    Some(Outcome::Committed) => return (id, Some("committed".to_owned())),
                    Some(Outcome::Aborted) => return (id, Some("aborted".to_owned())),
                    _ if Instant::now() >= deadline => return (id, None),
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        })
        .buffer_unordered(STATUS_CONCURRENCY)
        .collect()
        .await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_kinds_round_trip_by_name() {
        for k in ALL_KINDS {
            assert_eq!(FaultKind::parse(k.name()).unwrap(), k);
        }
        assert!(FaultKind::parse("reboot").is_err());
    }
}
