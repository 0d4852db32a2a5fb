//! The writer thread: the only owner of the active segment file.
//!
//! Appenders send encoded frames over a bounded channel. The writer takes
//! one message, drains whatever else is already queued (bounded by
//! `max_batch_records` / `max_batch_bytes`), writes the whole batch with one
//! `write_all` and one `sync_data`, then completes every waiter. A batch
//! without waiters (lazy records only) may wait up to `lazy_flush_ms` for
//! more records to merge with.
//!
//! Any failed write or fsync poisons the log: the writer fails the batch and
//! everything still queued with [`LogError::Poisoned`], never retries (after a
//! failed fsync the page cache may no longer match the disk), and exits.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::segment::{self, SEGMENT_HEADER_BYTES};
use super::tracker::{RecordKind, SegmentTracker};
use super::{failpoint, LogConfig, LogError, LogStats};

/// How often an idle writer wakes up to delete finished segments.
pub const IDLE_CHECK_MS: u64 = 1_000;
/// Most segments deleted per check, so one check never stalls appends long.
pub const SEGMENT_DELETES_PER_CHECK_MAX: usize = 8;
/// After a failed unlink, segment deletion pauses this long.
pub const DELETE_FAILURE_BACKOFF_MS: u64 = 60_000;

pub type Ack = oneshot::Sender<Result<(), LogError>>;

pub enum Msg {
    /// One encoded frame. `ack` is `Some` for forced appends.
    Append {
        frame: Vec<u8>,
        kind: RecordKind,
        ack: Option<Ack>,
    },
    /// Completes once everything queued before it is durable.
    Flush { ack: Ack },
    /// Finish what is queued, then exit.
    Shutdown,
}

impl Msg {
    fn frame_bytes(&self) -> usize {
        match self {
            Msg::Append { frame, .. } => frame.len(),
            Msg::Flush { .. } | Msg::Shutdown => 0,
        }
    }

    fn has_waiter(&self) -> bool {
        match self {
            Msg::Append { ack, .. } => ack.is_some(),
            Msg::Flush { .. } => true,
            Msg::Shutdown => false,
        }
    }

    fn fail(self, make_error: fn() -> LogError) {
        match self {
            Msg::Append { ack: Some(ack), .. } | Msg::Flush { ack } => {
                // The appender may have given up waiting; that is fine.
                let _ = ack.send(Err(make_error()));
            }
            Msg::Append { ack: None, .. } | Msg::Shutdown => {}
        }
    }
}

/// State shared between the handles and the writer thread.
#[derive(Debug, Default)]
pub struct Shared {
    pub poisoned: AtomicBool,
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub fsyncs: AtomicU64,
    pub bytes_written: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub segments_live: AtomicU64,
    pub open_commits: AtomicU64,
}

impl Shared {
    pub fn stats(&self) -> LogStats {
        LogStats {
            records: self.records.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            segments_created: self.segments_created.load(Ordering::Relaxed),
            segments_deleted: self.segments_deleted.load(Ordering::Relaxed),
            segments_live: self.segments_live.load(Ordering::Relaxed),
            open_commits: self.open_commits.load(Ordering::Relaxed),
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// Sets the poisoned flag if the writer thread unwinds, so appenders get
/// `Poisoned` rather than `Closed`.
struct PoisonOnPanic(Arc<Shared>);

impl Drop for PoisonOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::Release);
            tracing::error!("decision log writer thread panicked; log is poisoned");
        }
    }
}

/// Where a test may inject an I/O failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    BeforeWrite,
    BeforeFsync,
}

/// Test-only fault injection. In non-test builds this is empty and every
/// check is `Ok`, so the product path is the real one.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    #[cfg(test)]
    pub plan: Option<Arc<FaultPlan>>,
}

/// Fails the `n`th batch write or fsync (1-based; 0 = never).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FaultPlan {
    pub fail_write_on_call: u64,
    pub fail_fsync_on_call: u64,
    pub write_calls: AtomicU64,
    pub fsync_calls: AtomicU64,
}

impl Faults {
    fn check(&self, point: FaultPoint) -> io::Result<()> {
        #[cfg(test)]
        if let Some(plan) = &self.plan {
            let (calls, fail_on) = match point {
                FaultPoint::BeforeWrite => (&plan.write_calls, plan.fail_write_on_call),
                FaultPoint::BeforeFsync => (&plan.fsync_calls, plan.fail_fsync_on_call),
            };
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call == fail_on {
                return Err(io::Error::other(format!("injected failure at {point:?}")));
            }
        }
        let _ = point;
        Ok(())
    }
}

enum Recv {
    Msg(Msg),
    TimedOut,
    Closed,
}

pub struct Writer {
    pub dir: PathBuf,
    pub config: LogConfig,
    pub rx: mpsc::Receiver<Msg>,
    pub shared: Arc<Shared>,
    pub active_seq: u64,
    pub active_file: File,
    pub active_len_bytes: u64,
    pub tracker: SegmentTracker,
    pub faults: Faults,
    /// Only for `recv` with a deadline (lazy flush, idle checks):
    /// `blocking_recv` has no timeout.
    pub runtime: tokio::runtime::Runtime,
    /// Holds the directory lock for as long as the writer runs.
    pub _lock_file: File,
}

/// Per-batch limits derived from the config.
struct Limits {
    records_max: usize,
    bytes_max: usize,
    lazy_flush: Duration,
}

impl Writer {
    pub fn run(mut self) {
        let limits = if self.config.group_commit {
            Limits {
                records_max: self.config.max_batch_records,
                bytes_max: self.config.max_batch_bytes,
                lazy_flush: Duration::from_millis(self.config.lazy_flush_ms),
            }
        } else {
            Limits {
                records_max: 1,
                bytes_max: 1,
                lazy_flush: Duration::ZERO,
            }
        };
        assert!(limits.records_max > 0 && limits.bytes_max > 0);
        let mut batch: Vec<Msg> = Vec::with_capacity(limits.records_max);
        let mut buf: Vec<u8> = Vec::new();
        let mut carry: Option<Msg> = None;
        let mut delete_paused_until_ms = 0u64;
        // Declared after the locals above so that, if this thread panics,
        // it runs before their waiters are dropped: they then see Poisoned.
        let _poison_on_panic = PoisonOnPanic(Arc::clone(&self.shared));

        // Each iteration handles one batch or one idle tick; the loop ends
        // when the channel is closed and empty, or on the first I/O failure.
        loop {
            let first = match carry.take() {
                Some(msg) => msg,
                None => {
                    match self.recv_until(Instant::now() + Duration::from_millis(IDLE_CHECK_MS)) {
                        Recv::Msg(msg) => msg,
                        Recv::Closed => break,
                        Recv::TimedOut => {
                            if let Err(error) =
                                self.delete_finished_segments(&mut delete_paused_until_ms)
                            {
                                self.poison(&error, &mut batch, carry.take());
                                return;
                            }
                            self.publish_gauges();
                            continue;
                        }
                    }
                }
            };
            let batch_started = Instant::now();
            let mut batch_bytes = first.frame_bytes();
            let mut has_waiter = first.has_waiter();
            batch.push(first);

            // Drain what is already queued, without waiting.
            let mut full = self.drain(
                &limits,
                &mut batch,
                &mut batch_bytes,
                &mut has_waiter,
                &mut carry,
            );

            // Lazy records only: wait a little for company. Bounded by the
            // deadline and by the batch limits.
            let deadline = batch_started + limits.lazy_flush;
            while !full && !has_waiter && !self.rx.is_closed() && Instant::now() < deadline {
                let msg = match self.recv_until(deadline) {
                    Recv::Msg(msg) => msg,
                    Recv::TimedOut | Recv::Closed => break,
                };
                match admit(&limits, &mut batch, &mut batch_bytes, msg) {
                    Ok(waiter) => has_waiter |= waiter,
                    Err(msg) => {
                        carry = Some(msg);
                        full = true;
                    }
                }
                if !full && has_waiter {
                    // A forced record arrived: take what queued behind it
                    // and write now.
                    full = self.drain(
                        &limits,
                        &mut batch,
                        &mut batch_bytes,
                        &mut has_waiter,
                        &mut carry,
                    );
                }
            }

            if let Err(error) = self.write_batch(&batch, batch_bytes, &mut buf) {
                self.poison(&error, &mut batch, carry.take());
                return;
            }
            self.complete_batch(&mut batch);
            if let Err(error) = self.delete_finished_segments(&mut delete_paused_until_ms) {
                self.poison(&error, &mut batch, carry.take());
                return;
            }
            self.publish_gauges();
        }
        assert!(carry.is_none() && batch.is_empty());
        tracing::debug!(segment = self.active_seq, "decision log writer finished");
    }

    pub fn publish_gauges(&self) {
        let segments = self.tracker.segment_count() as u64;
        let open_commits = self.tracker.open_commit_count() as u64;
        self.shared.segments_live.store(segments, Ordering::Relaxed);
        self.shared
            .open_commits
            .store(open_commits, Ordering::Relaxed);
    }

    /// Moves already-queued messages into the batch until the queue is empty
    /// or the batch is full. Returns whether the batch is full.
    fn drain(
        &mut self,
        limits: &Limits,
        batch: &mut Vec<Msg>,
        batch_bytes: &mut usize,
        has_waiter: &mut bool,
        carry: &mut Option<Msg>,
    ) -> bool {
        assert!(carry.is_none());
        // Bounded by the batch limits: every pass admits a message or stops.
        while let Some(msg) = self.try_recv() {
            match admit(limits, batch, batch_bytes, msg) {
                Ok(waiter) => *has_waiter |= waiter,
                Err(msg) => {
                    *carry = Some(msg);
                    return true;
                }
            }
        }
        false
    }

    /// Receives one message, waiting until `deadline` at most. A `Shutdown`
    /// closes the channel (no new messages) and is otherwise skipped.
    fn recv_until(&mut self, deadline: Instant) -> Recv {
        // Bounded: every pass consumes one message, and after the first
        // Shutdown the channel is closed, so no new messages arrive.
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let rx = &mut self.rx;
            let received = self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, rx.recv()).await });
            match received {
                Ok(Some(Msg::Shutdown)) => self.rx.close(),
                Ok(Some(msg)) => return Recv::Msg(msg),
                Ok(None) => return Recv::Closed,
                Err(_elapsed) => return Recv::TimedOut,
            }
        }
    }

    fn try_recv(&mut self) -> Option<Msg> {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Shutdown) => self.rx.close(),
                Ok(msg) => return Some(msg),
                Err(_empty_or_disconnected) => return None,
            }
        }
    }

    /// One `write_all` and one `sync_data` for the whole batch.
    fn write_batch(
        &mut self,
        batch: &[Msg],
        batch_bytes: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        if batch_bytes == 0 {
            // Flushes only: everything before them is already durable,
            // because every batch is fsynced before its waiters complete.
            return Ok(());
        }
        let batch_bytes_u64 = batch_bytes as u64;
        if self.active_len_bytes > SEGMENT_HEADER_BYTES
            && self.active_len_bytes + batch_bytes_u64 > self.config.segment_max_bytes
        {
            self.rotate()?;
        }
        buf.clear();
        let mut records = 0u64;
        for msg in batch {
            if let Msg::Append { frame, .. } = msg {
                debug_assert_eq!(
                    u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize + 8,
                    frame.len(),
                    "frame length field matches the frame"
                );
                buf.extend_from_slice(frame);
                records += 1;
            }
        }
        assert_eq!(buf.len(), batch_bytes);
        assert!(records > 0);

        failpoint("decision_log.before_write")?;
        self.faults.check(FaultPoint::BeforeWrite)?;
        self.active_file.write_all(buf)?;
        failpoint("decision_log.before_fsync")?;
        self.faults.check(FaultPoint::BeforeFsync)?;
        self.active_file.sync_data()?;
        failpoint("decision_log.after_fsync")?;

        self.active_len_bytes += batch_bytes_u64;
        debug_assert_eq!(self.active_file.metadata()?.len(), self.active_len_bytes);
        self.shared.records.fetch_add(records, Ordering::Relaxed);
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.shared
            .bytes_written
            .fetch_add(batch_bytes_u64, Ordering::Relaxed);
        Ok(())
    }

    /// After a durable batch: bookkeeping, then wake every waiter.
    fn complete_batch(&mut self, batch: &mut Vec<Msg>) {
        let now_ms = segment::now_ms();
        for msg in batch.drain(..) {
            match msg {
                Msg::Append { kind, ack, .. } => {
                    self.tracker.on_record(self.active_seq, kind, now_ms);
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(()));
                    }
                }
                Msg::Flush { ack } => {
                    let _ = ack.send(Ok(()));
                }
                Msg::Shutdown => unreachable!("Shutdown never enters a batch"),
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next_seq = self
            .active_seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("segment seq overflow"))?;
        let file = segment::create_segment(&self.dir, next_seq)?;
        tracing::debug!(
            from = self.active_seq,
            to = next_seq,
            bytes = self.active_len_bytes,
            "decision log: rotating segment"
        );
        self.active_file = file;
        self.active_seq = next_seq;
        self.active_len_bytes = SEGMENT_HEADER_BYTES;
        self.tracker.add_segment(next_seq, segment::now_ms());
        self.tracker.set_active(next_seq);
        self.shared.segments_created.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes up to `SEGMENT_DELETES_PER_CHECK_MAX` finished segments. A
    /// failed unlink pauses deletion; a failed directory fsync is fatal.
    fn delete_finished_segments(&mut self, paused_until_ms: &mut u64) -> io::Result<()> {
        let now_ms = segment::now_ms();
        if now_ms < *paused_until_ms {
            return Ok(());
        }
        for _ in 0..SEGMENT_DELETES_PER_CHECK_MAX {
            let Some(seq) = self
                .tracker
                .next_deletable(now_ms, self.config.retention_ms)
            else {
                break;
            };
            assert!(seq < self.active_seq, "only older segments are deleted");
            let path = segment::segment_path(&self.dir, seq);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(segment = seq, "decision log: finished segment already gone");
                }
                Err(error) => {
                    tracing::warn!(
                        segment = seq,
                        %error,
                        backoff_ms = DELETE_FAILURE_BACKOFF_MS,
                        "decision log: could not delete finished segment"
                    );
                    *paused_until_ms = now_ms.saturating_add(DELETE_FAILURE_BACKOFF_MS);
                    return Ok(());
                }
            }
            segment::fsync_dir(&self.dir)?;
            self.tracker.on_deleted(seq);
            self.shared.segments_deleted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(segment = seq, "decision log: deleted finished segment");
        }
        Ok(())
    }

    /// Fatal: fail the batch and everything queued, close the channel, and
    /// return so the thread exits.
    fn poison(&mut self, error: &io::Error, batch: &mut Vec<Msg>, carry: Option<Msg>) {
        self.shared.poisoned.store(true, Ordering::Release);
        tracing::error!(
            %error,
            segment = self.active_seq,
            dir = %self.dir.display(),
            "decision log write or fsync failed; the log is poisoned and the process must restart"
        );
        for msg in batch.drain(..).chain(carry) {
            msg.fail(|| LogError::Poisoned);
        }
        self.rx.close();
        // After close(), recv returns every buffered message (and those of
        // senders holding permits), then None. Bounded by queue_capacity
        // plus outstanding permits.
        while let Some(msg) = self.rx.blocking_recv() {
            msg.fail(|| LogError::Poisoned);
        }
    }
}

/// Adds `msg` to the batch if it fits; otherwise hands it back. Returns
/// whether the message has a waiter.
fn admit(
    limits: &Limits,
    batch: &mut Vec<Msg>,
    batch_bytes: &mut usize,
    msg: Msg,
) -> Result<bool, Msg> {
    let bytes = msg.frame_bytes();
    if batch.len() >= limits.records_max || batch_bytes.saturating_add(bytes) > limits.bytes_max {
        return Err(msg);
    }
    *batch_bytes += bytes;
    let waiter = msg.has_waiter();
    batch.push(msg);
    Ok(waiter)
}
