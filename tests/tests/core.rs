//! End-to-end: client transactions across real PostgreSQL clusters through the
//! coordinator's HTTP API.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::bank::{credit_statements, debit_statements};
use twopc_testkit::workload::{self, WorkloadConfig};
use twopc_testkit::{stmts, transfer, AgentMode, Harness, ACCOUNTS, BALANCE};

async fn balance(h: &Harness, db: usize, acct: i32) -> i64 {
    h.scalar_i64(db, &format!("SELECT bal FROM acct WHERE id = {acct}"))
        .await
        .unwrap()
}

async fn ledger_rows(h: &Harness, db: usize, txn_id: &str) -> i64 {
    h.scalar_i64(
        db,
        &format!("SELECT count(*) FROM ledger WHERE txn_id = '{txn_id}'"),
    )
    .await
    .unwrap()
}

/// Polls `check` every 50 ms until it holds; panics after `limit`, naming `what` it
/// waited for.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_clean(h: &Harness) {
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "audit failed: {:?}", report.violations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commits_on_two_databases_with_remote_agents() {
    let h = Harness::start(2, AgentMode::Remote).await.unwrap();
    let (status, body) = h
        .post(
            "/v1/transactions",
            &transfer("t1", &[("a", 1, -10), ("b", 2, 10)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "committed");
    assert_eq!(body["txn_id"], "t1");
    assert_eq!(body["branches"].as_array().unwrap().len(), 2);
    assert_eq!(body["branches"][0]["results"][0]["rows_affected"], 1);
    assert_eq!(balance(&h, 0, 1).await, BALANCE - 10);
    assert_eq!(balance(&h, 1, 2).await, BALANCE + 10);
    let (status, st) = h.get("/v1/transactions/t1").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(st["outcome"], "committed");
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commits_on_three_databases_in_process() {
    let h = Harness::start(3, AgentMode::InProcess).await.unwrap();
    // a pays 30: 10 to b, 20 to c; ledger rows of one txn on three databases.
    let mut c_stmts = credit_statements("three", 5, 20);
    c_stmts.push(("SELECT bal FROM acct WHERE id = $1".into(), vec![json!(5)]));
    let body = json!({
        "txn_id": "three",
        "branches": [
            { "participant": "a", "statements": stmts(debit_statements("three", 5, 30)) },
            { "participant": "b", "statements": stmts(credit_statements("three", 5, 10)) },
            { "participant": "c", "statements": stmts(c_stmts) },
        ]
    });
    let (status, resp) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        resp["branches"][2]["results"][2]["rows"][0]["bal"],
        BALANCE + 20,
        "{resp}"
    );
    assert_eq!(balance(&h, 0, 5).await, BALANCE - 30);
    assert_eq!(balance(&h, 1, 5).await, BALANCE + 10);
    assert_eq!(balance(&h, 2, 5).await, BALANCE + 20);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_commit_and_rollback() {
    for (n, mode) in [(2, AgentMode::Remote), (3, AgentMode::InProcess)] {
        let h = Harness::start(n, mode).await.unwrap();
        let (status, begun) = h.post("/v1/transactions", &json!({})).await.unwrap();
        assert_eq!(status, 201, "{begun}");
        assert_eq!(begun["state"], "active");
        let id = begun["txn_id"].as_str().unwrap().to_owned();
        let (_, st) = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        assert_eq!(st["state"], "active");
        for (i, db) in h.dbs.iter().enumerate() {
            let delta = if i == 0 { -(n as i64 - 1) * 7 } else { 7 };
            let (status, r) = h
                .post(
                    &format!("/v1/transactions/{id}/statements"),
                    &json!({ "participant": db.name, "sql": "UPDATE acct SET bal = bal + $1 WHERE id = $2", "params": [delta, 3] }),
                )
                .await
                .unwrap();
            assert_eq!(status, 200, "{r}");
            assert_eq!(r["rows_affected"], 1);
            let (_, r) = h
                .post(
                    &format!("/v1/transactions/{id}/statements"),
                    &json!({ "participant": db.name, "sql": "INSERT INTO ledger(txn_id, acct, delta) VALUES ($1, $2, $3)", "params": [id, 3, delta] }),
                )
                .await
                .unwrap();
            assert_eq!(r["rows_affected"], 1, "{r}");
        }
        // Reads see the transaction's own writes.
        let (_, r) = h
            .post(
                &format!("/v1/transactions/{id}/statements"),
                &json!({ "participant": "b", "sql": "SELECT id, bal FROM acct WHERE id = $1", "params": [3] }),
            )
            .await
            .unwrap();
        assert_eq!(r["rows"][0]["bal"], BALANCE + 7, "{r}");
        let (status, c) = h
            .post(&format!("/v1/transactions/{id}/commit"), &json!({}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{c}");
        assert_eq!(c["outcome"], "committed");
        assert_eq!(balance(&h, 1, 3).await, BALANCE + 7);
        let (_, st) = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        assert_eq!(st["outcome"], "committed");

        // Rollback leaves nothing.
        let (_, begun) = h
            .post("/v1/transactions", &json!({"txn_id": "rb-1"}))
            .await
            .unwrap();
        assert_eq!(begun["txn_id"], "rb-1");
        let (status, _) = h
            .post(
                "/v1/transactions/rb-1/statements",
                &json!({ "participant": "a", "sql": "UPDATE acct SET bal = 0 WHERE id = $1", "params": [4] }),
            )
            .await
            .unwrap();
        assert_eq!(status, 200);
        let (status, r) = h
            .post("/v1/transactions/rb-1/rollback", &json!({}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["outcome"], "aborted");
        assert_eq!(balance(&h, 0, 4).await, BALANCE);
        let (status, _) = h
            .post("/v1/transactions/rb-1/commit", &json!({}))
            .await
            .unwrap();
        assert_eq!(status, 404);
        assert_clean(&h).await;
        h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_branch_aborts_every_branch() {
    let mut h = Harness::start(3, AgentMode::Remote).await.unwrap();

    // Constraint violation on a (balance would go negative): b and c roll back too.
    let body = transfer("over", &[("a", 1, -(BALANCE + 1)), ("b", 1, BALANCE + 1)]);
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["outcome"], "aborted");
    assert_eq!(r["error"]["participant"], "a");
    assert_eq!(r["error"]["code"], "23514", "{r}");
    assert_eq!(balance(&h, 1, 1).await, BALANCE);
    for db in 0..2 {
        assert_eq!(ledger_rows(&h, db, "over").await, 0);
    }
    let (_, st) = h.get("/v1/transactions/over").await.unwrap();
    assert_eq!(st["outcome"], "aborted");

    // Syntax error on c.
    let body = json!({ "txn_id": "syntax", "branches": [
        { "participant": "a", "statements": stmts(debit_statements("syntax", 2, 5)) },
        { "participant": "b", "statements": stmts(credit_statements("syntax", 2, 5)) },
        { "participant": "c", "statements": [ { "sql": "UPDATE acct SET bal = bal + WHERE", "params": [] } ] },
    ]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["participant"], "c");
    assert_eq!(r["error"]["code"], "42601");
    for db in 0..3 {
        assert_eq!(ledger_rows(&h, db, "syntax").await, 0);
    }

    // A participant that is down.
    h.dbs[2].stop_agent();
    let c_addr = h.dbs[2].agent_addr.clone().unwrap();
    wait_until("agent c to stop listening", Duration::from_secs(10), || {
        let c_addr = c_addr.clone();
        async move { tokio::net::TcpStream::connect(&c_addr).await.is_err() }
    })
    .await;
    let body = json!({ "txn_id": "down", "branches": [
        { "participant": "a", "statements": stmts(debit_statements("down", 3, 5)) },
        { "participant": "c", "statements": stmts(credit_statements("down", 3, 5)) },
    ]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["participant"], "c");
    assert_eq!(r["error"]["code"], "08006", "{r}");
    assert_eq!(ledger_rows(&h, 0, "down").await, 0);
    assert_eq!(balance(&h, 0, 3).await, BALANCE);

    // The others still work.
    let (status, _) = h
        .post(
            "/v1/transactions",
            &transfer("after", &[("a", 9, -1), ("b", 9, 1)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_the_total() {
    for mode in [AgentMode::Remote, AgentMode::InProcess] {
        let h = Harness::start(2, mode).await.unwrap();
        let report = workload::run(WorkloadConfig {
            base_url: h.base_url.clone(),
            participants: vec!["a".into(), "b".into()],
            accounts_per_db: ACCOUNTS,
            clients: 16,
            max_transfers: 400,
            duration: Duration::from_secs(120),
            max_amount: BALANCE,
            txn_prefix: format!("conc-{mode:?}"),
            request_timeout: Duration::from_secs(60),
            stop_on_no_answer: false,
            stop: None,
            shapes: workload::Shape::ALL.to_vec(),
            retry_unknown: true,
            committed_counter: None,
        })
        .await
        .unwrap();
        assert_eq!(report.committed + report.aborted + report.unknown, 400);
        assert_eq!(report.unknown, 0, "every client got an answer");
        assert!(report.committed > 100, "{} committed", report.committed);
        let audit = h.audit(Some(&report.expectation)).await.unwrap();
        assert!(audit.ok(), "{mode:?}: {:?}", audit.violations());
        assert_eq!(audit.ledger_txns as u64, report.committed);
        h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_and_leaves_nothing_prepared() {
    let h = Harness::start_with(2, AgentMode::Remote, |c| c.max_body_bytes = 64 * 1024)
        .await
        .unwrap();

    // Malformed JSON.
    let (status, r) = h
        .post_raw("/v1/transactions", b"{\"branches\": [".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{r}"
    );

    // Unknown participant: nothing runs anywhere.
    let body = transfer("unk-p", &[("a", 1, -1), ("zz", 1, 1)]);
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("zz"));
    assert_eq!(ledger_rows(&h, 0, "unk-p").await, 0);

    // Unknown transaction.
    let (status, _) = h
        .post(
            "/v1/transactions/nope/statements",
            &json!({"participant": "a", "sql": "SELECT 1"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = h
        .post("/v1/transactions/nope/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // A parameter that does not fit its column: the other branch is rolled back.
    let body = json!({ "txn_id": "badparam", "branches": [
        { "participant": "a", "statements": stmts(debit_statements("badparam", 1, 5)) },
        { "participant": "b", "statements": [
            { "sql": "UPDATE acct SET bal = bal + $1 WHERE id = $2", "params": ["five", 1] } ] },
    ]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["outcome"], "aborted");
    assert_eq!(r["error"]["participant"], "b");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("$1"),
        "{r}"
    );
    assert_eq!(ledger_rows(&h, 0, "badparam").await, 0);

    // Wrong number of parameters.
    let body = json!({ "branches": [ { "participant": "a", "statements": [
        { "sql": "UPDATE acct SET bal = $1 WHERE id = $2", "params": [1] } ] } ] });
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 400, "{r}");

    // Oversized body.
    let big = json!({ "branches": [ { "participant": "a", "statements": [
        { "sql": format!("SELECT '{}'", "x".repeat(100 * 1024)) } ] } ] });
    let (status, _) = h.post("/v1/transactions", &big).await.unwrap();
    assert_eq!(status, 413);

    // Injection-shaped or over-long txn ids.
    for id in ["a'b", "with space", &"x".repeat(129)] {
        let (status, r) = h
            .post(
                "/v1/transactions",
                &transfer(id, &[("a", 1, -1), ("b", 1, 1)]),
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{id}: {r}");
    }
    let (status, _) = h.get("/v1/transactions/a'b").await.unwrap();
    assert_eq!(status, 400);

    // Unknown fields and empty branches.
    let (status, _) = h
        .post("/v1/transactions", &json!({"branches": []}))
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, _) = h
        .post("/v1/transactions", &json!({"brnches": []}))
        .await
        .unwrap();
    assert_eq!(status, 400);

    // An interactive statement with a bad parameter aborts the transaction.
    let (_, begun) = h
        .post("/v1/transactions", &json!({"txn_id": "ia"}))
        .await
        .unwrap();
    assert_eq!(begun["state"], "active");
    let (status, _) = h
        .post("/v1/transactions/ia/statements", &json!({"participant": "a", "sql": "UPDATE acct SET bal = bal - 1 WHERE id = $1", "params": [1]}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, r) = h
        .post("/v1/transactions/ia/statements", &json!({"participant": "b", "sql": "UPDATE acct SET bal = bal + 1 WHERE id = $1", "params": [1.5]}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{r}");
    let (status, _) = h
        .post(
            "/v1/transactions/ia/statements",
            &json!({"participant": "b", "sql": "SELECT 1"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);

    assert_eq!(balance(&h, 0, 1).await, BALANCE);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_answers_for_earlier_transactions() {
    let mut h = Harness::start(2, AgentMode::Remote).await.unwrap();
    for i in 0..5 {
        let id = format!("keep-{i}");
        let (status, r) = h
            .post(
                "/v1/transactions",
                &transfer(&id, &[("a", i + 1, -3), ("b", i + 1, 3)]),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{r}");
    }
    // One-phase (single database) and an aborted one.
    let (status, _) = h
        .post("/v1/transactions", &json!({"txn_id": "solo", "branches": [
            {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 4 WHERE id = 20"},
                                                 {"sql": "UPDATE acct SET bal = bal + 4 WHERE id = 21"}]}]}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(balance(&h, 0, 20).await, BALANCE - 4, "solo landed");
    assert_eq!(balance(&h, 0, 21).await, BALANCE + 4);
    let (status, _) = h
        .post(
            "/v1/transactions",
            &transfer("broke", &[("a", 1, -(BALANCE * 2)), ("b", 1, BALANCE * 2)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 409);

    let epoch_before = h.get("/healthz").await.unwrap().1["epoch"]
        .as_u64()
        .unwrap();
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|_| {}).await.unwrap();
    let epoch_after = h.get("/healthz").await.unwrap().1["epoch"]
        .as_u64()
        .unwrap();
    assert_eq!(epoch_after, epoch_before + 1);

    for i in 0..5 {
        let (status, st) = h.get(&format!("/v1/transactions/keep-{i}")).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(st["outcome"], "committed", "keep-{i}: {st}");
    }
    assert_eq!(
        h.get("/v1/transactions/solo").await.unwrap().1["outcome"],
        "committed"
    );
    assert_eq!(
        h.get("/v1/transactions/broke").await.unwrap().1["outcome"],
        "aborted"
    );
    // What the databases hold agrees: keep-0's -3 on a:1, nothing of broke's.
    assert_eq!(balance(&h, 0, 1).await, BALANCE - 3);
    assert_eq!(balance(&h, 1, 1).await, BALANCE + 3);
    assert_eq!(
        h.get("/v1/transactions/never-seen").await.unwrap().1["outcome"],
        "aborted"
    );
    // A committed txn_id does not run again: a retry answers its recorded outcome.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("keep-0", &[("a", 1, -1), ("b", 1, 1)]),
        )
        .await
        .unwrap();
    twopc_testkit::assert_replayed(status, &v);
    assert_eq!(balance(&h, 0, 1).await, BALANCE - 3, "ran once");
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimizations_and_their_switches() {
    for (one_phase, read_only, parallel, ack) in [
        (true, true, true, "applied"),
        (false, false, false, "applied"),
        (true, true, true, "durable"),
    ] {
        let h = Harness::start_with(2, AgentMode::InProcess, |c| {
            c.one_phase = one_phase;
            c.read_only = read_only;
            c.parallel = parallel;
        })
        .await
        .unwrap();
        // Single participant.
        let (status, r) = h
            .post("/v1/transactions", &json!({"ack": ack, "branches": [
                {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 1 WHERE id = 1"},
                                                     {"sql": "UPDATE acct SET bal = bal + 1 WHERE id = 2"}]}]}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{r}");
        // One writer and one reader.
        let (status, r) = h
            .post("/v1/transactions", &json!({"ack": ack, "branches": [
                {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 1 WHERE id = 3"},
                                                     {"sql": "UPDATE acct SET bal = bal + 1 WHERE id = 4"}]},
                {"participant": "b", "statements": [{"sql": "SELECT sum(bal)::bigint AS total FROM acct"}]}]}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["branches"][1]["results"][0]["rows"][0]["total"],
            ACCOUNTS as i64 * BALANCE
        );
        // A real two-writer transfer.
        let (status, r) = h
            .post("/v1/transactions", &{
                let mut t = transfer("opt", &[("a", 5, -2), ("b", 5, 2)]);
                t["ack"] = json!(ack);
                t
            })
            .await
            .unwrap();
        assert_eq!(status, 200, "{r}");
        // Durable ack returns before phase 2 finishes: wait for it to settle.
        wait_until(
            "phase 2 to settle (nothing in doubt)",
            Duration::from_secs(20),
            || async {
                let (_, l) = h.get("/v1/transactions?state=in_doubt").await.unwrap();
                l["transactions"].as_array().is_some_and(|a| a.is_empty())
            },
        )
        .await;
        let value = |name: &'static str| {
            let h = &h;
            async move { h.metric(name).await.unwrap() }
        };
        assert_eq!(value("twopc_txns_committed_total").await, 3);
        if one_phase {
            // The single-participant txn (a single writer beside read-only branches
            // forces its decision like any other: it is not one-phase).
            assert_eq!(value("twopc_txns_committed_one_phase_total").await, 1);
        } else {
            assert_eq!(value("twopc_txns_committed_one_phase_total").await, 0);
        }
        assert_eq!(
            value("twopc_read_only_branches_total").await,
            u64::from(read_only)
        );
        assert_clean(&h).await;
        h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_interactive_transaction_is_rolled_back() {
    let h = Harness::start_with(2, AgentMode::Remote, |c| c.idle_timeout_ms = 1500)
        .await
        .unwrap();
    let (_, begun) = h
        .post("/v1/transactions", &json!({"txn_id": "idle"}))
        .await
        .unwrap();
    assert_eq!(begun["state"], "active");
    let (status, _) = h
        .post(
            "/v1/transactions/idle/statements",
            &json!({"participant": "a", "sql": "UPDATE acct SET bal = bal - 1 WHERE id = 7"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let since = std::time::Instant::now();
    wait_until(
        "the abandoned transaction to be rolled back",
        Duration::from_secs(30),
        || async { h.get("/v1/transactions/idle").await.unwrap().1["outcome"] == "aborted" },
    )
    .await;
    // Not before it was idle for its timeout (a margin for the clock: it is at least
    // most of it, however loaded the machine).
    assert!(
        since.elapsed() >= Duration::from_millis(1000),
        "rolled back after {:?}, before its idle timeout of 1.5 s",
        since.elapsed()
    );
    // The row lock is gone: a direct update does not wait, and it sees the balance
    // without the abandoned -1 (its own +70 rolled back again: the bank stays balanced).
    let (client, conn) = tokio_postgres::connect(&h.dbs[0].url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("SET lock_timeout = '2s'; BEGIN")
        .await
        .unwrap();
    let after: i64 = client
        .query_one(
            "UPDATE acct SET bal = bal + 70 WHERE id = 7 RETURNING bal",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, BALANCE + 70, "the abandoned write was not undone");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balance(&h, 0, 7).await, BALANCE);

    // A one-shot transaction that runs past its timeout aborts.
    let body = json!({ "txn_id": "slow", "timeout_ms": 300, "branches": [
        { "participant": "a", "statements": [ { "sql": "SELECT pg_sleep(2)" } ] },
        { "participant": "b", "statements": stmts(credit_statements("slow", 1, 1)) } ] });
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["code"], "57014");
    assert_eq!(ledger_rows(&h, 1, "slow").await, 0);
    // a's branch goes once its pg_sleep(2) is cancelled or over.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let report = h.audit(None).await.unwrap();
        if report.ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for the slow transaction's branch to go: {:?}",
            report.violations()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_hangs_up_does_not_cut_a_transaction_off() {
    let h = Harness::start(2, AgentMode::Remote).await.unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut body = transfer("hangup", &[("a", 8, -4), ("b", 8, 4)]);
    body["branches"][0]["statements"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"sql": "SELECT pg_sleep(1)"}));
    let r = impatient
        .post(format!("{}/v1/transactions", h.base_url))
        .json(&body)
        .send()
        .await;
    assert!(r.is_err(), "the client gave up before the answer");
    // The transaction runs to its end anyway: one outcome, nothing left prepared or live.
    let mut outcome = Value::Null;
    for _ in 0..100 {
        let (_, st) = h.get("/v1/transactions/hangup").await.unwrap();
        if st["outcome"].is_string() {
            outcome = st["outcome"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outcome, "committed");
    assert_eq!(ledger_rows(&h, 0, "hangup").await, 1);
    assert_eq!(ledger_rows(&h, 1, "hangup").await, 1);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

/// A client's COMMIT would commit its branch on its own, and the PREPARE TRANSACTION
/// after it only warns: the branch would vote yes with nothing prepared, and an abort
/// could no longer undo it. The coordinator refuses such statements up front, and the
/// agent refuses them too (for embedders and other coordinators).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_in_a_statement_is_refused() {
    let h = Harness::start(2, AgentMode::Remote).await.unwrap();

    // One-shot: nothing runs anywhere.
    for sql in [
        "COMMIT",
        "end",
        "/* x */ ROLLBACK",
        "PREPARE TRANSACTION 'p'",
    ] {
        let mut body = transfer("tc1", &[("a", 1, -10), ("b", 2, 10)]);
        body["branches"][0]["statements"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({ "sql": sql }));
        let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
        assert_eq!(status, 400, "{sql}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not allowed"),
            "{r}"
        );
    }
    assert_eq!(ledger_rows(&h, 0, "tc1").await, 0);
    assert_eq!(ledger_rows(&h, 1, "tc1").await, 0);
    assert_eq!(balance(&h, 0, 1).await, BALANCE);

    // Interactive: the statement is refused and the transaction goes on; savepoints work.
    let (_, begun) = h
        .post("/v1/transactions", &json!({"txn_id": "tc2"}))
        .await
        .unwrap();
    assert_eq!(begun["state"], "active");
    let stmt = |sql: &str| json!({"participant": "a", "sql": sql});
    for (sql, want) in [
        ("UPDATE acct SET bal = bal - 7 WHERE id = 3", 200),
        ("COMMIT", 400),
        ("SAVEPOINT s1", 200),
        ("UPDATE acct SET bal = bal - 100 WHERE id = 3", 200),
        ("ROLLBACK TO SAVEPOINT s1", 200),
    ] {
        let (status, r) = h
            .post("/v1/transactions/tc2/statements", &stmt(sql))
            .await
            .unwrap();
        assert_eq!(status, want, "{sql}: {r}");
    }
    let (status, r) = h
        .post("/v1/transactions/tc2/rollback", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        balance(&h, 0, 3).await,
        BALANCE,
        "rolled back, COMMIT or not"
    );

    // The agent itself refuses, before anything runs.
    let agent = twopc_participant::Agent::connect(twopc_participant::AgentConfig::new(
        "direct",
        h.dbs[0].url.clone(),
    ))
    .await
    .unwrap();
    let exec = twopc_shared::msg::ExecuteBranch {
        gid: twopc_shared::gid::Gid::new("tc", 1, 1).unwrap(),
        isolation: Default::default(),
        statements: vec![
            twopc_shared::msg::Statement {
                sql: "UPDATE acct SET bal = bal - 1 WHERE id = 4".into(),
                params: vec![],
            },
            twopc_shared::msg::Statement {
                sql: "commit".into(),
                params: vec![],
            },
        ],
        finish: twopc_shared::msg::Finish::Prepare,
        read_only_vote: false,
        continues: false,
        decision: None,
        expires_in_ms: None,
    };
    match agent
        .handle(
            twopc_shared::msg::Request::Execute(exec),
            Duration::from_secs(10),
        )
        .await
    {
        twopc_shared::msg::Response::Failed(e) => {
            assert_eq!(e.kind, twopc_shared::msg::ErrorKind::BadRequest, "{e}");
            assert_eq!(e.statement_index, Some(1));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(balance(&h, 0, 4).await, BALANCE);
    agent.close();

    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

/// Agent sessions are pooled: a session setting a client changes (a `SET` survives even
/// `PREPARE TRANSACTION`) must not reach the next transaction on that session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_setting_does_not_leak_into_the_next_branch() {
    use twopc_shared::msg::{Finish, Request, Response, Statement};
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let mut config = twopc_participant::AgentConfig::new("leak", h.dbs[0].url.clone());
    // One session: every branch runs on it unless it is closed.
    config.pool_size = 1;
    let agent = twopc_participant::Agent::connect(config).await.unwrap();
    let mut seq = 0;
    let mut run = |sql: &str, finish: Finish| {
        seq += 1;
        let exec = twopc_shared::msg::ExecuteBranch {
            gid: twopc_shared::gid::Gid::new("leak", 1, seq).unwrap(),
            isolation: Default::default(),
            statements: vec![Statement {
                sql: sql.into(),
                params: vec![],
            }],
            finish,
            read_only_vote: false,
            continues: false,
            decision: None,
            expires_in_ms: None,
        };
        let agent = agent.clone();
        async move {
            let gid = exec.gid.clone();
            let r = agent
                .handle(Request::Execute(exec), Duration::from_secs(10))
                .await;
            (gid, r)
        }
    };
    let shown = |r: Response| match r {
        Response::Executed { results, .. } => results[0].rows[0]
            .values()
            .next()
            .and_then(Value::as_str)
            .unwrap()
            .to_owned(),
        other => panic!("unexpected {other:?}"),
    };

    let (_, r) = run("SHOW search_path", Finish::Commit).await;
    let default_path = shown(r);
    assert_ne!(default_path, "pg_catalog");

    // One-phase branch.
    let (_, r) = run("SET search_path = pg_catalog", Finish::Commit).await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    let (_, r) = run("SHOW search_path", Finish::Commit).await;
    assert_eq!(shown(r), default_path);

    // Prepared branch, then committed.
    let (gid, r) = run(
        "SELECT set_config('search_path', 'pg_catalog', false)",
        Finish::Prepare,
    )
    .await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    let r = agent
        .handle(Request::CommitPrepared { gid }, Duration::from_secs(10))
        .await;
    assert!(matches!(r, Response::CommitPrepared(_)), "{r:?}");
    let (_, r) = run("SHOW search_path", Finish::Commit).await;
    assert_eq!(shown(r), default_path);

    // A session-level advisory lock would be held by the pooled session for good.
    let (_, r) = run("SELECT pg_advisory_lock(42)::text", Finish::Commit).await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    // The closed session's backend lets go when it exits, a moment after the close (a
    // pooled session would hold the lock for good).
    let mut held = String::new();
    for _ in 0..50 {
        let (_, r) = run(
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND granted",
            Finish::Commit,
        )
        .await;
        held = shown(r);
        if held == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held, "0");

    agent.close();
    h.shutdown().await.unwrap();
}

/// Branches run at the isolation level asked for. Read committed, the default, is a plain
/// `BEGIN` on sessions that pin it, so it holds even where the database's own default is
/// another level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_run_at_the_requested_isolation_level() {
    use twopc_shared::msg::{Finish, Isolation, Request, Response, Statement};
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let (admin, conn) = tokio_postgres::connect(&h.dbs[0].url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation \
             = serializable', current_database()); END $$",
        )
        .await
        .unwrap();
    // Its sessions open after the ALTER, so they would inherit it but for the pin.
    let agent = twopc_participant::Agent::connect(twopc_participant::AgentConfig::new(
        "iso",
        h.dbs[0].url.clone(),
    ))
    .await
    .unwrap();
    for (seq, (isolation, want)) in [
        (Isolation::ReadCommitted, "read committed"),
        (Isolation::RepeatableRead, "repeatable read"),
        (Isolation::Serializable, "serializable"),
        (Isolation::ReadCommitted, "read committed"),
    ]
    .into_iter()
    .enumerate()
    {
        let exec = twopc_shared::msg::ExecuteBranch {
            gid: twopc_shared::gid::Gid::new("iso", 1, seq as u64).unwrap(),
            isolation,
            statements: vec![Statement {
                sql: "SELECT current_setting('transaction_isolation') AS iso".into(),
                params: vec![],
            }],
            finish: Finish::Commit,
            read_only_vote: false,
            continues: false,
            decision: None,
            expires_in_ms: None,
        };
        match agent
            .handle(Request::Execute(exec), Duration::from_secs(10))
            .await
        {
            Response::Executed { results, .. } => {
                assert_eq!(results[0].rows[0]["iso"], want, "{isolation:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    agent.close();
    h.shutdown().await.unwrap();
}

/// A statement error that a savepoint repairs does not stop a one-phase COMMIT, so the
/// answer must say committed (the agent used to report the first error: 409 "aborted"
/// for a transaction PostgreSQL had committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_repaired_error_in_a_one_phase_commit_is_reported_committed() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let body = json!({"txn_id": "onesp", "branches": [
        {"participant": "a", "statements": [{"sql": "SAVEPOINT s"},
                                             {"sql": "SELECT 1 / 0"},
                                             {"sql": "ROLLBACK TO SAVEPOINT s"},
                                             {"sql": "UPDATE acct SET bal = bal - 3 WHERE id = 12"},
                                             {"sql": "UPDATE acct SET bal = bal + 3 WHERE id = 13"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(balance(&h, 0, 12).await, BALANCE - 3);
    let (_, st) = h.get("/v1/transactions/onesp").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    // Without the savepoint the same error aborts it.
    let body = json!({"txn_id": "onefail", "branches": [
        {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 3 WHERE id = 12"},
                                             {"sql": "SELECT 1 / 0"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["code"], "22012", "{r}");
    assert_eq!(balance(&h, 0, 12).await, BALANCE - 3);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

/// The same repaired error in a two-phase transaction: PREPARE succeeds (the savepoint
/// repaired the transaction), so the branch is prepared and the vote must say so. Before,
/// the agent answered the statement's error (a NO vote) and left the branch prepared,
/// uncounted, until the coordinator's abort came: 409 for a transaction PostgreSQL had
/// prepared and would have committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_repaired_error_in_a_prepared_branch_votes_yes() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let body = json!({"txn_id": "twosp", "branches": [
        {"participant": "a", "statements": [{"sql": "SAVEPOINT s"},
                                             {"sql": "SELECT 1 / 0"},
                                             {"sql": "ROLLBACK TO SAVEPOINT s"},
                                             {"sql": "UPDATE acct SET bal = bal - 4 WHERE id = 14"},
                                             {"sql": "UPDATE acct SET bal = bal + 4 WHERE id = 16"}]},
        {"participant": "b", "statements": [
            {"sql": "UPDATE acct SET bal = bal - 4 WHERE id = 14"},
            {"sql": "UPDATE acct SET bal = bal + 4 WHERE id = 16"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "committed");
    let failed = &r["branches"][0]["results"][1];
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("division by zero"),
        "{r}"
    );
    assert_eq!(balance(&h, 0, 14).await, BALANCE - 4);
    assert_eq!(balance(&h, 1, 16).await, BALANCE + 4);
    let (_, st) = h.get("/v1/transactions/twosp").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    // Unrepaired, the error is a NO vote and nothing stays prepared.
    let body = json!({"txn_id": "twofail", "branches": [
        {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 4 WHERE id = 15"},
                                             {"sql": "SELECT 1 / 0"}]},
        {"participant": "b", "statements": [
            {"sql": "UPDATE acct SET bal = bal + 4 WHERE id = 15"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["code"], "22012", "{r}");
    assert_eq!(balance(&h, 0, 15).await, BALANCE);
    assert_eq!(balance(&h, 1, 15).await, BALANCE);
    assert_clean(&h).await;
    h.shutdown().await.unwrap();
}

/// Through the coordinator, one-shot and interactive alike: a 2-D array, an interval, a
/// repeated column name and an infinite timestamp come back whole (issue 18), and a
/// parameter its type refuses is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_comes_back_through_the_coordinator() {
    let h = Harness::start(2, AgentMode::Remote).await.unwrap();
    let sql = "SELECT '{{1,2},{3,4}}'::int[] AS m, interval '1 day' AS iv, 1 AS x, 2 AS x, \
               'infinity'::timestamptz AS t";
    let want = json!([{"m": [[1, 2], [3, 4]], "iv": "1 day", "x": 1, "x_2": 2, "t": "infinity"}]);
    let body = json!({"txn_id": "values-1", "branches": [
        {"participant": "a", "statements": [{"sql": sql}]}]});
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["branches"][0]["results"][0]["rows"], want, "{v}");

    let (status, v) = h
        .post("/v1/transactions", &json!({"txn_id": "values-2"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, v) = h
        .post(
            "/v1/transactions/values-2/statements",
            &json!({"participant": "b", "sql": sql}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"], want, "{v}");
    let (status, v) = h
        .post("/v1/transactions/values-2/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");

    let body = json!({"txn_id": "values-3", "branches": [
        {"participant": "a", "statements": [{"sql": "SELECT $1::interval AS v", "params": ["one day"]}]}]});
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "22007", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("$1"),
        "{v}"
    );
}
