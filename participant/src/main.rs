//! `twopc-participant`: see `twopc_participant::cli`.

fn main() -> anyhow::Result<()> {
    twopc_participant::cli::run()
}
