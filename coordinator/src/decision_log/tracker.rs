//! Bookkeeping that decides when a segment may be deleted.
//!
//! A segment is finished when every `Commit` in it has a durable `End`, or an `Abort`
//! (an operator's forced resolution, which overrides the commit on replay and so ends
//! it just as an `End` does, pins included: if the `Abort`'s segment went first, the
//! `Commit` would replay as undecided-but-committed and phase 2 would commit it again).
//! An `End` that finishes a commit living in an *earlier* segment pins the
//! segment holding the `End` until the commit's segment is gone: deleting the
//! `End` first would make the commit look unfinished after a restart, and its
//! segment could then never be deleted. The pins point only from older to
//! newer segments, so deleting in ascending order always makes progress.
//!
//! The tracker is rebuilt from the replay on open, so none of this is stored.

use std::collections::{BTreeMap, HashMap};

use super::record::Record;

/// What the tracker needs to know about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    Commit {
        gid: String,
    },
    End {
        gid: String,
    },
    /// Needs no `End`: finished as soon as it is written.
    Finished,
}

impl RecordKind {
    pub fn of(record: &Record) -> RecordKind {
        match record {
            Record::Commit { gid, .. } => RecordKind::Commit { gid: gid.clone() },
            Record::End { gid } | Record::Abort { gid, .. } => RecordKind::End { gid: gid.clone() },
            Record::OnePhaseCommitted { .. } => RecordKind::Finished,
        }
    }

    /// Like [`RecordKind::of`], moving the gid out instead of cloning it.
    pub fn from_record(record: Record) -> RecordKind {
        match record {
            Record::Commit { gid, .. } => RecordKind::Commit { gid },
            Record::End { gid } | Record::Abort { gid, .. } => RecordKind::End { gid },
            Record::OnePhaseCommitted { .. } => RecordKind::Finished,
        }
    }
}

#[derive(Debug, Default)]
struct SegmentState {
    /// Wall-clock ms of the newest record (the file's mtime after a restart).
    newest_record_ms: u64,
    unfinished_commits: u64,
    /// How many `End`s in this segment finished commits of segments that
    /// still exist.
    pinned_by_count: u64,
    /// Segment seq -> how many of this segment's commits an `End` in that
    /// (newer) segment finished.
    ends_in: BTreeMap<u64, u64>,
}

#[derive(Debug, Default)]
pub struct SegmentTracker {
    segments: BTreeMap<u64, SegmentState>,
    /// gid -> segments holding a not yet ended `Commit` for it (usually one).
    open_commits: HashMap<String, Vec<u64>>,
    active_seq: Option<u64>,
}

impl SegmentTracker {
    pub fn new() -> SegmentTracker {
        SegmentTracker::default()
    }

    pub fn add_segment(&mut self, seq: u64, newest_record_ms: u64) {
        if let Some((&last, _)) = self.segments.last_key_value() {
            assert!(seq > last, "segments are added in increasing seq order");
        }
        self.segments.insert(
            seq,
            SegmentState {
                newest_record_ms,
                ..SegmentState::default()
            },
        );
    }

    pub fn set_active(&mut self, seq: u64) {
        assert!(
            self.segments.contains_key(&seq),
            "active segment {seq} is tracked"
        );
        if let Some(previous) = self.active_seq {
            assert!(seq > previous, "the active segment only moves forward");
        }
        self.active_seq = Some(seq);
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn open_commit_count(&self) -> usize {
        self.open_commits.len()
    }

    /// Records that `kind` was durably written to segment `seq` at `at_ms`.
    pub fn on_record(&mut self, seq: u64, kind: RecordKind, at_ms: u64) {
        let Some(state) = self.segments.get_mut(&seq) else {
            panic!("record for untracked segment {seq}");
        };
        state.newest_record_ms = state.newest_record_ms.max(at_ms);
        match kind {
            RecordKind::Commit { gid } => {
                state.unfinished_commits += 1;
                self.open_commits.entry(gid).or_default().push(seq);
            }
            RecordKind::End { gid } => {
                // An End without a tracked Commit is normal: its Commit's
                // segment was already deleted.
                let Some(commit_seqs) = self.open_commits.remove(&gid) else {
                    return;
                };
                for commit_seq in commit_seqs {
                    assert!(commit_seq <= seq, "a Commit precedes its End");
                    let Some(commit_state) = self.segments.get_mut(&commit_seq) else {
                        panic!("segment {commit_seq} with an unfinished commit is gone");
                    };
                    assert!(commit_state.unfinished_commits > 0);
                    commit_state.unfinished_commits -= 1;
                    if commit_seq != seq {
                        *commit_state.ends_in.entry(seq).or_default() += 1;
                        let Some(end_state) = self.segments.get_mut(&seq) else {
                            unreachable!("checked above");
                        };
                        end_state.pinned_by_count += 1;
                    }
                }
            }
            RecordKind::Finished => {}
        }
    }

    /// The oldest segment that may be deleted now, if any. O(segments).
    pub fn next_deletable(&self, now_ms: u64, retention_ms: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(seq, state)| {
                Some(**seq) != self.active_seq
                    && state.unfinished_commits == 0
                    && state.pinned_by_count == 0
                    && now_ms.saturating_sub(state.newest_record_ms) >= retention_ms
            })
            .map(|(seq, _)| *seq)
    }

    /// Forgets segment `seq` after its file was deleted.
    pub fn on_deleted(&mut self, seq: u64) {
        assert_ne!(
            Some(seq),
            self.active_seq,
            "the active segment is never deleted"
        );
        let Some(state) = self.segments.remove(&seq) else {
            panic!("deleted untracked segment {seq}");
        };
        assert_eq!(state.unfinished_commits, 0);
        assert_eq!(state.pinned_by_count, 0);
        for (end_seq, count) in state.ends_in {
            if let Some(end_state) = self.segments.get_mut(&end_seq) {
                assert!(end_state.pinned_by_count >= count);
                end_state.pinned_by_count -= count;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(gid: &str) -> RecordKind {
        RecordKind::Commit { gid: gid.into() }
    }

    fn end(gid: &str) -> RecordKind {
        RecordKind::End { gid: gid.into() }
    }

    fn tracker_with(seqs: &[u64], active: u64) -> SegmentTracker {
        let mut tracker = SegmentTracker::new();
        for seq in seqs {
            tracker.add_segment(*seq, 0);
        }
        tracker.set_active(active);
        tracker
    }

    #[test]
    fn finished_segments_delete_in_order_and_active_never() {
        let mut tracker = tracker_with(&[1, 2, 3], 3);
        tracker.on_record(1, RecordKind::Finished, 10);
        tracker.on_record(3, RecordKind::Finished, 10);
        assert_eq!(tracker.next_deletable(10, 0), Some(1));
        tracker.on_deleted(1);
        assert_eq!(tracker.next_deletable(10, 0), Some(2));
        tracker.on_deleted(2);
        assert_eq!(tracker.next_deletable(10, 0), None);
    }

    #[test]
    fn unfinished_commit_blocks_until_end() {
        let mut tracker = tracker_with(&[1, 2], 2);
        tracker.on_record(1, commit("x"), 0);
        tracker.on_record(1, commit("y"), 0);
        tracker.on_record(1, end("y"), 0);
        assert_eq!(tracker.next_deletable(0, 0), None);
        assert_eq!(tracker.open_commit_count(), 1);
        tracker.on_record(2, end("x"), 0);
        assert_eq!(tracker.next_deletable(0, 0), Some(1));
    }

    #[test]
    fn end_in_later_segment_is_pinned_until_commit_segment_goes() {
        let mut tracker = tracker_with(&[1, 2, 3], 3);
        tracker.on_record(1, commit("x"), 0);
        tracker.on_record(1, commit("stuck"), 0);
        tracker.on_record(2, end("x"), 0);
        // Segment 2 holds the End for x while segment 1 still exists.
        assert_eq!(tracker.next_deletable(0, 0), None);
        tracker.on_record(3, end("stuck"), 0);
        assert_eq!(tracker.next_deletable(0, 0), Some(1));
        tracker.on_deleted(1);
        assert_eq!(tracker.next_deletable(0, 0), Some(2));
    }

    #[test]
    fn duplicate_commits_are_all_ended() {
        let mut tracker = tracker_with(&[1, 2, 3], 3);
        tracker.on_record(1, commit("x"), 0);
        tracker.on_record(2, commit("x"), 0);
        tracker.on_record(2, end("x"), 0);
        assert_eq!(tracker.next_deletable(0, 0), Some(1));
        assert_eq!(
            tracker.segments[&2].pinned_by_count, 1,
            "2 holds the End that 1 needs"
        );
        tracker.on_deleted(1);
        assert_eq!(tracker.next_deletable(0, 0), Some(2));
    }

    #[test]
    fn an_abort_ends_a_commit_and_is_kept_while_the_commit_is() {
        let mut tracker = tracker_with(&[1, 2, 3], 3);
        let commit_record = Record::Commit {
            gid: "x".into(),
            txn_id: "t".into(),
            participants: vec!["a".into()],
            decided_at_ms: 0,
        };
        let abort_record = Record::Abort {
            gid: "x".into(),
            txn_id: "t".into(),
            decided_at_ms: 0,
            reason: "operator (forced)".into(),
        };
        tracker.on_record(1, RecordKind::of(&commit_record), 0);
        tracker.on_record(2, RecordKind::of(&abort_record), 0);
        // The Abort's segment may not go while the Commit's is there...
        assert_eq!(tracker.next_deletable(0, 0), Some(1));
        assert_eq!(tracker.segments[&2].pinned_by_count, 1);
        tracker.on_deleted(1);
        // ...and goes once it is gone.
        assert_eq!(tracker.next_deletable(0, 0), Some(2));
        assert_eq!(tracker.open_commit_count(), 0);
    }

    #[test]
    fn end_without_commit_is_ignored() {
        let mut tracker = tracker_with(&[1, 2], 2);
        tracker.on_record(1, end("gone"), 0);
        assert_eq!(tracker.next_deletable(0, 0), Some(1));
    }

    #[test]
    fn retention_counts_from_newest_record() {
        let mut tracker = tracker_with(&[1, 2], 2);
        tracker.on_record(1, RecordKind::Finished, 1_000);
        tracker.on_record(1, RecordKind::Finished, 5_000);
        assert_eq!(tracker.next_deletable(5_999, 1_000), None);
        assert_eq!(tracker.next_deletable(6_000, 1_000), Some(1));
        // A clock that went backwards never underflows.
        assert_eq!(tracker.next_deletable(0, 1_000), None);
    }
}
