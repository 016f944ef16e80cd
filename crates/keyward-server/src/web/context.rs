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
