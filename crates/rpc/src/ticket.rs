//! Account tickets: the account server signs a short-lived statement of
//! who the caller is (Ed25519); storage servers check it without a round
//! trip, so every storage call is scoped to one account.

use std::collections::HashMap;

use duplex_proto::v1::{Ticket, TicketClaims, TicketKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("no ticket: log in to the account server first")]
    Missing,
    #[error("ticket is malformed")]
    Malformed,
    #[error("ticket was signed by unknown key {0}")]
    UnknownKey(String),
    #[error("ticket signature is invalid")]
    BadSignature,
    #[error("ticket expired; log in again")]
    Expired,
}

/// Holds the account server's signing key.
pub struct TicketSigner {
    key: SigningKey,
    key_id: String,
}

impl TicketSigner {
    pub fn generate_secret() -> [u8; 32] {
        rand::random()
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    pub fn public_key(&self) -> TicketKey {
        TicketKey {
            key_id: self.key_id.clone(),
            public_key: self.key.verifying_key().to_bytes().to_vec(),
        }
    }

    /// The encoded, signed `Ticket`.
    pub fn sign(&self, claims: &TicketClaims) -> Vec<u8> {
        let claims = claims.encode_to_vec();
        let signature = self.key.sign(&claims);
        Ticket {
            claims,
            signature: signature.to_bytes().to_vec(),
            key_id: self.key_id.clone(),
        }
        .encode_to_vec()
    }
}

fn key_id(key: &VerifyingKey) -> String {
    blake3::hash(key.as_bytes()).to_hex()[..16].to_owned()
}

/// The public keys that tickets may be signed with.
#[derive(Default, Clone)]
pub struct TicketVerifier {
    keys: HashMap<String, VerifyingKey>,
}

impl TicketVerifier {
    /// Adds keys; ignores (and reports) ones that are not valid Ed25519 keys.
    pub fn add_keys(&mut self, keys: &[TicketKey]) -> usize {
        let mut bad = 0;
        for k in keys {
            let parsed = <[u8; 32]>::try_from(k.public_key.as_slice())
                .ok()
                .and_then(|b| VerifyingKey::from_bytes(&b).ok());
            match parsed {
                Some(vk) if key_id(&vk) == k.key_id => {
                    self.keys.insert(k.key_id.clone(), vk);
                }
                _ => bad += 1,
            }
        }
        bad
    }

    pub fn knows(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// Decodes the envelope far enough to learn which key signed it.
    pub fn key_id_of(ticket: &[u8]) -> Result<String, TicketError> {
        Ticket::decode(ticket)
            .map(|t| t.key_id)
            .map_err(|_| TicketError::Malformed)
    }

    pub fn verify(&self, ticket: &[u8], now_unix: i64) -> Result<TicketClaims, TicketError> {
        let ticket = Ticket::decode(ticket).map_err(|_| TicketError::Malformed)?;
        let key = self
            .keys
            .get(&ticket.key_id)
            .ok_or_else(|| TicketError::UnknownKey(ticket.key_id.clone()))?;
        let signature = Signature::from_slice(&ticket.signature).map_err(|_| TicketError::Malformed)?;
        key.verify(&ticket.claims, &signature)
            .map_err(|_| TicketError::BadSignature)?;
        let claims = TicketClaims::decode(ticket.claims.as_slice()).map_err(|_| TicketError::Malformed)?;
        if claims.expires_at_unix <= now_unix {
            return Err(TicketError::Expired);
        }
        Ok(claims)
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires: i64) -> TicketClaims {
        TicketClaims {
            account_id: 7,
            account_name: "demo".into(),
            group: "default".into(),
            can_write: true,
            issued_at_unix: 0,
            expires_at_unix: expires,
            home: "storage-a".into(),
            epoch: 1,
            ..TicketClaims::default()
        }
    }

    #[test]
    fn signed_ticket_verifies_and_tampering_is_caught() {
        let signer = TicketSigner::from_secret(&TicketSigner::generate_secret());
        let mut verifier = TicketVerifier::default();
        assert_eq!(verifier.add_keys(&[signer.public_key()]), 0);
        let ticket = signer.sign(&claims(100));
        assert_eq!(verifier.verify(&ticket, 50).map(|c| c.account_id), Ok(7));
        assert_eq!(verifier.verify(&ticket, 100), Err(TicketError::Expired));

        let mut env = Ticket::decode(ticket.as_slice()).expect("decode");
        let mut forged = claims(100);
        forged.account_id = 8;
        env.claims = forged.encode_to_vec();
        assert_eq!(
            verifier.verify(&env.encode_to_vec(), 50),
            Err(TicketError::BadSignature)
        );
        assert_eq!(verifier.verify(b"junk", 50), Err(TicketError::Malformed));
    }

    #[test]
    fn other_keys_are_unknown() {
        let signer = TicketSigner::from_secret(&TicketSigner::generate_secret());
        let other = TicketSigner::from_secret(&TicketSigner::generate_secret());
        let mut verifier = TicketVerifier::default();
        verifier.add_keys(&[signer.public_key()]);
        let ticket = other.sign(&claims(100));
        assert!(matches!(
            verifier.verify(&ticket, 50),
            Err(TicketError::UnknownKey(_))
        ));
    }
}
