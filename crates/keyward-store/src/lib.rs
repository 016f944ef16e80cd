//! keyward's persistence: one [`Store`] trait, one implementation per database.
//!
//! Owns: the schema and its migrations (`migrations/<backend>/`), one repository method
//! per aggregate change (users and tokens, accounts and memberships, provider keys and
//! sources, the platform's shared-pool keys, shared-pool credits and usage counters, the
//! audit chain), and the audit chain's canonical form and verification; and, apart from
//! [`Store`], what KEK rotation needs ([`kek::KekStore`]: walk every sealed blob, move one
//! with a compare-and-swap).
//! A key change and its audit event commit in one transaction, so neither exists without
//! the other; so do a finished AI call's charge, its usage counters and its audit event.
//!
//! Shared-pool caps are enforced by the database, not in memory: a reservation is one
//! conditional `UPDATE … WHERE used + reserved + amount <= limit`, so the cap holds however
//! many gateway processes share the database. A call's reservation is held as a lease
//! ([`lease`]) that its node renews, so the reservation of a node that died is released
//! (credits back, the call audited as abandoned) exactly once, and never as well as settled.
//!
//! Must never: hold or see a plaintext key (it stores [`SealedKey`] blobs only), log a
//! blob, or let a backend's SQL dialect leak into the types below: the server sees only
//! this trait, so SQLite and PostgreSQL stay interchangeable.

pub mod audit;
pub mod kek;
pub mod lease;
mod migrate;
pub mod outbox;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use keyward_core::{
    AccountId, Email, ExternalId, KeyId, KeyKind, KeySource, Last4, Plan, Provider, Role, Scope, ServiceId, UnixMillis,
    UserId,
};
use keyward_crypto::SealedKey;

pub use audit::{
    AuditAction, AuditActor, AuditEvent, ChainBreak, ChainHead, NewAuditEvent, NewPlatformEvent, PlatformAction,
    PlatformEvent, PLATFORM_CHAIN,
};
pub use kek::{BlobCursor, BlobOwner, KekStore, SealedBlobRow};
pub use lease::{LeaseId, LeaseRelease, LeasedCall, NewLease, ReleasedLease};
pub use outbox::{AttemptOutcome, OutboxBacklog, OutboxRules, WebhookEvent, WebhookFilter, WebhookKind};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// What can go wrong in the store, in terms the server maps to stable API codes. `Clone`:
/// one batch's failure is the answer to each of its records.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// What already exists, as a sentence (`a user with email … already exists`).
    #[error("{0}")]
    Conflict(String),
    #[error("no key is saved for this provider")]
    NoKeySaved,
    /// The database cannot be reached or is overloaded; retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row holds a value the code cannot have written.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("audit chain: {0}")]
    Chain(String),
    /// The caller passed a value the store refuses to write (a negative amount, a malformed
    /// period, an audit event for another account). Checked before anything is written.
    #[error("invalid input: {0}")]
    Invalid(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub email: Email,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub plan: Plan,
    /// Shared-pool credits per calendar month (the plan's default unless set).
    pub shared_credit_limit: i64,
}

/// An account the provisioning API knows by the product's own id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalAccount {
    pub account: Account,
    pub external_id: ExternalId,
}

/// What `PUT /v1/external/accounts/{external_id}` asks for: the whole state it sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    pub name: String,
    pub plan: Plan,
    /// `None`: the plan's default limit.
    pub shared_credit_limit: Option<i64>,
}

/// What [`Store::put_external_account`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPut {
    pub account: ExternalAccount,
    pub created: bool,
    /// The plan or the effective shared-credit limit changed (and `account.plan_changed`
    /// was appended in the same transaction).
    pub plan_changed: bool,
}

/// A user the provisioning API knows by the product's own id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalUser {
    pub user: User,
    pub external_id: ExternalId,
}

/// One of the product's services. Its token is never stored, only the token's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

impl Service {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Scopes as the `services.scopes` column holds them: space-separated, in a fixed order.
pub(crate) fn scopes_column(scopes: &[Scope]) -> String {
    let mut v: Vec<Scope> = scopes.to_vec();
    v.sort();
    v.dedup();
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

pub(crate) fn parse_scopes(column: &str) -> StoreResult<Vec<Scope>> {
    column
        .split_whitespace()
        .map(|s| {
            s.parse::<Scope>()
                .map_err(|_| StoreError::Corrupt("services.scopes".to_owned()))
        })
        .collect()
}

/// The `account.plan_changed` detail when `before` becomes (`plan`, `limit`): `None` when
/// neither the plan nor the effective monthly limit changes.
pub(crate) fn plan_change_detail(before: &Account, plan: Plan, limit: i64) -> Option<String> {
    let plan_part = (before.plan != plan).then(|| format!("{} -> {plan}", before.plan));
    let limit_part = (before.shared_credit_limit != limit)
        .then(|| format!("shared_credit_limit {} -> {limit}", before.shared_credit_limit));
    match (plan_part, limit_part) {
        (None, None) => None,
        (Some(p), None) => Some(p),
        (None, Some(l)) => Some(l),
        (Some(p), Some(l)) => Some(format!("{p}; {l}")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub account: Account,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastTest {
    pub ok: bool,
    pub at: UnixMillis,
    pub message: String,
    /// What the test found beyond ok and message, as the server wrote it (JSON): rate-limit
    /// headroom, whether the key is valid, the models it can use. Never any part of a key.
    pub detail: Option<String>,
}

/// What may be shown about a saved key: never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMeta {
    pub key_id: KeyId,
    pub last4: Last4,
    /// When a key was first saved for this provider.
    pub created_at: UnixMillis,
    /// When the current key was saved (the last rotation).
    pub updated_at: UnixMillis,
    pub last_test: Option<LastTest>,
    /// The key's format class; `None` for keys saved before keyward recorded it.
    pub kind: Option<KeyKind>,
    /// When the provider said the key was reported as leaked (cleared by a rotation or a
    /// test that succeeds).
    pub reported_leaked_at: Option<UnixMillis>,
}

/// One provider's state for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderState {
    pub provider: Provider,
    pub source: KeySource,
    pub key: Option<KeyMeta>,
}

/// A sealed key ready to be handed to a worker, with what it is bound to.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub key_id: KeyId,
    pub sealed: SealedKey,
    pub last4: Last4,
    /// An account key the provider reported as leaked (never set for the platform's keys).
    pub reported_leaked_at: Option<UnixMillis>,
}

/// The key an AI call would use now: see [`Store::call_key`].
#[derive(Debug, Clone)]
pub struct CallKey {
    pub source: KeySource,
    pub key: Option<StoredKey>,
}

/// A key to save: sealed by the caller, bound to (account, provider, key_id).
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key_id: KeyId,
    pub sealed: SealedKey,
    pub last4: Last4,
    pub kind: KeyKind,
}

/// The result of a save: whether it replaced a key, and the provider's new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub rotated: bool,
    pub state: ProviderState,
}

/// What every audit append needs: the chain key, and the rules for the webhook events the
/// appended events cause (see [`outbox`]).
pub(crate) struct ChainCtx {
    pub(crate) key: keyward_crypto::AuditChainKey,
    pub(crate) rules: OutboxRules,
}

/// The account id the platform's shared-pool keys are sealed to: their [`keyward_crypto::Binding`]
/// is `("platform", provider, key_id)`. Never a valid [`AccountId`] (those start `acc_`), so a
/// shared blob can never be opened as an account's key or the other way round.
pub const SHARED_KEY_ACCOUNT: &str = keyward_core::KeyOwner::SHARED_POOL;

/// One finished AI call, as [`Store::finish_calls`] settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub account_id: AccountId,
    /// The calendar month (`YYYY-MM`, UTC) the reservation was made in.
    pub period: String,
    pub provider: Provider,
    pub source: KeySource,
    /// Credits reserved before the call (0 for own-key calls), released now.
    pub reserved: i64,
    /// Credits the call cost (0 for own-key calls); at most `reserved` for shared calls.
    pub charged: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Its `ai.request` event, for `account_id`'s chain.
    pub audit: NewAuditEvent,
    /// The lease its reservation is held under ([`Store::reserve_lease`]), settled with it;
    /// `None` for a call that reserved nothing (or with [`Store::reserve_credits`]).
    pub lease: Option<LeaseId>,
}

/// One account's metering for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub credits_used: i64,
    /// Held by calls in flight.
    pub credits_reserved: i64,
    /// Always all six rows: `Provider::ALL` × [`KEY_SOURCES`], in that order, zeros when none.
    pub by_provider: Vec<ProviderUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUsage {
    pub provider: Provider,
    pub source: KeySource,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// Both key sources, in the order [`UsageReport::by_provider`] lists them.
pub const KEY_SOURCES: [KeySource; 2] = [KeySource::Shared, KeySource::Own];

/// Checks a metering period: `YYYY-MM` with a month 01–12.
pub(crate) fn check_period(period: &str) -> StoreResult<()> {
    let b = period.as_bytes();
    let ok = match b {
        [y0, y1, y2, y3, b'-', m0, m1] => {
            [y0, y1, y2, y3, m0, m1].iter().all(|c| c.is_ascii_digit())
                && matches!((*m0, *m1), (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2'))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid("period must be YYYY-MM".to_owned()))
    }
}

/// Checks a credit amount: 0 or more.
pub(crate) fn check_amount(what: &str, n: i64) -> StoreResult<()> {
    if n < 0 {
        return Err(StoreError::Invalid(format!("{what} must be 0 or more, got {n}")));
    }
    Ok(())
}

/// Checks that an event handed in with a change belongs with it.
pub(crate) fn check_event(
    event: &NewAuditEvent,
    account: &AccountId,
    action: AuditAction,
    what: &str,
) -> StoreResult<()> {
    if &event.account_id != account {
        return Err(StoreError::Invalid(format!(
            "{what}: audit event is for another account"
        )));
    }
    if event.action != action {
        return Err(StoreError::Invalid(format!(
            "{what}: audit event is {}, expected {}",
            event.action.as_str(),
            action.as_str()
        )));
    }
    Ok(())
}

/// Prefixes an error with the batch position of the record that caused it.
pub(crate) fn at_record(i: usize, e: StoreError) -> StoreError {
    match e {
        StoreError::Invalid(m) => StoreError::Invalid(format!("call record {i}: {m}")),
        other => other,
    }
}

fn check_record(r: &CallRecord) -> StoreResult<()> {
    check_period(&r.period)?;
    check_amount("reserved", r.reserved)?;
    check_amount("charged", r.charged)?;
    check_amount("input_tokens", r.input_tokens)?;
    check_amount("output_tokens", r.output_tokens)?;
    check_event(&r.audit, &r.account_id, AuditAction::AiRequest, "finish_calls")
}

/// A `finish_calls` batch, checked and folded: one credit change per (account, period) and
/// one counter change per (account, period, provider, source), in key order. Folding gives
/// the same end state as applying the records one by one (releases and charges only add
/// up) with far fewer statements, and every backend touches the rows in the same order.
pub(crate) struct FoldedCalls<'a> {
    /// (account, period) → (credits to release, credits to charge).
    pub credits: BTreeMap<(&'a str, &'a str), (i64, i64)>,
    /// (account, period, provider, source) → (requests, input tokens, output tokens).
    pub counters: BTreeMap<CounterKey<'a>, (i64, i64, i64)>,
}

/// A usage counter row's key: (account, period, provider, source).
pub(crate) type CounterKey<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Checks every record (naming the first bad one) before anything is written, and folds them.
pub(crate) fn fold_calls(records: &[CallRecord]) -> StoreResult<FoldedCalls<'_>> {
    let mut folded = FoldedCalls {
        credits: BTreeMap::new(),
        counters: BTreeMap::new(),
    };
    for (i, r) in records.iter().enumerate() {
        check_record(r).map_err(|e| at_record(i, e))?;
        let c = folded
            .credits
            .entry((r.account_id.as_str(), r.period.as_str()))
            .or_default();
        c.0 = c.0.saturating_add(r.reserved);
        c.1 = c.1.saturating_add(r.charged);
        let u = folded
            .counters
            .entry((
                r.account_id.as_str(),
                r.period.as_str(),
                r.provider.as_str(),
                r.source.as_str(),
            ))
            .or_default();
        u.0 = u.0.saturating_add(1);
        u.1 = u.1.saturating_add(r.input_tokens);
        u.2 = u.2.saturating_add(r.output_tokens);
    }
    Ok(folded)
}

/// A period's report from the rows found: all six (provider, source) rows in order, zeros
/// where nothing was found.
pub(crate) fn usage_report(credits_used: i64, credits_reserved: i64, found: &[ProviderUsage]) -> UsageReport {
    let mut by_provider = Vec::with_capacity(Provider::ALL.len() * KEY_SOURCES.len());
    for provider in Provider::ALL {
        for source in KEY_SOURCES {
            by_provider.push(
                found
                    .iter()
                    .find(|u| u.provider == provider && u.source == source)
                    .cloned()
                    .unwrap_or(ProviderUsage {
                        provider,
                        source,
                        requests: 0,
                        input_tokens: 0,
                        output_tokens: 0,
                    }),
            );
        }
    }
    UsageReport {
        credits_used,
        credits_reserved,
        by_provider,
    }
}

/// A settings-page session as the store keeps it: its user and times, never its id (the
/// store knows only the id's SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub user: User,
    pub created_at: UnixMillis,
    pub last_seen_at: UnixMillis,
}

/// When sessions end: `idle_ms` after their last use, `max_ms` after they began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub idle_ms: i64,
    pub max_ms: i64,
}

impl SessionLimits {
    /// (last seen after, created after): a session is live at `now` when both hold.
    pub(crate) fn cutoffs(self, now: UnixMillis) -> (i64, i64) {
        (
            now.as_i64().saturating_sub(self.idle_ms),
            now.as_i64().saturating_sub(self.max_ms),
        )
    }
}

/// Which of an account's audit events to read ([`Store::audit_search`]); `None` matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub provider: Option<Provider>,
    pub key_source: Option<KeySource>,
    pub last4: Option<String>,
    /// Events at or after this time.
    pub from: Option<UnixMillis>,
    /// Events before this time.
    pub until: Option<UnixMillis>,
}

/// What the audit log says about an account's own key's calls ([`Store::key_call_health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCallHealth {
    /// The newest own-key call that worked, since the key was saved.
    pub last_ok_at: Option<UnixMillis>,
    /// Own-key calls that failed in the window, per outcome (`error:<diagnosis>`), most first.
    pub failures: Vec<FailureCount>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureCount {
    /// The diagnosis (`invalid_key`, `no_credit`, …): the outcome without `error:`.
    pub diagnosis: String,
    pub count: i64,
    pub last_at: UnixMillis,
}

impl KeyCallHealth {
    /// The newest failure in the window.
    pub fn last_failure_at(&self) -> Option<UnixMillis> {
        self.failures.iter().map(|f| f.last_at).max()
    }

    /// The key's newest call in the window failed (no success since its newest failure).
    pub fn failing(&self) -> bool {
        match (self.last_failure_at(), self.last_ok_at) {
            (Some(f), Some(ok)) => f > ok,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Failures in the window, all diagnoses together.
    pub fn failed(&self) -> i64 {
        self.failures.iter().map(|f| f.count).sum()
    }
}

/// Turns grouped failure rows into [`KeyCallHealth::failures`], most frequent first.
pub(crate) fn failure_counts(rows: Vec<(String, i64, i64)>) -> Vec<FailureCount> {
    let mut out: Vec<FailureCount> = rows
        .into_iter()
        .map(|(outcome, count, last)| FailureCount {
            diagnosis: outcome.strip_prefix("error:").unwrap_or(&outcome).to_owned(),
            count,
            last_at: UnixMillis(last),
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.diagnosis.cmp(&b.diagnosis)));
    out
}

/// The database, as the rest of keyward sees it. Every method is one unit of work;
/// methods that change keys append their audit event in the same transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;

    // ---- users and tokens -------------------------------------------------------------
    /// Creates a user with one API token (given as its hash). `Conflict` if the email exists.
    async fn create_user(&self, id: &UserId, email: &Email, token_hash: &str, now: UnixMillis) -> StoreResult<()>;
    async fn user_by_token(&self, token_hash: &str) -> StoreResult<Option<User>>;
    /// [`Store::user_by_token`] and [`Store::membership`] in one read (every AI call starts
    /// with both): `None` for an unknown token, else the user and their membership of
    /// `account` (`None` when they are not a member).
    async fn member_by_token(
        &self,
        token_hash: &str,
        account: &AccountId,
    ) -> StoreResult<Option<(User, Option<Membership>)>>;
    /// [`Store::member_by_token`] and [`Store::call_key`] in one read: everything an
    /// own-key AI call looks up before it opens its key. `None` for an unknown token; else
    /// the user and, only when they are a member of `account`, their membership and the
    /// account's key for `provider` (a non-member's lookup reads no key).
    async fn member_and_call_key(
        &self,
        token_hash: &str,
        account: &AccountId,
        provider: Provider,
    ) -> StoreResult<Option<(User, Option<(Membership, CallKey)>)>>;
    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>>;
    async fn count_users(&self) -> StoreResult<i64>;

    // ---- accounts and memberships -----------------------------------------------------
    /// Creates an account with `owner` as its owner.
    async fn create_account(
        &self,
        id: &AccountId,
        name: &str,
        plan: Plan,
        owner: &UserId,
        now: UnixMillis,
    ) -> StoreResult<()>;
    /// Adds a member or changes their role.
    async fn set_membership(&self, account: &AccountId, user: &UserId, role: Role, now: UnixMillis) -> StoreResult<()>;
    /// Sets the plan and, with `Some`, the monthly limit override (`None` keeps the current
    /// override). When the plan or the effective limit changes, appends `account.plan_changed`
    /// (detail e.g. `pro -> free`) in the same transaction; returns whether it changed.
    /// `NotFound` for an unknown account.
    async fn set_plan(
        &self,
        account: &AccountId,
        plan: Plan,
        limit: Option<i64>,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<bool>;
    async fn account(&self, account: &AccountId) -> StoreResult<Option<Account>>;
    async fn account_ids(&self) -> StoreResult<Vec<AccountId>>;
    /// The caller's membership of one account: `None` when they are not a member.
    async fn membership(&self, account: &AccountId, user: &UserId) -> StoreResult<Option<Membership>>;
    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>>;

    // ---- services and the provisioning API (the product's own ids) ----------------------
    /// Creates a service with its token (given as its hash). `Conflict` when a live service
    /// already has that name.
    async fn create_service(
        &self,
        id: &ServiceId,
        name: &str,
        scopes: &[Scope],
        token_hash: &str,
        now: UnixMillis,
    ) -> StoreResult<()>;
    /// The live (not revoked) service a token belongs to. Read on every request: a
    /// revocation is seen at once by every node.
    async fn service_by_token(&self, token_hash: &str) -> StoreResult<Option<Service>>;
    /// Every service, revoked ones included, oldest first.
    async fn services(&self) -> StoreResult<Vec<Service>>;
    /// Revokes the live service named `name`: `None` when there is none.
    async fn revoke_service(&self, name: &str, now: UnixMillis) -> StoreResult<Option<Service>>;
    async fn account_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalAccount>>;
    /// Creates the account known as `external` (as `new_id`, with no member yet) or sets its
    /// name, plan and limit, in one transaction: concurrent calls for one new external id
    /// make one account (the unique index decides; the others update it). A change of plan
    /// or effective limit appends `account.plan_changed` in the same transaction; a call
    /// that changes nothing writes nothing.
    async fn put_external_account(
        &self,
        external: &ExternalId,
        new_id: &AccountId,
        spec: &AccountSpec,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<AccountPut>;
    /// Deletes an account in one transaction: every saved key (each with its `key.removed`
    /// event), then `account.deleted` (with `detail`) closes its audit chain, then its
    /// memberships, sources, credits and counters and the account row. The chain itself
    /// is kept (for `audit verify` and `export`). Returns the number of keys removed;
    /// `NotFound` for an unknown account. The caller purges the removed ciphertext.
    async fn delete_account(
        &self,
        account: &AccountId,
        actor: &AuditActor,
        detail: Option<String>,
        now: UnixMillis,
    ) -> StoreResult<usize>;
    async fn user_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalUser>>;
    /// Creates the user known as `external` (as `new_id`, with no token) or sets their
    /// email, in one transaction. `Conflict` when another user has that email.
    async fn put_external_user(
        &self,
        external: &ExternalId,
        new_id: &UserId,
        email: &Email,
        now: UnixMillis,
    ) -> StoreResult<ExternalUser>;
    /// Removes a membership; whether there was one.
    async fn remove_membership(&self, account: &AccountId, user: &UserId) -> StoreResult<bool>;
    /// Every account with an audit chain or an account row (deleted accounts keep their
    /// chain), for `audit verify`.
    async fn chain_account_ids(&self) -> StoreResult<Vec<AccountId>>;

    // ---- provider keys and sources ----------------------------------------------------
    /// All three providers, in `Provider::ALL` order.
    async fn provider_states(&self, account: &AccountId) -> StoreResult<Vec<ProviderState>>;
    async fn provider_state(&self, account: &AccountId, provider: Provider) -> StoreResult<ProviderState>;
    /// Saves or rotates (overwriting the old blob in place) and appends `key.saved` or
    /// `key.rotated`. The source is left as it was.
    async fn save_key(
        &self,
        account: &AccountId,
        provider: Provider,
        key: NewKey,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<Saved>;
    /// Deletes the key, sets the source back to shared, appends `key.removed`.
    /// `NoKeySaved` when there was none.
    async fn remove_key(
        &self,
        account: &AccountId,
        provider: Provider,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<()>;
    /// Sets the source and appends `key.source_changed` when it changed.
    /// `NoKeySaved` for `own` without a saved key.
    async fn set_source(
        &self,
        account: &AccountId,
        provider: Provider,
        source: KeySource,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<ProviderState>;
    /// What an AI call needs to pick its key, in one read (the hot path): the account's
    /// source for `provider` and the sealed key that source selects: its own key, or the
    /// shared pool's. `key` is `None` when the selected key does not exist.
    async fn call_key(&self, account: &AccountId, provider: Provider) -> StoreResult<CallKey>;
    /// The sealed key, for a worker to open.
    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>>;
    /// Stores `result` as the key's last_test only if the saved key is still `key_id` (a test
    /// that raced a rotation must not label the new key), and appends `event` (action
    /// `key.tested`, for `account`) in the same transaction either way. A test that worked
    /// clears the key's leaked mark. Returns whether last_test was stored. `Invalid` when
    /// `event` is for another account or action.
    async fn record_key_test(
        &self,
        account: &AccountId,
        provider: Provider,
        key_id: &KeyId,
        result: &LastTest,
        event: &NewAuditEvent,
    ) -> StoreResult<bool>;
    /// Marks the key as reported leaked by its provider, only if the saved key is still
    /// `key_id` (and keeps the first time it was marked). Returns whether it was marked now.
    /// The call or test that found it is audited by its caller.
    async fn mark_key_leaked(
        &self,
        account: &AccountId,
        provider: Provider,
        key_id: &KeyId,
        now: UnixMillis,
    ) -> StoreResult<bool>;

    // ---- the platform's shared-pool keys ---------------------------------------------------
    /// Saves or rotates the platform's key for `provider` (overwriting the old blob in place).
    /// The blob is sealed to ([`SHARED_KEY_ACCOUNT`], provider, key_id). Returns whether a key
    /// was replaced. Not in any account's audit chain (the platform is not an account).
    async fn save_shared_key(&self, provider: Provider, key: NewKey, now: UnixMillis) -> StoreResult<bool>;
    /// The platform's sealed key for `provider`, for a worker to open.
    async fn shared_key(&self, provider: Provider) -> StoreResult<Option<StoredKey>>;

    // ---- shared-pool metering (per calendar month, `period` = "YYYY-MM") ------------------
    /// Atomically reserves `amount` credits if `credits_used + credits_reserved + amount <= limit`;
    /// `Ok(false)` when it would exceed (and nothing changes). One conditional update in the
    /// database, so the cap holds across processes. Own-key calls never call this.
    /// A refusal past 80% of the limit may announce the pool as spent (`shared.quota_threshold`,
    /// dated `now`; see [`outbox::thresholds_crossed`]). A bare reservation: nothing releases
    /// it if its holder dies; the gateway reserves with [`Store::reserve_lease`].
    async fn reserve_credits(
        &self,
        account: &AccountId,
        period: &str,
        limit: i64,
        amount: i64,
        now: UnixMillis,
    ) -> StoreResult<bool>;
    /// Group commit for finished AI calls: ONE transaction for the whole batch. For each
    /// record, in order: settle its lease if it names one (`Invalid`, naming the record, when
    /// that lease was released meanwhile: the call is already on record as abandoned and
    /// must not be charged too), release its reservation (`credits_reserved -= reserved`), charge
    /// (`credits_used += charged`), bump the usage counters of (account, period, provider,
    /// source), and append its `ai.request` event to the account's chain. Durable when it
    /// returns. All or nothing: `Invalid` (naming the record) is checked before anything is
    /// written, so a caller can drop the bad record and retry the rest.
    async fn finish_calls(&self, records: &[CallRecord]) -> StoreResult<()>;
    /// [`Store::finish_calls`] where a record the store refuses fails alone: one result per
    /// record, in order. Each record is checked first (a malformed one is refused without a
    /// transaction); the others commit in one transaction. If the database refuses that
    /// transaction (a constraint, e.g. a call of an account deleted meanwhile), it rolled
    /// back whole, and the batch is split in halves, left half first, until the refused
    /// records stand alone: every other record commits exactly once, each account's events
    /// keep their order, and a record's settlement and its event are never apart. A failure
    /// that is not the records' (the database unavailable) fails every record not yet
    /// committed, with nothing retried.
    async fn finish_calls_isolated(&self, records: &[CallRecord]) -> Vec<StoreResult<()>> {
        let mut results: Vec<Option<StoreResult<()>>> = vec![None; records.len()];
        let mut good: Vec<CallRecord> = Vec::with_capacity(records.len());
        let mut index: Vec<usize> = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            match check_record(r) {
                Ok(()) => {
                    good.push(r.clone());
                    index.push(i);
                }
                Err(e) => results[i] = Some(Err(at_record(i, e))),
            }
        }
        // Ranges of `good` still to commit, as a stack whose top is the leftmost.
        let mut pending: Vec<std::ops::Range<usize>> = Vec::with_capacity(8);
        pending.push(0..good.len());
        while let Some(range) = pending.pop() {
            let Some(batch) = good.get(range.clone()) else { continue };
            if batch.is_empty() {
                continue;
            }
            let outcome = self.finish_calls(batch).await;
            let split = matches!(&outcome, Err(e) if batch.len() > 1 && !matches!(e, StoreError::Unavailable(_)));
            if split {
                let mid = range.start + batch.len() / 2;
                pending.push(mid..range.end);
                pending.push(range.start..mid);
                continue;
            }
            let give_up = matches!(&outcome, Err(StoreError::Unavailable(_)));
            for &i in index.get(range).unwrap_or_default() {
                results[i] = Some(outcome.clone());
            }
            if give_up {
                for rest in pending.drain(..) {
                    for &i in index.get(rest).unwrap_or_default() {
                        results[i] = Some(outcome.clone());
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Database("record left unsettled".to_owned()))))
            .collect()
    }
    /// Releases a reservation without charging (the call failed before a provider was reached).
    async fn release_credits(&self, account: &AccountId, period: &str, amount: i64) -> StoreResult<()>;

    // ---- shared-pool reservations as leases (see [`lease`]) ---------------------------------
    /// [`Store::reserve_credits`] for `lease.amount` in `lease.period`, and in the same
    /// transaction the lease row that holds the reservation until the call is settled
    /// ([`Store::finish_calls`] with a record naming the lease) or released
    /// ([`Store::release_leases`]). `None` when the cap refuses (nothing is written, as for
    /// `reserve_credits`).
    async fn reserve_lease(&self, lease: &NewLease, limit: i64, now: UnixMillis) -> StoreResult<Option<LeaseId>>;
    /// Moves the expiry of the leases `ids` that run `run` still holds to `expires_at`;
    /// returns those it renewed (a lease missing from the answer was released meanwhile).
    async fn renew_leases(&self, run: &str, ids: &[LeaseId], expires_at: UnixMillis) -> StoreResult<Vec<LeaseId>>;
    /// Releases up to `limit` leases chosen by `which`, each exactly once however many
    /// nodes release at the same time: its credits return (`credits_reserved` drops), and
    /// one `ai.request` event with outcome `error:abandoned` is appended to its account's
    /// chain (with the call's actor, provider, model, key source, feature and member), dated
    /// `now`; a settled lease is never released. Returns the leases this call released.
    async fn release_leases(
        &self,
        which: LeaseRelease<'_>,
        now: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<ReleasedLease>>;
    /// Credits and usage counters of one period: zeros for a period with no calls.
    async fn usage(&self, account: &AccountId, period: &str) -> StoreResult<UsageReport>;

    // ---- audit --------------------------------------------------------------------------
    /// Appends events (in order) to their accounts' chains in one transaction: durable
    /// when this returns.
    async fn append_audit(&self, events: &[NewAuditEvent]) -> StoreResult<()>;
    /// Newest first; `before` is an event id (exclusive).
    async fn audit_page(&self, account: &AccountId, limit: u32, before: Option<i64>) -> StoreResult<Vec<AuditEvent>>;
    /// The whole chain, oldest first, with its head: what `audit verify` and `export` read.
    async fn audit_chain(&self, account: &AccountId) -> StoreResult<(Vec<AuditEvent>, Option<audit::ChainHead>)>;
    /// Appends one event to the platform's chain ([`PLATFORM_CHAIN`]) in its own
    /// transaction: durable when this returns.
    async fn append_platform_audit(&self, event: &NewPlatformEvent) -> StoreResult<()>;
    /// The platform's whole chain, oldest first, with its head (one snapshot).
    async fn platform_chain(&self) -> StoreResult<(Vec<PlatformEvent>, Option<audit::ChainHead>)>;
    /// The head of every chain that has one, in one snapshot: each account's (deleted
    /// accounts' included) by account id, and the platform's as [`PLATFORM_CHAIN`]. What a
    /// checkpoint records.
    async fn chain_heads(&self) -> StoreResult<Vec<(String, audit::ChainHead)>>;

    // ---- maintenance ----------------------------------------------------------------------
    /// Makes removed and overwritten ciphertext unrecoverable from the database files:
    /// on SQLite a `wal_checkpoint(TRUNCATE)` (with `secure_delete` on); on PostgreSQL a
    /// `VACUUM` of the key tables (dead row versions; WAL and backups are left to
    /// crypto-shredding, see DESIGN.md invariant 5). Returns false when it could not
    /// complete now (readers in the way) and should be retried.
    async fn purge_removed(&self) -> StoreResult<bool>;

    // ---- the webhook outbox (events are written by the changes above; see [`outbox`]) ------
    /// Claims up to `limit` due events for `node` until `lease_until`: for each account only
    /// its oldest event that is neither delivered nor dead (so an account's events go out in
    /// order), due by `now` and not under another live claim. A claim that expires (its node
    /// died) is free to take again.
    async fn claim_webhooks(
        &self,
        node: &str,
        now: UnixMillis,
        lease_until: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<WebhookEvent>>;
    /// Records an attempt on an event `node` claimed (the endpoints that have accepted it so
    /// far, and what comes next) and releases the claim. A claim `node` no longer holds is
    /// left alone (`Ok(false)`).
    async fn record_webhook_attempt(
        &self,
        id: i64,
        node: &str,
        delivered_to: &[usize],
        outcome: &AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<bool>;
    /// Frees every claim held by a node whose name starts with `holder_prefix`: at start, a
    /// node's earlier runs died with their process, and their events are due again now
    /// rather than when the dead claim's lease runs out. Returns how many were freed.
    async fn release_webhook_claims(&self, holder_prefix: &str) -> StoreResult<u64>;
    /// Newest first.
    async fn webhook_events(&self, filter: WebhookFilter, limit: u32) -> StoreResult<Vec<WebhookEvent>>;
    /// Sends an event again from scratch: due now, no attempts, no endpoint done, not dead.
    /// `false` for an unknown `event_id`.
    async fn replay_webhook(&self, event_id: &str, now: UnixMillis) -> StoreResult<bool>;
    async fn webhook_backlog(&self) -> StoreResult<OutboxBacklog>;
    /// Deletes events delivered before `delivered_before` (dead ones stay for `replay`);
    /// returns how many.
    async fn prune_webhooks(&self, delivered_before: UnixMillis) -> StoreResult<u64>;

    // ---- settings-page sessions (only the SHA-256 of a session id, `id_hash`, is stored) ---
    /// Starts a session for `user`, seen at `now`. `Conflict` if `id_hash` exists.
    async fn create_session(&self, id_hash: &str, user: &UserId, now: UnixMillis) -> StoreResult<()>;
    /// The live session (see [`SessionLimits`]), marked as seen at `now`; `None` when there
    /// is none or it has expired (an expired one is deleted).
    async fn touch_session(
        &self,
        id_hash: &str,
        now: UnixMillis,
        limits: SessionLimits,
    ) -> StoreResult<Option<WebSession>>;
    /// Ends one session; true when there was one.
    async fn end_session(&self, id_hash: &str) -> StoreResult<bool>;
    /// Ends every session of `user` (sign out everywhere); how many there were.
    async fn end_user_sessions(&self, user: &UserId) -> StoreResult<u64>;
    /// Keeps a message for the session's next page view (replacing one kept before).
    async fn set_session_flash(&self, id_hash: &str, flash: &str) -> StoreResult<()>;
    /// The message kept for the session, once: it is cleared as it is read.
    async fn take_session_flash(&self, id_hash: &str) -> StoreResult<Option<String>>;
    /// Deletes sessions expired at `now`; how many.
    async fn prune_sessions(&self, now: UnixMillis, limits: SessionLimits) -> StoreResult<u64>;

    // ---- what the activity page and a key's card read from the audit log ------------------
    /// An account's events that match `filter`, newest first (by time, then seq), skipping
    /// `offset` and at most `limit` (`None`: all). Filtered in the database.
    async fn audit_search(
        &self,
        account: &AccountId,
        filter: &AuditFilter,
        limit: Option<u32>,
        offset: u64,
    ) -> StoreResult<Vec<AuditEvent>>;
    /// The `ai.request` events on the account's own key for `provider`: the newest that
    /// worked at or after `since` (when the key was saved), and those that failed
    /// (`error:<diagnosis>`) at or after `window_start` (and `since`), grouped by diagnosis.
    async fn key_call_health(
        &self,
        account: &AccountId,
        provider: Provider,
        since: UnixMillis,
        window_start: UnixMillis,
    ) -> StoreResult<KeyCallHealth>;
    /// The users with these ids that exist (any order).
    async fn users_by_ids(&self, ids: &[UserId]) -> StoreResult<Vec<User>>;
}
