//! Deterministic simulation of twopc's protocol core (DESIGN, "Protocol core, simulation
//! and model checking"): [`world`] runs the real `twopc-core` machines against simulated
//! agents, databases, network, decision log and crashes, one seed at a time; [`oracle`]
//! checks the invariants after every event and at quiescence.

pub mod model;
pub mod oracle;
pub mod rng;
pub mod world;

use twopc_core::mutation::Mutations;

pub use oracle::Violation;
pub use world::{Settings, Stats, World};

/// What one seed did.
pub struct SeedRun {
    pub seed: u64,
    pub stats: Stats,
    pub violation: Option<Violation>,
    /// The last lines of the trace (only kept for a failing seed).
    pub trace: Vec<String>,
}

/// Runs `seed` with `steps` faulty events under `mutations`.
pub fn run_seed(seed: u64, steps: u64, mutations: Mutations) -> SeedRun {
    let mut world = World::new(seed, Settings::new(steps, mutations));
    let violation = world.run().err();
    let trace = if violation.is_some() {
        world.trace().cloned().collect()
    } else {
        Vec::new()
    };
    SeedRun {
        seed,
        stats: world.stats.clone(),
        violation,
        trace,
    }
}
