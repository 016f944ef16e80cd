//! What a provider's rate-limit headers say about a key's headroom.
//!
//! - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   resets as RFC 3339 times (<https://platform.claude.com/docs/en/api/rate-limits>).
//! - OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as durations
//!   like `6m0s` (<https://developers.openai.com/api/docs/guides/rate-limits>).
//! - Google sends none: its limits are per project and shown only in AI Studio
//!   (<https://ai.google.dev/gemini-api/docs/rate-limits>).

use keyward_core::Provider;
use serde::{Deserialize, Serialize};

use crate::wire::wire;

/// Longest reset value kept (a timestamp or a duration).
const MAX_RESET_CHARS: usize = 40;

/// One limit as the provider reported it; any part may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// When the limit is full again, in the provider's own form (a time or a duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
}

impl Limit {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// The limits one answer reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Limit>,
    /// Anthropic only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<Limit>,
    /// Anthropic only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<Limit>,
}

/// Reads the rate-limit headers of an answer (names in lower case); `None` when there are
/// none (always for Google).
pub fn rate_limits(provider: Provider, headers: &[(String, String)]) -> Option<RateLimits> {
    let limits = wire(provider).rate_limits(headers);
    (limits != RateLimits::default()).then_some(limits)
}

/// Why no headroom is shown for a provider that never sends it.
pub fn rate_limits_note(provider: Provider) -> Option<&'static str> {
    wire(provider).rate_limits_note()
}

/// One limit from its three headers (`limit` and `remaining` whole numbers, `reset` a short
/// time or duration); `None` when none of them is readable.
pub(crate) fn read_limit(
    headers: &[(String, String)],
    limit_name: &str,
    remaining_name: &str,
    reset_name: &str,
) -> Option<Limit> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
    let reset = get(reset_name)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_RESET_CHARS
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b":.-+".contains(&b))
        })
        .map(str::to_owned);
    let l = Limit {
        limit: number(limit_name),
        remaining: number(remaining_name),
        reset,
    };
    (!l.is_empty()).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn anthropic_headers_are_read() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "1000"),
            ("anthropic-ratelimit-requests-remaining", "999"),
            ("anthropic-ratelimit-requests-reset", "2026-12-07T12:40:59Z"),
            ("anthropic-ratelimit-input-tokens-limit", "80000"),
            ("anthropic-ratelimit-input-tokens-remaining", "80000"),
            ("anthropic-ratelimit-output-tokens-limit", "16000"),
            ("anthropic-ratelimit-tokens-limit", "96000"),
            ("request-id", "req_1"),
        ]);
        let l = rate_limits(Provider::Anthropic, &h).unwrap();
        assert_eq!(
            l.requests,
            Some(Limit {
                limit: Some(1000),
                remaining: Some(999),
                reset: Some("2026-12-07T12:40:59Z".into())
            })
        );
        assert_eq!(l.input_tokens.unwrap().remaining, Some(80000));
        assert_eq!(l.output_tokens.unwrap().limit, Some(16000));
        assert_eq!(l.tokens.unwrap().limit, Some(96000));
    }

    #[test]
    fn openai_headers_are_read() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let l = rate_limits(Provider::OpenAi, &h).unwrap();
        assert_eq!(l.requests.unwrap().reset.as_deref(), Some("1s"));
        assert_eq!(l.tokens.as_ref().unwrap().remaining, Some(149_984));
        assert_eq!(l.tokens.unwrap().reset.as_deref(), Some("6m0s"));
        assert_eq!(l.input_tokens, None);
    }

    #[test]
    fn none_when_absent_odd_values_dropped() {
        assert_eq!(rate_limits(Provider::OpenAi, &headers(&[("x-request-id", "r")])), None);
        assert_eq!(
            rate_limits(Provider::Google, &headers(&[("x-ratelimit-limit-requests", "1")])),
            None
        );
        assert!(rate_limits_note(Provider::Google).is_some());
        let l = rate_limits(
            Provider::OpenAi,
            &headers(&[
                ("x-ratelimit-limit-requests", "many"),
                ("x-ratelimit-reset-requests", "<script>"),
                ("x-ratelimit-remaining-requests", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            l.requests,
            Some(Limit {
                limit: None,
                remaining: Some(3),
                reset: None
            })
        );
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json, serde_json::json!({"requests": {"remaining": 3}}));
    }
}
