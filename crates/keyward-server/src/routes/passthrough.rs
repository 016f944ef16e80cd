//! Native pass-through: each provider's official SDK, pointed at
//! `…/v1/accounts/{id}/providers/{provider}` with a keyward token as its API key, works
//! unchanged for the APIs keyward carries ([`keyward_providers::NativeApi`]: Anthropic
//! Messages and token counting, OpenAI Chat Completions, Responses and Embeddings, Google
//! generateContent under `v1` and `v1beta`); anything else is refused in the provider's own
//! error format, naming what is carried. keyward takes its token from the header that SDK uses (`x-api-key`,
//! `Authorization: Bearer`, `x-goog-api-key`), never forwards it, and the worker puts the
//! account's real key (own or shared) in its place. The same engine as `ai/messages`
//! meters, caps and audits the call; answers stream through as they arrive. keyward's own
//! refusals use the provider's error envelope here, so the SDK raises its own exceptions.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use keyward_core::{ErrorCode, Outcome, Provider};
use keyward_providers::{
    google_action, native_call, native_routes, openai_is_usage_only_chunk, parse_native, read_native_request,
    GoogleActionError, GoogleVersion, NativeApi, NativeRequestError, StreamDecoder, Usage,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::engine::calls::{CallContext, CallFailure, CallSpec, Upstream, MAX_ANSWER};
use crate::engine::{Actor, Engine};
use crate::error::ApiError;
use crate::extract::AiBody;
use crate::routes::ai::channel_body;
use crate::state::AppState;

/// The header each provider's SDK sends its API key in, where keyward takes its token.
fn token_header(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "x-api-key",
        Provider::OpenAi => "Authorization: Bearer",
        Provider::Google => "x-goog-api-key",
    }
}

/// A keyward refusal in the provider's own error envelope.
fn provider_envelope(provider: Provider, e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let unauthorized;
    let e = if e.code == ErrorCode::Unauthorized {
        // The SDK's own header, not the JSON API's `Authorization: Bearer`.
        unauthorized = ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "a valid keyward token is required as this SDK's API key (sent in {}: kw_…)",
                token_header(provider)
            ),
        );
        &unauthorized
    } else {
        e
    };
    let body = match provider {
        Provider::Anthropic => {
            let kind = match e.code {
                ErrorCode::Unauthorized => "authentication_error",
                ErrorCode::Forbidden | ErrorCode::PlanRequired | ErrorCode::KeyReportedLeaked => "permission_error",
                ErrorCode::NotFound | ErrorCode::UnknownProvider => "not_found_error",
                ErrorCode::SharedQuotaExhausted | ErrorCode::RateLimited => "rate_limit_error",
                ErrorCode::PayloadTooLarge => "request_too_large",
                ErrorCode::WorkerUnavailable | ErrorCode::KekUnavailable | ErrorCode::DatabaseUnavailable => {
                    "overloaded_error"
                }
                // A configuration problem, not load: no shared key for this provider.
                ErrorCode::Internal | ErrorCode::ProviderError | ErrorCode::SharedPoolUnavailable => "api_error",
                _ => "invalid_request_error",
            };
            json!({ "type": "error", "error": { "type": kind, "message": e.message } })
        }
        Provider::OpenAi => {
            let (kind, code) = match e.code {
                ErrorCode::Unauthorized => ("invalid_request_error", "invalid_api_key"),
                ErrorCode::SharedQuotaExhausted => ("insufficient_quota", "insufficient_quota"),
                ErrorCode::RateLimited => ("requests", "rate_limit_exceeded"),
                ErrorCode::NotFound | ErrorCode::UnknownProvider => ("invalid_request_error", "not_found"),
                ErrorCode::Internal
                | ErrorCode::ProviderError
                | ErrorCode::WorkerUnavailable
                | ErrorCode::KekUnavailable => ("server_error", "server_error"),
                _ => ("invalid_request_error", e.code.as_str()),
            };
            json!({ "error": { "message": e.message, "type": kind, "param": null, "code": code } })
        }
        Provider::Google => {
            let status_word = match e.code {
                ErrorCode::Unauthorized => "UNAUTHENTICATED",
                ErrorCode::Forbidden | ErrorCode::PlanRequired | ErrorCode::KeyReportedLeaked => "PERMISSION_DENIED",
                ErrorCode::NotFound | ErrorCode::UnknownProvider => "NOT_FOUND",
                ErrorCode::SharedQuotaExhausted | ErrorCode::RateLimited => "RESOURCE_EXHAUSTED",
                ErrorCode::WorkerUnavailable | ErrorCode::KekUnavailable | ErrorCode::DatabaseUnavailable => {
                    "UNAVAILABLE"
                }
                ErrorCode::SharedPoolUnavailable => "FAILED_PRECONDITION",
                ErrorCode::Internal | ErrorCode::ProviderError => "INTERNAL",
                _ => "INVALID_ARGUMENT",
            };
            json!({ "error": { "code": status.as_u16(), "message": e.message, "status": status_word } })
        }
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The keyward token from whichever header the SDK uses.
fn sdk_token(headers: &HeaderMap) -> Option<String> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    get("x-api-key")
        .or_else(|| get("x-goog-api-key"))
        .or_else(|| get("authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(str::to_owned)
}

async fn caller_and_account(state: &AppState, headers: &HeaderMap, account: &str) -> Result<Actor, ApiError> {
    let token = zeroize::Zeroizing::new(sdk_token(headers).ok_or_else(ApiError::unauthorized)?);
    state.engine.actor_by_token(&token, account).await
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

/// The route handler of one carried API (every one but Google's, whose model is in the path).
pub fn native_route(api: NativeApi) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>, Path(account): Path<String>, headers: HeaderMap, AiBody(body): AiBody| {
            native(state, account, headers, body, api, None)
        },
    )
}

/// Google's `…/{version}/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.
pub fn google_route(version: GoogleVersion) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              Path((account, model_action)): Path<(String, String)>,
              RawQuery(query): RawQuery,
              headers: HeaderMap,
              AiBody(body): AiBody| async move {
            let api = NativeApi::GoogleGenerate(version);
            let bad = |m: &str| provider_envelope(Provider::Google, &invalid(m));
            let query_has_key = query
                .as_deref()
                .is_some_and(|q| q.split('&').any(|p| p == "key" || p.starts_with("key=")));
            if query_has_key {
                // Keys never travel in URLs (they end up in logs); the SDK sends them in a header.
                return bad(
                    "keyward takes the token only in the x-goog-api-key header (where the google-genai SDK sends it), \
                     never in the URL: remove ?key= and send x-goog-api-key: kw_…",
                );
            }
            let (model, stream) = match google_action(&model_action, query.as_deref()) {
                Ok(found) => found,
                Err(GoogleActionError::NotCarried(why)) => {
                    return provider_envelope(Provider::Google, &ApiError::new(ErrorCode::NotFound, why))
                }
                Err(GoogleActionError::Invalid(why)) => return bad(&why),
            };
            let google = Some((model.to_owned(), stream));
            native(state, account, headers, body, api, google).await
        },
    )
}

/// Anything else under a provider's base URL: refused in that provider's own error format,
/// naming what is carried.
pub async fn not_carried(Path((_, provider, rest)): Path<(String, String, String)>, method: Method) -> Response {
    let Ok(provider) = provider.parse::<Provider>() else {
        return ApiError::new(
            ErrorCode::UnknownProvider,
            "unknown provider: expected anthropic, openai or google",
        )
        .into_response();
    };
    let e = ApiError::new(
        ErrorCode::NotFound,
        format!(
            "{method} /{rest} is not carried by keyward's {} pass-through: it carries {}",
            provider.display_name(),
            native_routes(provider)
        ),
    );
    provider_envelope(provider, &e)
}

async fn native(
    state: AppState,
    account: String,
    headers: HeaderMap,
    raw: Bytes,
    api: NativeApi,
    google: Option<(String, bool)>,
) -> Response {
    let provider = api.provider();
    // As for ai/messages: a call that reached the provider is settled and audited even if
    // the client goes away, so it runs in its own task.
    let call = tokio::spawn(async move { native_inner(&state, &account, &headers, &raw, api, google).await });
    match call.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => provider_envelope(provider, &e),
        Err(e) => provider_envelope(provider, &ApiError::internal(&e)),
    }
}

async fn native_inner(
    state: &AppState,
    account: &str,
    headers: &HeaderMap,
    raw: &[u8],
    api: NativeApi,
    google: Option<(String, bool)>,
) -> Result<Response, ApiError> {
    let provider = api.provider();
    let (actor, key) = caller_account_and_key(state, headers, account, provider).await?;
    let req = read_native_request(api, raw, google.as_ref().map(|(m, s)| (m.as_str(), *s))).map_err(|e| match e {
        NativeRequestError::NotJson => ApiError::new(ErrorCode::InvalidJson, e.to_string()),
        NativeRequestError::Invalid(m) => ApiError::validation(m),
    })?;
    let spec = CallSpec {
        provider,
        model: Some(&req.model),
        input_bytes: raw.len(),
        max_tokens: req.max_output,
        kind: api.model_kind(),
        billed: api.costs_money(),
        feature: None,
        prefetched_key: Some(key),
    };
    let engine = &state.engine;
    let ctx = engine.prepare(&actor, spec).await?;
    let call = native_call(&req, |name| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    });
    let mut upstream = match engine.open_and_call(provider, &ctx.choice, call).await {
        Ok(u) => u,
        Err(f) => return Err(engine.fail_call(&ctx, f, None).await),
    };
    let req_id = upstream.request_id();
    let status = StatusCode::from_u16(upstream.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out_headers = HeaderMap::new();
    for (k, v) in &upstream.headers {
        if k == "location" {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            out_headers.insert(name, value);
        }
    }

    let success = status.is_success();
    if !req.stream || !success {
        // Plain answers (and provider errors) are read whole: the usage is in the body,
        // and the audit event must be durable before the answer is released.
        let body = match upstream.collect(MAX_ANSWER).await {
            Ok(b) => b,
            Err(f) => return Err(engine.fail_call(&ctx, f, req_id).await),
        };
        let (outcome, usage, detail, answer_id) = match parse_native(api, upstream.status, &body) {
            Ok(answer) => (
                Outcome::Ok,
                answer.usage,
                None,
                Some(answer.id).filter(|id| !id.is_empty()),
            ),
            Err(f) => {
                ctx.learn_from(engine, &f).await;
                (
                    Outcome::Error(f.diagnosis.as_str()),
                    Usage::default(),
                    Some(f.message),
                    None,
                )
            }
        };
        ctx.settle(engine, outcome, usage, req_id.or(answer_id), detail).await?;
        return Ok((status, out_headers, body).into_response());
    }

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(relay_stream(
        engine.clone(),
        ctx,
        upstream,
        tx,
        req_id,
        req.hide_usage_chunk,
        api,
    ));
    let body = channel_body(rx);
    Ok((status, out_headers, body).into_response())
}

/// Relays a provider's event stream chunk by chunk as it arrives, reading the usage on
/// the way. The chunk holding the provider's end marker is held back until the call is
/// settled and audited, so a client never sees the end of a call that is not on record.
async fn relay_stream(
    engine: Engine,
    ctx: CallContext,
    mut upstream: Upstream,
    tx: mpsc::Sender<Bytes>,
    req_id: Option<String>,
    hide_usage_chunk: bool,
    api: NativeApi,
) {
    let mut decoder = StreamDecoder::for_native(api);
    let mut filter = UsageChunkFilter::default();
    let mut held: Vec<u8> = Vec::new();
    let failure = loop {
        match upstream.next_chunk().await {
            Ok(Some(chunk)) => {
                let _ = decoder.feed(&chunk);
                let visible = if hide_usage_chunk { filter.feed(&chunk) } else { chunk };
                if decoder.is_complete() {
                    held.extend_from_slice(&visible);
                } else if !visible.is_empty() {
                    let _ = tx.send(Bytes::from(visible)).await;
                }
            }
            Ok(None) => break None,
            Err(f) => break Some(f),
        }
    };
    if hide_usage_chunk {
        held.extend(filter.finish());
    }
    let result = match failure {
        Some(f) => Err(f),
        None => decoder.finish().map_err(CallFailure::Provider),
    };
    match result {
        Ok(summary) => {
            let req_id = req_id.or_else(|| Some(summary.id.clone()));
            if ctx
                .settle(&engine, Outcome::Ok, summary.usage, req_id, None)
                .await
                .is_ok()
                && !held.is_empty()
            {
                let _ = tx.send(Bytes::from(held)).await;
            }
        }
        Err(f) => {
            // The provider's own bytes (including its error event) went through as they
            // came; what is left is the record.
            let _ = engine.fail_call(&ctx, f, req_id).await;
            if !held.is_empty() {
                let _ = tx.send(Bytes::from(held)).await;
            }
        }
    }
}

/// Drops OpenAI's usage-only chunk from a raw SSE stream, passing every other event on
/// as soon as it is complete.
#[derive(Debug, Default)]
struct UsageChunkFilter {
    pending: Vec<u8>,
}

impl UsageChunkFilter {
    fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(end) = find_event_end(self.pending.get(start..).unwrap_or_default()) {
            let event = self.pending.get(start..start + end).unwrap_or_default();
            let data = event
                .split(|b| *b == b'\n')
                .find_map(|line| line.strip_prefix(b"data:"))
                .unwrap_or_default();
            if !openai_is_usage_only_chunk(data) {
                out.extend_from_slice(event);
            }
            start += end;
        }
        self.pending.drain(..start);
        out
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the first complete SSE event (through its blank line), if any.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The SDKs' model listing routes, answered from the catalogue.
pub async fn list_models(
    State(state): State<AppState>,
    Path((account, provider)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let provider: Provider = match provider.parse() {
        Ok(p) => p,
        Err(_) => return crate::error::ApiError::new(ErrorCode::UnknownProvider, "unknown provider").into_response(),
    };
    if let Err(e) = caller_and_account(&state, &headers, &account).await {
        return provider_envelope(provider, &e);
    }
    let models: Vec<&keyward_core::ModelEntry> = state.engine.catalogue.served(provider).collect();
    let body = match provider {
        Provider::Anthropic => json!({
            "data": models.iter().map(|m| json!({ "type": "model", "id": m.id, "display_name": m.name, "created_at": "2024-01-01T00:00:00Z" })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first().map(|m| m.id.clone()),
            "last_id": models.last().map(|m| m.id.clone()),
        }),
        Provider::OpenAi => json!({
            "object": "list",
            "data": models.iter().map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": "openai" })).collect::<Vec<_>>(),
        }),
        Provider::Google => json!({
            "models": models.iter().map(|m| json!({
                "name": format!("models/{}", m.id),
                "displayName": m.name,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            })).collect::<Vec<_>>(),
        }),
    };
    axum::Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_only_chunk_is_dropped_wherever_it_is_split() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = f.feed(&stream[..cut]);
            out.extend(f.feed(&stream[cut..]));
            out.extend(f.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("usage"), "cut {cut}: {text}");
            assert!(
                text.contains("\"Hi\"") && text.ends_with("data: [DONE]\n\n"),
                "cut {cut}: {text}"
            );
        }
    }

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
