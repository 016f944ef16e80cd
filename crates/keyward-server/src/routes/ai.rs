//! `POST /v1/accounts/{id}/ai/messages`: the product's own AI features call this. Plain
//! answers are JSON; `"stream": true` answers are server-sent events (`delta` events as the
//! provider's text arrives, then one `done`, or one `error`). The call itself is the
//! engine's ([`crate::engine::calls`]); this reads the body and writes the answer.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyward_core::{ErrorCode, Provider};
use keyward_providers::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{AiAnswerBody, ErrorBody, MessagesRequest, UsageCounts};
use crate::auth::AccountMemberClaim;
use crate::engine::calls::{merge_feature, CallSummary, ChatCall, ChatEvent, ChatReply};
use crate::engine::identity::ON_BEHALF_OF_HEADER;
use crate::error::{ApiError, ApiResult};
use crate::extract::{AiJsonBody, JsonBody};
use crate::routes::passthrough::FEATURE_HEADER;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesBody {
    provider: String,
    model: Option<String>,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: u32,
    temperature: Option<f32>,
    #[serde(default)]
    stream: bool,
    feature: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{account_id}/ai/messages",
    tag = "ai",
    params(
        ("account_id" = String, Path),
        ("keyward-feature" = Option<String>, Header, description = "The product feature (1 to 64 of A-Z a-z 0-9 _ - .), audited; must agree with the body's feature"),
        ("keyward-on-behalf-of" = Option<String>, Header, description = "Service tokens only: the member the call is for (a user id usr_… or the product's external user id), audited"),
    ),
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "The answer; with \"stream\": true a text/event-stream of delta events and one done (or error) event", body = AiAnswerBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "A service token without the ai:call scope", body = ErrorBody),
        (status = 404, description = "Not a member of this account; no such account (a service); an acting user who is not a member", body = ErrorBody),
        (status = 409, description = "Own key selected but none saved", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad body, unknown model", body = ErrorBody),
        (status = 429, description = "Shared-pool credits spent", body = ErrorBody),
        (status = 502, description = "The provider failed (its status and message)", body = ErrorBody),
        (status = 503, description = "No worker, no database, or no shared key for this provider", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn messages(
    State(state): State<AppState>,
    claim: AccountMemberClaim,
    headers: axum::http::HeaderMap,
    AiJsonBody(body): AiJsonBody,
) -> ApiResult<Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let context = CallHeaders {
        on_behalf_of: header(ON_BEHALF_OF_HEADER),
        feature: header(FEATURE_HEADER),
    };
    // Once a provider is called, the call must be settled and audited even if the client
    // goes away (which drops this handler): the work runs in its own task.
    tokio::spawn(messages_call(state, claim, context, body))
        .await
        .map_err(|e| ApiError::internal(&e))?
}

/// What a call's headers add: the member a service acts for, and the product feature.
struct CallHeaders {
    on_behalf_of: Option<String>,
    feature: Option<String>,
}

async fn messages_call(
    state: AppState,
    claim: AccountMemberClaim,
    context: CallHeaders,
    body: JsonBody,
) -> ApiResult<Response> {
    // The body names the provider; with it, the caller, their membership and the account's
    // key are one read. Errors keep their order: token, membership, then body.
    let parsed: ApiResult<MessagesBody> = body.parse();
    let provider = parsed.as_ref().ok().and_then(|b| b.provider.parse::<Provider>().ok());
    let (mut actor, prefetched_key) = match provider {
        Some(p) => {
            let (actor, key) = claim.check_with_key(&state, p).await?;
            (actor, Some(key))
        }
        None => (claim.check(&state).await?, None),
    };
    state
        .engine
        .act_for(&mut actor, context.on_behalf_of.as_deref())
        .await?;
    let body = parsed?;
    let feature = merge_feature(body.feature, context.feature)?;
    let provider: Provider = body
        .provider
        .parse()
        .map_err(|_| ApiError::validation("provider must be anthropic, openai or google"))?;
    let chat = ChatCall {
        provider,
        model: body.model,
        system: body.system,
        messages: body.messages,
        max_tokens: body.max_tokens,
        temperature: body.temperature,
        stream: body.stream,
        feature,
    };
    match state.engine.chat(&actor, prefetched_key, chat).await? {
        ChatReply::Answer { summary, content } => Ok(Json(answer_body(summary, content)).into_response()),
        ChatReply::Stream(events) => Ok(event_stream(events)),
    }
}

fn answer_body(s: CallSummary, content: String) -> AiAnswerBody {
    AiAnswerBody {
        id: s.id,
        provider: s.provider.as_str().to_owned(),
        model: s.model,
        key_source: s.key_source.as_str().to_owned(),
        content,
        stop_reason: s.stop_reason,
        usage: UsageCounts {
            input_tokens: s.usage.input_tokens,
            output_tokens: s.usage.output_tokens,
        },
        credits_charged: s.credits_charged,
    }
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// The engine's events as server-sent events, each sent on as it comes.
fn event_stream(events: mpsc::Receiver<ChatEvent>) -> Response {
    let body = Body::from_stream(futures_util::stream::unfold(events, |mut events| async move {
        let frame = match events.recv().await? {
            ChatEvent::Delta(text) => sse("delta", &json!({ "text": text })),
            ChatEvent::Done(s) => sse(
                "done",
                &json!({
                    "id": s.id,
                    "provider": s.provider,
                    "model": s.model,
                    "key_source": s.key_source,
                    "stop_reason": s.stop_reason,
                    "usage": { "input_tokens": s.usage.input_tokens, "output_tokens": s.usage.output_tokens },
                    "credits_charged": s.credits_charged,
                }),
            ),
            ChatEvent::Error(e) => sse("error", &error_event(&e)),
        };
        Some((Ok::<_, Infallible>(frame), events))
    }));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn error_event(e: &ApiError) -> Value {
    let mut v = json!({ "code": e.code.as_str(), "message": e.message });
    if e.code == ErrorCode::ProviderError {
        v["provider_status"] = json!(e.provider_status);
    }
    v
}
