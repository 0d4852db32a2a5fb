//! Real processes for crash tests: agents and a coordinator started from the binaries
//! (built with failpoints by this crate), on fixed loopback ports so they can be killed
//! with SIGKILL and restarted in place.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{bank, setup_bank, PgCluster, ACCOUNTS, BALANCE};

/// Paths of the binaries under test (the test passes `env!("CARGO_BIN_EXE_...")`).
#[derive(Debug, Clone)]
pub struct Bins {
    pub coordinator: PathBuf,
    pub participant: PathBuf,
}

/// A child process with its log file.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawn process")?;
        Ok(Proc { child, log })
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop), and waits up to `timeout` for the exit.
    pub fn term(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if !matches!(sent, Ok(s) if s.success()) {
            return None;
        }
        self.wait_exit(timeout)
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Clusters, agent processes and a coordinator process.
pub struct ProcHarness {
    pub bins: Bins,
    pub clusters: Vec<PgCluster>,
    pub names: Vec<String>,
    pub agent_ports: Vec<u16>,
    pub agents: Vec<Option<Proc>>,
    pub coordinator_port: u16,
    pub coordinator: Option<Proc>,
    pub dir: PathBuf,
    pub recovery_interval_ms: u64,
    /// Extra `serve` flags for the coordinator (e.g. `--last-agent`).
    pub coordinator_args: Vec<String>,
    pub http: reqwest::Client,
}

impl ProcHarness {
    pub async fn start(bins: Bins, n: usize) -> anyhow::Result<ProcHarness> {
        crate::init_tracing();
        let (names, clusters) = crate::start_clusters("p", n).await?;
        let dir = std::env::temp_dir().join(format!(
            "twopc-procs-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let h = ProcHarness {
            bins,
            clusters,
            agent_ports: (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?,
            agents: (0..n).map(|_| None).collect(),
            names,
            coordinator_port: free_port()?,
            coordinator: None,
            dir,
            recovery_interval_ms: 300,
            coordinator_args: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        h.reset_bank().await?;
        Ok(h)
    }

    pub fn url(&self, i: usize) -> String {
        self.clusters[i].url("postgres")
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.coordinator_port)
    }

    /// Empties the ledgers and refills the accounts.
    pub async fn reset_bank(&self) -> anyhow::Result<()> {
        for i in 0..self.clusters.len() {
            setup_bank(&self.url(i), ACCOUNTS, BALANCE).await?;
        }
        Ok(())
    }

    /// Starts agent `i`, with `failpoints` in its environment (may be empty).
    pub async fn start_agent(&mut self, i: usize, failpoints: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bins.participant);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", self.agent_ports[i]),
            "--database",
            &self.url(i),
            "--name",
            &self.names[i],
            "--auth-key-file",
            &crate::agent_key_file().display().to_string(),
        ])
        .env("TWOPC_FAILPOINTS", failpoints)
        .env("RUST_LOG", "info");
        let log = self.dir.join(format!("agent-{}.log", self.names[i]));
        self.agents[i] = Some(Proc::spawn(cmd, log)?);
        let addr = format!("127.0.0.1:{}", self.agent_ports[i]);
        wait_for(Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
        })
        .await
        .with_context(|| format!("agent {} did not start", self.names[i]))
    }

    /// Starts the coordinator with `failpoints` in its environment.
    pub async fn start_coordinator(&mut self, failpoints: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bins.coordinator);
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", self.coordinator_port),
            "--data-dir",
            &self.dir.join("coordinator").display().to_string(),
            "--recovery-interval-ms",
            &self.recovery_interval_ms.to_string(),
            "--commit-wait-ms",
            "2000",
            "--agent-auth-key-file",
            &crate::agent_key_file().display().to_string(),
        ])
        .args(&self.coordinator_args)
        .env("TWOPC_FAILPOINTS", failpoints)
        .env("RUST_LOG", "info");
        for (i, n) in self.names.iter().enumerate() {
            cmd.args([
                "--participant",
                &format!("{n}=127.0.0.1:{}", self.agent_ports[i]),
            ]);
        }
        let log = self.dir.join("coordinator.log");
        self.coordinator = Some(Proc::spawn(cmd, log)?);
        let url = format!("{}/healthz", self.base_url());
        let http = self.http.clone();
        let started = wait_for(Duration::from_secs(30), || {
            let (url, http) = (url.clone(), http.clone());
            async move { matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) }
        })
        .await;
        if started.is_err() {
            let tail = self
                .coordinator
                .as_ref()
                .map(Proc::log_tail)
                .unwrap_or_default();
            bail!("coordinator did not start:\n{tail}");
        }
        Ok(())
    }

    pub async fn start_all(
        &mut self,
        coordinator_fp: &str,
        agent_fp: &[&str],
    ) -> anyhow::Result<()> {
        for i in 0..self.names.len() {
            let fp = agent_fp.get(i).copied().unwrap_or("");
            self.start_agent(i, fp).await?;
        }
        self.start_coordinator(coordinator_fp).await
    }

    pub fn stop_all(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill9();
        }
        for a in self.agents.iter_mut() {
            if let Some(mut p) = a.take() {
                p.kill9();
            }
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base_url()))
            .send()
            .await?
            .json()
            .await?)
    }

    /// POSTs `body` to `path`; the status and the JSON answer (`Null` if none).
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base_url()))
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// `GET /v1/transactions/{id}`, asked again (bounded, 10 s) while the coordinator
    /// says `recovering` (it has not read every decision table since its start).
    pub async fn status_after_recovery(&self, id: &str) -> anyhow::Result<Value> {
        let mut st = self.get(&format!("/v1/transactions/{id}")).await?;
        for _ in 0..100 {
            if st["state"] != "recovering" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            st = self.get(&format!("/v1/transactions/{id}")).await?;
        }
        Ok(st)
    }

    /// Prepared transactions of ours on every database, as `name:gid`.
    pub async fn prepared_left(&self) -> anyhow::Result<Vec<String>> {
        let dbs: Vec<(String, String)> = (0..self.clusters.len())
            .map(|i| (self.names[i].clone(), self.url(i)))
            .collect();
        Ok(bank::prepared_gids(&dbs, "twopc_").await?)
    }

    /// Waits until nothing of ours is prepared and nothing is in doubt at the coordinator.
    pub async fn wait_resolved(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        loop {
            let prepared = self.prepared_left().await?;
            let in_doubt = self
                .get("/v1/transactions?state=in_doubt")
                .await
                .map(|v| v["transactions"].as_array().map_or(1, Vec::len))
                .unwrap_or(1);
            if prepared.is_empty() && in_doubt == 0 {
                return Ok(t0.elapsed());
            }
            if Instant::now() > deadline {
                bail!("not resolved after {timeout:?}: prepared {prepared:?}, in doubt {in_doubt}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn audit(
        &self,
        expect: Option<&crate::Expectation>,
    ) -> anyhow::Result<crate::AuditReport> {
        let dbs: Vec<(String, String)> = (0..self.clusters.len())
            .map(|i| (self.names[i].clone(), self.url(i)))
            .collect();
        let per_db = ACCOUNTS as i64 * BALANCE;
        let initial: Vec<(String, i64)> = self.names.iter().map(|n| (n.clone(), per_db)).collect();
        Ok(crate::audit(
            &dbs,
            per_db * dbs.len() as i64,
            &initial,
            "twopc_c1_",
            expect,
        )
        .await?)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ProcHarness {
    fn drop(&mut self) {
        self.stop_all();
        if std::env::var("TWOPC_KEEP_CLUSTERS").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
