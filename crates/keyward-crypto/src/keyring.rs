//! [`Keyring`]: the worker's set of KEK versions, one [`Opener`] per live version.
//!
//! A blob names the KEK id it was sealed to (`local-1`, `local-2`, …); the keyring picks the
//! opener by that id and answers [`CryptoError::KekUnavailable`] when it holds no such
//! version (retired, or never installed on this node). The gateway never holds a keyring:
//! it holds one [`crate::Sealer`] for the primary version.
//!
//! # Re-wrapping
//! [`Keyring::rewrap`] moves a blob to another version the keyring holds. Blob format v1
//! puts the header (and so the kek id) into the associated data of the *data* AEAD, not
//! only of the DEK wrap: rewriting only the wrapped DEK under the new KEK would leave a data
//! tag that no longer verifies. So a re-wrap opens the key into the caller's buffer (the
//! worker passes locked, non-dumpable memory), seals it again under a fresh DEK to the
//! target version, checks the new blob opens to the same bytes, and wipes the buffer. The
//! plaintext never leaves the worker; the gateway only moves blobs.

use std::fmt;

use zeroize::Zeroize;

use crate::{Binding, CryptoError, Opener, SealedKey};

/// The opening halves of every live KEK version. Not `Clone`; `Debug` names only kek ids.
pub struct Keyring {
    openers: Vec<Opener>,
}

impl Keyring {
    /// A keyring of `openers` (kek ids must be distinct; a duplicate is refused).
    pub fn new(openers: Vec<Opener>) -> Result<Keyring, CryptoError> {
        for (i, o) in openers.iter().enumerate() {
            if openers.iter().skip(i + 1).any(|p| p.kek_id() == o.kek_id()) {
                return Err(CryptoError::KekMismatch {
                    expected: "distinct KEK versions".to_owned(),
                    found: o.kek_id().to_owned(),
                });
            }
        }
        Ok(Keyring { openers })
    }

    /// The kek ids held, in the order given.
    pub fn kek_ids(&self) -> Vec<&str> {
        self.openers.iter().map(Opener::kek_id).collect()
    }

    /// Whether this keyring can open blobs sealed to `kek_id`.
    pub fn holds(&self, kek_id: &str) -> bool {
        self.opener(kek_id).is_some()
    }

    fn opener(&self, kek_id: &str) -> Option<&Opener> {
        self.openers.iter().find(|o| o.kek_id() == kek_id)
    }

    fn opener_for(&self, blob: &SealedKey) -> Result<&Opener, CryptoError> {
        let kek_id = blob.kek_id()?;
        self.opener(&kek_id).ok_or(CryptoError::KekUnavailable { kek_id })
    }

    /// [`Opener::open_into`] with the opener of the blob's KEK version.
    pub fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        self.opener_for(blob)?.open_into(binding, blob, out)
    }

    /// Re-seals `blob` (for the same `binding`) to KEK `target`, using `scratch` for the
    /// plaintext (wiped before returning, on success and failure). Answers the blob itself,
    /// unchanged, when it is already under `target`.
    pub fn rewrap(
        &self,
        binding: &Binding,
        blob: &SealedKey,
        target: &str,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let to = self.opener(target).ok_or_else(|| CryptoError::KekUnavailable {
            kek_id: target.to_owned(),
        })?;
        if blob.kek_id()? == target {
            // Still authenticate it: a re-wrap must never bless a blob that does not open.
            let result = to.open_into(binding, blob, scratch);
            scratch.zeroize();
            result?;
            return Ok(blob.clone());
        }
        let result = self.rewrap_inner(binding, blob, to, scratch);
        scratch.zeroize();
        result
    }

    fn rewrap_inner(
        &self,
        binding: &Binding,
        blob: &SealedKey,
        to: &Opener,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let n = self.opener_for(blob)?.open_into(binding, blob, scratch)?;
        let (plaintext, check) = scratch.split_at_mut_checked(n).ok_or(CryptoError::Malformed)?;
        let fresh = to.sealer().seal(binding, plaintext)?;
        // The new blob must open, under the target, to the very same bytes.
        let m = to.open_into(binding, &fresh, check)?;
        let same = m == n && check.get(..m).is_some_and(|c| c == &*plaintext);
        if !same {
            return Err(CryptoError::SealFailed);
        }
        Ok(fresh)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("kek_ids", &self.kek_ids()).finish()
    }
}
