//! Provider API keys: parsed from what a person pasted, held as a secret, shown only as last4.
//!
//! The rules follow each provider's documentation as of December 2026 (the README's
//! "Key formats" table cites the pages):
//!
//! | provider | accepted | refused, saying which key to create instead |
//! |---|---|---|
//! | Anthropic | `sk-ant-` API keys (`sk-ant-api03-…`) | Admin API keys `sk-ant-admin…`; Claude subscription OAuth tokens `sk-ant-oat…`, `sk-ant-ort…` |
//! | OpenAI | project `sk-proj-…`, service-account `sk-svcacct-…`, legacy `sk-…` | admin keys `sk-admin-…` |
//! | Google | auth keys `AQ.…` (AI Studio's only kind since mid-2026); standard `AIza…` keys with a warning | |

use std::fmt;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::Provider;

const KEY_MIN_LEN: usize = 20;
const KEY_MAX_LEN: usize = 256;
const GOOGLE_STANDARD_KEY_LEN: usize = 39;

/// Where a person creates the key keyward wants, per provider (named in refusals).
const ANTHROPIC_KEYS_PAGE: &str = "platform.claude.com/settings/keys";
const OPENAI_KEYS_PAGE: &str = "platform.openai.com/api-keys";
const GOOGLE_KEYS_PAGE: &str = "aistudio.google.com/apikey";

/// What kind of credential a key is, from its prefix. Stored next to the sealed key: the
/// prefix class is public knowledge about the format and says nothing secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// Anthropic API key, `sk-ant-…` (today `sk-ant-api03-…`).
    AnthropicApi,
    /// OpenAI project key, `sk-proj-…`.
    OpenAiProject,
    /// OpenAI service-account key, `sk-svcacct-…`.
    OpenAiServiceAccount,
    /// OpenAI legacy user key, `sk-…`.
    OpenAiLegacy,
    /// Google auth key, `AQ.…`: bound to a service account; what AI Studio issues today.
    GoogleAuth,
    /// Google standard key, `AIza…`: no longer accepted by the Gemini API.
    GoogleStandard,
}

impl KeyKind {
    pub const ALL: [KeyKind; 6] = [
        KeyKind::AnthropicApi,
        KeyKind::OpenAiProject,
        KeyKind::OpenAiServiceAccount,
        KeyKind::OpenAiLegacy,
        KeyKind::GoogleAuth,
        KeyKind::GoogleStandard,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::AnthropicApi => "anthropic_api",
            KeyKind::OpenAiProject => "openai_project",
            KeyKind::OpenAiServiceAccount => "openai_service_account",
            KeyKind::OpenAiLegacy => "openai_legacy",
            KeyKind::GoogleAuth => "google_auth",
            KeyKind::GoogleStandard => "google_standard",
        }
    }

    pub fn provider(self) -> Provider {
        match self {
            KeyKind::AnthropicApi => Provider::Anthropic,
            KeyKind::OpenAiProject | KeyKind::OpenAiServiceAccount | KeyKind::OpenAiLegacy => Provider::OpenAi,
            KeyKind::GoogleAuth | KeyKind::GoogleStandard => Provider::Google,
        }
    }

    /// The name a person reads: "Google auth key".
    pub fn display_name(self) -> &'static str {
        match self {
            KeyKind::AnthropicApi => "Anthropic API key",
            KeyKind::OpenAiProject => "OpenAI project key",
            KeyKind::OpenAiServiceAccount => "OpenAI service-account key",
            KeyKind::OpenAiLegacy => "OpenAI legacy user key",
            KeyKind::GoogleAuth => "Google auth key",
            KeyKind::GoogleStandard => "Google standard key",
        }
    }

    /// What the key starts with.
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::AnthropicApi => "sk-ant-",
            KeyKind::OpenAiProject => "sk-proj-",
            KeyKind::OpenAiServiceAccount => "sk-svcacct-",
            KeyKind::OpenAiLegacy => "sk-",
            KeyKind::GoogleAuth => "AQ.",
            KeyKind::GoogleStandard => "AIza",
        }
    }

    /// A warning to show when a key of this kind is saved and on its card, if any.
    pub fn notice(self) -> Option<&'static str> {
        match self {
            KeyKind::GoogleStandard => Some(
                "This is a standard Google API key (AIza…). Google has stopped accepting standard keys for the \
                 Gemini API (unrestricted ones since 19 June 2026, all of them since September 2026), so calls \
                 with it will most likely be refused. Create an auth key in Google AI Studio → API keys \
                 (aistudio.google.com/apikey): its keys start with \"AQ.\". Then save it here in place of this one.",
            ),
            _ => None,
        }
    }

    /// Which bytes may follow the prefix.
    fn body_byte_ok(self, b: u8) -> bool {
        let base = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        match self {
            // Google does not document the auth keys' alphabet; those seen use the base set,
            // and the issue that asked for them names '.' as one of theirs.
            KeyKind::GoogleAuth => base || b == b'.',
            _ => base,
        }
    }

    fn length_ok(self, len: usize) -> bool {
        match self {
            KeyKind::GoogleStandard => len == GOOGLE_STANDARD_KEY_LEN,
            _ => (KEY_MIN_LEN..=KEY_MAX_LEN).contains(&len),
        }
    }

    /// Classifies a key by its prefix alone; `None` when no provider's key starts that way.
    fn of(key: &str) -> Option<KeyKind> {
        if key.starts_with("sk-ant-") {
            Some(KeyKind::AnthropicApi)
        } else if key.starts_with("sk-proj-") {
            Some(KeyKind::OpenAiProject)
        } else if key.starts_with("sk-svcacct-") {
            Some(KeyKind::OpenAiServiceAccount)
        } else if key.starts_with("sk-") {
            Some(KeyKind::OpenAiLegacy)
        } else if key.starts_with("AQ.") {
            Some(KeyKind::GoogleAuth)
        } else if key.starts_with("AIza") {
            Some(KeyKind::GoogleStandard)
        } else {
            None
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored kind that is not one of [`KeyKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key kind")]
pub struct UnknownKeyKind;

impl FromStr for KeyKind {
    type Err = UnknownKeyKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or(UnknownKeyKind)
    }
}

/// A provider API key that passed its provider's format check.
///
/// Holds the bytes in a `SecretString` (zeroed on drop, `Debug` prints `[REDACTED]`);
/// it has no `Display`, no `Serialize` and no `Clone`, so it cannot reach a log,
/// a response or an error by accident. `expose_secret` is called only where the bytes
/// are sealed or leave the process.
pub struct ApiKey {
    secret: SecretString,
    last4: Last4,
    kind: KeyKind,
}

impl ApiKey {
    /// Checks `raw` against `provider`'s key formats (after trimming surrounding white
    /// space). The error never contains any part of `raw`.
    pub fn parse(provider: Provider, raw: &str) -> Result<ApiKey, KeyFormatError> {
        let key = raw.trim();
        if key.is_empty() {
            return Err(KeyFormatError::Empty { provider });
        }
        // Credentials that can never run a model request are refused in every slot, first,
        // so the message says what they are rather than that they are in the wrong place.
        if key.starts_with("sk-ant-admin") {
            return Err(KeyFormatError::AdminKey {
                of: Provider::Anthropic,
            });
        }
        if key.starts_with("sk-ant-oat") || key.starts_with("sk-ant-ort") {
            return Err(KeyFormatError::SubscriptionToken);
        }
        if key.starts_with("sk-admin-") {
            return Err(KeyFormatError::AdminKey { of: Provider::OpenAi });
        }
        let kind = KeyKind::of(key).ok_or(KeyFormatError::BadPrefix { provider })?;
        if kind.provider() != provider {
            return Err(KeyFormatError::WrongProvider {
                slot: provider,
                looks_like: kind.provider(),
            });
        }
        let body = key.get(kind.prefix().len()..).unwrap_or_default();
        if !body.bytes().all(|b| kind.body_byte_ok(b)) {
            return Err(KeyFormatError::BadCharacters { kind });
        }
        let len = key.len();
        if !kind.length_ok(len) {
            return Err(KeyFormatError::BadLength { kind });
        }
        let last4 = Last4(key.get(len - 4..).unwrap_or_default().to_owned());
        Ok(ApiKey {
            secret: SecretString::from(key),
            last4,
            kind,
        })
    }

    pub fn last4(&self) -> &Last4 {
        &self.last4
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The key itself. Call only where it is sealed or put in an outbound header.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey([REDACTED], kind={}, last4={})", self.kind, self.last4.0)
    }
}

/// The placeholder of a key field: what a key of today looks like.
pub fn format_hint(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "sk-ant-…",
        Provider::OpenAi => "sk-proj-…",
        Provider::Google => "AQ.…",
    }
}

/// The accepted formats in a sentence, for help texts and the settings page.
pub fn format_rules(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "sk-ant-… (an API key from the Claude Console)",
        Provider::OpenAi => "sk-proj-… or sk-svcacct-… (legacy sk-… keys work too)",
        Provider::Google => {
            "AQ.… (an auth key from Google AI Studio; standard AIza… keys are accepted but Google refuses them)"
        }
    }
}

/// "a" or "an" before a name a person reads.
fn article(name: &str) -> &'static str {
    match name.chars().next() {
        Some('A' | 'E' | 'I' | 'O' | 'U') => "an",
        _ => "a",
    }
}

/// Why a pasted key was refused. Messages name the rule, never the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key is empty: paste the API key from your {} dashboard", provider.display_name())]
    Empty { provider: Provider },
    #[error("{}", admin_key_message(*of))]
    AdminKey { of: Provider },
    #[error(
        "this is a Claude subscription token (sk-ant-oat… or sk-ant-ort…, from Claude Code or a Claude.ai plan); \
         Anthropic allows those only in its own apps, so keyward never stores one. Create an API key in the \
         Claude Console ({ANTHROPIC_KEYS_PAGE}) and paste that instead"
    )]
    SubscriptionToken,
    #[error(
        "this looks like {} {} key, not {} {} key; save it under {} instead",
        article(looks_like.display_name()), looks_like.display_name(),
        article(slot.display_name()), slot.display_name(), looks_like.display_name()
    )]
    WrongProvider { slot: Provider, looks_like: Provider },
    #[error("{}", prefix_rule(*provider))]
    BadPrefix { provider: Provider },
    #[error(
        "the key contains characters that never appear in {}s (only {} after \"{}\")",
        kind.display_name(), allowed_characters(*kind), kind.prefix()
    )]
    BadCharacters { kind: KeyKind },
    #[error("{}", length_rule(*kind))]
    BadLength { kind: KeyKind },
}

fn admin_key_message(of: Provider) -> String {
    match of {
        Provider::Anthropic => format!(
            "this is an Anthropic Admin API key, which manages an organization but cannot run model \
             requests, so keyward never stores one. Create a regular API key in the Claude Console \
             ({ANTHROPIC_KEYS_PAGE}) instead"
        ),
        _ => format!(
            "this is an OpenAI admin key (sk-admin-…), which works only for the Administration API and cannot run \
             model requests, so keyward never stores one. Create a project API key ({OPENAI_KEYS_PAGE}) instead"
        ),
    }
}

fn prefix_rule(provider: Provider) -> String {
    match provider {
        Provider::Anthropic => format!("Anthropic API keys start with \"sk-ant-\" (create one at {ANTHROPIC_KEYS_PAGE})"),
        Provider::OpenAi => format!(
            "OpenAI keys start with \"sk-proj-\", \"sk-svcacct-\" or, for legacy keys, \"sk-\" (create one at {OPENAI_KEYS_PAGE})"
        ),
        Provider::Google => format!(
            "Google AI (Gemini) keys start with \"AQ.\" (auth keys, which Google AI Studio issues today) or \
             \"AIza\" (standard keys); create one at {GOOGLE_KEYS_PAGE}"
        ),
    }
}

fn allowed_characters(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::GoogleAuth => "letters, digits, '.', '-' and '_'",
        _ => "letters, digits, '-' and '_'",
    }
}

fn length_rule(kind: KeyKind) -> String {
    match kind {
        KeyKind::GoogleStandard => {
            "Google standard keys are exactly 39 characters long (\"AIza\" and 35 more)".to_owned()
        }
        _ => format!(
            "{}s are {KEY_MIN_LEN} to {KEY_MAX_LEN} characters long",
            kind.display_name()
        ),
    }
}

/// The last four characters of a saved key: the only part of a key ever shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Last4(String);

impl Last4 {
    /// Rebuilds a stored last4 (four ASCII key characters).
    pub fn from_stored(s: &str) -> Option<Last4> {
        (s.len() == 4
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
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
    fn valid_keys_parse_and_keep_last4_and_kind() {
        let k = ApiKey::parse(Anthropic, &format!("sk-ant-api03-{}WXYZ", body(20))).unwrap();
        assert_eq!((k.last4().as_str(), k.kind()), ("WXYZ", KeyKind::AnthropicApi));
        let k = ApiKey::parse(OpenAi, &format!("sk-proj-{}abcd", body(150))).unwrap();
        assert_eq!((k.last4().as_str(), k.kind()), ("abcd", KeyKind::OpenAiProject));
        let k = ApiKey::parse(OpenAi, &format!("sk-svcacct-{}", body(156))).unwrap();
        assert_eq!(k.kind(), KeyKind::OpenAiServiceAccount);
        let k = ApiKey::parse(OpenAi, &format!("sk-{}", body(48))).unwrap();
        assert_eq!(k.kind(), KeyKind::OpenAiLegacy);
        let k = ApiKey::parse(Google, &format!("AIza{}", body(35))).unwrap();
        assert_eq!((k.expose_secret().len(), k.kind()), (39, KeyKind::GoogleStandard));
        let k = ApiKey::parse(Google, &format!("AQ.Ab8RN6{}.q_9", body(41))).unwrap();
        assert_eq!((k.last4().as_str(), k.kind()), (".q_9", KeyKind::GoogleAuth));
        assert_eq!(Last4::from_stored(".q_9").as_ref(), Some(k.last4()));
    }

    #[test]
    fn only_standard_google_keys_carry_a_notice() {
        for kind in KeyKind::ALL {
            assert_eq!(kind.notice().is_some(), kind == KeyKind::GoogleStandard, "{kind}");
            assert_eq!(kind.as_str().parse::<KeyKind>(), Ok(kind));
        }
        let notice = KeyKind::GoogleStandard.notice().unwrap();
        assert!(notice.contains("auth key") && notice.contains("AQ."), "{notice}");
        assert!("AIza".parse::<KeyKind>().is_err());
    }

    #[test]
    fn surrounding_white_space_is_trimmed_inner_is_refused() {
        let key = format!("sk-{}", body(30));
        assert!(ApiKey::parse(OpenAi, &format!("  \t{key}\r\n")).is_ok());
        let inner = format!("sk-{}\n{}", body(10), body(10));
        assert_eq!(
            ApiKey::parse(OpenAi, &inner).unwrap_err(),
            KeyFormatError::BadCharacters {
                kind: KeyKind::OpenAiLegacy
            }
        );
    }

    #[test]
    fn length_bounds_on_both_sides() {
        // anthropic/openai/google auth: 20..=256 characters in all.
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(13))).is_ok()); // 20
        assert_eq!(
            ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(12))).unwrap_err(),
            KeyFormatError::BadLength {
                kind: KeyKind::AnthropicApi
            }
        ); // 19
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(249))).is_ok()); // 256
        assert!(ApiKey::parse(Anthropic, &format!("sk-ant-{}", body(250))).is_err()); // 257
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(17))).is_ok()); // 20
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(16))).is_err()); // 19
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(253))).is_ok()); // 256
        assert!(ApiKey::parse(OpenAi, &format!("sk-{}", body(254))).is_err()); // 257
        assert!(ApiKey::parse(Google, &format!("AQ.{}", body(17))).is_ok()); // 20
        assert!(ApiKey::parse(Google, &format!("AQ.{}", body(16))).is_err()); // 19
        assert!(ApiKey::parse(Google, &format!("AQ.{}", body(253))).is_ok()); // 256
        assert!(ApiKey::parse(Google, &format!("AQ.{}", body(254))).is_err()); // 257
                                                                               // google standard: exactly 39.
        assert!(ApiKey::parse(Google, &format!("AIza{}", body(34))).is_err());
        assert!(ApiKey::parse(Google, &format!("AIza{}", body(36))).is_err());
    }

    #[test]
    fn keys_that_cannot_run_models_are_refused_in_any_slot_saying_what_to_create() {
        for slot in Provider::ALL {
            let e = ApiKey::parse(slot, &format!("sk-ant-admin01-{}", body(93))).unwrap_err();
            assert_eq!(e, KeyFormatError::AdminKey { of: Anthropic });
            assert!(e.to_string().contains("Admin API key") && e.to_string().contains(ANTHROPIC_KEYS_PAGE));
            let e = ApiKey::parse(slot, &format!("sk-admin-{}", body(124))).unwrap_err();
            assert_eq!(e, KeyFormatError::AdminKey { of: OpenAi });
            assert!(e.to_string().contains("admin key") && e.to_string().contains(OPENAI_KEYS_PAGE));
            for token in ["sk-ant-oat01-", "sk-ant-ort01-"] {
                let e = ApiKey::parse(slot, &format!("{token}{}", body(80))).unwrap_err();
                assert_eq!(e, KeyFormatError::SubscriptionToken);
                assert!(e.to_string().contains("subscription token") && e.to_string().contains("API key"));
            }
        }
    }

    #[test]
    fn wrong_slot_names_the_right_provider_in_words() {
        let e = ApiKey::parse(OpenAi, &format!("sk-ant-{}", body(30))).unwrap_err();
        assert_eq!(
            e,
            KeyFormatError::WrongProvider {
                slot: OpenAi,
                looks_like: Anthropic
            }
        );
        assert_eq!(
            e.to_string(),
            "this looks like an Anthropic key, not an OpenAI key; save it under Anthropic instead"
        );
        let e = ApiKey::parse(Anthropic, &format!("AQ.{}", body(50))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this looks like a Google AI (Gemini) key, not an Anthropic key; save it under Google AI (Gemini) instead"
        );
        let e = ApiKey::parse(Google, &format!("sk-proj-{}", body(30))).unwrap_err();
        assert_eq!(
            e,
            KeyFormatError::WrongProvider {
                slot: Google,
                looks_like: OpenAi
            }
        );
        assert!(!e.to_string().contains("openai"), "{e}");
    }

    #[test]
    fn odd_characters_are_refused() {
        for bad in ["\0", "\t", "é", "ключ", " ", "+", "/", "=", "."] {
            let raw = format!("sk-{}{bad}{}", body(10), body(10));
            assert!(ApiKey::parse(OpenAi, &raw).is_err(), "{bad:?}");
        }
        for bad in ["\0", " ", "+", "/", "=", "é"] {
            let raw = format!("AQ.{}{bad}{}", body(20), body(20));
            assert!(ApiKey::parse(Google, &raw).is_err(), "{bad:?}");
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
            prop_assume!(!b.starts_with("admin") && !b.starts_with("oat") && !b.starts_with("ort"));
            let raw = format!("sk-ant-{b}");
            let k = ApiKey::parse(Anthropic, &raw).unwrap();
            prop_assert_eq!(k.last4().as_str(), &raw[raw.len() - 4..]);
        }

        #[test]
        fn generated_auth_keys_parse(b in "[A-Za-z0-9_.-]{17,253}") {
            let raw = format!("AQ.{b}");
            let k = ApiKey::parse(Google, &raw).unwrap();
            prop_assert_eq!(k.kind(), KeyKind::GoogleAuth);
            prop_assert!(Last4::from_stored(k.last4().as_str()).is_some());
        }

        #[test]
        fn refusals_never_repeat_the_input(b in "[A-Za-z0-9_]{12,40}", junk in "[^A-Za-z0-9_.-]") {
            for raw in [
                format!("sk-{b}{junk}{b}"), format!("sk-ant-{b}"), format!("AIza{b}{junk}"), format!("{b}{b}"),
                format!("AQ.{b}{junk}"), format!("sk-ant-oat01-{b}"), format!("sk-admin-{b}"),
            ] {
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
