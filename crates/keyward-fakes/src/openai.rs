//! Fake OpenAI: `POST /v1/chat/completions`, `POST /v1/responses` (plain and streamed),
//! `POST /v1/embeddings` and `GET /v1/models`.
//!
//! Like the real API it wants `Authorization: Bearer`, refuses unknown body fields
//! ("Unrecognized request argument supplied"), answers `{"error":{message,type,param,code}}`
//! envelopes, masks an unknown key in its error like the real one (first 8 characters, stars,
//! last 4), and sends `x-request-id` on every answer. Streams end with the `include_usage`
//! chunk (when asked) and `data: [DONE]`.

use axum::http::StatusCode;
use axum::response::Response;
use keyward_core::Provider;
use serde_json::{json, Map, Value};

use crate::wire::{
    self, content_words, count_words, deliver, reply, set_header, sse_data, transport, Answer, Incoming, Refusal,
};
use crate::Behaviour;

const P: Provider = Provider::OpenAi;
const CREATED: u64 = 1_735_689_600;
const FINGERPRINT: &str = "fp_fake0c0ffee";

const NO_KEY: &str = "You didn't provide an API key. You need to provide your API key in an Authorization \
header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) \
if you're accessing the API from your browser and are prompted for a username. You can obtain an API key from \
https://platform.openai.com/account/api-keys.";
const QUOTA: &str = "You exceeded your current quota, please check your plan and billing details. For more \
information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.";
const NO_PERMISSION: &str = "You have insufficient permissions for this operation. Missing scopes: model.request. \
Check that you have the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), \
and if you're using a restricted API key, that it has the necessary scopes.";
const NOT_JSON: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. \
If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)";
const BODY_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "service_tier",
    "store",
    "metadata",
    "reasoning_effort",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "safety_identifier",
    "prompt_cache_key",
    "verbosity",
];

fn error(status: StatusCode, message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Response {
    wire::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn invalid(message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error", param, code)
}

/// The real API's masking of a rejected key: first 8 characters, stars, last 4.
fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let n = chars.len();
    if n <= 12 {
        return "*".repeat(n);
    }
    let head: String = chars.iter().take(8).collect();
    let tail: String = chars.iter().skip(n - 4).collect();
    format!("{head}{}{tail}", "*".repeat(n - 12))
}

fn with_request_id(inc: &Incoming<'_>, mut r: Response) -> Response {
    let id = format!("req_{:032x}", u128::from(inc.shared.next_id()) * 0x9e37_79b9_7f4a_7c15);
    set_header(&mut r, "x-request-id", &id);
    set_header(&mut r, "openai-version", "2020-10-01");
    r
}

/// `x-ratelimit-*` on an answer to a known key, as the API sends them
/// (<https://developers.openai.com/api/docs/guides/rate-limits>): limits, what remains and
/// resets as durations (`1s`, `6m0s`).
fn with_rate_limits(inc: &Incoming<'_>, mut r: Response) -> Response {
    let known = bearer(inc).is_some_and(|k| inc.shared.behaviour(P, k).is_some());
    if known && !r.status().is_redirection() {
        let used = inc.shared.next_id() % 5000;
        for (name, value) in [
            ("x-ratelimit-limit-requests", "5000".to_owned()),
            ("x-ratelimit-remaining-requests", (4999 - used).to_string()),
            ("x-ratelimit-reset-requests", "12ms".to_owned()),
            ("x-ratelimit-limit-tokens", "4000000".to_owned()),
            ("x-ratelimit-remaining-tokens", "3999986".to_owned()),
            ("x-ratelimit-reset-tokens", "0s".to_owned()),
        ] {
            set_header(&mut r, name, &value);
        }
    }
    r
}

fn bearer<'a>(inc: &Incoming<'a>) -> Option<&'a str> {
    inc.headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

pub(crate) async fn chat(inc: &Incoming<'_>) -> Response {
    let r = chat_inner(inc).await;
    with_request_id(inc, with_rate_limits(inc, r))
}

/// `POST /v1/responses`.
pub(crate) async fn responses(inc: &Incoming<'_>) -> Response {
    let r = responses_inner(inc).await;
    with_request_id(inc, with_rate_limits(inc, r))
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(inc: &Incoming<'_>) -> Response {
    let r = embeddings_inner(inc).await;
    with_request_id(inc, with_rate_limits(inc, r))
}

pub(crate) async fn models(inc: &Incoming<'_>) -> Response {
    let r = models_inner(inc).await;
    with_request_id(inc, r)
}

async fn chat_inner(inc: &Incoming<'_>) -> Response {
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let req = match validate(inc) {
        Ok(req) => req,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, &req.model) {
        return r;
    }
    let answer = answer(&req, inc.shared.next_id());
    deliver(inc.shared, answer, behaviour).await
}

async fn models_inner(inc: &Incoming<'_>) -> Response {
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, "gpt-4o-mini") {
        return r;
    }
    let data: Vec<Value> = inc
        .shared
        .served_models(P)
        .iter()
        .map(
            |m| json!({"id": m.id, "object": "model", "created": CREATED, "owned_by": "system", "shutdown_date": null}),
        )
        .collect();
    let body = json!({"object": "list", "data": data});
    deliver(inc.shared, Answer::Plain(body.to_string().into_bytes()), behaviour).await
}

fn authenticate<'a>(inc: &Incoming<'a>) -> Result<(&'a str, Behaviour), Refusal> {
    let key =
        bearer(inc).ok_or_else(|| error(StatusCode::UNAUTHORIZED, NO_KEY, "invalid_request_error", None, None))?;
    let behaviour = inc.shared.behaviour(P, key).ok_or_else(|| {
        let message = format!(
            "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
            mask(key)
        );
        error(StatusCode::UNAUTHORIZED, &message, "invalid_request_error", None, Some("invalid_api_key"))
    })?;
    Ok((key, behaviour))
}

fn behaviour_error(behaviour: Behaviour, key: &str, model: &str) -> Option<Response> {
    Some(match behaviour {
        Behaviour::NoCredit => error(
            StatusCode::TOO_MANY_REQUESTS,
            QUOTA,
            "insufficient_quota",
            None,
            Some("insufficient_quota"),
        ),
        // OpenAI answers a restricted key's missing scopes with 401, not 403.
        Behaviour::MissingPermission | Behaviour::Suspended => error(
            StatusCode::UNAUTHORIZED,
            NO_PERMISSION,
            "invalid_request_error",
            None,
            None,
        ),
        // OpenAI revokes a leaked key: from then on it is just an invalid key.
        Behaviour::Leaked | Behaviour::KeyTypeUnsupported => {
            let message = format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                mask(key)
            );
            error(
                StatusCode::UNAUTHORIZED,
                &message,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )
        }
        Behaviour::RateLimited => {
            let message = format!(
                "Rate limit reached for {model} in organization org-FakeFakeFakeFake on requests per min (RPM): \
                 Limit 3, Used 3, Requested 1. Please try again in 20s. Visit \
                 https://platform.openai.com/account/rate-limits to learn more."
            );
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                "requests",
                None,
                Some("rate_limit_exceeded"),
            );
            set_header(&mut r, "retry-after", "20");
            r
        }
        Behaviour::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
            None,
        ),
        Behaviour::EchoKey => {
            let message = format!(
                "Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys."
            );
            error(
                StatusCode::UNAUTHORIZED,
                &message,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )
        }
        _ => return None,
    })
}

#[derive(Debug)]
struct ChatRequest {
    model: String,
    max_tokens: u64,
    stream: bool,
    include_usage: bool,
    input_words: u64,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn positive_limit(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, Refusal> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Box::new(invalid(
                &format!("Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {v} instead."),
                Some(name),
                Some("integer_below_min_value"),
            ))),
        },
    }
}

fn validate(inc: &Incoming<'_>) -> Result<ChatRequest, Refusal> {
    let v: Value = serde_json::from_slice(inc.body).map_err(|_| invalid(NOT_JSON, None, None))?;
    let obj = v.as_object().ok_or_else(|| invalid(NOT_JSON, None, None))?;
    if let Some(extra) = obj.keys().find(|k| !BODY_FIELDS.contains(&k.as_str())) {
        return Err(invalid(&format!("Unrecognized request argument supplied: {extra}"), None, None).into());
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("you must provide a model parameter", None, None))?;
    let messages = match obj.get("messages") {
        None => {
            return Err(invalid(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                Some("missing_required_parameter"),
            )
            .into())
        }
        Some(m) => m.as_array().ok_or_else(|| {
            invalid(
                &format!(
                    "Invalid type for 'messages': expected an array, but got {} instead.",
                    type_name(m)
                ),
                Some("messages"),
                Some("invalid_type"),
            )
        })?,
    };
    if messages.is_empty() {
        return Err(invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            Some("messages"),
            Some("empty_array"),
        )
        .into());
    }
    let mut input_words = 0;
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer" | "user" | "assistant" | "tool" | "function") => {}
            Some(other) => {
                return Err(invalid(
                    &format!(
                        "Invalid value: '{other}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
                    ),
                    Some(&format!("messages[{i}].role")),
                    Some("invalid_value"),
                ).into())
            }
            None => {
                return Err(invalid(
                    &format!("Missing required parameter: 'messages[{i}].role'."),
                    Some(&format!("messages[{i}].role")),
                    Some("missing_required_parameter"),
                ).into())
            }
        }
        input_words += m.get("content").map_or(0, content_words);
    }
    let max_tokens = positive_limit(obj, "max_completion_tokens")?
        .or(positive_limit(obj, "max_tokens")?)
        .unwrap_or(u64::MAX);
    if let Some(t) = obj.get("temperature").filter(|t| !t.is_null()) {
        match t.as_f64() {
            Some(x) if x > 2.0 => {
                return Err(invalid(
                    &format!(
                    "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got {x} instead."
                ),
                    Some("temperature"),
                    Some("decimal_above_max_value"),
                )
                .into())
            }
            Some(x) if x < 0.0 => {
                return Err(invalid(
                    &format!(
                    "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got {x} instead."
                ),
                    Some("temperature"),
                    Some("decimal_below_min_value"),
                )
                .into())
            }
            Some(_) => {}
            None => {
                return Err(invalid(
                    &format!(
                        "Invalid type for 'temperature': expected a decimal, but got {} instead.",
                        type_name(t)
                    ),
                    Some("temperature"),
                    Some("invalid_type"),
                )
                .into())
            }
        }
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let stream_options = obj.get("stream_options").filter(|o| !o.is_null());
    if stream_options.is_some() && !stream {
        return Err(invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
            None,
        )
        .into());
    }
    if !inc.shared.knows_model(P, model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        )
        .into());
    }
    Ok(ChatRequest {
        model: model.to_owned(),
        max_tokens,
        stream,
        include_usage: stream_options
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        input_words,
    })
}

fn answer(req: &ChatRequest, n: u64) -> Answer {
    let id = format!("chatcmpl-Fake{n:020}");
    let (words, cut) = reply("openai", req.max_tokens);
    let finish_reason = if cut { "length" } else { "stop" };
    let output = u64::try_from(words.len()).unwrap_or(u64::MAX);
    let usage = json!({
        "prompt_tokens": req.input_words, "completion_tokens": output,
        "total_tokens": req.input_words.saturating_add(output),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    });
    if !req.stream {
        let body = json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": req.model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": words.concat(), "refusal": null, "annotations": []},
                         "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage, "service_tier": "default", "system_fingerprint": FINGERPRINT,
        });
        return Answer::Plain(body.to_string().into_bytes());
    }
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": CREATED, "model": req.model,
                           "service_tier": "default", "system_fingerprint": FINGERPRINT, "choices": choices});
        if req.include_usage {
            if let Some(obj) = c.as_object_mut() {
                obj.insert("usage".to_owned(), usage.cloned().unwrap_or(Value::Null));
            }
        }
        sse_data(&c.to_string())
    };
    let mut chunks = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
                "logprobs": null, "finish_reason": null}]),
        None,
    )];
    for word in &words {
        chunks.push(chunk(
            json!([{"index": 0, "delta": {"content": word}, "logprobs": null, "finish_reason": null}]),
            None,
        ));
    }
    chunks.push(chunk(
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason}]),
        None,
    ));
    if req.include_usage {
        chunks.push(chunk(json!([]), Some(&usage)));
    }
    chunks.push(sse_data("[DONE]"));
    Answer::Stream {
        content_type: "text/event-stream; charset=utf-8",
        chunks,
        // After the role chunk.
        text_from: 1,
    }
}

/// The fields `POST /v1/responses` takes
/// (<https://developers.openai.com/api/reference/resources/responses>).
const RESPONSE_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "stream",
    "stream_options",
    "store",
    "temperature",
    "top_p",
    "reasoning",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "metadata",
    "previous_response_id",
    "conversation",
    "include",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "background",
    "prompt",
];

#[derive(Debug)]
struct ResponseRequest {
    model: String,
    max_tokens: u64,
    stream: bool,
    input_words: u64,
}

fn validate_response(inc: &Incoming<'_>) -> Result<ResponseRequest, Refusal> {
    let v: Value = serde_json::from_slice(inc.body).map_err(|_| invalid(NOT_JSON, None, None))?;
    let obj = v.as_object().ok_or_else(|| invalid(NOT_JSON, None, None))?;
    if let Some(extra) = obj.keys().find(|k| !RESPONSE_FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            &format!("Unknown parameter: '{extra}'."),
            Some(extra),
            Some("unknown_parameter"),
        )
        .into());
    }
    let model = obj.get("model").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            "Missing required parameter: 'model'.",
            Some("model"),
            Some("missing_required_parameter"),
        )
    })?;
    let mut input_words = obj.get("instructions").map_or(0, content_words);
    match obj.get("input") {
        None => {}
        Some(Value::String(text)) => input_words += count_words(text),
        Some(Value::Array(items)) => {
            for item in items {
                input_words += item.get("content").map_or(0, content_words);
            }
        }
        Some(other) => {
            return Err(invalid(
                &format!(
                    "Invalid type for 'input': expected a string or an array, but got {} instead.",
                    type_name(other)
                ),
                Some("input"),
                Some("invalid_type"),
            )
            .into())
        }
    }
    // The Responses API wants at least 16 output tokens.
    let max_tokens = match obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        None => u64::MAX,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 16 => n,
            _ => {
                return Err(invalid(
                    &format!("Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but got {v} instead."),
                    Some("max_output_tokens"),
                    Some("integer_below_min_value"),
                )
                .into())
            }
        },
    };
    if !inc.shared.knows_model(P, model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        )
        .into());
    }
    Ok(ResponseRequest {
        model: model.to_owned(),
        max_tokens,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        input_words,
    })
}

async fn responses_inner(inc: &Incoming<'_>) -> Response {
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let req = match validate_response(inc) {
        Ok(req) => req,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, &req.model) {
        return r;
    }
    let answer = response_answer(&req, inc.shared.next_id());
    deliver(inc.shared, answer, behaviour).await
}

/// A Responses API answer: one `message` output item with the canned text; streamed as
/// `response.created` … `response.output_text.delta`* … `response.completed` (no `[DONE]`).
fn response_answer(req: &ResponseRequest, n: u64) -> Answer {
    let id = format!("resp_fake{n:024}");
    let item_id = format!("msg_fake{n:024}");
    let (words, cut) = reply("openai", req.max_tokens);
    let output = u64::try_from(words.len()).unwrap_or(u64::MAX);
    let text = words.concat();
    let (status, incomplete) = if cut {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let usage = json!({"input_tokens": req.input_words, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": req.input_words.saturating_add(output)});
    let message = |text: &str, done: bool| {
        json!({"type": "message", "id": item_id, "status": if done { "completed" } else { "in_progress" },
               "role": "assistant", "content": if done { json!([{"type": "output_text", "text": text, "annotations": []}]) } else { json!([]) }})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": CREATED, "status": status, "model": req.model,
               "output": output, "incomplete_details": if status == "incomplete" { incomplete.clone() } else { Value::Null },
               "error": null, "usage": usage})
    };
    if !req.stream {
        let body = response(status, json!([message(&text, true)]), usage);
        return Answer::Plain(body.to_string().into_bytes());
    }
    let mut seq = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        if let Some(o) = data.as_object_mut() {
            o.insert("type".to_owned(), json!(kind));
            o.insert("sequence_number".to_owned(), json!(seq));
        }
        seq += 1;
        wire::sse_event(kind, &data)
    };
    let mut chunks = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": message("", false)}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for w in &words {
        chunks.push(event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": w, "logprobs": []}),
        ));
    }
    chunks.push(event(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    chunks.push(event(
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    chunks.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": message(&text, true)}),
    ));
    let end = if cut {
        "response.incomplete"
    } else {
        "response.completed"
    };
    chunks.push(event(
        end,
        json!({"response": response(status, json!([message(&text, true)]), usage)}),
    ));
    Answer::Stream {
        content_type: "text/event-stream; charset=utf-8",
        chunks,
        // After created, in_progress, output_item.added and content_part.added.
        text_from: 4,
    }
}

/// The fields `POST /v1/embeddings` takes.
const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

async fn embeddings_inner(inc: &Incoming<'_>) -> Response {
    let (key, behaviour) = match authenticate(inc) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let v: Value = match serde_json::from_slice(inc.body) {
        Ok(v) => v,
        Err(_) => return invalid(NOT_JSON, None, None),
    };
    let Some(obj) = v.as_object() else {
        return invalid(NOT_JSON, None, None);
    };
    if let Some(extra) = obj.keys().find(|k| !EMBEDDING_FIELDS.contains(&k.as_str())) {
        return invalid(&format!("Unrecognized request argument supplied: {extra}"), None, None);
    }
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return invalid("you must provide a model parameter", None, None);
    };
    let inputs: Vec<String> =
        match obj.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
                items.iter().filter_map(Value::as_str).map(str::to_owned).collect()
            }
            _ => return invalid(
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
                None,
                None,
            ),
        };
    if !inc.shared.knows_model(P, model) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        );
    }
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, model) {
        return r;
    }
    let dims = obj.get("dimensions").and_then(Value::as_u64).map_or(8, |d| d.min(64));
    let base64 = obj.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut words = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            words += count_words(text);
            // A deterministic vector: the fake's embeddings mean nothing.
            let vector: Vec<f32> = (0..dims).map(|d| ((i as u64 + d) % 7) as f32 / 7.0).collect();
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": words, "total_tokens": words}});
    deliver(inc.shared, Answer::Plain(body.to_string().into_bytes()), behaviour).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_like_the_real_api() {
        assert_eq!(mask("sk-proj-abcdefghijklmnopWXYZ"), "sk-proj-****************WXYZ");
        assert_eq!(mask("short"), "*****");
    }
}
