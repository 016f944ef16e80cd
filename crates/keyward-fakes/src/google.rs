//! Fake Google Gemini: `POST /v1beta/models/{model}:generateContent`,
//! `:streamGenerateContent` (`?alt=sse` for SSE events ending in `\r\n\r\n`, else a streamed
//! JSON array) and `GET /v1beta/models`.
//!
//! Like the real API it wants `x-goog-api-key` (a `?key=` query counts as no key: 403
//! `PERMISSION_DENIED` "unregistered callers"), answers an unknown key with 400
//! `INVALID_ARGUMENT` + `google.rpc.ErrorInfo` `API_KEY_INVALID`, refuses unknown body
//! fields and query parameters, accepts only the roles `user` and `model`, and carries its id
//! in the body (`responseId`), not in a header.
//!
//! As Google does since September 2026, it refuses every standard key (`AIza…`) with the
//! same `API_KEY_INVALID` answer, registered or not: only auth keys (`AQ.…`) work. It sends
//! no rate-limit headers (Google never does).

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use keyward_core::Provider;
use serde_json::{json, Map, Value};

use crate::wire::{
    self, content_words, deliver, query_value, reply, sse_data_crlf, transport, Answer, Incoming, Refusal,
};
use crate::Behaviour;

const P: Provider = Provider::Google;
const JSON: &str = "application/json; charset=UTF-8";

const UNREGISTERED: &str = "Method doesn't allow unregistered callers (callers without established identity). \
Please use API Key or other form of API consumer identity to call this API.";
const KEY_NOT_VALID: &str = "API key not valid. Please pass a valid API key.";
const CREDITS_DEPLETED: &str = "Your prepayment credits are depleted. Please go to AI Studio at \
https://ai.studio/projects to manage your project and billing.";
const QUOTA: &str = "You exceeded your current quota, please check your plan and billing details. For more \
information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.";
const BODY_FIELDS: &[&str] = &[
    "contents",
    "systemInstruction",
    "system_instruction",
    "generationConfig",
    "generation_config",
    "safetySettings",
    "safety_settings",
    "tools",
    "toolConfig",
    "tool_config",
    "cachedContent",
    "cached_content",
];
const GENERATION_CONFIG_FIELDS: &[&str] = &[
    "maxOutputTokens",
    "max_output_tokens",
    "temperature",
    "topP",
    "top_p",
    "topK",
    "top_k",
    "candidateCount",
    "candidate_count",
    "stopSequences",
    "stop_sequences",
    "presencePenalty",
    "presence_penalty",
    "frequencyPenalty",
    "frequency_penalty",
    "seed",
    "responseMimeType",
    "response_mime_type",
    "responseSchema",
    "response_schema",
    "responseJsonSchema",
    "response_json_schema",
    "responseLogprobs",
    "response_logprobs",
    "logprobs",
    "responseModalities",
    "response_modalities",
    "thinkingConfig",
    "thinking_config",
    "speechConfig",
    "speech_config",
    "mediaResolution",
    "media_resolution",
];

fn error(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    let mut error = Map::new();
    error.insert("code".to_owned(), json!(code));
    error.insert("message".to_owned(), json!(message));
    error.insert("status".to_owned(), json!(status));
    if !details.is_empty() {
        error.insert("details".to_owned(), Value::Array(details));
    }
    let body = json!({ "error": error });
    let status_code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    wire::response(status_code, JSON, body.to_string().into())
}

fn error_info(reason: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com",
           "metadata": {"service": "generativelanguage.googleapis.com"}})
}

fn invalid_argument(message: &str) -> Response {
    error(400, "INVALID_ARGUMENT", message, Vec::new())
}

fn unknown_field(message: String) -> Response {
    let details = vec![json!({"@type": "type.googleapis.com/google.rpc.BadRequest",
                              "fieldViolations": [{"description": message}]})];
    error(400, "INVALID_ARGUMENT", &message, details)
}

/// Refuses query parameters the real API does not bind (`key` is bound, but never used as
/// a key here).
fn check_query(query: Option<&str>, allowed: &[&str]) -> Result<(), Refusal> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if !allowed.contains(&name) {
            return Err(unknown_field(format!(
                "Invalid JSON payload received. Unknown name \"{name}\": Cannot bind query parameter. \
                 Field '{name}' could not be found in request message."
            ))
            .into());
        }
    }
    Ok(())
}

fn authenticate<'a>(inc: &Incoming<'a>) -> Result<(&'a str, Behaviour), Refusal> {
    let key = inc
        .headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| error(403, "PERMISSION_DENIED", UNREGISTERED, Vec::new()))?;
    let not_valid = || {
        let localized = json!({"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                               "message": KEY_NOT_VALID});
        error(
            400,
            "INVALID_ARGUMENT",
            KEY_NOT_VALID,
            vec![error_info("API_KEY_INVALID"), localized],
        )
    };
    if key.starts_with("AIza") {
        // Standard keys are no longer accepted at all.
        return Err(not_valid().into());
    }
    let behaviour = inc.shared.behaviour(P, key).ok_or_else(not_valid)?;
    Ok((key, behaviour))
}

fn behaviour_error(behaviour: Behaviour, key: &str) -> Option<Response> {
    Some(match behaviour {
        Behaviour::NoCredit => error(429, "RESOURCE_EXHAUSTED", CREDITS_DEPLETED, Vec::new()),
        Behaviour::MissingPermission => error(
            403,
            "PERMISSION_DENIED",
            "The caller does not have permission",
            Vec::new(),
        ),
        Behaviour::RateLimited => {
            let details = vec![
                json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": "gemini-3.1-flash-lite"},
                    "quotaValue": "15"}]}),
                json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}),
                json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}),
            ];
            error(429, "RESOURCE_EXHAUSTED", QUOTA, details)
        }
        Behaviour::Unavailable => error(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            Vec::new(),
        ),
        Behaviour::EchoKey => error(
            400,
            "INVALID_ARGUMENT",
            &format!("API key not valid: {key}. Please pass a valid API key."),
            vec![error_info("API_KEY_INVALID")],
        ),
        Behaviour::Leaked => error(
            403,
            "PERMISSION_DENIED",
            "Your API key was reported as leaked. Please use another API key.",
            Vec::new(),
        ),
        Behaviour::Suspended => {
            // Google quotes the key here: the worker must mask it.
            let message = format!("Permission denied: Consumer 'api_key:{key}' has been suspended.");
            let info = json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CONSUMER_SUSPENDED",
                              "domain": "googleapis.com",
                              "metadata": {"consumer": "projects/895908428397", "service": "generativelanguage.googleapis.com",
                                           "containerInfo": format!("api_key:{key}")}});
            let localized =
                json!({"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message});
            error(403, "PERMISSION_DENIED", &message, vec![info, localized])
        }
        Behaviour::KeyTypeUnsupported => error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other \
             valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            vec![json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                         "metadata": {"method": "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent",
                                      "service": "generativelanguage.googleapis.com"}})],
        ),
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Sse,
    JsonArray,
}

/// `POST /{version}/models/{rest}` where `rest` is `{model}:{method}` and `version` is `v1`
/// (google-genai 3.x's default) or `v1beta`: the same API.
pub(crate) async fn generate(inc: &Incoming<'_>, rest: &str, version: &str) -> Response {
    let Some((model, method)) = rest.split_once(':') else {
        return error(404, "NOT_FOUND", "Method not found.", Vec::new());
    };
    let mode = match method {
        "generateContent" => Mode::Plain,
        "streamGenerateContent" if query_value(inc.query, "alt") == Some("sse") => Mode::Sse,
        "streamGenerateContent" => Mode::JsonArray,
        _ => return error(404, "NOT_FOUND", "Method not found.", Vec::new()),
    };
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    if let Err(r) = check_query(inc.query, &["alt", "key", "$alt"]) {
        return *r;
    }
    let req = match validate(inc, model, version) {
        Ok(req) => req,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key) {
        return r;
    }
    let answer = answer(&req, model, mode, inc.shared.next_id());
    deliver(inc.shared, answer, behaviour).await
}

/// `GET /v1beta/models`.
pub(crate) async fn list(inc: &Incoming<'_>) -> Response {
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    if let Err(r) = check_query(inc.query, &["pageSize", "pageToken", "key", "alt", "$alt"]) {
        return *r;
    }
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key) {
        return r;
    }
    // `pageSize` (default 50, at most 1000) and `pageToken` (the index of the next model,
    // opaque to clients), as the API pages its listing.
    let size = query_value(inc.query, "pageSize")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .map_or(50, |n| n.min(1000));
    let start = match query_value(inc.query, "pageToken") {
        None => 0,
        Some(t) => match t.strip_prefix("fake-page-").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return invalid_argument("Invalid page token."),
        },
    };
    let all = inc.shared.served_models(P);
    let models: Vec<Value> = all
        .iter()
        .skip(start)
        .take(size)
        .map(|m| {
            json!({"name": format!("models/{}", m.id), "version": "001", "displayName": m.name,
                   "description": format!("{} (keyward-fakes)", m.name),
                   "inputTokenLimit": 1_048_576, "outputTokenLimit": 65_536,
                   "supportedGenerationMethods": ["generateContent", "countTokens"],
                   "temperature": 1, "topP": 0.95, "topK": 64, "maxTemperature": 2, "thinking": true})
        })
        .collect();
    let mut body = json!({ "models": models });
    if start + size < all.len() {
        body["nextPageToken"] = json!(format!("fake-page-{}", start + size));
    }
    deliver(inc.shared, Answer::Plain(body.to_string().into_bytes()), behaviour).await
}

#[derive(Debug)]
struct GenerateRequest {
    max_tokens: u64,
    input_words: u64,
}

fn parts_words(content: &Value) -> u64 {
    content.get("parts").map_or(0, content_words)
}

fn validate(inc: &Incoming<'_>, model: &str, version: &str) -> Result<GenerateRequest, Refusal> {
    let v: Value = serde_json::from_slice(inc.body)
        .map_err(|_| invalid_argument("Invalid JSON payload received. Unexpected token."))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid_argument("Invalid JSON payload received. Expected an object."))?;
    if let Some(extra) = obj.keys().find(|k| !BODY_FIELDS.contains(&k.as_str())) {
        return Err(unknown_field(format!(
            "Invalid JSON payload received. Unknown name \"{extra}\": Cannot find field."
        ))
        .into());
    }
    let config = obj.get("generationConfig").or_else(|| obj.get("generation_config"));
    if let Some(config) = config.and_then(Value::as_object) {
        if let Some(extra) = config.keys().find(|k| !GENERATION_CONFIG_FIELDS.contains(&k.as_str())) {
            return Err(unknown_field(format!(
                "Invalid JSON payload received. Unknown name \"{extra}\" at 'generation_config': Cannot find field."
            ))
            .into());
        }
    }
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| invalid_argument("* GenerateContentRequest.contents: contents is not specified\n"))?;
    let mut input_words = 0;
    for content in contents {
        match content.get("role").and_then(Value::as_str) {
            None | Some("user" | "model") => {}
            Some(_) => return Err(invalid_argument("Please use a valid role: user, model.").into()),
        }
        input_words += parts_words(content);
    }
    if let Some(system) = obj.get("systemInstruction").or_else(|| obj.get("system_instruction")) {
        input_words += parts_words(system);
    }
    let max_tokens = config
        .and_then(|c| c.get("maxOutputTokens").or_else(|| c.get("max_output_tokens")))
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .unwrap_or(u64::MAX);
    if !inc.shared.knows_model(P, model) {
        return Err(error(
            404,
            "NOT_FOUND",
            &format!(
                "models/{model} is not found for API version {version}, or is not supported for generateContent. \
                 Call ListModels to see the list of available models and their supported methods."
            ),
            Vec::new(),
        )
        .into());
    }
    Ok(GenerateRequest {
        max_tokens,
        input_words,
    })
}

fn answer(req: &GenerateRequest, model: &str, mode: Mode, n: u64) -> Answer {
    let response_id = format!("FakeResp{n:016}");
    let (words, cut) = reply("google", req.max_tokens);
    let finish_reason = if cut { "MAX_TOKENS" } else { "STOP" };
    let output = u64::try_from(words.len()).unwrap_or(u64::MAX);
    let prompt = req.input_words;
    let full_usage = json!({
        "promptTokenCount": prompt, "candidatesTokenCount": output,
        "totalTokenCount": prompt.saturating_add(output),
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    });
    let chunk = |text: &str, last: bool| {
        let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        let usage = if last {
            if let Some(c) = candidate.as_object_mut() {
                c.insert("finishReason".to_owned(), json!(finish_reason));
            }
            full_usage.clone()
        } else {
            json!({"promptTokenCount": prompt, "totalTokenCount": prompt})
        };
        json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id})
    };
    match mode {
        Mode::Plain => Answer::Plain(chunk(&words.concat(), true).to_string().into_bytes()),
        Mode::Sse | Mode::JsonArray => {
            let values: Vec<Value> = if words.is_empty() {
                vec![chunk("", true)]
            } else {
                let last = words.len() - 1;
                words.iter().enumerate().map(|(i, w)| chunk(w, i == last)).collect()
            };
            if mode == Mode::Sse {
                Answer::Stream {
                    content_type: "text/event-stream",
                    chunks: values.iter().map(sse_data_crlf).collect(),
                    text_from: 0,
                }
            } else {
                let count = values.len();
                let chunks = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let open = if i == 0 { "[" } else { ",\r\n" };
                        let close = if i + 1 == count { "]" } else { "" };
                        Bytes::from(format!("{open}{v}{close}"))
                    })
                    .collect();
                Answer::Stream {
                    content_type: JSON,
                    chunks,
                    text_from: 0,
                }
            }
        }
    }
}
