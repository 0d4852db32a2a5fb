//! The agent's TCP server: length-delimited JSON frames ([`FrameCodec`]), a handshake
//! first, then requests handled concurrently (responses go back in completion order,
//! matched by request id).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use twopc_shared::codec::{encode_payload, raw_codec, FrameCodec};
use twopc_shared::msg::{AgentError, ErrorKind, Request, RequestFrame, Response, ResponseFrame};

use crate::agent::Agent;

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
    /// Mutual TLS (see [`crate::tls::server_config`]); `None`: plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_bytes: twopc_shared::codec::DEFAULT_MAX_FRAME_BYTES,
            max_in_flight_per_connection: 1024,
            max_connections: 256,
            max_request_timeout_ms: 10 * 60 * 1000,
            handshake_timeout_ms: 10_000,
            tls: None,
        }
    }
}

/// Serves `agent` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    agent: Agent,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    info!(addr = ?listener.local_addr().ok(), agent = agent.name(), "agent listening");
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
            warn!(%peer, limit = config.max_connections, "too many connections; refusing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let agent = agent.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move {
                let result = match config.tls.clone() {
                    None => connection(agent, stream, config, shutdown).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        let handshake = tokio::time::timeout(
                            Duration::from_millis(config.handshake_timeout_ms),
                            acceptor.accept(stream),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(s)) => connection(agent, s, config, shutdown).await,
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

async fn connection<S>(
    agent: Agent,
    stream: S,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames = FramedRead::new(
        read_half,
        FrameCodec::<RequestFrame, ResponseFrame>::new(config.max_frame_bytes),
    );
    let mut sink = FramedWrite::new(write_half, raw_codec(config.max_frame_bytes));

    // Handshake.
    let first = tokio::time::timeout(
        Duration::from_millis(config.handshake_timeout_ms),
        frames.next(),
    )
    .await;
    let hello = match first {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => return Err(e.into()),
        Ok(None) | Err(_) => return Ok(()),
    };
    // Fencing: every later request of this connection is checked against the newest
    // epoch of its coordinator.
    let identity = match &hello.body {
        Request::Hello {
            coordinator_id,
            epoch,
            ..
        } => (coordinator_id.clone(), *epoch),
        _ => (String::new(), 0),
    };
    let identity = Arc::new(identity);
    let reply = match hello.body {
        Request::Hello { .. } => {
            agent
                .handle(
                    hello.body,
                    Duration::from_millis(config.handshake_timeout_ms),
                )
                .await
        }
        _ => Response::Failed(AgentError::new(
            ErrorKind::VersionMismatch,
            "the first request must be a Hello handshake",
        )),
    };
    let accepted = matches!(reply, Response::Hello { .. });
    sink.send(encode_response(hello.id, reply, config.max_frame_bytes))
        .await?;
    if !accepted {
        return Ok(());
    }

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
            f = frames.next() => f,
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
                Request::Hello { .. } => Response::Failed(AgentError::new(
                    ErrorKind::BadRequest,
                    "handshake already done",
                )),
                body => match agent.check_epoch(&identity.0, identity.1) {
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

/// Serializes a response; one too large for a frame is replaced by a `Limit` error.
fn encode_response(id: u64, body: Response, max_frame_bytes: usize) -> Bytes {
    match encode_payload(&ResponseFrame { id, body }, max_frame_bytes) {
        Ok(b) => b,
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
    use tokio::io::AsyncReadExt;

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
