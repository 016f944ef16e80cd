//! Anthropic Messages API (`anthropic-version: 2023-06-01`).
//!
//! Errors are `{"type": "error", "error": {"type", "message"}, "request_id"}`. Their `type`
//! decides the diagnosis:
//!
//! | error type (status) | diagnosis |
//! |---|---|
//! | `authentication_error` (401) | `invalid_key` |
//! | `billing_error` (402); any message containing "credit balance is too low" (a 400 `invalid_request_error`) | `no_credit` |
//! | `permission_error` (403) | `missing_permission` |
//! | `not_found_error` (404) | `model_not_available` |
//! | `rate_limit_error` (429) | `rate_limited` |
//! | `api_error` (500), `overloaded_error` (529), `timeout_error` (504) | `provider_unavailable` |
//! | `invalid_request_error`, `request_too_large` (413), other 4xx | `bad_request` |
//!
//! An unknown type falls back to the status.
//!
//! Also here: the model listing (`GET /v1/models?limit=…&after_id=…`), rate-limit headers
//! (`anthropic-ratelimit-*`), and the native pass-through of Messages and token counting,
//! whose `anthropic-version` and `anthropic-beta` headers travel on from the SDK.

use keyward_core::{ErrorCode, ModelEntry, Provider};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::call::{self, listing_query_allowed, ChatRequest, HttpCall, HttpMethod, KeyPlacement, MODELS_PAGE_SIZE};
use crate::failure::{contains_ci, message_or, status_diagnosis, Diagnosis, ProviderFailure};
use crate::limits::{read_limit, RateLimits};
use crate::models::{parse_data_list, ModelPage};
use crate::native::{
    as_u32, chat_answer, invalid, json_answer, model_of, stream_of, NativeAnswer, NativeApi, NativeFields,
    NativeRequest, NativeRequestError,
};
use crate::response::{ChatResponse, Usage};
use crate::sse::SseEvent;
use crate::stream::{StreamEvent, StreamState};
use crate::wire::ProviderWire;

const P: Provider = Provider::Anthropic;

/// The `anthropic-version` header keyward speaks (and sends a native call whose SDK sent none).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The `created_at` of every model keyward lists to the SDK: the SDK's model type requires
/// one, and the catalogue keeps no release dates.
const LISTED_CREATED_AT: &str = "2024-01-01T00:00:00Z";

/// Anthropic's wire format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Anthropic;

impl ProviderWire for Anthropic {
    fn chat_call(&self, req: &ChatRequest) -> HttpCall {
        chat_call(req)
    }

    fn chat_api(&self) -> NativeApi {
        NativeApi::AnthropicMessages
    }

    fn parse_answer(&self, body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
        parse_answer(body)
    }

    fn list_models_call(&self, page_token: Option<&str>) -> HttpCall {
        let path = match page_token {
            Some(t) => format!("/v1/models?limit={MODELS_PAGE_SIZE}&after_id={t}"),
            None => format!("/v1/models?limit={MODELS_PAGE_SIZE}"),
        };
        call::get(path, &[("anthropic-version", ANTHROPIC_VERSION)])
    }

    fn parse_model_page(&self, body: &[u8]) -> Result<ModelPage, serde_json::Error> {
        parse_data_list(body)
    }

    fn path_allowed(&self, method: HttpMethod, path: &str, query: Option<&str>) -> bool {
        match (method, path) {
            (HttpMethod::Post, "/v1/messages" | "/v1/messages/count_tokens") => query.is_none(),
            (HttpMethod::Get, "/v1/models") => listing_query_allowed(query, "limit", "after_id"),
            _ => false,
        }
    }

    fn key_placement(&self) -> KeyPlacement {
        KeyPlacement {
            header: "x-api-key",
            value_prefix: "",
        }
    }

    fn own_request_headers(&self) -> &'static [&'static str] {
        &["anthropic-version", "anthropic-beta"]
    }

    fn keeps_own_answer_header(&self, name: &str) -> bool {
        name == "request-id" || name.starts_with("anthropic-ratelimit-")
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("request-id")
    }

    fn read_error(&self, status: u16, body: &[u8]) -> Option<ProviderFailure> {
        read_error(status, body)
    }

    fn rate_limits(&self, headers: &[(String, String)]) -> RateLimits {
        let bucket = |what: &str| {
            read_limit(
                headers,
                &format!("anthropic-ratelimit-{what}-limit"),
                &format!("anthropic-ratelimit-{what}-remaining"),
                &format!("anthropic-ratelimit-{what}-reset"),
            )
        };
        RateLimits {
            requests: bucket("requests"),
            tokens: bucket("tokens"),
            input_tokens: bucket("input-tokens"),
            output_tokens: bucket("output-tokens"),
        }
    }

    fn rate_limits_note(&self) -> Option<&'static str> {
        None
    }

    fn on_event(&self, _api: NativeApi, state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
        on_event(state, event, out);
    }

    fn stream_end_marker(&self, _api: NativeApi) -> &'static str {
        "message_stop"
    }

    fn usage_only_event(&self) -> Option<fn(&str) -> bool> {
        None
    }

    fn native_routes(&self) -> &'static str {
        "POST /v1/messages, POST /v1/messages/count_tokens and GET /v1/models"
    }

    fn sdk_key_header(&self) -> &'static str {
        "x-api-key"
    }

    fn read_native(
        &self,
        api: NativeApi,
        body: &mut Map<String, Value>,
        _path: Option<(&str, bool)>,
    ) -> Result<NativeFields, NativeRequestError> {
        if api == NativeApi::AnthropicCountTokens {
            return Ok(NativeFields::as_sent(model_of(body)?, 0, false));
        }
        // Messages: the bound is required, as the API requires it.
        let max = as_u32(body.get("max_tokens")).ok_or_else(|| invalid("max_tokens: required"))?;
        Ok(NativeFields::as_sent(model_of(body)?, max, stream_of(body)))
    }

    fn native_path(&self, req: &NativeRequest) -> String {
        match req.api {
            NativeApi::AnthropicCountTokens => "/v1/messages/count_tokens",
            _ => "/v1/messages",
        }
        .to_owned()
    }

    fn native_headers(&self, client_header: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        let version = client_header("anthropic-version").unwrap_or_else(|| ANTHROPIC_VERSION.to_owned());
        let mut headers = vec![("anthropic-version".to_owned(), version)];
        if let Some(beta) = client_header("anthropic-beta") {
            headers.push(("anthropic-beta".to_owned(), beta));
        }
        headers
    }

    fn parse_native(&self, api: NativeApi, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure> {
        if api != NativeApi::AnthropicCountTokens {
            return chat_answer(P, status, body);
        }
        // `{"input_tokens": N}`.
        json_answer(P, status, body, |v| {
            let input_tokens = v.get("input_tokens").and_then(Value::as_u64)?;
            Some(Ok(NativeAnswer {
                id: String::new(),
                usage: Usage {
                    input_tokens,
                    output_tokens: 0,
                },
            }))
        })
    }

    /// The error `type` per status as Anthropic documents them (https://docs.claude.com/en/api/errors:
    /// 401 authentication_error, 403 permission_error, 404 not_found_error, 413
    /// request_too_large, 429 rate_limit_error, 500 api_error, 529 overloaded_error).
    fn refusal_body(&self, code: ErrorCode, _status: u16, message: &str) -> Value {
        let kind = match code {
            ErrorCode::Unauthorized => "authentication_error",
            ErrorCode::Forbidden
            | ErrorCode::ScopeRequired
            | ErrorCode::PlanRequired
            | ErrorCode::KeyReportedLeaked => "permission_error",
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
        json!({ "type": "error", "error": { "type": kind, "message": message } })
    }

    fn model_list_body(&self, models: &[&ModelEntry]) -> Value {
        json!({
            "data": models.iter().map(|m| json!({ "type": "model", "id": m.id, "display_name": m.name, "created_at": LISTED_CREATED_AT })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first().map(|m| m.id.clone()),
            "last_id": models.last().map(|m| m.id.clone()),
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

pub(crate) fn chat_call(req: &ChatRequest) -> HttpCall {
    let body = Body {
        model: &req.model,
        max_tokens: req.max_tokens,
        messages: req
            .messages
            .iter()
            .map(|m| Message {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect(),
        system: req.system_prompt(),
        temperature: req.temperature,
        stream: req.stream,
    };
    HttpCall::post_json(
        "/v1/messages".to_owned(),
        &[("anthropic-version", ANTHROPIC_VERSION)],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

#[derive(Deserialize)]
struct Answer {
    id: String,
    model: String,
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: AnswerUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct AnswerUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

pub(crate) fn parse_answer(body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
    let a: Answer = serde_json::from_slice(body)?;
    let content = a
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
    let input = a
        .usage
        .input_tokens
        .saturating_add(a.usage.cache_creation_input_tokens.unwrap_or(0))
        .saturating_add(a.usage.cache_read_input_tokens.unwrap_or(0));
    Ok(ChatResponse {
        id: a.id,
        model: a.model,
        content,
        stop_reason: a.stop_reason.unwrap_or_default(),
        usage: Usage {
            input_tokens: input,
            output_tokens: a.usage.output_tokens,
        },
    })
}

/// Reads Anthropic's error envelope; `None` when the body is not one.
pub(crate) fn read_error(status: u16, body: &[u8]) -> Option<ProviderFailure> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let error = v.get("error").filter(|e| e.is_object())?;
    Some(failure_from(Some(status), error))
}

fn failure_from(status: Option<u16>, error: &Value) -> ProviderFailure {
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("");
    let message = error.get("message").and_then(Value::as_str);
    let diagnosis = diagnosis_for(status, kind, message.unwrap_or(""));
    let message = message_or(message, || match status {
        Some(code) => format!("Anthropic answered HTTP {code} ({kind})"),
        None => format!("Anthropic reported {kind} in the stream"),
    });
    ProviderFailure::new(status, diagnosis, &message)
}

fn diagnosis_for(status: Option<u16>, kind: &str, message: &str) -> Diagnosis {
    if contains_ci(message, "credit balance is too low") {
        return Diagnosis::NoCredit;
    }
    match kind {
        "authentication_error" => Diagnosis::InvalidKey,
        "billing_error" => Diagnosis::NoCredit,
        "permission_error" => Diagnosis::MissingPermission,
        "not_found_error" => Diagnosis::ModelNotAvailable,
        "rate_limit_error" => Diagnosis::RateLimited,
        "api_error" | "overloaded_error" | "timeout_error" => Diagnosis::ProviderUnavailable,
        "invalid_request_error" | "request_too_large" => Diagnosis::BadRequest,
        _ => status.map_or(Diagnosis::ProviderUnavailable, status_diagnosis),
    }
}

fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// Input tokens of a usage object: `input_tokens` plus cache creation and cache read tokens.
fn input_of(usage: &Value) -> Option<u64> {
    let base = u64_at(usage, "input_tokens")?;
    Some(
        base.saturating_add(u64_at(usage, "cache_creation_input_tokens").unwrap_or(0))
            .saturating_add(u64_at(usage, "cache_read_input_tokens").unwrap_or(0)),
    )
}

pub(crate) fn on_event(state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
    let Some(v) = state.json(P, &event.data, out) else {
        return;
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or(&event.event);
    match kind {
        "message_start" => {
            let message = v.get("message").unwrap_or(&Value::Null);
            if let Some(id) = message.get("id").and_then(Value::as_str) {
                id.clone_into(&mut state.summary.id);
            }
            if let Some(model) = message.get("model").and_then(Value::as_str) {
                model.clone_into(&mut state.summary.model);
            }
            if let Some(usage) = message.get("usage") {
                if let Some(input) = input_of(usage) {
                    state.summary.usage.input_tokens = input;
                    state.usage_seen = true;
                }
                if let Some(output) = u64_at(usage, "output_tokens") {
                    state.summary.usage.output_tokens = output;
                }
            }
        }
        "content_block_delta" => {
            let delta = v.get("delta").unwrap_or(&Value::Null);
            if delta.get("type").and_then(Value::as_str) == Some("text_delta") {
                if let Some(text) = delta.get("text").and_then(Value::as_str) {
                    StreamState::delta(text, out);
                }
            }
        }
        "message_delta" => {
            if let Some(reason) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                reason.clone_into(&mut state.summary.stop_reason);
            }
            if let Some(usage) = v.get("usage") {
                // `output_tokens` is cumulative; newer API versions also repeat the input.
                if let Some(output) = u64_at(usage, "output_tokens") {
                    state.summary.usage.output_tokens = output;
                }
                if let Some(input) = input_of(usage) {
                    state.summary.usage.input_tokens = input;
                    state.usage_seen = true;
                }
            }
        }
        "message_stop" => state.ended = true,
        "error" => {
            let error = v.get("error").unwrap_or(&Value::Null);
            state.fail(failure_from(None, error), out);
        }
        // ping, content_block_start/stop and event types added later are ignored, as
        // Anthropic's versioning policy asks.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose;

    fn envelope(kind: &str, message: &str) -> String {
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
            .to_string()
    }

    #[test]
    fn every_diagnosis() {
        let cases = [
            (401, "authentication_error", "invalid x-api-key", Diagnosis::InvalidKey),
            (
                400,
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                Diagnosis::NoCredit,
            ),
            (402, "billing_error", "There is an issue with your billing.", Diagnosis::NoCredit),
            (
                403,
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
                Diagnosis::MissingPermission,
            ),
            (404, "not_found_error", "model: claude-9", Diagnosis::ModelNotAvailable),
            (
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                Diagnosis::RateLimited,
            ),
            (500, "api_error", "Internal server error", Diagnosis::ProviderUnavailable),
            (529, "overloaded_error", "Overloaded", Diagnosis::ProviderUnavailable),
            (504, "timeout_error", "Request timed out", Diagnosis::ProviderUnavailable),
            (400, "invalid_request_error", "max_tokens: Field required", Diagnosis::BadRequest),
            (413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", Diagnosis::BadRequest),
            (409, "some_new_error", "new", Diagnosis::BadRequest),
            (503, "some_new_error", "new", Diagnosis::ProviderUnavailable),
        ];
        for (status, kind, message, expected) in cases {
            let f = diagnose(Provider::Anthropic, status, envelope(kind, message).as_bytes());
            assert_eq!(f.diagnosis, expected, "{status} {kind}");
            assert_eq!(f.status, Some(status));
            assert_eq!(f.message, message);
        }
    }

    #[test]
    fn an_empty_message_gets_a_sentence() {
        let f = diagnose(
            Provider::Anthropic,
            401,
            envelope("authentication_error", "").as_bytes(),
        );
        assert_eq!(f.message, "Anthropic answered HTTP 401 (authentication_error)");
    }

    #[test]
    fn the_old_envelope_without_request_id_is_read() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let f = diagnose(Provider::Anthropic, 529, body);
        assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable);
        assert_eq!(f.message, "Overloaded");
    }
}
