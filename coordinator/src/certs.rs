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
    /// Directory to write what is deployed into: ca.pem, agent.pem, agent-key.pem,
    /// coordinator.pem, coordinator-key.pem. The CA's key is not among them.
    #[arg(long, default_value = "twopc-certs")]
    pub out: PathBuf,
    /// Directory of the CA (ca.pem, ca-key.pem), kept apart from what is deployed: an
    /// existing CA there signs the new certificates, else one is created.
    #[arg(long, default_value = "twopc-ca")]
    pub ca_dir: PathBuf,
    /// Names (DNS or IP) the agents are dialed at (repeatable); localhost and 127.0.0.1
    /// are always included.
    #[arg(long = "agent-host")]
    pub agent_hosts: Vec<String>,
    /// Coordinator ids the coordinator certificate names (repeatable; default c1): the
    /// ids of the coordinator group it may act for.
    #[arg(long = "coordinator-id")]
    pub coordinator_ids: Vec<String>,
    /// Days the agent and coordinator certificates are valid (a new CA: ten years).
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    pub days: u32,
}

/// Validity of the certificates issued, in days (as public CAs allow at most).
pub const DEFAULT_VALIDITY_DAYS: u32 = 397;
/// Validity of a new CA, in days.
const CA_VALIDITY_DAYS: u32 = 3650;
/// A certificate is valid from a little before its issue, for clocks a little behind.
const BACKDATE_MINUTES: i64 = 60;
const CA_COMMON_NAME: &str = "twopc development CA";

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

/// A certificate's validity: from a little before now for `days`.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(BACKDATE_MINUTES);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// The CA in `ca_dir`: loaded if its key is there, else created (key 0600, directory
/// 0700). A loaded CA is re-signed in memory only to sign with: the same name and key,
/// so what it signs verifies against the `ca.pem` on disk.
fn load_or_create_ca(ca_dir: &Path) -> anyhow::Result<(rcgen::Certificate, KeyPair, String)> {
    let key_path = ca_dir.join("ca-key.pem");
    let ca_pem_path = ca_dir.join("ca.pem");
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca, CA_VALIDITY_DAYS);
    if key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("read {}", key_path.display()))?;
        let ca_key =
            KeyPair::from_pem(&key_pem).with_context(|| format!("parse {}", key_path.display()))?;
        let ca_pem = std::fs::read_to_string(&ca_pem_path)
            .with_context(|| format!("read {}", ca_pem_path.display()))?;
        let ca_cert = ca.self_signed(&ca_key)?;
        return Ok((ca_cert, ca_key, ca_pem));
    }
    crate::meta::create_private_dir(ca_dir)
        .with_context(|| format!("create {}", ca_dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write(ca_dir, "ca-key.pem", &ca_key.serialize_pem())?;
    let ca_pem = ca_cert.pem();
    write(ca_dir, "ca.pem", &ca_pem)?;
    Ok((ca_cert, ca_key, ca_pem))
}

/// Writes an agent (server) and a coordinator (client) certificate, valid `days`, into
/// `out`, signed by the CA of `ca_dir` (created there if missing; its key never goes to
/// `out`). The coordinator's names `coordinator_ids` (`c1` if empty).
pub fn generate(
    out: &Path,
    ca_dir: &Path,
    agent_hosts: &[String],
    coordinator_ids: &[String],
    days: u32,
) -> anyhow::Result<()> {
    for id in coordinator_ids {
        twopc_shared::gid::validate_coordinator_id(id)?;
    }
    anyhow::ensure!(days > 0, "--days must be at least 1");
    anyhow::ensure!(
        out != ca_dir,
        "--out and --ca-dir must differ: the CA's key stays out of what is deployed"
    );
    anyhow::ensure!(
        !out.join("ca-key.pem").exists(),
        "{} holds a CA key (written by an older `certs`): move it into --ca-dir {} \
         (with its ca.pem) or delete it, so it is not deployed",
        out.display(),
        ca_dir.display()
    );
    let (ca_cert, ca_key, ca_pem) = load_or_create_ca(ca_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;

    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    hosts.extend(agent_hosts.iter().cloned());
    let agent_key = KeyPair::generate()?;
    let mut agent = CertificateParams::new(hosts)?;
    agent
        .distinguished_name
        .push(DnType::CommonName, "twopc agent");
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut agent, days);
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
    set_validity(&mut coord, days);
    let coord_cert = coord.signed_by(&coord_key, &ca_cert, &ca_key)?;

    write(out, "ca.pem", &ca_pem)?;
    write(out, "agent.pem", &agent_cert.pem())?;
    write(out, "agent-key.pem", &agent_key.serialize_pem())?;
    write(out, "coordinator.pem", &coord_cert.pem())?;
    write(out, "coordinator-key.pem", &coord_key.serialize_pem())?;
    Ok(())
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    generate(
        &args.out,
        &args.ca_dir,
        &args.agent_hosts,
        &args.coordinator_ids,
        args.days,
    )?;
    let d = args.out.display();
    println!(
        "wrote certificates valid {} days to {d}, signed by the CA in {} (keep that \
         directory, with the CA's key, off the machines you deploy to)",
        args.days,
        args.ca_dir.display()
    );
    println!("agent:       --tls-cert {d}/agent.pem --tls-key {d}/agent-key.pem --tls-client-ca {d}/ca.pem");
    println!("coordinator: --agent-tls-cert {d}/coordinator.pem --agent-tls-key {d}/coordinator-key.pem --agent-ca {d}/ca.pem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn mode(dir: &Path, name: &str) -> u32 {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn private_keys_are_created_0600_and_the_ca_key_stays_in_its_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (out, ca) = (dir.path().join("out"), dir.path().join("ca"));
        super::generate(&out, &ca, &[], &[], 30).unwrap();
        for key in ["agent-key.pem", "coordinator-key.pem"] {
            assert_eq!(mode(&out, key), 0o600, "{key}");
        }
        assert_eq!(mode(&ca, "ca-key.pem"), 0o600);
        assert_eq!(
            mode(dir.path(), "ca") & 0o077,
            0,
            "the CA directory is private"
        );
        assert!(!out.join("ca-key.pem").exists(), "the CA key was deployed");
        assert_eq!(mode(&out, "ca.pem") & 0o400, 0o400);
        // Generating again over the same files keeps the keys private.
        super::generate(&out, &ca, &[], &[], 30).unwrap();
        assert_eq!(mode(&out, "agent-key.pem"), 0o600);
    }

    fn pem_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_file_iter(path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Whether `cert` verifies as a client certificate under `ca` at `now`.
    fn verifies(ca: &Path, cert: &Path, now: std::time::SystemTime) -> bool {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(ca) {
            roots.add(c).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
            .build()
            .unwrap();
        let leaf = pem_certs(cert).remove(0);
        let now = rustls::pki_types::UnixTime::since_unix_epoch(
            now.duration_since(std::time::UNIX_EPOCH).unwrap(),
        );
        verifier.verify_client_cert(&leaf, &[], now).is_ok()
    }

    #[test]
    fn certificates_expire_after_their_days_and_a_kept_ca_signs_new_ones() {
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        super::generate(&first, &ca, &[], &[], 30).unwrap();
        let cert = first.join("coordinator.pem");
        assert!(verifies(&ca.join("ca.pem"), &cert, now));
        assert!(verifies(&ca.join("ca.pem"), &cert, now + 29 * day));
        assert!(
            !verifies(&ca.join("ca.pem"), &cert, now + 31 * day),
            "valid past its days"
        );
        // Issued again from the kept CA: the first ca.pem trusts them.
        super::generate(&second, &ca, &[], &[], 30).unwrap();
        assert!(verifies(
            &first.join("ca.pem"),
            &second.join("coordinator.pem"),
            now
        ));
        // A different CA's certificate does not verify.
        let other = dir.path().join("other");
        super::generate(&other, &dir.path().join("other-ca"), &[], &[], 30).unwrap();
        assert!(!verifies(
            &first.join("ca.pem"),
            &other.join("coordinator.pem"),
            now
        ));
    }
}
