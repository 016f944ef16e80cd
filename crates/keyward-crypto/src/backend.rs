//! [`KekBackend`]: the one handle on the configured KEK backend, built once from a
//! [`KekSpec`] and the data directory. Everything keyward does with KEK versions goes
//! through it: the gateway's sealer, the worker's keyring, the primary version, `keyward kek`
//! status / rotate / promote / retire, preparing the data directory, and what the gateway's
//! watch looks at.
//!
//! # Why an enum and not a trait object
//! The backends are a closed set fixed at build time by cargo features, and most operations
//! are `async` (KMS). A `dyn` trait would need a boxed future per call (sealing is on the
//! request path) and object-safe signatures for each; an enum is a direct call, and every
//! per-backend `match` of keyward lives in this crate (here, in `spec.rs` and in
//! `keyring.rs`), where the compiler lists each arm a new backend must add. Adding a backend
//! is a variant of [`Spec`] and its arms: nothing outside keyward-crypto changes.
//!
//! # Seal only in the gateway
//! [`KekBackend::sealer`] builds a [`KekSealer`]: a public half (local), a token session
//! that never logs in (PKCS#11), or KMS with the gateway's encrypt-only credentials. It reads
//! nothing secret, and a [`KekSealer`] cannot open. [`KekBackend::keyring`] is the worker's,
//! called before its sandbox: it reads what only the worker may (the private key files, the
//! PIN file, the worker's credentials file) and is the only way to a [`Keyring`] built from
//! configuration.

use std::path::{Path, PathBuf};

use crate::local::{self, LocalKekState};
use crate::spec::{KekSpec, Spec};
use crate::{CryptoError, KekSealer, Keyring};

/// The configured KEK backend on this node's data directory. Cheap to build (nothing is read
/// or connected until an operation needs it).
#[derive(Debug, Clone)]
pub struct KekBackend {
    data_dir: PathBuf,
    spec: Spec,
}

/// What a worker loads before sandboxing itself ([`KekBackend::keyring`]).
#[derive(Debug)]
pub struct WorkerKeyring {
    /// Every live version's opening half.
    pub keyring: Keyring,
    /// Paths the backend still reads after start-up, for the sandbox's read-only list
    /// (PKCS#11: `sandbox-read=`).
    pub sandbox_read: Vec<PathBuf>,
}

/// What [`KekBackend::rotate`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The new version.
    pub version: u32,
    /// The key the backend created outside this node for it (AWS KMS: its key id), to log.
    pub created_key_id: Option<String>,
}

/// What [`KekBackend::retire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Whether key material was destroyed now (false: it was gone already).
    pub destroyed: bool,
    /// AWS KMS: the key was disabled and its deletion scheduled (KMS deletes it later).
    pub scheduled_deletion: Option<ScheduledDeletion>,
}

/// A key disabled now and deleted by its keeper later (AWS KMS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledDeletion {
    /// The key recorded for the version, if one was.
    pub key_id: Option<String>,
    /// When it is deleted (seconds since the epoch), if the keeper said.
    pub deletion_date: Option<i64>,
}

/// The versions a backend lists from this node's files ([`KekBackend::versions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionList {
    /// In ascending order.
    pub versions: Vec<VersionInfo>,
    /// Whether the list names every version that can exist here, so that blobs naming any
    /// other kek id are worth reporting as unknown (local: every version is a file here).
    pub exhaustive: bool,
}

/// One version as [`KekBackend::versions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u32,
    pub kek_id: String,
    pub retired: bool,
    /// What else the backend knows of it, by name (local: `private_key`, `public_key`;
    /// AWS KMS: `kms_key_id`).
    pub facts: Vec<(&'static str, VersionFact)>,
}

/// A value in [`VersionInfo::facts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionFact {
    Flag(bool),
    Text(Option<String>),
}

impl KekBackend {
    /// The backend `spec` names, keeping its state under `data_dir` (`kek/`).
    pub fn new(spec: &KekSpec, data_dir: impl Into<PathBuf>) -> KekBackend {
        let data_dir = data_dir.into();
        let spec = match &spec.0 {
            Spec::Local => Spec::Local,
            // Their version pins, key ids, markers, `primary` and lock live in `kek/`.
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => Spec::Pkcs11(Box::new((**c).clone().with_data_dir(&data_dir))),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => Spec::AwsKms(Box::new((**c).clone().with_data_dir(&data_dir))),
        };
        KekBackend { data_dir, spec }
    }

    /// This backend with `path` as the credentials `rotate` and `retire` use (`keyward kek
    /// … --credentials-file`). `None` when the backend reads no such file (only AWS KMS does).
    pub fn with_admin_credentials_file(self, path: &Path) -> Option<KekBackend> {
        match self.spec {
            #[cfg(feature = "awskms")]
            Spec::AwsKms(mut c) => {
                c.admin_credentials_file = Some(path.to_path_buf());
                Some(KekBackend {
                    data_dir: self.data_dir,
                    spec: Spec::AwsKms(c),
                })
            }
            _ => {
                let _ = path;
                None
            }
        }
    }

    /// The backend's name: `local`, `pkcs11` or `awskms`.
    pub fn name(&self) -> &'static str {
        self.spec.name()
    }

    /// The data directory this backend keeps its `kek/` in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The kek id of `version` (what blobs sealed to it name).
    pub fn kek_id(&self, version: u32) -> String {
        match &self.spec {
            Spec::Local => local::kek_id(version),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => crate::pkcs11::kek_id(&c.key_label, version),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => crate::awskms::kek_id(version),
        }
    }

    /// What the data directory needs before anything seals (run by every start and
    /// command). Local: the first key pair, on first use (an existing pair is left unread).
    /// PKCS#11: nothing (versions are made in the token by `keyward kek rotate`, which needs
    /// the PIN `serve` never reads). AWS KMS: `key-id=` recorded as version 1 on first
    /// start, and checked against that record after.
    pub fn prepare(&self) -> Result<(), CryptoError> {
        match &self.spec {
            Spec::Local => local::ensure_kek(&self.data_dir),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => Ok(()),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => crate::awskms::bootstrap(c),
        }
    }

    /// The primary version: what `kek/primary` says (local: 1 when absent; PKCS#11 and
    /// AWS KMS: an error until a version exists).
    pub fn primary(&self) -> Result<u32, CryptoError> {
        match &self.spec {
            Spec::Local => local::primary_version(&self.data_dir),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => local::primary_file_version(&self.data_dir)?.ok_or_else(|| CryptoError::Backend {
                backend: crate::spec::PKCS11,
                reason: "no KEK version yet; create one with `keyward kek rotate`".to_owned(),
            }),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => crate::awskms::primary(c),
        }
    }

    /// The seal-only half of KEK `version`: all the gateway ever loads (see the module doc).
    pub fn sealer(&self, version: u32) -> Result<KekSealer, CryptoError> {
        match &self.spec {
            Spec::Local => Ok(KekSealer::Local(local::load_sealer_version(&self.data_dir, version)?)),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => Ok(KekSealer::Pkcs11(
                crate::pkcs11::Pkcs11Kek::connect(c)?.sealer(version)?,
            )),
            // The gateway's credentials (encrypt-only) are read here; never the worker's.
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => Ok(KekSealer::AwsKms(crate::awskms::sealer(c, version)?)),
        }
    }

    /// Worker only, before its sandbox: the opening half of every live version (the primary
    /// must be among them), reading what only the worker may: the local private key files,
    /// the PKCS#11 PIN file (logging in), the worker's AWS credentials file. After the
    /// sandbox the data directory is out of reach, so a rotation or retirement reaches a
    /// worker when the gateway restarts it.
    pub fn keyring(&self) -> Result<WorkerKeyring, CryptoError> {
        match &self.spec {
            Spec::Local => Ok(WorkerKeyring {
                keyring: local::load_keyring(&self.data_dir)?,
                sandbox_read: Vec::new(),
            }),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => {
                // The module is loaded and logged in here; it may keep reading its own state
                // (`sandbox-read=`) afterwards, never writing.
                let kek = crate::pkcs11::Pkcs11Kek::connect(c)?;
                let primary = self.primary()?;
                let mut openers = Vec::new();
                for version in 1..=primary {
                    match kek.opener(version) {
                        Ok(o) => openers.push(crate::KekOpener::Pkcs11(o)),
                        // Retired (destroyed in the token).
                        Err(CryptoError::KekUnavailable { .. }) if version != primary => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(WorkerKeyring {
                    keyring: Keyring::of(openers)?,
                    sandbox_read: c.sandbox_read.clone(),
                })
            }
            // KMS is then reached over the network only (connect is allowed; CA roots are
            // under /etc).
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => Ok(WorkerKeyring {
                keyring: Keyring::of(
                    crate::awskms::openers(c)?
                        .into_iter()
                        .map(crate::KekOpener::AwsKms)
                        .collect(),
                )?,
                sandbox_read: Vec::new(),
            }),
        }
    }

    /// Whether [`KekBackend::rotate`] can stage a version (create it without making it
    /// primary). PKCS#11 cannot: its versions are made primary as they are created.
    pub fn supports_staged(&self) -> bool {
        match &self.spec {
            Spec::Local => true,
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => false,
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => true,
        }
    }

    /// `keyward kek rotate`: creates the next version (numbered, created and, unless
    /// `staged`, made primary under the kek directory's lock).
    pub async fn rotate(&self, staged: bool) -> Result<Rotated, CryptoError> {
        match &self.spec {
            Spec::Local => Ok(Rotated {
                version: local::rotate(&self.data_dir, !staged)?,
                created_key_id: None,
            }),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => {
                if staged {
                    return Err(CryptoError::Backend {
                        backend: crate::spec::PKCS11,
                        reason: "versions cannot be staged: each is made primary as it is created".to_owned(),
                    });
                }
                // Generated in the token, pinned, made primary.
                Ok(Rotated {
                    version: crate::pkcs11::Pkcs11Kek::connect(c)?.rotate()?,
                    created_key_id: None,
                })
            }
            // A new key in KMS (the rotate credentials need kms:CreateKey), recorded in
            // kek/awskms-N.keyid.
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => {
                let (version, key_id) = crate::awskms::rotate(c, &c.admin_credentials()?, !staged).await?;
                Ok(Rotated {
                    version,
                    created_key_id: Some(key_id),
                })
            }
        }
    }

    /// `keyward kek promote`: makes a staged `version` primary (checked first: local, both
    /// key files; PKCS#11, the public key against its pin and the private key in the token;
    /// AWS KMS, a live recorded key).
    pub fn promote(&self, version: u32) -> Result<(), CryptoError> {
        match &self.spec {
            Spec::Local => local::set_primary(&self.data_dir, version),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => crate::pkcs11::Pkcs11Kek::connect(c)?.promote(version),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => crate::awskms::promote(c, version),
        }
    }

    /// Destroys `version` (never the primary; whether saved keys still use it is the
    /// caller's check, it needs the database). Local: the private key file overwritten and
    /// removed; PKCS#11: both objects destroyed in the token; AWS KMS: the key disabled now
    /// and its deletion scheduled. Each leaves a `.retired` marker so no worker loads the
    /// version again and its number is never reused.
    pub async fn retire(&self, version: u32) -> Result<Retired, CryptoError> {
        match &self.spec {
            Spec::Local => Ok(Retired {
                destroyed: local::retire(&self.data_dir, version)?,
                scheduled_deletion: None,
            }),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => Ok(Retired {
                destroyed: crate::pkcs11::Pkcs11Kek::connect(c)?.retire(version)? > 0,
                scheduled_deletion: None,
            }),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => {
                let r = crate::awskms::retire(c, &c.admin_credentials()?, version).await?;
                Ok(Retired {
                    destroyed: r.key_id.is_some(),
                    scheduled_deletion: Some(ScheduledDeletion {
                        key_id: r.key_id,
                        deletion_date: r.deletion_date,
                    }),
                })
            }
        }
    }

    /// The versions this node's `kek/` records, for `keyward kek status`. `None` when the
    /// backend keeps them elsewhere (PKCS#11: in the token).
    pub fn versions(&self) -> Result<Option<VersionList>, CryptoError> {
        match &self.spec {
            Spec::Local => {
                let st = local::state(&self.data_dir)?;
                let mut numbers: Vec<u32> = st
                    .private
                    .iter()
                    .chain(&st.public)
                    .chain(&st.retired)
                    .copied()
                    .collect();
                numbers.sort_unstable();
                numbers.dedup();
                let versions = numbers
                    .into_iter()
                    .map(|v| VersionInfo {
                        version: v,
                        kek_id: local::kek_id(v),
                        retired: st.retired.contains(&v),
                        facts: vec![
                            ("private_key", VersionFact::Flag(st.private.contains(&v))),
                            ("public_key", VersionFact::Flag(st.public.contains(&v))),
                        ],
                    })
                    .collect();
                Ok(Some(VersionList {
                    versions,
                    exhaustive: true,
                }))
            }
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => Ok(None),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => {
                let versions = crate::awskms::versions(&self.data_dir)?
                    .into_iter()
                    .map(|v| VersionInfo {
                        version: v.version,
                        kek_id: crate::awskms::kek_id(v.version),
                        retired: v.retired,
                        facts: vec![("kms_key_id", VersionFact::Text(v.key_id))],
                    })
                    .collect();
                Ok(Some(VersionList {
                    versions,
                    exhaustive: false,
                }))
            }
        }
    }

    /// What a running gateway watches to notice a rotation or retirement: the kek
    /// directory's `primary` and its local key files, by name (no key file is read). The
    /// same for every backend (a new AWS KMS `.keyid` is picked up by a restart).
    pub fn observe(&self) -> Result<LocalKekState, CryptoError> {
        local::state(&self.data_dir)
    }

    /// Whether the gateway may switch to sealing to `seen.primary` now. Local: only once
    /// both of its key files are here (a half-copied `kek/` is waited for, rather than
    /// restarting workers that could not start); the other backends keep no such files.
    pub fn can_seal_to(&self, seen: &LocalKekState) -> bool {
        match &self.spec {
            Spec::Local => seen.private.contains(&seen.primary) && seen.public.contains(&seen.primary),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => true,
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Binding;

    const BINDING: Binding<'static> = Binding {
        account_id: "acc_1",
        provider: "openai",
        key_id: "key_1",
    };

    #[tokio::test]
    async fn local_backend_seals_for_its_keyring_rotates_and_retires() {
        let dir = tempfile::tempdir().unwrap();
        let kek = KekBackend::new(&KekSpec::local(), dir.path());
        assert_eq!((kek.name(), kek.data_dir()), ("local", dir.path()));
        kek.prepare().unwrap();
        assert_eq!(kek.primary().unwrap(), 1);
        assert!(kek.supports_staged());
        let sealer = kek.sealer(1).unwrap();
        assert_eq!((sealer.kek_id(), sealer.backend()), ("local-1", "local"));
        let old = sealer.seal(&BINDING, b"sk-old").await.unwrap();

        let r = kek.rotate(false).await.unwrap();
        assert_eq!(
            r,
            Rotated {
                version: 2,
                created_key_id: None
            }
        );
        assert_eq!(kek.rotate(true).await.unwrap().version, 3);
        assert_eq!(kek.primary().unwrap(), 2, "staged");
        assert!(!kek.can_seal_to(&LocalKekState {
            primary: 4,
            ..kek.observe().unwrap()
        }));
        assert!(kek.can_seal_to(&kek.observe().unwrap()));
        kek.promote(3).unwrap();
        assert_eq!(kek.primary().unwrap(), 3);

        let worker = kek.keyring().unwrap();
        assert!(worker.sandbox_read.is_empty());
        assert_eq!(worker.keyring.kek_ids(), vec!["local-1", "local-2", "local-3"]);
        let mut scratch = [0u8; 128];
        let moved = worker
            .keyring
            .rewrap(&BINDING, &old, &kek.kek_id(3), &mut scratch)
            .await
            .unwrap();
        let mut out = [0u8; 64];
        let n = worker.keyring.open_into(&BINDING, &moved, &mut out).await.unwrap();
        assert_eq!(out.get(..n), Some(&b"sk-old"[..]));

        assert!(kek.retire(3).await.is_err(), "the primary is never retired");
        assert_eq!(
            kek.retire(1).await.unwrap(),
            Retired {
                destroyed: true,
                scheduled_deletion: None
            }
        );
        let list = kek.versions().unwrap().unwrap();
        assert!(list.exhaustive);
        let first = list.versions.first().unwrap();
        assert_eq!(
            (first.version, first.kek_id.as_str(), first.retired),
            (1, "local-1", true)
        );
        assert_eq!(
            first.facts,
            vec![
                ("private_key", VersionFact::Flag(false)),
                ("public_key", VersionFact::Flag(false))
            ]
        );
        assert_eq!(list.versions.len(), 3);
        assert!(kek.with_admin_credentials_file(Path::new("/x")).is_none());
    }

    /// The data directory of the backend is the one it was built with, for every backend
    /// (the KMS and PKCS#11 configurations keep their versions there).
    #[cfg(feature = "awskms")]
    #[test]
    fn awskms_backend_keeps_its_versions_in_the_data_dir_and_takes_admin_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let spec = KekSpec::parse("awskms:key-id=k1;region=eu-west-1;worker-credentials-file=/w").unwrap();
        let kek = KekBackend::new(&spec, dir.path());
        let Spec::AwsKms(c) = &kek.spec else { panic!("{kek:?}") };
        assert_eq!(c.data_dir.as_deref(), Some(dir.path()));
        assert_eq!(kek.kek_id(4), "awskms-4");
        kek.prepare().unwrap();
        assert_eq!(kek.primary().unwrap(), 1);
        let kek = kek.with_admin_credentials_file(Path::new("/admin")).unwrap();
        let Spec::AwsKms(c) = &kek.spec else { panic!("{kek:?}") };
        assert_eq!(c.admin_credentials_file.as_deref(), Some(Path::new("/admin")));
        let list = kek.versions().unwrap().unwrap();
        assert_eq!(
            list.versions.first().unwrap().facts,
            vec![("kms_key_id", VersionFact::Text(Some("k1".to_owned())))]
        );
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn pkcs11_backend_keeps_its_pins_in_the_data_dir_and_has_no_primary_until_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let spec = KekSpec::parse("pkcs11:module=/m.so;token=t;key-label=k;pin-file=/p").unwrap();
        let kek = KekBackend::new(&spec, dir.path());
        let Spec::Pkcs11(c) = &kek.spec else { panic!("{kek:?}") };
        assert_eq!(c.data_dir.as_deref(), Some(dir.path()));
        assert_eq!(kek.kek_id(2), "pkcs11-k-2");
        kek.prepare().unwrap();
        assert!(!kek.supports_staged());
        assert!(kek.primary().unwrap_err().to_string().contains("keyward kek rotate"));
        assert!(kek.versions().unwrap().is_none());
    }
}
