//! The settings page: Settings → AI → Model keys, server-rendered, for people.
//!
//! It is another face of the JSON API, not a second implementation: every action calls the
//! same functions the API handlers call (`routes::model_keys::store_key`, `switch_source`,
//! `delete_key`, `routes::key_test::run_key_test`, `routes::usage::month_usage`), with the
//! same membership, role, plan and key-format checks, sealing and audit events.
//!
//! - [`login`]: `/login` with a keyward token (a form POST, never a URL), or with the
//!   one-time code of the first-start login URL; `/logout`. Login is rate-limited per
//!   client address.
//! - [`settings`]: the page and its forms. Every action is a plain HTML form; the small
//!   same-origin script (`assets/model-keys.js`) only spares a reload on "Test key".
//! - [`sessions`]: server-side sessions in this process's memory (per node: several
//!   nodes need sticky sessions until sessions move to the database).
//! - [`csrf`]: tokens on every state-changing form, and refusal of cross-site requests.
//! - [`pages`]: the HTML, every foreign value escaped.
//!
//! Every answer here carries `Content-Security-Policy: default-src 'self'; frame-ancestors
//! 'none'`, `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and
//! `Cache-Control: no-store`; served over TLS, every answer of keyward carries
//! `Strict-Transport-Security` and cookies are `Secure` (and `__Host-` prefixed).

pub mod csrf;
pub mod login;
pub mod pages;
pub mod sessions;
pub mod settings;

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, REFERRER_POLICY, STRICT_TRANSPORT_SECURITY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::Router;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::extract::read_limited;
use login::LoginLimiter;
use sessions::{LoginCodes, SessionView, Sessions};

/// The settings page's address.
pub const SETTINGS_PATH: &str = "/settings/ai/model-keys";

pub const CSP: &str = "default-src 'self'; frame-ancestors 'none'";
pub const HSTS: &str = "max-age=31536000";

/// The web UI's state in [`AppState`]: sessions, login codes, the login limiter.
#[derive(Debug, Default)]
pub struct WebState {
    pub sessions: Sessions,
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

/// The address of the client on the other end of the connection, set by `serve` for each
/// connection (plain TCP or TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> ClientAddr {
        ClientAddr(*stream.remote_addr())
    }
}

/// The client's IP address, when the server was started with [`ClientAddr`] connect info.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ClientIp, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<ClientAddr>>()
                .map(|ConnectInfo(ClientAddr(a))| a.ip()),
        ))
    }
}

/// The web UI's routes; [`crate::app::router`] merges them.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/login", get(login::login_form).post(login::login_submit))
        .route("/logout", post(login::logout))
        .route(SETTINGS_PATH, get(settings::page))
        .route("/settings/ai/model-keys/{provider}/{action}", post(settings::action))
        .route("/assets/{file}", get(asset))
        .layer(middleware::from_fn(page_headers))
}

/// Largest page the banner is put into (pages are a few tens of KiB).
const MAX_BANNERED_PAGE: usize = 4 * 1024 * 1024;

/// Puts [`WebState::banner`] at the top of every HTML page, when there is one, and in a
/// `Keyward-Demo` header on every other answer (JSON callers never see the page).
pub async fn banner(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let Some(text) = state.web.banner.as_deref() else {
        return res;
    };
    if let Ok(value) = HeaderValue::from_str(text) {
        res.headers_mut().insert("keyward-demo", value);
    }
    let is_html = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html"));
    if !is_html {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BANNERED_PAGE).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let page = String::from_utf8_lossy(&bytes);
    let notice = format!(r#"<div class="demo-banner" role="note">{}</div>"#, pages::esc(text));
    let page = match page.split_once("<body>") {
        Some((head, rest)) => format!("{head}<body>\n{notice}{rest}"),
        None => format!("{notice}{page}"),
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(page))
}

async fn root() -> Response {
    see_other(SETTINGS_PATH)
}

/// The headers every answer of the web UI carries.
async fn page_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// `Strict-Transport-Security` on every answer when keyward serves HTTPS.
pub async fn transport_headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if state.web.tls {
        res.headers_mut()
            .insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
    }
    res
}

const CSS: &str = include_str!("assets/keyward.css");
const JS: &str = include_str!("assets/model-keys.js");
const FAVICON: &str = include_str!("assets/favicon.svg");

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "keyward.css" => (CSS, "text/css; charset=utf-8"),
        "model-keys.js" => (JS, "text/javascript; charset=utf-8"),
        "favicon.svg" => (FAVICON, "image/svg+xml"),
        _ => return not_found_page(),
    };
    ([(CONTENT_TYPE, content_type)], body).into_response()
}

/// An HTML answer.
pub fn html(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// `303 See Other` to `location` (a path on this server).
pub fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(v) => (StatusCode::SEE_OTHER, [(LOCATION, v)]).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub fn not_found_page() -> Response {
    html(
        StatusCode::NOT_FOUND,
        pages::message_page(
            "Page not found",
            "There is no such page or account here.",
            Some((SETTINGS_PATH, "Back to model keys")),
        ),
    )
}

/// The refusal of a form that lacks this page's CSRF token or comes from another site.
pub fn forbidden_form_page() -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::message_page(
            "This form was refused",
            "The form had expired or did not come from this site, so nothing was changed. Reload the page and try again.",
            Some((SETTINGS_PATH, "Back to model keys")),
        ),
    )
}

/// The value of cookie `name` in the request, if sent.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A live session of the request, with its id (for ending it and for messages).
#[derive(Debug)]
pub struct WebSession {
    pub id: Zeroizing<String>,
    pub view: SessionView,
}

pub fn session(state: &AppState, headers: &HeaderMap) -> Option<WebSession> {
    let id = cookie(headers, state.web.session_cookie())?;
    let view = state.web.sessions.get(id, state.clock.now())?;
    Some(WebSession {
        id: Zeroizing::new(id.to_owned()),
        view,
    })
}

/// A form body (`application/x-www-form-urlencoded`), within the API's body limit. The raw
/// bytes are zeroed once parsed (a form may carry a key).
pub async fn read_form<T: DeserializeOwned>(state: &AppState, body: Body) -> Result<T, Response> {
    let bad = || {
        html(
            StatusCode::BAD_REQUEST,
            pages::message_page(
                "This form could not be read",
                "Nothing was changed. Reload the page and try again.",
                Some((SETTINGS_PATH, "Back to model keys")),
            ),
        )
    };
    let bytes = read_limited(body, state.max_body_bytes).await.map_err(|_| bad())?;
    let raw = Zeroizing::new(Vec::from(bytes));
    serde_urlencoded::from_bytes::<T>(&raw).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("a=1; keyward_session=abc; b=2"));
        h.append(COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(cookie(&h, "keyward_session"), Some("abc"));
        assert_eq!(cookie(&h, "c"), Some("3"));
        assert_eq!(cookie(&h, "session"), None);
        assert_eq!(cookie(&h, "keyward"), None);
    }

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
