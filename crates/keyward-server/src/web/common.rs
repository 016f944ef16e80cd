//! What the settings page's handlers share: HTML answers and redirects, the refusal pages,
//! cookies and the session of a request, form bodies, the client's address, and the layers
//! every answer passes (the demo banner, HSTS).

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header::{CONTENT_TYPE, COOKIE, LOCATION, STRICT_TRANSPORT_SECURITY};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::pages;
use super::sessions::{self, SessionView};
use crate::error::ApiError;
use crate::state::AppState;
use crate::wiped::{parse_form, read_wiped};

/// The settings page's address.
pub const SETTINGS_PATH: &str = "/settings/ai/model-keys";
/// The activity page's address (its CSV: [`ACTIVITY_CSV_PATH`]).
pub const ACTIVITY_PATH: &str = "/settings/ai/model-keys/activity";
pub const ACTIVITY_CSV_PATH: &str = "/settings/ai/model-keys/activity.csv";

pub const CSP: &str = "default-src 'self'; frame-ancestors 'none'";
pub const HSTS: &str = "max-age=31536000";

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

/// `Strict-Transport-Security` on every answer when keyward serves HTTPS.
pub async fn transport_headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if state.web.tls {
        res.headers_mut()
            .insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
    }
    res
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

/// The request's live session: `Ok(None)` without one; `Err` (a page saying so) when the
/// database cannot tell.
pub async fn session(state: &AppState, headers: &HeaderMap) -> Result<Option<WebSession>, Response> {
    let Some(id) = cookie(headers, state.web.session_cookie()) else {
        return Ok(None);
    };
    match sessions::get(state.engine.store.as_ref(), id, state.engine.clock.now()).await {
        Ok(view) => Ok(view.map(|view| WebSession {
            id: Zeroizing::new(id.to_owned()),
            view,
        })),
        Err(e) => Err(unavailable_page(&ApiError::from(e))),
    }
}

/// The page for a failure of keyward itself (the database down): what happened, and to retry.
pub fn unavailable_page(e: &ApiError) -> Response {
    html(
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        pages::message_page(
            "Something went wrong",
            "keyward could not reach its database, so nothing was shown or changed. Try again in a moment.",
            Some((SETTINGS_PATH, "Reload")),
        ),
    )
}

/// A form body (`application/x-www-form-urlencoded`), within the API's body limit. The raw
/// bytes and every decoded field are wiped once parsed (a form may carry a key or a token).
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
    // Forms can carry a pasted key or a login token: read and parsed without unwiped copies.
    let raw = read_wiped(body, state.max_body_bytes).await.map_err(|_| bad())?;
    parse_form::<T>(raw.as_slice()).map_err(|_| bad())
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
}
