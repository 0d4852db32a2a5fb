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
    // Both participants answered a call (the recovery pass reaches them one by one).
    let (status, v) = health_until(&h, |s, v| {
        s == 200
            && participant(v, "a")["reachable"] == true
            && participant(v, "b")["reachable"] == true
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

/// `GET /v1/transactions` without a filter (issue 16) lists the latest transactions as
/// `GET` answers each, running ones first; before, it was a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_without_a_filter_shows_the_latest_transactions() {
    let h = Harness::start(2, AgentMode::InProcess).await.unwrap();
    let (status, v) = h
        .post("/v1/transactions", &json!({ "txn_id": "running-1" }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    for (id, delta) in [("older-1", 1), ("newer-1", 2)] {
        let (status, v) = h
            .post(
                "/v1/transactions",
                &twopc_testkit::transfer(id, &[("a", 5, -delta), ("b", 5, delta)]),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = h.get("/v1/transactions").await.unwrap();
    assert_eq!(status, 200, "{v}");
    let list = v["transactions"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().filter_map(|t| t["txn_id"].as_str()).collect();
    assert_eq!(&ids[..3], ["running-1", "newer-1", "older-1"], "{v}");
    assert_eq!(list[0]["state"], "active", "{v}");
    assert_eq!(list[1]["outcome"], "committed", "{v}");
    let (status, v) = h.get("/v1/transactions?limit=1").await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["transactions"].as_array().unwrap().len(), 1, "{v}");
    for bad in ["?limit=0", "?limit=x", "?state=nonsense"] {
        let (status, v) = h.get(&format!("/v1/transactions{bad}")).await.unwrap();
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"]["message"].is_string(), "{bad}: {v}");
    }
    h.shutdown().await.unwrap();
}

/// The metric names `text` uses (`twopc_` and what follows of `[a-z0-9_]`).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("twopc_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The Prometheus alert rules and the Grafana dashboard in `docs/` (issue 16) use only
/// metrics the coordinator exports, and the dashboard is valid JSON with panels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_alerts_and_dashboard_use_exported_metrics() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let text = h
        .http
        .get(format!("{}/metrics", h.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_owned)
        .collect();
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    for file in [
        "prometheus/twopc-alerts.yml",
        "grafana/twopc-dashboard.json",
    ] {
        let body = std::fs::read_to_string(docs.join(file)).unwrap();
        let used = metric_names(&body);
        assert!(used.len() >= 5, "{file} uses {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the coordinator does not export: {unknown:?}"
        );
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(docs.join("grafana/twopc-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(docs.join("prometheus/twopc-alerts.yml")).unwrap();
    for alert in [
        "TwopcInDoubtTooLong",
        "TwopcRecoveryFailing",
        "TwopcParticipantUnreachable",
        "TwopcOpenTransactionLimitNear",
    ] {
        assert!(
            alerts.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
    h.shutdown().await.unwrap();
}
