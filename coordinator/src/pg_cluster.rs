//! Throwaway PostgreSQL clusters from the system binaries (`initdb`, `pg_ctl`), for the
//! `demo` command and the tests: a fresh data directory, a free loopback port,
//! `max_prepared_transactions` set, run as the `postgres` OS user when we are root, and
//! removed on drop.
//!
//! The API is blocking (it runs `initdb`/`pg_ctl`); call it from `spawn_blocking` in async
//! code.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum PgClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin. \
         Install them: `apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` \
         (Fedora), `brew install postgresql@15` (macOS); or put their bin directory on PATH."
    )]
    NotInstalled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgClusterError {
    let what = what.into();
    move |source| PgClusterError::Io { what, source }
}

/// Where the server binaries are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bin_dir: PathBuf,
    pub version: String,
}

impl PgBinaries {
    /// `initdb` and `pg_ctl` on PATH, else the highest `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<PgBinaries, PgClusterError> {
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versioned.into_iter().map(|(_, p)| p));
        for dir in candidates {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                let out = Command::new(dir.join("pg_ctl")).arg("--version").output();
                let version = match out {
                    // "pg_ctl (PostgreSQL) 15.18 (Debian ...)"
                    Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .skip_while(|w| *w != "(PostgreSQL)")
                        .nth(1)
                        .unwrap_or("?")
                        .to_owned(),
                    _ => continue,
                };
                return Ok(PgBinaries {
                    bin_dir: dir,
                    version,
                });
            }
        }
        Err(PgClusterError::NotInstalled)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub name: String,
    pub max_prepared_transactions: u32,
    pub max_connections: u32,
    /// `fsync` of the server: off is fine for throwaway test clusters.
    pub fsync: bool,
    /// Parent of the cluster directory (default: the system temp dir).
    pub base_dir: Option<PathBuf>,
    /// More `postgresql.conf` settings.
    pub extra_conf: Vec<(String, String)>,
}

impl ClusterOptions {
    pub fn new(name: impl Into<String>) -> ClusterOptions {
        ClusterOptions {
            name: name.into(),
            max_prepared_transactions: 64,
            max_connections: 100,
            fsync: false,
            base_dir: None,
            extra_conf: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Fast,
    /// Like a crash: no checkpoint, recovery on the next start.
    Immediate,
}

/// A running (or stopped) throwaway cluster. Dropping it stops it and removes its files
/// (unless `TWOPC_KEEP_CLUSTERS=1`).
pub struct PgCluster {
    bins: PgBinaries,
    dir: PathBuf,
    port: u16,
    /// (uid, gid) to run the server binaries as, when we are root.
    run_as: Option<(u32, u32)>,
    running: bool,
}

impl PgCluster {
    pub fn start(opts: ClusterOptions) -> Result<PgCluster, PgClusterError> {
        let bins = PgBinaries::find()?;
        let base = opts.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "twopc-pg-{}-{}-{:08x}",
            opts.name,
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let run_as = if is_root() {
            let ids = postgres_user_ids()?;
            std::os::unix::fs::chown(&dir, Some(ids.0), Some(ids.1))
                .map_err(io_err(format!("chown {} to postgres", dir.display())))?;
            Some(ids)
        } else {
            None
        };
        let mut cluster = PgCluster {
            bins,
            dir,
            port: 0,
            run_as,
            running: false,
        };
        cluster.initdb(&opts)?;
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_port_conf()?;
            match cluster.start_again() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(PgClusterError::Command {
            what: "start".into(),
            detail: "no attempt made".into(),
        }))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bins.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir(&self.dir);
        c.env_remove("PGDATA");
        c
    }

    fn run(&self, what: &str, mut cmd: Command) -> Result<Output, PgClusterError> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("run {what}")))?;
        if !out.status.success() {
            return Err(PgClusterError::Command {
                what: what.to_owned(),
                detail: format!(
                    "{}\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail()
                ),
            });
        }
        Ok(out)
    }

    fn initdb(&self, opts: &ClusterOptions) -> Result<(), PgClusterError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        self.run("initdb", cmd)?;
        let mut conf = format!(
            "\n# twopc throwaway cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_prepared_transactions = {}\nmax_connections = {}\nfsync = {}\n\
             shared_buffers = '32MB'\n",
            self.dir.display(),
            opts.max_prepared_transactions,
            opts.max_connections,
            if opts.fsync { "on" } else { "off" },
        );
        if !opts.fsync {
            conf.push_str("synchronous_commit = off\nfull_page_writes = off\n");
        }
        for (k, v) in &opts.extra_conf {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        append_file(&self.data().join("postgresql.conf"), &conf)
    }

    fn write_port_conf(&self) -> Result<(), PgClusterError> {
        // postgresql.auto.conf: the last setting wins, so restarts keep the port.
        let path = self.data().join("postgresql.auto.conf");
        append_file(&path, &format!("port = {}\n", self.port))
    }

    /// Starts the server (again) on the same data directory and port.
    pub fn start_again(&mut self) -> Result<(), PgClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start"]);
        self.run("pg_ctl start", cmd)?;
        self.running = true;
        Ok(())
    }

    pub fn stop(&mut self, mode: StopMode) -> Result<(), PgClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.data()).args([
            "-m",
            match mode {
                StopMode::Fast => "fast",
                StopMode::Immediate => "immediate",
            },
            "-w",
            "-t",
            "60",
            "stop",
        ]);
        self.run("pg_ctl stop", cmd)?;
        self.running = false;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// `postgresql://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("postgres.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\npostgres.log (tail):\n{tail}")
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop(StopMode::Immediate);
        }
        if std::env::var("TWOPC_KEEP_CLUSTERS").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn append_file(path: &Path, text: &str) -> Result<(), PgClusterError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(format!("write {}", path.display())))
}

fn free_port() -> Result<u16, PgClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("find a free port"))?;
    let port = l.local_addr().map_err(io_err("find a free port"))?.port();
    Ok(port)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user_ids() -> Result<(u32, u32), PgClusterError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io_err("read /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == "postgres" {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
        .ok_or_else(|| PgClusterError::Command {
            what: "find the postgres user".into(),
            detail: "running as root, PostgreSQL refuses to run as root, and there is no \
                     `postgres` user in /etc/passwd (create one: useradd --system postgres)"
                .into(),
        })
}
