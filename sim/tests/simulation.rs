//! The simulator's own checks, within `cargo test`'s budget (debug build): the correct
//! core holds every invariant over a batch of seeds, every mutation is caught, and a seed
//! replays exactly.

use twopc_core::mutation::{Mutation, Mutations};
use twopc_sim::run_seed;

/// Seeds of the correct core here (CI runs many more with the release binary).
const SEEDS: u64 = 60;
const STEPS: u64 = 2_000;
/// Seeds a mutation may take to be caught.
const MUTATION_SEEDS_MAX: u64 = 50;

#[test]
fn the_core_holds_every_invariant() {
    let mut told = 0;
    for seed in 0..SEEDS {
        let run = run_seed(seed, STEPS, Mutations::none());
        if let Some(v) = run.violation {
            panic!(
                "seed {seed}: {v}\n{}\nreplay: twopc-sim --seeds 1 --seed {seed} --steps {STEPS}",
                run.trace.join("\n")
            );
        }
        told += run.stats.told_committed;
        assert!(run.stats.faults > 0, "seed {seed} injected no fault");
    }
    assert!(
        told > SEEDS * 10,
        "too few commits to mean anything: {told}"
    );
}

#[test]
fn every_mutation_is_caught() {
    for m in Mutation::ALL {
        let caught = (0..MUTATION_SEEDS_MAX)
            .find_map(|seed| run_seed(seed, STEPS, Mutations::of(m)).violation);
        assert!(
            caught.is_some(),
            "mutation {} not caught in {MUTATION_SEEDS_MAX} seeds",
            m.name()
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(7, STEPS, Mutations::of(Mutation::EndBeforeAllAcks));
    let b = run_seed(7, STEPS, Mutations::of(Mutation::EndBeforeAllAcks));
    assert_eq!(a.violation, b.violation);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.stats.steps, b.stats.steps);
}

/// Model checking a configuration small enough for a debug build: every state of one
/// transaction on two participants with a crash and a lost message holds every
/// invariant, and every mutation breaks one there, in two transactions without faults,
/// or with a last-agent transaction (CI checks the full configurations with the
/// release binary: `twopc-sim --model-check`).
#[test]
fn the_model_check_holds_and_catches_every_mutation() {
    use twopc_sim::model::{check, Bounds};
    let bounds = Bounds {
        txns: 1,
        ..Bounds::small()
    };
    let r = check(bounds, Mutations::none());
    assert!(r.violation.is_none(), "{:?}", r.violation);
    assert!(!r.truncated);
    assert!(r.states > 500, "{} states", r.states);
    // Two transactions without faults: the second one's single writer beside a
    // read-only branch, or a last-agent commit.
    let two = Bounds {
        crashes: 0,
        losses: 0,
        failures: 0,
        ..Bounds::small()
    };
    let last_agent = Bounds {
        last_agent: true,
        ..two
    };
    let last_agent_faults = Bounds {
        crashes: 1,
        losses: 1,
        ..last_agent
    };
    for m in Mutation::ALL
        .into_iter()
        .filter(|m| twopc_sim::model::covers(*m))
    {
        let caught = [bounds, two, last_agent, last_agent_faults]
            .into_iter()
            .any(|b| check(b, Mutations::of(m)).violation.is_some());
        assert!(
            caught,
            "mutation {} not caught by the model check",
            m.name()
        );
    }
}
