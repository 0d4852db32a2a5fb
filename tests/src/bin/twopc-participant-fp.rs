//! `twopc-participant` built with failpoints, for the crash tests.

fn main() -> anyhow::Result<()> {
    twopc_participant::cli::run()
}
