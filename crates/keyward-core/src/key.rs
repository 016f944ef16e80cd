//! Provider API keys: parsed from what a person pasted, held as a secret, shown only as last4.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::Provider;

const KEY_MIN_LEN: usize = 20;
const KEY_MAX_LEN: usize = 256;
const GOOGLE_KEY_LEN: usize = 39;

/// A provider API key that passed its provider's format check.
///
/// Holds the bytes in a `SecretString` (zeroed on drop, `Debug` prints `[REDACTED]`);
/// it has no `Display`, no `Serialize` and no `Clone`, so it cannot reach a log,
/// a response or an error by accident. `expose_secret` is called only where the bytes
/// are sealed or leave the process.
pub struct ApiKey {
    secret: SecretString,
    last4: Last4,
}

impl ApiKey {
    /// Checks `raw` against `provider`'s key format (after trimming surrounding white
    /// space). The error never contains any part of `raw`.
    pub fn parse(provider: Provider, raw: &str) -> Result<ApiKey, KeyFormatError> {
        let key = raw.trim();
        if key.is_empty() {
            return Err(KeyFormatError::Empty { provider });
        }
        if key.starts_with("sk-ant-admin") {
            return Err(KeyFormatError::AdminKey {
                of: Provider::Anthropic,
            });
        }
        if key.starts_with("sk-admin-") {
            return Err(KeyFormatError::AdminKey { of: Provider::OpenAi });
        }
        match looks_like(key) {
            Some(of) if of != provider => {
                return Err(KeyFormatError::WrongProvider {
                    slot: provider,
                    looks_like: of,
                })
            }
            Some(_) => {}
            None => return Err(KeyFormatError::BadPrefix { provider }),
        }
        let body = key.strip_prefix(prefix(provider)).unwrap_or_default();
        if !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(KeyFormatError::BadCharacters { provider });
        }
        let len = key.len();
        let length_ok = match provider {
            Provider::Google => len == GOOGLE_KEY_LEN,
            Provider::Anthropic | Provider::OpenAi => (KEY_MIN_LEN..=KEY_MAX_LEN).contains(&len),
        };
        if !length_ok {
            return Err(KeyFormatError::BadLength { provider });
        }
        let last4 = Last4(key.get(len - 4..).unwrap_or_default().to_owned());
        Ok(ApiKey {
            secret: SecretString::from(key),
            last4,
        })
    }

    pub fn last4(&self) -> &Last4 {
        &self.last4
    }

    /// The key itself. Call only where it is sealed or put in an outbound header.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey([REDACTED], last4={})", self.last4.0)
    }
}

/// Which provider a key's prefix belongs to, if any.
fn looks_like(key: &str) -> Option<Provider> {
    if key.starts_with("sk-ant-") {
        Some(Provider::Anthropic)
    } else if key.starts_with("sk-") {
        Some(Provider::OpenAi)
    } else if key.starts_with("AIza") {
        Some(Provider::Google)
    } else {
        None
    }
}

fn prefix(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "sk-ant-",
        Provider::OpenAi => "sk-",
        Provider::Google => "AIza",
    }
}

/// The key format a person should paste, for help texts.
pub fn format_hint(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "sk-ant-…",
        Provider::OpenAi => "sk-…",
        Provider::Google => "AIza…",
    }
}

/// Why a pasted key was refused. Messages name the rule, never the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key is empty: paste the API key from your {} dashboard", provider.display_name())]
    Empty { provider: Provider },
    #[error("this is an {} admin key, which cannot run model requests and is never stored; create a regular API key instead", of.display_name())]
    AdminKey { of: Provider },
    #[error("this looks like an {} key, not an {} key; save it under {} instead", looks_like.display_name(), slot.display_name(), looks_like.as_str())]
    WrongProvider { slot: Provider, looks_like: Provider },
    #[error("{} keys start with \"{}\"", provider.display_name(), prefix(*provider))]
    BadPrefix { provider: Provider },
    #[error("the key contains characters that never appear in {} keys (only letters, digits, '-' and '_' after \"{}\")", provider.display_name(), prefix(*provider))]
    BadCharacters { provider: Provider },
    #[error("{}", length_rule(*provider))]
    BadLength { provider: Provider },
}

fn length_rule(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "Anthropic keys are 20 to 256 characters long",
        Provider::OpenAi => "OpenAI keys are 20 to 256 characters long",
        Provider::Google => "Google AI keys are exactly 39 characters long (\"AIza\" and 35 more)",
    }
}

/// The last four characters of a saved key: the only part of a key ever shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Last4(String);

impl Last4 {
    /// Rebuilds a stored last4 (four ASCII key characters).
    pub fn from_stored(s: &str) -> Option<Last4> {
        (s.len() == 4 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
            .then(|| Last4(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// How a saved key is shown: `••••` then last4.
    pub fn masked(&self) -> String {
        format!("••••{}", self.0)
    }
}

impl fmt::Display for Last4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Provider::*;

    fn body(n: usize) -> String {
        "aB3_-x9Z".chars().cycle().take(n).collect()
    }

    #[test]
    fn valid_keys_parse_and_keep_last4() {
        let k = ApiKey::parse(Anthropic, &format!("sk-ant-api03-{}WXYZ", body(20))).unwrap();
        assert_eq!(k.last4().as_str(), "WXYZ");
        let k = ApiKey::parse(OpenAi, &format!("sk-proj-{}abcd", body(30))).unwrap();
        assert_eq!(k.last4().as_str(), "abcd");
        let k = ApiKey::parse(Google, &format!("AIza{}", body(35))).unwrap();
        assert_eq!(k.expose_secret().len(), 39);
    }

    #[test]
    fn surrounding_white_space_is_trimmed_inner_is_refused() {
        let key = format!("sk-{}", body(30));
        assert!(ApiKey::parse(OpenAi, &format!("  \t{key}\r\n")).is_ok());
        let inner = format!("sk-{}\n{}", body(10), body(10));
        assert_eq!(
            ApiKey::parse(OpenAi, &inner).unwrap_err(),
            KeyFormatError::BadCharacters { provider: OpenAi }
        );
    }

    #[test]
    fn length_bounds_on_both_sides() {
        // anthropic/openai: 20..=256 characters in all.
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(13))).is_ok()); // 20
        assert_eq!(
            ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(12))).unwrap_err(),
            KeyFormatError::BadLength { provider: Anthropic }
        ); // 19
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(249))).is_ok()); // 256
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(250))).is_err()); // 257
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(17))).is_ok()); // 20
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(16))).is_err()); // 19
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(253))).is_ok()); // 256
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(254))).is_err()); // 257
                                                                               // google: exactly 39.
        assert!(ApiKey::parse(Google, &format!("AIza{}", body(34))).is_err());
        assert!(ApiKey::parse(Google, &format!("AIza{}", body(36))).is_err());
    }

    #[test]
    fn admin_keys_are_refused_in_any_slot() {
        for slot in Provider::ALL {
            let e = ApiKey::parse(slot, &format!("sk-ant-admin01-{}", body(40))).unwrap_err();
            assert_eq!(e, KeyFormatError::AdminKey { of: Anthropic });
            assert!(e.to_string().contains("admin key"));
            let e = ApiKey::parse(slot, &format!("sk-admin-{}", body(40))).unwrap_err();
            assert_eq!(e, KeyFormatError::AdminKey { of: OpenAi });
        }
    }

    #[test]
    fn wrong_slot_names_the_right_provider() {
        let e = ApiKey::parse(OpenAi, &format!("sk-ant-{}", body(30))).unwrap_err();
        assert_eq!(
            e,
            KeyFormatError::WrongProvider {
                slot: OpenAi,
                looks_like: Anthropic
            }
        );
        assert!(e.to_string().contains("anthropic"));
        let e = ApiKey::parse(Anthropic, &format!("AIza{}", body(35))).unwrap_err();
        assert_eq!(
            e,
            KeyFormatError::WrongProvider {
                slot: Anthropic,
                looks_like: Google
            }
        );
        let e = ApiKey::parse(Google, &format!("sk-{}", body(30))).unwrap_err();
        assert_eq!(
            e,
            KeyFormatError::WrongProvider {
                slot: Google,
                looks_like: OpenAi
            }
        );
    }

    #[test]
    fn odd_characters_are_refused() {
        for bad in ["\0", "\t", "é", "ключ", " ", "+", "/", "="] {
            let raw = format!("sk-{}{bad}{}", body(10), body(10));
            assert!(ApiKey::parse(OpenAi, &raw).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let raw = format!("sk-{}", body(40));
        let k = ApiKey::parse(OpenAi, &raw).unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&raw) && shown.contains("REDACTED"), "{shown}");
    }

    proptest! {
        #[test]
        fn generated_valid_keys_parse(b in "[A-Za-z0-9_-]{13,249}") {
            prop_assume!(!b.starts_with("admin"));
            let raw = format!("sk-ant-{b}");
            let k = ApiKey::parse(Anthropic, &raw).unwrap();
            prop_assert_eq!(k.last4().as_str(), &raw[raw.len() - 4..]);
        }

        #[test]
        fn refusals_never_repeat_the_input(b in "[A-Za-z0-9_]{12,40}", junk in "[^A-Za-z0-9_-]") {
            for raw in [format!("sk-{b}{junk}{b}"), format!("sk-ant-{b}"), format!("AIza{b}{junk}"), format!("{b}{b}")] {
                for slot in Provider::ALL {
                    if let Err(e) = ApiKey::parse(slot, &raw) {
                        let msg = e.to_string();
                        prop_assert!(!msg.contains(&b), "message {msg:?} repeats input");
                    }
                }
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            for slot in Provider::ALL {
                let _ = ApiKey::parse(slot, &s);
            }
        }
    }
}
