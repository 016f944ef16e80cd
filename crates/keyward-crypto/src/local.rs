//! The local KEK backend: an X25519 key pair in files inside the data directory.
//!
//! ```text
//! <data_dir>/kek/            mode 0700
//! <data_dir>/kek/local-1.pub 32-byte X25519 public key  (0644; read by the gateway)
//! <data_dir>/kek/local-1.key 32-byte X25519 private key (0600; read only by the worker)
//! ```
//!
//! The number in the kek id is the KEK version. Only version 1 is created today; rotation will
//! add `local-2`, … The `*_version` functions take the version as a parameter for that day.

use std::path::{Path, PathBuf};

use hpke::{Deserializable, Kem as _, Serializable};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::envelope::is_valid_kek_id;
use crate::fsutil::{self, Created, FileKind};
use crate::{CryptoError, Opener, Sealer};

type Kem = hpke::kem::X25519HkdfSha256;
type KemPublicKey = <Kem as hpke::Kem>::PublicKey;
type KemPrivateKey = <Kem as hpke::Kem>::PrivateKey;

/// The KEK version [`ensure_kek`], [`load_sealer`] and [`load_opener`] use.
pub const CURRENT_KEK_VERSION: u32 = 1;

/// Name of the directory, inside the data directory, that holds the KEK files.
pub const KEK_DIR: &str = "kek";

const KEY_LEN: usize = 32;
const KIND: FileKind = FileKind::Kek;

/// The kek id of local KEK `version`: `local-<version>`.
pub fn kek_id(version: u32) -> String {
    format!("local-{version}")
}

/// `<data_dir>/kek/local-<version>.pub`.
pub fn public_key_path(data_dir: &Path, version: u32) -> PathBuf {
    data_dir.join(KEK_DIR).join(format!("{}.pub", kek_id(version)))
}

/// `<data_dir>/kek/local-<version>.key`.
pub fn private_key_path(data_dir: &Path, version: u32) -> PathBuf {
    data_dir.join(KEK_DIR).join(format!("{}.key", kek_id(version)))
}

/// Creates the current KEK pair if absent; leaves an existing pair as it is, unread (only
/// its modes and sizes are checked). Errors if the private key file or the kek directory is
/// accessible by group or others.
pub fn ensure_kek(data_dir: &Path) -> Result<(), CryptoError> {
    ensure_kek_version(data_dir, CURRENT_KEK_VERSION)
}

/// Loads the seal-only half of the current KEK. Reads only the public key file.
pub fn load_sealer(data_dir: &Path) -> Result<Sealer, CryptoError> {
    load_sealer_version(data_dir, CURRENT_KEK_VERSION)
}

/// Loads the opening half of the current KEK: reads the private key file (which must have no
/// group/other permission bits) and checks it matches the public key file.
pub fn load_opener(data_dir: &Path) -> Result<Opener, CryptoError> {
    load_opener_version(data_dir, CURRENT_KEK_VERSION)
}

/// [`ensure_kek`] for a given KEK version.
///
/// Safe to run concurrently from several processes: files are created with `link(2)`, which
/// never overwrites, and a loser of the race adopts the winner's key.
pub fn ensure_kek_version(data_dir: &Path, version: u32) -> Result<(), CryptoError> {
    let kek_id = checked_kek_id(data_dir, version)?;
    fsutil::create_dir_0700(data_dir, KIND)?;
    fsutil::ensure_private_dir(&data_dir.join(KEK_DIR), KIND)?;
    let private_path = private_key_path(data_dir, version);
    let public_path = public_key_path(data_dir, version);

    // An existing pair is left unread: the gateway runs this at start and must never read
    // the private half. Its mode is checked here; that it matches the public half is
    // checked by `load_opener`, in the worker.
    if let (Ok(private_meta), Ok(public_meta)) = (std::fs::metadata(&private_path), std::fs::metadata(&public_path)) {
        use std::os::unix::fs::PermissionsExt;
        if private_meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::Permissions { path: private_path });
        }
        if private_meta.len() != KEY_LEN as u64 || public_meta.len() != KEY_LEN as u64 {
            return Err(KIND.err(
                &private_path,
                format!("KEK {kek_id}: key files must be {KEY_LEN} bytes each"),
            ));
        }
        return Ok(());
    }

    let private = match read_private(&private_path)? {
        Some(private) => private,
        None => {
            if fsutil::exists(&public_path, KIND)? {
                return Err(KIND.err(
                    &public_path,
                    format!(
                        "public key of KEK {kek_id} exists but its private key is missing; \
                         refusing to create a new pair (blobs sealed to the old one could never \
                         be opened)"
                    ),
                ));
            }
            let mut fresh = Zeroizing::new([0u8; KEY_LEN]);
            OsRng.fill_bytes(fresh.as_mut());
            // Whether we created it or another process beat us to it, read back what is there.
            fsutil::create_new_atomic(&private_path, fresh.as_ref(), 0o600, KIND)?;
            read_private(&private_path)?.ok_or_else(|| KIND.err(&private_path, "vanished right after being created"))?
        }
    };

    let public = Kem::sk_to_pk(&private).to_bytes();
    match fsutil::read_public::<KEY_LEN>(&public_path, KIND)? {
        Some(found) => check_pair(&public_path, &found, &public),
        None => match fsutil::create_new_atomic(&public_path, &public, 0o644, KIND)? {
            Created::Yes => Ok(()),
            Created::AlreadyExisted => {
                let found = fsutil::read_public::<KEY_LEN>(&public_path, KIND)?
                    .ok_or_else(|| KIND.err(&public_path, "vanished right after being created"))?;
                check_pair(&public_path, &found, &public)
            }
        },
    }
}

/// [`load_sealer`] for a given KEK version.
pub fn load_sealer_version(data_dir: &Path, version: u32) -> Result<Sealer, CryptoError> {
    let kek_id = checked_kek_id(data_dir, version)?;
    let path = public_key_path(data_dir, version);
    let bytes = fsutil::read_public::<KEY_LEN>(&path, KIND)?
        .ok_or_else(|| KIND.err(&path, "not found (run ensure_kek first)"))?;
    let public = KemPublicKey::from_bytes(&bytes).map_err(|_| KIND.err(&path, "not a valid X25519 public key"))?;
    Ok(Sealer::new(kek_id, public))
}

/// [`load_opener`] for a given KEK version.
pub fn load_opener_version(data_dir: &Path, version: u32) -> Result<Opener, CryptoError> {
    let kek_id = checked_kek_id(data_dir, version)?;
    let private_path = private_key_path(data_dir, version);
    let private =
        read_private(&private_path)?.ok_or_else(|| KIND.err(&private_path, "not found (run ensure_kek first)"))?;
    let public_path = public_key_path(data_dir, version);
    let found = fsutil::read_public::<KEY_LEN>(&public_path, KIND)?
        .ok_or_else(|| KIND.err(&public_path, "not found (run ensure_kek first)"))?;
    let opener = Opener::new(kek_id, private);
    check_pair(&public_path, &found, &opener.public_key().to_bytes())?;
    Ok(opener)
}

fn checked_kek_id(data_dir: &Path, version: u32) -> Result<String, CryptoError> {
    let id = kek_id(version);
    if version == 0 || !is_valid_kek_id(&id) {
        return Err(KIND.err(
            &data_dir.join(KEK_DIR),
            format!("invalid KEK version {version} (versions start at 1)"),
        ));
    }
    Ok(id)
}

fn read_private(path: &Path) -> Result<Option<KemPrivateKey>, CryptoError> {
    let Some(bytes) = fsutil::read_secret::<KEY_LEN>(path, KIND)? else {
        return Ok(None);
    };
    KemPrivateKey::from_bytes(bytes.as_ref())
        .map(Some)
        .map_err(|_| KIND.err(path, "not a valid X25519 private key"))
}

fn check_pair(public_path: &Path, found: &[u8], derived: &[u8]) -> Result<(), CryptoError> {
    if found == derived {
        Ok(())
    } else {
        Err(KIND.err(
            public_path,
            "does not match the private key next to it (KEK files mixed up or damaged)",
        ))
    }
}
