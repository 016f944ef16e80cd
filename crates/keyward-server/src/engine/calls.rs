//! An AI call, whichever door it came in by (`ai/messages`, the native pass-through, "Test
//! key"): choose the key, reserve shared credits, hand the sealed key and the provider call
//! to a worker, read the answer as it streams back, settle and audit.
//!
//! The gateway never sees a plaintext key here: it ships the sealed blob and its binding to
//! a worker, which opens it, calls the provider and returns only the response.
//!
//! A call has three steps, each an [`Engine`] method: [`Engine::prepare`] (model, key,
//! credits: a [`CallContext`]), [`Engine::open_and_call`] (the worker round trip: an
//! [`Upstream`]), and [`CallContext::settle`] or [`Engine::fail_call`] (the credits settled
//! to the provider's usage and the `ai.request` event durable, before the answer is
//! released). [`Engine::chat`] runs all three for `ai/messages`.
//!
//! Exact metering when a process dies mid-call. A call counts as *answered* when its
//! client has the complete answer: a plain answer's body, or a stream's terminal event
//! (`done` on `ai/messages`; the chunk with the provider's end marker on the pass-through).
//! The order of operations makes "answered" and "charged" the same set of calls:
//! - a shared call's reservation is a lease ([`super::leases`]): a row naming this node,
//!   renewed while the call runs. If the gateway dies, the lease is released (at the node's
//!   next start, or by any node once it expires): credits back, `error:abandoned` on record;
//! - the settlement commits *before* the client can have the complete answer: a plain
//!   answer is returned only after [`CallContext::settle`] returns, and a stream's terminal
//!   event is sent only after it (text before it is passed on as it arrives);
//! - settling and releasing are one conditional transition on the lease row: whichever
//!   commits first deletes it, and the other finds it gone. A settlement that finds its
//!   lease released fails, and the client gets `503 database_unavailable` instead of the
//!   answer's end: abandoned calls are never charged, charged calls never abandoned.
//!
//! What remains: a gateway killed after the settlement commits but before the last bytes
//! reach the client charges a call whose client never saw it end (the client may retry and
//! pay again); and a stream abandoned mid-way leaves the client with the text it already
//! received, uncharged. Both windows are bounded by one write to a local socket and by the
//! stream's length respectively; no order of operations closes both, since the database
//! and the client cannot commit together.

use std::time::Instant;

use keyward_core::{AccountId, ErrorCode, KeyId, KeySource, ModelEntry, ModelKind, ModelRefusal, Outcome, Provider};
use keyward_core::{Catalogue, KeyBinding, KeyOwner, Last4};
use keyward_providers::{
    build_chat, parse_chat, ChatMessage, ChatRequest, Diagnosis, HttpCall, HttpMethod, ProviderFailure, StreamDecoder,
    StreamEvent, Usage,
};
use keyward_store::{
    AuditAction, AuditActor, CallKey, CallRecord, LeaseRelease, LeasedCall, NewAuditEvent, NewLease, StoredKey,
};
use keyward_worker_protocol::protocol::{CallRequest, FailKind, Method};
use keyward_worker_protocol::WorkerError;
use tokio::sync::mpsc;

use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};
use crate::workers::Lease;

/// Largest plain answer read from a provider.
pub const MAX_ANSWER: usize = 8 * 1024 * 1024;
const MAX_MESSAGES: usize = 200;
const MAX_OUTPUT_TOKENS: u32 = 32_768;

/// Which key pays for a call, sealed, with what it is bound to.
#[derive(Debug, Clone)]
pub struct KeyChoice {
    pub source: KeySource,
    pub key: StoredKey,
    /// Whose key it is: the account, or the shared pool.
    pub owner: KeyOwner,
}

impl KeyChoice {
    /// What the key's blob is bound to.
    pub fn binding(&self, provider: Provider) -> KeyBinding {
        KeyBinding {
            owner: self.owner.clone(),
            provider,
            key_id: self.key.key_id.clone(),
        }
    }
}

/// The worker's request for `call` with a sealed key (`blob`, bound to `binding`).
pub fn worker_call(request_id: u64, binding: KeyBinding, blob: &[u8], call: HttpCall, timeout_ms: u32) -> CallRequest {
    CallRequest {
        request_id,
        binding,
        blob: blob.to_vec(),
        method: match call.method {
            HttpMethod::Get => Method::Get,
            HttpMethod::Post => Method::Post,
        },
        path_and_query: call.path_and_query,
        headers: call.headers,
        body: call.body,
        timeout_ms,
    }
}

/// The account's source for `provider` decides the key. An own-key account whose key is
/// gone gets `no_key_saved`; a shared call with no platform key configured gets a 503.
/// `current` is [`keyward_store::Store::call_key`]'s answer: one read for the source and the
/// key it selects (this is on every AI call's path).
pub fn choose_key(account: &AccountId, provider: Provider, current: CallKey) -> ApiResult<KeyChoice> {
    match current.source {
        KeySource::Own => {
            let key = current.key.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NoKeySaved,
                    "this account uses its own key for this provider, but none is saved",
                )
            })?;
            Ok(KeyChoice {
                source: KeySource::Own,
                key,
                owner: KeyOwner::Account(account.clone()),
            })
        }
        KeySource::Shared => {
            let key = current.key.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::SharedPoolUnavailable,
                    format!(
                        "the shared pool has no {} key configured; save your own key to use {}",
                        provider.display_name(),
                        provider.display_name()
                    ),
                )
            })?;
            Ok(KeyChoice {
                source: KeySource::Shared,
                key,
                owner: KeyOwner::SharedPool,
            })
        }
    }
}

/// Why a call produced no provider answer.
#[derive(Debug)]
pub enum CallFailure {
    /// No worker, or the worker died mid-call.
    WorkerUnavailable,
    /// The KEK backend (HSM, KMS) did not answer or refused: the key could not be opened.
    KekUnavailable(String),
    /// The provider could not be reached or answered unreadably.
    Provider(ProviderFailure),
    /// Something keyward got wrong (a key that does not open, a refused path).
    Internal(String),
}

impl CallFailure {
    pub fn into_api_error(self) -> ApiError {
        match self {
            CallFailure::WorkerUnavailable => ApiError::new(
                ErrorCode::WorkerUnavailable,
                "no isolated worker is available right now; retry shortly",
            ),
            CallFailure::KekUnavailable(m) => ApiError::new(ErrorCode::KekUnavailable, kek_unavailable_message(&m)),
            CallFailure::Provider(f) => provider_error(&f),
            CallFailure::Internal(m) => ApiError::internal(&m),
        }
    }

    /// How the call ended, for its audit event.
    pub fn outcome(&self) -> Outcome {
        match self {
            CallFailure::WorkerUnavailable => Outcome::Error("worker_unavailable"),
            CallFailure::KekUnavailable(_) => Outcome::Error("kek_unavailable"),
            CallFailure::Provider(f) => Outcome::Error(f.diagnosis.as_str()),
            CallFailure::Internal(_) => Outcome::Error("internal"),
        }
    }
}

/// The message of `503 kek_unavailable`: what the backend said (never key material; the
/// crypto errors carry none), and that retrying later is the remedy.
pub fn kek_unavailable_message(reason: &str) -> String {
    format!(
        "the key-encryption backend is not available, so no key could be opened or sealed; retry shortly ({reason})"
    )
}

/// `502 provider_error` carrying the provider's status and message.
pub fn provider_error(f: &ProviderFailure) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::ProviderError,
        format!("{} ({})", f.message, f.diagnosis.as_str()),
    );
    e.provider_status = f.status;
    e
}

/// An answer streaming back from a provider through a worker.
#[derive(Debug)]
pub struct Upstream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub started: Instant,
    lease: Option<Lease>,
    provider: Provider,
}

impl Upstream {
    /// The next body chunk as it arrives; `None` at the clean end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, CallFailure> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(None);
        };
        match lease.next_chunk().await {
            Ok(Some(b)) => Ok(Some(b)),
            Ok(None) => {
                if let Some(l) = self.lease.take() {
                    l.release();
                }
                Ok(None)
            }
            Err(WorkerError::Refused { kind, message }) => {
                // The exchange is complete (the worker ended it): the connection is reusable.
                if let Some(l) = self.lease.take() {
                    l.release();
                }
                Err(match kind {
                    FailKind::Connect | FailKind::Timeout | FailKind::Io | FailKind::UpstreamProtocol => {
                        CallFailure::Provider(ProviderFailure::new(
                            Some(self.status),
                            Diagnosis::ProviderUnavailable,
                            &format!("{}'s answer broke off: {message}", self.provider.display_name()),
                        ))
                    }
                    _ => worker_fail(self.provider, kind, &message),
                })
            }
            Err(WorkerError::Gone(_)) => {
                self.lease = None;
                Err(CallFailure::WorkerUnavailable)
            }
        }
    }

    /// The whole body (for plain answers), bounded.
    pub async fn collect(&mut self, limit: usize) -> Result<Vec<u8>, CallFailure> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            if body.len() + chunk.len() > limit {
                return Err(CallFailure::Provider(ProviderFailure::new(
                    Some(self.status),
                    Diagnosis::MalformedResponse,
                    "the provider's answer is larger than keyward accepts",
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The provider's id for this request, from its response headers, where it sends one.
    pub fn request_id(&self) -> Option<String> {
        let name = keyward_providers::request_id_header(self.provider)?;
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

fn worker_fail(provider: Provider, kind: FailKind, message: &str) -> CallFailure {
    match kind {
        FailKind::Connect | FailKind::Timeout | FailKind::Io => {
            CallFailure::Provider(ProviderFailure::unreachable(provider, message))
        }
        FailKind::UpstreamProtocol => CallFailure::Provider(ProviderFailure::new(
            None,
            Diagnosis::MalformedResponse,
            &format!(
                "{} answered with something that is not HTTP: {message}",
                provider.display_name()
            ),
        )),
        FailKind::KekUnavailable => CallFailure::KekUnavailable(message.to_owned()),
        FailKind::OpenFailed | FailKind::PathRefused | FailKind::BadRequest | FailKind::Internal => {
            CallFailure::Internal(format!("worker refused the call ({kind:?}): {message}"))
        }
    }
}

static NEXT_REQUEST_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What a call asks for, as far as choosing the model and metering need to know.
#[derive(Debug, Clone)]
pub struct CallSpec<'a> {
    pub provider: Provider,
    /// `None`: the provider's default model.
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
    /// The account's source and key for `provider`, when the door already read them
    /// (alongside the actor's membership); `None`: read them here.
    pub prefetched_key: Option<CallKey>,
}

/// Everything needed to settle and audit a call once it ends.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub account: AccountId,
    pub actor: AuditActor,
    pub provider: Provider,
    pub model: ModelEntry,
    pub choice: KeyChoice,
    /// The metering period (`YYYY-MM`).
    pub period: String,
    pub reserved: i64,
    pub feature: Option<String>,
    /// The member a service acted for (`keyward-on-behalf-of`), as their user id.
    pub on_behalf_of: Option<String>,
    pub started: Instant,
    /// Whether the provider bills the call (token counting is free: audited, never charged).
    pub billed: bool,
    /// The lease holding the shared reservation (`reserved` credits), while the call runs.
    pub lease: Option<std::sync::Arc<super::leases::HeldLease>>,
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

    /// The key's last4, for an own key only (a shared key's are never logged).
    fn own_last4(&self) -> Option<&Last4> {
        (self.choice.source == KeySource::Own).then_some(&self.choice.key.last4)
    }

    /// Settles credits and appends `ai.request`, durably, before the answer is released.
    pub async fn settle(
        &self,
        engine: &Engine,
        outcome: Outcome,
        usage: Usage,
        request_id: Option<String>,
        detail: Option<String>,
    ) -> ApiResult<i64> {
        // A failed call carries no usage, so it is charged nothing.
        let charged = self.charge(usage);
        let audit = NewAuditEvent::new(
            &self.account,
            engine.clock.now(),
            &self.actor,
            AuditAction::AiRequest,
            self.provider,
        )
        .last4(self.own_last4())
        .key_source(self.choice.source)
        .model(&self.model.id)
        .outcome(outcome)
        .request_id(request_id)
        .tokens(usage.input_tokens, usage.output_tokens)
        .feature(self.feature.clone())
        .on_behalf_of(self.on_behalf_of.clone())
        .detail(detail);
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
            lease: self.lease.as_ref().map(|l| l.id),
        };
        engine
            .metrics
            .record_ai_call(self.provider, self.choice.source, outcome);
        engine
            .metrics
            .observe_ai_latency(self.provider, self.choice.source, self.started.elapsed().as_secs_f64());
        if let Err(e) = engine.ledger.commit(record).await {
            tracing::error!(error = %e, "could not record an AI call");
            // Give the reservation back now (best effort): an unrecorded call must not keep
            // the month's credits tied up. Released as abandoned, so the call is on record
            // after all; if this fails too, the lease expires and a sweep does it. (A lease
            // already released, the reason the settlement was refused, is left as it is.)
            if let Some(lease) = &self.lease {
                if let Err(e) = engine
                    .store
                    .release_leases(LeaseRelease::One(lease.id), engine.clock.now(), 1)
                    .await
                {
                    tracing::error!(error = %e, "could not release a reservation lease; it is released when it expires");
                }
            }
            return Err(ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the call could not be recorded; it is not answered",
            ));
        }
        Ok(charged)
    }

    /// What a failed call teaches beyond its own answer: a leaked own key is marked, and a
    /// catalogued model the provider no longer has is counted.
    pub async fn learn_from(&self, engine: &Engine, f: &ProviderFailure) {
        if f.diagnosis == Diagnosis::KeyReportedLeaked && self.choice.source == KeySource::Own {
            engine
                .mark_leaked(&self.account, self.provider, &self.choice.key.key_id)
                .await;
        }
        if f.is_model_not_found() {
            engine.note_model_not_found(self.provider, &self.model.id);
        }
    }
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

/// The longest feature label.
pub const MAX_FEATURE_LEN: usize = 64;

/// A feature label (`feature` in `ai/messages`, the `keyward-feature` header, the
/// pass-through's `features/{feature}` segment): 1 to 64 letters, digits, '_', '-' or '.'
/// (else `422 validation_error`).
pub fn check_feature(f: &str) -> ApiResult<()> {
    if f.is_empty() || f.len() > MAX_FEATURE_LEN || !f.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ApiError::validation(
            "feature must be 1 to 64 letters, digits, '_', '-' or '.'",
        ));
    }
    Ok(())
}

/// The feature a call names: the body's or path's (`named`) and the `keyward-feature`
/// header's; both may be given only when they agree (else 422). Checked here.
pub fn merge_feature(named: Option<String>, header: Option<String>) -> ApiResult<Option<String>> {
    let feature = match (named, header) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::validation(
                "the keyward-feature header and the call's feature name different features",
            ))
        }
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    if let Some(f) = &feature {
        check_feature(f)?;
    }
    Ok(feature)
}

/// `409 key_reported_leaked` for an own key its provider blocked.
fn leaked_key_refusal(provider: Provider, last4: &Last4) -> ApiError {
    ApiError::new(
        ErrorCode::KeyReportedLeaked,
        format!(
            "{name} reported this account's {name} key (ending {last4}) as leaked and blocks it; an owner or admin must \
             replace it in Settings → AI → Model keys. Calls do not fall back to the shared pool",
            name = provider.display_name()
        ),
    )
}

impl Engine {
    /// Checks what a call asks for and reserves shared credits: the model (catalogued, of
    /// the route's kind, not retired), the output bound, the feature label, the key
    /// (`no_key_saved`, `shared_pool_unavailable`, `key_reported_leaked`) and, for a billed
    /// call on the shared pool, credits for its input and output bound (`429
    /// shared_quota_exhausted` past the month's limit). Refusals after the key is known are
    /// on record as `refused:<code>`. Any member may call AI.
    pub async fn prepare(&self, actor: &Actor, spec: CallSpec<'_>) -> ApiResult<CallContext> {
        let account = actor.account_id();
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
            Some(id) => resolve_model(&self.catalogue, provider, id, kind)?.clone(),
            None => self
                .catalogue
                .default_model(provider)
                .cloned()
                .ok_or_else(|| ApiError::validation("no model is catalogued for this provider"))?,
        };
        if kind == ModelKind::Chat && billed && (max_tokens == 0 || max_tokens > MAX_OUTPUT_TOKENS) {
            return Err(ApiError::validation(format!(
                "max_tokens must be from 1 to {MAX_OUTPUT_TOKENS}"
            )));
        }
        if let Some(f) = &feature {
            check_feature(f)?;
        }
        let mut current = match prefetched_key {
            Some(k) => k,
            None => self.store.call_key(account, provider).await?,
        };
        if current.source == KeySource::Own && !actor.account().plan.allows_own_keys() {
            // A plan without own keys (a downgrade to free): the saved key stays saved and
            // the source stays chosen, but calls follow the shared pool's rules (its key,
            // metered and capped) until the plan allows own keys again.
            current = CallKey {
                source: KeySource::Shared,
                key: self.store.shared_key(provider).await?,
            };
        }
        let choice = match choose_key(account, provider, current) {
            Ok(choice) => choice,
            Err(e) if e.code == ErrorCode::SharedPoolUnavailable => {
                return Err(self.no_shared_key(account, provider).await);
            }
            Err(e) => return Err(e),
        };
        let ctx = CallContext {
            account: account.clone(),
            actor: actor.audit_actor(),
            provider,
            model,
            choice,
            period: self.clock.now().month().label,
            reserved: 0,
            feature,
            on_behalf_of: actor.on_behalf_of.as_ref().map(ToString::to_string),
            started: Instant::now(),
            billed,
            lease: None,
        };
        if ctx.choice.source == KeySource::Own && ctx.choice.key.reported_leaked_at.is_some() {
            // The provider blocked this key; the account chose it, so no fallback to the pool.
            let refusal = leaked_key_refusal(provider, &ctx.choice.key.last4);
            self.refuse_on_record(&ctx, &refusal).await?;
            return Err(refusal);
        }
        if ctx.choice.source == KeySource::Shared && billed {
            // Input tokens are not known before the call; the input's byte count bounds them.
            let estimate = ctx.model.credits_for(input_bytes as u64, u64::from(max_tokens)).max(1);
            let reserved = i64::try_from(estimate).unwrap_or(i64::MAX);
            let limit = actor.account().shared_credit_limit;
            let now = self.clock.now();
            let lease = NewLease {
                account_id: account.clone(),
                period: ctx.period.clone(),
                amount: reserved,
                node: self.leases.node().to_owned(),
                run: self.leases.run().to_owned(),
                expires_at: self.leases.expiry(now),
                call: LeasedCall {
                    actor: ctx.actor.clone(),
                    provider,
                    model: ctx.model.id.clone(),
                    key_source: ctx.choice.source,
                    feature: ctx.feature.clone(),
                    on_behalf_of: ctx.on_behalf_of.clone(),
                },
            };
            let Some(id) = self.store.reserve_lease(&lease, limit, now).await? else {
                let refusal = ApiError::new(
                    ErrorCode::SharedQuotaExhausted,
                    format!(
                        "this month's shared-pool credits ({limit} in all) do not cover this call; add your own {} key in Settings → AI → Model keys to run without caps",
                        provider.display_name()
                    ),
                );
                // The record says what was needed; the answer says what to do.
                let recorded = ApiError::new(
                    refusal.code,
                    format!("needed {reserved} credits; the month's limit is {limit}"),
                );
                self.refuse_on_record(&ctx, &recorded).await?;
                return Err(refusal);
            };
            return Ok(CallContext {
                reserved,
                lease: Some(std::sync::Arc::new(self.leases.hold(id))),
                ..ctx
            });
        }
        Ok(ctx)
    }

    /// `503 shared_pool_unavailable`, with the advice that fits the account: switch to its
    /// saved key when it has one, else save one.
    async fn no_shared_key(&self, account: &AccountId, provider: Provider) -> ApiError {
        let name = provider.display_name();
        let has_own_key = self
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

    /// A call refused before any provider was reached is still an AI call on record (no
    /// tokens, nothing charged): `refused:<code>`, with the refusal's message as its detail.
    async fn refuse_on_record(&self, ctx: &CallContext, refusal: &ApiError) -> ApiResult<()> {
        let outcome = Outcome::Refused(refusal.code);
        self.metrics.record_ai_call(ctx.provider, ctx.choice.source, outcome);
        let event = NewAuditEvent::new(
            &ctx.account,
            self.clock.now(),
            &ctx.actor,
            AuditAction::AiRequest,
            ctx.provider,
        )
        .last4(ctx.own_last4())
        .key_source(ctx.choice.source)
        .model(&ctx.model.id)
        .outcome(outcome)
        .feature(ctx.feature.clone())
        .on_behalf_of(ctx.on_behalf_of.clone())
        .detail(Some(refusal.message.clone()));
        self.store.append_audit(std::slice::from_ref(&event)).await?;
        Ok(())
    }

    /// Marks an account's key as reported leaked (the provider said so), so calls on it stop.
    pub async fn mark_leaked(&self, account: &AccountId, provider: Provider, key_id: &KeyId) {
        match self
            .store
            .mark_key_leaked(account, provider, key_id, self.clock.now())
            .await
        {
            Ok(true) => {
                tracing::warn!(%account, %provider, "provider reported the account's key as leaked; calls on it stop")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, %account, %provider, "could not mark a leaked key"),
        }
    }

    /// A provider said a catalogued model does not exist: counted, and logged at most once
    /// per model per hour (`keyward catalogue check` lists what else is gone).
    pub fn note_model_not_found(&self, provider: Provider, model: &str) {
        if self.metrics.record_model_not_found(provider, model) {
            tracing::warn!(
                %provider,
                model,
                "the provider says a catalogued model does not exist: run `keyward catalogue check`"
            );
        }
    }

    /// Sends `call` with `choice`'s sealed key through a worker and returns once the
    /// provider's response head is in.
    pub async fn open_and_call(
        &self,
        provider: Provider,
        choice: &KeyChoice,
        call: HttpCall,
    ) -> Result<Upstream, CallFailure> {
        let started = Instant::now();
        let request = worker_call(
            NEXT_REQUEST_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            choice.binding(provider),
            choice.key.sealed.as_bytes(),
            call,
            self.provider_timeout_ms,
        );
        let mut lease = self.workers.lease().await.map_err(|_| CallFailure::WorkerUnavailable)?;
        match lease.call(&request).await {
            Ok(head) => Ok(Upstream {
                status: head.status,
                headers: head.headers,
                started,
                lease: Some(lease),
                provider,
            }),
            Err(WorkerError::Refused { kind, message }) => {
                // The exchange is complete: the connection can be reused.
                lease.release();
                Err(worker_fail(provider, kind, &message))
            }
            Err(WorkerError::Gone(_)) => Err(CallFailure::WorkerUnavailable),
        }
    }

    /// Settles a failed call (nothing charged) and turns it into the answer.
    pub async fn fail_call(&self, ctx: &CallContext, f: CallFailure, req_id: Option<String>) -> ApiError {
        let detail = match &f {
            CallFailure::Provider(p) => {
                ctx.learn_from(self, p).await;
                Some(p.message.clone())
            }
            _ => None,
        };
        if let Err(e) = ctx.settle(self, f.outcome(), Usage::default(), req_id, detail).await {
            return e;
        }
        f.into_api_error()
    }
}

/// What `ai/messages` asks for.
#[derive(Debug, Clone)]
pub struct ChatCall {
    pub provider: Provider,
    pub model: Option<String>,
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub stream: bool,
    pub feature: Option<String>,
}

/// A finished call, as `ai/messages` reports it (the streamed `done` event, and a plain
/// answer less its text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSummary {
    pub id: String,
    pub provider: Provider,
    pub model: String,
    pub key_source: KeySource,
    pub stop_reason: String,
    pub usage: Usage,
    pub credits_charged: i64,
}

/// `ai/messages`' answer: whole, or a stream of [`ChatEvent`]s.
#[derive(Debug)]
pub enum ChatReply {
    Answer { summary: CallSummary, content: String },
    Stream(mpsc::Receiver<ChatEvent>),
}

/// One event of a streamed `ai/messages` answer: text as it arrives, then one `Done` or one
/// `Error`.
#[derive(Debug)]
pub enum ChatEvent {
    Delta(String),
    Done(CallSummary),
    Error(ApiError),
}

impl Engine {
    /// `ai/messages`: checks the messages, prepares the call (model, key, credits), calls the
    /// provider through a worker, settles and audits. `prefetched_key`: the account's key
    /// for the provider when the door read it with the actor's membership.
    pub async fn chat(&self, actor: &Actor, prefetched_key: Option<CallKey>, chat: ChatCall) -> ApiResult<ChatReply> {
        if chat.messages.is_empty() || chat.messages.len() > MAX_MESSAGES {
            return Err(ApiError::validation(format!(
                "messages must hold 1 to {MAX_MESSAGES} messages"
            )));
        }
        if let Some(t) = chat.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::validation("temperature must be from 0 to 2"));
            }
        }
        let input_bytes =
            chat.messages.iter().map(|m| m.content.len()).sum::<usize>() + chat.system.as_ref().map_or(0, String::len);
        let spec = CallSpec {
            provider: chat.provider,
            model: chat.model.as_deref(),
            input_bytes,
            max_tokens: chat.max_tokens,
            kind: ModelKind::Chat,
            billed: true,
            feature: chat.feature.clone(),
            prefetched_key,
        };
        let ctx = self.prepare(actor, spec).await?;
        let request = ChatRequest {
            model: ctx.model.id.clone(),
            system: chat.system,
            messages: chat.messages,
            max_tokens: chat.max_tokens,
            temperature: chat.temperature,
            stream: chat.stream,
        };
        let call = build_chat(chat.provider, &request);
        if request.stream {
            self.chat_stream(ctx, call).await.map(ChatReply::Stream)
        } else {
            self.chat_whole(&ctx, call).await
        }
    }

    async fn chat_whole(&self, ctx: &CallContext, call: HttpCall) -> ApiResult<ChatReply> {
        let mut upstream = match self.open_and_call(ctx.provider, &ctx.choice, call).await {
            Ok(u) => u,
            Err(f) => return Err(self.fail_call(ctx, f, None).await),
        };
        let req_id = upstream.request_id();
        let body = match upstream.collect(MAX_ANSWER).await {
            Ok(b) => b,
            Err(f) => return Err(self.fail_call(ctx, f, req_id).await),
        };
        match parse_chat(ctx.provider, upstream.status, &body) {
            Ok(answer) => {
                let req_id = req_id.or_else(|| Some(answer.id.clone()));
                let charged = ctx.settle(self, Outcome::Ok, answer.usage, req_id, None).await?;
                Ok(ChatReply::Answer {
                    summary: CallSummary {
                        id: answer.id,
                        provider: ctx.provider,
                        model: ctx.model.id.clone(),
                        key_source: ctx.choice.source,
                        stop_reason: answer.stop_reason,
                        usage: answer.usage,
                        credits_charged: charged,
                    },
                    content: answer.content,
                })
            }
            Err(f) => Err(self.fail_call(ctx, CallFailure::Provider(f), req_id).await),
        }
    }

    /// Opens the stream; a provider that refuses before streaming is a plain error. The
    /// events are then read, settled and audited in a task of their own, so a client that
    /// goes away does not stop the accounting.
    async fn chat_stream(&self, ctx: CallContext, call: HttpCall) -> ApiResult<mpsc::Receiver<ChatEvent>> {
        let mut upstream = match self.open_and_call(ctx.provider, &ctx.choice, call).await {
            Ok(u) => u,
            Err(f) => return Err(self.fail_call(&ctx, f, None).await),
        };
        let req_id = upstream.request_id();
        if !(200..300).contains(&upstream.status) {
            let body = upstream.collect(MAX_ANSWER).await.unwrap_or_default();
            let failure = keyward_providers::diagnose(ctx.provider, upstream.status, &body);
            return Err(self.fail_call(&ctx, CallFailure::Provider(failure), req_id).await);
        }
        let (tx, rx) = mpsc::channel::<ChatEvent>(64);
        let engine = self.clone();
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
                                    let _ = tx.send(ChatEvent::Delta(text)).await;
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
            let last = match summary {
                Ok(s) => {
                    let req_id = req_id.or_else(|| Some(s.id.clone()));
                    match ctx.settle(&engine, Outcome::Ok, s.usage, req_id, None).await {
                        Ok(charged) => ChatEvent::Done(CallSummary {
                            id: s.id,
                            provider: ctx.provider,
                            model: ctx.model.id.clone(),
                            key_source: ctx.choice.source,
                            stop_reason: s.stop_reason,
                            usage: s.usage,
                            credits_charged: charged,
                        }),
                        Err(e) => ChatEvent::Error(e),
                    }
                }
                Err(f) => ChatEvent::Error(engine.fail_call(&ctx, f, req_id).await),
            };
            let _ = tx.send(last).await;
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kek_backend_that_does_not_answer_is_503_kek_unavailable() {
        let f = worker_fail(Provider::OpenAi, FailKind::KekUnavailable, "pkcs11: CKR_DEVICE_REMOVED");
        assert_eq!(f.outcome().to_string(), "error:kek_unavailable");
        let e = f.into_api_error();
        assert_eq!((e.code.as_str(), e.code.http_status()), ("kek_unavailable", 503));
        assert!(e.message.contains("CKR_DEVICE_REMOVED"), "{}", e.message);
        // A blob that does not open is not an outage: it stays a 500, never a retry hint.
        let e = worker_fail(Provider::OpenAi, FailKind::OpenFailed, "tampered").into_api_error();
        assert_eq!(e.code.http_status(), 500);
    }
}
