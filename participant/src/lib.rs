//! twopc participant agent: fronts one PostgreSQL database and runs transaction branches
//! with its native prepared transactions.
//!
//! Module map:
//! - [`agent`]: [`Agent`], the branch state machine over a connection pool. Embeddable:
//!   call [`Agent::handle`] from any tokio program (the coordinator does, for in-process
//!   participants).
//! - [`server`]: the TCP server speaking the frames of `twopc_shared::codec`.
//! - [`convert`]: JSON parameters bound to PostgreSQL parameter types, rows to JSON.
//!
//! The binary `twopc-participant` (src/main.rs) parses flags and calls [`server::serve`].

pub mod agent;
pub mod auth;
pub mod cli;
pub mod convert;
pub mod decode;
pub mod failpoint;
pub mod server;
pub mod tls;

pub use agent::{Agent, AgentConfig, AgentStartError};
