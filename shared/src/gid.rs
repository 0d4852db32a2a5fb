//! Global transaction ids.
//!
//! A GID names one distributed transaction on every participant: it is the literal given
//! to `PREPARE TRANSACTION`, so it is validated before it ever reaches SQL. The format is
//! `twopc_<coordinator-id>_<epoch>_<seq>`:
//! - `coordinator-id`: `[A-Za-z0-9]{1,32}` (no `_`, so the GID parses unambiguously);
//! - `epoch`: increases on every coordinator start, so recovery can tell the live
//!   transactions of this incarnation from those of an earlier one;
//! - `seq`: increases within an epoch.
//!
//! A last-agent transaction (see ARCHITECTURE, "Last-agent commit") appends
//! `_l<hex>`: the name of the participant whose local commit is the decision, hex-encoded
//! (lowercase) so the GID keeps its alphabet. Recovery reads it to know whom to ask.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every GID we create starts with this.
pub const GID_PREFIX: &str = "twopc_";
/// PostgreSQL limits a GID to 200 bytes (including the terminating NUL).
pub const GID_MAX_BYTES: usize = 199;
/// Longest coordinator id.
pub const COORDINATOR_ID_MAX_BYTES: usize = 32;
/// Longest client-chosen transaction id.
pub const TXN_ID_MAX_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid GID {0:?}: expected twopc_<coordinator>_<epoch>_<seq>")]
    Gid(String),
    #[error("invalid coordinator id {0:?}: 1 to 32 ASCII letters or digits")]
    CoordinatorId(String),
    #[error("invalid txn_id {0:?}: 1 to 128 characters of [A-Za-z0-9_.-]")]
    TxnId(String),
}

/// A validated global transaction id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gid(String);

impl Gid {
    pub fn new(coordinator_id: &str, epoch: u64, seq: u64) -> Result<Gid, IdError> {
        validate_coordinator_id(coordinator_id)?;
        Gid::parse(&format!("{GID_PREFIX}{coordinator_id}_{epoch}_{seq}"))
    }

    /// Validates `s` as a GID of ours.
    pub fn parse(s: &str) -> Result<Gid, IdError> {
        let bad = || IdError::Gid(s.chars().take(64).collect());
        if s.len() > GID_MAX_BYTES {
            return Err(bad());
        }
        let rest = s.strip_prefix(GID_PREFIX).ok_or_else(bad)?;
        let mut parts = rest.split('_');
        let (Some(cid), Some(epoch), Some(seq), last, None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        if let Some(last) = last {
            decode_last_agent(last).ok_or_else(bad)?;
        }
        validate_coordinator_id(cid).map_err(|_| bad())?;
        for n in [epoch, seq] {
            if n.is_empty() || n.len() > 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            n.parse::<u64>().map_err(|_| bad())?;
        }
        Ok(Gid(s.to_owned()))
    }

    /// A last-agent GID: `last_agent` (a participant name) commits last, and its
    /// commit is the decision. `None` if the name does not fit in a GID.
    pub fn with_last_agent(
        coordinator_id: &str,
        epoch: u64,
        seq: u64,
        last_agent: &str,
    ) -> Option<Gid> {
        if last_agent.is_empty() {
            return None;
        }
        let mut s = Gid::new(coordinator_id, epoch, seq).ok()?.0;
        s.push_str("_l");
        for b in last_agent.bytes() {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Gid::parse(&s).ok()
    }

    /// The participant whose commit decides this transaction, if it is a last-agent one.
    pub fn last_agent(&self) -> Option<String> {
        let rest = &self.0[GID_PREFIX.len()..];
        let last = rest.splitn(4, '_').nth(3)?;
        decode_last_agent(last)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The coordinator id embedded in the GID.
    pub fn coordinator_id(&self) -> &str {
        self.parts().0
    }

    /// The coordinator epoch that created this GID.
    pub fn epoch(&self) -> u64 {
        // Validated in `parse`.
        self.parts().1.parse().unwrap_or(0)
    }

    /// The sequence number within the epoch.
    pub fn seq(&self) -> u64 {
        self.parts().2.parse().unwrap_or(0)
    }

    fn parts(&self) -> (&str, &str, &str) {
        let rest = &self.0[GID_PREFIX.len()..];
        let mut it = rest.split('_');
        (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        )
    }

    /// The SQL literal form, `'twopc_...'`. Safe because the alphabet is `[A-Za-z0-9_]`.
    pub fn sql_literal(&self) -> String {
        debug_assert!(self
            .0
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        format!("'{}'", self.0)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `l<hex>` → the participant name, if well formed (lowercase hex of non-empty UTF-8).
fn decode_last_agent(part: &str) -> Option<String> {
    let hex = part.strip_prefix('l')?.as_bytes();
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| HEX.iter().position(|&h| h == c).map(|n| n as u8);
    let bytes = hex
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The prefix every GID of `coordinator_id` starts with (`twopc_<id>_`).
pub fn gid_prefix(coordinator_id: &str) -> String {
    format!("{GID_PREFIX}{coordinator_id}_")
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Gid {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Gid::parse(&s)
    }
}

impl From<Gid> for String {
    fn from(g: Gid) -> String {
        g.0
    }
}

pub fn validate_coordinator_id(s: &str) -> Result<(), IdError> {
    if s.is_empty()
        || s.len() > COORDINATOR_ID_MAX_BYTES
        || !s.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(IdError::CoordinatorId(s.chars().take(64).collect()));
    }
    Ok(())
}

/// Validates a client-chosen transaction id.
pub fn validate_txn_id(s: &str) -> Result<(), IdError> {
    // `.` and `..` are path segments no URL can carry (`/v1/transactions/..`).
    if s.is_empty()
        || s.bytes().all(|b| b == b'.')
        || s.len() > TXN_ID_MAX_BYTES
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(IdError::TxnId(s.chars().take(64).collect()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_ids_a_path_cannot_carry_are_refused() {
        for bad in [".", "..", "...", "", "a b", "a/b"] {
            assert!(validate_txn_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a.b", ".a", "order-42", "x_1.2"] {
            assert!(validate_txn_id(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn roundtrip() {
        let g = Gid::new("c1", 7, 42).unwrap();
        assert_eq!(g.as_str(), "twopc_c1_7_42");
        assert_eq!(g.coordinator_id(), "c1");
        assert_eq!(g.epoch(), 7);
        assert_eq!(g.seq(), 42);
        assert_eq!(Gid::parse("twopc_c1_7_42").unwrap(), g);
        assert!(g.as_str().starts_with(&gid_prefix("c1")));
    }

    #[test]
    fn rejects_injection_and_malformed() {
        for bad in [
            "",
            "twopc_",
            "twopc_c1_1",
            "twopc_c1_1_2_3",
            "twopc_c1_1_2_l",
            "twopc_c1_1_2_l6",
            "twopc_c1_1_2_l6G",
            "twopc_c1_1_2_l6A",
            "twopc_c1_1_2_lff",
            "twopc_c1_1_2_l61_l62",
            "twopc_c1_1_x",
            "twopc_c1_-1_2",
            "twopc_c'1_1_2",
            "twopc_c1_1_2'; DROP TABLE acct; --",
            "other_c1_1_2",
            "twopc_c1_99999999999999999999999_1",
            "twopc_c 1_1_2",
        ] {
            assert!(Gid::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Gid::new("c_1", 1, 1).is_err());
        assert!(Gid::new(&"a".repeat(33), 1, 1).is_err());
    }

    #[test]
    fn last_agent_roundtrip() {
        let g = Gid::with_last_agent("c1", 7, 42, "bank-b_2").unwrap();
        assert_eq!(g.as_str(), "twopc_c1_7_42_l62616e6b2d625f32");
        assert_eq!(g.last_agent().as_deref(), Some("bank-b_2"));
        assert_eq!((g.coordinator_id(), g.epoch(), g.seq()), ("c1", 7, 42));
        assert_eq!(Gid::parse(g.as_str()).unwrap(), g);
        assert!(g.as_str().starts_with(&gid_prefix("c1")));
        assert_eq!(Gid::new("c1", 7, 42).unwrap().last_agent(), None);
        assert!(Gid::with_last_agent("c1", 7, 42, "").is_none());
        // Too long for PostgreSQL's 200 bytes: no last-agent GID, the caller falls back.
        assert!(
            Gid::with_last_agent(&"c".repeat(32), u64::MAX, u64::MAX, &"p".repeat(64)).is_none()
        );
    }

    #[test]
    fn serde_validates() {
        let ok: Gid = serde_json::from_str("\"twopc_a_1_2\"").unwrap();
        assert_eq!(ok.seq(), 2);
        assert!(serde_json::from_str::<Gid>("\"twopc_a_1_2'\"").is_err());
    }

    #[test]
    fn txn_ids() {
        assert!(validate_txn_id("order-42.retry_1").is_ok());
        assert!(validate_txn_id(&"a".repeat(128)).is_ok());
        for bad in ["", "a b", "a'b", "a\"b", "a;b", "é", &"a".repeat(129)] {
            assert!(validate_txn_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
