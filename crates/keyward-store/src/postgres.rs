//! The PostgreSQL backend: many gateway nodes on one database.
//!
//! Every read-modify-write is one `READ COMMITTED` transaction that locks what it reads
//! before deciding on it, so two nodes racing on one account serialize on its rows:
//! - a key save locks the key row (`SELECT … FOR UPDATE`, or wins the insert), so exactly
//!   one of two racing first saves reports "saved" and the other "rotated";
//! - an audit append creates the account's head row if missing (`INSERT … ON CONFLICT DO
//!   NOTHING` with the genesis link) and locks it (`SELECT … FOR UPDATE`) before reading
//!   the chain's newest link, so concurrent appends from any number of nodes form one chain;
//! - a credit reservation is one conditional `UPDATE`, which PostgreSQL re-checks against the
//!   newest committed row after waiting for its lock, so the cap holds across nodes.
//!
//! Locks are always taken in one order, so transactions do not deadlock each other: key rows,
//! then source rows, then reservation leases, then credit and counter rows (in key order), then
//! audit heads (in account-id byte order). A sweep of expired leases skips the lease rows
//! another transaction holds (`FOR UPDATE SKIP LOCKED`), so it never waits on one. A transaction that fails anyway with a serialization failure or a
//! deadlock (SQLSTATE 40001, 40P01) is retried a few times before the error is returned.
//!
//! Schema changes run under a transaction-scoped advisory lock, so nodes starting together
//! apply each migration once. `purge_removed` vacuums the key tables (old row versions of
//! rotated and removed blobs); WAL segments and backups are covered by crypto-shredding.
//!
//! PostgreSQL `TEXT` cannot hold a NUL character: in what is written on behalf of a provider
//! (audit event fields, a key test's message) a NUL is replaced by U+FFFD before the event is
//! chained, so a provider's odd answer cannot make a batch of audit events fail to commit.

mod kek;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::{
    AccountId, Email, ExternalId, KeyId, KeyKind, KeySource, Last4, Plan, Provider, Role, Scope, ServiceId, UnixMillis,
    UserId,
};
use keyward_crypto::{AuditChainKey, SealedKey, GENESIS_MAC};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use crate::audit::{AuditAction, AuditEvent, ChainHead, NewAuditEvent, NewPlatformEvent, PlatformEvent};
use crate::lease::{check_lease, lease_gone, LeaseRow};
use crate::migrate::POSTGRES as MIGRATIONS;
use crate::outbox::{
    self, AttemptOutcome, CallHealth, OutboxBacklog, OutboxRules, Trigger, WebhookEvent, WebhookFilter, WebhookKind,
};
use crate::{
    check_amount, check_event, check_period, fold_calls, parse_scopes, plan_change_detail, scopes_column, usage_report,
    Account, AccountPut, AccountSpec, AuditActor, CallKey, CallRecord, ChainCtx, ExternalAccount, ExternalUser,
    FoldedCalls, KeyMeta, LastTest, Membership, NewKey, ProviderState, ProviderUsage, Saved, Service, Store,
    StoreError, StoreResult, StoredKey, UsageReport, User,
};
use crate::{failure_counts, AuditFilter, KeyCallHealth, SessionLimits, WebSession};
use crate::{LeaseId, LeaseRelease, NewLease, ReleasedLease};

/// Tuning for the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections per node.
    pub pool_size: u32,
    /// The longest one statement may run (lock waits included) before the server cancels it.
    pub statement_timeout: Duration,
    /// The longest to wait for a connection: a new one, or a free one from the pool.
    pub connect_timeout: Duration,
    pub outbox: OutboxRules,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 10,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            outbox: OutboxRules::default(),
        }
    }
}

pub struct PgStore {
    pool: PgPool,
    chain_key: Arc<ChainCtx>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// How many times a transaction runs when it keeps failing with a serialization failure or
/// a deadlock.
const TX_ATTEMPTS: u32 = 4;

/// The advisory lock key serializing migrations across nodes ("keyward" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6579_7761_7264;

/// Starts a read-only transaction whose statements all see one snapshot.
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

/// A failed step inside a transaction: the error, and whether the whole transaction may be
/// run again (a serialization failure or a deadlock: nothing was written).
#[derive(Debug)]
struct Fail {
    err: StoreError,
    retry: bool,
}

impl From<StoreError> for Fail {
    fn from(err: StoreError) -> Fail {
        Fail { err, retry: false }
    }
}

type TxResult<T> = Result<T, Fail>;

/// How a transaction body ends when it did not fail.
enum Finish<T> {
    Commit(T),
    /// Nothing it wrote is wanted (a refused reservation, an unchanged source).
    Rollback(T),
}

fn pg(e: sqlx::Error) -> Fail {
    let retry = matches!(&e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")));
    Fail { err: map_err(e), retry }
}

fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(5u64 << attempt.min(6))
}

/// Runs `$body` in a transaction on `$store.pool`, with `$conn: &mut PgConnection` bound to
/// it. The body evaluates to a [`Finish`] and may use `?` on `TxResult`, `StoreResult` and
/// (through `map_err(pg)`) sqlx results. On a serialization failure or deadlock the whole
/// body runs again, in a new transaction, up to `TX_ATTEMPTS` times. Evaluates to
/// `StoreResult<T>`.
macro_rules! transaction {
    ($store:expr, |$conn:ident| $body:expr) => {
        transaction!($store, None, |$conn| $body)
    };
    ($store:expr, $begin:expr, |$conn:ident| $body:expr) => {{
        let begin: Option<&'static str> = $begin;
        let mut attempt: u32 = 1;
        loop {
            let result: TxResult<_> = async {
                let mut tx = match begin {
                    None => $store.pool.begin().await,
                    Some(statement) => $store.pool.begin_with(statement).await,
                }
                .map_err(pg)?;
                let finish = {
                    let $conn: &mut PgConnection = &mut tx;
                    $body
                };
                match finish {
                    Finish::Commit(value) => {
                        tx.commit().await.map_err(pg)?;
                        Ok(value)
                    }
                    Finish::Rollback(value) => {
                        tx.rollback().await.map_err(pg)?;
                        Ok(value)
                    }
                }
            }
            .await;
            match result {
                Ok(value) => break Ok(value),
                Err(fail) if fail.retry && attempt < TX_ATTEMPTS => {
                    tracing::debug!(attempt, error = %fail.err, "transaction conflicted; running it again");
                    tokio::time::sleep(retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(fail) => break Err(fail.err),
            }
        }
    }};
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`) and migrates it.
    pub async fn open(url: &str, chain_key: AuditChainKey, opts: PgOptions) -> StoreResult<PgStore> {
        // The URL is not echoed: it may hold a password.
        let connect = PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::Unavailable("bad PostgreSQL URL".to_owned()))?
            .application_name("keyward")
            .options([("statement_timeout", opts.statement_timeout.as_millis())]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.pool_size.max(1))
            .acquire_timeout(opts.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(map_connect_err)?;
        let store = PgStore {
            pool,
            chain_key: Arc::new(ChainCtx {
                key: chain_key,
                rules: opts.outbox,
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations, each in its own transaction holding the migration lock:
    /// a node that starts while another migrates waits, then finds the work done.
    async fn migrate(&self) -> StoreResult<()> {
        for m in MIGRATIONS {
            let applied = transaction!(self, |conn| {
                // A schema change may outlast the statement timeout, and so may a wait for
                // another node's: neither should stop a node from starting. (And no notice
                // that the table below exists, logged at every start.)
                sqlx::raw_sql("SET LOCAL statement_timeout = 0; SET LOCAL client_min_messages = warning")
                    .execute(&mut *conn)
                    .await
                    .map_err(pg)?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *conn)
                    .await
                    .map_err(pg)?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS keyward_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
                )
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
                let done: Option<i64> = sqlx::query_scalar("SELECT version FROM keyward_migrations WHERE version = $1")
                    .bind(m.version)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(pg)?;
                if done.is_some() {
                    Finish::Commit(false)
                } else {
                    sqlx::raw_sql(m.sql).execute(&mut *conn).await.map_err(pg)?;
                    sqlx::query(
                        "INSERT INTO keyward_migrations (version, name, applied_at)
                         VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
                    )
                    .bind(m.version)
                    .bind(m.name)
                    .execute(&mut *conn)
                    .await
                    .map_err(pg)?;
                    Finish::Commit(true)
                }
            })?;
            if applied {
                tracing::info!(version = m.version, name = m.name, "applied migration");
            }
        }
        Ok(())
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            match code {
                // unique_violation
                "23505" => StoreError::Conflict(format!("already exists: {}", db.message())),
                // foreign_key_violation
                "23503" => StoreError::NotFound,
                // character_not_in_repertoire: a NUL in text
                "22021" => StoreError::Invalid(db.message().to_owned()),
                // serialization_failure and deadlock_detected (once retries are spent),
                // query_canceled (the statement timeout), lock_not_available,
                // read_only_sql_transaction (a standby after failover), admin_shutdown,
                // crash_shutdown, cannot_connect_now, connection exceptions (class 08) and
                // insufficient resources (class 53, e.g. too_many_connections).
                "40001" | "40P01" | "57014" | "55P03" | "25006" | "57P01" | "57P02" | "57P03" => {
                    StoreError::Unavailable(db.message().to_owned())
                }
                c if c.starts_with("08") || c.starts_with("53") => StoreError::Unavailable(db.message().to_owned()),
                _ => StoreError::Database(db.message().to_owned()),
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

/// A failed first connection, said so that an operator knows what to fix. TLS failures
/// are the ones rustls words for a programmer (`invalid peer certificate: UnknownIssuer`).
fn map_connect_err(e: sqlx::Error) -> StoreError {
    // rustls's refusal reaches sqlx as an I/O error during the handshake, or as a TLS error.
    let said = e.to_string();
    if !matches!(e, sqlx::Error::Tls(_)) && !said.contains("invalid peer certificate") {
        return map_err(e);
    }
    let said = said.trim_start_matches("error communicating with database: ");
    let why = if said.contains("UnknownIssuer") {
        "the server's certificate is not signed by the CA in sslrootcert (without sslrootcert, \
         by none of the public web CAs)"
    } else if said.contains("NotValidForName") || said.contains("not valid for name") {
        "the server's certificate does not name the host in the URL (sslmode=verify-full \
         checks the host name; connect by a name the certificate holds)"
    } else if said.contains("Expired") {
        "the server's certificate has expired"
    } else {
        "the TLS handshake failed"
    };
    StoreError::Unavailable(format!("TLS to PostgreSQL refused: {why} ({said})"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// Text as PostgreSQL can store it: NUL, which `TEXT` refuses, becomes U+FFFD.
fn storable(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn storable_opt(s: &mut Option<String>) {
    if let Some(v) = s.as_mut() {
        if v.contains('\0') {
            *v = storable(v);
        }
    }
}

fn get<'r, T>(row: &'r PgRow, col: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

fn account_from_row(row: &PgRow) -> StoreResult<Account> {
    let plan: Plan = get::<String>(row, "plan")?
        .parse()
        .map_err(|_| corrupt("accounts.plan"))?;
    let limit: Option<i64> = get(row, "shared_credit_limit")?;
    Ok(Account {
        id: AccountId::parse(&get::<String>(row, "account_id")?).map_err(|_| corrupt("accounts.id"))?,
        name: get(row, "name")?,
        plan,
        shared_credit_limit: limit.unwrap_or_else(|| plan.default_shared_credit_limit()),
    })
}

fn membership_from_row(row: &PgRow) -> StoreResult<Membership> {
    Ok(Membership {
        account: account_from_row(row)?,
        role: get::<String>(row, "role")?
            .parse()
            .map_err(|_| corrupt("memberships.role"))?,
    })
}

fn user_from_row(row: &PgRow) -> StoreResult<User> {
    Ok(User {
        id: UserId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("users.id"))?,
        email: Email::parse(&get::<String>(row, "email")?).map_err(|_| corrupt("users.email"))?,
    })
}

fn external_id_from_row(row: &PgRow, table: &str) -> StoreResult<ExternalId> {
    ExternalId::parse(&get::<String>(row, "external_id")?).map_err(|_| corrupt(&format!("{table}.external_id")))
}

fn external_account_from_row(row: &PgRow) -> StoreResult<ExternalAccount> {
    Ok(ExternalAccount {
        account: account_from_row(row)?,
        external_id: external_id_from_row(row, "accounts")?,
    })
}

fn external_user_from_row(row: &PgRow) -> StoreResult<ExternalUser> {
    Ok(ExternalUser {
        user: user_from_row(row)?,
        external_id: external_id_from_row(row, "users")?,
    })
}

fn service_from_row(row: &PgRow) -> StoreResult<Service> {
    Ok(Service {
        id: ServiceId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("services.id"))?,
        name: get(row, "name")?,
        scopes: parse_scopes(&get::<String>(row, "scopes")?)?,
        created_at: UnixMillis(get(row, "created_at")?),
        revoked_at: get::<Option<i64>>(row, "revoked_at")?.map(UnixMillis),
    })
}

const SERVICE_COLUMNS: &str = "id, name, scopes, created_at, revoked_at";
const EXTERNAL_ACCOUNT_SQL: &str =
    "SELECT a.id AS account_id, a.name, a.plan, a.shared_credit_limit, a.external_id FROM accounts a WHERE a.external_id = $1";

/// `Conflict` on a user's email, named.
fn email_taken(email: &Email) -> impl Fn(sqlx::Error) -> Fail + '_ {
    move |e| match pg(e) {
        Fail {
            err: StoreError::Conflict(_),
            ..
        } => StoreError::Conflict(format!("another user has the email {email}")).into(),
        other => other,
    }
}

fn key_meta_from_row(row: &PgRow) -> StoreResult<KeyMeta> {
    let last_test = match (
        get::<Option<bool>>(row, "last_test_ok")?,
        get::<Option<i64>>(row, "last_test_at")?,
    ) {
        (Some(ok), Some(at)) => Some(LastTest {
            ok,
            at: UnixMillis(at),
            message: get::<Option<String>>(row, "last_test_message")?.unwrap_or_default(),
            detail: get(row, "last_test_detail")?,
        }),
        _ => None,
    };
    Ok(KeyMeta {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt("provider_keys.key_id"))?,
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt("provider_keys.last4"))?,
        created_at: UnixMillis(get(row, "created_at")?),
        updated_at: UnixMillis(get(row, "updated_at")?),
        last_test,
        kind: get::<Option<String>>(row, "kind")?
            .map(|k| k.parse::<KeyKind>())
            .transpose()
            .map_err(|_| corrupt("provider_keys.kind"))?,
        reported_leaked_at: get::<Option<i64>>(row, "reported_leaked_at")?.map(UnixMillis),
    })
}

fn audit_from_row(row: &PgRow) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        id: get(row, "id")?,
        account_id: get(row, "account_id")?,
        seq: get(row, "seq")?,
        at: get(row, "at")?,
        actor: get(row, "actor")?,
        action: get(row, "action")?,
        provider: get(row, "provider")?,
        key_source: get(row, "key_source")?,
        key_last4: get(row, "key_last4")?,
        model: get(row, "model")?,
        outcome: get(row, "outcome")?,
        detail: get(row, "detail")?,
        provider_request_id: get(row, "provider_request_id")?,
        input_tokens: get(row, "input_tokens")?,
        output_tokens: get(row, "output_tokens")?,
        feature: get(row, "feature")?,
        on_behalf_of: get(row, "on_behalf_of")?,
        mac: get(row, "mac")?,
    })
}

/// A [`StoredKey`] from the `key_id`, `sealed`, `last4` and `reported_leaked_at` columns.
fn stored_key_from_row(row: &PgRow, table: &str) -> StoreResult<StoredKey> {
    Ok(StoredKey {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt(&format!("{table}.key_id")))?,
        sealed: SealedKey::from_bytes(get(row, "sealed")?),
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt(&format!("{table}.last4")))?,
        reported_leaked_at: get::<Option<i64>>(row, "reported_leaked_at")?.map(UnixMillis),
    })
}

/// A [`CallKey`] from the `source`, `key_id`, `sealed` and `last4` columns of a row (a
/// missing source is the default, shared).
fn call_key_from_row(row: &PgRow) -> StoreResult<CallKey> {
    let source = get::<Option<String>>(row, "source")?
        .map(|s| s.parse::<KeySource>())
        .transpose()
        .map_err(|_| corrupt("provider_sources.source"))?
        .unwrap_or_default();
    let table = match source {
        KeySource::Own => "provider_keys",
        KeySource::Shared => "shared_keys",
    };
    let key = match get::<Option<String>>(row, "key_id")? {
        Some(_) => Some(stored_key_from_row(row, table)?),
        None => None,
    };
    Ok(CallKey { source, key })
}

const ACCOUNT_COLUMNS: &str = "a.id AS account_id, a.name, a.plan, a.shared_credit_limit";
const KEY_COLUMNS: &str = "key_id, last4, created_at, updated_at, last_test_ok, last_test_at, last_test_message, \
     last_test_detail, kind, reported_leaked_at";
const AUDIT_COLUMNS: &str = "id, account_id, seq, at, actor, action, provider, key_source, key_last4, model, outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac, on_behalf_of";

/// The columns of a batch of audit rows, for one `INSERT … SELECT FROM UNNEST(…)`.
#[derive(Default)]
struct AuditColumns {
    account_id: Vec<String>,
    seq: Vec<i64>,
    at: Vec<i64>,
    actor: Vec<String>,
    action: Vec<String>,
    provider: Vec<Option<String>>,
    key_source: Vec<Option<String>>,
    key_last4: Vec<Option<String>>,
    model: Vec<Option<String>>,
    outcome: Vec<String>,
    detail: Vec<Option<String>>,
    provider_request_id: Vec<Option<String>>,
    input_tokens: Vec<Option<i64>>,
    output_tokens: Vec<Option<i64>>,
    feature: Vec<Option<String>>,
    mac: Vec<Vec<u8>>,
    on_behalf_of: Vec<Option<String>>,
}

impl AuditColumns {
    fn push(&mut self, e: AuditEvent) {
        self.account_id.push(e.account_id);
        self.seq.push(e.seq);
        self.at.push(e.at);
        self.actor.push(e.actor);
        self.action.push(e.action);
        self.provider.push(e.provider);
        self.key_source.push(e.key_source);
        self.key_last4.push(e.key_last4);
        self.model.push(e.model);
        self.outcome.push(e.outcome);
        self.detail.push(e.detail);
        self.provider_request_id.push(e.provider_request_id);
        self.input_tokens.push(e.input_tokens);
        self.output_tokens.push(e.output_tokens);
        self.feature.push(e.feature);
        self.mac.push(e.mac);
        self.on_behalf_of.push(e.on_behalf_of);
    }
}

/// Appends events (in order) to their chains inside the caller's transaction, in four
/// statements however large the batch: create the missing heads (genesis links), lock every
/// head the batch touches in account-id order, insert all events, move the heads. Holding
/// the head locks until commit is what makes two nodes' appends to one chain take turns.
///
/// The webhook events they cause are written here too (see `outbox`): one per key change,
/// failed test and plan change, and each own-key call moves its key's failure streak. The
/// key rows a batch's calls bear on are locked first, before the audit heads, in the lock
/// order above.
async fn append_in_tx(conn: &mut PgConnection, chain: &ChainCtx, events: &[&NewAuditEvent]) -> TxResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let triggers: Vec<Trigger> = events.iter().map(|e| outbox::trigger(&chain.rules, e)).collect();
    let streak_keys: BTreeSet<(&str, &str)> = events
        .iter()
        .zip(&triggers)
        .filter(|(_, t)| matches!(t, Trigger::KeyCall(_)))
        .filter_map(|(e, _)| Some((e.account_id.as_str(), e.provider?.as_str())))
        .collect();
    let streak_starts = lock_streaks(conn, &streak_keys).await?;
    // Byte order, the same order `COLLATE "C"` sorts in below.
    let accounts: Vec<&str> = events
        .iter()
        .map(|e| e.account_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    sqlx::query(
        "INSERT INTO audit_heads (account_id, seq, mac)
         SELECT a, 0, $2 FROM UNNEST($1::text[]) WITH ORDINALITY AS u(a, n) ORDER BY n
         ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(&accounts)
    .bind(&GENESIS_MAC[..])
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    let rows = sqlx::query(
        "SELECT account_id, seq, mac FROM audit_heads WHERE account_id = ANY($1::text[])
         ORDER BY account_id COLLATE \"C\" FOR UPDATE",
    )
    .bind(&accounts)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg)?;
    let mut heads: BTreeMap<String, (i64, [u8; 32])> = BTreeMap::new();
    for r in &rows {
        let mac: Vec<u8> = get(r, "mac")?;
        let mac: [u8; 32] = mac.as_slice().try_into().map_err(|_| corrupt("audit_heads.mac"))?;
        heads.insert(get(r, "account_id")?, (get(r, "seq")?, mac));
    }
    if heads.len() != accounts.len() {
        return Err(StoreError::Database("an audit head vanished while locked".to_owned()).into());
    }
    let mut columns = AuditColumns::default();
    let mut macs: Vec<[u8; 32]> = Vec::with_capacity(events.len());
    for new in events {
        let mut new = (*new).clone();
        new.actor = storable(&new.actor);
        storable_opt(&mut new.model);
        storable_opt(&mut new.detail);
        storable_opt(&mut new.provider_request_id);
        storable_opt(&mut new.feature);
        storable_opt(&mut new.on_behalf_of);
        let head = heads
            .get_mut(new.account_id.as_str())
            .ok_or_else(|| StoreError::Database("an audit head was not locked".to_owned()))?;
        let mut event = new.into_event(head.0 + 1);
        let mac = event.seal_link(&chain.key, &head.1);
        *head = (event.seq, mac);
        macs.push(mac);
        columns.push(event);
    }
    let c = columns;
    sqlx::query(
        "INSERT INTO audit_events (account_id, seq, at, actor, action, provider, key_source, key_last4, model,
                                   outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac,
                                   on_behalf_of)
         SELECT account_id, seq, at, actor, action, provider, key_source, key_last4, model,
                outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac, on_behalf_of
         FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bigint[], $14::bigint[],
                     $15::text[], $16::bytea[], $17::text[])
              WITH ORDINALITY AS u(account_id, seq, at, actor, action, provider, key_source, key_last4, model,
                                   outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac,
                                   on_behalf_of, n)
         ORDER BY n",
    )
    .bind(&c.account_id)
    .bind(&c.seq)
    .bind(&c.at)
    .bind(&c.actor)
    .bind(&c.action)
    .bind(&c.provider)
    .bind(&c.key_source)
    .bind(&c.key_last4)
    .bind(&c.model)
    .bind(&c.outcome)
    .bind(&c.detail)
    .bind(&c.provider_request_id)
    .bind(&c.input_tokens)
    .bind(&c.output_tokens)
    .bind(&c.feature)
    .bind(&c.mac)
    .bind(&c.on_behalf_of)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    let mut head_accounts = Vec::with_capacity(heads.len());
    let mut head_seqs = Vec::with_capacity(heads.len());
    let mut head_macs = Vec::with_capacity(heads.len());
    for (account, (seq, mac)) in heads {
        head_accounts.push(account);
        head_seqs.push(seq);
        head_macs.push(mac.to_vec());
    }
    sqlx::query(
        "UPDATE audit_heads h SET seq = u.seq, mac = u.mac
         FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS u(account_id, seq, mac)
         WHERE h.account_id = u.account_id",
    )
    .bind(&head_accounts)
    .bind(&head_seqs)
    .bind(&head_macs)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    // The webhook events, in audit order: direct ones as found, a streak's where it turns.
    let mut caused: Vec<(usize, WebhookKind, Option<String>)> = Vec::new();
    let mut calls: BTreeMap<(&str, &str), Vec<(usize, &CallHealth)>> = BTreeMap::new();
    for (i, (e, t)) in events.iter().zip(&triggers).enumerate() {
        match t {
            Trigger::None => {}
            Trigger::Event(kind) => caused.push((i, *kind, None)),
            Trigger::KeyCall(health) => {
                if let Some(p) = e.provider {
                    calls
                        .entry((e.account_id.as_str(), p.as_str()))
                        .or_default()
                        .push((i, health));
                }
            }
        }
    }
    let mut streak_updates: (Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
    for (slot, list) in &calls {
        let Some(&start) = streak_starts.get(slot) else {
            continue; // the key was removed meanwhile: nothing to follow
        };
        let (end, turns) = outbox::walk_streak(start, chain.rules.key_failing_after, list.iter().map(|(_, h)| *h));
        if end != start {
            streak_updates.0.push(slot.0);
            streak_updates.1.push(slot.1);
            streak_updates.2.push(end);
        }
        for (j, kind, diagnosis) in turns {
            if let Some((i, _)) = list.get(j) {
                caused.push((*i, kind, diagnosis));
            }
        }
    }
    if !streak_updates.0.is_empty() {
        sqlx::query(
            "UPDATE provider_keys k SET fail_streak = u.streak
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(account_id, provider, streak)
             WHERE k.account_id = u.account_id AND k.provider = u.provider",
        )
        .bind(&streak_updates.0)
        .bind(&streak_updates.1)
        .bind(&streak_updates.2)
        .execute(&mut *conn)
        .await
        .map_err(pg)?;
    }
    if caused.is_empty() {
        return Ok(());
    }
    caused.sort_by_key(|c| c.0);
    let accounts: Vec<&str> = caused
        .iter()
        .filter_map(|(i, _, _)| events.get(*i).map(|e| e.account_id.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let labels = account_labels(conn, &accounts).await?;
    let mut rows = OutboxRows::default();
    for (i, kind, diagnosis) in caused {
        let (Some(e), Some(mac)) = (events.get(i), macs.get(i)) else {
            continue;
        };
        let (external, plan) = labels.get(e.account_id.as_str()).cloned().unwrap_or((None, None));
        let body = outbox::body_for_audit(kind, e, external.as_deref(), plan.as_deref(), diagnosis.as_deref());
        rows.push(outbox::event_id_for_audit(mac), e.account_id.as_str(), kind, body, e.at);
    }
    rows.insert(conn).await
}

/// Locks the key rows whose failure streaks a batch moves (in key order) and reads them.
async fn lock_streaks<'a>(
    conn: &mut PgConnection,
    slots: &BTreeSet<(&'a str, &'a str)>,
) -> TxResult<BTreeMap<(&'a str, &'a str), i64>> {
    let mut found = BTreeMap::new();
    if slots.is_empty() {
        return Ok(found);
    }
    let (accounts, providers): (Vec<&str>, Vec<&str>) = slots.iter().copied().unzip();
    let rows = sqlx::query(
        "SELECT k.account_id, k.provider, k.fail_streak FROM provider_keys k
         JOIN UNNEST($1::text[], $2::text[]) AS u(account_id, provider)
           ON k.account_id = u.account_id AND k.provider = u.provider
         ORDER BY k.account_id COLLATE \"C\", k.provider COLLATE \"C\" FOR UPDATE OF k",
    )
    .bind(&accounts)
    .bind(&providers)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg)?;
    for r in &rows {
        let account: String = get(r, "account_id")?;
        let provider: String = get(r, "provider")?;
        if let Some(slot) = slots.iter().find(|(a, p)| *a == account && *p == provider) {
            found.insert(*slot, get::<i64>(r, "fail_streak")?);
        }
    }
    Ok(found)
}

/// Accounts' external ids and plans, for webhook payloads.
async fn account_labels(
    conn: &mut PgConnection,
    accounts: &[&str],
) -> TxResult<BTreeMap<String, (Option<String>, Option<String>)>> {
    let rows = sqlx::query("SELECT id, external_id, plan FROM accounts WHERE id = ANY($1::text[])")
        .bind(accounts)
        .fetch_all(&mut *conn)
        .await
        .map_err(pg)?;
    let mut out = BTreeMap::new();
    for r in &rows {
        out.insert(get::<String>(r, "id")?, (get(r, "external_id")?, get(r, "plan")?));
    }
    Ok(out)
}

/// Outbox rows for one `INSERT … SELECT FROM UNNEST(…)`.
#[derive(Default)]
struct OutboxRows {
    event_id: Vec<String>,
    account_id: Vec<String>,
    kind: Vec<&'static str>,
    payload: Vec<String>,
    at: Vec<i64>,
}

impl OutboxRows {
    fn push(&mut self, event_id: String, account: &str, kind: WebhookKind, payload: String, at: UnixMillis) {
        self.event_id.push(event_id);
        self.account_id.push(account.to_owned());
        self.kind.push(kind.as_str());
        self.payload.push(payload);
        self.at.push(at.as_i64());
    }

    async fn insert(self, conn: &mut PgConnection) -> TxResult<()> {
        if self.event_id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO webhook_outbox (event_id, account_id, type, payload, created_at, next_attempt_at)
             SELECT event_id, account_id, type, payload, at, at
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                  WITH ORDINALITY AS u(event_id, account_id, type, payload, at, n)
             ORDER BY n
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&self.event_id)
        .bind(&self.account_id)
        .bind(&self.kind)
        .bind(&self.payload)
        .bind(&self.at)
        .execute(&mut *conn)
        .await
        .map_err(pg)?;
        Ok(())
    }
}

/// Announces the shared-credit thresholds a period has newly reached (see
/// `outbox::thresholds_crossed`), inside the caller's transaction, which holds the period's
/// row. `refused_amount` is a reservation the cap just refused.
async fn announce_thresholds(
    conn: &mut PgConnection,
    account: &str,
    period: &str,
    refused_amount: Option<i64>,
    now: UnixMillis,
) -> TxResult<bool> {
    let row = sqlx::query(
        "SELECT credits_used, credit_limit, notified_percent FROM credit_periods
         WHERE account_id = $1 AND period = $2 FOR UPDATE",
    )
    .bind(account)
    .bind(period)
    .fetch_optional(&mut *conn)
    .await
    .map_err(pg)?;
    let Some(row) = row else {
        return Ok(false);
    };
    let (used, limit, announced): (i64, Option<i64>, i64) = (
        get(&row, "credits_used")?,
        get(&row, "credit_limit")?,
        get(&row, "notified_percent")?,
    );
    let crossed = outbox::thresholds_crossed(used, limit, announced, refused_amount);
    let Some(&highest) = crossed.last() else {
        return Ok(false);
    };
    sqlx::query("UPDATE credit_periods SET notified_percent = $3 WHERE account_id = $1 AND period = $2")
        .bind(account)
        .bind(period)
        .bind(highest)
        .execute(&mut *conn)
        .await
        .map_err(pg)?;
    let labels = account_labels(conn, &[account]).await?;
    let external = labels.get(account).and_then(|l| l.0.clone());
    let mut rows = OutboxRows::default();
    for percent in crossed {
        let body = outbox::body_for_threshold(
            account,
            external.as_deref(),
            period,
            percent,
            used,
            limit.unwrap_or(0),
            now,
        );
        rows.push(
            outbox::event_id_for_threshold(account, period, percent),
            account,
            WebhookKind::SharedQuotaThreshold,
            body,
            now,
        );
    }
    rows.insert(conn).await?;
    Ok(true)
}

fn webhook_from_row(row: &PgRow) -> StoreResult<WebhookEvent> {
    Ok(WebhookEvent {
        id: get(row, "id")?,
        event_id: get(row, "event_id")?,
        account_id: get(row, "account_id")?,
        kind: get(row, "type")?,
        payload: get(row, "payload")?,
        created_at: UnixMillis(get(row, "created_at")?),
        attempts: get(row, "attempts")?,
        next_attempt_at: UnixMillis(get(row, "next_attempt_at")?),
        delivered_to: outbox::endpoints_from_column(&get::<String>(row, "delivered_to")?),
        delivered_at: get::<Option<i64>>(row, "delivered_at")?.map(UnixMillis),
        dead_at: get::<Option<i64>>(row, "dead_at")?.map(UnixMillis),
        last_error: get(row, "last_error")?,
    })
}

/// Releases `release` reserved credits and charges `charge` for one (account, period), inside
/// the caller's transaction. A release larger than the reservation (a caller bug, or a row
/// reset by hand) clamps the reservation at 0 and is logged rather than failing the batch:
/// the calls it settles have happened and their audit events must not be lost.
async fn settle_in_tx(
    conn: &mut PgConnection,
    account: &str,
    period: &str,
    release: i64,
    charge: i64,
    announce: Option<UnixMillis>,
) -> TxResult<()> {
    if release == 0 && charge == 0 {
        return Ok(());
    }
    let done = sqlx::query(
        "UPDATE credit_periods SET credits_reserved = credits_reserved - $3, credits_used = credits_used + $4
         WHERE account_id = $1 AND period = $2 AND credits_reserved >= $3",
    )
    .bind(account)
    .bind(period)
    .bind(release)
    .bind(charge)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    if done.rows_affected() == 1 {
        if let Some(now) = announce.filter(|_| charge > 0) {
            announce_thresholds(conn, account, period, None, now).await?;
        }
        return Ok(());
    }
    if release > 0 {
        tracing::warn!(
            account,
            period,
            release,
            "released more shared credits than were reserved; reservation clamped at 0"
        );
    }
    sqlx::query(
        "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES ($1, $2, $3, 0)
         ON CONFLICT (account_id, period) DO UPDATE SET
           credits_used = credit_periods.credits_used + excluded.credits_used,
           credits_reserved = GREATEST(credit_periods.credits_reserved - $4, 0)",
    )
    .bind(account)
    .bind(period)
    .bind(charge)
    .bind(release)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    if let Some(now) = announce.filter(|_| charge > 0) {
        announce_thresholds(conn, account, period, None, now).await?;
    }
    Ok(())
}

/// The cap check and the reservation of `amount` credits (see `Store::reserve_credits`),
/// inside the caller's transaction: whether it reserved, and whether a refusal wrote
/// something to keep (the announcement that the pool is spent).
async fn reserve_in_tx(
    conn: &mut PgConnection,
    account: &str,
    period: &str,
    limit: i64,
    amount: i64,
    announce: bool,
    now: UnixMillis,
) -> TxResult<(bool, bool)> {
    // An unknown account fails the foreign key here: NotFound.
    sqlx::query(
        "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES ($1, $2, 0, 0)
         ON CONFLICT (account_id, period) DO NOTHING",
    )
    .bind(account)
    .bind(period)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    // The cap check and the reservation are one statement: a racing reservation waits for
    // the row lock, then the WHERE is re-checked against its result.
    let done = sqlx::query(
        "UPDATE credit_periods SET credits_reserved = credits_reserved + $3, credit_limit = $4
         WHERE account_id = $1 AND period = $2 AND credits_used + credits_reserved + $3 <= $4",
    )
    .bind(account)
    .bind(period)
    .bind(amount)
    .bind(limit)
    .execute(&mut *conn)
    .await
    .map_err(pg)?;
    if done.rows_affected() == 1 {
        return Ok((true, false));
    }
    sqlx::query("UPDATE credit_periods SET credit_limit = $3 WHERE account_id = $1 AND period = $2")
        .bind(account)
        .bind(period)
        .bind(limit)
        .execute(&mut *conn)
        .await
        .map_err(pg)?;
    let announced = announce && announce_thresholds(conn, account, period, Some(amount), now).await?;
    Ok((false, announced))
}

/// Settles the leases the records of a `finish_calls` batch name, first in its transaction
/// (lease rows come first in the lock order): each lease row is deleted, and a record whose
/// lease is gone (released as abandoned meanwhile, or being released now: the delete waits
/// for that release to commit and then finds nothing) fails the batch, naming the record.
async fn settle_leases(conn: &mut PgConnection, records: &[CallRecord]) -> TxResult<()> {
    let leased: Vec<(usize, LeaseId)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.lease.map(|id| (i, id)))
        .collect();
    if leased.is_empty() {
        return Ok(());
    }
    let (mut ids, mut accounts, mut periods, mut amounts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &(i, id) in &leased {
        let r = &records[i];
        ids.push(id);
        accounts.push(r.account_id.as_str());
        periods.push(r.period.as_str());
        amounts.push(r.reserved);
    }
    let settled: Vec<LeaseId> = sqlx::query_scalar(
        "DELETE FROM reservation_leases l
         USING UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS r(id, account_id, period, amount)
         WHERE l.id = r.id AND l.account_id = r.account_id AND l.period = r.period AND l.amount = r.amount
         RETURNING l.id",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&periods)
    .bind(&amounts)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg)?;
    if let Some(&(i, id)) = leased.iter().find(|(_, id)| !settled.contains(id)) {
        return Err(crate::at_record(i, lease_gone(id)).into());
    }
    Ok(())
}

/// A lease row, as `release_leases` reads it.
fn lease_from_row(row: &PgRow) -> StoreResult<LeaseRow> {
    Ok(LeaseRow {
        id: get(row, "id")?,
        account_id: get(row, "account_id")?,
        period: get(row, "period")?,
        amount: get(row, "amount")?,
        node: get(row, "node")?,
        actor: get(row, "actor")?,
        provider: get(row, "provider")?,
        model: get(row, "model")?,
        key_source: get(row, "key_source")?,
        feature: get(row, "feature")?,
        on_behalf_of: get(row, "on_behalf_of")?,
    })
}

/// One provider's state, read inside the caller's transaction.
async fn state_in(conn: &mut PgConnection, account: &AccountId, provider: Provider) -> TxResult<ProviderState> {
    let source: Option<String> =
        sqlx::query_scalar("SELECT source FROM provider_sources WHERE account_id = $1 AND provider = $2")
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?;
    let key = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS} FROM provider_keys WHERE account_id = $1 AND provider = $2"
    ))
    .bind(account.as_str())
    .bind(provider.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(pg)?;
    Ok(ProviderState {
        provider,
        source: parse_source(source)?,
        key: key.as_ref().map(key_meta_from_row).transpose()?,
    })
}

fn parse_source(source: Option<String>) -> StoreResult<KeySource> {
    Ok(source
        .map(|s| s.parse::<KeySource>())
        .transpose()
        .map_err(|_| corrupt("provider_sources.source"))?
        .unwrap_or_default())
}

/// The statements of one key slot: an account's key for a provider, or the platform's.
/// Parameters: `$1` provider, `$2` key_id, `$3` sealed, `$4` last4, `$5` now, `$6` kind, and
/// for an account's slot the account id last (`$2` in `lock`, `$7` in the others).
struct KeySlot {
    lock: &'static str,
    overwrite: &'static str,
    insert: &'static str,
}

const ACCOUNT_KEY_SLOT: KeySlot = KeySlot {
    lock: "SELECT last4 FROM provider_keys WHERE provider = $1 AND account_id = $2 FOR UPDATE",
    overwrite: "UPDATE provider_keys SET key_id = $2, sealed = $3, last4 = $4, updated_at = $5, kind = $6,
                  last_test_ok = NULL, last_test_at = NULL, last_test_message = NULL, last_test_detail = NULL,
                  reported_leaked_at = NULL, fail_streak = 0
                WHERE provider = $1 AND account_id = $7",
    insert: "INSERT INTO provider_keys (account_id, provider, key_id, sealed, last4, created_at, updated_at, kind)
             VALUES ($7, $1, $2, $3, $4, $5, $5, $6)
             ON CONFLICT (account_id, provider) DO NOTHING",
};

const SHARED_KEY_SLOT: KeySlot = KeySlot {
    lock: "SELECT last4 FROM shared_keys WHERE provider = $1 FOR UPDATE",
    overwrite: "UPDATE shared_keys SET key_id = $2, sealed = $3, last4 = $4, updated_at = $5, kind = $6
                WHERE provider = $1",
    insert: "INSERT INTO shared_keys (provider, key_id, sealed, last4, created_at, updated_at, kind)
             VALUES ($1, $2, $3, $4, $5, $5, $6)
             ON CONFLICT (provider) DO NOTHING",
};

/// Writes `key` into a slot inside the caller's transaction and returns the last4 of the key
/// it replaced. The slot's row is locked before it is judged empty or full, and an insert
/// that loses a race to another node's insert (`DO NOTHING` waits for that node's commit)
/// goes round again, locks the new row and overwrites it: of two racing first saves,
/// exactly one reports "saved".
async fn write_key_slot(
    conn: &mut PgConnection,
    slot: &KeySlot,
    account: Option<&str>,
    provider: Provider,
    key: &NewKey,
    now: UnixMillis,
) -> TxResult<Option<String>> {
    for _ in 0..3 {
        let mut lock = sqlx::query_scalar::<_, String>(slot.lock).bind(provider.as_str());
        if let Some(account) = account {
            lock = lock.bind(account);
        }
        if let Some(old) = lock.fetch_optional(&mut *conn).await.map_err(pg)? {
            let mut overwrite = sqlx::query(slot.overwrite)
                .bind(provider.as_str())
                .bind(key.key_id.as_str())
                .bind(key.sealed.as_bytes())
                .bind(key.last4.as_str())
                .bind(now.as_i64())
                .bind(key.kind.as_str());
            if let Some(account) = account {
                overwrite = overwrite.bind(account);
            }
            overwrite.execute(&mut *conn).await.map_err(pg)?;
            return Ok(Some(old));
        }
        let mut insert = sqlx::query(slot.insert)
            .bind(provider.as_str())
            .bind(key.key_id.as_str())
            .bind(key.sealed.as_bytes())
            .bind(key.last4.as_str())
            .bind(now.as_i64())
            .bind(key.kind.as_str());
        if let Some(account) = account {
            insert = insert.bind(account);
        }
        if insert.execute(&mut *conn).await.map_err(pg)?.rows_affected() == 1 {
            return Ok(None);
        }
        // Another node saved first and has committed: go round, lock its row, overwrite it.
    }
    // Saved and removed by others between each of our looks: run the transaction again.
    Err(Fail {
        err: StoreError::Unavailable("the key slot kept changing under this save; retry".to_owned()),
        retry: true,
    })
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    async fn create_user(&self, id: &UserId, email: &Email, token_hash: &str, now: UnixMillis) -> StoreResult<()> {
        transaction!(self, |conn| {
            sqlx::query("INSERT INTO users (id, email, created_at) VALUES ($1, $2, $3)")
                .bind(id.as_str())
                .bind(email.as_str())
                .bind(now.as_i64())
                .execute(&mut *conn)
                .await
                .map_err(|e| match pg(e) {
                    Fail {
                        err: StoreError::Conflict(_),
                        ..
                    } => StoreError::Conflict(format!("a user with email {email} already exists")).into(),
                    other => other,
                })?;
            sqlx::query("INSERT INTO api_tokens (token_hash, user_id, created_at) VALUES ($1, $2, $3)")
                .bind(token_hash)
                .bind(id.as_str())
                .bind(now.as_i64())
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit(())
        })
    }

    async fn user_by_token(&self, token_hash: &str) -> StoreResult<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.email FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn member_by_token(
        &self,
        token_hash: &str,
        account: &AccountId,
    ) -> StoreResult<Option<(User, Option<Membership>)>> {
        let row = sqlx::query(&format!(
            "SELECT u.id, u.email, m.role, {ACCOUNT_COLUMNS}
             FROM api_tokens t JOIN users u ON u.id = t.user_id
             LEFT JOIN memberships m ON m.user_id = u.id AND m.account_id = $2
             LEFT JOIN accounts a ON a.id = m.account_id
             WHERE t.token_hash = $1"
        ))
        .bind(token_hash)
        .bind(account.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let user = user_from_row(&row)?;
        let membership = match get::<Option<String>>(&row, "role")? {
            Some(_) => Some(membership_from_row(&row)?),
            None => None,
        };
        Ok(Some((user, membership)))
    }

    async fn member_and_call_key(
        &self,
        token_hash: &str,
        account: &AccountId,
        provider: Provider,
    ) -> StoreResult<Option<(User, Option<(Membership, CallKey)>)>> {
        // The key tables are joined through the membership row, so a non-member's lookup
        // never reads a key at all.
        // Formatted once, not on every call.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT u.id, u.email, m.role, {ACCOUNT_COLUMNS}, s.source,
                    COALESCE(k.key_id, sk.key_id) AS key_id,
                    COALESCE(k.sealed, sk.sealed) AS sealed,
                    COALESCE(k.last4, sk.last4) AS last4,
                    k.reported_leaked_at
             FROM api_tokens t JOIN users u ON u.id = t.user_id
             LEFT JOIN memberships m ON m.user_id = u.id AND m.account_id = $2
             LEFT JOIN accounts a ON a.id = m.account_id
             LEFT JOIN provider_sources s ON s.account_id = m.account_id AND s.provider = $3
             LEFT JOIN provider_keys k ON k.account_id = m.account_id AND k.provider = $3
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON m.account_id IS NOT NULL AND sk.provider = $3
                                     AND COALESCE(s.source, 'shared') = 'shared'
             WHERE t.token_hash = $1"
            )
        });
        let row = sqlx::query(&SQL)
            .bind(token_hash)
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let user = user_from_row(&row)?;
        let member = match get::<Option<String>>(&row, "role")? {
            Some(_) => Some((membership_from_row(&row)?, call_key_from_row(&row)?)),
            None => None,
        };
        Ok(Some((user, member)))
    }

    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        let row = sqlx::query("SELECT id, email FROM users WHERE email = $1")
            .bind(email.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn count_users(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn create_account(
        &self,
        id: &AccountId,
        name: &str,
        plan: Plan,
        owner: &UserId,
        now: UnixMillis,
    ) -> StoreResult<()> {
        transaction!(self, |conn| {
            sqlx::query("INSERT INTO accounts (id, name, plan, created_at) VALUES ($1, $2, $3, $4)")
                .bind(id.as_str())
                .bind(name)
                .bind(plan.as_str())
                .bind(now.as_i64())
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            sqlx::query("INSERT INTO memberships (account_id, user_id, role, created_at) VALUES ($1, $2, 'owner', $3)")
                .bind(id.as_str())
                .bind(owner.as_str())
                .bind(now.as_i64())
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit(())
        })
    }

    async fn set_membership(&self, account: &AccountId, user: &UserId, role: Role, now: UnixMillis) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO memberships (account_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (account_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(account.as_str())
        .bind(user.as_str())
        .bind(role.as_str())
        .bind(now.as_i64())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn set_plan(
        &self,
        account: &AccountId,
        plan: Plan,
        limit: Option<i64>,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        transaction!(self, |conn| {
            let before = sqlx::query(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = $1 FOR UPDATE"
            ))
            .bind(account.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?
            .ok_or(StoreError::NotFound)?;
            let before = account_from_row(&before)?;
            let after = sqlx::query(
                "UPDATE accounts a SET plan = $2, shared_credit_limit = COALESCE($3, shared_credit_limit) WHERE id = $1
                 RETURNING a.id AS account_id, a.name, a.plan, a.shared_credit_limit",
            )
            .bind(account.as_str())
            .bind(plan.as_str())
            .bind(limit)
            .fetch_one(&mut *conn)
            .await
            .map_err(pg)?;
            let after = account_from_row(&after)?;
            match plan_change_detail(&before, after.plan, after.shared_credit_limit) {
                None => Finish::Commit(false),
                Some(detail) => {
                    let event =
                        NewAuditEvent::for_account(account, now, actor, AuditAction::PlanChanged).detail(Some(detail));
                    append_in_tx(conn, &self.chain_key, &[&event]).await?;
                    Finish::Commit(true)
                }
            }
        })
    }

    async fn account(&self, account: &AccountId) -> StoreResult<Option<Account>> {
        let row = sqlx::query(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = $1"))
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(account_from_row).transpose()
    }

    async fn account_ids(&self) -> StoreResult<Vec<AccountId>> {
        // Ids in byte order among equal times, as SQLite sorts them.
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM accounts ORDER BY created_at, id COLLATE \"C\"")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        ids.iter()
            .map(|s| AccountId::parse(s).map_err(|_| corrupt("accounts.id")))
            .collect()
    }

    async fn membership(&self, account: &AccountId, user: &UserId) -> StoreResult<Option<Membership>> {
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.account_id = $1 AND m.user_id = $2"
        ))
        .bind(account.as_str())
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(membership_from_row).transpose()
    }

    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>> {
        let rows = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.user_id = $1 ORDER BY a.created_at, a.id COLLATE \"C\""
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(membership_from_row).collect()
    }

    async fn create_service(
        &self,
        id: &ServiceId,
        name: &str,
        scopes: &[Scope],
        token_hash: &str,
        now: UnixMillis,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO services (id, name, scopes, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(id.as_str())
            .bind(storable(name))
            .bind(scopes_column(scopes))
            .bind(token_hash)
            .bind(now.as_i64())
            .execute(&self.pool)
            .await
            .map_err(|e| match map_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("a service named {name} already exists")),
                other => other,
            })?;
        Ok(())
    }

    async fn service_by_token(&self, token_hash: &str) -> StoreResult<Option<Service>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(service_from_row).transpose()
    }

    async fn services(&self) -> StoreResult<Vec<Service>> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services ORDER BY created_at, id COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(service_from_row).collect()
    }

    async fn revoke_service(&self, name: &str, now: UnixMillis) -> StoreResult<Option<Service>> {
        let row = sqlx::query(&format!(
            "UPDATE services SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL RETURNING {SERVICE_COLUMNS}"
        ))
        .bind(storable(name))
        .bind(now.as_i64())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(service_from_row).transpose()
    }

    async fn account_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalAccount>> {
        let row = sqlx::query(EXTERNAL_ACCOUNT_SQL)
            .bind(external.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(external_account_from_row).transpose()
    }

    async fn put_external_account(
        &self,
        external: &ExternalId,
        new_id: &AccountId,
        spec: &AccountSpec,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<AccountPut> {
        let name = storable(&spec.name);
        transaction!(self, |conn| {
            // Insert or find, on the unique index of external ids: a concurrent insert of the
            // same id waits for the first to commit, then finds its row (read committed:
            // each statement sees what committed before it).
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO accounts (id, name, plan, shared_credit_limit, created_at, external_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING id",
            )
            .bind(new_id.as_str())
            .bind(&name)
            .bind(spec.plan.as_str())
            .bind(spec.shared_credit_limit)
            .bind(now.as_i64())
            .bind(external.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?;
            let row = sqlx::query(&format!("{EXTERNAL_ACCOUNT_SQL} FOR UPDATE"))
                .bind(external.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(pg)?
                .ok_or(StoreError::NotFound)?;
            let before = external_account_from_row(&row)?;
            let raw_limit: Option<i64> = get(&row, "shared_credit_limit")?;
            let a = &before.account;
            if inserted.is_some() {
                Finish::Commit(AccountPut {
                    account: before,
                    created: true,
                    plan_changed: false,
                })
            } else if a.name == name && a.plan == spec.plan && raw_limit == spec.shared_credit_limit {
                Finish::Rollback(AccountPut {
                    account: before,
                    created: false,
                    plan_changed: false,
                })
            } else {
                let row = sqlx::query(
                    "UPDATE accounts a SET name = $2, plan = $3, shared_credit_limit = $4 WHERE id = $1
                     RETURNING a.id AS account_id, a.name, a.plan, a.shared_credit_limit, a.external_id",
                )
                .bind(a.id.as_str())
                .bind(&name)
                .bind(spec.plan.as_str())
                .bind(spec.shared_credit_limit)
                .fetch_one(&mut *conn)
                .await
                .map_err(pg)?;
                let after = external_account_from_row(&row)?;
                let detail = plan_change_detail(a, after.account.plan, after.account.shared_credit_limit);
                let plan_changed = detail.is_some();
                if let Some(detail) = detail {
                    let event = NewAuditEvent::for_account(&after.account.id, now, actor, AuditAction::PlanChanged)
                        .detail(Some(detail));
                    append_in_tx(conn, &self.chain_key, &[&event]).await?;
                }
                Finish::Commit(AccountPut {
                    account: after,
                    created: false,
                    plan_changed,
                })
            }
        })
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        actor: &AuditActor,
        detail: Option<String>,
        now: UnixMillis,
    ) -> StoreResult<usize> {
        transaction!(self, |conn| {
            let id = account.as_str();
            sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(pg)?
                .ok_or(StoreError::NotFound)?;
            let rows = sqlx::query("DELETE FROM provider_keys WHERE account_id = $1 RETURNING provider, last4")
                .bind(id)
                .fetch_all(&mut *conn)
                .await
                .map_err(pg)?;
            let mut keys = Vec::with_capacity(rows.len());
            for r in &rows {
                let provider: Provider = get::<String>(r, "provider")?
                    .parse()
                    .map_err(|_| corrupt("provider_keys.provider"))?;
                let last4 =
                    Last4::from_stored(&get::<String>(r, "last4")?).ok_or_else(|| corrupt("provider_keys.last4"))?;
                keys.push((provider, last4));
            }
            keys.sort_by_key(|(p, _)| p.as_str());
            let mut events: Vec<NewAuditEvent> = keys
                .iter()
                .map(|(p, last4)| {
                    NewAuditEvent::new(account, now, actor, AuditAction::KeyRemoved, *p).last4(Some(last4))
                })
                .collect();
            events.push(
                NewAuditEvent::for_account(account, now, actor, AuditAction::AccountDeleted).detail(detail.clone()),
            );
            let refs: Vec<&NewAuditEvent> = events.iter().collect();
            append_in_tx(conn, &self.chain_key, &refs).await?;
            for table in ["provider_sources", "memberships", "credit_periods", "usage_counters"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE account_id = $1"))
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(pg)?;
            }
            sqlx::query("DELETE FROM accounts WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit(keys.len())
        })
    }

    async fn user_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalUser>> {
        let row = sqlx::query("SELECT id, email, external_id FROM users WHERE external_id = $1")
            .bind(external.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(external_user_from_row).transpose()
    }

    async fn put_external_user(
        &self,
        external: &ExternalId,
        new_id: &UserId,
        email: &Email,
        now: UnixMillis,
    ) -> StoreResult<ExternalUser> {
        transaction!(self, |conn| {
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO users (id, email, created_at, external_id) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING id",
            )
            .bind(new_id.as_str())
            .bind(email.as_str())
            .bind(now.as_i64())
            .bind(external.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(email_taken(email))?;
            if inserted.is_none() {
                sqlx::query("UPDATE users SET email = $2 WHERE external_id = $1 AND email <> $2")
                    .bind(external.as_str())
                    .bind(email.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(email_taken(email))?;
            }
            let row = sqlx::query("SELECT id, email, external_id FROM users WHERE external_id = $1")
                .bind(external.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(pg)?
                .ok_or(StoreError::NotFound)?;
            Finish::Commit(external_user_from_row(&row)?)
        })
    }

    async fn remove_membership(&self, account: &AccountId, user: &UserId) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM memberships WHERE account_id = $1 AND user_id = $2")
            .bind(account.as_str())
            .bind(user.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn chain_account_ids(&self) -> StoreResult<Vec<AccountId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM (SELECT id FROM accounts UNION SELECT account_id FROM audit_heads) ids ORDER BY id COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        ids.iter()
            .map(|s| AccountId::parse(s).map_err(|_| corrupt("accounts.id")))
            .collect()
    }

    async fn provider_states(&self, account: &AccountId) -> StoreResult<Vec<ProviderState>> {
        transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            let mut out = Vec::with_capacity(Provider::ALL.len());
            for p in Provider::ALL {
                out.push(state_in(conn, account, p).await?);
            }
            Finish::Commit(out)
        })
    }

    async fn provider_state(&self, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
        transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            Finish::Commit(state_in(conn, account, provider).await?)
        })
    }

    async fn save_key(
        &self,
        account: &AccountId,
        provider: Provider,
        key: NewKey,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<Saved> {
        transaction!(self, |conn| {
            // The old blob's row version stays in the table until `purge_removed` vacuums it.
            let old_last4 =
                write_key_slot(conn, &ACCOUNT_KEY_SLOT, Some(account.as_str()), provider, &key, now).await?;
            let rotated = old_last4.is_some();
            let (action, detail) = match &old_last4 {
                Some(old) => (AuditAction::KeyRotated, Some(format!("replaced key ending {old}"))),
                None => (AuditAction::KeySaved, None),
            };
            let event = NewAuditEvent::new(account, now, actor, action, provider)
                .last4(Some(&key.last4))
                .detail(detail);
            append_in_tx(conn, &self.chain_key, &[&event]).await?;
            let state = state_in(conn, account, provider).await?;
            Finish::Commit(Saved { rotated, state })
        })
    }

    async fn remove_key(
        &self,
        account: &AccountId,
        provider: Provider,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<()> {
        transaction!(self, |conn| {
            let last4: Option<String> =
                sqlx::query_scalar("DELETE FROM provider_keys WHERE account_id = $1 AND provider = $2 RETURNING last4")
                    .bind(account.as_str())
                    .bind(provider.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(pg)?;
            let last4 = last4.ok_or(StoreError::NoKeySaved)?;
            sqlx::query("DELETE FROM provider_sources WHERE account_id = $1 AND provider = $2")
                .bind(account.as_str())
                .bind(provider.as_str())
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            let last4 = Last4::from_stored(&last4).ok_or_else(|| corrupt("provider_keys.last4"))?;
            let event = NewAuditEvent::new(account, now, actor, AuditAction::KeyRemoved, provider).last4(Some(&last4));
            append_in_tx(conn, &self.chain_key, &[&event]).await?;
            Finish::Commit(())
        })
    }

    async fn set_source(
        &self,
        account: &AccountId,
        provider: Provider,
        source: KeySource,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<ProviderState> {
        transaction!(self, |conn| {
            // Lock order: the key row (held shared, so it cannot be removed under an `own`
            // source), then the source row, then the audit head.
            let key = sqlx::query(&format!(
                "SELECT {KEY_COLUMNS} FROM provider_keys WHERE account_id = $1 AND provider = $2 FOR SHARE"
            ))
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?;
            let key = key.as_ref().map(key_meta_from_row).transpose()?;
            if source == KeySource::Own && key.is_none() {
                return Err(StoreError::NoKeySaved.into());
            }
            // No row means `shared`; make one to lock, so two nodes' changes take turns and
            // each reads what the other wrote. Rolled back when nothing changes.
            sqlx::query(
                "INSERT INTO provider_sources (account_id, provider, source) VALUES ($1, $2, 'shared')
                 ON CONFLICT (account_id, provider) DO NOTHING",
            )
            .bind(account.as_str())
            .bind(provider.as_str())
            .execute(&mut *conn)
            .await
            .map_err(pg)?;
            let current: Option<String> = sqlx::query_scalar(
                "SELECT source FROM provider_sources WHERE account_id = $1 AND provider = $2 FOR UPDATE",
            )
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?;
            let before = parse_source(current)?;
            if before == source {
                Finish::Rollback(ProviderState { provider, source, key })
            } else {
                sqlx::query("UPDATE provider_sources SET source = $3 WHERE account_id = $1 AND provider = $2")
                    .bind(account.as_str())
                    .bind(provider.as_str())
                    .bind(source.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(pg)?;
                let event = NewAuditEvent::new(account, now, actor, AuditAction::KeySourceChanged, provider)
                    .last4(key.as_ref().map(|k| &k.last4))
                    .key_source(source)
                    .detail(Some(format!("{before} -> {source}")));
                append_in_tx(conn, &self.chain_key, &[&event]).await?;
                Finish::Commit(state_in(conn, account, provider).await?)
            }
        })
    }

    async fn call_key(&self, account: &AccountId, provider: Provider) -> StoreResult<CallKey> {
        // One statement, so the source and the key are one snapshot. A missing source row
        // means the default, shared.
        let row = sqlx::query(
            "SELECT s.source,
                    COALESCE(k.key_id, sk.key_id) AS key_id,
                    COALESCE(k.sealed, sk.sealed) AS sealed,
                    COALESCE(k.last4, sk.last4) AS last4,
                    k.reported_leaked_at
             FROM (SELECT $1::text AS account_id, $2::text AS provider) q
             LEFT JOIN provider_sources s ON s.account_id = q.account_id AND s.provider = q.provider
             LEFT JOIN provider_keys k ON k.account_id = q.account_id AND k.provider = q.provider
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON sk.provider = q.provider AND COALESCE(s.source, 'shared') = 'shared'",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        call_key_from_row(&row)
    }

    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>> {
        let row =
            sqlx::query("SELECT key_id, sealed, last4, reported_leaked_at FROM provider_keys WHERE account_id = $1 AND provider = $2")
                .bind(account.as_str())
                .bind(provider.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        row.as_ref()
            .map(|r| stored_key_from_row(r, "provider_keys"))
            .transpose()
    }

    async fn record_key_test(
        &self,
        account: &AccountId,
        provider: Provider,
        key_id: &KeyId,
        result: &LastTest,
        event: &NewAuditEvent,
    ) -> StoreResult<bool> {
        check_event(event, account, AuditAction::KeyTested, "record_key_test")?;
        let message = storable(&result.message);
        let detail = result.detail.as_deref().map(storable);
        transaction!(self, |conn| {
            // Conditional on key_id: a test that raced a rotation finds no row and labels nothing.
            let done = sqlx::query(
                "UPDATE provider_keys SET last_test_ok = $4, last_test_at = $5, last_test_message = $6,
                     last_test_detail = $7,
                     reported_leaked_at = CASE WHEN $4 THEN NULL ELSE reported_leaked_at END
                 WHERE account_id = $1 AND provider = $2 AND key_id = $3",
            )
            .bind(account.as_str())
            .bind(provider.as_str())
            .bind(key_id.as_str())
            .bind(result.ok)
            .bind(result.at.as_i64())
            .bind(&message)
            .bind(&detail)
            .execute(&mut *conn)
            .await
            .map_err(pg)?;
            append_in_tx(conn, &self.chain_key, &[event]).await?;
            Finish::Commit(done.rows_affected() == 1)
        })
    }

    async fn mark_key_leaked(
        &self,
        account: &AccountId,
        provider: Provider,
        key_id: &KeyId,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE provider_keys SET reported_leaked_at = $4
             WHERE account_id = $1 AND provider = $2 AND key_id = $3 AND reported_leaked_at IS NULL",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .bind(key_id.as_str())
        .bind(now.as_i64())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn save_shared_key(&self, provider: Provider, key: NewKey, now: UnixMillis) -> StoreResult<bool> {
        transaction!(self, |conn| {
            let old = write_key_slot(conn, &SHARED_KEY_SLOT, None, provider, &key, now).await?;
            Finish::Commit(old.is_some())
        })
    }

    async fn shared_key(&self, provider: Provider) -> StoreResult<Option<StoredKey>> {
        let row = sqlx::query(
            "SELECT key_id, sealed, last4, NULL::BIGINT AS reported_leaked_at FROM shared_keys WHERE provider = $1",
        )
        .bind(provider.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(|r| stored_key_from_row(r, "shared_keys")).transpose()
    }

    async fn reserve_credits(
        &self,
        account: &AccountId,
        period: &str,
        limit: i64,
        amount: i64,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        check_period(period)?;
        check_amount("amount", amount)?;
        let announce = self.chain_key.rules.enabled;
        transaction!(self, |conn| {
            match reserve_in_tx(conn, account.as_str(), period, limit, amount, announce, now).await? {
                (true, _) => Finish::Commit(true),
                // Refused, and the pool is now announced as spent: keep that.
                (false, true) => Finish::Commit(false),
                // Refused: roll back the empty row too, so a refusal leaves no trace.
                (false, false) => Finish::Rollback(false),
            }
        })
    }

    async fn finish_calls(&self, records: &[CallRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Check everything before writing anything, and fold the batch into one change per
        // (account, period) and per counter row, in key order (see `fold_calls`).
        let FoldedCalls { credits, counters } = fold_calls(records)?;
        let mut c_account = Vec::with_capacity(counters.len());
        let mut c_period = Vec::with_capacity(counters.len());
        let mut c_provider = Vec::with_capacity(counters.len());
        let mut c_source = Vec::with_capacity(counters.len());
        let mut c_requests = Vec::with_capacity(counters.len());
        let mut c_input = Vec::with_capacity(counters.len());
        let mut c_output = Vec::with_capacity(counters.len());
        for ((account, period, provider, source), (requests, input, output)) in &counters {
            c_account.push(*account);
            c_period.push(*period);
            c_provider.push(*provider);
            c_source.push(*source);
            c_requests.push(*requests);
            c_input.push(*input);
            c_output.push(*output);
        }
        let events: Vec<&NewAuditEvent> = records.iter().map(|r| &r.audit).collect();
        let announce_at = records
            .iter()
            .map(|r| r.audit.at)
            .max()
            .filter(|_| self.chain_key.rules.enabled);
        transaction!(self, |conn| {
            // First the leases: a call released as abandoned meanwhile is not settled.
            settle_leases(conn, records).await?;
            for ((account, period), (release, charge)) in &credits {
                settle_in_tx(conn, account, period, *release, *charge, announce_at).await?;
            }
            // One statement for all counter rows, upserted in key order (the order every
            // batch uses, so two batches never wait on each other in a cycle).
            sqlx::query(
                "INSERT INTO usage_counters (account_id, period, provider, source, requests, input_tokens, output_tokens)
                 SELECT account_id, period, provider, source, requests, input_tokens, output_tokens
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[])
                      WITH ORDINALITY AS u(account_id, period, provider, source, requests, input_tokens, output_tokens, n)
                 ORDER BY n
                 ON CONFLICT (account_id, period, provider, source) DO UPDATE SET
                   requests = usage_counters.requests + excluded.requests,
                   input_tokens = usage_counters.input_tokens + excluded.input_tokens,
                   output_tokens = usage_counters.output_tokens + excluded.output_tokens",
            )
            .bind(&c_account)
            .bind(&c_period)
            .bind(&c_provider)
            .bind(&c_source)
            .bind(&c_requests)
            .bind(&c_input)
            .bind(&c_output)
            .execute(&mut *conn)
            .await
            .map_err(pg)?;
            append_in_tx(conn, &self.chain_key, &events).await?;
            Finish::Commit(())
        })
    }

    async fn release_credits(&self, account: &AccountId, period: &str, amount: i64) -> StoreResult<()> {
        check_period(period)?;
        check_amount("amount", amount)?;
        if amount == 0 {
            return Ok(());
        }
        transaction!(self, |conn| {
            settle_in_tx(conn, account.as_str(), period, amount, 0, None).await?;
            Finish::Commit(())
        })
    }

    async fn reserve_lease(&self, lease: &NewLease, limit: i64, now: UnixMillis) -> StoreResult<Option<LeaseId>> {
        check_lease(lease)?;
        let announce = self.chain_key.rules.enabled;
        let account = lease.account_id.as_str();
        let c = &lease.call;
        transaction!(self, |conn| {
            match reserve_in_tx(conn, account, &lease.period, limit, lease.amount, announce, now).await? {
                (false, true) => Finish::Commit(None),
                (false, false) => Finish::Rollback(None),
                (true, _) => {
                    let id: LeaseId = sqlx::query_scalar(
                        "INSERT INTO reservation_leases (account_id, period, amount, node, run, expires_at, created_at,
                           actor, provider, model, key_source, feature, on_behalf_of)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                         RETURNING id",
                    )
                    .bind(account)
                    .bind(&lease.period)
                    .bind(lease.amount)
                    .bind(&lease.node)
                    .bind(&lease.run)
                    .bind(lease.expires_at.as_i64())
                    .bind(now.as_i64())
                    .bind(storable(&c.actor.0))
                    .bind(c.provider.as_str())
                    .bind(storable(&c.model))
                    .bind(c.key_source.as_str())
                    .bind(c.feature.as_deref().map(storable))
                    .bind(c.on_behalf_of.as_deref().map(storable))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(pg)?;
                    Finish::Commit(Some(id))
                }
            }
        })
    }

    async fn renew_leases(&self, run: &str, ids: &[LeaseId], expires_at: UnixMillis) -> StoreResult<Vec<LeaseId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "UPDATE reservation_leases SET expires_at = $3 WHERE run = $1 AND id = ANY($2::bigint[]) RETURNING id",
        )
        .bind(run)
        .bind(ids)
        .bind(expires_at.as_i64())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn release_leases(
        &self,
        which: LeaseRelease<'_>,
        now: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<ReleasedLease>> {
        // Which rows, as a condition on `reservation_leases` with $1 and $3 (the limit is $2).
        let condition = match which {
            LeaseRelease::Expired => "expires_at < $1",
            LeaseRelease::EarlierRuns { .. } => "node = $1 AND run <> $3",
            LeaseRelease::One(_) => "id = $1",
        };
        // The release: the rows are locked and deleted first, skipping those another
        // transaction holds (a settlement, or another node's sweep: each lease goes to whoever
        // locked it first, and a row deleted by a transaction that committed meanwhile is
        // found gone), then credits, counters and audit heads, in the lock order above.
        let sql = format!(
            "DELETE FROM reservation_leases WHERE id IN (
               SELECT id FROM reservation_leases WHERE {condition} ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, account_id, period, amount, node, actor, provider, model, key_source, feature, on_behalf_of"
        );
        let why = which.why();
        let limit = i64::from(limit);
        transaction!(self, |conn| {
            let q = sqlx::query(&sql);
            let q = match which {
                LeaseRelease::Expired => q.bind(now.as_i64()).bind(limit),
                LeaseRelease::EarlierRuns { node, current } => q.bind(node).bind(limit).bind(current),
                LeaseRelease::One(id) => q.bind(id).bind(limit),
            };
            let mut rows = q
                .fetch_all(&mut *conn)
                .await
                .map_err(pg)?
                .iter()
                .map(lease_from_row)
                .collect::<StoreResult<Vec<_>>>()?;
            rows.sort_by_key(|r| r.id);
            let mut events = Vec::with_capacity(rows.len());
            let mut released = Vec::with_capacity(rows.len());
            let mut credits: BTreeMap<(&str, &str), i64> = BTreeMap::new();
            let mut counters: BTreeMap<crate::CounterKey<'_>, i64> = BTreeMap::new();
            for row in &rows {
                let (event, lease) = row.abandoned(why, now)?;
                *credits
                    .entry((row.account_id.as_str(), row.period.as_str()))
                    .or_default() += row.amount;
                *counters
                    .entry((
                        row.account_id.as_str(),
                        row.period.as_str(),
                        row.provider.as_str(),
                        row.key_source.as_str(),
                    ))
                    .or_default() += 1;
                events.push(event);
                released.push(lease);
            }
            for ((account, period), amount) in &credits {
                settle_in_tx(conn, account, period, *amount, 0, None).await?;
            }
            for ((account, period, provider, source), requests) in &counters {
                sqlx::query(
                    "INSERT INTO usage_counters (account_id, period, provider, source, requests, input_tokens, output_tokens)
                     VALUES ($1, $2, $3, $4, $5, 0, 0)
                     ON CONFLICT (account_id, period, provider, source) DO UPDATE SET
                       requests = usage_counters.requests + excluded.requests",
                )
                .bind(account)
                .bind(period)
                .bind(provider)
                .bind(source)
                .bind(requests)
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            }
            let refs: Vec<&NewAuditEvent> = events.iter().collect();
            append_in_tx(conn, &self.chain_key, &refs).await?;
            Finish::Commit(released)
        })
    }

    async fn usage(&self, account: &AccountId, period: &str) -> StoreResult<UsageReport> {
        check_period(period)?;
        // One snapshot, so credits and counters agree.
        let (credits, rows) = transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            let credits = sqlx::query(
                "SELECT credits_used, credits_reserved FROM credit_periods WHERE account_id = $1 AND period = $2",
            )
            .bind(account.as_str())
            .bind(period)
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg)?;
            let rows = sqlx::query(
                "SELECT provider, source, requests, input_tokens, output_tokens FROM usage_counters
                 WHERE account_id = $1 AND period = $2",
            )
            .bind(account.as_str())
            .bind(period)
            .fetch_all(&mut *conn)
            .await
            .map_err(pg)?;
            Finish::Commit((credits, rows))
        })?;
        let (credits_used, credits_reserved) = match credits {
            Some(r) => (get(&r, "credits_used")?, get(&r, "credits_reserved")?),
            None => (0, 0),
        };
        let mut found = Vec::with_capacity(rows.len());
        for r in &rows {
            found.push(ProviderUsage {
                provider: get::<String>(r, "provider")?
                    .parse()
                    .map_err(|_| corrupt("usage_counters.provider"))?,
                source: get::<String>(r, "source")?
                    .parse()
                    .map_err(|_| corrupt("usage_counters.source"))?,
                requests: get(r, "requests")?,
                input_tokens: get(r, "input_tokens")?,
                output_tokens: get(r, "output_tokens")?,
            });
        }
        Ok(usage_report(credits_used, credits_reserved, &found))
    }

    async fn append_audit(&self, events: &[NewAuditEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events: Vec<&NewAuditEvent> = events.iter().collect();
        transaction!(self, |conn| {
            append_in_tx(conn, &self.chain_key, &events).await?;
            Finish::Commit(())
        })
    }

    async fn audit_page(&self, account: &AccountId, limit: u32, before: Option<i64>) -> StoreResult<Vec<AuditEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(account.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_chain(&self, account: &AccountId) -> StoreResult<(Vec<AuditEvent>, Option<ChainHead>)> {
        // One snapshot, so the head and the events agree.
        let (rows, head) = transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            let rows = sqlx::query(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE account_id = $1 ORDER BY seq, id"
            ))
            .bind(account.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(pg)?;
            let head = sqlx::query("SELECT seq, mac FROM audit_heads WHERE account_id = $1")
                .bind(account.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit((rows, head))
        })?;
        let events = rows.iter().map(audit_from_row).collect::<StoreResult<Vec<_>>>()?;
        let head = head
            .map(|r| {
                Ok::<_, StoreError>(ChainHead {
                    seq: get(&r, "seq")?,
                    mac: get(&r, "mac")?,
                })
            })
            .transpose()?;
        Ok((events, head))
    }

    async fn append_platform_audit(&self, event: &NewPlatformEvent) -> StoreResult<()> {
        transaction!(self, |conn| {
            // As for an account's chain: the head row exists (the genesis link) and is locked
            // before the newest link is read, so appends from any number of nodes form one chain.
            sqlx::query("INSERT INTO platform_audit_head (id, seq, mac) VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING")
                .bind(&GENESIS_MAC[..])
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            let head = sqlx::query("SELECT seq, mac FROM platform_audit_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *conn)
                .await
                .map_err(pg)?;
            let seq: i64 = get(&head, "seq")?;
            let mac: Vec<u8> = get(&head, "mac")?;
            let prev: [u8; 32] = mac
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("platform_audit_head.mac"))?;
            let mut e = event.clone().into_event(seq + 1);
            let mac = e.seal_link(&self.chain_key.key, &prev);
            sqlx::query(
                "INSERT INTO platform_audit_events (seq, at, actor, action, provider, key_last4, account_id, kek_id, detail, mac)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(e.seq)
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.provider)
            .bind(&e.key_last4)
            .bind(&e.account_id)
            .bind(&e.kek_id)
            .bind(&e.detail)
            .bind(&e.mac)
            .execute(&mut *conn)
            .await
            .map_err(pg)?;
            sqlx::query("UPDATE platform_audit_head SET seq = $1, mac = $2 WHERE id = 1")
                .bind(e.seq)
                .bind(&mac[..])
                .execute(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit(())
        })
    }

    async fn platform_chain(&self) -> StoreResult<(Vec<PlatformEvent>, Option<ChainHead>)> {
        let (rows, head) = transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            let rows = sqlx::query(
                "SELECT id, seq, at, actor, action, provider, key_last4, account_id, kek_id, detail, mac
                 FROM platform_audit_events ORDER BY seq, id",
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(pg)?;
            let head = sqlx::query("SELECT seq, mac FROM platform_audit_head WHERE id = 1")
                .fetch_optional(&mut *conn)
                .await
                .map_err(pg)?;
            Finish::Commit((rows, head))
        })?;
        let events = rows
            .iter()
            .map(|r| {
                Ok(PlatformEvent {
                    id: get(r, "id")?,
                    seq: get(r, "seq")?,
                    at: get(r, "at")?,
                    actor: get(r, "actor")?,
                    action: get(r, "action")?,
                    provider: get(r, "provider")?,
                    key_last4: get(r, "key_last4")?,
                    account_id: get(r, "account_id")?,
                    kek_id: get(r, "kek_id")?,
                    detail: get(r, "detail")?,
                    mac: get(r, "mac")?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let head = head
            .map(|r| {
                Ok::<_, StoreError>(ChainHead {
                    seq: get(&r, "seq")?,
                    mac: get(&r, "mac")?,
                })
            })
            .transpose()?;
        Ok((events, head))
    }

    async fn chain_heads(&self) -> StoreResult<Vec<(String, ChainHead)>> {
        let rows = transaction!(self, Some(BEGIN_SNAPSHOT), |conn| {
            let rows = sqlx::query(
                "SELECT account_id AS chain, seq, mac FROM audit_heads
                 UNION ALL SELECT $1, seq, mac FROM platform_audit_head WHERE id = 1",
            )
            .bind(crate::audit::PLATFORM_CHAIN)
            .fetch_all(&mut *conn)
            .await
            .map_err(pg)?;
            Finish::Commit(rows)
        })?;
        rows.iter()
            .map(|r| {
                Ok((
                    get::<String>(r, "chain")?,
                    ChainHead {
                        seq: get(r, "seq")?,
                        mac: get(r, "mac")?,
                    },
                ))
            })
            .collect()
    }

    async fn purge_removed(&self) -> StoreResult<bool> {
        // VACUUM cannot run inside a transaction: one statement on its own, in the simple
        // query protocol. It removes the dead row versions that rotated and removed blobs
        // leave behind (and truncates empty pages at the end of the table).
        sqlx::raw_sql("VACUUM provider_keys, shared_keys")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(true)
    }

    async fn claim_webhooks(
        &self,
        node: &str,
        now: UnixMillis,
        lease_until: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<WebhookEvent>> {
        // Each account's oldest live event, if due and free; SKIP LOCKED lets nodes claiming
        // at the same moment take different events instead of waiting on each other, and the
        // UPDATE re-checks the claim against the newest row.
        let rows = sqlx::query(
            "WITH heads AS (
               SELECT DISTINCT ON (account_id) id FROM webhook_outbox
               WHERE delivered_at IS NULL AND dead_at IS NULL
               ORDER BY account_id, id
             ), due AS (
               SELECT o.id FROM webhook_outbox o JOIN heads h ON h.id = o.id
               WHERE o.next_attempt_at <= $1 AND (o.claimed_until IS NULL OR o.claimed_until <= $1)
               ORDER BY o.id LIMIT $2
               FOR UPDATE OF o SKIP LOCKED
             )
             UPDATE webhook_outbox o SET claimed_by = $3, claimed_until = $4
             FROM due WHERE o.id = due.id AND (o.claimed_until IS NULL OR o.claimed_until <= $1)
             RETURNING o.*",
        )
        .bind(now.as_i64())
        .bind(i64::from(limit))
        .bind(node)
        .bind(lease_until.as_i64())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut out = rows.iter().map(webhook_from_row).collect::<StoreResult<Vec<_>>>()?;
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    async fn record_webhook_attempt(
        &self,
        id: i64,
        node: &str,
        delivered_to: &[usize],
        outcome: &AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        let (delivered_at, next, dead_at, error) = outbox::attempt_columns(outcome, now);
        let done = sqlx::query(
            "UPDATE webhook_outbox SET attempts = attempts + 1, delivered_to = $3, delivered_at = $4,
               next_attempt_at = COALESCE($5, next_attempt_at), dead_at = $6, last_error = $7,
               claimed_by = NULL, claimed_until = NULL
             WHERE id = $1 AND claimed_by = $2",
        )
        .bind(id)
        .bind(node)
        .bind(outbox::endpoints_to_column(delivered_to))
        .bind(delivered_at)
        .bind(next)
        .bind(dead_at)
        .bind(error.map(|e| storable(&e)))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_webhook_claims(&self, holder_prefix: &str) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE webhook_outbox SET claimed_by = NULL, claimed_until = NULL
             WHERE claimed_by IS NOT NULL AND starts_with(claimed_by, $1)",
        )
        .bind(holder_prefix)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn webhook_events(&self, filter: WebhookFilter, limit: u32) -> StoreResult<Vec<WebhookEvent>> {
        let sql = match filter {
            WebhookFilter::All => "SELECT * FROM webhook_outbox ORDER BY id DESC LIMIT $1",
            WebhookFilter::Undelivered => {
                "SELECT * FROM webhook_outbox WHERE delivered_at IS NULL ORDER BY id DESC LIMIT $1"
            }
            WebhookFilter::Dead => "SELECT * FROM webhook_outbox WHERE dead_at IS NOT NULL ORDER BY id DESC LIMIT $1",
            WebhookFilter::Failed => {
                "SELECT * FROM webhook_outbox WHERE delivered_at IS NULL AND (attempts > 0 OR dead_at IS NOT NULL)
                 ORDER BY id DESC LIMIT $1"
            }
        };
        let rows = sqlx::query(sql)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn replay_webhook(&self, event_id: &str, now: UnixMillis) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE webhook_outbox SET attempts = 0, next_attempt_at = $2, delivered_to = '', delivered_at = NULL,
               dead_at = NULL, last_error = NULL, claimed_by = NULL, claimed_until = NULL
             WHERE event_id = $1",
        )
        .bind(event_id)
        .bind(now.as_i64())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn webhook_backlog(&self) -> StoreResult<OutboxBacklog> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM webhook_outbox
             WHERE delivered_at IS NULL AND dead_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(OutboxBacklog {
            pending: get(&row, "pending")?,
            oldest_pending_at: get::<Option<i64>>(&row, "oldest")?.map(UnixMillis),
        })
    }

    async fn prune_webhooks(&self, delivered_before: UnixMillis) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM webhook_outbox WHERE delivered_at IS NOT NULL AND delivered_at < $1")
            .bind(delivered_before.as_i64())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn create_session(&self, id_hash: &str, user: &UserId, now: UnixMillis) -> StoreResult<()> {
        sqlx::query("INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at) VALUES ($1, $2, $3, $3)")
            .bind(id_hash)
            .bind(user.as_str())
            .bind(now.as_i64())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn touch_session(
        &self,
        id_hash: &str,
        now: UnixMillis,
        limits: SessionLimits,
    ) -> StoreResult<Option<WebSession>> {
        let (idle_cutoff, max_cutoff) = limits.cutoffs(now);
        // One statement: the session is marked as seen only while it is live, and read with
        // its user in the same step.
        let row = sqlx::query(
            "WITH s AS (
                UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $2)
                WHERE id_hash = $1 AND last_seen_at > $3 AND created_at > $4
                RETURNING user_id, created_at, last_seen_at
             )
             SELECT u.id, u.email, s.created_at, s.last_seen_at FROM s JOIN users u ON u.id = s.user_id",
        )
        .bind(id_hash)
        .bind(now.as_i64())
        .bind(idle_cutoff)
        .bind(max_cutoff)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        match row {
            Some(r) => Ok(Some(WebSession {
                user: user_from_row(&r)?,
                created_at: UnixMillis(get(&r, "created_at")?),
                last_seen_at: UnixMillis(get(&r, "last_seen_at")?),
            })),
            None => {
                sqlx::query("DELETE FROM sessions WHERE id_hash = $1 AND (last_seen_at <= $2 OR created_at <= $3)")
                    .bind(id_hash)
                    .bind(idle_cutoff)
                    .bind(max_cutoff)
                    .execute(&self.pool)
                    .await
                    .map_err(map_err)?;
                Ok(None)
            }
        }
    }

    async fn end_session(&self, id_hash: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn end_user_sessions(&self, user: &UserId) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn set_session_flash(&self, id_hash: &str, flash: &str) -> StoreResult<()> {
        sqlx::query("UPDATE sessions SET flash = $2 WHERE id_hash = $1")
            .bind(id_hash)
            .bind(storable(flash))
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn take_session_flash(&self, id_hash: &str) -> StoreResult<Option<String>> {
        // The old value, read under the row's lock by the same statement that clears it.
        let row = sqlx::query(
            "UPDATE sessions s SET flash = NULL FROM (
                SELECT id_hash, flash FROM sessions WHERE id_hash = $1 AND flash IS NOT NULL FOR UPDATE
             ) old
             WHERE s.id_hash = old.id_hash
             RETURNING old.flash",
        )
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(|r| get::<String>(&r, "flash")).transpose()
    }

    async fn prune_sessions(&self, now: UnixMillis, limits: SessionLimits) -> StoreResult<u64> {
        let (idle_cutoff, max_cutoff) = limits.cutoffs(now);
        let done = sqlx::query("DELETE FROM sessions WHERE last_seen_at <= $1 OR created_at <= $2")
            .bind(idle_cutoff)
            .bind(max_cutoff)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn audit_search(
        &self,
        account: &AccountId,
        filter: &AuditFilter,
        limit: Option<u32>,
        offset: u64,
    ) -> StoreResult<Vec<AuditEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE account_id = $1
               AND at >= $2 AND at < $3
               AND ($4::text IS NULL OR provider = $4)
               AND ($5::text IS NULL OR key_source = $5)
               AND ($6::text IS NULL OR key_last4 = $6)
             ORDER BY at DESC, seq DESC LIMIT $7 OFFSET $8"
        ))
        .bind(account.as_str())
        .bind(filter.from.map_or(i64::MIN, UnixMillis::as_i64))
        .bind(filter.until.map_or(i64::MAX, UnixMillis::as_i64))
        .bind(filter.provider.map(Provider::as_str))
        .bind(filter.key_source.map(KeySource::as_str))
        .bind(filter.last4.as_deref().map(storable))
        .bind(limit.map(i64::from))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn key_call_health(
        &self,
        account: &AccountId,
        provider: Provider,
        since: UnixMillis,
        window_start: UnixMillis,
    ) -> StoreResult<KeyCallHealth> {
        let from = since.as_i64().max(window_start.as_i64());
        let last_ok: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(at) FROM audit_events
             WHERE account_id = $1 AND provider = $2 AND key_source = 'own' AND outcome = 'ok'
               AND at >= $3 AND action = 'ai.request'",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .bind(since.as_i64())
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let rows = sqlx::query(
            "SELECT outcome, COUNT(*) AS n, MAX(at) AS last FROM audit_events
             WHERE account_id = $1 AND provider = $2 AND key_source = 'own'
               AND outcome LIKE 'error:%'
               AND at >= $3 AND action = 'ai.request'
             GROUP BY outcome",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .bind(from)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok((
                    get::<String>(r, "outcome")?,
                    get::<i64>(r, "n")?,
                    get::<i64>(r, "last")?,
                ))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(KeyCallHealth {
            last_ok_at: last_ok.map(UnixMillis),
            failures: failure_counts(rows),
        })
    }

    async fn users_by_ids(&self, ids: &[UserId]) -> StoreResult<Vec<User>> {
        let ids: Vec<&str> = ids.iter().map(UserId::as_str).collect();
        let rows = sqlx::query("SELECT id, email FROM users WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(user_from_row).collect()
    }
}
