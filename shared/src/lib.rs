//! Shared vocabulary of twopc: everything the coordinator and the participant agents
//! must agree on, and nothing that does I/O.
//!
//! - [`auth`]: the shared-key challenge-response of the handshake (HMAC-SHA256).
//! - [`gid`]: the global transaction id format (`twopc_<coordinator>_<epoch>_<seq>`) and
//!   the validation every id passes before it is spliced into SQL.
//! - [`msg`]: the coordinator ↔ agent messages (request/response enums).
//! - [`codec`]: length-delimited JSON frames with a maximum frame size.
//! - [`sql`]: what a client statement is by its leading keywords (DML, transaction
//!   control).
//!
//! This is the only crate that derives `Serialize` for the wire.

pub mod auth;
pub mod codec;
pub mod gid;
pub mod msg;
pub mod sql;

/// Version of the coordinator ↔ agent protocol. Bumped on any incompatible change;
/// the handshake refuses a peer with a different version. 3: `ErrorKind::DatabaseUnreachable`
/// (refused before anything ran, where 2 said `Unavailable`) and
/// `ExecuteBranch::expires_in_ms`. 4: authentication in the handshake (`Hello{nonce}`,
/// `Challenge`, `Authenticate`, `Hello{proof, epochs_durable}`), `ErrorKind::Unauthenticated`,
/// `Forbidden`, `EpochOutOfRange`.
pub const PROTOCOL_VERSION: u32 = 4;

/// Version of this build, reported by `/healthz` and the handshake.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
