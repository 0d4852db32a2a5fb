//! `twopc-participant` built with failpoints, for the crash tests.

/// mimalloc: every request allocates (messages, JSON, futures), and glibc's malloc was
/// about a fifth of the coordinator's instructions under callgrind.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    twopc_participant::cli::run()
}
