//! twopc coordinator: runs client transactions across PostgreSQL databases with
//! two-phase commit and a durable decision log.
//!
//! Module map:
//! - [`http`]: the client API (axum) over the [`engine`]; [`api`]: its wire types and
//!   OpenAPI document.
//! - [`engine`]: the transaction state machine: fan-out, votes, decision, phase 2,
//!   timeouts, outcomes.
//! - [`decision_log`]: append-only CRC'd segments with group commit; the only thing the
//!   coordinator trusts after a crash.
//! - [`meta`]: coordinator id and epoch, bumped durably on every start.
//! - [`participant`]: handles on agents, in-process or over TCP.
//! - [`config`] and [`server`]: flags/TOML and the startup sequence of `serve`.
//! - [`cli`]: the command line; [`txns`]: the operator's in-doubt tooling.
//! - [`pg_cluster`], [`bank`] and [`demo`]: throwaway PostgreSQL clusters, the bank
//!   workload and its invariant checker, and the `demo` command built on them (the test
//!   kit reuses the first two).

pub mod api;
pub mod bank;
pub mod certs;
pub mod cli;
pub mod config;
pub mod decision_log;
pub mod demo;
pub mod engine;
pub mod http;
pub mod meta;
pub mod participant;
pub mod pg_cluster;
pub mod server;
pub mod txns;
pub mod workload;
