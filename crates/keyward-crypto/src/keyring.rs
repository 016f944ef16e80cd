//! One KEK version's handles, whichever backend holds it, and the worker's [`Keyring`].
//!
//! - [`KekSealer`]: the seal-only half of one version: all the gateway holds (a local
//!   public key, a token's public key through a session that never logs in, KMS with the
//!   gateway's encrypt-only credentials).
//! - [`KekOpener`]: the opening half of one version. Only the worker holds one, inside a
//!   [`Keyring`] (every live version; picks the opener by the kek id a blob names and
//!   answers [`CryptoError::KekUnavailable`] for a version it does not hold: retired, or
//!   never installed on this node).
//!
//! Sealing and opening are `async` for every backend, once: KMS is awaited, the local and
//! PKCS#11 backends are called inline (a local seal is microseconds; a token operation is
//! what the call is waiting for anyway). There is no synchronous twin to misuse with KMS.
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

use crate::{Binding, CryptoError, Opener, SealedKey, Sealer};

/// The opening half of one KEK version, whichever backend holds it. `Debug` is redacted
/// (it names the kek id only).
#[derive(Debug)]
pub enum KekOpener {
    /// A local X25519 private key.
    Local(Opener),
    /// A logged-in PKCS#11 session on a token's private key.
    #[cfg(feature = "pkcs11")]
    Pkcs11(crate::pkcs11::Pkcs11Opener),
    /// A KMS key, used with the worker's credentials.
    #[cfg(feature = "awskms")]
    AwsKms(crate::awskms::AwsKmsKek),
}

impl KekOpener {
    /// The kek id this opener holds.
    pub fn kek_id(&self) -> &str {
        match self {
            KekOpener::Local(o) => o.kek_id(),
            #[cfg(feature = "pkcs11")]
            KekOpener::Pkcs11(o) => o.kek_id(),
            #[cfg(feature = "awskms")]
            KekOpener::AwsKms(o) => o.kek_id(),
        }
    }

    async fn open_into(&self, binding: &Binding<'_>, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        match self {
            KekOpener::Local(o) => o.open_into(binding, blob, out),
            #[cfg(feature = "pkcs11")]
            KekOpener::Pkcs11(o) => o.open_into(binding, blob, out),
            #[cfg(feature = "awskms")]
            KekOpener::AwsKms(o) => o.open_into(binding, blob, out).await,
        }
    }

    /// Seals to this same version (what a re-wrap to it writes).
    async fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        match self {
            KekOpener::Local(o) => o.sealer().seal(binding, plaintext),
            #[cfg(feature = "pkcs11")]
            KekOpener::Pkcs11(o) => o.seal(binding, plaintext),
            #[cfg(feature = "awskms")]
            KekOpener::AwsKms(o) => o.seal(binding, plaintext).await,
        }
    }
}

/// The seal-only half of one KEK version, whichever backend holds it: all the gateway has.
/// It has no way to open anything. Built by [`crate::KekBackend::sealer`].
#[derive(Debug)]
pub enum KekSealer {
    /// A local X25519 public key.
    Local(Sealer),
    /// A PKCS#11 public key, used through a session that never logs in.
    #[cfg(feature = "pkcs11")]
    Pkcs11(crate::pkcs11::Pkcs11Sealer),
    /// A KMS key, used with the gateway's (encrypt-only) credentials.
    #[cfg(feature = "awskms")]
    AwsKms(crate::awskms::AwsKmsKek),
}

impl KekSealer {
    /// The kek id new blobs name.
    pub fn kek_id(&self) -> &str {
        match self {
            KekSealer::Local(s) => s.kek_id(),
            #[cfg(feature = "pkcs11")]
            KekSealer::Pkcs11(s) => s.kek_id(),
            #[cfg(feature = "awskms")]
            KekSealer::AwsKms(s) => s.kek_id(),
        }
    }

    /// The backend holding this version: `local`, `pkcs11` or `awskms` (what `/readyz`
    /// names).
    pub fn backend(&self) -> &'static str {
        match self {
            KekSealer::Local(_) => crate::spec::LOCAL,
            #[cfg(feature = "pkcs11")]
            KekSealer::Pkcs11(_) => crate::spec::PKCS11,
            #[cfg(feature = "awskms")]
            KekSealer::AwsKms(_) => crate::spec::AWSKMS,
        }
    }

    /// Seals `plaintext` for `binding` under a fresh DEK: local and PKCS#11 inline, KMS
    /// awaited (one `Encrypt`, bounded by the KMS call timeout).
    pub async fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        match self {
            KekSealer::Local(s) => s.seal(binding, plaintext),
            #[cfg(feature = "pkcs11")]
            KekSealer::Pkcs11(s) => s.seal(binding, plaintext),
            #[cfg(feature = "awskms")]
            KekSealer::AwsKms(s) => s.seal(binding, plaintext).await,
        }
    }
}

/// The opening halves of every live KEK version. Not `Clone`; `Debug` names only kek ids.
pub struct Keyring {
    openers: Vec<KekOpener>,
}

impl Keyring {
    /// A keyring of local `openers` (kek ids must be distinct; a duplicate is refused).
    pub fn new(openers: Vec<Opener>) -> Result<Keyring, CryptoError> {
        Keyring::of(openers.into_iter().map(KekOpener::Local).collect())
    }

    /// A keyring of openers of any backend (kek ids must be distinct).
    pub fn of(openers: Vec<KekOpener>) -> Result<Keyring, CryptoError> {
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
        self.openers.iter().map(KekOpener::kek_id).collect()
    }

    /// Whether this keyring can open blobs sealed to `kek_id`.
    pub fn holds(&self, kek_id: &str) -> bool {
        self.opener(kek_id).is_some()
    }

    fn opener(&self, kek_id: &str) -> Option<&KekOpener> {
        self.openers.iter().find(|o| o.kek_id() == kek_id)
    }

    fn opener_for(&self, blob: &SealedKey) -> Result<&KekOpener, CryptoError> {
        let kek_id = blob.kek_id()?;
        self.opener(&kek_id).ok_or(CryptoError::KekUnavailable { kek_id })
    }

    /// Opens `blob` into `out` with the opener of the version it names (see
    /// [`Opener::open_into`]) and returns the plaintext's length.
    pub async fn open_into(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        self.opener_for(blob)?.open_into(binding, blob, out).await
    }

    /// Re-seals `blob` (for the same `binding`) to KEK `target`, using `scratch` for the
    /// plaintext (wiped before returning, on success and failure). Answers the blob itself,
    /// unchanged, when it is already under `target`.
    pub async fn rewrap(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        target: &str,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let to = self.opener(target).ok_or_else(|| CryptoError::KekUnavailable {
            kek_id: target.to_owned(),
        })?;
        if blob.kek_id()? == target {
            // Still authenticate it: a re-wrap must never bless a blob that does not open.
            let result = to.open_into(binding, blob, scratch).await;
            scratch.zeroize();
            result?;
            return Ok(blob.clone());
        }
        let result = self.rewrap_inner(binding, blob, to, scratch).await;
        scratch.zeroize();
        result
    }

    async fn rewrap_inner(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        to: &KekOpener,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let n = self.opener_for(blob)?.open_into(binding, blob, scratch).await?;
        let (plaintext, check) = scratch.split_at_mut_checked(n).ok_or(CryptoError::Malformed)?;
        let fresh = to.seal(binding, plaintext).await?;
        // The new blob must open, under the target, to the very same bytes.
        let m = to.open_into(binding, &fresh, check).await?;
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
