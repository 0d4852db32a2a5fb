//! Handles on participants: the same [`Request`]/[`Response`] whether the agent runs in
//! this process ([`Agent::handle`]) or behind TCP ([`RemoteAgent`]).
//!
//! A remote agent is one multiplexed connection: requests carry ids, a reader task routes
//! responses to their waiters, and a broken connection fails every waiter at once and is
//! re-established (with the handshake) by the next call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use twopc_participant::server::write_batch;
use twopc_participant::Agent;
use twopc_shared::auth::{AuthKey, Role, Transcript};
use twopc_shared::codec::{encode_payload, raw_codec, FrameCodec};
use twopc_shared::msg::{Request, RequestFrame, Response, ResponseFrame};
use twopc_shared::PROTOCOL_VERSION;

/// Why a call got no answer from the agent. In every case the request may or may not
/// have taken effect.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("participant {participant} unreachable: {message}")]
    Unreachable {
        participant: String,
        message: String,
    },
    #[error("participant {participant} did not answer within {timeout_ms} ms")]
    Timeout {
        participant: String,
        timeout_ms: u64,
    },
    #[error("participant {participant}: connection lost")]
    ConnectionLost { participant: String },
    #[error("participant {participant} refused the handshake: {message}")]
    Handshake {
        participant: String,
        message: String,
    },
    /// Nothing was sent: the request does not fit in a frame.
    #[error("participant {participant}: {message}")]
    TooLarge {
        participant: String,
        message: String,
    },
}

impl CallError {
    pub fn kind(&self) -> CallErrorKind {
        match self {
            CallError::Unreachable { .. } => CallErrorKind::Unreachable,
            CallError::Timeout { .. } => CallErrorKind::Timeout,
            CallError::ConnectionLost { .. } => CallErrorKind::ConnectionLost,
            CallError::Handshake { .. } => CallErrorKind::Handshake,
            CallError::TooLarge { .. } => CallErrorKind::TooLarge,
        }
    }
}

/// A call's result in words, for a log line: the error, or what the agent answered.
pub fn describe(result: &Result<Response, CallError>) -> String {
    match result {
        Err(e) => e.to_string(),
        Ok(Response::Failed(e)) => format!("the agent failed: {e}"),
        Ok(r) => format!("unexpected answer {}", r.name()),
    }
}

/// Which way a call failed (a label of `twopc_participant_call_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    Unreachable,
    Timeout,
    ConnectionLost,
    Handshake,
    TooLarge,
}

impl CallErrorKind {
    pub const ALL: [CallErrorKind; 5] = [
        CallErrorKind::Unreachable,
        CallErrorKind::Timeout,
        CallErrorKind::ConnectionLost,
        CallErrorKind::Handshake,
        CallErrorKind::TooLarge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CallErrorKind::Unreachable => "unreachable",
            CallErrorKind::Timeout => "timeout",
            CallErrorKind::ConnectionLost => "connection_lost",
            CallErrorKind::Handshake => "handshake",
            CallErrorKind::TooLarge => "too_large",
        }
    }

    /// Whether the agent is taken as unreachable after it (a request too large to send
    /// says nothing of the agent).
    fn means_unreachable(self) -> bool {
        self != CallErrorKind::TooLarge
    }
}

/// Whether a participant answers: as of its latest call, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// `None` until the first call ends.
    pub reachable: Option<bool>,
    /// When `reachable` took its value (the coordinator's start before the first call).
    pub since: SystemTime,
    /// When the call that set `reachable` began: a call that began earlier and ends
    /// later (a slow timeout) does not overwrite what a newer one found.
    set_by: Instant,
}

/// What the coordinator has seen of one participant's calls.
#[derive(Debug)]
pub struct Health {
    reach: Mutex<Reach>,
    calls: AtomicU64,
    errors: [AtomicU64; CallErrorKind::ALL.len()],
    /// Prepared branches with our GID prefix in its latest listing.
    prepared: AtomicU64,
}

impl Health {
    fn new() -> Health {
        Health {
            reach: Mutex::new(Reach {
                reachable: None,
                since: SystemTime::now(),
                set_by: Instant::now(),
            }),
            calls: AtomicU64::new(0),
            errors: Default::default(),
            prepared: AtomicU64::new(0),
        }
    }

    pub fn reach(&self) -> Reach {
        *lock(&self.reach)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn errors(&self, kind: CallErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    pub fn prepared(&self) -> u64 {
        self.prepared.load(Ordering::Relaxed)
    }

    pub fn set_prepared(&self, n: u64) {
        self.prepared.store(n, Ordering::Relaxed);
    }

    /// Counts a call of `name`, begun at `began`, that ended with `result`, and logs a
    /// change of reachability once: WARN when an outage starts, INFO when it ends.
    fn note<T>(&self, name: &str, began: Instant, result: &Result<T, CallError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reachable = match result {
            Ok(_) => true,
            Err(e) => {
                self.errors[e.kind() as usize].fetch_add(1, Ordering::Relaxed);
                if !e.kind().means_unreachable() {
                    return;
                }
                false
            }
        };
        let mut reach = lock(&self.reach);
        if began < reach.set_by {
            return;
        }
        reach.set_by = began;
        if reach.reachable == Some(reachable) {
            return;
        }
        let now = SystemTime::now();
        let for_ms = now
            .duration_since(reach.since)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match result {
            Err(e) => warn!(participant = name, error = %e, "participant unreachable"),
            Ok(_) if reach.reachable == Some(false) => {
                info!(
                    participant = name,
                    unreachable_ms = for_ms,
                    "participant reachable again"
                )
            }
            Ok(_) => debug!(participant = name, "participant reachable"),
        }
        reach.reachable = Some(reachable);
        reach.since = now;
    }
}

/// One participant, local or remote, and what its calls have shown.
#[derive(Clone)]
pub struct Participant {
    kind: Kind,
    health: Arc<Health>,
}

#[derive(Clone)]
enum Kind {
    Local { name: String, agent: Agent },
    Remote(Arc<RemoteAgent>),
}

impl Participant {
    /// An agent running in this process.
    pub fn local(name: String, agent: Agent) -> Participant {
        Participant {
            kind: Kind::Local { name, agent },
            health: Arc::new(Health::new()),
        }
    }

    /// An agent behind TCP.
    pub fn remote(agent: Arc<RemoteAgent>) -> Participant {
        Participant {
            kind: Kind::Remote(agent),
            health: Arc::new(Health::new()),
        }
    }

    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::Local { name, .. } => name,
            Kind::Remote(r) => &r.name,
        }
    }

    /// The in-process agent, if this is one.
    pub fn local_agent(&self) -> Option<&Agent> {
        match &self.kind {
            Kind::Local { agent, .. } => Some(agent),
            Kind::Remote(_) => None,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The agent keeps a decision table, so it can commit last (as far as we know: a
    /// remote agent says so in each handshake; before the first, we assume not).
    pub fn can_commit_last(&self) -> bool {
        match &self.kind {
            Kind::Local { agent, .. } => agent.keeps_decisions(),
            Kind::Remote(r) => r.decisions.load(Ordering::Relaxed) != 0,
        }
    }

    /// Sends `request` and waits for the answer at most `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Response, CallError> {
        let began = Instant::now();
        let result = match &self.kind {
            Kind::Local { agent, .. } => {
                // The agent enforces the deadline itself; the outer bound only guards
                // against a bug there.
                // Boxed: the agent's future is large and would otherwise be inlined
                // into every caller's, remote or not.
                match tokio::time::timeout(
                    timeout + Duration::from_secs(1),
                    Box::pin(agent.handle(request, timeout)),
                )
                .await
                {
                    Ok(r) => Ok(r),
                    Err(_) => Err(CallError::Timeout {
                        participant: self.name().to_owned(),
                        timeout_ms: timeout.as_millis() as u64,
                    }),
                }
            }
            Kind::Remote(r) => r.call(request, timeout).await,
        };
        self.health.note(self.name(), began, &result);
        result
    }
}

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub connect_timeout_ms: u64,
    pub max_frame_bytes: usize,
    /// Requests waiting to be written on the connection.
    pub send_queue: usize,
    /// A connection nothing was sent on for this long is pinged, well within the agent's
    /// idle connection timeout (two minutes by default), which closes silent ones.
    pub keepalive_interval_ms: u64,
    /// Mutual TLS to the agents (see `twopc_participant::tls::client_config`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Shared key: answer the agent's challenge, and require the agent's proof (see
    /// `twopc_shared::auth`).
    pub auth_key: Option<Arc<AuthKey>>,
}

/// A byte stream to an agent: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            connect_timeout_ms: 2_000,
            max_frame_bytes: twopc_shared::codec::DEFAULT_MAX_FRAME_BYTES,
            send_queue: 4096,
            keepalive_interval_ms: 30_000,
            tls: None,
            auth_key: None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Conn {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    /// Cancelled (before `pending` is cleared) when the connection fails.
    dead: CancellationToken,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.dead.is_cancelled()
    }
}

/// A participant agent reached over TCP.
pub struct RemoteAgent {
    pub name: String,
    pub addr: String,
    coordinator_id: String,
    epoch: u64,
    config: RemoteConfig,
    next_id: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// The agent can commit last: the id of the live connection whose handshake said so,
    /// or 0 (an agent we cannot reach is not chosen to commit last). An id, not a flag,
    /// so a dying old connection cannot clear what a newer one set.
    decisions: Arc<AtomicU64>,
    conn_seq: AtomicU64,
}

impl RemoteAgent {
    pub fn new(
        name: String,
        addr: String,
        coordinator_id: String,
        epoch: u64,
        config: RemoteConfig,
    ) -> RemoteAgent {
        RemoteAgent {
            name,
            addr,
            coordinator_id,
            epoch,
            config,
            next_id: AtomicU64::new(1),
            conn: tokio::sync::Mutex::new(None),
            decisions: Arc::new(AtomicU64::new(0)),
            conn_seq: AtomicU64::new(1),
        }
    }

    pub async fn call(&self, body: Request, timeout: Duration) -> Result<Response, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = tokio::time::timeout_at(deadline, self.connection())
            .await
            .map_err(|_| self.timeout_error(timeout))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = RequestFrame {
            id,
            timeout_ms: timeout.as_millis() as u64,
            body,
        };
        let frame = encode_payload(&frame, self.config.max_frame_bytes).map_err(|e| {
            CallError::TooLarge {
                participant: self.name.clone(),
                message: e.to_string(),
            }
        })?;
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(id, tx);
        if conn.is_closed() {
            // The reader may have cleared `pending` before our insert.
            lock(&conn.pending).remove(&id);
            return Err(CallError::ConnectionLost {
                participant: self.name.clone(),
            });
        }
        let sent = tokio::time::timeout_at(deadline, conn.tx.send(frame)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                lock(&conn.pending).remove(&id);
                return Err(CallError::ConnectionLost {
                    participant: self.name.clone(),
                });
            }
            Err(_) => {
                lock(&conn.pending).remove(&id);
                return Err(self.timeout_error(timeout));
            }
        }
        // Give the agent a little longer than its own deadline so its timeout answer
        // (which says what it rolled back) usually arrives.
        let grace = Duration::from_millis(500);
        match tokio::time::timeout_at(deadline + grace, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(CallError::ConnectionLost {
                participant: self.name.clone(),
            }),
            Err(_) => {
                lock(&conn.pending).remove(&id);
                Err(self.timeout_error(timeout))
            }
        }
    }

    /// Connections opened to the agent so far (each with its own handshake).
    pub fn connections_opened(&self) -> u64 {
        self.conn_seq.load(Ordering::Relaxed) - 1
    }

    fn timeout_error(&self, timeout: Duration) -> CallError {
        CallError::Timeout {
            participant: self.name.clone(),
            timeout_ms: timeout.as_millis() as u64,
        }
    }

    /// The live connection, or a new one (connect + handshake).
    async fn connection(&self) -> Result<Arc<Conn>, CallError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        // Boxed: rare, and its future is large.
        let conn = Arc::new(Box::pin(self.connect()).await?);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Conn, CallError> {
        let unreachable = |message: String| CallError::Unreachable {
            participant: self.name.clone(),
            message,
        };
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| unreachable(format!("connect to {} timed out", self.addr)))?
            .map_err(|e| unreachable(format!("connect to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = match &self.config.tls {
            None => Box::new(stream),
            Some(tls) => {
                let host = self
                    .addr
                    .rsplit_once(':')
                    .map_or(self.addr.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| unreachable(format!("server name {host:?}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let s = tokio::time::timeout(connect_timeout, connector.connect(name, stream))
                    .await
                    .map_err(|_| unreachable("TLS handshake timed out".into()))?
                    .map_err(|e| CallError::Handshake {
                        participant: self.name.clone(),
                        message: format!("TLS: {e}"),
                    })?;
                Box::new(s)
            }
        };
        let (read_half, write_half) = tokio::io::split(stream);
        let mut stream = FramedRead::new(
            read_half,
            FrameCodec::<ResponseFrame, RequestFrame>::new(self.config.max_frame_bytes),
        );
        let mut sink = FramedWrite::new(write_half, raw_codec(self.config.max_frame_bytes));
        let conn_id = self.conn_seq.fetch_add(1, Ordering::Relaxed);
        let coordinator_nonce = self
            .config
            .auth_key
            .as_ref()
            .map(|_| twopc_participant::auth::new_nonce());
        let frame = |body| RequestFrame {
            id: 0,
            timeout_ms: self.config.connect_timeout_ms,
            body,
        };
        let hello = frame(Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            coordinator_id: self.coordinator_id.clone(),
            epoch: self.epoch,
            nonce: coordinator_nonce.clone(),
        });
        let max_frame_bytes = self.config.max_frame_bytes;
        // The agent's nonce, once it challenged us: the transcript both proofs cover.
        let mut agent_nonce = None;
        let handshake = async {
            let bytes = encode_payload(&hello, max_frame_bytes).map_err(|e| e.to_string())?;
            sink.send(bytes).await.map_err(|e| e.to_string())?;
            loop {
                let body = match stream.next().await {
                    Some(Ok(f)) => f.body,
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("closed during handshake".to_owned()),
                };
                let Response::Challenge { nonce } = body else {
                    return Ok(body);
                };
                let (Some(key), Some(ours), None) =
                    (&self.config.auth_key, &coordinator_nonce, &agent_nonce)
                else {
                    return Err(
                        "the agent asks for the shared key: configure --agent-auth-key-file"
                            .to_owned(),
                    );
                };
                let transcript = Transcript {
                    protocol_version: PROTOCOL_VERSION,
                    coordinator_id: &self.coordinator_id,
                    epoch: self.epoch,
                    coordinator_nonce: ours,
                    agent_nonce: &nonce,
                };
                let proof = key.proof(Role::Coordinator, &transcript);
                agent_nonce = Some(nonce);
                let bytes =
                    encode_payload(&frame(Request::Authenticate { proof }), max_frame_bytes)
                        .map_err(|e| e.to_string())?;
                sink.send(bytes).await.map_err(|e| e.to_string())?;
            }
        };
        let reply = tokio::time::timeout(connect_timeout, handshake)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|message| CallError::Handshake {
                participant: self.name.clone(),
                message,
            })?;
        match reply {
            Response::Hello {
                agent_name,
                database,
                build_version,
                decisions,
                epochs_durable,
                proof,
                ..
            } => {
                if let (Some(key), Some(ours)) = (&self.config.auth_key, &coordinator_nonce) {
                    // The agent proves it holds the key too: an impostor at its address
                    // gets no transaction.
                    let proven = match (&agent_nonce, &proof) {
                        (Some(theirs), Some(proof)) => key.verify(
                            Role::Agent,
                            &Transcript {
                                protocol_version: PROTOCOL_VERSION,
                                coordinator_id: &self.coordinator_id,
                                epoch: self.epoch,
                                coordinator_nonce: ours,
                                agent_nonce: theirs,
                            },
                            proof,
                        ),
                        _ => false,
                    };
                    if !proven {
                        return Err(CallError::Handshake {
                            participant: self.name.clone(),
                            message: format!(
                                "the agent at {} did not prove it holds the shared key",
                                self.addr
                            ),
                        });
                    }
                }
                let id = if decisions { conn_id } else { 0 };
                self.decisions.store(id, Ordering::Relaxed);
                info!(participant = %self.name, addr = %self.addr, %agent_name, %database, %build_version, decisions, epochs_durable, authenticated = self.config.auth_key.is_some(), "connected to agent");
                if !epochs_durable {
                    warn!(participant = %self.name, "the agent keeps fencing epochs in memory only (no usable twopc.epochs table): a restart of it forgets which incarnations are stale");
                }
            }
            Response::Failed(e) => {
                return Err(CallError::Handshake {
                    participant: self.name.clone(),
                    message: e.message,
                })
            }
            other => {
                return Err(CallError::Handshake {
                    participant: self.name.clone(),
                    message: format!("unexpected reply {other:?}"),
                })
            }
        }

        let (tx, mut rx) = mpsc::channel::<Bytes>(self.config.send_queue);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let name = self.name.clone();
        let dead = CancellationToken::new();
        // Writer: batches whatever is queued into one flush. Ends when the connection is
        // dead or every sender is gone; a write failure kills the connection.
        let writer_dead = dead.clone();
        // Sent when nothing else was for `keepalive_interval_ms`: the agent closes a
        // connection that stays silent (`ServerConfig::idle_connection_timeout_ms`).
        // Its answer carries id 0, which no caller waits for.
        let ping = encode_payload(&frame(Request::Ping), max_frame_bytes).map_err(|e| {
            CallError::Handshake {
                participant: self.name.clone(),
                message: e.to_string(),
            }
        })?;
        let keepalive = Duration::from_millis(self.config.keepalive_interval_ms.max(1));
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = writer_dead.cancelled() => return,
                    f = tokio::time::timeout(keepalive, rx.recv()) => match f {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(_) => ping.clone(),
                    },
                };
                if write_batch(frame, &mut rx, &mut sink).await.is_err() {
                    writer_dead.cancel();
                    return;
                }
            }
        });
        let reader_pending = pending.clone();
        let reader_dead = dead.clone();
        let decisions = self.decisions.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = reader_dead.cancelled() => break,
                    f = stream.next() => match f { Some(f) => f, None => break },
                };
                match frame {
                    Ok(f) => {
                        if let Some(waiter) = lock(&reader_pending).remove(&f.id) {
                            let _ = waiter.send(f.body);
                        } else if f.id != 0 {
                            debug!(participant = %name, id = f.id, "response for a request nobody waits for");
                        }
                    }
                    Err(e) => {
                        warn!(participant = %name, error = %e, "bad frame from agent; dropping connection");
                        break;
                    }
                }
            }
            // Mark the connection dead first, then fail every waiter (dropping the
            // senders wakes them with an error).
            let _ = decisions.compare_exchange(conn_id, 0, Ordering::Relaxed, Ordering::Relaxed);
            reader_dead.cancel();
            lock(&reader_pending).clear();
            debug!(participant = %name, "agent connection closed");
        });
        Ok(Conn { tx, pending, dead })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
