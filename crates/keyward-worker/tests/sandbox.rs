//! The worker sandbox against a PKCS#11 token (feature `pkcs11`, SoftHSM2): the module is
//! loaded and logged in before the sandbox, as the worker must; then the sandbox is applied
//! to this test's thread (Landlock and seccomp act per thread) and the key is opened.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use std::fs;
use std::path::Path;

use keyward_crypto::pkcs11::{Pkcs11Config, Pkcs11Kek};
use keyward_crypto::Binding;

const BINDING: Binding<'static> = Binding {
    account_id: "acc_1",
    provider: "openai",
    key_id: "key_1",
};

/// A fresh SoftHSM2 token (keyward-testenv) and its config, or `None` when SoftHSM2 is missing.
fn token(dir: &Path) -> Option<Pkcs11Config> {
    let token = keyward_testenv::softhsm::token(dir, "kw")?;
    Some(
        Pkcs11Config::parse(&token.kek("kek"))
            .unwrap()
            .with_data_dir(dir.join("data")),
    )
}

#[test]
fn a_token_opened_before_the_sandbox_decrypts_inside_it_given_its_state_dir_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = token(dir.path()) else { return };
    let kek = Pkcs11Kek::connect(&config).unwrap();
    kek.generate(1).unwrap();
    let blob = kek.sealer(1).unwrap().seal(&BINDING, b"sk-proj-sandboxed").unwrap();
    // As the worker: everything read from disk first (module loaded, PIN read, logged in),
    // then the sandbox. Landlock and seccomp act per thread: each case gets its own.
    let opener = kek.opener(1).unwrap();
    let tokens = dir.path().join("tokens").display().to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut read_only = keyward_worker::sandbox::READ_ONLY.to_vec();
            read_only.push(&tokens);
            let status = keyward_worker::sandbox::apply(&read_only).unwrap();
            assert_eq!(status.landlock, "fully enforced");
            // The sandbox is on: no write to the token directory (or anywhere)…
            assert!(fs::write(dir.path().join("tokens/x"), b"x").is_err());
            // …and the logged-in session still has the token decrypt the DEK.
            let mut out = [0u8; 64];
            let n = opener
                .open_into(&BINDING, &blob, &mut out)
                .unwrap_or_else(|e| panic!("open inside the sandbox: {e}"));
            assert_eq!(&out[..n], b"sk-proj-sandboxed");
        })
        .join()
        .unwrap();
        // The worker's sandbox as it is: SoftHSM2 re-reads its token files on use, so the
        // open fails. A PKCS#11 worker must add the module's state directory (read-only).
        // (Second on purpose: after a failed re-read SoftHSM2 keeps treating the object as
        // invalid in this process.)
        s.spawn(|| {
            let status = keyward_worker::sandbox::apply(keyward_worker::sandbox::READ_ONLY).unwrap();
            assert_eq!(status.landlock, "fully enforced");
            let mut out = [0u8; 64];
            assert!(opener.open_into(&BINDING, &blob, &mut out).is_err());
        })
        .join()
        .unwrap();
    });
}
