//! Fake Anthropic: `POST /v1/messages`, `POST /v1/messages/count_tokens` and `GET /v1/models`.
//!
//! Like the real API it wants `x-api-key` and `anthropic-version`, refuses unknown body fields
//! ("…: Extra inputs are not permitted"), answers `{"type":"error","error":{…},"request_id"}`
//! envelopes, and sends `request-id: req_…` on every answer.

use axum::http::StatusCode;
use axum::response::Response;
use keyward_core::Provider;
use serde_json::{json, Value};

use crate::wire::{
    self, content_words, deliver, query_value, reply, rfc3339_in, set_header, sse_event, transport, Answer, Incoming,
    Refusal,
};
use crate::Behaviour;

const P: Provider = Provider::Anthropic;

const CREDIT_TOO_LOW: &str = "Your credit balance is too low to access the Anthropic API. \
Please go to Plans & Billing to upgrade or purchase credits.";
const RATE_LIMITED: &str = "Number of request tokens has exceeded your per-minute rate limit \
(https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage. \
Please reduce the prompt length or the maximum tokens requested, or try again later.";
const BODY_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "temperature",
    "stream",
    "stop_sequences",
    "top_p",
    "top_k",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
];

fn error(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response {
    wire::json(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}),
    )
}

fn bad_request(message: &str, request_id: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message, request_id)
}

fn new_request_id(inc: &Incoming<'_>) -> String {
    format!("req_011CFake{:014}", inc.shared.next_id())
}

pub(crate) async fn messages(inc: &Incoming<'_>) -> Response {
    let request_id = new_request_id(inc);
    let mut r = messages_inner(inc, &request_id).await;
    set_header(&mut r, "request-id", &request_id);
    rate_limit_headers(inc, &mut r);
    r
}

/// `POST /v1/messages/count_tokens`: the Messages body without `max_tokens`, answered
/// `{"input_tokens": N}` (free; its own rate limit, so no rate-limit headers here).
pub(crate) async fn count_tokens(inc: &Incoming<'_>) -> Response {
    let request_id = new_request_id(inc);
    let mut r = count_tokens_inner(inc, &request_id).await;
    set_header(&mut r, "request-id", &request_id);
    r
}

async fn count_tokens_inner(inc: &Incoming<'_>, request_id: &str) -> Response {
    let (key, behaviour) = match authenticate(inc, request_id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let req = match validate_body(inc, request_id, COUNT_FIELDS, false) {
        Ok(req) => req,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    // Token counting answers even when the balance is empty; the key's own failures hold.
    if behaviour != Behaviour::NoCredit {
        if let Some(r) = behaviour_error(behaviour, key, request_id) {
            return r;
        }
    }
    let body = json!({ "input_tokens": req.input_words });
    deliver(inc.shared, Answer::Plain(body.to_string().into_bytes()), behaviour).await
}

pub(crate) async fn models(inc: &Incoming<'_>) -> Response {
    let request_id = new_request_id(inc);
    let mut r = models_inner(inc, &request_id).await;
    set_header(&mut r, "request-id", &request_id);
    r
}

/// `anthropic-ratelimit-*` on an answer to a known key, as the API sends them
/// (<https://platform.claude.com/docs/en/api/rate-limits>): limits, what remains (tokens
/// rounded to the thousand) and RFC 3339 resets.
fn rate_limit_headers(inc: &Incoming<'_>, r: &mut Response) {
    let known = inc
        .header("x-api-key")
        .is_some_and(|k| inc.shared.behaviour(P, k).is_some());
    if !known || r.status().is_redirection() {
        return;
    }
    let used = inc.shared.next_id() % 4000;
    let reset = rfc3339_in(60);
    for (name, value) in [
        ("anthropic-ratelimit-requests-limit", "4000".to_owned()),
        ("anthropic-ratelimit-requests-remaining", (3999 - used).to_string()),
        ("anthropic-ratelimit-requests-reset", reset.clone()),
        ("anthropic-ratelimit-input-tokens-limit", "2000000".to_owned()),
        ("anthropic-ratelimit-input-tokens-remaining", "2000000".to_owned()),
        ("anthropic-ratelimit-input-tokens-reset", reset.clone()),
        ("anthropic-ratelimit-output-tokens-limit", "400000".to_owned()),
        ("anthropic-ratelimit-output-tokens-remaining", "400000".to_owned()),
        ("anthropic-ratelimit-output-tokens-reset", reset.clone()),
        ("anthropic-ratelimit-tokens-limit", "2400000".to_owned()),
        ("anthropic-ratelimit-tokens-remaining", "2400000".to_owned()),
        ("anthropic-ratelimit-tokens-reset", reset),
    ] {
        set_header(r, name, &value);
    }
}

async fn messages_inner(inc: &Incoming<'_>, request_id: &str) -> Response {
    let (key, behaviour) = match authenticate(inc, request_id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let req = match validate(inc, request_id) {
        Ok(req) => req,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, request_id) {
        return r;
    }
    let answer = answer(&req, inc.shared.next_id());
    deliver(inc.shared, answer, behaviour).await
}

async fn models_inner(inc: &Incoming<'_>, request_id: &str) -> Response {
    let (key, behaviour) = match authenticate(inc, request_id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    if let Some(r) = transport(inc.shared, behaviour).await {
        return r;
    }
    if let Some(r) = behaviour_error(behaviour, key, request_id) {
        return r;
    }
    // `limit` 1–1000 (default 20) and the `after_id` cursor, as the API pages its listing.
    let limit = match query_value(inc.query, "limit") {
        None => 20,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return bad_request("limit: Input should be less than or equal to 1000", request_id),
        },
    };
    let all = inc.shared.served_models(P);
    let start = match query_value(inc.query, "after_id") {
        None => 0,
        Some(after) => match all.iter().position(|m| m.id == after) {
            Some(i) => i + 1,
            None => return bad_request(&format!("after_id: model {after} not found"), request_id),
        },
    };
    let page: Vec<_> = all.iter().skip(start).take(limit).collect();
    let data: Vec<Value> = page
        .iter()
        .map(|m| {
            json!({"type": "model", "id": m.id, "display_name": m.name, "created_at": "2026-10-07T00:00:00Z",
                   "max_input_tokens": 1_000_000, "max_tokens": 128_000})
        })
        .collect();
    let body = json!({
        "data": data,
        "has_more": start + page.len() < all.len(),
        "first_id": page.first().map(|m| m.id.as_str()),
        "last_id": page.last().map(|m| m.id.as_str()),
    });
    deliver(inc.shared, Answer::Plain(body.to_string().into_bytes()), behaviour).await
}

fn authenticate<'a>(inc: &Incoming<'a>, request_id: &str) -> Result<(&'a str, Behaviour), Refusal> {
    let unauthorized = |message: &str| error(StatusCode::UNAUTHORIZED, "authentication_error", message, request_id);
    let key = inc
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| unauthorized("x-api-key header is required"))?;
    let behaviour = inc
        .shared
        .behaviour(P, key)
        .ok_or_else(|| unauthorized("invalid x-api-key"))?;
    Ok((key, behaviour))
}

fn behaviour_error(behaviour: Behaviour, key: &str, request_id: &str) -> Option<Response> {
    Some(match behaviour {
        Behaviour::NoCredit => bad_request(CREDIT_TOO_LOW, request_id),
        Behaviour::MissingPermission => error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
            request_id,
        ),
        Behaviour::RateLimited => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                RATE_LIMITED,
                request_id,
            );
            set_header(&mut r, "retry-after", "20");
            r
        }
        Behaviour::Unavailable => error(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
            request_id,
        ),
        Behaviour::EchoKey => error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            &format!("invalid x-api-key: {key}"),
            request_id,
        ),
        // Anthropic revokes a leaked key: from then on it is just an invalid key.
        Behaviour::Leaked | Behaviour::KeyTypeUnsupported => error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
            request_id,
        ),
        Behaviour::Suspended => error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "This organization has been disabled.",
            request_id,
        ),
        _ => return None,
    })
}

#[derive(Debug)]
struct MessagesRequest {
    model: String,
    max_tokens: u64,
    stream: bool,
    input_words: u64,
}

fn validate(inc: &Incoming<'_>, request_id: &str) -> Result<MessagesRequest, Refusal> {
    validate_body(inc, request_id, BODY_FIELDS, true)
}

/// The fields of a token count: the Messages body less `max_tokens`, `stream` and sampling.
const COUNT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "mcp_servers",
];

fn validate_body(
    inc: &Incoming<'_>,
    request_id: &str,
    fields: &[&str],
    needs_max_tokens: bool,
) -> Result<MessagesRequest, Refusal> {
    let bad = |message: &str| bad_request(message, request_id);
    if inc.header("anthropic-version").is_none() {
        return Err(bad("anthropic-version: header is required").into());
    }
    let v: Value = serde_json::from_slice(inc.body)
        .map_err(|_| bad("There was an issue with the formatting of your request: the body is not valid JSON."))?;
    let obj = v.as_object().ok_or_else(|| bad("Input should be a valid dictionary"))?;
    if let Some(extra) = obj.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(bad(&format!("{extra}: Extra inputs are not permitted")).into());
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model: Field required"))?;
    let max_tokens = match (obj.get("max_tokens"), needs_max_tokens) {
        (None, true) => return Err(bad("max_tokens: Field required").into()),
        (None, false) => 0,
        (Some(n), _) => n
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad("max_tokens: Input should be greater than or equal to 1"))?,
    };
    let messages = match obj.get("messages") {
        None => return Err(bad("messages: Field required").into()),
        Some(m) => m
            .as_array()
            .ok_or_else(|| bad("messages: Input should be a valid list"))?,
    };
    if messages.is_empty() {
        return Err(bad("messages: at least one message is required").into());
    }
    let mut input_words = 0;
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => return Err(bad(&format!("messages.{i}.role: Input should be 'user' or 'assistant'")).into()),
        }
        let content = m
            .get("content")
            .ok_or_else(|| bad(&format!("messages.{i}.content: Field required")))?;
        input_words += content_words(content);
    }
    if let Some(system) = obj.get("system") {
        input_words += content_words(system);
    }
    if let Some(t) = obj.get("temperature") {
        if !t.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)) {
            return Err(bad("temperature: Input should be less than or equal to 1").into());
        }
    }
    if !inc.shared.knows_model(P, model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("model: {model}"),
            request_id,
        )
        .into());
    }
    Ok(MessagesRequest {
        model: model.to_owned(),
        max_tokens,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        input_words,
    })
}

fn answer(req: &MessagesRequest, n: u64) -> Answer {
    let id = format!("msg_01Fake{n:018}");
    let (words, cut) = reply("anthropic", req.max_tokens);
    let stop_reason = if cut { "max_tokens" } else { "end_turn" };
    let output = u64::try_from(words.len()).unwrap_or(u64::MAX);
    let usage = |output: u64| {
        json!({"input_tokens": req.input_words, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
               "output_tokens": output, "service_tier": "standard"})
    };
    if !req.stream {
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": req.model,
            "content": [{"type": "text", "text": words.concat()}],
            "stop_reason": stop_reason, "stop_sequence": null, "usage": usage(output),
        });
        return Answer::Plain(body.to_string().into_bytes());
    }
    let mut chunks = vec![
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": req.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(1)}}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse_event("ping", &json!({"type": "ping"})),
    ];
    for word in &words {
        chunks.push(sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    chunks.push(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    chunks.push(sse_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": output}}),
    ));
    chunks.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    Answer::Stream {
        content_type: "text/event-stream; charset=utf-8",
        chunks,
        // After message_start, content_block_start and ping.
        text_from: 3,
    }
}
