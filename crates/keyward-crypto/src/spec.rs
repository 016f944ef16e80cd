//! [`KekSpec`]: which KEK backend, and its parameters, as `KEYWARD_KEK` names them. The
//! value is parsed here, once; the configuration holds the result and hands it to
//! [`crate::KekBackend::new`]. The backends are private to this crate's view of the spec:
//! nothing outside keyward-crypto can (or needs to) tell them apart.
//!
//! ```text
//! local                                                     (default)
//! pkcs11:module=…;token=…;key-label=…;pin-file=…[;env=NAME=VALUE][;sandbox-read=DIR]
//! awskms:key-id=…;region=…[;endpoint=…][;gateway-credentials-file=…][;worker-credentials-file=…]
//! ```

use crate::CryptoError;

/// The name of the local backend (and of its `KEYWARD_KEK` value).
pub(crate) const LOCAL: &str = "local";
/// The name of the PKCS#11 backend.
#[cfg(feature = "pkcs11")]
pub(crate) const PKCS11: &str = "pkcs11";
/// The name of the AWS KMS backend.
#[cfg(feature = "awskms")]
pub(crate) const AWSKMS: &str = "awskms";

/// A parsed `KEYWARD_KEK` value. `Debug` shows paths, labels, key ids and regions: the PIN
/// and the credentials are in files, never here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KekSpec(pub(crate) Spec);

/// The backends this build has (cargo features `pkcs11`, `awskms`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Spec {
    /// Versioned X25519 key pairs in `<data_dir>/kek/`.
    #[default]
    Local,
    /// RSA key pairs in a PKCS#11 token.
    #[cfg(feature = "pkcs11")]
    Pkcs11(Box<crate::pkcs11::Pkcs11Config>),
    /// Symmetric keys in AWS KMS.
    #[cfg(feature = "awskms")]
    AwsKms(Box<crate::awskms::AwsKmsConfig>),
}

impl KekSpec {
    /// The local backend (the default).
    pub fn local() -> KekSpec {
        KekSpec(Spec::Local)
    }

    /// Parses a `KEYWARD_KEK` value (already trimmed; an unset variable is `local`). A
    /// backend this build lacks is [`CryptoError::UnknownKekBackend`], naming what it has.
    pub fn parse(value: &str) -> Result<KekSpec, CryptoError> {
        let spec = match value {
            LOCAL => Spec::Local,
            #[cfg(feature = "pkcs11")]
            value if value.starts_with("pkcs11:") => Spec::Pkcs11(Box::new(crate::pkcs11::Pkcs11Config::parse(value)?)),
            #[cfg(feature = "awskms")]
            value if value.starts_with("awskms:") => Spec::AwsKms(Box::new(crate::awskms::AwsKmsConfig::parse(value)?)),
            other => {
                let name = other.split(':').next().unwrap_or(other);
                return Err(CryptoError::UnknownKekBackend {
                    name: name.to_owned(),
                    supported: supported(),
                });
            }
        };
        Ok(KekSpec(spec))
    }

    /// The backend's name: `local`, `pkcs11` or `awskms` (what `keyward kek status` says).
    pub fn backend(&self) -> &'static str {
        self.0.name()
    }

    /// The `KEYWARD_KEK` value a worker is given: the whole value, except that an AWS KMS
    /// worker is never told where the gateway's credentials file is.
    pub fn worker_value(&self) -> String {
        match &self.0 {
            Spec::Local => LOCAL.to_owned(),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => c.to_kek_value(),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => c.worker_kek_value(),
        }
    }

    /// Variables the backend needs in the worker, whose environment is otherwise only
    /// keyward's own settings (PKCS#11: the module's `env=NAME=VALUE`, e.g. `SOFTHSM2_CONF`).
    pub fn worker_env(&self) -> Vec<(String, String)> {
        match &self.0 {
            Spec::Local => Vec::new(),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => c.env.clone().into_iter().collect(),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => Vec::new(),
        }
    }
}

impl KekSpec {
    /// Files only the worker may read (the PKCS#11 PIN, the worker's AWS credentials): a
    /// root-started install gives them to the worker user.
    pub fn worker_secret_files(&self) -> Vec<std::path::PathBuf> {
        match &self.0 {
            Spec::Local => Vec::new(),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(c) => vec![c.pin_file.clone()],
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => c.worker_credentials_file.iter().cloned().collect(),
        }
    }

    /// Files only the gateway reads (its encrypt-only AWS credentials).
    pub fn gateway_secret_files(&self) -> Vec<std::path::PathBuf> {
        match &self.0 {
            Spec::Local => Vec::new(),
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => Vec::new(),
            #[cfg(feature = "awskms")]
            Spec::AwsKms(c) => c.gateway_credentials_file.iter().cloned().collect(),
        }
    }
}

impl Spec {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Spec::Local => LOCAL,
            #[cfg(feature = "pkcs11")]
            Spec::Pkcs11(_) => PKCS11,
            #[cfg(feature = "awskms")]
            Spec::AwsKms(_) => AWSKMS,
        }
    }
}

impl std::str::FromStr for KekSpec {
    type Err = CryptoError;

    fn from_str(value: &str) -> Result<KekSpec, CryptoError> {
        KekSpec::parse(value)
    }
}

/// The `KEYWARD_KEK` forms this build accepts, for the error naming them.
fn supported() -> String {
    let mut out = format!("{LOCAL:?}");
    if cfg!(feature = "pkcs11") {
        out.push_str(", \"pkcs11:…\"");
    }
    if cfg!(feature = "awskms") {
        out.push_str(", \"awskms:…\"");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_the_default_and_unknown_backends_name_what_this_build_has() {
        assert_eq!(KekSpec::parse("local").unwrap(), KekSpec::default());
        assert_eq!(KekSpec::local().backend(), "local");
        assert_eq!(KekSpec::local().worker_value(), "local");
        assert!(KekSpec::local().worker_env().is_empty());
        for bad in ["vault", "vault:x=1", "local:x", "Local", ""] {
            let e = KekSpec::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("unknown backend \""), "{e}");
            assert!(e.contains("this build supports \"local\""), "{e}");
        }
        let e = KekSpec::parse("vault:x=1").unwrap_err().to_string();
        assert!(e.starts_with("unknown backend \"vault\":"), "{e}");
        #[cfg(not(feature = "pkcs11"))]
        assert!(KekSpec::parse("pkcs11:module=/m").is_err());
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn pkcs11_round_trips_to_the_worker_with_its_env() {
        let value = "pkcs11:module=/m.so;token=t;key-label=k;pin-file=/p;env=SOFTHSM2_CONF=/c;sandbox-read=/tok";
        let spec = KekSpec::parse(value).unwrap();
        assert_eq!(spec.backend(), "pkcs11");
        assert_eq!(spec.worker_value(), value);
        assert_eq!(spec.worker_env(), vec![("SOFTHSM2_CONF".to_owned(), "/c".to_owned())]);
        let e = KekSpec::parse("pkcs11:module=/m.so").unwrap_err().to_string();
        assert!(e.contains("is required"), "{e}");
    }
}
