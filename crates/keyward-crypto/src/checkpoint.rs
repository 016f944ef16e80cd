//! The audit checkpoint signing key: Ed25519, kept in a file outside the database.
//!
//! `keyward audit checkpoint` signs the heads of every audit chain with it, and
//! `keyward audit verify --checkpoint` checks a checkpoint against the public half derived
//! from the same file. Someone who can write the database can roll a chain back (head and
//! tail together) to an older consistent link, which the HMAC chain alone cannot tell from a
//! chain that never grew; a signed checkpoint kept elsewhere remembers how far each chain
//! had reached, and its signature keeps whoever can write where checkpoints are stored from
//! editing one to match a rolled-back chain.
//!
//! The file holds the 32-byte Ed25519 seed, mode 0600, created atomically on first use.
//! Signing is aws-lc's (already linked for X25519), so this adds no dependency.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::fsutil::{self, FileKind};
use crate::CryptoError;

const SEED_LEN: usize = 32;
/// An Ed25519 public key's length.
pub const CHECKPOINT_PUBLIC_KEY_LEN: usize = 32;
/// An Ed25519 signature's length.
pub const CHECKPOINT_SIGNATURE_LEN: usize = 64;
/// The file's name when it is kept in the data directory (the default).
pub const CHECKPOINT_KEY_FILE: &str = "audit-checkpoint.key";
const KIND: FileKind = FileKind::CheckpointKey;

/// The Ed25519 key that signs audit checkpoints. No `Debug` of the key; the seed is read into
/// a zeroizing buffer and the key pair lives in aws-lc's memory, wiped when freed.
pub struct CheckpointSigningKey {
    pair: Ed25519KeyPair,
    path: PathBuf,
}

impl CheckpointSigningKey {
    /// Loads the key at `path`, creating it first (random seed, mode 0600, atomically; the
    /// directory 0700 if missing) when there is none. Refuses a file of the wrong size or
    /// one readable by group or others.
    pub fn load_or_create(path: &Path) -> Result<CheckpointSigningKey, CryptoError> {
        if fsutil::read_secret::<SEED_LEN>(path, KIND)?.is_none() {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."));
            fsutil::create_dir_0700(dir, KIND)?;
            let mut fresh = Zeroizing::new([0u8; SEED_LEN]);
            OsRng.fill_bytes(fresh.as_mut());
            // Another process may have created it meanwhile: theirs is kept and read below.
            fsutil::create_new_atomic(path, fresh.as_ref(), 0o600, KIND)?;
        }
        Self::load(path)
    }

    /// Loads an existing key (32 bytes, no group/other permission bits).
    pub fn load(path: &Path) -> Result<CheckpointSigningKey, CryptoError> {
        let seed = fsutil::read_secret::<SEED_LEN>(path, KIND)?.ok_or_else(|| KIND.err(path, "not found"))?;
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|_| KIND.err(path, "not an Ed25519 seed"))?;
        Ok(CheckpointSigningKey {
            pair,
            path: path.to_path_buf(),
        })
    }

    /// The public half, which verifies this key's signatures.
    pub fn public_key(&self) -> [u8; CHECKPOINT_PUBLIC_KEY_LEN] {
        let mut out = [0u8; CHECKPOINT_PUBLIC_KEY_LEN];
        let public = self.pair.public_key().as_ref();
        if public.len() == CHECKPOINT_PUBLIC_KEY_LEN {
            out.copy_from_slice(public);
        }
        out
    }

    /// Signs `message` (Ed25519, deterministic).
    pub fn sign(&self, message: &[u8]) -> [u8; CHECKPOINT_SIGNATURE_LEN] {
        let mut out = [0u8; CHECKPOINT_SIGNATURE_LEN];
        let sig = self.pair.sign(message);
        if sig.as_ref().len() == CHECKPOINT_SIGNATURE_LEN {
            out.copy_from_slice(sig.as_ref());
        }
        out
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        verify_checkpoint_signature(&self.public_key(), message, signature)
    }
}

impl fmt::Debug for CheckpointSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CheckpointSigningKey({}, [REDACTED])", self.path.display())
    }
}

/// Whether `signature` is an Ed25519 signature of `message` by `public_key`.
pub fn verify_checkpoint_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_0600_and_signatures_verify_only_for_their_message_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cp.key");
        let key = CheckpointSigningKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = CheckpointSigningKey::load_or_create(&path).unwrap();
        assert_eq!(key.public_key(), again.public_key(), "the file is reused, not replaced");
        let sig = key.sign(b"heads");
        assert!(key.verifies(b"heads", &sig));
        assert!(!key.verifies(b"heads!", &sig));
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!key.verifies(b"heads", &bad));
        let other = CheckpointSigningKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(!other.verifies(b"heads", &sig));
        assert!(!format!("{key:?}").contains(&hex_of(&key.public_key())));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            CheckpointSigningKey::load(&path).is_err(),
            "a key readable by others is refused"
        );
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
