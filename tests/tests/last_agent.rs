//! Last-agent commit (`--last-agent`): every branch but one prepares, the last commits its
//! statements together with the decision row, and that commit is the decision. A lost
//! answer is settled by fencing; recovery never presumes abort for a last-agent GID.

use std::time::Duration;

use serde_json::json;
use twopc_participant::{Agent, AgentConfig};
use twopc_shared::gid::Gid;
use twopc_shared::msg::{
    BranchOutcome, Decision, ErrorKind, ExecuteBranch, Finish, Request, Response, Statement,
};
use twopc_testkit::workload::transfer_body;
use twopc_testkit::{AgentMode, Harness, BALANCE};

const CALL: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn balance(h: &Harness, db: usize, acct: i32) -> i64 {
    h.scalar_i64(db, &format!("SELECT bal FROM acct WHERE id = {acct}"))
        .await
        .unwrap()
}

async fn decision_rows(h: &Harness, db: usize, committed: bool) -> i64 {
    h.scalar_i64(
        db,
        &format!("SELECT count(*) FROM twopc.decisions WHERE committed = {committed}"),
    )
    .await
    .unwrap()
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Whether a session waits for a lock on the decision table (the fence, behind an
/// uncommitted insert of the same GID).
async fn fence_waits(client: &tokio_postgres::Client) -> bool {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query ILIKE '%decisions%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

fn execute(gid: &Gid, sql: &str, finish: Finish, decision: Option<Decision>) -> Request {
    Request::Execute(ExecuteBranch {
        gid: gid.clone(),
        isolation: Default::default(),
        statements: vec![Statement {
            sql: sql.into(),
            params: vec![],
        }],
        finish,
        read_only_vote: false,
        continues: false,
        decision,
        expires_in_ms: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_through_the_last_agent_and_its_row_is_forgotten() {
    let mut h = Harness::start_with(2, AgentMode::Remote, |c| c.last_agent = true)
        .await
        .unwrap();
    // The first transaction connects to the agents (their handshake says they can
    // commit last); it may still take the ordinary path.
    for (i, id) in ["la0", "la1", "la2"].iter().enumerate() {
        let (status, body) = h
            .post(
                "/v1/transactions",
                &transfer_body(id, ("a", 1), ("b", 2), 10),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["outcome"], "committed");
        let branches = body["branches"].as_array().unwrap();
        assert_eq!(branches.len(), 2, "{body}");
        // In the client's order, with the last agent's results too.
        assert_eq!(branches[0]["participant"], "a");
        assert_eq!(branches[1]["participant"], "b");
        assert_eq!(branches[1]["results"][0]["rows_affected"], 1, "{body}");
        assert_eq!(balance(&h, 0, 1).await, BALANCE - 10 * (i as i64 + 1));
        assert_eq!(balance(&h, 1, 2).await, BALANCE + 10 * (i as i64 + 1));
    }
    assert!(
        h.metric("twopc_txns_committed_last_agent_total")
            .await
            .unwrap()
            >= 2
    );
    let (_, st) = h.get("/v1/transactions/la2").await.unwrap();
    assert_eq!(st["outcome"], "committed");
    let gid = Gid::parse(st["gid"].as_str().unwrap()).unwrap();
    assert_eq!(gid.last_agent().as_deref(), Some("b"), "{st}");
    // Only the last agent writes (the other branch is read-only and drops out).
    let (status, body) = h
        .post(
            "/v1/transactions",
            &json!({"txn_id": "la-ro", "branches": [
                {"participant": "a", "statements": [{"sql": "SELECT bal FROM acct WHERE id = 1"}]},
                {"participant": "b", "statements": [{"sql": "UPDATE acct SET bal = bal + 1 WHERE id = 4"},
                                                     {"sql": "UPDATE acct SET bal = bal - 1 WHERE id = 5"}]}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["branches"][0]["results"][0]["rows"][0]["bal"],
        BALANCE - 30
    );
    assert_eq!(balance(&h, 1, 4).await, BALANCE + 1);
    // Every participant acknowledged: the decision rows go.
    wait_until("the decision rows are forgotten", || async {
        decision_rows(&h, 1, true).await == 0
    })
    .await;
    // A restart finds nothing in doubt, and still knows the outcomes.
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|c| c.last_agent = true).await.unwrap();
    let (_, l) = h.get("/v1/transactions?state=in_doubt").await.unwrap();
    assert_eq!(l["transactions"], json!([]), "{l}");
    for id in ["la2", "la-ro"] {
        let (_, st) = h.get(&format!("/v1/transactions/{id}")).await.unwrap();
        assert_eq!(st["outcome"], "committed", "{id}: {st}");
    }
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations());
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_last_branch_rolls_back_the_prepared_ones() {
    let h = Harness::start_with(2, AgentMode::InProcess, |c| c.last_agent = true)
        .await
        .unwrap();
    let body = json!({"txn_id": "lafail", "branches": [
        {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 5 WHERE id = 3"}]},
        {"participant": "b", "statements": [{"sql": "UPDATE acct SET bal = bal + 5 WHERE id = 3"},
                                             {"sql": "SELECT 1 / 0"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["outcome"], "aborted");
    assert_eq!(r["error"]["participant"], "b");
    assert_eq!(r["error"]["code"], "22012");
    assert_eq!(balance(&h, 0, 3).await, BALANCE);
    assert_eq!(balance(&h, 1, 3).await, BALANCE);
    assert_eq!(decision_rows(&h, 1, true).await, 0);
    let (_, st) = h.get("/v1/transactions/lafail").await.unwrap();
    assert_eq!(st["outcome"], "aborted");
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations());
    h.shutdown().await.unwrap();
}

/// A statement error that a savepoint repairs does not stop the last agent's commit, so
/// it must not make the coordinator roll the others back (the agent reports the first
/// error it saw; the decision row is what says whether it committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_repaired_error_on_the_last_agent_commits_everywhere() {
    let h = Harness::start_with(2, AgentMode::InProcess, |c| c.last_agent = true)
        .await
        .unwrap();
    let body = json!({"txn_id": "lasp", "branches": [
        {"participant": "a", "statements": [{"sql": "UPDATE acct SET bal = bal - 5 WHERE id = 6"},
                                             {"sql": "UPDATE acct SET bal = bal + 5 WHERE id = 16"}]},
        {"participant": "b", "statements": [{"sql": "SAVEPOINT s"},
                                             {"sql": "SELECT 1 / 0"},
                                             {"sql": "ROLLBACK TO SAVEPOINT s"},
                                             {"sql": "UPDATE acct SET bal = bal + 5 WHERE id = 6"},
                                             {"sql": "UPDATE acct SET bal = bal - 5 WHERE id = 16"}]}]});
    let (status, r) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "committed");
    assert_eq!(r["branches"][1]["results"][3]["rows_affected"], 1, "{r}");
    assert_eq!(balance(&h, 0, 6).await, BALANCE - 5);
    assert_eq!(balance(&h, 1, 6).await, BALANCE + 5);
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations());
    h.shutdown().await.unwrap();
}

/// The agent-level guarantees the protocol rests on, against a real database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_waits_for_a_commit_in_flight_and_makes_a_late_one_fail() {
    let dbs = twopc_testkit::start_dbs(1, AgentMode::InProcess)
        .await
        .unwrap();
    let url = dbs[0].url.clone();
    let agent = Agent::connect(AgentConfig::new("a", &url)).await.unwrap();
    assert!(agent.keeps_decisions());
    let raw = connect(&url).await;
    // Looks at pg_stat_activity from outside raw's open transactions (a transaction sees
    // one snapshot of it).
    let watch = connect(&url).await;
    let gid = |seq| Gid::with_last_agent("c9", 1, seq, "a").unwrap();

    // A commit in flight that commits: the fence waits for it and reports it.
    let g1 = gid(1);
    raw.batch_execute(&format!(
        "BEGIN; INSERT INTO twopc.decisions (gid, committed, txn_id, participants) \
         VALUES ('{g1}', true, 't1', '{{b}}')"
    ))
    .await
    .unwrap();
    let fence = tokio::spawn({
        let (agent, g1) = (agent.clone(), g1.clone());
        async move { agent.handle(Request::Fence { gid: g1 }, CALL).await }
    });
    // The fence found the row of the commit in flight: its session waits for that
    // transaction's lock.
    wait_until("the fence waits on the row of the commit in flight", || {
        fence_waits(&watch)
    })
    .await;
    assert!(
        !fence.is_finished(),
        "the fence did not wait for the commit in flight"
    );
    raw.batch_execute("COMMIT").await.unwrap();
    match fence.await.unwrap() {
        Response::Decision {
            committed: true,
            txn_id,
            participants,
        } => {
            assert_eq!(txn_id, "t1");
            assert_eq!(participants, vec!["b".to_owned()]);
        }
        other => panic!("fence after a commit: {other:?}"),
    }

    // A commit in flight that rolls back: the fence wins and says aborted.
    let g2 = gid(2);
    raw.batch_execute(&format!(
        "BEGIN; INSERT INTO twopc.decisions (gid, committed) VALUES ('{g2}', true)"
    ))
    .await
    .unwrap();
    let fence = tokio::spawn({
        let (agent, g2) = (agent.clone(), g2.clone());
        async move { agent.handle(Request::Fence { gid: g2 }, CALL).await }
    });
    wait_until(
        "the fence waits on the row of the rolling-back commit",
        || fence_waits(&watch),
    )
    .await;
    assert!(!fence.is_finished());
    raw.batch_execute("ROLLBACK").await.unwrap();
    assert!(matches!(
        fence.await.unwrap(),
        Response::Decision {
            committed: false,
            ..
        }
    ));

    // Fenced first: a late commit fails, on this agent (it remembers the GID) and on
    // another one over the same database (the key refuses it), and changes nothing.
    let g3 = gid(3);
    assert!(matches!(
        agent.handle(Request::Fence { gid: g3.clone() }, CALL).await,
        Response::Decision {
            committed: false,
            ..
        }
    ));
    let late = |a: &Agent| {
        let (a, g3) = (a.clone(), g3.clone());
        async move {
            a.handle(
                execute(
                    &g3,
                    "UPDATE acct SET bal = bal + 1 WHERE id = 1",
                    Finish::CommitDecision,
                    Some(Decision {
                        txn_id: "t3".into(),
                        participants: vec!["b".into()],
                    }),
                ),
                CALL,
            )
            .await
        }
    };
    match late(&agent).await {
        Response::Failed(e) => assert_eq!(e.kind, ErrorKind::UnknownBranch, "{e:?}"),
        other => panic!("late commit on the fencing agent: {other:?}"),
    }
    let other_agent = Agent::connect(AgentConfig::new("a", &url)).await.unwrap();
    match late(&other_agent).await {
        Response::Failed(e) => {
            assert_eq!(e.kind, ErrorKind::Sql, "{e:?}");
            assert_eq!(e.sqlstate.as_deref(), Some("23505"), "{e:?}");
        }
        other => panic!("late commit on another agent: {other:?}"),
    }
    let bal: i64 = raw
        .query_one("SELECT bal FROM acct WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bal, BALANCE);

    // A real commit with its row; Forget deletes committed rows only.
    let g4 = gid(4);
    let r = agent
        .handle(
            execute(
                &g4,
                "UPDATE acct SET bal = bal + 1 WHERE id = 2",
                Finish::CommitDecision,
                Some(Decision {
                    txn_id: "t4".into(),
                    participants: vec!["b".into()],
                }),
            ),
            CALL,
        )
        .await;
    assert!(
        matches!(
            r,
            Response::Executed {
                outcome: BranchOutcome::Committed,
                ..
            }
        ),
        "{r:?}"
    );
    match agent
        .handle(
            Request::Forget {
                gids: vec![g4.clone(), g3.clone()],
            },
            CALL,
        )
        .await
    {
        Response::Forgotten { rows } => assert_eq!(rows, 1),
        other => panic!("forget: {other:?}"),
    }
    let left = twopc_testkit::decision_rows(&raw).await;
    assert_eq!(
        left,
        vec![
            (g1.to_string(), true),
            (g2.to_string(), false),
            (g3.to_string(), false)
        ]
    );

    // An agent without the table says so, and refuses to commit last.
    let mut config = AgentConfig::new("a", &url);
    config.decision_table = false;
    let without = Agent::connect(config).await.unwrap();
    assert!(!without.keeps_decisions());
    match without
        .handle(
            Request::Hello {
                protocol_version: twopc_shared::PROTOCOL_VERSION,
                coordinator_id: "c9".into(),
                epoch: 1,
                nonce: None,
            },
            CALL,
        )
        .await
    {
        Response::Hello { decisions, .. } => assert!(!decisions),
        other => panic!("hello: {other:?}"),
    }
    match without.handle(Request::Fence { gid: gid(5) }, CALL).await {
        Response::Failed(e) => assert_eq!(e.kind, ErrorKind::BadRequest),
        other => panic!("fence without a table: {other:?}"),
    }
    for a in [agent, other_agent, without] {
        a.close();
    }
}

/// Orphans of an earlier incarnation: recovery commits the one whose last agent holds a
/// committed row, rolls back the one it can fence, and leaves alone the one whose last
/// agent it cannot ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_settles_orphans_by_the_last_agents_row() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let a = connect(&h.dbs[0].url).await;
    let b = connect(&h.dbs[1].url).await;
    // Epoch 0 is before this coordinator's first start (epochs start at 1).
    let committed = Gid::with_last_agent("c1", 0, 1, "b").unwrap();
    let fenced = Gid::with_last_agent("c1", 0, 2, "b").unwrap();
    let unknown_last = Gid::with_last_agent("c1", 0, 3, "zz").unwrap();
    a.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal - 5 WHERE id = 7; PREPARE TRANSACTION '{committed}'"
    ))
    .await
    .unwrap();
    b.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal + 5 WHERE id = 7; \
         INSERT INTO twopc.decisions (gid, committed, txn_id, participants) \
         VALUES ('{committed}', true, 'orphan-1', '{{a}}'); COMMIT"
    ))
    .await
    .unwrap();
    a.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal - 3 WHERE id = 8; PREPARE TRANSACTION '{fenced}'"
    ))
    .await
    .unwrap();
    a.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal - 2 WHERE id = 9; PREPARE TRANSACTION '{unknown_last}'"
    ))
    .await
    .unwrap();
    // Phase 2 finished before the crash, the log's record of it did not survive: only
    // the row knows.
    let only_row = Gid::with_last_agent("c1", 0, 4, "b").unwrap();
    b.batch_execute(&format!(
        "INSERT INTO twopc.decisions (gid, committed, txn_id, participants) \
         VALUES ('{only_row}', true, 'orphan-4', '{{a}}')"
    ))
    .await
    .unwrap();

    let (status, r) = h.post("/v1/admin/recover", &json!({})).await.unwrap();
    assert_eq!(status, 200, "{r}");
    let prepared = || async {
        a.query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    wait_until("the settled orphans are resolved", || async {
        prepared().await == vec![unknown_last.to_string()]
    })
    .await;
    assert_eq!(balance(&h, 0, 7).await, BALANCE - 5, "committed orphan");
    assert_eq!(balance(&h, 1, 7).await, BALANCE + 5);
    assert_eq!(
        balance(&h, 0, 8).await,
        BALANCE,
        "fenced orphan rolled back"
    );
    let (_, st) = h.get("/v1/transactions/orphan-1").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");
    // The fence row stays (a late commit must keep failing); the committed row goes
    // once its participant acknowledged.
    let row = |g: &Gid| {
        let (b, g) = (&b, g.to_string());
        async move {
            b.query_opt(
                "SELECT committed FROM twopc.decisions WHERE gid = $1",
                &[&g],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, bool>(0))
        }
    };
    assert_eq!(row(&fenced).await, Some(false));
    wait_until("the committed rows are forgotten", || async {
        row(&committed).await.is_none() && row(&only_row).await.is_none()
    })
    .await;
    let (_, st) = h.get("/v1/transactions/orphan-4").await.unwrap();
    assert_eq!(st["outcome"], "committed", "{st}");

    // Nobody to ask about the third: an operator may not guess without --force.
    let path = format!("/v1/admin/txns/{unknown_last}/resolve");
    let (status, r) = h.post(&path, &json!({"action": "abort"})).await.unwrap();
    assert_eq!(status, 409, "{r}");
    assert_eq!(prepared().await, vec![unknown_last.to_string()]);
    let (status, r) = h
        .post(&path, &json!({"action": "abort", "force": true}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    wait_until("the forced abort is done", || async {
        prepared().await.is_empty()
    })
    .await;
    assert_eq!(balance(&h, 0, 9).await, BALANCE);
    h.shutdown().await.unwrap();
}

/// `txns resolve` asks the last agent: it refuses to contradict a committed row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_respects_the_last_agents_row() {
    let h = Harness::start_with(2, AgentMode::InProcess, |c| {
        // Keep recovery out of the way: the operator gets there first.
        c.recovery_interval_ms = 600_000;
    })
    .await
    .unwrap();
    let a = connect(&h.dbs[0].url).await;
    let b = connect(&h.dbs[1].url).await;
    let gid = Gid::with_last_agent("c1", 0, 11, "b").unwrap();
    a.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal - 4 WHERE id = 11; PREPARE TRANSACTION '{gid}'"
    ))
    .await
    .unwrap();
    b.batch_execute(&format!(
        "BEGIN; UPDATE acct SET bal = bal + 4 WHERE id = 11; \
         INSERT INTO twopc.decisions (gid, committed, txn_id, participants) \
         VALUES ('{gid}', true, 'orphan-11', '{{a}}'); COMMIT"
    ))
    .await
    .unwrap();
    // Recovery ran once at start; it may already have committed it. If not, resolve
    // must refuse to abort, and commit when asked.
    let path = format!("/v1/admin/txns/{gid}/resolve");
    let (status, r) = h.post(&path, &json!({"action": "abort"})).await.unwrap();
    assert_eq!(status, 409, "{r}");
    let (status, r) = h.post(&path, &json!({"action": "commit"})).await.unwrap();
    assert_eq!(status, 200, "{r}");
    wait_until("the branch is committed", || async {
        balance(&h, 0, 11).await == BALANCE - 4
    })
    .await;
    h.shutdown().await.unwrap();
}
