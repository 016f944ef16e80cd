//! The SQLite backend: the embedded default.
//!
//! One writer connection (writes are serialized by SQLite anyway; one connection makes
//! that explicit and spares busy-waits), a small pool of readers, WAL journal,
//! `synchronous=FULL` (a commit is on disk when it returns), `secure_delete` on (freed
//! cells are zeroed), and `BEGIN IMMEDIATE` for every write transaction so another
//! process (the admin CLI) waits on the busy timeout instead of failing mid-transaction.

mod kek;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::{AccountId, Email, KeyId, KeySource, Last4, Plan, Provider, Role, UnixMillis, UserId};
use keyward_crypto::{AuditChainKey, SealedKey, GENESIS_MAC};
use sqlx::sqlite::{Sqlite, SqliteArguments};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Arguments, ConnectOptions, Connection as _, Row, SqlitePool};

use crate::audit::{AuditAction, AuditEvent, ChainHead, NewAuditEvent};
use crate::migrate::SQLITE as MIGRATIONS;
use crate::{
    check_amount, check_event, check_period, fold_calls, usage_report, Account, Actor, CallKey, CallRecord,
    FoldedCalls, KeyMeta, LastTest, Membership, NewKey, ProviderState, ProviderUsage, Saved, Store, StoreError,
    StoreResult, StoredKey, UsageReport, User,
};

/// Tuning for the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub readers: u32,
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

pub struct SqliteStore {
    writer: SqlitePool,
    reader: Readers,
    chain_key: Arc<AuditChainKey>,
}

/// The read-only connections, lent out one query (or one read transaction) at a time.
/// Not sqlx's pool: it pings every connection it takes back, a second round trip to
/// SQLite's thread (on a spawned task) for each read, and every AI call does one. A
/// connection comes back only after its work finished; one dropped midway (an error, a
/// cancelled call) is closed instead, and a later lease opens a fresh one.
struct Readers {
    idle: std::sync::Mutex<Vec<SqliteConnection>>,
    permits: tokio::sync::Semaphore,
    connect: SqliteConnectOptions,
}

/// One lent connection; [`ReadLease::release`] gives it back.
struct ReadLease<'a> {
    conn: SqliteConnection,
    readers: &'a Readers,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Readers {
    fn new(connect: SqliteConnectOptions, size: u32) -> Readers {
        Readers {
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(usize::try_from(size.max(1)).unwrap_or(1)),
            connect,
        }
    }

    async fn lease(&self) -> StoreResult<ReadLease<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".to_owned()))?;
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.connect.connect().await.map_err(map_err)?,
        };
        Ok(ReadLease {
            conn,
            readers: self,
            _permit: permit,
        })
    }
}

impl ReadLease<'_> {
    fn release(self) {
        if let Ok(mut idle) = self.readers.idle.lock() {
            idle.push(self.conn);
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://path`) and migrates it.
    pub async fn open(url: &str, chain_key: AuditChainKey, opts: SqliteOptions) -> StoreResult<SqliteStore> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true)
            .pragma("secure_delete", "ON");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(opts.busy_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(map_err)?;
        // No mmap: the file grows with every checkpoint of the audit log, and each growth
        // made every reader unmap and remap it (munmap with TLB shoot-downs was ~3% of all
        // CPU under load); reads of the hot rows come from SQLite's page cache.
        let reader = Readers::new(connect.read_only(true), opts.readers);
        let store = SqliteStore {
            writer,
            reader,
            chain_key: Arc::new(chain_key),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut conn = self.writer.acquire().await.map_err(map_err)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS keyward_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        drop(conn);
        for m in MIGRATIONS {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
            let done: Option<i64> = sqlx::query_scalar("SELECT version FROM keyward_migrations WHERE version = ?1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(map_err)?;
            sqlx::query("INSERT INTO keyward_migrations (version, name, applied_at) VALUES (?1, ?2, strftime('%s','now') * 1000)")
                .bind(m.version)
                .bind(m.name)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
        }
        Ok(())
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY
            Some("2067") | Some("1555") => StoreError::Conflict(db.message().to_owned()),
            // SQLITE_CONSTRAINT_FOREIGNKEY
            Some("787") => StoreError::NotFound,
            // SQLITE_BUSY, SQLITE_LOCKED and their extended codes
            Some(c) if c == "5" || c == "6" || c.parse::<i32>().is_ok_and(|n| n & 0xff == 5 || n & 0xff == 6) => {
                StoreError::Unavailable(db.message().to_owned())
            }
            _ => StoreError::Database(db.message().to_owned()),
        },
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Database(e.to_string()),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn get<'r, T>(row: &'r SqliteRow, col: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

fn account_from_row(row: &SqliteRow) -> StoreResult<Account> {
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

fn membership_from_row(row: &SqliteRow) -> StoreResult<Membership> {
    Ok(Membership {
        account: account_from_row(row)?,
        role: get::<String>(row, "role")?
            .parse()
            .map_err(|_| corrupt("memberships.role"))?,
    })
}

fn user_from_row(row: &SqliteRow) -> StoreResult<User> {
    Ok(User {
        id: UserId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("users.id"))?,
        email: Email::parse(&get::<String>(row, "email")?).map_err(|_| corrupt("users.email"))?,
    })
}

fn key_meta_from_row(row: &SqliteRow) -> StoreResult<KeyMeta> {
    let last_test = match (
        get::<Option<i64>>(row, "last_test_ok")?,
        get::<Option<i64>>(row, "last_test_at")?,
    ) {
        (Some(ok), Some(at)) => Some(LastTest {
            ok: ok != 0,
            at: UnixMillis(at),
            message: get::<Option<String>>(row, "last_test_message")?.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(KeyMeta {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt("provider_keys.key_id"))?,
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt("provider_keys.last4"))?,
        created_at: UnixMillis(get(row, "created_at")?),
        updated_at: UnixMillis(get(row, "updated_at")?),
        last_test,
    })
}

fn audit_from_row(row: &SqliteRow) -> StoreResult<AuditEvent> {
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
        mac: get(row, "mac")?,
    })
}

const ACCOUNT_COLUMNS: &str = "a.id AS account_id, a.name, a.plan, a.shared_credit_limit";
const KEY_COLUMNS: &str = "key_id, last4, created_at, updated_at, last_test_ok, last_test_at, last_test_message";

/// Audit rows per INSERT statement: 16 parameters each, well inside SQLite's limit of
/// 32,766 parameters per statement.
const AUDIT_ROWS_PER_INSERT: usize = 128;

/// Statements sent to the connection's thread in one round trip (sqlx runs each statement
/// of a query in turn, consuming the `?` arguments in order). Every round trip is two
/// thread wake-ups, and a group-commit batch would otherwise make several per event.
#[derive(Default)]
struct Batch {
    sql: String,
    args: SqliteArguments<'static>,
}

impl Batch {
    fn sql(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }

    fn arg<T>(&mut self, value: T) -> StoreResult<()>
    where
        T: sqlx::Encode<'static, Sqlite> + sqlx::Type<Sqlite> + 'static,
    {
        self.args
            .add(value)
            .map_err(|e| StoreError::Invalid(format!("cannot encode an argument: {e}")))
    }

    async fn run(self, conn: &mut SqliteConnection) -> StoreResult<()> {
        if self.sql.is_empty() {
            return Ok(());
        }
        sqlx::query_with(&self.sql, self.args)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// Appends `events` (in order) to their accounts' chains inside the caller's transaction:
/// reads the heads of every account in the batch (one query, however many events each has),
/// links each event to the one before, then adds the inserts and one head write per account
/// to `batch`, which the caller runs. Callers that settle a batch (`finish_calls`,
/// `append_audit`) pass it whole, so the chain reads stay per batch.
async fn append_in_tx<'e>(
    conn: &mut SqliteConnection,
    chain_key: &AuditChainKey,
    events: impl IntoIterator<Item = &'e NewAuditEvent> + Send,
    batch: &mut Batch,
) -> StoreResult<()> {
    chain_into_batch(conn, "", chain_key, events, batch).await
}

/// [`append_in_tx`], with `lead` (statements without parameters, e.g. the `BEGIN` of a
/// [`RawTx`]) sent in the same round trip as the first read of the heads.
async fn chain_into_batch<'e>(
    conn: &mut SqliteConnection,
    lead: &str,
    chain_key: &AuditChainKey,
    events: impl IntoIterator<Item = &'e NewAuditEvent> + Send,
    batch: &mut Batch,
) -> StoreResult<()> {
    let events: Vec<&NewAuditEvent> = events.into_iter().collect();
    let mut accounts: Vec<&str> = events.iter().map(|e| e.account_id.as_str()).collect();
    accounts.sort_unstable();
    accounts.dedup();
    if accounts.is_empty() && !lead.is_empty() {
        sqlx::query(lead).execute(&mut *conn).await.map_err(map_err)?;
    }
    let mut heads: BTreeMap<String, (i64, [u8; 32])> = BTreeMap::new();
    for (i, chunk) in accounts.chunks(500).enumerate() {
        let sql = format!(
            "{}SELECT account_id, seq, mac FROM audit_heads WHERE account_id IN ({})",
            if i == 0 { lead } else { "" },
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(&sql);
        for a in chunk {
            q = q.bind(*a);
        }
        for r in q.fetch_all(&mut *conn).await.map_err(map_err)? {
            let mac: Vec<u8> = get(&r, "mac")?;
            heads.insert(
                get(&r, "account_id")?,
                (
                    get(&r, "seq")?,
                    mac.as_slice().try_into().map_err(|_| corrupt("audit_heads.mac"))?,
                ),
            );
        }
    }
    let mut chained = Vec::with_capacity(events.len());
    for new in events {
        let account = new.account_id.as_str();
        let (seq, prev) = heads.get(account).copied().unwrap_or((0, GENESIS_MAC));
        let mut event = new.clone().into_event(seq + 1);
        let mac = event.seal_link(chain_key, &prev);
        heads.insert(account.to_owned(), (event.seq, mac));
        chained.push(event);
    }
    for chunk in chained.chunks(AUDIT_ROWS_PER_INSERT) {
        batch.sql(
            "INSERT INTO audit_events (account_id, seq, at, actor, action, provider, key_source, key_last4, model, outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac) VALUES ",
        );
        for (i, event) in chunk.iter().enumerate() {
            batch.sql(if i == 0 {
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            });
            let e = event.clone();
            batch.arg(e.account_id)?;
            batch.arg(e.seq)?;
            batch.arg(e.at)?;
            batch.arg(e.actor)?;
            batch.arg(e.action)?;
            batch.arg(e.provider)?;
            batch.arg(e.key_source)?;
            batch.arg(e.key_last4)?;
            batch.arg(e.model)?;
            batch.arg(e.outcome)?;
            batch.arg(e.detail)?;
            batch.arg(e.provider_request_id)?;
            batch.arg(e.input_tokens)?;
            batch.arg(e.output_tokens)?;
            batch.arg(e.feature)?;
            batch.arg(e.mac)?;
        }
        batch.sql(";\n");
    }
    // One head write per account (all of them in this batch), in account-id order.
    for (account, (seq, mac)) in heads {
        batch.sql(
            "INSERT INTO audit_heads (account_id, seq, mac) VALUES (?, ?, ?)
             ON CONFLICT (account_id) DO UPDATE SET seq = excluded.seq, mac = excluded.mac;\n",
        );
        batch.arg(account)?;
        batch.arg(seq)?;
        batch.arg(mac.to_vec())?;
    }
    Ok(())
}

/// A writer connection inside a transaction that sqlx does not track: the `BEGIN` and the
/// `COMMIT` travel with the first read and the last write, which saves two round trips to
/// SQLite's thread per group commit. Dropped before [`RawTx::committed`] (an error or a
/// cancelled future), the connection is closed instead of pooled, so an open transaction
/// can never reach the next user of the pool.
struct RawTx {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    open: bool,
}

impl RawTx {
    fn new(conn: sqlx::pool::PoolConnection<Sqlite>) -> RawTx {
        RawTx { conn, open: true }
    }

    fn committed(&mut self) {
        self.open = false;
    }

    /// Best effort; if the ROLLBACK fails too, the connection is closed on drop.
    async fn roll_back(&mut self) {
        if sqlx::query("ROLLBACK").execute(&mut *self.conn).await.is_ok() {
            self.open = false;
        }
    }
}

impl Drop for RawTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// [`append_in_tx`] and run: for callers with nothing else to write in the same round trip.
async fn append_now<'e>(
    conn: &mut SqliteConnection,
    chain_key: &AuditChainKey,
    events: impl IntoIterator<Item = &'e NewAuditEvent> + Send,
) -> StoreResult<()> {
    let mut batch = Batch::default();
    append_in_tx(conn, chain_key, events, &mut batch).await?;
    batch.run(conn).await
}

/// Releases `release` reserved credits and charges `charge` for one (account, period), inside
/// the caller's transaction. A release larger than the reservation (a caller bug, or a row
/// reset by hand) clamps the reservation at 0 and is logged rather than failing the batch:
/// the calls it settles have happened and their audit events must not be lost.
async fn settle_in_tx(
    conn: &mut SqliteConnection,
    account: &str,
    period: &str,
    release: i64,
    charge: i64,
) -> StoreResult<()> {
    if release == 0 && charge == 0 {
        return Ok(());
    }
    let done = sqlx::query(
        "UPDATE credit_periods SET credits_reserved = credits_reserved - ?3, credits_used = credits_used + ?4
         WHERE account_id = ?1 AND period = ?2 AND credits_reserved >= ?3",
    )
    .bind(account)
    .bind(period)
    .bind(release)
    .bind(charge)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    if done.rows_affected() == 1 {
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
        "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES (?1, ?2, ?3, 0)
         ON CONFLICT (account_id, period) DO UPDATE SET
           credits_used = credit_periods.credits_used + excluded.credits_used,
           credits_reserved = CASE WHEN credit_periods.credits_reserved >= ?4
                                   THEN credit_periods.credits_reserved - ?4 ELSE 0 END",
    )
    .bind(account)
    .bind(period)
    .bind(charge)
    .bind(release)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

fn stored_key_from_row(row: &SqliteRow, table: &str) -> StoreResult<StoredKey> {
    Ok(StoredKey {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt(&format!("{table}.key_id")))?,
        sealed: SealedKey::from_bytes(get(row, "sealed")?),
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt(&format!("{table}.last4")))?,
    })
}

/// A [`CallKey`] from the `source`, `key_id`, `sealed` and `last4` columns of a row (a
/// missing source is the default, shared).
fn call_key_from_row(row: &SqliteRow) -> StoreResult<CallKey> {
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

/// A named fn rather than a closure: the closure's lifetime would not be general enough for
/// the `Send` future `async_trait` needs.
fn audit_of(r: &CallRecord) -> &NewAuditEvent {
    &r.audit
}

async fn state_in(conn: &mut SqliteConnection, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
    let source: Option<String> =
        sqlx::query_scalar("SELECT source FROM provider_sources WHERE account_id = ?1 AND provider = ?2")
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
    let key = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS} FROM provider_keys WHERE account_id = ?1 AND provider = ?2"
    ))
    .bind(account.as_str())
    .bind(provider.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(ProviderState {
        provider,
        source: source
            .map(|s| s.parse::<KeySource>())
            .transpose()
            .map_err(|_| corrupt("provider_sources.source"))?
            .unwrap_or_default(),
        key: key.as_ref().map(key_meta_from_row).transpose()?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        let mut r = self.reader.lease().await?;
        sqlx::query("SELECT 1").execute(&mut r.conn).await.map_err(map_err)?;
        r.release();
        Ok(())
    }

    async fn create_user(&self, id: &UserId, email: &Email, token_hash: &str, now: UnixMillis) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        sqlx::query("INSERT INTO users (id, email, created_at) VALUES (?1, ?2, ?3)")
            .bind(id.as_str())
            .bind(email.as_str())
            .bind(now.as_i64())
            .execute(&mut *tx)
            .await
            .map_err(|e| match map_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("a user with email {email} already exists")),
                other => other,
            })?;
        sqlx::query("INSERT INTO api_tokens (token_hash, user_id, created_at) VALUES (?1, ?2, ?3)")
            .bind(token_hash)
            .bind(id.as_str())
            .bind(now.as_i64())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    async fn user_by_token(&self, token_hash: &str) -> StoreResult<Option<User>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query(
            "SELECT u.id, u.email FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?1",
        )
        .bind(token_hash)
        .fetch_optional(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
        row.as_ref().map(user_from_row).transpose()
    }

    async fn member_by_token(
        &self,
        token_hash: &str,
        account: &AccountId,
    ) -> StoreResult<Option<(User, Option<Membership>)>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query(&format!(
            "SELECT u.id, u.email, m.role, {ACCOUNT_COLUMNS}
             FROM api_tokens t JOIN users u ON u.id = t.user_id
             LEFT JOIN memberships m ON m.user_id = u.id AND m.account_id = ?2
             LEFT JOIN accounts a ON a.id = m.account_id
             WHERE t.token_hash = ?1"
        ))
        .bind(token_hash)
        .bind(account.as_str())
        .fetch_optional(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
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
        let mut lease = self.reader.lease().await?;
        // Formatted once, not on every call.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT u.id, u.email, m.role, {ACCOUNT_COLUMNS}, s.source,
                    COALESCE(k.key_id, sk.key_id) AS key_id,
                    COALESCE(k.sealed, sk.sealed) AS sealed,
                    COALESCE(k.last4, sk.last4) AS last4
             FROM api_tokens t JOIN users u ON u.id = t.user_id
             LEFT JOIN memberships m ON m.user_id = u.id AND m.account_id = ?2
             LEFT JOIN accounts a ON a.id = m.account_id
             LEFT JOIN provider_sources s ON s.account_id = m.account_id AND s.provider = ?3
             LEFT JOIN provider_keys k ON k.account_id = m.account_id AND k.provider = ?3
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON m.account_id IS NOT NULL AND sk.provider = ?3
                                     AND COALESCE(s.source, 'shared') = 'shared'
             WHERE t.token_hash = ?1"
            )
        });
        let row = sqlx::query(&SQL)
            .bind(token_hash)
            .bind(account.as_str())
            .bind(provider.as_str())
            .fetch_optional(&mut lease.conn)
            .await
            .map_err(map_err)?;
        lease.release();
        let Some(row) = row else { return Ok(None) };
        let user = user_from_row(&row)?;
        let member = match get::<Option<String>>(&row, "role")? {
            Some(_) => Some((membership_from_row(&row)?, call_key_from_row(&row)?)),
            None => None,
        };
        Ok(Some((user, member)))
    }

    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query("SELECT id, email FROM users WHERE email = ?1")
            .bind(email.as_str())
            .fetch_optional(&mut r.conn)
            .await
            .map_err(map_err)?;
        r.release();
        row.as_ref().map(user_from_row).transpose()
    }

    async fn count_users(&self) -> StoreResult<i64> {
        let mut r = self.reader.lease().await?;
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&mut r.conn)
            .await
            .map_err(map_err)?;
        r.release();
        Ok(n)
    }

    async fn create_account(
        &self,
        id: &AccountId,
        name: &str,
        plan: Plan,
        owner: &UserId,
        now: UnixMillis,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        sqlx::query("INSERT INTO accounts (id, name, plan, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(id.as_str())
            .bind(name)
            .bind(plan.as_str())
            .bind(now.as_i64())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("INSERT INTO memberships (account_id, user_id, role, created_at) VALUES (?1, ?2, 'owner', ?3)")
            .bind(id.as_str())
            .bind(owner.as_str())
            .bind(now.as_i64())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    async fn set_membership(&self, account: &AccountId, user: &UserId, role: Role, now: UnixMillis) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO memberships (account_id, user_id, role, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(account.as_str())
        .bind(user.as_str())
        .bind(role.as_str())
        .bind(now.as_i64())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn set_plan(&self, account: &AccountId, plan: Plan, limit: Option<i64>) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE accounts SET plan = ?2, shared_credit_limit = COALESCE(?3, shared_credit_limit) WHERE id = ?1",
        )
        .bind(account.as_str())
        .bind(plan.as_str())
        .bind(limit)
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn account(&self, account: &AccountId) -> StoreResult<Option<Account>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ?1"))
            .bind(account.as_str())
            .fetch_optional(&mut r.conn)
            .await
            .map_err(map_err)?;
        r.release();
        row.as_ref().map(account_from_row).transpose()
    }

    async fn account_ids(&self) -> StoreResult<Vec<AccountId>> {
        let mut r = self.reader.lease().await?;
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM accounts ORDER BY created_at, id")
            .fetch_all(&mut r.conn)
            .await
            .map_err(map_err)?;
        r.release();
        ids.iter()
            .map(|s| AccountId::parse(s).map_err(|_| corrupt("accounts.id")))
            .collect()
    }

    async fn membership(&self, account: &AccountId, user: &UserId) -> StoreResult<Option<Membership>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.account_id = ?1 AND m.user_id = ?2"
        ))
        .bind(account.as_str())
        .bind(user.as_str())
        .fetch_optional(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
        row.as_ref().map(membership_from_row).transpose()
    }

    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>> {
        let mut r = self.reader.lease().await?;
        let rows = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.user_id = ?1 ORDER BY a.created_at, a.id"
        ))
        .bind(user.as_str())
        .fetch_all(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
        rows.iter().map(membership_from_row).collect()
    }

    async fn provider_states(&self, account: &AccountId) -> StoreResult<Vec<ProviderState>> {
        let mut r = self.reader.lease().await?;
        let mut out = Vec::with_capacity(Provider::ALL.len());
        for p in Provider::ALL {
            out.push(state_in(&mut r.conn, account, p).await?);
        }
        r.release();
        Ok(out)
    }

    async fn provider_state(&self, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
        let mut r = self.reader.lease().await?;
        let state = state_in(&mut r.conn, account, provider).await?;
        r.release();
        Ok(state)
    }

    async fn save_key(
        &self,
        account: &AccountId,
        provider: Provider,
        key: NewKey,
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<Saved> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        let old_last4: Option<String> =
            sqlx::query_scalar("SELECT last4 FROM provider_keys WHERE account_id = ?1 AND provider = ?2")
                .bind(account.as_str())
                .bind(provider.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        // Rotation overwrites the row in place: with secure_delete the old blob's bytes are
        // zeroed in the page, and the checkpoint that follows clears them from the WAL.
        sqlx::query(
            "INSERT INTO provider_keys (account_id, provider, key_id, sealed, last4, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (account_id, provider) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed,
               last4 = excluded.last4, updated_at = excluded.updated_at,
               last_test_ok = NULL, last_test_at = NULL, last_test_message = NULL",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .bind(key.key_id.as_str())
        .bind(key.sealed.as_bytes())
        .bind(key.last4.as_str())
        .bind(now.as_i64())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let rotated = old_last4.is_some();
        let (action, detail) = match &old_last4 {
            Some(old) => (AuditAction::KeyRotated, Some(format!("replaced key ending {old}"))),
            None => (AuditAction::KeySaved, None),
        };
        let event = NewAuditEvent::key_action(account, now, &actor.0, action, provider, Some(&key.last4), detail);
        append_now(&mut tx, &self.chain_key, std::slice::from_ref(&event)).await?;
        let state = state_in(&mut tx, account, provider).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Saved { rotated, state })
    }

    async fn remove_key(
        &self,
        account: &AccountId,
        provider: Provider,
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        let last4: Option<String> =
            sqlx::query_scalar("DELETE FROM provider_keys WHERE account_id = ?1 AND provider = ?2 RETURNING last4")
                .bind(account.as_str())
                .bind(provider.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        let last4 = last4.ok_or(StoreError::NoKeySaved)?;
        sqlx::query("DELETE FROM provider_sources WHERE account_id = ?1 AND provider = ?2")
            .bind(account.as_str())
            .bind(provider.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let last4 = Last4::from_stored(&last4).ok_or_else(|| corrupt("provider_keys.last4"))?;
        let event = NewAuditEvent::key_action(
            account,
            now,
            &actor.0,
            AuditAction::KeyRemoved,
            provider,
            Some(&last4),
            None,
        );
        append_now(&mut tx, &self.chain_key, std::slice::from_ref(&event)).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn set_source(
        &self,
        account: &AccountId,
        provider: Provider,
        source: KeySource,
        actor: &Actor,
        now: UnixMillis,
    ) -> StoreResult<ProviderState> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        let before = state_in(&mut tx, account, provider).await?;
        if source == KeySource::Own && before.key.is_none() {
            return Err(StoreError::NoKeySaved);
        }
        if before.source != source {
            sqlx::query(
                "INSERT INTO provider_sources (account_id, provider, source) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account_id, provider) DO UPDATE SET source = excluded.source",
            )
            .bind(account.as_str())
            .bind(provider.as_str())
            .bind(source.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            let mut event = NewAuditEvent::key_action(
                account,
                now,
                &actor.0,
                AuditAction::KeySourceChanged,
                provider,
                before.key.as_ref().map(|k| &k.last4),
                Some(format!("{} -> {}", before.source, source)),
            );
            event.key_source = Some(source);
            append_now(&mut tx, &self.chain_key, std::slice::from_ref(&event)).await?;
        }
        let after = state_in(&mut tx, account, provider).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(after)
    }

    async fn call_key(&self, account: &AccountId, provider: Provider) -> StoreResult<CallKey> {
        // One statement, so the source and the key are one snapshot. A missing source row
        // means the default, shared.
        let mut r = self.reader.lease().await?;
        let row = sqlx::query(
            "SELECT s.source,
                    COALESCE(k.key_id, sk.key_id) AS key_id,
                    COALESCE(k.sealed, sk.sealed) AS sealed,
                    COALESCE(k.last4, sk.last4) AS last4
             FROM (SELECT ?1 AS account_id, ?2 AS provider) q
             LEFT JOIN provider_sources s ON s.account_id = q.account_id AND s.provider = q.provider
             LEFT JOIN provider_keys k ON k.account_id = q.account_id AND k.provider = q.provider
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON sk.provider = q.provider AND COALESCE(s.source, 'shared') = 'shared'",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .fetch_one(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
        call_key_from_row(&row)
    }

    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>> {
        let mut r = self.reader.lease().await?;
        let row =
            sqlx::query("SELECT key_id, sealed, last4 FROM provider_keys WHERE account_id = ?1 AND provider = ?2")
                .bind(account.as_str())
                .bind(provider.as_str())
                .fetch_optional(&mut r.conn)
                .await
                .map_err(map_err)?;
        r.release();
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        // Conditional on key_id: a test that raced a rotation finds no row and labels nothing.
        let done = sqlx::query(
            "UPDATE provider_keys SET last_test_ok = ?4, last_test_at = ?5, last_test_message = ?6
             WHERE account_id = ?1 AND provider = ?2 AND key_id = ?3",
        )
        .bind(account.as_str())
        .bind(provider.as_str())
        .bind(key_id.as_str())
        .bind(i64::from(result.ok))
        .bind(result.at.as_i64())
        .bind(&result.message)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        append_now(&mut tx, &self.chain_key, std::slice::from_ref(event)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn save_shared_key(&self, provider: Provider, key: NewKey, now: UnixMillis) -> StoreResult<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        let old: Option<String> = sqlx::query_scalar("SELECT key_id FROM shared_keys WHERE provider = ?1")
            .bind(provider.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        // Overwritten in place, as account keys are (see save_key).
        sqlx::query(
            "INSERT INTO shared_keys (provider, key_id, sealed, last4, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (provider) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed,
               last4 = excluded.last4, updated_at = excluded.updated_at",
        )
        .bind(provider.as_str())
        .bind(key.key_id.as_str())
        .bind(key.sealed.as_bytes())
        .bind(key.last4.as_str())
        .bind(now.as_i64())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(old.is_some())
    }

    async fn shared_key(&self, provider: Provider) -> StoreResult<Option<StoredKey>> {
        let mut r = self.reader.lease().await?;
        let row = sqlx::query("SELECT key_id, sealed, last4 FROM shared_keys WHERE provider = ?1")
            .bind(provider.as_str())
            .fetch_optional(&mut r.conn)
            .await
            .map_err(map_err)?;
        r.release();
        row.as_ref().map(|r| stored_key_from_row(r, "shared_keys")).transpose()
    }

    async fn reserve_credits(&self, account: &AccountId, period: &str, limit: i64, amount: i64) -> StoreResult<bool> {
        check_period(period)?;
        check_amount("amount", amount)?;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        // An unknown account fails the foreign key here: NotFound.
        sqlx::query(
            "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES (?1, ?2, 0, 0)
             ON CONFLICT (account_id, period) DO NOTHING",
        )
        .bind(account.as_str())
        .bind(period)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        // The cap check and the reservation are one statement: atomic in the database, so it
        // holds across processes (SQLite serializes writers; PostgreSQL re-checks the WHERE
        // against the locked row).
        let done = sqlx::query(
            "UPDATE credit_periods SET credits_reserved = credits_reserved + ?3
             WHERE account_id = ?1 AND period = ?2 AND credits_used + credits_reserved + ?3 <= ?4",
        )
        .bind(account.as_str())
        .bind(period)
        .bind(amount)
        .bind(limit)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 1 {
            tx.commit().await.map_err(map_err)?;
            Ok(true)
        } else {
            // Refused: roll back the empty row too, so a refusal leaves no trace.
            tx.rollback().await.map_err(map_err)?;
            Ok(false)
        }
    }

    async fn finish_calls(&self, records: &[CallRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Check everything before writing anything, and fold the batch into one update per
        // (account, period) and per counter row (see `fold_calls`).
        let FoldedCalls { credits, counters } = fold_calls(records)?;
        // This runs for every AI call (batched), so it spends as few round trips to SQLite's
        // thread as it can: BEGIN with the read of the chain heads, then (shared-pool
        // batches only) the credit updates, then every write with the COMMIT.
        let mut tx = RawTx::new(self.writer.acquire().await.map_err(map_err)?);
        let written = async {
            let mut batch = Batch::default();
            chain_into_batch(
                &mut tx.conn,
                "BEGIN IMMEDIATE;\n",
                &self.chain_key,
                records.iter().map(audit_of),
                &mut batch,
            )
            .await?;
            for ((account, period), (release, charge)) in credits {
                settle_in_tx(&mut tx.conn, account, period, release, charge).await?;
            }
            // Counters, audit rows and chain heads: one round trip (see `Batch`).
            for ((account, period, provider, source), (requests, input, output)) in counters {
                batch.sql(
                    "INSERT INTO usage_counters (account_id, period, provider, source, requests, input_tokens, output_tokens)
                     VALUES (?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (account_id, period, provider, source) DO UPDATE SET
                       requests = usage_counters.requests + excluded.requests,
                       input_tokens = usage_counters.input_tokens + excluded.input_tokens,
                       output_tokens = usage_counters.output_tokens + excluded.output_tokens;\n",
                );
                batch.arg(account.to_owned())?;
                batch.arg(period.to_owned())?;
                batch.arg(provider.to_owned())?;
                batch.arg(source.to_owned())?;
                batch.arg(requests)?;
                batch.arg(input)?;
                batch.arg(output)?;
            }
            batch.sql("COMMIT;");
            batch.run(&mut tx.conn).await
        }
        .await;
        match written {
            Ok(()) => {
                tx.committed();
                Ok(())
            }
            Err(e) => {
                tx.roll_back().await;
                Err(e)
            }
        }
    }

    async fn release_credits(&self, account: &AccountId, period: &str, amount: i64) -> StoreResult<()> {
        check_period(period)?;
        check_amount("amount", amount)?;
        if amount == 0 {
            return Ok(());
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        settle_in_tx(&mut tx, account.as_str(), period, amount, 0).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn usage(&self, account: &AccountId, period: &str) -> StoreResult<UsageReport> {
        check_period(period)?;
        let mut r = self.reader.lease().await?;
        let mut conn = r.conn.begin().await.map_err(map_err)?;
        // One read transaction, so credits and counters are one snapshot.
        // (if this future is dropped, the lease closes its connection: no snapshot is left open)
        let result = async {
            let credits = sqlx::query(
                "SELECT credits_used, credits_reserved FROM credit_periods WHERE account_id = ?1 AND period = ?2",
            )
            .bind(account.as_str())
            .bind(period)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
            let rows = sqlx::query(
                "SELECT provider, source, requests, input_tokens, output_tokens FROM usage_counters
                 WHERE account_id = ?1 AND period = ?2",
            )
            .bind(account.as_str())
            .bind(period)
            .fetch_all(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok::<_, StoreError>((credits, rows))
        }
        .await;
        conn.commit().await.map_err(map_err)?;
        r.release();
        let (credits, rows) = result?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
        append_now(&mut tx, &self.chain_key, events).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn audit_page(&self, account: &AccountId, limit: u32, before: Option<i64>) -> StoreResult<Vec<AuditEvent>> {
        let mut r = self.reader.lease().await?;
        let rows =
            sqlx::query("SELECT * FROM audit_events WHERE account_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3")
                .bind(account.as_str())
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&mut r.conn)
                .await
                .map_err(map_err)?;
        r.release();
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_chain(&self, account: &AccountId) -> StoreResult<(Vec<AuditEvent>, Option<ChainHead>)> {
        let mut r = self.reader.lease().await?;
        let mut conn = r.conn.begin().await.map_err(map_err)?;
        // One read transaction, so the head and the events are one snapshot.
        // (if this future is dropped, the lease closes its connection: no snapshot is left open)
        let result = async {
            let rows = sqlx::query("SELECT * FROM audit_events WHERE account_id = ?1 ORDER BY seq, id")
                .bind(account.as_str())
                .fetch_all(&mut *conn)
                .await
                .map_err(map_err)?;
            let events = rows.iter().map(audit_from_row).collect::<StoreResult<Vec<_>>>()?;
            let head = sqlx::query("SELECT seq, mac FROM audit_heads WHERE account_id = ?1")
                .bind(account.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(map_err)?
                .map(|r| {
                    Ok::<_, StoreError>(ChainHead {
                        seq: get(&r, "seq")?,
                        mac: get(&r, "mac")?,
                    })
                })
                .transpose()?;
            Ok((events, head))
        }
        .await;
        conn.commit().await.map_err(map_err)?;
        r.release();
        result
    }

    async fn purge_removed(&self) -> StoreResult<bool> {
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.writer)
            .await
            .map_err(map_err)?;
        let busy: i64 = row.try_get(0).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(busy == 0)
    }
}
