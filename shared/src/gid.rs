//! Global transaction ids.
//!
//! A GID names one distributed transaction on every participant: it is the literal given
//! to `PREPARE TRANSACTION`, so it is validated before it ever reaches SQL. The format is
//! `twopc_<coordinator-id>_<epoch>_<seq>`:
//! - `coordinator-id`: `[A-Za-z0-9]{1,32}` (no `_`, so the GID parses unambiguously);
//! - `epoch`: increases on every coordinator start, so recovery can tell the live
//!   transactions of this incarnation from those of an earlier one;
//! - `seq`: increases within an epoch.

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
        let (Some(cid), Some(epoch), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        validate_coordinator_id(cid).map_err(|_| bad())?;
        for n in [epoch, seq] {
            if n.is_empty() || n.len() > 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            n.parse::<u64>().map_err(|_| bad())?;
        }
        Ok(Gid(s.to_owned()))
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
        let mut it = rest.splitn(3, '_');
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
    if s.is_empty()
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
