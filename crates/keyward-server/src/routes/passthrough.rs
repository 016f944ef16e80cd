//! Native pass-through: each provider's official SDK, pointed at
//! `…/v1/accounts/{id}/providers/{provider}` with a keyward token as its API key, works
//! unchanged for the APIs keyward carries ([`keyward_providers::NativeApi`]: Anthropic
//! Messages and token counting, OpenAI Chat Completions, Responses and Embeddings, Google
//! generateContent under `v1` and `v1beta`); anything else is refused in the provider's own
//! error format, naming what is carried. keyward takes its token from the header that SDK
//! uses (`x-api-key`, `Authorization: Bearer`, `x-goog-api-key`), never forwards it, and the
//! worker puts the account's real key (own or shared) in its place. The same engine as
//! `ai/messages` meters, caps and audits the call; answers stream through as they arrive.
//! keyward's own refusals use the provider's error envelope here, so the SDK raises its own
//! exceptions.
//!
//! The product's services call the same routes with a service token (scope `ai:call`) in
//! the same headers. The acting user may be named with `keyward-on-behalf-of`, and the
//! product feature with `keyward-feature` or, since an SDK cannot easily set a header per
//! call, in the base URL: `…/v1/accounts/{id}/features/{feature}/providers/{provider}`.
//!
//! Owns: translating between HTTP and the engine ([`crate::engine::native`], which meters
//! and audits) and keyward-providers (the envelopes). Must never: know a provider's wire
//! format (its bodies, envelopes, headers, event streams): that is keyward-providers' alone.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use keyward_core::{ErrorCode, Provider};
use keyward_providers::{
    google_action, native_model_list, native_refusal, not_carried_message, sdk_key, unknown_provider_message,
    GoogleActionError, GoogleVersion, NativeApi, NativeReply,
};

use crate::engine::actor::Access;
use crate::engine::calls::merge_feature;
use crate::engine::identity::ON_BEHALF_OF_HEADER;
use crate::engine::native::{NativeBody, NativeRoute, StreamBroken};
use crate::engine::Actor;
use crate::error::ApiError;
use crate::extract::AiBody;
use crate::state::AppState;

/// A response body fed by a channel: each chunk is sent on as it comes; an `Err` aborts
/// the body (no final chunk), which the client sees as a broken answer, not a short one.
fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, StreamBroken>>) -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (b.map(Bytes::from), rx))
    }))
}

/// A JSON answer built by keyward-providers, as HTTP.
fn json_reply(reply: NativeReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], reply.body).into_response()
}

/// A keyward refusal in the provider's own error envelope.
fn provider_envelope(provider: Provider, e: &ApiError) -> Response {
    json_reply(native_refusal(provider, e.code, &e.message))
}

/// The keyward token from whichever header the SDK uses.
fn sdk_token(headers: &HeaderMap) -> Option<String> {
    sdk_key(|name| headers.get(name).and_then(|v| v.to_str().ok())).map(str::to_owned)
}

async fn caller_and_account(state: &AppState, headers: &HeaderMap, account: &str) -> Result<Actor, ApiError> {
    let token = zeroize::Zeroizing::new(sdk_token(headers).ok_or_else(ApiError::unauthorized)?);
    state.engine.actor_by_token(&token, account, Access::Call).await
}

/// The header that names a call's product feature.
pub const FEATURE_HEADER: &str = "keyward-feature";

/// A request header's value, when it is there and readable.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The path's parameters: `account_id`, and where the route has them `feature`,
/// `model_action`, `provider`, `rest`.
type Params = HashMap<String, String>;

fn param(params: &Params, name: &str) -> String {
    params.get(name).cloned().unwrap_or_default()
}

/// The caller, their membership of `account` and the account's key for `provider` (the
/// route names it), in one read. The key is used only once the membership holds.
async fn caller_account_and_key(
    state: &AppState,
    headers: &HeaderMap,
    account: &str,
    provider: Provider,
) -> Result<(Actor, keyward_store::CallKey), ApiError> {
    let token = zeroize::Zeroizing::new(sdk_token(headers).ok_or_else(ApiError::unauthorized)?);
    state.engine.actor_and_call_key(&token, account, provider).await
}

fn invalid(m: &str) -> ApiError {
    ApiError::validation(m.to_owned())
}

/// The route handler of one carried API (Google's takes its model and action from the path).
pub fn native_route(api: NativeApi) -> MethodRouter<AppState> {
    match api {
        NativeApi::GoogleGenerate(version) => google_route(version),
        _ => post(
            move |State(state): State<AppState>,
                  Path(params): Path<Params>,
                  headers: HeaderMap,
                  AiBody(body): AiBody| { native(state, params, headers, body, api, None) },
        ),
    }
}

/// Google's `…/{version}/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.
fn google_route(version: GoogleVersion) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              Path(params): Path<Params>,
              RawQuery(query): RawQuery,
              headers: HeaderMap,
              AiBody(body): AiBody| async move {
            let api = NativeApi::GoogleGenerate(version);
            let model_action = param(&params, "model_action");
            let (model, stream) = match google_action(&model_action, query.as_deref()) {
                Ok(found) => found,
                Err(GoogleActionError::NotCarried(why)) => {
                    return provider_envelope(api.provider(), &ApiError::new(ErrorCode::NotFound, why))
                }
                Err(GoogleActionError::Invalid(why)) => return provider_envelope(api.provider(), &invalid(&why)),
            };
            let google = Some((model.to_owned(), stream));
            native(state, params, headers, body, api, google).await
        },
    )
}

/// The SDK's model listing of `provider`, answered from the catalogue.
pub fn model_list_route(provider: Provider) -> MethodRouter<AppState> {
    get(
        move |State(state): State<AppState>, Path(params): Path<Params>, headers: HeaderMap| async move {
            if let Err(e) = caller_and_account(&state, &headers, &param(&params, "account_id")).await {
                return provider_envelope(provider, &e);
            }
            let models: Vec<&keyward_core::ModelEntry> = state.engine.catalogue.served(provider).collect();
            json_reply(native_model_list(provider, &models))
        },
    )
}

/// Anything else under a provider's base URL: refused in that provider's own error format,
/// naming what is carried.
pub async fn not_carried(Path(params): Path<Params>, method: Method) -> Response {
    let rest = param(&params, "rest");
    let Ok(provider) = param(&params, "provider").parse::<Provider>() else {
        return ApiError::new(ErrorCode::UnknownProvider, unknown_provider_message()).into_response();
    };
    let e = ApiError::new(
        ErrorCode::NotFound,
        not_carried_message(provider, &format!("{method} /{rest}")),
    );
    provider_envelope(provider, &e)
}

async fn native(
    state: AppState,
    params: Params,
    headers: HeaderMap,
    raw: Bytes,
    api: NativeApi,
    google: Option<(String, bool)>,
) -> Response {
    let provider = api.provider();
    // As for ai/messages: a call that reached the provider is settled and audited even if
    // the client goes away, so it runs in its own task.
    let call = tokio::spawn(async move { native_inner(&state, &params, &headers, &raw, api, google).await });
    match call.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => provider_envelope(provider, &e),
        Err(e) => provider_envelope(provider, &ApiError::internal(&e)),
    }
}

async fn native_inner(
    state: &AppState,
    params: &Params,
    headers: &HeaderMap,
    raw: &[u8],
    api: NativeApi,
    google: Option<(String, bool)>,
) -> Result<Response, ApiError> {
    let account = param(params, "account_id");
    let (mut actor, key) = caller_account_and_key(state, headers, &account, api.provider()).await?;
    state
        .engine
        .act_for(&mut actor, header_value(headers, ON_BEHALF_OF_HEADER).as_deref())
        .await?;
    let feature = merge_feature(params.get("feature").cloned(), header_value(headers, FEATURE_HEADER))?;
    let google = google.as_ref().map(|(m, s)| (m.as_str(), *s));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let route = NativeRoute { api, google, feature };
    let answer = state.engine.native(&actor, key, route, raw, header).await?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out_headers = HeaderMap::new();
    for (k, v) in &answer.headers {
        if k == "location" {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            out_headers.insert(name, value);
        }
    }
    Ok(match answer.body {
        NativeBody::Whole(body) => (status, out_headers, body).into_response(),
        NativeBody::Stream(chunks) => (status, out_headers, channel_body(chunks)).into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_each_sdk_header() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("kw_a"));
        assert_eq!(sdk_token(&h).as_deref(), Some("kw_a"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer kw_b"));
        assert_eq!(sdk_token(&h).as_deref(), Some("kw_b"));
        let mut h = HeaderMap::new();
        h.insert("x-goog-api-key", HeaderValue::from_static("kw_c"));
        assert_eq!(sdk_token(&h).as_deref(), Some("kw_c"));
        assert_eq!(sdk_token(&HeaderMap::new()), None);
    }
}
