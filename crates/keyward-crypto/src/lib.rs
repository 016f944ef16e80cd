//! keyward envelope encryption.
//!
//! # What this crate owns
//! - The sealed-key blob formats and the two halves of envelope encryption. Every format
//!   shares one header and data part (`header.rs`, which also holds the layout
//!   table); v1 (local: [`Sealer`], the KEK public key, can seal and cannot open; [`Opener`],
//!   the private key) adds an HPKE-wrapped DEK, v2 (PKCS#11) and v3 (AWS KMS) a
//!   backend-wrapped one.
//! - The KEK backends: [`local`] (versioned X25519 key pairs in files under the data
//!   directory, with a primary version, rotation and retirement), and behind cargo features
//!   `pkcs11` and `awskms` an HSM token and AWS KMS. [`KekSpec`] is the parsed `KEYWARD_KEK`
//!   value and [`KekBackend`] the one handle on the configured backend: the gateway's
//!   [`KekSealer`], the worker's [`Keyring`] (every live version's opener; picks one by the
//!   blob's kek id; re-wraps), the primary version, rotate, promote, retire, status.
//! - [`SecretBytes`], the zeroize-on-drop, redacted holder of an opened key.
//! - [`AuditChainKey`], the HMAC key that chains audit events (kept in a file, never in the
//!   database), and [`CheckpointSigningKey`], the Ed25519 key that signs audit checkpoints
//!   (a file too).
//!
//! # What it must never do
//! - Never log. This crate has no logging dependency and prints nothing; errors carry no key,
//!   DEK or plaintext bytes, only lengths, kek ids, versions and paths.
//! - Never hand plaintext to anyone but the caller of an open, and never cache plaintext keys
//!   or DEKs: each open unwraps the DEK into a zeroizing buffer and drops it before
//!   returning.
//! - The gateway must only ever hold a [`KekSealer`] ([`KekBackend::sealer`]: a public key,
//!   a token session that never logs in, or encrypt-only KMS credentials). Only the isolated
//!   worker loads an [`Opener`] or a [`Keyring`] ([`KekBackend::keyring`]).
//!
//! # Format v1 (local)
//! The layout of every format is in `header.rs`.
//! - Every seal draws a fresh random 256-bit DEK and a fresh random nonce from the OS RNG.
//! - The DEK is wrapped with HPKE (RFC 9180) base mode, single shot, suite
//!   DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + ChaCha20Poly1305, to the KEK public key,
//!   with `info = b"keyward dek v1"` and `aad = binding`.
//! - The plaintext is sealed with ChaCha20Poly1305 under the DEK with
//!   `aad = header (magic through kek id) || binding`.
//! - `binding` is [`Binding::canonical_bytes`]: account id, provider, key id, each as a
//!   big-endian `u64` length followed by its UTF-8 bytes.
//!
//! A v1 blob is `113 + n + m` bytes for an `n`-byte kek id and an `m`-byte plaintext: 220 bytes
//! for a 100-byte plaintext under `local-1`. Plaintexts are limited to
//! [`MAX_PLAINTEXT_LEN`] bytes.
//!
//! Opening checks, in order: magic and header lengths ([`CryptoError::Malformed`]), version
//! ([`CryptoError::UnsupportedVersion`]), kek id equal to the opener's
//! ([`CryptoError::KekMismatch`]; a [`Keyring`] holding no such version answers
//! [`CryptoError::KekUnavailable`]), body lengths ([`CryptoError::Malformed`]), then the DEK
//! unwrap and the plaintext open ([`CryptoError::OpenFailed`], one message whatever failed).
//! Bytes appended to a blob lengthen the ciphertext field, so they surface as `OpenFailed`.

#![deny(clippy::indexing_slicing)]

mod audit;
#[cfg(feature = "awskms")]
pub mod awskms;
mod backend;
mod blob;
mod checkpoint;
mod envelope;
mod error;
mod fsutil;
mod header;
mod hpke_open;
mod keyring;
pub mod local;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
mod secret;
mod spec;
mod wrapped;

pub use audit::{AuditChainKey, AUDIT_KEY_FILE, GENESIS_MAC};
pub use backend::{
    KekBackend, Retired, Rotated, ScheduledDeletion, VersionFact, VersionInfo, VersionList, WorkerKeyring,
};
pub use blob::{Binding, SealedKey};
pub use checkpoint::{
    verify_checkpoint_signature, CheckpointSigningKey, CHECKPOINT_KEY_FILE, CHECKPOINT_PUBLIC_KEY_LEN,
    CHECKPOINT_SIGNATURE_LEN,
};
pub use envelope::{Opener, Sealer, BLOB_VERSION, HPKE_INFO};
pub use error::CryptoError;
pub use header::{BLOB_MAGIC, MAX_PLAINTEXT_LEN};
pub use keyring::{KekOpener, KekSealer, Keyring};
pub use secret::SecretBytes;
pub use spec::KekSpec;

#[cfg(test)]
mod tests {
    /// The KEK private key is read from its file into an `x25519_dalek::StaticSecret` (the
    /// hpke crate's type) before [`crate::Opener`] hands it to aws-lc; this fails to compile
    /// if x25519-dalek's `zeroize` feature (which derives both `Zeroize` and a zeroizing
    /// `Drop` for it) ever gets lost.
    #[test]
    fn kek_private_key_is_zeroized_on_drop() {
        fn assert_zeroize<T: zeroize::Zeroize>() {}
        assert_zeroize::<x25519_dalek::StaticSecret>();
    }
}
