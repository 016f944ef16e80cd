//! [`WebState`]: the settings page's part of the gateway's state: login codes, the
//! login limiter, and how cookies are named and set (TLS or not).

use axum::http::HeaderValue;

use super::sessions::LoginCodes;
use super::throttle::LoginLimiter;

/// The web UI's state in the gateway's `AppState`: login codes, the login limiter (sessions
/// are in the database: [`super::sessions`]).
#[derive(Debug, Default)]
pub struct WebState {
    pub login_codes: LoginCodes,
    pub login_limiter: LoginLimiter,
    /// Served over TLS: cookies are `Secure` and `__Host-` prefixed, HSTS is sent.
    pub tls: bool,
    /// A notice shown at the top of every page (`keyward demo` says no real provider is
    /// called), as plain text.
    pub banner: Option<String>,
    /// Single sign-on, when `KEYWARD_OIDC_ISSUER` is set.
    pub oidc: Option<std::sync::Arc<super::oidc::Oidc>>,
    /// `KEYWARD_TOKEN_LOGIN=0`: `/login` takes no keyward token and no login code.
    pub token_login_off: bool,
}

impl WebState {
    pub fn new(tls: bool) -> WebState {
        WebState {
            tls,
            ..WebState::default()
        }
    }

    /// The session cookie's name.
    pub fn session_cookie(&self) -> &'static str {
        if self.tls {
            "__Host-keyward_session"
        } else {
            "keyward_session"
        }
    }

    /// The login form's double-submit cookie's name.
    pub fn login_cookie(&self) -> &'static str {
        if self.tls {
            "__Host-keyward_login"
        } else {
            "keyward_login"
        }
    }

    /// The pending single sign-on's cookie's name.
    pub fn oidc_cookie(&self) -> &'static str {
        if self.tls {
            "__Host-keyward_oidc"
        } else {
            "keyward_oidc"
        }
    }

    /// `Set-Cookie` for the pending single sign-on: `SameSite=Lax`, since the provider's
    /// redirect back is a cross-site navigation (the cookie only holds what the callback
    /// checks, encrypted); it expires with the pending login.
    pub fn set_lax_cookie(&self, name: &str, value: &str, max_age_secs: i64) -> Option<HeaderValue> {
        let secure = if self.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}"
        ))
        .ok()
    }

    /// `Set-Cookie` that deletes the `SameSite=Lax` cookie `name`.
    pub fn clear_lax_cookie(&self, name: &str) -> Option<HeaderValue> {
        self.set_lax_cookie(name, "", 0)
    }

    /// `Set-Cookie` for `name=value`: `HttpOnly; SameSite=Strict; Path=/`, `Secure` over TLS.
    pub fn set_cookie(&self, name: &str, value: &str) -> Option<HeaderValue> {
        let secure = if self.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}")).ok()
    }

    /// `Set-Cookie` that deletes `name`.
    pub fn clear_cookie(&self, name: &str) -> Option<HeaderValue> {
        let secure = if self.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
        ))
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_strict_and_secure_over_tls() {
        let plain = WebState::new(false);
        let v = plain.set_cookie(plain.session_cookie(), "x").unwrap();
        assert_eq!(v, "keyward_session=x; Path=/; HttpOnly; SameSite=Strict");
        let tls = WebState::new(true);
        let v = tls.set_cookie(tls.session_cookie(), "x").unwrap();
        assert_eq!(v, "__Host-keyward_session=x; Path=/; HttpOnly; SameSite=Strict; Secure");
        let gone = tls.clear_cookie(tls.session_cookie()).unwrap();
        assert!(gone.to_str().unwrap().contains("Max-Age=0"));
    }
}
