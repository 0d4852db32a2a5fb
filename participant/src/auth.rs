//! Who may command this agent: authentication of the coordinator (a shared key, see
//! `twopc_shared::auth`, and/or a TLS client certificate) and what an authenticated
//! connection may touch (only its own coordinator id's GIDs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use tracing::warn;
use twopc_shared::auth::{nonce_hex, AuthKey, KeyError, NONCE_BYTES};
use twopc_shared::gid::{gid_prefix, Gid};
use twopc_shared::msg::{AgentError, ErrorKind, Request};

/// How the agent's server authenticates coordinators (beside TLS client certificates,
/// configured in `ServerConfig::tls`).
#[derive(Debug, Clone, Default)]
pub struct Authentication {
    /// Coordinators must prove they hold this key (challenge-response in the handshake).
    pub key: Option<Arc<AuthKey>>,
    /// Coordinator ids this agent serves; empty: any id the key (or certificate) allows.
    pub coordinator_ids: Vec<String>,
    /// Serve coordinators that did not authenticate: development only, and only on a
    /// loopback address ([`check_listen`]). Ignored when a key or TLS is configured.
    pub insecure: bool,
}

/// Why the agent refuses to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "no authentication configured: give --auth-key-file FILE (a shared key) or \
         --tls-cert/--tls-key/--tls-client-ca (mutual TLS), so that only your coordinator \
         can command this agent; --insecure serves anyone, on a loopback address only"
    )]
    NoAuthentication,
    #[error(
        "--insecure serves unauthenticated coordinators, so it listens on loopback \
         addresses only (127.0.0.1, ::1); {0} is not one. Configure --auth-key-file or TLS"
    )]
    InsecureNotLoopback(SocketAddr),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Refuses a configuration that would let anyone command the agent: no key and no TLS
/// without `insecure`, and `insecure` on anything but loopback.
pub fn check_listen(
    auth: &Authentication,
    tls_configured: bool,
    addr: SocketAddr,
) -> Result<(), ServeError> {
    if auth.key.is_some() || tls_configured {
        return Ok(());
    }
    if !auth.insecure {
        return Err(ServeError::NoAuthentication);
    }
    if !addr.ip().is_loopback() {
        return Err(ServeError::InsecureNotLoopback(addr));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
}

/// Reads a key file: hex (e.g. `openssl rand -hex 32`), at least 32 bytes of key. Warns
/// if others may read it.
pub fn load_key_file(path: &Path) -> Result<AuthKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let key = AuthKey::from_hex(&text).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                warn!(path = %path.display(), "the key file may be read by other users; chmod 600 it");
            }
        }
    }
    Ok(key)
}

/// A fresh nonce from the operating system's random source, hex.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    nonce_hex(&bytes)
}

/// A TLS client certificate authorizes the coordinator ids it names as DNS subject
/// alternative names.
pub fn certificate_names(
    cert: &rustls::pki_types::CertificateDer<'_>,
    coordinator_id: &str,
) -> bool {
    let Ok(name) = rustls::pki_types::ServerName::try_from(coordinator_id) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

fn forbidden(coordinator_id: &str, what: &str) -> AgentError {
    AgentError::new(
        ErrorKind::Forbidden,
        format!("this connection acts for coordinator {coordinator_id} only; {what}"),
    )
}

fn own_gid(coordinator_id: &str, gid: &Gid) -> Result<(), AgentError> {
    if gid.coordinator_id() == coordinator_id {
        Ok(())
    } else {
        Err(forbidden(
            coordinator_id,
            &format!("{gid} belongs to coordinator {}", gid.coordinator_id()),
        ))
    }
}

/// A connection authenticated as `coordinator_id` may name only that id's GIDs and
/// prefixes (`twopc_<id>_...`).
pub fn authorize(request: &Request, coordinator_id: &str) -> Result<(), AgentError> {
    match request {
        Request::Execute(e) => own_gid(coordinator_id, &e.gid),
        Request::CommitPrepared { gid } | Request::Abort { gid } | Request::Fence { gid } => {
            own_gid(coordinator_id, gid)
        }
        Request::Forget { gids } => gids.iter().try_for_each(|g| own_gid(coordinator_id, g)),
        Request::ListPrepared { gid_prefix: p } | Request::ListDecisions { gid_prefix: p } => {
            // Coordinator ids have no `_`, so `twopc_<id>_` matches that id's GIDs only.
            if p.starts_with(&gid_prefix(coordinator_id)) {
                Ok(())
            } else {
                Err(forbidden(
                    coordinator_id,
                    &format!(
                        "the prefix {p:?} is not within {}",
                        gid_prefix(coordinator_id)
                    ),
                ))
            }
        }
        Request::Ping | Request::Hello { .. } | Request::Authenticate { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twopc_shared::msg::{ExecuteBranch, Finish};

    fn gid(id: &str) -> Gid {
        Gid::new(id, 1, 5).unwrap()
    }

    #[test]
    fn a_connection_names_only_its_own_gids_and_prefixes() {
        let exec = |g: Gid| {
            Request::Execute(ExecuteBranch {
                gid: g,
                isolation: Default::default(),
                statements: vec![],
                finish: Finish::Prepare,
                read_only_vote: false,
                continues: false,
                decision: None,
                expires_in_ms: None,
            })
        };
        for (req, ok) in [
            (exec(gid("X")), true),
            (exec(gid("Y")), false),
            (Request::CommitPrepared { gid: gid("Y") }, false),
            (Request::Abort { gid: gid("Y") }, false),
            (Request::Abort { gid: gid("X") }, true),
            (Request::Fence { gid: gid("Y") }, false),
            (
                Request::Forget {
                    gids: vec![gid("X"), gid("Y")],
                },
                false,
            ),
            (
                Request::ListPrepared {
                    gid_prefix: "twopc_X_".into(),
                },
                true,
            ),
            (
                Request::ListPrepared {
                    gid_prefix: "twopc_".into(),
                },
                false,
            ),
            (
                Request::ListDecisions {
                    gid_prefix: "twopc_Y_".into(),
                },
                false,
            ),
            // `X` is not a prefix of `XY`'s GIDs: the separator is part of the prefix.
            (
                Request::ListPrepared {
                    gid_prefix: "twopc_X".into(),
                },
                false,
            ),
            (Request::Ping, true),
        ] {
            let got = authorize(&req, "X");
            assert_eq!(got.is_ok(), ok, "{req:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.kind, ErrorKind::Forbidden);
            }
        }
    }

    #[test]
    fn without_authentication_only_insecure_loopback_serves() {
        let loopback: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let none = Authentication::default();
        assert!(matches!(
            check_listen(&none, false, loopback),
            Err(ServeError::NoAuthentication)
        ));
        let insecure = Authentication {
            insecure: true,
            ..Default::default()
        };
        assert!(check_listen(&insecure, false, loopback).is_ok());
        assert!(check_listen(&insecure, false, "[::1]:1".parse().unwrap()).is_ok());
        assert!(matches!(
            check_listen(&insecure, false, any),
            Err(ServeError::InsecureNotLoopback(_))
        ));
        assert!(
            check_listen(&none, true, any).is_ok(),
            "TLS is authentication"
        );
        let keyed = Authentication {
            key: Some(Arc::new(AuthKey::from_bytes(vec![1; 32]).unwrap())),
            ..Default::default()
        };
        assert!(check_listen(&keyed, false, any).is_ok());
    }
}
