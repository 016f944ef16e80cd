//! The local KEK backend: an X25519 key pair in files inside the data directory.
//!
//! ```text
//! <data_dir>/kek/            mode 0700
//! <data_dir>/kek/local-1.pub 32-byte X25519 public key  (0644; read by the gateway)
//! <data_dir>/kek/local-1.key 32-byte X25519 private key (0600; read only by the worker)
//! <data_dir>/kek/local-2.pub  … one pair per live version
//! <data_dir>/kek/local-1.retired  empty marker: version 1 was retired (its key destroyed)
//! <data_dir>/kek/primary      the primary version, decimal (0600; absent: version 1)
//! <data_dir>/kek/.lock        empty; `flock`ed by rotate, promote and retire ([`lock`])
//! ```
//!
//! The number in the kek id is the KEK version. The *primary* version is the one new keys
//! are sealed to; the gateway loads only its public half ([`load_sealer`]). The worker loads
//! the private half of every live version ([`load_keyring`]) and opens a blob with the
//! version it names. [`rotate`] creates version `max + 1` and makes it primary; [`retire`]
//! destroys a non-primary version's private key (overwritten, fsynced, unlinked, directory
//! fsynced) and leaves a `.retired` marker so the number is never used again.
//!
//! # Why the primary is a file here and not a row in the database
//! The primary names the key the gateway seals to. A row would let anyone who can write the
//! database steer sealing (and, with the public key there too, to a key of their own). The
//! key pairs already live in this directory and travel together to every node (see the
//! README's multi-node section), so the marker travels with them: a node seals to a version
//! only once its files, and its workers, are there. `primary` is replaced atomically
//! (temp file, fsync, rename, directory fsync).

use std::path::{Path, PathBuf};

use hpke::{Deserializable, Kem as _, Serializable};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::fsutil::{self, Created, FileKind};
use crate::header::is_valid_kek_id;
use crate::{CryptoError, Keyring, Opener, SealedKey, Sealer};

type Kem = hpke::kem::X25519HkdfSha256;
type KemPublicKey = <Kem as hpke::Kem>::PublicKey;
type KemPrivateKey = <Kem as hpke::Kem>::PrivateKey;

/// The KEK version of a data directory that has never been rotated (no `primary` file).
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

/// Creates the KEK pair if absent on first start (version 1, no `primary` file yet); leaves
/// an existing pair as it is, unread (only its modes and sizes are checked). Once a rotation
/// has written `primary`, the primary version's files must already be there: they are never
/// made up on a node (a node making its own `local-2` would seal keys no other node opens).
/// Errors if the private key file or the kek directory is accessible by group or others.
pub fn ensure_kek(data_dir: &Path) -> Result<(), CryptoError> {
    match read_primary(data_dir)? {
        None => ensure_kek_version(data_dir, CURRENT_KEK_VERSION),
        Some(version) => {
            fsutil::ensure_private_dir(&data_dir.join(KEK_DIR), KIND)?;
            let public_path = public_key_path(data_dir, version);
            if !fsutil::exists(&public_path, KIND)? {
                return Err(KIND.err(
                    &public_path,
                    format!(
                        "KEK {} is the primary version but its files are missing here; copy \
                         kek/ from the node that ran `keyward kek rotate`",
                        kek_id(version)
                    ),
                ));
            }
            ensure_kek_version(data_dir, version)
        }
    }
}

/// Loads the seal-only half of the primary KEK version. Reads only `primary` and the public
/// key file.
pub fn load_sealer(data_dir: &Path) -> Result<Sealer, CryptoError> {
    load_sealer_version(data_dir, primary_version(data_dir)?)
}

/// Loads the opening half of the primary KEK version: reads the private key file (which must
/// have no group/other permission bits) and checks it matches the public key file.
pub fn load_opener(data_dir: &Path) -> Result<Opener, CryptoError> {
    load_opener_version(data_dir, primary_version(data_dir)?)
}

/// Name of the lock file inside the kek directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive `flock(2)` on `<data_dir>/kek/.lock`, held until dropped. Every operation
/// that picks a version number or changes which versions exist or which is primary (rotate,
/// promote, retire, for every backend) holds it, so two `keyward kek rotate` running at once
/// (on this machine, or on nodes sharing the directory over a filesystem with working
/// `flock`) create two distinct versions instead of both taking `max + 1`. Readers (the
/// gateway's watch, the worker's load) do not take it: every file they read is replaced
/// atomically. Not re-entrant: a holder must not call another locking function.
#[derive(Debug)]
pub struct KekLock {
    _file: std::fs::File,
}

/// Takes the kek directory's lock (creating the directory, mode 0700, and the lock file, mode
/// 0600, if absent), waiting for another holder to drop it.
pub fn lock(data_dir: &Path) -> Result<KekLock, CryptoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = data_dir.join(KEK_DIR);
    fsutil::create_dir_0700(data_dir, KIND)?;
    fsutil::ensure_private_dir(&dir, KIND)?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| KIND.err(&path, format!("cannot open lock file: {e}")))?;
    file.lock().map_err(|e| KIND.err(&path, format!("cannot lock: {e}")))?;
    Ok(KekLock { _file: file })
}

/// Name of the file, inside the kek directory, naming the primary version.
pub const PRIMARY_FILE: &str = "primary";

/// `<data_dir>/kek/primary`.
pub fn primary_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEK_DIR).join(PRIMARY_FILE)
}

/// `<data_dir>/kek/local-<version>.retired`.
pub fn retired_marker_path(data_dir: &Path, version: u32) -> PathBuf {
    data_dir.join(KEK_DIR).join(format!("{}.retired", kek_id(version)))
}

fn read_primary(data_dir: &Path) -> Result<Option<u32>, CryptoError> {
    let path = primary_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KIND.err(&path, format!("cannot read: {e}"))),
    };
    match text.trim().parse::<u32>() {
        Ok(v) if v > 0 => Ok(Some(v)),
        _ => Err(KIND.err(&path, "must hold one KEK version number (1 or more)")),
    }
}

/// What `primary` says, if the file exists (a backend whose versions live elsewhere, such as
/// PKCS#11, keeps its primary in the same file).
pub fn primary_file_version(data_dir: &Path) -> Result<Option<u32>, CryptoError> {
    read_primary(data_dir)
}

/// Writes `primary` (atomically), for a backend whose versions are not files here.
/// [`set_primary`] is the local backend's checked form.
/// Takes the kek directory's [`lock`] (use [`write_primary_locked`] while holding it).
pub fn write_primary(data_dir: &Path, version: u32) -> Result<(), CryptoError> {
    let held = lock(data_dir)?;
    write_primary_locked(&held, data_dir, version)
}

/// [`write_primary`] for a caller already holding the kek directory's [`lock`] (the guard is
/// asked for as proof).
pub fn write_primary_locked(_held: &KekLock, data_dir: &Path, version: u32) -> Result<(), CryptoError> {
    checked_kek_id(data_dir, version)?;
    fsutil::create_dir_0700(data_dir, KIND)?;
    fsutil::ensure_private_dir(&data_dir.join(KEK_DIR), KIND)?;
    fsutil::replace_atomic(&primary_path(data_dir), format!("{version}\n").as_bytes(), 0o600, KIND)
}

/// The primary KEK version: what `primary` says, or 1 when there is no such file (a data
/// directory that has never been rotated).
pub fn primary_version(data_dir: &Path) -> Result<u32, CryptoError> {
    Ok(read_primary(data_dir)?.unwrap_or(CURRENT_KEK_VERSION))
}

/// What the kek directory holds, from its file names only (no key file is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalKekState {
    /// The version new keys are sealed to.
    pub primary: u32,
    /// Versions whose private key file is present (what a worker loads), ascending.
    pub private: Vec<u32>,
    /// Versions whose public key file is present, ascending.
    pub public: Vec<u32>,
    /// Versions retired (destroyed), ascending.
    pub retired: Vec<u32>,
}

impl LocalKekState {
    /// The highest version number ever used here (live or retired).
    fn highest(&self) -> u32 {
        let all = self.private.iter().chain(&self.public).chain(&self.retired);
        all.copied().max().unwrap_or(0).max(self.primary)
    }
}

/// Lists the kek directory: the primary version and the versions present or retired.
/// Reads `primary` and file names; never a key file.
pub fn state(data_dir: &Path) -> Result<LocalKekState, CryptoError> {
    let dir = data_dir.join(KEK_DIR);
    let mut st = LocalKekState {
        primary: primary_version(data_dir)?,
        private: Vec::new(),
        public: Vec::new(),
        retired: Vec::new(),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(st),
        Err(e) => return Err(KIND.err(&dir, format!("cannot list: {e}"))),
    };
    for entry in entries {
        let entry = entry.map_err(|e| KIND.err(&dir, format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("local-") else {
            continue;
        };
        let Some((num, ext)) = rest.split_once('.') else {
            continue;
        };
        let Ok(version) = num.parse::<u32>() else { continue };
        if version == 0 || num.starts_with('0') {
            continue;
        }
        match ext {
            "key" => st.private.push(version),
            "pub" => st.public.push(version),
            "retired" => st.retired.push(version),
            _ => {}
        }
    }
    st.private.sort_unstable();
    st.public.sort_unstable();
    st.retired.sort_unstable();
    Ok(st)
}

/// Loads the opening half of every version whose private key file is present: all the
/// worker needs (it reads them before sandboxing itself). The primary version must be among
/// them.
pub fn load_keyring(data_dir: &Path) -> Result<Keyring, CryptoError> {
    let st = state(data_dir)?;
    if !st.private.contains(&st.primary) {
        return Err(KIND.err(
            &private_key_path(data_dir, st.primary),
            format!(
                "KEK {} is the primary version but its private key is missing",
                kek_id(st.primary)
            ),
        ));
    }
    let openers = st
        .private
        .iter()
        .map(|&v| load_opener_version(data_dir, v))
        .collect::<Result<Vec<_>, _>>()?;
    Keyring::new(openers)
}

/// The opening half of the version `blob` names, for a tool or test that opens one blob
/// synchronously with this node's files (the worker loads every version: [`load_keyring`]).
/// A version whose private key is not here (retired, never installed, another backend's) is
/// [`CryptoError::KekUnavailable`], as a keyring answers.
pub fn load_opener_for(data_dir: &Path, blob: &SealedKey) -> Result<Opener, CryptoError> {
    let wanted = blob.kek_id()?;
    match state(data_dir)?.private.into_iter().find(|&v| kek_id(v) == wanted) {
        Some(version) => load_opener_version(data_dir, version),
        None => Err(CryptoError::KekUnavailable { kek_id: wanted }),
    }
}

/// Creates version `highest + 1`. With `make_primary`, also makes it the primary version
/// (new keys are sealed to it once each gateway notices). Without, it is staged: present for
/// the workers, not yet sealed to (see [`set_primary`]). Returns the new version.
///
/// Holds the kek directory's [`lock`] throughout, so concurrent rotations get distinct
/// versions.
pub fn rotate(data_dir: &Path, make_primary: bool) -> Result<u32, CryptoError> {
    let _lock = lock(data_dir)?;
    ensure_kek(data_dir)?;
    let next = state(data_dir)?
        .highest()
        .checked_add(1)
        .ok_or_else(|| KIND.err(&data_dir.join(KEK_DIR), "no KEK version numbers left"))?;
    ensure_kek_version(data_dir, next)?;
    if make_primary {
        set_primary_unlocked(data_dir, next)?;
    }
    Ok(next)
}

/// Makes `version` the primary. Both of its key files must be present. Holds the kek
/// directory's [`lock`].
pub fn set_primary(data_dir: &Path, version: u32) -> Result<(), CryptoError> {
    let _lock = lock(data_dir)?;
    set_primary_unlocked(data_dir, version)
}

fn set_primary_unlocked(data_dir: &Path, version: u32) -> Result<(), CryptoError> {
    checked_kek_id(data_dir, version)?;
    for path in [public_key_path(data_dir, version), private_key_path(data_dir, version)] {
        if !fsutil::exists(&path, KIND)? {
            return Err(KIND.err(&path, "not found: only a version with both key files can be primary"));
        }
    }
    fsutil::replace_atomic(&primary_path(data_dir), format!("{version}\n").as_bytes(), 0o600, KIND)
}

/// Destroys KEK `version`: refuses the primary; otherwise overwrites its private key file
/// with random bytes, fsyncs, unlinks it, removes the public key file, leaves a `.retired`
/// marker (so the number is never reused) and fsyncs the directory. After this, nothing on
/// this node can open a blob sealed to `version`. Whether live blobs still use it is the
/// caller's check (it needs the database). Returns false if the version was already gone.
/// Holds the kek directory's [`lock`] (so a concurrent promote cannot make it primary
/// between the check and the destruction).
pub fn retire(data_dir: &Path, version: u32) -> Result<bool, CryptoError> {
    checked_kek_id(data_dir, version)?;
    let _lock = lock(data_dir)?;
    if version == primary_version(data_dir)? {
        return Err(KIND.err(
            &primary_path(data_dir),
            format!("KEK {} is the primary version; rotate first", kek_id(version)),
        ));
    }
    let marker = retired_marker_path(data_dir, version);
    // The marker first: if we crash halfway, the number is still never reused.
    if !fsutil::exists(&marker, KIND)? {
        fsutil::replace_atomic(&marker, b"", 0o600, KIND)?;
    }
    let shredded = fsutil::shred_and_remove(&private_key_path(data_dir, version), KIND)?;
    let public = public_key_path(data_dir, version);
    let had_public = match std::fs::remove_file(&public) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(KIND.err(&public, format!("cannot remove: {e}"))),
    };
    fsutil::sync_dir(&data_dir.join(KEK_DIR), KIND)?;
    Ok(shredded || had_public)
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
    let opener = Opener::new(kek_id, &private)?;
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
