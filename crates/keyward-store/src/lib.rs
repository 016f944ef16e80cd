//! keyward's persistence: one [`Store`] trait, one implementation per database.
//!
//! Owns: the schema and its migrations (`migrations/<backend>/`), one repository method
//! per aggregate change (users and tokens, accounts and memberships, provider keys and
//! sources, the audit chain), and the audit chain's canonical form and verification.
//! A key change and its audit event commit in one transaction, so neither exists without
//! the other.
//!
//! Must never: hold or see a plaintext key (it stores [`SealedKey`] blobs only), log a
//! blob, or let a backend's SQL dialect leak into the types below: the server sees only
//! this trait, so SQLite and PostgreSQL stay interchangeable.

pub mod audit;
mod migrate;
pub mod sqlite;

use async_trait::async_trait;
use keyward_core::{AccountId, Email, KeyId, KeySource, Last4, Plan, Provider, Role, UnixMillis, UserId};
use keyward_crypto::SealedKey;

pub use audit::{AuditAction, AuditEvent, ChainBreak, NewAuditEvent};
pub use sqlite::SqliteStore;

/// What can go wrong in the store, in terms the server maps to stable API codes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists: {0}")]
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
}

/// A key to save: sealed by the caller, bound to (account, provider, key_id).
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key_id: KeyId,
    pub sealed: SealedKey,
    pub last4: Last4,
}

/// The result of a save: whether it replaced a key, and the provider's new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub rotated: bool,
    pub state: ProviderState,
}

/// Who did something, as written in the audit log (`usr_…`, or `cli` for the admin CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

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
    /// `limit: None` keeps the current limit override.
    async fn set_plan(&self, account: &AccountId, plan: Plan, limit: Option<i64>) -> StoreResult<()>;
    async fn account(&self, account: &AccountId) -> StoreResult<Option<Account>>;
    async fn account_ids(&self) -> StoreResult<Vec<AccountId>>;
    /// The caller's membership of one account: `None` when they are not a member.
    async fn membership(&self, account: &AccountId, user: &UserId) -> StoreResult<Option<Membership>>;
    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>>;

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
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<Saved>;
    /// Deletes the key, sets the source back to shared, appends `key.removed`.
    /// `NoKeySaved` when there was none.
    async fn remove_key(
        &self,
        account: &AccountId,
        provider: Provider,
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<()>;
    /// Sets the source and appends `key.source_changed` when it changed.
    /// `NoKeySaved` for `own` without a saved key.
    async fn set_source(
        &self,
        account: &AccountId,
        provider: Provider,
        source: KeySource,
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<ProviderState>;
    /// The sealed key, for a worker to open.
    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>>;

    // ---- audit --------------------------------------------------------------------------
    /// Appends events (in order) to their accounts' chains in one transaction: durable
    /// when this returns.
    async fn append_audit(&self, events: &[NewAuditEvent]) -> StoreResult<()>;
    /// Newest first; `before` is an event id (exclusive).
    async fn audit_page(&self, account: &AccountId, limit: u32, before: Option<i64>) -> StoreResult<Vec<AuditEvent>>;
    /// The whole chain, oldest first, with its head: what `audit verify` and `export` read.
    async fn audit_chain(&self, account: &AccountId) -> StoreResult<(Vec<AuditEvent>, Option<audit::ChainHead>)>;

    // ---- maintenance ----------------------------------------------------------------------
    /// Makes removed and overwritten ciphertext unrecoverable from the database files:
    /// on SQLite a `wal_checkpoint(TRUNCATE)` (with `secure_delete` on). Returns false when
    /// it could not complete now (readers in the way) and should be retried.
    async fn purge_removed(&self) -> StoreResult<bool>;
}
