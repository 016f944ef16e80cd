//! `/login` and `/logout`.
//!
//! A person logs in with their keyward token in a form (POST: a token is never put in a
//! URL), or once with the code of the first-start login URL (`/login?code=…`), after which
//! they are sent on (303) so the spent code does not stay in the address bar. Both start a
//! fresh server-side session (a new id, so a session id planted before login is useless).
//! Attempts are limited per client address: [`LOGIN_ATTEMPTS_PER_MINUTE`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use keyward_core::{ErrorCode, UnixMillis};
use keyward_store::User;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::sessions::random_secret;
use super::{cookie, csrf, html, pages, read_form, see_other, session, ClientIp, SETTINGS_PATH};
use crate::app::AppState;
use crate::auth::authenticate;
use crate::extract::ApiQuery;

/// Login attempts (token or code, right or wrong) allowed per client address per minute.
pub const LOGIN_ATTEMPTS_PER_MINUTE: usize = 10;

/// Login attempts per client address in the last minute (a sliding window: an address gets
/// at most [`LOGIN_ATTEMPTS_PER_MINUTE`] in any 60 seconds).
#[derive(Debug, Default)]
pub struct LoginLimiter {
    recent: Mutex<HashMap<Option<IpAddr>, VecDeque<i64>>>,
}

const WINDOW_MS: i64 = 60_000;

impl LoginLimiter {
    /// Counts one attempt; false when the address is over its limit. IPv6 addresses count
    /// per /64 (one host usually holds a whole /64).
    pub fn allow(&self, ip: Option<IpAddr>, now: UnixMillis) -> bool {
        let ip = ip.map(bucket);
        let now = now.as_i64();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() > 100_000 {
            recent.retain(|_, times| times.back().is_some_and(|t| now - t < WINDOW_MS));
        }
        let times = recent.entry(ip).or_default();
        while times.front().is_some_and(|t| now - t >= WINDOW_MS) {
            times.pop_front();
        }
        if times.len() >= LOGIN_ATTEMPTS_PER_MINUTE {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// The address an attempt counts against: IPv4 as is (also when mapped into IPv6), IPv6 by /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    code: Option<String>,
    /// Set by `/logout`'s redirect: the page says the person is signed out.
    signed_out: Option<String>,
}

/// The login form, with a fresh double-submit cookie for its CSRF token.
fn form(state: &AppState, status: StatusCode, error: Option<&str>) -> Response {
    form_with(state, status, error, None)
}

fn form_with(state: &AppState, status: StatusCode, error: Option<&str>, notice: Option<&str>) -> Response {
    let token = random_secret();
    let mut res = html(status, pages::login_page(&token, error, notice));
    if let Some(c) = state.web.set_cookie(state.web.login_cookie(), &token) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    res
}

fn too_many(state: &AppState) -> Response {
    form(
        state,
        StatusCode::TOO_MANY_REQUESTS,
        Some("Too many login attempts from your address. Wait a minute, then try again."),
    )
}

/// Starts a session for `user` (ending the request's old one) and sends them to the page.
fn start_session(state: &AppState, headers: &HeaderMap, user: User) -> Response {
    if let Some(old) = cookie(headers, state.web.session_cookie()) {
        state.web.sessions.end(old);
    }
    tracing::info!(user = %user.id, "web login");
    let id = state.web.sessions.create(user, state.clock.now());
    let mut res = see_other(SETTINGS_PATH);
    let h = res.headers_mut();
    if let Some(c) = state.web.set_cookie(state.web.session_cookie(), &id) {
        h.append(SET_COOKIE, c);
    }
    if let Some(c) = state.web.clear_cookie(state.web.login_cookie()) {
        h.append(SET_COOKIE, c);
    }
    res
}

/// `GET /login`: the form; `GET /login?code=…`: the one-time login.
pub async fn login_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<LoginQuery>,
) -> Response {
    if let Some(code) = q.code {
        if !state.web.login_limiter.allow(ip, state.clock.now()) {
            return too_many(&state);
        }
        return match state.web.login_codes.redeem(code.trim(), state.clock.now()) {
            Some(user) => start_session(&state, &headers, user),
            None => form(
                &state,
                StatusCode::UNAUTHORIZED,
                Some("This login link has expired or was already used. Log in with your access token instead."),
            ),
        };
    }
    if session(&state, &headers).is_some() {
        return see_other(SETTINGS_PATH);
    }
    let notice = q
        .signed_out
        .is_some()
        .then_some("You are signed out. Your session has ended on this browser.");
    form_with(&state, StatusCode::OK, None, notice)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    token: Option<SecretString>,
}

/// `POST /login` with `token` and the form's `csrf`.
pub async fn login_submit(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let refused = || {
        form(
            &state,
            StatusCode::FORBIDDEN,
            Some("This login form had expired or did not come from this site. Try again."),
        )
    };
    if !csrf::same_origin(&headers) {
        return refused();
    }
    let login: LoginForm = match read_form(&state, body).await {
        Ok(f) => f,
        Err(res) => return res,
    };
    let expected = cookie(&headers, state.web.login_cookie()).unwrap_or_default();
    if !csrf::token_matches(expected, &login.csrf) {
        return refused();
    }
    if !state.web.login_limiter.allow(ip, state.clock.now()) {
        return too_many(&state);
    }
    let token = login.token.as_ref().map(|t| t.expose_secret()).unwrap_or_default();
    match authenticate(&state, token).await {
        Ok(caller) => start_session(&state, &headers, caller.user),
        Err(e) if e.code == ErrorCode::Unauthorized => form(
            &state,
            StatusCode::UNAUTHORIZED,
            Some("That access token was not recognised. Check it and try again."),
        ),
        Err(e) => form(
            &state,
            StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Some(&e.message),
        ),
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`: ends the session (with the session's CSRF token).
pub async fn logout(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let Some(s) = session(&state, &headers) else {
        return see_other("/login");
    };
    if !csrf::same_origin(&headers) {
        return super::forbidden_form_page();
    }
    let f: LogoutForm = match read_form(&state, body).await {
        Ok(f) => f,
        Err(res) => return res,
    };
    if !csrf::token_matches(&s.view.csrf, &f.csrf) {
        return super::forbidden_form_page();
    }
    state.web.sessions.end(&s.id);
    let mut res = see_other("/login?signed_out=1");
    if let Some(c) = state.web.clear_cookie(state.web.session_cookie()) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_attempts_are_limited_per_address_and_minute() {
        let l = LoginLimiter::default();
        let a: Option<IpAddr> = "127.0.0.1".parse().ok();
        let b: Option<IpAddr> = "127.0.0.2".parse().ok();
        for _ in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow(a, UnixMillis(0)));
        }
        assert!(!l.allow(a, UnixMillis(59_999)));
        assert!(l.allow(b, UnixMillis(59_999)));
        assert!(l.allow(a, UnixMillis(60_000)));

        // One IPv6 /64 is one address; the IPv4-mapped form is the IPv4 address.
        let l = LoginLimiter::default();
        for i in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow(format!("2001:db8::{i:x}").parse().ok(), UnixMillis(0)));
        }
        assert!(!l.allow("2001:db8::ffff:1".parse().ok(), UnixMillis(0)));
        assert!(l.allow("2001:db8:0:1::1".parse().ok(), UnixMillis(0)));
        for _ in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow("::ffff:10.0.0.1".parse().ok(), UnixMillis(0)));
        }
        assert!(!l.allow("10.0.0.1".parse().ok(), UnixMillis(0)));
    }
}
