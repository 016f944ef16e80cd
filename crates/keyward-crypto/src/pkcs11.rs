//! The PKCS#11 KEK backend (feature `pkcs11`): the KEK is an RSA key pair generated inside a
//! token (an HSM; SoftHSM2 in the tests), its private half non-extractable and sensitive.
//!
//! `KEYWARD_KEK=pkcs11:module=…;token=…;key-label=…;pin-file=…` ([`Pkcs11Config::parse`]).
//! Version `N` of the KEK is the key pair labelled `<key-label>-<N>` in the token; its kek id
//! is `pkcs11-<key-label>-<N>`.
//!
//! - **Seal** ([`Pkcs11Sealer`], the gateway): a session that never logs in. The public key
//!   is a public object (`CKA_PRIVATE=false`), so it can be used without the PIN; the
//!   private key is a private object, which a session that has not logged in cannot even
//!   find. A fresh DEK is encrypted *by the token* with RSA-OAEP (SHA-1, MGF1-SHA-1) and
//!   the plaintext sealed with ChaCha20-Poly1305 under it, as in format v1.
//! - **Open** ([`Pkcs11Opener`], the worker only): logs in with the PIN read from the pin
//!   file (kept in a zeroizing buffer, never in argv or the environment), and has the token
//!   decrypt the DEK (`C_Decrypt` with the private key inside the token: the KEK never
//!   leaves it). The DEK exists in process memory for one open only, in a zeroizing buffer.
//! - **Destroy** ([`Pkcs11Kek::destroy`]): both objects of a version are destroyed in the
//!   token (retirement).
//!
//! # Blob format, version 2 (PKCS#11)
//! ```text
//! offset   size   field
//! 0        3      magic b"KWB"
//! 3        1      version = 2
//! 4        1      n = length of the kek id
//! 5        n      kek id (e.g. "pkcs11-keyward-kek-1")
//! 5+n      2      w = length of the wrapped DEK, big-endian
//! 7+n      w      RSA-OAEP ciphertext of the 32-byte DEK
//! 7+n+w    12     ChaCha20Poly1305 nonce
//! 19+n+w   m+16   ChaCha20Poly1305 ciphertext + tag, aad = header (magic..kek id) || binding
//! ```
//! SoftHSM2 refuses an OAEP label, so the binding is authenticated by the data AEAD only
//! (not by the DEK wrap as in v1): a blob moved to another row still fails to open.
//!
//! Not wired into `KEYWARD_KEK`, the gateway or the worker yet (see the README).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::envelope::is_valid_kek_id;
use crate::wrapped;
use crate::{Binding, CryptoError, SealedKey, MAX_PLAINTEXT_LEN};

/// The blob format version of PKCS#11-sealed keys.
pub const BLOB_VERSION_PKCS11: u8 = wrapped::VERSION_PKCS11;
/// RSA modulus size of a KEK version.
pub const MODULUS_BITS: u64 = 3072;

fn err(reason: impl fmt::Display) -> CryptoError {
    CryptoError::Backend {
        backend: "pkcs11",
        reason: reason.to_string(),
    }
}

/// `pkcs11:module=…;token=…;key-label=…;pin-file=…`. `Debug` shows paths and labels (the
/// PIN is in the file, never here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token label.
    pub token: String,
    /// The KEK's label prefix; version N is `<key-label>-<N>`.
    pub key_label: String,
    /// A file holding the user PIN (only the worker and `keyward kek` commands read it).
    pub pin_file: PathBuf,
    /// `env=NAME=VALUE` (optional): one variable the module needs in the worker, whose
    /// environment is otherwise empty (SoftHSM2: `SOFTHSM2_CONF=…`).
    pub env: Option<(String, String)>,
    /// `sandbox-read=PATH` (optional, repeatable): what the module still reads after
    /// login, added read-only to the worker's Landlock list (SoftHSM2: its token directory).
    pub sandbox_read: Vec<PathBuf>,
}

impl Pkcs11Config {
    /// Parses a `KEYWARD_KEK` value. Every field is required; unknown fields are refused.
    pub fn parse(value: &str) -> Result<Pkcs11Config, CryptoError> {
        let rest = value
            .strip_prefix("pkcs11:")
            .ok_or_else(|| err("must start with pkcs11:"))?;
        let (mut module, mut token, mut key_label, mut pin_file) = (None, None, None, None);
        let (mut env, mut sandbox_read) = (None, Vec::new());
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            if k == "env" {
                let (name, value) = v.split_once('=').ok_or_else(|| err("env= takes NAME=VALUE"))?;
                env = Some((name.to_owned(), value.to_owned()));
                continue;
            }
            if k == "sandbox-read" {
                sandbox_read.push(PathBuf::from(v));
                continue;
            }
            let slot = match k {
                "module" => &mut module,
                "token" => &mut token,
                "key-label" => &mut key_label,
                "pin-file" => &mut pin_file,
                other => return Err(err(format!("unknown field {other:?}"))),
            };
            *slot = Some(v.to_owned());
        }
        let need = |v: Option<String>, name: &str| v.ok_or_else(|| err(format!("{name}= is required")));
        let cfg = Pkcs11Config {
            module: PathBuf::from(need(module, "module")?),
            token: need(token, "token")?,
            key_label: need(key_label, "key-label")?,
            pin_file: PathBuf::from(need(pin_file, "pin-file")?),
            env,
            sandbox_read,
        };
        if !is_valid_kek_id(&kek_id(&cfg.key_label, 1)) {
            return Err(err("key-label must be printable ASCII without spaces"));
        }
        Ok(cfg)
    }
}

impl Pkcs11Config {
    /// Back to a `KEYWARD_KEK` value (the PIN is not in it: only its file's path).
    pub fn to_kek_value(&self) -> String {
        let mut v = format!(
            "pkcs11:module={};token={};key-label={};pin-file={}",
            self.module.display(),
            self.token,
            self.key_label,
            self.pin_file.display()
        );
        if let Some((name, value)) = &self.env {
            v.push_str(&format!(";env={name}={value}"));
        }
        for p in &self.sandbox_read {
            v.push_str(&format!(";sandbox-read={}", p.display()));
        }
        v
    }
}

/// The kek id of version `version` under `key_label`.
pub fn kek_id(key_label: &str, version: u32) -> String {
    format!("pkcs11-{key_label}-{version}")
}

fn object_label(key_label: &str, version: u32) -> String {
    format!("{key_label}-{version}")
}

/// RSA-OAEP with SHA-1 and MGF1-SHA-1: the only OAEP parameters SoftHSM2 2.6 accepts
/// (`CKR_ARGUMENTS_BAD` for SHA-256). SHA-1's collision weakness does not touch OAEP's
/// security as an encryption padding.
fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

/// A loaded module and the slot of the configured token. Load it before any sandbox:
/// the module is `dlopen`ed and may read its own configuration files.
pub struct Pkcs11Kek {
    ctx: Pkcs11,
    slot: Slot,
    config: Pkcs11Config,
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Kek")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Kek {
    /// Loads the module, initialises it and finds the token by its label. The module is
    /// loaded and initialised once per process and kept (PKCS#11 wants one context per
    /// application, and dropping one finalises the module under every other session).
    pub fn connect(config: &Pkcs11Config) -> Result<Pkcs11Kek, CryptoError> {
        let ctx = context(&config.module)?;
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(err)? {
            let info = ctx.get_token_info(slot).map_err(err)?;
            if info.label().trim_end() == config.token {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| err(format!("no token labelled {:?}", config.token)))?;
        Ok(Pkcs11Kek {
            ctx,
            slot,
            config: config.clone(),
        })
    }

    /// The configuration this was connected with.
    pub fn config(&self) -> &Pkcs11Config {
        &self.config
    }

    fn user_session(&self) -> Result<Session, CryptoError> {
        let pin = read_pin(&self.config.pin_file)?;
        let session = self.ctx.open_rw_session(self.slot).map_err(err)?;
        match session.login(UserType::User, Some(&pin)) {
            // Login state is per process: another session of ours is logged in already.
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
                Ok(session)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Generates KEK `version` inside the token (logs in with the PIN): an RSA key pair whose
    /// private half is sensitive, non-extractable, decrypt-only; the public half a public
    /// object usable without logging in. Refuses if the version exists.
    pub fn generate(&self, version: u32) -> Result<String, CryptoError> {
        let session = self.user_session()?;
        let label = object_label(&self.config.key_label, version);
        if !find(&session, ObjectClass::PUBLIC_KEY, &label)?.is_empty()
            || !find(&session, ObjectClass::PRIVATE_KEY, &label)?.is_empty()
        {
            return Err(err(format!("KEK {label} already exists in the token")));
        }
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::ModulusBits(MODULUS_BITS.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Encrypt(true),
            Attribute::Verify(false),
            Attribute::Wrap(false),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(label.into_bytes()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Unwrap(false),
        ];
        session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(err)?;
        Ok(kek_id(&self.config.key_label, version))
    }

    /// The seal-only half of KEK `version`: a session that never logs in.
    pub fn sealer(&self, version: u32) -> Result<Pkcs11Sealer, CryptoError> {
        let session = self.ctx.open_ro_session(self.slot).map_err(err)?;
        let label = object_label(&self.config.key_label, version);
        let key = one(find(&session, ObjectClass::PUBLIC_KEY, &label)?, &label)?;
        Ok(Pkcs11Sealer {
            kek_id: kek_id(&self.config.key_label, version),
            session: Mutex::new(session),
            key,
        })
    }

    /// The opening half of KEK `version`: logs in with the PIN. Worker only.
    pub fn opener(&self, version: u32) -> Result<Pkcs11Opener, CryptoError> {
        let session = self.user_session()?;
        let label = object_label(&self.config.key_label, version);
        let key = one(find(&session, ObjectClass::PRIVATE_KEY, &label)?, &label)?;
        let public = one(find(&session, ObjectClass::PUBLIC_KEY, &label)?, &label)?;
        Ok(Pkcs11Opener {
            kek_id: kek_id(&self.config.key_label, version),
            session: Mutex::new(session),
            key,
            public,
        })
    }

    /// Destroys both objects of KEK `version` in the token (retirement). Returns how many
    /// objects were destroyed.
    pub fn destroy(&self, version: u32) -> Result<usize, CryptoError> {
        let session = self.user_session()?;
        let label = object_label(&self.config.key_label, version);
        let mut n = 0;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for h in find(&session, class, &label)? {
                session.destroy_object(h).map_err(err)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The process's one context per module path.
fn context(module: &Path) -> Result<Pkcs11, CryptoError> {
    static CONTEXTS: std::sync::OnceLock<Mutex<Vec<(PathBuf, Pkcs11)>>> = std::sync::OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| err("context lock poisoned"))?;
    if let Some((_, ctx)) = contexts.iter().find(|(m, _)| m == module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| err(format!("load {}: {e}", module.display())))?;
    ctx.initialize(CInitializeArgs::OsThreads).map_err(err)?;
    contexts.push((module.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

fn read_pin(path: &Path) -> Result<AuthPin, CryptoError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| err(format!("pin file {}: {e}", path.display())))?;
    let mut raw = Zeroizing::new(String::new());
    file.read_to_string(&mut raw)
        .map_err(|e| err(format!("pin file {}: {e}", path.display())))?;
    let pin = raw.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(err(format!("pin file {} is empty", path.display())));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

fn find(session: &Session, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, CryptoError> {
    session
        .find_objects(&[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])
        .map_err(err)
}

fn one(mut found: Vec<ObjectHandle>, label: &str) -> Result<ObjectHandle, CryptoError> {
    match (found.pop(), found.is_empty()) {
        (Some(h), true) => Ok(h),
        (None, _) => Err(CryptoError::KekUnavailable {
            kek_id: label.to_owned(),
        }),
        (Some(_), false) => Err(err(format!("several objects labelled {label:?}"))),
    }
}

/// Seals to a PKCS#11 KEK version with its public half (the token encrypts the DEK).
pub struct Pkcs11Sealer {
    kek_id: String,
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl fmt::Debug for Pkcs11Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Sealer")
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Sealer {
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Seals `plaintext` for `binding` (format v2): a fresh DEK and nonce every call.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        let session = self.session.lock().map_err(|_| CryptoError::SealFailed)?;
        seal_with(&session, self.key, &self.kek_id, binding, plaintext)
    }
}

/// Format v2 sealing with public key `key` through `session` (see the module doc).
fn seal_with(
    session: &Session,
    key: ObjectHandle,
    kek_id: &str,
    binding: &Binding,
    plaintext: &[u8],
) -> Result<SealedKey, CryptoError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(CryptoError::PlaintextTooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        });
    }
    let dek = wrapped::fresh_dek();
    let wrapped_dek = session.encrypt(&oaep(), key, dek.as_ref()).map_err(err)?;
    wrapped::assemble(BLOB_VERSION_PKCS11, kek_id, &wrapped_dek, &dek, binding, plaintext)
}

/// Opens blobs sealed to a PKCS#11 KEK version: the token decrypts the DEK. Worker only.
pub struct Pkcs11Opener {
    kek_id: String,
    session: Mutex<Session>,
    key: ObjectHandle,
    public: ObjectHandle,
}

impl fmt::Debug for Pkcs11Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Opener")
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Opener {
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Seals to this version with its public key (a re-wrap to this version).
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        let session = self.session.lock().map_err(|_| CryptoError::SealFailed)?;
        seal_with(&session, self.public, &self.kek_id, binding, plaintext)
    }

    /// Opens `blob` into `out` (zeroed on failure) and returns the plaintext length.
    pub fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        let b = wrapped::parse(blob.as_bytes(), BLOB_VERSION_PKCS11)?;
        if b.kek_id != self.kek_id {
            return Err(CryptoError::KekMismatch {
                expected: self.kek_id.clone(),
                found: b.kek_id.to_owned(),
            });
        }
        let dek = {
            let session = self.session.lock().map_err(|_| CryptoError::OpenFailed)?;
            Zeroizing::new(
                session
                    .decrypt(&oaep(), self.key, b.wrapped)
                    .map_err(|_| CryptoError::OpenFailed)?,
            )
        };
        wrapped::open_body(&b, &dek, binding, out)
    }
}

/// For tests: whether the object labelled as KEK `version`'s private key will hand out its
/// private exponent (it must not). Logs in.
pub fn private_key_value_readable(kek: &Pkcs11Kek, version: u32) -> Result<bool, CryptoError> {
    let session = kek.user_session()?;
    let label = object_label(&kek.config.key_label, version);
    let key = one(find(&session, ObjectClass::PRIVATE_KEY, &label)?, &label)?;
    let got = session
        .get_attributes(key, &[AttributeType::PrivateExponent, AttributeType::Prime1])
        .map_err(err)?;
    Ok(!got.is_empty())
}

/// For tests: the `CKA_SENSITIVE` and `CKA_EXTRACTABLE` flags of KEK `version`'s private key.
pub fn private_key_flags(kek: &Pkcs11Kek, version: u32) -> Result<(bool, bool), CryptoError> {
    let session = kek.user_session()?;
    let label = object_label(&kek.config.key_label, version);
    let key = one(find(&session, ObjectClass::PRIVATE_KEY, &label)?, &label)?;
    let got = session
        .get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
        .map_err(err)?;
    let (mut sensitive, mut extractable) = (false, true);
    for a in got {
        match a {
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            _ => {}
        }
    }
    Ok((sensitive, extractable))
}

/// For tests: whether a session that has not logged in (what the gateway holds) can find
/// KEK `version`'s private key.
pub fn private_key_visible_without_login(kek: &Pkcs11Kek, version: u32) -> Result<bool, CryptoError> {
    let session = kek.ctx.open_ro_session(kek.slot).map_err(err)?;
    let label = object_label(&kek.config.key_label, version);
    Ok(!find(&session, ObjectClass::PRIVATE_KEY, &label)?.is_empty())
}
