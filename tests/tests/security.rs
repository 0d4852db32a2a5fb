//! Only the coordinator commands the agents: authentication (shared key, TLS names),
//! identity-bound authority, fencing (bounded, durable), limits, least privilege.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use twopc_coordinator::participant::{CallError, RemoteAgent, RemoteConfig};
use twopc_shared::auth::AuthKey;
use twopc_shared::msg::{ErrorKind, Request, Response};
use twopc_testkit::{agent_key, agent_key_file, spawn_agent, start_clusters, AgentMode, Harness};

/// A coordinator's connection to the agent at `addr`, as `id` at `epoch`, holding `key`.
fn remote_as(addr: &str, id: &str, epoch: u64, key: Option<Arc<AuthKey>>) -> Arc<RemoteAgent> {
    Arc::new(RemoteAgent::new(
        "a".into(),
        addr.into(),
        id.into(),
        epoch,
        RemoteConfig {
            auth_key: key,
            ..RemoteConfig::default()
        },
    ))
}

/// Coordinator c1 at `epoch` with the test kit's key (the one its agents require).
fn remote(addr: &str, epoch: u64) -> Arc<RemoteAgent> {
    remote_as(addr, "c1", epoch, Some(agent_key()))
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
    let other = remote_as(&addr, "c2", 1, Some(agent_key()));
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
    // The application's client with the token; without it, refused (401).
    let txn = twopc_client::Transaction::new().statement("a", "SELECT 1", vec![]);
    let with = twopc_client::Client::builder(&h.base_url)
        .token("s3cret-token-0123456789")
        .build()
        .unwrap();
    with.run(&txn).await.unwrap();
    let without = twopc_client::Client::builder(&h.base_url).build().unwrap();
    let r = without.run(&twopc_client::Transaction::new()).await;
    assert!(
        matches!(r, Err(twopc_client::Error::Refused { status: 401, .. })),
        "{r:?}"
    );
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
    twopc_coordinator::certs::generate(&good, &good.join("ca"), &[], &[], 30).unwrap();
    twopc_coordinator::certs::generate(&rogue, &rogue.join("ca"), &[], &[], 30).unwrap();

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
    // Plaintext is refused: the agent answers the plain hello with a TLS alert record
    // (0x15 0x03 0x03 ...), which the plain coordinator reads as the length of a frame.
    match with(None).call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => assert!(
            message.contains(&0x1503_0300u32.to_string()),
            "not refused by a TLS alert: {message}"
        ),
        other => panic!("plaintext was not refused at the handshake: {other:?}"),
    }
    // A client certificate from another CA is refused.
    let rogue_client = tls::client_config(
        &rogue.join("coordinator.pem"),
        &rogue.join("coordinator-key.pem"),
        &good.join("ca.pem"),
    )
    .unwrap();
    // The agent's alert names a certificate problem: both CAs have the same name, so the
    // chain is checked against the good CA's key and its signature does not verify
    // (DecryptError); an unknown issuer would be UnknownCA.
    match with(Some(rogue_client)).call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => assert!(
            message.contains("received fatal alert")
                && [
                    "DecryptError",
                    "BadCertificate",
                    "UnknownCA",
                    "CertificateUnknown"
                ]
                .iter()
                .any(|reason| message.contains(reason)),
            "refused, but not for its certificate: {message}"
        ),
        other => panic!("foreign client certificate not refused by the TLS handshake: {other:?}"),
    }
    // An agent certificate from another CA is refused by the coordinator.
    let distrustful = tls::client_config(
        &good.join("coordinator.pem"),
        &good.join("coordinator-key.pem"),
        &rogue.join("ca.pem"),
    )
    .unwrap();
    match with(Some(distrustful)).call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => assert!(
            message.contains("invalid peer certificate")
                && ["BadSignature", "UnknownIssuer"]
                    .iter()
                    .any(|reason| message.contains(reason)),
            "refused, but not for the agent's certificate: {message}"
        ),
        other => panic!("foreign agent certificate not refused by the TLS handshake: {other:?}"),
    }
    // A good certificate acts only for the coordinator ids it names (c1 here).
    let good_client = tls::client_config(
        &good.join("coordinator.pem"),
        &good.join("coordinator-key.pem"),
        &good.join("ca.pem"),
    )
    .unwrap();
    let as_c2 = Arc::new(RemoteAgent::new(
        "a".into(),
        addrs[0].clone(),
        "c2".into(),
        1,
        RemoteConfig {
            tls: Some(good_client),
            ..RemoteConfig::default()
        },
    ));
    match as_c2.call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => {
            assert!(
                message.contains("does not name coordinator c2"),
                "{message}"
            )
        }
        other => panic!("a certificate for c1 acted as c2: {other:?}"),
    }
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
        "BEGIN; UPDATE acct SET bal = bal + 77 WHERE id = 7; PREPARE TRANSACTION 'twopc_c1_0_77'",
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
        "BEGIN; UPDATE acct SET bal = bal - 79 WHERE id = 8; PREPARE TRANSACTION 'twopc_c1_0_79'",
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

    let (c, conn) = tokio_postgres::connect(&a_admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let prepared = || async {
        c.query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let theirs = vec!["twopc_c1_0_77".to_owned(), "twopc_c1_0_78".to_owned()];
    // Recovery (every 200 ms) rolls the orphan back; the transfer's own branch is gone
    // once phase 2 is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut left = prepared().await;
    while left != theirs {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for recovery to leave only the foreign prepared transactions: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = prepared().await;
    }
    // The orphan was rolled back, not committed: its -79 did not land.
    assert_eq!(
        query_i64(&a_admin, "SELECT bal FROM acct WHERE id = 8").await,
        100,
        "the orphan's write landed"
    );
    // Let recovery run several more passes (the scenario: it keeps its hands off).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(prepared().await, theirs, "recovery touched only its own");
    // The other role's branch is intact: committing it lands its +77.
    sql(&a_admin, "COMMIT PREPARED 'twopc_c1_0_77'").await;
    assert_eq!(
        query_i64(&a_admin, "SELECT bal FROM acct WHERE id = 7").await,
        177
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
    twopc_coordinator::certs::generate(&dir, &dir.join("ca"), &[], &[], 30).unwrap();
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
    // The application's client, trusting the CA.
    let client = twopc_client::Client::builder(format!("https://localhost:{}", addr.port()))
        .ca_pem(std::fs::read(dir.join("ca.pem")).unwrap())
        .build()
        .unwrap();
    let txn = twopc_client::Transaction::with_id("tls-client").statement("a", "SELECT 1", vec![]);
    let c = client.run(&txn).await.unwrap();
    assert_eq!(c.txn_id, "tls-client");
    // Without the CA it cannot connect, and says so (nothing ran).
    let untrusting = twopc_client::Client::builder(format!("https://localhost:{}", addr.port()))
        .retry(twopc_client::RetryPolicy {
            attempts_max: 1,
            ..twopc_client::RetryPolicy::default()
        })
        .build()
        .unwrap();
    let r = untrusting
        .run(&twopc_client::Transaction::new().statement("a", "SELECT 1", vec![]))
        .await;
    assert!(matches!(r, Err(twopc_client::Error::Transport(_))), "{r:?}");
    // Plain HTTP gets no answer.
    let plain = h
        .http
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    // It connects, and what comes back is not HTTP (a TLS alert): not a timeout, not a
    // refused connection.
    match plain {
        Err(e) => assert!(
            !e.is_timeout() && !e.is_connect() && format!("{e:?}").contains("Parse(Version)"),
            "plain HTTP failed for another reason: {e:?}"
        ),
        Ok(r) => panic!("plaintext served: {}", r.status()),
    }
    // A client that does not trust the CA refuses the server.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let e = untrusting
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .expect_err("a client that does not trust the CA accepted the server");
    assert!(
        format!("{e:?}").contains("InvalidCertificate(UnknownIssuer)"),
        "refused, but not for the server's certificate: {e:?}"
    );
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
        agent_auth_key_file: Some(agent_key_file()),
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

/// A raw TCP client speaking the agent's frames (`[u32 BE length][JSON]`), as an attacker
/// on the network would.
struct Raw(tokio::net::TcpStream);

impl Raw {
    async fn connect(addr: &str) -> Raw {
        Raw(tokio::net::TcpStream::connect(addr).await.unwrap())
    }

    async fn send(&mut self, id: u64, body: serde_json::Value) {
        use tokio::io::AsyncWriteExt;
        let json =
            serde_json::to_vec(&json!({"id": id, "timeout_ms": 5000, "body": body})).unwrap();
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&json);
        // The agent may already have closed: what matters is what it answers and does.
        let _ = self.0.write_all(&frame).await;
    }

    /// The next frame's body, or `None` once the agent closed the connection.
    async fn recv(&mut self) -> Option<serde_json::Value> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut len = [0u8; 4];
            self.0.read_exact(&mut len).await.ok()?;
            let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
            self.0.read_exact(&mut buf).await.ok()?;
            let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
            Some(v["body"].clone())
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the agent neither answered nor closed")
    }
}

fn hello(id: &str, epoch: u64, nonce: Option<&str>) -> serde_json::Value {
    let mut h = json!({"type": "hello", "protocol_version": twopc_shared::PROTOCOL_VERSION,
        "coordinator_id": id, "epoch": epoch});
    if let Some(n) = nonce {
        h["nonce"] = json!(n);
    }
    h
}

fn execute(gid: &str, sql: &str) -> serde_json::Value {
    json!({"type": "execute", "gid": gid, "statements": [{"sql": sql}], "finish": "commit"})
}

async fn query_i64(url: &str, text: &str) -> i64 {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query_one(text, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_is_refused_before_any_sql_runs() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("noauth", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    let (addr, _stop) = spawn_agent("a", &url).await.unwrap();
    let nonce = "ab".repeat(32);
    // 1. A Hello without the key's nonce, then SQL at once.
    let mut raw = Raw::connect(&addr).await;
    raw.send(1, hello("c1", 1, None)).await;
    raw.send(2, execute("twopc_c1_1_1", "CREATE TABLE pwned1 (x int)"))
        .await;
    let first = raw.recv().await.expect("an answer to the Hello");
    assert_eq!(first["type"], "failed", "{first}");
    assert_eq!(first["kind"], "unauthenticated", "{first}");
    assert_eq!(raw.recv().await, None, "the agent keeps talking: {first}");
    // 2. A Hello with a nonce, then SQL instead of the proof.
    let mut raw = Raw::connect(&addr).await;
    raw.send(1, hello("c1", 1, Some(&nonce))).await;
    raw.send(2, execute("twopc_c1_1_2", "CREATE TABLE pwned2 (x int)"))
        .await;
    let challenge = raw.recv().await.expect("a challenge");
    assert_eq!(challenge["type"], "challenge", "{challenge}");
    let refusal = raw.recv().await.expect("a refusal");
    assert_eq!(refusal["kind"], "unauthenticated", "{refusal}");
    assert_eq!(raw.recv().await, None);
    // 3. A made-up proof.
    let mut raw = Raw::connect(&addr).await;
    raw.send(1, hello("c1", 1, Some(&nonce))).await;
    assert_eq!(raw.recv().await.unwrap()["type"], "challenge");
    raw.send(2, json!({"type": "authenticate", "proof": "00".repeat(32)}))
        .await;
    raw.send(3, execute("twopc_c1_1_3", "CREATE TABLE pwned3 (x int)"))
        .await;
    assert_eq!(raw.recv().await.unwrap()["kind"], "unauthenticated");
    assert_eq!(raw.recv().await, None);
    // Nothing ran: no table, and not even the epoch was recorded.
    assert_eq!(
        query_i64(
            &url,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'pwned%'"
        )
        .await,
        0
    );
    assert_eq!(
        query_i64(&url, "SELECT count(*) FROM twopc.epochs").await,
        0
    );
    // The real coordinator's key works.
    assert!(matches!(
        remote(&addr, 1)
            .call(Request::Ping, Duration::from_secs(5))
            .await,
        Ok(Response::Pong)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_wrong_key_is_refused() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("wrongkey", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    let (addr, _stop) = spawn_agent("a", &url).await.unwrap();
    let t = Duration::from_secs(5);
    let wrong = Arc::new(AuthKey::from_bytes(vec![7; 32]).unwrap());
    let gid = twopc_shared::gid::Gid::new("c1", 1, 1).unwrap();
    let exec = Request::Execute(twopc_shared::msg::ExecuteBranch {
        gid,
        isolation: Default::default(),
        statements: vec![twopc_shared::msg::Statement {
            sql: "CREATE TABLE pwned (x int)".into(),
            params: vec![],
        }],
        finish: twopc_shared::msg::Finish::Commit,
        read_only_vote: false,
        continues: false,
        decision: None,
        expires_in_ms: None,
    });
    match remote_as(&addr, "c1", 1, Some(wrong))
        .call(exec.clone(), t)
        .await
    {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("wrong key"), "{message}")
        }
        other => panic!("a wrong key was accepted: {other:?}"),
    }
    // No key at all: the coordinator is told what to configure.
    match remote_as(&addr, "c1", 1, None).call(exec, t).await {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("shared key"), "{message}")
        }
        other => panic!("no key was accepted: {other:?}"),
    }
    assert_eq!(
        query_i64(
            &url,
            "SELECT count(*) FROM pg_class WHERE relname = 'pwned'"
        )
        .await,
        0
    );
    // And a coordinator holding the key refuses an agent that does not prove it has it.
    let (impostor, _stop2) = twopc_testkit::spawn_agent_with(
        "a",
        &url,
        twopc_participant::server::ServerConfig {
            auth: twopc_participant::auth::Authentication {
                insecure: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    match remote(&impostor, 1).call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("did not prove"), "{message}")
        }
        other => panic!("an agent without the key was trusted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_acts_only_for_the_id_it_authenticated_as() {
    use twopc_shared::gid::Gid;
    use twopc_shared::msg::{ExecuteBranch, Finish, Statement};
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("ident", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    twopc_testkit::setup_bank(&url, 10, 100).await.unwrap();
    let (addr, _stop) = spawn_agent("a", &url).await.unwrap();
    // Coordinator Y's prepared branch: a debit waiting for Y's decision.
    sql(
        &url,
        "BEGIN; UPDATE acct SET bal = bal - 5 WHERE id = 1; PREPARE TRANSACTION 'twopc_Y_1_5'",
    )
    .await;
    let t = Duration::from_secs(5);
    let x = remote_as(&addr, "X", 1, Some(agent_key()));
    let y_gid = Gid::parse("twopc_Y_1_5").unwrap();
    let exec = |gid: Gid| {
        Request::Execute(ExecuteBranch {
            gid,
            isolation: Default::default(),
            statements: vec![Statement {
                sql: "UPDATE acct SET bal = bal + 100 WHERE id = 2".into(),
                params: vec![],
            }],
            finish: Finish::Commit,
            read_only_vote: false,
            continues: false,
            decision: None,
            expires_in_ms: None,
        })
    };
    for (what, request) in [
        (
            "list Y's branches",
            Request::ListPrepared {
                gid_prefix: "twopc_Y_".into(),
            },
        ),
        (
            "list everyone's branches",
            Request::ListPrepared {
                gid_prefix: "twopc_".into(),
            },
        ),
        (
            "list Y's decisions",
            Request::ListDecisions {
                gid_prefix: "twopc_Y_".into(),
            },
        ),
        (
            "roll back Y's branch",
            Request::Abort { gid: y_gid.clone() },
        ),
        (
            "commit Y's branch",
            Request::CommitPrepared { gid: y_gid.clone() },
        ),
        ("fence Y's branch", Request::Fence { gid: y_gid.clone() }),
        (
            "forget Y's row",
            Request::Forget {
                gids: vec![y_gid.clone()],
            },
        ),
        ("execute as Y", exec(Gid::parse("twopc_Y_1_6").unwrap())),
    ] {
        match x.call(request, t).await {
            Ok(Response::Failed(e)) => assert_eq!(e.kind, ErrorKind::Forbidden, "{what}: {e}"),
            other => panic!("X could {what}: {other:?}"),
        }
    }
    // Its own prefix works, and shows nothing of Y's.
    match x
        .call(
            Request::ListPrepared {
                gid_prefix: "twopc_X_".into(),
            },
            t,
        )
        .await
    {
        Ok(Response::Prepared { branches }) => assert!(branches.is_empty(), "{branches:?}"),
        other => panic!("X's own list: {other:?}"),
    }
    // Y's branch is untouched, and nothing of "execute as Y" ran.
    assert_eq!(
        query_i64(
            &url,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'twopc_Y_1_5'"
        )
        .await,
        1
    );
    assert_eq!(
        query_i64(&url, "SELECT bal FROM acct WHERE id = 2").await,
        100
    );
    // An agent that serves only X refuses a handshake as Y, even with the key.
    let (only_x, _stop2) = twopc_testkit::spawn_agent_with(
        "a",
        &url,
        twopc_participant::server::ServerConfig {
            auth: twopc_participant::auth::Authentication {
                key: Some(agent_key()),
                coordinator_ids: vec!["X".into()],
                insecure: false,
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    match remote_as(&only_x, "Y", 1, Some(agent_key()))
        .call(Request::Ping, t)
        .await
    {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("serves coordinator ids"), "{message}")
        }
        other => panic!("an agent for X served Y: {other:?}"),
    }
    sql(&url, "ROLLBACK PREPARED 'twopc_Y_1_5'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_far_ahead_is_refused_and_the_real_coordinator_keeps_working() {
    let h = Harness::start(2, AgentMode::Remote).await.unwrap();
    let body = twopc_testkit::workload::transfer_body("before", ("a", 1), ("b", 2), 5);
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let addr = h.dbs[0].agent_addr.clone().unwrap();
    let t = Duration::from_secs(5);
    let newest = h.coordinator.as_ref().unwrap().engine.epoch();
    for epoch in [
        u64::MAX,
        newest + twopc_participant::agent::MAX_EPOCH_STEP + 1,
    ] {
        match remote(&addr, epoch).call(Request::Ping, t).await {
            Err(CallError::Handshake { message, .. }) => {
                assert!(
                    message.contains("ahead of the newest"),
                    "{epoch}: {message}"
                )
            }
            other => panic!("epoch {epoch} accepted: {other:?}"),
        }
    }
    let body = twopc_testkit::workload::transfer_body("after", ("a", 1), ("b", 2), 5);
    let (status, v) = h.post("/v1/transactions", &body).await.unwrap();
    assert_eq!(status, 200, "the real coordinator was locked out: {v}");
    let report = h.audit(None).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations());
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_epoch_survives_an_agent_restart() {
    twopc_testkit::init_tracing();
    let (_, clusters) = start_clusters("durfence", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    let server = twopc_participant::server::ServerConfig::default;
    let (addr, agent, stop) = twopc_testkit::serve_agent("a", &url, server())
        .await
        .unwrap();
    assert!(agent.epochs_durable());
    let t = Duration::from_secs(5);
    assert!(matches!(
        remote(&addr, 5).call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));
    // The agent restarts (a new agent on the same database).
    stop.cancel();
    agent.close();
    let (addr, agent, _stop) = twopc_testkit::serve_agent("a", &url, server())
        .await
        .unwrap();
    match remote(&addr, 4).call(Request::Ping, t).await {
        Err(CallError::Handshake { message, .. }) => {
            assert!(message.contains("older than epoch 5"), "{message}")
        }
        other => panic!("a stale epoch was accepted after the agent restarted: {other:?}"),
    }
    assert!(matches!(
        remote(&addr, 5).call(Request::Ping, t).await,
        Ok(Response::Pong)
    ));
    agent.close();
}

/// `twopc-participant` with `args`: its exit status and output once it exits, or `None`
/// if it is still serving after `within` (it is killed then).
fn run_participant(args: &[&str], within: Duration) -> Option<(std::process::ExitStatus, String)> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twopc-participant-fp"))
        .args(args)
        .env_remove("TWOPC_AUTH_KEY_FILE")
        .env_remove("TWOPC_INSECURE")
        .env_remove("TWOPC_TLS_CERT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            return Some((status, text));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent refused to start with an error (`main` returned it: exit status 1, the
/// error on stderr), not by a panic (101), a signal or another failure.
fn assert_refused(status: std::process::ExitStatus, out: &str) {
    assert_eq!(status.code(), Some(1), "{status:?}: {out}");
    assert!(out.contains("Error: "), "no error printed: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_authentication_refuses_to_start() {
    let (_, clusters) = start_clusters("nostart", 1).await.unwrap();
    let url = clusters[0].url("postgres");
    let within = Duration::from_secs(20);
    let (status, out) = run_participant(&["--listen", "127.0.0.1:0", "--database", &url], within)
        .expect("an agent without a key or TLS started serving");
    assert_refused(status, &out);
    assert!(out.contains("no authentication configured"), "{out}");
    let (status, out) = run_participant(
        &["--listen", "0.0.0.0:0", "--database", &url, "--insecure"],
        within,
    )
    .expect("--insecure served a non-loopback address");
    assert_refused(status, &out);
    assert!(out.contains("loopback"), "{out}");
    // A key shorter than 32 bytes is refused with a clear error.
    let short = std::env::temp_dir().join(format!("twopc-short-key-{}", std::process::id()));
    std::fs::write(&short, "ab".repeat(16)).unwrap();
    let (status, out) = run_participant(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &url,
            "--auth-key-file",
            &short.display().to_string(),
        ],
        within,
    )
    .expect("a 16-byte key was accepted");
    assert_refused(status, &out);
    assert!(out.contains("at least 32"), "{out}");
    let _ = std::fs::remove_file(&short);
    // An empty password file, and an idle timeout under the coordinators' keepalive, are
    // refused with their reason.
    let empty = std::env::temp_dir().join(format!("twopc-empty-pw-{}", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let key = agent_key_file().display().to_string();
    for (extra, reason) in [
        (
            vec!["--database-password-file", empty.to_str().unwrap()],
            "is empty",
        ),
        (
            vec!["--idle-connection-timeout-ms", "1000"],
            "at least 60000",
        ),
    ] {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--database",
            &url,
            "--auth-key-file",
            &key,
        ];
        args.extend(extra);
        let (status, out) = run_participant(&args, within).expect("the agent started serving");
        assert_refused(status, &out);
        assert!(out.contains(reason), "{reason}: {out}");
    }
    let _ = std::fs::remove_file(&empty);
    // --insecure on loopback serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twopc-participant-fp"))
        .args(["--listen", &listen, "--database", &url, "--insecure"])
        .env_remove("TWOPC_AUTH_KEY_FILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    let served = loop {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(served, "--insecure on loopback did not serve");
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
