//! `twopc-coordinator serve` configuration: a TOML file (`--config`) overridden by flags
//! (each also from a `TWOPC_*` environment variable).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::engine::{AckMode, EngineConfig};

/// Where a participant's agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantSpec {
    /// A `twopc-participant` reached over TCP.
    Remote(String),
    /// An agent in this process, fronting this database URL.
    InProcess(String),
}

impl ParticipantSpec {
    pub fn parse(s: &str) -> ParticipantSpec {
        if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            ParticipantSpec::InProcess(s.to_owned())
        } else {
            ParticipantSpec::Remote(s.to_owned())
        }
    }
}

/// Parses `NAME=HOST:PORT` or `NAME=postgresql://...`.
pub fn parse_participant(s: &str) -> anyhow::Result<(String, ParticipantSpec)> {
    let (name, spec) = s.split_once('=').with_context(|| {
        format!("participant {s:?}: expected NAME=HOST:PORT or NAME=postgresql://...")
    })?;
    validate_participant_name(name)?;
    if spec.is_empty() {
        bail!("participant {name:?}: empty address");
    }
    Ok((name.to_owned(), ParticipantSpec::parse(spec)))
}

fn validate_participant_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("participant name {name:?}: 1 to 64 characters of [A-Za-z0-9_-]");
    }
    Ok(())
}

/// Everything `serve` needs, after merging file and flags.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub coordinator_id: String,
    /// name → `HOST:PORT` or `postgresql://...`.
    pub participants: std::collections::BTreeMap<String, String>,
    pub recovery_interval_ms: u64,
    pub one_phase: bool,
    /// Last-agent commit for one-shot transactions (off by default; see README).
    pub last_agent: bool,
    pub read_only: bool,
    pub parallel: bool,
    pub group_commit: bool,
    pub ack: AckMode,
    pub commit_wait_ms: u64,
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub call_timeout_ms: u64,
    pub max_open_txns: usize,
    pub max_statements_per_txn: usize,
    pub max_body_bytes: usize,
    /// Client connections open at once; more are closed at once.
    pub http_max_connections: usize,
    /// A client connection must send a request's complete headers within this long of
    /// opening or of its previous answer (slow and idle connections are closed).
    pub http_header_timeout_ms: u64,
    pub log_retention_ms: u64,
    pub log_segment_max_bytes: u64,
    /// Open a decision log whose last segment has a corrupt record followed by intact
    /// ones by truncating at the damage (drops those records; see README, failure
    /// handling). For one start, after the operator kept a copy.
    pub log_discard_corrupt_tail: bool,
    /// Most outcomes of finished transactions kept in memory for `GET` and retries
    /// (oldest forgotten first, ~100 bytes each); with `log_retention_ms`, whichever
    /// comes first, the window in which a txn id is applied at most once.
    pub outcome_index_max: usize,
    /// File holding the bearer token clients must send (`Authorization: Bearer ...`).
    pub api_token_file: Option<PathBuf>,
    /// File holding the bearer token of the admin API (`/v1/admin`, `txns`).
    pub admin_token_file: Option<PathBuf>,
    /// TLS on the client API: certificate and key (PEM). Both or neither.
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    /// Mutual TLS to remote agents: client certificate, its key, and the agents' CA.
    pub agent_tls_cert: Option<PathBuf>,
    pub agent_tls_key: Option<PathBuf>,
    pub agent_ca: Option<PathBuf>,
    /// Shared key (hex, at least 32 bytes) the agents authenticate coordinators by; the
    /// same file as the agents' `--auth-key-file`.
    pub agent_auth_key_file: Option<PathBuf>,
}

impl ServeConfig {
    /// Each setting's default as `serve --help` and README show it, by key (settings
    /// without one, such as the token files, and switches, are left out).
    pub fn default_texts() -> std::collections::BTreeMap<String, String> {
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(ServeConfig::default())
        else {
            return Default::default();
        };
        map.into_iter()
            .filter_map(|(key, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((key, text))
            })
            .collect()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        let e = EngineConfig::new("c1");
        ServeConfig {
            listen: "127.0.0.1:7000".into(),
            data_dir: PathBuf::from("twopc-data"),
            coordinator_id: e.coordinator_id,
            participants: Default::default(),
            recovery_interval_ms: 5_000,
            one_phase: e.one_phase,
            last_agent: e.last_agent,
            read_only: e.read_only,
            parallel: e.parallel,
            group_commit: true,
            ack: e.default_ack,
            commit_wait_ms: e.commit_wait_ms,
            default_timeout_ms: e.default_timeout_ms,
            max_timeout_ms: e.max_timeout_ms,
            idle_timeout_ms: e.idle_timeout_ms,
            call_timeout_ms: e.call_timeout_ms,
            max_open_txns: e.max_open_txns,
            max_statements_per_txn: e.max_statements_per_txn,
            max_body_bytes: 1024 * 1024,
            http_max_connections: 4096,
            http_header_timeout_ms: 10_000,
            log_retention_ms: 3_600_000,
            log_segment_max_bytes: 64 * 1024 * 1024,
            log_discard_corrupt_tail: false,
            outcome_index_max: e.outcome_index_max,
            api_token_file: None,
            admin_token_file: None,
            api_tls_cert: None,
            api_tls_key: None,
            agent_tls_cert: None,
            agent_tls_key: None,
            agent_ca: None,
            agent_auth_key_file: None,
        }
    }
}

/// Flags of `twopc-coordinator serve`. Every flag overrides the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, env = "TWOPC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client API address (HTTP).
    #[arg(long, env = "TWOPC_LISTEN")]
    pub listen: Option<String>,
    /// Directory of the decision log and the coordinator's identity file.
    #[arg(long, env = "TWOPC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Coordinator id: part of every GID; 1-32 letters or digits; fixed per data dir.
    #[arg(long, env = "TWOPC_COORDINATOR_ID")]
    pub coordinator_id: Option<String>,
    /// A participant: NAME=HOST:PORT (remote agent) or NAME=postgresql://... (in-process
    /// agent). Repeat for each.
    #[arg(
        long = "participant",
        env = "TWOPC_PARTICIPANTS",
        value_delimiter = ','
    )]
    pub participants: Vec<String>,
    /// How often recovery looks for unresolved transactions.
    #[arg(long, env = "TWOPC_RECOVERY_INTERVAL_MS")]
    pub recovery_interval_ms: Option<u64>,
    /// Default ack mode: applied or durable.
    #[arg(long, env = "TWOPC_ACK", value_parser = parse_ack)]
    pub ack: Option<AckMode>,
    /// How long `applied` waits for acknowledgements before answering with the pending ones.
    #[arg(long, env = "TWOPC_COMMIT_WAIT_MS")]
    pub commit_wait_ms: Option<u64>,
    /// Transaction lifetime when the client gives no timeout_ms.
    #[arg(long, env = "TWOPC_DEFAULT_TIMEOUT_MS")]
    pub default_timeout_ms: Option<u64>,
    /// Idle time allowed between statements of an interactive transaction.
    #[arg(long, env = "TWOPC_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Largest client request body, in bytes.
    #[arg(long, env = "TWOPC_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Client connections open at once; more are closed at once.
    #[arg(long, env = "TWOPC_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// A client connection must send a request's complete headers within this long of
    /// opening or of its previous answer; slow and idle connections are closed.
    #[arg(long, env = "TWOPC_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// Keep finished decision-log segments (and answers about them) this long.
    #[arg(long, env = "TWOPC_LOG_RETENTION_MS")]
    pub log_retention_ms: Option<u64>,
    /// File with the bearer token every API request must carry (all but /healthz).
    #[arg(long, env = "TWOPC_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// File with the bearer token of the admin API (/v1/admin: txns list, show,
    /// resolve). Without it, a coordinator with --api-token-file keeps the admin API
    /// closed; the client token never opens it.
    #[arg(long, env = "TWOPC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the client API over TLS with this certificate (PEM; with --api-tls-key).
    #[arg(long, env = "TWOPC_API_TLS_CERT", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client API certificate.
    #[arg(long, env = "TWOPC_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS to the agents (with --agent-tls-key and
    /// --agent-ca).
    #[arg(long, env = "TWOPC_AGENT_TLS_CERT", requires_all = ["agent_tls_key", "agent_ca"])]
    pub agent_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "TWOPC_AGENT_TLS_KEY", requires = "agent_tls_cert")]
    pub agent_tls_key: Option<PathBuf>,
    /// CA (PEM) that must have signed the agents' certificates.
    #[arg(long, env = "TWOPC_AGENT_CA", requires = "agent_tls_cert")]
    pub agent_ca: Option<PathBuf>,
    /// Shared key file (hex, at least 32 bytes, e.g. `openssl rand -hex 32`) to
    /// authenticate to the agents with: the same file as their --auth-key-file.
    #[arg(long, env = "TWOPC_AGENT_AUTH_KEY_FILE")]
    pub agent_auth_key_file: Option<PathBuf>,
    /// Turn off one-phase commit for single-participant transactions.
    #[arg(long, env = "TWOPC_NO_ONE_PHASE")]
    pub no_one_phase: bool,
    /// Last-agent commit for one-shot transactions over two or more participants: the
    /// last participant commits with the decision in its own database instead of a forced
    /// record here (its agent must keep a decision table).
    #[arg(long, env = "TWOPC_LAST_AGENT")]
    pub last_agent: bool,
    /// Turn off the read-only vote.
    #[arg(long, env = "TWOPC_NO_READ_ONLY")]
    pub no_read_only: bool,
    /// Talk to participants one after another instead of in parallel.
    #[arg(long, env = "TWOPC_NO_PARALLEL")]
    pub no_parallel: bool,
    /// One fdatasync per decision instead of group commit.
    #[arg(long, env = "TWOPC_NO_GROUP_COMMIT")]
    pub no_group_commit: bool,
    /// Open a decision log whose last segment has a corrupt record followed by intact
    /// ones by truncating at the damage, dropping those records (the segment is kept as
    /// a .seg.corrupt copy). Without it such a log refuses to open. Use once, after
    /// keeping a copy of the data directory.
    #[arg(long, env = "TWOPC_LOG_DISCARD_CORRUPT_TAIL")]
    pub log_discard_corrupt_tail: bool,
}

fn parse_ack(s: &str) -> Result<AckMode, String> {
    match s {
        "applied" => Ok(AckMode::Applied),
        "durable" => Ok(AckMode::Durable),
        _ => Err(format!("{s:?}: expected applied or durable")),
    }
}

impl ServeArgs {
    /// Reads the file (if any) and applies the flags over it.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                toml::from_str::<ServeConfig>(&text)
                    .with_context(|| format!("parse config file {}", path.display()))?
            }
            None => ServeConfig::default(),
        };
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.coordinator_id {
            c.coordinator_id = v.clone();
        }
        for p in &self.participants {
            let (name, _) = parse_participant(p)?;
            let spec = p[name.len() + 1..].to_owned();
            c.participants.insert(name, spec);
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            recovery_interval_ms,
            commit_wait_ms,
            default_timeout_ms,
            idle_timeout_ms,
            max_body_bytes,
            http_max_connections,
            http_header_timeout_ms,
            log_retention_ms
        );
        if let Some(f) = &self.api_token_file {
            c.api_token_file = Some(f.clone());
        }
        if let Some(f) = &self.admin_token_file {
            c.admin_token_file = Some(f.clone());
        }
        if self.api_tls_cert.is_some() {
            c.api_tls_cert = self.api_tls_cert.clone();
            c.api_tls_key = self.api_tls_key.clone();
        }
        if self.agent_tls_cert.is_some() {
            c.agent_tls_cert = self.agent_tls_cert.clone();
            c.agent_tls_key = self.agent_tls_key.clone();
            c.agent_ca = self.agent_ca.clone();
        }
        if let Some(f) = &self.agent_auth_key_file {
            c.agent_auth_key_file = Some(f.clone());
        }
        if let Some(a) = self.ack {
            c.ack = a;
        }
        c.one_phase &= !self.no_one_phase;
        c.last_agent |= self.last_agent;
        c.read_only &= !self.no_read_only;
        c.parallel &= !self.no_parallel;
        c.group_commit &= !self.no_group_commit;
        c.log_discard_corrupt_tail |= self.log_discard_corrupt_tail;
        c.validate()?;
        Ok(c)
    }
}

impl ServeConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        twopc_shared::gid::validate_coordinator_id(&self.coordinator_id)?;
        if self.participants.is_empty() {
            bail!("no participants: give at least one --participant NAME=HOST:PORT");
        }
        for name in self.participants.keys() {
            validate_participant_name(name)?;
        }
        if self.http_max_connections == 0 || self.http_header_timeout_ms == 0 {
            bail!("http_max_connections and http_header_timeout_ms must be at least 1");
        }
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        let mut e = EngineConfig::new(self.coordinator_id.clone());
        e.one_phase = self.one_phase;
        e.last_agent = self.last_agent;
        e.read_only = self.read_only;
        e.parallel = self.parallel;
        e.default_ack = self.ack;
        e.commit_wait_ms = self.commit_wait_ms;
        e.default_timeout_ms = self.default_timeout_ms;
        e.max_timeout_ms = self.max_timeout_ms;
        e.idle_timeout_ms = self.idle_timeout_ms;
        e.call_timeout_ms = self.call_timeout_ms;
        e.max_open_txns = self.max_open_txns;
        e.max_statements_per_txn = self.max_statements_per_txn;
        e.outcome_retention_ms = self.log_retention_ms;
        e.recovery_interval_ms = self.recovery_interval_ms;
        e.outcome_index_max = self.outcome_index_max;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_specs() {
        assert_eq!(
            parse_participant("a=127.0.0.1:7001").unwrap(),
            ("a".into(), ParticipantSpec::Remote("127.0.0.1:7001".into()))
        );
        assert_eq!(
            parse_participant("b=postgresql://u@h/db").unwrap().1,
            ParticipantSpec::InProcess("postgresql://u@h/db".into())
        );
        assert!(parse_participant("nonsense").is_err());
        assert!(parse_participant("a b=x:1").is_err());
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:1\"\ncoordinator_id = \"x1\"\none_phase = false\n\
             agent_auth_key_file = \"/etc/twopc/agent.key\"\n[participants]\na = \"h:1\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            listen: Some("127.0.0.1:2".into()),
            participants: vec!["b=h:2".into()],
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.coordinator_id, "x1");
        assert!(!c.one_phase);
        assert_eq!(c.participants.len(), 2);
        assert_eq!(
            c.agent_auth_key_file.as_deref(),
            Some(std::path::Path::new("/etc/twopc/agent.key"))
        );
    }
}

#[cfg(test)]
mod readme_tests {
    use super::*;

    const README: &str = include_str!("../../README.md");

    /// README's "Configuration" section.
    fn section() -> &'static str {
        let start = README
            .find("\n## Configuration")
            .expect("README has ## Configuration");
        let rest = &README[start + 1..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
        &rest[..end]
    }

    /// The table rows: (flag or TOML key, env, default).
    fn rows() -> Vec<(String, String, String)> {
        let unquote = |c: &str| c.trim().trim_matches('`').to_owned();
        section()
            .lines()
            .filter(|l| l.starts_with("| `--") || l.starts_with("| (TOML only)"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').collect();
                let key = cells[0].trim().trim_start_matches("(TOML only)");
                (unquote(key), unquote(cells[1]), unquote(cells[2]))
            })
            .collect()
    }

    /// Every `serve` flag is in README's table with its variable and the default
    /// `--help` shows, and every row of the table is a real flag or setting.
    #[test]
    fn the_readme_table_matches_serve_help() {
        let defaults = ServeConfig::default_texts();
        let cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let rows = rows();
        let mut flags = Vec::new();
        for a in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            let long = format!("--{}", a.get_long().unwrap_or_default());
            if long == "--help" {
                continue;
            }
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            let row = rows.iter().find(|(f, _, _)| *f == long);
            let Some((_, row_env, row_default)) = row else {
                panic!("README's configuration table lacks {long}");
            };
            assert_eq!(Some(row_env.clone()), env, "{long}: README's variable");
            let is_switch = matches!(a.get_action(), clap::ArgAction::SetTrue);
            let expected = match defaults.get(a.get_id().as_str()) {
                Some(_) if is_switch => "off".to_owned(),
                Some(d) => d.clone(),
                None if is_switch => "off".to_owned(),
                None => String::new(),
            };
            assert_eq!(*row_default, expected, "{long}: README's default");
            flags.push(long);
        }
        for (key, _, default) in &rows {
            if key.starts_with("--") {
                assert!(
                    flags.contains(key),
                    "README names {key}, which serve does not take"
                );
            } else {
                assert_eq!(
                    defaults.get(key),
                    Some(default),
                    "TOML-only {key}: README's default"
                );
            }
        }
    }

    /// README's example configuration file parses, participants included.
    #[test]
    fn the_readme_toml_example_parses() {
        let text = section();
        let start = text.find("```toml\n").expect("README shows a TOML example") + 8;
        let end = start + text[start..].find("```").expect("the example ends");
        let c: ServeConfig = toml::from_str(&text[start..end]).expect("README's TOML parses");
        assert_eq!(c.participants.len(), 2, "{c:?}");
        assert_eq!(c.participants["orders"], "10.0.0.11:7100");
        assert_eq!(c.listen, "0.0.0.0:7000");
    }
}
