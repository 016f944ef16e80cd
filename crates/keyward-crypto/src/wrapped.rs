//! The blob layout shared by KEK backends outside this process (PKCS#11: version 2, AWS KMS:
//! version 3): a data key wrapped by the backend, of any length, then the v1 data AEAD.
//!
//! ```text
//! 0        3      magic b"KWB"
//! 3        1      version
//! 4        1      n = length of the kek id
//! 5        n      kek id
//! 5+n      2      w = length of the wrapped DEK, big-endian
//! 7+n      w      the DEK as the backend wrapped it
//! 7+n+w    12     ChaCha20Poly1305 nonce
//! 19+n+w   m+16   ChaCha20Poly1305 ciphertext + tag, aad = header (magic..kek id) || binding
//! ```

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::envelope::is_valid_kek_id;
use crate::{Binding, CryptoError, SealedKey, BLOB_MAGIC, MAX_PLAINTEXT_LEN};

pub(crate) const DEK_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A fresh random DEK.
pub(crate) fn fresh_dek() -> Zeroizing<[u8; DEK_LEN]> {
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    OsRng.fill_bytes(dek.as_mut());
    dek
}

/// Builds a blob: `wrapped` is `dek` as the backend wrapped it.
pub(crate) fn assemble(
    version: u8,
    kek_id: &str,
    wrapped: &[u8],
    dek: &[u8; DEK_LEN],
    binding: &Binding,
    plaintext: &[u8],
) -> Result<SealedKey, CryptoError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(CryptoError::PlaintextTooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        });
    }
    let id_len = u8::try_from(kek_id.len()).map_err(|_| CryptoError::SealFailed)?;
    let w = u16::try_from(wrapped.len()).map_err(|_| CryptoError::SealFailed)?;
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let mut blob = Zeroizing::new(Vec::with_capacity(
        7 + kek_id.len() + wrapped.len() + NONCE_LEN + plaintext.len() + TAG_LEN,
    ));
    blob.extend_from_slice(&BLOB_MAGIC);
    blob.push(version);
    blob.push(id_len);
    blob.extend_from_slice(kek_id.as_bytes());
    let mut aad = blob.to_vec();
    aad.extend_from_slice(&binding.canonical_bytes());
    blob.extend_from_slice(&w.to_be_bytes());
    blob.extend_from_slice(wrapped);
    blob.extend_from_slice(&nonce);
    let body_start = blob.len();
    blob.extend_from_slice(plaintext);
    let cipher = ChaCha20Poly1305::new_from_slice(dek).map_err(|_| CryptoError::SealFailed)?;
    let buffer = blob.get_mut(body_start..).ok_or(CryptoError::SealFailed)?;
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buffer)
        .map_err(|_| CryptoError::SealFailed)?;
    blob.extend_from_slice(&tag);
    Ok(SealedKey::from_bytes(std::mem::take(&mut *blob)))
}

/// A parsed blob of this layout.
pub(crate) struct Parsed<'a> {
    header: &'a [u8],
    pub(crate) kek_id: &'a str,
    pub(crate) wrapped: &'a [u8],
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

/// Parses a blob of this layout with version `version`.
pub(crate) fn parse(bytes: &[u8], version: u8) -> Result<Parsed<'_>, CryptoError> {
    let (magic, rest) = bytes.split_first_chunk::<3>().ok_or(CryptoError::Malformed)?;
    if *magic != BLOB_MAGIC {
        return Err(CryptoError::Malformed);
    }
    let (&found, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    if found != version {
        return Err(CryptoError::UnsupportedVersion(found));
    }
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    let (id, rest) = rest
        .split_at_checked(usize::from(id_len))
        .ok_or(CryptoError::Malformed)?;
    let kek_id = std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)?;
    if !is_valid_kek_id(kek_id) {
        return Err(CryptoError::Malformed);
    }
    let header = bytes.get(..5 + id.len()).ok_or(CryptoError::Malformed)?;
    let (w, rest) = rest.split_first_chunk::<2>().ok_or(CryptoError::Malformed)?;
    let (wrapped, rest) = rest
        .split_at_checked(usize::from(u16::from_be_bytes(*w)))
        .ok_or(CryptoError::Malformed)?;
    let (nonce, rest) = rest.split_first_chunk::<NONCE_LEN>().ok_or(CryptoError::Malformed)?;
    let (ciphertext, tag) = rest.split_last_chunk::<TAG_LEN>().ok_or(CryptoError::Malformed)?;
    if ciphertext.len() > MAX_PLAINTEXT_LEN {
        return Err(CryptoError::Malformed);
    }
    Ok(Parsed {
        header,
        kek_id,
        wrapped,
        nonce,
        ciphertext,
        tag,
    })
}

/// Opens the data part of `p` with the unwrapped `dek` into `out` (zeroed on failure).
pub(crate) fn open_body(p: &Parsed<'_>, dek: &[u8], binding: &Binding, out: &mut [u8]) -> Result<usize, CryptoError> {
    if dek.len() != DEK_LEN {
        return Err(CryptoError::OpenFailed);
    }
    let mut aad = p.header.to_vec();
    aad.extend_from_slice(&binding.canonical_bytes());
    let cipher = ChaCha20Poly1305::new_from_slice(dek).map_err(|_| CryptoError::OpenFailed)?;
    let n = p.ciphertext.len();
    let max = out.len();
    let target = out.get_mut(..n).ok_or(CryptoError::PlaintextTooLarge { len: n, max })?;
    target.copy_from_slice(p.ciphertext);
    if cipher
        .decrypt_in_place_detached(Nonce::from_slice(p.nonce), &aad, target, Tag::from_slice(p.tag))
        .is_err()
    {
        zeroize::Zeroize::zeroize(target);
        return Err(CryptoError::OpenFailed);
    }
    Ok(n)
}
