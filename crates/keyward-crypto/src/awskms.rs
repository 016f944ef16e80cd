//! The AWS KMS KEK backend (feature `awskms`): the KEK is a symmetric KMS key that never
//! leaves KMS.
//!
//! `awskms:key-id=…;region=…[;endpoint=…]` ([`AwsKmsConfig::parse`]). Each seal draws a fresh
//! DEK and has KMS `Encrypt` it under the key, with the binding (account, provider, key row)
//! as the **encryption context**; each open calls `Decrypt` with the **explicit key id** and
//! the same context, so KMS itself refuses a blob moved to another row or wrapped under
//! another key. Blob format version 3: the shared wrapped-DEK layout (see `wrapped.rs`).
//!
//! Errors: KMS refusing the blob (wrong context, wrong key, tampered ciphertext) is
//! [`CryptoError::OpenFailed`]; the key disabled or deleted is [`CryptoError::KekUnavailable`];
//! KMS unreachable, throttling or failing is [`CryptoError::Backend`] (retryable; the caller
//! decides, there is no fallback here).
//!
//! Not wired into `KEYWARD_KEK`, the gateway or the worker yet (the gateway would need
//! credentials allowing `kms:Encrypt` only, the worker `kms:Decrypt` only: an IAM matter).

use std::collections::HashMap;
use std::fmt;

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::SdkError;
use aws_sdk_kms::primitives::Blob;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::wrapped;
use crate::{Binding, CryptoError, SealedKey};

/// The blob format version of KMS-sealed keys.
pub const BLOB_VERSION_AWSKMS: u8 = 3;

fn err(reason: impl fmt::Display) -> CryptoError {
    CryptoError::Backend {
        backend: "awskms",
        reason: reason.to_string(),
    }
}

/// `awskms:key-id=…;region=…;endpoint=…` (`endpoint` optional: a KMS-compatible endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsConfig {
    pub key_id: String,
    pub region: String,
    pub endpoint: Option<String>,
}

impl AwsKmsConfig {
    /// Parses a `KEYWARD_KEK` value; unknown fields are refused.
    pub fn parse(value: &str) -> Result<AwsKmsConfig, CryptoError> {
        let rest = value
            .strip_prefix("awskms:")
            .ok_or_else(|| err("must start with awskms:"))?;
        let (mut key_id, mut region, mut endpoint) = (None, None, None);
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            let slot = match k {
                "key-id" => &mut key_id,
                "region" => &mut region,
                "endpoint" => &mut endpoint,
                other => return Err(err(format!("unknown field {other:?}"))),
            };
            *slot = Some(v.to_owned());
        }
        Ok(AwsKmsConfig {
            key_id: key_id.ok_or_else(|| err("key-id= is required"))?,
            region: region.ok_or_else(|| err("region= is required"))?,
            endpoint,
        })
    }
}

/// The kek id of KMS KEK version `version`.
pub fn kek_id(version: u32) -> String {
    format!("awskms-{version}")
}

/// The encryption context of a binding: what KMS checks on every decrypt.
fn context(binding: &Binding) -> HashMap<String, String> {
    HashMap::from([
        ("keyward:account".to_owned(), binding.account_id.to_owned()),
        ("keyward:provider".to_owned(), binding.provider.to_owned()),
        ("keyward:key_id".to_owned(), binding.key_id.to_owned()),
    ])
}

/// What KMS refusing a `Decrypt` means for the blob:
/// - the ciphertext, key or context is wrong for it (also a policy that denies this
///   context): [`CryptoError::OpenFailed`], the blob's fault, final;
/// - the key is disabled, pending deletion or deleted: [`CryptoError::KekUnavailable`],
///   the version is being (or has been) shredded, final;
/// - anything else (throttling, KMS internal errors, a dependency timeout, a key
///   temporarily unavailable): [`CryptoError::Backend`], retryable, `503` to a caller.
fn decrypt_refusal(kek_id: &str, e: &aws_sdk_kms::operation::decrypt::DecryptError) -> CryptoError {
    use aws_sdk_kms::error::ProvideErrorMetadata;
    use aws_sdk_kms::operation::decrypt::DecryptError as D;
    match e {
        D::InvalidCiphertextException(_) | D::IncorrectKeyException(_) | D::InvalidKeyUsageException(_) => {
            CryptoError::OpenFailed
        }
        D::DisabledException(_) | D::KmsInvalidStateException(_) | D::NotFoundException(_) => {
            CryptoError::KekUnavailable {
                kek_id: kek_id.to_owned(),
            }
        }
        other if other.code() == Some("AccessDeniedException") => CryptoError::OpenFailed,
        other => err(format!("decrypt: {}", aws_sdk_kms::error::DisplayErrorContext(other))),
    }
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

/// A KMS client with static credentials (exposed only here, where they leave for the SDK).
fn client(config: &AwsKmsConfig, access_key: &str, secret_key: &SecretString) -> aws_sdk_kms::Client {
    let credentials = Credentials::new(access_key, secret_key.expose_secret(), None, None, "keyward");
    let mut builder = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .credentials_provider(credentials);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_kms::Client::from_conf(builder.build())
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

    /// Creates a new symmetric encrypt/decrypt key in KMS (what a rotation would do) and
    /// returns its id.
    pub async fn create_key(
        config: &AwsKmsConfig,
        access_key: &str,
        secret_key: &SecretString,
    ) -> Result<String, CryptoError> {
        let out = client(config, access_key, secret_key)
            .create_key()
            .description("keyward KEK")
            .send()
            .await
            .map_err(|e| err(format!("create key: {}", aws_sdk_kms::error::DisplayErrorContext(&e))))?;
        out.key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| err("create key: no key id in the answer"))
    }

    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Seals `plaintext` for `binding` (format v3): KMS encrypts a fresh DEK under the key,
    /// with the binding as encryption context.
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
            .map_err(|e| err(format!("encrypt: {}", aws_sdk_kms::error::DisplayErrorContext(&e))))?;
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

    /// Shreds this KEK version: disables the key at once (nothing opens from now on) and
    /// schedules its deletion after `pending_days` (KMS allows 7 to 30), after which no copy
    /// of a blob it wrapped can ever be opened.
    pub async fn disable_and_schedule_deletion(&self, pending_days: i32) -> Result<(), CryptoError> {
        self.client
            .disable_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| err(format!("disable key: {}", aws_sdk_kms::error::DisplayErrorContext(&e))))?;
        self.client
            .schedule_key_deletion()
            .key_id(&self.key_id)
            .pending_window_in_days(pending_days)
            .send()
            .await
            .map_err(|e| {
                err(format!(
                    "schedule key deletion: {}",
                    aws_sdk_kms::error::DisplayErrorContext(&e)
                ))
            })?;
        Ok(())
    }

    /// Opens `blob` into `out` (zeroed on failure): `Decrypt` with the explicit key id and
    /// the binding's encryption context.
    pub async fn open_into(
        &self,
        binding: &Binding<'_>,
        blob: &SealedKey,
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
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
            Err(SdkError::ServiceError(e)) => return Err(decrypt_refusal(&self.kek_id, e.err())),
            Err(e) => return Err(err(format!("decrypt: {}", aws_sdk_kms::error::DisplayErrorContext(&e)))),
        };
        let dek = Zeroizing::new(
            answer
                .plaintext()
                .map(|p| p.as_ref().to_vec())
                .ok_or(CryptoError::OpenFailed)?,
        );
        wrapped::open_body(&b, &dek, binding, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kms::error::ErrorMetadata;
    use aws_sdk_kms::operation::decrypt::DecryptError as D;
    use aws_sdk_kms::types::error::{
        DisabledException, IncorrectKeyException, InvalidCiphertextException, KeyUnavailableException,
        KmsInternalException, KmsInvalidStateException, NotFoundException,
    };

    fn generic(code: &str) -> D {
        D::generic(ErrorMetadata::builder().code(code).message("m").build())
    }

    #[test]
    fn kms_refusals_are_classified_by_whose_fault_they_are() {
        let open_failed = [
            D::InvalidCiphertextException(InvalidCiphertextException::builder().build()),
            D::IncorrectKeyException(IncorrectKeyException::builder().build()),
            generic("AccessDeniedException"),
        ];
        for e in &open_failed {
            assert!(
                matches!(decrypt_refusal("awskms-1", e), CryptoError::OpenFailed),
                "{e:?}"
            );
        }
        let shredded = [
            D::DisabledException(DisabledException::builder().build()),
            D::KmsInvalidStateException(KmsInvalidStateException::builder().build()),
            D::NotFoundException(NotFoundException::builder().build()),
        ];
        for e in &shredded {
            assert!(
                matches!(decrypt_refusal("awskms-1", e), CryptoError::KekUnavailable { kek_id } if kek_id == "awskms-1"),
                "{e:?}"
            );
        }
        let outage = [
            D::KeyUnavailableException(KeyUnavailableException::builder().build()),
            D::KmsInternalException(KmsInternalException::builder().build()),
            generic("ThrottlingException"),
            generic("SomethingNew"),
        ];
        for e in &outage {
            assert!(
                matches!(
                    decrypt_refusal("awskms-1", e),
                    CryptoError::Backend { backend: "awskms", .. }
                ),
                "{e:?}"
            );
        }
    }
}
