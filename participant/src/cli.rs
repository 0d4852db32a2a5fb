//! The `twopc-participant` command line: serves one database to a twopc coordinator.
//! (The binary is a thin wrapper over [`run`].)

use crate::server::{serve, ServerConfig};
use crate::{Agent, AgentConfig};
use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "twopc-participant",
    version,
    about = "twopc participant agent: fronts one PostgreSQL database"
)]
struct Args {
    /// Address to listen on for the coordinator.
    #[arg(long, env = "TWOPC_LISTEN", default_value = "127.0.0.1:7001")]
    listen: String,
    /// The database this agent fronts, e.g. postgresql://twopc@127.0.0.1:5432/bank.
    #[arg(long, env = "TWOPC_DATABASE")]
    database: String,
    /// The same database as the role that owns schema twopc (the decision and epoch
    /// tables), e.g. postgresql://twopc_system@127.0.0.1:5432/bank. Client statements
    /// run as --database's role, which then gets only EXECUTE on the commit function:
    /// they cannot read or write the decision table. Without it --database's role keeps
    /// the tables, and client statements can forge decision rows (warned at start).
    #[arg(long, env = "TWOPC_SYSTEM_DATABASE")]
    system_database: Option<String>,
    /// File holding the password of --database's role (when the URL has none). The
    /// environment variable TWOPC_DATABASE_PASSWORD works too; neither shows in `ps`.
    #[arg(long, env = "TWOPC_DATABASE_PASSWORD_FILE")]
    database_password_file: Option<std::path::PathBuf>,
    /// File holding the password of --system-database's role (when the URL has none;
    /// default: --database's password). Or TWOPC_SYSTEM_DATABASE_PASSWORD.
    #[arg(long, env = "TWOPC_SYSTEM_DATABASE_PASSWORD_FILE")]
    system_database_password_file: Option<std::path::PathBuf>,
    /// Participant name reported to the coordinator (defaults to the database name).
    #[arg(long, env = "TWOPC_NAME")]
    name: Option<String>,
    /// Sessions in the connection pool.
    #[arg(long, env = "TWOPC_POOL_SIZE", default_value_t = 32)]
    pool_size: usize,
    /// A request waits this long for a free session, then is refused as retryable
    /// (nothing ran).
    #[arg(long, env = "TWOPC_POOL_WAIT_TIMEOUT_MS", default_value_t = crate::agent::DEFAULT_POOL_WAIT_TIMEOUT_MS)]
    pool_wait_timeout_ms: u64,
    /// Branches with an open session (interactive transactions) at once.
    #[arg(long, env = "TWOPC_MAX_OPEN_BRANCHES", default_value_t = 256)]
    max_open_branches: usize,
    /// Agent certificate (PEM) for mutual TLS; with --tls-key and --tls-client-ca the
    /// agent accepts only TLS connections with a client certificate signed by that CA.
    #[arg(long, env = "TWOPC_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Agent private key (PEM).
    #[arg(long, env = "TWOPC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) that must have signed the coordinator's client certificate.
    #[arg(long, env = "TWOPC_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Shared key file (hex, at least 32 bytes, e.g. `openssl rand -hex 32 > FILE`):
    /// coordinators must prove they hold the same key (the coordinator's
    /// --agent-auth-key-file) before anything runs.
    #[arg(long, env = "TWOPC_AUTH_KEY_FILE")]
    auth_key_file: Option<std::path::PathBuf>,
    /// Coordinator ids this agent serves (repeatable or comma-separated); without it,
    /// any id the key or certificate authenticates. A connection acts for the one id it
    /// authenticated as.
    #[arg(
        long = "coordinator-id",
        env = "TWOPC_COORDINATOR_IDS",
        value_delimiter = ','
    )]
    coordinator_ids: Vec<String>,
    /// Serve coordinators that do not authenticate (no key, no TLS): development only;
    /// refused unless --listen is a loopback address.
    #[arg(long, env = "TWOPC_INSECURE")]
    insecure: bool,
    /// statement_timeout of the agent's sessions (0 = none).
    #[arg(long, env = "TWOPC_STATEMENT_TIMEOUT_MS", default_value_t = 60_000)]
    statement_timeout_ms: u64,
    /// lock_timeout of the agent's sessions (0 = none).
    #[arg(long, env = "TWOPC_LOCK_TIMEOUT_MS", default_value_t = 30_000)]
    lock_timeout_ms: u64,
    /// An open branch with no request for this long is rolled back.
    #[arg(long, env = "TWOPC_IDLE_BRANCH_TIMEOUT_MS", default_value_t = 300_000)]
    idle_branch_timeout_ms: u64,
    /// Branches kept prepared at once (0 = the server's max_prepared_transactions).
    #[arg(long, env = "TWOPC_MAX_PREPARED_BRANCHES", default_value_t = 0)]
    max_prepared_branches: u64,
    /// Do not keep the decision table (twopc.decisions): this agent is then never the
    /// one that commits last in a last-agent transaction.
    #[arg(long, env = "TWOPC_NO_DECISION_TABLE")]
    no_decision_table: bool,
    /// Aborted rows of the decision table are deleted after this long. Keep it far
    /// above the coordinator's longest transaction timeout.
    #[arg(long, env = "TWOPC_DECISION_RETENTION_MS", default_value_t = 3_600_000)]
    decision_retention_ms: u64,
    /// Coordinator connections at once; more are refused (with a warning at most every
    /// 10 s).
    #[arg(long, env = "TWOPC_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: usize,
    /// An authenticated connection silent this long (no request running) is closed
    /// (0: never); coordinators ping idle connections every 30 s, so keep it well above.
    #[arg(
        long,
        env = "TWOPC_IDLE_CONNECTION_TIMEOUT_MS",
        default_value_t = 120_000
    )]
    idle_connection_timeout_ms: u64,
    /// Largest frame accepted from the coordinator, in bytes.
    #[arg(long, env = "TWOPC_MAX_FRAME_BYTES", default_value_t = twopc_shared::codec::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Log lines as text (colours only on a terminal) or one JSON object per event.
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Parses the command line and serves until SIGINT/SIGTERM.
pub fn run() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(run_async())
}

async fn run_async() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format, "info");
    let name = match args.name {
        Some(n) => n,
        None => args
            .database
            .rsplit('/')
            .next()
            .and_then(|s| s.split('?').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("participant")
            .to_owned(),
    };
    let mut config = AgentConfig::new(name, args.database);
    config.system_database_url = args.system_database;
    config.password = password(
        args.database_password_file.as_deref(),
        "TWOPC_DATABASE_PASSWORD",
    )?;
    config.system_password = password(
        args.system_database_password_file.as_deref(),
        "TWOPC_SYSTEM_DATABASE_PASSWORD",
    )?;
    config.pool_size = args.pool_size;
    config.pool_wait_timeout_ms = args.pool_wait_timeout_ms;
    config.max_open_branches = args.max_open_branches;
    config.statement_timeout_ms = args.statement_timeout_ms;
    config.lock_timeout_ms = args.lock_timeout_ms;
    config.idle_branch_timeout_ms = args.idle_branch_timeout_ms;
    // The server cuts off a session idle in a transaction a little after our reaper would.
    config.idle_in_transaction_timeout_ms = args.idle_branch_timeout_ms + 60_000;
    config.max_prepared_branches = args.max_prepared_branches;
    config.decision_table = !args.no_decision_table;
    config.decision_retention_ms = args.decision_retention_ms;
    // An answer must fit in a frame: rows are counted against it as they are read.
    config.max_result_bytes = args.max_frame_bytes as u64;
    anyhow::ensure!(
        args.idle_connection_timeout_ms == 0 || args.idle_connection_timeout_ms >= 60_000,
        "--idle-connection-timeout-ms must be 0 (never) or at least 60000: coordinators ping \
         idle connections every 30 s"
    );
    for id in &args.coordinator_ids {
        twopc_shared::gid::validate_coordinator_id(id).context("--coordinator-id")?;
    }
    let key = match &args.auth_key_file {
        Some(path) => Some(std::sync::Arc::new(crate::auth::load_key_file(path)?)),
        None => None,
    };
    let auth = crate::auth::Authentication {
        key,
        coordinator_ids: args.coordinator_ids.clone(),
        insecure: args.insecure,
    };
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(c), Some(k), Some(ca)) => {
            Some(crate::tls::server_config(c, k, ca).context("load TLS certificates")?)
        }
        _ => None,
    };
    // Refused before the database is touched.
    let addrs = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("resolve --listen {}", args.listen))?;
    for addr in addrs {
        crate::auth::check_listen(&auth, tls.is_some(), addr)?;
    }
    let agent = Agent::connect(config).await.context("start agent")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        tracing::info!(signal, "agent shutting down");
        on_signal.cancel();
    });
    let server_config = ServerConfig {
        max_frame_bytes: args.max_frame_bytes,
        max_connections: args.max_connections,
        idle_connection_timeout_ms: args.idle_connection_timeout_ms,
        tls,
        auth,
        ..ServerConfig::default()
    };
    tracing::info!(listen = %args.listen, "agent serving");
    serve(agent.clone(), listener, server_config, shutdown)
        .await
        .context("serve agent")?;
    // Sessions end with a Terminate message rather than a dropped socket (which the
    // server logs as an unexpected EOF, once per session).
    agent.close();
    tracing::info!("agent stopped");
    Ok(())
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, for people; colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per event (`timestamp`, `level`, `target`, the message and its
    /// fields, and the span's fields such as `txn_id` and `gid`), for log collectors.
    Json,
}

/// Logs to stderr at `RUST_LOG`'s levels, else `default_filter`'s; the `log` records of
/// dependencies too (see [`LogBridge`]).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let set = match format {
        LogFormat::Text => tracing::subscriber::set_global_default(
            builder.with_ansi(std::io::stderr().is_terminal()).finish(),
        ),
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    };
    if set.is_err() {
        return; // Already set (a test, or a second call): keep that one.
    }
    let max = match tracing::level_filters::LevelFilter::current().into_level() {
        None => log::LevelFilter::Off,
        Some(tracing::Level::ERROR) => log::LevelFilter::Error,
        Some(tracing::Level::WARN) => log::LevelFilter::Warn,
        Some(tracing::Level::INFO) => log::LevelFilter::Info,
        Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
        Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
    };
    if log::set_boxed_logger(Box::new(LogBridge(tracing_log::LogTracer::new()))).is_ok() {
        log::set_max_level(max);
    }
}

/// Dependencies' `log` records as tracing events, but a PostgreSQL notice or warning
/// about a statement (tokio-postgres logs each at INFO) at DEBUG: it concerns the
/// client's SQL, not the operator.
struct LogBridge(tracing_log::LogTracer);

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target().starts_with("tokio_postgres") && record.level() == log::Level::Info {
            tracing::debug!(target: "twopc::postgres_notice", "{}", record.args());
        } else {
            self.0.log(record);
        }
    }

    fn flush(&self) {}
}

/// A database password from `file` (its first line) or else the environment variable
/// `var`; None when neither is set.
fn password(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<Option<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read password file {}", path.display()))?;
        let pw = text.lines().next().unwrap_or("").to_owned();
        anyhow::ensure!(!pw.is_empty(), "password file {} is empty", path.display());
        return Ok(Some(pw));
    }
    Ok(std::env::var(var).ok().filter(|v| !v.is_empty()))
}

/// Resolves on SIGINT or SIGTERM, naming which ("interrupted" or "terminated"). Both
/// are listened to from the first poll on.
pub async fn shutdown_signal() -> &'static str {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return "interrupted";
                }
            };
        tokio::select! {
            _ = ctrl_c => "interrupted",
            _ = term.recv() => "terminated",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        "interrupted"
    }
}
