//! Starting a coordinator: identity (epoch), decision log, participants, engine, HTTP.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use twopc_participant::{Agent, AgentConfig};

use crate::config::{ParticipantSpec, ServeConfig};
use crate::decision_log::{DecisionLog, LogConfig};
use crate::engine::Engine;
use crate::http::{router, HttpConfig};
use crate::meta;
use crate::participant::{Participant, RemoteAgent, RemoteConfig};

/// A coordinator serving HTTP. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub engine: Engine,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Released when the coordinator is shut down (or its process dies).
    _data_dir_lock: meta::DataDirLock,
}

impl Running {
    /// Stops accepting requests, lets in-flight ones finish, flushes the log.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.engine.drain();
        self.shutdown.cancel();
        self.server.await.context("join HTTP server")??;
        self.engine.shutdown();
        self.engine
            .log()
            .clone()
            .close()
            .await
            .context("close decision log")?;
        Ok(())
    }

    /// Waits until the server stops (after `token` is cancelled).
    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Builds the participant handles of `config` (in-process agents connect now).
pub async fn participants(config: &ServeConfig, epoch: u64) -> anyhow::Result<Vec<Participant>> {
    let tls = match (
        &config.agent_tls_cert,
        &config.agent_tls_key,
        &config.agent_ca,
    ) {
        (Some(c), Some(k), Some(ca)) => Some(
            twopc_participant::tls::client_config(c, k, ca)
                .context("load agent TLS certificates")?,
        ),
        (None, None, None) => None,
        _ => anyhow::bail!("agent TLS needs all of agent_tls_cert, agent_tls_key and agent_ca"),
    };
    let auth_key = match &config.agent_auth_key_file {
        Some(path) => Some(std::sync::Arc::new(
            twopc_participant::auth::load_key_file(path).context("load the agent auth key")?,
        )),
        None => None,
    };
    let mut out = Vec::new();
    for (name, spec) in &config.participants {
        match ParticipantSpec::parse(spec) {
            ParticipantSpec::Remote(addr) => {
                out.push(Participant::remote(std::sync::Arc::new(RemoteAgent::new(
                    name.clone(),
                    addr,
                    config.coordinator_id.clone(),
                    epoch,
                    RemoteConfig {
                        tls: tls.clone(),
                        auth_key: auth_key.clone(),
                        ..RemoteConfig::default()
                    },
                ))))
            }
            ParticipantSpec::InProcess(url) => {
                let agent = Agent::connect(AgentConfig::new(name.clone(), url))
                    .await
                    .with_context(|| format!("start in-process agent {name}"))?;
                out.push(Participant::local(name.clone(), agent));
            }
        }
    }
    Ok(out)
}

/// Bounds on the client API's connections (slow or idle clients must not hold the
/// coordinator's file descriptors).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once; one more is closed at once (a warning every 10 s).
    pub max_connections: usize,
    /// A connection must send a request's complete headers within this long of opening
    /// or of its previous answer: a slow client (slowloris) and an idle keep-alive
    /// connection are both closed after it. Also bounds the TLS handshake.
    pub header_timeout: std::time::Duration,
}

/// Counts a connection as open until dropped.
struct OpenConnection(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(open: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The client API, plain or over TLS: accept (at most `max_connections` open), handshake
/// (bounded), then hyper with a header-read timeout. When `stop` is cancelled it stops
/// accepting, lets open connections finish the requests they are serving, and returns.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    limits: HttpLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            if last_warning.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
                tracing::warn!(%peer, max = limits.max_connections, "too many client connections; closing new ones");
                last_warning = Some(std::time::Instant::now());
            }
            drop(tcp);
            continue;
        }
        let counted = OpenConnection::new(&open);
        // Answers go out at once, not held back by Nagle behind an unacknowledged segment.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, watcher) = (acceptor.clone(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _counted = counted;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let served = match acceptor {
                None => {
                    let conn = builder
                        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "client TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let conn = builder.serve_connection_with_upgrades(
                        hyper_util::rt::TokioIo::new(stream),
                        service,
                    );
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Starts a coordinator: bumps the epoch, opens (and repairs) the log, resumes phase 2
/// of logged decisions, and serves HTTP on `config.listen`.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    config.validate()?;
    let api_token = match &config.api_token_file {
        Some(path) => Some(crate::http::read_token_file(path)?),
        None => None,
    };
    let admin_token = match &config.admin_token_file {
        Some(path) => Some(crate::http::read_token_file(path)?),
        None => None,
    };
    if let (Some(a), Some(b)) = (&api_token, &admin_token) {
        anyhow::ensure!(a != b, "the admin token must differ from the client token");
    }
    let api_tls = match (&config.api_tls_cert, &config.api_tls_key) {
        (Some(c), Some(k)) => Some(
            twopc_participant::tls::plain_server_config(c, k)
                .context("load API TLS certificate")?,
        ),
        (None, None) => None,
        _ => anyhow::bail!("API TLS needs both api_tls_cert and api_tls_key"),
    };
    // Everything that can fail without changing anything comes first: the port, then
    // the data directory's lock. Only with both held is the epoch bumped and the log
    // opened (and repaired), so a second `serve` on a directory or port in use changes
    // nothing.
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let data_dir_lock = meta::lock_data_dir(&config.data_dir).context("lock the data directory")?;
    let meta =
        meta::bump_epoch(&config.data_dir, &config.coordinator_id).context("start a new epoch")?;
    info!(coordinator_id = %meta.coordinator_id, epoch = meta.epoch, "coordinator starting");
    let mut log_config = LogConfig::new(config.data_dir.join("log"));
    log_config.group_commit = config.group_commit;
    log_config.retention_ms = config.log_retention_ms;
    log_config.segment_max_bytes = config.log_segment_max_bytes;
    log_config.discard_corrupt_tail = config.log_discard_corrupt_tail;
    let (log, replay) = tokio::task::spawn_blocking(move || DecisionLog::open(log_config))
        .await
        .context("join log open")?
        .context("open decision log")?;
    if replay.truncated_bytes > 0 {
        info!(
            truncated_bytes = replay.truncated_bytes,
            "decision log had a torn tail; truncated"
        );
    }
    let parts = participants(&config, meta.epoch).await?;
    let engine = Engine::new(config.engine_config(), meta.epoch, parts, log, &replay);
    engine.spawn_background();

    let addr = listener.local_addr().context("read listen address")?;
    let app = router(
        engine.clone(),
        HttpConfig {
            max_body_bytes: config.max_body_bytes,
            api_token,
            admin_token,
        },
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let limits = HttpLimits {
        max_connections: config.http_max_connections,
        header_timeout: std::time::Duration::from_millis(config.http_header_timeout_ms),
    };
    let server = tokio::spawn(serve_http(listener, app, api_tls, limits, stop));
    info!(%addr, "coordinator listening");
    Ok(Running {
        addr,
        engine,
        shutdown,
        server,
        _data_dir_lock: data_dir_lock,
    })
}
