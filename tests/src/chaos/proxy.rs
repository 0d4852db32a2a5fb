//! A TCP proxy that adds latency on demand, for the chaos topology's "added latency"
//! faults (the idea of Shopify's toxiproxy). It sits on the links from the coordinator
//! to the agents; `twopc-chaos` sets a link's delay through a control port and sets it
//! back to 0 to heal. Kernel-level `tc netem` would do the same, but not every kernel
//! has `sch_netem` (this project's CI machines do not).
//!
//! Every chunk read from one side is written to the other `delay_ms` after it was read,
//! in order; a link's delay is read per chunk, so a change takes effect at once.
//!
//! Control protocol (one line per request, one line per answer):
//! `set LINK MS` → `ok`; `get` → `LINK=MS ...`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks in flight per direction of one connection (bounds memory under delay).
const CHUNKS_IN_FLIGHT: usize = 1_024;
const CHUNK_BYTES: usize = 64 * 1024;
const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Longest control line accepted.
const CONTROL_LINE_BYTES: usize = 256;
/// Largest delay a link accepts.
const MAX_DELAY_MS: u64 = 60_000;

/// One proxied link: connections to `listen` go to `upstream`.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    pub listen: String,
    pub upstream: String,
}

/// Parses `NAME=LISTEN=UPSTREAM`, e.g. `db1=0.0.0.0:7101=agent1:7001`.
pub fn parse_link(s: &str) -> anyhow::Result<Link> {
    let mut parts = s.splitn(3, '=');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(l), Some(u)) if !n.is_empty() && !l.is_empty() && !u.is_empty() => {
            Ok(Link {
                name: n.to_owned(),
                listen: l.to_owned(),
                upstream: u.to_owned(),
            })
        }
        _ => bail!("link {s:?}: want NAME=LISTEN_ADDR=UPSTREAM_ADDR"),
    }
}

type Delays = Arc<BTreeMap<String, Arc<AtomicU64>>>;

/// Serves every link and the control port until an error.
pub async fn serve(links: Vec<Link>, control: &str) -> anyhow::Result<()> {
    let delays: Delays = Arc::new(
        links
            .iter()
            .map(|l| (l.name.clone(), Arc::new(AtomicU64::new(0))))
            .collect(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for link in links {
        let listener = TcpListener::bind(&link.listen)
            .await
            .with_context(|| format!("listen on {}", link.listen))?;
        let delay = delays[&link.name].clone();
        tasks.spawn(async move {
            loop {
                let (down, _) = listener.accept().await.context("accept")?;
                let upstream = link.upstream.clone();
                let delay = delay.clone();
                tokio::spawn(async move {
                    if let Err(e) = proxy_one(down, &upstream, delay).await {
                        tracing::debug!(%upstream, "connection ended: {e:#}");
                    }
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        });
    }
    let listener = TcpListener::bind(control)
        .await
        .with_context(|| format!("listen on {control}"))?;
    tasks.spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.context("accept")?;
            let delays = delays.clone();
            tokio::spawn(async move {
                if let Err(e) = control_one(conn, delays).await {
                    tracing::debug!("control connection ended: {e:#}");
                }
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });
    match tasks.join_next().await {
        Some(r) => r.context("proxy task")?,
        None => Ok(()),
    }
}

async fn proxy_one(down: TcpStream, upstream: &str, delay: Arc<AtomicU64>) -> anyhow::Result<()> {
    let up = tokio::time::timeout(
        Duration::from_millis(UPSTREAM_CONNECT_TIMEOUT_MS),
        TcpStream::connect(upstream),
    )
    .await
    .with_context(|| format!("connect to {upstream}: timed out"))?
    .with_context(|| format!("connect to {upstream}"))?;
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    // When either direction ends (EOF or error), drop both: the peer sees the close.
    tokio::select! {
        r = pump(down_r, up_w, delay.clone()) => r,
        r = pump(up_r, down_w, delay) => r,
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pump<R, W>(mut from: R, mut to: W, delay: Arc<AtomicU64>) -> anyhow::Result<()>
where
    R: AsyncReadExt + Unpin + Send + 'static,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            let due = Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
            if tx.send((due, buf)).await.is_err() {
                return Ok(());
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        to.write_all(&chunk).await?;
    }
    let _ = to.shutdown().await;
    reader.await.context("join reader")??;
    Ok(())
}

async fn control_one(conn: TcpStream, delays: Delays) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r.take(64 * CONTROL_LINE_BYTES as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["set", link, ms] => match (delays.get(link), ms.parse::<u64>()) {
                (Some(d), Ok(ms)) if ms <= MAX_DELAY_MS => {
                    d.store(ms, Ordering::Relaxed);
                    tracing::info!(link, delay_ms = ms, "latency set");
                    "ok".to_owned()
                }
                (None, _) => format!("error no link {link}"),
                _ => format!("error bad delay {ms} (0..={MAX_DELAY_MS} ms)"),
            },
            ["get"] => delays
                .iter()
                .map(|(k, v)| format!("{k}={}", v.load(Ordering::Relaxed)))
                .collect::<Vec<_>>()
                .join(" "),
            _ => "error want: set LINK MS | get".to_owned(),
        };
        w.write_all(format!("{answer}\n").as_bytes()).await?;
    }
    Ok(())
}

/// The client side, for `twopc-chaos`: sets `link`'s delay on the proxy at `control`.
pub async fn set_delay(control: &str, link: &str, delay_ms: u64) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(control))
        .await
        .with_context(|| format!("connect to the latency proxy at {control}: timed out"))?
        .with_context(|| format!("connect to the latency proxy at {control}"))?;
    let (r, mut w) = conn.into_split();
    w.write_all(format!("set {link} {delay_ms}\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r.take(CONTROL_LINE_BYTES as u64)).read_line(&mut answer),
    )
    .await
    .context("latency proxy: no answer")??;
    if answer.trim() != "ok" {
        bail!("latency proxy: {}", answer.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_and_bad_ones_are_refused() {
        let l = parse_link("db1=0.0.0.0:7101=agent1:7001").unwrap();
        assert_eq!(
            (l.name.as_str(), l.listen.as_str(), l.upstream.as_str()),
            ("db1", "0.0.0.0:7101", "agent1:7001")
        );
        assert!(parse_link("db1=0.0.0.0:7101").is_err());
        assert!(parse_link("=a=b").is_err());
    }

    async fn rtt(c: &mut TcpStream) -> Duration {
        let t = std::time::Instant::now();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        t.elapsed()
    }

    #[tokio::test]
    async fn delay_is_added_and_removed_on_a_live_link() {
        // An echo server behind the proxy.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        // Find two free ports for the link and the control.
        let free = || async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let (listen, control) = (free().await, free().await);
        let link = Link {
            name: "l".into(),
            listen: listen.clone(),
            upstream: echo_addr,
        };
        let ctl = control.clone();
        tokio::spawn(async move { serve(vec![link], &ctl).await });
        let mut c = None;
        for _ in 0..50 {
            if let Ok(s) = TcpStream::connect(&listen).await {
                c = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = c.expect("proxy listening");
        assert!(rtt(&mut c).await < Duration::from_millis(100));
        set_delay(&control, "l", 150).await.unwrap();
        // Both directions are delayed: at least 300 ms round trip.
        assert!(rtt(&mut c).await >= Duration::from_millis(300));
        set_delay(&control, "l", 0).await.unwrap();
        assert!(rtt(&mut c).await < Duration::from_millis(100));
        assert!(set_delay(&control, "nope", 1).await.is_err());
    }
}
