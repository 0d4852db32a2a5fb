//! Operator tooling: `txns list/show/resolve` over the admin API and the CLI.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use twopc_testkit::{AgentMode, Harness, BALANCE};

async fn prepare_by_hand(h: &Harness, db: usize, gid: &str) {
    // A row of its own, so the prepared branches do not wait on each other's locks; it
    // adds its sequence number to the row's balance, so a commit shows and an abort does
    // not.
    let row: i32 = gid.rsplit('_').next().unwrap().parse().unwrap();
    let (client, conn) = tokio_postgres::connect(&h.dbs[db].url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE acct SET bal = bal + {row} WHERE id = {row}; \
             PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .unwrap();
}

async fn balance(h: &Harness, db: usize, acct: i32) -> i64 {
    h.scalar_i64(db, &format!("SELECT bal FROM acct WHERE id = {acct}"))
        .await
        .unwrap()
}

/// Asks the coordinator to resolve `gid` by hand; the status and the JSON answer.
async fn resolve(h: &Harness, gid: &str, body: &Value) -> (u16, Value) {
    h.post(&format!("/v1/admin/txns/{gid}/resolve"), body)
        .await
        .unwrap()
}

fn prepared_on(view: &Value) -> Vec<String> {
    view["branches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["prepared"].is_object())
        .map(|b| b["participant"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_resolve_by_hand() {
    // Recovery would resolve the orphans itself; give the operator the time to look.
    let mut h = Harness::start_with(2, AgentMode::Remote, |c| c.recovery_interval_ms = 3_600_000)
        .await
        .unwrap();
    // The start-up recovery pass must be over, or it would roll the orphans back.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.get("/healthz").await.unwrap().1["recovery_passes"].as_u64() < Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for the start-up recovery pass"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Orphans of an earlier incarnation (epoch 0), prepared with no decision logged.
    prepare_by_hand(&h, 0, "twopc_c1_0_5").await;
    prepare_by_hand(&h, 1, "twopc_c1_0_5").await;
    prepare_by_hand(&h, 0, "twopc_c1_0_6").await;
    prepare_by_hand(&h, 0, "twopc_c1_0_7").await;
    prepare_by_hand(&h, 1, "twopc_c1_0_7").await;

    let (status, list) = h.get("/v1/admin/txns").await.unwrap();
    assert_eq!(status, 200);
    let txns = list["transactions"].as_array().unwrap();
    assert_eq!(txns.len(), 3, "{list}");
    assert_eq!(txns[0]["gid"], "twopc_c1_0_5");
    assert_eq!(txns[0]["decision"], "none");
    assert_eq!(prepared_on(&txns[0]), vec!["a", "b"]);
    // The in-doubt listing shows them as awaiting recovery, with an age.
    let (_, in_doubt) = h.get("/v1/transactions?state=in_doubt").await.unwrap();
    assert_eq!(
        in_doubt["transactions"].as_array().unwrap().len(),
        3,
        "{in_doubt}"
    );
    assert_eq!(
        in_doubt["transactions"][0]["state"],
        "prepared_awaiting_recovery"
    );

    // No COMMIT is recorded: presumed abort has decided it, and GET says so. A commit by
    // hand would make that answer false (and its txn id may have been retried and
    // committed since), so it takes --force (invariant 6; found by review: it used to
    // commit unforced).
    assert_eq!(
        h.get("/v1/transactions/twopc_c1_0_5").await.unwrap().1["outcome"],
        "aborted"
    );
    let (status, r) = resolve(&h, "twopc_c1_0_5", &json!({"action": "commit"})).await;
    assert_eq!(status, 409, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("--force"),
        "{r}"
    );
    assert_eq!(
        prepared_on(&h.get("/v1/admin/txns/twopc_c1_0_5").await.unwrap().1),
        vec!["a", "b"]
    );
    assert_eq!(balance(&h, 0, 5).await, BALANCE, "nothing committed on a");

    // Dry run: says what it would do, does nothing.
    let (status, r) = resolve(
        &h,
        "twopc_c1_0_5",
        &json!({"action": "commit", "dry_run": true, "force": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(steps[0].starts_with("log COMMIT twopc_c1_0_5"), "{steps:?}");
    assert!(steps.contains(&"COMMIT PREPARED on a") && steps.contains(&"COMMIT PREPARED on b"));
    let (_, view) = h.get("/v1/admin/txns/twopc_c1_0_5").await.unwrap();
    assert_eq!(
        prepared_on(&view),
        vec!["a", "b"],
        "dry run changed nothing"
    );

    // Commit it, forced: logged first, then applied; GET answers from the log.
    let (status, r) = resolve(
        &h,
        "twopc_c1_0_5",
        &json!({"action": "commit", "force": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let (_, view) = h.get("/v1/admin/txns/twopc_c1_0_5").await.unwrap();
    assert!(prepared_on(&view).is_empty(), "{view}");
    assert_eq!(
        h.get("/v1/transactions/twopc_c1_0_5").await.unwrap().1["outcome"],
        "committed"
    );
    assert_eq!(balance(&h, 0, 5).await, BALANCE + 5, "committed on a");
    assert_eq!(balance(&h, 1, 5).await, BALANCE + 5, "committed on b");

    // Abort another; its record says aborted.
    let (status, _) = resolve(&h, "twopc_c1_0_6", &json!({"action": "abort"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("/v1/transactions/twopc_c1_0_6").await.unwrap().1["outcome"],
        "aborted"
    );
    assert_eq!(balance(&h, 0, 6).await, BALANCE, "rolled back on a");
    let (_, view) = h.get("/v1/admin/txns/twopc_c1_0_6").await.unwrap();
    assert!(prepared_on(&view).is_empty(), "{view}");

    // Commit the third while b is unreachable: a commits, b stays pending in the log.
    h.dbs[1].stop_agent();
    let (status, r) = resolve(
        &h,
        "twopc_c1_0_7",
        &json!({"action": "commit", "force": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let st = h.get("/v1/transactions/twopc_c1_0_7").await.unwrap().1;
    assert_eq!(st["outcome"], "committed");
    assert_eq!(st["pending"], json!(["b"]), "{st}");
    assert_eq!(balance(&h, 0, 7).await, BALANCE + 7, "committed on a");
    // Refuses to contradict the logged decision ...
    let (status, r) = resolve(&h, "twopc_c1_0_7", &json!({"action": "abort"})).await;
    assert_eq!(status, 409, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("--force"));

    // The CLI shows the same, through the running coordinator.
    let out = Command::new(env!("CARGO_BIN_EXE_twopc-coordinator-fp"))
        .args(["txns", "--coordinator", &h.base_url, "show", "twopc_c1_0_7"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("decision committed"), "{text}");
    assert!(text.contains("pending b"), "{text}");
    assert!(text.contains("unknown"), "b is unreachable: {text}");
    let out = Command::new(env!("CARGO_BIN_EXE_twopc-coordinator-fp"))
        .args([
            "txns",
            "--coordinator",
            &h.base_url,
            "resolve",
            "twopc_c1_0_7",
            "--abort",
        ])
        .output()
        .unwrap();
    // Refused by the coordinator (409, the logged decision), as an error exit: not a
    // crash, not a connection failure.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("409"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");

    // ... and the log survives a restart: the decision is still committed and pending.
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|c| c.recovery_interval_ms = 3_600_000)
        .await
        .unwrap();
    let st = h.get("/v1/transactions/twopc_c1_0_7").await.unwrap().1;
    assert_eq!(st["outcome"], "committed", "{st}");
    // An operator's abort is an aborted attempt; until every participant's decision rows
    // were read, a later attempt of the same txn id might have committed by a local
    // commit, so GET hedges while b is away...
    let st = h.get("/v1/transactions/twopc_c1_0_6").await.unwrap().1;
    assert_eq!(st["state"], "recovering", "{st}");
    // ...and answers once b is back and its rows were read.
    let (addr, _stop) = twopc_testkit::spawn_agent("b", &h.dbs[1].url)
        .await
        .unwrap();
    h.dbs[1].agent_addr = Some(addr);
    h.stop_coordinator().await.unwrap();
    h.start_coordinator(|c| c.recovery_interval_ms = 3_600_000)
        .await
        .unwrap();
    assert_eq!(
        h.get("/v1/transactions/twopc_c1_0_6").await.unwrap().1["outcome"],
        "aborted"
    );
    // The restarted coordinator finished twopc_c1_0_7 on b: its +7 landed there too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while balance(&h, 1, 7).await != BALANCE + 7 {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for twopc_c1_0_7 to commit on b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.shutdown().await.unwrap();
}
