//! Property-based fuzzing of the decision-log reader: whatever happens to the bytes of
//! the last segment, opening never panics, and what it returns is a prefix of what was
//! written (damage is cut off at the tail, never skipped over) that holds every record
//! which ended before the first damaged byte (an empty replay is not a prefix worth
//! accepting).

use proptest::prelude::*;
use twopc_coordinator::decision_log::{read_only, DecisionLog, LogConfig, Record};

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::Commit {
            gid: format!("twopc_c1_1_{i}"),
            txn_id: format!("t{i}"),
            participants: vec!["a".into(), "b".into()],
            decided_at_ms: i as u64,
        })
        .collect()
}

fn write_log(dir: &std::path::Path, recs: &[Record]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, _) = DecisionLog::open(LogConfig::new(dir)).unwrap();
        for r in recs {
            log.append_forced(r.clone()).await.unwrap();
        }
        log.close().await.unwrap();
    });
}

/// The newest segment holding a record (more than its header).
fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    newest_segment(dir, 24)
}

/// Most records a case writes.
const MAX_RECORDS: usize = 20;

/// `ends[k]`: the length of the segment holding the first `k` records, i.e. where the
/// k-th record ends (`ends[0]`: the header). Checked to be prefixes of one another, so a
/// case's segment of `n` records has its records end at `ends[1..=n]`.
fn record_ends() -> &'static Vec<usize> {
    static ENDS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    ENDS.get_or_init(|| {
        let all = records(MAX_RECORDS);
        let segments: Vec<Vec<u8>> = (0..=MAX_RECORDS)
            .map(|k| {
                let dir = tempfile::tempdir().unwrap();
                write_log(dir.path(), &all[..k]);
                std::fs::read(newest_segment(dir.path(), 0)).unwrap()
            })
            .collect();
        let longest = &segments[MAX_RECORDS];
        for s in &segments {
            assert_eq!(&longest[..s.len()], &s[..], "segments are not prefixes");
        }
        segments.iter().map(Vec::len).collect()
    })
}

/// The newest segment file of `dir` longer than `min_bytes`.
fn newest_segment(dir: &std::path::Path, min_bytes: u64) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() > min_bytes)
                .unwrap_or(false)
        })
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn damaged_tail_yields_a_prefix(
        n in 1usize..20,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let written = records(n);
        write_log(dir.path(), &written);
        let seg = last_segment(dir.path());
        let original = std::fs::read(&seg).unwrap();
        prop_assert_eq!(original.len(), record_ends()[n]);
        let mut bytes = original.clone();
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        bytes.extend(garbage);
        // The first byte that differs from what was written (garbage after the end
        // damages nothing written).
        let first_damage = original
            .iter()
            .zip(&bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(original.len().min(bytes.len()));
        let intact = record_ends()[1..=n].iter().filter(|&&end| end <= first_damage).count();
        std::fs::write(&seg, &bytes).unwrap();

        // Read-only first (changes nothing), then a real open (repairs the tail).
        // A damaged segment header can make the segment unreadable: an error, never a
        // wrong answer.
        let replays = [
            read_only(dir.path()),
            DecisionLog::open(LogConfig::new(dir.path())).map(|(_, r)| r),
        ];
        for r in replays.into_iter().flatten() {
            prop_assert!(r.records.len() <= written.len());
            prop_assert_eq!(&r.records[..], &written[..r.records.len()]);
            prop_assert!(
                r.records.len() >= intact,
                "{} of {} records replayed; {} ended before the first damaged byte ({})",
                r.records.len(), n, intact, first_damage
            );
        }
    }
}
