//! The AWS KMS KEK backend (feature `awskms`): the KEK is a symmetric KMS key that never
//! leaves KMS.
//!
//! `awskms:key-id=…;region=…[;endpoint=…][;gateway-credentials-file=…][;worker-credentials-file=…]`
//! ([`AwsKmsConfig::parse`]). Each seal draws a fresh DEK and has KMS `Encrypt` it under the
//! key, with the binding (account, provider, key row) as the **encryption context**; each
//! open calls `Decrypt` with the **explicit key id** and the same context, so KMS itself
//! refuses a blob moved to another row or wrapped under another key. Blob format version 3:
//! the shared wrapped-DEK layout (`wrapped.rs`; the table is in `header.rs`).
//!
//! # Credentials
//! Never in argv or an environment variable: each side reads its own file (mode 0600
//! enforced, as for key files; `access_key_id=…` and `secret_access_key=…` lines) into a
//! zeroizing buffer ([`AwsCredentials::read`]). The gateway's credentials need `kms:Encrypt`
//! only; the worker's `kms:Decrypt` (and `kms:Encrypt` for a re-wrap, which seals inside the
//! worker). The worker is told the path of its own file only.
//!
//! # Versions
//! As for the other backends, `<data_dir>/kek/primary` names the primary version. Version N
//! is the KMS key recorded in `<data_dir>/kek/awskms-N.keyid` (the key id or ARN: not a
//! secret), written atomically and never overwritten; `awskms-N.retired` marks a retired
//! version. `key-id=` is version 1 (recorded on first start, [`bootstrap`]); `keyward kek
//! rotate` creates a key in KMS ([`rotate`]) and `retire` disables it at once and schedules
//! its deletion ([`retire`]).
//!
//! # Errors
//! KMS refusing a blob (wrong context, wrong key, tampered ciphertext, access denied) is
//! [`CryptoError::OpenFailed`]; a disabled, pending-deletion or missing key is
//! [`CryptoError::KekUnavailable`]; KMS unreachable, slow, throttling or failing is
//! [`CryptoError::Backend`] (retryable; the caller decides, there is no fallback here).
//! Every call is bounded by [`CALL_TIMEOUT`] and made once (the SDK's own retries are off:
//! the worker retries, the gateway answers 503).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::fsutil::{self, Created, FileKind};
use crate::local;
use crate::wrapped;
use crate::{Binding, CryptoError, SealedKey};

/// The blob format version of KMS-sealed keys.
pub const BLOB_VERSION_AWSKMS: u8 = wrapped::VERSION_AWSKMS;

/// The longest any one KMS call may take (connecting included), after which it is a
/// [`CryptoError::Backend`] error.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest pending window KMS allows before it deletes a key scheduled for deletion.
pub const DELETION_WINDOW_DAYS: i32 = 7;

/// The tag on every key `keyward kek rotate` creates (`keyward=kek`).
pub const KEY_TAG: (&str, &str) = ("keyward", "kek");

const KIND: FileKind = FileKind::Kek;

fn err(reason: impl fmt::Display) -> CryptoError {
    CryptoError::Backend {
        backend: "awskms",
        reason: reason.to_string(),
    }
}

/// The `KEYWARD_KEK` value, parsed. `Debug` shows the key id, region, endpoint and paths
/// (the credentials are in the files, never here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsConfig {
    /// Version 1's KMS key (id, ARN or alias).
    pub key_id: String,
    pub region: String,
    /// A KMS-compatible endpoint (tests: moto on loopback); default: AWS's for the region.
    pub endpoint: Option<String>,
    /// `gateway-credentials-file=`: what the gateway seals with (intended: `kms:Encrypt`).
    pub gateway_credentials_file: Option<PathBuf>,
    /// `worker-credentials-file=`: what the worker opens with (intended: `kms:Decrypt`).
    pub worker_credentials_file: Option<PathBuf>,
    /// What `keyward kek rotate` and `retire` use (`--credentials-file`; not part of the
    /// `KEYWARD_KEK` value): they need `kms:CreateKey`, `kms:DisableKey` and
    /// `kms:ScheduleKeyDeletion`, which neither side's own policy grants. Unset: the
    /// worker's file.
    pub admin_credentials_file: Option<PathBuf>,
    /// The data directory (`kek/primary`, `kek/awskms-N.keyid`). Not part of the
    /// `KEYWARD_KEK` value: keyward's configuration sets it to `KEYWARD_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
}

impl AwsKmsConfig {
    /// Parses a `KEYWARD_KEK` value; unknown fields are refused.
    pub fn parse(value: &str) -> Result<AwsKmsConfig, CryptoError> {
        let rest = value
            .strip_prefix("awskms:")
            .ok_or_else(|| err("must start with awskms:"))?;
        let (mut key_id, mut region, mut endpoint) = (None, None, None);
        let (mut gateway, mut worker) = (None, None);
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            let slot = match k {
                "key-id" => &mut key_id,
                "region" => &mut region,
                "endpoint" => &mut endpoint,
                "gateway-credentials-file" => &mut gateway,
                "worker-credentials-file" => &mut worker,
                other => return Err(err(format!("unknown field {other:?}"))),
            };
            if v.is_empty() {
                return Err(err(format!("{k}= is empty")));
            }
            *slot = Some(v.to_owned());
        }
        Ok(AwsKmsConfig {
            key_id: key_id.ok_or_else(|| err("key-id= is required"))?,
            region: region.ok_or_else(|| err("region= is required"))?,
            endpoint,
            gateway_credentials_file: gateway.map(PathBuf::from),
            worker_credentials_file: worker.map(PathBuf::from),
            admin_credentials_file: None,
            data_dir: None,
        })
    }

    /// This configuration with its data directory set (see [`AwsKmsConfig::data_dir`]).
    pub fn with_data_dir(mut self, data_dir: impl Into<PathBuf>) -> AwsKmsConfig {
        self.data_dir = Some(data_dir.into());
        self
    }

    /// The `KEYWARD_KEK` value a worker is given: everything but the gateway's credentials
    /// file, so a worker never even learns where that is.
    pub fn worker_kek_value(&self) -> String {
        let mut v = format!("awskms:key-id={};region={}", self.key_id, self.region);
        if let Some(e) = &self.endpoint {
            v.push_str(&format!(";endpoint={e}"));
        }
        if let Some(p) = &self.worker_credentials_file {
            v.push_str(&format!(";worker-credentials-file={}", p.display()));
        }
        v
    }

    fn data_dir(&self) -> Result<&Path, CryptoError> {
        self.data_dir
            .as_deref()
            .ok_or_else(|| err("no data directory configured: KEK versions cannot be kept"))
    }

    /// The gateway's credentials (`gateway-credentials-file=`, required to seal).
    pub fn gateway_credentials(&self) -> Result<AwsCredentials, CryptoError> {
        let path = self
            .gateway_credentials_file
            .as_deref()
            .ok_or_else(|| err("gateway-credentials-file= is required to seal"))?;
        AwsCredentials::read(path)
    }

    /// The credentials `keyward kek rotate` and `retire` use: `--credentials-file`, else the
    /// worker's file.
    pub fn admin_credentials(&self) -> Result<AwsCredentials, CryptoError> {
        match &self.admin_credentials_file {
            Some(path) => AwsCredentials::read(path),
            None => self.worker_credentials(),
        }
    }

    /// The worker's credentials (`worker-credentials-file=`, required to open).
    pub fn worker_credentials(&self) -> Result<AwsCredentials, CryptoError> {
        let path = self
            .worker_credentials_file
            .as_deref()
            .ok_or_else(|| err("worker-credentials-file= is required to open"))?;
        AwsCredentials::read(path)
    }
}

/// The kek id of KMS KEK version `version`.
pub fn kek_id(version: u32) -> String {
    format!("awskms-{version}")
}

/// Static AWS credentials read from a file. `Debug` is redacted entirely; the secret is a
/// [`SecretString`] (zeroized on drop) and leaves only for the SDK's own (zeroizing,
/// redacted) credentials type.
pub struct AwsCredentials {
    access_key_id: String,
    secret_access_key: SecretString,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AwsCredentials([REDACTED])")
    }
}

/// Longest credentials file read (a few short lines).
const MAX_CREDENTIALS_FILE: usize = 4096;

impl AwsCredentials {
    /// Credentials from values (tests).
    pub fn new(access_key_id: &str, secret_access_key: SecretString) -> AwsCredentials {
        AwsCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key,
        }
    }

    /// Reads a credentials file: a regular file without group/other permission bits
    /// (checked on the open file: [`CryptoError::Permissions`] otherwise), holding
    /// `access_key_id=…` and `secret_access_key=…` lines (blank lines and `#` comments
    /// allowed, nothing else). Read into a zeroizing buffer; errors never quote the file.
    pub fn read(path: &Path) -> Result<AwsCredentials, CryptoError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let fail = |what: &str| err(format!("credentials file {}: {what}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| fail(&e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(&e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("not a regular file"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(CryptoError::Permissions {
                path: path.to_path_buf(),
            });
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(MAX_CREDENTIALS_FILE + 1));
        file.take(MAX_CREDENTIALS_FILE as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| fail(&e.to_string()))?;
        if raw.len() > MAX_CREDENTIALS_FILE {
            return Err(fail("longer than 4096 bytes"));
        }
        let text = std::str::from_utf8(&raw).map_err(|_| fail("not UTF-8"))?;
        let (mut access, mut secret) = (None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(fail(&format!("line {} is not key=value", n + 1)));
            };
            let (k, v) = (k.trim(), v.trim());
            // Only a known field name is ever quoted back (the line may be a mangled secret).
            if v.is_empty() && matches!(k, "access_key_id" | "secret_access_key") {
                return Err(fail(&format!("{k} is empty")));
            }
            match k {
                "access_key_id" if access.is_none() => access = Some(v.to_owned()),
                "secret_access_key" if secret.is_none() => secret = Some(SecretString::from(v.to_owned())),
                "access_key_id" | "secret_access_key" => return Err(fail(&format!("{k} given twice"))),
                _ => {
                    return Err(fail(&format!(
                        "line {}: unknown field (expected access_key_id or secret_access_key)",
                        n + 1
                    )))
                }
            }
        }
        Ok(AwsCredentials {
            access_key_id: access.ok_or_else(|| fail("access_key_id= is missing"))?,
            secret_access_key: secret.ok_or_else(|| fail("secret_access_key= is missing"))?,
        })
    }
}

/// The encryption context of a binding: what KMS checks on every decrypt.
fn context(binding: &Binding) -> HashMap<String, String> {
    HashMap::from([
        ("keyward:account".to_owned(), binding.account_id.to_owned()),
        ("keyward:provider".to_owned(), binding.provider.to_owned()),
        ("keyward:key_id".to_owned(), binding.key_id.to_owned()),
    ])
}

/// What a KMS refusal means for a blob being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This blob does not open with this key and binding (wrong context, wrong key,
    /// tampered ciphertext, access denied): final, no retry.
    DoesNotOpen,
    /// The key itself is disabled, pending deletion or gone: this version is not available
    /// (what a retired version answers).
    KeyNotAvailable,
    /// KMS is failing, throttling or timing out (or says something unknown): retryable.
    Backend,
}

/// Classifies a KMS error code answered to `Decrypt` (unknown codes: [`Refusal::Backend`],
/// so an unforeseen answer is retried and then reported, never taken as "tampered").
pub fn classify_decrypt_error(code: Option<&str>) -> Refusal {
    match code {
        Some(
            "InvalidCiphertextException"
            | "IncorrectKeyException"
            | "InvalidKeyUsageException"
            | "AccessDeniedException",
        ) => Refusal::DoesNotOpen,
        Some("DisabledException" | "KMSInvalidStateException" | "NotFoundException") => Refusal::KeyNotAvailable,
        _ => Refusal::Backend,
    }
}

/// A KMS client with static credentials, one attempt per call, bounded by [`CALL_TIMEOUT`].
fn client(config: &AwsKmsConfig, access_key: &str, secret_key: &SecretString) -> aws_sdk_kms::Client {
    let credentials = Credentials::new(access_key, secret_key.expose_secret(), None, None, "keyward");
    let mut builder = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .credentials_provider(credentials)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CALL_TIMEOUT)
                .operation_attempt_timeout(CALL_TIMEOUT)
                .operation_timeout(CALL_TIMEOUT)
                .build(),
        );
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_kms::Client::from_conf(builder.build())
}

fn describe<E: std::error::Error + 'static, R: fmt::Debug>(what: &str, e: &SdkError<E, R>) -> CryptoError {
    err(format!("{what}: {}", aws_sdk_kms::error::DisplayErrorContext(e)))
}

/// One KMS KEK version: a client and the key id it seals to and opens with.
pub struct AwsKmsKek {
    client: aws_sdk_kms::Client,
    key_id: String,
    kek_id: String,
}

impl fmt::Debug for AwsKmsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKek")
            .field("kek_id", &self.kek_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl AwsKmsKek {
    /// KEK `version` is the key `config.key_id`.
    pub fn new(config: &AwsKmsConfig, version: u32, access_key: &str, secret_key: &SecretString) -> AwsKmsKek {
        AwsKmsKek {
            client: client(config, access_key, secret_key),
            key_id: config.key_id.clone(),
            kek_id: kek_id(version),
        }
    }

    /// KEK `version` is the KMS key `key_id`, used with `credentials`.
    pub fn with_key(config: &AwsKmsConfig, version: u32, key_id: &str, credentials: &AwsCredentials) -> AwsKmsKek {
        AwsKmsKek {
            client: client(config, &credentials.access_key_id, &credentials.secret_access_key),
            key_id: key_id.to_owned(),
            kek_id: kek_id(version),
        }
    }

    /// Creates a new symmetric encrypt/decrypt key in KMS (what a rotation does), tagged
    /// [`KEY_TAG`] (what the sample IAM policies in the README select on), and returns its
    /// id.
    pub async fn create_key(
        config: &AwsKmsConfig,
        access_key: &str,
        secret_key: &SecretString,
    ) -> Result<String, CryptoError> {
        let tag = aws_sdk_kms::types::Tag::builder()
            .tag_key(KEY_TAG.0)
            .tag_value(KEY_TAG.1)
            .build()
            .map_err(|e| err(format!("create key: {e}")))?;
        let out = client(config, access_key, secret_key)
            .create_key()
            .description("keyward KEK")
            .tags(tag)
            .send()
            .await
            .map_err(|e| describe("create key", &e))?;
        out.key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| err("create key: no key id in the answer"))
    }

    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// The KMS key id of this version.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `plaintext` for `binding` (format v3): KMS encrypts a fresh DEK under the key,
    /// with the binding as encryption context. Any KMS failure is [`CryptoError::Backend`].
    pub async fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<SealedKey, CryptoError> {
        let dek = wrapped::fresh_dek();
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(dek.to_vec()))
            .set_encryption_context(Some(context(binding)))
            .send()
            .await
            .map_err(|e| describe("encrypt", &e))?;
        let wrapped_dek = out.ciphertext_blob().ok_or_else(|| err("encrypt: no ciphertext"))?;
        wrapped::assemble(
            BLOB_VERSION_AWSKMS,
            &self.kek_id,
            wrapped_dek.as_ref(),
            &dek,
            binding,
            plaintext,
        )
    }

    /// Opens `blob` into `out` (zeroed on failure): `Decrypt` with the explicit key id and
    /// the binding's encryption context. See the module doc for what each failure means.
    pub async fn open_into(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        out.iter_mut().for_each(|b| *b = 0);
        let b = wrapped::parse(blob.as_bytes(), BLOB_VERSION_AWSKMS)?;
        if b.kek_id != self.kek_id {
            return Err(CryptoError::KekMismatch {
                expected: self.kek_id.clone(),
                found: b.kek_id.to_owned(),
            });
        }
        let answer = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(b.wrapped.to_vec()))
            .set_encryption_context(Some(context(binding)))
            .send()
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(SdkError::ServiceError(e)) => {
                return Err(match classify_decrypt_error(e.err().code()) {
                    Refusal::DoesNotOpen => CryptoError::OpenFailed,
                    Refusal::KeyNotAvailable => CryptoError::KekUnavailable {
                        kek_id: self.kek_id.clone(),
                    },
                    Refusal::Backend => err(format!(
                        "decrypt: {}: {}",
                        e.err().code().unwrap_or("unknown error"),
                        e.err().message().unwrap_or("")
                    )),
                })
            }
            Err(e) => return Err(describe("decrypt", &e)),
        };
        let dek = Zeroizing::new(
            answer
                .plaintext()
                .map(|p| p.as_ref().to_vec())
                .ok_or(CryptoError::OpenFailed)?,
        );
        wrapped::open_body(&b, &dek, binding, out)
    }

    /// The key's state as KMS reports it (`Enabled`, `Disabled`, `PendingDeletion`, …).
    pub async fn key_state(&self) -> Result<String, CryptoError> {
        let out = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| describe("describe key", &e))?;
        out.key_metadata()
            .and_then(|m| m.key_state())
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| err("describe key: no key state in the answer"))
    }

    /// Disables the key now (it stops encrypting and decrypting at once) and schedules its
    /// deletion after [`DELETION_WINDOW_DAYS`]; returns when KMS will delete it (seconds
    /// since the epoch, if KMS said).
    async fn disable_and_schedule_deletion(&self) -> Result<Option<i64>, CryptoError> {
        self.client
            .disable_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| describe("disable key", &e))?;
        let out = self
            .client
            .schedule_key_deletion()
            .key_id(&self.key_id)
            .pending_window_in_days(DELETION_WINDOW_DAYS)
            .send()
            .await
            .map_err(|e| describe("schedule key deletion", &e))?;
        Ok(out.deletion_date().map(|d| d.secs()))
    }
}

// ---- versions: kek/awskms-N.keyid, kek/awskms-N.retired, kek/primary ----------------------

/// `<data_dir>/kek/awskms-<version>.keyid`: the KMS key of version `version`.
pub fn key_id_path(data_dir: &Path, version: u32) -> PathBuf {
    data_dir.join(local::KEK_DIR).join(format!("{}.keyid", kek_id(version)))
}

/// `<data_dir>/kek/awskms-<version>.retired`: version `version` was retired.
pub fn retired_path(data_dir: &Path, version: u32) -> PathBuf {
    data_dir
        .join(local::KEK_DIR)
        .join(format!("{}.retired", kek_id(version)))
}

/// A KMS key id as recorded: printable ASCII, no spaces, at most 2048 bytes (an ARN fits).
fn valid_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 2048 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The KMS key recorded for `version`; `Ok(None)` if none is.
pub fn recorded_key_id(data_dir: &Path, version: u32) -> Result<Option<String>, CryptoError> {
    let path = key_id_path(data_dir, version);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KIND.err(&path, format!("cannot read: {e}"))),
    };
    let id = text.trim();
    if !valid_key_id(id) {
        return Err(KIND.err(&path, "must hold one KMS key id (printable ASCII, no spaces)"));
    }
    Ok(Some(id.to_owned()))
}

fn record_key_id(path: &Path, key_id: &str) -> Result<(), CryptoError> {
    if !valid_key_id(key_id) {
        return Err(KIND.err(path, format!("KMS answered an unusable key id {key_id:?}")));
    }
    match fsutil::create_new_atomic(path, format!("{key_id}\n").as_bytes(), 0o600, KIND)? {
        Created::Yes => Ok(()),
        Created::AlreadyExisted => Err(KIND.err(path, "exists already: a version number is never reused")),
    }
}

/// One version as the kek directory records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u32,
    pub key_id: Option<String>,
    pub retired: bool,
}

/// Every version the kek directory names (a key id file or a retired marker), in order.
pub fn versions(data_dir: &Path) -> Result<Vec<Version>, CryptoError> {
    let dir = data_dir.join(local::KEK_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(KIND.err(&dir, format!("cannot list: {e}"))),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| KIND.err(&dir, format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("awskms-")) else {
            continue;
        };
        let Some(num) = rest.strip_suffix(".keyid").or_else(|| rest.strip_suffix(".retired")) else {
            continue;
        };
        match num.parse::<u32>() {
            Ok(v) if v > 0 && !num.starts_with('0') => numbers.push(v),
            _ => {}
        }
    }
    numbers.sort_unstable();
    numbers.dedup();
    numbers
        .into_iter()
        .map(|version| {
            Ok(Version {
                version,
                key_id: recorded_key_id(data_dir, version)?,
                retired: fsutil::exists(&retired_path(data_dir, version), KIND)?,
            })
        })
        .collect()
}

/// On first start: records `key-id=` as version 1 and makes it primary, unless the kek
/// directory has a primary already. Refuses a `key-id=` that differs from the one
/// recorded for version 1 (changing it would silently leave every saved key unopenable).
pub fn bootstrap(config: &AwsKmsConfig) -> Result<(), CryptoError> {
    let data_dir = config.data_dir()?;
    let held = local::lock(data_dir)?;
    let path = key_id_path(data_dir, 1);
    match recorded_key_id(data_dir, 1)? {
        Some(id) if id != config.key_id => {
            return Err(KIND.err(
                &path,
                format!(
                    "records KMS key {id:?} as version 1 but KEYWARD_KEK says key-id={:?}; \
                     new keys come from `keyward kek rotate`, not from changing key-id=",
                    config.key_id
                ),
            ))
        }
        Some(_) => {}
        None if fsutil::exists(&retired_path(data_dir, 1), KIND)? => {}
        None => record_key_id(&path, &config.key_id)?,
    }
    if local::primary_file_version(data_dir)?.is_none() {
        local::write_primary_locked(&held, data_dir, 1)?;
    }
    Ok(())
}

/// The primary version (`kek/primary`, written by [`bootstrap`]).
pub fn primary(config: &AwsKmsConfig) -> Result<u32, CryptoError> {
    let data_dir = config.data_dir()?;
    local::primary_file_version(data_dir)?
        .ok_or_else(|| err("no KEK version yet: `keyward serve` records key-id= as version 1 on first start"))
}

/// The KMS key of a live `version`: refused if retired or never recorded.
pub fn live_key_id(config: &AwsKmsConfig, version: u32) -> Result<String, CryptoError> {
    let data_dir = config.data_dir()?;
    if fsutil::exists(&retired_path(data_dir, version), KIND)? {
        return Err(CryptoError::KekUnavailable {
            kek_id: kek_id(version),
        });
    }
    recorded_key_id(data_dir, version)?.ok_or_else(|| CryptoError::KekUnavailable {
        kek_id: kek_id(version),
    })
}

/// The gateway's sealer for `version` (its credentials file is read here).
pub fn sealer(config: &AwsKmsConfig, version: u32) -> Result<AwsKmsKek, CryptoError> {
    let key_id = live_key_id(config, version)?;
    Ok(AwsKmsKek::with_key(
        config,
        version,
        &key_id,
        &config.gateway_credentials()?,
    ))
}

/// The worker's openers: every recorded version not retired, staged ones included (its
/// credentials file is read here, once). The primary must be among them.
pub fn openers(config: &AwsKmsConfig) -> Result<Vec<AwsKmsKek>, CryptoError> {
    let credentials = config.worker_credentials()?;
    let primary = primary(config)?;
    let mut out = Vec::new();
    for v in versions(config.data_dir()?)? {
        if v.retired {
            continue;
        }
        if let Some(key_id) = v.key_id {
            out.push(AwsKmsKek::with_key(config, v.version, &key_id, &credentials));
        }
    }
    if !out.iter().any(|k| k.kek_id == kek_id(primary)) {
        return Err(CryptoError::KekUnavailable {
            kek_id: kek_id(primary),
        });
    }
    Ok(out)
}

/// Creates the next version: a new KMS key (with `credentials`, which need
/// `kms:CreateKey`), recorded in `kek/awskms-N.keyid` and, if `make_primary`, made primary
/// (else staged: see [`promote`]), all under the kek directory's lock. Returns the version
/// and the key id.
pub async fn rotate(
    config: &AwsKmsConfig,
    credentials: &AwsCredentials,
    make_primary: bool,
) -> Result<(u32, String), CryptoError> {
    let data_dir = config.data_dir()?;
    let held = local::lock(data_dir)?;
    let highest = versions(data_dir)?
        .last()
        .map(|v| v.version)
        .unwrap_or(0)
        .max(local::primary_file_version(data_dir)?.unwrap_or(0));
    let next = highest
        .checked_add(1)
        .ok_or_else(|| err("no KEK version numbers left"))?;
    let key_id = AwsKmsKek::create_key(config, &credentials.access_key_id, &credentials.secret_access_key).await?;
    record_key_id(&key_id_path(data_dir, next), &key_id).map_err(|e| {
        err(format!(
            "KMS key {key_id} was created but could not be recorded as version {next} ({e}); \
             schedule its deletion in KMS"
        ))
    })?;
    if make_primary {
        local::write_primary_locked(&held, data_dir, next)?;
    }
    Ok((next, key_id))
}

/// Makes a live, recorded `version` primary (`keyward kek promote`).
pub fn promote(config: &AwsKmsConfig, version: u32) -> Result<(), CryptoError> {
    let data_dir = config.data_dir()?;
    let held = local::lock(data_dir)?;
    live_key_id(config, version)?;
    local::write_primary_locked(&held, data_dir, version)
}

/// What [`retire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub key_id: Option<String>,
    /// When KMS deletes the key (seconds since the epoch), if it said.
    pub deletion_date: Option<i64>,
}

/// Retires `version` (not the primary): writes the `.retired` marker first (so the number
/// is never reused and no worker loads it again), then disables the KMS key (it stops
/// opening at once) and schedules its deletion with the shortest window KMS allows
/// ([`DELETION_WINDOW_DAYS`]); the shredding completes when KMS deletes the key.
/// `credentials` need `kms:DisableKey` and `kms:ScheduleKeyDeletion`.
pub async fn retire(config: &AwsKmsConfig, credentials: &AwsCredentials, version: u32) -> Result<Retired, CryptoError> {
    let data_dir = config.data_dir()?;
    let _held = local::lock(data_dir)?;
    if local::primary_file_version(data_dir)? == Some(version) {
        return Err(err(format!(
            "KEK {} is the primary version; rotate first",
            kek_id(version)
        )));
    }
    let key_id = recorded_key_id(data_dir, version)?;
    let marker = retired_path(data_dir, version);
    if key_id.is_none() && !fsutil::exists(&marker, KIND)? {
        return Err(CryptoError::KekUnavailable {
            kek_id: kek_id(version),
        });
    }
    if !fsutil::exists(&marker, KIND)? {
        fsutil::replace_atomic(&marker, b"", 0o600, KIND)?;
    }
    let Some(id) = key_id else {
        return Ok(Retired {
            key_id: None,
            deletion_date: None,
        });
    };
    let kek = AwsKmsKek::with_key(config, version, &id, credentials);
    let deletion_date = kek.disable_and_schedule_deletion().await?;
    Ok(Retired {
        key_id: Some(id),
        deletion_date,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypt_refusals_are_classified() {
        for code in [
            "InvalidCiphertextException",
            "IncorrectKeyException",
            "InvalidKeyUsageException",
            "AccessDeniedException",
        ] {
            assert_eq!(classify_decrypt_error(Some(code)), Refusal::DoesNotOpen, "{code}");
        }
        for code in ["DisabledException", "KMSInvalidStateException", "NotFoundException"] {
            assert_eq!(classify_decrypt_error(Some(code)), Refusal::KeyNotAvailable, "{code}");
        }
        for code in [
            Some("ThrottlingException"),
            Some("KMSInternalException"),
            Some("DependencyTimeoutException"),
            Some("KeyUnavailableException"),
            Some("SomethingNewException"),
            None,
        ] {
            assert_eq!(classify_decrypt_error(code), Refusal::Backend, "{code:?}");
        }
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn credentials_files_are_owner_only_and_strict() {
        let dir = tempfile::tempdir().unwrap();
        let good = "# gateway\naccess_key_id=AKIAEXAMPLE\nsecret_access_key=wJalr/SECRET\n";
        for mode in [0o640, 0o604, 0o644] {
            let p = write(dir.path(), &format!("c{mode:o}"), good, mode);
            assert!(
                matches!(AwsCredentials::read(&p), Err(CryptoError::Permissions { .. })),
                "{mode:o}"
            );
        }
        let p = write(dir.path(), "ok", good, 0o600);
        let c = AwsCredentials::read(&p).unwrap();
        assert_eq!(c.access_key_id, "AKIAEXAMPLE");
        assert_eq!(c.secret_access_key.expose_secret(), "wJalr/SECRET");
        assert!(!format!("{c:?}").contains("SECRET"));
        assert!(!format!("{c:?}").contains("AKIA"));
        for (n, bad) in [
            "access_key_id=A\n",
            "secret_access_key=S\n",
            "access_key_id=A\nsecret_access_key=S\nregion=x\n",
            "access_key_id=A\nsecret_access_key=S\nsecret_access_key=T\n",
            "access_key_id=A\nsecret_access_key=\n",
            "access_key_id=A\nsecret_access_key S-SECRET\n",
            "access_key_id=A\nwJalr-SECRET=\n",
            "access_key_id=A\nsecret_access_key=S\nwJalr-SECRET=x\n",
        ]
        .iter()
        .enumerate()
        {
            let p = write(dir.path(), &format!("bad{n}"), bad, 0o600);
            let e = AwsCredentials::read(&p).unwrap_err();
            assert!(!e.to_string().contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn config_fields_and_worker_value() {
        let c = AwsKmsConfig::parse(
            "awskms:key-id=k1;region=eu-west-1;endpoint=http://127.0.0.1:1;\
             gateway-credentials-file=/g;worker-credentials-file=/w",
        )
        .unwrap();
        assert_eq!(c.gateway_credentials_file.as_deref(), Some(Path::new("/g")));
        assert_eq!(c.worker_credentials_file.as_deref(), Some(Path::new("/w")));
        let w = c.worker_kek_value();
        assert!(!w.contains("/g"), "{w}");
        let back = AwsKmsConfig::parse(&w).unwrap();
        assert_eq!(back.worker_credentials_file, c.worker_credentials_file);
        assert_eq!(back.gateway_credentials_file, None);
        assert!(AwsKmsConfig::parse("awskms:key-id=k;region=r;worker-credentials-file=").is_err());
    }

    #[test]
    fn bootstrap_records_version_1_once_and_refuses_a_changed_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = AwsKmsConfig::parse("awskms:key-id=key-one;region=r")
            .unwrap()
            .with_data_dir(dir.path());
        bootstrap(&c).unwrap();
        bootstrap(&c).unwrap();
        assert_eq!(primary(&c).unwrap(), 1);
        assert_eq!(live_key_id(&c, 1).unwrap(), "key-one");
        assert!(matches!(live_key_id(&c, 2), Err(CryptoError::KekUnavailable { .. })));
        let changed = AwsKmsConfig {
            key_id: "key-two".to_owned(),
            ..c.clone()
        };
        assert!(bootstrap(&changed).is_err());
        assert_eq!(
            versions(dir.path()).unwrap(),
            vec![Version {
                version: 1,
                key_id: Some("key-one".to_owned()),
                retired: false
            }]
        );
    }
}
