//! Shapes of the encrypted things servers store without reading them:
//! chunk payloads, snapshot summaries, wrapped account keys. The checks
//! here are what a server *can* verify about ciphertext, and they run on
//! every path that writes (an agent's upload, a mirror's batch, an applied
//! account-log entry).

use crate::InvalidInput;

/// Format byte of a payload sealed with XChaCha20-Poly1305 over zstd.
pub const PAYLOAD_FORMAT_V1: u8 = 1;
/// Format byte of a reference blob: plaintext chunk ids (see `refs`).
pub const PAYLOAD_FORMAT_REFS: u8 = 2;
/// Payload formats this build knows.
pub const KNOWN_PAYLOAD_FORMATS: &[u8] = &[PAYLOAD_FORMAT_V1, PAYLOAD_FORMAT_REFS];
/// Format byte + nonce + tag: the smallest payload there is.
pub const PAYLOAD_OVERHEAD: usize = 1 + 24 + 16;
/// Largest plaintext chunk the platform handles.
pub const MAX_PLAINTEXT_CHUNK: usize = 8 * 1024 * 1024;
/// Largest payload: zstd's worst case on incompressible data is a little
/// over the input, plus the seal.
pub const MAX_PAYLOAD: usize = MAX_PLAINTEXT_CHUNK + MAX_PLAINTEXT_CHUNK / 128 + 1024 + PAYLOAD_OVERHEAD;
/// Most manifest chunks one snapshot may name.
pub const MAX_MANIFEST_CHUNKS: usize = 1_000_000;
/// Largest encrypted snapshot summary (paths and hostname).
pub const MAX_SUMMARY_BYTES: usize = 1024 * 1024;
/// Format of a wrapped key record this build knows.
pub const KEY_FORMAT_V1: u32 = 1;
/// Most keys (passphrases) one account may hold.
pub const MAX_KEYS_PER_ACCOUNT: usize = 32;

/// Why a sealed payload is refused before anything is stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error(
        "payload is {0} bytes, too short for its format (a sealed payload has a {PAYLOAD_OVERHEAD}-byte seal)"
    )]
    TooShort(usize),
    #[error("payload is {0} bytes, over the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    #[error(
        "payload has format {0}, which this build does not know (it knows format {PAYLOAD_FORMAT_V1}); upgrade it"
    )]
    UnknownFormat(u8),
}

/// Checks what a server can check of a payload: its size and format byte.
pub fn check_payload(data: &[u8]) -> Result<(), PayloadError> {
    // A reference blob is plaintext: a format byte and at least one id.
    let smallest = match data.first() {
        Some(&PAYLOAD_FORMAT_REFS) => 1 + 32,
        _ => PAYLOAD_OVERHEAD,
    };
    if data.len() < smallest {
        return Err(PayloadError::TooShort(data.len()));
    }
    if data.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLong(data.len()));
    }
    match data.first() {
        Some(f) if KNOWN_PAYLOAD_FORMATS.contains(f) => Ok(()),
        Some(f) => Err(PayloadError::UnknownFormat(*f)),
        None => Err(PayloadError::TooShort(0)),
    }
}

/// BLAKE3 of a payload: what every hop checks.
pub fn payload_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The fields of a wrapped key record, borrowed from whatever carries it.
#[derive(Clone, Copy)]
pub struct KeyShape<'a> {
    pub id: &'a str,
    pub salt: &'a [u8],
    pub nonce: &'a [u8],
    pub wrapped: &'a [u8],
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub format_version: u32,
}

/// A key record must have a short hex id, a 16-byte salt, a 24-byte
/// nonce, a 48-byte wrapped key (32 + tag) and Argon2 parameters a client
/// can afford (so nobody can store a record that makes agents hang).
pub fn check_key_record(k: &KeyShape<'_>) -> Result<(), InvalidInput> {
    let malformed = |what, value: String, reason| InvalidInput::Malformed { what, value, reason };
    if k.id.is_empty() || k.id.len() > 32 || !k.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        let shown: String = k.id.chars().take(40).collect();
        return Err(malformed("key id", shown, "must be 1 to 32 hex digits"));
    }
    length("key salt", 16, k.salt.len())?;
    length("key nonce", 24, k.nonce.len())?;
    length("wrapped key", 48, k.wrapped.len())?;
    if k.format_version != KEY_FORMAT_V1 {
        return Err(malformed(
            "key format",
            k.format_version.to_string(),
            "unknown key format; this build knows format 1",
        ));
    }
    let params_ok = (8 * 1024..=4 * 1024 * 1024).contains(&k.m_cost_kib)
        && (1..=64).contains(&k.t_cost)
        && (1..=64).contains(&k.p_cost);
    if !params_ok {
        return Err(malformed(
            "key parameters",
            format!("m={} KiB t={} p={}", k.m_cost_kib, k.t_cost, k.p_cost),
            "Argon2 memory must be 8 MiB to 4 GiB, time and lanes 1 to 64",
        ));
    }
    Ok(())
}

fn length(what: &'static str, expected: usize, got: usize) -> Result<(), InvalidInput> {
    if got == expected {
        Ok(())
    } else {
        Err(InvalidInput::Length { what, expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_checks() {
        assert_eq!(check_payload(&[1; 10]), Err(PayloadError::TooShort(10)));
        assert_eq!(check_payload(&[9; 64]), Err(PayloadError::UnknownFormat(9)));
        assert_eq!(check_payload(&[1; 64]), Ok(()));
        assert_eq!(check_payload(&[2; 33]), Ok(()));
        assert_eq!(check_payload(&[2; 20]), Err(PayloadError::TooShort(20)));
    }

    #[test]
    fn key_record_checks() {
        let good = KeyShape {
            id: "ab12",
            salt: &[0; 16],
            nonce: &[0; 24],
            wrapped: &[0; 48],
            m_cost_kib: 65536,
            t_cost: 3,
            p_cost: 4,
            format_version: 1,
        };
        assert!(check_key_record(&good).is_ok());
        assert!(check_key_record(&KeyShape { id: "../x", ..good }).is_err());
        assert!(
            check_key_record(&KeyShape {
                salt: &[0; 3],
                ..good
            })
            .is_err()
        );
        assert!(
            check_key_record(&KeyShape {
                m_cost_kib: u32::MAX,
                ..good
            })
            .is_err()
        );
        assert!(
            check_key_record(&KeyShape {
                format_version: 2,
                ..good
            })
            .is_err()
        );
    }
}
