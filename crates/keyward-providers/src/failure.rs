//! What went wrong with a provider call, read from the provider's own status and error body.
//!
//! Each provider module reads its error envelope; this module holds the shared vocabulary
//! ([`Diagnosis`]), the failure type and the fallback for answers nobody can read.

use std::fmt;

use keyward_core::Provider;
use serde::Serialize;

use crate::wire::wire;

/// Longest provider message kept, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// Why a call failed, in the words of the public API (`status` of a key test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Diagnosis {
    InvalidKey,
    NoCredit,
    MissingPermission,
    ModelNotAvailable,
    RateLimited,
    ProviderUnavailable,
    Unreachable,
    BadRequest,
    MalformedResponse,
    /// The provider says the key was published somewhere and has blocked it (Google:
    /// "Your API key was reported as leaked"). Calls on it stop until it is replaced.
    KeyReportedLeaked,
}

impl Diagnosis {
    pub const ALL: [Diagnosis; 10] = [
        Diagnosis::InvalidKey,
        Diagnosis::NoCredit,
        Diagnosis::MissingPermission,
        Diagnosis::ModelNotAvailable,
        Diagnosis::RateLimited,
        Diagnosis::ProviderUnavailable,
        Diagnosis::Unreachable,
        Diagnosis::BadRequest,
        Diagnosis::MalformedResponse,
        Diagnosis::KeyReportedLeaked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Diagnosis::InvalidKey => "invalid_key",
            Diagnosis::NoCredit => "no_credit",
            Diagnosis::MissingPermission => "missing_permission",
            Diagnosis::ModelNotAvailable => "model_not_available",
            Diagnosis::RateLimited => "rate_limited",
            Diagnosis::ProviderUnavailable => "provider_unavailable",
            Diagnosis::Unreachable => "unreachable",
            Diagnosis::BadRequest => "bad_request",
            Diagnosis::MalformedResponse => "malformed_response",
            Diagnosis::KeyReportedLeaked => "key_reported_leaked",
        }
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed provider call.
///
/// `status` is the provider's HTTP status (`None` for a failure inside a 200 stream or with no
/// answer at all). `message` is the provider's own error message, or a clear sentence when the
/// answer could not be read, at most [`MAX_MESSAGE_CHARS`] characters. The provider may have
/// echoed the key in it: callers scrub it before showing it (this crate never sees the key).
/// `advice` says what to do, where the provider's answer is specific enough to tell (Google's
/// answers about a key's type and state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{diagnosis}: {message}")]
pub struct ProviderFailure {
    pub status: Option<u16>,
    pub diagnosis: Diagnosis,
    pub message: String,
    pub advice: Option<&'static str>,
}

impl ProviderFailure {
    /// A failure with `message` trimmed and bounded to [`MAX_MESSAGE_CHARS`].
    pub fn new(status: Option<u16>, diagnosis: Diagnosis, message: &str) -> ProviderFailure {
        ProviderFailure {
            status,
            diagnosis,
            message: bound_message(message),
            advice: None,
        }
    }

    /// The same failure with what to do about it.
    pub(crate) fn advising(mut self, advice: &'static str) -> ProviderFailure {
        self.advice = Some(advice);
        self
    }

    /// Whether the key itself is at fault (not the model, the request or the provider): the
    /// diagnoses after which a key stops working until someone acts on it.
    pub fn is_key_failure(&self) -> bool {
        matches!(
            self.diagnosis,
            Diagnosis::InvalidKey | Diagnosis::NoCredit | Diagnosis::MissingPermission | Diagnosis::KeyReportedLeaked
        )
    }

    /// The provider said the model does not exist (404), as opposed to refusing it to this key.
    pub fn is_model_not_found(&self) -> bool {
        self.diagnosis == Diagnosis::ModelNotAvailable && self.status == Some(404)
    }

    /// No answer at all: connection refused, DNS, TLS, timeout. `detail` must not hold a key.
    pub fn unreachable(provider: Provider, detail: &str) -> ProviderFailure {
        let detail = detail.trim();
        let message = if detail.is_empty() {
            format!("{} could not be reached", provider.display_name())
        } else {
            format!("{} could not be reached: {detail}", provider.display_name())
        };
        ProviderFailure::new(None, Diagnosis::Unreachable, &message)
    }

    /// An answer keyward could not read; `what` says how, as the end of a sentence.
    pub(crate) fn malformed(provider: Provider, status: Option<u16>, what: &str) -> ProviderFailure {
        let message = match status {
            Some(code) => format!("{} answered HTTP {code} with {what}", provider.display_name()),
            None => format!("{} answered with {what}", provider.display_name()),
        };
        ProviderFailure::new(status, Diagnosis::MalformedResponse, &message)
    }
}

/// Reads a failed answer (any status that is not a success, or a success whose body is an
/// error) into a [`ProviderFailure`].
///
/// The provider's error type or code decides first, then its HTTP status; see each provider
/// module for its table. A body that is not the provider's error envelope (an HTML error page,
/// garbage, nothing) is diagnosed from the status alone and the message says the body could
/// not be read. A redirect is a `malformed_response`: keyward follows no redirects.
pub fn diagnose(provider: Provider, status: u16, body: &[u8]) -> ProviderFailure {
    wire(provider)
        .read_error(status, body)
        .unwrap_or_else(|| unreadable(provider, status, body))
}

/// The diagnosis an HTTP status implies on its own.
pub(crate) fn status_diagnosis(status: u16) -> Diagnosis {
    match status {
        401 => Diagnosis::InvalidKey,
        402 => Diagnosis::NoCredit,
        403 => Diagnosis::MissingPermission,
        404 => Diagnosis::ModelNotAvailable,
        429 => Diagnosis::RateLimited,
        408 | 500..=599 => Diagnosis::ProviderUnavailable,
        400..=499 => Diagnosis::BadRequest,
        _ => Diagnosis::MalformedResponse,
    }
}

fn unreadable(provider: Provider, status: u16, body: &[u8]) -> ProviderFailure {
    let name = provider.display_name();
    if (300..400).contains(&status) {
        let message =
            format!("{name} answered with an unexpected HTTP {status} redirect; keyward follows no redirects");
        return ProviderFailure::new(Some(status), Diagnosis::MalformedResponse, &message);
    }
    let what = if body.iter().all(u8::is_ascii_whitespace) {
        "an empty body"
    } else if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        "a JSON body that is not its error format"
    } else {
        "a body that is not JSON (unreadable)"
    };
    let message = format!("{name} answered HTTP {status} with {what}");
    ProviderFailure::new(Some(status), status_diagnosis(status), &message)
}

/// The message a failure keeps: the provider's text, or `fallback` when it sent none.
pub(crate) fn message_or(message: Option<&str>, fallback: impl FnOnce() -> String) -> String {
    match message.map(str::trim) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => fallback(),
    }
}

/// Contains `needle` (ASCII lower case), ignoring ASCII case.
pub(crate) fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_ascii_lowercase().contains(needle)
}

fn bound_message(message: &str) -> String {
    let message = message.trim();
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message.to_owned();
    }
    let mut out: String = message.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_strings_are_the_api_words() {
        let words: Vec<&str> = Diagnosis::ALL.iter().map(|d| d.as_str()).collect();
        assert_eq!(
            words,
            [
                "invalid_key",
                "no_credit",
                "missing_permission",
                "model_not_available",
                "rate_limited",
                "provider_unavailable",
                "unreachable",
                "bad_request",
                "malformed_response",
                "key_reported_leaked"
            ]
        );
        for d in Diagnosis::ALL {
            assert_eq!(serde_json::to_value(d).unwrap(), serde_json::json!(d.as_str()));
            assert_eq!(d.to_string(), d.as_str());
        }
    }

    #[test]
    fn messages_are_bounded_on_char_boundaries() {
        let long = "é".repeat(5000);
        let f = ProviderFailure::new(Some(400), Diagnosis::BadRequest, &long);
        assert_eq!(f.message.chars().count(), MAX_MESSAGE_CHARS);
        assert!(f.message.ends_with('…'));
        let exact = "a".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(ProviderFailure::new(None, Diagnosis::BadRequest, &exact).message, exact);
    }

    #[test]
    fn garbage_bodies_are_named_as_such() {
        for p in Provider::ALL {
            let f = diagnose(p, 502, b"<html><body>Bad gateway</body></html>");
            assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable);
            assert_eq!(f.status, Some(502));
            assert!(f.message.contains("not JSON"), "{}", f.message);
            let f = diagnose(p, 401, b"");
            assert_eq!(f.diagnosis, Diagnosis::InvalidKey);
            assert!(f.message.contains("empty body"), "{}", f.message);
            let f = diagnose(p, 418, b"{\"weird\": true}");
            assert_eq!(f.diagnosis, Diagnosis::BadRequest);
            assert!(f.message.contains("not its error format"), "{}", f.message);
            let f = diagnose(p, 307, b"");
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
            assert!(f.message.contains("redirect"), "{}", f.message);
            let f = diagnose(p, 200, b"\xff\xfe garbage");
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        }
    }

    #[test]
    fn unreachable_names_the_provider() {
        let f = ProviderFailure::unreachable(Provider::OpenAi, "connection refused");
        assert_eq!(f.status, None);
        assert_eq!(f.diagnosis, Diagnosis::Unreachable);
        assert_eq!(f.message, "OpenAI could not be reached: connection refused");
        assert_eq!(
            f.to_string(),
            "unreachable: OpenAI could not be reached: connection refused"
        );
    }
}
