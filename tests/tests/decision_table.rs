//! The decision table is not the clients': with a system role owning schema `twopc`,
//! statements a client sends cannot read or write the decision, epoch or secret tables,
//! nor call the commit function themselves, nor hijack it through their `search_path`;
//! the agent's own commits, fences and the coordinator's last-agent and one-phase paths
//! still work.

use std::time::Duration;

use serde_json::json;
use twopc_participant::{Agent, AgentConfig};
use twopc_shared::gid::Gid;
use twopc_shared::msg::{Decision, Finish, Request, Response};
use twopc_testkit::{agent_key_file, serve_agent_config, start_clusters};

const CALL: Duration = Duration::from_secs(10);
const PERMISSION_DENIED: &str = "42501";

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// A bank database with a plain client role `app` (the bank tables, and a schema of its
/// own) and a system role `twopc_system` that may create schema `twopc`.
async fn roles(cluster: &twopc_coordinator::pg_cluster::PgCluster) -> (String, String) {
    let admin = cluster.url("postgres");
    twopc_testkit::setup_bank(&admin, 10, 100).await.unwrap();
    connect(&admin)
        .await
        .batch_execute(
            "CREATE ROLE twopc_system LOGIN NOSUPERUSER; \
             GRANT CREATE ON DATABASE postgres TO twopc_system; \
             CREATE ROLE app LOGIN NOSUPERUSER; \
             GRANT SELECT, UPDATE ON acct TO app; \
             GRANT SELECT, INSERT ON ledger TO app; \
             CREATE SCHEMA evil AUTHORIZATION app",
        )
        .await
        .unwrap();
    let at = |role: &str| format!("postgresql://{role}@127.0.0.1:{}/postgres", cluster.port());
    (at("app"), at("twopc_system"))
}

fn agent_config(name: &str, app: &str, system: &str) -> AgentConfig {
    let mut c = AgentConfig::new(name, app);
    c.system_database_url = Some(system.to_owned());
    c
}

fn branch(gid: Gid, sql: &[&str], finish: Finish, decision: Option<Decision>) -> Request {
    Request::Execute(twopc_testkit::branch(gid, sql, finish, decision))
}

fn decision(txn_id: &str, participants: &[&str]) -> Option<Decision> {
    Some(Decision {
        txn_id: txn_id.into(),
        participants: participants.iter().map(|p| (*p).to_owned()).collect(),
    })
}

async fn decision_rows(admin: &str) -> Vec<(String, bool)> {
    twopc_testkit::decision_rows(&connect(admin).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_statements_cannot_read_or_write_the_decision_table() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("dtab", 1).await.unwrap();
    let admin = clusters[0].url("postgres");
    let (app, system) = roles(&clusters[0]).await;
    let agent = Agent::connect(agent_config("a", &app, &system))
        .await
        .unwrap();
    assert!(agent.keeps_decisions());
    assert_eq!(agent.schema_unprotected(), None);
    let gid = |seq| Gid::with_last_agent("c1", 1, seq, "a").unwrap();

    // The agent's own commit writes its row.
    let r = agent
        .handle(
            branch(
                gid(1),
                &["UPDATE acct SET bal = bal - 1 WHERE id = 1"],
                Finish::CommitDecision,
                decision("t1", &["b"]),
            ),
            CALL,
        )
        .await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    assert_eq!(
        decision_rows(&admin).await,
        vec![(gid(1).to_string(), true)]
    );

    // Straight from the client role: every door is shut with a permission error.
    let client = connect(&app).await;
    for attack in [
        "SELECT count(*) FROM twopc.decisions",
        "INSERT INTO twopc.decisions (gid, committed) VALUES ('twopc_c1_1_9_a', true)",
        "UPDATE twopc.decisions SET committed = false",
        "DELETE FROM twopc.decisions",
        "TRUNCATE twopc.decisions",
        "SELECT token FROM twopc.secret",
        "UPDATE twopc.epochs SET epoch = 0",
        "INSERT INTO twopc.epochs (coordinator_id, epoch) VALUES ('c1', 9223372036854775807)",
        "SELECT twopc.record_commit_v1('guess', 'twopc_c1_1_9_a', 't', '{}', false)",
        "CREATE TABLE twopc.mine (x int)",
        "CREATE FUNCTION twopc.record_commit_v1(text) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        "DO $$ BEGIN DELETE FROM twopc.decisions; END $$",
    ] {
        let e = client
            .batch_execute(attack)
            .await
            .expect_err(&format!("{attack} was allowed"));
        assert_eq!(
            e.code().map(|c| c.code()),
            Some(PERMISSION_DENIED),
            "{attack}: {e}"
        );
    }

    // Through the agent, in a branch that commits with its own decision row: refused,
    // and nothing of it stays.
    for (seq, attack) in [
        (
            2,
            "INSERT INTO twopc.decisions (gid, committed) VALUES ('twopc_c1_1_9_a', true)",
        ),
        (3, "DELETE FROM twopc.decisions"),
    ] {
        let r = agent
            .handle(
                branch(
                    gid(seq),
                    &[attack],
                    Finish::CommitDecision,
                    decision("t", &["b"]),
                ),
                CALL,
            )
            .await;
        match r {
            Response::Failed(e) => {
                assert_eq!(e.sqlstate.as_deref(), Some(PERMISSION_DENIED), "{e:?}")
            }
            other => panic!("{attack}: {other:?}"),
        }
    }
    assert_eq!(
        decision_rows(&admin).await,
        vec![(gid(1).to_string(), true)]
    );

    // A fence (system role) still works, and wins over a later commit.
    match agent.handle(Request::Fence { gid: gid(4) }, CALL).await {
        Response::Decision {
            committed: false, ..
        } => {}
        other => panic!("fence: {other:?}"),
    }
    let r = agent
        .handle(
            branch(
                gid(4),
                &["UPDATE acct SET bal = bal - 1 WHERE id = 2"],
                Finish::CommitDecision,
                decision("t4", &["b"]),
            ),
            CALL,
        )
        .await;
    assert!(matches!(r, Response::Failed(_)), "{r:?}");
    assert_eq!(
        connect(&admin)
            .await
            .query_one("SELECT bal FROM acct WHERE id = 2", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        100
    );
    agent.close();

    // One role for both: the agent works, and says the schema is not protected.
    let single = Agent::connect(AgentConfig::new("a", &admin)).await.unwrap();
    assert!(single.keeps_decisions());
    assert!(single.schema_unprotected().is_some());
    single.close();
}

/// The commit function runs with the system role's rights under the caller's
/// `search_path`: a client that puts its own `=` for text first must not get its code
/// run as the system role (which could then read the secret or forge rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_search_path_cannot_hijack_the_commit_function() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("dhij", 1).await.unwrap();
    let admin = clusters[0].url("postgres");
    let (app, system) = roles(&clusters[0]).await;
    connect(&app)
        .await
        .batch_execute(
            "CREATE TABLE evil.seen (who text); \
             GRANT USAGE ON SCHEMA evil TO PUBLIC; \
             GRANT INSERT ON evil.seen TO PUBLIC; \
             CREATE FUNCTION evil.eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO evil.seen VALUES (current_user::text); \
             RETURN a OPERATOR(pg_catalog.=) b; END $$; \
             GRANT EXECUTE ON FUNCTION evil.eq(text, text) TO PUBLIC; \
             CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq); \
             CREATE TABLE evil.loot (v text); \
             GRANT INSERT ON evil.loot TO PUBLIC; \
             CREATE FUNCTION evil.steal(v text) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO evil.loot VALUES (v); RETURN true; END $$; \
             CREATE DOMAIN evil.text AS pg_catalog.text CHECK (evil.steal(VALUE)); \
             CREATE FUNCTION evil.txid_current_if_assigned() RETURNS bigint \
                 LANGUAGE sql AS 'SELECT NULL::bigint'",
        )
        .await
        .unwrap();
    let agent = Agent::connect(agent_config("a", &app, &system))
        .await
        .unwrap();
    assert_eq!(agent.schema_unprotected(), None);
    let gid = Gid::with_last_agent("c1", 1, 1, "a").unwrap();
    let r = agent
        .handle(
            branch(
                gid.clone(),
                &[
                    "SET LOCAL search_path = evil, pg_catalog, public",
                    "UPDATE public.acct SET bal = bal - 1 WHERE id = 1",
                ],
                Finish::CommitDecision,
                decision("t1", &["b"]),
            ),
            CALL,
        )
        .await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    assert_eq!(decision_rows(&admin).await, vec![(gid.to_string(), true)]);
    let seen: i64 = connect(&admin)
        .await
        .query_one("SELECT count(*) FROM evil.seen", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 0,
        "the client's operator ran inside the commit function"
    );
    let loot: i64 = connect(&admin)
        .await
        .query_one("SELECT count(*) FROM evil.loot", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        loot, 0,
        "the client's domain saw the agent's parameters (the secret)"
    );

    // The read-only check cannot be fooled into committing a write at its vote: a
    // write that does not start with DML, and a `txid_current_if_assigned` of the
    // client's that says nothing was written.
    let mut exec = twopc_testkit::branch(
        Gid::new("c1", 1, 2).unwrap(),
        &[
            "SET LOCAL search_path = evil, pg_catalog, public",
            "WITH u AS (UPDATE public.acct SET bal = bal + 1 WHERE id = 3 RETURNING 1) \
             SELECT count(*) FROM u",
        ],
        Finish::Prepare,
        None,
    );
    exec.read_only_vote = true;
    match agent.handle(Request::Execute(exec), CALL).await {
        Response::Executed { outcome, .. } => {
            assert_eq!(outcome, twopc_shared::msg::BranchOutcome::Prepared)
        }
        other => panic!("{other:?}"),
    }
    let gid = Gid::new("c1", 1, 2).unwrap();
    assert!(matches!(
        agent.handle(Request::Abort { gid }, CALL).await,
        Response::Aborted
    ));
    agent.close();
}

/// The agent's own steps around a branch's statements (the decision row, the probe, the
/// read-only check, the role reset) are not named statements of the session, which a
/// client statement could read in `pg_prepared_statements`, `DEALLOCATE` and `PREPARE`
/// anew (to see the secret among the parameters, or to answer `true` without a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_steps_are_not_statements_a_client_can_replace() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("dnam", 1).await.unwrap();
    let (app, system) = roles(&clusters[0]).await;
    let mut config = agent_config("a", &app, &system);
    config.pool_size = 1;
    let agent = Agent::connect(config).await.unwrap();
    let gid = |seq| Gid::with_last_agent("c1", 1, seq, "a").unwrap();
    for seq in 1..=2 {
        let r = agent
            .handle(
                branch(
                    gid(seq),
                    &["UPDATE acct SET bal = bal - 1 WHERE id = 1"],
                    Finish::CommitDecision,
                    decision("t", &["b"]),
                ),
                CALL,
            )
            .await;
        assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    }
    // The same (only) session, in the next branch: what could it replace?
    let r = agent
        .handle(
            branch(
                Gid::new("c1", 1, 3).unwrap(),
                &["SELECT count(*) FROM pg_prepared_statements \
                   WHERE (statement ILIKE '%record_commit%' OR statement ILIKE '%txid_current%' \
                   OR statement ILIKE '%set_config%') \
                   AND statement NOT ILIKE '%pg_prepared_statements%'"],
                Finish::Commit,
                None,
            ),
            CALL,
        )
        .await;
    match r {
        Response::Executed { results, .. } => {
            assert_eq!(results[0].rows[0]["count"], 0, "{results:?}")
        }
        other => panic!("{other:?}"),
    }
    agent.close();
}

/// End to end with remote agents over two such databases: transfers (last-agent and
/// two-phase) and a one-phase commit commit, and a restarted coordinator finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_through_agents_with_a_separate_system_role() {
    twopc_testkit::init_tracing();
    let (names, clusters) = start_clusters("dend", 2).await.unwrap();
    let data_dir = std::env::temp_dir().join(format!(
        "twopc-dend-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut config = twopc_coordinator::config::ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.clone(),
        agent_auth_key_file: Some(agent_key_file()),
        ..Default::default()
    };
    let mut agents = Vec::new();
    for (name, c) in names.iter().zip(&clusters) {
        let (app, system) = roles(c).await;
        let (addr, agent, stop) =
            serve_agent_config(agent_config(name, &app, &system), Default::default())
                .await
                .unwrap();
        assert!(agent.keeps_decisions());
        assert_eq!(agent.schema_unprotected(), None);
        config.participants.insert(name.clone(), addr);
        agents.push((agent, stop));
    }
    let running = twopc_coordinator::server::start(config.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let (http, url) = (
            http.clone(),
            format!("http://{}/v1/transactions", running.addr),
        );
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for i in 0..5 {
        let body = twopc_testkit::workload::transfer_body(&format!("x-{i}"), ("a", 1), ("b", 2), 1);
        let (status, v) = post(body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["outcome"], "committed", "{v}");
    }
    let (status, v) = post(json!({
        "txn_id": "one-phase",
        "branches": [{"participant": "a",
                      "statements": [{"sql": "UPDATE acct SET bal = bal + 5 WHERE id = 3"}]}]
    }))
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["outcome"], "committed", "{v}");
    running.shutdown().await.unwrap();

    let running = twopc_coordinator::server::start(config.clone())
        .await
        .unwrap();
    for id in ["x-0", "x-4", "one-phase"] {
        let url = format!("http://{}/v1/transactions/{id}", running.addr);
        let mut outcome = serde_json::Value::Null;
        for _ in 0..100 {
            let v: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
            outcome = v["outcome"].clone();
            if outcome != "recovering" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(outcome, "committed", "{id} after a restart");
    }
    let a = clusters[0].url("postgres");
    let b = clusters[1].url("postgres");
    let bal = |url: String, id: i32| async move {
        connect(&url)
            .await
            .query_one("SELECT bal FROM acct WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(bal(a.clone(), 1).await, 95);
    assert_eq!(bal(b, 2).await, 105);
    assert_eq!(bal(a, 3).await, 105);
    running.shutdown().await.unwrap();
    for (agent, stop) in agents {
        stop.cancel();
        agent.close();
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}
