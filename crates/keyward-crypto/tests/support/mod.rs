//! Shared by the SoftHSM2 test binaries (each its own process: a PKCS#11 module is
//! initialised once per process). Included with `mod support;`.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use keyward_crypto::pkcs11::{Pkcs11Config, Pkcs11Kek};
use keyward_crypto::CryptoError;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub fn softhsm() -> bool {
    let util = std::process::Command::new("sh")
        .args(["-c", "command -v softhsm2-util"])
        .output()
        .is_ok_and(|o| o.status.success());
    if Path::new(MODULE).exists() && util {
        return true;
    }
    keyward_testenv::skip(keyward_testenv::reasons::SOFTHSM);
    false
}

/// A fresh token (label `keyward`, user PIN 5678) and a config using `<dir>/data`.
pub fn token(dir: &Path) -> Pkcs11Config {
    let tokens = dir.join("tokens");
    fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "keyward",
            "--so-pin",
            "1234",
            "--pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pin_file = dir.join("pin");
    fs::write(&pin_file, "5678\n").unwrap();
    fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600)).unwrap();
    Pkcs11Config::parse(&format!(
        "pkcs11:module={MODULE};token=keyward;key-label=kek;pin-file={}",
        pin_file.display()
    ))
    .unwrap()
    .with_data_dir(dir.join("data"))
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
