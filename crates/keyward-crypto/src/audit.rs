//! The audit chain MAC key: HMAC-SHA256 over each audit event and the previous event's MAC.
//!
//! The key lives in `<data_dir>/audit-chain.key` (32 bytes, mode 0600), never in the database,
//! so someone who can write the database cannot forge a consistent chain.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::fsutil::{self, FileKind};
use crate::CryptoError;

/// The `prev_mac` of the first event of a chain.
pub const GENESIS_MAC: [u8; 32] = [0; 32];

/// Domain separation label, the first bytes of every MAC input.
const AUDIT_LABEL: &[u8] = b"keyward-audit-v1";
/// Name of the key file inside the data directory.
pub const AUDIT_KEY_FILE: &str = "audit-chain.key";

const KEY_LEN: usize = 32;
/// SHA-256 block size: HMAC's native key length.
const HMAC_BLOCK_LEN: usize = 64;
const KIND: FileKind = FileKind::AuditKey;

/// The HMAC-SHA256 key that chains audit events. `Debug` is redacted; zeroized on drop.
pub struct AuditChainKey(Zeroizing<[u8; KEY_LEN]>);

impl AuditChainKey {
    /// `<data_dir>/audit-chain.key`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(AUDIT_KEY_FILE)
    }

    /// Creates the key file (random 32 bytes, mode 0600, atomically) if absent. Leaves an
    /// existing file alone, but errors if it is unreadable, the wrong size or accessible by
    /// group or others.
    pub fn ensure(data_dir: &Path) -> Result<(), CryptoError> {
        fsutil::create_dir_0700(data_dir, KIND)?;
        let path = Self::path(data_dir);
        if fsutil::read_secret::<KEY_LEN>(&path, KIND)?.is_some() {
            return Ok(());
        }
        let mut fresh = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(fresh.as_mut());
        // If another process created it first, theirs is kept; check it like any other.
        fsutil::create_new_atomic(&path, fresh.as_ref(), 0o600, KIND)?;
        Self::load(data_dir).map(drop)
    }

    /// Loads the key file (which must be 32 bytes with no group/other permission bits).
    pub fn load(data_dir: &Path) -> Result<Self, CryptoError> {
        let path = Self::path(data_dir);
        fsutil::read_secret::<KEY_LEN>(&path, KIND)?
            .map(Self)
            .ok_or_else(|| KIND.err(&path, "not found (run AuditChainKey::ensure first)"))
    }

    /// A key from fixed bytes, for tests in other crates.
    pub fn from_bytes_for_tests(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn mac(&self, prev_mac: &[u8; 32], canonical_event: &[u8]) -> Hmac<Sha256> {
        // HMAC zero-pads a short key to the block size, so keying with the padded 64-byte
        // block is exactly HMAC with the 32-byte key, and this constructor cannot fail.
        let mut block = Zeroizing::new([0u8; HMAC_BLOCK_LEN]);
        if let Some(head) = block.get_mut(..KEY_LEN) {
            head.copy_from_slice(self.0.as_ref());
        }
        let mut mac = <Hmac<Sha256> as Mac>::new(block.as_ref().into());
        mac.update(AUDIT_LABEL);
        mac.update(prev_mac);
        mac.update(canonical_event);
        mac
    }

    /// `HMAC-SHA256(key, "keyward-audit-v1" || prev_mac || canonical_event)`.
    pub fn chain(&self, prev_mac: &[u8; 32], canonical_event: &[u8]) -> [u8; 32] {
        self.mac(prev_mac, canonical_event).finalize().into_bytes().into()
    }

    /// Whether `mac` is the chain MAC of `canonical_event` after `prev_mac`. Constant-time
    /// comparison; a `mac` of the wrong length is rejected.
    pub fn verify(&self, prev_mac: &[u8; 32], canonical_event: &[u8], mac: &[u8]) -> bool {
        self.mac(prev_mac, canonical_event).verify_slice(mac).is_ok()
    }
}

impl fmt::Debug for AuditChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditChainKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::digest::KeyInit;

    #[test]
    fn padded_block_key_equals_plain_hmac() {
        let key = AuditChainKey::from_bytes_for_tests([7; 32]);
        let mut reference = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7; 32]).unwrap();
        reference.update(b"keyward-audit-v1");
        reference.update(&[1; 32]);
        reference.update(b"event");
        let expected: [u8; 32] = reference.finalize().into_bytes().into();
        assert_eq!(key.chain(&[1; 32], b"event"), expected);
    }
}
