//! The SQLite backend: the embedded default.
//!
//! One writer connection (writes are serialized by SQLite anyway; one connection makes
//! that explicit and spares busy-waits) driven through sqlx, read-only connections
//! driven through rusqlite on the calling thread (see `Readers`), WAL journal,
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
use sqlx::{Arguments, Row, SqlitePool};

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
    /// Idle read-only connections kept open between reads.
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
    reader: Arc<Readers>,
    chain_key: Arc<AuditChainKey>,
}

/// The read-only connections. Reads run on the calling thread, through rusqlite, rather
/// than on sqlx's per-connection thread: a point lookup here takes microseconds, while the
/// hand-off to another thread and back (two wake-ups) cost more than the read itself, and
/// every AI call makes one (the gateway benchmark's figures are in the commit that made
/// this change).
///
/// The rule that keeps the async threads free: [`Readers::read`] is only for reads bounded
/// by an index and a small row count; a read whose size grows with the data
/// ([`Readers::read_blocking`]) goes to tokio's blocking pool. In WAL mode a reader does
/// not wait on the writer; the busy timeout only comes into play while another process
/// recovers the WAL index after a crash.
struct Readers {
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
    path: std::path::PathBuf,
    busy_timeout: Duration,
    keep_idle: usize,
}

impl Readers {
    /// Runs `f` on an idle connection (or a new one), now, on this thread.
    fn read<R>(&self, f: impl FnOnce(&rusqlite::Connection) -> StoreResult<R>) -> StoreResult<R> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let out = f(&conn);
        // A read that failed may have left a statement or transaction half done; such a
        // connection is closed rather than lent again.
        if out.is_ok() && conn.is_autocommit() {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < self.keep_idle {
                    idle.push(conn);
                }
            }
        }
        out
    }

    /// Runs `f` on tokio's blocking pool: for reads that grow with the data.
    async fn read_blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&rusqlite::Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let readers = Arc::clone(self);
        tokio::task::spawn_blocking(move || readers.read(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("read task: {e}")))?
    }

    fn open(&self) -> StoreResult<rusqlite::Connection> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(map_rusqlite)?;
        conn.busy_timeout(self.busy_timeout).map_err(map_rusqlite)?;
        // Every read statement of this file stays prepared.
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }
}

/// The first row of `sql`, if there is one, read by `f`.
fn read_one<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_rusqlite)?;
    let mut rows = stmt.query(params).map_err(map_rusqlite)?;
    match rows.next().map_err(map_rusqlite)? {
        Some(row) => f(row).map(Some),
        None => Ok(None),
    }
}

/// Every row of `sql`, each read by `f`.
fn read_all<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_rusqlite)?;
    let mut rows = stmt.query(params).map_err(map_rusqlite)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(map_rusqlite)? {
        out.push(f(row)?);
    }
    Ok(out)
}

/// A read transaction, so several statements see one snapshot; it ends (rolled back: it
/// wrote nothing) when `f` returns.
fn read_snapshot<R>(
    conn: &rusqlite::Connection,
    f: impl FnOnce(&rusqlite::Connection) -> StoreResult<R>,
) -> StoreResult<R> {
    let tx = conn.unchecked_transaction().map_err(map_rusqlite)?;
    let out = f(&tx);
    tx.rollback().map_err(map_rusqlite)?;
    out
}

fn map_rusqlite(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Database(e.to_string()),
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
        let reader = Arc::new(Readers {
            idle: std::sync::Mutex::new(Vec::new()),
            path: connect.get_filename().to_owned(),
            busy_timeout: opts.busy_timeout,
            keep_idle: usize::try_from(opts.readers.max(1)).unwrap_or(1),
        });
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

/// A column type both drivers decode (sqlx for the writer, rusqlite for the readers).
trait ColumnType: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> + rusqlite::types::FromSql {}
impl<T> ColumnType for T where T: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> + rusqlite::types::FromSql {}

/// A row of either driver, read by column name, so one set of `*_from_row` functions
/// serves both.
trait Columns {
    fn column<T: ColumnType>(&self, col: &str) -> StoreResult<T>;
}

impl Columns for SqliteRow {
    fn column<T: ColumnType>(&self, col: &str) -> StoreResult<T> {
        self.try_get(col)
            .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
    }
}

impl Columns for rusqlite::Row<'_> {
    fn column<T: ColumnType>(&self, col: &str) -> StoreResult<T> {
        self.get(col)
            .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
    }
}

fn get<T: ColumnType>(row: &impl Columns, col: &str) -> StoreResult<T> {
    row.column(col)
}

fn account_from_row(row: &impl Columns) -> StoreResult<Account> {
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

fn membership_from_row(row: &impl Columns) -> StoreResult<Membership> {
    Ok(Membership {
        account: account_from_row(row)?,
        role: get::<String>(row, "role")?
            .parse()
            .map_err(|_| corrupt("memberships.role"))?,
    })
}

fn user_from_row(row: &impl Columns) -> StoreResult<User> {
    Ok(User {
        id: UserId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("users.id"))?,
        email: Email::parse(&get::<String>(row, "email")?).map_err(|_| corrupt("users.email"))?,
    })
}

fn key_meta_from_row(row: &impl Columns) -> StoreResult<KeyMeta> {
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

fn audit_from_row(row: &impl Columns) -> StoreResult<AuditEvent> {
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

fn stored_key_from_row(row: &impl Columns, table: &str) -> StoreResult<StoredKey> {
    Ok(StoredKey {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt(&format!("{table}.key_id")))?,
        sealed: SealedKey::from_bytes(get(row, "sealed")?),
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt(&format!("{table}.last4")))?,
    })
}

/// A [`CallKey`] from the `source`, `key_id`, `sealed` and `last4` columns of a row (a
/// missing source is the default, shared).
fn call_key_from_row(row: &impl Columns) -> StoreResult<CallKey> {
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

const SOURCE_SQL: &str = "SELECT source FROM provider_sources WHERE account_id = ?1 AND provider = ?2";
static KEY_META_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {KEY_COLUMNS} FROM provider_keys WHERE account_id = ?1 AND provider = ?2")
});

fn provider_state(provider: Provider, source: Option<String>, key: Option<KeyMeta>) -> StoreResult<ProviderState> {
    Ok(ProviderState {
        provider,
        source: source
            .map(|s| s.parse::<KeySource>())
            .transpose()
            .map_err(|_| corrupt("provider_sources.source"))?
            .unwrap_or_default(),
        key,
    })
}

/// A provider's state inside a write transaction (what a change left).
async fn state_in(conn: &mut SqliteConnection, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
    let source: Option<String> = sqlx::query_scalar(SOURCE_SQL)
        .bind(account.as_str())
        .bind(provider.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?;
    let key = sqlx::query(&KEY_META_SQL)
        .bind(account.as_str())
        .bind(provider.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_err)?;
    provider_state(provider, source, key.as_ref().map(key_meta_from_row).transpose()?)
}

/// A provider's state, read on a reader connection.
fn state_read(conn: &rusqlite::Connection, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
    let params = (account.as_str(), provider.as_str());
    let source = read_one(conn, SOURCE_SQL, params, |r| get::<String>(r, "source"))?;
    let key = read_one(conn, &KEY_META_SQL, params, |r| key_meta_from_row(r))?;
    provider_state(provider, source, key)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.reader.read(|c| read_one(c, "SELECT 1", (), |_| Ok(())))?;
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
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT u.id, u.email FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?1",
                (token_hash,),
                |r| user_from_row(r),
            )
        })
    }

    async fn member_by_token(
        &self,
        token_hash: &str,
        account: &AccountId,
    ) -> StoreResult<Option<(User, Option<Membership>)>> {
        let sql = format!(
            "SELECT u.id, u.email, m.role, {ACCOUNT_COLUMNS}
             FROM api_tokens t JOIN users u ON u.id = t.user_id
             LEFT JOIN memberships m ON m.user_id = u.id AND m.account_id = ?2
             LEFT JOIN accounts a ON a.id = m.account_id
             WHERE t.token_hash = ?1"
        );
        self.reader.read(|c| {
            read_one(c, &sql, (token_hash, account.as_str()), |row| {
                let membership = match get::<Option<String>>(row, "role")? {
                    Some(_) => Some(membership_from_row(row)?),
                    None => None,
                };
                Ok((user_from_row(row)?, membership))
            })
        })
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
        self.reader.read(|c| {
            read_one(c, &SQL, (token_hash, account.as_str(), provider.as_str()), |row| {
                let member = match get::<Option<String>>(row, "role")? {
                    Some(_) => Some((membership_from_row(row)?, call_key_from_row(row)?)),
                    None => None,
                };
                Ok((user_from_row(row)?, member))
            })
        })
    }

    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT id, email FROM users WHERE email = ?1",
                (email.as_str(),),
                |r| user_from_row(r),
            )
        })
    }

    async fn count_users(&self) -> StoreResult<i64> {
        let n = self
            .reader
            .read(|c| read_one(c, "SELECT COUNT(*) AS n FROM users", (), |row| get(row, "n")))?;
        Ok(n.unwrap_or(0))
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
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ?1");
        self.reader
            .read(|c| read_one(c, &sql, (account.as_str(),), |r| account_from_row(r)))
    }

    async fn account_ids(&self) -> StoreResult<Vec<AccountId>> {
        // Grows with the number of accounts: off the async threads.
        self.reader
            .read_blocking(|c| {
                read_all(c, "SELECT id FROM accounts ORDER BY created_at, id", (), |row| {
                    AccountId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("accounts.id"))
                })
            })
            .await
    }

    async fn membership(&self, account: &AccountId, user: &UserId) -> StoreResult<Option<Membership>> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.account_id = ?1 AND m.user_id = ?2"
        );
        self.reader
            .read(|c| read_one(c, &sql, (account.as_str(), user.as_str()), |r| membership_from_row(r)))
    }

    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.user_id = ?1 ORDER BY a.created_at, a.id"
        );
        self.reader
            .read(|c| read_all(c, &sql, (user.as_str(),), |r| membership_from_row(r)))
    }

    async fn provider_states(&self, account: &AccountId) -> StoreResult<Vec<ProviderState>> {
        self.reader.read(|c| {
            read_snapshot(c, |c| {
                Provider::ALL.into_iter().map(|p| state_read(c, account, p)).collect()
            })
        })
    }

    async fn provider_state(&self, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
        self.reader
            .read(|c| read_snapshot(c, |c| state_read(c, account, provider)))
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
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT s.source,
                    COALESCE(k.key_id, sk.key_id) AS key_id,
                    COALESCE(k.sealed, sk.sealed) AS sealed,
                    COALESCE(k.last4, sk.last4) AS last4
             FROM (SELECT ?1 AS account_id, ?2 AS provider) q
             LEFT JOIN provider_sources s ON s.account_id = q.account_id AND s.provider = q.provider
             LEFT JOIN provider_keys k ON k.account_id = q.account_id AND k.provider = q.provider
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON sk.provider = q.provider AND COALESCE(s.source, 'shared') = 'shared'",
                (account.as_str(), provider.as_str()),
                |r| call_key_from_row(r),
            )?
            .ok_or_else(|| corrupt("call key query returned no row"))
        })
    }

    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT key_id, sealed, last4 FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
                (account.as_str(), provider.as_str()),
                |row| stored_key_from_row(row, "provider_keys"),
            )
        })
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
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT key_id, sealed, last4 FROM shared_keys WHERE provider = ?1",
                (provider.as_str(),),
                |row| stored_key_from_row(row, "shared_keys"),
            )
        })
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
        // One read transaction, so credits and counters are one snapshot.
        let (credits_used, credits_reserved, found) = self.reader.read(|c| {
            read_snapshot(c, |c| {
                let credits = read_one(
                    c,
                    "SELECT credits_used, credits_reserved FROM credit_periods WHERE account_id = ?1 AND period = ?2",
                    (account.as_str(), period),
                    |r| Ok((get(r, "credits_used")?, get(r, "credits_reserved")?)),
                )?;
                let found = read_all(
                    c,
                    "SELECT provider, source, requests, input_tokens, output_tokens FROM usage_counters
                     WHERE account_id = ?1 AND period = ?2",
                    (account.as_str(), period),
                    |r| {
                        Ok(ProviderUsage {
                            provider: get::<String>(r, "provider")?
                                .parse()
                                .map_err(|_| corrupt("usage_counters.provider"))?,
                            source: get::<String>(r, "source")?
                                .parse()
                                .map_err(|_| corrupt("usage_counters.source"))?,
                            requests: get(r, "requests")?,
                            input_tokens: get(r, "input_tokens")?,
                            output_tokens: get(r, "output_tokens")?,
                        })
                    },
                )?;
                let (used, reserved) = credits.unwrap_or((0, 0));
                Ok((used, reserved, found))
            })
        })?;
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
        self.reader.read(|c| {
            read_all(
                c,
                "SELECT * FROM audit_events WHERE account_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                (account.as_str(), before.unwrap_or(i64::MAX), i64::from(limit)),
                |r| audit_from_row(r),
            )
        })
    }

    async fn audit_chain(&self, account: &AccountId) -> StoreResult<(Vec<AuditEvent>, Option<ChainHead>)> {
        // One read transaction, so the head and the events are one snapshot; the whole
        // chain grows with the account's history, so off the async threads.
        let account = account.as_str().to_owned();
        self.reader
            .read_blocking(move |c| {
                read_snapshot(c, |c| {
                    let events = read_all(
                        c,
                        "SELECT * FROM audit_events WHERE account_id = ?1 ORDER BY seq, id",
                        (account.as_str(),),
                        |r| audit_from_row(r),
                    )?;
                    let head = read_one(
                        c,
                        "SELECT seq, mac FROM audit_heads WHERE account_id = ?1",
                        (account.as_str(),),
                        |r| {
                            Ok(ChainHead {
                                seq: get(r, "seq")?,
                                mac: get(r, "mac")?,
                            })
                        },
                    )?;
                    Ok((events, head))
                })
            })
            .await
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
