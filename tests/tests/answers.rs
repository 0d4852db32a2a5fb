//! Every answer stays true (DESIGN invariants 2, 3, 6, 7, 8): regression tests for the
//! ways twopc used to lose, split or repeat a transaction, each against real PostgreSQL
//! (crash tests kill real processes). Each test names the defect it guards against and
//! failed before its fix.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::bank::{credit_statements, debit_statements};
use twopc_testkit::procs::{wait_for, Bins, ProcHarness};
use twopc_testkit::{stmts, AgentMode, Harness, BALANCE};

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

async fn ledger_rows(url: &str, txn_id: &str) -> i64 {
    query_i64(
        url,
        &format!("SELECT count(*) FROM ledger WHERE txn_id = '{txn_id}'"),
    )
    .await
}

fn transfer(txn_id: &str, legs: &[(&str, i32, i64)]) -> Value {
    let branches: Vec<Value> = legs
        .iter()
        .map(|(p, acct, delta)| {
            let s = if *delta < 0 {
                debit_statements(txn_id, *acct, -delta)
            } else {
                credit_statements(txn_id, *acct, *delta)
            };
            json!({ "participant": p, "statements": stmts(s) })
        })
        .collect();
    json!({ "txn_id": txn_id, "branches": branches })
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
    let resp = h
        .http
        .post(format!("{}/v1/transactions", h.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["outcome"], "committed", "{answer}");
    // The agent got COMMIT PREPARED and died before running it.
    let died = h.agents[0]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert!(died.is_some(), "the failpoint never fired");
    h.agents[0] = None;
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
    assert_ne!(status, 200, "the retry ran a second time: {v}");
    assert_eq!(ledger_rows(&h.dbs[0].url, "reused-1").await, 1);
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
            &json!({"action": "commit"}),
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
