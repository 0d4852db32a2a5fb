//! twopc's protocol as pure state machines.
//!
//! Nothing here reads a clock, draws a random number, takes a lock, spawns a task or does
//! I/O (the crate has no dependencies). Every outside event — an agent's vote or
//! acknowledgement, "the decision is durable", a timer, a recovery listing — comes in as
//! a value, time and jitter included; what to do comes out as [`commit::Effect`]s that
//! the runtime (`twopc-coordinator`) or the simulator (`twopc-sim`) carries out. So the
//! same code runs in production and under deterministic simulation, where an oracle
//! checks the invariants after every step (DESIGN, "Protocol core, simulation and model
//! checking").
//!
//! - [`commit`]: one transaction's two-phase commit, from the votes to the END record.
//! - [`last_agent`]: a last-agent or one-phase commit, whose decision is the last
//!   agent's local commit of its decision row.
//! - [`outcomes`]: the outcome index by client txn id, and the rule that admits a
//!   request naming one (invariant 7).
//! - [`recovery`]: what recovery does with a prepared branch an agent lists.
//! - [`resolve`]: which of an operator's resolves contradict the decision.
//! - [`backoff`]: the one retry rule (doubling, bounded, jittered by a value handed in).
//! - [`mutation`]: known bugs compiled in under the `mutations` feature, for the
//!   simulator to prove its oracle bites.

pub mod backoff;
pub mod commit;
pub mod last_agent;
pub mod mutation;
pub mod outcomes;
pub mod recovery;
pub mod resolve;

/// A participant's (agent's) configured name.
pub type Participant = String;
