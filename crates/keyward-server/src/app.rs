//! The gateway's router: keyward's JSON API (built from the handlers' OpenAPI
//! annotations), the native pass-through, the settings page, and the layers every answer
//! passes through.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::{CACHE_CONTROL, X_CONTENT_TYPE_OPTIONS};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;
use keyward_core::ErrorCode;

use crate::error::ApiError;
use crate::routes;
use crate::state::AppState;
use crate::web;

pub fn router(state: AppState) -> Router {
    // keyward's own JSON API: built from the handlers' OpenAPI annotations, so every
    // route in it is documented (see `openapi`).
    let (api, doc) = crate::openapi::api_router();
    let doc = Arc::new(doc);
    // The native pass-through: keyward-providers lists what it carries.
    let mut native = Router::new();
    for api in keyward_providers::NativeApi::ALL {
        native = native.route(
            &format!("/providers/{}", api.route()),
            routes::passthrough::native_route(api),
        );
    }
    for provider in keyward_core::Provider::ALL {
        for route in keyward_providers::model_list_routes(provider) {
            native = native.route(
                &format!("/providers/{route}"),
                routes::passthrough::model_list_route(provider),
            );
        }
    }
    let native = native.route("/providers/{provider}/{*rest}", any(routes::passthrough::not_carried));
    let metrics_on_api = state.metrics_on_api;
    let router = Router::new()
        .merge(api)
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        // The same routes with the product feature in the base URL (for SDKs, which cannot
        // set a header per call): `…/features/{feature}/providers/{provider}/…`.
        .nest("/v1/accounts/{account_id}/features/{feature}", native.clone())
        .nest("/v1/accounts/{account_id}", native)
        .merge(web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read by `extract::JsonBody`/`AiBody` with their own limits; this is a backstop.
        .layer(DefaultBodyLimit::max(state.max_ai_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), web::banner))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(crate::wiped::close_after_secret_body))
        .layer(middleware::from_fn_with_state(state.clone(), web::transport_headers))
        .with_state(state.clone());
    if metrics_on_api {
        router.merge(metrics_router(state))
    } else {
        router
    }
}

/// `/metrics` alone, for the API's listener or `KEYWARD_METRICS_LISTEN`'s.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(routes::ops::metrics))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take that method")
}

/// Times and counts each request by route template (never the raw path, which holds
/// ids), logs one line at debug, and sets headers every API answer carries.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Only standard methods become labels: anything else would grow the metrics without bound.
    let method = match *req.method() {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::HEAD | Method::OPTIONS | Method::PATCH => {
            req.method().as_str().to_owned()
        }
        _ => "OTHER".to_owned(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let mut res = next.run(req).await;
    let headers = res.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let status = res.status().as_u16();
    state.engine.metrics.record_http(&method, &route, status, micros);
    tracing::debug!(%method, %route, status, micros, "request");
    res
}
