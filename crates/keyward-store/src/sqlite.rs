//! The SQLite backend: the embedded default.
//!
//! One read-write connection, owned by its own thread (see `Writer`): writes are serialized
//! by SQLite anyway, and one writer makes that explicit and spares busy-waits. Read-only
//! connections run on the calling thread (see `Readers`). WAL journal, `synchronous=FULL`
//! (a commit is on disk when it returns), `secure_delete` on (freed cells are zeroed), and
//! `BEGIN IMMEDIATE` for every write transaction so another process (the admin CLI) waits
//! on the busy timeout instead of failing mid-transaction.

mod kek;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::{
    AccountId, Email, ExternalId, KeyId, KeyKind, KeySource, Last4, Plan, Provider, Role, Scope, ServiceId, UnixMillis,
    UserId,
};
use keyward_crypto::{AuditChainKey, SealedKey, GENESIS_MAC};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use sqlx::sqlite::SqliteConnectOptions;

use crate::audit::{AuditAction, AuditEvent, ChainHead, NewAuditEvent, NewPlatformEvent, PlatformEvent};
use crate::lease::{check_lease, lease_gone, LeaseRow};
use crate::migrate::SQLITE as MIGRATIONS;
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
use std::collections::BTreeMap;

/// Tuning for the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Idle read-only connections kept open between reads.
    pub readers: u32,
    pub busy_timeout: Duration,
    pub outbox: OutboxRules,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            busy_timeout: Duration::from_secs(5),
            outbox: OutboxRules::default(),
        }
    }
}

pub struct SqliteStore {
    writer: Writer,
    reader: Arc<Readers>,
    chain_key: Arc<ChainCtx>,
}

/// A write, run on the writer's thread, given the connection (or why there is none).
type Job = Box<dyn FnOnce(StoreResult<&mut Connection>) + Send>;

/// The one read-write connection, on a thread of its own.
///
/// Every write is a closure sent to that thread, which runs it whole, commit included: one
/// hand-off there and one back per write transaction, however many statements it runs.
/// (Through sqlx, every statement was such a round trip, three per group commit, and on
/// this machine's idle cores each wake-up of another thread costs tens of microseconds.)
/// A write whose caller stops waiting still runs to its end: it commits or rolls back whole.
struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Opens the connection here, so a bad path or an unusable file fails `open` rather
    /// than the first write, then hands it to the writer thread.
    fn start(path: std::path::PathBuf, busy_timeout: Duration) -> StoreResult<Writer> {
        let conn = open_writer(&path, busy_timeout)?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run_writer(conn, &path, busy_timeout, &queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer thread: {e}")))?;
        Ok(Writer { jobs })
    }

    /// Runs `f` on the writer's connection and returns what it returned.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have stopped waiting; the write is done either way.
            let _ = done.send(conn.and_then(f));
        });
        self.jobs.send(job).map_err(|_| writer_gone())?;
        result.await.map_err(|_| writer_gone())?
    }

    /// [`Writer::write`] inside one `BEGIN IMMEDIATE` transaction (see [`immediate`]).
    async fn transaction<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        self.write(move |conn| immediate(conn, f)).await
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the SQLite writer thread has stopped".into())
}

/// The writer thread: runs jobs in arrival order until the store is dropped.
fn run_writer(
    conn: Connection,
    path: &std::path::Path,
    busy_timeout: Duration,
    queue: &std::sync::mpsc::Receiver<Job>,
) {
    let mut conn = Some(conn);
    while let Ok(job) = queue.recv() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match open_writer(path, busy_timeout) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            },
        };
        // A job that panics drops its reply, so its caller gets an error; the thread and
        // the other writes go on.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(&mut *c)))).is_err() {
            tracing::error!("an SQLite write panicked; its transaction is rolled back");
        }
        // Every job ends its transaction (rusqlite rolls back on drop); one that could not
        // (a failed ROLLBACK, a panic mid-way) must not hand an open transaction to the next
        // write: roll back here, or close the connection and open a new one next time.
        if !c.is_autocommit() && (c.execute_batch("ROLLBACK").is_err() || !c.is_autocommit()) {
            tracing::error!("the SQLite writer connection was left in a transaction; reopening it");
            conn = None;
        }
    }
}

/// A connection to `path` whose statements stay prepared (up to `statements` of them).
fn open_connection(
    path: &std::path::Path,
    flags: rusqlite::OpenFlags,
    busy_timeout: Duration,
    statements: usize,
) -> StoreResult<Connection> {
    let conn =
        Connection::open_with_flags(path, flags | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(map_rusqlite)?;
    conn.busy_timeout(busy_timeout).map_err(map_rusqlite)?;
    conn.set_prepared_statement_cache_capacity(statements);
    Ok(conn)
}

fn open_writer(path: &std::path::Path, busy_timeout: Duration) -> StoreResult<Connection> {
    use rusqlite::OpenFlags;
    let conn = open_connection(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        busy_timeout,
        64,
    )?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(map_rusqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "SQLite refused WAL mode (journal_mode is {mode})"
        )));
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;")
        .map_err(map_rusqlite)?;
    Ok(conn)
}

/// Runs `f` in a `BEGIN IMMEDIATE` transaction and commits what it did; if it fails, the
/// transaction rolls back (rusqlite does so when it is dropped).
fn immediate<R>(conn: &mut Connection, f: impl FnOnce(&Transaction<'_>) -> StoreResult<R>) -> StoreResult<R> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_rusqlite)?;
    let out = f(&tx)?;
    tx.commit().map_err(map_rusqlite)?;
    Ok(out)
}

/// Runs one statement (prepared once per connection); the number of rows it changed.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> StoreResult<usize> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(params))
        .map_err(map_rusqlite)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS keyward_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .map_err(map_rusqlite)?;
    for m in MIGRATIONS {
        let applied = immediate(conn, |tx| {
            let done = read_one(
                tx,
                "SELECT version FROM keyward_migrations WHERE version = ?1",
                (m.version,),
                |_| Ok(()),
            )?;
            if done.is_some() {
                return Ok(false);
            }
            tx.execute_batch(m.sql).map_err(map_rusqlite)?;
            exec(
                tx,
                "INSERT INTO keyward_migrations (version, name, applied_at) VALUES (?1, ?2, strftime('%s','now') * 1000)",
                (m.version, m.name),
            )?;
            Ok(true)
        })?;
        if applied {
            tracing::info!(version = m.version, name = m.name, "applied migration");
        }
    }
    Ok(())
}

/// The read-only connections. Reads run on the calling thread rather than on a thread of
/// their own: a point lookup here takes microseconds, while the hand-off to another
/// thread and back (two wake-ups) cost more than the read itself, and
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
        open_connection(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            self.busy_timeout,
            32,
        )
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
    use rusqlite::ffi;
    match &e {
        rusqlite::Error::SqliteFailure(f, message) => match f.extended_code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => StoreError::Conflict(format!(
                "already exists: {}",
                message.clone().unwrap_or_else(|| e.to_string())
            )),
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => StoreError::NotFound,
            _ if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        },
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
        let path = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad SQLite URL: {e}")))?
            .get_filename()
            .to_owned();
        SqliteStore::open_file(&path, chain_key, opts).await
    }

    /// [`SqliteStore::open`] for the file itself (`serve` parses its URL once, in its
    /// configuration).
    pub async fn open_file(
        path: &std::path::Path,
        chain_key: AuditChainKey,
        opts: SqliteOptions,
    ) -> StoreResult<SqliteStore> {
        let path = path.to_path_buf();
        let writer = Writer::start(path.clone(), opts.busy_timeout)?;
        // No mmap: the file grows with every checkpoint of the audit log, and each growth
        // made every reader unmap and remap it (munmap with TLB shoot-downs was ~3% of all
        // CPU under load); reads of the hot rows come from SQLite's page cache.
        let reader = Arc::new(Readers {
            idle: std::sync::Mutex::new(Vec::new()),
            path,
            busy_timeout: opts.busy_timeout,
            keep_idle: usize::try_from(opts.readers.max(1)).unwrap_or(1),
        });
        writer.write(migrate).await?;
        Ok(SqliteStore {
            writer,
            reader,
            chain_key: Arc::new(ChainCtx {
                key: chain_key,
                rules: opts.outbox,
            }),
        })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

type Row<'a> = rusqlite::Row<'a>;

fn get<T: rusqlite::types::FromSql>(row: &Row<'_>, col: &str) -> StoreResult<T> {
    row.get(col)
        .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

fn account_from_row(row: &Row<'_>) -> StoreResult<Account> {
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

fn membership_from_row(row: &Row<'_>) -> StoreResult<Membership> {
    Ok(Membership {
        account: account_from_row(row)?,
        role: get::<String>(row, "role")?
            .parse()
            .map_err(|_| corrupt("memberships.role"))?,
    })
}

fn user_from_row(row: &Row<'_>) -> StoreResult<User> {
    Ok(User {
        id: UserId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("users.id"))?,
        email: Email::parse(&get::<String>(row, "email")?).map_err(|_| corrupt("users.email"))?,
    })
}

fn external_id_from_row(row: &Row<'_>, table: &str) -> StoreResult<ExternalId> {
    ExternalId::parse(&get::<String>(row, "external_id")?).map_err(|_| corrupt(&format!("{table}.external_id")))
}

fn external_account_from_row(row: &Row<'_>) -> StoreResult<ExternalAccount> {
    Ok(ExternalAccount {
        account: account_from_row(row)?,
        external_id: external_id_from_row(row, "accounts")?,
    })
}

fn external_user_from_row(row: &Row<'_>) -> StoreResult<ExternalUser> {
    Ok(ExternalUser {
        user: user_from_row(row)?,
        external_id: external_id_from_row(row, "users")?,
    })
}

fn service_from_row(row: &Row<'_>) -> StoreResult<Service> {
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
    "SELECT a.id AS account_id, a.name, a.plan, a.shared_credit_limit, a.external_id FROM accounts a WHERE a.external_id = ?1";

fn key_meta_from_row(row: &Row<'_>) -> StoreResult<KeyMeta> {
    let last_test = match (
        get::<Option<i64>>(row, "last_test_ok")?,
        get::<Option<i64>>(row, "last_test_at")?,
    ) {
        (Some(ok), Some(at)) => Some(LastTest {
            ok: ok != 0,
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
        kind: parse_kind(get(row, "kind")?)?,
        reported_leaked_at: get::<Option<i64>>(row, "reported_leaked_at")?.map(UnixMillis),
    })
}

fn parse_kind(kind: Option<String>) -> StoreResult<Option<KeyKind>> {
    kind.map(|k| k.parse::<KeyKind>())
        .transpose()
        .map_err(|_| corrupt("provider_keys.kind"))
}

fn audit_from_row(row: &Row<'_>) -> StoreResult<AuditEvent> {
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

fn platform_from_row(row: &Row<'_>) -> StoreResult<PlatformEvent> {
    Ok(PlatformEvent {
        id: get(row, "id")?,
        seq: get(row, "seq")?,
        at: get(row, "at")?,
        actor: get(row, "actor")?,
        action: get(row, "action")?,
        provider: get(row, "provider")?,
        key_last4: get(row, "key_last4")?,
        account_id: get(row, "account_id")?,
        kek_id: get(row, "kek_id")?,
        detail: get(row, "detail")?,
        mac: get(row, "mac")?,
    })
}

const ACCOUNT_COLUMNS: &str = "a.id AS account_id, a.name, a.plan, a.shared_credit_limit";
const KEY_COLUMNS: &str = "key_id, last4, created_at, updated_at, last_test_ok, last_test_at, last_test_message, \
     last_test_detail, kind, reported_leaked_at";

const INSERT_EVENT_SQL: &str = "INSERT INTO audit_events (account_id, seq, at, actor, action, provider, key_source, key_last4, model, outcome, detail, provider_request_id, input_tokens, output_tokens, feature, mac, on_behalf_of)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

/// Appends `events` (in order) to their accounts' chains inside the caller's transaction:
/// reads each account's head once, links each event to the one before, inserts the events,
/// then writes one new head per account.
///
/// The webhook events they cause are written here too (see `outbox`): one per key change,
/// failed test and plan change, and each own-key call moves its key's failure streak.
fn append_in_tx<'e>(
    tx: &Connection,
    chain: &ChainCtx,
    events: impl IntoIterator<Item = &'e NewAuditEvent>,
) -> StoreResult<()> {
    let mut heads: std::collections::BTreeMap<&str, (i64, [u8; 32])> = std::collections::BTreeMap::new();
    let mut streaks: std::collections::BTreeMap<(&str, &str), Vec<StreakCall<'_>>> = std::collections::BTreeMap::new();
    let mut insert = tx.prepare_cached(INSERT_EVENT_SQL).map_err(map_rusqlite)?;
    for new in events {
        let account = new.account_id.as_str();
        let (seq, prev) = match heads.get(account) {
            Some(head) => *head,
            None => read_one(
                tx,
                "SELECT seq, mac FROM audit_heads WHERE account_id = ?1",
                (account,),
                |r| {
                    let mac: Vec<u8> = get(r, "mac")?;
                    let mac: [u8; 32] = mac.as_slice().try_into().map_err(|_| corrupt("audit_heads.mac"))?;
                    Ok((get(r, "seq")?, mac))
                },
            )?
            .unwrap_or((0, GENESIS_MAC)),
        };
        let mut e = new.clone().into_event(seq + 1);
        let mac = e.seal_link(&chain.key, &prev);
        insert
            .execute(rusqlite::params![
                e.account_id,
                e.seq,
                e.at,
                e.actor,
                e.action,
                e.provider,
                e.key_source,
                e.key_last4,
                e.model,
                e.outcome,
                e.detail,
                e.provider_request_id,
                e.input_tokens,
                e.output_tokens,
                e.feature,
                e.mac,
                e.on_behalf_of,
            ])
            .map_err(map_rusqlite)?;
        heads.insert(account, (e.seq, mac));
        match outbox::trigger(&chain.rules, new) {
            Trigger::None => {}
            Trigger::Event(kind) => enqueue_for_audit(tx, kind, new, &mac, None)?,
            Trigger::KeyCall(health) => {
                if let Some(p) = new.provider {
                    streaks
                        .entry((account, p.as_str()))
                        .or_default()
                        .push((health, new, mac));
                }
            }
        }
    }
    for (account, (seq, mac)) in heads {
        exec(
            tx,
            "INSERT INTO audit_heads (account_id, seq, mac) VALUES (?1, ?2, ?3)
             ON CONFLICT (account_id) DO UPDATE SET seq = excluded.seq, mac = excluded.mac",
            (account, seq, &mac[..]),
        )?;
    }
    for ((account, provider), calls) in streaks {
        let Some(start) = read_one(
            tx,
            "SELECT fail_streak FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
            (account, provider),
            |r| get::<i64>(r, "fail_streak"),
        )?
        else {
            continue; // the key was removed meanwhile: nothing to follow
        };
        let (end, caused) = outbox::walk_streak(start, chain.rules.key_failing_after, calls.iter().map(|c| &c.0));
        if end != start {
            exec(
                tx,
                "UPDATE provider_keys SET fail_streak = ?3 WHERE account_id = ?1 AND provider = ?2",
                (account, provider, end),
            )?;
        }
        for (i, kind, diagnosis) in caused {
            if let Some((_, event, mac)) = calls.get(i) {
                enqueue_for_audit(tx, kind, event, mac, diagnosis.as_deref())?;
            }
        }
    }
    Ok(())
}

/// An own-key call in a batch: how it bears on its key's streak, its event and the event's MAC.
type StreakCall<'e> = (CallHealth, &'e NewAuditEvent, [u8; 32]);

/// The account's external id and plan, for a webhook payload.
fn account_labels(tx: &Connection, account: &str) -> StoreResult<(Option<String>, Option<String>)> {
    Ok(read_one(
        tx,
        "SELECT external_id, plan FROM accounts WHERE id = ?1",
        (account,),
        |r| {
            Ok((
                get::<Option<String>>(r, "external_id")?,
                get::<Option<String>>(r, "plan")?,
            ))
        },
    )?
    .unwrap_or((None, None)))
}

fn enqueue_for_audit(
    tx: &Connection,
    kind: WebhookKind,
    e: &NewAuditEvent,
    mac: &[u8],
    diagnosis: Option<&str>,
) -> StoreResult<()> {
    let (external, plan) = account_labels(tx, e.account_id.as_str())?;
    let body = outbox::body_for_audit(kind, e, external.as_deref(), plan.as_deref(), diagnosis);
    enqueue(
        tx,
        &outbox::event_id_for_audit(mac),
        e.account_id.as_str(),
        kind,
        &body,
        e.at,
    )
}

fn enqueue(
    tx: &Connection,
    event_id: &str,
    account: &str,
    kind: WebhookKind,
    body: &str,
    at: UnixMillis,
) -> StoreResult<()> {
    exec(
        tx,
        "INSERT INTO webhook_outbox (event_id, account_id, type, payload, created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (event_id) DO NOTHING",
        (event_id, account, kind.as_str(), body, at.as_i64()),
    )?;
    Ok(())
}

/// Announces the shared-credit thresholds a period has newly reached (see
/// `outbox::thresholds_crossed`), inside the caller's transaction. `refused_amount` is a
/// reservation the cap just refused.
fn announce_thresholds(
    tx: &Connection,
    account: &str,
    period: &str,
    refused_amount: Option<i64>,
    now: UnixMillis,
) -> StoreResult<bool> {
    let Some((used, limit, announced)) = read_one(
        tx,
        "SELECT credits_used, credit_limit, notified_percent FROM credit_periods WHERE account_id = ?1 AND period = ?2",
        (account, period),
        |r| {
            Ok((
                get::<i64>(r, "credits_used")?,
                get::<Option<i64>>(r, "credit_limit")?,
                get::<i64>(r, "notified_percent")?,
            ))
        },
    )?
    else {
        return Ok(false);
    };
    let crossed = outbox::thresholds_crossed(used, limit, announced, refused_amount);
    let Some(&highest) = crossed.last() else {
        return Ok(false);
    };
    exec(
        tx,
        "UPDATE credit_periods SET notified_percent = ?3 WHERE account_id = ?1 AND period = ?2",
        (account, period, highest),
    )?;
    let (external, _) = account_labels(tx, account)?;
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
        enqueue(
            tx,
            &outbox::event_id_for_threshold(account, period, percent),
            account,
            WebhookKind::SharedQuotaThreshold,
            &body,
            now,
        )?;
    }
    Ok(true)
}

fn webhook_from_row(row: &Row<'_>) -> StoreResult<WebhookEvent> {
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
/// the calls it settles have happened and their audit events must not be lost. `announce`:
/// the time to date threshold events by, or `None` to write none.
fn settle_in_tx(
    tx: &Connection,
    account: &str,
    period: &str,
    release: i64,
    charge: i64,
    announce: Option<UnixMillis>,
) -> StoreResult<()> {
    if release == 0 && charge == 0 {
        return Ok(());
    }
    let done = exec(
        tx,
        "UPDATE credit_periods SET credits_reserved = credits_reserved - ?3, credits_used = credits_used + ?4
         WHERE account_id = ?1 AND period = ?2 AND credits_reserved >= ?3",
        (account, period, release, charge),
    )?;
    if done == 1 {
        if let Some(now) = announce.filter(|_| charge > 0) {
            announce_thresholds(tx, account, period, None, now)?;
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
    exec(
        tx,
        "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES (?1, ?2, ?3, 0)
         ON CONFLICT (account_id, period) DO UPDATE SET
           credits_used = credit_periods.credits_used + excluded.credits_used,
           credits_reserved = CASE WHEN credit_periods.credits_reserved >= ?4
                                   THEN credit_periods.credits_reserved - ?4 ELSE 0 END",
        (account, period, charge, release),
    )?;
    if let Some(now) = announce.filter(|_| charge > 0) {
        announce_thresholds(tx, account, period, None, now)?;
    }
    Ok(())
}

/// The cap check and the reservation of `amount` credits (see `Store::reserve_credits`),
/// inside the caller's transaction: whether it reserved, and whether a refusal wrote
/// something to keep (the announcement that the pool is spent).
fn reserve_in_tx(
    tx: &Connection,
    account: &str,
    period: &str,
    limit: i64,
    amount: i64,
    announce: bool,
    now: UnixMillis,
) -> StoreResult<(bool, bool)> {
    // An unknown account fails the foreign key here: NotFound.
    exec(
        tx,
        "INSERT INTO credit_periods (account_id, period, credits_used, credits_reserved) VALUES (?1, ?2, 0, 0)
         ON CONFLICT (account_id, period) DO NOTHING",
        (account, period),
    )?;
    // The cap check and the reservation are one statement: atomic in the database, so it
    // holds across processes (SQLite serializes writers; PostgreSQL re-checks the WHERE
    // against the locked row).
    let reserved = exec(
        tx,
        "UPDATE credit_periods SET credits_reserved = credits_reserved + ?3, credit_limit = ?4
         WHERE account_id = ?1 AND period = ?2 AND credits_used + credits_reserved + ?3 <= ?4",
        (account, period, amount, limit),
    )? == 1;
    let announced = !reserved && announce && {
        exec(
            tx,
            "UPDATE credit_periods SET credit_limit = ?3 WHERE account_id = ?1 AND period = ?2",
            (account, period, limit),
        )?;
        announce_thresholds(tx, account, period, Some(amount), now)?
    };
    Ok((reserved, announced))
}

/// Adds to one usage counter row (account, period, provider, source), inside the caller's
/// transaction.
fn count_calls(tx: &Connection, key: crate::CounterKey<'_>, requests: i64, input: i64, output: i64) -> StoreResult<()> {
    let (account, period, provider, source) = key;
    exec(
        tx,
        "INSERT INTO usage_counters (account_id, period, provider, source, requests, input_tokens, output_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (account_id, period, provider, source) DO UPDATE SET
           requests = usage_counters.requests + excluded.requests,
           input_tokens = usage_counters.input_tokens + excluded.input_tokens,
           output_tokens = usage_counters.output_tokens + excluded.output_tokens",
        (account, period, provider, source, requests, input, output),
    )?;
    Ok(())
}

/// Settles the leases the records of a `finish_calls` batch name, inside its transaction:
/// each lease row is deleted, and a record whose lease is gone (released as abandoned
/// meanwhile) fails the batch, naming the record.
fn settle_leases(tx: &Connection, records: &[CallRecord]) -> StoreResult<()> {
    for (i, r) in records.iter().enumerate() {
        let Some(id) = r.lease else { continue };
        let settled = exec(
            tx,
            "DELETE FROM reservation_leases WHERE id = ?1 AND account_id = ?2 AND period = ?3 AND amount = ?4",
            (id, r.account_id.as_str(), r.period.as_str(), r.reserved),
        )?;
        if settled != 1 {
            return Err(crate::at_record(i, lease_gone(id)));
        }
    }
    Ok(())
}

/// A lease row, as `release_leases` reads it.
fn lease_from_row(row: &Row<'_>) -> StoreResult<LeaseRow> {
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

const LEASE_COLUMNS: &str =
    "id, account_id, period, amount, node, actor, provider, model, key_source, feature, on_behalf_of";

/// A [`StoredKey`] from the `key_id`, `sealed`, `last4` and `reported_leaked_at` columns.
fn stored_key_from_row(row: &Row<'_>, table: &str) -> StoreResult<StoredKey> {
    Ok(StoredKey {
        key_id: KeyId::parse(&get::<String>(row, "key_id")?).map_err(|_| corrupt(&format!("{table}.key_id")))?,
        sealed: SealedKey::from_bytes(get(row, "sealed")?),
        last4: Last4::from_stored(&get::<String>(row, "last4")?).ok_or_else(|| corrupt(&format!("{table}.last4")))?,
        reported_leaked_at: get::<Option<i64>>(row, "reported_leaked_at")?.map(UnixMillis),
    })
}

/// A [`CallKey`] from the `source`, `key_id`, `sealed`, `last4` and `reported_leaked_at`
/// columns of a row (a missing source is the default, shared).
fn call_key_from_row(row: &Row<'_>) -> StoreResult<CallKey> {
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

/// A provider's state, read on `conn` (a reader's snapshot, or a write transaction: what
/// a change left).
fn state_read(conn: &rusqlite::Connection, account: &AccountId, provider: Provider) -> StoreResult<ProviderState> {
    let params = (account.as_str(), provider.as_str());
    let source = read_one(conn, SOURCE_SQL, params, |r| get::<String>(r, "source"))?;
    let key = read_one(conn, &KEY_META_SQL, params, key_meta_from_row)?;
    provider_state(provider, source, key)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.reader.read(|c| read_one(c, "SELECT 1", (), |_| Ok(())))?;
        Ok(())
    }

    async fn create_user(&self, id: &UserId, email: &Email, token_hash: &str, now: UnixMillis) -> StoreResult<()> {
        let (id, email, token_hash) = (id.clone(), email.clone(), token_hash.to_owned());
        self.writer
            .transaction(move |tx| {
                exec(
                    tx,
                    "INSERT INTO users (id, email, created_at) VALUES (?1, ?2, ?3)",
                    (id.as_str(), email.as_str(), now.as_i64()),
                )
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        StoreError::Conflict(format!("a user with email {email} already exists"))
                    }
                    other => other,
                })?;
                exec(
                    tx,
                    "INSERT INTO api_tokens (token_hash, user_id, created_at) VALUES (?1, ?2, ?3)",
                    (token_hash.as_str(), id.as_str(), now.as_i64()),
                )?;
                Ok(())
            })
            .await
    }

    async fn user_by_token(&self, token_hash: &str) -> StoreResult<Option<User>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT u.id, u.email FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?1",
                (token_hash,),
                user_from_row,
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
                    COALESCE(k.last4, sk.last4) AS last4,
                    k.reported_leaked_at
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
                user_from_row,
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
        let (id, name, owner) = (id.clone(), name.to_owned(), owner.clone());
        self.writer
            .transaction(move |tx| {
                exec(
                    tx,
                    "INSERT INTO accounts (id, name, plan, created_at) VALUES (?1, ?2, ?3, ?4)",
                    (id.as_str(), name.as_str(), plan.as_str(), now.as_i64()),
                )?;
                exec(
                    tx,
                    "INSERT INTO memberships (account_id, user_id, role, created_at) VALUES (?1, ?2, 'owner', ?3)",
                    (id.as_str(), owner.as_str(), now.as_i64()),
                )?;
                Ok(())
            })
            .await
    }

    async fn set_membership(&self, account: &AccountId, user: &UserId, role: Role, now: UnixMillis) -> StoreResult<()> {
        let (account, user) = (account.clone(), user.clone());
        self.writer
            .write(move |conn| {
                exec(
                    conn,
                    "INSERT INTO memberships (account_id, user_id, role, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (account_id, user_id) DO UPDATE SET role = excluded.role",
                    (account.as_str(), user.as_str(), role.as_str(), now.as_i64()),
                )?;
                Ok(())
            })
            .await
    }

    async fn set_plan(
        &self,
        account: &AccountId,
        plan: Plan,
        limit: Option<i64>,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        let (account, actor, chain_key) = (account.clone(), actor.clone(), Arc::clone(&self.chain_key));
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ?1");
        self.writer
            .transaction(move |tx| {
                let before =
                    read_one(tx, &sql, (account.as_str(),), account_from_row)?.ok_or(StoreError::NotFound)?;
                exec(
                    tx,
                    "UPDATE accounts SET plan = ?2, shared_credit_limit = COALESCE(?3, shared_credit_limit) WHERE id = ?1",
                    (account.as_str(), plan.as_str(), limit),
                )?;
                let after = read_one(tx, &sql, (account.as_str(),), account_from_row)?.ok_or(StoreError::NotFound)?;
                let Some(detail) = plan_change_detail(&before, after.plan, after.shared_credit_limit) else {
                    return Ok(false);
                };
                let event = NewAuditEvent::for_account(&account, now, &actor, AuditAction::PlanChanged)
                    .detail(Some(detail));
                append_in_tx(tx, &chain_key, [&event])?;
                Ok(true)
            })
            .await
    }

    async fn account(&self, account: &AccountId) -> StoreResult<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ?1");
        self.reader
            .read(|c| read_one(c, &sql, (account.as_str(),), account_from_row))
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
            .read(|c| read_one(c, &sql, (account.as_str(), user.as_str()), membership_from_row))
    }

    async fn memberships_of(&self, user: &UserId) -> StoreResult<Vec<Membership>> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS}, m.role FROM memberships m JOIN accounts a ON a.id = m.account_id WHERE m.user_id = ?1 ORDER BY a.created_at, a.id"
        );
        self.reader
            .read(|c| read_all(c, &sql, (user.as_str(),), membership_from_row))
    }

    async fn create_service(
        &self,
        id: &ServiceId,
        name: &str,
        scopes: &[Scope],
        token_hash: &str,
        now: UnixMillis,
    ) -> StoreResult<()> {
        let (id, name, scopes, token_hash) = (
            id.clone(),
            name.to_owned(),
            scopes_column(scopes),
            token_hash.to_owned(),
        );
        self.writer
            .transaction(move |tx| {
                exec(
                    tx,
                    "INSERT INTO services (id, name, scopes, token_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    (
                        id.as_str(),
                        name.as_str(),
                        scopes.as_str(),
                        token_hash.as_str(),
                        now.as_i64(),
                    ),
                )
                .map_err(|e| match e {
                    StoreError::Conflict(_) => StoreError::Conflict(format!("a service named {name} already exists")),
                    other => other,
                })?;
                Ok(())
            })
            .await
    }

    async fn service_by_token(&self, token_hash: &str) -> StoreResult<Option<Service>> {
        let sql = format!("SELECT {SERVICE_COLUMNS} FROM services WHERE token_hash = ?1 AND revoked_at IS NULL");
        self.reader.read(|c| read_one(c, &sql, (token_hash,), service_from_row))
    }

    async fn services(&self) -> StoreResult<Vec<Service>> {
        let sql = format!("SELECT {SERVICE_COLUMNS} FROM services ORDER BY created_at, id");
        self.reader
            .read_blocking(move |c| read_all(c, &sql, (), service_from_row))
            .await
    }

    async fn revoke_service(&self, name: &str, now: UnixMillis) -> StoreResult<Option<Service>> {
        let name = name.to_owned();
        let sql = format!(
            "UPDATE services SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL RETURNING {SERVICE_COLUMNS}"
        );
        self.writer
            .transaction(move |tx| read_one(tx, &sql, (name.as_str(), now.as_i64()), service_from_row))
            .await
    }

    async fn account_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalAccount>> {
        self.reader
            .read(|c| read_one(c, EXTERNAL_ACCOUNT_SQL, (external.as_str(),), external_account_from_row))
    }

    async fn put_external_account(
        &self,
        external: &ExternalId,
        new_id: &AccountId,
        spec: &AccountSpec,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<AccountPut> {
        let (external, new_id, spec, actor, chain_key) = (
            external.clone(),
            new_id.clone(),
            spec.clone(),
            actor.clone(),
            Arc::clone(&self.chain_key),
        );
        self.writer
            .transaction(move |tx| {
                // Insert or find, on the unique index of external ids.
                let created = read_one(
                    tx,
                    "INSERT INTO accounts (id, name, plan, shared_credit_limit, created_at, external_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING id",
                    (
                        new_id.as_str(),
                        spec.name.as_str(),
                        spec.plan.as_str(),
                        spec.shared_credit_limit,
                        now.as_i64(),
                        external.as_str(),
                    ),
                    |_| Ok(()),
                )?
                .is_some();
                let before = read_one(tx, EXTERNAL_ACCOUNT_SQL, (external.as_str(),), |row| {
                    Ok((
                        external_account_from_row(row)?,
                        get::<Option<i64>>(row, "shared_credit_limit")?,
                    ))
                })?
                .ok_or(StoreError::NotFound)?;
                let (before, raw_limit) = before;
                if created {
                    return Ok(AccountPut {
                        account: before,
                        created: true,
                        plan_changed: false,
                    });
                }
                let a = &before.account;
                if a.name == spec.name && a.plan == spec.plan && raw_limit == spec.shared_credit_limit {
                    return Ok(AccountPut {
                        account: before,
                        created: false,
                        plan_changed: false,
                    });
                }
                exec(
                    tx,
                    "UPDATE accounts SET name = ?2, plan = ?3, shared_credit_limit = ?4 WHERE id = ?1",
                    (
                        a.id.as_str(),
                        spec.name.as_str(),
                        spec.plan.as_str(),
                        spec.shared_credit_limit,
                    ),
                )?;
                let after = read_one(
                    tx,
                    EXTERNAL_ACCOUNT_SQL,
                    (external.as_str(),),
                    external_account_from_row,
                )?
                .ok_or(StoreError::NotFound)?;
                let detail = plan_change_detail(a, after.account.plan, after.account.shared_credit_limit);
                let plan_changed = detail.is_some();
                if let Some(detail) = detail {
                    let event = NewAuditEvent::for_account(&after.account.id, now, &actor, AuditAction::PlanChanged)
                        .detail(Some(detail));
                    append_in_tx(tx, &chain_key, [&event])?;
                }
                Ok(AccountPut {
                    account: after,
                    created: false,
                    plan_changed,
                })
            })
            .await
    }

    async fn delete_account(
        &self,
        account: &AccountId,
        actor: &AuditActor,
        detail: Option<String>,
        now: UnixMillis,
    ) -> StoreResult<usize> {
        let (account, actor, chain_key) = (account.clone(), actor.clone(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| {
                let id = account.as_str();
                read_one(tx, "SELECT id FROM accounts WHERE id = ?1", (id,), |_| Ok(()))?
                    .ok_or(StoreError::NotFound)?;
                let keys = read_all(
                    tx,
                    "SELECT provider, last4 FROM provider_keys WHERE account_id = ?1 ORDER BY provider",
                    (id,),
                    |r| {
                        let provider: Provider = get::<String>(r, "provider")?
                            .parse()
                            .map_err(|_| corrupt("provider_keys.provider"))?;
                        let last4 = Last4::from_stored(&get::<String>(r, "last4")?)
                            .ok_or_else(|| corrupt("provider_keys.last4"))?;
                        Ok((provider, last4))
                    },
                )?;
                let mut events: Vec<NewAuditEvent> = keys
                    .iter()
                    .map(|(p, last4)| {
                        NewAuditEvent::new(&account, now, &actor, AuditAction::KeyRemoved, *p).last4(Some(last4))
                    })
                    .collect();
                events.push(
                    NewAuditEvent::for_account(&account, now, &actor, AuditAction::AccountDeleted).detail(detail),
                );
                append_in_tx(tx, &chain_key, events.iter())?;
                // With secure_delete on, the deleted blobs' cells are zeroed; the purge that
                // follows checkpoints them out of the WAL.
                for table in [
                    "provider_keys",
                    "provider_sources",
                    "memberships",
                    "credit_periods",
                    "usage_counters",
                ] {
                    exec(tx, &format!("DELETE FROM {table} WHERE account_id = ?1"), (id,))?;
                }
                exec(tx, "DELETE FROM accounts WHERE id = ?1", (id,))?;
                Ok(keys.len())
            })
            .await
    }

    async fn user_by_external_id(&self, external: &ExternalId) -> StoreResult<Option<ExternalUser>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT id, email, external_id FROM users WHERE external_id = ?1",
                (external.as_str(),),
                external_user_from_row,
            )
        })
    }

    async fn put_external_user(
        &self,
        external: &ExternalId,
        new_id: &UserId,
        email: &Email,
        now: UnixMillis,
    ) -> StoreResult<ExternalUser> {
        let (external, new_id, email) = (external.clone(), new_id.clone(), email.clone());
        let email_taken = {
            let email = email.clone();
            move |e: StoreError| match e {
                StoreError::Conflict(_) => StoreError::Conflict(format!("another user has the email {email}")),
                other => other,
            }
        };
        self.writer
            .transaction(move |tx| {
                let created = read_one(
                    tx,
                    "INSERT INTO users (id, email, created_at, external_id) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING id",
                    (new_id.as_str(), email.as_str(), now.as_i64(), external.as_str()),
                    |_| Ok(()),
                )
                .map_err(&email_taken)?
                .is_some();
                if !created {
                    exec(
                        tx,
                        "UPDATE users SET email = ?2 WHERE external_id = ?1 AND email <> ?2",
                        (external.as_str(), email.as_str()),
                    )
                    .map_err(&email_taken)?;
                }
                read_one(
                    tx,
                    "SELECT id, email, external_id FROM users WHERE external_id = ?1",
                    (external.as_str(),),
                    external_user_from_row,
                )?
                .ok_or(StoreError::NotFound)
            })
            .await
    }

    async fn remove_membership(&self, account: &AccountId, user: &UserId) -> StoreResult<bool> {
        let (account, user) = (account.clone(), user.clone());
        let n = self
            .writer
            .write(move |conn| {
                exec(
                    conn,
                    "DELETE FROM memberships WHERE account_id = ?1 AND user_id = ?2",
                    (account.as_str(), user.as_str()),
                )
            })
            .await?;
        Ok(n > 0)
    }

    async fn chain_account_ids(&self) -> StoreResult<Vec<AccountId>> {
        self.reader
            .read_blocking(|c| {
                read_all(
                    c,
                    "SELECT id FROM accounts UNION SELECT account_id FROM audit_heads ORDER BY 1",
                    (),
                    |row| AccountId::parse(&get::<String>(row, "id")?).map_err(|_| corrupt("accounts.id")),
                )
            })
            .await
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
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<Saved> {
        let (account, actor, chain_key) = (account.clone(), actor.clone(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| {
                let old_last4 = read_one(
                    tx,
                    "SELECT last4 FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
                    (account.as_str(), provider.as_str()),
                    |r| get::<String>(r, "last4"),
                )?;
                // Rotation overwrites the row in place: with secure_delete the old blob's
                // bytes are zeroed in the page, and the checkpoint that follows clears them
                // from the WAL.
                exec(
                    tx,
                    "INSERT INTO provider_keys (account_id, provider, key_id, sealed, last4, created_at, updated_at, kind)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)
                     ON CONFLICT (account_id, provider) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed,
                       last4 = excluded.last4, updated_at = excluded.updated_at, kind = excluded.kind,
                       last_test_ok = NULL, last_test_at = NULL, last_test_message = NULL, last_test_detail = NULL,
                       reported_leaked_at = NULL, fail_streak = 0",
                    (
                        account.as_str(),
                        provider.as_str(),
                        key.key_id.as_str(),
                        key.sealed.as_bytes(),
                        key.last4.as_str(),
                        now.as_i64(),
                        key.kind.as_str(),
                    ),
                )?;
                let rotated = old_last4.is_some();
                let (action, detail) = match &old_last4 {
                    Some(old) => (AuditAction::KeyRotated, Some(format!("replaced key ending {old}"))),
                    None => (AuditAction::KeySaved, None),
                };
                let event =
                    NewAuditEvent::new(&account, now, &actor, action, provider)
                    .last4(Some(&key.last4))
                    .detail(detail);
                append_in_tx(tx, &chain_key, [&event])?;
                let state = state_read(tx, &account, provider)?;
                Ok(Saved { rotated, state })
            })
            .await
    }

    async fn remove_key(
        &self,
        account: &AccountId,
        provider: Provider,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<()> {
        let (account, actor, chain_key) = (account.clone(), actor.clone(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| {
                let last4 = read_one(
                    tx,
                    "DELETE FROM provider_keys WHERE account_id = ?1 AND provider = ?2 RETURNING last4",
                    (account.as_str(), provider.as_str()),
                    |r| get::<String>(r, "last4"),
                )?
                .ok_or(StoreError::NoKeySaved)?;
                exec(
                    tx,
                    "DELETE FROM provider_sources WHERE account_id = ?1 AND provider = ?2",
                    (account.as_str(), provider.as_str()),
                )?;
                let last4 = Last4::from_stored(&last4).ok_or_else(|| corrupt("provider_keys.last4"))?;
                let event =
                    NewAuditEvent::new(&account, now, &actor, AuditAction::KeyRemoved, provider).last4(Some(&last4));
                append_in_tx(tx, &chain_key, [&event])
            })
            .await
    }

    async fn set_source(
        &self,
        account: &AccountId,
        provider: Provider,
        source: KeySource,
        actor: &AuditActor,
        now: UnixMillis,
    ) -> StoreResult<ProviderState> {
        let (account, actor, chain_key) = (account.clone(), actor.clone(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| {
                let before = state_read(tx, &account, provider)?;
                if source == KeySource::Own && before.key.is_none() {
                    return Err(StoreError::NoKeySaved);
                }
                if before.source != source {
                    exec(
                        tx,
                        "INSERT INTO provider_sources (account_id, provider, source) VALUES (?1, ?2, ?3)
                             ON CONFLICT (account_id, provider) DO UPDATE SET source = excluded.source",
                        (account.as_str(), provider.as_str(), source.as_str()),
                    )?;
                    let event = NewAuditEvent::new(&account, now, &actor, AuditAction::KeySourceChanged, provider)
                        .last4(before.key.as_ref().map(|k| &k.last4))
                        .key_source(source)
                        .detail(Some(format!("{} -> {}", before.source, source)));
                    append_in_tx(tx, &chain_key, [&event])?;
                }
                state_read(tx, &account, provider)
            })
            .await
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
                    COALESCE(k.last4, sk.last4) AS last4,
                    k.reported_leaked_at
             FROM (SELECT ?1 AS account_id, ?2 AS provider) q
             LEFT JOIN provider_sources s ON s.account_id = q.account_id AND s.provider = q.provider
             LEFT JOIN provider_keys k ON k.account_id = q.account_id AND k.provider = q.provider
                                      AND s.source = 'own'
             LEFT JOIN shared_keys sk ON sk.provider = q.provider AND COALESCE(s.source, 'shared') = 'shared'",
                (account.as_str(), provider.as_str()),
                call_key_from_row,
            )?
            .ok_or_else(|| corrupt("call key query returned no row"))
        })
    }

    async fn sealed_key(&self, account: &AccountId, provider: Provider) -> StoreResult<Option<StoredKey>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT key_id, sealed, last4, reported_leaked_at FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
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
        let (account, key_id, result, event, chain_key) = (
            account.clone(),
            key_id.clone(),
            result.clone(),
            event.clone(),
            Arc::clone(&self.chain_key),
        );
        self.writer
            .transaction(move |tx| {
                // Conditional on key_id: a test that raced a rotation finds no row and labels
                // nothing.
                let labelled = exec(
                    tx,
                    "UPDATE provider_keys SET last_test_ok = ?4, last_test_at = ?5, last_test_message = ?6,
                         last_test_detail = ?7,
                         reported_leaked_at = CASE WHEN ?4 = 1 THEN NULL ELSE reported_leaked_at END
                         WHERE account_id = ?1 AND provider = ?2 AND key_id = ?3",
                    (
                        account.as_str(),
                        provider.as_str(),
                        key_id.as_str(),
                        i64::from(result.ok),
                        result.at.as_i64(),
                        result.message.as_str(),
                        result.detail.as_deref(),
                    ),
                )?;
                append_in_tx(tx, &chain_key, [&event])?;
                Ok(labelled == 1)
            })
            .await
    }

    async fn mark_key_leaked(
        &self,
        account: &AccountId,
        provider: Provider,
        key_id: &KeyId,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        let (account, key_id) = (account.clone(), key_id.clone());
        self.writer
            .transaction(move |tx| {
                let marked = exec(
                    tx,
                    "UPDATE provider_keys SET reported_leaked_at = ?4
                         WHERE account_id = ?1 AND provider = ?2 AND key_id = ?3 AND reported_leaked_at IS NULL",
                    (account.as_str(), provider.as_str(), key_id.as_str(), now.as_i64()),
                )?;
                Ok(marked == 1)
            })
            .await
    }

    async fn save_shared_key(&self, provider: Provider, key: NewKey, now: UnixMillis) -> StoreResult<bool> {
        self.writer
            .transaction(move |tx| {
                let old = read_one(
                    tx,
                    "SELECT key_id FROM shared_keys WHERE provider = ?1",
                    (provider.as_str(),),
                    |_| Ok(()),
                )?;
                // Overwritten in place, as account keys are (see save_key).
                exec(
                    tx,
                    "INSERT INTO shared_keys (provider, key_id, sealed, last4, created_at, updated_at, kind)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
                         ON CONFLICT (provider) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed,
                           last4 = excluded.last4, updated_at = excluded.updated_at, kind = excluded.kind",
                    (
                        provider.as_str(),
                        key.key_id.as_str(),
                        key.sealed.as_bytes(),
                        key.last4.as_str(),
                        now.as_i64(),
                        key.kind.as_str(),
                    ),
                )?;
                Ok(old.is_some())
            })
            .await
    }

    async fn shared_key(&self, provider: Provider) -> StoreResult<Option<StoredKey>> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT key_id, sealed, last4, NULL AS reported_leaked_at FROM shared_keys WHERE provider = ?1",
                (provider.as_str(),),
                |row| stored_key_from_row(row, "shared_keys"),
            )
        })
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
        let (account, period, announce) = (account.clone(), period.to_owned(), self.chain_key.rules.enabled);
        self.writer
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_rusqlite)?;
                let (reserved, announced) =
                    reserve_in_tx(&tx, account.as_str(), &period, limit, amount, announce, now)?;
                if reserved || announced {
                    tx.commit().map_err(map_rusqlite)?;
                } else {
                    // Refused: roll back the empty row too, so a refusal leaves no trace
                    // (unless it announced that the pool is spent).
                    tx.rollback().map_err(map_rusqlite)?;
                }
                Ok(reserved)
            })
            .await
    }

    async fn finish_calls(&self, records: &[CallRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let (records, chain_key) = (records.to_vec(), Arc::clone(&self.chain_key));
        // One transaction (one fsync) for the whole batch, run whole on the writer's thread.
        self.writer
            .write(move |conn| {
                // Check everything before writing anything, and fold the batch into one update
                // per (account, period) and per counter row (see `fold_calls`).
                let FoldedCalls { credits, counters } = fold_calls(&records)?;
                let announce_at = records
                    .iter()
                    .map(|r| r.audit.at)
                    .max()
                    .filter(|_| chain_key.rules.enabled);
                immediate(conn, |tx| {
                    // First the leases: a call released as abandoned meanwhile is not settled.
                    settle_leases(tx, &records)?;
                    append_in_tx(tx, &chain_key, records.iter().map(|r| &r.audit))?;
                    for ((account, period), (release, charge)) in credits {
                        settle_in_tx(tx, account, period, release, charge, announce_at)?;
                    }
                    for (key, (requests, input, output)) in counters {
                        count_calls(tx, key, requests, input, output)?;
                    }
                    Ok(())
                })
            })
            .await
    }

    async fn release_credits(&self, account: &AccountId, period: &str, amount: i64) -> StoreResult<()> {
        check_period(period)?;
        check_amount("amount", amount)?;
        if amount == 0 {
            return Ok(());
        }
        let (account, period) = (account.clone(), period.to_owned());
        self.writer
            .transaction(move |tx| settle_in_tx(tx, account.as_str(), &period, amount, 0, None))
            .await
    }

    async fn reserve_lease(&self, lease: &NewLease, limit: i64, now: UnixMillis) -> StoreResult<Option<LeaseId>> {
        check_lease(lease)?;
        let (lease, announce) = (lease.clone(), self.chain_key.rules.enabled);
        self.writer
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_rusqlite)?;
                let account = lease.account_id.as_str();
                let (reserved, announced) =
                    reserve_in_tx(&tx, account, &lease.period, limit, lease.amount, announce, now)?;
                if !reserved {
                    if announced {
                        tx.commit().map_err(map_rusqlite)?;
                    } else {
                        tx.rollback().map_err(map_rusqlite)?;
                    }
                    return Ok(None);
                }
                let c = &lease.call;
                exec(
                    &tx,
                    "INSERT INTO reservation_leases (account_id, period, amount, node, run, expires_at, created_at,
                       actor, provider, model, key_source, feature, on_behalf_of)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    rusqlite::params![
                        account,
                        lease.period,
                        lease.amount,
                        lease.node,
                        lease.run,
                        lease.expires_at.as_i64(),
                        now.as_i64(),
                        c.actor.0,
                        c.provider.as_str(),
                        c.model,
                        c.key_source.as_str(),
                        c.feature,
                        c.on_behalf_of,
                    ],
                )?;
                let id = tx.last_insert_rowid();
                tx.commit().map_err(map_rusqlite)?;
                Ok(Some(id))
            })
            .await
    }

    async fn renew_leases(&self, run: &str, ids: &[LeaseId], expires_at: UnixMillis) -> StoreResult<Vec<LeaseId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (run, ids) = (run.to_owned(), ids.to_vec());
        self.writer
            .transaction(move |tx| {
                let mut renewed = Vec::with_capacity(ids.len());
                for id in ids {
                    if exec(
                        tx,
                        "UPDATE reservation_leases SET expires_at = ?3 WHERE id = ?1 AND run = ?2",
                        (id, run.as_str(), expires_at.as_i64()),
                    )? == 1
                    {
                        renewed.push(id);
                    }
                }
                Ok(renewed)
            })
            .await
    }

    async fn release_leases(
        &self,
        which: LeaseRelease<'_>,
        now: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<ReleasedLease>> {
        use rusqlite::types::Value;
        let chain_key = Arc::clone(&self.chain_key);
        let limit = Value::from(i64::from(limit));
        // ?2 is the limit in every form.
        let (sql, args): (String, Vec<Value>) = match which {
            LeaseRelease::Expired => (
                format!("SELECT {LEASE_COLUMNS} FROM reservation_leases WHERE expires_at < ?1 ORDER BY id LIMIT ?2"),
                vec![now.as_i64().into(), limit],
            ),
            LeaseRelease::EarlierRuns { node, current } => (
                format!(
                    "SELECT {LEASE_COLUMNS} FROM reservation_leases WHERE node = ?1 AND run <> ?3 ORDER BY id LIMIT ?2"
                ),
                vec![node.to_owned().into(), limit, current.to_owned().into()],
            ),
            LeaseRelease::One(id) => (
                format!("SELECT {LEASE_COLUMNS} FROM reservation_leases WHERE id = ?1 LIMIT ?2"),
                vec![id.into(), limit],
            ),
        };
        let why = which.why();
        self.writer
            .transaction(move |tx| {
                let rows = read_all(tx, &sql, rusqlite::params_from_iter(args), lease_from_row)?;
                let mut events = Vec::with_capacity(rows.len());
                let mut released = Vec::with_capacity(rows.len());
                let mut credits: BTreeMap<(&str, &str), i64> = BTreeMap::new();
                let mut counters: BTreeMap<crate::CounterKey<'_>, i64> = BTreeMap::new();
                for row in &rows {
                    // The conditional transition: the row is still there (one writer).
                    if exec(tx, "DELETE FROM reservation_leases WHERE id = ?1", (row.id,))? != 1 {
                        continue;
                    }
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
                for ((account, period), amount) in credits {
                    settle_in_tx(tx, account, period, amount, 0, None)?;
                }
                for (key, requests) in counters {
                    count_calls(tx, key, requests, 0, 0)?;
                }
                append_in_tx(tx, &chain_key, &events)?;
                Ok(released)
            })
            .await
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
        let (events, chain_key) = (events.to_vec(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| append_in_tx(tx, &chain_key, &events))
            .await
    }

    async fn audit_page(&self, account: &AccountId, limit: u32, before: Option<i64>) -> StoreResult<Vec<AuditEvent>> {
        self.reader.read(|c| {
            read_all(
                c,
                "SELECT * FROM audit_events WHERE account_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                (account.as_str(), before.unwrap_or(i64::MAX), i64::from(limit)),
                audit_from_row,
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
                        audit_from_row,
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

    async fn append_platform_audit(&self, event: &NewPlatformEvent) -> StoreResult<()> {
        let (event, chain_key) = (event.clone(), Arc::clone(&self.chain_key));
        self.writer
            .transaction(move |tx| {
                let (seq, prev) = read_one(tx, "SELECT seq, mac FROM platform_audit_head WHERE id = 1", (), |r| {
                    let mac: Vec<u8> = get(r, "mac")?;
                    let mac: [u8; 32] = mac
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt("platform_audit_head.mac"))?;
                    Ok((get::<i64>(r, "seq")?, mac))
                })?
                .unwrap_or((0, GENESIS_MAC));
                let mut e = event.into_event(seq + 1);
                let mac = e.seal_link(&chain_key.key, &prev);
                exec(
                    tx,
                    "INSERT INTO platform_audit_events (seq, at, actor, action, provider, key_last4, account_id, kek_id, detail, mac)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    rusqlite::params![
                        e.seq,
                        e.at,
                        e.actor,
                        e.action,
                        e.provider,
                        e.key_last4,
                        e.account_id,
                        e.kek_id,
                        e.detail,
                        e.mac
                    ],
                )?;
                exec(
                    tx,
                    "INSERT INTO platform_audit_head (id, seq, mac) VALUES (1, ?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, mac = excluded.mac",
                    (e.seq, &mac[..]),
                )?;
                Ok(())
            })
            .await
    }

    async fn platform_chain(&self) -> StoreResult<(Vec<PlatformEvent>, Option<ChainHead>)> {
        self.reader
            .read_blocking(move |c| {
                read_snapshot(c, |c| {
                    let events = read_all(
                        c,
                        "SELECT * FROM platform_audit_events ORDER BY seq, id",
                        (),
                        platform_from_row,
                    )?;
                    let head = read_one(c, "SELECT seq, mac FROM platform_audit_head WHERE id = 1", (), |r| {
                        Ok(ChainHead {
                            seq: get(r, "seq")?,
                            mac: get(r, "mac")?,
                        })
                    })?;
                    Ok((events, head))
                })
            })
            .await
    }

    async fn chain_heads(&self) -> StoreResult<Vec<(String, ChainHead)>> {
        self.reader
            .read_blocking(move |c| {
                read_snapshot(c, |c| {
                    let head = |r: &Row<'_>| {
                        Ok((
                            get::<String>(r, "chain")?,
                            ChainHead {
                                seq: get(r, "seq")?,
                                mac: get(r, "mac")?,
                            },
                        ))
                    };
                    let mut heads = read_all(
                        c,
                        "SELECT account_id AS chain, seq, mac FROM audit_heads ORDER BY account_id",
                        (),
                        head,
                    )?;
                    heads.extend(read_one(
                        c,
                        "SELECT ?1 AS chain, seq, mac FROM platform_audit_head WHERE id = 1",
                        (crate::audit::PLATFORM_CHAIN,),
                        head,
                    )?);
                    Ok(heads)
                })
            })
            .await
    }

    async fn purge_removed(&self) -> StoreResult<bool> {
        let busy: i64 = self
            .writer
            .write(|conn| {
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                    .map_err(map_rusqlite)
            })
            .await?;
        Ok(busy == 0)
    }

    async fn claim_webhooks(
        &self,
        node: &str,
        now: UnixMillis,
        lease_until: UnixMillis,
        limit: u32,
    ) -> StoreResult<Vec<WebhookEvent>> {
        // A read first: most polls find nothing due and must not queue behind the writer.
        let any_due = self.reader.read(|c| {
            read_one(
                c,
                "SELECT 1 AS due FROM webhook_outbox WHERE delivered_at IS NULL AND dead_at IS NULL
                   AND next_attempt_at <= ?1 LIMIT 1",
                (now.as_i64(),),
                |r| get::<i64>(r, "due"),
            )
        })?;
        if any_due.is_none() {
            return Ok(Vec::new());
        }
        let node = node.to_owned();
        self.writer
            .transaction(move |tx| {
                let due = read_all(
                    tx,
                    "SELECT o.* FROM webhook_outbox o
                     WHERE o.delivered_at IS NULL AND o.dead_at IS NULL
                       AND o.id = (SELECT MIN(p.id) FROM webhook_outbox p
                                   WHERE p.account_id = o.account_id AND p.delivered_at IS NULL AND p.dead_at IS NULL)
                       AND o.next_attempt_at <= ?1 AND (o.claimed_until IS NULL OR o.claimed_until <= ?1)
                     ORDER BY o.id LIMIT ?2",
                    (now.as_i64(), i64::from(limit)),
                    webhook_from_row,
                )?;
                for e in &due {
                    exec(
                        tx,
                        "UPDATE webhook_outbox SET claimed_by = ?2, claimed_until = ?3 WHERE id = ?1",
                        (e.id, node.as_str(), lease_until.as_i64()),
                    )?;
                }
                Ok(due)
            })
            .await
    }

    async fn record_webhook_attempt(
        &self,
        id: i64,
        node: &str,
        delivered_to: &[usize],
        outcome: &AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        let (node, done, outcome) = (
            node.to_owned(),
            outbox::endpoints_to_column(delivered_to),
            outcome.clone(),
        );
        self.writer
            .transaction(move |tx| {
                let (delivered_at, next, dead_at, error) = outbox::attempt_columns(&outcome, now);
                let n = exec(
                    tx,
                    "UPDATE webhook_outbox SET attempts = attempts + 1, delivered_to = ?3, delivered_at = ?4,
                       next_attempt_at = COALESCE(?5, next_attempt_at), dead_at = ?6, last_error = ?7,
                       claimed_by = NULL, claimed_until = NULL
                     WHERE id = ?1 AND claimed_by = ?2",
                    (id, node.as_str(), done.as_str(), delivered_at, next, dead_at, error),
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn release_webhook_claims(&self, holder_prefix: &str) -> StoreResult<u64> {
        let prefix = holder_prefix.to_owned();
        self.writer
            .transaction(move |tx| {
                // substr, not LIKE: a node name may hold `%` or `_`.
                let n = exec(
                    tx,
                    "UPDATE webhook_outbox SET claimed_by = NULL, claimed_until = NULL
                     WHERE claimed_by IS NOT NULL AND substr(claimed_by, 1, length(?1)) = ?1",
                    (prefix.as_str(),),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn webhook_events(&self, filter: WebhookFilter, limit: u32) -> StoreResult<Vec<WebhookEvent>> {
        let sql = match filter {
            WebhookFilter::All => "SELECT * FROM webhook_outbox ORDER BY id DESC LIMIT ?1",
            WebhookFilter::Undelivered => {
                "SELECT * FROM webhook_outbox WHERE delivered_at IS NULL ORDER BY id DESC LIMIT ?1"
            }
            WebhookFilter::Dead => "SELECT * FROM webhook_outbox WHERE dead_at IS NOT NULL ORDER BY id DESC LIMIT ?1",
            WebhookFilter::Failed => {
                "SELECT * FROM webhook_outbox WHERE delivered_at IS NULL AND (attempts > 0 OR dead_at IS NOT NULL)
                 ORDER BY id DESC LIMIT ?1"
            }
        };
        self.reader
            .read_blocking(move |c| read_all(c, sql, (i64::from(limit),), webhook_from_row))
            .await
    }

    async fn replay_webhook(&self, event_id: &str, now: UnixMillis) -> StoreResult<bool> {
        let event_id = event_id.to_owned();
        self.writer
            .transaction(move |tx| {
                let n = exec(
                    tx,
                    "UPDATE webhook_outbox SET attempts = 0, next_attempt_at = ?2, delivered_to = '', delivered_at = NULL,
                       dead_at = NULL, last_error = NULL, claimed_by = NULL, claimed_until = NULL
                     WHERE event_id = ?1",
                    (event_id.as_str(), now.as_i64()),
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn webhook_backlog(&self) -> StoreResult<OutboxBacklog> {
        self.reader.read(|c| {
            read_one(
                c,
                "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM webhook_outbox
                 WHERE delivered_at IS NULL AND dead_at IS NULL",
                (),
                |r| {
                    Ok(OutboxBacklog {
                        pending: get(r, "pending")?,
                        oldest_pending_at: get::<Option<i64>>(r, "oldest")?.map(UnixMillis),
                    })
                },
            )
            .map(Option::unwrap_or_default)
        })
    }

    async fn prune_webhooks(&self, delivered_before: UnixMillis) -> StoreResult<u64> {
        self.writer
            .transaction(move |tx| {
                let n = exec(
                    tx,
                    "DELETE FROM webhook_outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?1",
                    (delivered_before.as_i64(),),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn create_session(&self, id_hash: &str, user: &UserId, now: UnixMillis) -> StoreResult<()> {
        let (id_hash, user) = (id_hash.to_owned(), user.as_str().to_owned());
        self.writer
            .transaction(move |tx| {
                exec(
                    tx,
                    "INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at) VALUES (?1, ?2, ?3, ?3)",
                    (id_hash.as_str(), user.as_str(), now.as_i64()),
                )
                .map(drop)
            })
            .await
    }

    async fn touch_session(
        &self,
        id_hash: &str,
        now: UnixMillis,
        limits: SessionLimits,
    ) -> StoreResult<Option<WebSession>> {
        let id_hash = id_hash.to_owned();
        let (idle_cutoff, max_cutoff) = limits.cutoffs(now);
        self.writer
            .transaction(move |tx| {
                let touched = exec(
                    tx,
                    "UPDATE sessions SET last_seen_at = MAX(last_seen_at, ?2)
                     WHERE id_hash = ?1 AND last_seen_at > ?3 AND created_at > ?4",
                    (id_hash.as_str(), now.as_i64(), idle_cutoff, max_cutoff),
                )?;
                if touched == 0 {
                    exec(tx, "DELETE FROM sessions WHERE id_hash = ?1", (id_hash.as_str(),))?;
                    return Ok(None);
                }
                read_one(
                    tx,
                    "SELECT u.id, u.email, s.created_at, s.last_seen_at FROM sessions s
                     JOIN users u ON u.id = s.user_id WHERE s.id_hash = ?1",
                    (id_hash.as_str(),),
                    |r| {
                        Ok(WebSession {
                            user: user_from_row(r)?,
                            created_at: UnixMillis(get(r, "created_at")?),
                            last_seen_at: UnixMillis(get(r, "last_seen_at")?),
                        })
                    },
                )
            })
            .await
    }

    async fn end_session(&self, id_hash: &str) -> StoreResult<bool> {
        let id_hash = id_hash.to_owned();
        self.writer
            .transaction(move |tx| Ok(exec(tx, "DELETE FROM sessions WHERE id_hash = ?1", (id_hash.as_str(),))? > 0))
            .await
    }

    async fn end_user_sessions(&self, user: &UserId) -> StoreResult<u64> {
        let user = user.as_str().to_owned();
        self.writer
            .transaction(move |tx| {
                let n = exec(tx, "DELETE FROM sessions WHERE user_id = ?1", (user.as_str(),))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn set_session_flash(&self, id_hash: &str, flash: &str) -> StoreResult<()> {
        let (id_hash, flash) = (id_hash.to_owned(), flash.to_owned());
        self.writer
            .transaction(move |tx| {
                exec(
                    tx,
                    "UPDATE sessions SET flash = ?2 WHERE id_hash = ?1",
                    (id_hash.as_str(), flash.as_str()),
                )
                .map(drop)
            })
            .await
    }

    async fn take_session_flash(&self, id_hash: &str) -> StoreResult<Option<String>> {
        let id_hash = id_hash.to_owned();
        self.writer
            .transaction(move |tx| {
                let flash = read_one(
                    tx,
                    "SELECT flash FROM sessions WHERE id_hash = ?1 AND flash IS NOT NULL",
                    (id_hash.as_str(),),
                    |r| get::<String>(r, "flash"),
                )?;
                if flash.is_some() {
                    exec(
                        tx,
                        "UPDATE sessions SET flash = NULL WHERE id_hash = ?1",
                        (id_hash.as_str(),),
                    )?;
                }
                Ok(flash)
            })
            .await
    }

    async fn prune_sessions(&self, now: UnixMillis, limits: SessionLimits) -> StoreResult<u64> {
        let (idle_cutoff, max_cutoff) = limits.cutoffs(now);
        self.writer
            .transaction(move |tx| {
                let n = exec(
                    tx,
                    "DELETE FROM sessions WHERE last_seen_at <= ?1 OR created_at <= ?2",
                    (idle_cutoff, max_cutoff),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn audit_search(
        &self,
        account: &AccountId,
        filter: &AuditFilter,
        limit: Option<u32>,
        offset: u64,
    ) -> StoreResult<Vec<AuditEvent>> {
        let account = account.as_str().to_owned();
        let filter = filter.clone();
        // A whole export grows with the account's history: off the async threads.
        self.reader
            .read_blocking(move |c| {
                read_all(
                    c,
                    "SELECT * FROM audit_events WHERE account_id = ?1
                       AND at >= ?2 AND at < ?3
                       AND (?4 IS NULL OR provider = ?4)
                       AND (?5 IS NULL OR key_source = ?5)
                       AND (?6 IS NULL OR key_last4 = ?6)
                     ORDER BY at DESC, seq DESC LIMIT ?7 OFFSET ?8",
                    rusqlite::params![
                        account,
                        filter.from.map_or(i64::MIN, UnixMillis::as_i64),
                        filter.until.map_or(i64::MAX, UnixMillis::as_i64),
                        filter.provider.map(Provider::as_str),
                        filter.key_source.map(KeySource::as_str),
                        filter.last4,
                        limit.map_or(-1, i64::from),
                        i64::try_from(offset).unwrap_or(i64::MAX),
                    ],
                    audit_from_row,
                )
            })
            .await
    }

    async fn key_call_health(
        &self,
        account: &AccountId,
        provider: Provider,
        since: UnixMillis,
        window_start: UnixMillis,
    ) -> StoreResult<KeyCallHealth> {
        let from = since.as_i64().max(window_start.as_i64());
        self.reader.read(|c| {
            read_snapshot(c, |c| {
                let last_ok = read_one(
                    c,
                    "SELECT MAX(at) AS last FROM audit_events
                     WHERE account_id = ?1 AND provider = ?2 AND key_source = 'own' AND outcome = 'ok'
                       AND at >= ?3 AND action = 'ai.request'",
                    (account.as_str(), provider.as_str(), since.as_i64()),
                    |r| get::<Option<i64>>(r, "last"),
                )?
                .flatten();
                let rows = read_all(
                    c,
                    "SELECT outcome, COUNT(*) AS n, MAX(at) AS last FROM audit_events
                     WHERE account_id = ?1 AND provider = ?2 AND key_source = 'own'
                       AND outcome >= 'error:' AND outcome < 'error;'
                       AND at >= ?3 AND action = 'ai.request'
                     GROUP BY outcome",
                    (account.as_str(), provider.as_str(), from),
                    |r| {
                        Ok((
                            get::<String>(r, "outcome")?,
                            get::<i64>(r, "n")?,
                            get::<i64>(r, "last")?,
                        ))
                    },
                )?;
                Ok(KeyCallHealth {
                    last_ok_at: last_ok.map(UnixMillis),
                    failures: failure_counts(rows),
                })
            })
        })
    }

    async fn users_by_ids(&self, ids: &[UserId]) -> StoreResult<Vec<User>> {
        self.reader.read(|c| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(u) = read_one(
                    c,
                    "SELECT id, email FROM users WHERE id = ?1",
                    (id.as_str(),),
                    user_from_row,
                )? {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::Future;

    fn writer(dir: &tempfile::TempDir) -> Writer {
        Writer::start(dir.path().join("w.db"), Duration::from_millis(200)).unwrap()
    }

    async fn count(w: &Writer) -> i64 {
        w.write(|c| read_one(c, "SELECT COUNT(*) AS n FROM t", (), |r| get(r, "n")).map(Option::unwrap_or_default))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_write_that_leaves_its_transaction_open_is_rolled_back_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(&dir);
        w.write(|c| c.execute_batch("CREATE TABLE t (x INTEGER)").map_err(map_rusqlite))
            .await
            .unwrap();
        // A job that begins a transaction, writes and returns without ending it.
        w.write(|c| {
            c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
                .map_err(map_rusqlite)
        })
        .await
        .unwrap();
        // The next write starts from a clean connection: its own transaction works, and the
        // row the abandoned one wrote is gone.
        w.write(|c| immediate(c, |tx| exec(tx, "INSERT INTO t VALUES (2)", ()).map(drop)))
            .await
            .unwrap();
        assert_eq!(count(&w).await, 1);
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(&dir);
        w.write(|c| c.execute_batch("CREATE TABLE t (x INTEGER)").map_err(map_rusqlite))
            .await
            .unwrap();
        let failed = w
            .write(|c| -> StoreResult<()> {
                c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
                    .map_err(map_rusqlite)?;
                panic!("a bug in a write");
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
        w.write(|c| exec(c, "INSERT INTO t VALUES (2)", ()).map(drop))
            .await
            .unwrap();
        assert_eq!(count(&w).await, 1, "the panicked write's row must be rolled back");
    }

    #[tokio::test]
    async fn a_write_whose_caller_stops_waiting_still_commits_whole() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(&dir);
        w.write(|c| c.execute_batch("CREATE TABLE t (x INTEGER)").map_err(map_rusqlite))
            .await
            .unwrap();
        // Hold the writer thread, queue a write behind it, then drop that write's future
        // while it waits: the write has been handed over and must still run, whole.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut hold = Box::pin(w.write(move |_| held.recv().map_err(|_| StoreError::NotFound)));
        assert!(hold.as_mut().poll(&mut cx).is_pending());
        let mut abandoned = Box::pin(w.write(|c| {
            immediate(c, |tx| {
                exec(tx, "INSERT INTO t VALUES (1)", ())?;
                exec(tx, "INSERT INTO t VALUES (2)", ()).map(drop)
            })
        }));
        assert!(abandoned.as_mut().poll(&mut cx).is_pending());
        drop(abandoned);
        release.send(()).unwrap();
        hold.await.unwrap();
        assert_eq!(count(&w).await, 2, "the abandoned write must have committed both rows");
    }
}
