//! The one axum server: control routes, recording, and dispatch to the three fakes.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::serve::ListenerExt;
use axum::Router;
use keyward_core::Provider;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::Shared;
use crate::wire::{self, Incoming};
use crate::{anthropic, google, openai, Behaviour};

/// Where [`Behaviour::Redirect`] sends clients; it records what arrives and answers 200.
pub(crate) const STOLEN_PATH: &str = "/_fake/stolen";

/// Anthropic accepts 32 MB request bodies.
const MAX_BODY: usize = 32 * 1024 * 1024;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared);
    let listener = listener.tap_io(|tcp| {
        // Small SSE chunks must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await;
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let query = uri.query();
    if let Some(r) = control(&shared, &method, path, &body) {
        return r;
    }
    shared.record(method.as_str(), path, query, &headers, &body);
    let inc = Incoming {
        shared: &shared,
        query,
        headers: &headers,
        body: &body,
    };
    match (method.as_str(), path) {
        ("POST", "/v1/messages") => anthropic::messages(&inc).await,
        ("POST", "/v1/messages/count_tokens") => anthropic::count_tokens(&inc).await,
        ("POST", "/v1/chat/completions") => openai::chat(&inc).await,
        ("POST", "/v1/responses") => openai::responses(&inc).await,
        ("POST", "/v1/embeddings") => openai::embeddings(&inc).await,
        ("GET", "/v1/models") => {
            if headers.contains_key("x-api-key") && headers.contains_key("anthropic-version") {
                anthropic::models(&inc).await
            } else {
                openai::models(&inc).await
            }
        }
        ("GET", "/v1beta/models") => google::list(&inc).await,
        (_, STOLEN_PATH) => wire::json(
            StatusCode::OK,
            &json!({"stolen": true, "note": "keyward-fakes recorded this request: a client followed a redirect"}),
        ),
        ("POST", p) => match p.strip_prefix("/v1beta/models/") {
            Some(rest) => google::generate(&inc, rest, "v1beta").await,
            None => match p.strip_prefix("/v1/models/") {
                Some(rest) => google::generate(&inc, rest, "v1").await,
                None => not_found(&method, path),
            },
        },
        _ => not_found(&method, path),
    }
}

fn not_found(method: &Method, path: &str) -> Response {
    wire::json(
        StatusCode::NOT_FOUND,
        &json!({"error": {"message": format!("keyward-fakes: no route for {method} {path}")}}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelControl {
    provider: Provider,
    model: String,
    available: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyControl {
    key: String,
    behaviour: String,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    provider: Option<Provider>,
}

fn control(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Option<Response> {
    let no_content = || {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    };
    Some(match (method.as_str(), path) {
        ("POST", "/_fake/keys") => set_key(shared, body),
        ("POST", "/_fake/models") => match serde_json::from_slice::<ModelControl>(body) {
            Ok(c) if !c.model.is_empty() => {
                shared.set_model_available(c.provider, &c.model, c.available);
                wire::json(StatusCode::OK, &json!({ "ok": true }))
            }
            _ => wire::json(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "expected {\"provider\", \"model\", \"available\": true|false}" }),
            ),
        },
        ("DELETE", "/_fake/keys") => {
            shared.clear_keys();
            no_content()
        }
        ("GET", "/_fake/requests") => {
            let requests: Vec<Value> = shared.requests().iter().map(|r| r.to_json()).collect();
            wire::json(StatusCode::OK, &json!({ "requests": requests }))
        }
        ("DELETE", "/_fake/requests") => {
            shared.clear_requests();
            no_content()
        }
        ("GET", "/_fake/healthz") => wire::response(StatusCode::OK, "text/plain; charset=utf-8", Body::from("ok")),
        _ => return None,
    })
}

fn set_key(shared: &Shared, body: &[u8]) -> Response {
    let bad = |message: String| wire::json(StatusCode::BAD_REQUEST, &json!({ "error": message }));
    let control: KeyControl = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            return bad(format!(
                "expected {{\"key\", \"behaviour\", \"delay_ms\"?, \"provider\"?}}: {e}"
            ))
        }
    };
    let Some(behaviour) = Behaviour::parse(&control.behaviour, control.delay_ms) else {
        return bad(format!(
            "unknown behaviour {:?}; expected one of {}",
            control.behaviour,
            Behaviour::NAMES.join(", ")
        ));
    };
    if control.key.is_empty() {
        return bad("key must not be empty".to_owned());
    }
    shared.set_key(control.provider, &control.key, behaviour);
    wire::json(StatusCode::OK, &json!({ "ok": true }))
}
