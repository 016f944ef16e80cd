//! Shared by the SoftHSM2 test binaries (each its own process: a PKCS#11 module is
//! initialised once per process). Included with `mod support;`.
#![allow(dead_code)]

use std::path::Path;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use keyward_crypto::pkcs11::{Pkcs11Config, Pkcs11Kek};
use keyward_crypto::CryptoError;

/// A fresh SoftHSM2 token (label `keyward`, keyward-testenv's user PIN) and a config using
/// `<dir>/data`; `None` when SoftHSM2 is missing (the test is skipped: return).
pub fn token(dir: &Path) -> Option<Pkcs11Config> {
    let token = keyward_testenv::softhsm::token(dir, "keyward")?;
    Some(
        Pkcs11Config::parse(&token.kek("kek"))
            .unwrap()
            .with_data_dir(dir.join("data")),
    )
}

/// An attacker with the PIN generates a pair and labels its halves as asked.
pub fn attacker_pair(kek: &Pkcs11Kek, public_label: &str, private_label: &str) {
    let s = kek.test_user_session().unwrap();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(public_label.as_bytes().to_vec()),
        Attribute::ModulusBits(2048.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
        Attribute::Encrypt(true),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(private_label.as_bytes().to_vec()),
        Attribute::Decrypt(true),
    ];
    s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .unwrap();
}

pub fn destroy_objects(kek: &Pkcs11Kek, class: ObjectClass, label: &str) -> usize {
    let s = kek.test_user_session().unwrap();
    let found = s
        .find_objects(&[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    for h in &found {
        s.destroy_object(*h).unwrap();
    }
    found.len()
}

pub fn msg<T: std::fmt::Debug>(r: Result<T, CryptoError>) -> String {
    r.unwrap_err().to_string()
}
