//! `twopc-coordinator certs`: a development CA and certificates for mutual TLS between
//! the coordinator and its agents. For production, use your own PKI: the agent needs a
//! server certificate for the name the coordinator dials, the coordinator a client
//! certificate naming the coordinator ids it may act for (DNS subject alternative names:
//! an agent serves a TLS connection only for an id its certificate names), each signed by
//! a CA the other side trusts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// Directory to write ca.pem, agent.pem, agent-key.pem, coordinator.pem,
    /// coordinator-key.pem into.
    #[arg(long, default_value = "twopc-certs")]
    pub out: PathBuf,
    /// Names (DNS or IP) the agents are dialed at (repeatable); localhost and 127.0.0.1
    /// are always included.
    #[arg(long = "agent-host")]
    pub agent_hosts: Vec<String>,
    /// Coordinator ids the coordinator certificate names (repeatable; default c1): the
    /// ids of the coordinator group it may act for.
    #[arg(long = "coordinator-id")]
    pub coordinator_ids: Vec<String>,
}

/// Writes `pem` to `dir/name`. A private key is created with mode 0600 (and an existing
/// file is made 0600 before it is overwritten), so it is never readable by others, not
/// even between its creation and a chmod.
fn write(dir: &Path, name: &str, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let private = name.ends_with("-key.pem");
    let mut options = if private {
        crate::meta::private_file()
    } else {
        std::fs::OpenOptions::new()
    };
    if private && path.exists() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    let mut file = options
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(pem.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// Generates a CA plus an agent (server) and a coordinator (client) certificate; the
/// latter names `coordinator_ids` (`c1` if empty).
pub fn generate(
    out: &Path,
    agent_hosts: &[String],
    coordinator_ids: &[String],
) -> anyhow::Result<()> {
    for id in coordinator_ids {
        twopc_shared::gid::validate_coordinator_id(id)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "twopc development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    hosts.extend(agent_hosts.iter().cloned());
    let agent_key = KeyPair::generate()?;
    let mut agent = CertificateParams::new(hosts)?;
    agent
        .distinguished_name
        .push(DnType::CommonName, "twopc agent");
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let agent_cert = agent.signed_by(&agent_key, &ca_cert, &ca_key)?;

    let coord_key = KeyPair::generate()?;
    let ids = if coordinator_ids.is_empty() {
        vec!["c1".to_owned()]
    } else {
        coordinator_ids.to_vec()
    };
    let mut coord = CertificateParams::new(ids)?;
    coord
        .distinguished_name
        .push(DnType::CommonName, "twopc coordinator");
    coord.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let coord_cert = coord.signed_by(&coord_key, &ca_cert, &ca_key)?;

    write(out, "ca.pem", &ca_cert.pem())?;
    write(out, "ca-key.pem", &ca_key.serialize_pem())?;
    write(out, "agent.pem", &agent_cert.pem())?;
    write(out, "agent-key.pem", &agent_key.serialize_pem())?;
    write(out, "coordinator.pem", &coord_cert.pem())?;
    write(out, "coordinator-key.pem", &coord_key.serialize_pem())?;
    Ok(())
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    generate(&args.out, &args.agent_hosts, &args.coordinator_ids)?;
    let d = args.out.display();
    println!("wrote a development CA and certificates to {d}");
    println!("agent:       --tls-cert {d}/agent.pem --tls-key {d}/agent-key.pem --tls-client-ca {d}/ca.pem");
    println!("coordinator: --agent-tls-cert {d}/coordinator.pem --agent-tls-key {d}/coordinator-key.pem --agent-ca {d}/ca.pem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_keys_are_created_0600_and_certificates_readable() {
        let dir = tempfile::tempdir().unwrap();
        super::generate(dir.path(), &[], &[]).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for key in ["ca-key.pem", "agent-key.pem", "coordinator-key.pem"] {
            assert_eq!(mode(key), 0o600, "{key}");
        }
        assert_eq!(mode("ca.pem") & 0o400, 0o400);
        // Generating again over the same files keeps the keys private.
        super::generate(dir.path(), &[], &[]).unwrap();
        assert_eq!(mode("agent-key.pem"), 0o600);
    }
}
