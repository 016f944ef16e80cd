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
use keyward_core::{Email, ErrorCode, ExternalId};
use keyward_store::User;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::common::{
    cookie, forbidden_form_page, html, not_found_page, read_form, see_other, session, unavailable_page, ClientIp,
    SETTINGS_PATH,
};
use super::sessions::random_secret;
use super::{csrf, oidc, pages, sessions};
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
    let sso = state.web.oidc.as_ref().map(|o| o.label.as_str());
    let mut res = html(
        status,
        pages::login_page(&token, error, notice, sso, !state.web.token_login_off),
    );
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
    start_session_via(state, headers, user, false).await
}

async fn start_session_via(state: &AppState, headers: &HeaderMap, user: User, sso: bool) -> Response {
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
    tracing::info!(user = %user.id, sso, "web login");
    let mut res = if sso {
        // The provider's redirect made this a cross-site navigation, which would not send the
        // new SameSite=Strict session cookie on a redirect: the page moves on by itself
        // (same-site), with a link for good measure.
        html(StatusCode::OK, pages::signed_in_page(SETTINGS_PATH))
    } else {
        see_other(SETTINGS_PATH)
    };
    let h = res.headers_mut();
    if let Some(c) = state.web.set_cookie(state.web.session_cookie(), &id) {
        h.append(SET_COOKIE, c);
    }
    if sso {
        if let Some(c) = state.web.clear_lax_cookie(state.web.oidc_cookie()) {
            h.append(SET_COOKIE, c);
        }
        if let Some(c) = state.web.set_cookie(SSO_MARK, "1") {
            h.append(SET_COOKIE, c);
        }
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
        if state.web.token_login_off {
            return form(
                &state,
                StatusCode::FORBIDDEN,
                Some("Login links are turned off here. Sign in with single sign-on."),
            );
        }
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
    if state.web.token_login_off {
        return form(
            &state,
            StatusCode::FORBIDDEN,
            Some("Token login is turned off here. Sign in with single sign-on."),
        );
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
    // Signed in with single sign-on: the provider's session ends too, where its discovery
    // document offers RP-initiated logout.
    let provider_logout = match (&state.web.oidc, cookie(&headers, SSO_MARK)) {
        (Some(oidc), Some(_)) if !everywhere => oidc.logout_url().await,
        _ => None,
    };
    let mut res = match provider_logout {
        Some(url) => see_other(&url),
        None => see_other(if everywhere {
            "/login?signed_out=everywhere"
        } else {
            "/login?signed_out=1"
        }),
    };
    if let Some(c) = state.web.clear_cookie(state.web.session_cookie()) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    if let Some(c) = state.web.clear_cookie(SSO_MARK) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    res
}

/// Marks a browser whose session began with single sign-on (not a secret: it only says to
/// end the provider's session too at sign-out).
const SSO_MARK: &str = "keyward_sso";

/// A sign-in that failed: a clear page, the pending login's cookie cleared, no session.
fn sso_failed(state: &AppState, status: StatusCode, text: &str) -> Response {
    let mut res = html(
        status,
        pages::message_page("Single sign-on failed", text, Some(("/login", "Back to log in"))),
    );
    if let Some(c) = state.web.clear_lax_cookie(state.web.oidc_cookie()) {
        res.headers_mut().append(SET_COOKIE, c);
    }
    res
}

/// `GET /login/oidc`: to the provider, with a fresh state, nonce and PKCE challenge.
pub async fn oidc_begin(State(state): State<AppState>) -> Response {
    let Some(oidc) = state.web.oidc.clone() else {
        return not_found_page();
    };
    match oidc.begin(state.engine.clock.now()).await {
        Ok((url, pending)) => {
            let mut res = see_other(&url);
            let max_age = oidc::PENDING_TTL_MS / 1000;
            if let Some(c) = state.web.set_lax_cookie(state.web.oidc_cookie(), &pending, max_age) {
                res.headers_mut().append(SET_COOKIE, c);
            }
            res
        }
        Err(f) => {
            tracing::warn!(reason = %f.log_reason(), "single sign-on could not start");
            sso_failed(
                &state,
                StatusCode::BAD_GATEWAY,
                "The sign-in provider could not be reached. Try again in a moment.",
            )
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /login/oidc/callback`: checks everything, finds (or, with JIT, creates) the user, and
/// only then starts a session.
pub async fn oidc_callback(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<CallbackQuery>,
) -> Response {
    let Some(oidc) = state.web.oidc.clone() else {
        return not_found_page();
    };
    if !state.web.login_limiter.allow(ip, state.engine.clock.now()) {
        return sso_failed(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "Too many sign-in attempts from your address. Wait a minute, then try again.",
        );
    }
    let pending = cookie(&headers, state.web.oidc_cookie());
    let result = match &q.error {
        // Still checked against the pending login: a forged error page says nothing.
        Some(e) if pending.is_some() => Err(oidc::Failure::Provider(e.chars().take(64).collect())),
        _ => {
            oidc.finish(pending, q.state.as_deref(), q.code.as_deref(), state.engine.clock.now())
                .await
        }
    };
    let identity = match result {
        Ok(identity) => identity,
        Err(f) => {
            tracing::warn!(reason = %f.log_reason(), "single sign-on refused");
            let (status, text) = match f {
                oidc::Failure::State => (
                    StatusCode::BAD_REQUEST,
                    "This sign-in had expired, was already used, or did not start in this browser. Start again from the login page.",
                ),
                oidc::Failure::Provider(_) => (
                    StatusCode::UNAUTHORIZED,
                    "The sign-in provider did not sign you in. Start again from the login page.",
                ),
                oidc::Failure::Unavailable(_) => (
                    StatusCode::BAD_GATEWAY,
                    "The sign-in provider could not be reached or gave an answer keyward cannot use. Try again in a moment.",
                ),
                oidc::Failure::Token(_) => (
                    StatusCode::UNAUTHORIZED,
                    "The sign-in provider's answer failed keyward's checks, so you were not signed in. Start again; if it keeps happening, tell your administrator.",
                ),
            };
            return sso_failed(&state, status, text);
        }
    };
    match sso_user(&state, &oidc, &identity).await {
        Ok(user) => start_session_via(&state, &headers, user, true).await,
        Err(res) => res,
    }
}

/// The keyward user for a verified identity: by external id (the configured claim), then by
/// verified email when `KEYWARD_OIDC_MATCH_EMAIL=1`, else created when `KEYWARD_OIDC_JIT=1`.
async fn sso_user(state: &AppState, oidc: &oidc::Oidc, identity: &oidc::Identity) -> Result<User, Response> {
    let store = state.engine.store.as_ref();
    let refuse = |text: &str| sso_failed(state, StatusCode::FORBIDDEN, text);
    let Ok(external) = ExternalId::parse(&identity.claim) else {
        tracing::warn!(claim = %oidc.user_claim, "single sign-on refused: the claim is not a usable external id");
        return Err(refuse(
            "Your account at the sign-in provider cannot be matched to a keyward user. Ask your administrator.",
        ));
    };
    match store.user_by_external_id(&external).await {
        Ok(Some(u)) => return Ok(u.user),
        Ok(None) => {}
        Err(e) => return Err(unavailable_page(&e.into())),
    }
    let email = identity.email.as_deref().and_then(|e| Email::parse(e).ok());
    if oidc.match_email && identity.email_verified {
        if let Some(email) = &email {
            match store.user_by_email(email).await {
                Ok(Some(u)) => return Ok(u),
                Ok(None) => {}
                Err(e) => return Err(unavailable_page(&e.into())),
            }
        }
    }
    if !oidc.jit {
        tracing::warn!(external = %external, "single sign-on refused: no such user (just-in-time creation is off)");
        return Err(refuse(
            "You are signed in at your provider, but there is no keyward user for you here. Ask your administrator to add you.",
        ));
    }
    let Some(email) = email else {
        tracing::warn!(external = %external, "single sign-on refused: no email to create the user with");
        return Err(refuse(
            "A keyward user could not be created for you: the sign-in provider sent no email address.",
        ));
    };
    match state.engine.put_external_user(external.as_str(), email.as_str()).await {
        Ok(u) => {
            tracing::info!(user = %u.user.id, external = %external, "single sign-on created a user (just in time)");
            Ok(u.user)
        }
        Err(e) => {
            tracing::warn!(external = %external, code = ?e.code, "single sign-on could not create the user");
            Err(refuse(
                "A keyward user could not be created for you (another user may have your email address). Ask your administrator.",
            ))
        }
    }
}
