//! On-disk layout: segment files, their header, record frames, and the
//! file-system steps (create, scan, truncate, delete) with their fsyncs.
//!
//! ```text
//! segment file  {seq:020}.seg
//!   header      [magic "TWOPCLOG"][format_version: u32][seq: u64][crc32c(previous 20 bytes): u32]
//!   frame*      [len: u32][crc32c(payload): u32][payload: len bytes]
//! ```
//!
//! All integers are little-endian. `len` is in `1..=MAX_RECORD_BYTES`;
//! anything else is damage.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::record::{DecodeError, EncodeError, Record};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TWOPCLOG";
/// Format version written into every segment header.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: u64 = 24;
/// Size of a frame header (`len` + `crc`).
pub const FRAME_HEADER_BYTES: u64 = 8;
/// Largest payload a frame may carry; a larger `len` on disk is corruption.
pub const MAX_RECORD_BYTES: u32 = 64 * 1024;

const SEGMENT_FILE_SUFFIX: &str = ".seg";
const SEGMENT_FILE_SEQ_DIGITS: usize = 20;

/// What is wrong with the bytes at some offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Damage {
    #[error("segment header is torn: file is {file_len_bytes} bytes, a header is {SEGMENT_HEADER_BYTES}")]
    TornSegmentHeader { file_len_bytes: u64 },
    #[error("segment header has bad magic {found:?}")]
    BadMagic { found: [u8; 8] },
    #[error("segment header crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrcMismatch { stored: u32, computed: u32 },
    #[error(
        "unsupported segment format version {found} (this build reads {SEGMENT_FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("segment header says seq {found}, file name says {expected}")]
    SeqMismatch { expected: u64, found: u64 },
    #[error("record header is torn: {available_bytes} bytes left, a record header is {FRAME_HEADER_BYTES}")]
    ShortFrameHeader { available_bytes: u64 },
    #[error("record length is zero")]
    ZeroLength,
    #[error("record length {len_bytes} is over the bound of {MAX_RECORD_BYTES} bytes")]
    LenOverBound { len_bytes: u32 },
    #[error(
        "record payload is torn: length says {len_bytes} bytes, {available_bytes} left in the file"
    )]
    ShortPayload {
        len_bytes: u32,
        available_bytes: u64,
    },
    #[error("record crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record payload does not decode: {0}")]
    Undecodable(#[from] DecodeError),
}

/// `{seq:020}.seg`
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_FILE_SUFFIX}")
}

/// Inverse of [`segment_file_name`]; `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_FILE_SUFFIX)?;
    if digits.len() != SEGMENT_FILE_SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_file_name(seq))
}

pub fn encode_segment_header(seq: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

pub fn validate_segment_header(
    header: &[u8; SEGMENT_HEADER_BYTES as usize],
    expected_seq: u64,
) -> Result<(), Damage> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&header[0..8]);
    if magic != SEGMENT_MAGIC {
        return Err(Damage::BadMagic { found: magic });
    }
    let stored = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    let computed = crc32c::crc32c(&header[0..20]);
    if stored != computed {
        return Err(Damage::HeaderCrcMismatch { stored, computed });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != SEGMENT_FORMAT_VERSION {
        return Err(Damage::UnsupportedVersion { found: version });
    }
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[12..20]);
    let seq = u64::from_le_bytes(seq_bytes);
    if seq != expected_seq {
        return Err(Damage::SeqMismatch {
            expected: expected_seq,
            found: seq,
        });
    }
    Ok(())
}

/// Appends one frame (`len`, `crc`, payload) for `record` to `out`. On error
/// `out` is left exactly as it was.
pub fn encode_frame_into(record: &Record, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES as usize]);
    if let Err(error) = record.encode_into(out) {
        out.truncate(start);
        return Err(error);
    }
    let payload_start = start + FRAME_HEADER_BYTES as usize;
    let payload_len = out.len() - payload_start;
    if payload_len > MAX_RECORD_BYTES as usize {
        out.truncate(start);
        return Err(EncodeError::RecordTooLarge {
            len_bytes: payload_len,
            max_bytes: MAX_RECORD_BYTES as usize,
        });
    }
    // The type byte makes every payload at least one byte long.
    assert!(payload_len > 0);
    let len = u32::try_from(payload_len).expect("bounded by MAX_RECORD_BYTES above");
    let crc = crc32c::crc32c(&out[payload_start..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One frame for `record`.
pub fn encode_frame(record: &Record) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_frame_into(record, &mut out)?;
    Ok(out)
}

/// How a segment's header looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderStatus {
    Valid,
    /// The file is shorter than a header (or empty).
    Torn,
    /// A full-length header that fails validation.
    Invalid(Damage),
}

/// Everything read from one segment file.
#[derive(Debug)]
pub struct SegmentScan {
    pub seq: u64,
    pub file_len_bytes: u64,
    pub header: HeaderStatus,
    /// Records in file order, each with the byte offset of its frame.
    pub records: Vec<(u64, Record)>,
    /// End of the last good frame (the header's end if there are none).
    pub valid_len_bytes: u64,
    /// The first bad frame, if any, and what is wrong with it.
    pub damage: Option<(u64, Damage)>,
    /// Wall-clock ms of the file's mtime (0 if the file system has none).
    pub mtime_ms: u64,
}

/// Reads a whole segment. I/O failures are errors; bad bytes are reported in
/// the result, never by panicking, and reading stops at the first bad frame.
pub fn scan_segment(path: &Path, seq: u64) -> io::Result<SegmentScan> {
    let file = File::open(path)?;
    let metadata = file.metadata()?;
    let file_len_bytes = metadata.len();
    let mtime_ms = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |duration| {
            u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
        });
    let mut scan = SegmentScan {
        seq,
        file_len_bytes,
        header: HeaderStatus::Valid,
        records: Vec::new(),
        valid_len_bytes: 0,
        damage: None,
        mtime_ms,
    };
    if file_len_bytes < SEGMENT_HEADER_BYTES {
        scan.header = HeaderStatus::Torn;
        return Ok(scan);
    }
    // Buffer sized for one frame of the largest kind; reads never go past
    // `file_len_bytes`, which was measured once above.
    let mut reader = BufReader::with_capacity(
        (MAX_RECORD_BYTES as u64 + FRAME_HEADER_BYTES) as usize,
        file,
    );
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    reader.read_exact(&mut header)?;
    if let Err(damage) = validate_segment_header(&header, seq) {
        scan.header = HeaderStatus::Invalid(damage);
        return Ok(scan);
    }

    let mut offset = SEGMENT_HEADER_BYTES;
    let mut payload = Vec::with_capacity(MAX_RECORD_BYTES as usize);
    // Each iteration consumes at least one frame header (8 bytes) or stops,
    // so the loop is bounded by file_len_bytes / 8.
    while offset < file_len_bytes {
        let available_bytes = file_len_bytes - offset;
        match read_frame(&mut reader, available_bytes, &mut payload)? {
            Ok((frame_bytes, record)) => {
                scan.records.push((offset, record));
                offset += frame_bytes;
                assert!(offset <= file_len_bytes);
            }
            Err(damage) => {
                scan.damage = Some((offset, damage));
                break;
            }
        }
    }
    scan.valid_len_bytes = offset;
    assert!(scan.valid_len_bytes >= SEGMENT_HEADER_BYTES);
    assert!(scan.valid_len_bytes <= file_len_bytes);
    assert_eq!(
        scan.damage.is_none(),
        scan.valid_len_bytes == file_len_bytes,
        "a clean scan ends exactly at the end of the file"
    );
    Ok(scan)
}

/// Intact frames found after a damaged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntactAfter {
    /// How many intact frames follow the damage.
    pub count: u64,
    /// Offset of the first of them.
    pub first_offset: u64,
}

/// Searches `path` from byte `from` to its end for intact frames (a plausible length,
/// a matching CRC32C and a decodable payload), resynchronising byte by byte after
/// damage. A torn write leaves none: whatever the crash left after the last good frame
/// is garbage or zeros. Intact frames after damage mean the damage is in the middle of
/// what was written: corruption, not a torn tail. Bounded by the file's length.
pub fn intact_frames_after(path: &Path, from: u64) -> io::Result<Option<IntactAfter>> {
    let bytes = fs::read(path)?;
    let mut at = usize::try_from(from).unwrap_or(usize::MAX);
    let mut found: Option<IntactAfter> = None;
    let mut payload = Vec::new();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let mut reader = rest;
        match read_frame(&mut reader, rest.len() as u64, &mut payload) {
            Ok(Ok((frame_bytes, _))) => {
                let f = found.get_or_insert(IntactAfter {
                    count: 0,
                    first_offset: at as u64,
                });
                f.count += 1;
                at += frame_bytes as usize;
            }
            // Damage (or a read past the end, which the length checks rule out).
            Ok(Err(_)) | Err(_) => at += 1,
        }
    }
    Ok(found)
}

/// Reads one frame. The outer `Result` is I/O, the inner one is damage.
fn read_frame(
    reader: &mut impl Read,
    available_bytes: u64,
    payload: &mut Vec<u8>,
) -> io::Result<Result<(u64, Record), Damage>> {
    if available_bytes < FRAME_HEADER_BYTES {
        return Ok(Err(Damage::ShortFrameHeader { available_bytes }));
    }
    let mut frame_header = [0u8; FRAME_HEADER_BYTES as usize];
    reader.read_exact(&mut frame_header)?;
    let len_bytes = u32::from_le_bytes([
        frame_header[0],
        frame_header[1],
        frame_header[2],
        frame_header[3],
    ]);
    let stored = u32::from_le_bytes([
        frame_header[4],
        frame_header[5],
        frame_header[6],
        frame_header[7],
    ]);
    if len_bytes == 0 {
        return Ok(Err(Damage::ZeroLength));
    }
    if len_bytes > MAX_RECORD_BYTES {
        return Ok(Err(Damage::LenOverBound { len_bytes }));
    }
    let payload_available = available_bytes - FRAME_HEADER_BYTES;
    if u64::from(len_bytes) > payload_available {
        return Ok(Err(Damage::ShortPayload {
            len_bytes,
            available_bytes: payload_available,
        }));
    }
    // Bounded by MAX_RECORD_BYTES, checked above.
    payload.clear();
    payload.resize(len_bytes as usize, 0);
    reader.read_exact(payload)?;
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Ok(Err(Damage::CrcMismatch { stored, computed }));
    }
    match Record::decode(payload) {
        Ok(record) => Ok(Ok((FRAME_HEADER_BYTES + u64::from(len_bytes), record))),
        Err(error) => Ok(Err(Damage::Undecodable(error))),
    }
}

/// Segment files in `dir`, sorted by seq. Other files are ignored.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        match parse_segment_file_name(name) {
            Some(seq) => seqs.push(seq),
            None if name.ends_with(SEGMENT_FILE_SUFFIX) => {
                tracing::warn!(
                    file = name,
                    "ignoring misnamed segment file in decision log dir"
                );
            }
            None => {}
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates segment `seq`: create the file, write the header, fsync the file,
/// fsync the directory. The returned file is positioned after the header.
pub fn create_segment(dir: &Path, seq: u64) -> io::Result<File> {
    let path = segment_path(dir, seq);
    let mut file = crate::meta::private_file()
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all(&encode_segment_header(seq))?;
    file.sync_all()?;
    fsync_dir(dir)?;
    debug_assert_eq!(file.metadata()?.len(), SEGMENT_HEADER_BYTES);
    Ok(file)
}

/// Deletes segment `seq`: unlink, fsync the directory.
pub fn remove_segment(dir: &Path, seq: u64) -> io::Result<()> {
    fs::remove_file(segment_path(dir, seq))?;
    fsync_dir(dir)
}

/// Cuts segment `seq` down to `len_bytes` and fsyncs it.
pub fn truncate_segment(dir: &Path, seq: u64, len_bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(segment_path(dir, seq))?;
    assert!(
        len_bytes <= file.metadata()?.len(),
        "truncation only ever shrinks"
    );
    file.set_len(len_bytes)?;
    file.sync_all()
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |duration| {
            u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(gid: &str) -> Record {
        Record::Commit {
            gid: gid.into(),
            txn_id: "txn".into(),
            participants: vec!["a".into(), "b".into()],
            decided_at_ms: 5,
        }
    }

    fn write_segment(dir: &Path, seq: u64, records: &[Record]) -> Vec<u64> {
        let mut bytes = encode_segment_header(seq).to_vec();
        let mut offsets = Vec::new();
        for record in records {
            offsets.push(bytes.len() as u64);
            encode_frame_into(record, &mut bytes).unwrap();
        }
        fs::write(segment_path(dir, seq), bytes).unwrap();
        offsets
    }

    #[test]
    fn file_names_roundtrip() {
        for seq in [0, 1, 42, u64::MAX] {
            let name = segment_file_name(seq);
            assert_eq!(name.len(), 24);
            assert_eq!(parse_segment_file_name(&name), Some(seq));
        }
        for bad in [
            "1.seg",
            "0000000000000000000a.seg",
            "00000000000000000001.log",
            "LOCK",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
        // 20 digits that overflow u64.
        assert_eq!(parse_segment_file_name("99999999999999999999.seg"), None);
    }

    #[test]
    fn header_validates_and_every_bit_flip_is_caught() {
        let header = encode_segment_header(7);
        assert_eq!(validate_segment_header(&header, 7), Ok(()));
        assert_eq!(
            validate_segment_header(&header, 8),
            Err(Damage::SeqMismatch {
                expected: 8,
                found: 7
            })
        );
        for byte in 0..header.len() {
            for bit in 0..8 {
                let mut bad = header;
                bad[byte] ^= 1 << bit;
                assert!(
                    validate_segment_header(&bad, 7).is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn frame_rejects_oversized_payload() {
        let record = Record::Commit {
            gid: "g".repeat(60_000),
            txn_id: "t".repeat(10_000),
            participants: vec![],
            decided_at_ms: 0,
        };
        let mut out = vec![9];
        assert!(matches!(
            encode_frame_into(&record, &mut out),
            Err(EncodeError::RecordTooLarge { .. })
        ));
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn scan_reads_clean_segment() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Record> = (0..5).map(|i| sample(&format!("g{i}"))).collect();
        let offsets = write_segment(dir.path(), 3, &records);
        let scan = scan_segment(&segment_path(dir.path(), 3), 3).unwrap();
        assert_eq!(scan.header, HeaderStatus::Valid);
        assert_eq!(scan.damage, None);
        assert_eq!(scan.valid_len_bytes, scan.file_len_bytes);
        let got: Vec<(u64, Record)> = offsets.into_iter().zip(records).collect();
        assert_eq!(scan.records, got);
    }

    #[test]
    fn scan_reports_each_kind_of_frame_damage() {
        let dir = tempfile::tempdir().unwrap();
        let records = [sample("a"), sample("b")];
        let offsets = write_segment(dir.path(), 1, &records);
        let path = segment_path(dir.path(), 1);
        let good = fs::read(&path).unwrap();
        let last = offsets[1] as usize;

        let check = |bytes: Vec<u8>, expected: fn(&Damage) -> bool| {
            fs::write(&path, bytes).unwrap();
            let scan = scan_segment(&path, 1).unwrap();
            assert_eq!(scan.records.len(), 1);
            assert_eq!(scan.valid_len_bytes, offsets[1]);
            let (offset, damage) = scan.damage.expect("damage");
            assert_eq!(offset, offsets[1]);
            assert!(expected(&damage), "{damage:?}");
        };

        check(good[..last + 3].to_vec(), |d| {
            matches!(d, Damage::ShortFrameHeader { available_bytes: 3 })
        });
        let mut zero = good[..last].to_vec();
        zero.extend_from_slice(&[0u8; 100]);
        check(zero, |d| matches!(d, Damage::ZeroLength));
        let mut huge = good.clone();
        huge[last..last + 4].copy_from_slice(&(MAX_RECORD_BYTES + 1).to_le_bytes());
        check(huge, |d| matches!(d, Damage::LenOverBound { .. }));
        check(good[..good.len() - 1].to_vec(), |d| {
            matches!(d, Damage::ShortPayload { .. })
        });
        let mut flipped = good.clone();
        let end = flipped.len();
        flipped[end - 1] ^= 0x10;
        check(flipped, |d| matches!(d, Damage::CrcMismatch { .. }));
        // A frame whose crc is right but whose payload is not a record.
        let mut undecodable = good[..last].to_vec();
        let payload = [200u8, 1, 2];
        undecodable.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        undecodable.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        undecodable.extend_from_slice(&payload);
        check(undecodable, |d| {
            matches!(d, Damage::Undecodable(DecodeError::UnknownType(200)))
        });
    }

    #[test]
    fn scan_reports_torn_and_invalid_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 2);
        let header = encode_segment_header(2);
        for cut in 0..header.len() {
            fs::write(&path, &header[..cut]).unwrap();
            let scan = scan_segment(&path, 2).unwrap();
            assert_eq!(scan.header, HeaderStatus::Torn, "cut {cut}");
            assert!(scan.records.is_empty());
        }
        fs::write(&path, [0u8; SEGMENT_HEADER_BYTES as usize]).unwrap();
        assert!(matches!(
            scan_segment(&path, 2).unwrap().header,
            HeaderStatus::Invalid(Damage::BadMagic { .. })
        ));
        fs::write(&path, header).unwrap();
        let scan = scan_segment(&path, 2).unwrap();
        assert_eq!(scan.header, HeaderStatus::Valid);
        assert_eq!(scan.valid_len_bytes, SEGMENT_HEADER_BYTES);
    }

    #[test]
    fn create_truncate_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = create_segment(dir.path(), 9).unwrap();
        assert!(
            create_segment(dir.path(), 9).is_err(),
            "never overwrites a segment"
        );
        file.write_all(&encode_frame(&sample("x")).unwrap())
            .unwrap();
        file.sync_data().unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![9]);
        truncate_segment(dir.path(), 9, SEGMENT_HEADER_BYTES).unwrap();
        let scan = scan_segment(&segment_path(dir.path(), 9), 9).unwrap();
        assert!(scan.records.is_empty() && scan.damage.is_none());
        remove_segment(dir.path(), 9).unwrap();
        assert!(list_segments(dir.path()).unwrap().is_empty());
    }
}
