//! Crash tests with real processes and real clusters: a failpoint (or SIGKILL, or an
//! immediate PostgreSQL stop) at every protocol step under concurrent load; then the dead
//! process is restarted and the bank checker must find one outcome everywhere, every
//! acknowledged commit present, nothing of ours prepared, and `GET` telling the truth.

use std::collections::HashMap;
use std::time::Duration;

use twopc_testkit::procs::{Bins, ProcHarness};
use twopc_testkit::workload::{self, WorkloadConfig, WorkloadReport};
use twopc_testkit::{Expectation, StopMode, ACCOUNTS, BALANCE};

fn bins() -> Bins {
    Bins {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator-fp").into(),
        participant: env!("CARGO_BIN_EXE_twopc-participant-fp").into(),
    }
}

fn load(
    h: &ProcHarness,
    tag: &str,
    transfers: u64,
    seconds: u64,
    stop_on_no_answer: bool,
) -> WorkloadConfig {
    WorkloadConfig {
        base_url: h.base_url(),
        participants: h.names.clone(),
        accounts_per_db: ACCOUNTS,
        clients: 8,
        max_transfers: transfers,
        duration: Duration::from_secs(seconds),
        max_amount: BALANCE / 2,
        txn_prefix: tag.into(),
        request_timeout: Duration::from_secs(15),
        stop_on_no_answer,
        stop: None,
        // The shapes users send: a writer beside a reader, single-database (one-phase)
        // transfers, interactive ones (committed, rolled back, failing).
        shapes: workload::Shape::ALL.to_vec(),
        // Crash cases stop at the first unanswered request (the coordinator is dead);
        // the others ask GET and retry.
        retry_unknown: !stop_on_no_answer,
        committed_counter: None,
    }
}

/// Asks the coordinator what happened to every transfer whose client got no answer, and
/// checks the databases against what every client was told or found out.
async fn settle_and_audit(h: &ProcHarness, report: &WorkloadReport, case: &str) {
    let took = h
        .wait_resolved(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let mut expect: Expectation = report.expectation.clone();
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for id in &report.unknown_ids {
        // A coordinator with last-agent commits says `recovering` for a transaction it
        // does not know until a recovery pass has read every decision table.
        let mut st = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        for _ in 0..50 {
            if st["state"] != "recovering" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            st = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        }
        match st["outcome"].as_str() {
            Some("committed") => {
                expect.committed.insert(id.clone());
                *outcomes.entry("committed").or_default() += 1;
            }
            Some("aborted") => {
                expect.aborted.insert(id.clone());
                *outcomes.entry("aborted").or_default() += 1;
            }
            other => panic!("{case}: {id} still {other:?} after recovery: {st}"),
        }
    }
    let audit = h.audit(Some(&expect)).await.unwrap();
    assert!(
        audit.ok(),
        "{case}: {}\nunknown resolved as {outcomes:?}",
        audit.violations().join("\n")
    );
    eprintln!(
        "{case}: committed {} aborted {} unknown {} ({outcomes:?}), resolved in {took:?}",
        report.committed, report.aborted, report.unknown
    );
}

/// A failpoint's `crash` exits with status 137 (`participant/src/failpoint.rs`); any
/// other exit (a panic, an error, a signal) is not the failpoint firing.
fn assert_failpoint_exit(status: Option<std::process::ExitStatus>, case: &str, committed: u64) {
    let status = status
        .unwrap_or_else(|| panic!("{case}: the failpoint never fired ({committed} committed)"));
    assert_eq!(
        status.code(),
        Some(137),
        "{case}: the process exited, but not by the failpoint: {status:?}"
    );
}

/// Failpoints that fire after a branch prepared and before it is resolved, in a process
/// whose death leaves it prepared until the process is restarted.
const LEAVES_PREPARED: &[&str] = &[
    "coordinator.after_decision",
    "participant.after_prepare",
    "participant.before_commit_prepared",
    // Not `coordinator.mid_commit`: it fires on the first acknowledgement while the other
    // COMMIT PREPARED, sent at the same time, may already have committed. Not
    // `coordinator.after_prepare` nor `coordinator.after_last_commit`: they also fire for
    // a one-phase commit (one database, the last-agent path with no other branch), which
    // prepares nothing (seen: after_last_commit@30 left nothing prepared).
];

/// Crash the coordinator at `failpoint` (on its `hit`-th pass) under load, restart it,
/// audit. Twice per failpoint.
/// The fault cut transactions off: some client got no answer, or an answer saying a
/// connection failed (SQLSTATE class 08: the agent or its database was gone) — not a
/// run the fault missed.
fn assert_fault_hit(report: &WorkloadReport, case: &str) {
    let hit = report.unknown + report.errors_of_class("08");
    assert!(
        hit > 0,
        "{case}: the fault hit no transaction (no unanswered request, no connection error; errors seen: {:?})",
        report.error_codes
    );
}

async fn coordinator_crash_case(h: &mut ProcHarness, failpoint: &str, hit: u32, round: u32) {
    let case = format!("{failpoint}@{hit} round {round}");
    h.reset_bank().await.unwrap();
    h.start_all(&format!("{failpoint}=crash@{hit}"), &[])
        .await
        .unwrap();
    let report = workload::run(load(
        h,
        &format!("c{round}{}", failpoint.replace('.', "-")),
        400,
        20,
        true,
    ))
    .await
    .unwrap();
    let status = h
        .coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert_failpoint_exit(status, &case, report.committed);
    // Where the failpoint sits after a PREPARE and before the last COMMIT PREPARED, the
    // crash caught a transaction in flight: its branches are still prepared (nobody
    // resolves them until the coordinator is back).
    if LEAVES_PREPARED.contains(&failpoint) {
        let prepared = h.prepared_left().await.unwrap();
        assert!(
            !prepared.is_empty(),
            "{case}: the crash left nothing prepared, so it hit no transaction mid-protocol"
        );
    }
    h.coordinator = None;
    h.start_coordinator("").await.unwrap();
    settle_and_audit(h, &report, &case).await;
    h.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crashes_at_every_step() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    for (fp, hit) in [
        ("coordinator.before_prepare", 30),
        ("coordinator.after_prepare", 30),
        ("coordinator.after_decision", 30),
        ("coordinator.mid_commit", 30),
        ("decision_log.before_write", 20),
        ("decision_log.before_fsync", 20),
        ("decision_log.after_fsync", 20),
    ] {
        for round in 0..2 {
            coordinator_crash_case(&mut h, fp, hit + round * 7, round).await;
        }
    }
}

/// Crash agent `b` at `failpoint` under load; the coordinator stays up. Restart the agent.
async fn agent_crash_case(h: &mut ProcHarness, failpoint: &str, hit: u32, round: u32) {
    let case = format!("{failpoint}@{hit} round {round}");
    h.reset_bank().await.unwrap();
    let fp = format!("{failpoint}=crash@{hit}");
    h.start_all("", &["", &fp]).await.unwrap();
    let report = workload::run(load(
        h,
        &format!("a{round}{}", failpoint.replace('.', "-")),
        300,
        3,
        false,
    ))
    .await
    .unwrap();
    let status = h.agents[1]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    assert_failpoint_exit(status, &case, report.committed);
    // b died holding a prepared branch (after its PREPARE, or before its COMMIT
    // PREPARED): it stays prepared in b's database while b is down.
    if LEAVES_PREPARED.contains(&failpoint) {
        let prepared = h.prepared_left().await.unwrap();
        assert!(
            prepared.iter().any(|p| p.starts_with("b:")),
            "{case}: nothing prepared on b, so the crash hit no branch: {prepared:?}"
        );
    }
    // While b is down, anything decided but unacknowledged shows as in doubt.
    h.agents[1] = None;
    h.start_agent(1, "").await.unwrap();
    settle_and_audit(h, &report, &case).await;
    h.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crashes_at_every_step() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    for (fp, hit) in [
        ("participant.after_prepare", 25),
        ("participant.before_commit_prepared", 25),
        ("participant.after_commit_prepared", 25),
    ] {
        for round in 0..2 {
            agent_crash_case(&mut h, fp, hit + round * 5, round).await;
        }
    }
}

/// Last-agent commit (`--last-agent`) under crashes: the coordinator after the others
/// prepared (recovery must fence, then roll back) and after the last agent committed
/// (recovery must find the row and commit the rest); the last agent after its commit,
/// before its answer (the coordinator fences, cannot reach it, answers "unknown";
/// recovery settles it once the agent is back); an agent after it prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_agent_commit_survives_crashes() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.coordinator_args = vec!["--last-agent".into()];
    for (fp, hit) in [
        ("coordinator.after_prepare", 30),
        ("coordinator.after_last_commit", 30),
    ] {
        coordinator_crash_case(&mut h, fp, hit, 0).await;
    }
    for (fp, hit) in [
        ("participant.after_commit_decision", 25),
        ("participant.after_prepare", 25),
    ] {
        agent_crash_case(&mut h, fp, hit, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_coordinator_and_agent_under_load() {
    let mut h = ProcHarness::start(bins(), 3).await.unwrap();
    for round in 0..3u64 {
        // Coordinator.
        h.reset_bank().await.unwrap();
        h.start_all("", &[]).await.unwrap();
        let cfg = load(&h, &format!("k9c{round}"), 100_000, 30, true);
        let wl = tokio::spawn(workload::run(cfg));
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        h.coordinator.as_mut().unwrap().kill9();
        let report = wl.await.unwrap().unwrap();
        assert!(report.unknown > 0, "the kill cut requests off");
        h.coordinator = None;
        h.start_coordinator("").await.unwrap();
        settle_and_audit(&h, &report, &format!("kill -9 coordinator round {round}")).await;
        h.stop_all();

        // An agent.
        h.reset_bank().await.unwrap();
        h.start_all("", &[]).await.unwrap();
        let cfg = load(&h, &format!("k9a{round}"), 100_000, 3, false);
        let wl = tokio::spawn(workload::run(cfg));
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        let victim = (round % 3) as usize;
        h.agents[victim].as_mut().unwrap().kill9();
        h.agents[victim] = None;
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.start_agent(victim, "").await.unwrap();
        let report = wl.await.unwrap().unwrap();
        assert_fault_hit(&report, &format!("kill -9 agent round {round}"));
        settle_and_audit(&h, &report, &format!("kill -9 agent round {round}")).await;
        h.stop_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_stop_mid_load() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    for round in 0..2 {
        h.reset_bank().await.unwrap();
        h.start_all("", &[]).await.unwrap();
        let cfg = load(&h, &format!("pg{round}"), 100_000, 4, false);
        let wl = tokio::spawn(workload::run(cfg));
        tokio::time::sleep(Duration::from_millis(800)).await;
        let cluster = &mut h.clusters[round];
        tokio::task::block_in_place(|| {
            cluster.stop(StopMode::Immediate).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            cluster.start_again().unwrap();
        });
        let report = wl.await.unwrap().unwrap();
        assert_fault_hit(&report, &format!("postgres immediate stop round {round}"));
        settle_and_audit(
            &h,
            &report,
            &format!("postgres immediate stop round {round}"),
        )
        .await;
        h.stop_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_down_longer_than_recovery_interval() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.reset_bank().await.unwrap();
    // b dies on its first COMMIT PREPARED: that transaction is committed in the log and
    // prepared on b.
    h.start_all("", &["", "participant.before_commit_prepared=crash@1"])
        .await
        .unwrap();
    // A two-leg transfer (the other shapes might not reach b's COMMIT PREPARED).
    let mut cfg = load(&h, "down", 1, 5, false);
    cfg.shapes = vec![workload::Shape::Transfer];
    let report = workload::run(cfg).await.unwrap();
    assert_eq!(
        report.committed, 1,
        "committed once the decision is durable"
    );
    let status = h.agents[1]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    assert_failpoint_exit(status, "participant down", report.committed);
    h.agents[1] = None;
    let id = report.expectation.committed.iter().next().unwrap().clone();

    // Several recovery intervals pass; the transaction stays committed and in doubt.
    tokio::time::sleep(Duration::from_millis(h.recovery_interval_ms * 5)).await;
    let st = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    assert_eq!(st["pending"][0], "b", "{st}");
    let list = h.get("/v1/transactions?state=in_doubt").await.unwrap();
    let entry = &list["transactions"][0];
    assert_eq!(entry["txn_id"], id.as_str(), "{list}");
    assert!(
        entry["age_ms"].as_u64().unwrap() >= h.recovery_interval_ms * 4,
        "{list}"
    );
    let prepared = h.prepared_left().await.unwrap();
    assert_eq!(
        prepared.len(),
        1,
        "b keeps its branch prepared: {prepared:?}"
    );

    // b comes back: phase 2 finishes, nothing is left.
    h.start_agent(1, "").await.unwrap();
    settle_and_audit(&h, &report, "participant down").await;
    let st = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
    assert!(st["pending"].is_null(), "{st}");
}

/// An interactive transaction wrote on both databases; then agent `a` is killed and
/// restarted, losing the open branch (PostgreSQL rolls its session back). The commit must
/// abort — not prepare a new, empty branch on `a` and commit `b`'s half alone. (Found by
/// the chaos audit: its interactive 2PC reads came back inconsistent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_commit_aborts_after_an_agent_lost_its_branch() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.reset_bank().await.unwrap();
    h.start_all("", &[]).await.unwrap();
    let base = h.base_url();
    let client = h.http.clone();
    let post = |path: String, body: serde_json::Value| {
        let http = client.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, _) = post(
        "/v1/transactions".into(),
        serde_json::json!({ "txn_id": "lost-branch" }),
    )
    .await;
    assert_eq!(status, 201);
    for (p, delta) in [("a", -5), ("b", 5)] {
        let (status, body) = post(
            "/v1/transactions/lost-branch/statements".into(),
            serde_json::json!({ "participant": p,
                "sql": "UPDATE acct SET bal = bal + $1 WHERE id = 1", "params": [delta] }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    h.agents[0].as_mut().unwrap().kill9();
    h.agents[0] = None;
    h.start_agent(0, "").await.unwrap();

    let (status, body) = post(
        "/v1/transactions/lost-branch/commit".into(),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 409, "the commit must abort: {body}");
    assert_eq!(body["outcome"], "aborted", "{body}");
    let st = h.get("/v1/transactions/lost-branch").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");
    // Neither half is there, and nothing is left prepared.
    h.wait_resolved(Duration::from_secs(30)).await.unwrap();
    for i in 0..2 {
        let (client, conn) = tokio_postgres::connect(&h.url(i), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let bal: i64 = client
            .query_one("SELECT bal FROM acct WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            bal, BALANCE,
            "database {i} kept half of an aborted transaction"
        );
    }
    h.stop_all();
}
