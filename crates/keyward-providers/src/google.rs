//! Google Gemini API (`v1beta` generateContent / streamGenerateContent?alt=sse).
//!
//! Errors are `{"error": {"code", "message", "status", "details": [...]}}` (a streamed call
//! without `alt=sse` wraps it in an array). Diagnosis, first match wins:
//!
//! | what Google sent | diagnosis | advice |
//! |---|---|---|
//! | 403 "Your API key was reported as leaked" | `key_reported_leaked` | replace the key |
//! | `google.rpc.ErrorInfo` reason `ACCESS_TOKEN_TYPE_UNSUPPORTED` (401) | `invalid_key` | Google does not take this kind of key: create an auth key |
//! | reason `CONSUMER_SUSPENDED`, or "… has been suspended" (403) | `invalid_key` | the key's project is suspended |
//! | reason `API_KEY_INVALID` / `API_KEY_EXPIRED`, a message "API key not valid" / "API key expired" / "API Key not found" (400 `INVALID_ARGUMENT`), or `UNAUTHENTICATED` | `invalid_key` | check or recreate the key |
//! | reason `BILLING_DISABLED`, or a message saying prepaid credits "are depleted" | `no_credit` | |
//! | `RESOURCE_EXHAUSTED` (429) otherwise | `rate_limited` | |
//! | `PERMISSION_DENIED` (403) | `missing_permission` | |
//! | `NOT_FOUND` (404) | `model_not_available` | |
//! | `FAILED_PRECONDITION` (400): `no_credit` if it mentions billing, else `missing_permission` (e.g. "User location is not supported") | | |
//! | `INTERNAL` (500), `UNAVAILABLE` (503), `DEADLINE_EXCEEDED` (504) | `provider_unavailable` | |
//! | `INVALID_ARGUMENT` and other 4xx | `bad_request` | |
//!
//! The bodies are those Google sends today (December 2026; the README's "Providers" section
//! cites where each was seen): AI Studio issues only auth keys (`AQ.…`) since mid-2026, and
//! the API refuses standard keys (`AIza…`), unrestricted ones with 401
//! `ACCESS_TOKEN_TYPE_UNSUPPORTED` since 19 June 2026 and all of them since September 2026.
//!
//! Choice: Google answers an exhausted free-tier or per-minute quota with 429
//! `RESOURCE_EXHAUSTED` "You exceeded your current quota, please check your plan and billing
//! details" — the same words whether the limit is per minute or per day — so "quota" or
//! "plan and billing details" alone mean `rate_limited`. Only an answer that is about money
//! and nothing else (depleted prepayment credits, billing disabled) is `no_credit`.

//!
//! Also here: the model listing (`GET /v1beta/models?pageSize=…&pageToken=…`) and the native
//! pass-through of generateContent under `v1` and `v1beta`, whose model and streaming travel
//! in the path (`models/{model}:streamGenerateContent?alt=sse`). Google sends no rate-limit
//! headers and no request id header (the id is the body's `responseId`).

use keyward_core::{ErrorCode, ModelEntry, Provider};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::call::{
    self, listing_query_allowed, model_id_is_safe, model_path_segment, ChatRequest, ChatRole, HttpCall, HttpMethod,
    KeyPlacement, MODELS_PAGE_SIZE,
};
use crate::failure::{contains_ci, message_or, status_diagnosis, Diagnosis, ProviderFailure};
use crate::limits::RateLimits;
use crate::models::ModelPage;
use crate::native::{
    as_u32, chat_answer, invalid, not_carried_message, NativeAnswer, NativeApi, NativeFields, NativeRequest,
    NativeRequestError, DEFAULT_MAX_OUTPUT,
};
use crate::response::{ChatResponse, Usage};
use crate::sse::SseEvent;
use crate::stream::{StreamEvent, StreamState};
use crate::wire::ProviderWire;

const P: Provider = Provider::Google;

/// Google's API versions, both carried (google-genai 3.x calls `v1`, older SDKs `v1beta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoogleVersion {
    V1,
    V1Beta,
}

impl GoogleVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            GoogleVersion::V1 => "v1",
            GoogleVersion::V1Beta => "v1beta",
        }
    }
}

/// Google's wire format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Google;

impl ProviderWire for Google {
    fn chat_call(&self, req: &ChatRequest) -> HttpCall {
        chat_call(req)
    }

    fn chat_api(&self) -> NativeApi {
        NativeApi::GoogleGenerate(GoogleVersion::V1Beta)
    }

    fn parse_answer(&self, body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
        parse_answer(body)
    }

    fn list_models_call(&self, page_token: Option<&str>) -> HttpCall {
        let path = match page_token {
            Some(t) => format!("/v1beta/models?pageSize={MODELS_PAGE_SIZE}&pageToken={t}"),
            None => format!("/v1beta/models?pageSize={MODELS_PAGE_SIZE}"),
        };
        call::get(path, &[])
    }

    fn parse_model_page(&self, body: &[u8]) -> Result<ModelPage, serde_json::Error> {
        let list: ModelList = serde_json::from_slice(body)?;
        Ok(ModelPage {
            ids: list
                .models
                .into_iter()
                .map(|m| m.name.strip_prefix("models/").map(str::to_owned).unwrap_or(m.name))
                .collect(),
            next: list.next_page_token.filter(|s| !s.is_empty()),
        })
    }

    fn path_allowed(&self, method: HttpMethod, path: &str, query: Option<&str>) -> bool {
        match method {
            HttpMethod::Get => path == "/v1beta/models" && listing_query_allowed(query, "pageSize", "pageToken"),
            HttpMethod::Post => {
                let Some(rest) = path
                    .strip_prefix("/v1beta/models/")
                    .or_else(|| path.strip_prefix("/v1/models/"))
                else {
                    return false;
                };
                let Some((model, action)) = rest.split_once(':') else {
                    return false;
                };
                model_id_is_safe(model)
                    && matches!(
                        (action, query),
                        ("generateContent", None) | ("streamGenerateContent", None | Some("alt=sse"))
                    )
            }
        }
    }

    fn key_placement(&self) -> KeyPlacement {
        KeyPlacement {
            header: "x-goog-api-key",
            value_prefix: "",
        }
    }

    fn own_request_headers(&self) -> &'static [&'static str] {
        &[]
    }

    fn keeps_own_answer_header(&self, _name: &str) -> bool {
        false
    }

    fn request_id_header(&self) -> Option<&'static str> {
        None
    }

    fn read_error(&self, status: u16, body: &[u8]) -> Option<ProviderFailure> {
        read_error(status, body)
    }

    fn rate_limits(&self, _headers: &[(String, String)]) -> RateLimits {
        RateLimits::default()
    }

    fn rate_limits_note(&self) -> Option<&'static str> {
        Some(
            "Google sends no rate-limit headers: its limits apply per Google Cloud project and are shown in \
             Google AI Studio (aistudio.google.com/rate-limit).",
        )
    }

    fn on_event(&self, _api: NativeApi, state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
        on_event(state, event, out);
    }

    fn stream_end_marker(&self, _api: NativeApi) -> &'static str {
        "a finishReason"
    }

    fn usage_only_event(&self) -> Option<fn(&str) -> bool> {
        None
    }

    fn native_routes(&self) -> &'static str {
        "POST /v1/models/{model}:generateContent, POST /v1/models/{model}:streamGenerateContent?alt=sse \
         (the same under /v1beta) and GET /v1/models (or /v1beta/models)"
    }

    fn sdk_key_header(&self) -> &'static str {
        "x-goog-api-key"
    }

    fn model_list_versions(&self) -> &'static [&'static str] {
        &["v1", "v1beta"]
    }

    /// The output bound is `generationConfig.maxOutputTokens`; one candidate only.
    fn read_native(
        &self,
        _api: NativeApi,
        body: &mut Map<String, Value>,
        path: Option<(&str, bool)>,
    ) -> Result<NativeFields, NativeRequestError> {
        let (model, stream) = path.unwrap_or_default();
        let config = body.entry("generationConfig").or_insert_with(|| json!({}));
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
        let (max, rewritten) = match as_u32(config.get("maxOutputTokens")) {
            Some(n) => (n, false),
            None => {
                config.insert("maxOutputTokens".into(), json!(DEFAULT_MAX_OUTPUT));
                (DEFAULT_MAX_OUTPUT, true)
            }
        };
        Ok(NativeFields {
            model: model.to_owned(),
            max_output: max,
            stream,
            rewritten,
            hide_usage_chunk: false,
        })
    }

    fn native_path(&self, req: &NativeRequest) -> String {
        let version = match req.api {
            NativeApi::GoogleGenerate(version) => version,
            _ => GoogleVersion::V1Beta,
        };
        // An unsafe model id is percent-encoded so it cannot change the path; the worker's
        // allowlist then refuses the call.
        let model = model_path_segment(&req.model);
        if req.stream {
            format!("/{}/models/{model}:streamGenerateContent?alt=sse", version.as_str())
        } else {
            format!("/{}/models/{model}:generateContent", version.as_str())
        }
    }

    /// None of the client's headers travel on.
    fn native_headers(&self, _client_header: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        Vec::new()
    }

    fn parse_native(&self, _api: NativeApi, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure> {
        chat_answer(P, status, body)
    }

    /// The `status` word per HTTP code as the Gemini API documents them
    /// (https://ai.google.dev/gemini-api/docs/troubleshooting: 400 INVALID_ARGUMENT, 403
    /// PERMISSION_DENIED, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 500 INTERNAL, 503 UNAVAILABLE).
    fn refusal_body(&self, code: ErrorCode, status: u16, message: &str) -> Value {
        let status_word = match code {
            ErrorCode::Unauthorized => "UNAUTHENTICATED",
            ErrorCode::Forbidden
            | ErrorCode::ScopeRequired
            | ErrorCode::PlanRequired
            | ErrorCode::KeyReportedLeaked => "PERMISSION_DENIED",
            ErrorCode::NotFound | ErrorCode::UnknownProvider => "NOT_FOUND",
            ErrorCode::SharedQuotaExhausted | ErrorCode::RateLimited => "RESOURCE_EXHAUSTED",
            ErrorCode::WorkerUnavailable | ErrorCode::KekUnavailable | ErrorCode::DatabaseUnavailable => "UNAVAILABLE",
            ErrorCode::SharedPoolUnavailable => "FAILED_PRECONDITION",
            ErrorCode::Internal | ErrorCode::ProviderError => "INTERNAL",
            _ => "INVALID_ARGUMENT",
        };
        json!({ "error": { "code": status, "message": message, "status": status_word } })
    }

    fn model_list_body(&self, models: &[&ModelEntry]) -> Value {
        json!({
            "models": models.iter().map(|m| json!({
                "name": format!("models/{}", m.id),
                "displayName": m.name,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Deserialize)]
struct ListedModel {
    name: String,
}

/// `{"models": [{"name": "models/…"}], "nextPageToken"}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelList {
    #[serde(default)]
    models: Vec<ListedModel>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// Why a Google `models/{model}:{action}` call is not carried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoogleActionError {
    /// A method keyward does not carry (`countTokens`, `embedContent`, …).
    #[error("{0}")]
    NotCarried(String),
    /// A malformed path or query, or a key in the query.
    #[error("{0}")]
    Invalid(String),
}

/// Whether a Google model path segment and action are carried: `{model}:generateContent`
/// or `{model}:streamGenerateContent` with `?alt=sse`. Returns the model and whether it
/// streams, or why not. A `key=` in the query is refused first: keys never travel in URLs
/// (they end up in logs), and the SDK sends them in a header.
pub fn google_action<'a>(model_action: &'a str, query: Option<&str>) -> Result<(&'a str, bool), GoogleActionError> {
    let query_has_key = query.is_some_and(|q| q.split('&').any(|p| p == "key" || p.starts_with("key=")));
    if query_has_key {
        return Err(GoogleActionError::Invalid(
            "keyward takes the token only in the x-goog-api-key header (where the google-genai SDK sends it), \
             never in the URL: remove ?key= and send x-goog-api-key: kw_…"
                .to_owned(),
        ));
    }
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return Err(GoogleActionError::Invalid(
            "expected models/{model}:generateContent or :streamGenerateContent".to_owned(),
        ));
    };
    if !model_id_is_safe(model) {
        return Err(GoogleActionError::Invalid(format!("{model:?} is not a model id")));
    }
    match (action, query) {
        ("generateContent", None) => Ok((model, false)),
        ("streamGenerateContent", Some("alt=sse")) => Ok((model, true)),
        ("streamGenerateContent", _) => Err(GoogleActionError::Invalid(
            "keyward relays streamGenerateContent as server-sent events only: add ?alt=sse".to_owned(),
        )),
        (other, _) => Err(GoogleActionError::NotCarried(not_carried_message(P, other))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemInstruction<'a>>,
    generation_config: GenerationConfig,
}

#[derive(Serialize)]
struct Content<'a> {
    role: &'static str,
    parts: [Part<'a>; 1],
}

#[derive(Serialize)]
struct SystemInstruction<'a> {
    parts: [Part<'a>; 1],
}

#[derive(Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    max_output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

pub(crate) fn chat_call(req: &ChatRequest) -> HttpCall {
    let body = Body {
        contents: req
            .messages
            .iter()
            .map(|m| Content {
                role: match m.role {
                    ChatRole::User => "user",
                    ChatRole::Assistant => "model",
                },
                parts: [Part { text: &m.content }],
            })
            .collect(),
        system_instruction: req
            .system_prompt()
            .map(|text| SystemInstruction { parts: [Part { text }] }),
        generation_config: GenerationConfig {
            max_output_tokens: req.max_tokens,
            temperature: req.temperature,
        },
    };
    let action = if req.stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    HttpCall::post_json(
        format!("/v1beta/models/{}:{action}", model_path_segment(&req.model)),
        &[],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: UsageMetadata,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<AnswerPart>,
}

#[derive(Deserialize)]
struct AnswerPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
}

impl UsageMetadata {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_token_count.saturating_add(self.tool_use_prompt_token_count),
            output_tokens: self.candidates_token_count.saturating_add(self.thoughts_token_count),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

pub(crate) fn parse_answer(body: &[u8]) -> Result<ChatResponse, serde_json::Error> {
    let a: Answer = serde_json::from_slice(body)?;
    let first = a.candidates.into_iter().next();
    let (content, stop_reason) = match first {
        Some(c) => {
            let text = c
                .content
                .map(|content| {
                    content
                        .parts
                        .into_iter()
                        .filter(|p| p.thought != Some(true))
                        .filter_map(|p| p.text)
                        .collect::<String>()
                })
                .unwrap_or_default();
            (text, c.finish_reason.unwrap_or_default())
        }
        None => (
            String::new(),
            a.prompt_feedback.and_then(|f| f.block_reason).unwrap_or_default(),
        ),
    };
    Ok(ChatResponse {
        id: a.response_id.unwrap_or_default(),
        model: a.model_version.unwrap_or_default(),
        content,
        stop_reason,
        usage: a.usage_metadata.usage(),
    })
}

/// Reads Google's error envelope (or an array holding one); `None` when the body is not one.
pub(crate) fn read_error(status: u16, body: &[u8]) -> Option<ProviderFailure> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let v = match &v {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let error = v.get("error").filter(|e| e.is_object())?;
    Some(failure_from(Some(status), error))
}

/// What to do about Google's answers on a key's type and state.
pub(crate) const ADVICE_LEAKED: &str = "Google blocked this key because it was reported as leaked (published \
somewhere others can read it). It will not work again: delete it in Google AI Studio, create a new auth key, \
and save the new one here.";
pub(crate) const ADVICE_KEY_TYPE: &str = "Google does not accept this kind of key for the Gemini API. Create \
an auth key in Google AI Studio → API keys (aistudio.google.com/apikey; it starts with \"AQ.\") and save it here.";
pub(crate) const ADVICE_SUSPENDED: &str = "Google has suspended the Google Cloud project this key belongs to. \
Check the project in the Google Cloud console, or create a key in another project and save it here.";
pub(crate) const ADVICE_INVALID: &str = "Google does not recognise this key: it may be mistyped, deleted or \
expired, or a standard (AIza…) key, which Google no longer accepts. Create an auth key in Google AI Studio → \
API keys and save it here.";

fn failure_from(status: Option<u16>, error: &Value) -> ProviderFailure {
    let message = error.get("message").and_then(Value::as_str);
    let (diagnosis, advice) = diagnosis_for(status, error, message.unwrap_or(""));
    let message = message_or(message, || {
        let word = error.get("status").and_then(Value::as_str).unwrap_or("an error");
        match status {
            Some(s) => format!("Google answered HTTP {s} ({word})"),
            None => format!("Google reported {word} in the stream"),
        }
    });
    let failure = ProviderFailure::new(status, diagnosis, &message);
    match advice {
        Some(a) => failure.advising(a),
        None => failure,
    }
}

fn diagnosis_for(status: Option<u16>, error: &Value, message: &str) -> (Diagnosis, Option<&'static str>) {
    let word = error.get("status").and_then(Value::as_str).unwrap_or("");
    let reasons: Vec<&str> = error
        .get("details")
        .and_then(Value::as_array)
        .map(|details| {
            details
                .iter()
                .filter(|d| {
                    d.get("@type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with("google.rpc.ErrorInfo"))
                })
                .filter_map(|d| d.get("reason").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let has_reason = |r: &str| reasons.contains(&r);
    if contains_ci(message, "reported as leaked") {
        return (Diagnosis::KeyReportedLeaked, Some(ADVICE_LEAKED));
    }
    if has_reason("ACCESS_TOKEN_TYPE_UNSUPPORTED") {
        return (Diagnosis::InvalidKey, Some(ADVICE_KEY_TYPE));
    }
    if has_reason("CONSUMER_SUSPENDED") || contains_ci(message, "has been suspended") {
        return (Diagnosis::InvalidKey, Some(ADVICE_SUSPENDED));
    }
    if has_reason("API_KEY_INVALID")
        || has_reason("API_KEY_EXPIRED")
        || contains_ci(message, "api key not valid")
        || contains_ci(message, "api key expired")
        || contains_ci(message, "api key not found")
        || word == "UNAUTHENTICATED"
    {
        return (Diagnosis::InvalidKey, Some(ADVICE_INVALID));
    }
    if has_reason("BILLING_DISABLED") || contains_ci(message, "credits are depleted") {
        return (Diagnosis::NoCredit, None);
    }
    let diagnosis = match word {
        "RESOURCE_EXHAUSTED" => Diagnosis::RateLimited,
        "PERMISSION_DENIED" => Diagnosis::MissingPermission,
        "NOT_FOUND" => Diagnosis::ModelNotAvailable,
        "FAILED_PRECONDITION" if contains_ci(message, "billing") => Diagnosis::NoCredit,
        "FAILED_PRECONDITION" => Diagnosis::MissingPermission,
        "INTERNAL" | "UNAVAILABLE" | "DEADLINE_EXCEEDED" => Diagnosis::ProviderUnavailable,
        "INVALID_ARGUMENT" | "OUT_OF_RANGE" => Diagnosis::BadRequest,
        _ => {
            let code = status.or_else(|| {
                error
                    .get("code")
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
            });
            code.map_or(Diagnosis::ProviderUnavailable, status_diagnosis)
        }
    };
    (diagnosis, None)
}

pub(crate) fn on_event(state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>) {
    let Some(v) = state.json(P, &event.data, out) else {
        return;
    };
    if let Some(error) = v.get("error").filter(|e| e.is_object()) {
        state.fail(failure_from(None, error), out);
        return;
    }
    if let Some(id) = v.get("responseId").and_then(Value::as_str) {
        id.clone_into(&mut state.summary.id);
    }
    if let Some(model) = v.get("modelVersion").and_then(Value::as_str) {
        model.clone_into(&mut state.summary.model);
    }
    let candidate = v.get("candidates").and_then(Value::as_array).and_then(|c| c.first());
    match candidate {
        Some(candidate) => {
            if let Some(parts) = candidate.pointer("/content/parts").and_then(Value::as_array) {
                let text: String = parts
                    .iter()
                    .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                StreamState::delta(&text, out);
            }
            if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
                reason.clone_into(&mut state.summary.stop_reason);
                state.ended = true;
            }
        }
        None => {
            if let Some(reason) = v.pointer("/promptFeedback/blockReason").and_then(Value::as_str) {
                reason.clone_into(&mut state.summary.stop_reason);
                state.ended = true;
            }
        }
    }
    if let Some(usage) = v.get("usageMetadata").filter(|u| u.is_object()) {
        if let Ok(usage) = UsageMetadata::deserialize(usage) {
            state.summary.usage = usage.usage();
            state.usage_seen = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose;
    use serde_json::json;

    fn error_info(reason: &str) -> Value {
        json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com",
               "metadata": {"service": "generativelanguage.googleapis.com"}})
    }

    fn envelope(code: u16, status: &str, message: &str, details: Vec<Value>) -> String {
        json!({"error": {"code": code, "message": message, "status": status, "details": details}}).to_string()
    }

    #[test]
    fn answers_about_the_key_say_what_to_do() {
        // The bodies Google sends today (see the module doc).
        let cases = [
            (
                401,
                envelope(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
                    vec![json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                                "metadata": {"method": "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent",
                                             "service": "generativelanguage.googleapis.com"}})],
                ),
                Diagnosis::InvalidKey,
                ADVICE_KEY_TYPE,
            ),
            (
                400,
                envelope(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", vec![error_info("API_KEY_INVALID")]),
                Diagnosis::InvalidKey,
                ADVICE_INVALID,
            ),
            (
                403,
                json!({"error": {"code": 403, "message": "Your API key was reported as leaked. Please use another API key.", "status": "PERMISSION_DENIED"}}).to_string(),
                Diagnosis::KeyReportedLeaked,
                ADVICE_LEAKED,
            ),
            (
                403,
                envelope(
                    403,
                    "PERMISSION_DENIED",
                    "Permission denied: Consumer 'api_key:AQ.xxxx' has been suspended.",
                    vec![error_info("CONSUMER_SUSPENDED")],
                ),
                Diagnosis::InvalidKey,
                ADVICE_SUSPENDED,
            ),
        ];
        for (status, body, diagnosis, advice) in cases {
            let f = diagnose(Provider::Google, status, body.as_bytes());
            assert_eq!((f.diagnosis, f.advice), (diagnosis, Some(advice)), "{body}");
        }
        // Answers that are not about the key carry no advice.
        let f = diagnose(
            Provider::Google,
            503,
            envelope(503, "UNAVAILABLE", "busy", vec![]).as_bytes(),
        );
        assert_eq!(f.advice, None);
    }

    #[test]
    fn every_diagnosis() {
        let quota_details = vec![
            json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}),
            json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "5s"}),
        ];
        let cases = [
            (
                400,
                envelope(
                    400,
                    "INVALID_ARGUMENT",
                    "API key not valid. Please pass a valid API key.",
                    vec![
                        error_info("API_KEY_INVALID"),
                        json!({"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                               "message": "API key not valid. Please pass a valid API key."}),
                    ],
                ),
                Diagnosis::InvalidKey,
            ),
            (
                400,
                envelope(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", vec![]),
                Diagnosis::InvalidKey,
            ),
            (
                400,
                envelope(400, "INVALID_ARGUMENT", "API key expired. Please renew the API key.", vec![error_info("API_KEY_EXPIRED")]),
                Diagnosis::InvalidKey,
            ),
            (
                429,
                envelope(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your project and billing.",
                    vec![],
                ),
                Diagnosis::NoCredit,
            ),
            (
                403,
                envelope(403, "PERMISSION_DENIED", "This API method requires billing to be enabled.", vec![error_info("BILLING_DISABLED")]),
                Diagnosis::NoCredit,
            ),
            (
                400,
                envelope(
                    400,
                    "FAILED_PRECONDITION",
                    "Gemini API free tier is not available in your country. Please enable billing on your project in Google AI Studio.",
                    vec![],
                ),
                Diagnosis::NoCredit,
            ),
            (
                429,
                envelope(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                    quota_details,
                ),
                Diagnosis::RateLimited,
            ),
            (
                429,
                envelope(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", vec![]),
                Diagnosis::RateLimited,
            ),
            (
                403,
                envelope(403, "PERMISSION_DENIED", "The caller does not have permission", vec![]),
                Diagnosis::MissingPermission,
            ),
            (
                403,
                envelope(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
                    vec![],
                ),
                Diagnosis::MissingPermission,
            ),
            (
                400,
                envelope(400, "FAILED_PRECONDITION", "User location is not supported for the API use.", vec![]),
                Diagnosis::MissingPermission,
            ),
            (
                404,
                envelope(
                    404,
                    "NOT_FOUND",
                    "models/gemini-9 is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods.",
                    vec![],
                ),
                Diagnosis::ModelNotAvailable,
            ),
            (
                500,
                envelope(500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting", vec![]),
                Diagnosis::ProviderUnavailable,
            ),
            (
                503,
                envelope(503, "UNAVAILABLE", "The model is overloaded. Please try again later.", vec![]),
                Diagnosis::ProviderUnavailable,
            ),
            (
                504,
                envelope(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.", vec![]),
                Diagnosis::ProviderUnavailable,
            ),
            (
                400,
                envelope(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n", vec![]),
                Diagnosis::BadRequest,
            ),
            (
                409,
                envelope(409, "ABORTED", "Aborted.", vec![]),
                Diagnosis::BadRequest,
            ),
        ];
        for (status, body, expected) in cases {
            let f = diagnose(Provider::Google, status, body.as_bytes());
            assert_eq!(f.diagnosis, expected, "{status} {body}");
            assert_eq!(f.status, Some(status));
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(f.message, v["error"]["message"].as_str().unwrap().trim());
        }
    }

    #[test]
    fn an_array_wrapped_error_is_read() {
        let body = format!("[{}]", envelope(503, "UNAVAILABLE", "The model is overloaded.", vec![]));
        let f = diagnose(Provider::Google, 503, body.as_bytes());
        assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable);
        assert_eq!(f.message, "The model is overloaded.");
    }

    #[test]
    fn google_actions() {
        assert_eq!(
            google_action("gemini-3.8-flash:generateContent", None),
            Ok(("gemini-3.8-flash", false))
        );
        assert_eq!(
            google_action("gemini-3.8-flash:streamGenerateContent", Some("alt=sse")),
            Ok(("gemini-3.8-flash", true))
        );
        assert!(google_action("gemini-3.8-flash:streamGenerateContent", None).is_err());
        assert!(matches!(
            google_action("gemini-3.8-flash:countTokens", None),
            Err(GoogleActionError::NotCarried(m)) if m.contains("generateContent")
        ));
        assert!(google_action("../x:generateContent", None).is_err());
        // A key in the URL is refused first, naming the header to use.
        for query in ["key=kw_x", "alt=sse&key=kw_x", "key"] {
            assert!(matches!(
                google_action("gemini-3.8-flash:streamGenerateContent", Some(query)),
                Err(GoogleActionError::Invalid(m)) if m.contains("x-goog-api-key")
            ));
        }
        assert!(google_action("gemini-3.8-flash:generateContent", Some("keys=1")).is_err());
    }
}
