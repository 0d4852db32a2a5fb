//! `twopc-coordinator` built with failpoints, for the crash tests.

fn main() -> anyhow::Result<()> {
    twopc_coordinator::cli::run()
}
