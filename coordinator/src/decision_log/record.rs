//! Decision records and their hand-written binary payload encoding.
//!
//! Payload layout (all integers little-endian):
//!
//! ```text
//! [type: u8] [fields of that type, in declaration order]
//!   string  = [len: u16][len bytes of UTF-8]
//!   list    = [count: u16][count strings]
//!   u64     = 8 bytes
//! ```
//!
//! The type byte doubles as the version: a changed layout gets a new type
//! byte, and old type bytes stay decodable forever.
//!
//! Decoding trusts nothing: every length is checked against the bytes that
//! are actually left before anything is allocated, strings must be UTF-8,
//! and trailing bytes are an error. Decoding never panics.

use thiserror::Error;

/// Type byte of [`Record::Commit`] (layout version 1).
pub const TYPE_COMMIT_V1: u8 = 1;
/// Type byte of [`Record::End`] (layout version 1).
pub const TYPE_END_V1: u8 = 2;
/// Type byte of [`Record::OnePhaseCommitted`] (layout version 1).
pub const TYPE_ONE_PHASE_COMMITTED_V1: u8 = 3;
/// Type byte of [`Record::Abort`] (layout version 1).
pub const TYPE_ABORT_V1: u8 = 4;

/// Longest string a record can hold, in bytes.
pub const STRING_MAX_BYTES: usize = u16::MAX as usize;
/// Most participants a `Commit` record can list.
pub const PARTICIPANTS_MAX_COUNT: usize = u16::MAX as usize;

/// One entry of the decision log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Forced before any COMMIT PREPARED is sent.
    Commit {
        gid: String,
        txn_id: String,
        participants: Vec<String>,
        decided_at_ms: u64,
    },
    /// Lazy: every participant acknowledged.
    End { gid: String },
    /// Lazy: outcome record for a one-phase commit (no prepare), so GET can answer later.
    OnePhaseCommitted {
        gid: String,
        txn_id: String,
        participant: String,
        decided_at_ms: u64,
    },
    /// Lazy or forced: an explicit abort (operator resolution, or an aborted txn the
    /// coordinator wants to remember).
    Abort {
        gid: String,
        txn_id: String,
        decided_at_ms: u64,
        reason: String,
    },
}

/// Why a record could not be encoded. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error(
        "field `{field}` is {len_bytes} bytes, more than the {max_bytes} a record string may hold"
    )]
    StringTooLong {
        field: &'static str,
        len_bytes: usize,
        max_bytes: usize,
    },
    #[error("{count} participants, more than the {max_count} a record may list")]
    TooManyParticipants { count: usize, max_count: usize },
    #[error("encoded record is {len_bytes} bytes, more than the {max_bytes} a record may be")]
    RecordTooLarge { len_bytes: usize, max_bytes: usize },
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unknown record type byte {0}")]
    UnknownType(u8),
    #[error("payload ends inside field `{field}` at byte {offset}")]
    Truncated { field: &'static str, offset: usize },
    #[error("field `{field}` at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },
    #[error("{count} trailing bytes after the record")]
    TrailingBytes { count: usize },
}

impl Record {
    /// The global transaction id every record carries.
    pub fn gid(&self) -> &str {
        match self {
            Record::Commit { gid, .. }
            | Record::End { gid }
            | Record::OnePhaseCommitted { gid, .. }
            | Record::Abort { gid, .. } => gid,
        }
    }

    /// The type byte this record is written with.
    pub fn type_byte(&self) -> u8 {
        match self {
            Record::Commit { .. } => TYPE_COMMIT_V1,
            Record::End { .. } => TYPE_END_V1,
            Record::OnePhaseCommitted { .. } => TYPE_ONE_PHASE_COMMITTED_V1,
            Record::Abort { .. } => TYPE_ABORT_V1,
        }
    }

    /// Appends the payload encoding of `self` to `out`. On error `out` is left
    /// exactly as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start_len = out.len();
        let result = self.encode_fields(out);
        if result.is_err() {
            out.truncate(start_len);
        }
        result
    }

    /// The payload encoding of `self`.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    fn encoded_len_hint(&self) -> usize {
        1 + match self {
            Record::Commit {
                gid,
                txn_id,
                participants,
                ..
            } => {
                2 + gid.len()
                    + 2
                    + txn_id.len()
                    + 2
                    + participants.iter().map(|p| 2 + p.len()).sum::<usize>()
                    + 8
            }
            Record::End { gid } => 2 + gid.len(),
            Record::OnePhaseCommitted {
                gid,
                txn_id,
                participant,
                ..
            } => 2 + gid.len() + 2 + txn_id.len() + 2 + participant.len() + 8,
            Record::Abort {
                gid,
                txn_id,
                reason,
                ..
            } => 2 + gid.len() + 2 + txn_id.len() + 8 + 2 + reason.len(),
        }
    }

    fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.push(self.type_byte());
        match self {
            Record::Commit {
                gid,
                txn_id,
                participants,
                decided_at_ms,
            } => {
                put_str(out, "gid", gid)?;
                put_str(out, "txn_id", txn_id)?;
                let count = u16::try_from(participants.len()).map_err(|_| {
                    EncodeError::TooManyParticipants {
                        count: participants.len(),
                        max_count: PARTICIPANTS_MAX_COUNT,
                    }
                })?;
                out.extend_from_slice(&count.to_le_bytes());
                for participant in participants {
                    put_str(out, "participants", participant)?;
                }
                out.extend_from_slice(&decided_at_ms.to_le_bytes());
            }
            Record::End { gid } => {
                put_str(out, "gid", gid)?;
            }
            Record::OnePhaseCommitted {
                gid,
                txn_id,
                participant,
                decided_at_ms,
            } => {
                put_str(out, "gid", gid)?;
                put_str(out, "txn_id", txn_id)?;
                put_str(out, "participant", participant)?;
                out.extend_from_slice(&decided_at_ms.to_le_bytes());
            }
            Record::Abort {
                gid,
                txn_id,
                decided_at_ms,
                reason,
            } => {
                put_str(out, "gid", gid)?;
                put_str(out, "txn_id", txn_id)?;
                out.extend_from_slice(&decided_at_ms.to_le_bytes());
                put_str(out, "reason", reason)?;
            }
        }
        Ok(())
    }

    /// Decodes one payload. The whole slice must be exactly one record.
    pub fn decode(payload: &[u8]) -> Result<Record, DecodeError> {
        let mut reader = Reader {
            bytes: payload,
            offset: 0,
        };
        let type_byte = match payload.first() {
            Some(byte) => *byte,
            None => return Err(DecodeError::Empty),
        };
        reader.offset = 1;
        let record = match type_byte {
            TYPE_COMMIT_V1 => {
                let gid = reader.string("gid")?;
                let txn_id = reader.string("txn_id")?;
                let count = usize::from(reader.u16("participants.count")?);
                // Every participant takes at least its 2-byte length, so the
                // remaining bytes bound how many can really follow: never
                // trust `count` for the allocation.
                let capacity = count.min(reader.remaining() / 2);
                let mut participants = Vec::with_capacity(capacity);
                for _ in 0..count {
                    participants.push(reader.string("participants")?);
                }
                let decided_at_ms = reader.u64("decided_at_ms")?;
                Record::Commit {
                    gid,
                    txn_id,
                    participants,
                    decided_at_ms,
                }
            }
            TYPE_END_V1 => Record::End {
                gid: reader.string("gid")?,
            },
            TYPE_ONE_PHASE_COMMITTED_V1 => {
                let gid = reader.string("gid")?;
                let txn_id = reader.string("txn_id")?;
                let participant = reader.string("participant")?;
                let decided_at_ms = reader.u64("decided_at_ms")?;
                Record::OnePhaseCommitted {
                    gid,
                    txn_id,
                    participant,
                    decided_at_ms,
                }
            }
            TYPE_ABORT_V1 => {
                let gid = reader.string("gid")?;
                let txn_id = reader.string("txn_id")?;
                let decided_at_ms = reader.u64("decided_at_ms")?;
                let reason = reader.string("reason")?;
                Record::Abort {
                    gid,
                    txn_id,
                    decided_at_ms,
                    reason,
                }
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if reader.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                count: reader.remaining(),
            });
        }
        Ok(record)
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, value: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::StringTooLong {
        field,
        len_bytes: value.len(),
        max_bytes: STRING_MAX_BYTES,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

/// Bounds-checked cursor over an untrusted payload.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        assert!(self.offset <= self.bytes.len());
        self.bytes.len() - self.offset
    }

    fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                field,
                offset: self.offset,
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let bytes = self.take(field, 2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(field, 8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        let offset = self.offset;
        // `take` checks `len` against the bytes really present before any
        // allocation happens.
        let bytes = self.take(field, len)?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field, offset })?;
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::Commit {
                gid: "twopc-1".into(),
                txn_id: "txn-42".into(),
                participants: vec!["pg-a".into(), "pg-b".into(), "pg-ć".into()],
                decided_at_ms: 1_700_000_000_123,
            },
            Record::Commit {
                gid: String::new(),
                txn_id: String::new(),
                participants: Vec::new(),
                decided_at_ms: u64::MAX,
            },
            Record::End {
                gid: "twopc-1".into(),
            },
            Record::End { gid: String::new() },
            Record::OnePhaseCommitted {
                gid: "twopc-2".into(),
                txn_id: "txn-43".into(),
                participant: "pg-a".into(),
                decided_at_ms: 7,
            },
            Record::Abort {
                gid: "twopc-3".into(),
                txn_id: "txn-44".into(),
                decided_at_ms: 0,
                reason: "operator resolution: participant lost".into(),
            },
        ]
    }

    #[test]
    fn roundtrip_every_variant() {
        for record in samples() {
            let payload = record.encode().expect("encode");
            assert_eq!(payload[0], record.type_byte());
            assert_eq!(payload.len(), record.encoded_len_hint());
            assert_eq!(Record::decode(&payload), Ok(record.clone()));
        }
    }

    #[test]
    fn roundtrip_at_string_and_count_limits() {
        let long = "x".repeat(STRING_MAX_BYTES);
        let record = Record::End { gid: long.clone() };
        assert_eq!(Record::decode(&record.encode().unwrap()), Ok(record));

        let record = Record::Commit {
            gid: "g".into(),
            txn_id: "t".into(),
            participants: vec![String::new(); PARTICIPANTS_MAX_COUNT],
            decided_at_ms: 1,
        };
        assert_eq!(Record::decode(&record.encode().unwrap()), Ok(record));
    }

    #[test]
    fn every_truncation_fails_to_decode() {
        for record in samples() {
            let payload = record.encode().unwrap();
            for cut in 0..payload.len() {
                let result = Record::decode(&payload[..cut]);
                assert!(
                    result.is_err(),
                    "{record:?} cut at {cut} decoded as {result:?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_fail_to_decode() {
        for record in samples() {
            let mut payload = record.encode().unwrap();
            payload.push(0);
            assert_eq!(
                Record::decode(&payload),
                Err(DecodeError::TrailingBytes { count: 1 })
            );
        }
    }

    #[test]
    fn unknown_type_and_empty_fail() {
        assert_eq!(Record::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Record::decode(&[0]), Err(DecodeError::UnknownType(0)));
        assert_eq!(
            Record::decode(&[99, 0, 0]),
            Err(DecodeError::UnknownType(99))
        );
    }

    #[test]
    fn invalid_utf8_fails() {
        let payload = [TYPE_END_V1, 2, 0, 0xff, 0xfe];
        assert_eq!(
            Record::decode(&payload),
            Err(DecodeError::InvalidUtf8 {
                field: "gid",
                offset: 3
            })
        );
    }

    #[test]
    fn huge_count_does_not_allocate_or_panic() {
        // Claims 65535 participants but carries none.
        let mut payload = vec![TYPE_COMMIT_V1, 0, 0, 0, 0];
        payload.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            Record::decode(&payload),
            Err(DecodeError::Truncated {
                field: "participants",
                ..
            })
        ));
    }

    #[test]
    fn oversized_fields_are_rejected_on_encode() {
        let long = "x".repeat(STRING_MAX_BYTES + 1);
        let record = Record::Abort {
            gid: "g".into(),
            txn_id: "t".into(),
            decided_at_ms: 1,
            reason: long,
        };
        let mut out = vec![1, 2, 3];
        assert_eq!(
            record.encode_into(&mut out),
            Err(EncodeError::StringTooLong {
                field: "reason",
                len_bytes: STRING_MAX_BYTES + 1,
                max_bytes: STRING_MAX_BYTES
            })
        );
        assert_eq!(
            out,
            vec![1, 2, 3],
            "a failed encode leaves the buffer untouched"
        );

        let record = Record::Commit {
            gid: "g".into(),
            txn_id: "t".into(),
            participants: vec![String::new(); PARTICIPANTS_MAX_COUNT + 1],
            decided_at_ms: 1,
        };
        assert!(matches!(
            record.encode(),
            Err(EncodeError::TooManyParticipants { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic xorshift so failures reproduce.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid: Vec<Vec<u8>> = samples().iter().map(|r| r.encode().unwrap()).collect();
        for round in 0..20_000u64 {
            let mut bytes = if round % 2 == 0 {
                // Pure noise with a plausible type byte.
                let len = (next() % 64) as usize;
                let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if let Some(first) = bytes.first_mut() {
                    *first = (*first % 5) + 1;
                }
                bytes
            } else {
                valid[(next() % valid.len() as u64) as usize].clone()
            };
            // Mutate a few bytes of whatever we have.
            for _ in 0..(next() % 4) {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] ^= (next() as u8) | 1;
            }
            let _ = Record::decode(&bytes);
        }
    }
}
