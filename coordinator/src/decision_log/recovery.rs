//! Reading the whole log on open (repairing a torn tail) or for an offline
//! tool (never writing anything).
//!
//! Only the last segment may be damaged: it is the only one that was being
//! written when the process stopped. Every earlier segment was fsynced in
//! full before the next one was created, so damage there is corruption and
//! opening fails rather than skipping data in the middle of the log.

use std::path::Path;

use super::record::Record;
use super::segment::{self, Damage, HeaderStatus, SEGMENT_HEADER_BYTES};
use super::tracker::{RecordKind, SegmentTracker};
use super::{io_error, LogError, Replay, TornTail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `DecisionLog::open`: truncate a torn tail, remove a torn last segment.
    Repair,
    /// `read_only`: report, never modify.
    ReadOnly,
}

pub struct Recovered {
    pub replay: Replay,
    pub tracker: SegmentTracker,
    /// Seq for the next segment to create.
    pub next_seq: u64,
}

/// `discard_corrupt`: with `Mode::Repair`, truncate the last segment at damage even when
/// intact records follow it (the operator's explicit choice; the segment is copied to
/// `<segment>.corrupt` first). Without it such a log refuses to open.
pub fn recover(dir: &Path, mode: Mode, discard_corrupt: bool) -> Result<Recovered, LogError> {
    let seqs = segment::list_segments(dir).map_err(io_error("listing segments", dir))?;
    let mut records: Vec<Record> = Vec::new();
    let mut tracker = SegmentTracker::new();
    let mut torn_tail: Option<TornTail> = None;
    let mut segments = 0usize;

    for (index, &seq) in seqs.iter().enumerate() {
        let is_last = index + 1 == seqs.len();
        let path = segment::segment_path(dir, seq);
        let scan = segment::scan_segment(&path, seq).map_err(io_error("reading segment", &path))?;
        assert_eq!(scan.seq, seq);

        // A last segment whose creation was cut short: shorter than a header,
        // or a header-sized file whose header never reached the disk.
        let torn_creation = match &scan.header {
            HeaderStatus::Valid => false,
            HeaderStatus::Torn => true,
            HeaderStatus::Invalid(Damage::BadMagic { .. } | Damage::HeaderCrcMismatch { .. }) => {
                scan.file_len_bytes == SEGMENT_HEADER_BYTES
            }
            HeaderStatus::Invalid(_) => false,
        };
        if scan.header != HeaderStatus::Valid {
            if is_last && torn_creation {
                let damage = match scan.header {
                    HeaderStatus::Invalid(damage) => damage,
                    _ => Damage::TornSegmentHeader {
                        file_len_bytes: scan.file_len_bytes,
                    },
                };
                tracing::warn!(
                    segment = seq,
                    dropped_bytes = scan.file_len_bytes,
                    %damage,
                    removing = (mode == Mode::Repair),
                    "decision log: last segment has a torn header (crash while creating it)"
                );
                if mode == Mode::Repair {
                    segment::remove_segment(dir, seq)
                        .map_err(io_error("removing torn segment", &path))?;
                }
                torn_tail = Some(TornTail {
                    segment: seq,
                    offset: 0,
                    dropped_bytes: scan.file_len_bytes,
                    damage,
                });
                continue;
            }
            if !is_last && scan.file_len_bytes == 0 {
                // An empty file holds no data, so nothing is skipped.
                tracing::warn!(
                    segment = seq,
                    removing = (mode == Mode::Repair),
                    "decision log: empty segment file"
                );
                if mode == Mode::Repair {
                    segment::remove_segment(dir, seq)
                        .map_err(io_error("removing empty segment", &path))?;
                }
                continue;
            }
            let reason = match scan.header {
                HeaderStatus::Invalid(damage) => damage,
                _ => Damage::TornSegmentHeader {
                    file_len_bytes: scan.file_len_bytes,
                },
            };
            return Err(LogError::Corrupt {
                segment: seq,
                offset: 0,
                reason,
            });
        }

        let mut newest_record_ms = scan.mtime_ms;
        if let Some((offset, damage)) = scan.damage {
            if !is_last {
                return Err(LogError::Corrupt {
                    segment: seq,
                    offset,
                    reason: damage,
                });
            }
            assert_eq!(offset, scan.valid_len_bytes);
            let dropped_bytes = scan.file_len_bytes - scan.valid_len_bytes;
            assert!(dropped_bytes > 0);
            let intact = segment::intact_frames_after(&path, offset + 1)
                .map_err(io_error("reading segment", &path))?;
            if let Some(intact) = intact {
                if mode == Mode::ReadOnly || !discard_corrupt {
                    return Err(LogError::CorruptBeforeIntact {
                        segment: seq,
                        offset,
                        reason: damage,
                        intact_records: intact.count,
                        first_intact_offset: intact.first_offset,
                    });
                }
                let copy = path.with_extension("seg.corrupt");
                std::fs::copy(&path, &copy)
                    .map_err(io_error("keeping a copy of a corrupt segment", &copy))?;
                tracing::error!(
                    segment = seq,
                    offset,
                    %damage,
                    intact_records_dropped = intact.count,
                    copy = %copy.display(),
                    "decision log: corrupt record followed by intact ones; discarding them as the operator asked"
                );
            }
            tracing::warn!(
                segment = seq,
                offset,
                dropped_bytes,
                %damage,
                truncating = (mode == Mode::Repair),
                "decision log: torn tail in last segment"
            );
            if mode == Mode::Repair {
                segment::truncate_segment(dir, seq, scan.valid_len_bytes)
                    .map_err(io_error("truncating torn tail", &path))?;
                newest_record_ms = segment::now_ms();
            }
            torn_tail = Some(TornTail {
                segment: seq,
                offset,
                dropped_bytes,
                damage,
            });
        }

        segments += 1;
        tracker.add_segment(seq, newest_record_ms);
        for (_offset, record) in scan.records {
            tracker.on_record(seq, RecordKind::of(&record), newest_record_ms);
            records.push(record);
        }
    }

    let next_seq = match seqs.last() {
        None => 1,
        Some(last) => last.checked_add(1).ok_or(LogError::SeqExhausted)?,
    };
    let truncated_bytes = torn_tail.as_ref().map_or(0, |torn| torn.dropped_bytes);
    Ok(Recovered {
        replay: Replay {
            records,
            truncated_bytes,
            segments,
            torn_tail,
            // The first segment ever made is 1: a later first one means older segments
            // were deleted (past retention), with whatever outcomes they held.
            earlier_segments_deleted: seqs.first().is_some_and(|&first| first > 1),
        },
        tracker,
        next_seq,
    })
}
