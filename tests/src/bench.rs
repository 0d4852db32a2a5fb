//! `twopc-bench`: the same bank transfer through several paths, side by side, in one run.
//!
//! - `direct-2pc`: the client does BEGIN/UPDATE/INSERT/PREPARE on both databases itself,
//!   then COMMIT PREPARED on both (tokio-postgres, no coordinator, no log): the floor for
//!   atomic commit.
//! - `non-atomic`: two independent local commits.
//! - `twopc-remote-applied|durable`, `twopc-inproc-applied|durable`: through the
//!   coordinator's HTTP API, with agents over TCP or in the coordinator's process.
//! - `twopc-remote-client`: `twopc-remote-applied` sent by the application's client crate
//!   (`twopc-client`: its request building, connection pool and answer classification)
//!   instead of the lean hand-written client: what the crate costs.
//! - `twopc-last-applied|durable`: the same with remote agents and the last-agent commit
//!   (`--last-agent`): the last participant's commit is the decision.
//! - `single-direct` / `single-twopc`: one database, plain commit vs twopc's one-phase path.
//! - `single-http-floor`: the one-phase request to an HTTP server in this process that
//!   parses it as the coordinator does and answers "committed" without touching a
//!   database: what the HTTP hop alone costs, the floor under any `single-twopc`.
//!
//! Reports throughput, p50/p99/p999 latency (HdrHistogram), aborts and errors per path and
//! concurrency, the ratio to `direct-2pc`, and writes JSON plus an SVG plot.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::{Client, NoTls, Statement};

use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::engine::{Committed, TxnRequest};
use twopc_coordinator::server::Running;

use crate::{serve_agent, setup_bank, ClusterOptions, PgCluster};
use tokio_util::sync::CancellationToken;
use twopc_participant::Agent;

pub const ALL_PATHS: &[&str] = &[
    "direct-2pc",
    "non-atomic",
    "twopc-remote-applied",
    "twopc-remote-durable",
    "twopc-remote-client",
    "twopc-last-applied",
    "twopc-last-durable",
    "twopc-inproc-applied",
    "twopc-inproc-durable",
    "single-direct",
    "single-twopc",
    "single-http-floor",
];

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub paths: Vec<String>,
    pub concurrency: Vec<usize>,
    pub duration: Duration,
    pub warmup: Duration,
    pub accounts: u32,
    /// Existing databases (`postgresql://...`, two), or None to start clusters.
    pub urls: Option<(String, String)>,
    pub pg_fsync: bool,
    pub out_dir: PathBuf,
    /// Every point runs this many times, the rounds interleaved (all paths, then again);
    /// the round with the median throughput is reported, with the range of all rounds.
    pub rounds: usize,
    /// Optimizations of the coordinators the bench starts (to compare them).
    pub one_phase: bool,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PointResult {
    pub path: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub committed: u64,
    pub aborted: u64,
    pub errors: u64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Throughput and p50 relative to `direct-2pc` at the same concurrency
    /// (`single-twopc` relative to `single-direct`).
    pub throughput_ratio: Option<f64>,
    /// The median over rounds of this path's throughput over the base's in the same
    /// round: steadier than `throughput_ratio` when the machine drifts between rounds.
    /// None with one round.
    #[serde(default)]
    pub throughput_ratio_paired: Option<f64>,
    pub p50_ratio: Option<f64>,
    /// CPU time per committed transaction while measuring, in microseconds: of the bench
    /// process (its clients, and for the twopc paths also the coordinator and the agents,
    /// which run in it), and of the whole machine (PostgreSQL, kernel, everything).
    pub cpu_bench_us_per_txn: Option<f64>,
    pub cpu_machine_us_per_txn: Option<f64>,
    /// Throughput of every round of this point (the reported one is their median).
    pub throughput_rounds: Vec<f64>,
}

/// CPU time used so far, in microseconds: (this process, the whole machine busy).
/// Linux only (`/proc`); `None` elsewhere.
fn cpu_now_us() -> Option<(f64, f64)> {
    // Clock ticks; USER_HZ is 100 on every Linux architecture we build for.
    const TICK_US: f64 = 10_000.0;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; count fields after its ')'.
    let after = own.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let busy: f64 = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?;
    Some(((utime + stime) * TICK_US, busy * TICK_US))
}

enum Op {
    Committed,
    Aborted,
    Error,
}

/// One client's way of doing a transfer.
enum Driver {
    Direct2pc {
        a: Client,
        b: Client,
        upd_a: Statement,
        ins_a: Statement,
        upd_b: Statement,
        ins_b: Statement,
    },
    NonAtomic {
        a: Client,
        b: Client,
        upd_a: Statement,
        ins_a: Statement,
        upd_b: Statement,
        ins_b: Statement,
    },
    SingleDirect {
        a: Client,
        upd: Statement,
        ins: Statement,
    },
    Http {
        http: HttpConn,
        ack: &'static str,
        single: bool,
    },
    /// The application's client crate, one per bench client.
    Crate(twopc_client::Client),
}

/// One HTTP/1.1 keep-alive connection to a coordinator per client, as each direct client
/// has its own PostgreSQL connections: no pool to lock, no URL to parse per request. The
/// lean client a throughput-minded user would write; the harness's own cost should not
/// be charged to the coordinator.
struct HttpConn {
    addr: std::net::SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
    timeout: Duration,
}

impl HttpConn {
    async fn connect(
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>
    {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .context("connect to the coordinator")?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// POSTs `body` to /v1/transactions; the status, or None for a transport error or a
    /// timeout (after which the connection is dropped and the next call reconnects).
    async fn post(&mut self, body: Vec<u8>) -> Option<u16> {
        let work = async {
            let sender = match self.sender.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => match Self::connect(self.addr).await {
                    Ok(s) => self.sender.insert(s),
                    Err(e) => {
                        // Counted as an error; a pause, or the client spins on a refusal.
                        tracing::warn!(error = %format!("{e:#}"), "bench client cannot connect");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return None;
                    }
                },
            };
            sender.ready().await.ok()?;
            let req = hyper::Request::post("/v1/transactions")
                .header(hyper::header::HOST, "twopc")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            // Read the body to the end, or the connection cannot carry the next request.
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?;
            Some(status)
        };
        let status = tokio::time::timeout(self.timeout, work)
            .await
            .ok()
            .flatten();
        if status.is_none() {
            self.sender = None;
        }
        status
    }
}

/// A transaction's request body, serialized from borrowed fields (the JSON a client
/// written for speed sends; `transfer_body`, which the chaos workload sends, builds a
/// JSON tree for the same document: a unit test keeps the two equal).
#[derive(Serialize)]
struct TxnBody<'a> {
    txn_id: &'a str,
    branches: &'a [BranchBody<'a>],
    ack: &'a str,
}

#[derive(Serialize)]
struct BranchBody<'a> {
    participant: &'a str,
    /// UPD (delta, acct), then INS (txn_id, acct, delta): a tuple is a JSON array.
    statements: (UpdBody, InsBody<'a>),
}

type UpdBody = StmtBody<(i64, i32)>;
type InsBody<'a> = StmtBody<(&'a str, i32, i64)>;

#[derive(Serialize)]
struct StmtBody<P> {
    sql: &'static str,
    params: P,
}

impl<'a> BranchBody<'a> {
    /// `bank::credit_statements` (or debit, for a negative delta) as a branch.
    fn new(participant: &'a str, txn_id: &'a str, acct: i32, delta: i64) -> BranchBody<'a> {
        BranchBody {
            participant,
            statements: (
                StmtBody {
                    sql: UPD,
                    params: (delta, acct),
                },
                StmtBody {
                    sql: INS,
                    params: (txn_id, acct, delta),
                },
            ),
        }
    }
}

const UPD: &str = "UPDATE acct SET bal = bal + $1 WHERE id = $2";
const INS: &str = "INSERT INTO ledger (txn_id, acct, delta) VALUES ($1, $2, $3)";

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connect")?;
    tokio::spawn(conn);
    Ok(c)
}

/// BEGIN; debit/credit; ledger row; then `finish`, all pipelined in one round trip.
async fn leg(
    c: &Client,
    upd: &Statement,
    ins: &Statement,
    txn_id: &str,
    acct: i32,
    delta: i64,
    finish: &str,
) -> Result<(), tokio_postgres::Error> {
    let p_upd: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&delta, &acct];
    let p_ins: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&txn_id, &acct, &delta];
    let (r1, r2, r3, r4) = tokio::join!(
        c.batch_execute("BEGIN"),
        c.execute(upd, &p_upd),
        c.execute(ins, &p_ins),
        c.batch_execute(finish),
    );
    let res = r1.and(r2.map(|_| ())).and(r3.map(|_| ())).and(r4);
    if res.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    res
}

impl Driver {
    async fn transfer(&mut self, txn_id: &str, from: i32, to: i32, amount: i64) -> Op {
        match self {
            Driver::Direct2pc {
                a,
                b,
                upd_a,
                ins_a,
                upd_b,
                ins_b,
            } => {
                let prepare = format!("PREPARE TRANSACTION '{txn_id}'");
                let (ra, rb) = tokio::join!(
                    leg(a, upd_a, ins_a, txn_id, from, -amount, &prepare),
                    leg(b, upd_b, ins_b, txn_id, to, amount, &prepare),
                );
                if ra.is_err() || rb.is_err() {
                    let rollback = format!("ROLLBACK PREPARED '{txn_id}'");
                    if ra.is_ok() {
                        let _ = a.batch_execute(&rollback).await;
                    }
                    if rb.is_ok() {
                        let _ = b.batch_execute(&rollback).await;
                    }
                    return Op::Aborted;
                }
                let commit = format!("COMMIT PREPARED '{txn_id}'");
                let (ca, cb) = tokio::join!(a.batch_execute(&commit), b.batch_execute(&commit));
                if ca.is_ok() && cb.is_ok() {
                    Op::Committed
                } else {
                    Op::Error
                }
            }
            Driver::NonAtomic {
                a,
                b,
                upd_a,
                ins_a,
                upd_b,
                ins_b,
            } => {
                let (ra, rb) = tokio::join!(
                    leg(a, upd_a, ins_a, txn_id, from, -amount, "COMMIT"),
                    leg(b, upd_b, ins_b, txn_id, to, amount, "COMMIT"),
                );
                match (ra, rb) {
                    (Ok(()), Ok(())) => Op::Committed,
                    _ => Op::Error,
                }
            }
            Driver::SingleDirect { a, upd, ins } => {
                match leg(a, upd, ins, txn_id, from, 0, "COMMIT").await {
                    Ok(()) => Op::Committed,
                    Err(_) => Op::Aborted,
                }
            }
            Driver::Http { http, ack, single } => {
                let legs = [
                    BranchBody::new("a", txn_id, from, if *single { 0 } else { -amount }),
                    BranchBody::new("b", txn_id, to, amount),
                ];
                let body = TxnBody {
                    txn_id,
                    branches: if *single { &legs[..1] } else { &legs },
                    ack,
                };
                let Ok(body) = serde_json::to_vec(&body) else {
                    return Op::Error;
                };
                match http.post(body).await {
                    Some(200) => Op::Committed,
                    Some(409) => Op::Aborted,
                    _ => Op::Error,
                }
            }
            Driver::Crate(client) => {
                let txn = twopc_client::Transaction::with_id(txn_id)
                    .statement("a", UPD, vec![json!(-amount), json!(from)])
                    .statement("a", INS, vec![json!(txn_id), json!(from), json!(-amount)])
                    .statement("b", UPD, vec![json!(amount), json!(to)])
                    .statement("b", INS, vec![json!(txn_id), json!(to), json!(amount)])
                    .ack(twopc_client::Ack::Applied);
                match client.run(&txn).await {
                    Ok(_) => Op::Committed,
                    Err(twopc_client::Error::Aborted { .. }) => Op::Aborted,
                    Err(_) => Op::Error,
                }
            }
        }
    }
}

/// What a path needs running: coordinators for the twopc paths.
struct Setup {
    urls: (String, String),
    remote: Option<Running>,
    /// Remote agents too, with the last-agent commit.
    last: Option<Running>,
    inproc: Option<Running>,
    /// The `single-http-floor` server and its stop token.
    floor: Option<(std::net::SocketAddr, CancellationToken)>,
    /// Remote agents (served from this process) and their stop tokens.
    agents: Vec<(Agent, CancellationToken)>,
    _clusters: Vec<PgCluster>,
    _data_dirs: DataDirs,
}

/// The coordinators' data directories, removed when the setup goes, also when a signal
/// drops the run halfway.
#[derive(Default)]
struct DataDirs(Vec<PathBuf>);

impl Drop for DataDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn coordinator(
    participants: &[(&str, String)],
    tag: &str,
    config: &BenchConfig,
    last_agent: bool,
    dirs: &mut DataDirs,
) -> anyhow::Result<Running> {
    let dir = std::env::temp_dir().join(format!(
        "twopc-bench-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    // Removed with the setup even if the start fails halfway or a signal cuts it off.
    dirs.0.push(dir.clone());
    let mut c = ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.clone(),
        coordinator_id: format!("bench{tag}"),
        // The bench's agents (`serve_agent`) require the test kit's key.
        agent_auth_key_file: Some(crate::agent_key_file()),
        ..ServeConfig::default()
    };
    for (n, spec) in participants {
        c.participants.insert((*n).into(), spec.clone());
    }
    c.one_phase = config.one_phase;
    c.read_only = config.read_only;
    c.last_agent = last_agent;
    twopc_coordinator::server::start(c).await
}

/// An HTTP server with the coordinator's stack (axum, TCP_NODELAY, the body read as bytes
/// and parsed into the coordinator's request type) that answers every transaction
/// "committed" without running it. Only the `single-http-floor` path uses it.
async fn http_floor() -> anyhow::Result<(std::net::SocketAddr, CancellationToken)> {
    use axum::response::IntoResponse;
    async fn create(body: bytes::Bytes) -> axum::response::Response {
        match serde_json::from_slice::<TxnRequest>(&body) {
            Ok(req) => axum::Json(Committed {
                txn_id: req.txn_id.unwrap_or_default(),
                outcome: twopc_coordinator::api::TxnOutcome::Committed,
                branches: vec![],
                pending: vec![],
                replayed: false,
            })
            .into_response(),
            Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    }
    let app = axum::Router::new().route("/v1/transactions", axum::routing::post(create));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind the floor server")?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await
    });
    Ok((addr, stop))
}

impl Setup {
    async fn new(config: &BenchConfig) -> anyhow::Result<Setup> {
        let mut clusters = Vec::new();
        let urls = match &config.urls {
            Some(u) => u.clone(),
            None => {
                let fsync = config.pg_fsync;
                clusters =
                    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<PgCluster>> {
                        ["a", "b"]
                            .iter()
                            .map(|n| {
                                let mut o = ClusterOptions::new(format!("bench{n}"));
                                o.fsync = fsync;
                                o.max_connections = 300;
                                o.max_prepared_transactions = 250;
                                o.extra_conf.push(("shared_buffers".into(), "256MB".into()));
                                PgCluster::start(o).map_err(Into::into)
                            })
                            .collect()
                    })
                    .await??;
                (clusters[0].url("postgres"), clusters[1].url("postgres"))
            }
        };
        let mut setup = Setup {
            urls,
            remote: None,
            last: None,
            inproc: None,
            agents: vec![],
            floor: None,
            _clusters: clusters,
            _data_dirs: DataDirs::default(),
        };
        let wants = |p: &str| config.paths.iter().any(|x| x.starts_with(p));
        if wants("single-http-floor") {
            setup.floor = Some(http_floor().await?);
        }
        if wants("twopc-remote") || wants("twopc-last") || wants("single-twopc") {
            let (a, agent_a, stop_a) = serve_agent("a", &setup.urls.0, Default::default()).await?;
            let (b, agent_b, stop_b) = serve_agent("b", &setup.urls.1, Default::default()).await?;
            setup.agents.extend([(agent_a, stop_a), (agent_b, stop_b)]);
            let agents = [("a", a), ("b", b)];
            if wants("twopc-remote") || wants("single-twopc") {
                let dirs = &mut setup._data_dirs;
                setup.remote = Some(coordinator(&agents, "r", config, false, dirs).await?);
            }
            if wants("twopc-last") {
                let dirs = &mut setup._data_dirs;
                setup.last = Some(coordinator(&agents, "l", config, true, dirs).await?);
            }
        }
        if wants("twopc-inproc") {
            let local = [("a", setup.urls.0.clone()), ("b", setup.urls.1.clone())];
            let dirs = &mut setup._data_dirs;
            setup.inproc = Some(coordinator(&local, "i", config, false, dirs).await?);
        }
        Ok(setup)
    }

    async fn driver(&self, path: &str) -> anyhow::Result<Driver> {
        let http = |r: &Option<Running>| -> anyhow::Result<HttpConn> {
            Ok(HttpConn {
                addr: r.as_ref().context("coordinator not started")?.addr,
                sender: None,
                timeout: Duration::from_secs(30),
            })
        };
        Ok(match path {
            "direct-2pc" | "non-atomic" => {
                let a = connect(&self.urls.0).await?;
                let b = connect(&self.urls.1).await?;
                let (upd_a, ins_a, upd_b, ins_b) = (
                    a.prepare(UPD).await?,
                    a.prepare(INS).await?,
                    b.prepare(UPD).await?,
                    b.prepare(INS).await?,
                );
                if path == "direct-2pc" {
                    Driver::Direct2pc {
                        a,
                        b,
                        upd_a,
                        ins_a,
                        upd_b,
                        ins_b,
                    }
                } else {
                    Driver::NonAtomic {
                        a,
                        b,
                        upd_a,
                        ins_a,
                        upd_b,
                        ins_b,
                    }
                }
            }
            "single-direct" => {
                let a = connect(&self.urls.0).await?;
                let (upd, ins) = (a.prepare(UPD).await?, a.prepare(INS).await?);
                Driver::SingleDirect { a, upd, ins }
            }
            "single-twopc" => Driver::Http {
                http: http(&self.remote)?,
                ack: "applied",
                single: true,
            },
            "single-http-floor" => Driver::Http {
                http: HttpConn {
                    addr: self.floor.as_ref().context("floor server not started")?.0,
                    sender: None,
                    timeout: Duration::from_secs(30),
                },
                ack: "applied",
                single: true,
            },
            "twopc-remote-applied" => Driver::Http {
                http: http(&self.remote)?,
                ack: "applied",
                single: false,
            },
            "twopc-remote-durable" => Driver::Http {
                http: http(&self.remote)?,
                ack: "durable",
                single: false,
            },
            "twopc-remote-client" => {
                let r = self.remote.as_ref().context("coordinator not started")?;
                let client = twopc_client::Client::builder(format!("http://{}", r.addr))
                    .build()
                    .context("build the client")?;
                Driver::Crate(client)
            }
            "twopc-last-applied" => Driver::Http {
                http: http(&self.last)?,
                ack: "applied",
                single: false,
            },
            "twopc-last-durable" => Driver::Http {
                http: http(&self.last)?,
                ack: "durable",
                single: false,
            },
            "twopc-inproc-applied" => Driver::Http {
                http: http(&self.inproc)?,
                ack: "applied",
                single: false,
            },
            "twopc-inproc-durable" => Driver::Http {
                http: http(&self.inproc)?,
                ack: "durable",
                single: false,
            },
            other => anyhow::bail!("unknown path {other:?}; paths: {}", ALL_PATHS.join(", ")),
        })
    }

    /// Stops coordinators and agents, and closes their sessions, before the clusters go.
    async fn shutdown(self) {
        for r in [self.remote, self.last, self.inproc].into_iter().flatten() {
            let _ = r.shutdown().await;
        }
        if let Some((_, stop)) = &self.floor {
            stop.cancel();
        }
        for (agent, stop) in &self.agents {
            stop.cancel();
            agent.close();
        }
    }
}

async fn run_point(
    setup: &Setup,
    path: &str,
    concurrency: usize,
    config: &BenchConfig,
    run_tag: u64,
) -> anyhow::Result<PointResult> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // The clients are spawned tasks: if this point is dropped halfway (a signal), they
    // must still stop, or they spin on a stopped cluster and the runtime never shuts down.
    let _stop_clients = StopOnDrop(stop.clone());
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..concurrency {
        let mut driver = setup.driver(path).await?;
        let (measuring, stop, done) = (measuring.clone(), stop.clone(), done.clone());
        let accounts = config.accounts as i32;
        let tag = format!("{}{run_tag}c{concurrency}x{client}", path.replace('-', ""));
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut committed, mut aborted, mut errors) = (0u64, 0u64, 0u64);
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let txn_id = format!("{tag}n{n}");
                let from = rng.gen_range(1..=accounts);
                let to = rng.gen_range(1..=accounts);
                let t0 = Instant::now();
                let op = driver.transfer(&txn_id, from, to, 1).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match op {
                    Op::Committed => {
                        committed += 1;
                        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Op::Aborted => aborted += 1,
                    Op::Error => errors += 1,
                }
            }
            (hist, committed, aborted, errors)
        }));
    }
    tokio::time::sleep(config.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let cpu0 = cpu_now_us();
    while t0.elapsed() < config.duration {
        tokio::time::sleep(Duration::from_secs(1).min(config.duration)).await;
        eprint!(
            "\r  {path:<22} c={concurrency:<3} {:>4.0}s/{:.0}s {:>8} committed   ",
            t0.elapsed().as_secs_f64(),
            config.duration.as_secs_f64(),
            done.load(Ordering::Relaxed)
        );
    }
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_now_us();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut committed, mut aborted, mut errors) = (0, 0, 0);
    for t in tasks {
        let (h, c, a, e) = t.await?;
        hist.add(h)?;
        committed += c;
        aborted += a;
        errors += e;
    }
    eprintln!();
    let per_txn = |us: Option<f64>| us.filter(|_| committed > 0).map(|us| us / committed as f64);
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(PointResult {
        path: path.to_owned(),
        concurrency,
        seconds,
        committed,
        aborted,
        errors,
        throughput: committed as f64 / seconds,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        throughput_ratio: None,
        throughput_ratio_paired: None,
        p50_ratio: None,
        cpu_bench_us_per_txn: per_txn(cpu0.zip(cpu1).map(|(a, b)| b.0 - a.0)),
        cpu_machine_us_per_txn: per_txn(cpu0.zip(cpu1).map(|(a, b)| b.1 - a.1)),
        throughput_rounds: vec![],
    })
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs every path at every concurrency; prints a table and writes JSON + SVG.
/// One result per point: the round with the median throughput, carrying every round's
/// throughput. `by_round` holds the same points in the same order in every round.
fn median_rounds(by_round: Vec<Vec<PointResult>>) -> Vec<PointResult> {
    let points = by_round.first().map_or(0, Vec::len);
    assert!(by_round.iter().all(|r| r.len() == points));
    let mut columns: Vec<Vec<PointResult>> = (0..points).map(|_| Vec::new()).collect();
    for round in by_round {
        for (i, r) in round.into_iter().enumerate() {
            columns[i].push(r);
        }
    }
    columns
        .into_iter()
        .filter_map(|mut rounds| {
            let all: Vec<f64> = rounds.iter().map(|r| r.throughput).collect();
            rounds.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
            let mut median = rounds.swap_remove(rounds.len().checked_sub(1)? / 2);
            median.throughput_rounds = all;
            Some(median)
        })
        .collect()
}

/// Each point's ratios to its base (`direct-2pc`, or `single-direct` for the `single-*`
/// paths) at the same concurrency: of the reported rounds, and paired by round.
fn add_ratios(results: &mut [PointResult]) {
    let snapshot = results.to_vec();
    for r in results {
        let base = if r.path.starts_with("single-") {
            "single-direct"
        } else {
            "direct-2pc"
        };
        if let Some(b) = snapshot
            .iter()
            .find(|b| b.path == base && b.concurrency == r.concurrency)
        {
            r.throughput_ratio_paired = paired_ratio(&r.throughput_rounds, &b.throughput_rounds);
            if b.throughput > 0.0 {
                r.throughput_ratio = Some(r.throughput / b.throughput);
            }
            if b.p50_ms > 0.0 {
                r.p50_ratio = Some(r.p50_ms / b.p50_ms);
            }
        }
    }
}

/// The median (the lower middle, as `median_rounds` picks) of `path[i] / base[i]` over
/// rounds; None unless both have the same two or more rounds, all of the base's non-zero.
fn paired_ratio(path: &[f64], base: &[f64]) -> Option<f64> {
    if path.len() < 2 || path.len() != base.len() || base.iter().any(|b| *b <= 0.0) {
        return None;
    }
    let mut ratios: Vec<f64> = path.iter().zip(base).map(|(p, b)| p / b).collect();
    ratios.sort_by(f64::total_cmp);
    Some(ratios[(ratios.len() - 1) / 2])
}

/// Puts a database back in the same state before every point, so that no path pays for
/// the rows, dead tuples and dirty pages its predecessors left: the ledger emptied, the
/// accounts vacuumed, a checkpoint taken (skipped, with a warning, where the role may not).
/// Waits for a previous point's phase 2 still holding locks.
async fn fresh_start(url: &str) -> anyhow::Result<()> {
    let c = connect(url).await?;
    c.batch_execute("TRUNCATE ledger")
        .await
        .context("truncate ledger")?;
    c.batch_execute("VACUUM ANALYZE acct")
        .await
        .context("vacuum acct")?;
    if let Err(e) = c.batch_execute("CHECKPOINT").await {
        tracing::warn!(error = %e, "CHECKPOINT between points failed; points may pay for each other's dirty pages");
    }
    Ok(())
}

pub async fn run(config: BenchConfig) -> anyhow::Result<Vec<PointResult>> {
    let setup = Setup::new(&config).await?;
    for url in [&setup.urls.0, &setup.urls.1] {
        setup_bank(url, config.accounts, 1_000_000_000).await?;
    }
    let rounds = config.rounds.max(1);
    // rounds[i]: every point of round i, in the same order.
    let mut by_round: Vec<Vec<PointResult>> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if rounds > 1 {
            eprintln!("round {}/{rounds}", round + 1);
        }
        // In every txn id: ids stay unique across runs and rounds.
        let tag = rand::random::<u32>() as u64;
        let mut points = Vec::new();
        for &c in &config.concurrency {
            for path in &config.paths {
                for url in [&setup.urls.0, &setup.urls.1] {
                    fresh_start(url).await?;
                }
                points.push(run_point(&setup, path, c, &config, tag).await?);
            }
        }
        by_round.push(points);
    }
    setup.shutdown().await;
    let mut results = median_rounds(by_round);
    add_ratios(&mut results);
    std::fs::create_dir_all(&config.out_dir)?;
    let json_path = config.out_dir.join("bench.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({
            "duration_s": config.duration.as_secs_f64(),
            "accounts": config.accounts,
            "pg_fsync": config.pg_fsync,
            "rounds": rounds,
            "results": results,
        }))?,
    )?;
    let svg_path = config.out_dir.join("bench.svg");
    std::fs::write(&svg_path, svg(&results))?;
    println!("{}", table(&results));
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(results)
}

/// Redraws `bench.svg` beside a `bench.json` that an earlier run wrote, and prints its
/// table with the ratios computed afresh (after a change to the plot or the report,
/// without measuring again).
pub fn replot(json_path: &std::path::Path) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Run {
        results: Vec<PointResult>,
    }
    let text = std::fs::read_to_string(json_path)
        .with_context(|| format!("read {}", json_path.display()))?;
    let mut run: Run = serde_json::from_str(&text).context("parse the bench results")?;
    add_ratios(&mut run.results);
    let svg_path = json_path.with_file_name("bench.svg");
    std::fs::write(&svg_path, svg(&run.results))?;
    println!("{}", table(&run.results));
    println!("wrote {}", svg_path.display());
    Ok(())
}

pub fn table(results: &[PointResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>4} {:>9} {:>13} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>6} {:>8} {:>9} {:>9}",
        "path",
        "c",
        "tps",
        "tps range",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "aborts",
        "errors",
        "tps/base",
        "paired",
        "p50/base",
        "cpu/txn",
        "bench/txn"
    );
    for r in results {
        let ratio = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let us = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}us"));
        let range = |v: &[f64]| {
            let lo = v.iter().copied().reduce(f64::min);
            let hi = v.iter().copied().reduce(f64::max);
            match (lo, hi) {
                (Some(lo), Some(hi)) if v.len() > 1 => format!("{lo:.0}-{hi:.0}"),
                _ => "-".to_owned(),
            }
        };
        let _ = writeln!(
            s,
            "{:<22} {:>4} {:>9.0} {:>13} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>6} {:>8} {:>6} {:>8} {:>9} {:>9}",
            r.path,
            r.concurrency,
            r.throughput,
            range(&r.throughput_rounds),
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.aborted,
            r.errors,
            ratio(r.throughput_ratio),
            ratio(r.throughput_ratio_paired),
            ratio(r.p50_ratio),
            us(r.cpu_machine_us_per_txn),
            us(r.cpu_bench_us_per_txn)
        );
    }
    s
}

/// Two line charts (throughput and p50/p99 latency against concurrency), one line per path.
pub fn svg(results: &[PointResult]) -> String {
    // The HTTP floor runs at 6-10x single-direct's throughput and 25-45x the 2PC paths':
    // plotted, it would flatten them all. It is in the table and the JSON.
    let plotted: Vec<PointResult> = results
        .iter()
        .filter(|r| r.path != "single-http-floor")
        .cloned()
        .collect();
    let results = &plotted[..];
    let mut paths: Vec<&str> = Vec::new();
    for r in results {
        if !paths.contains(&r.path.as_str()) {
            paths.push(&r.path);
        }
    }
    let mut conc: Vec<usize> = results.iter().map(|r| r.concurrency).collect();
    conc.sort_unstable();
    conc.dedup();
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#000000",
    ];
    let (w, h, pad) = (520.0, 340.0, 55.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * w + 200.0,
        h + 20.0
    );
    let chart = |out: &mut String, x0: f64, title: &str, value: &dyn Fn(&PointResult) -> f64| {
        let max = results.iter().map(value).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let xs =
            |i: usize| x0 + pad + (w - 2.0 * pad) * (i as f64) / ((conc.len().max(2) - 1) as f64);
        let ys = |v: f64| h - pad + 10.0 - (h - 2.0 * pad) * v / max;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="18" font-size="13">{title}</text>"#,
            x0 + pad
        );
        let _ = writeln!(
            out,
            r#"<line x1="{a}" y1="{b}" x2="{c}" y2="{b}" stroke="black"/><line x1="{a}" y1="{d}" x2="{a}" y2="{b}" stroke="black"/>"#,
            a = x0 + pad,
            b = h - pad + 10.0,
            c = x0 + w - pad,
            d = pad - 10.0
        );
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end">{v:.1}</text>"#,
                x0 + pad - 4.0,
                ys(v) + 4.0
            );
        }
        for (i, c) in conc.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{c}</text>"#,
                xs(i),
                h - pad + 24.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">clients</text>"#,
            x0 + w / 2.0,
            h - pad + 38.0
        );
        for (pi, p) in paths.iter().enumerate() {
            let pts: Vec<String> = conc
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    results
                        .iter()
                        .find(|r| r.path == *p && r.concurrency == *c)
                        .map(|r| format!("{:.1},{:.1}", xs(i), ys(value(r))))
                })
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                colors[pi % colors.len()],
                pts.join(" ")
            );
        }
    };
    chart(&mut out, 0.0, "throughput (committed/s)", &|r| r.throughput);
    chart(&mut out, w, "p50 latency (ms)", &|r| r.p50_ms);
    for (pi, p) in paths.iter().enumerate() {
        let y = 40.0 + 16.0 * pi as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{p}</text>"#,
            2.0 * w + 10.0,
            y - 9.0,
            colors[pi % colors.len()],
            2.0 * w + 25.0,
            y
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The decision log alone: `appenders` tasks doing forced appends for `duration`.
pub async fn log_bench(appenders: usize, duration: Duration, dir: PathBuf) -> anyhow::Result<f64> {
    use twopc_coordinator::decision_log::{DecisionLog, LogConfig, Record};
    let _ = std::fs::remove_dir_all(&dir);
    let (log, _) = DecisionLog::open(LogConfig::new(&dir))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..appenders {
        let (log, stop) = (log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let rec = Record::Commit {
                    gid: format!("twopc_bench_1_{t}{n}"),
                    txn_id: format!("bench-{t}-{n}"),
                    participants: vec!["a".into(), "b".into()],
                    decided_at_ms: 0,
                };
                if log.append_forced(rec).await.is_err() {
                    break;
                }
            }
            n
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let stats = log.stats();
    log.close().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let rate = total as f64 / secs;
    println!(
        "decision log: {appenders} appenders, {total} forced appends in {secs:.1}s = {rate:.0}/s, {} fsyncs ({:.1} records per fsync)",
        stats.fsyncs,
        stats.records as f64 / stats.fsyncs.max(1) as f64
    );
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twopc_coordinator::workload::transfer_body;

    fn point(path: &str, throughput: f64) -> PointResult {
        PointResult {
            path: path.into(),
            concurrency: 8,
            seconds: 1.0,
            committed: throughput as u64,
            aborted: 0,
            errors: 0,
            throughput,
            p50_ms: 1000.0 / throughput,
            p99_ms: 0.0,
            p999_ms: 0.0,
            throughput_ratio: None,
            throughput_ratio_paired: None,
            p50_ratio: None,
            cpu_bench_us_per_txn: None,
            cpu_machine_us_per_txn: None,
            throughput_rounds: vec![],
        }
    }

    #[test]
    fn the_typed_body_is_the_workload_body() {
        let legs = [
            BranchBody::new("a", "t1", 3, -5),
            BranchBody::new("b", "t1", 4, 5),
        ];
        let typed = |branches| {
            serde_json::to_value(TxnBody {
                txn_id: "t1",
                branches,
                ack: "durable",
            })
            .unwrap()
        };
        let mut transfer = transfer_body("t1", ("a", 3), ("b", 4), 5);
        transfer["ack"] = json!("durable");
        assert_eq!(typed(&legs), transfer);

        let stmts = twopc_coordinator::bank::credit_statements("t1", 3, 0)
            .into_iter()
            .map(|(sql, params)| json!({"sql": sql, "params": params}))
            .collect::<Vec<_>>();
        let single = json!({"txn_id": "t1", "branches": [{"participant": "a", "statements": stmts}], "ack": "durable"});
        assert_eq!(typed(&[BranchBody::new("a", "t1", 3, 0)]), single);
    }

    #[test]
    fn the_paired_ratio_is_the_median_of_same_round_ratios() {
        // Rounds 2 and 3 ran on a slower machine: the ratio of medians (1,500 / 2,000 =
        // 0.75) mixes rounds, the paired one compares each round with itself.
        let path = [1_800.0, 1_000.0, 1_500.0];
        let base = [2_000.0, 1_250.0, 2_000.0];
        assert_eq!(paired_ratio(&path, &base), Some(0.8));
        assert_eq!(paired_ratio(&[1.0, 2.0], &[2.0, 2.0]), Some(0.5));
        assert_eq!(paired_ratio(&[1.0], &[2.0]), None);
        assert_eq!(paired_ratio(&[1.0, 2.0], &[2.0]), None);
        assert_eq!(paired_ratio(&[1.0, 2.0], &[2.0, 0.0]), None);
    }

    #[test]
    fn median_round_is_reported_whole_with_every_rounds_throughput() {
        let rounds = vec![
            vec![point("a", 300.0), point("b", 10.0)],
            vec![point("a", 100.0), point("b", 30.0)],
            vec![point("a", 200.0), point("b", 20.0)],
        ];
        let r = median_rounds(rounds);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].path.as_str(), r[0].throughput), ("a", 200.0));
        assert_eq!(
            r[0].p50_ms,
            1000.0 / 200.0,
            "the median round's own latency"
        );
        assert_eq!(r[0].throughput_rounds, vec![300.0, 100.0, 200.0]);
        assert_eq!((r[1].path.as_str(), r[1].throughput), ("b", 20.0));
    }

    #[test]
    fn an_even_number_of_rounds_reports_the_lower_middle() {
        let r = median_rounds(vec![vec![point("a", 1.0)], vec![point("a", 4.0)]]);
        assert_eq!(r[0].throughput, 1.0);
        assert_eq!(r[0].throughput_rounds, vec![1.0, 4.0]);
    }
}
