//! Client-side encryption. Each account has a random 256-bit master key,
//! stored on the account server only wrapped under a passphrase-derived key
//! (Argon2id, RFC 9106's second recommended setting). From the master key
//! come two subkeys: one keys the BLAKE3 that names chunks (so equal
//! plaintexts of one account dedup, and nobody without the key can tell
//! whether a known file is stored), the other seals payloads with
//! XChaCha20-Poly1305 (random 24-byte nonces never repeat in practice).
//!
//! Payload: `[format 1][nonce][AEAD(zstd(plaintext), aad = chunk id)]`.
//! Binding the id as associated data means a payload moved under another
//! id fails its tag, and the keyed id is checked again after decryption.

use argon2::{Algorithm, Argon2, Params, Version};
use duplex_proto::v1::{Chunk, KeyRecord, SnapshotSummary};
use duplex_types::ChunkId;
use duplex_types::sealed::{
    KEY_FORMAT_V1, MAX_PLAINTEXT_CHUNK, PAYLOAD_FORMAT_V1, PAYLOAD_OVERHEAD, payload_hash,
};
use prost::Message;
use zeroize::Zeroizing;

use crate::AgentError;
use crate::aead::{NONCE_LEN, TAG_LEN, XChaCha20Poly1305};

/// Fast zstd: the CPU, not the disk, is the ceiling on a backup.
const ZSTD_LEVEL: i32 = 1;
/// Format byte and nonce, ahead of the ciphertext.
const HEADER_LEN: usize = 1 + NONCE_LEN;
/// RFC 9106 §4, second recommended option: 64 MiB, 3 passes, 4 lanes.
pub const DEFAULT_M_COST_KIB: u32 = 64 * 1024;
pub const DEFAULT_T_COST: u32 = 3;
pub const DEFAULT_P_COST: u32 = 4;
const SUMMARY_AAD: &[u8] = b"duplex snapshot summary v1";

/// The subkeys one unlocked account works with.
pub struct Keys {
    id_key: Zeroizing<[u8; 32]>,
    chunks: XChaCha20Poly1305,
    summaries: XChaCha20Poly1305,
    /// The master key, kept to wrap it under another passphrase.
    master: Zeroizing<[u8; 32]>,
}

impl Keys {
    pub fn from_master(master: &[u8; 32]) -> Keys {
        let id_key = Zeroizing::new(blake3::derive_key("duplex chunk id v1", master));
        let aead = Zeroizing::new(blake3::derive_key("duplex chunk aead v1", master));
        let summary = Zeroizing::new(blake3::derive_key("duplex snapshot summary aead v1", master));
        Keys {
            id_key,
            chunks: XChaCha20Poly1305::new(&aead),
            summaries: XChaCha20Poly1305::new(&summary),
            master: Zeroizing::new(*master),
        }
    }

    /// A fresh random master key.
    pub fn generate() -> Keys {
        let master = Zeroizing::new(rand::random::<[u8; 32]>());
        Keys::from_master(&master)
    }

    pub fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// The chunk id: keyed BLAKE3 of the plaintext.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        ChunkId::from(*blake3::keyed_hash(&self.id_key, plain).as_bytes())
    }

    /// Compresses, encrypts and frames one chunk for upload, in one buffer:
    /// zstd writes after the header and the cipher runs in place.
    pub fn seal_chunk(&self, id: ChunkId, plain: &[u8]) -> Result<Chunk, AgentError> {
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        let mut out = std::io::Cursor::new(Vec::with_capacity(HEADER_LEN + bound + TAG_LEN));
        out.set_position(HEADER_LEN as u64);
        COMPRESSOR
            .with_borrow_mut(|c| match c {
                Some(c) => c.compress_to_buffer(plain, &mut out),
                None => Err(std::io::Error::other("no zstd context")),
            })
            .map_err(|e| AgentError::Invalid(format!("compressing chunk {id}: {e}")))?;
        let mut data = out.into_inner();
        seal_after_header(&self.chunks, id.as_bytes(), &mut data)?;
        Ok(Chunk {
            id: id.to_vec(),
            data_hash: payload_hash(&data).to_vec(),
            data: data.into(),
        })
    }

    /// Checks a chunk from a server end to end: the AEAD tag (bound to
    /// `expected`), then the keyed id of the plaintext.
    pub fn open_chunk(&self, chunk: &Chunk, expected: ChunkId) -> Result<Vec<u8>, AgentError> {
        if chunk.id != expected.as_bytes() {
            return Err(AgentError::Corrupt(expected.to_string()));
        }
        SEALED.with_borrow_mut(|sealed| self.open_chunk_in(chunk, expected, sealed))
    }

    /// `open_chunk` with `sealed` as room to decrypt in: the received
    /// bytes stay as they came, to be hashed if the tag fails.
    fn open_chunk_in(
        &self,
        chunk: &Chunk,
        expected: ChunkId,
        sealed: &mut Vec<u8>,
    ) -> Result<Vec<u8>, AgentError> {
        sealed.clear();
        sealed.extend_from_slice(&chunk.data);
        let compressed = match open(&self.chunks, expected.as_bytes(), sealed) {
            Ok(compressed) => compressed,
            // The tag covers every byte the payload hash does (the format
            // byte is checked, the nonce feeds the cipher), so the hash is
            // computed only to name a failure: bytes that no longer match
            // the hash stored with them were damaged after the upload.
            // Hashing every chunk up front cost a restore a twentieth of
            // its user time.
            Err(_) if payload_hash(&chunk.data).as_slice() != chunk.data_hash => {
                return Err(AgentError::Corrupt(expected.to_string()));
            }
            Err(e) => return Err(e.for_what(&format!("chunk {expected}"))),
        };
        // Bounded, so a hostile payload cannot balloon memory; sized by
        // the frame's own header when it has one, since a buffer of the
        // bound for every chunk is megabytes faulted in and freed again.
        let capacity = match zstd::zstd_safe::get_frame_content_size(compressed) {
            Ok(Some(n)) if n <= MAX_PLAINTEXT_CHUNK as u64 => n as usize,
            _ => MAX_PLAINTEXT_CHUNK,
        };
        let plain = DECOMPRESSOR
            .with_borrow_mut(|d| match d {
                Some(d) => d.decompress(compressed, capacity),
                None => Err(std::io::Error::other("no zstd context")),
            })
            .map_err(|_| AgentError::Integrity(format!("chunk {expected} does not decompress")))?;
        if self.chunk_id(&plain) != expected {
            return Err(AgentError::Integrity(format!(
                "chunk {expected} decrypts to content with another id"
            )));
        }
        Ok(plain)
    }

    pub fn seal_summary(&self, summary: &SnapshotSummary) -> Result<Vec<u8>, AgentError> {
        seal(&self.summaries, SUMMARY_AAD, &summary.encode_to_vec())
    }

    pub fn open_summary(&self, snapshot: &str, blob: &[u8]) -> Result<SnapshotSummary, AgentError> {
        let what = format!("the summary of snapshot {snapshot}");
        let mut sealed = blob.to_vec();
        let plain = open(&self.summaries, SUMMARY_AAD, &mut sealed).map_err(|e| e.for_what(&what))?;
        SnapshotSummary::decode(&*plain)
            .map_err(|e| AgentError::Integrity(format!("{what} does not decode: {e}")))
    }
}

/// Why a sealed blob did not open.
enum OpenError {
    Format(String),
    Tag,
}

impl OpenError {
    fn for_what(self, what: &str) -> AgentError {
        match self {
            OpenError::Format(why) => AgentError::Invalid(format!("{what}: {why}")),
            OpenError::Tag => AgentError::Integrity(format!(
                "{what} fails its authentication tag: it was altered or damaged (or belongs to another key)"
            )),
        }
    }
}

thread_local! {
    // One zstd context per thread: making one per chunk showed in profiles.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
    // Room to decrypt a received chunk in, kept by each thread: a new
    // megabyte per chunk was faulted in and given back every time.
    static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn seal(cipher: &XChaCha20Poly1305, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, AgentError> {
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(plain);
    seal_after_header(cipher, aad, &mut out)?;
    Ok(out)
}

/// Fills in the header of `buf` (format byte, fresh nonce) and seals what
/// follows it in place.
fn seal_after_header(cipher: &XChaCha20Poly1305, aad: &[u8], buf: &mut Vec<u8>) -> Result<(), AgentError> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let Some(header) = buf.get_mut(..HEADER_LEN) else {
        return Err(AgentError::Invalid(
            "encryption failed: no room for the header".into(),
        ));
    };
    header[0] = PAYLOAD_FORMAT_V1;
    header[1..].copy_from_slice(&nonce);
    if cfg!(feature = "bench-unencrypted") {
        // The benchmark's baseline: everything but the cipher. The zero
        // tag fails in any real agent, so nothing it writes is mistaken
        // for sealed data.
        buf.extend_from_slice(&[0; TAG_LEN]);
        return Ok(());
    }
    cipher
        .seal_in_place(&nonce, aad, buf, HEADER_LEN)
        .map_err(|_| AgentError::Invalid("encryption failed".into()))
}

/// Opens a sealed blob in place, returning its plaintext part.
fn open<'a>(cipher: &XChaCha20Poly1305, aad: &[u8], data: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
    if data.len() < PAYLOAD_OVERHEAD {
        return Err(OpenError::Format(format!(
            "{} bytes is too short to be sealed",
            data.len()
        )));
    }
    let (header, sealed) = data.split_at_mut(HEADER_LEN);
    if header[0] != PAYLOAD_FORMAT_V1 {
        return Err(OpenError::Format(format!(
            "format {} is unknown to this agent (it knows format {PAYLOAD_FORMAT_V1}); upgrade duplex",
            header[0]
        )));
    }
    let nonce: &[u8; NONCE_LEN] = header[1..].try_into().map_err(|_| OpenError::Tag)?;
    if cfg!(feature = "bench-unencrypted") {
        let len = sealed.len().saturating_sub(TAG_LEN);
        return Ok(&mut sealed[..len]);
    }
    cipher
        .open_in_place(nonce, aad, sealed)
        .map_err(|_| OpenError::Tag)
}

/// The key-encryption key for one record's salt and parameters.
fn kek(passphrase: &[u8], record: &KeyRecord) -> Result<Zeroizing<[u8; 32]>, AgentError> {
    let params = Params::new(record.m_cost_kib, record.t_cost, record.p_cost, Some(32))
        .map_err(|e| AgentError::Invalid(format!("key {}: bad Argon2 parameters: {e}", record.id)))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, &record.salt, out.as_mut())
        .map_err(|e| AgentError::Invalid(format!("key {}: deriving the key failed: {e}", record.id)))?;
    Ok(out)
}

/// Wraps `master` under `passphrase` in a new key record.
pub fn wrap(master: &[u8; 32], passphrase: &[u8]) -> Result<KeyRecord, AgentError> {
    let mut record = KeyRecord {
        id: hex::encode(rand::random::<[u8; 4]>()),
        created_unix_ms: now_ms(),
        salt: rand::random::<[u8; 16]>().to_vec(),
        m_cost_kib: DEFAULT_M_COST_KIB,
        t_cost: DEFAULT_T_COST,
        p_cost: DEFAULT_P_COST,
        nonce: Vec::new(),
        wrapped: Vec::new(),
        format_version: KEY_FORMAT_V1,
    };
    let kek = kek(passphrase, &record)?;
    let nonce: [u8; NONCE_LEN] = rand::random();
    let cipher = XChaCha20Poly1305::new(&kek);
    record.wrapped = cipher
        .seal(&nonce, record.id.as_bytes(), master)
        .map_err(|_| AgentError::Invalid("wrapping the key failed".into()))?;
    record.nonce = nonce.to_vec();
    Ok(record)
}

/// The master key in `record`, or None when `passphrase` does not open it.
pub fn unwrap(record: &KeyRecord, passphrase: &[u8]) -> Result<Option<Keys>, AgentError> {
    if record.format_version != KEY_FORMAT_V1 {
        return Err(AgentError::Invalid(format!(
            "key {} has format {}, unknown to this agent (it knows format {KEY_FORMAT_V1}); upgrade duplex",
            record.id, record.format_version
        )));
    }
    let Ok(nonce) = <&[u8; NONCE_LEN]>::try_from(record.nonce.as_slice()) else {
        return Err(AgentError::Invalid(format!(
            "key {} has a malformed nonce",
            record.id
        )));
    };
    let kek = kek(passphrase, record)?;
    let cipher = XChaCha20Poly1305::new(&kek);
    let mut sealed = Zeroizing::new(record.wrapped.clone());
    let Ok(master) = cipher.open_in_place(nonce, record.id.as_bytes(), &mut sealed) else {
        return Ok(None);
    };
    let master: [u8; 32] = (&*master)
        .try_into()
        .map_err(|_| AgentError::Invalid(format!("key {} does not hold a 32-byte key", record.id)))?;
    let master = Zeroizing::new(master);
    Ok(Some(Keys::from_master(&master)))
}

use duplex_types::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_encryption_key_matches_the_argon2_reference() {
        // From the reference implementation (argon2-cffi's
        // `hash_secret_raw`, Argon2id v1.3, the default parameters): a
        // passphrase set under any earlier agent must unlock under this one,
        // whatever the Argon2 crate's version or lane scheduling.
        let record = KeyRecord {
            salt: (0u8..16).collect(),
            m_cost_kib: DEFAULT_M_COST_KIB,
            t_cost: DEFAULT_T_COST,
            p_cost: DEFAULT_P_COST,
            ..KeyRecord::default()
        };
        let derived = kek(b"correct horse battery staple", &record).expect("kek");
        assert_eq!(
            hex::encode(derived.as_slice()),
            "853b272a44db1421c02962669a55eb0994f3cab385ed1c4c79253eee19bab49e"
        );
    }

    #[test]
    fn chunks_round_trip_and_tampering_is_caught() {
        let keys = Keys::generate();
        let plain = b"some file content".repeat(100);
        let id = keys.chunk_id(&plain);
        assert_ne!(id, ChunkId::of(&plain), "the id is keyed");
        let chunk = keys.seal_chunk(id, &plain).expect("seal");
        assert!(!chunk.data.windows(9).any(|w| w == b"some file"));
        assert_eq!(keys.open_chunk(&chunk, id).expect("open"), plain);

        let mut bad = chunk.clone();
        let mut data = bad.data.to_vec();
        data[40] ^= 1;
        bad.data_hash = payload_hash(&data).to_vec();
        bad.data = data.into();
        assert!(matches!(keys.open_chunk(&bad, id), Err(AgentError::Integrity(_))));
        // Bytes damaged after the upload no longer match the stored hash:
        // named as data loss, not as tampering.
        let mut damaged = chunk.clone();
        let mut data = damaged.data.to_vec();
        data[40] ^= 1;
        damaged.data = data.into();
        assert!(matches!(
            keys.open_chunk(&damaged, id),
            Err(AgentError::Corrupt(_))
        ));
        // The tag and the keyed id prove the data; a damaged hash field
        // beside intact data loses nothing.
        let mut hash_only = chunk.clone();
        hash_only.data_hash = vec![0; 32];
        assert_eq!(keys.open_chunk(&hash_only, id).expect("open"), plain);

        let other = Keys::generate();
        assert!(other.open_chunk(&chunk, id).is_err());
    }

    #[test]
    fn wrapped_keys_open_only_with_their_passphrase() {
        let keys = Keys::generate();
        let mut record = wrap(keys.master(), b"right").expect("wrap");
        assert_eq!(record.m_cost_kib, 64 * 1024);
        let opened = unwrap(&record, b"right").expect("unwrap").expect("opens");
        assert_eq!(opened.master(), keys.master());
        assert!(unwrap(&record, b"wrong").expect("unwrap").is_none());
        record.wrapped[0] ^= 1;
        assert!(unwrap(&record, b"right").expect("unwrap").is_none());
    }
}
