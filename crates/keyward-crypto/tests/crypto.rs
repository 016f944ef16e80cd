//! keyward-crypto tests: envelope round trips and tampering, the local KEK backend, redaction,
//! the audit chain MAC. One integration test binary for the crate.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keyward_crypto::{local, AuditChainKey, Binding, CryptoError, Opener, SealedKey, Sealer, SecretBytes, GENESIS_MAC};
use proptest::prelude::*;
use tempfile::TempDir;

const BINDING: Binding<'static> = Binding {
    account_id: "acct_123",
    provider: "anthropic",
    key_id: "key_456",
};

/// Test helpers. In a `#[cfg(test)]` module so clippy's allow-unwrap/panic-in-tests applies
/// to them as it does to the `#[test]` functions.
#[cfg(test)]
mod support {
    use super::*;

    pub fn keypair() -> (TempDir, Sealer, Opener) {
        let dir = TempDir::new().unwrap();
        local::ensure_kek(dir.path()).unwrap();
        let sealer = local::load_sealer(dir.path()).unwrap();
        let opener = local::load_opener(dir.path()).unwrap();
        (dir, sealer, opener)
    }

    pub fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    pub fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Asserts `text` shows none of `secret`: not as lower or upper hex, not as a byte list.
    pub fn assert_no_bytes(text: &str, secret: &[u8]) {
        let lower = hex(secret);
        assert!(!text.contains(&lower), "{text} contains hex of secret");
        assert!(!text.contains(&lower.to_uppercase()), "{text} contains HEX of secret");
        assert!(!text.contains(&format!("{secret:?}")), "{text} contains byte list");
        if let Ok(s) = std::str::from_utf8(secret) {
            assert!(!text.contains(s), "{text} contains secret text");
        }
    }

    /// Opening must fail with one of the expected "bad blob" errors.
    pub fn assert_rejected(result: Result<SecretBytes, CryptoError>, what: &str) {
        match result {
            Err(
                CryptoError::Malformed
                | CryptoError::UnsupportedVersion(_)
                | CryptoError::KekMismatch { .. }
                | CryptoError::OpenFailed,
            ) => {}
            Err(other) => panic!("{what}: unexpected error {other:?}"),
            Ok(_) => panic!("{what}: tampered blob opened"),
        }
    }
}
use support::*;

// ---------------------------------------------------------------- envelope

#[test]
fn round_trips() {
    let (_dir, sealer, opener) = keypair();
    for plaintext in [vec![], vec![0x42], (0..=255u8).collect::<Vec<_>>(), vec![7; 100]] {
        let blob = sealer.seal(&BINDING, &plaintext).unwrap();
        assert_eq!(blob.kek_id().unwrap(), "local-1");
        let opened = opener.open(&BINDING, &blob).unwrap();
        assert_eq!(opened.expose(), plaintext.as_slice());
        // Through storage and back.
        let stored = SealedKey::from_bytes(blob.as_bytes().to_vec());
        assert_eq!(stored, blob);
        assert_eq!(opener.open(&BINDING, &stored).unwrap().expose(), plaintext);
    }
}

#[test]
fn blob_size_is_documented_size() {
    let (_dir, sealer, _opener) = keypair();
    for len in [0usize, 1, 100, 256] {
        let blob = sealer.seal(&BINDING, &vec![1; len]).unwrap();
        // 3 magic + 1 version + 1 + 7 "local-1" + 32 enc + 48 wrapped DEK + 12 nonce + 16 tag.
        assert_eq!(blob.as_bytes().len(), 120 + len);
    }
    assert_eq!(sealer.seal(&BINDING, &[1; 100]).unwrap().as_bytes().len(), 220);
}

#[test]
fn two_seals_differ() {
    let (_dir, sealer, opener) = keypair();
    let a = sealer.seal(&BINDING, b"sk-ant-same").unwrap();
    let b = sealer.seal(&BINDING, b"sk-ant-same").unwrap();
    assert_ne!(a, b);
    // Encapsulated key, wrapped DEK, nonce and ciphertext all differ (fresh DEK and nonce).
    let (ha, hb) = (&a.as_bytes()[12..], &b.as_bytes()[12..]);
    assert_ne!(ha[..32], hb[..32], "encapsulated key");
    assert_ne!(ha[32..80], hb[32..80], "wrapped DEK");
    assert_ne!(ha[80..92], hb[80..92], "nonce");
    assert_ne!(ha[92..], hb[92..], "ciphertext");
    assert_eq!(opener.open(&BINDING, &a).unwrap().expose(), b"sk-ant-same");
    assert_eq!(opener.open(&BINDING, &b).unwrap().expose(), b"sk-ant-same");
}

#[test]
fn every_bit_flip_fails() {
    let (_dir, sealer, opener) = keypair();
    let blob = sealer.seal(&BINDING, b"sk-proj-flipme").unwrap();
    let bytes = blob.as_bytes();
    for pos in 0..bytes.len() {
        for bit in 0..8 {
            let mut tampered = bytes.to_vec();
            tampered[pos] ^= 1 << bit;
            let result = opener.open(&BINDING, &SealedKey::from_bytes(tampered));
            assert_rejected(result, &format!("byte {pos} bit {bit}"));
        }
    }
    // The authenticated part gives one answer, whatever byte was hit.
    for pos in 12..bytes.len() {
        let mut tampered = bytes.to_vec();
        tampered[pos] ^= 0x80;
        let err = opener.open(&BINDING, &SealedKey::from_bytes(tampered)).unwrap_err();
        assert!(matches!(err, CryptoError::OpenFailed), "byte {pos}: {err:?}");
    }
}

#[test]
fn every_truncation_and_extension_fails() {
    let (_dir, sealer, opener) = keypair();
    let blob = sealer.seal(&BINDING, b"AIzaSyTruncateMe").unwrap();
    let bytes = blob.as_bytes();
    for len in 0..bytes.len() {
        let result = opener.open(&BINDING, &SealedKey::from_bytes(bytes[..len].to_vec()));
        assert_rejected(result, &format!("truncated to {len}"));
    }
    // Short of the fixed-size fields: Malformed.
    for len in 0..120 {
        let err = opener
            .open(&BINDING, &SealedKey::from_bytes(bytes[..len].to_vec()))
            .unwrap_err();
        assert!(matches!(err, CryptoError::Malformed), "len {len}: {err:?}");
    }
    for extra in [1usize, 16, 1000] {
        let mut long = bytes.to_vec();
        long.extend(std::iter::repeat_n(0u8, extra));
        assert_rejected(
            opener.open(&BINDING, &SealedKey::from_bytes(long)),
            &format!("{extra} bytes appended"),
        );
    }
    // Longer than any blob the format allows: Malformed before any crypto.
    let mut huge = bytes.to_vec();
    huge.resize(bytes.len() + keyward_crypto::MAX_PLAINTEXT_LEN, 0);
    assert!(matches!(
        opener.open(&BINDING, &SealedKey::from_bytes(huge)),
        Err(CryptoError::Malformed)
    ));
}

#[test]
fn other_binding_fails_with_open_failed() {
    let (_dir, sealer, opener) = keypair();
    let blob = sealer.seal(&BINDING, b"sk-ant-bound").unwrap();
    let others = [
        Binding {
            account_id: "acct_999",
            ..BINDING
        },
        Binding {
            provider: "openai",
            ..BINDING
        },
        Binding {
            key_id: "key_457",
            ..BINDING
        },
        // Same bytes, different split between fields.
        Binding {
            account_id: "acct_12",
            provider: "3anthropic",
            key_id: "key_456",
        },
        Binding {
            account_id: "",
            provider: "",
            key_id: "",
        },
    ];
    for other in others {
        let err = opener.open(&other, &blob).unwrap_err();
        assert!(matches!(err, CryptoError::OpenFailed), "{other:?}: {err:?}");
        assert!(!err.to_string().contains("sk-ant-bound"));
    }
}

#[test]
fn unknown_version_is_unsupported() {
    let (_dir, sealer, opener) = keypair();
    let blob = sealer.seal(&BINDING, b"x").unwrap();
    for version in [0u8, 2, 3, 4, 255] {
        let mut bytes = blob.as_bytes().to_vec();
        bytes[3] = version;
        let blob = SealedKey::from_bytes(bytes);
        assert!(matches!(
            opener.open(&BINDING, &blob),
            Err(CryptoError::UnsupportedVersion(v)) if v == version
        ));
        // Versions 2 (PKCS#11) and 3 (AWS KMS) are known formats in every build: their
        // header is read (this relabelled v1 body may or may not fit their layout).
        if version == 2 || version == 3 {
            assert!(!matches!(blob.kek_id(), Err(CryptoError::UnsupportedVersion(_))));
        } else {
            assert!(matches!(
                blob.kek_id(),
                Err(CryptoError::UnsupportedVersion(v)) if v == version
            ));
        }
    }
    // Even with nothing after the version byte.
    assert!(matches!(
        opener.open(&BINDING, &SealedKey::from_bytes(b"KWB\x02".to_vec())),
        Err(CryptoError::UnsupportedVersion(2))
    ));
}

#[test]
fn blob_from_another_kek_fails() {
    let (_dir_a, sealer_a, opener_a) = keypair();
    let (_dir_b, sealer_b, opener_b) = keypair();
    let blob = sealer_a.seal(&BINDING, b"sk-ant-a").unwrap();
    // Same kek id, different key pair.
    assert!(matches!(opener_b.open(&BINDING, &blob), Err(CryptoError::OpenFailed)));
    assert!(matches!(
        opener_a.open(&BINDING, &sealer_b.seal(&BINDING, b"b").unwrap()),
        Err(CryptoError::OpenFailed)
    ));

    // Another KEK version: the kek id differs, so the opener says so before any crypto.
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    local::ensure_kek_version(dir.path(), 2).unwrap();
    let sealer2 = local::load_sealer_version(dir.path(), 2).unwrap();
    let opener1 = local::load_opener(dir.path()).unwrap();
    assert_eq!(sealer2.kek_id(), "local-2");
    let blob2 = sealer2.seal(&BINDING, b"sk").unwrap();
    assert_eq!(blob2.kek_id().unwrap(), "local-2");
    match opener1.open(&BINDING, &blob2) {
        Err(CryptoError::KekMismatch { expected, found }) => {
            assert_eq!(expected, "local-1");
            assert_eq!(found, "local-2");
        }
        other => panic!("expected KekMismatch, got {other:?}"),
    }
    let opener2 = local::load_opener_version(dir.path(), 2).unwrap();
    assert_eq!(opener2.open(&BINDING, &blob2).unwrap().expose(), b"sk");
}

#[test]
fn kek_id_of_garbage_is_malformed() {
    for bytes in [
        &b""[..],
        b"KW",
        b"KWA\x01",
        b"KWB",
        b"KWB\x01",
        b"KWB\x01\x00",
        b"KWB\x01\x07local-",
        b"KWB\x01\x02a\xff",
        b"KWB\x01\x03a b",
    ] {
        let blob = SealedKey::from_bytes(bytes.to_vec());
        assert!(matches!(blob.kek_id(), Err(CryptoError::Malformed)), "{bytes:?}");
        assert!(format!("{blob:?}").contains("malformed"));
    }
    let ok = SealedKey::from_bytes(b"KWB\x01\x07local-1".to_vec());
    assert_eq!(ok.kek_id().unwrap(), "local-1");
}

#[test]
fn plaintext_size_limit() {
    let (_dir, sealer, opener) = keypair();
    let max = keyward_crypto::MAX_PLAINTEXT_LEN;
    let blob = sealer.seal(&BINDING, &vec![3; max]).unwrap();
    assert_eq!(opener.open(&BINDING, &blob).unwrap().len(), max);
    assert!(matches!(
        sealer.seal(&BINDING, &vec![3; max + 1]),
        Err(CryptoError::PlaintextTooLarge { len, max: m }) if len == max + 1 && m == max
    ));
}

#[test]
fn sealer_and_opener_are_thread_safe_and_sealer_clones() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Sealer>();
    assert_send_sync::<Opener>();
    assert_send_sync::<SealedKey>();
    let (_dir, sealer, opener) = keypair();
    let clone = sealer.clone();
    let blob = std::thread::spawn(move || clone.seal(&BINDING, b"threaded").unwrap())
        .join()
        .unwrap();
    assert_eq!(opener.open(&BINDING, &blob).unwrap().expose(), b"threaded");
}

fn binding_strings() -> impl Strategy<Value = (String, String, String)> {
    (any::<String>(), "[a-z]{0,12}", "\\PC{0,24}")
}

proptest! {
    #[test]
    fn prop_round_trip(
        plaintext in proptest::collection::vec(any::<u8>(), 0..512),
        (account, provider, key) in binding_strings(),
    ) {
        let (_dir, sealer, opener) = keypair();
        let binding = Binding { account_id: &account, provider: &provider, key_id: &key };
        let blob = sealer.seal(&binding, &plaintext).unwrap();
        prop_assert_eq!(blob.as_bytes().len(), 120 + plaintext.len());
        let opened = opener.open(&binding, &blob).unwrap();
        prop_assert_eq!(opened.expose(), plaintext.as_slice());
    }

    #[test]
    fn prop_garbage_never_opens(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (_dir, _sealer, opener) = keypair();
        prop_assert!(opener.open(&BINDING, &SealedKey::from_bytes(bytes.clone())).is_err());
        // The same bytes behind a valid header, so they reach the length checks and the crypto.
        let mut framed = b"KWB\x01\x07local-1".to_vec();
        framed.extend_from_slice(&bytes);
        assert_rejected(opener.open(&BINDING, &SealedKey::from_bytes(framed)), "framed garbage");
    }

    #[test]
    fn prop_mutated_blob_never_opens(
        plaintext in proptest::collection::vec(any::<u8>(), 0..64),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
    ) {
        let (_dir, sealer, opener) = keypair();
        let blob = sealer.seal(&BINDING, &plaintext).unwrap();
        let mut bytes = blob.as_bytes().to_vec();
        for (index, xor) in &edits {
            let i = index.index(bytes.len());
            bytes[i] ^= xor;
        }
        // Several XORs on the same byte could cancel out; only a changed blob must fail.
        if bytes != blob.as_bytes() {
            assert_rejected(opener.open(&BINDING, &SealedKey::from_bytes(bytes)), "mutated");
        }
    }
}

// ---------------------------------------------------------------- local KEK backend

#[test]
fn ensure_kek_creates_files_with_owner_only_modes() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let kek_dir = dir.path().join("kek");
    let private = kek_dir.join("local-1.key");
    let public = kek_dir.join("local-1.pub");
    assert_eq!(local::private_key_path(dir.path(), 1), private);
    assert_eq!(local::public_key_path(dir.path(), 1), public);
    assert_eq!(mode(&kek_dir), 0o700);
    assert_eq!(mode(&private), 0o600);
    assert_eq!(fs::read(&private).unwrap().len(), 32);
    assert_eq!(fs::read(&public).unwrap().len(), 32);
    assert_eq!(mode(&public) & 0o022, 0, "public key writable by others");
    // No temp files left behind.
    let mut names: Vec<_> = fs::read_dir(&kek_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["local-1.key", "local-1.pub"]);
}

#[test]
fn ensure_kek_creates_a_missing_data_dir() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("nested").join("data");
    local::ensure_kek(&data).unwrap();
    assert!(local::load_opener(&data).is_ok());
}

#[test]
fn ensure_kek_twice_keeps_the_key() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let private = fs::read(local::private_key_path(dir.path(), 1)).unwrap();
    let public = fs::read(local::public_key_path(dir.path(), 1)).unwrap();
    let blob = local::load_sealer(dir.path()).unwrap().seal(&BINDING, b"kept").unwrap();
    local::ensure_kek(dir.path()).unwrap();
    assert_eq!(fs::read(local::private_key_path(dir.path(), 1)).unwrap(), private);
    assert_eq!(fs::read(local::public_key_path(dir.path(), 1)).unwrap(), public);
    let opener = local::load_opener(dir.path()).unwrap();
    assert_eq!(opener.open(&BINDING, &blob).unwrap().expose(), b"kept");
}

#[test]
fn concurrent_ensure_kek_agrees_on_one_pair() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_path_buf();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || local::ensure_kek(&path))
        })
        .collect();
    for handle in handles {
        handle.join().unwrap().unwrap();
    }
    let blob = local::load_sealer(&path).unwrap().seal(&BINDING, b"race").unwrap();
    let opener = local::load_opener(&path).unwrap();
    assert_eq!(opener.open(&BINDING, &blob).unwrap().expose(), b"race");
    assert_eq!(fs::read_dir(path.join("kek")).unwrap().count(), 2);
}

#[test]
fn load_sealer_never_reads_the_private_key() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let private = local::private_key_path(dir.path(), 1);
    let saved = fs::read(&private).unwrap();
    fs::remove_file(&private).unwrap();
    let sealer = local::load_sealer(dir.path()).unwrap();
    assert_eq!(sealer.kek_id(), "local-1");
    let blob = sealer.seal(&BINDING, b"sealed without the private key").unwrap();
    // Without the private key nothing opens, and ensure_kek refuses to make a new pair.
    assert!(matches!(
        local::load_opener(dir.path()),
        Err(CryptoError::KekFile { .. })
    ));
    assert!(matches!(
        local::ensure_kek(dir.path()),
        Err(CryptoError::KekFile { .. })
    ));
    // Put it back: the blob opens.
    fs::write(&private, saved).unwrap();
    set_mode(&private, 0o600);
    let opener = local::load_opener(dir.path()).unwrap();
    assert_eq!(
        opener.open(&BINDING, &blob).unwrap().expose(),
        b"sealed without the private key"
    );
}

#[test]
fn loose_permissions_are_refused() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let private = local::private_key_path(dir.path(), 1);
    for loose in [0o644, 0o640, 0o604, 0o660] {
        set_mode(&private, loose);
        match local::load_opener(dir.path()) {
            Err(CryptoError::Permissions { path }) => assert_eq!(path, private),
            other => panic!("mode {loose:o}: expected Permissions, got {other:?}"),
        }
        assert!(matches!(
            local::ensure_kek(dir.path()),
            Err(CryptoError::Permissions { .. })
        ));
    }
    set_mode(&private, 0o400);
    assert!(local::load_opener(dir.path()).is_ok());
    set_mode(&private, 0o600);

    let kek_dir = dir.path().join("kek");
    // Root-owned and writable by root alone is the two-user layout (the gateway and the
    // worker each list it; each file's owner and mode guard it); anyone else's dir must be
    // private. Writable by group or others is refused either way.
    let as_root = {
        use std::os::unix::fs::MetadataExt;
        // The test's own temp dir is owned by the user the test runs as.
        dir.path().metadata().unwrap().uid() == 0
    };
    set_mode(&kek_dir, 0o755);
    if as_root {
        local::ensure_kek(dir.path()).unwrap();
    } else {
        assert!(matches!(
            local::ensure_kek(dir.path()),
            Err(CryptoError::Permissions { path }) if path == kek_dir
        ));
    }
    for loose in [0o775, 0o757] {
        set_mode(&kek_dir, loose);
        assert!(
            matches!(
                local::ensure_kek(dir.path()),
                Err(CryptoError::Permissions { ref path }) if *path == kek_dir
            ),
            "kek dir mode {loose:o}"
        );
    }
    set_mode(&kek_dir, 0o700);
    local::ensure_kek(dir.path()).unwrap();
}

#[test]
fn mismatched_pair_is_refused() {
    let dir_a = TempDir::new().unwrap();
    let dir_b = TempDir::new().unwrap();
    local::ensure_kek(dir_a.path()).unwrap();
    local::ensure_kek(dir_b.path()).unwrap();
    let public_a = local::public_key_path(dir_a.path(), 1);
    fs::copy(local::public_key_path(dir_b.path(), 1), &public_a).unwrap();
    assert!(matches!(
        local::load_opener(dir_a.path()),
        Err(CryptoError::KekFile { path, .. }) if path == public_a
    ));
    // ensure_kek (run by the gateway) leaves an existing pair unread, so the mismatch is
    // caught where the private half is read: load_opener, in the worker (above).
    local::ensure_kek(dir_a.path()).unwrap();
}

#[test]
fn damaged_key_files_are_refused() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let private = local::private_key_path(dir.path(), 1);
    let public = local::public_key_path(dir.path(), 1);
    let saved = fs::read(&public).unwrap();
    fs::write(&public, &saved[..31]).unwrap();
    assert!(matches!(
        local::load_sealer(dir.path()),
        Err(CryptoError::KekFile { .. })
    ));
    fs::write(&public, saved).unwrap();
    fs::write(&private, [1u8; 33]).unwrap();
    let err = local::load_opener(dir.path()).unwrap_err();
    assert!(matches!(err, CryptoError::KekFile { .. }), "{err:?}");
    assert!(!err.to_string().contains(&hex(&[1u8; 33])));
    assert!(matches!(
        local::ensure_kek_version(dir.path(), 0),
        Err(CryptoError::KekFile { .. })
    ));
    let empty = TempDir::new().unwrap();
    assert!(matches!(
        local::load_sealer(empty.path()),
        Err(CryptoError::KekFile { .. })
    ));
}

// ---------------------------------------------------------------- redaction

#[test]
fn debug_output_shows_no_key_bytes() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let private = fs::read(local::private_key_path(dir.path(), 1)).unwrap();
    let opener = local::load_opener(dir.path()).unwrap();
    let sealer = local::load_sealer(dir.path()).unwrap();

    let text = format!("{opener:?} {opener:#?}");
    assert!(text.contains("REDACTED"), "{text}");
    assert!(text.contains("local-1"), "{text}");
    assert_no_bytes(&text, &private);

    let public = fs::read(local::public_key_path(dir.path(), 1)).unwrap();
    let text = format!("{sealer:?}");
    assert!(text.contains("local-1"), "{text}");
    assert_no_bytes(&text, &public);

    let canary = b"sk-ant-api03-CANARY-0123456789abcdef";
    let secret = SecretBytes::new(canary.to_vec());
    let text = format!("{secret:?} {secret:#?} {secret}");
    assert!(text.contains("REDACTED"), "{text}");
    assert_no_bytes(&text, canary);

    let audit_bytes = [0xA5; 32];
    let audit = AuditChainKey::from_bytes_for_tests(audit_bytes);
    let text = format!("{audit:?} {audit:#?}");
    assert!(text.contains("REDACTED"), "{text}");
    assert_no_bytes(&text, &audit_bytes);

    let blob = sealer.seal(&BINDING, canary).unwrap();
    let text = format!("{blob:?}");
    assert!(text.contains(&blob.as_bytes().len().to_string()), "{text}");
    assert!(text.contains("local-1"), "{text}");
    assert_no_bytes(&text, &blob.as_bytes()[12..]);
    assert_no_bytes(&text, canary);
}

#[test]
fn secret_bytes_exposes_through_secrecy() {
    use secrecy::ExposeSecret;
    let secret = SecretBytes::new(b"abc".to_vec());
    assert_eq!(secret.expose_secret(), b"abc");
    assert_eq!(secret.len(), 3);
    assert!(!secret.is_empty());
}

// ---------------------------------------------------------------- audit chain

#[test]
fn audit_chain_mac() {
    let key = AuditChainKey::from_bytes_for_tests([9; 32]);
    let first = key.chain(&GENESIS_MAC, b"event one");
    assert_eq!(first, key.chain(&GENESIS_MAC, b"event one"), "deterministic");
    assert_ne!(first, key.chain(&GENESIS_MAC, b"event two"), "other event");
    assert_ne!(first, key.chain(&[1; 32], b"event one"), "other prev");
    let other_key = AuditChainKey::from_bytes_for_tests([8; 32]);
    assert_ne!(first, other_key.chain(&GENESIS_MAC, b"event one"), "other key");
    let second = key.chain(&first, b"event two");

    assert!(key.verify(&GENESIS_MAC, b"event one", &first));
    assert!(key.verify(&first, b"event two", &second));
    assert!(!key.verify(&GENESIS_MAC, b"event two", &first));
    assert!(!key.verify(&second, b"event two", &second));
    assert!(!other_key.verify(&GENESIS_MAC, b"event one", &first));
    assert!(!key.verify(&GENESIS_MAC, b"event one", &first[..31]));
    assert!(!key.verify(&GENESIS_MAC, b"event one", &[]));
    let mut long = first.to_vec();
    long.push(0);
    assert!(!key.verify(&GENESIS_MAC, b"event one", &long));
    for pos in 0..32 {
        let mut bad = first;
        bad[pos] ^= 1;
        assert!(!key.verify(&GENESIS_MAC, b"event one", &bad));
    }
}

#[test]
fn audit_key_file() {
    let dir = TempDir::new().unwrap();
    assert!(matches!(
        AuditChainKey::load(dir.path()),
        Err(CryptoError::AuditKeyFile { .. })
    ));
    AuditChainKey::ensure(dir.path()).unwrap();
    let path = dir.path().join("audit-chain.key");
    assert_eq!(AuditChainKey::path(dir.path()), path);
    assert_eq!(mode(&path), 0o600);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_ne!(bytes, [0u8; 32]);

    let mac = AuditChainKey::load(dir.path()).unwrap().chain(&GENESIS_MAC, b"e");
    AuditChainKey::ensure(dir.path()).unwrap();
    assert_eq!(fs::read(&path).unwrap(), bytes, "ensure keeps the key");
    let reloaded = AuditChainKey::load(dir.path()).unwrap();
    assert_eq!(reloaded.chain(&GENESIS_MAC, b"e"), mac);
    let fixed = AuditChainKey::from_bytes_for_tests(bytes.clone().try_into().unwrap());
    assert_eq!(fixed.chain(&GENESIS_MAC, b"e"), mac);

    set_mode(&path, 0o644);
    assert!(matches!(
        AuditChainKey::load(dir.path()),
        Err(CryptoError::Permissions { .. })
    ));
    assert!(matches!(
        AuditChainKey::ensure(dir.path()),
        Err(CryptoError::Permissions { .. })
    ));
    set_mode(&path, 0o600);
    fs::write(&path, [0u8; 16]).unwrap();
    let err = AuditChainKey::load(dir.path()).unwrap_err();
    assert!(matches!(err, CryptoError::AuditKeyFile { .. }), "{err:?}");
}

// ---------------------------------------------------------------- timing

/// `cargo test --release -p keyward-crypto --test crypto -- --ignored --nocapture timing`
#[test]
#[ignore = "measurement, not a check"]
fn timing() {
    use std::time::Instant;
    let (_dir, sealer, opener) = keypair();
    let plaintext = [b'k'; 100];
    let n = 2000u32;

    let start = Instant::now();
    let mut blob = None;
    for _ in 0..n {
        blob = Some(sealer.seal(&BINDING, &plaintext).unwrap());
    }
    let seal = start.elapsed() / n;
    let blob = blob.unwrap();

    let start = Instant::now();
    for _ in 0..n {
        let opened = opener.open(&BINDING, &blob).unwrap();
        assert_eq!(opened.len(), 100);
    }
    let open = start.elapsed() / n;
    println!(
        "blob for 100-byte plaintext: {} bytes; seal {seal:?}/op; open {open:?}/op",
        blob.as_bytes().len()
    );
}

// ---- KEK versions: primary, keyring, re-wrap, retirement ---------------------------------

#[tokio::test]
async fn rotation_makes_a_new_primary_and_the_keyring_opens_every_live_version() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    assert_eq!(local::primary_version(dir.path()).unwrap(), 1);
    let old = local::load_sealer(dir.path())
        .unwrap()
        .seal(&BINDING, b"sk-old")
        .unwrap();
    assert_eq!(old.kek_id().unwrap(), "local-1");

    assert_eq!(local::rotate(dir.path(), true).unwrap(), 2);
    assert_eq!(local::primary_version(dir.path()).unwrap(), 2);
    let sealer = local::load_sealer(dir.path()).unwrap();
    assert_eq!(sealer.kek_id(), "local-2");
    let new = sealer.seal(&BINDING, b"sk-new").unwrap();

    let ring = local::load_keyring(dir.path()).unwrap();
    assert_eq!(ring.kek_ids(), vec!["local-1", "local-2"]);
    let mut out = [0u8; 64];
    let n = ring.open_into(&BINDING, &old, &mut out).await.unwrap();
    assert_eq!(&out[..n], b"sk-old");
    let n = ring.open_into(&BINDING, &new, &mut out).await.unwrap();
    assert_eq!(&out[..n], b"sk-new");
    // The Debug form names versions only.
    assert_eq!(format!("{ring:?}"), r#"Keyring { kek_ids: ["local-1", "local-2"] }"#);

    let st = local::state(dir.path()).unwrap();
    assert_eq!(
        (st.primary, st.private.clone(), st.public.clone()),
        (2, vec![1, 2], vec![1, 2])
    );
    // A staged rotation adds a version without moving the primary.
    assert_eq!(local::rotate(dir.path(), false).unwrap(), 3);
    assert_eq!(local::primary_version(dir.path()).unwrap(), 2);
    local::set_primary(dir.path(), 3).unwrap();
    assert_eq!(local::load_sealer(dir.path()).unwrap().kek_id(), "local-3");
    assert!(
        local::set_primary(dir.path(), 9).is_err(),
        "a version without files cannot be primary"
    );
}

#[tokio::test]
async fn rewrap_moves_a_blob_to_the_target_version_and_keeps_its_binding() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let old = local::load_sealer(dir.path())
        .unwrap()
        .seal(&BINDING, b"sk-ant-123")
        .unwrap();
    local::rotate(dir.path(), true).unwrap();
    let ring = local::load_keyring(dir.path()).unwrap();
    let mut scratch = [0u8; 256];

    let moved = ring.rewrap(&BINDING, &old, "local-2", &mut scratch).await.unwrap();
    assert!(scratch.iter().all(|&b| b == 0), "scratch is wiped");
    assert_eq!(moved.kek_id().unwrap(), "local-2");
    assert_ne!(moved.as_bytes(), old.as_bytes());
    let opener2 = local::load_opener_version(dir.path(), 2).unwrap();
    assert_eq!(opener2.open(&BINDING, &moved).unwrap().expose(), b"sk-ant-123");
    // Still bound: another row cannot open it, and a re-wrap for another binding fails.
    let other = Binding {
        key_id: "key_other",
        ..BINDING
    };
    assert!(matches!(opener2.open(&other, &moved), Err(CryptoError::OpenFailed)));
    assert!(matches!(
        ring.rewrap(&other, &old, "local-2", &mut scratch).await,
        Err(CryptoError::OpenFailed)
    ));
    assert!(scratch.iter().all(|&b| b == 0), "scratch is wiped after a failure too");
    // Already under the target: the same blob comes back.
    let again = ring.rewrap(&BINDING, &moved, "local-2", &mut scratch).await.unwrap();
    assert_eq!(again.as_bytes(), moved.as_bytes());
    // A target the ring does not hold is refused.
    assert!(matches!(
        ring.rewrap(&BINDING, &old, "local-7", &mut scratch).await,
        Err(CryptoError::KekUnavailable { .. })
    ));
}

#[tokio::test]
async fn retire_refuses_the_primary_then_destroys_the_version_for_good() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let old = local::load_sealer(dir.path())
        .unwrap()
        .seal(&BINDING, b"sk-old")
        .unwrap();
    assert!(local::retire(dir.path(), 1).is_err(), "the primary cannot be retired");
    assert!(local::private_key_path(dir.path(), 1).exists());

    local::rotate(dir.path(), true).unwrap();
    assert!(local::retire(dir.path(), 1).unwrap());
    assert!(!local::private_key_path(dir.path(), 1).exists());
    assert!(!local::public_key_path(dir.path(), 1).exists());
    assert!(local::retired_marker_path(dir.path(), 1).exists());
    let st = local::state(dir.path()).unwrap();
    assert_eq!((st.private, st.retired), (vec![2], vec![1]));

    let ring = local::load_keyring(dir.path()).unwrap();
    let mut out = [0u8; 64];
    assert!(matches!(
        ring.open_into(&BINDING, &old, &mut out).await,
        Err(CryptoError::KekUnavailable { kek_id }) if kek_id == "local-1"
    ));
    assert!(local::load_opener_version(dir.path(), 1).is_err());
    // The number is never reused: the next rotation makes version 3.
    assert_eq!(local::rotate(dir.path(), true).unwrap(), 3);
    // Retiring again is a no-op.
    assert!(!local::retire(dir.path(), 1).unwrap());
}

/// Rotations racing from several threads (each opens its own lock file descriptor, as two
/// `keyward kek rotate` processes would) each get a version of their own, and every version
/// is a complete, loadable pair. Without the kek directory lock, racers read the same
/// highest version and both return `max + 1` (link(2) makes the loser adopt the winner's key).
#[test]
fn concurrent_rotations_create_distinct_versions() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 8;
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let mut all = vec![1u32];
    for _ in 0..ROUNDS {
        let barrier = std::sync::Barrier::new(THREADS);
        let got: Vec<u32> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        local::rotate(dir.path(), true).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        all.extend(got);
    }
    let mut distinct = all.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), all.len(), "duplicate versions: {all:?}");
    assert_eq!(distinct, (1..=(1 + THREADS * ROUNDS) as u32).collect::<Vec<_>>());
    let st = local::state(dir.path()).unwrap();
    assert_eq!(st.private, distinct);
    assert_eq!(st.primary, *distinct.last().unwrap());
    assert!(local::load_keyring(dir.path()).is_ok());
    // The lock is released with its guard: it can be taken again, and a holder blocks others.
    let held = local::lock(dir.path()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let v = local::rotate(dir.path(), false).unwrap();
            tx.send(v).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(),
            "a rotation ran while the lock was held"
        );
        drop(held);
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), 34);
    });
}

#[test]
fn a_primary_whose_files_are_missing_is_never_made_up() {
    let dir = TempDir::new().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    local::rotate(dir.path(), true).unwrap();
    fs::remove_file(local::private_key_path(dir.path(), 2)).unwrap();
    fs::remove_file(local::public_key_path(dir.path(), 2)).unwrap();
    let err = local::ensure_kek(dir.path()).unwrap_err().to_string();
    assert!(err.contains("primary version but its files are missing"), "{err}");
    assert!(!local::private_key_path(dir.path(), 2).exists());
    assert!(local::load_keyring(dir.path()).is_err());
    fs::write(local::primary_path(dir.path()), "zero\n").unwrap();
    assert!(local::primary_version(dir.path()).is_err());
}

// ---- PKCS#11 (feature `pkcs11`), against SoftHSM2 ------------------------------------------

/// In a `#[cfg(test)]` module so clippy's allow-unwrap-in-tests applies to the helpers.
#[cfg(test)]
#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;
    use keyward_crypto::pkcs11::{self, Pkcs11Config, Pkcs11Kek};
    use std::time::Instant;

    /// A fresh SoftHSM2 token in a temp dir (keyward-testenv), or `None` when SoftHSM2 is
    /// missing (a skip line; a failure under KEYWARD_TEST_REQUIRE_ALL=1). Only one test
    /// function (this crate's only PKCS#11 user here) makes one: the module reads
    /// `SOFTHSM2_CONF` once per process.
    fn token(dir: &Path) -> Option<Pkcs11Config> {
        let token = keyward_testenv::softhsm::token(dir, "keyward")?;
        Some(
            Pkcs11Config::parse(&token.kek("keyward-kek"))
                .unwrap()
                .with_data_dir(dir.join("data")),
        )
    }

    #[test]
    fn config_parsing_refuses_missing_and_unknown_fields() {
        let c = Pkcs11Config::parse("pkcs11:module=/m.so;token=t;key-label=k;pin-file=/p").unwrap();
        assert_eq!((c.token.as_str(), c.key_label.as_str()), ("t", "k"));
        for bad in [
            "pkcs11:module=/m.so;token=t;key-label=k",
            "pkcs11:module=/m.so;token=t;key-label=k;pin-file=/p;pin=1234",
            "local",
            "pkcs11:module=/m.so;token=t;key-label=a b;pin-file=/p",
        ] {
            assert!(Pkcs11Config::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(pkcs11::kek_id("k", 3), "pkcs11-k-3");
    }

    /// One function on purpose: the module is initialised once per process, and PKCS#11
    /// login state is per process (the gateway and the worker are separate processes).
    #[tokio::test]
    async fn softhsm_round_trip_non_extractable_gateway_cannot_open_destroy() {
        let dir = TempDir::new().unwrap();
        let Some(config) = token(dir.path()) else { return };
        let kek = Pkcs11Kek::connect(&config).unwrap();
        assert_eq!(kek.generate(1).unwrap(), "pkcs11-keyward-kek-1");
        assert!(kek.generate(1).is_err(), "a version is generated once");

        // The gateway's side: a session that never logged in. It can seal, and it cannot
        // even see the private key.
        let sealer = kek.sealer(1).unwrap();
        assert!(!pkcs11::private_key_visible_without_login(&kek, 1).unwrap());
        let blob = sealer.seal(&BINDING, b"sk-ant-hsm-123").unwrap();
        assert_eq!(&blob.as_bytes()[..4], b"KWB\x02");
        assert_eq!(
            format!("{sealer:?}"),
            r#"Pkcs11Sealer { kek_id: "pkcs11-keyward-kek-1", .. }"#
        );

        // The worker's side: logs in, the token decrypts the DEK.
        let opener = kek.opener(1).unwrap();
        // (PKCS#11 login state is per process: once logged in, every session of this process
        // sees private objects. That is why only the worker process ever logs in.)
        assert!(pkcs11::private_key_visible_without_login(&kek, 1).unwrap());
        let mut out = [0u8; 64];
        let n = opener.open_into(&BINDING, &blob, &mut out).unwrap();
        assert_eq!(&out[..n], b"sk-ant-hsm-123");
        let other = Binding {
            key_id: "key_other",
            ..BINDING
        };
        assert!(matches!(
            opener.open_into(&other, &blob, &mut out),
            Err(CryptoError::OpenFailed)
        ));
        assert!(out.iter().all(|&b| b == 0), "zeroed after a failed open");
        let mut tampered = blob.as_bytes().to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(opener
            .open_into(&BINDING, &SealedKey::from_bytes(tampered), &mut out)
            .is_err());

        // Time to open one key (C_Decrypt of the DEK in the token + the data AEAD).
        let runs = 20;
        let start = Instant::now();
        for _ in 0..runs {
            opener.open_into(&BINDING, &blob, &mut out).unwrap();
        }
        println!(
            "pkcs11 (SoftHSM2, RSA-{}) open: {:?}/key",
            pkcs11::MODULUS_BITS,
            start.elapsed() / runs
        );

        // The KEK is sensitive and not extractable: its private value cannot be read.
        assert_eq!(pkcs11::private_key_flags(&kek, 1).unwrap(), (true, false));
        assert!(!pkcs11::private_key_value_readable(&kek, 1).unwrap());

        // In a keyring next to a local version: routed by kek id; re-wrap both ways.
        assert_eq!(blob.kek_id().unwrap(), "pkcs11-keyward-kek-1");
        let local_dir = TempDir::new().unwrap();
        local::ensure_kek(local_dir.path()).unwrap();
        let local_blob = local::load_sealer(local_dir.path())
            .unwrap()
            .seal(&BINDING, b"sk-local")
            .unwrap();
        let ring = keyward_crypto::Keyring::of(vec![
            keyward_crypto::KekOpener::Local(local::load_opener(local_dir.path()).unwrap()),
            keyward_crypto::KekOpener::Pkcs11(opener),
        ])
        .unwrap();
        let mut scratch = [0u8; 256];
        let moved = ring
            .rewrap(&BINDING, &local_blob, "pkcs11-keyward-kek-1", &mut scratch)
            .await
            .unwrap();
        assert_eq!(&moved.as_bytes()[..4], b"KWB\x02");
        let n = ring.open_into(&BINDING, &moved, &mut out).await.unwrap();
        assert_eq!(&out[..n], b"sk-local");
        let back = ring.rewrap(&BINDING, &blob, "local-1", &mut scratch).await.unwrap();
        let n = ring.open_into(&BINDING, &back, &mut out).await.unwrap();
        assert_eq!(&out[..n], b"sk-ant-hsm-123");

        // Retirement: the objects are destroyed; nothing opens the blob any more.
        drop(ring);
        assert_eq!(kek.destroy(1).unwrap(), 2);
        assert!(matches!(kek.opener(1), Err(CryptoError::KekUnavailable { .. })));
        assert!(kek.sealer(1).is_err());
    }
}

// ---- AWS KMS (feature `awskms`), against moto's server on loopback ------------------------

/// In a `#[cfg(test)]` module so clippy's allow-unwrap-in-tests applies to the helpers.
#[cfg(test)]
#[cfg(feature = "awskms")]
mod awskms {
    use super::*;
    use keyward_crypto::awskms::{AwsKmsConfig, AwsKmsKek};
    use secrecy::SecretString;
    use std::time::{Duration, Instant};

    use keyward_testenv::moto::start as moto;

    fn config(url: &str, key_id: &str) -> AwsKmsConfig {
        AwsKmsConfig::parse(&format!("awskms:key-id={key_id};region=eu-west-1;endpoint={url}")).unwrap()
    }

    fn secret() -> SecretString {
        SecretString::from("test-secret".to_owned())
    }

    #[test]
    fn config_parsing() {
        let c = AwsKmsConfig::parse("awskms:key-id=k1;region=eu-west-1").unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.region.as_str(), c.endpoint),
            ("k1", "eu-west-1", None)
        );
        assert!(AwsKmsConfig::parse("awskms:region=eu-west-1").is_err());
        assert!(AwsKmsConfig::parse("awskms:key-id=k;region=r;secret=x").is_err());
    }

    #[tokio::test]
    async fn kms_round_trip_context_and_key_id_are_enforced_unreachable_is_a_backend_error() {
        let Some(moto) = moto() else { return };
        let key_a = AwsKmsKek::create_key(&config(&moto.url, "-"), "test", &secret())
            .await
            .unwrap();
        let key_b = AwsKmsKek::create_key(&config(&moto.url, "-"), "test", &secret())
            .await
            .unwrap();
        assert_ne!(key_a, key_b);
        let kek = AwsKmsKek::new(&config(&moto.url, &key_a), 1, "test", &secret());
        let blob = kek.seal(&BINDING, b"sk-proj-kms-123").await.unwrap();
        assert_eq!(&blob.as_bytes()[..4], b"KWB\x03");
        let mut out = [0u8; 64];
        let n = kek.open_into(&BINDING, &blob, &mut out).await.unwrap();
        assert_eq!(&out[..n], b"sk-proj-kms-123");

        // Time to open one key: one Decrypt round trip to KMS on loopback + the data AEAD.
        let runs = 20;
        let start = Instant::now();
        for _ in 0..runs {
            kek.open_into(&BINDING, &blob, &mut out).await.unwrap();
        }
        println!("awskms (moto on loopback) open: {:?}/key", start.elapsed() / runs);

        // Another binding = another encryption context: KMS refuses (nothing is written out).
        out = [0u8; 64];
        for other in [
            Binding {
                key_id: "key_other",
                ..BINDING
            },
            Binding {
                account_id: "acct_other",
                ..BINDING
            },
        ] {
            assert!(matches!(
                kek.open_into(&other, &blob, &mut out).await,
                Err(CryptoError::OpenFailed)
            ));
            assert!(out.iter().all(|&b| b == 0));
        }
        // A blob wrapped under key A, opened with explicit key id B: refused.
        let with_b = AwsKmsKek::new(&config(&moto.url, &key_b), 1, "test", &secret());
        assert!(matches!(
            with_b.open_into(&BINDING, &blob, &mut out).await,
            Err(CryptoError::OpenFailed)
        ));
        // A tampered wrapped DEK: refused.
        let mut tampered = blob.as_bytes().to_vec();
        tampered[20] ^= 1;
        assert!(kek
            .open_into(&BINDING, &SealedKey::from_bytes(tampered), &mut out)
            .await
            .is_err());

        // KMS unreachable: a backend error (retryable), never a silent success.
        drop(moto);
        let err = kek.open_into(&BINDING, &blob, &mut out).await.unwrap_err();
        assert!(matches!(err, CryptoError::Backend { backend: "awskms", .. }), "{err:?}");
        assert!(!err.to_string().contains("test-secret"));
    }

    /// Versions on disk (`kek/awskms-N.keyid`), rotation in KMS, a keyring re-wrap across
    /// versions, and retirement (the key disabled and scheduled for deletion).
    #[tokio::test]
    async fn kms_versions_rotate_rewrap_and_retire() {
        use keyward_crypto::awskms::{self, AwsCredentials};
        use keyward_crypto::{KekOpener, Keyring};
        let Some(moto) = moto() else { return };
        let dir = tempfile::tempdir().unwrap();
        let first = AwsKmsKek::create_key(&config(&moto.url, "-"), "test", &secret())
            .await
            .unwrap();
        let creds = || AwsCredentials::new("test", secret());
        let c = config(&moto.url, &first).with_data_dir(dir.path());
        awskms::bootstrap(&c).unwrap();
        assert_eq!(awskms::primary(&c).unwrap(), 1);
        let v1 = awskms::AwsKmsKek::with_key(&c, 1, &first, &creds());
        let blob = v1.seal(&BINDING, b"sk-proj-kms-v1").await.unwrap();

        let (v, second) = awskms::rotate(&c, &creds(), true).await.unwrap();
        assert_eq!(v, 2);
        assert_ne!(second, first);
        assert_eq!(awskms::primary(&c).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(awskms::key_id_path(dir.path(), 2))
                .unwrap()
                .trim(),
            second
        );
        let ring = Keyring::of(
            [1, 2]
                .into_iter()
                .map(|v| {
                    KekOpener::AwsKms(awskms::AwsKmsKek::with_key(
                        &c,
                        v,
                        &awskms::live_key_id(&c, v).unwrap(),
                        &creds(),
                    ))
                })
                .collect(),
        )
        .unwrap();
        let mut scratch = [0u8; 256];
        let moved = ring.rewrap(&BINDING, &blob, "awskms-2", &mut scratch).await.unwrap();
        assert!(scratch.iter().all(|&b| b == 0));
        let mut out = [0u8; 64];
        let n = ring.open_into(&BINDING, &moved, &mut out).await.unwrap();
        assert_eq!(&out[..n], b"sk-proj-kms-v1");
        // (There is no synchronous path to refuse KMS on any more: a keyring only opens
        // asynchronously, whatever its backends.)

        assert!(
            awskms::retire(&c, &creds(), 2).await.is_err(),
            "the primary is never retired"
        );
        let r = awskms::retire(&c, &creds(), 1).await.unwrap();
        assert_eq!(r.key_id.as_deref(), Some(first.as_str()));
        assert!(awskms::retired_path(dir.path(), 1).exists());
        assert!(matches!(
            awskms::live_key_id(&c, 1),
            Err(CryptoError::KekUnavailable { .. })
        ));
        // Disabled at once and scheduled for deletion (moto does not refuse a Decrypt with a
        // disabled key, so what that answers is checked against a scripted KMS below).
        assert_eq!(v1.key_state().await.unwrap(), "PendingDeletion");
        let v2 = awskms::AwsKmsKek::with_key(&c, 2, &second, &creds());
        assert_eq!(v2.key_state().await.unwrap(), "Enabled");
        // Only the live primary is loaded for a worker; numbers are never reused.
        let c_worker = awskms::AwsKmsConfig {
            worker_credentials_file: None,
            ..c.clone()
        };
        assert!(
            awskms::openers(&c_worker).is_err(),
            "no worker credentials file: refused"
        );
        let (v3, _) = awskms::rotate(&c, &creds(), false).await.unwrap();
        assert_eq!(v3, 3);
        assert_eq!(awskms::primary(&c).unwrap(), 2, "staged: not primary");
        awskms::promote(&c, 3).unwrap();
        assert_eq!(awskms::primary(&c).unwrap(), 3);
        assert!(awskms::promote(&c, 1).is_err(), "a retired version is never promoted");
        let listed: Vec<(u32, bool)> = awskms::versions(dir.path())
            .unwrap()
            .into_iter()
            .map(|v| (v.version, v.retired))
            .collect();
        assert_eq!(listed, vec![(1, true), (2, false), (3, false)]);
    }

    /// A "KMS" on loopback that answers every request with one scripted error (AWS JSON
    /// 1.1), or never answers: how each refusal is classified, through the SDK's own error
    /// parsing.
    async fn scripted_kms(answer: Option<(u16, &'static str)>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let _ = s.read(&mut buf).await;
                    let Some((status, code)) = answer else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    };
                    let body = format!("{{\"__type\":\"{code}\",\"message\":\"scripted\"}}");
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn kms_refusals_are_classified_and_a_silent_kms_is_bounded() {
        // A real blob, sealed with moto; the scripted KMS never looks at it.
        let Some(ok_kms) = moto() else { return };
        let key = AwsKmsKek::create_key(&config(&ok_kms.url, "-"), "test", &secret())
            .await
            .unwrap();
        let blob = AwsKmsKek::new(&config(&ok_kms.url, &key), 1, "test", &secret())
            .seal(&BINDING, b"sk-proj-kms-c")
            .await
            .unwrap();
        let mut out = [7u8; 64];
        for (status, code, want) in [
            (400, "DisabledException", "unavailable"),
            (400, "KMSInvalidStateException", "unavailable"),
            (400, "InvalidCiphertextException", "open_failed"),
            (400, "IncorrectKeyException", "open_failed"),
            (400, "AccessDeniedException", "open_failed"),
            (400, "ThrottlingException", "backend"),
            (500, "KMSInternalException", "backend"),
            (500, "DependencyTimeoutException", "backend"),
        ] {
            let url = scripted_kms(Some((status, code))).await;
            let kek = AwsKmsKek::new(&config(&url, &key), 1, "test", &secret());
            let err = kek.open_into(&BINDING, &blob, &mut out).await.unwrap_err();
            let got = match err {
                CryptoError::KekUnavailable { .. } => "unavailable",
                CryptoError::OpenFailed => "open_failed",
                CryptoError::Backend { .. } => "backend",
                ref other => panic!("{code}: {other:?}"),
            };
            assert_eq!(got, want, "{code}: {err}");
            assert!(out.iter().all(|&b| b == 0), "{code}: the buffer is wiped");
        }
        // A KMS that accepts and never answers: a backend error within the call timeout.
        let url = scripted_kms(None).await;
        let kek = AwsKmsKek::new(&config(&url, &key), 1, "test", &secret());
        let started = Instant::now();
        let err = kek.open_into(&BINDING, &blob, &mut out).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, CryptoError::Backend { .. }), "{err:?}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
            "bounded by the 2 s call timeout: {took:?}"
        );
        let err = kek.seal(&BINDING, b"x").await.unwrap_err();
        assert!(matches!(err, CryptoError::Backend { .. }), "{err:?}");
    }
}
