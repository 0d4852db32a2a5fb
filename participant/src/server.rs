//! The agent's TCP server: length-delimited JSON frames ([`FrameCodec`]), a handshake
//! first (version, authentication of the coordinator, its epoch), then requests handled
//! concurrently (responses go back in completion order, matched by request id). Every
//! request is checked against the coordinator id the connection authenticated as
//! ([`crate::auth::authorize`]) and that id's newest epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use twopc_shared::auth::{valid_nonce, Role, Transcript};
use twopc_shared::codec::{encode_payload, raw_codec, FrameCodec};
use twopc_shared::gid::validate_coordinator_id;
use twopc_shared::msg::{
    AgentError, BranchOutcome, ErrorKind, Request, RequestFrame, Response, ResponseFrame,
    StmtResult,
};
use twopc_shared::PROTOCOL_VERSION;

use crate::agent::Agent;
pub use crate::auth::ServeError;
use crate::auth::{authorize, certificate_names, check_listen, new_nonce, Authentication};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_frame_bytes: usize,
    /// Requests of one connection being handled at once; further frames wait (TCP
    /// back-pressure reaches the coordinator).
    pub max_in_flight_per_connection: usize,
    /// Connections at once.
    pub max_connections: usize,
    /// Longest deadline a request may ask for.
    pub max_request_timeout_ms: u64,
    /// A connection must complete the handshake within this.
    pub handshake_timeout_ms: u64,
    /// An authenticated connection with no request in flight that sends nothing for
    /// this long is closed (coordinators ping idle connections, every 30 s by default:
    /// `RemoteConfig::keepalive_interval_ms`). 0: never. Keep it well above the
    /// coordinators' keepalive interval.
    pub idle_connection_timeout_ms: u64,
    /// Mutual TLS (see [`crate::tls::server_config`]); `None`: plaintext. The client
    /// certificate must name the coordinator id (a DNS subject alternative name).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Shared key, the coordinator ids served, `insecure`. Without a key, TLS or
    /// `insecure`, [`serve`] refuses to start.
    pub auth: Authentication,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_bytes: twopc_shared::codec::DEFAULT_MAX_FRAME_BYTES,
            max_in_flight_per_connection: 1024,
            max_connections: 256,
            max_request_timeout_ms: 10 * 60 * 1000,
            handshake_timeout_ms: 10_000,
            idle_connection_timeout_ms: 120_000,
            tls: None,
            auth: Authentication::default(),
        }
    }
}

/// Serves `agent` on `listener` until `shutdown` is cancelled. Refuses to start without
/// authentication (a key or TLS) unless `config.auth.insecure`, and with `insecure` on
/// anything but a loopback address.
pub async fn serve(
    agent: Agent,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    check_listen(&config.auth, config.tls.is_some(), addr)?;
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let authentication = match (&config.auth.key, &config.tls) {
        (Some(_), Some(_)) => "key and mutual TLS",
        (Some(_), None) => "key",
        (None, Some(_)) => "mutual TLS",
        (None, None) => "none (--insecure)",
    };
    if config.auth.key.is_none() && config.tls.is_none() {
        warn!(%addr, "serving without authentication (--insecure): anyone who can connect to this address commands the agent");
    }
    let mut refusals = Refusals::default();
    info!(%addr, agent = agent.name(), authentication, coordinator_ids = ?config.auth.coordinator_ids, epochs_durable = agent.epochs_durable(), "agent listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(refused) = refusals.refused(Instant::now()) {
                warn!(%peer, limit = config.max_connections, refused, "too many connections; refusing (warned at most every {} s)", REFUSAL_WARNING_INTERVAL.as_secs());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let agent = agent.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move {
                let result = match config.tls.clone() {
                    None => connection(agent, stream, None, config, shutdown).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        let handshake = tokio::time::timeout(
                            Duration::from_millis(config.handshake_timeout_ms),
                            acceptor.accept(stream),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(s)) => {
                                let cert = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| c.clone().into_owned());
                                connection(agent, s, Some(cert), config, shutdown).await
                            }
                            Ok(Err(e)) => {
                                warn!(error = %e, "TLS handshake refused");
                                Ok(())
                            }
                            Err(_) => {
                                warn!("TLS handshake timed out");
                                Ok(())
                            }
                        }
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection closed");
                }
                drop(permit);
            }
            .instrument(tracing::info_span!("conn", %peer)),
        );
    }
}

/// How often the agent warns that it refuses connections over its limit.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// The largest frame read before the coordinator authenticated (a Hello or an
/// Authenticate is a few hundred bytes): an unauthenticated peer holds at most this
/// much of the agent's memory, so all of them together at most `max_connections` times it.
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Connections refused over the limit, warned about at most once per
/// [`REFUSAL_WARNING_INTERVAL`] (a flood must not flood the log too).
#[derive(Default)]
struct Refusals {
    since_warning: u64,
    warned_at: Option<Instant>,
}

impl Refusals {
    /// Counts one refusal; `Some(refusals since the last warning)` when it is time to warn.
    fn refused(&mut self, now: Instant) -> Option<u64> {
        self.since_warning += 1;
        let due = self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_WARNING_INTERVAL);
        if !due {
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.since_warning))
    }
}

/// `tls_client`: `None` for plaintext, `Some(certificate)` over TLS (always present:
/// the verifier requires one).
async fn connection<S>(
    agent: Agent,
    stream: S,
    tls_client: Option<Option<CertificateDer<'static>>>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames = FramedRead::new(
        read_half,
        FrameCodec::<RequestFrame, ResponseFrame>::new(
            HANDSHAKE_MAX_FRAME_BYTES.min(config.max_frame_bytes),
        ),
    );
    let mut sink = FramedWrite::new(write_half, raw_codec(config.max_frame_bytes));

    let handshake_timeout = Duration::from_millis(config.handshake_timeout_ms);
    let Some(hello) = next_frame(&mut frames, handshake_timeout).await? else {
        return Ok(());
    };
    let authenticated = match handshake(
        &agent,
        hello.body,
        tls_client.as_ref(),
        &config,
        &mut frames,
        &mut sink,
        hello.id,
    )
    .await?
    {
        Ok((coordinator_id, epoch, reply)) => {
            let bytes = encode_response(hello.id, reply, config.max_frame_bytes);
            sink.send(bytes).await?;
            debug!(coordinator_id, epoch, "handshake done");
            (coordinator_id, epoch)
        }
        Err(e) => {
            warn!(kind = ?e.kind, "refused a coordinator's handshake: {}", e.message);
            let bytes = encode_response(hello.id, Response::Failed(e), config.max_frame_bytes);
            sink.send(bytes).await?;
            return Ok(());
        }
    };
    // Every later request of this connection acts for this coordinator id only, and is
    // checked against the newest epoch of it.
    let identity = Arc::new(authenticated);
    frames
        .decoder_mut()
        .set_max_frame_bytes(config.max_frame_bytes);
    // 0: never closed for silence (about 31 years is never).
    let idle_timeout = match config.idle_connection_timeout_ms {
        0 => Duration::from_secs(1 << 30),
        ms => Duration::from_millis(ms),
    };

    let (tx, mut rx) = mpsc::channel::<Bytes>(config.max_in_flight_per_connection);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            write_batch(frame, &mut rx, &mut sink).await?;
        }
        Ok::<_, std::io::Error>(())
    });

    let in_flight = Arc::new(Semaphore::new(config.max_in_flight_per_connection));
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            f = tokio::time::timeout(idle_timeout, frames.next()) => match f {
                Ok(f) => f,
                // Silent for the whole idle timeout: only then is a connection with
                // requests still running kept (their answers are on the way).
                Err(_) if in_flight.available_permits() == config.max_in_flight_per_connection => {
                    info!(idle_ms = config.idle_connection_timeout_ms, "closing an idle connection");
                    break;
                }
                Err(_) => continue,
            },
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                warn!(error = %e, "bad frame; closing connection");
                break;
            }
            None => break,
        };
        let permit = in_flight.clone().acquire_owned().await?;
        let agent = agent.clone();
        let tx = tx.clone();
        let identity = identity.clone();
        let timeout = Duration::from_millis(frame.timeout_ms.min(config.max_request_timeout_ms));
        let max_frame_bytes = config.max_frame_bytes;
        tokio::spawn(async move {
            let body = match frame.body {
                Request::Hello { .. } | Request::Authenticate { .. } => Response::Failed(
                    AgentError::new(ErrorKind::BadRequest, "handshake already done"),
                ),
                body => match authorize(&body, &identity.0)
                    .and_then(|()| agent.check_epoch(&identity.0, identity.1))
                {
                    Ok(()) => agent.handle(body, timeout).await,
                    Err(e) => Response::Failed(e),
                },
            };
            // Encoded here, in parallel with other requests; an answer too large for a
            // frame becomes an error for this request only.
            let bytes = encode_response(frame.id, body, max_frame_bytes);
            let _ = tx.send(bytes).await;
            drop(permit);
        });
    }
    drop(tx);
    // In-flight requests finish (their effects are in PostgreSQL either way); the writer
    // ends once they have all replied or the peer is gone.
    let _ = writer.await;
    Ok(())
}

/// The next frame within `timeout`; `None` if the peer closed or was silent.
async fn next_frame<R>(
    frames: &mut FramedRead<R, FrameCodec<RequestFrame, ResponseFrame>>,
    timeout: Duration,
) -> anyhow::Result<Option<RequestFrame>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match tokio::time::timeout(timeout, frames.next()).await {
        Ok(Some(Ok(f))) => Ok(Some(f)),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(None) | Err(_) => Ok(None),
    }
}

fn refused(
    kind: ErrorKind,
    message: impl Into<String>,
) -> Result<(String, u64, Response), AgentError> {
    Err(AgentError::new(kind, message))
}

/// The handshake after the first frame: version, the key's challenge-response (one more
/// round trip), the certificate's names, the ids served, then the agent's epoch check.
/// Nothing touches the database before the coordinator authenticated. The outer error is
/// an I/O failure; the inner one a refusal to answer with.
async fn handshake<R, W>(
    agent: &Agent,
    first: Request,
    tls_client: Option<&Option<CertificateDer<'static>>>,
    config: &ServerConfig,
    frames: &mut FramedRead<R, FrameCodec<RequestFrame, ResponseFrame>>,
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
    hello_id: u64,
) -> anyhow::Result<Result<(String, u64, Response), AgentError>>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let Request::Hello {
        protocol_version,
        coordinator_id,
        epoch,
        nonce,
    } = first
    else {
        return Ok(refused(
            ErrorKind::VersionMismatch,
            "the first request must be a Hello handshake",
        ));
    };
    if protocol_version != PROTOCOL_VERSION {
        return Ok(refused(
            ErrorKind::VersionMismatch,
            format!(
                "protocol version {protocol_version} not supported; this agent speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    if let Err(e) = validate_coordinator_id(&coordinator_id) {
        return Ok(refused(ErrorKind::BadRequest, e.to_string()));
    }
    let mut agent_proof = None;
    if let Some(key) = &config.auth.key {
        let Some(coordinator_nonce) = nonce.filter(|n| valid_nonce(n)) else {
            return Ok(refused(
                ErrorKind::Unauthenticated,
                format!(
                    "coordinator {coordinator_id}: this agent requires the shared key, and the \
                     Hello carries no challenge nonce (configure the coordinator's \
                     --agent-auth-key-file)"
                ),
            ));
        };
        let agent_nonce = new_nonce();
        let challenge = Response::Challenge {
            nonce: agent_nonce.clone(),
        };
        sink.send(encode_response(hello_id, challenge, config.max_frame_bytes))
            .await?;
        let timeout = Duration::from_millis(config.handshake_timeout_ms);
        let Some(answer) = next_frame(frames, timeout).await? else {
            return Ok(refused(
                ErrorKind::Unauthenticated,
                format!("coordinator {coordinator_id}: no answer to the key challenge"),
            ));
        };
        let Request::Authenticate { proof } = answer.body else {
            return Ok(refused(
                ErrorKind::Unauthenticated,
                format!("coordinator {coordinator_id}: expected Authenticate after the challenge"),
            ));
        };
        let transcript = Transcript {
            protocol_version,
            coordinator_id: &coordinator_id,
            epoch,
            coordinator_nonce: &coordinator_nonce,
            agent_nonce: &agent_nonce,
        };
        if !key.verify(Role::Coordinator, &transcript, &proof) {
            return Ok(refused(
                ErrorKind::Unauthenticated,
                format!(
                    "coordinator {coordinator_id}: wrong key (its proof does not match this \
                     agent's --auth-key-file)"
                ),
            ));
        }
        agent_proof = Some(key.proof(Role::Agent, &transcript));
    }
    if let Some(cert) = tls_client {
        if !cert
            .as_ref()
            .is_some_and(|c| certificate_names(c, &coordinator_id))
        {
            return Ok(refused(
                ErrorKind::Unauthenticated,
                format!(
                    "the client certificate does not name coordinator {coordinator_id} \
                     (a DNS subject alternative name)"
                ),
            ));
        }
    }
    let served = &config.auth.coordinator_ids;
    if !served.is_empty() && !served.contains(&coordinator_id) {
        return Ok(refused(
            ErrorKind::Forbidden,
            format!("this agent serves coordinator ids {served:?}, not {coordinator_id}"),
        ));
    }
    let hello = Request::Hello {
        protocol_version,
        coordinator_id: coordinator_id.clone(),
        epoch,
        nonce: None,
    };
    let timeout = Duration::from_millis(config.handshake_timeout_ms);
    Ok(match agent.handle(hello, timeout).await {
        // The agent's own answer, with the proof that it holds the key.
        mut answer @ Response::Hello { .. } => {
            if let Response::Hello { proof, .. } = &mut answer {
                *proof = agent_proof;
            }
            Ok((coordinator_id, epoch, answer))
        }
        Response::Failed(e) => Err(e),
        other => Err(AgentError::new(
            ErrorKind::Internal,
            format!("unexpected handshake answer {other:?}"),
        )),
    })
}

/// Frames written in one flush, at most: bounds the write buffer (frames are at most
/// `max_frame_bytes` each, and most are under 1 KB).
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Writes `first` and whatever else is queued on `rx` with one flush. The writer yields
/// once before it looks at the queue: a task's send wakes the writer at once (tokio runs
/// the task it just woke next), so without the yield nearly every frame went out in a
/// write of its own; after it, the transactions that were ready to run have queued their
/// frames too. Under load that is one syscall for several frames; idle, it costs one
/// extra poll. Used by both ends of the coordinator-agent connection.
pub async fn write_batch<W>(
    first: Bytes,
    rx: &mut mpsc::Receiver<Bytes>,
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    sink.feed(first).await?;
    tokio::task::yield_now().await;
    for _ in 1..MAX_FRAMES_PER_FLUSH {
        let Ok(more) = rx.try_recv() else { break };
        sink.feed(more).await?;
    }
    SinkExt::<Bytes>::flush(sink).await
}

/// Serializes a response; one too large for a frame is replaced by a `Limit` error —
/// except the answer of a branch that committed writes: a `Limit` says nothing happened,
/// so that answer keeps its outcome and each result says its rows could not be returned.
/// (A read-only branch wrote nothing: the `Limit`, and the abort it leads to, are true.)
fn encode_response(id: u64, body: Response, max_frame_bytes: usize) -> Bytes {
    let committed = matches!(
        &body,
        Response::Executed {
            outcome: BranchOutcome::Committed,
            ..
        }
    );
    let rows_dropped = |body: &Response, why: &str| match body {
        Response::Executed { results, outcome } => Response::Executed {
            results: results
                .iter()
                .map(|r| StmtResult {
                    rows_affected: r.rows_affected,
                    rows: vec![],
                    error: Some(format!("its rows could not be returned: {why}")),
                })
                .collect(),
            outcome: *outcome,
        },
        other => other.clone(),
    };
    let frame = ResponseFrame { id, body };
    match encode_payload(&frame, max_frame_bytes) {
        Ok(b) => b,
        Err(e) if committed => {
            warn!(id, error = %e, "a committed branch's rows do not fit in a frame; answering without them");
            let why = format!("the answer does not fit in a frame ({e}); return fewer rows");
            let body = rows_dropped(&frame.body, &why);
            encode_payload(&ResponseFrame { id, body }, max_frame_bytes).unwrap_or_default()
        }
        Err(e) => {
            warn!(id, error = %e, "response does not fit in a frame");
            let body = Response::Failed(AgentError::new(
                ErrorKind::Limit,
                format!("the answer does not fit in a frame: {e}; return fewer rows"),
            ));
            // A short error always fits.
            encode_payload(&ResponseFrame { id, body }, max_frame_bytes).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed branch's answer that does not fit keeps its outcome (a `Limit` would
    /// tell the coordinator nothing happened) and says its rows could not be returned.
    #[test]
    fn a_committed_answer_too_large_keeps_its_outcome() {
        let big: serde_json::Map<String, serde_json::Value> =
            [("v".to_owned(), serde_json::json!("x".repeat(10_000)))]
                .into_iter()
                .collect();
        for (outcome, keeps) in [
            (BranchOutcome::Committed, true),
            (BranchOutcome::ReadOnly, false),
            (BranchOutcome::Prepared, false),
        ] {
            let body = Response::Executed {
                results: vec![StmtResult {
                    rows_affected: 1,
                    rows: vec![big.clone()],
                    error: None,
                }],
                outcome,
            };
            let bytes = encode_response(7, body, 4096);
            let text = String::from_utf8_lossy(&bytes);
            if keeps {
                assert!(
                    text.contains("executed") && text.contains("could not be returned"),
                    "{text}"
                );
                assert!(!text.contains("xxxx"), "{text}");
            } else {
                assert!(text.contains("limit"), "{text}");
            }
        }
    }
    use tokio::io::AsyncReadExt;

    #[test]
    fn refusals_are_warned_at_most_once_per_interval_with_their_count() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(r.refused(t0), Some(1));
        for _ in 0..99 {
            assert_eq!(r.refused(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(r.refused(t0 + REFUSAL_WARNING_INTERVAL), Some(100));
    }

    /// An `AsyncWrite` that counts flushes and keeps what was written.
    #[derive(Default)]
    struct Recorder {
        bytes: Vec<u8>,
        flushes: usize,
    }

    impl tokio::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.bytes.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.flushes += 1;
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn frame(i: u32) -> Bytes {
        Bytes::from(i.to_be_bytes().to_vec())
    }

    /// The payloads of `[u32 len][payload]` frames, in order.
    fn payloads(mut bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            out.push(u32::from_be_bytes(bytes[4..4 + len].try_into().unwrap()));
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[tokio::test]
    async fn write_batch_sends_everything_queued_in_one_flush_in_order() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 1..=5 {
            tx.send(frame(i)).await.unwrap();
        }
        let mut sink = FramedWrite::new(Recorder::default(), raw_codec(1024));
        write_batch(frame(0), &mut rx, &mut sink).await.unwrap();
        assert_eq!(sink.get_ref().flushes, 1);
        assert_eq!(payloads(&sink.get_ref().bytes), vec![0, 1, 2, 3, 4, 5]);
        assert!(rx.try_recv().is_err(), "the queue is drained");
    }

    #[tokio::test]
    async fn write_batch_picks_up_frames_queued_by_tasks_that_run_during_its_yield() {
        let (tx, mut rx) = mpsc::channel(16);
        // Spawned before the writer runs, on the same (current-thread) runtime: it runs
        // only when the writer yields.
        let sender = tokio::spawn(async move {
            for i in 1..=3 {
                tx.send(frame(i)).await.unwrap();
            }
        });
        let mut sink = FramedWrite::new(Recorder::default(), raw_codec(1024));
        write_batch(frame(0), &mut rx, &mut sink).await.unwrap();
        sender.await.unwrap();
        assert_eq!(sink.get_ref().flushes, 1);
        assert_eq!(payloads(&sink.get_ref().bytes), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn write_batch_is_bounded_and_leaves_the_rest_queued() {
        let extra = 10;
        let (tx, mut rx) = mpsc::channel(MAX_FRAMES_PER_FLUSH + extra);
        for i in 1..(MAX_FRAMES_PER_FLUSH + extra) as u32 {
            tx.send(frame(i)).await.unwrap();
        }
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut sink = FramedWrite::new(client, raw_codec(1024));
        write_batch(frame(0), &mut rx, &mut sink).await.unwrap();
        drop(sink);
        let mut written = Vec::new();
        server.read_to_end(&mut written).await.unwrap();
        let sent = payloads(&written);
        assert_eq!(sent.len(), MAX_FRAMES_PER_FLUSH);
        assert_eq!(sent, (0..MAX_FRAMES_PER_FLUSH as u32).collect::<Vec<_>>());
        assert_eq!(rx.len(), extra, "the rest waits for the next batch");
    }
}
