//! What operators read: the coordinator's logs, as JSON lines (`--log-format json`) and
//! as text written to a file.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::procs::{Bins, ProcHarness};
use twopc_testkit::{transfer, BALANCE};

fn bins() -> Bins {
    Bins {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator-fp").into(),
        participant: env!("CARGO_BIN_EXE_twopc-participant-fp").into(),
    }
}

/// The coordinator's log lines as JSON (each must parse).
fn json_lines(h: &ProcHarness) -> Vec<Value> {
    let text = std::fs::read_to_string(h.dir.join("coordinator.log")).unwrap();
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Every abort, whichever request path ends the transaction (a failing one-shot, a
/// failing statement, `/rollback`), is logged inside the transaction's span, so the
/// line carries its `txn_id` and `gid` (a `/rollback` was logged with neither). No
/// message holds a run of spaces or a control character.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abort_is_logged_with_its_txn_id_and_gid() {
    let mut h = ProcHarness::start(bins(), 2).await.unwrap();
    h.coordinator_args = vec!["--log-format".into(), "json".into()];
    h.start_all("", &["", ""]).await.unwrap();
    // A one-shot that overdraws: aborted by a's CHECK.
    let (status, v) = h
        .post(
            "/v1/transactions",
            &transfer("log-oneshot", &[("a", 1, -BALANCE * 10), ("b", 2, 1)]),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    // Interactive, rolled back by the client.
    for id in ["log-rollback", "log-failing"] {
        let (status, v) = h
            .post("/v1/transactions", &json!({ "txn_id": id }))
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = h
        .post("/v1/transactions/log-rollback/rollback", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // Interactive, ended by a failing statement.
    let stmt = json!({ "participant": "b", "sql": "SELECT 1 / 0", "params": [] });
    let (status, v) = h
        .post("/v1/transactions/log-failing/statements", &stmt)
        .await
        .unwrap();
    assert_eq!(status, 409, "{v}");
    h.stop_all();

    let lines = json_lines(&h);
    assert!(!lines.is_empty(), "no JSON log lines");
    for id in ["log-oneshot", "log-rollback", "log-failing"] {
        let aborted: Vec<&Value> = lines
            .iter()
            .filter(|l| l["message"] == "transaction aborted" && l["span"]["txn_id"] == id)
            .collect();
        assert_eq!(
            aborted.len(),
            1,
            "{id}: expected one 'transaction aborted' line in its span; lines: {}",
            lines
                .iter()
                .filter(|l| l["message"] == "transaction aborted")
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        let gid = aborted[0]["span"]["gid"].as_str().unwrap_or("");
        assert!(gid.starts_with("twopc_"), "{id}: gid {gid:?}");
    }
    for l in &lines {
        let m = l["message"].as_str().unwrap_or("");
        assert!(!m.contains("  "), "a run of spaces: {m:?}");
        assert!(
            !m.chars().any(char::is_control),
            "a control character: {m:?}"
        );
    }
}

/// Written to a file (not a terminal), the text format has no ANSI colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_have_no_colour_codes() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.start_all("", &[""]).await.unwrap();
    let (status, v) = h
        .post("/v1/transactions", &json!({ "txn_id": "plain-1" }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    h.post("/v1/transactions/plain-1/rollback", &json!({}))
        .await
        .unwrap();
    h.stop_all();
    for name in ["coordinator.log", "agent-a.log"] {
        let text = std::fs::read_to_string(h.dir.join(name)).unwrap();
        assert!(text.contains("INFO"), "{name} has no log lines:\n{text}");
        assert!(!text.contains('\u{1b}'), "ANSI codes in {name}:\n{text}");
    }
}

/// A graceful stop (SIGTERM) is logged by both binaries, and they exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_is_logged_and_exits_cleanly() {
    let mut h = ProcHarness::start(bins(), 1).await.unwrap();
    h.coordinator_args = vec!["--log-format".into(), "json".into()];
    h.start_all("", &[""]).await.unwrap();
    let mut coordinator = h.coordinator.take().unwrap();
    let status = coordinator.term(Duration::from_secs(20));
    assert!(
        matches!(status, Some(s) if s.success()),
        "coordinator: {status:?}"
    );
    let mut agent = h.agents[0].take().unwrap();
    let status = agent.term(Duration::from_secs(20));
    assert!(
        matches!(status, Some(s) if s.success()),
        "agent: {status:?}"
    );
    let messages: Vec<String> = json_lines(&h)
        .iter()
        .filter_map(|l| l["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        messages.iter().any(|m| m == "coordinator stopped"),
        "{messages:?}"
    );
    let agent_log = std::fs::read_to_string(h.dir.join("agent-a.log")).unwrap();
    for line in ["agent shutting down", "agent stopped"] {
        assert!(agent_log.contains(line), "no {line:?} in:\n{agent_log}");
    }
}
