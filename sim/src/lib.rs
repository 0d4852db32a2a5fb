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

use twopc_core::commit::Commit;
use twopc_core::recovery::{self, BranchAction, Incarnation, Known, Listed};

/// The coordinator id in the simulated GIDs.
pub const COORDINATOR_ID: &str = "sim";

/// What a simulated coordinator knows of a transaction whose two-phase machine (if any)
/// is `machine`; `last_live`: a last-agent machine of it is still deciding.
pub fn known(machine: Option<&Commit>, last_live: bool) -> Known {
    Known {
        live: machine.is_some_and(Commit::deciding) || last_live,
        in_doubt: machine.is_some_and(Commit::decided_commit),
        operator_aborted: false,
    }
}

/// Recovery's action for a listed prepared branch of epoch `branch_epoch` whose GID
/// names `last_agent` (if any), seen by the incarnation of `epoch` that knows `known`:
/// the core's rule.
pub fn recovery_action(
    epoch: u64,
    branch_epoch: u64,
    last_agent: Option<&str>,
    known: Known,
    mutations: Mutations,
) -> BranchAction {
    let me = Incarnation {
        coordinator_id: COORDINATOR_ID,
        epoch,
    };
    let listed = Listed {
        coordinator_id: COORDINATOR_ID,
        epoch: branch_epoch,
        last_agent,
    };
    recovery::prepared_branch_action(me, listed, known, mutations)
}
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
