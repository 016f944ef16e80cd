//! Cross-site request forgery defences for the settings page's forms.
//!
//! 1. Every state-changing form carries a token: a session's forms carry the session's
//!    CSRF token; the login form (no session yet) carries the value of a short-lived
//!    `SameSite=Strict` cookie set with the form (double submit). A POST without the right
//!    token is refused with 403.
//! 2. Cookies are `SameSite=Strict`, so a cross-site request carries no session at all.
//! 3. A request the browser marks as cross-site (`Sec-Fetch-Site: cross-site` or
//!    `same-site`), or whose `Origin` names another host, is refused outright.
//!    (`Origin: null` is accepted: browsers send it for every form POST from a page with
//!    `Referrer-Policy: no-referrer`; the token still decides.)

use axum::http::header::{HOST, ORIGIN};
use axum::http::HeaderMap;

/// Compares a submitted token with the expected one in time independent of where they differ.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.is_empty() || a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// False when the browser says the request comes from another site.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(site, Some(s) if s != "same-origin" && s != "none") {
        return false;
    }
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if origin == "null" {
        return true;
    }
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    let host = headers.get(HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_must_match_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", ""));
        assert!(!token_matches("", ""));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cross_site_requests_are_refused() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(same_origin(&headers(&[("host", "k.example"), ("origin", "null")])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "k.example"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "k.example"),
            ("sec-fetch-site", "same-site")
        ])));
        assert!(!same_origin(&headers(&[("origin", "http://k.example")])));
    }
}
