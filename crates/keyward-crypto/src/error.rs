//! The one error type of this crate.
//!
//! No variant carries key bytes, DEK bytes or plaintext: only lengths, kek ids, version numbers,
//! paths and I/O reasons. Opening failures are deliberately coarse (`Malformed`, `OpenFailed`):
//! they never say which byte or which check failed inside the authenticated part.

use std::path::PathBuf;

/// Everything that can go wrong while sealing, opening or handling key files.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum CryptoError {
    /// The blob is not a well-formed sealed key: bad magic, truncated, too long, a garbled
    /// kek id. One error for all of these on purpose.
    #[error("sealed key blob is malformed")]
    Malformed,

    /// The blob has a format version this build does not know.
    #[error("sealed key blob has unsupported format version {0}")]
    UnsupportedVersion(u8),

    /// The blob was sealed to a different KEK than the one this opener holds.
    #[error("sealed key blob was sealed to KEK {found:?}, but this opener holds KEK {expected:?}")]
    KekMismatch {
        /// The kek id of the opener (or of the public key file, for a key pair mismatch).
        expected: String,
        /// The kek id found in the blob (or derived from the private key file).
        found: String,
    },

    /// The blob was sealed to a KEK version this holder does not have: retired (destroyed),
    /// or never installed on this node. Nothing can open it here.
    #[error("sealed key blob was sealed to KEK {kek_id:?}, which is not available here (retired or not installed)")]
    KekUnavailable {
        /// The kek id found in the blob.
        kek_id: String,
    },

    /// A KEK backend outside this process (an HSM through PKCS#11) failed or refused.
    #[error("KEK backend {backend}: {reason}")]
    Backend {
        /// Which backend (`pkcs11`).
        backend: &'static str,
        /// What it said (never a PIN or key bytes).
        reason: String,
    },

    /// `KEYWARD_KEK` names a backend this build does not have.
    #[error("unknown backend {name:?}: this build supports {supported}")]
    UnknownKekBackend {
        /// What the value names (the part before any `:`).
        name: String,
        /// The forms this build accepts, quoted (`"local", "pkcs11:…"`).
        supported: String,
    },

    /// Authentication failed: wrong binding (account, provider, key id), wrong key, or a
    /// tampered blob. No detail on purpose.
    #[error("sealed key blob failed to open (wrong binding, wrong key or tampered data)")]
    OpenFailed,

    /// Sealing failed inside the cryptographic primitives (should not happen).
    #[error("sealing failed")]
    SealFailed,

    /// The plaintext handed to `seal` is longer than the format allows.
    #[error("plaintext of {len} bytes is longer than the {max}-byte limit for a sealed key")]
    PlaintextTooLarge {
        /// Length of the plaintext given.
        len: usize,
        /// The limit ([`crate::MAX_PLAINTEXT_LEN`]).
        max: usize,
    },

    /// A KEK file (or its directory) could not be created, read or parsed.
    #[error("KEK file {}: {reason}", path.display())]
    KekFile {
        /// The file or directory concerned.
        path: PathBuf,
        /// What went wrong (an I/O error message or a format problem; never key bytes).
        reason: String,
    },

    /// The audit chain key file could not be created, read or parsed.
    #[error("audit chain key file {}: {reason}", path.display())]
    AuditKeyFile {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong (an I/O error message or a format problem; never key bytes).
        reason: String,
    },

    /// The audit checkpoint signing key file could not be created, read or parsed.
    #[error("audit checkpoint key file {}: {reason}", path.display())]
    CheckpointKeyFile {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong (an I/O error message or a format problem; never key bytes).
        reason: String,
    },

    /// A secret key file, or the directory holding KEK files, is accessible by group or others.
    #[error(
        "{} is accessible by group or others; restrict it to its owner \
         (chmod 600 for a key file, chmod 700 for the kek directory)",
        path.display()
    )]
    Permissions {
        /// The file or directory with too-open permissions.
        path: PathBuf,
    },
}
