//! The shared-key handshake between a coordinator and an agent: HMAC-SHA256
//! challenge-response, no secret on the wire.
//!
//! ```text
//!   coordinator                                      agent
//!   Hello{version, coordinator_id, epoch, nonce=Nc} ──▶
//!                                                   ◀── Challenge{nonce=Na}
//!   Authenticate{proof=MAC(k, "coordinator", T)}    ──▶ verified (constant time)
//!                                                   ◀── Hello{..., proof=MAC(k, "agent", T)}
//!   T = version, coordinator_id, epoch, Nc, Na (each length-prefixed)
//! ```
//!
//! Both nonces are in what is MACed, so neither proof can be replayed on another
//! connection (the agent's nonce is fresh per connection) nor reflected (the role is
//! part of the MAC). The coordinator id and epoch are inside it, so a proof authorizes
//! exactly the identity and epoch the Hello claimed. The agent's proof lets the
//! coordinator check that it talks to an agent holding the key, not an impostor.
//!
//! What this does not give: confidentiality or integrity of the frames that follow. An
//! attacker who can only connect (the common case on a shared network) is refused; one
//! who sits on the path and rewrites TCP segments needs mutual TLS, which can be combined
//! with the key.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Least key material a key file must hold.
pub const AUTH_KEY_MIN_BYTES: usize = 32;
/// Random bytes in each side's nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key must be hexadecimal (0-9, a-f), e.g. the output of `openssl rand -hex 32`")]
    NotHex,
    #[error(
        "the key holds {bytes} bytes; at least {AUTH_KEY_MIN_BYTES} are needed \
         ({} hex digits)",
        AUTH_KEY_MIN_BYTES * 2
    )]
    TooShort { bytes: usize },
}

/// A shared key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Vec<u8>);

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    /// A key file's text: hexadecimal, surrounding whitespace ignored, at least
    /// [`AUTH_KEY_MIN_BYTES`] bytes once decoded.
    pub fn from_hex(text: &str) -> Result<AuthKey, KeyError> {
        let bytes = decode_hex(text.trim()).ok_or(KeyError::NotHex)?;
        AuthKey::from_bytes(bytes)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<AuthKey, KeyError> {
        if bytes.len() < AUTH_KEY_MIN_BYTES {
            return Err(KeyError::TooShort { bytes: bytes.len() });
        }
        Ok(AuthKey(bytes))
    }

    /// The key as a key file holds it.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    fn mac(&self, role: Role, t: &Transcript<'_>) -> Hmac<Sha256> {
        // Any key length is valid for HMAC; `new_from_slice` cannot fail here.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        let epoch = t.epoch.to_be_bytes();
        let version = t.protocol_version.to_be_bytes();
        let fields: [&[u8]; 7] = [
            b"twopc-auth-v1",
            role.label(),
            &version,
            t.coordinator_id.as_bytes(),
            &epoch,
            t.coordinator_nonce.as_bytes(),
            t.agent_nonce.as_bytes(),
        ];
        for f in fields {
            mac.update(&(f.len() as u32).to_be_bytes());
            mac.update(f);
        }
        mac
    }

    /// The proof `role` sends for `t`, hex-encoded.
    pub fn proof(&self, role: Role, t: &Transcript<'_>) -> String {
        encode_hex(&self.mac(role, t).finalize().into_bytes())
    }

    /// Whether `proof` is `role`'s proof for `t`. The comparison is constant-time
    /// (`Mac::verify_slice`).
    pub fn verify(&self, role: Role, t: &Transcript<'_>, proof: &str) -> bool {
        match decode_hex(proof) {
            Some(bytes) if bytes.len() == PROOF_BYTES => {
                self.mac(role, t).verify_slice(&bytes).is_ok()
            }
            _ => false,
        }
    }
}

/// Whose proof: the two directions MAC different labels, so one cannot stand for the
/// other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Agent,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Coordinator => b"coordinator",
            Role::Agent => b"agent",
        }
    }
}

/// What both proofs of one handshake cover.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub protocol_version: u32,
    pub coordinator_id: &'a str,
    pub epoch: u64,
    /// Hex, as sent in the Hello.
    pub coordinator_nonce: &'a str,
    /// Hex, as sent in the Challenge.
    pub agent_nonce: &'a str,
}

/// A nonce as it travels: [`NONCE_BYTES`] bytes, lowercase hex.
pub fn nonce_hex(bytes: &[u8; NONCE_BYTES]) -> String {
    encode_hex(bytes)
}

/// `s` is a well-formed nonce (exactly [`NONCE_BYTES`] bytes of lowercase hex).
pub fn valid_nonce(s: &str) -> bool {
    s.len() == NONCE_BYTES * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn digit(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NC: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const NA: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn key(byte: u8) -> AuthKey {
        AuthKey::from_bytes(vec![byte; 32]).unwrap()
    }

    fn transcript<'a>(id: &'a str, epoch: u64, nc: &'a str, na: &'a str) -> Transcript<'a> {
        Transcript {
            protocol_version: 4,
            coordinator_id: id,
            epoch,
            coordinator_nonce: nc,
            agent_nonce: na,
        }
    }

    #[test]
    fn a_proof_verifies_only_for_its_key_role_identity_epoch_and_nonces() {
        let k = key(7);
        let t = transcript("c1", 3, NC, NA);
        let p = k.proof(Role::Coordinator, &t);
        assert_eq!(p.len(), PROOF_BYTES * 2);
        assert!(k.verify(Role::Coordinator, &t, &p));
        assert!(!key(8).verify(Role::Coordinator, &t, &p), "another key");
        assert!(!k.verify(Role::Agent, &t, &p), "reflected as the agent's");
        for other in [
            transcript("c2", 3, NC, NA),
            transcript("c1", 4, NC, NA),
            transcript("c1", 3, NA, NA),
            transcript("c1", 3, NC, NC),
            // Length prefixes: moving bytes between fields changes the MAC.
            transcript("c", 3, &format!("1{NC}"), NA),
        ] {
            assert!(!k.verify(Role::Coordinator, &other, &p), "{other:?}");
        }
        assert!(!k.verify(Role::Coordinator, &t, "zz"));
        assert!(!k.verify(Role::Coordinator, &t, &p[..62]));
    }

    #[test]
    fn key_files_are_hex_of_at_least_32_bytes() {
        let hex = "ab".repeat(32);
        assert_eq!(
            AuthKey::from_hex(&format!("  {hex}\n")).unwrap().to_hex(),
            hex
        );
        assert_eq!(
            AuthKey::from_hex(&"ab".repeat(31)),
            Err(KeyError::TooShort { bytes: 31 })
        );
        assert_eq!(AuthKey::from_hex(&"zz".repeat(32)), Err(KeyError::NotHex));
        assert_eq!(AuthKey::from_hex("abc"), Err(KeyError::NotHex));
        assert_eq!(AuthKey::from_hex(""), Err(KeyError::TooShort { bytes: 0 }));
        assert!(
            !format!("{:?}", key(1)).contains("01"),
            "Debug hides the key"
        );
    }

    #[test]
    fn nonces_are_32_bytes_of_lowercase_hex() {
        assert!(valid_nonce(NC));
        assert!(valid_nonce(&nonce_hex(&[0xab; NONCE_BYTES])));
        assert!(!valid_nonce(&NC.to_uppercase()));
        assert!(!valid_nonce(&NC[..62]));
        assert!(!valid_nonce(""));
    }
}
