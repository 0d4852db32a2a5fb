//! What operators and their tools see: readiness, per-participant health, metrics.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::{AgentMode, Harness};

/// The `/healthz` entry of participant `name`.
fn participant<'a>(health: &'a Value, name: &str) -> &'a Value {
    health["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no participant {name} in {health}"))
}

/// Polls `/healthz` until `done` holds of it (at most 10 s).
async fn health_until(h: &Harness, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for _ in 0..100 {
        last = h.get("/healthz").await.unwrap();
        if done(last.0, &last.1) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/healthz never got there: {} {}", last.0, last.1);
}

/// Readiness (issue 16): with the open-transaction limit reached the coordinator cannot
/// take a transaction, so `/healthz` answers 503 and says why; once one ends, 200.
/// Before, it answered 200 `ok` whatever its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_while_the_coordinator_cannot_take_transactions() {
    let h = Harness::start_with(2, AgentMode::InProcess, |c| c.max_open_txns = 2)
        .await
        .unwrap();
    let (status, v) = health_until(&h, |s, v| {
        s == 200 && participant(v, "a")["reachable"] == true
    })
    .await;
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(participant(&v, "b")["reachable"], true, "{v}");
    assert_eq!(status, 200);
    assert_eq!(h.metric("twopc_ready").await.unwrap(), 1);
    for id in ["open-1", "open-2"] {
        let (status, v) = h
            .post("/v1/transactions", &json!({ "txn_id": id }))
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = h.get("/healthz").await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["status"], "unavailable", "{v}");
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("open-transaction limit"), "{v}");
    assert_eq!(h.metric("twopc_ready").await.unwrap(), 0);
    let (status, v) = h
        .post("/v1/transactions/open-1/rollback", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let (status, v) = h.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reasons"], json!([]), "{v}");
    h.shutdown().await.unwrap();
}

/// Per-participant health (issue 16): an agent that stops answering is named
/// unreachable in `/healthz` (with since when) and in `/metrics`, with its call errors
/// counted; the other stays reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_participant_is_named_in_healthz_and_metrics() {
    let mut h = Harness::start_with(2, AgentMode::Remote, |c| c.recovery_interval_ms = 200)
        .await
        .unwrap();
    health_until(&h, |_, v| participant(v, "a")["reachable"] == true).await;
    assert_eq!(
        h.metric("twopc_participant_reachable{participant=\"a\"}")
            .await
            .unwrap(),
        1
    );
    let before = h
        .metric("twopc_participant_calls_total{participant=\"a\"}")
        .await
        .unwrap();
    assert!(before >= 1, "the recovery pass calls every participant");
    h.dbs[0].stop_agent();
    let (status, v) = health_until(&h, |_, v| participant(v, "a")["reachable"] == false).await;
    assert_eq!(
        status, 200,
        "one participant down does not stop the others: {v}"
    );
    assert_eq!(participant(&v, "b")["reachable"], true, "{v}");
    let since = participant(&v, "a")["since_unix_ms"].as_u64().unwrap();
    assert!(since > 1_600_000_000_000, "{v}");
    assert_eq!(
        h.metric("twopc_participant_reachable{participant=\"a\"}")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        h.metric("twopc_participant_reachable{participant=\"b\"}")
            .await
            .unwrap(),
        1
    );
    let mut errors = 0;
    for kind in ["unreachable", "timeout", "connection_lost", "handshake"] {
        let sample =
            format!("twopc_participant_call_errors_total{{participant=\"a\",kind=\"{kind}\"}}");
        errors += h.metric(&sample).await.unwrap();
    }
    assert!(errors >= 1, "the failed calls are counted");
    assert!(h.metric("twopc_recovery_failures_total").await.unwrap() >= 1);
    h.shutdown().await.unwrap();
}
