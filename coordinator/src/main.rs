//! `twopc-coordinator`: see `twopc_coordinator::cli`.

fn main() -> anyhow::Result<()> {
    twopc_coordinator::cli::run()
}
