//! A token that stops answering is the backend failing (`CryptoError::Backend`: retryable,
//! `503 kek_unavailable` to a caller), never a blob that "failed to open"; a tampered
//! wrapped key is still `OpenFailed`. Its own binary: once SoftHSM2's token directory has
//! gone, the module stays broken for the rest of the process.
#![cfg(feature = "pkcs11")]

#[cfg(test)]
mod support;

use keyward_crypto::pkcs11::Pkcs11Kek;
use keyward_crypto::{Binding, CryptoError, SealedKey};
use support::*;
use tempfile::TempDir;

const BINDING: Binding<'static> = Binding {
    account_id: "acct_1",
    provider: "openai",
    key_id: "key_1",
};

#[test]
fn a_token_that_goes_away_is_a_backend_failure_not_a_bad_blob() {
    let dir = TempDir::new().unwrap();
    let Some(config) = token(dir.path()) else { return };
    let kek = Pkcs11Kek::connect(&config).unwrap();
    let v = kek.rotate().unwrap();
    let sealer = kek.sealer(v).unwrap();
    let opener = kek.opener(v).unwrap();
    let blob = sealer.seal(&BINDING, b"sk-live-key").unwrap();
    let mut out = [0u8; 64];
    assert_eq!(opener.open_into(&BINDING, &blob, &mut out).unwrap(), 11);

    // The wrapped data key tampered with: the token refuses it, and that is the blob's fault.
    let mut bytes = blob.as_bytes().to_vec();
    let n = usize::from(bytes[4]);
    let wrapped_at = 5 + n + 2; // after magic+version, kek id, and the wrapped key's length
    bytes[wrapped_at + 10] ^= 1;
    let tampered = SealedKey::from_bytes(bytes);
    let opened = opener.open_into(&BINDING, &tampered, &mut out);
    assert!(matches!(opened, Err(CryptoError::OpenFailed)), "{opened:?}");

    // The token's storage goes away under the open sessions.
    let tokens = dir.path().join("tokens");
    std::fs::rename(&tokens, dir.path().join("tokens-gone")).unwrap();
    out = [0xAA; 64];
    let opened = opener.open_into(&BINDING, &blob, &mut out);
    assert!(
        matches!(opened, Err(CryptoError::Backend { backend: "pkcs11", .. })),
        "{opened:?}"
    );
    assert!(out.iter().all(|b| *b == 0), "the buffer is wiped on failure");
    let sealed = sealer.seal(&BINDING, b"sk-other");
    assert!(
        matches!(sealed, Err(CryptoError::Backend { backend: "pkcs11", .. })),
        "{sealed:?}"
    );
}
