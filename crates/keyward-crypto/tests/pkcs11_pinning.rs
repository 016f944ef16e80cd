//! PKCS#11 KEK versions are pinned outside the token, rotated under the kek directory lock
//! and retired private-first (feature `pkcs11`, against SoftHSM2). One test function on
//! purpose, in its own binary: the module is initialised once per process and PKCS#11 login
//! state is per process.
#![cfg(feature = "pkcs11")]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use keyward_crypto::pkcs11::{Pkcs11Config, Pkcs11Kek};
use keyward_crypto::{local, Binding, CryptoError};
use tempfile::TempDir;

const BINDING: Binding<'static> = Binding {
    account_id: "acct_1",
    provider: "openai",
    key_id: "key_1",
};

#[cfg(test)]
mod support;

use support::*;

#[test]
fn pkcs11_versions_are_pinned_locked_and_retired_private_first() {
    let dir = TempDir::new().unwrap();
    let Some(config) = token(dir.path()) else { return };
    let data = dir.path().join("data");

    // Without a data directory there is nowhere to keep a pin: nothing is generated.
    let unpinned = Pkcs11Kek::connect(&Pkcs11Config {
        data_dir: None,
        ..config.clone()
    })
    .unwrap();
    assert!(msg(unpinned.generate(1)).contains("no data directory"));

    let kek = Pkcs11Kek::connect(&config).unwrap();

    // ---- Concurrent rotations: distinct versions, each pinned, the last one primary.
    let got: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| kek.rotate().unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![1, 2, 3], "rotations raced into duplicates: {got:?}");
    assert_eq!(local::primary_file_version(&data).unwrap(), Some(3));
    for v in 1..=3 {
        let pin = kek.pin_path(v).unwrap();
        let text = fs::read_to_string(&pin).unwrap();
        assert!(text.starts_with("sha256:") && text.len() == 7 + 64 + 1, "{text:?}");
        assert_eq!(fs::metadata(&pin).unwrap().permissions().mode() & 0o777, 0o600);
        kek.sealer(v).unwrap().seal(&BINDING, b"sk-x").unwrap();
    }
    assert!(kek.generate(2).is_err(), "a version is generated once");

    // ---- Both objects are unmodifiable.
    {
        let s = kek.test_user_session().unwrap();
        for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY] {
            let h = s
                .find_objects(&[Attribute::Class(class), Attribute::Label(b"kek-1".to_vec())])
                .unwrap();
            assert_eq!(h.len(), 1);
            let got = s
                .get_attributes(h[0], &[cryptoki::object::AttributeType::Modifiable])
                .unwrap();
            assert_eq!(got, vec![Attribute::Modifiable(false)], "{class:?}");
            assert!(
                s.update_attributes(h[0], &[Attribute::Label(b"renamed".to_vec())])
                    .is_err(),
                "{class:?} could be relabelled"
            );
        }
        // Why they stay destroyable: SoftHSM2 refuses to destroy a CKA_DESTROYABLE=false
        // object, which would make retirement (crypto-shredding) impossible.
        let h = s
            .generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                &[
                    Attribute::Token(true),
                    Attribute::Destroyable(false),
                    Attribute::Label(b"undestroyable".to_vec()),
                    Attribute::ModulusBits(1024.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
                &[Attribute::Token(true), Attribute::Label(b"undestroyable".to_vec())],
            )
            .unwrap();
        assert!(matches!(
            s.destroy_object(h.0),
            Err(P11Error::Pkcs11(RvError::ActionProhibited, _))
        ));
    }

    // ---- A public key swapped in the token (version 2): refused at load and at seal time.
    let sealer2 = kek.sealer(2).unwrap();
    assert_eq!(destroy_objects(&kek, ObjectClass::PUBLIC_KEY, "kek-2"), 1);
    attacker_pair(&kek, "kek-2", "attacker-2");
    let e = msg(kek.sealer(2));
    assert!(e.contains("does not match its recorded pin"), "{e}");
    assert!(
        sealer2.seal(&BINDING, b"sk-x").is_err(),
        "an existing sealer followed the swap"
    );
    assert!(msg(kek.opener(2)).contains("does not match its recorded pin"));
    assert!(kek.promote(2).is_err());
    assert_eq!(local::primary_file_version(&data).unwrap(), Some(3));

    // ---- A private key swapped in the token (version 1): the opener and promote refuse.
    assert_eq!(destroy_objects(&kek, ObjectClass::PRIVATE_KEY, "kek-1"), 1);
    attacker_pair(&kek, "attacker-1", "kek-1");
    let e = msg(kek.opener(1));
    assert!(e.contains("not the pair of its pinned public key"), "{e}");
    assert!(msg(kek.promote(1)).contains("not the pair"));
    assert_eq!(local::primary_file_version(&data).unwrap(), Some(3));

    // ---- A pair made in the token without keyward (no pin): never used.
    attacker_pair(&kek, "kek-9", "kek-9");
    assert!(msg(kek.sealer(9)).contains("no pin recorded"));
    assert!(msg(kek.opener(9)).contains("no pin recorded"));

    // ---- A garbled pin file is refused.
    fs::write(kek.pin_path(3).unwrap(), "sha256:00\n").unwrap();
    assert!(msg(kek.sealer(3)).contains("not a KEK pin"));

    // ---- Promote checks the private half and takes the lock: version 4, good.
    let v4 = kek.generate(4).unwrap();
    assert_eq!(v4, "pkcs11-kek-4");
    kek.promote(4).unwrap();
    assert_eq!(local::primary_file_version(&data).unwrap(), Some(4));
    let sealer4 = kek.sealer(4).unwrap();
    let blob = sealer4.seal(&BINDING, b"sk-four").unwrap();
    let opener4 = kek.opener(4).unwrap();
    let mut out = [0u8; 64];
    let n = opener4.open_into(&BINDING, &blob, &mut out).unwrap();
    assert_eq!(&out[..n], b"sk-four");

    // ---- Retirement: the primary is refused; otherwise marker, private, public.
    assert!(kek.retire(4).is_err(), "the primary cannot be retired");
    fs::remove_file(kek.pin_path(3).unwrap()).unwrap(); // (garbled above)
                                                        // The next number is above every version pinned, retired or primary here (the unpinned
                                                        // `kek-9` in the token is not one of ours).
    assert_eq!(kek.rotate().unwrap(), 5);
    assert_eq!(kek.retire(4).unwrap(), 2);
    assert!(kek.retired_path(4).unwrap().exists());
    assert!(matches!(kek.sealer(4), Err(CryptoError::KekUnavailable { .. })));
    assert!(matches!(kek.opener(4), Err(CryptoError::KekUnavailable { .. })));
    assert!(
        opener4.open_into(&BINDING, &blob, &mut out).is_err(),
        "the private key is gone"
    );
    assert!(sealer4.seal(&BINDING, b"sk").is_err(), "the public key is gone too");
    assert!(kek.generate(4).is_err(), "a retired number is never reused");

    // Retirement stopped between the two destroys (marker written, private gone, public
    // left): the version is refused anyway, and a re-run finishes it.
    let v = kek.rotate().unwrap();
    let sealer_v = kek.sealer(v).unwrap();
    kek.rotate().unwrap();
    fs::write(kek.retired_path(v).unwrap(), b"").unwrap();
    assert_eq!(destroy_objects(&kek, ObjectClass::PRIVATE_KEY, &format!("kek-{v}")), 1);
    assert!(matches!(kek.sealer(v), Err(CryptoError::KekUnavailable { .. })));
    assert!(matches!(kek.opener(v), Err(CryptoError::KekUnavailable { .. })));
    // (A sealer loaded before the marker still holds a handle; the gateway drops it when
    // the kek watch reloads.)
    drop(sealer_v);
    assert_eq!(kek.retire(v).unwrap(), 1, "the leftover public object");
    assert_eq!(kek.retire(v).unwrap(), 0, "already retired");
}
