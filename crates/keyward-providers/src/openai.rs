//! OpenAI Chat Completions API.
//!
//! Errors are `{"error": {"message", "type", "param", "code"}}`. The `code` (or `type`) decides
//! first, then the status:
//!
//! | code / type | status | diagnosis |
//! |---|---|---|
//! | `insufficient_quota`, `billing_not_active`, `billing_hard_limit_reached`, and the 2026 codes that say which limit: `credit_balance_exhausted`, `project_spend_limit_exceeded`, `organization_spend_limit_exceeded`, `organization_usage_limit_exceeded` | (429) | `no_credit` |
//! | a message "You have insufficient permissions for this operation" (missing scopes of a restricted key; OpenAI sends it as 401) | 401, 403 | `missing_permission` |
//! | `invalid_api_key` | 401 | `invalid_key` |
//! | `model_not_found` | 404 | `model_not_available` |
//! | `rate_limit_exceeded` | 429 | `rate_limited` |
//! | | 403 (e.g. missing scopes, unsupported region) | `missing_permission` |
//! | `server_error` | 5xx | `provider_unavailable` |
//! | | other 4xx | `bad_request` |

//!
//! Also here: the Responses and Embeddings APIs of the native pass-through, the model
//! listing (`GET /v1/models`, one page), rate-limit headers (`x-ratelimit-*`), and the
//! usage-only chunk keyward asks a streamed chat for and hides from a client that did not.

use keyward_core::{ErrorCode, ModelEntry, Provider};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::call::{self, ChatRequest, HttpCall, HttpMethod, KeyPlacement};
use crate::failure::{message_or, status_diagnosis, Diagnosis, ProviderFailure};
use crate::limits::{read_limit, RateLimits};
use crate::models::{parse_data_list, ModelPage};
use crate::native::{
    as_u32, chat_answer, invalid, json_answer, model_of, stream_of, NativeAnswer, NativeApi, NativeFields,
    NativeRequest, NativeRequestError, DEFAULT_MAX_OUTPUT,
};
use crate::response::{ChatResponse, Usage};
use crate::sse::SseEvent;
use crate::stream::{StreamEvent, StreamState};
use crate::wire::ProviderWire;

const P: Provider = Provider::OpenAi;

/// OpenAI's wire format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenAi;

impl ProviderWire for OpenAi {
    fn chat_call(&self, req: &ChatRequest) -> HttpCall {
        chat_call(req)
    }

    fn chat_api(&self) -> NativeApi {
        NativeApi::OpenAiChat
    }

    fn parse_answer(&self, body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
        parse_answer(body)
    }

    /// One page: OpenAI's listing has no paging.
    fn list_models_call(&self, _page_token: Option<&str>) -> HttpCall {
        call::get("/v1/models".to_owned(), &[])
    }

    fn parse_model_page(&self, body: &[u8]) -> Result<ModelPage, serde_json::Error> {
        parse_data_list(body)
    }

    fn path_allowed(&self, method: HttpMethod, path: &str, query: Option<&str>) -> bool {
        matches!(
            (method, path, query),
            (
                HttpMethod::Post,
                "/v1/chat/completions" | "/v1/responses" | "/v1/embeddings",
                None
            ) | (HttpMethod::Get, "/v1/models", None)
        )
    }

    fn key_placement(&self) -> KeyPlacement {
        KeyPlacement {
            header: "authorization",
            value_prefix: "Bearer ",
        }
    }

    fn own_request_headers(&self) -> &'static [&'static str] {
        &[]
    }

    fn keeps_own_answer_header(&self, name: &str) -> bool {
        matches!(name, "x-request-id" | "openai-processing-ms") || name.starts_with("x-ratelimit-")
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("x-request-id")
    }

    fn read_error(&self, status: u16, body: &[u8]) -> Option<ProviderFailure> {
        read_error(status, body)
    }

    fn rate_limits(&self, headers: &[(String, String)]) -> RateLimits {
        let bucket = |what: &str| {
            read_limit(
                headers,
                &format!("x-ratelimit-limit-{what}"),
                &format!("x-ratelimit-remaining-{what}"),
                &format!("x-ratelimit-reset-{what}"),
            )
        };
        RateLimits {
            requests: bucket("requests"),
            tokens: bucket("tokens"),
            input_tokens: None,
            output_tokens: None,
        }
    }

    fn rate_limits_note(&self) -> Option<&'static str> {
        None
    }

    fn on_event(&self, api: NativeApi, state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
        if api == NativeApi::OpenAiResponses {
            on_responses_event(state, event, out);
        } else {
            on_event(state, event, out);
        }
    }

    fn stream_end_marker(&self, api: NativeApi) -> &'static str {
        if api == NativeApi::OpenAiResponses {
            "response.completed"
        } else {
            "[DONE]"
        }
    }

    fn usage_only_event(&self) -> Option<fn(&str) -> bool> {
        Some(|data| is_usage_only_chunk(data.as_bytes()))
    }

    fn native_routes(&self) -> &'static str {
        "POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings and GET /v1/models"
    }

    fn sdk_key_header(&self) -> &'static str {
        "Authorization: Bearer"
    }

    fn read_native(
        &self,
        api: NativeApi,
        body: &mut Map<String, Value>,
        _path: Option<(&str, bool)>,
    ) -> Result<NativeFields, NativeRequestError> {
        match api {
            NativeApi::OpenAiEmbeddings => Ok(NativeFields::as_sent(model_of(body)?, 0, false)),
            NativeApi::OpenAiResponses => read_responses_request(body),
            _ => read_chat_request(body),
        }
    }

    fn native_path(&self, req: &NativeRequest) -> String {
        match req.api {
            NativeApi::OpenAiResponses => "/v1/responses",
            NativeApi::OpenAiEmbeddings => "/v1/embeddings",
            _ => "/v1/chat/completions",
        }
        .to_owned()
    }

    /// None of the client's headers travel on.
    fn native_headers(&self, _client_header: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        Vec::new()
    }

    fn parse_native(&self, api: NativeApi, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure> {
        match api {
            NativeApi::OpenAiResponses => json_answer(P, status, body, |v| parse_response(status, v)),
            // `{"object": "list", "data": [...], "model", "usage": {"prompt_tokens", "total_tokens"}}`.
            NativeApi::OpenAiEmbeddings => json_answer(P, status, body, |v| {
                let input_tokens = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64)?;
                Some(Ok(NativeAnswer {
                    id: String::new(),
                    usage: Usage {
                        input_tokens,
                        output_tokens: 0,
                    },
                }))
            }),
            _ => chat_answer(P, status, body),
        }
    }

    fn refusal_body(&self, code: ErrorCode, _status: u16, message: &str) -> Value {
        let (kind, error_code) = match code {
            ErrorCode::Unauthorized => ("invalid_request_error", "invalid_api_key"),
            ErrorCode::SharedQuotaExhausted => ("insufficient_quota", "insufficient_quota"),
            ErrorCode::RateLimited => ("requests", "rate_limit_exceeded"),
            ErrorCode::NotFound | ErrorCode::UnknownProvider => ("invalid_request_error", "not_found"),
            ErrorCode::Internal
            | ErrorCode::ProviderError
            | ErrorCode::WorkerUnavailable
            | ErrorCode::KekUnavailable => ("server_error", "server_error"),
            _ => ("invalid_request_error", code.as_str()),
        };
        json!({ "error": { "message": message, "type": kind, "param": null, "code": error_code } })
    }

    fn model_list_body(&self, models: &[&ModelEntry]) -> Value {
        json!({
            "object": "list",
            "data": models.iter().map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": "openai" })).collect::<Vec<_>>(),
        })
    }
}

/// A Chat Completions request: one choice only (keyward relays one); without an output bound
/// it gets keyward's; a stream that did not ask for usage gets it asked for, and hidden.
fn read_chat_request(body: &mut Map<String, Value>) -> Result<NativeFields, NativeRequestError> {
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err(invalid("n: keyward relays one choice per call (n must be 1)"));
    }
    let stream = stream_of(body);
    let mut rewritten = false;
    let mut hide_usage_chunk = false;
    let max = match as_u32(body.get("max_completion_tokens")).or_else(|| as_u32(body.get("max_tokens"))) {
        Some(n) => n,
        None => {
            body.insert("max_completion_tokens".into(), json!(DEFAULT_MAX_OUTPUT));
            rewritten = true;
            DEFAULT_MAX_OUTPUT
        }
    };
    if stream {
        let asked = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !asked {
            // Metering needs the usage; the client did not ask for it, so it will not see it.
            let opts = body.entry("stream_options").or_insert_with(|| json!({}));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            hide_usage_chunk = true;
            rewritten = true;
        }
    }
    Ok(NativeFields {
        model: model_of(body)?,
        max_output: max,
        stream,
        rewritten,
        hide_usage_chunk,
    })
}

/// A Responses request: relayed while it is made (never in the background); without an
/// output bound it gets keyward's.
fn read_responses_request(body: &mut Map<String, Value>) -> Result<NativeFields, NativeRequestError> {
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
            "background: keyward relays a response while it is made (background responses are not carried)",
        ));
    }
    let stream = stream_of(body);
    let (max, rewritten) = match as_u32(body.get("max_output_tokens")) {
        Some(n) => (n, false),
        None => {
            body.insert("max_output_tokens".into(), json!(DEFAULT_MAX_OUTPUT));
            (DEFAULT_MAX_OUTPUT, true)
        }
    };
    Ok(NativeFields {
        model: model_of(body)?,
        max_output: max,
        stream,
        rewritten,
        hide_usage_chunk: false,
    })
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    max_completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

pub(crate) fn chat_call(req: &ChatRequest) -> HttpCall {
    let system = req.system_prompt().map(|s| Message {
        role: "system",
        content: s,
    });
    let messages = system
        .into_iter()
        .chain(req.messages.iter().map(|m| Message {
            role: m.role.as_str(),
            content: &m.content,
        }))
        .collect();
    let body = Body {
        model: &req.model,
        messages,
        max_completion_tokens: req.max_tokens,
        temperature: req.temperature,
        stream: req.stream,
        stream_options: req.stream.then_some(StreamOptions { include_usage: true }),
    };
    HttpCall::post_json(
        "/v1/chat/completions".to_owned(),
        &[],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

#[derive(Deserialize)]
struct Answer {
    id: String,
    model: String,
    choices: Vec<Choice>,
    usage: AnswerUsage,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct AnswerUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub(crate) fn parse_answer(body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
    let a: Answer = serde_json::from_slice(body)?;
    let first = a.choices.into_iter().next();
    let (content, stop_reason) = match first {
        Some(c) => (
            c.message.content.or(c.message.refusal).unwrap_or_default(),
            c.finish_reason.unwrap_or_default(),
        ),
        None => (String::new(), String::new()),
    };
    Ok(ChatResponse {
        id: a.id,
        model: a.model,
        content,
        stop_reason,
        usage: Usage {
            input_tokens: a.usage.prompt_tokens,
            output_tokens: a.usage.completion_tokens,
        },
    })
}

/// Reads OpenAI's error envelope; `None` when the body is not one.
pub(crate) fn read_error(status: u16, body: &[u8]) -> Option<ProviderFailure> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let error = v.get("error").filter(|e| e.is_object())?;
    Some(failure_from(Some(status), error))
}

fn failure_from(status: Option<u16>, error: &Value) -> ProviderFailure {
    let code = error.get("code").and_then(Value::as_str).unwrap_or("");
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("");
    let message = error.get("message").and_then(Value::as_str);
    let diagnosis = diagnosis_for(status, code, kind, message.unwrap_or(""));
    let message = message_or(message, || {
        let what = if code.is_empty() { kind } else { code };
        match status {
            Some(s) => format!("OpenAI answered HTTP {s} ({what})"),
            None => format!("OpenAI reported {what} in the stream"),
        }
    });
    ProviderFailure::new(status, diagnosis, &message)
}

/// The codes OpenAI answers with when the account cannot pay (429 `insufficient_quota`,
/// and since 2026 codes that name the limit reached; retrying does not help).
const NO_CREDIT_CODES: [&str; 7] = [
    "insufficient_quota",
    "billing_not_active",
    "billing_hard_limit_reached",
    "credit_balance_exhausted",
    "project_spend_limit_exceeded",
    "organization_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
];

fn diagnosis_for(status: Option<u16>, code: &str, kind: &str, message: &str) -> Diagnosis {
    let named = |word: &str| code == word || kind == word;
    if NO_CREDIT_CODES.iter().any(|c| named(c)) {
        return Diagnosis::NoCredit;
    }
    if message.starts_with("You have insufficient permissions for this operation") {
        return Diagnosis::MissingPermission;
    }
    if named("invalid_api_key") {
        return Diagnosis::InvalidKey;
    }
    if named("model_not_found") {
        return Diagnosis::ModelNotAvailable;
    }
    if named("rate_limit_exceeded") {
        return Diagnosis::RateLimited;
    }
    match status {
        Some(s) => status_diagnosis(s),
        None if kind == "invalid_request_error" => Diagnosis::BadRequest,
        None => Diagnosis::ProviderUnavailable,
    }
}

pub(crate) fn on_event(state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
    if event.data.trim() == "[DONE]" {
        state.ended = true;
        return;
    }
    let Some(v) = state.json(P, &event.data, out) else {
        return;
    };
    if let Some(error) = v.get("error").filter(|e| e.is_object()) {
        state.fail(failure_from(None, error), out);
        return;
    }
    if let Some(id) = v.get("id").and_then(Value::as_str) {
        id.clone_into(&mut state.summary.id);
    }
    if let Some(model) = v.get("model").and_then(Value::as_str) {
        model.clone_into(&mut state.summary.model);
    }
    let first_choice = v.get("choices").and_then(Value::as_array).and_then(|choices| {
        choices
            .iter()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
    });
    if let Some(choice) = first_choice {
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
            StreamState::delta(text, out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            reason.clone_into(&mut state.summary.stop_reason);
        }
    }
    if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
        if let (Some(input), Some(output)) = (
            usage.get("prompt_tokens").and_then(Value::as_u64),
            usage.get("completion_tokens").and_then(Value::as_u64),
        ) {
            state.summary.usage = Usage {
                input_tokens: input,
                output_tokens: output,
            };
            state.usage_seen = true;
        }
    }
}

/// A plain Responses API answer (`{"id": "resp_…", "object": "response", "status", "usage":
/// {"input_tokens", "output_tokens"}, "error"}`): `None` when it is not one; a `failed`
/// response is its error.
fn parse_response(status: u16, v: &Value) -> Option<Result<NativeAnswer, ProviderFailure>> {
    if v.get("object").and_then(Value::as_str) != Some("response") {
        return None;
    }
    if let Some(error) = v.get("error").filter(|e| e.is_object()) {
        return Some(Err(failure_from(Some(status), error)));
    }
    let usage = v.get("usage")?;
    Some(Ok(NativeAnswer {
        id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
        usage: Usage {
            input_tokens: usage.get("input_tokens").and_then(Value::as_u64)?,
            output_tokens: usage.get("output_tokens").and_then(Value::as_u64)?,
        },
    }))
}

/// One event of a streamed Responses API answer: `response.output_text.delta` carries text;
/// `response.completed` (or `response.incomplete`) ends it with the final response and its
/// usage; `response.failed` and `error` are failures. There is no `[DONE]`.
pub(crate) fn on_responses_event(state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
    let Some(v) = state.json(P, &event.data, out) else {
        return;
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or(&event.event);
    let response = v.get("response").unwrap_or(&Value::Null);
    if let Some(id) = response.get("id").and_then(Value::as_str) {
        id.clone_into(&mut state.summary.id);
    }
    if let Some(model) = response.get("model").and_then(Value::as_str) {
        model.clone_into(&mut state.summary.model);
    }
    match kind {
        "response.output_text.delta" => {
            if let Some(text) = v.get("delta").and_then(Value::as_str) {
                StreamState::delta(text, out);
            }
        }
        "response.completed" | "response.incomplete" => {
            if let Some(usage) = response.get("usage") {
                if let (Some(input), Some(output)) = (
                    usage.get("input_tokens").and_then(Value::as_u64),
                    usage.get("output_tokens").and_then(Value::as_u64),
                ) {
                    state.summary.usage = Usage {
                        input_tokens: input,
                        output_tokens: output,
                    };
                    state.usage_seen = true;
                }
            }
            if let Some(status) = response.get("status").and_then(Value::as_str) {
                status.clone_into(&mut state.summary.stop_reason);
            }
            state.ended = true;
        }
        "response.failed" => {
            let error = response.get("error").unwrap_or(&Value::Null);
            state.fail(failure_from(None, error), out);
        }
        "error" => state.fail(failure_from(None, &v), out),
        // response.created, output_item.added, content_part.added, … carry nothing metered.
        _ => {}
    }
}

/// Whether a raw stream chunk (the JSON of one `data:` line, with or without the `data:`
/// prefix) is the usage-only chunk: `choices` empty and `usage` an object. The gateway hides
/// it from clients that did not ask for usage.
pub fn is_usage_only_chunk(data_line_json: &[u8]) -> bool {
    let mut bytes = data_line_json.trim_ascii();
    if let Some(rest) = bytes.strip_prefix(b"data:") {
        bytes = rest.trim_ascii();
    }
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return false;
    };
    let choices_empty = v.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
    let has_usage = v.get("usage").is_some_and(Value::is_object);
    choices_empty && has_usage
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose;

    fn envelope(message: &str, kind: &str, code: Option<&str>) -> String {
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
    }

    #[test]
    fn every_diagnosis() {
        let cases = [
            (
                401,
                envelope(
                    "Incorrect API key provided: sk-proj-********************abcd. You can find your API key at https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                ),
                Diagnosis::InvalidKey,
            ),
            (
                401,
                envelope("You didn't provide an API key.", "invalid_request_error", None),
                Diagnosis::InvalidKey,
            ),
            (
                429,
                envelope(
                    "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota",
                    Some("insufficient_quota"),
                ),
                Diagnosis::NoCredit,
            ),
            (
                429,
                envelope(
                    "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota",
                    Some("project_spend_limit_exceeded"),
                ),
                Diagnosis::NoCredit,
            ),
            (
                401,
                envelope(
                    "You have insufficient permissions for this operation. Missing scopes: model.request. Check that you have the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), and if you're using a restricted API key, that it has the necessary scopes.",
                    "invalid_request_error",
                    None,
                ),
                Diagnosis::MissingPermission,
            ),
            (
                429,
                envelope(
                    "Your account is not active, please check your billing details on our website.",
                    "billing_not_active",
                    Some("billing_not_active"),
                ),
                Diagnosis::NoCredit,
            ),
            (
                429,
                envelope(
                    "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.",
                    "requests",
                    Some("rate_limit_exceeded"),
                ),
                Diagnosis::RateLimited,
            ),
            (
                403,
                envelope(
                    "You have insufficient permissions for this operation. Missing scopes: model.request.",
                    "invalid_request_error",
                    None,
                ),
                Diagnosis::MissingPermission,
            ),
            (
                403,
                envelope(
                    "Country, region, or territory not supported",
                    "request_forbidden",
                    Some("unsupported_country_region_territory"),
                ),
                Diagnosis::MissingPermission,
            ),
            (
                404,
                envelope(
                    "The model `gpt-9` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    Some("model_not_found"),
                ),
                Diagnosis::ModelNotAvailable,
            ),
            (
                500,
                envelope(
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                ),
                Diagnosis::ProviderUnavailable,
            ),
            (
                503,
                envelope("The engine is currently overloaded, please try again later.", "server_error", None),
                Diagnosis::ProviderUnavailable,
            ),
            (
                400,
                envelope(
                    "Unsupported parameter: 'max_tokens' is not supported with this model.",
                    "invalid_request_error",
                    Some("unsupported_parameter"),
                ),
                Diagnosis::BadRequest,
            ),
        ];
        for (status, body, expected) in cases {
            let f = diagnose(Provider::OpenAi, status, body.as_bytes());
            assert_eq!(f.diagnosis, expected, "{status} {body}");
            assert_eq!(f.status, Some(status));
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(f.message, v["error"]["message"].as_str().unwrap());
        }
    }

    #[test]
    fn a_numeric_code_is_tolerated() {
        let body = br#"{"error":{"message":"Bad gateway.","type":"cf_bad_gateway","param":null,"code":502}}"#;
        let f = diagnose(Provider::OpenAi, 502, body);
        assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable);
        assert_eq!(f.message, "Bad gateway.");
    }

    #[test]
    fn usage_only_chunk_detection() {
        assert!(is_usage_only_chunk(
            br#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#
        ));
        assert!(is_usage_only_chunk(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n"
        ));
        assert!(!is_usage_only_chunk(
            br#"{"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#
        ));
        assert!(!is_usage_only_chunk(br#"{"choices":[],"usage":null}"#));
        assert!(!is_usage_only_chunk(
            br#"{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(b"[DONE]"));
        assert!(!is_usage_only_chunk(b"\xff"));
    }
}
