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
    /// A KMS key, used with the worker's credentials (asynchronous: see
    /// [`Keyring::open_into_async`]).
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

    fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        match self {
            KekOpener::Local(o) => o.open_into(binding, blob, out),
            #[cfg(feature = "pkcs11")]
            KekOpener::Pkcs11(o) => o.open_into(binding, blob, out),
            #[cfg(feature = "awskms")]
            KekOpener::AwsKms(_) => Err(async_only()),
        }
    }

    /// [`KekOpener::open_into`] for every backend: the synchronous ones inline, KMS awaited.
    async fn open_into_async(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        #[cfg(feature = "awskms")]
        if let KekOpener::AwsKms(o) = self {
            return o.open_into(binding, blob, out).await;
        }
        self.open_into(binding, blob, out)
    }

    /// Seals to this same version (what a re-wrap to it writes).
    fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        match self {
            KekOpener::Local(o) => o.sealer().seal(binding, plaintext),
            #[cfg(feature = "pkcs11")]
            KekOpener::Pkcs11(o) => o.seal(binding, plaintext),
            #[cfg(feature = "awskms")]
            KekOpener::AwsKms(_) => Err(async_only()),
        }
    }

    async fn seal_async(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        #[cfg(feature = "awskms")]
        if let KekOpener::AwsKms(o) = self {
            return o.seal(binding, plaintext).await;
        }
        self.seal(binding, plaintext)
    }
}

/// What a synchronous call answers for a backend that is only reachable asynchronously.
#[cfg(feature = "awskms")]
fn async_only() -> CryptoError {
    CryptoError::Backend {
        backend: "awskms",
        reason: "KMS is called asynchronously: use the *_async form".to_owned(),
    }
}

/// The seal-only half of the primary KEK version, whichever backend holds it: all the
/// gateway has.
#[derive(Debug)]
pub enum KekSealer {
    /// A local X25519 public key.
    Local(Sealer),
    /// A PKCS#11 public key, used through a session that never logs in.
    #[cfg(feature = "pkcs11")]
    Pkcs11(crate::pkcs11::Pkcs11Sealer),
    /// A KMS key, used with the gateway's (encrypt-only) credentials; asynchronous (see
    /// [`KekSealer::seal_async`]).
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
            KekSealer::Local(_) => "local",
            #[cfg(feature = "pkcs11")]
            KekSealer::Pkcs11(_) => "pkcs11",
            #[cfg(feature = "awskms")]
            KekSealer::AwsKms(_) => "awskms",
        }
    }

    /// Seals `plaintext` for `binding` under a fresh DEK. Synchronous backends only: KMS
    /// answers a backend error here (use [`KekSealer::seal_async`]).
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        match self {
            KekSealer::Local(s) => s.seal(binding, plaintext),
            #[cfg(feature = "pkcs11")]
            KekSealer::Pkcs11(s) => s.seal(binding, plaintext),
            #[cfg(feature = "awskms")]
            KekSealer::AwsKms(_) => Err(async_only()),
        }
    }

    /// [`KekSealer::seal`] for every backend: local and PKCS#11 inline, KMS awaited (one
    /// `Encrypt`, bounded by [`crate::awskms::CALL_TIMEOUT`] when the feature is on).
    pub async fn seal_async(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        #[cfg(feature = "awskms")]
        if let KekSealer::AwsKms(s) = self {
            return s.seal(binding, plaintext).await;
        }
        self.seal(binding, plaintext)
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

    /// [`Opener::open_into`] with the opener of the blob's KEK version.
    pub fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        self.opener_for(blob)?.open_into(binding, blob, out)
    }

    /// [`Keyring::open_into`] for every backend (KMS included: one `Decrypt`).
    pub async fn open_into_async(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        self.opener_for(blob)?.open_into_async(binding, blob, out).await
    }

    /// [`Keyring::rewrap`] for every backend (KMS included).
    pub async fn rewrap_async(
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
            let result = to.open_into_async(binding, blob, scratch).await;
            scratch.zeroize();
            result?;
            return Ok(blob.clone());
        }
        let result = self.rewrap_inner_async(binding, blob, to, scratch).await;
        scratch.zeroize();
        result
    }

    async fn rewrap_inner_async(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        to: &KekOpener,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let n = self.opener_for(blob)?.open_into_async(binding, blob, scratch).await?;
        let (plaintext, check) = scratch.split_at_mut_checked(n).ok_or(CryptoError::Malformed)?;
        let fresh = to.seal_async(binding, plaintext).await?;
        let m = to.open_into_async(binding, &fresh, check).await?;
        let same = m == n && check.get(..m).is_some_and(|c| c == &*plaintext);
        if !same {
            return Err(CryptoError::SealFailed);
        }
        Ok(fresh)
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
        to: &KekOpener,
        scratch: &mut [u8],
    ) -> Result<SealedKey, CryptoError> {
        let n = self.opener_for(blob)?.open_into(binding, blob, scratch)?;
        let (plaintext, check) = scratch.split_at_mut_checked(n).ok_or(CryptoError::Malformed)?;
        let fresh = to.seal(binding, plaintext)?;
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
