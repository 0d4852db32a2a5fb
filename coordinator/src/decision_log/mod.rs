//! The coordinator's durable decision log.
//!
//! Presumed-abort two-phase commit: only `Commit` decisions must be on disk
//! before COMMIT PREPARED is sent ([`DecisionLog::append_forced`]); `End`,
//! one-phase outcomes and most aborts are written lazily
//! ([`DecisionLog::append_lazy`]) with a later batch.
//!
//! * [`record`]: the records and their hand-written binary payloads.
//! * `segment`: segment files, header, frames, and the fsync discipline.
//! * `recovery`: reading the log on open (repairing a torn tail) or offline.
//! * `writer`: the group-commit writer thread.
//! * `tracker`: which segments are finished and may be deleted.
//!
//! Failure policy: a failed write or fsync poisons the log for good
//! ([`LogError::Poisoned`]); the caller is expected to exit the process and
//! recover from the files on restart.

pub mod record;
mod recovery;
mod segment;
mod tracker;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

pub use self::record::{DecodeError, EncodeError, Record};
pub use self::segment::{
    segment_file_name, Damage, FRAME_HEADER_BYTES, MAX_RECORD_BYTES, SEGMENT_FORMAT_VERSION,
    SEGMENT_HEADER_BYTES, SEGMENT_MAGIC,
};

use self::recovery::Mode;
use self::tracker::RecordKind;
use self::writer::{Faults, Msg, Shared, Writer};

/// Name of the lock file that keeps two processes from appending to one log.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Name of the writer thread.
pub const WRITER_THREAD_NAME: &str = "twopc-log-writer";

const QUEUE_CAPACITY_MAX: usize = 1 << 20;
const LAZY_FLUSH_MS_MAX: u64 = 10_000;

/// Failpoint hook, called at
/// `decision_log.before_write`, `decision_log.before_fsync` and
/// `decision_log.after_fsync` (see `twopc_participant::failpoint`; inert unless built
/// with the `failpoints` feature). An `error` action fails the step like an I/O error.
#[inline(always)]
fn failpoint(name: &str) -> std::io::Result<()> {
    if twopc_participant::failpoint::check_sync(name) {
        return Err(std::io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}

/// Decision log settings. Sizes are in bytes, times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// A segment is rotated before a batch would take it past this size.
    pub segment_max_bytes: u64,
    /// A finished segment is kept this long after its newest record.
    pub retention_ms: u64,
    /// `false`: every record gets its own write + fsync (for comparison).
    pub group_commit: bool,
    /// Bound of the appender -> writer channel.
    pub queue_capacity: usize,
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    /// How long a batch of lazy records only may wait for more records.
    pub lazy_flush_ms: u64,
    /// Open a log whose last segment has a corrupt record followed by intact ones by
    /// truncating at the damage (dropping those records). Off: such a log refuses to
    /// open ([`LogError::CorruptBeforeIntact`]). An operator's one-off choice.
    pub discard_corrupt_tail: bool,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            segment_max_bytes: 64 * 1024 * 1024,
            retention_ms: 3_600_000,
            group_commit: true,
            queue_capacity: 4096,
            max_batch_records: 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            lazy_flush_ms: 5,
            discard_corrupt_tail: false,
        }
    }

    fn validate(&self) -> Result<(), LogError> {
        let fail = |what: String| Err(LogError::InvalidConfig(what));
        if self.segment_max_bytes <= SEGMENT_HEADER_BYTES {
            return fail(format!(
                "segment_max_bytes {} must exceed the {SEGMENT_HEADER_BYTES}-byte header",
                self.segment_max_bytes
            ));
        }
        if self.queue_capacity == 0 || self.queue_capacity > QUEUE_CAPACITY_MAX {
            return fail(format!(
                "queue_capacity {} must be in 1..={QUEUE_CAPACITY_MAX}",
                self.queue_capacity
            ));
        }
        if self.max_batch_records == 0 {
            return fail("max_batch_records must be at least 1".into());
        }
        if self.max_batch_bytes == 0 {
            return fail("max_batch_bytes must be at least 1".into());
        }
        if self.lazy_flush_ms > LAZY_FLUSH_MS_MAX {
            return fail(format!(
                "lazy_flush_ms {} must be at most {LAZY_FLUSH_MS_MAX}",
                self.lazy_flush_ms
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("decision log I/O error while {op} ({path}): {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("decision log is corrupt: segment {segment}, offset {offset}: {reason}")]
    Corrupt {
        segment: u64,
        offset: u64,
        reason: Damage,
    },
    #[error("record cannot be logged: {0}")]
    Encode(#[from] EncodeError),
    #[error(
        "decision log is corrupt: segment {segment} is damaged at offset {offset} ({reason}), \
         and {intact_records} intact record(s) follow it (the first at offset \
         {first_intact_offset}). This is not a torn write, and truncating would drop those \
         decisions. Keep a copy of the log directory; then restore it from a copy, or start \
         once with --log-discard-corrupt-tail to truncate at the damage (the segment is kept \
         as a .seg.corrupt file beside it)"
    )]
    CorruptBeforeIntact {
        segment: u64,
        offset: u64,
        reason: Damage,
        intact_records: u64,
        first_intact_offset: u64,
    },
    #[error("decision log is poisoned by a failed write or fsync; the process must restart")]
    Poisoned,
    #[error("decision log is closed")]
    Closed,
    #[error("decision log directory {dir} is locked by another process")]
    Locked { dir: PathBuf },
    #[error("invalid decision log config: {0}")]
    InvalidConfig(String),
    #[error("decision log segment sequence numbers are exhausted")]
    SeqExhausted,
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { op, path, source }
}

/// Where the last segment was cut short and what was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: u64,
    /// Offset of the first bad byte in that segment (0: the header).
    pub offset: u64,
    pub dropped_bytes: u64,
    pub damage: Damage,
}

/// Everything the log held, for the caller to rebuild its state from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// All records, in log order.
    pub records: Vec<Record>,
    /// Bytes of a torn tail that were dropped (or, read-only, would be).
    pub truncated_bytes: u64,
    /// Segments read (a removed torn last segment is not counted).
    pub segments: usize,
    pub torn_tail: Option<TornTail>,
    /// Segments older than the first one read were deleted: the records they held (past
    /// retention) are not in `records`.
    pub earlier_segments_deleted: bool,
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records written and fsynced.
    pub records: u64,
    /// Batches written (one `write_all` each).
    pub batches: u64,
    /// `sync_data` calls for batches (segment creation is not counted).
    pub fsyncs: u64,
    pub bytes_written: u64,
    pub segments_created: u64,
    pub segments_deleted: u64,
    /// Gauge: segment files the log currently keeps, the active one included.
    pub segments_live: u64,
    /// Gauge: gids with a `Commit` but no `End` yet.
    pub open_commits: u64,
}

/// Handle to the log. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct DecisionLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    writer_exited: watch::Receiver<bool>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("dir", &self.inner.dir)
            .field("poisoned", &self.inner.shared.is_poisoned())
            .field("stats", &self.inner.shared.stats())
            .finish()
    }
}

impl DecisionLog {
    /// Opens (creating `dir` if needed) and replays the log, repairs a torn
    /// tail, starts a new segment and the writer thread.
    pub fn open(config: LogConfig) -> Result<(DecisionLog, Replay), LogError> {
        Self::open_with_faults(config, Faults::default())
    }

    fn open_with_faults(
        config: LogConfig,
        faults: Faults,
    ) -> Result<(DecisionLog, Replay), LogError> {
        config.validate()?;
        let dir = config.dir.clone();
        if !dir.is_dir() {
            crate::meta::create_private_dir(&dir).map_err(io_error("creating log dir", &dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                segment::fsync_dir(parent)
                    .map_err(io_error("fsyncing parent of log dir", parent))?;
            }
        }
        let lock_file = lock_dir(&dir)?;

        let recovery::Recovered {
            replay,
            mut tracker,
            next_seq,
        } = recovery::recover(&dir, Mode::Repair, config.discard_corrupt_tail)?;

        let path = segment::segment_path(&dir, next_seq);
        let active_file =
            segment::create_segment(&dir, next_seq).map_err(io_error("creating segment", &path))?;
        tracker.add_segment(next_seq, segment::now_ms());
        tracker.set_active(next_seq);

        let shared = Arc::new(Shared::default());
        shared
            .segments_created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(io_error("building writer timer runtime", &dir))?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (exited_tx, exited_rx) = watch::channel(false);
        let writer = Writer {
            dir: dir.clone(),
            config,
            rx,
            shared: Arc::clone(&shared),
            active_seq: next_seq,
            active_file,
            active_len_bytes: SEGMENT_HEADER_BYTES,
            tracker,
            faults,
            runtime,
            _lock_file: lock_file,
        };
        writer.publish_gauges();
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD_NAME.into())
            .spawn(move || {
                writer.run();
                let _ = exited_tx.send(true);
            })
            .map_err(io_error("spawning writer thread", &dir))?;

        tracing::info!(
            dir = %dir.display(),
            records = replay.records.len(),
            segments = replay.segments,
            truncated_bytes = replay.truncated_bytes,
            active_segment = next_seq,
            "decision log opened"
        );
        let log = DecisionLog {
            inner: Arc::new(Inner {
                dir,
                tx,
                shared,
                writer_exited: exited_rx,
                writer_thread: Mutex::new(Some(thread)),
            }),
        };
        Ok((log, replay))
    }

    /// Resolves once `record` is written and fdatasync'd.
    ///
    /// If this future is dropped after the record was queued, the record is
    /// still written.
    pub async fn append_forced(&self, record: Record) -> Result<(), LogError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        self.enqueue(record, Some(ack_tx)).await?;
        match ack_rx.await {
            Ok(result) => result,
            Err(_writer_gone) => Err(self.stopped_error()),
        }
    }

    /// Resolves once `record` is queued (waiting for queue capacity); it is
    /// written and fsynced with a later batch. A lazy record queued just
    /// before the log is poisoned is lost; [`DecisionLog::flush`] tells.
    pub async fn append_lazy(&self, record: Record) -> Result<(), LogError> {
        self.enqueue(record, None).await
    }

    /// Resolves once everything queued before it is durable.
    pub async fn flush(&self) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        let (ack_tx, ack_rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Flush { ack: ack_tx })
            .await
            .map_err(|_closed| self.stopped_error())?;
        match ack_rx.await {
            Ok(result) => result,
            Err(_writer_gone) => Err(self.stopped_error()),
        }
    }

    async fn enqueue(&self, record: Record, ack: Option<writer::Ack>) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(LogError::Poisoned);
        }
        // Encoding happens here, on the appender's task, so the writer only
        // copies bytes and a bad record never reaches it.
        let frame = segment::encode_frame(&record)?;
        let kind = RecordKind::from_record(record);
        self.inner
            .tx
            .send(Msg::Append { frame, kind, ack })
            .await
            .map_err(|_closed| self.stopped_error())
    }

    fn stopped_error(&self) -> LogError {
        if self.is_poisoned() {
            LogError::Poisoned
        } else {
            LogError::Closed
        }
    }

    pub fn stats(&self) -> LogStats {
        self.inner.shared.stats()
    }

    /// True once a write or fsync failed; every append now fails.
    pub fn is_poisoned(&self) -> bool {
        self.inner.shared.is_poisoned()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Writes everything queued, stops the writer thread and waits for it.
    /// Appends through other clones fail with `Closed` afterwards.
    /// `Err(Poisoned)` if the log was poisoned (queued records may be lost).
    ///
    /// Dropping the last handle without `close` also lets the writer finish
    /// the queue and exit, but nothing waits for it.
    pub async fn close(self) -> Result<(), LogError> {
        // Fails only if the channel is already closed (writer stopped).
        let _ = self.inner.tx.send(Msg::Shutdown).await;
        let mut exited = self.inner.writer_exited.clone();
        // Err means the thread dropped the sender without saying so: it
        // panicked. Either way it is gone or going.
        let _ = exited.wait_for(|exited| *exited).await;
        let thread = self
            .inner
            .writer_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            // The thread has signalled its exit, so this join is immediate.
            if thread.join().is_err() {
                tracing::error!("decision log writer thread panicked");
            }
        }
        if self.is_poisoned() {
            Err(LogError::Poisoned)
        } else {
            Ok(())
        }
    }
}

/// Reads the whole log without modifying anything (for offline tools). A
/// torn tail is reported in [`Replay::torn_tail`] but left in place. Takes
/// no lock: a log being written may show a torn tail.
pub fn read_only(dir: impl AsRef<Path>) -> Result<Replay, LogError> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(LogError::Io {
            op: "opening log dir",
            path: dir.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    Ok(recovery::recover(dir, Mode::ReadOnly, false)?.replay)
}

fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE_NAME);
    match crate::meta::try_lock_file(&path) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(LogError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(LogError::Io {
            op: "locking log dir",
            path,
            source,
        }),
    }
}
