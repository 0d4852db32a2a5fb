//! End-to-end tests of the decision log: real files, real fsyncs, the real
//! writer thread. Record and segment encoding have their own unit tests.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use super::segment::{encode_segment_header, list_segments, scan_segment, segment_path};
use super::writer::FaultPlan;
use super::*;

fn commit(i: usize) -> Record {
    Record::Commit {
        gid: format!("gid-{i}"),
        txn_id: format!("txn-{i}"),
        participants: vec!["pg-a".into(), "pg-b".into()],
        decided_at_ms: 1_700_000_000_000 + i as u64,
    }
}

fn end(i: usize) -> Record {
    Record::End {
        gid: format!("gid-{i}"),
    }
}

fn one_phase(i: usize) -> Record {
    Record::OnePhaseCommitted {
        gid: format!("gid-{i}"),
        txn_id: format!("txn-{i}"),
        participant: "pg-a".into(),
        decided_at_ms: 42,
    }
}

fn abort(i: usize) -> Record {
    Record::Abort {
        gid: format!("gid-{i}"),
        txn_id: format!("txn-{i}"),
        decided_at_ms: 43,
        reason: "operator".into(),
    }
}

fn open(config: &LogConfig) -> (DecisionLog, Replay) {
    DecisionLog::open(config.clone()).expect("open")
}

/// Everything queued before is durable, and the segment-deletion check that
/// follows that batch has run: the writer handles messages in order and
/// checks after every batch, so the second flush is answered only after it.
async fn settle(log: &DecisionLog) {
    log.flush().await.expect("flush");
    log.flush().await.expect("flush");
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// File name -> (contents, mtime) of every file in `dir`.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            (
                entry.file_name().into_string().unwrap(),
                (fs::read(entry.path()).unwrap(), meta.modified().unwrap()),
            )
        })
        .collect()
}

/// Writes `records` in one session (into segment 1 of a fresh dir) and
/// returns the frame offsets in that segment.
async fn one_session(config: &LogConfig, records: &[Record]) -> Vec<u64> {
    let (log, replay) = open(config);
    assert!(replay.records.is_empty());
    for record in records {
        log.append_forced(record.clone()).await.unwrap();
    }
    log.close().await.unwrap();
    scan_segment(&segment_path(&config.dir, 1), 1)
        .unwrap()
        .records
        .iter()
        .map(|(offset, _)| *offset)
        .collect()
}

fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

#[test]
fn handle_is_send_sync_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<DecisionLog>();
}

#[test]
fn config_defaults_and_validation() {
    let config = LogConfig::new("/x");
    assert_eq!(config.segment_max_bytes, 64 * 1024 * 1024);
    assert_eq!(config.retention_ms, 3_600_000);
    assert!(config.group_commit);
    assert_eq!(config.queue_capacity, 4096);
    assert_eq!(config.max_batch_records, 1024);
    assert_eq!(config.max_batch_bytes, 4 * 1024 * 1024);
    assert_eq!(config.lazy_flush_ms, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut bad = LogConfig::new(dir.path());
    bad.queue_capacity = 0;
    assert!(matches!(
        DecisionLog::open(bad),
        Err(LogError::InvalidConfig(_))
    ));
    let mut bad = LogConfig::new(dir.path());
    bad.segment_max_bytes = 24;
    assert!(matches!(
        DecisionLog::open(bad),
        Err(LogError::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn roundtrip_append_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path().join("log"));
    let mut expected = Vec::new();

    let (log, replay) = open(&config);
    assert_eq!(replay, Replay::default());
    for i in 0..10 {
        let records = [commit(i), one_phase(100 + i), abort(200 + i), end(i)];
        log.append_forced(records[0].clone()).await.unwrap();
        log.append_lazy(records[1].clone()).await.unwrap();
        log.append_forced(records[2].clone()).await.unwrap();
        log.append_lazy(records[3].clone()).await.unwrap();
        expected.extend(records);
    }
    log.close().await.unwrap();

    let (log, replay) = open(&config);
    assert_eq!(replay.records, expected);
    assert_eq!(replay.truncated_bytes, 0);
    assert_eq!(replay.torn_tail, None);
    assert_eq!(replay.segments, 1);
    log.append_forced(commit(999)).await.unwrap();
    expected.push(commit(999));
    log.close().await.unwrap();

    let replay = read_only(&config.dir).unwrap();
    assert_eq!(replay.records, expected);
    assert_eq!(replay.segments, 2);
    let (log, replay) = open(&config);
    assert_eq!(replay.records, expected);
    log.close().await.unwrap();
}

#[tokio::test]
async fn torn_tail_at_every_offset_of_last_record() {
    let base = tempfile::tempdir().unwrap();
    let source = LogConfig::new(base.path().join("source"));
    let records: Vec<Record> = (0..5).map(commit).collect();
    let offsets = one_session(&source, &records).await;
    let full = fs::read(segment_path(&source.dir, 1)).unwrap();
    let last_offset = *offsets.last().unwrap();

    for cut in last_offset..full.len() as u64 {
        let dir = base.path().join(format!("cut-{cut}"));
        fs::create_dir(&dir).unwrap();
        fs::write(segment_path(&dir, 1), &full[..cut as usize]).unwrap();
        let config = LogConfig::new(&dir);

        let (log, replay) = open(&config);
        assert_eq!(replay.records, records[..4], "cut {cut}");
        assert_eq!(replay.truncated_bytes, cut - last_offset, "cut {cut}");
        if cut == last_offset {
            assert_eq!(replay.torn_tail, None);
        } else {
            let torn = replay.torn_tail.clone().expect("torn tail");
            assert_eq!((torn.segment, torn.offset), (1, last_offset));
        }
        assert_eq!(
            fs::metadata(segment_path(&dir, 1)).unwrap().len(),
            last_offset
        );
        log.append_forced(end(77)).await.unwrap();
        log.close().await.unwrap();

        let (log, replay) = open(&config);
        let mut expected = records[..4].to_vec();
        expected.push(end(77));
        assert_eq!(replay.records, expected, "cut {cut}");
        assert_eq!(replay.truncated_bytes, 0);
        log.close().await.unwrap();
    }
}

#[tokio::test]
async fn flipped_bit_in_last_record_truncates_there() {
    let base = tempfile::tempdir().unwrap();
    let source = LogConfig::new(base.path().join("source"));
    let records: Vec<Record> = (0..5).map(commit).collect();
    let offsets = one_session(&source, &records).await;
    let full = fs::read(segment_path(&source.dir, 1)).unwrap();
    let last_offset = *offsets.last().unwrap();

    for at in last_offset..full.len() as u64 {
        let dir = base.path().join(format!("flip-{at}"));
        fs::create_dir(&dir).unwrap();
        fs::write(segment_path(&dir, 1), &full).unwrap();
        flip_bit(&segment_path(&dir, 1), at, (at % 8) as u8);

        let (log, replay) = open(&LogConfig::new(&dir));
        assert_eq!(replay.records, records[..4], "flip at {at}");
        assert_eq!(replay.truncated_bytes, full.len() as u64 - last_offset);
        assert_eq!(replay.torn_tail.as_ref().unwrap().offset, last_offset);
        log.close().await.unwrap();
    }
}

#[tokio::test]
async fn flipped_bit_in_earlier_segment_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let offsets = one_session(&config, &[commit(1), commit(2), commit(3)]).await;
    let (log, _) = open(&config);
    log.append_forced(commit(4)).await.unwrap();
    log.close().await.unwrap();
    assert_eq!(list_segments(dir.path()).unwrap(), vec![1, 2]);

    // A payload byte of the middle record of segment 1.
    let seg1 = segment_path(dir.path(), 1);
    flip_bit(&seg1, offsets[1] + 10, 3);
    let before = snapshot(dir.path());
    match DecisionLog::open(config.clone()) {
        Err(LogError::Corrupt {
            segment: 1,
            offset,
            reason: Damage::CrcMismatch { .. },
        }) => assert_eq!(offset, offsets[1]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        read_only(dir.path()),
        Err(LogError::Corrupt { segment: 1, .. })
    ));
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a failed open changes nothing"
    );

    // A bad header on an earlier non-empty segment is corruption too.
    flip_bit(&seg1, offsets[1] + 10, 3);
    flip_bit(&seg1, 13, 0);
    assert!(matches!(
        DecisionLog::open(config.clone()),
        Err(LogError::Corrupt {
            segment: 1,
            offset: 0,
            reason: Damage::HeaderCrcMismatch { .. }
        })
    ));
}

/// A corrupt record in the middle of the last segment with intact records after it is
/// not a torn tail: truncating there would drop those (forced) decisions without a word.
/// The log refuses to open, says where, and opens only when the operator asks for the
/// loss (keeping a copy of the segment).
#[tokio::test]
async fn corrupt_record_before_intact_ones_in_last_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let records: Vec<Record> = (0..5).map(commit).collect();
    let offsets = one_session(&config, &records).await;
    let seg1 = segment_path(dir.path(), 1);
    flip_bit(&seg1, offsets[1] + 10, 3);
    let before = snapshot(dir.path());
    match DecisionLog::open(config.clone()) {
        Err(LogError::CorruptBeforeIntact {
            segment: 1,
            offset,
            intact_records,
            first_intact_offset,
            ..
        }) => {
            assert_eq!(offset, offsets[1]);
            assert_eq!(intact_records, 3);
            assert_eq!(first_intact_offset, offsets[2]);
        }
        other => panic!("expected CorruptBeforeIntact, got {other:?}"),
    }
    assert!(matches!(
        read_only(dir.path()),
        Err(LogError::CorruptBeforeIntact { segment: 1, .. })
    ));
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused open changes nothing"
    );

    // The operator's way on: truncate at the damage, keeping a copy.
    let mut discard = config.clone();
    discard.discard_corrupt_tail = true;
    let (log, replay) = open(&discard);
    assert_eq!(replay.records, records[..1]);
    log.close().await.unwrap();
    let copy = seg1.with_extension("seg.corrupt");
    assert_eq!(
        fs::read(&copy).unwrap(),
        before["00000000000000000001.seg"].0
    );
}

/// Damage in the last record only (a torn write) is still repaired silently.
#[tokio::test]
async fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let records: Vec<Record> = (0..3).map(commit).collect();
    let offsets = one_session(&config, &records).await;
    let seg1 = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&seg1).unwrap();
    bytes.truncate(offsets[2] as usize + 5);
    bytes.extend((0..300u32).map(|i| (i * 7 + 3) as u8));
    fs::write(&seg1, bytes).unwrap();
    let (log, replay) = open(&config);
    assert_eq!(replay.records, records[..2]);
    log.close().await.unwrap();
}

#[tokio::test]
async fn zero_filled_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let records: Vec<Record> = (0..3).map(commit).collect();
    one_session(&config, &records).await;
    let seg1 = segment_path(dir.path(), 1);
    let good_len = fs::metadata(&seg1).unwrap().len();
    let mut bytes = fs::read(&seg1).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg1, bytes).unwrap();

    let (log, replay) = open(&config);
    assert_eq!(replay.records, records);
    assert_eq!(replay.truncated_bytes, 4096);
    assert_eq!(replay.torn_tail.unwrap().damage, Damage::ZeroLength);
    assert_eq!(fs::metadata(&seg1).unwrap().len(), good_len);
    log.close().await.unwrap();
}

#[tokio::test]
async fn torn_segment_header_on_last_segment_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let records: Vec<Record> = (0..3).map(commit).collect();
    one_session(&config, &records).await;
    let header = encode_segment_header(2);

    // Shorter than a header; then a header-sized file that never got its
    // bytes (zeros).
    for (torn, next_seq) in [(header[..10].to_vec(), 3), (vec![0u8; 24], 4)] {
        let seg = segment_path(dir.path(), next_seq - 1);
        fs::write(&seg, &torn).unwrap();
        let (log, replay) = open(&config);
        assert_eq!(replay.records, records);
        assert_eq!(replay.truncated_bytes, torn.len() as u64);
        assert!(!seg.exists(), "torn segment removed");
        log.append_forced(end(1)).await.unwrap();
        log.close().await.unwrap();
        assert!(list_segments(dir.path()).unwrap().contains(&next_seq));
        // Drop the segment we just wrote so the next round starts alike.
        fs::remove_file(segment_path(dir.path(), next_seq)).unwrap();
    }
}

#[tokio::test]
async fn bad_header_on_earlier_segment_is_corrupt_but_empty_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    one_session(&config, &[commit(1)]).await;
    // Segment 2: torn header, but segment 3 follows, so 2 is not the last.
    fs::write(segment_path(dir.path(), 2), &encode_segment_header(2)[..5]).unwrap();
    fs::write(segment_path(dir.path(), 3), encode_segment_header(3)).unwrap();
    assert!(matches!(
        DecisionLog::open(config.clone()),
        Err(LogError::Corrupt {
            segment: 2,
            offset: 0,
            reason: Damage::TornSegmentHeader { file_len_bytes: 5 }
        })
    ));
    // An empty earlier file holds no data: skipped (and removed by open).
    fs::write(segment_path(dir.path(), 2), b"").unwrap();
    assert_eq!(read_only(dir.path()).unwrap().records, vec![commit(1)]);
    let (log, replay) = open(&config);
    assert_eq!(replay.records, vec![commit(1)]);
    assert_eq!(replay.segments, 2);
    assert!(!segment_path(dir.path(), 2).exists());
    log.close().await.unwrap();
}

#[tokio::test]
async fn group_commit_under_concurrent_forced_appends() {
    const TASKS: usize = 64;
    const APPENDS_PER_TASK: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = open(&config);
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..APPENDS_PER_TASK {
                log.append_forced(commit(task * 1_000_000 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let stats = log.stats();
    log.close().await.unwrap();
    let total = (TASKS * APPENDS_PER_TASK) as u64;
    assert_eq!(stats.records, total);
    assert_eq!(stats.fsyncs, stats.batches);
    assert!(
        stats.fsyncs * 4 < stats.records,
        "group commit should merge fsyncs: {stats:?}"
    );

    let (log, replay) = open(&config);
    let gids: HashSet<String> = replay.records.iter().map(|r| r.gid().to_owned()).collect();
    assert_eq!(replay.records.len() as u64, total);
    assert_eq!(gids.len() as u64, total);
    // Each task's own appends stay in order.
    let mut next_per_task = vec![0usize; TASKS];
    for record in &replay.records {
        let n: usize = record.gid()["gid-".len()..].parse().unwrap();
        let (task, i) = (n / 1_000_000, n % 1_000_000);
        assert_eq!(next_per_task[task], i);
        next_per_task[task] += 1;
    }
    log.close().await.unwrap();
}

#[tokio::test]
async fn without_group_commit_every_record_gets_its_own_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.group_commit = false;
    let (log, _) = open(&config);
    let mut handles = Vec::new();
    for task in 0..8 {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..25 {
                log.append_forced(commit(task * 100 + i)).await.unwrap();
                log.append_lazy(end(task * 100 + i)).await.unwrap();
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    settle(&log).await;
    let stats = log.stats();
    assert_eq!(stats.records, 400);
    assert_eq!(stats.fsyncs, 400);
    assert_eq!(stats.batches, 400);
    log.close().await.unwrap();
}

#[tokio::test]
async fn lazy_records_are_written_by_a_later_batch() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = open(&config);
    for i in 0..50 {
        log.append_lazy(one_phase(i)).await.unwrap();
    }
    wait_until("lazy records written", Duration::from_secs(5), || {
        log.stats().records == 50
    })
    .await;
    let stats = log.stats();
    assert!(stats.batches <= 50, "{stats:?}");
    log.close().await.unwrap();
    assert_eq!(read_only(dir.path()).unwrap().records.len(), 50);
}

#[tokio::test]
async fn lazy_batch_waits_for_company_and_a_forced_record_cuts_it_short() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    // The longest lazy flush allowed, far longer than a loaded machine takes to write one
    // batch, so "cut short" cannot be confused with "waited for the timer".
    config.lazy_flush_ms = 10_000;
    let (log, _) = open(&config);
    for i in 0..5 {
        log.append_lazy(end(i)).await.unwrap();
    }
    // A moment for a writer that would (wrongly) write a lazy-only batch at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(log.stats().records, 0, "lazy-only batch is still waiting");
    let start = Instant::now();
    log.append_forced(commit(9)).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "the forced record waited {:?}, as for the lazy timer",
        start.elapsed()
    );
    let stats = log.stats();
    assert_eq!((stats.records, stats.batches, stats.fsyncs), (6, 1, 1));
    log.close().await.unwrap();
}

#[tokio::test]
async fn close_writes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.lazy_flush_ms = 10_000;
    let (log, _) = open(&config);
    let other = log.clone();
    for i in 0..1_000 {
        log.append_lazy(abort(i)).await.unwrap();
    }
    log.close().await.unwrap();
    assert!(matches!(
        other.append_forced(commit(1)).await,
        Err(LogError::Closed)
    ));
    assert!(matches!(other.flush().await, Err(LogError::Closed)));
    let expected: Vec<Record> = (0..1_000).map(abort).collect();
    assert_eq!(read_only(dir.path()).unwrap().records, expected);
}

#[tokio::test]
async fn dropping_the_last_handle_finishes_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = open(&config);
    for i in 0..100 {
        log.append_lazy(end(i)).await.unwrap();
    }
    drop(log);
    // The writer releases the lock when it exits.
    let start = Instant::now();
    let (log, replay) = loop {
        match DecisionLog::open(config.clone()) {
            Ok(opened) => break opened,
            Err(LogError::Locked { .. }) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(replay.records.len(), 100);
    log.close().await.unwrap();
}

#[tokio::test]
async fn second_open_of_a_locked_dir_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = open(&config);
    assert!(matches!(
        DecisionLog::open(config.clone()),
        Err(LogError::Locked { .. })
    ));
    log.close().await.unwrap();
    let (log, _) = open(&config);
    log.close().await.unwrap();
}

#[tokio::test]
async fn oversized_record_is_rejected_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&LogConfig::new(dir.path()));
    let huge = Record::Abort {
        gid: "g".repeat(40_000),
        txn_id: "t".into(),
        decided_at_ms: 0,
        reason: "r".repeat(40_000),
    };
    assert!(matches!(
        log.append_forced(huge).await,
        Err(LogError::Encode(EncodeError::RecordTooLarge { .. }))
    ));
    let too_long = Record::End {
        gid: "g".repeat(70_000),
    };
    assert!(matches!(
        log.append_lazy(too_long).await,
        Err(LogError::Encode(EncodeError::StringTooLong { .. }))
    ));
    log.append_forced(commit(1)).await.unwrap();
    assert!(!log.is_poisoned());
    log.close().await.unwrap();
}

fn faults(fail_write_on_call: u64, fail_fsync_on_call: u64) -> Faults {
    Faults {
        plan: Some(Arc::new(FaultPlan {
            fail_write_on_call,
            fail_fsync_on_call,
            write_calls: AtomicU64::new(0),
            fsync_calls: AtomicU64::new(0),
        })),
    }
}

async fn check_poisoned(log: DecisionLog) {
    assert!(log.is_poisoned());
    assert!(matches!(
        log.append_forced(commit(9)).await,
        Err(LogError::Poisoned)
    ));
    assert!(matches!(
        log.append_lazy(end(9)).await,
        Err(LogError::Poisoned)
    ));
    assert!(matches!(log.flush().await, Err(LogError::Poisoned)));
    assert!(matches!(log.close().await, Err(LogError::Poisoned)));
}

#[tokio::test]
async fn failed_fsync_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = DecisionLog::open_with_faults(config.clone(), faults(0, 3)).unwrap();
    log.append_forced(commit(1)).await.unwrap();
    log.append_forced(commit(2)).await.unwrap();
    assert!(matches!(
        log.append_forced(commit(3)).await,
        Err(LogError::Poisoned)
    ));
    let stats = log.stats();
    assert_eq!((stats.records, stats.fsyncs), (2, 2));
    check_poisoned(log).await;

    // The writer exited and released the lock; the files recover. Record 3
    // was written but its fsync "failed": it may or may not be there, and
    // the caller (which got Poisoned) must treat it as in doubt.
    let (log, replay) = open(&config);
    assert_eq!(replay.records[..2], [commit(1), commit(2)]);
    log.close().await.unwrap();
}

#[tokio::test]
async fn failed_write_poisons_every_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let (log, _) = DecisionLog::open_with_faults(config.clone(), faults(2, 0)).unwrap();
    log.append_forced(commit(0)).await.unwrap();
    // Many concurrent waiters: the failing batch and everything queued
    // behind it must complete with Poisoned, none may hang.
    let mut handles = Vec::new();
    for task in 1..=32 {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..10 {
                results.push(log.append_forced(commit(task * 100 + i)).await);
            }
            results
        }));
    }
    let mut failed = 0;
    for handle in handles {
        for result in handle.await.unwrap() {
            match result {
                Err(LogError::Poisoned) => failed += 1,
                other => panic!("only the first batch succeeds: {other:?}"),
            }
        }
    }
    assert_eq!(failed, 320);
    assert_eq!(log.stats().records, 1);
    check_poisoned(log).await;
    let (log, replay) = open(&config);
    assert_eq!(replay.records, vec![commit(0)]);
    log.close().await.unwrap();
}

#[tokio::test]
async fn rotation_with_small_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.segment_max_bytes = 256;
    let (log, _) = open(&config);
    let records: Vec<Record> = (0..60).map(commit).collect();
    for record in &records {
        log.append_forced(record.clone()).await.unwrap();
    }
    let stats = log.stats();
    log.close().await.unwrap();
    let seqs = list_segments(dir.path()).unwrap();
    assert!(seqs.len() > 10, "{seqs:?}");
    assert_eq!(stats.segments_created, seqs.len() as u64);
    for seq in &seqs {
        let len = fs::metadata(segment_path(dir.path(), *seq)).unwrap().len();
        assert!(
            len <= config.segment_max_bytes,
            "segment {seq} is {len} bytes"
        );
    }
    let (log, replay) = open(&config);
    assert_eq!(replay.records, records);
    assert_eq!(replay.segments, seqs.len());
    log.close().await.unwrap();
}

#[tokio::test]
async fn segments_are_deleted_only_once_all_their_commits_ended() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.segment_max_bytes = 200; // about three commit records each
    config.retention_ms = 0;
    let (log, replay) = open(&config);
    assert!(!replay.earlier_segments_deleted, "a new log lost nothing");
    for i in 0..12 {
        log.append_forced(commit(i)).await.unwrap();
    }
    settle(&log).await;
    let with_commits = list_segments(dir.path()).unwrap();
    assert!(with_commits.len() >= 4, "{with_commits:?}");
    assert_eq!(log.stats().segments_deleted, 0);
    assert_eq!(log.stats().open_commits, 12);
    // The segment holding commit 0.
    let first = with_commits[0];

    for i in 1..12 {
        log.append_lazy(end(i)).await.unwrap();
    }
    settle(&log).await;
    let remaining = list_segments(dir.path()).unwrap();
    assert!(
        remaining.contains(&first),
        "segment with an open commit kept"
    );
    assert!(log.stats().segments_deleted > 0);
    assert_eq!(log.stats().open_commits, 1);
    for seq in &with_commits[1..with_commits.len() - 1] {
        assert!(!remaining.contains(seq), "finished segment {seq} deleted");
    }

    log.append_forced(end(0)).await.unwrap();
    settle(&log).await;
    let stats = log.stats();
    assert_eq!(stats.open_commits, 0);
    let remaining = list_segments(dir.path()).unwrap();
    assert_eq!(
        remaining.len(),
        1,
        "only the active segment is left: {remaining:?}"
    );
    assert_eq!(stats.segments_live, 1);
    assert_eq!(stats.segments_deleted, stats.segments_created - 1);
    log.close().await.unwrap();
    // Reopened, the log says records were deleted before the first one it read (so an
    // outcome it does not hold may have been a commit).
    let (log, replay) = open(&config);
    assert!(replay.earlier_segments_deleted);
    log.close().await.unwrap();
}

#[tokio::test]
async fn segment_with_unfinished_commit_is_kept_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.retention_ms = 0;

    let (log, _) = open(&config);
    log.append_forced(commit(1)).await.unwrap();
    log.append_forced(commit(2)).await.unwrap();
    log.append_lazy(end(2)).await.unwrap();
    log.close().await.unwrap();

    // Restart: segment 1 still has commit 1 open.
    let (log, replay) = open(&config);
    assert_eq!(replay.records, vec![commit(1), commit(2), end(2)]);
    assert_eq!(log.stats().open_commits, 1);
    log.append_forced(abort(3)).await.unwrap();
    settle(&log).await;
    assert_eq!(list_segments(dir.path()).unwrap(), vec![1, 2]);
    log.close().await.unwrap();

    // Restart again, then end commit 1 (in segment 3): 1 and 2 both go.
    let (log, _) = open(&config);
    log.append_forced(end(1)).await.unwrap();
    settle(&log).await;
    assert_eq!(list_segments(dir.path()).unwrap(), vec![3]);
    assert_eq!(log.stats().segments_deleted, 2);
    log.close().await.unwrap();

    // The End of commit 1 survives; commit 1 is gone with its segment.
    let replay = read_only(dir.path()).unwrap();
    assert_eq!(replay.records, vec![end(1)]);
}

#[tokio::test]
async fn end_in_later_segment_is_kept_while_its_commit_segment_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.retention_ms = 0;
    let (log, _) = open(&config);
    log.append_forced(commit(1)).await.unwrap();
    log.append_forced(commit(2)).await.unwrap();
    log.close().await.unwrap();
    // Segment 2 ends commit 1 only; commit 2 stays open in segment 1.
    let (log, _) = open(&config);
    log.append_forced(end(1)).await.unwrap();
    log.close().await.unwrap();
    // Segment 3 is active; segment 2 is finished but holds the End that
    // segment 1 needs, so it must stay.
    let (log, replay) = open(&config);
    assert_eq!(replay.records, vec![commit(1), commit(2), end(1)]);
    assert_eq!(log.stats().open_commits, 1);
    log.append_lazy(one_phase(5)).await.unwrap();
    settle(&log).await;
    assert_eq!(list_segments(dir.path()).unwrap(), vec![1, 2, 3]);
    log.close().await.unwrap();
}

#[tokio::test]
async fn retention_is_respected() {
    const RETENTION_MS: u64 = 700;
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.segment_max_bytes = 128;
    config.retention_ms = RETENTION_MS;
    let (log, _) = open(&config);
    let first_write = Instant::now();
    for i in 0..10 {
        log.append_forced(one_phase(i)).await.unwrap();
    }
    let last_write = Instant::now();
    settle(&log).await;
    let created = log.stats().segments_created;
    assert!(created >= 3);
    // No segment is old enough yet, unless a loaded machine took the retention to write
    // them (then the check says nothing, and is skipped rather than flaking).
    let deleted = log.stats().segments_deleted;
    if first_write.elapsed() < Duration::from_millis(RETENTION_MS) {
        assert_eq!(deleted, 0, "too young to delete");
    }

    // Idle: the writer's periodic check deletes them once old enough.
    wait_until("old segments deleted", Duration::from_secs(10), || {
        log.stats().segments_deleted == created - 1
    })
    .await;
    assert!(last_write.elapsed() >= Duration::from_millis(RETENTION_MS));
    assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
    log.close().await.unwrap();

    // After a restart the age comes from the file's mtime: a fresh,
    // finished segment under a long retention is kept.
    config.retention_ms = 3_600_000;
    let (log, _) = open(&config);
    log.append_forced(end(1)).await.unwrap();
    settle(&log).await;
    assert_eq!(log.stats().segments_deleted, 0);
    assert_eq!(list_segments(dir.path()).unwrap().len(), 2);
    log.close().await.unwrap();
}

#[tokio::test]
async fn read_only_does_not_modify_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let records: Vec<Record> = (0..4).map(commit).collect();
    let offsets = one_session(&config, &records).await;
    let seg1 = segment_path(dir.path(), 1);
    let full = fs::read(&seg1).unwrap();
    let full_len = full.len() as u64;
    // Torn tail in the middle of the last record.
    let cut = offsets[3] + 5;
    let file = OpenOptions::new().write(true).open(&seg1).unwrap();
    file.set_len(cut).unwrap();
    drop(file);
    assert!(cut < full_len);

    let before = snapshot(dir.path());
    let replay = read_only(dir.path()).unwrap();
    assert_eq!(replay.records, records[..3]);
    assert_eq!(replay.truncated_bytes, cut - offsets[3]);
    assert_eq!(replay.torn_tail.as_ref().unwrap().offset, offsets[3]);
    assert_eq!(snapshot(dir.path()), before);

    // A torn last-segment header is reported, not removed. (Segment 1 is
    // now an earlier segment, so it must be whole again.)
    fs::write(&seg1, &full).unwrap();
    fs::write(segment_path(dir.path(), 2), &encode_segment_header(2)[..7]).unwrap();
    let before = snapshot(dir.path());
    let replay = read_only(dir.path()).unwrap();
    assert_eq!(replay.truncated_bytes, 7);
    assert_eq!(snapshot(dir.path()), before);

    // It works next to a live writer, too.
    fs::remove_file(segment_path(dir.path(), 2)).unwrap();
    let (log, _) = open(&config);
    log.append_forced(end(0)).await.unwrap();
    let replay = read_only(dir.path()).unwrap();
    assert_eq!(replay.records.last(), Some(&end(0)));
    log.close().await.unwrap();

    assert!(read_only(dir.path().join("missing")).is_err());
}

/// `cargo test --release -- --ignored --nocapture throughput`
/// Set TWOPC_BENCH_DIR to measure on a particular file system (default: the
/// current directory, i.e. the crate's disk, not a tmpfs).
#[tokio::test]
#[ignore]
async fn throughput_forced_appends() {
    const APPENDS_TOTAL: usize = 64_000;
    let base = std::env::var("TWOPC_BENCH_DIR").unwrap_or_else(|_| ".".into());
    for (tasks, group_commit) in [(64, true), (64, false), (1, true), (8, true), (256, true)] {
        let appends_per_task = APPENDS_TOTAL / tasks;
        let dir = tempfile::tempdir_in(&base).unwrap();
        let mut config = LogConfig::new(dir.path());
        config.group_commit = group_commit;
        let (log, _) = open(&config);
        let start = Instant::now();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..appends_per_task {
                    log.append_forced(commit(task * 1_000_000 + i))
                        .await
                        .unwrap();
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        let elapsed = start.elapsed();
        let stats = log.stats();
        log.close().await.unwrap();
        let appends = (tasks * appends_per_task) as f64;
        println!(
            "group_commit={group_commit:<5} tasks={tasks:<3} appends={appends} in {:.3}s = {:>8.0} forced appends/s; \
             batches={} fsyncs={} records/batch={:.1} fsyncs/s={:.0} mean latency={:.0}us",
            elapsed.as_secs_f64(),
            appends / elapsed.as_secs_f64(),
            stats.batches,
            stats.fsyncs,
            stats.records as f64 / stats.batches as f64,
            stats.fsyncs as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 * tasks as f64 / appends,
        );
    }
}
