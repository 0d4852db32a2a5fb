//! The faults done to the containers of a docker-compose project, through the `docker`
//! command line: kill, start, pause, network disconnect. (Latency goes through
//! [`super::proxy`].)

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Command;

/// Longest any one docker command may take before the driver gives up on it.
const DOCKER_TIMEOUT_MS: u64 = 60_000;

/// One container of the compose project, found by its service name.
#[derive(Debug, Clone)]
pub struct Container {
    pub service: String,
    pub id: String,
    /// The compose network the container is attached to (the one faults cut).
    pub network: String,
}

#[derive(Debug, Clone)]
pub struct Docker {
    pub project: String,
}

/// Attempts at `docker pause` and the wait between them (see [`Docker::pause`]).
const PAUSE_ATTEMPTS_MAX: u32 = 5;
const PAUSE_RETRY_MS: u64 = 200;

fn is_freeze_timeout(e: &anyhow::Error) -> bool {
    e.to_string().contains("unable to freeze")
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_millis(DOCKER_TIMEOUT_MS), cmd.output())
        .await
        .with_context(|| format!("{program} {} timed out", args.join(" ")))?
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Docker {
    pub fn new(project: &str) -> Docker {
        Docker {
            project: project.to_owned(),
        }
    }

    /// Is the engine there at all?
    pub async fn available() -> bool {
        run("docker", &["info", "--format", "{{.ServerVersion}}"])
            .await
            .is_ok()
    }

    /// The container of `service` in this project.
    pub async fn container(&self, service: &str) -> anyhow::Result<Container> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let svc = format!("label=com.docker.compose.service={service}");
        let ids = run(
            "docker",
            &["ps", "-aq", "--filter", &project, "--filter", &svc],
        )
        .await?;
        let mut ids = ids.lines();
        let Some(id) = ids.next() else {
            bail!(
                "no container for service {service} in compose project {}",
                self.project
            );
        };
        if ids.next().is_some() {
            bail!("service {service} has more than one container");
        }
        let nets = run(
            "docker",
            &[
                "inspect",
                "-f",
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
                id,
            ],
        )
        .await?;
        let Some(network) = nets.split_whitespace().next() else {
            bail!("container of {service} is on no network");
        };
        Ok(Container {
            service: service.to_owned(),
            id: id.to_owned(),
            network: network.to_owned(),
        })
    }

    async fn inspect(&self, c: &Container, format: &str) -> anyhow::Result<String> {
        run("docker", &["inspect", "-f", format, &c.id]).await
    }

    pub async fn kill(&self, c: &Container) -> anyhow::Result<()> {
        run("docker", &["kill", "-s", "KILL", &c.id])
            .await
            .map(drop)
    }

    pub async fn start(&self, c: &Container) -> anyhow::Result<()> {
        run("docker", &["start", &c.id]).await.map(drop)
    }

    /// `docker pause`, tried again while the cgroup freezer gives up ("unable to
    /// freeze": a process of the container was in uninterruptible sleep, PostgreSQL in
    /// an fsync; runc thaws it and a moment later the freeze succeeds). Seen once in 20
    /// pauses of PostgreSQL; it failed the run's `faults_injected` rule.
    pub async fn pause(&self, c: &Container) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            match run("docker", &["pause", &c.id]).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt < PAUSE_ATTEMPTS_MAX && is_freeze_timeout(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(PAUSE_RETRY_MS)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn unpause(&self, c: &Container) -> anyhow::Result<()> {
        run("docker", &["unpause", &c.id]).await.map(drop)
    }

    pub async fn disconnect(&self, c: &Container) -> anyhow::Result<()> {
        run(
            "docker",
            &["network", "disconnect", "-f", &c.network, &c.id],
        )
        .await
        .map(drop)
    }

    /// Reattaches the container under its service name, so the others find it again.
    pub async fn connect(&self, c: &Container) -> anyhow::Result<()> {
        run(
            "docker",
            &[
                "network", "connect", "--alias", &c.service, &c.network, &c.id,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn running(&self, c: &Container) -> anyhow::Result<bool> {
        Ok(self.inspect(c, "{{.State.Running}}").await? == "true")
    }

    pub async fn paused(&self, c: &Container) -> anyhow::Result<bool> {
        Ok(self.inspect(c, "{{.State.Paused}}").await? == "true")
    }

    pub async fn connected(&self, c: &Container) -> anyhow::Result<bool> {
        let nets = self
            .inspect(
                c,
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            )
            .await?;
        Ok(nets.split_whitespace().any(|n| n == c.network))
    }

    /// Undoes every fault this module can do to `c`, whatever state it was left in.
    pub async fn heal(&self, c: &Container) -> anyhow::Result<()> {
        if self.paused(c).await? {
            self.unpause(c).await?;
        }
        if !self.running(c).await? {
            self.start(c).await?;
        }
        if !self.connected(c).await? {
            self.connect(c).await?;
        }
        Ok(())
    }
}
