//! [`Binding`] (what a blob is bound to) and [`SealedKey`] (the opaque blob as stored),
//! whatever the format. The header is read by [`crate::header`].

use std::fmt;

use crate::{header, CryptoError};

/// What a blob is bound to. The AEAD associated data and the DEK wrap (v1: the HPKE aad;
/// AWS KMS: the encryption context) include all three fields, each length-prefixed, so a
/// blob copied to another account, provider or key row fails to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    /// The owning account.
    pub account_id: &'a str,
    /// The provider the key is for (e.g. `anthropic`).
    pub provider: &'a str,
    /// The key row id.
    pub key_id: &'a str,
}

impl Binding<'_> {
    /// The canonical byte encoding: for each of account id, provider, key id in that order,
    /// its length as a big-endian `u64` followed by its UTF-8 bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let fields = [self.account_id, self.provider, self.key_id];
        let len: usize = fields.iter().map(|f| 8 + f.len()).sum();
        let mut out = Vec::with_capacity(len);
        for field in fields {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

/// An opaque sealed-key blob, as stored in the database. `Debug` prints only its length and
/// kek id, never its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey(Vec<u8>);

impl SealedKey {
    /// Wraps bytes read back from storage. No validation here: opening does it.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The blob bytes, to store.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Consumes the blob, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The id of the KEK this blob was sealed to, parsed from the header. Every known format
    /// version is read whatever features this build has (v1: local; v2: PKCS#11; v3: AWS
    /// KMS), so a gateway built without a backend still counts and lists blobs sealed by it.
    /// An unknown version is [`CryptoError::UnsupportedVersion`].
    pub fn kek_id(&self) -> Result<String, CryptoError> {
        header::kek_id_of(&self.0).map(str::to_owned)
    }
}

impl fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SealedKey");
        d.field("len", &self.0.len());
        match self.kek_id() {
            Ok(id) => d.field("kek_id", &id),
            Err(_) => d.field("kek_id", &"<malformed>"),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_encoding_is_unambiguous() {
        let a = Binding {
            account_id: "ab",
            provider: "c",
            key_id: "",
        };
        let b = Binding {
            account_id: "a",
            provider: "bc",
            key_id: "",
        };
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a.canonical_bytes().len(), 3 * 8 + 3);
    }
}
