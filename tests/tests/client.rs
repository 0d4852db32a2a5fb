//! `twopc-client` against a live coordinator and real PostgreSQL: what an application
//! sees, and the retry rule where an answer is lost.

use std::time::Duration;

use serde_json::json;
use twopc_client::{Client, Error, RetryPolicy, Transaction};
use twopc_testkit::bank::{credit_statements, debit_statements};
use twopc_testkit::procs::{Bins, ProcHarness};
use twopc_testkit::{AgentMode, Harness, BALANCE};

fn bins() -> Bins {
    Bins {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator-fp").into(),
        participant: env!("CARGO_BIN_EXE_twopc-participant-fp").into(),
    }
}

async fn ledger_rows(url: &str, txn_id: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let sql = format!("SELECT count(*) FROM ledger WHERE txn_id = '{txn_id}'");
    client.query_one(&sql, &[]).await.expect("count").get(0)
}

/// A bank transfer of `amount` from account `from` on `a` to account `to` on `b`.
fn transfer(txn: Transaction, from: i32, to: i32, amount: i64) -> Transaction {
    let id = txn.txn_id().to_owned();
    let mut txn = txn;
    for (sql, params) in debit_statements(&id, from, amount) {
        txn = txn.statement("a", &sql, params);
    }
    for (sql, params) in credit_statements(&id, to, amount) {
        txn = txn.statement("b", &sql, params);
    }
    txn
}

/// One-shot and interactive transactions, a retry of a committed one, an abort with
/// its SQLSTATE, and a refusal, each told apart by type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_runs_transactions_and_tells_outcomes_apart() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let client = Client::builder(&h.base_url).build().unwrap();

    let txn = transfer(Transaction::new(), 1, 2, 5);
    assert!(txn.txn_id().starts_with("c-"), "{}", txn.txn_id());
    let c = client.run(&txn).await.unwrap();
    assert_eq!(c.txn_id, txn.txn_id());
    assert!(!c.replayed);
    assert_eq!(c.branches.len(), 2);
    // The same transaction again: its recorded outcome, nothing run.
    let again = client.run(&txn).await.unwrap();
    assert!(again.replayed, "{again:?}");
    assert_eq!(ledger_rows(&h.dbs[0].url, txn.txn_id()).await, 1);
    assert_eq!(ledger_rows(&h.dbs[1].url, txn.txn_id()).await, 1);
    let status = client.status(txn.txn_id()).await.unwrap();
    assert_eq!(status.outcome, Some(twopc_client::Outcome::Committed));

    // An overdraft: the CHECK constraint vetoes it on a.
    let overdraw = transfer(Transaction::new(), 3, 4, BALANCE * 10);
    match client.run(&overdraw).await {
        Err(Error::Aborted {
            participant, code, ..
        }) => {
            assert_eq!(participant.as_deref(), Some("a"));
            assert_eq!(code.as_deref(), Some("23514"));
        }
        other => panic!("expected an abort: {other:?}"),
    }
    assert_eq!(ledger_rows(&h.dbs[1].url, overdraw.txn_id()).await, 0);

    // An unknown participant is refused before anything runs.
    let bad = Transaction::new().statement("zz", "SELECT 1", vec![]);
    assert!(
        matches!(
            client.run(&bad).await,
            Err(Error::Refused { status: 400, .. })
        ),
        "refused"
    );

    // Interactive: a read, a write, commit; and one rolled back.
    let t = client.begin().await.unwrap();
    let id = t.txn_id().to_owned();
    let r = t
        .execute("a", "SELECT bal FROM acct WHERE id = $1", vec![json!(7)])
        .await
        .unwrap();
    assert_eq!(r.rows.len(), 1, "{r:?}");
    for (sql, params) in debit_statements(&id, 7, 1) {
        t.execute("a", &sql, params).await.unwrap();
    }
    for (sql, params) in credit_statements(&id, 8, 1) {
        t.execute("b", &sql, params).await.unwrap();
    }
    let c = t.commit().await.unwrap();
    assert_eq!(c.txn_id, id);
    assert_eq!(ledger_rows(&h.dbs[0].url, &id).await, 1);
    let t = client.begin().await.unwrap();
    let id = t.txn_id().to_owned();
    for (sql, params) in debit_statements(&id, 9, 1) {
        t.execute("a", &sql, params).await.unwrap();
    }
    t.rollback().await.unwrap();
    assert_eq!(ledger_rows(&h.dbs[0].url, &id).await, 0);
    // A failing statement: the transaction aborts, and says so.
    let t = client.begin().await.unwrap();
    match t.execute("b", "SELECT 1 / 0", vec![]).await {
        Err(Error::Aborted { code, .. }) => assert_eq!(code.as_deref(), Some("22012")),
        other => panic!("expected an abort: {other:?}"),
    }
    h.shutdown().await.unwrap();
}

/// The retry rule where it matters: the client gives up waiting for a commit's answer
/// (its request timeout is shorter than the coordinator's pause after the decision), so
/// the answer is lost. The client must ask `GET`, not send again blindly or report a
/// failure: it reports committed (learnt, `replayed`), and the transfer ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_asked_about_and_the_transaction_runs_once() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.start_all("coordinator.after_decision=sleep(1500)", &["", ""])
        .await
        .unwrap();
    let client = Client::builder(h.base_url())
        .request_timeout(Duration::from_millis(400))
        .retry(RetryPolicy {
            settle_timeout: Duration::from_secs(20),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let txn = transfer(Transaction::with_id("lost-answer-client-1"), 11, 12, 3);
    let c = client.run(&txn).await.unwrap();
    assert!(
        c.replayed,
        "learnt from GET, not from the lost answer: {c:?}"
    );
    assert_eq!(ledger_rows(&h.url(0), txn.txn_id()).await, 1, "ran once");
    assert_eq!(ledger_rows(&h.url(1), txn.txn_id()).await, 1, "ran once");

    // Interactive: the commit's answer is lost the same way.
    let t = client.begin().await.unwrap();
    let id = t.txn_id().to_owned();
    for (sql, params) in debit_statements(&id, 13, 1) {
        t.execute("a", &sql, params).await.unwrap();
    }
    for (sql, params) in credit_statements(&id, 14, 1) {
        t.execute("b", &sql, params).await.unwrap();
    }
    let c = t.commit().await.unwrap();
    assert!(c.replayed, "{c:?}");
    assert_eq!(ledger_rows(&h.url(0), &id).await, 1);
    h.stop_all();
}

/// After a lost answer an abort is not final (found by review): the lost request may
/// still reach the coordinator and run, since a txn id that aborted may run again. The
/// coordinator pauses before preparing, so every attempt's answer is lost; each
/// attempt aborts (an overdraft). The client must say the outcome is unknown, not
/// aborted. Before, it said aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_after_a_lost_answer_is_not_reported_final() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.start_all("coordinator.before_prepare=sleep(1200)", &["", ""])
        .await
        .unwrap();
    let client = Client::builder(h.base_url())
        .request_timeout(Duration::from_millis(300))
        .retry(RetryPolicy {
            attempts_max: 2,
            settle_timeout: Duration::from_secs(20),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let txn = transfer(Transaction::with_id("lost-abort-1"), 15, 16, BALANCE * 10);
    match client.run(&txn).await {
        Err(Error::OutcomeUnknown { message, .. }) => {
            assert!(message.contains("may still run"), "{message}")
        }
        other => panic!("an abort after a lost answer was reported as final: {other:?}"),
    }
    // The coordinator's own answer, once the attempts are over: aborted.
    let s = client.status(txn.txn_id()).await.unwrap();
    assert_eq!(s.outcome, Some(twopc_client::Outcome::Aborted), "{s:?}");
    assert_eq!(ledger_rows(&h.url(1), txn.txn_id()).await, 0);
    h.stop_all();
}

/// A txn id the coordinator never saw: presumed abort, `{txn_id, outcome}` only, which
/// the client read as a rollback's answer and failed on (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_of_a_txn_id_never_seen_is_aborted() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let client = Client::builder(&h.base_url).build().unwrap();
    let s = client.status("never-seen-1").await.unwrap();
    assert_eq!(s.outcome, Some(twopc_client::Outcome::Aborted), "{s:?}");
    // An id no path can carry is refused by the client itself.
    assert!(matches!(
        client.status("..").await,
        Err(Error::Refused { status: 400, .. })
    ));
    h.shutdown().await.unwrap();
}

/// With nobody listening, the request never left: a transport error, not "unknown".
#[tokio::test]
async fn an_unreachable_coordinator_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::builder(format!("http://{addr}"))
        .retry(RetryPolicy {
            attempts_max: 2,
            backoff_min: Duration::from_millis(1),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let r = client
        .run(&Transaction::new().statement("a", "SELECT 1", vec![]))
        .await;
    assert!(matches!(r, Err(Error::Transport(_))), "{r:?}");
}
