//! Session hygiene by construction (issue "Only the coordinator commands the agents"):
//! whatever a branch's statements do to their pooled session, the next branch on it finds
//! it as new. Each bypass of the old keyword check (`changes_session`) is here, run on an
//! agent with ONE session, so the next branch gets the same session unless it was closed.

use std::time::Duration;

use serde_json::Value;
use twopc_shared::msg::{Finish, Request, Response};
use twopc_testkit::{AgentMode, Harness};

struct OneSession {
    agent: twopc_participant::Agent,
    seq: u64,
}

impl OneSession {
    async fn new(url: &str) -> OneSession {
        let mut config = twopc_participant::AgentConfig::new("hyg", url);
        config.pool_size = 1;
        OneSession {
            agent: twopc_participant::Agent::connect(config).await.unwrap(),
            seq: 0,
        }
    }

    /// Runs `sql` as a whole branch (`finish`), committing a prepared one.
    async fn branch(&mut self, sqls: &[&str], finish: Finish) -> Response {
        self.seq += 1;
        let gid = twopc_shared::gid::Gid::new("hyg", 1, self.seq).unwrap();
        let exec = twopc_testkit::branch(gid.clone(), sqls, finish, None);
        let r = self
            .agent
            .handle(Request::Execute(exec), Duration::from_secs(10))
            .await;
        if finish == Finish::Prepare && matches!(r, Response::Executed { .. }) {
            let done = self
                .agent
                .handle(Request::CommitPrepared { gid }, Duration::from_secs(10))
                .await;
            assert!(matches!(done, Response::CommitPrepared(_)), "{done:?}");
        }
        r
    }

    /// The first value of the first row of a one-statement branch.
    async fn value(&mut self, sql: &str) -> String {
        match self.branch(&[sql], Finish::Prepare).await {
            Response::Executed { results, .. } => match results[0].rows[0].values().next() {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => panic!("no value from {sql}"),
            },
            other => panic!("{sql}: {other:?}"),
        }
    }
}

/// What a new session shows.
async fn baseline(s: &mut OneSession) -> Vec<String> {
    let mut v = Vec::new();
    for sql in PROBES {
        v.push(s.value(sql).await);
    }
    v
}

const PROBES: [&str; 6] = [
    "SHOW search_path",
    "SHOW statement_timeout",
    "SELECT current_user::text || '/' || session_user::text",
    "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema()",
    "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    "SELECT (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) + (SELECT count(*) FROM pg_cursors)",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_branch_does_to_its_session_does_not_reach_the_next_one() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let url = h.dbs[0].url.clone();
    let mut s = OneSession::new(&url).await;
    let clean = baseline(&mut s).await;
    let bypasses: &[&[&str]] = &[
        &["DO $$ BEGIN EXECUTE 'SET search_path = evil, public'; END $$"],
        &["DO $$ BEGIN SET statement_timeout = 0; END $$"],
        &["DO $$ BEGIN EXECUTE 'SET SESSION AUTHORIZATION postgres'; END $$"],
        &["SELECT U&\"set\\005fconfig\"('search_path', 'evil', false)"],
        &["CREATE TABLE pg_temp.acct (id int PRIMARY KEY, bal bigint)"],
        &["SELECT pg_advisory_lock(4242)"],
        &["PREPARE sneaky AS SELECT 1"],
        &["DECLARE held CURSOR WITH HOLD FOR SELECT 1"],
        &["LISTEN somewhere"],
    ];
    for finish in [Finish::Prepare, Finish::Commit] {
        for statements in bypasses {
            let r = s.branch(statements, finish).await;
            // PostgreSQL refuses to PREPARE a transaction that used a temporary table or
            // made a WITH HOLD cursor (0A000; the branch is rolled back, and its session
            // reset all the same).
            let refused =
                matches!(&r, Response::Failed(e) if e.sqlstate.as_deref() == Some("0A000"));
            assert!(
                matches!(r, Response::Executed { .. }) || (refused && finish == Finish::Prepare),
                "{statements:?}: {r:?}"
            );
            let after = baseline(&mut s).await;
            assert_eq!(after, clean, "after {statements:?} ({finish:?})");
        }
    }
    // A branch that fails (rolled back) resets its session too.
    let r = s
        .branch(
            &[
                "DO $$ BEGIN EXECUTE 'SET search_path = evil, public'; END $$",
                "SELECT 1 / 0",
            ],
            Finish::Prepare,
        )
        .await;
    assert!(matches!(r, Response::Failed(_)), "{r:?}");
    assert_eq!(baseline(&mut s).await, clean);
    h.shutdown().await.unwrap();
}

/// The lost write the temp table made possible: a later client's `UPDATE acct`
/// "committed" into another client's `pg_temp.acct`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_table_cannot_shadow_a_real_one_for_the_next_client() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let url = h.dbs[0].url.clone();
    let mut s = OneSession::new(&url).await;
    let r = s
        .branch(
            &["CREATE TABLE pg_temp.acct (id int PRIMARY KEY, bal bigint)"],
            // A one-phase branch: PREPARE refuses temporary objects.
            Finish::Commit,
        )
        .await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    let before = s
        .value("SELECT bal::text FROM public.acct WHERE id = 1")
        .await;
    let r = s
        .branch(
            &["UPDATE acct SET bal = bal + 5 WHERE id = 1"],
            Finish::Prepare,
        )
        .await;
    match &r {
        Response::Executed { results, .. } => assert_eq!(results[0].rows_affected, 1),
        other => panic!("{other:?}"),
    }
    let after = s
        .value("SELECT bal::text FROM public.acct WHERE id = 1")
        .await;
    let (before, after): (i64, i64) = (before.parse().unwrap(), after.parse().unwrap());
    assert_eq!(after, before + 5, "the update went into a temporary table");
    h.shutdown().await.unwrap();
}

/// A prepared transaction belongs to the role current at PREPARE: a branch that ran
/// `SET ROLE` must still prepare as the agent's role, or the agent could neither list
/// nor commit it (it would stay prepared, holding its locks, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_changed_its_role_still_prepares_as_the_agent() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let url = h.dbs[0].url.clone();
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // A plain agent role (a superuser may finish anyone's prepared transaction), a
    // member of the role its client switches to.
    admin
        .batch_execute(
            "CREATE ROLE agent_role LOGIN; CREATE ROLE other NOLOGIN; \
             GRANT other TO agent_role; GRANT SELECT, UPDATE ON acct TO agent_role, other",
        )
        .await
        .unwrap();
    let agent_url = format!(
        "postgresql://agent_role@127.0.0.1:{}/postgres",
        h.dbs[0].cluster.port()
    );
    let mut s = OneSession::new(&agent_url).await;
    // `branch` commits the prepared transaction through the agent, and fails if it
    // cannot.
    let r = s
        .branch(
            &[
                "SET ROLE other",
                "UPDATE acct SET bal = bal + 1 WHERE id = 2",
            ],
            Finish::Prepare,
        )
        .await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    let left: i64 = admin
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a prepared transaction was left behind");
    // And the next branch runs as the agent's role again.
    assert_eq!(s.value("SELECT current_user::text").await, "agent_role");
    h.shutdown().await.unwrap();
}
