//! A fresh SoftHSM2 token for a PKCS#11 test (Debian `softhsm2`), initialised by
//! `softhsm2-util` in its own process, so the test's process initialises the module once,
//! through the code under test.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{reasons, skip};

/// The SoftHSM2 module (Debian's path).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every token made here (in [`Token::pin_file`]).
pub const USER_PIN: &str = "5678";
/// The security officer's PIN.
pub const SO_PIN: &str = "1234";

/// A token in a directory of the caller's: `softhsm2.conf`, the token store `tokens/` and a
/// PIN file `pin` (mode 0600, as keyward requires).
#[derive(Debug, Clone)]
pub struct Token {
    /// The token's label.
    pub label: String,
    /// Its `softhsm2.conf` (what `SOFTHSM2_CONF` names).
    pub conf: PathBuf,
    /// The token store, which the module still reads after login (`sandbox-read=`).
    pub tokens: PathBuf,
    /// The file holding [`USER_PIN`].
    pub pin_file: PathBuf,
}

/// Whether SoftHSM2 (the module and `softhsm2-util`) is installed; if not, skips the running
/// test (see [`crate::skip`]) and answers false.
pub fn available() -> bool {
    let util = std::process::Command::new("sh")
        .args(["-c", "command -v softhsm2-util"])
        .output()
        .is_ok_and(|o| o.status.success());
    if Path::new(MODULE).exists() && util {
        return true;
    }
    skip(reasons::SOFTHSM);
    false
}

/// A fresh token labelled `label` in `dir`, or `None` when SoftHSM2 is missing (the test is
/// skipped: return). Sets `SOFTHSM2_CONF` in this process's environment, where the module
/// loaded by the code under test reads it (so: one token per test process).
pub fn token(dir: &Path, label: &str) -> Option<Token> {
    if !available() {
        return None;
    }
    let tokens = dir.join("tokens");
    fs::create_dir_all(&tokens).unwrap_or_else(|e| failed(dir, "tokens directory", &e));
    let conf = dir.join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap_or_else(|e| failed(dir, "softhsm2.conf", &e));
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
            "--pin",
            USER_PIN,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap_or_else(|e| failed(dir, "softhsm2-util", &e));
    if !out.status.success() {
        failed(dir, "softhsm2-util --init-token", &String::from_utf8_lossy(&out.stderr));
    }
    let pin_file = dir.join("pin");
    fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap_or_else(|e| failed(dir, "pin file", &e));
    fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| failed(dir, "pin file", &e));
    Some(Token {
        label: label.to_owned(),
        conf,
        tokens,
        pin_file,
    })
}

fn failed(dir: &Path, what: &str, e: &dyn std::fmt::Display) -> ! {
    panic!("SoftHSM2 token in {}: {what}: {e}", dir.display())
}

impl Token {
    /// The `KEYWARD_KEK` value for KEK versions labelled `key_label` in this token, as a
    /// process that has `SOFTHSM2_CONF` set uses it.
    pub fn kek(&self, key_label: &str) -> String {
        format!(
            "pkcs11:module={MODULE};token={};key-label={key_label};pin-file={}",
            self.label,
            self.pin_file.display()
        )
    }

    /// [`Token::kek`] for keyward's workers: the module's setting passed on (`env=`, their
    /// environment is otherwise empty) and the token store readable inside the sandbox
    /// (`sandbox-read=`).
    pub fn kek_for_workers(&self, key_label: &str) -> String {
        format!(
            "{};env=SOFTHSM2_CONF={};sandbox-read={}",
            self.kek(key_label),
            self.conf.display(),
            self.tokens.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_values_name_the_token_its_pin_file_and_for_workers_its_setting_and_store() {
        let t = Token {
            label: "kw".to_owned(),
            conf: PathBuf::from("/h/softhsm2.conf"),
            tokens: PathBuf::from("/h/tokens"),
            pin_file: PathBuf::from("/h/pin"),
        };
        assert_eq!(
            t.kek("kek"),
            "pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=kw;key-label=kek;pin-file=/h/pin"
        );
        assert_eq!(
            t.kek_for_workers("kek"),
            "pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=kw;key-label=kek;pin-file=/h/pin;\
             env=SOFTHSM2_CONF=/h/softhsm2.conf;sandbox-read=/h/tokens"
        );
    }
}
