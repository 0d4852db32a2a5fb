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
