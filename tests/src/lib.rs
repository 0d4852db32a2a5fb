//! twopc test kit: throwaway PostgreSQL clusters with the bank schema, agents (served
//! over TCP or in-process), a coordinator on a local port, an HTTP client, and the bank
//! invariant checker.
//!
//! The cluster manager and the checker live in `twopc_coordinator::{pg_cluster, bank}`
//! (the `demo` command uses them too); this crate re-exports them and adds the harness
//! the integration tests in `tests/` share.

pub mod bench;
pub mod chaos;
pub mod procs;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::server::Running;
use twopc_participant::server::{serve, ServerConfig};
use twopc_participant::{Agent, AgentConfig};
use twopc_shared::auth::AuthKey;

pub use twopc_coordinator::bank::{self, audit, setup_bank, AuditReport, Expectation};
pub use twopc_coordinator::pg_cluster::{ClusterOptions, PgBinaries, PgCluster, StopMode};
pub use twopc_coordinator::workload;

/// Accounts per database in the test bank.
pub const ACCOUNTS: u32 = 100;
/// Initial balance of each account.
pub const BALANCE: i64 = 1_000;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The shared key of this test process's agents and coordinators (random, generated
/// once), and the file holding it (hex, mode 0600, in the temp directory).
fn test_key() -> &'static (Arc<AuthKey>, PathBuf) {
    static KEY: OnceLock<(Arc<AuthKey>, PathBuf)> = OnceLock::new();
    KEY.get_or_init(|| {
        let bytes: [u8; 32] = rand::random();
        let key = AuthKey::from_bytes(bytes.to_vec()).expect("32 bytes is a valid key");
        let path = std::env::temp_dir().join(format!(
            "twopc-test-key-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("create the test key file");
            f.write_all(key.to_hex().as_bytes())
                .expect("write the test key file");
        }
        (Arc::new(key), path)
    })
}

/// The key the test kit's agents require (see [`agent_key_file`]).
pub fn agent_key() -> Arc<AuthKey> {
    test_key().0.clone()
}

/// The key file of [`agent_key`]: give it to a coordinator (`agent_auth_key_file`) or
/// an agent process (`--auth-key-file`).
pub fn agent_key_file() -> PathBuf {
    test_key().1.clone()
}

/// How the coordinator reaches the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    /// Agents served over TCP on loopback (the production shape).
    Remote,
    /// Agents inside the coordinator process.
    InProcess,
}

/// One database with its cluster and (in remote mode) its agent server.
pub struct Db {
    pub name: String,
    pub cluster: PgCluster,
    pub url: String,
    /// `HOST:PORT` of the agent, in remote mode.
    pub agent_addr: Option<String>,
    /// The agent behind `agent_addr` (remote mode), to look at its branch table.
    pub agent: Option<Agent>,
    agent_stop: Option<CancellationToken>,
}

impl Db {
    /// Stops the agent server (remote mode): the participant becomes unreachable.
    pub fn stop_agent(&mut self) {
        if let Some(t) = self.agent_stop.take() {
            t.cancel();
        }
    }
}

/// Clusters with the bank loaded, agents, and a coordinator.
pub struct Harness {
    pub dbs: Vec<Db>,
    pub data_dir: PathBuf,
    pub coordinator: Option<Running>,
    pub base_url: String,
    pub http: reqwest::Client,
    pub mode: AgentMode,
}

/// Starts `n` throwaway clusters; their participant names are a, b, c, ...
pub async fn start_clusters(tag: &str, n: usize) -> anyhow::Result<(Vec<String>, Vec<PgCluster>)> {
    let names: Vec<String> = (0..n)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect();
    let opts: Vec<ClusterOptions> = names
        .iter()
        .map(|n| ClusterOptions::new(format!("{tag}{n}")))
        .collect();
    let clusters = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<PgCluster>> {
        opts.into_iter()
            .map(|o| PgCluster::start(o).map_err(Into::into))
            .collect()
    })
    .await??;
    Ok((names, clusters))
}

/// Starts `n` clusters named a, b, c, ... each with the bank schema loaded.
pub async fn start_dbs(n: usize, mode: AgentMode) -> anyhow::Result<Vec<Db>> {
    start_dbs_with(n, mode, |_| {}).await
}

/// Like [`start_dbs`]; in remote mode `adjust` sets each agent's configuration (in-process
/// agents are made by the coordinator, with the defaults).
pub async fn start_dbs_with(
    n: usize,
    mode: AgentMode,
    adjust: impl Fn(&mut AgentConfig),
) -> anyhow::Result<Vec<Db>> {
    let (names, clusters) = start_clusters("t", n).await?;
    let mut dbs = Vec::new();
    for (name, cluster) in names.into_iter().zip(clusters) {
        let url = cluster.url("postgres");
        setup_bank(&url, ACCOUNTS, BALANCE).await?;
        let (agent_addr, agent, agent_stop) = match mode {
            AgentMode::Remote => {
                let mut config = AgentConfig::new(name.clone(), url.clone());
                adjust(&mut config);
                let (addr, agent, stop) =
                    serve_agent_config(config, ServerConfig::default()).await?;
                (Some(addr), Some(agent), Some(stop))
            }
            AgentMode::InProcess => (None, None, None),
        };
        dbs.push(Db {
            name,
            cluster,
            url,
            agent_addr,
            agent,
            agent_stop,
        });
    }
    Ok(dbs)
}

/// Serves an agent for `url` on a free loopback port.
pub async fn spawn_agent(name: &str, url: &str) -> anyhow::Result<(String, CancellationToken)> {
    spawn_agent_with(name, url, ServerConfig::default()).await
}

/// Like [`spawn_agent`] with server settings (e.g. TLS).
pub async fn spawn_agent_with(
    name: &str,
    url: &str,
    server: ServerConfig,
) -> anyhow::Result<(String, CancellationToken)> {
    let (addr, _agent, stop) = serve_agent(name, url, server).await?;
    Ok((addr, stop))
}

/// Like [`spawn_agent_with`], keeping the agent too (to [`Agent::close`] its sessions).
pub async fn serve_agent(
    name: &str,
    url: &str,
    server: ServerConfig,
) -> anyhow::Result<(String, Agent, CancellationToken)> {
    serve_agent_config(AgentConfig::new(name, url), server).await
}

/// Serves an agent with `config` on a free loopback port.
pub async fn serve_agent_config(
    config: AgentConfig,
    server: ServerConfig,
) -> anyhow::Result<(String, Agent, CancellationToken)> {
    serve_agent_on("127.0.0.1:0", config, server).await
}

/// Serves an agent with `config` on `listen` (e.g. a fixed port a coordinator process
/// was told). Without TLS, a key or `insecure` in `server.auth`, the agent requires the
/// test kit's key ([`agent_key`]), which [`Harness`] coordinators hold.
pub async fn serve_agent_on(
    listen: &str,
    config: AgentConfig,
    mut server: ServerConfig,
) -> anyhow::Result<(String, Agent, CancellationToken)> {
    if server.tls.is_none() && server.auth.key.is_none() && !server.auth.insecure {
        server.auth.key = Some(agent_key());
    }
    let agent = Agent::connect(config).await.context("connect agent")?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    twopc_participant::auth::check_listen(
        &server.auth,
        server.tls.is_some(),
        listener.local_addr()?,
    )?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let (served, token) = (agent.clone(), stop.clone());
    tokio::spawn(async move { serve(served, listener, server, token).await });
    Ok((addr, agent, stop))
}

impl Harness {
    /// `n` databases and a coordinator with default settings.
    pub async fn start(n: usize, mode: AgentMode) -> anyhow::Result<Harness> {
        Harness::start_with(n, mode, |_| {}).await
    }

    /// Like [`Harness::start`], letting the test adjust the coordinator's configuration.
    pub async fn start_with(
        n: usize,
        mode: AgentMode,
        adjust: impl FnOnce(&mut ServeConfig),
    ) -> anyhow::Result<Harness> {
        Harness::start_with_agents(n, mode, |_| {}, adjust).await
    }

    /// Like [`Harness::start_with`], adjusting the agents' configuration too (remote
    /// mode; see [`start_dbs_with`]).
    pub async fn start_with_agents(
        n: usize,
        mode: AgentMode,
        adjust_agents: impl Fn(&mut AgentConfig),
        adjust: impl FnOnce(&mut ServeConfig),
    ) -> anyhow::Result<Harness> {
        init_tracing();
        let dbs = start_dbs_with(n, mode, adjust_agents).await?;
        let data_dir = std::env::temp_dir().join(format!(
            "twopc-test-coord-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut h = Harness {
            dbs,
            data_dir,
            coordinator: None,
            base_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            mode,
        };
        h.start_coordinator(adjust).await?;
        Ok(h)
    }

    pub fn serve_config(&self) -> ServeConfig {
        let mut c = ServeConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: self.data_dir.clone(),
            agent_auth_key_file: Some(agent_key_file()),
            ..ServeConfig::default()
        };
        for db in &self.dbs {
            let spec = match (&db.agent_addr, self.mode) {
                (Some(addr), AgentMode::Remote) => addr.clone(),
                _ => db.url.clone(),
            };
            c.participants.insert(db.name.clone(), spec);
        }
        c
    }

    /// Starts (or restarts, on the same data dir) the coordinator.
    pub async fn start_coordinator(
        &mut self,
        adjust: impl FnOnce(&mut ServeConfig),
    ) -> anyhow::Result<()> {
        let mut c = self.serve_config();
        adjust(&mut c);
        let running = twopc_coordinator::server::start(c).await?;
        self.base_url = format!("http://{}", running.addr);
        self.coordinator = Some(running);
        Ok(())
    }

    /// Shuts the coordinator down cleanly.
    pub async fn stop_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.coordinator.take() {
            r.shutdown().await?;
        }
        Ok(())
    }

    pub fn gid_prefix(&self) -> String {
        twopc_shared::gid::gid_prefix(&self.serve_config().coordinator_id)
    }

    /// POSTs `body` to `path`; returns the status and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// POSTs raw bytes (for malformed input).
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// The value of a counter on `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("{name} missing in {text}"))
    }

    /// Runs the bank checker over every database.
    pub async fn audit(&self, expect: Option<&Expectation>) -> anyhow::Result<AuditReport> {
        let dbs: Vec<(String, String)> = self
            .dbs
            .iter()
            .map(|d| (d.name.clone(), d.url.clone()))
            .collect();
        let per_db = ACCOUNTS as i64 * BALANCE;
        let initial: Vec<(String, i64)> =
            self.dbs.iter().map(|d| (d.name.clone(), per_db)).collect();
        Ok(audit(
            &dbs,
            per_db * self.dbs.len() as i64,
            &initial,
            &self.gid_prefix(),
            expect,
        )
        .await?)
    }

    /// Runs `sql` on database `db` directly and returns the first column of the first row.
    pub async fn scalar_i64(&self, db: usize, sql: &str) -> anyhow::Result<i64> {
        let (client, conn) =
            tokio_postgres::connect(&self.dbs[db].url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let row = client.query_one(sql, &[]).await?;
        Ok(row.get::<_, i64>(0))
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_coordinator().await?;
        for db in &mut self.dbs {
            db.stop_agent();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
        Ok(())
    }
}

/// A retry of a committed txn id: 200 with its recorded outcome, `"replayed": true`,
/// and nothing run (no results).
#[track_caller]
pub fn assert_replayed(status: u16, v: &Value) {
    assert_eq!(status, 200, "a retry of a committed txn id: {v}");
    assert_eq!(v["outcome"], "committed", "{v}");
    assert_eq!(v["replayed"], true, "{v}");
    assert_eq!(v["branches"], serde_json::json!([]), "nothing ran: {v}");
}

/// A one-shot transaction body of bank legs `(participant, account, delta)`: a debit
/// leg for a negative delta, a credit leg otherwise.
pub fn transfer(txn_id: &str, legs: &[(&str, i32, i64)]) -> Value {
    let branches: Vec<Value> = legs
        .iter()
        .map(|(p, acct, delta)| {
            let s = if *delta < 0 {
                bank::debit_statements(txn_id, *acct, -delta)
            } else {
                bank::credit_statements(txn_id, *acct, *delta)
            };
            serde_json::json!({ "participant": p, "statements": stmts(s) })
        })
        .collect();
    serde_json::json!({ "txn_id": txn_id, "branches": branches })
}

/// Statements for the HTTP API, as JSON.
pub fn stmts(v: Vec<(String, Vec<Value>)>) -> Value {
    Value::Array(
        v.into_iter()
            .map(|(sql, params)| serde_json::json!({ "sql": sql, "params": params }))
            .collect(),
    )
}

/// One statement with `params`, run straight on `agent` as a whole branch that commits.
pub async fn commit_one(
    agent: &Agent,
    gid: twopc_shared::gid::Gid,
    sql: &str,
    params: Vec<Value>,
) -> twopc_shared::msg::Response {
    let mut exec = branch(gid, &[sql], twopc_shared::msg::Finish::Commit, None);
    exec.statements[0].params = params;
    agent
        .handle(
            twopc_shared::msg::Request::Execute(exec),
            Duration::from_secs(10),
        )
        .await
}

/// An `Execute` of `sqls` (no parameters) as one whole branch ending with `finish`.
pub fn branch(
    gid: twopc_shared::gid::Gid,
    sqls: &[&str],
    finish: twopc_shared::msg::Finish,
    decision: Option<twopc_shared::msg::Decision>,
) -> twopc_shared::msg::ExecuteBranch {
    twopc_shared::msg::ExecuteBranch {
        gid,
        isolation: Default::default(),
        statements: sqls
            .iter()
            .map(|s| twopc_shared::msg::Statement {
                sql: (*s).into(),
                params: vec![],
            })
            .collect(),
        finish,
        read_only_vote: false,
        continues: false,
        decision,
        expires_in_ms: None,
    }
}

/// Every row of the decision table, as (gid, committed), by gid.
pub async fn decision_rows(client: &tokio_postgres::Client) -> Vec<(String, bool)> {
    client
        .query(
            "SELECT gid, committed FROM twopc.decisions ORDER BY gid",
            &[],
        )
        .await
        .expect("read twopc.decisions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}
