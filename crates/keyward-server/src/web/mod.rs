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
//! - [`oidc`]: single sign-on with OpenID Connect (`/login/oidc`, its callback), when
//!   configured; token login can then be turned off (`KEYWARD_TOKEN_LOGIN=0`).
//! - [`settings`]: the page and its forms. Every action is a plain HTML form; the small
//!   same-origin script (`assets/model-keys.js`) only spares a reload on "Test key".
//! - [`sessions`]: server-side sessions in the database (only the id's hash), so any node
//!   serves them and a restart keeps them.
//! - [`activity`]: the account's audit log as a person reads it, and as CSV.
//! - [`csrf`]: tokens on every state-changing form, and refusal of cross-site requests.
//! - [`pages`]: the HTML, every foreign value escaped.
//!
//! Every answer here carries `Content-Security-Policy: default-src 'self'; frame-ancestors
//! 'none'`, `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and
//! `Cache-Control: no-store`; served over TLS, every answer of keyward carries
//! `Strict-Transport-Security` and cookies are `Secure` (and `__Host-` prefixed).

pub mod activity;
pub mod common;
pub mod context;
pub mod csrf;
pub mod login;
pub mod oidc;
pub mod pages;
pub mod sessions;
pub mod settings;
pub mod throttle;

use axum::extract::{Path, Request};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use common::{banner, transport_headers, ClientAddr, SETTINGS_PATH};
pub use context::WebState;

use crate::state::AppState;
use common::{not_found_page, see_other, ACTIVITY_CSV_PATH, ACTIVITY_PATH, CSP};

/// The web UI's routes; [`crate::app::router`] merges them.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/login", get(login::login_form).post(login::login_submit))
        .route("/login/oidc", get(login::oidc_begin))
        .route(oidc::CALLBACK_PATH, get(login::oidc_callback))
        .route("/logout", post(login::logout))
        .route("/logout/everywhere", post(login::logout_everywhere))
        .route(SETTINGS_PATH, get(settings::page))
        .route(ACTIVITY_PATH, get(activity::page))
        .route(ACTIVITY_CSV_PATH, get(activity::csv))
        .route("/settings/ai/model-keys/{provider}/{action}", post(settings::action))
        .route("/assets/{file}", get(asset))
        .layer(middleware::from_fn(page_headers))
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
