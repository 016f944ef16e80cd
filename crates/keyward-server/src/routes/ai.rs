//! `POST /v1/accounts/{id}/ai/messages`: the product's own AI features call this.
//! Plain answers are JSON; `"stream": true` answers are server-sent events (`delta`
//! events as the provider's text arrives, then one `done`, or one `error`).

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyward_core::{AccountId, Catalogue, ErrorCode, KeyId, KeySource, ModelEntry, ModelKind, ModelRefusal, Provider};
use keyward_providers::{
    build_chat, parse_chat, ChatMessage, ChatRequest, Diagnosis, ProviderFailure, StreamDecoder, StreamEvent, Usage,
};
use keyward_store::{AuditAction, CallRecord, NewAuditEvent};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::ai::{choose_key, open_and_call, period_of, CallFailure, KeyChoice};
use crate::api::{AiAnswerBody, ErrorBody, MessagesRequest, UsageCounts};
use crate::app::AppState;
use crate::auth::{AccountMember, AccountMemberClaim, Caller};
use crate::error::{ApiError, ApiResult};
use crate::extract::{AiJsonBody, JsonBody};

/// Largest plain answer read from a provider.
pub const MAX_ANSWER: usize = 8 * 1024 * 1024;
const MAX_MESSAGES: usize = 200;
const MAX_OUTPUT_TOKENS: u32 = 32_768;

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

/// Everything needed to settle and audit a call once it ends.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub account: AccountId,
    pub actor: String,
    pub provider: Provider,
    pub model: ModelEntry,
    pub choice: KeyChoice,
    pub period: String,
    pub reserved: i64,
    pub feature: Option<String>,
    pub started: std::time::Instant,
    /// Whether the provider bills the call (token counting is free: audited, never charged).
    pub billed: bool,
}

impl CallContext {
    /// Credits this call costs the shared pool: never more than was reserved.
    pub fn charge(&self, usage: Usage) -> i64 {
        match self.choice.source {
            KeySource::Own => 0,
            KeySource::Shared if !self.billed => 0,
            KeySource::Shared => i64::try_from(self.model.credits_for(usage.input_tokens, usage.output_tokens))
                .unwrap_or(i64::MAX)
                .min(self.reserved),
        }
    }

    /// Settles credits and appends `ai.request`, durably, before the answer is released.
    pub async fn settle(
        &self,
        state: &AppState,
        outcome: &str,
        usage: Usage,
        request_id: Option<String>,
        detail: Option<String>,
    ) -> ApiResult<i64> {
        // A failed call carries no usage, so it is charged nothing.
        let charged = self.charge(usage);
        let mut audit = NewAuditEvent::key_action(
            &self.account,
            state.clock.now(),
            &self.actor,
            AuditAction::AiRequest,
            self.provider,
            (self.choice.source == KeySource::Own).then_some(&self.choice.key.last4),
            detail,
        );
        audit.key_source = Some(self.choice.source);
        audit.model = Some(self.model.id.clone());
        audit.outcome = outcome.to_owned();
        audit.provider_request_id = request_id;
        audit.input_tokens = Some(i64::try_from(usage.input_tokens).unwrap_or(i64::MAX));
        audit.output_tokens = Some(i64::try_from(usage.output_tokens).unwrap_or(i64::MAX));
        audit.feature = self.feature.clone();
        let record = CallRecord {
            account_id: self.account.clone(),
            period: self.period.clone(),
            provider: self.provider,
            source: self.choice.source,
            reserved: self.reserved,
            charged,
            input_tokens: audit.input_tokens.unwrap_or(0),
            output_tokens: audit.output_tokens.unwrap_or(0),
            audit,
        };
        state.metrics.record_ai_call(self.provider, self.choice.source, outcome);
        state
            .metrics
            .observe_ai_latency(self.provider, self.choice.source, self.started.elapsed().as_secs_f64());
        if let Err(e) = state.ledger.commit(record).await {
            tracing::error!(error = %e, "could not record an AI call");
            // Give the reservation back (best effort): an unrecorded call must not keep
            // the month's credits tied up.
            if self.reserved > 0 {
                if let Err(e) = state
                    .store
                    .release_credits(&self.account, &self.period, self.reserved)
                    .await
                {
                    tracing::error!(error = %e, "could not release a reservation");
                }
            }
            return Err(ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the call could not be recorded; it is not answered",
            ));
        }
        Ok(charged)
    }
}

fn validation(m: &str) -> ApiError {
    ApiError::validation(m.to_owned())
}

/// Checks the body and reserves shared credits: the part every AI route shares.
/// What a call asks for, as far as metering needs to know.
#[derive(Debug, Clone)]
pub struct CallSpec<'a> {
    pub provider: Provider,
    /// `None`: the provider's first catalogued model.
    pub model: Option<&'a str>,
    /// The request's size: an upper bound on its input tokens.
    pub input_bytes: usize,
    /// The output bound (0 for APIs without output: embeddings, token counting).
    pub max_tokens: u32,
    /// The kind of model the route takes.
    pub kind: ModelKind,
    /// Whether the provider bills it: only billed calls reserve shared credits.
    pub billed: bool,
    pub feature: Option<String>,
    /// The account's source and key for `provider`, when the route already read them
    /// (alongside the caller's membership); `None`: read them here.
    pub prefetched_key: Option<keyward_store::CallKey>,
}

/// `acct` is the caller's account as read with their membership: its plan and limit are
/// used as they are, not read again.
pub async fn prepare(
    state: &AppState,
    caller: &Caller,
    acct: &keyward_store::Account,
    spec: CallSpec<'_>,
) -> ApiResult<CallContext> {
    let account = &acct.id;
    let CallSpec {
        provider,
        model,
        input_bytes,
        max_tokens,
        kind,
        billed,
        feature,
        prefetched_key,
    } = spec;
    let model = match model {
        Some(id) => resolve_model(&state.catalogue, provider, id, kind)?.clone(),
        None => state
            .catalogue
            .default_model(provider)
            .cloned()
            .ok_or_else(|| validation("no model is catalogued for this provider"))?,
    };
    if kind == ModelKind::Chat && billed && (max_tokens == 0 || max_tokens > MAX_OUTPUT_TOKENS) {
        return Err(ApiError::validation(format!(
            "max_tokens must be from 1 to {MAX_OUTPUT_TOKENS}"
        )));
    }
    if let Some(f) = &feature {
        if f.is_empty() || f.len() > 64 || !f.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            return Err(validation("feature must be 1 to 64 letters, digits, '_', '-' or '.'"));
        }
    }
    let current = match prefetched_key {
        Some(k) => k,
        None => state.store.call_key(account, provider).await?,
    };
    let choice = match choose_key(account, provider, current) {
        Ok(choice) => choice,
        Err(e) if e.code == ErrorCode::SharedPoolUnavailable => {
            return Err(no_shared_key(state, account, provider).await);
        }
        Err(e) => return Err(e),
    };
    if choice.source == KeySource::Own && choice.key.reported_leaked_at.is_some() {
        // The provider blocked this key; the account chose it, so no fallback to the pool.
        let refusal = leaked_key_refusal(provider, &choice.key.last4);
        refuse_on_record(state, caller, account, provider, &model, &choice, &feature, &refusal).await?;
        return Err(refusal);
    }
    let (period, _, _) = period_of(state.clock.now());
    let mut reserved = 0;
    if choice.source == KeySource::Shared && billed {
        // Input tokens are not known before the call; the input's byte count bounds them.
        let estimate = model.credits_for(input_bytes as u64, u64::from(max_tokens)).max(1);
        reserved = i64::try_from(estimate).unwrap_or(i64::MAX);
        let ok = state
            .store
            .reserve_credits(account, &period, acct.shared_credit_limit, reserved)
            .await?;
        if !ok {
            let refusal = ApiError::new(
                ErrorCode::SharedQuotaExhausted,
                format!(
                    "this month's shared-pool credits ({} in all) do not cover this call; add your own {} key in Settings → AI → Model keys to run without caps",
                    acct.shared_credit_limit,
                    provider.display_name()
                ),
            );
            // The record says what was needed; the answer says what to do.
            let detail = format!(
                "needed {reserved} credits; the month's limit is {}",
                acct.shared_credit_limit
            );
            let recorded = ApiError::new(refusal.code, detail);
            refuse_on_record(state, caller, account, provider, &model, &choice, &feature, &recorded).await?;
            return Err(refusal);
        }
    }
    Ok(CallContext {
        account: account.clone(),
        actor: caller.user.id.to_string(),
        provider,
        model,
        choice,
        period,
        reserved,
        feature,
        started: std::time::Instant::now(),
        billed,
    })
}

/// The catalogue entry a call naming `id` uses: served models of the route's `kind` only. A
/// retired model is `422 model_retired` naming its replacement (never a silent
/// substitution); an unknown one, or one of another kind, is a validation error listing what
/// is offered.
pub fn resolve_model<'c>(
    catalogue: &'c Catalogue,
    provider: Provider,
    id: &str,
    kind: ModelKind,
) -> ApiResult<&'c ModelEntry> {
    let offered = || {
        catalogue
            .served(provider)
            .filter(|m| m.kind == kind)
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match catalogue.resolve(provider, id) {
        Ok(m) if m.kind == kind => Ok(m),
        Ok(m) => Err(ApiError::validation(format!(
            "{} is {} {} model, and this route takes {} models: {}",
            m.id,
            if m.kind == ModelKind::Embedding { "an" } else { "a" },
            m.kind.as_str(),
            kind.as_str(),
            offered()
        ))),
        Err(ModelRefusal::Retired(m)) => {
            let replacement = m.replaced_by.as_deref().and_then(|r| catalogue.model(provider, r));
            let when = m.retires_on.as_deref().map_or_else(String::new, |d| format!(" on {d}"));
            let instead = replacement.map_or_else(String::new, |r| format!("; use {} ({}) instead", r.id, r.name));
            let mut e = ApiError::new(
                ErrorCode::ModelRetired,
                format!(
                    "{} ({}) was retired by {}{when}{instead}",
                    m.id,
                    m.name,
                    provider.display_name()
                ),
            );
            e.replaced_by = replacement.map(|r| r.id.clone());
            Err(e)
        }
        Err(ModelRefusal::Unknown) => Err(ApiError::validation(format!(
            "model is not offered for {}: choose one of {}",
            provider.display_name(),
            offered()
        ))),
    }
}

/// `503 shared_pool_unavailable`, with the advice that fits the account: switch to its saved
/// key when it has one, else save one.
async fn no_shared_key(state: &AppState, account: &AccountId, provider: Provider) -> ApiError {
    let name = provider.display_name();
    let has_own_key = state
        .store
        .provider_state(account, provider)
        .await
        .is_ok_and(|s| s.key.is_some());
    let advice = if has_own_key {
        format!(
            "this account's own {name} key is saved but not in use: switch {name} to My key in Settings → AI → Model keys"
        )
    } else {
        format!("save your own {name} key in Settings → AI → Model keys and switch to it")
    };
    ApiError::new(
        ErrorCode::SharedPoolUnavailable,
        format!("the shared pool has no {name} key configured; {advice}"),
    )
}

/// `409 key_reported_leaked` for an own key its provider blocked.
fn leaked_key_refusal(provider: Provider, last4: &keyward_core::Last4) -> ApiError {
    ApiError::new(
        ErrorCode::KeyReportedLeaked,
        format!(
            "{name} reported this account's {name} key (ending {last4}) as leaked and blocks it; an owner or admin must \
             replace it in Settings → AI → Model keys. Calls do not fall back to the shared pool",
            name = provider.display_name()
        ),
    )
}

/// A call refused before any provider was reached is still an AI call on record (no tokens,
/// nothing charged): `refused:<code>`, with the refusal's message as its detail.
#[allow(clippy::too_many_arguments)]
async fn refuse_on_record(
    state: &AppState,
    caller: &Caller,
    account: &AccountId,
    provider: Provider,
    model: &ModelEntry,
    choice: &KeyChoice,
    feature: &Option<String>,
    refusal: &ApiError,
) -> ApiResult<()> {
    let outcome = format!("refused:{}", refusal.code.as_str());
    state.metrics.record_ai_call(provider, choice.source, &outcome);
    let mut event = NewAuditEvent::key_action(
        account,
        state.clock.now(),
        caller.user.id.as_str(),
        AuditAction::AiRequest,
        provider,
        (choice.source == KeySource::Own).then_some(&choice.key.last4),
        Some(refusal.message.clone()),
    );
    event.key_source = Some(choice.source);
    event.model = Some(model.id.clone());
    event.outcome = outcome;
    event.feature = feature.clone();
    state.store.append_audit(std::slice::from_ref(&event)).await?;
    Ok(())
}

/// Marks an account's key as reported leaked (the provider said so), so calls on it stop.
pub async fn mark_leaked(state: &AppState, account: &AccountId, provider: Provider, key_id: &KeyId) {
    match state
        .store
        .mark_key_leaked(account, provider, key_id, state.clock.now())
        .await
    {
        Ok(true) => {
            tracing::warn!(%account, %provider, "provider reported the account's key as leaked; calls on it stop")
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, %account, %provider, "could not mark a leaked key"),
    }
}

/// A provider said a catalogued model does not exist: counted, and logged at most once per
/// model per hour (`keyward catalogue check` lists what else is gone).
pub fn note_model_not_found(state: &AppState, provider: Provider, model: &str) {
    if state.metrics.record_model_not_found(provider, model) {
        tracing::warn!(
            %provider,
            model,
            "the provider says a catalogued model does not exist: run `keyward catalogue check`"
        );
    }
}

impl CallContext {
    /// What a failed call teaches beyond its own answer: a leaked own key is marked, and a
    /// catalogued model the provider no longer has is counted.
    pub async fn learn_from(&self, state: &AppState, f: &ProviderFailure) {
        if f.diagnosis == Diagnosis::KeyReportedLeaked && self.choice.source == KeySource::Own {
            mark_leaked(state, &self.account, self.provider, &self.choice.key.key_id).await;
        }
        if f.is_model_not_found() {
            note_model_not_found(state, self.provider, &self.model.id);
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{account_id}/ai/messages",
    tag = "ai",
    params(("account_id" = String, Path)),
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "The answer; with \"stream\": true a text/event-stream of delta events and one done (or error) event", body = AiAnswerBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account", body = ErrorBody),
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
    AiJsonBody(body): AiJsonBody,
) -> ApiResult<Response> {
    // Once a provider is called, the call must be settled and audited even if the client
    // goes away (which drops this handler): the work runs in its own task.
    tokio::spawn(messages_call(state, claim, body))
        .await
        .map_err(|e| ApiError::internal(&e))?
}

async fn messages_call(state: AppState, claim: AccountMemberClaim, body: JsonBody) -> ApiResult<Response> {
    // The body names the provider; with it, the caller, their membership and the account's
    // key are one read. Errors keep their order: token, membership, then body.
    let parsed: ApiResult<MessagesBody> = body.parse();
    let provider = parsed.as_ref().ok().and_then(|b| b.provider.parse::<Provider>().ok());
    let (AccountMember { caller, membership: m }, prefetched_key) = match provider {
        Some(p) => {
            let (member, key) = claim.check_with_key(&state, p).await?;
            (member, Some(key))
        }
        None => (claim.check(&state).await?, None),
    };
    let body = parsed?;
    let provider: Provider = body
        .provider
        .parse()
        .map_err(|_| validation("provider must be anthropic, openai or google"))?;
    if body.messages.is_empty() || body.messages.len() > MAX_MESSAGES {
        return Err(ApiError::validation(format!(
            "messages must hold 1 to {MAX_MESSAGES} messages"
        )));
    }
    if let Some(t) = body.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(validation("temperature must be from 0 to 2"));
        }
    }
    let input_bytes =
        body.messages.iter().map(|m| m.content.len()).sum::<usize>() + body.system.as_ref().map_or(0, String::len);
    let spec = CallSpec {
        provider,
        model: body.model.as_deref(),
        input_bytes,
        max_tokens: body.max_tokens,
        kind: ModelKind::Chat,
        billed: true,
        feature: body.feature.clone(),
        prefetched_key,
    };
    let ctx = prepare(&state, &caller, &m.account, spec).await?;
    let request = ChatRequest {
        model: ctx.model.id.clone(),
        system: body.system,
        messages: body.messages,
        max_tokens: body.max_tokens,
        temperature: body.temperature,
        stream: body.stream,
    };
    let call = build_chat(provider, &request);
    if request.stream {
        stream_answer(state, ctx, call).await
    } else {
        plain_answer(&state, &ctx, call).await.map(IntoResponse::into_response)
    }
}

fn request_id(provider: Provider, headers: &[(String, String)]) -> Option<String> {
    let name = keyward_providers::request_id_header(provider)?;
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

async fn plain_answer(
    state: &AppState,
    ctx: &CallContext,
    call: keyward_providers::HttpCall,
) -> ApiResult<Json<AiAnswerBody>> {
    let mut upstream = match open_and_call(state, ctx.provider, &ctx.choice, call).await {
        Ok(u) => u,
        Err(f) => return Err(fail_call(state, ctx, f, None).await),
    };
    let req_id = request_id(ctx.provider, &upstream.headers);
    let body = match upstream.collect(MAX_ANSWER).await {
        Ok(b) => b,
        Err(f) => return Err(fail_call(state, ctx, f, req_id).await),
    };
    match parse_chat(ctx.provider, upstream.status, &body) {
        Ok(answer) => {
            let req_id = req_id.or_else(|| Some(answer.id.clone()));
            let charged = ctx.settle(state, "ok", answer.usage, req_id, None).await?;
            Ok(Json(AiAnswerBody {
                id: answer.id,
                provider: ctx.provider.as_str().to_owned(),
                model: ctx.model.id.clone(),
                key_source: ctx.choice.source.as_str().to_owned(),
                content: answer.content,
                stop_reason: answer.stop_reason,
                usage: UsageCounts {
                    input_tokens: answer.usage.input_tokens,
                    output_tokens: answer.usage.output_tokens,
                },
                credits_charged: charged,
            }))
        }
        Err(f) => Err(fail_call(state, ctx, CallFailure::Provider(f), req_id).await),
    }
}

/// Settles a failed call (nothing charged) and turns it into the answer.
pub async fn fail_call(state: &AppState, ctx: &CallContext, f: CallFailure, req_id: Option<String>) -> ApiError {
    let detail = match &f {
        CallFailure::Provider(p) => {
            ctx.learn_from(state, p).await;
            Some(p.message.clone())
        }
        _ => None,
    };
    if let Err(e) = ctx.settle(state, &f.outcome(), Usage::default(), req_id, detail).await {
        return e;
    }
    f.into_api_error()
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

async fn stream_answer(state: AppState, ctx: CallContext, call: keyward_providers::HttpCall) -> ApiResult<Response> {
    let mut upstream = match open_and_call(&state, ctx.provider, &ctx.choice, call).await {
        Ok(u) => u,
        Err(f) => return Err(fail_call(&state, &ctx, f, None).await),
    };
    let req_id = request_id(ctx.provider, &upstream.headers);
    if !(200..300).contains(&upstream.status) {
        let body = upstream.collect(MAX_ANSWER).await.unwrap_or_default();
        let failure = keyward_providers::diagnose(ctx.provider, upstream.status, &body);
        return Err(fail_call(&state, &ctx, CallFailure::Provider(failure), req_id).await);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut decoder = StreamDecoder::new(ctx.provider);
        let mut stream_failure: Option<CallFailure> = None;
        'read: loop {
            match upstream.next_chunk().await {
                Ok(Some(chunk)) => {
                    for ev in decoder.feed(&chunk) {
                        match ev {
                            StreamEvent::Delta(text) => {
                                // A client that went away does not stop the accounting.
                                let _ = tx.send(sse("delta", &json!({ "text": text }))).await;
                            }
                            StreamEvent::Error(f) => {
                                stream_failure = Some(CallFailure::Provider(f));
                                break 'read;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(f) => {
                    stream_failure = Some(f);
                    break;
                }
            }
        }
        let summary = match stream_failure {
            Some(f) => Err(f),
            None => decoder.finish().map_err(CallFailure::Provider),
        };
        match summary {
            Ok(s) => {
                let req_id = req_id.or_else(|| Some(s.id.clone()));
                match ctx.settle(&state, "ok", s.usage, req_id, None).await {
                    Ok(charged) => {
                        let done = json!({
                            "id": s.id,
                            "provider": ctx.provider,
                            "model": ctx.model.id,
                            "key_source": ctx.choice.source,
                            "stop_reason": s.stop_reason,
                            "usage": { "input_tokens": s.usage.input_tokens, "output_tokens": s.usage.output_tokens },
                            "credits_charged": charged,
                        });
                        let _ = tx.send(sse("done", &done)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(sse("error", &error_event(&e))).await;
                    }
                }
            }
            Err(f) => {
                let e = fail_call(&state, &ctx, f, req_id).await;
                let _ = tx.send(sse("error", &error_event(&e))).await;
            }
        }
    });
    let body = channel_body(rx);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// A response body fed by a channel: each message is sent on as it comes.
pub fn channel_body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }))
}

fn error_event(e: &ApiError) -> Value {
    let mut v = json!({ "code": e.code.as_str(), "message": e.message });
    if e.code == ErrorCode::ProviderError {
        v["provider_status"] = json!(e.provider_status);
    }
    v
}
