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
//! - **Retire** ([`Pkcs11Kek::retire`]): both objects of a version are destroyed in the
//!   token (see "Retirement order" below).
//!
//! # Pinning: the token is not trusted to keep the public key
//! Objects are found by label, and anyone who can log in to the token (or write its files,
//! for SoftHSM2) could replace a version's public key with one of their own, and the gateway
//! would seal every new key to it. So each version is *pinned* outside the token: when
//! [`Pkcs11Kek::generate`] creates it, the SHA-256 of its public key ([`public_key_pin`]) is
//! written to `<data_dir>/kek/pkcs11-<key-label>-<N>.pin` (created atomically, never
//! overwritten, next to `primary`). The sealer refuses a token public key whose pin differs,
//! when it is loaded and again before every seal (the check is an attribute read, negligible
//! next to the RSA operation); the opener also checks that the private object has the same
//! modulus and exponent as the pinned public one. A version without a pin file is refused:
//! pinning is never trust-on-first-use. Both objects are created `CKA_MODIFIABLE=false`.
//! They stay `CKA_DESTROYABLE=true`: SoftHSM2 refuses `C_DestroyObject` on a non-destroyable
//! object (`CKR_ACTION_PROHIBITED`), which would make retirement, and so crypto-shredding,
//! impossible; the pin is what protects against a destroy-and-replace.
//!
//! # Locking
//! [`Pkcs11Kek::rotate`], [`Pkcs11Kek::generate`], [`Pkcs11Kek::promote`] and
//! [`Pkcs11Kek::retire`] hold the kek directory's lock ([`crate::local::lock`]) so concurrent
//! `keyward kek` commands cannot create the same version twice or retire a version being
//! promoted.
//!
//! # Retirement order
//! Retiring writes `pkcs11-<key-label>-<N>.retired` first, then destroys the private object,
//! then the public one. Shredding is the private object going away, so it goes first (if
//! destroying it fails, nothing else changed). Once it is gone the public half can only seal
//! keys nobody can ever open again, so it is destroyed too; and the marker, written before
//! either, makes [`Pkcs11Kek::sealer`] and [`Pkcs11Kek::opener`] refuse the version even if
//! retirement stops between the two destroys (a re-run finishes it). The gateway's session
//! never logs in and cannot see private objects, so a private key destroyed *outside*
//! keyward (no marker) is not visible to the sealer: the worker's opener refuses such a
//! version, and `/readyz` (seal a canary, have a worker open it) reports it.
//!
//! # Blob format, version 2 (PKCS#11)
//! The DEK as the token RSA-OAEP-encrypted it, in the wrapped-DEK layout of `wrapped.rs`
//! (the table is in `header.rs`). SoftHSM2 refuses an OAEP label, so the binding is
//! authenticated by the data AEAD only (not by the DEK wrap as in v1): a blob moved to
//! another row still fails to open.

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
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::fsutil::{self, Created, FileKind};
use crate::header::is_valid_kek_id;
use crate::local::{self, KekLock};
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
    /// The data directory: version pins, retirement markers, `primary` and the lock live in
    /// its `kek/` (see the module doc). Not part of the `KEYWARD_KEK` value: keyward's
    /// configuration sets it to `KEYWARD_DATA_DIR`. Without it no version can be generated,
    /// sealed to or opened (there is nowhere to keep or check the pin).
    pub data_dir: Option<PathBuf>,
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
            data_dir: None,
        };
        // The label also names files in the kek directory: no `/`, no leading dot.
        if !is_valid_kek_id(&kek_id(&cfg.key_label, 1)) || cfg.key_label.contains('/') || cfg.key_label.starts_with('.')
        {
            return Err(err(
                "key-label must be printable ASCII without spaces or '/', not starting with '.'",
            ));
        }
        Ok(cfg)
    }

    /// This configuration with its data directory set (see [`Pkcs11Config::data_dir`]).
    pub fn with_data_dir(mut self, data_dir: impl Into<PathBuf>) -> Pkcs11Config {
        self.data_dir = Some(data_dir.into());
        self
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

/// The pin of an RSA public key: SHA-256 over `"keyward pkcs11 rsa pin v1"`, then the
/// modulus and the public exponent, each as a big-endian `u32` length and its big-endian
/// bytes without leading zeros.
pub fn public_key_pin(modulus: &[u8], exponent: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"keyward pkcs11 rsa pin v1");
    for part in [modulus, exponent] {
        let start = part.iter().position(|&b| b != 0).unwrap_or(part.len());
        let part = part.get(start..).unwrap_or_default();
        h.update(u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

const PIN_PREFIX: &str = "sha256:";
const KIND: FileKind = FileKind::Kek;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pin_file_contents(pin: &[u8; 32]) -> String {
    format!("{PIN_PREFIX}{}\n", hex(pin))
}

fn parse_pin_file(path: &Path, text: &str) -> Result<[u8; 32], CryptoError> {
    let bad = || KIND.err(path, "not a KEK pin (expected sha256:<64 hex digits>)");
    let digits = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .strip_prefix(PIN_PREFIX)
        .ok_or_else(bad)?;
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = digits.get(2 * i..2 * i + 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
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

    fn kek_dir(&self) -> Result<PathBuf, CryptoError> {
        self.config
            .data_dir
            .as_ref()
            .map(|d| d.join(local::KEK_DIR))
            .ok_or_else(|| err("no data directory configured: KEK version pins cannot be kept or checked"))
    }

    fn data_dir(&self) -> Result<&Path, CryptoError> {
        self.config
            .data_dir
            .as_deref()
            .ok_or_else(|| err("no data directory configured: KEK version pins cannot be kept or checked"))
    }

    /// `<data_dir>/kek/pkcs11-<key-label>-<version>.pin`: the pin of version `version`.
    pub fn pin_path(&self, version: u32) -> Result<PathBuf, CryptoError> {
        Ok(self
            .kek_dir()?
            .join(format!("{}.pin", kek_id(&self.config.key_label, version))))
    }

    /// `<data_dir>/kek/pkcs11-<key-label>-<version>.retired`: version `version` was retired.
    pub fn retired_path(&self, version: u32) -> Result<PathBuf, CryptoError> {
        Ok(self
            .kek_dir()?
            .join(format!("{}.retired", kek_id(&self.config.key_label, version))))
    }

    /// The pin recorded for `version`. A version with no pin file is refused.
    fn recorded_pin(&self, version: u32) -> Result<[u8; 32], CryptoError> {
        let path = self.pin_path(version)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KIND.err(
                    &path,
                    format!(
                        "no pin recorded for KEK {}: only versions made by `keyward kek rotate` \
                         (which records the public key's hash) are used",
                        kek_id(&self.config.key_label, version)
                    ),
                ))
            }
            Err(e) => return Err(KIND.err(&path, format!("cannot read: {e}"))),
        };
        parse_pin_file(&path, &text)
    }

    fn refuse_retired(&self, version: u32) -> Result<(), CryptoError> {
        if fsutil::exists(&self.retired_path(version)?, KIND)? {
            return Err(CryptoError::KekUnavailable {
                kek_id: kek_id(&self.config.key_label, version),
            });
        }
        Ok(())
    }

    /// The highest version number this kek directory has used for this key label: the
    /// primary, every pinned version and every retired one.
    fn highest_version(&self) -> Result<u32, CryptoError> {
        let dir = self.kek_dir()?;
        let mut highest = local::primary_file_version(self.data_dir()?)?.unwrap_or(0);
        // `kek_id(label, N)` is `pkcs11-<label>-<N>`.
        let prefix = format!("pkcs11-{}-", self.config.key_label);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(highest),
            Err(e) => return Err(KIND.err(&dir, format!("cannot list: {e}"))),
        };
        for entry in entries {
            let entry = entry.map_err(|e| KIND.err(&dir, format!("cannot list: {e}")))?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            let Some(num) = rest.strip_suffix(".pin").or_else(|| rest.strip_suffix(".retired")) else {
                continue;
            };
            if let Ok(v) = num.parse::<u32>() {
                highest = highest.max(v);
            }
        }
        Ok(highest)
    }

    /// Creates the next version (one above every version this kek directory has used),
    /// records its pin and makes it primary, all under the kek directory's lock, so
    /// concurrent rotations create distinct versions. Returns the new version.
    pub fn rotate(&self) -> Result<u32, CryptoError> {
        let held = local::lock(self.data_dir()?)?;
        let next = self
            .highest_version()?
            .checked_add(1)
            .ok_or_else(|| err("no KEK version numbers left"))?;
        self.generate_locked(&held, next)?;
        local::write_primary_locked(&held, self.data_dir()?, next)?;
        Ok(next)
    }

    /// Makes `version` primary after checking it in the token (logs in): its public key
    /// matches its pin and its private key exists with the same modulus and exponent.
    pub fn promote(&self, version: u32) -> Result<(), CryptoError> {
        let held = local::lock(self.data_dir()?)?;
        drop(self.opener(version)?);
        local::write_primary_locked(&held, self.data_dir()?, version)
    }

    /// Generates KEK `version` inside the token (logs in with the PIN) and records its pin:
    /// an RSA key pair whose private half is sensitive, non-extractable, decrypt-only; the
    /// public half a public object usable without logging in; neither modifiable. Refuses a
    /// version that exists in the token, is pinned or was retired (numbers are never
    /// reused). Holds the kek directory's lock. Does not make it primary (see [`rotate`]).
    ///
    /// [`rotate`]: Pkcs11Kek::rotate
    pub fn generate(&self, version: u32) -> Result<String, CryptoError> {
        let held = local::lock(self.data_dir()?)?;
        self.generate_locked(&held, version)
    }

    fn generate_locked(&self, _held: &KekLock, version: u32) -> Result<String, CryptoError> {
        let id = kek_id(&self.config.key_label, version);
        let pin_path = self.pin_path(version)?;
        if version == 0 {
            return Err(err("KEK versions start at 1"));
        }
        if fsutil::exists(&pin_path, KIND)? || fsutil::exists(&self.retired_path(version)?, KIND)? {
            return Err(err(format!(
                "KEK {id} was created here before; its number is never reused"
            )));
        }
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
            Attribute::Modifiable(false),
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
            Attribute::Modifiable(false),
            Attribute::Label(label.into_bytes()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Unwrap(false),
        ];
        let (public_h, private_h) = session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(err)?;
        let recorded = rsa_public(&session, public_h).and_then(|pub_key| {
            if rsa_public(&session, private_h)? != pub_key {
                return Err(err("the token generated a key pair whose halves differ"));
            }
            let pin = pub_key.pin();
            match fsutil::create_new_atomic(&pin_path, pin_file_contents(&pin).as_bytes(), 0o600, KIND)? {
                Created::Yes => Ok(()),
                Created::AlreadyExisted => Err(KIND.err(&pin_path, "appeared while generating")),
            }
        });
        if let Err(e) = recorded {
            // Without its pin the pair can never be used: take it out of the token again.
            let _ = session.destroy_object(private_h);
            let _ = session.destroy_object(public_h);
            return Err(e);
        }
        Ok(id)
    }

    /// The seal-only half of KEK `version`: a session that never logs in. Refuses a retired
    /// version, and a public key that does not match the version's pin (see the module doc).
    pub fn sealer(&self, version: u32) -> Result<Pkcs11Sealer, CryptoError> {
        self.refuse_retired(version)?;
        let pin = self.recorded_pin(version)?;
        let session = self.ctx.open_ro_session(self.slot).map_err(err)?;
        let label = object_label(&self.config.key_label, version);
        let key = one(find(&session, ObjectClass::PUBLIC_KEY, &label)?, &label)?;
        let kek_id = kek_id(&self.config.key_label, version);
        check_pin(&session, key, &pin, &kek_id)?;
        Ok(Pkcs11Sealer {
            kek_id,
            session: Mutex::new(session),
            key,
            pin,
        })
    }

    /// The opening half of KEK `version`: logs in with the PIN. Worker only. Refuses a
    /// retired version ([`CryptoError::KekUnavailable`], as for one whose private key is
    /// gone), a public key that does not match the pin, and a private key whose modulus or
    /// exponent differs from the pinned public key's.
    pub fn opener(&self, version: u32) -> Result<Pkcs11Opener, CryptoError> {
        self.refuse_retired(version)?;
        let session = self.user_session()?;
        let label = object_label(&self.config.key_label, version);
        let key = one(find(&session, ObjectClass::PRIVATE_KEY, &label)?, &label)?;
        let public = one(find(&session, ObjectClass::PUBLIC_KEY, &label)?, &label)?;
        let kek_id = kek_id(&self.config.key_label, version);
        let pin = self.recorded_pin(version)?;
        let public_key = check_pin(&session, public, &pin, &kek_id)?;
        if rsa_public(&session, key)? != public_key {
            return Err(err(format!(
                "the private key of KEK {kek_id} in the token is not the pair of its pinned public key"
            )));
        }
        Ok(Pkcs11Opener {
            kek_id,
            session: Mutex::new(session),
            key,
            public,
            pin,
        })
    }

    /// Retires KEK `version` (see "Retirement order" in the module doc): refuses the primary,
    /// writes the retired marker, destroys the private object, then the public one. Holds
    /// the kek directory's lock. Returns how many objects were destroyed (0: already gone).
    pub fn retire(&self, version: u32) -> Result<usize, CryptoError> {
        let data_dir = self.data_dir()?;
        let _held = local::lock(data_dir)?;
        if local::primary_file_version(data_dir)? == Some(version) {
            return Err(err(format!(
                "KEK {} is the primary version; rotate first",
                kek_id(&self.config.key_label, version)
            )));
        }
        let marker = self.retired_path(version)?;
        if !fsutil::exists(&marker, KIND)? {
            fsutil::replace_atomic(&marker, b"", 0o600, KIND)?;
        }
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

    /// [`Pkcs11Kek::retire`] under its former name.
    pub fn destroy(&self, version: u32) -> Result<usize, CryptoError> {
        self.retire(version)
    }

    /// For tests: a logged-in read-write session on the token (to play an attacker who can
    /// reach it).
    #[doc(hidden)]
    pub fn test_user_session(&self) -> Result<Session, CryptoError> {
        self.user_session()
    }
}

/// An RSA public key as the token reports it (modulus and exponent, leading zeros removed).
#[derive(Debug, PartialEq, Eq)]
struct RsaPublic {
    modulus: Vec<u8>,
    exponent: Vec<u8>,
}

impl RsaPublic {
    fn pin(&self) -> [u8; 32] {
        public_key_pin(&self.modulus, &self.exponent)
    }
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let start = v.iter().position(|&b| b != 0).unwrap_or(v.len());
    v.drain(..start);
    v
}

/// The modulus and public exponent of key object `key` (public or private: both attributes
/// are readable on a sensitive private key).
fn rsa_public(session: &Session, key: ObjectHandle) -> Result<RsaPublic, CryptoError> {
    let got = session
        .get_attributes(key, &[AttributeType::Modulus, AttributeType::PublicExponent])
        .map_err(err)?;
    let (mut modulus, mut exponent) = (None, None);
    for a in got {
        match a {
            Attribute::Modulus(m) => modulus = Some(strip_zeros(m)),
            Attribute::PublicExponent(e) => exponent = Some(strip_zeros(e)),
            _ => {}
        }
    }
    match (modulus, exponent) {
        (Some(modulus), Some(exponent)) if !modulus.is_empty() && !exponent.is_empty() => {
            Ok(RsaPublic { modulus, exponent })
        }
        _ => Err(err("key object has no RSA modulus and exponent")),
    }
}

/// Checks public key object `key` against `pin`; returns the key.
fn check_pin(session: &Session, key: ObjectHandle, pin: &[u8; 32], kek_id: &str) -> Result<RsaPublic, CryptoError> {
    let public = rsa_public(session, key)?;
    if public.pin() != *pin {
        return Err(err(format!(
            "the public key of KEK {kek_id} in the token does not match its recorded pin \
             (replaced in the token?): refusing to seal to it"
        )));
    }
    Ok(public)
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

/// Longest PIN accepted, in bytes.
const MAX_PIN_LEN: usize = 255;

/// Reads the PIN file: a regular file without group/other permission bits (checked on the
/// open file; [`CryptoError::Permissions`] otherwise, as for a KEK private key file), read
/// into a zeroizing stack buffer and handed to the module as an [`AuthPin`] (which zeroizes
/// its one heap copy on drop): no `String` copy of the PIN is left behind. One trailing
/// newline (`\n` or `\r\n`) is removed; anything else is part of the PIN.
fn read_pin(path: &Path) -> Result<AuthPin, CryptoError> {
    let raw = read_pin_bytes(path)?;
    let pin =
        std::str::from_utf8(raw.as_bytes()).map_err(|_| err(format!("pin file {}: not UTF-8", path.display())))?;
    // `String::from(&str)` allocates exactly `len` bytes and copies once (no growth, so no
    // reallocation leaving a copy behind); `AuthPin` owns and zeroizes that allocation.
    Ok(AuthPin::new(String::from(pin)))
}

/// The PIN's bytes in a zeroizing buffer. `Debug` is redacted.
struct PinBytes {
    buf: Zeroizing<[u8; MAX_PIN_LEN + 3]>,
    len: usize,
}

impl fmt::Debug for PinBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinBytes([REDACTED])")
    }
}

impl PinBytes {
    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

fn read_pin_bytes(path: &Path) -> Result<PinBytes, CryptoError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let fail = |what: &str| err(format!("pin file {}: {what}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| fail(&e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(&e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(CryptoError::Permissions {
            path: path.to_path_buf(),
        });
    }
    // Room for the longest PIN, "\r\n" and one byte more, to tell "too long" from "fits".
    let mut buf = Zeroizing::new([0u8; MAX_PIN_LEN + 3]);
    let mut len = 0;
    loop {
        let free = buf.get_mut(len..).unwrap_or_default();
        if free.is_empty() {
            return Err(fail("longer than 255 bytes"));
        }
        match file.read(free) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(&e.to_string())),
        }
    }
    let mut pin = buf.get(..len).unwrap_or_default();
    if let Some(rest) = pin.strip_suffix(b"\n") {
        pin = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    let pin_len = pin.len();
    if pin_len == 0 {
        return Err(fail("empty"));
    }
    if pin_len > MAX_PIN_LEN {
        return Err(fail("longer than 255 bytes"));
    }
    Ok(PinBytes { buf, len: pin_len })
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
    pin: [u8; 32],
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

    /// Seals `plaintext` for `binding` (format v2): a fresh DEK and nonce every call. The
    /// token's public key is checked against the pin first, every time.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        let session = self.session.lock().map_err(|_| CryptoError::SealFailed)?;
        check_pin(&session, self.key, &self.pin, &self.kek_id)?;
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
    pin: [u8; 32],
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

    /// Seals to this version with its public key (a re-wrap to this version), checked
    /// against the pin first.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        let session = self.session.lock().map_err(|_| CryptoError::SealFailed)?;
        check_pin(&session, self.public, &self.pin, &self.kek_id)?;
        seal_with(&session, self.public, &self.kek_id, binding, plaintext)
    }

    /// Opens `blob` into `out` (zeroed on failure) and returns the plaintext length.
    pub fn open_into(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        let opened = self.open_into_unwiped(binding, blob, out);
        if opened.is_err() {
            out.zeroize();
        }
        opened
    }

    fn open_into_unwiped(&self, binding: &Binding, blob: &SealedKey, out: &mut [u8]) -> Result<usize, CryptoError> {
        let b = wrapped::parse(blob.as_bytes(), BLOB_VERSION_PKCS11)?;
        if b.kek_id != self.kek_id {
            return Err(CryptoError::KekMismatch {
                expected: self.kek_id.clone(),
                found: b.kek_id.to_owned(),
            });
        }
        let dek = {
            let session = self.session.lock().map_err(|_| CryptoError::OpenFailed)?;
            Zeroizing::new(session.decrypt(&oaep(), self.key, b.wrapped).map_err(decrypt_error)?)
        };
        wrapped::open_body(&b, &dek, binding, out)
    }
}

/// A token that cannot be reached or has lost our session or key (a handle gone, the
/// device failing or removed, the token absent) is the backend failing,
/// [`CryptoError::Backend`]: retryable, and `503 kek_unavailable` to a caller. Anything
/// else the token says about a decryption is the blob's fault, [`CryptoError::OpenFailed`]:
/// SoftHSM2, for one, answers `CKR_GENERAL_ERROR` to a wrapped key that does not decrypt, so
/// only these named conditions count as an outage (an unknown one never turns a tampered
/// blob into a retry).
fn decrypt_error(e: cryptoki::error::Error) -> CryptoError {
    use cryptoki::error::{Error, RvError};
    match e {
        Error::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::UserNotLoggedIn
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::HostMemory,
            _,
        ) => err(e),
        Error::Pkcs11(..) => CryptoError::OpenFailed,
        // Not an answer from the token at all (the library, the call itself).
        other => err(other),
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn pin_file(dir: &Path, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(format!("pin-{mode:o}-{}", contents.len()));
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn pin_file_readable_by_group_or_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660, 0o606] {
            let path = pin_file(dir.path(), b"5678\n", mode);
            assert!(
                matches!(read_pin(&path), Err(CryptoError::Permissions { path: p }) if p == path),
                "mode {mode:o}"
            );
        }
        for mode in [0o600, 0o400] {
            let path = pin_file(dir.path(), b"5678\n", mode);
            assert_eq!(read_pin_bytes(&path).unwrap().as_bytes(), b"5678", "mode {mode:o}");
            assert!(read_pin(&path).is_ok());
        }
        // A directory is not a pin file.
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(read_pin(&sub).is_err());
    }

    #[test]
    fn pin_file_loses_exactly_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (contents, want) in [
            (&b"5678"[..], Some(&b"5678"[..])),
            (b"5678\n", Some(b"5678")),
            (b"5678\r\n", Some(b"5678")),
            (b"5678\n\n", Some(b"5678\n")),
            (b" 5678 \n", Some(b" 5678 ")),
            (b"\n", None),
            (b"", None),
        ] {
            let path = pin_file(dir.path(), contents, 0o600);
            let got = read_pin_bytes(&path);
            assert_eq!(got.as_ref().ok().map(|p| p.as_bytes()), want, "{contents:?}");
            assert_eq!(read_pin(&path).is_ok(), want.is_some(), "{contents:?}");
            std::fs::remove_file(&path).unwrap();
        }
        let not_utf8 = pin_file(dir.path(), b"\xff\xfe\n", 0o600);
        assert!(read_pin(&not_utf8).is_err());
        assert_eq!(
            format!("{:?}", read_pin_bytes(&not_utf8).unwrap()),
            "PinBytes([REDACTED])"
        );
        let long = pin_file(dir.path(), &[b'7'; MAX_PIN_LEN], 0o600);
        assert_eq!(read_pin_bytes(&long).unwrap().as_bytes().len(), MAX_PIN_LEN);
        let long_nl = pin_file(dir.path(), &[&[b'7'; MAX_PIN_LEN][..], b"\r\n"].concat(), 0o600);
        assert_eq!(read_pin_bytes(&long_nl).unwrap().as_bytes().len(), MAX_PIN_LEN);
        let too_long = pin_file(dir.path(), &[b'7'; MAX_PIN_LEN + 1], 0o600);
        assert!(read_pin(&too_long).is_err());
        let way_too_long = pin_file(dir.path(), &[b'7'; 4096], 0o600);
        assert!(read_pin(&way_too_long).is_err());
        // The error never carries the PIN.
        let msg = read_pin(&too_long).unwrap_err().to_string();
        assert!(!msg.contains("7777"), "{msg}");
    }

    #[test]
    fn pin_file_format_round_trips_and_refuses_garbage() {
        let path = Path::new("/x.pin");
        let pin = public_key_pin(&[0, 0, 0xc3, 0x01], &[1, 0, 1]);
        assert_eq!(parse_pin_file(path, &pin_file_contents(&pin)).unwrap(), pin);
        // Leading zeros of the modulus do not change the pin; anything else does.
        assert_eq!(pin, public_key_pin(&[0xc3, 0x01], &[0, 1, 0, 1]));
        assert_ne!(pin, public_key_pin(&[0xc3, 0x02], &[1, 0, 1]));
        assert_ne!(pin, public_key_pin(&[0xc3, 0x01], &[3]));
        // The length prefixes keep modulus and exponent apart.
        assert_ne!(public_key_pin(&[1, 2], &[3]), public_key_pin(&[1], &[2, 3]));
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            &format!("sha256:{}", "0".repeat(63)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{}\n\n", "0".repeat(64)),
            &format!("sha256:{}", "é".repeat(32)),
        ] {
            assert!(parse_pin_file(path, bad).is_err(), "{bad:?}");
        }
    }
}
