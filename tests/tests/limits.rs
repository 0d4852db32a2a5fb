//! One bad answer kills one request, not the connection: a value nested so deep that the
//! other side's JSON decoder refuses it used to break the coordinator-agent connection
//! and abort every transaction sharing it.

use serde_json::json;
use twopc_testkit::{AgentMode, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_value_fails_its_request_not_the_shared_connection() {
    let h = Harness::start(1, AgentMode::Remote).await.unwrap();
    // A transaction in flight on the same connection.
    let (status, v) = h
        .post("/v1/transactions", &json!({"txn_id": "bystander"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, v) = h
        .post(
            "/v1/transactions/bystander/statements",
            &json!({"participant": "a", "sql": "UPDATE acct SET bal = bal + 1 WHERE id = 30"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");

    // 127 levels: inside PostgreSQL's and the agent's decoder limits, beyond the
    // coordinator's once framed.
    let deep = json!({"branches": [{"participant": "a", "statements": [
        {"sql": "SELECT (repeat('[', 127) || repeat(']', 127))::jsonb AS v"}]}]});
    let (status, v) = h.post("/v1/transactions", &deep).await.unwrap();
    assert!(status == 400 || status == 409, "{status} {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("deeper than"), "{v}");
    // A parameter as deep is refused before it is sent.
    let mut param = json!(1);
    for _ in 0..100 {
        param = json!([param]);
    }
    let (status, v) = h
        .post(
            "/v1/transactions",
            &json!({"branches": [{"participant": "a", "statements": [
                {"sql": "SELECT $1::jsonb", "params": [param]}]}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{v}");

    // The transaction in flight did not lose its connection.
    let (status, v) = h
        .post("/v1/transactions/bystander/commit", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["outcome"], "committed", "{v}");
    h.shutdown().await.unwrap();
}

/// Slow clients (slowloris) used to keep connections open forever: 1,000 of them stayed
/// open, and under a low descriptor limit real requests timed out. Now a connection must
/// send its headers within the header timeout, and connections beyond the cap are closed
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_cannot_crowd_out_the_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with(1, AgentMode::InProcess, |c| {
        c.http_max_connections = 8;
        c.http_header_timeout_ms = 500;
    })
    .await
    .unwrap();
    let addr = h.base_url.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Give the server a moment to count them (bounded: wait until a 9th is refused).
    let mut refused = false;
    for _ in 0..50 {
        let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed =
            tokio::time::timeout(std::time::Duration::from_millis(100), extra.read(&mut buf)).await;
        if matches!(closed, Ok(Ok(0)) | Ok(Err(_))) {
            refused = true;
            break;
        }
    }
    assert!(refused, "a connection beyond the cap was not closed");
    // Each slow connection is closed by the server within its header timeout.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // A 408 answer before the close is fine.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a slow client's connection stayed open");
    }
    // Real clients get through again.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &json!({"branches": [{"participant": "a", "statements": [{"sql": "SELECT 1"}]}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    h.shutdown().await.unwrap();
}

/// Result rows are counted against a byte budget while they are read (10M rows used to
/// be buffered, 2.8 GB, before the frame-size check refused the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_is_refused_while_it_is_read() {
    use twopc_shared::msg::{ExecuteBranch, Finish, Request, Response, Statement};
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let mut config = twopc_participant::AgentConfig::new("big", h.dbs[0].url.clone());
    config.max_result_bytes = 64 * 1024;
    let agent = twopc_participant::Agent::connect(config).await.unwrap();
    let run = |seq: u64, sql: &str| {
        let exec = ExecuteBranch {
            gid: twopc_shared::gid::Gid::new("big", 1, seq).unwrap(),
            isolation: Default::default(),
            statements: vec![Statement {
                sql: sql.into(),
                params: vec![],
            }],
            finish: Finish::Prepare,
            read_only_vote: true,
            continues: false,
            decision: None,
            expires_in_ms: None,
        };
        let agent = agent.clone();
        async move {
            agent
                .handle(Request::Execute(exec), std::time::Duration::from_secs(30))
                .await
        }
    };
    let started = std::time::Instant::now();
    let r = run(
        1,
        "SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 5000000) g",
    )
    .await;
    match &r {
        Response::Failed(e) => assert!(e.message.contains("exceed"), "{e}"),
        other => panic!("an oversized result was not refused: {other:?}"),
    }
    // Refused early, long before 5M rows were read.
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // What fits still works.
    let r = run(2, "SELECT g FROM generate_series(1, 100) g").await;
    assert!(matches!(r, Response::Executed { .. }), "{r:?}");
    h.shutdown().await.unwrap();
}

/// An agent served with `server` over a fresh cluster; its address.
async fn agent_with(
    tag: &str,
    server: twopc_participant::server::ServerConfig,
) -> (
    String,
    tokio_util::sync::CancellationToken,
    Vec<twopc_testkit::PgCluster>,
) {
    let (_, clusters) = twopc_testkit::start_clusters(tag, 1).await.unwrap();
    let config = twopc_participant::AgentConfig::new("a", clusters[0].url("postgres"));
    let (addr, _agent, stop) = twopc_testkit::serve_agent_config(config, server)
        .await
        .unwrap();
    (addr, stop, clusters)
}

fn coordinator_to(
    addr: &str,
    keepalive_interval_ms: u64,
) -> twopc_coordinator::participant::RemoteAgent {
    use twopc_coordinator::participant::{RemoteAgent, RemoteConfig};
    RemoteAgent::new(
        "a".into(),
        addr.into(),
        "c1".into(),
        1,
        RemoteConfig {
            auth_key: Some(twopc_testkit::agent_key()),
            keepalive_interval_ms,
            ..RemoteConfig::default()
        },
    )
}

/// An authenticated connection that stays silent is closed by the agent; the
/// coordinator's pings keep its idle connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_a_pinged_one_is_kept() {
    use std::time::Duration;
    use twopc_shared::msg::{Request, Response};
    let server = twopc_participant::server::ServerConfig {
        idle_connection_timeout_ms: 500,
        ..Default::default()
    };
    let (addr, _stop, _clusters) = agent_with("idle", server).await;
    let call = Duration::from_secs(5);
    for (keepalive_ms, connections) in [(600_000, 2), (100, 1)] {
        let c = coordinator_to(&addr, keepalive_ms);
        assert!(matches!(
            c.call(Request::Ping, call).await,
            Ok(Response::Pong)
        ));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(matches!(
            c.call(Request::Ping, call).await,
            Ok(Response::Pong)
        ));
        assert_eq!(
            c.connections_opened(),
            connections,
            "keepalive every {keepalive_ms} ms"
        );
    }
}

/// Before it authenticated, a peer cannot make the agent hold a large frame: one
/// announced beyond the handshake's bound closes the connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_cannot_announce_a_large_frame() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, _stop, _clusters) = agent_with("bigf", Default::default()).await;
    let announced = twopc_participant::server::HANDSHAKE_MAX_FRAME_BYTES as u32 + 1;
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&announced.to_be_bytes()).await.unwrap();
    s.write_all(b"{\"id\":1").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the agent kept a connection announcing a {announced}-byte frame: {read:?}"
    );
}

/// Connections over the cap are refused at once; the ones within it keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_and_the_coordinator_keeps_its_own() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use twopc_shared::msg::{Request, Response};
    let server = twopc_participant::server::ServerConfig {
        max_connections: 3,
        ..Default::default()
    };
    let (addr, _stop, _clusters) = agent_with("capc", server).await;
    let c = coordinator_to(&addr, 30_000);
    assert!(matches!(
        c.call(Request::Ping, Duration::from_secs(5)).await,
        Ok(Response::Pong)
    ));
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Two of them fill the cap; the other 18 are closed without a word.
    let mut closed = 0;
    for s in &mut flood {
        let mut buf = [0u8; 8];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 18);
    assert!(matches!(
        c.call(Request::Ping, Duration::from_secs(5)).await,
        Ok(Response::Pong)
    ));
    assert_eq!(c.connections_opened(), 1);
}

/// A pool with no free session refuses at once with a retryable error that says nothing
/// ran, and the session held is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_at_once_and_retryably() {
    use std::time::{Duration, Instant};
    use twopc_shared::gid::Gid;
    use twopc_shared::msg::{ErrorKind, Finish, Request, Response};
    let (_, clusters) = twopc_testkit::start_clusters("pool", 1).await.unwrap();
    let mut config = twopc_participant::AgentConfig::new("a", clusters[0].url("postgres"));
    config.pool_size = 1;
    let agent = twopc_participant::Agent::connect(config).await.unwrap();
    let call = Duration::from_secs(30);
    let hold = twopc_testkit::branch(
        Gid::new("c1", 1, 1).unwrap(),
        &["SELECT 1"],
        Finish::Keep,
        None,
    );
    assert!(matches!(
        agent.handle(Request::Execute(hold), call).await,
        Response::Executed { .. }
    ));
    let started = Instant::now();
    let other = twopc_testkit::branch(
        Gid::new("c1", 1, 2).unwrap(),
        &["SELECT 1"],
        Finish::Commit,
        None,
    );
    match agent.handle(Request::Execute(other), call).await {
        Response::Failed(e) => {
            assert_eq!(e.kind, ErrorKind::Limit, "{e:?}");
            assert!(e.message.contains("nothing ran"), "{}", e.message);
        }
        other => panic!("a second branch on a full pool: {other:?}"),
    }
    // At once: after the pool's wait (500 ms) and well before the call's 30 s deadline
    // (the held session is not released until later), with room for a loaded machine.
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "refused after {waited:?}");
    let more = twopc_testkit::branch(
        Gid::new("c1", 1, 1).unwrap(),
        &["SELECT 2"],
        Finish::Commit,
        None,
    );
    assert!(matches!(
        agent.handle(Request::Execute(more), call).await,
        Response::Executed { .. }
    ));
}
