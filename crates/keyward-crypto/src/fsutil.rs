//! Small file helpers shared by the local KEK backend and the audit chain key: owner-only
//! directories, secret files created atomically with mode 0600, exact-length reads into
//! zeroizing buffers. Unix only (the service runs on Linux).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::CryptoError;

/// Permission bits that must be clear on a secret file or an owner-only directory.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Which error variant file problems are reported as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FileKind {
    Kek,
    AuditKey,
    CheckpointKey,
}

impl FileKind {
    pub(crate) fn err(self, path: &Path, reason: impl Into<String>) -> CryptoError {
        let path = path.to_path_buf();
        let reason = reason.into();
        match self {
            FileKind::Kek => CryptoError::KekFile { path, reason },
            FileKind::AuditKey => CryptoError::AuditKeyFile { path, reason },
            FileKind::CheckpointKey => CryptoError::CheckpointKeyFile { path, reason },
        }
    }

    fn io(self, path: &Path, what: &str, e: &io::Error) -> CryptoError {
        self.err(path, format!("{what}: {e}"))
    }
}

/// Creates `dir` (and missing parents) with mode 0700 if absent. Does not check an existing
/// directory's permissions.
pub(crate) fn create_dir_0700(dir: &Path, kind: FileKind) -> Result<(), CryptoError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| kind.io(dir, "cannot create directory", &e))
}

/// Creates `dir` with mode 0700 if absent, then checks it is a directory with no group or
/// other permission bits.
pub(crate) fn ensure_private_dir(dir: &Path, kind: FileKind) -> Result<(), CryptoError> {
    create_dir_0700(dir, kind)?;
    let meta = fs::metadata(dir).map_err(|e| kind.io(dir, "cannot stat directory", &e))?;
    if !meta.is_dir() {
        return Err(kind.err(dir, "not a directory"));
    }
    // A root-owned directory that nobody else may write is the two-user layout (keyward-server
    // `users.rs`): the gateway and the worker both list it, each file's own owner and mode
    // guard it (private halves: the worker's, 0400).
    let two_user_layout = {
        use std::os::unix::fs::MetadataExt;
        meta.uid() == 0 && meta.mode() & 0o022 == 0
    };
    if meta.permissions().mode() & GROUP_OTHER_BITS != 0 && !two_user_layout {
        return Err(CryptoError::Permissions {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Opens `path` for reading; `Ok(None)` if it does not exist. Checks it is a regular file of
/// exactly `N` bytes (and, if `secret`, that it has no group/other permission bits: checked on
/// the open file, so there is no window between the check and the read).
fn open_exact<const N: usize>(path: &Path, kind: FileKind, secret: bool) -> Result<Option<File>, CryptoError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(kind.io(path, "cannot open", &e)),
    };
    let meta = file.metadata().map_err(|e| kind.io(path, "cannot stat", &e))?;
    if !meta.is_file() {
        return Err(kind.err(path, "not a regular file"));
    }
    if secret && meta.mode() & GROUP_OTHER_BITS != 0 {
        return Err(CryptoError::Permissions {
            path: path.to_path_buf(),
        });
    }
    if meta.len() != N as u64 {
        return Err(kind.err(path, format!("expected exactly {N} bytes, found {}", meta.len())));
    }
    Ok(Some(file))
}

/// Reads a secret file of exactly `N` bytes into a zeroizing buffer; `Ok(None)` if absent.
/// Refuses a file with group/other permission bits.
pub(crate) fn read_secret<const N: usize>(
    path: &Path,
    kind: FileKind,
) -> Result<Option<Zeroizing<[u8; N]>>, CryptoError> {
    let Some(mut file) = open_exact::<N>(path, kind, true)? else {
        return Ok(None);
    };
    let mut buf = Zeroizing::new([0u8; N]);
    file.read_exact(buf.as_mut())
        .map_err(|e| kind.io(path, "cannot read", &e))?;
    Ok(Some(buf))
}

/// Reads a public (non-secret) file of exactly `N` bytes; `Ok(None)` if absent.
pub(crate) fn read_public<const N: usize>(path: &Path, kind: FileKind) -> Result<Option<[u8; N]>, CryptoError> {
    let Some(mut file) = open_exact::<N>(path, kind, false)? else {
        return Ok(None);
    };
    let mut buf = [0u8; N];
    file.read_exact(&mut buf)
        .map_err(|e| kind.io(path, "cannot read", &e))?;
    Ok(Some(buf))
}

/// Whether anything (even a dangling symlink) exists at `path`; errors other than "not found" are reported.
pub(crate) fn exists(path: &Path, kind: FileKind) -> Result<bool, CryptoError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(kind.io(path, "cannot stat", &e)),
    }
}

/// What [`create_new_atomic`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Created {
    /// The file was created with the given contents.
    Yes,
    /// A file already existed at the path; it was left untouched.
    AlreadyExisted,
}

/// Removes the temporary file when dropped (after a failure or after linking).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Atomically creates `path` with `contents` and `mode`, never overwriting an existing file:
/// the bytes go to a fresh temp file in the same directory (opened `O_CREAT|O_EXCL` with
/// `mode`, so it is never readable by others, not even for an instant), are fsynced, and the
/// temp file is then hard-linked to `path`. `link(2)` fails if `path` exists, so two processes
/// racing to create the same key cannot overwrite each other (a `rename` would). Readers see
/// either no file or the complete file.
pub(crate) fn create_new_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    kind: FileKind,
) -> Result<Created, CryptoError> {
    let dir = path
        .parent()
        .ok_or_else(|| kind.err(path, "path has no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| kind.err(path, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{:016x}", std::process::id(), OsRng.next_u64()));
    let tmp_path = dir.join(tmp_name);

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp_path)
        .map_err(|e| kind.io(&tmp_path, "cannot create temporary file", &e))?;
    let tmp = TempFile(tmp_path);
    file.write_all(contents)
        .map_err(|e| kind.io(&tmp.0, "cannot write temporary file", &e))?;
    file.sync_all()
        .map_err(|e| kind.io(&tmp.0, "cannot sync temporary file", &e))?;
    drop(file);

    let created = match fs::hard_link(&tmp.0, path) {
        Ok(()) => Created::Yes,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Created::AlreadyExisted,
        Err(e) => return Err(kind.io(path, "cannot link into place", &e)),
    };
    drop(tmp);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| kind.io(dir, "cannot sync directory", &e))?;
    Ok(created)
}

/// Atomically writes `path` with `contents` and `mode`, replacing any file there: a fresh temp
/// file in the same directory is written and fsynced, renamed over `path`, and the directory
/// fsynced. Readers see the old file or the new one, never a mix. For small state files
/// (never for key material: keys are created with [`create_new_atomic`], which never
/// overwrites).
pub(crate) fn replace_atomic(path: &Path, contents: &[u8], mode: u32, kind: FileKind) -> Result<(), CryptoError> {
    let dir = path
        .parent()
        .ok_or_else(|| kind.err(path, "path has no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| kind.err(path, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{:016x}", std::process::id(), OsRng.next_u64()));
    let tmp = TempFile(dir.join(tmp_name));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp.0)
        .map_err(|e| kind.io(&tmp.0, "cannot create temporary file", &e))?;
    file.write_all(contents)
        .map_err(|e| kind.io(&tmp.0, "cannot write temporary file", &e))?;
    file.sync_all()
        .map_err(|e| kind.io(&tmp.0, "cannot sync temporary file", &e))?;
    drop(file);
    fs::rename(&tmp.0, path).map_err(|e| kind.io(path, "cannot rename into place", &e))?;
    sync_dir(dir, kind)
}

/// fsyncs a directory, so a rename, link or unlink inside it is durable.
pub(crate) fn sync_dir(dir: &Path, kind: FileKind) -> Result<(), CryptoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| kind.io(dir, "cannot sync directory", &e))
}

/// Destroys a secret file: overwrites its bytes in place with random data, fsyncs, unlinks
/// it and fsyncs its directory. `Ok(false)` if there was no file. (On a copy-on-write or
/// journaling-data filesystem, or an SSD that remaps blocks, the old bytes may survive the
/// overwrite on the medium; the unlink is what every reader of the filesystem sees.)
pub(crate) fn shred_and_remove(path: &Path, kind: FileKind) -> Result<bool, CryptoError> {
    let mut file = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(kind.io(path, "cannot open for shredding", &e)),
    };
    let len = file.metadata().map_err(|e| kind.io(path, "cannot stat", &e))?.len();
    let mut noise = Zeroizing::new(vec![0u8; usize::try_from(len).unwrap_or(0)]);
    OsRng.fill_bytes(noise.as_mut_slice());
    file.write_all(&noise)
        .map_err(|e| kind.io(path, "cannot overwrite", &e))?;
    file.sync_all().map_err(|e| kind.io(path, "cannot sync", &e))?;
    drop(file);
    fs::remove_file(path).map_err(|e| kind.io(path, "cannot remove", &e))?;
    let dir = path
        .parent()
        .ok_or_else(|| kind.err(path, "path has no parent directory"))?;
    sync_dir(dir, kind)?;
    Ok(true)
}
