//! Only the coordinator commands the agents: fencing, limits, least privilege.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use twopc_coordinator::participant::{CallError, RemoteAgent, RemoteConfig};
use twopc_shared::msg::{ErrorKind, Request, Response};
use twopc_testkit::{spawn_agent, start_clusters, AgentMode, Harness};

fn remote(addr: &str, epoch: u64) -> Arc<RemoteAgent> {
    Arc::new(RemoteAgent::new(
        "a".into(),
        addr.into(),
        "c1".into(),
        epoch,
        RemoteConfig::default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_coordinator_epoch_is_fenced() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("fence", 1).await.unwrap();
    let (addr, _stop) = spawn_agent("a", &clusters[0].url("postgres"))
        .await
        .unwrap();
    let t = Duration::from_secs(5);

    let old = remote(&addr, 1);
    assert!(matches!(
        old.call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));

    // A newer incarnation connects: from now on epoch 1 is stale.
    let new = remote(&addr, 2);
    assert!(matches!(
        new.call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));
    match old.call(Request::Ping, t).await {
        Ok(Response::Failed(e)) => assert_eq!(e.kind, ErrorKind::Fenced, "{e}"),
        other => panic!("stale epoch obeyed: {other:?}"),
    }
    // A fresh connection with the stale epoch is refused at the handshake.
    let again = remote(&addr, 1);
    match again.call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("epoch"), "{message}")
        }
        other => panic!("stale handshake accepted: {other:?}"),
    }
    // Other coordinator ids are not affected.
    let other = Arc::new(RemoteAgent::new(
        "a".into(),
        addr.clone(),
        "c2".into(),
        1,
        RemoteConfig::default(),
    ));
    assert!(matches!(
        other.call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));
    assert!(matches!(
        new.call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_clear_errors_and_leave_nothing_behind() {
    let h = Harness::start_with(2, AgentMode::Remote, |c| {
        c.max_open_txns = 3;
        c.max_statements_per_txn = 4;
    })
    .await
    .unwrap();
    // Open interactive transactions.
    for i in 0..3 {
        let (status, _) = h
            .post("/v1/transactions", &json!({"txn_id": format!("open{i}")}))
            .await
            .unwrap();
        assert_eq!(status, 201);
    }
    let (status, r) = h.post("/v1/transactions", &json!({})).await.unwrap();
    assert_eq!(status, 429, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("limit"),
        "{r}"
    );
    for i in 0..3 {
        let (status, _) = h
            .post(&format!("/v1/transactions/open{i}/rollback"), &json!({}))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    // Statements per transaction.
    let stmts: Vec<_> = (0..5).map(|_| json!({"sql": "SELECT 1"})).collect();
    let (status, r) = h
        .post(
            "/v1/transactions",
            &json!({"branches": [{"participant": "a", "statements": stmts}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 429, "{r}");
    // A transaction lifetime beyond the maximum.
    let (status, _) = h
        .post("/v1/transactions", &json!({"timeout_ms": 100_000_000}))
        .await
        .unwrap();
    assert_eq!(status, 400);
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations());
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_the_bearer_token() {
    let dir = std::env::temp_dir().join(format!("twopc-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "s3cret-token-0123456789\n").unwrap();
    let h = Harness::start_with(2, AgentMode::InProcess, |c| {
        c.api_token_file = Some(file.clone())
    })
    .await
    .unwrap();
    let url = format!("{}/v1/transactions", h.base_url);
    let body = json!({"branches": [{"participant": "a", "statements": [{"sql": "SELECT 1"}]}]});
    // Missing or wrong token: 401, and nothing runs.
    let r = h.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = h
        .http
        .post(&url)
        .bearer_auth("s3cret-token-0123456788")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    for path in ["/v1/transactions/x", "/metrics"] {
        let r = h
            .http
            .get(format!("{}{path}", h.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }
    // The admin API is not the clients': without an admin token it is closed, even to
    // the client token.
    let r = h
        .http
        .get(format!("{}/v1/admin/txns", h.base_url))
        .bearer_auth("s3cret-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Liveness stays open.
    let r = h
        .http
        .get(format!("{}/healthz", h.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The right token works.
    let r = h
        .http
        .post(&url)
        .bearer_auth("s3cret-token-0123456789")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    h.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_coordinator_and_agents() {
    use twopc_participant::server::ServerConfig;
    use twopc_participant::tls;
    twopc_testkit::init_tracing();
    let dir = std::env::temp_dir().join(format!(
        "twopc-tls-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let good = dir.join("good");
    let rogue = dir.join("rogue");
    twopc_coordinator::certs::generate(&good, &[]).unwrap();
    twopc_coordinator::certs::generate(&rogue, &[]).unwrap();

    let (_, clusters) = start_clusters("tls", 2).await.unwrap();
    let server_tls = tls::server_config(
        &good.join("agent.pem"),
        &good.join("agent-key.pem"),
        &good.join("ca.pem"),
    )
    .unwrap();
    let mut addrs = Vec::new();
    for (name, c) in ["a", "b"].iter().zip(&clusters) {
        let (addr, _stop) = twopc_testkit::spawn_agent_with(
            name,
            &c.url("postgres"),
            ServerConfig {
                tls: Some(server_tls.clone()),
                ..ServerConfig::default()
            },
        )
        .await
        .unwrap();
        twopc_testkit::setup_bank(&c.url("postgres"), 10, 100)
            .await
            .unwrap();
        addrs.push(addr);
    }
    let t = Duration::from_secs(5);
    let with = |tls: Option<Arc<rustls::ClientConfig>>| {
        Arc::new(RemoteAgent::new(
            "a".into(),
            addrs[0].clone(),
            "c1".into(),
            1,
            RemoteConfig {
                tls,
                ..RemoteConfig::default()
            },
        ))
    };
    // Plaintext is refused.
    assert!(
        with(None).call(Request::Ping, t).await.is_err(),
        "plaintext accepted"
    );
    // A client certificate from another CA is refused.
    let rogue_client = tls::client_config(
        &rogue.join("coordinator.pem"),
        &rogue.join("coordinator-key.pem"),
        &good.join("ca.pem"),
    )
    .unwrap();
    assert!(
        with(Some(rogue_client))
            .call(Request::Ping, t)
            .await
            .is_err(),
        "foreign client certificate accepted"
    );
    // An agent certificate from another CA is refused by the coordinator.
    let distrustful = tls::client_config(
        &good.join("coordinator.pem"),
        &good.join("coordinator-key.pem"),
        &rogue.join("ca.pem"),
    )
    .unwrap();
    assert!(
        with(Some(distrustful))
            .call(Request::Ping, t)
            .await
            .is_err(),
        "foreign agent certificate trusted"
    );
    // The right pair works, end to end through a coordinator.
    let mut config = twopc_coordinator::config::ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.join("coord"),
        agent_tls_cert: Some(good.join("coordinator.pem")),
        agent_tls_key: Some(good.join("coordinator-key.pem")),
        agent_ca: Some(good.join("ca.pem")),
        ..Default::default()
    };
    config.participants.insert("a".into(), addrs[0].clone());
    config.participants.insert("b".into(), addrs[1].clone());
    let running = twopc_coordinator::server::start(config).await.unwrap();
    let body = twopc_testkit::workload::transfer_body("tls-1", ("a", 1), ("b", 2), 5);
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/transactions", running.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    running.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_limits_prepared_branches_and_lock_waits() {
    use twopc_participant::{Agent, AgentConfig};
    use twopc_shared::gid::Gid;
    use twopc_shared::msg::{ExecuteBranch, Finish, Statement};
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("lim", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    twopc_testkit::setup_bank(&url, 10, 100).await.unwrap();
    let mut config = AgentConfig::new("a", &url);
    config.max_prepared_branches = 2;
    config.lock_timeout_ms = 300;
    let agent = Agent::connect(config).await.unwrap();
    let t = Duration::from_secs(10);
    let exec = |seq: u64, row: i32, finish: Finish| {
        Request::Execute(ExecuteBranch {
            gid: Gid::new("c1", 1, seq).unwrap(),
            isolation: Default::default(),
            statements: vec![Statement {
                sql: "UPDATE acct SET bal = bal - 1 WHERE id = $1".into(),
                params: vec![json!(row)],
            }],
            finish,
            read_only_vote: true,
            continues: false,
            decision: None,
            expires_in_ms: None,
        })
    };
    for seq in 1..=2 {
        assert!(matches!(
            agent
                .handle(exec(seq, seq as i32, Finish::Prepare), t)
                .await,
            Response::Executed { .. }
        ));
    }
    match agent.handle(exec(3, 3, Finish::Prepare), t).await {
        Response::Failed(e) => assert_eq!(e.kind, ErrorKind::Limit, "{e}"),
        other => panic!("third prepared branch accepted: {other:?}"),
    }
    // Finishing one frees a slot.
    let gid1 = Gid::new("c1", 1, 1).unwrap();
    assert!(matches!(
        agent.handle(Request::CommitPrepared { gid: gid1 }, t).await,
        Response::CommitPrepared(_)
    ));
    // Row 2 is locked by prepared branch 2: the wait is cut off by lock_timeout, the
    // branch votes no (55P03) instead of hanging, and leaves nothing behind.
    let started = std::time::Instant::now();
    match agent.handle(exec(4, 2, Finish::Prepare), t).await {
        Response::Failed(e) => assert_eq!(e.sqlstate.as_deref(), Some("55P03"), "{e}"),
        other => panic!("lock wait not cut off: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let gid2 = Gid::new("c1", 1, 2).unwrap();
    assert!(matches!(
        agent.handle(Request::Abort { gid: gid2 }, t).await,
        Response::Aborted
    ));
    match agent
        .handle(
            Request::ListPrepared {
                gid_prefix: "twopc_c1_".into(),
            },
            t,
        )
        .await
    {
        Response::Prepared { branches } => assert!(branches.is_empty(), "{branches:?}"),
        other => panic!("{other:?}"),
    }
}

async fn sql(url: &str, text: &str) {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(text)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_as_a_plain_role_and_recovery_touches_only_ours() {
    twopc_testkit::init_tracing();
    let (names, clusters) = start_clusters("priv", 2).await.unwrap();
    let mut config = twopc_coordinator::config::ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: std::env::temp_dir().join(format!(
            "twopc-priv-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )),
        recovery_interval_ms: 200,
        ..Default::default()
    };
    for (name, c) in names.iter().zip(&clusters) {
        let admin = c.url("postgres");
        twopc_testkit::setup_bank(&admin, 10, 100).await.unwrap();
        // Least privilege: no superuser, no CREATE; just the tables it works on.
        sql(
            &admin,
            "CREATE ROLE twopc_agent LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; \
             GRANT SELECT, UPDATE ON acct TO twopc_agent; \
             GRANT SELECT, INSERT ON ledger TO twopc_agent",
        )
        .await;
        sql(&admin, "CREATE DATABASE other").await;
        let url = format!("postgresql://twopc_agent@127.0.0.1:{}/postgres", c.port());
        config.participants.insert(name.clone(), url);
    }
    let a_admin = clusters[0].url("postgres");
    let a_agent = format!(
        "postgresql://twopc_agent@127.0.0.1:{}/postgres",
        clusters[0].port()
    );
    let a_other = format!(
        "postgresql://twopc_agent@127.0.0.1:{}/other",
        clusters[0].port()
    );
    // Prepared transactions with our prefix that are not ours to touch: another role's,
    // and our role's in another database.
    sql(
        &a_admin,
        "BEGIN; UPDATE acct SET bal = bal WHERE id = 7; PREPARE TRANSACTION 'twopc_c1_0_77'",
    )
    .await;
    sql(
        &a_other,
        "BEGIN; SELECT txid_current(); PREPARE TRANSACTION 'twopc_c1_0_78'",
    )
    .await;
    // An orphan of ours (an earlier epoch, no decision): recovery rolls it back.
    sql(
        &a_agent,
        "BEGIN; UPDATE acct SET bal = bal WHERE id = 8; PREPARE TRANSACTION 'twopc_c1_0_79'",
    )
    .await;

    let running = twopc_coordinator::server::start(config.clone())
        .await
        .unwrap();
    let body = twopc_testkit::workload::transfer_body("priv-1", ("a", 1), ("b", 2), 5);
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/transactions", running.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (c, conn) = tokio_postgres::connect(&a_admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let left: Vec<String> = c
        .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        vec!["twopc_c1_0_77", "twopc_c1_0_78"],
        "recovery touched only its own"
    );
    running.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&config.data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_api_over_tls() {
    let dir = std::env::temp_dir().join(format!(
        "twopc-apitls-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    twopc_coordinator::certs::generate(&dir, &[]).unwrap();
    let (cert, key) = (dir.join("agent.pem"), dir.join("agent-key.pem"));
    let h = Harness::start_with(2, AgentMode::InProcess, |c| {
        c.api_tls_cert = Some(cert.clone());
        c.api_tls_key = Some(key.clone());
    })
    .await
    .unwrap();
    let addr = h.coordinator.as_ref().unwrap().addr;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let body = twopc_testkit::workload::transfer_body("tls-api", ("a", 1), ("b", 2), 5);
    let r = https
        .post(format!("https://localhost:{}/v1/transactions", addr.port()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Plain HTTP gets no answer.
    let plain = h
        .http
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plaintext served"
    );
    // A client that does not trust the CA refuses the server.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .is_err());
    h.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_for_a_frame_fails_alone() {
    use twopc_participant::server::ServerConfig;
    twopc_testkit::init_tracing();
    let (names, clusters) = start_clusters("frame", 2).await.unwrap();
    let mut config = twopc_coordinator::config::ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: std::env::temp_dir().join(format!(
            "twopc-frame-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )),
        ..Default::default()
    };
    for (name, c) in names.iter().zip(&clusters) {
        twopc_testkit::setup_bank(&c.url("postgres"), 10, 100)
            .await
            .unwrap();
        let (addr, _stop) = twopc_testkit::spawn_agent_with(
            name,
            &c.url("postgres"),
            ServerConfig {
                max_frame_bytes: 64 * 1024,
                ..ServerConfig::default()
            },
        )
        .await
        .unwrap();
        config.participants.insert(name.clone(), addr);
    }
    let running = twopc_coordinator::server::start(config.clone())
        .await
        .unwrap();
    let url = format!("http://{}/v1/transactions", running.addr);
    let http = reqwest::Client::new();
    let big = json!({"txn_id": "big", "branches": [
        {"participant": "a", "statements": [{"sql": "SELECT repeat('x', 100000) AS x"}]},
        {"participant": "b", "statements": [{"sql": "UPDATE acct SET bal = bal + 1 WHERE id = 1"}]}]});
    let r = http.post(&url).json(&big).send().await.unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["participant"], "a");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("frame"),
        "{v}"
    );
    // The shared connection survived: the next transaction goes through.
    let ok = twopc_testkit::workload::transfer_body("after-big", ("a", 1), ("b", 2), 5);
    let r = http.post(&url).json(&ok).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    running.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&config.data_dir);
}

/// The client token used to resolve transactions by hand (`/v1/admin`): an application
/// could commit or abort any in-doubt transaction. The admin API has its own token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_admin_token_not_the_client_token() {
    let dir = std::env::temp_dir().join(format!("twopc-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (client_file, admin_file) = (dir.join("client"), dir.join("admin"));
    std::fs::write(&client_file, "client-token-0123456789\n").unwrap();
    std::fs::write(&admin_file, "admin-token-0123456789\n").unwrap();
    let h = Harness::start_with(1, AgentMode::InProcess, |c| {
        c.api_token_file = Some(client_file.clone());
        c.admin_token_file = Some(admin_file.clone());
    })
    .await
    .unwrap();
    let resolve = format!("{}/v1/admin/txns/twopc_c1_0_9/resolve", h.base_url);
    let body = json!({"action": "abort"});
    for token in ["client-token-0123456789", "wrong-token-0123456789"] {
        let r = h
            .http
            .post(&resolve)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{token}");
    }
    // The admin token opens the admin API...
    let r = h
        .http
        .get(format!("{}/v1/admin/txns", h.base_url))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // ...and nothing else.
    let r = h
        .http
        .post(format!("{}/v1/transactions", h.base_url))
        .bearer_auth("admin-token-0123456789")
        .json(&json!({"branches": [{"participant": "a", "statements": [{"sql": "SELECT 1"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    h.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
