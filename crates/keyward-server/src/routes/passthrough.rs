//! Native pass-through: each provider's official SDK, pointed at
//! `…/v1/accounts/{id}/providers/{provider}` with a keyward token as its API key, works
//! unchanged. keyward takes its token from the header that SDK uses (`x-api-key`,
//! `Authorization: Bearer`, `x-goog-api-key`), never forwards it, and the worker puts the
//! account's real key (own or shared) in its place. The same engine as `ai/messages`
//! meters, caps and audits the call; answers stream through as they arrive. keyward's own
//! refusals use the provider's error envelope here, so the SDK raises its own exceptions.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_core::{ErrorCode, Provider};
use keyward_providers::{openai_is_usage_only_chunk, parse_chat, HttpCall, HttpMethod, StreamDecoder, Usage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::ai::{open_and_call, CallFailure};
use crate::app::AppState;
use crate::auth::{authenticate_member, authenticate_member_with_key, Caller};
use crate::error::ApiError;
use crate::extract::AiBody;
use crate::routes::ai::{channel_body, fail_call, prepare, CallContext, CallSpec, MAX_ANSWER};

/// The output bound keyward sets when a native request names none.
const DEFAULT_MAX_OUTPUT: u32 = 4096;

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
                ErrorCode::WorkerUnavailable
                | ErrorCode::KekUnavailable
                | ErrorCode::SharedPoolUnavailable
                | ErrorCode::DatabaseUnavailable => "overloaded_error",
                ErrorCode::Internal | ErrorCode::ProviderError => "api_error",
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
                ErrorCode::WorkerUnavailable
                | ErrorCode::KekUnavailable
                | ErrorCode::SharedPoolUnavailable
                | ErrorCode::DatabaseUnavailable => "UNAVAILABLE",
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

async fn caller_and_account(
    state: &AppState,
    headers: &HeaderMap,
    account: &str,
) -> Result<(Caller, keyward_store::Membership), ApiError> {
    let token = zeroize::Zeroizing::new(sdk_token(headers).ok_or_else(ApiError::unauthorized)?);
    authenticate_member(state, &token, account).await
}

/// The caller, their membership of `account` and the account's key for `provider` (the
/// route names it), in one read. The key is used only once the membership holds.
async fn caller_account_and_key(
    state: &AppState,
    headers: &HeaderMap,
    account: &str,
    provider: Provider,
) -> Result<(Caller, keyward_store::Membership, keyward_store::CallKey), ApiError> {
    let token = zeroize::Zeroizing::new(sdk_token(headers).ok_or_else(ApiError::unauthorized)?);
    authenticate_member_with_key(state, &token, account, provider).await
}

/// What the gateway reads from a client's native request body.
struct NativeRequest {
    body: Vec<u8>,
    model: String,
    max_tokens: u32,
    stream: bool,
    /// OpenAI: keyward asked for the usage chunk, so it must not show it to the client.
    hide_usage_chunk: bool,
}

fn invalid(m: &str) -> ApiError {
    ApiError::validation(m.to_owned())
}

fn read_native(
    provider: Provider,
    raw: &[u8],
    google_model: Option<&str>,
    google_stream: bool,
) -> Result<NativeRequest, ApiError> {
    let mut v: Value =
        serde_json::from_slice(raw).map_err(|_| ApiError::new(ErrorCode::InvalidJson, "the body is not valid JSON"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let as_u32 = |x: Option<&Value>| x.and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    match provider {
        Provider::Anthropic => {
            let model = obj
                .get("model")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("model: required"))?
                .to_owned();
            let max_tokens = as_u32(obj.get("max_tokens")).ok_or_else(|| invalid("max_tokens: required"))?;
            let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
            Ok(NativeRequest {
                body: raw.to_vec(),
                model,
                max_tokens,
                stream,
                hide_usage_chunk: false,
            })
        }
        Provider::OpenAi => {
            let model = obj
                .get("model")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("model: required"))?
                .to_owned();
            if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
                return Err(invalid("n: keyward relays one choice per call (n must be 1)"));
            }
            // The reservation covers max_tokens: without one, keyward sets it, so the
            // provider cannot produce more than was reserved.
            let mut changed = false;
            let max_tokens = match as_u32(obj.get("max_completion_tokens")).or_else(|| as_u32(obj.get("max_tokens"))) {
                Some(n) => n,
                None => {
                    obj.insert("max_completion_tokens".into(), json!(DEFAULT_MAX_OUTPUT));
                    changed = true;
                    DEFAULT_MAX_OUTPUT
                }
            };
            let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
            let mut hide = false;
            if stream {
                let asked = obj
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !asked {
                    // Metering needs the usage; the client did not ask for it, so it will not see it.
                    let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
                    if let Some(o) = opts.as_object_mut() {
                        o.insert("include_usage".into(), Value::Bool(true));
                    }
                    hide = true;
                }
            }
            let body = if hide || changed {
                serde_json::to_vec(&v).map_err(|e| ApiError::internal(&e))?
            } else {
                raw.to_vec()
            };
            Ok(NativeRequest {
                body,
                model,
                max_tokens,
                stream,
                hide_usage_chunk: hide,
            })
        }
        Provider::Google => {
            let config = obj.entry("generationConfig").or_insert_with(|| json!({}));
            let config = config
                .as_object_mut()
                .ok_or_else(|| invalid("generationConfig must be an object"))?;
            if config
                .get("candidateCount")
                .and_then(Value::as_u64)
                .is_some_and(|n| n != 1)
            {
                return Err(invalid(
                    "candidateCount: keyward relays one candidate per call (it must be 1)",
                ));
            }
            // As for OpenAI: the reservation's bound is made the provider's bound.
            let (max_tokens, changed) = match as_u32(config.get("maxOutputTokens")) {
                Some(n) => (n, false),
                None => {
                    config.insert("maxOutputTokens".into(), json!(DEFAULT_MAX_OUTPUT));
                    (DEFAULT_MAX_OUTPUT, true)
                }
            };
            let body = if changed {
                serde_json::to_vec(&v).map_err(|e| ApiError::internal(&e))?
            } else {
                raw.to_vec()
            };
            Ok(NativeRequest {
                body,
                model: google_model.unwrap_or_default().to_owned(),
                max_tokens,
                stream: google_stream,
                hide_usage_chunk: false,
            })
        }
    }
}

pub async fn anthropic_messages(
    State(state): State<AppState>,
    Path(account): Path<String>,
    headers: HeaderMap,
    AiBody(body): AiBody,
) -> Response {
    native(
        state,
        account,
        headers,
        body,
        Provider::Anthropic,
        "/v1/messages".to_owned(),
        None,
        false,
    )
    .await
}

pub async fn openai_chat(
    State(state): State<AppState>,
    Path(account): Path<String>,
    headers: HeaderMap,
    AiBody(body): AiBody,
) -> Response {
    native(
        state,
        account,
        headers,
        body,
        Provider::OpenAi,
        "/v1/chat/completions".to_owned(),
        None,
        false,
    )
    .await
}

/// `…/v1beta/models/{model}:generateContent` and `:streamGenerateContent[?alt=sse]`.
pub async fn google_generate(
    State(state): State<AppState>,
    Path((account, model_action)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    AiBody(body): AiBody,
) -> Response {
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
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return bad("expected models/{model}:generateContent or :streamGenerateContent");
    };
    let stream = match (action, query.as_deref()) {
        ("generateContent", None) => false,
        ("streamGenerateContent", Some("alt=sse")) => true,
        ("streamGenerateContent", _) => {
            return bad("keyward relays streamGenerateContent as server-sent events only: add ?alt=sse")
        }
        _ => return bad("unsupported method: generateContent or streamGenerateContent?alt=sse"),
    };
    let path = if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    };
    let model = model.to_owned();
    native(
        state,
        account,
        headers,
        body,
        Provider::Google,
        path,
        Some(model),
        stream,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn native(
    state: AppState,
    account: String,
    headers: HeaderMap,
    raw: Bytes,
    provider: Provider,
    path: String,
    google_model: Option<String>,
    google_stream: bool,
) -> Response {
    // As for ai/messages: a call that reached the provider is settled and audited even if
    // the client goes away, so it runs in its own task.
    let call = tokio::spawn(async move {
        native_inner(
            &state,
            &account,
            &headers,
            &raw,
            provider,
            path,
            google_model.as_deref(),
            google_stream,
        )
        .await
    });
    match call.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => provider_envelope(provider, &e),
        Err(e) => provider_envelope(provider, &ApiError::internal(&e)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn native_inner(
    state: &AppState,
    account: &str,
    headers: &HeaderMap,
    raw: &[u8],
    provider: Provider,
    path: String,
    google_model: Option<&str>,
    google_stream: bool,
) -> Result<Response, ApiError> {
    let (caller, m, key) = caller_account_and_key(state, headers, account, provider).await?;
    let req = read_native(provider, raw, google_model, google_stream)?;
    let spec = CallSpec {
        provider,
        model: Some(&req.model),
        input_bytes: raw.len(),
        max_tokens: req.max_tokens.max(1),
        feature: None,
        prefetched_key: Some(key),
    };
    let ctx = prepare(state, &caller, &m.account, spec).await?;
    let mut call_headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if provider == Provider::Anthropic {
        let version = headers
            .get("anthropic-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(keyward_providers::ANTHROPIC_VERSION);
        call_headers.push(("anthropic-version".to_owned(), version.to_owned()));
        if let Some(beta) = headers.get("anthropic-beta").and_then(|v| v.to_str().ok()) {
            call_headers.push(("anthropic-beta".to_owned(), beta.to_owned()));
        }
    }
    let call = HttpCall {
        method: HttpMethod::Post,
        path_and_query: path,
        headers: call_headers,
        body: req.body,
    };
    let mut upstream = match open_and_call(state, provider, &ctx.choice, call).await {
        Ok(u) => u,
        Err(f) => return Err(fail_call(state, &ctx, f, None).await),
    };
    let req_id = keyward_providers::request_id_header(provider)
        .and_then(|name| upstream.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
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
            Err(f) => return Err(fail_call(state, &ctx, f, req_id).await),
        };
        let (outcome, usage, detail) = match parse_chat(provider, upstream.status, &body) {
            Ok(answer) => ("ok".to_owned(), answer.usage, None),
            Err(f) => {
                ctx.learn_from(state, &f).await;
                (
                    format!("error:{}", f.diagnosis.as_str()),
                    Usage::default(),
                    Some(f.message),
                )
            }
        };
        ctx.settle(state, &outcome, usage, req_id, detail).await?;
        return Ok((status, out_headers, body).into_response());
    }

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let state = state.clone();
    tokio::spawn(relay_stream(state, ctx, upstream, tx, req_id, req.hide_usage_chunk));
    let body = channel_body(rx);
    Ok((status, out_headers, body).into_response())
}

/// Relays a provider's event stream chunk by chunk as it arrives, reading the usage on
/// the way. The chunk holding the provider's end marker is held back until the call is
/// settled and audited, so a client never sees the end of a call that is not on record.
async fn relay_stream(
    state: AppState,
    ctx: CallContext,
    mut upstream: crate::ai::Upstream,
    tx: mpsc::Sender<Bytes>,
    req_id: Option<String>,
    hide_usage_chunk: bool,
) {
    let mut decoder = StreamDecoder::new(ctx.provider);
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
            if ctx.settle(&state, "ok", summary.usage, req_id, None).await.is_ok() && !held.is_empty() {
                let _ = tx.send(Bytes::from(held)).await;
            }
        }
        Err(f) => {
            // The provider's own bytes (including its error event) went through as they
            // came; what is left is the record.
            let _ = fail_call(&state, &ctx, f, req_id).await;
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
    let models: Vec<&keyward_core::ModelEntry> = state.catalogue.served(provider).collect();
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
