//! The framing every sealed-key blob format shares: the header (magic, version, kek id), the
//! data key's length, the data part (nonce, ciphertext, tag) and its AEAD, and the length
//! constants. Each format's module (v1: `envelope.rs`; v2 and v3: `wrapped.rs`) adds only
//! the fields between the header and the data part, and how its data key is wrapped.
//!
//! This module imports no other blob module, so the formats depend on it and never on each
//! other. Parsing never indexes or slices with a position that could be out of range: every
//! step goes through `split_first`, `split_first_chunk` or `split_at_checked`, and every
//! failure is [`CryptoError::Malformed`].
//!
//! # Layouts
//! ```text
//! every format         0     3    magic b"KWB"
//!                      3     1    version
//!                      4     1    n = length of the kek id (1..=255)
//!                      5     n    kek id, printable ASCII without spaces (e.g. "local-1")
//! v1 (local)           5+n   32   HPKE encapsulated key
//!                      37+n  48   HPKE-wrapped DEK: 32-byte DEK ciphertext + 16-byte tag
//! v2 (PKCS#11),        5+n   2    w = length of the wrapped DEK, big-endian
//! v3 (AWS KMS)         7+n   w    the DEK as the backend wrapped it
//! every format, then   12         ChaCha20Poly1305 nonce
//!                      m+16       ChaCha20Poly1305 ciphertext of the m-byte plaintext + tag,
//!                                 aad = header (magic through kek id) || binding
//! ```
//! A v1 blob is `113 + n + m` bytes: 220 bytes for a 100-byte plaintext under `local-1`.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use crate::CryptoError;

/// Magic bytes at the start of every sealed key blob.
pub const BLOB_MAGIC: [u8; 3] = *b"KWB";
/// Longest plaintext a blob may carry, in bytes.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;

/// Format v1: the local backend (HPKE to an X25519 key pair).
pub(crate) const VERSION_LOCAL: u8 = 1;
/// Format v2: PKCS#11 (the token RSA-OAEP-wraps the DEK).
pub(crate) const VERSION_PKCS11: u8 = 2;
/// Format v3: AWS KMS (KMS encrypts the DEK).
pub(crate) const VERSION_AWSKMS: u8 = 3;

/// Length of a DEK (ChaCha20Poly1305 key), in bytes.
pub(crate) const DEK_LEN: usize = 32;
/// Length of the ChaCha20Poly1305 nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Length of an AEAD tag (HPKE's ChaCha20Poly1305 and the data AEAD alike).
pub(crate) const TAG_LEN: usize = 16;

/// Whether blobs of format `version` carry a backend-wrapped DEK of any length (v2, v3).
pub(crate) fn is_wrapped_version(version: u8) -> bool {
    version == VERSION_PKCS11 || version == VERSION_AWSKMS
}

/// Whether this build can read the header of format `version` (every format, whatever the
/// features: a gateway built without a backend still counts and lists its blobs).
fn is_known_version(version: u8) -> bool {
    version == VERSION_LOCAL || is_wrapped_version(version)
}

/// Whether `id` is a valid kek id: 1 to 255 printable ASCII characters, no spaces.
pub(crate) fn is_valid_kek_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= usize::from(u8::MAX) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Length of the header (magic, version, kek id length, kek id) for a kek id of `kek_id_len`.
const fn header_len(kek_id_len: usize) -> usize {
    BLOB_MAGIC.len() + 1 + 1 + kek_id_len
}

/// A fresh random DEK.
pub(crate) fn fresh_dek() -> Zeroizing<[u8; DEK_LEN]> {
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    OsRng.fill_bytes(dek.as_mut());
    dek
}

// ---- parsing ------------------------------------------------------------------------------

/// A parsed header.
pub(crate) struct Header<'a> {
    /// The whole header (magic through kek id): part of the data AEAD's associated data.
    pub(crate) bytes: &'a [u8],
    pub(crate) version: u8,
    pub(crate) kek_id: &'a str,
    /// Everything after the header.
    pub(crate) rest: &'a [u8],
}

/// Parses the header of a blob that must be of format `version`; any other version is
/// [`CryptoError::UnsupportedVersion`] (checked before the kek id is read).
pub(crate) fn parse_as(bytes: &[u8], version: u8) -> Result<Header<'_>, CryptoError> {
    parse_with(bytes, |found| found == version)
}

fn parse_with(bytes: &[u8], accept: impl Fn(u8) -> bool) -> Result<Header<'_>, CryptoError> {
    let (magic, rest) = bytes.split_first_chunk::<3>().ok_or(CryptoError::Malformed)?;
    if *magic != BLOB_MAGIC {
        return Err(CryptoError::Malformed);
    }
    let (&version, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    if !accept(version) {
        return Err(CryptoError::UnsupportedVersion(version));
    }
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    let (id, rest) = rest
        .split_at_checked(usize::from(id_len))
        .ok_or(CryptoError::Malformed)?;
    let kek_id = std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)?;
    if !is_valid_kek_id(kek_id) {
        return Err(CryptoError::Malformed);
    }
    let header = bytes.get(..header_len(id.len())).ok_or(CryptoError::Malformed)?;
    Ok(Header {
        bytes: header,
        version,
        kek_id,
        rest,
    })
}

/// The kek id a blob of any known format names. A v1 blob's header is enough; a v2/v3
/// blob is also split into its fields (a truncated one is malformed, as when opening).
pub(crate) fn kek_id_of(bytes: &[u8]) -> Result<&str, CryptoError> {
    let h = parse_with(bytes, is_known_version)?;
    if is_wrapped_version(h.version) {
        let (_, rest) = split_wrapped_dek(h.rest)?;
        split_data(rest)?;
    }
    Ok(h.kek_id)
}

/// The v2/v3 wrapped-DEK field: a big-endian `u16` length, then that many bytes. Returns the
/// wrapped DEK and what follows it.
pub(crate) fn split_wrapped_dek(rest: &[u8]) -> Result<(&[u8], &[u8]), CryptoError> {
    let (w, rest) = rest.split_first_chunk::<2>().ok_or(CryptoError::Malformed)?;
    rest.split_at_checked(usize::from(u16::from_be_bytes(*w)))
        .ok_or(CryptoError::Malformed)
}

/// The data part: nonce, ciphertext, tag.
pub(crate) struct DataPart<'a> {
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

/// Splits the data part (everything after a format's own fields). A ciphertext longer than
/// [`MAX_PLAINTEXT_LEN`] is malformed, before any crypto.
pub(crate) fn split_data(rest: &[u8]) -> Result<DataPart<'_>, CryptoError> {
    let (nonce, rest) = rest.split_first_chunk::<NONCE_LEN>().ok_or(CryptoError::Malformed)?;
    let (ciphertext, tag) = rest.split_last_chunk::<TAG_LEN>().ok_or(CryptoError::Malformed)?;
    if ciphertext.len() > MAX_PLAINTEXT_LEN {
        return Err(CryptoError::Malformed);
    }
    Ok(DataPart { nonce, ciphertext, tag })
}

fn aad(header: &[u8], binding: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + binding.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(binding);
    aad
}

/// Opens the data part with the unwrapped `dek` into `out` (decrypting in place there, so the
/// plaintext exists nowhere else) and returns its length. `binding` is
/// [`crate::Binding::canonical_bytes`]. On an authentication failure the written part of
/// `out` is zeroed.
pub(crate) fn open_data(
    header: &[u8],
    data: &DataPart<'_>,
    dek: &[u8],
    binding: &[u8],
    out: &mut [u8],
) -> Result<usize, CryptoError> {
    if dek.len() != DEK_LEN {
        return Err(CryptoError::OpenFailed);
    }
    let aad = aad(header, binding);
    let cipher = ChaCha20Poly1305::new_from_slice(dek).map_err(|_| CryptoError::OpenFailed)?;
    let n = data.ciphertext.len();
    let max = out.len();
    let target = out.get_mut(..n).ok_or(CryptoError::PlaintextTooLarge { len: n, max })?;
    target.copy_from_slice(data.ciphertext);
    let opened =
        cipher.decrypt_in_place_detached(Nonce::from_slice(data.nonce), &aad, target, Tag::from_slice(data.tag));
    if opened.is_err() {
        target.zeroize();
        return Err(CryptoError::OpenFailed);
    }
    Ok(n)
}

// ---- writing ------------------------------------------------------------------------------

/// A blob being written: the header, then the format's own fields ([`Draft::push`]), then
/// the data part ([`Draft::seal_data`]). The buffer is allocated once at its final size, so
/// the plaintext copied in (and encrypted in place) is never left behind by a reallocation,
/// and it is zeroized if sealing fails.
pub(crate) struct Draft {
    blob: Zeroizing<Vec<u8>>,
    header_len: usize,
    total: usize,
}

impl Draft {
    /// Checks the plaintext's length (first: [`CryptoError::PlaintextTooLarge`]) and the kek
    /// id's, and writes the header. `fields_len` is the length of the format's own fields.
    pub(crate) fn new(
        version: u8,
        kek_id: &str,
        fields_len: usize,
        plaintext_len: usize,
    ) -> Result<Draft, CryptoError> {
        if plaintext_len > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::PlaintextTooLarge {
                len: plaintext_len,
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let id_len = u8::try_from(kek_id.len()).map_err(|_| CryptoError::SealFailed)?;
        let header_len = header_len(kek_id.len());
        let total = header_len + fields_len + NONCE_LEN + plaintext_len + TAG_LEN;
        let mut blob = Zeroizing::new(Vec::with_capacity(total));
        blob.extend_from_slice(&BLOB_MAGIC);
        blob.push(version);
        blob.push(id_len);
        blob.extend_from_slice(kek_id.as_bytes());
        Ok(Draft {
            blob,
            header_len,
            total,
        })
    }

    /// Appends one of the format's own fields.
    pub(crate) fn push(&mut self, field: &[u8]) {
        self.blob.extend_from_slice(field);
    }

    /// Appends the data part: a fresh random nonce, then `plaintext` sealed under `dek` with
    /// `aad = header || binding` (`binding` is [`crate::Binding::canonical_bytes`]), then the
    /// tag. Returns the finished blob's bytes.
    pub(crate) fn seal_data(
        mut self,
        dek: &[u8; DEK_LEN],
        binding: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let header = self.blob.get(..self.header_len).ok_or(CryptoError::SealFailed)?;
        let aad = aad(header, binding);
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.blob.extend_from_slice(&nonce);
        let body_start = self.blob.len();
        self.blob.extend_from_slice(plaintext);
        let cipher = ChaCha20Poly1305::new_from_slice(dek).map_err(|_| CryptoError::SealFailed)?;
        let buffer = self.blob.get_mut(body_start..).ok_or(CryptoError::SealFailed)?;
        // On error the draft (which may still hold plaintext) is zeroized as it drops.
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buffer)
            .map_err(|_| CryptoError::SealFailed)?;
        self.blob.extend_from_slice(&tag);
        debug_assert_eq!(self.blob.len(), self.total);
        Ok(std::mem::take(&mut *self.blob))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_id_validation() {
        assert!(is_valid_kek_id("local-1"));
        assert!(!is_valid_kek_id(""));
        assert!(!is_valid_kek_id("a b"));
        assert!(!is_valid_kek_id("é"));
        assert!(!is_valid_kek_id(&"x".repeat(256)));
        assert!(is_valid_kek_id(&"x".repeat(255)));
    }
}
