//! `twopc-latency-proxy`: see `twopc_testkit::chaos::proxy`.

use clap::Parser;
use twopc_testkit::chaos::proxy;

#[derive(Debug, Parser)]
#[command(
    name = "twopc-latency-proxy",
    about = "TCP links whose latency can be set at run time (for chaos runs)"
)]
struct Args {
    /// A link: NAME=LISTEN_ADDR=UPSTREAM_ADDR, e.g. db1=0.0.0.0:7101=agent1:7001.
    #[arg(long = "link", required = true)]
    links: Vec<String>,
    /// Where `set LINK MS` / `get` requests are served.
    #[arg(long, default_value = "0.0.0.0:7100")]
    control: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let links = args
        .links
        .iter()
        .map(|l| proxy::parse_link(l))
        .collect::<anyhow::Result<Vec<_>>>()?;
    proxy::serve(links, &args.control).await
}
