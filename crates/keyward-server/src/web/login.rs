//! `/login`, `/logout` and `/logout/everywhere`.
//!
//! A person logs in with their keyward token in a form (POST: a token is never put in a
//! URL), or once with the code of the first-start login URL (`/login?code=…`), after which
//! they are sent on (303) so the spent code does not stay in the address bar. Both start a
//! fresh server-side session (a new id, so a session id planted before login is useless).
//! Attempts are limited per client address ([`super::throttle`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use keyward_core::ErrorCode;
use keyward_store::User;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::common::{
    cookie, forbidden_form_page, html, read_form, see_other, session, unavailable_page, ClientIp, SETTINGS_PATH,
};
use super::sessions::random_secret;
use super::{csrf, pages, sessions};
use crate::extract::ApiQuery;
use crate::state::AppState;

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
async fn start_session(state: &AppState, headers: &HeaderMap, user: User) -> Response {
    let store = state.engine.store.as_ref();
    if let Some(old) = cookie(headers, state.web.session_cookie()) {
        if let Err(e) = sessions::end(store, old).await {
            return unavailable_page(&e.into());
        }
    }
    let id = match sessions::create(store, &user, state.engine.clock.now()).await {
        Ok(id) => id,
        Err(e) => return unavailable_page(&e.into()),
    };
    tracing::info!(user = %user.id, "web login");
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
        if !state.web.login_limiter.allow(ip, state.engine.clock.now()) {
            return too_many(&state);
        }
        return match state.web.login_codes.redeem(code.trim(), state.engine.clock.now()) {
            Some(user) => start_session(&state, &headers, user).await,
            None => form(
                &state,
                StatusCode::UNAUTHORIZED,
                Some("This login link has expired or was already used. Log in with your access token instead."),
            ),
        };
    }
    match session(&state, &headers).await {
        Ok(Some(_)) => return see_other(SETTINGS_PATH),
        Ok(None) => {}
        Err(page) => return page,
    }
    let notice = q.signed_out.as_deref().map(|how| {
        if how == "everywhere" {
            "You are signed out everywhere. Every session of yours has ended, in every browser."
        } else {
            "You are signed out. Your session has ended on this browser."
        }
    });
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
    if !state.web.login_limiter.allow(ip, state.engine.clock.now()) {
        return too_many(&state);
    }
    let token = login.token.as_ref().map(|t| t.expose_secret()).unwrap_or_default();
    match state.engine.user_by_token(token).await {
        Ok(user) => start_session(&state, &headers, user).await,
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

/// `POST /logout`: ends the session (with the session's CSRF token), on every node at once.
pub async fn logout(state: State<AppState>, headers: HeaderMap, body: Body) -> Response {
    sign_out(state, headers, body, false).await
}

/// `POST /logout/everywhere`: ends every session of the user, in every browser and on every
/// node (with the session's CSRF token).
pub async fn logout_everywhere(state: State<AppState>, headers: HeaderMap, body: Body) -> Response {
    sign_out(state, headers, body, true).await
}

async fn sign_out(State(state): State<AppState>, headers: HeaderMap, body: Body, everywhere: bool) -> Response {
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return see_other("/login"),
        Err(page) => return page,
    };
    if !csrf::same_origin(&headers) {
        return forbidden_form_page();
    }
    let f: LogoutForm = match read_form(&state, body).await {
        Ok(f) => f,
        Err(res) => return res,
    };
    if !csrf::token_matches(&s.view.csrf, &f.csrf) {
        return forbidden_form_page();
    }
    let store = state.engine.store.as_ref();
    let ended = if everywhere {
        sessions::end_all(store, &s.view.user).await.map(|n| {
            tracing::info!(user = %s.view.user.id, sessions = n, "web sign-out everywhere");
        })
    } else {
        sessions::end(store, &s.id).await.map(drop)
    };
    if let Err(e) = ended {
        return unavailable_page(&e.into());
    }
    let mut res = see_other(if everywhere {
        "/login?signed_out=everywhere"
    } else {
        "/login?signed_out=1"
    });
    if let Some(c) = state.web.clear_cookie(state.web.session_cookie()) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    res
}
