//! Blob formats v2 (PKCS#11) and v3 (AWS KMS): a data key wrapped by a backend outside this
//! process, of any length, between the header and the data part (see the layout table in
//! [`crate::header`]). The backends (`pkcs11.rs`, `awskms.rs`) wrap and unwrap the DEK; this
//! module frames it.

// Parsing (the kek id of a v2/v3 blob) is needed in every build; sealing and opening only
// with a backend feature.
#![cfg_attr(not(any(feature = "pkcs11", feature = "awskms")), allow(dead_code, unused_imports))]

#[cfg(any(feature = "awskms", test))]
pub(crate) use crate::header::VERSION_AWSKMS;
#[cfg(any(feature = "pkcs11", test))]
pub(crate) use crate::header::VERSION_PKCS11;
use crate::header::{self, DataPart, Draft};
pub(crate) use crate::header::{fresh_dek, DEK_LEN};
use crate::{Binding, CryptoError, SealedKey};

/// Builds a blob: `wrapped` is `dek` as the backend wrapped it.
pub(crate) fn assemble(
    version: u8,
    kek_id: &str,
    wrapped: &[u8],
    dek: &[u8; DEK_LEN],
    binding: &Binding,
    plaintext: &[u8],
) -> Result<SealedKey, CryptoError> {
    let mut draft = Draft::new(version, kek_id, 2 + wrapped.len(), plaintext.len())?;
    let w = u16::try_from(wrapped.len()).map_err(|_| CryptoError::SealFailed)?;
    draft.push(&w.to_be_bytes());
    draft.push(wrapped);
    Ok(SealedKey::from_bytes(draft.seal_data(
        dek,
        &binding.canonical_bytes(),
        plaintext,
    )?))
}

/// A parsed blob of this layout.
pub(crate) struct Parsed<'a> {
    header: &'a [u8],
    pub(crate) kek_id: &'a str,
    pub(crate) wrapped: &'a [u8],
    data: DataPart<'a>,
}

/// Parses a blob of this layout with version `version`.
pub(crate) fn parse(bytes: &[u8], version: u8) -> Result<Parsed<'_>, CryptoError> {
    let h = header::parse_as(bytes, version)?;
    let (wrapped, rest) = header::split_wrapped_dek(h.rest)?;
    Ok(Parsed {
        header: h.bytes,
        kek_id: h.kek_id,
        wrapped,
        data: header::split_data(rest)?,
    })
}

/// Opens the data part of `p` with the unwrapped `dek` into `out` (zeroed on failure).
pub(crate) fn open_body(p: &Parsed<'_>, dek: &[u8], binding: &Binding, out: &mut [u8]) -> Result<usize, CryptoError> {
    header::open_data(p.header, &p.data, dek, &binding.canonical_bytes(), out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    use super::*;
    use crate::header::{is_valid_kek_id, BLOB_MAGIC, MAX_PLAINTEXT_LEN};

    const BINDING: Binding<'static> = Binding {
        account_id: "acc_1",
        provider: "openai",
        key_id: "key_1",
    };

    fn blob(version: u8, kek_id: &str, wrapped: &[u8], plaintext: &[u8]) -> (SealedKey, Zeroizing<[u8; DEK_LEN]>) {
        let dek = fresh_dek();
        let sealed = assemble(version, kek_id, wrapped, &dek, &BINDING, plaintext).expect("assemble");
        (sealed, dek)
    }

    #[test]
    fn kek_id_is_read_from_every_known_format_whatever_the_features() {
        let (v2, _) = blob(VERSION_PKCS11, "pkcs11-kek-7", &[1; 384], b"sk-test");
        assert_eq!(v2.kek_id().expect("v2"), "pkcs11-kek-7");
        let (v3, _) = blob(VERSION_AWSKMS, "awskms-alias/k-2", &[2; 180], b"sk-test");
        assert_eq!(v3.kek_id().expect("v3"), "awskms-alias/k-2");
        // Debug names the kek id of a v2/v3 blob too (and nothing of its body).
        let shown = format!("{v3:?}");
        assert!(shown.contains("awskms-alias/k-2"), "{shown}");
        // v1 still goes through the v1 parser.
        let key = local_v1_blob();
        assert_eq!(key.kek_id().expect("v1"), "local-3");
    }

    /// A v1 blob sealed with a throwaway X25519 key (the local backend's format).
    fn local_v1_blob() -> SealedKey {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in 1..=3 {
            crate::local::ensure_kek_version(dir.path(), v).expect("kek");
        }
        let sealer = crate::local::load_sealer_version(dir.path(), 3).expect("sealer");
        sealer.seal(&BINDING, b"sk-test").expect("seal")
    }

    #[test]
    fn kek_id_refuses_unknown_versions_and_broken_headers() {
        let (v2, _) = blob(VERSION_PKCS11, "pkcs11-kek-1", &[1; 16], b"x");
        let mut bytes = v2.as_bytes().to_vec();
        if let Some(v) = bytes.get_mut(3) {
            *v = 4;
        }
        assert!(matches!(
            SealedKey::from_bytes(bytes.clone()).kek_id(),
            Err(CryptoError::UnsupportedVersion(4))
        ));
        if let Some(v) = bytes.get_mut(3) {
            *v = 0;
        }
        assert!(matches!(
            SealedKey::from_bytes(bytes).kek_id(),
            Err(CryptoError::UnsupportedVersion(0))
        ));
        // Truncated inside the wrapped-DEK length: malformed, for v2 and v3 alike.
        for version in [VERSION_PKCS11, VERSION_AWSKMS] {
            let (b, _) = blob(version, "k-1", &[9; 300], b"x");
            let cut = b.as_bytes().get(..10).expect("long enough").to_vec();
            assert!(matches!(
                SealedKey::from_bytes(cut).kek_id(),
                Err(CryptoError::Malformed)
            ));
        }
        // A kek id with a space is refused.
        let mut bad = b"KWB\x02\x03a b".to_vec();
        bad.extend_from_slice(&[0, 0]);
        bad.extend_from_slice(&[0; 12 + 16]);
        assert!(matches!(
            SealedKey::from_bytes(bad).kek_id(),
            Err(CryptoError::Malformed)
        ));
    }

    #[cfg(feature = "awskms")]
    #[test]
    fn awskms_version_constant_matches() {
        assert_eq!(VERSION_AWSKMS, crate::awskms::BLOB_VERSION_AWSKMS);
    }

    fn kek_id_strategy() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[!-~]{1,255}").expect("regex")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// v2/v3 round trip: the parse gives back the kek id and the wrapped DEK, and the
        /// body opens to the plaintext under the right DEK and binding only.
        #[test]
        fn v2_v3_round_trip(
            v3 in any::<bool>(),
            kek_id in kek_id_strategy(),
            wrapped in proptest::collection::vec(any::<u8>(), 0..600),
            plaintext in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let version = if v3 { VERSION_AWSKMS } else { VERSION_PKCS11 };
            let (sealed, dek) = blob(version, &kek_id, &wrapped, &plaintext);
            prop_assert_eq!(sealed.kek_id().expect("kek id"), kek_id.clone());
            let p = parse(sealed.as_bytes(), version).expect("parse");
            prop_assert_eq!(p.kek_id, kek_id.as_str());
            prop_assert_eq!(p.wrapped, wrapped.as_slice());
            let mut out = vec![0u8; MAX_PLAINTEXT_LEN];
            let n = open_body(&p, dek.as_ref(), &BINDING, &mut out).expect("open");
            prop_assert_eq!(out.get(..n), Some(plaintext.as_slice()));
            let other = Binding { key_id: "key_2", ..BINDING };
            prop_assert!(matches!(open_body(&p, dek.as_ref(), &other, &mut out), Err(CryptoError::OpenFailed)));
            // The other layout version is refused by number, not misread.
            let other_version = if v3 { VERSION_PKCS11 } else { VERSION_AWSKMS };
            prop_assert!(matches!(parse(sealed.as_bytes(), other_version), Err(CryptoError::UnsupportedVersion(v)) if v == version));
        }

        /// Arbitrary bytes, and arbitrary bytes behind a v2/v3 header, never panic the
        /// parsers; whatever parses names a valid kek id.
        #[test]
        fn arbitrary_bytes_never_panic(
            v3 in any::<bool>(),
            prefix in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            let version = if v3 { VERSION_AWSKMS } else { VERSION_PKCS11 };
            let mut input = Vec::new();
            if prefix {
                input.extend_from_slice(&BLOB_MAGIC);
                input.push(version);
            }
            input.extend_from_slice(&bytes);
            if let Ok(p) = parse(&input, version) {
                prop_assert!(is_valid_kek_id(p.kek_id));
                let mut out = vec![0u8; MAX_PLAINTEXT_LEN];
                prop_assert!(open_body(&p, &[0u8; DEK_LEN], &BINDING, &mut out).is_err());
            }
            if let Ok(id) = SealedKey::from_bytes(input.clone()).kek_id() {
                prop_assert!(is_valid_kek_id(&id));
            }
            let _ = format!("{:?}", SealedKey::from_bytes(input));
        }

        /// Flipping any one byte of a v2/v3 blob never panics and never opens.
        #[test]
        fn tampered_blobs_never_open(
            v3 in any::<bool>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let version = if v3 { VERSION_AWSKMS } else { VERSION_PKCS11 };
            let (sealed, dek) = blob(version, "k-1", &[5; 40], b"sk-secret");
            let mut bytes = sealed.into_bytes();
            let i = at.index(bytes.len());
            if let Some(b) = bytes.get_mut(i) {
                *b ^= flip;
            }
            if let Ok(p) = parse(&bytes, version) {
                let mut out = vec![0u8; MAX_PLAINTEXT_LEN];
                // The wrapped DEK is not authenticated here (the backend's unwrap is), so a
                // flip there still opens under the true DEK; anything else must fail.
                let in_wrapped = (7 + 3..7 + 3 + 40).contains(&i);
                let opened = open_body(&p, dek.as_ref(), &BINDING, &mut out);
                prop_assert!(in_wrapped == opened.is_ok(), "flip at {} opened: {:?}", i, opened.is_ok());
            }
        }
    }
}
