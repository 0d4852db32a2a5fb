//! Every answer stays true (DESIGN invariants 2, 3, 6, 7, 8): regression tests for the
//! ways twopc used to lose, split or repeat a transaction, each against real PostgreSQL
//! (crash tests kill real processes). Each test names the defect it guards against and
//! failed before its fix.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::bank::credit_statements;
use twopc_testkit::procs::{wait_for, Bins, ProcHarness};
use twopc_testkit::{assert_replayed, stmts, transfer, AgentMode, Harness, BALANCE};

fn bins() -> Bins {
    Bins {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator-fp").into(),
        participant: env!("CARGO_BIN_EXE_twopc-participant-fp").into(),
    }
}

async fn query_i64(url: &str, sql: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .query_one(sql, &[])
        .await
        .expect(sql)
        .get::<_, i64>(0)
}

/// Waits for the coordinator to exit at its crash failpoint.
fn coordinator_dies(h: &mut ProcHarness) {
    let died = h
        .coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert!(died.is_some(), "the failpoint never fired");
    h.coordinator = None;
}

/// Kills agent `i` with SIGKILL.
/// Waits for agent `i` to die of its failpoint, and forgets it.
fn agent_dies(h: &mut ProcHarness, i: usize) {
    let died = h.agents[i]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert!(died.is_some(), "the failpoint never fired");
    h.agents[i] = None;
}

fn kill_agent(h: &mut ProcHarness, i: usize) {
    h.agents[i].as_mut().unwrap().kill9();
    h.agents[i] = None;
}

async fn ledger_rows(url: &str, txn_id: &str) -> i64 {
    query_i64(
        url,
        &format!("SELECT count(*) FROM ledger WHERE txn_id = '{txn_id}'"),
    )
    .await
}

/// Defect 1: a transaction in which one branch writes and the others only read used to
/// be committed with nothing logged. With `ack: durable` the client was told
/// `committed` at once; if the writer's agent died before COMMIT PREPARED and the
/// coordinator was then killed, recovery presumed abort and the write was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_writer_with_read_only_branches_survives_a_crash() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    // a dies as COMMIT PREPARED reaches it: prepared, not committed.
    h.start_all("", &["participant.before_commit_prepared=crash", ""])
        .await
        .unwrap();
    let body = json!({
        "txn_id": "single-writer-1",
        "ack": "durable",
        "branches": [
            {"participant": "a", "statements": stmts(credit_statements("single-writer-1", 1, 7))},
            {"participant": "b", "statements": [{"sql": "SELECT bal FROM acct WHERE id = 1", "params": []}]},
        ],
    });
    let (status, answer) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "committed", "{answer}");
    // The agent got COMMIT PREPARED and died before running it.
    agent_dies(&mut h, 0);
    // The coordinator dies too before anyone committed the branch.
    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    h.start_agent(0, "").await.unwrap();
    h.start_coordinator("").await.unwrap();
    h.wait_resolved(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        ledger_rows(&h.url(0), "single-writer-1").await,
        1,
        "the client was told committed: the write must be there"
    );
    let st = h.get("/v1/transactions/single-writer-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
}

/// Defect 2: a txn id that aborted and then committed lost the commit's entry when the
/// older entry was evicted (eviction removed by id whatever the id held now): `GET`
/// said `aborted` and the same txn id committed a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_txn_id_keeps_its_commit_when_its_older_abort_is_evicted() {
    let h = Harness::start_with(2, AgentMode::InProcess, |c| c.outcome_index_max = 2)
        .await
        .unwrap();
    // Aborts: account 1 on a cannot go below zero.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer(
                "reused-1",
                &[("a", 1, -(BALANCE + 1)), ("b", 1, BALANCE + 1)],
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("reused-1", &[("a", 1, -5), ("b", 1, 5)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // One more outcome: the index (2 entries) evicts its oldest, the abort of reused-1.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("other-1", &[("a", 2, -1), ("b", 2, 1)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let (_, st) = h.get("/v1/transactions/reused-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    // A retry must not run again.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("reused-1", &[("a", 1, -5), ("b", 1, 5)]),
        )
        .await
        .unwrap();
    assert_replayed(status, &v);
    assert_eq!(ledger_rows(&h.dbs[0].url, "reused-1").await, 1);
    h.shutdown().await.unwrap();
}

/// Invariant 6 (found by review): a txn id whose committed outcome the index had
/// forgotten (size limit or retention) was answered `aborted` by presumed abort, also
/// after a restart. Once a commit may have been forgotten, an unknown txn id is
/// `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_commit_is_never_answered_aborted() {
    let mut h = Harness::start_with(2, AgentMode::InProcess, |c| c.outcome_index_max = 1)
        .await
        .unwrap();
    let (_, st) = h.get("/v1/transactions/never-sent-1").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "nothing forgotten yet: {st}");
    for (i, id) in ["forget-1", "forget-2"].into_iter().enumerate() {
        let (status, v) = h
            .post(
                "/v1/transactions",
                &transfer(id, &[("a", 30 + i as i32, -1), ("b", 30 + i as i32, 1)]),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let (_, st) = h.get("/v1/transactions/forget-1").await.unwrap();
    assert_ne!(st["outcome"], "aborted", "forget-1 committed: {st}");
    assert_eq!(st["outcome"], "unknown", "{st}");
    assert_eq!(
        h.get("/v1/transactions/forget-2").await.unwrap().1["outcome"],
        "committed"
    );
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|c| c.outcome_index_max = 1)
        .await
        .unwrap();
    let st = h.get("/v1/transactions/forget-1").await.unwrap().1;
    assert_eq!(st["outcome"], "unknown", "after a restart: {st}");
    h.shutdown().await.unwrap();
}

/// Defect 5: interactive transactions ended by `/rollback` or by a failing statement
/// never left the live table: `GET` said `active` forever, the txn id was "already
/// running", and `open_txns` only climbed until every new transaction got 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_interactive_transactions_leave_the_live_table() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    for round in 0..2 {
        // Ended by /rollback.
        let id = format!("rolled-back-{round}");
        let (status, v) = h
            .post("/v1/transactions", &json!({ "txn_id": id }))
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
        let (status, v) = h
            .post(
                &format!("/v1/transactions/{id}/statements"),
                &json!({"participant": "a", "sql": "UPDATE acct SET bal = bal - 1 WHERE id = 1", "params": []}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
        let (status, v) = h
            .post(&format!("/v1/transactions/{id}/rollback"), &json!({}))
            .await
            .unwrap();
        assert!(status < 300, "{status} {v}");
        let (_, st) = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        assert_eq!(st["outcome"], "aborted", "{st}");

        // Ended by a failing statement.
        let id = format!("failed-{round}");
        let (status, v) = h
            .post("/v1/transactions", &json!({ "txn_id": id }))
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
        let (status, v) = h
            .post(
                &format!("/v1/transactions/{id}/statements"),
                &json!({"participant": "b", "sql": "SELECT no_such_column FROM acct", "params": []}),
            )
            .await
            .unwrap();
        assert_eq!(status, 409, "{v}");
        let (_, st) = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        assert_eq!(st["outcome"], "aborted", "{st}");
    }
    // An aborted txn id may run again.
    let (status, v) = h
        .post("/v1/transactions", &json!({ "txn_id": "failed-0" }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, v) = h
        .post("/v1/transactions/failed-0/rollback", &json!({}))
        .await
        .unwrap();
    assert!(status < 300, "{status} {v}");
    assert_eq!(h.metric("twopc_txns_open").await.unwrap(), 0);
    assert_eq!(
        query_i64(&h.dbs[0].url, "SELECT bal FROM acct WHERE id = 1").await,
        BALANCE
    );
    h.shutdown().await.unwrap();
}

/// Defect 9: a second `serve` on a data directory in use bumped the epoch before it
/// found the log's lock, and one on a busy port opened (and repaired) the log before
/// failing. The lock comes first, the port before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_changes_nothing_in_a_directory_in_use() {
    let mut h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let data_dir = h.data_dir.clone();
    let meta = || twopc_coordinator::meta::read(&data_dir).unwrap().unwrap();
    let before = meta();
    // Same directory, another port.
    let mut second = h.serve_config();
    second.listen = "127.0.0.1:0".into();
    let err = match twopc_coordinator::server::start(second).await {
        Ok(_) => panic!("a second coordinator started on a directory in use"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("in use"), "{err}");
    assert_eq!(meta(), before, "the epoch moved");

    // A busy port with a fresh directory: nothing is created there.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("twopc-test-fresh-{}", rand::random::<u64>()));
    let mut third = h.serve_config();
    third.listen = busy.local_addr().unwrap().to_string();
    third.data_dir = dir.clone();
    assert!(twopc_coordinator::server::start(third).await.is_err());
    assert!(!dir.exists(), "the data directory was touched");

    // The first one still works, and restarts on its directory.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &json!({"branches": [{"participant": "a", "statements": [{"sql": "SELECT 1", "params": []}]}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|_| {}).await.unwrap();
    assert_eq!(meta().epoch, before.epoch + 1);
    h.shutdown().await.unwrap();
}

/// Defect 8: `txns resolve --commit` of a finished transaction, or of one with nothing
/// prepared, logged a COMMIT naming no participant: a false in-doubt entry listed
/// forever, and a segment pinned forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_commit_of_nothing_prepared_logs_nothing() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("resolved-1", &[("a", 3, -2), ("b", 3, 2)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let records_before = h.metric("twopc_log_records_total").await.unwrap();
    // Committed and acknowledged everywhere: nothing to do.
    let (status, v) = h
        .post(
            "/v1/admin/txns/resolved-1/resolve",
            &json!({"action": "commit"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // A GID nobody prepared: nothing to commit.
    let (status, v) = h
        .post(
            "/v1/admin/txns/twopc_c1_0_99/resolve",
            &json!({"action": "commit", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    // Neither logged anything, and nothing is listed in doubt.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, in_doubt) = h.get("/v1/transactions?state=in_doubt").await.unwrap();
    assert_eq!(
        in_doubt["transactions"].as_array().map(Vec::len),
        Some(0),
        "{in_doubt}"
    );
    let records_after = h.metric("twopc_log_records_total").await.unwrap();
    // The transfer's lazy END may land meanwhile; a COMMIT from resolve would be more.
    assert!(
        records_after <= records_before + 1,
        "{records_before} → {records_after}"
    );
    h.shutdown().await.unwrap();
}

/// One-phase transactions on a (two branches on one participant are one branch), each
/// leaving a record in the log.
async fn fill_log(h: &Harness, tag: &str, n: usize) {
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let (status, v) = h
            .post(
                "/v1/transactions",
                &transfer(&id, &[("a", 7, -1), ("a", 8, 1)]),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }
}

/// Defect 3: `txns resolve --abort --force` after a COMMIT record wrote an ABORT, and
/// the ABORT's segment could be deleted while the COMMIT's was kept: the next start
/// replayed the COMMIT and committed the branches still prepared (one participant
/// rolled back, the other committed; `GET` flipping from `aborted` to `committed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_abort_is_not_undone_by_a_restart() {
    let mut h = Harness::start_with(2, AgentMode::Remote, |c| {
        c.log_retention_ms = 0;
        c.log_segment_max_bytes = 512;
        c.commit_wait_ms = 300;
        c.recovery_interval_ms = 3_600_000;
    })
    .await
    .unwrap();
    // The start-up pass has read every decision table (an unknown id is `aborted`):
    // until then resolve refuses GIDs that may be an unread one-phase commit.
    let (_, st) = h.get("/v1/transactions/not-yet-seen").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");
    // A branch prepared on b by an earlier incarnation (epoch 0), then b's agent goes
    // away: an operator's COMMIT is logged and b stays pending.
    h.dbs[1].stop_agent();
    let gid = "twopc_c1_0_77";
    {
        let (client, conn) = tokio_postgres::connect(&h.dbs[1].url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO ledger (txn_id, acct, delta) VALUES ('forced-3', 6, 1); \
                 PREPARE TRANSACTION '{gid}'"
            ))
            .await
            .unwrap();
    }
    // An operator commits it (b unreachable: the COMMIT is logged, b stays pending)...
    let (status, v) = h
        .post(
            &format!("/v1/admin/txns/{gid}/resolve"),
            &json!({"action": "commit", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // Other transactions move the log on, so the ABORT lands in a later segment.
    fill_log(&h, "filler-a", 10).await;
    // ...then the operator thinks better of it: a forced abort.
    let (status, v) = h
        .post(
            &format!("/v1/admin/txns/{gid}/resolve"),
            &json!({"action": "abort", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // More segments rotate out (with no retention, finished ones are deleted).
    fill_log(&h, "filler-b", 30).await;
    h.stop_coordinator().await.unwrap();
    // b comes back; a new incarnation must roll the prepared branch back.
    let (addr, stop) = twopc_testkit::spawn_agent("b", &h.dbs[1].url)
        .await
        .unwrap();
    h.dbs[1].agent_addr = Some(addr);
    let _keep = stop;
    h.start_coordinator(|c| {
        c.log_retention_ms = 0;
        c.log_segment_max_bytes = 512;
        c.recovery_interval_ms = 200;
    })
    .await
    .unwrap();
    let prefix = h.gid_prefix();
    let dbs = [(h.dbs[1].name.clone(), h.dbs[1].url.clone())];
    wait_for(Duration::from_secs(20), || {
        let (dbs, prefix) = (dbs.clone(), prefix.clone());
        async move {
            twopc_testkit::bank::prepared_gids(&dbs, &prefix)
                .await
                .is_ok_and(|v| v.is_empty())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        ledger_rows(&h.dbs[1].url, "forced-3").await,
        0,
        "the forced abort was undone: the branch committed"
    );
    let (_, st) = h.get(&format!("/v1/transactions/{gid}")).await.unwrap();
    assert_ne!(st["outcome"], "committed", "{st}");
    h.shutdown().await.unwrap();
}

/// Defect 4: a one-phase transaction whose COMMIT outlived the agent's deadline got 504
/// `unknown`; the COMMIT completed in PostgreSQL; after a coordinator restart `GET` said
/// `aborted` and the same txn id was accepted and committed again. Now the one-phase
/// commit carries its decision row: a lost answer is settled by fencing, and after a
/// restart recovery reads the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_that_outlives_its_deadline_is_never_reported_aborted() {
    let mut h = Harness::start(1, AgentMode::Remote).await.unwrap();
    {
        // COMMIT of a transaction writing a 'slow-' ledger row takes 2 s (a deferred
        // constraint trigger runs at commit).
        let (client, conn) = tokio_postgres::connect(&h.dbs[0].url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
                 CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
                 WHEN (NEW.txn_id LIKE 'slow-%') EXECUTE FUNCTION slow_commit()",
            )
            .await
            .unwrap();
    }
    let mut body = json!({
        "txn_id": "slow-1",
        "timeout_ms": 1000,
        "branches": [{"participant": "a", "statements": stmts(credit_statements("slow-1", 9, 4))}],
    });
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    // The commit happened; the answer must not say otherwise (504 unknown would be a
    // hedge, 409 aborted a lie).
    assert_ne!(status, 409, "{v}");
    wait_for(Duration::from_secs(10), || async {
        ledger_rows(&h.dbs[0].url, "slow-1").await == 1
    })
    .await
    .unwrap();
    let committed = |st: &Value| st["outcome"] == "committed";
    let (_, st) = h.get("/v1/transactions/slow-1").await.unwrap();
    assert!(status != 200 || committed(&st), "{st}");

    // After a restart the row tells recovery.
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|_| {}).await.unwrap();
    let mut st = Value::Null;
    for _ in 0..100 {
        st = h.get("/v1/transactions/slow-1").await.unwrap().1;
        if st["state"] != "recovering" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(committed(&st), "after a restart: {st}");
    // A retry does not run again.
    body["timeout_ms"] = json!(10_000);
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_replayed(status, &v);
    assert_eq!(ledger_rows(&h.dbs[0].url, "slow-1").await, 1);
    h.shutdown().await.unwrap();
}

/// A one-phase commit whose agent dies after committing, before answering: 504
/// `unknown` (the fence cannot reach it), then, once the agent is back and the
/// coordinator restarted, `committed` from the decision row, and a retry is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_whose_answer_died_with_its_agent_is_found_by_recovery() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all("", &["participant.after_commit_decision=crash"])
        .await
        .unwrap();
    let body = json!({
        "txn_id": "lost-answer-1",
        "branches": [{"participant": "a", "statements": stmts(credit_statements("lost-answer-1", 10, 3))}],
    });
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["outcome"], "unknown", "{v}");
    agent_dies(&mut h, 0);
    assert_eq!(ledger_rows(&h.url(0), "lost-answer-1").await, 1);
    let st = h.get("/v1/transactions/lost-answer-1").await.unwrap();
    assert_eq!(st["state"], "in_doubt", "{st}");
    // Refused while in doubt.
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_ne!(status, 200, "{v}");

    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    h.start_agent(0, "").await.unwrap();
    h.start_coordinator("").await.unwrap();
    let st = h.status_after_recovery("lost-answer-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_replayed(status, &v);
    assert_eq!(ledger_rows(&h.url(0), "lost-answer-1").await, 1);
}

/// Invariant 7, found by the simulator: after a restart, a request naming a txn id
/// waited only for the decision rows of the participants it touches. A one-phase commit
/// on `a` whose coordinator died before anything of ours logged it, a restart while `a`
/// was down, and the same txn id sent to `b` alone ran a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_other_participants_waits_for_every_decision_table() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    // The coordinator dies right after a's one-phase commit (its row is the decision).
    h.start_all("coordinator.after_last_commit=crash", &[])
        .await
        .unwrap();
    let on = |participant: &str| {
        json!({
            "txn_id": "retry-elsewhere-1",
            "branches": [{"participant": participant, "statements": stmts(credit_statements("retry-elsewhere-1", 12, 3))}],
        })
    };
    let _ = h.post("/v1/transactions", &on("a")).await;
    coordinator_dies(&mut h);
    assert_eq!(
        ledger_rows(&h.url(0), "retry-elsewhere-1").await,
        1,
        "a committed"
    );
    // a's agent is away while the new incarnation starts: its rows cannot be read.
    kill_agent(&mut h, 0);
    h.start_coordinator("").await.unwrap();
    let (status, v) = h.post("/v1/transactions", &on("b")).await.unwrap();
    assert_ne!(status, 200, "the txn id ran a second time: {v}");
    assert_eq!(ledger_rows(&h.url(1), "retry-elsewhere-1").await, 0);
    // Once a is back and its rows read, the txn id is known committed.
    h.start_agent(0, "").await.unwrap();
    let st = h.status_after_recovery("retry-elsewhere-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    let (status, v) = h.post("/v1/transactions", &on("b")).await.unwrap();
    assert_replayed(status, &v);
    assert_eq!(ledger_rows(&h.url(1), "retry-elsewhere-1").await, 0);
}

/// Invariant 7 (found by review): an interactive transaction committed with no
/// statement was remembered only in memory, so after a restart a retry of its txn id ran
/// and wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_commit_keeps_its_txn_id_across_a_restart() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all("", &[]).await.unwrap();
    let (status, v) = h
        .post("/v1/transactions", &json!({"txn_id": "empty-1"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, v) = h
        .post("/v1/transactions/empty-1/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    h.start_coordinator("").await.unwrap();
    let retry = json!({
        "txn_id": "empty-1",
        "branches": [{"participant": "a", "statements": stmts(credit_statements("empty-1", 13, 3))}],
    });
    let (status, v) = h.post("/v1/transactions", &retry).await.unwrap();
    assert_replayed(status, &v);
    assert_eq!(ledger_rows(&h.url(0), "empty-1").await, 0);
}

/// Invariant 7 (found by review): `register` checked the outcome index before it took
/// the live table. An attempt that remembered its commit and left the table in between
/// let a concurrent retry of its txn id run a second time. The failpoint holds the retry
/// right before the live table (where the old code had already checked the outcomes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_first_attempt_does_not_run_twice() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all("coordinator.before_admission=sleep(1500)@2", &[])
        .await
        .unwrap();
    // No ledger row: its key would refuse a second run by itself.
    let statements = vec![
        ("SELECT pg_sleep(0.5)".to_owned(), vec![]),
        (
            "UPDATE acct SET bal = bal + 3 WHERE id = 14".to_owned(),
            vec![],
        ),
    ];
    let body = json!({
        "txn_id": "race-1",
        "branches": [{"participant": "a", "statements": stmts(statements)}],
    });
    let first = {
        let (http, url, body) = (h.http.clone(), h.base_url(), body.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/transactions"))
                .json(&body)
                .send()
                .await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.json::<Value>().await.unwrap_or(Value::Null)))
        })
    };
    // The retry arrives while the first attempt runs (it sleeps 0.5 s in PostgreSQL).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    let (first_status, first_v) = first.await.unwrap().unwrap();
    assert_eq!(first_status, 200, "{first_v}");
    assert_replayed(status, &v);
    let bal = query_i64(&h.url(0), "SELECT bal FROM acct WHERE id = 14").await;
    assert_eq!(bal, BALANCE + 3, "applied once");
}

/// Defect 3, last-agent commit: a forced abort of a transaction its last agent had
/// committed was undone by the next recovery pass (the committed decision row stayed,
/// and recovery adopted it: the branches still prepared were committed, `GET` said
/// `committed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_abort_of_a_last_agent_commit_is_not_undone_by_recovery() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.coordinator_args = vec!["--last-agent".into()];
    // The coordinator dies right after the last agent (b) committed: a stays prepared.
    h.start_all("coordinator.after_last_commit=crash", &[])
        .await
        .unwrap();
    let body = transfer("forced-last-1", &[("a", 11, -2), ("b", 11, 2)]);
    // The coordinator dies before it answers.
    let _ = h.post("/v1/transactions", &body).await;
    coordinator_dies(&mut h);
    assert_eq!(
        ledger_rows(&h.url(1), "forced-last-1").await,
        1,
        "b committed"
    );
    // a's agent is away while the new incarnation starts: it cannot commit a's branch.
    kill_agent(&mut h, 0);
    h.start_coordinator("").await.unwrap();
    let st = h.get("/v1/transactions/forced-last-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "from b's decision row: {st}");
    // The operator gives up on a and forces an abort (a split they accept knowingly).
    let (status, v) = h
        .post(
            "/v1/admin/txns/forced-last-1/resolve",
            &json!({"action": "abort", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // a comes back: its prepared branch must be rolled back, not committed.
    h.start_agent(0, "").await.unwrap();
    let prefix = "twopc_c1_".to_owned();
    let dbs = [(h.names[0].clone(), h.url(0))];
    wait_for(Duration::from_secs(20), || {
        let (dbs, prefix) = (dbs.clone(), prefix.clone());
        async move {
            twopc_testkit::bank::prepared_gids(&dbs, &prefix)
                .await
                .is_ok_and(|v| v.is_empty())
        }
    })
    .await
    .unwrap();
    // Three more recovery passes later, it stays aborted.
    let passes = |v: Value| v["recovery_passes"].as_u64().unwrap_or(0);
    let before = passes(h.get("/healthz").await.unwrap());
    let (http, url) = (h.http.clone(), format!("{}/healthz", h.base_url()));
    wait_for(Duration::from_secs(20), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            match http.get(url).send().await {
                Ok(r) => passes(r.json().await.unwrap_or(Value::Null)) >= before + 3,
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        ledger_rows(&h.url(0), "forced-last-1").await,
        0,
        "the forced abort was undone on a"
    );
    let st = h.get("/v1/transactions/forced-last-1").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");
}

/// Defect 8: `txns resolve --commit` of an undecided GID did not exclude a concurrent
/// recovery pass. A pass that had rolled one branch back (presumed abort) and was about
/// to roll back the other let a resolve log a COMMIT for the branch still prepared and
/// commit it: rolled back on one participant, committed on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_cannot_split_a_transaction_recovery_is_rolling_back() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    // Orphans of an earlier incarnation (epoch 0), prepared on both with no decision.
    let gid = "twopc_c1_0_41";
    for i in 0..2 {
        let (client, conn) = tokio_postgres::connect(&h.url(i), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO ledger (txn_id, acct, delta) VALUES ('split-1', {}, 1); \
                 PREPARE TRANSACTION '{gid}'",
                20 + i
            ))
            .await
            .unwrap();
    }
    // The start-up pass rolls back the first branch at once, then waits 3 s before the
    // second.
    h.start_all("coordinator.recovery_before_rollback=sleep(3000)@2", &[])
        .await
        .unwrap();
    let dbs: Vec<(String, String)> = (0..2).map(|i| (h.names[i].clone(), h.url(i))).collect();
    wait_for(Duration::from_secs(10), || {
        let dbs = dbs.clone();
        async move {
            twopc_testkit::bank::prepared_gids(&dbs, "twopc_")
                .await
                .is_ok_and(|v| v.len() == 1)
        }
    })
    .await
    .unwrap();
    // Now, with one branch rolled back and the other still prepared, an operator commits.
    let (status, answer) = h
        .post(
            &format!("/v1/admin/txns/{gid}/resolve"),
            &json!({"action": "commit", "force": true}),
        )
        .await
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        let dbs = dbs.clone();
        async move {
            twopc_testkit::bank::prepared_gids(&dbs, "twopc_")
                .await
                .is_ok_and(|v| v.is_empty())
        }
    })
    .await
    .unwrap();
    let committed = [
        ledger_rows(&h.url(0), "split-1").await,
        ledger_rows(&h.url(1), "split-1").await,
    ];
    assert!(
        committed == [0, 0] || committed == [1, 1],
        "split outcome {committed:?} (resolve answered {status} {answer})"
    );
}

/// Found by the crash tests' new single-database transfers: a one-phase commit on a
/// server with `synchronous_commit = off` (the test clusters' setting; some production
/// ones too) was told `committed` and then lost by an immediate stop of PostgreSQL. The
/// decision commit now forces `synchronous_commit = on` for itself, as PREPARE and
/// COMMIT PREPARED do regardless of the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_survives_an_immediate_stop_of_postgresql() {
    let mut h = Harness::start(1, AgentMode::Remote).await.unwrap();
    let url = h.dbs[0].url.clone();
    assert_eq!(
        {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        },
        "off",
        "the test needs a server that commits asynchronously"
    );
    let mut told = Vec::new();
    for i in 0..5 {
        let id = format!("async-{i}");
        let body = json!({
            "txn_id": id,
            "branches": [{"participant": "a", "statements": stmts(credit_statements(&id, 12, 1))}],
        });
        let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
        assert_eq!(status, 200, "{v}");
        told.push(id);
    }
    // At once, before the WAL writer's next round.
    tokio::task::block_in_place(|| {
        h.dbs[0]
            .cluster
            .stop(twopc_testkit::StopMode::Immediate)
            .unwrap();
        h.dbs[0].cluster.start_again().unwrap();
    });
    for id in &told {
        assert_eq!(ledger_rows(&url, id).await, 1, "{id} was told committed");
    }
    h.shutdown().await.unwrap();
}

/// Found by review: a one-phase commit still running at the agent when its coordinator
/// restarted (blocked on a lock) committed its decision row after the new incarnation had
/// read the agent's rows: `GET` said `aborted` for a transaction that then committed, and
/// a retry could run again. The agent now answers the listing only once no branch of an
/// older incarnation is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_in_flight_across_a_restart_is_not_reported_aborted() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all("", &[]).await.unwrap();
    let url = h.url(0);
    let (locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; SELECT bal FROM acct WHERE id = 40 FOR UPDATE")
        .await
        .unwrap();
    let body = json!({
        "txn_id": "blocked-1",
        "timeout_ms": 60_000,
        "branches": [{"participant": "a", "statements": stmts(credit_statements("blocked-1", 40, 1))}],
    });
    let (http, post_url) = (h.http.clone(), format!("{}/v1/transactions", h.base_url()));
    let first = tokio::spawn(async move { http.post(post_url).json(&body).send().await });
    // The agent's branch waits for the lock.
    wait_for(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            query_i64(
                &url,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .await
                >= 1
        }
    })
    .await
    .unwrap();
    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    let _ = first.await;
    h.start_coordinator("").await.unwrap();
    // While the old branch may still commit, nobody may say it did not.
    let st = h.get("/v1/transactions/blocked-1").await.unwrap();
    assert_ne!(
        st["outcome"], "aborted",
        "while its commit was in flight: {st}"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    wait_for(Duration::from_secs(30), || {
        let (h, url) = (&h, h.url(0));
        async move {
            let st = h
                .get("/v1/transactions/blocked-1")
                .await
                .unwrap_or(Value::Null);
            st["outcome"] == "committed" && ledger_rows(&url, "blocked-1").await == 1
        }
    })
    .await
    .unwrap();
}

/// Found by review: a retry of a txn id whose one-phase commit is still unsettled (the
/// agent committed, its answer was lost, the fence could not reach it) ran again once the
/// agent was back and before recovery settled it: applied twice. It is refused until
/// recovery knows, and GET says in_doubt meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_unsettled_commit_is_refused_until_recovery_settles_it() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    // No recovery pass after the start-up one while the test looks.
    h.recovery_interval_ms = 600_000;
    h.start_all("", &["participant.after_commit_decision=crash"])
        .await
        .unwrap();
    // No ledger row: its primary key would refuse a second application by itself.
    let body = json!({
        "txn_id": "unsettled-1",
        "branches": [{"participant": "a", "statements": [
            {"sql": "UPDATE acct SET bal = bal + 2 WHERE id = 41", "params": []}]}],
    });
    let db_url = h.url(0);
    let balance = || {
        let url = db_url.clone();
        async move { query_i64(&url, "SELECT bal FROM acct WHERE id = 41").await }
    };
    let before = balance().await;
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 504, "{v}");
    agent_dies(&mut h, 0);
    // The agent is back; recovery has not settled the transaction yet.
    h.start_agent(0, "").await.unwrap();
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(
        status, 409,
        "the retry ran while the first attempt was unsettled: {v}"
    );
    let st = h.get("/v1/transactions/unsettled-1").await.unwrap();
    assert_eq!(st["state"], "in_doubt", "{st}");
    assert_eq!(balance().await, before + 2, "applied once");
}

/// Safe retries (DESIGN's client interface, invariant 7): a retry of a committed txn id
/// answers its recorded outcome, 200 with `"replayed": true`, and runs nothing. Before,
/// a one-shot retry got 409 with a hedge, and a retried `/commit` of an interactive
/// transaction got 404 "unknown transaction", as if it had never been.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_committed_txn_id_answers_its_outcome() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let body = transfer("replay-1", &[("a", 3, -5), ("b", 3, 5)]);
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v.get("replayed").is_none(), "a first run is no replay: {v}");
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_replayed(status, &v);
    assert_eq!(v["txn_id"], "replay-1", "{v}");
    // Its txn id given to an interactive begin: the same answer, nothing begun.
    let (status, v) = h
        .post("/v1/transactions", &json!({ "txn_id": "replay-1" }))
        .await
        .unwrap();
    assert_replayed(status, &v);
    let (_, st) = h.get("/v1/transactions/replay-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");

    // Interactive: the commit's answer was lost and the client sends /commit again.
    let (status, v) = h
        .post("/v1/transactions", &json!({ "txn_id": "replay-2" }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let legs = [
        ("a", twopc_testkit::bank::debit_statements("replay-2", 4, 2)),
        ("b", credit_statements("replay-2", 4, 2)),
    ];
    for (participant, statements) in legs {
        for (sql, params) in statements {
            let stmt = json!({ "participant": participant, "sql": sql, "params": params });
            let path = "/v1/transactions/replay-2/statements";
            let (status, v) = h.post(path, &stmt).await.unwrap();
            assert_eq!(status, 200, "{v}");
        }
    }
    let (status, v) = h
        .post("/v1/transactions/replay-2/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let (status, v) = h
        .post("/v1/transactions/replay-2/commit", &json!({}))
        .await
        .unwrap();
    assert_replayed(status, &v);
    // A rollback or a statement cannot touch it: 409, not "unknown transaction".
    let (status, v) = h
        .post("/v1/transactions/replay-2/rollback", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    let (status, v) = h
        .post(
            "/v1/transactions/replay-2/statements",
            &json!({ "participant": "a", "sql": "SELECT 1", "params": [] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    let (_, st) = h.get("/v1/transactions/replay-2").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    assert_eq!(ledger_rows(&h.dbs[0].url, "replay-1").await, 1, "ran once");
    assert_eq!(ledger_rows(&h.dbs[1].url, "replay-1").await, 1, "ran once");
    assert_eq!(ledger_rows(&h.dbs[0].url, "replay-2").await, 1, "ran once");
    h.shutdown().await.unwrap();
}

/// Invariants 6 and 7 (found by review): when recovery learnt that an unsettled
/// one-phase commit had committed (`adopt`), it removed the attempt from `unresolved`
/// before remembering its outcome. In between, `GET` presumed abort for the commit and a
/// retry of its txn id could run again. The failpoint holds recovery in that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_recovery_learns_is_never_answered_aborted_meanwhile() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all(
        "coordinator.adopt_before_settled=sleep(3000)",
        &["participant.after_commit_decision=crash"],
    )
    .await
    .unwrap();
    let body = json!({
        "txn_id": "adopted-1",
        "branches": [{"participant": "a", "statements": [
            {"sql": "UPDATE acct SET bal = bal + 2 WHERE id = 42", "params": []}]}],
    });
    let db_url = h.url(0);
    let before = query_i64(&db_url, "SELECT bal FROM acct WHERE id = 42").await;
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 504, "{v}");
    agent_dies(&mut h, 0);
    // Back: the next recovery pass fences it, learns "committed", and sleeps in adopt.
    h.start_agent(0, "").await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..60 {
        let st = h.get("/v1/transactions/adopted-1").await.unwrap();
        answers.push(st.to_string());
        assert_ne!(
            st["outcome"], "aborted",
            "a commit answered aborted: {answers:?}"
        );
        if st["outcome"] == "committed" {
            // Within the window too, a retry does not run again.
            let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
            assert_replayed(status, &v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bal = query_i64(&db_url, "SELECT bal FROM acct WHERE id = 42").await;
    assert_eq!(bal, before + 2, "applied once: {answers:?}");
}

/// Review finding: right after a restart, before every decision table was read, a
/// retried `/commit` of a txn id the coordinator did not know answered 404 "unknown
/// transaction" while `GET` said `recovering`: its one-phase commit may sit in a row not
/// read yet. It is 503 (retry shortly) until the rows are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_commit_before_the_decision_rows_are_read_is_not_unknown() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.start_all("", &[]).await.unwrap();
    h.coordinator.as_mut().unwrap().kill9();
    h.coordinator = None;
    kill_agent(&mut h, 1);
    h.start_coordinator("").await.unwrap();
    let (status, v) = h
        .post("/v1/transactions/ghost-1/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 503, "{v}");
    h.start_agent(1, "").await.unwrap();
    let st = h.status_after_recovery("ghost-1").await.unwrap();
    assert_eq!(st["outcome"], "aborted", "{st}");
    let (status, v) = h
        .post("/v1/transactions/ghost-1/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 404, "{v}");
}
