//! The exclusive writer's own connection, with each database's native driver instead of sqlx's
//! `Any` (which converts every bound value, and on SQLite hands each statement to a worker
//! thread; a profile of a billed Nexus put 43 % of its CPU there):
//!
//! - **SQLite**: a `rusqlite` connection on a blocking thread, each row through a prepared
//!   single-row statement cached on the connection.
//! - **PostgreSQL**: one statement per table per cut, its rows bound as column arrays
//!   (`INSERT … SELECT * FROM UNNEST($1::text[], …)`), prepared once.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, ToSql, TransactionBehavior};
use sqlx::PgPool;

use super::sql::{DELETE_HOLD, Insert, V, WriteSet, first_new_charge, inserts};
use crate::StoreError;
use crate::db::{Backend, Db};

impl ToSql for V<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            V::T(s) => ValueRef::Text(s.as_bytes()),
            V::O(Some(s)) => ValueRef::Text(s.as_bytes()),
            V::O(None) => ValueRef::Null,
            V::I(i) | V::N(Some(i)) => ValueRef::Integer(*i),
            V::N(None) => ValueRef::Null,
        }))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Native(e.to_string())
    }
}

/// The writer's connection, and the lock that makes it the database's only exclusive writer
/// (two would each spend from their own copy of the balances).
pub(super) enum Native {
    /// The connection, and the locked `PATH.ledger-lock` file next to the database (unlocked
    /// when dropped).
    Sqlite {
        conn: Arc<Mutex<Connection>>,
        _lock: File,
    },
    /// One connection, which holds a session advisory lock (checked before every write).
    Postgres(PgPool),
}

/// The advisory lock key an exclusive writer holds on PostgreSQL ("LLDG").
const PG_LOCK_KEY: i64 = 0x4c4c_4447;
/// How often a writer waiting for the lock tries again.
const LOCK_RETRY: Duration = Duration::from_millis(50);

fn busy(what: &str) -> StoreError {
    StoreError::Conflict(format!(
        "another Nexus writes the ledger of {what} with the exclusive writer; stop it first, or \
         run every replica with --ledger-mode shared on one PostgreSQL database"
    ))
}

impl Native {
    /// A connection of its own to `db` (already created and migrated), or none for an in-memory
    /// SQLite database (which only the pool's one connection can see), once it holds the
    /// database's exclusive-writer lock (waiting up to `wait` for a writer that is stopping).
    pub(super) async fn open(db: &Db, wait: Duration) -> Result<Option<Self>, StoreError> {
        match (db.backend(), db.sqlite_file()) {
            (Backend::Sqlite, Some(path)) => {
                let path = path.to_owned();
                let (conn, lock) = tokio::task::spawn_blocking(move || {
                    let lock = lock_sqlite(&path, wait)?;
                    Ok::<_, StoreError>((open_sqlite(&path)?, lock))
                })
                .await
                .map_err(|e| StoreError::Native(e.to_string()))??;
                Ok(Some(Self::Sqlite {
                    conn: Arc::new(Mutex::new(conn)),
                    _lock: lock,
                }))
            }
            (Backend::Sqlite, None) => Ok(None),
            (Backend::Postgres, _) => {
                let pool = db.postgres_connection().await?;
                let deadline = Instant::now() + wait;
                while !try_lock_postgres(&mut *pool.acquire().await?).await? {
                    if Instant::now() >= deadline {
                        return Err(busy("this PostgreSQL database"));
                    }
                    tokio::time::sleep(LOCK_RETRY).await;
                }
                Ok(Some(Self::Postgres(pool)))
            }
        }
    }

    /// Writes `cut` in one transaction (`retry`: an earlier attempt may have committed it).
    pub(super) async fn write(
        &self,
        cut: Arc<WriteSet>,
        t: i64,
        owner: Arc<str>,
        retry: bool,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite { conn, .. } => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                    write_sqlite(&mut conn, &cut, t, &owner, retry)
                })
                .await
                .map_err(|e| StoreError::Native(e.to_string()))?
            }
            Self::Postgres(pool) => write_postgres(pool, &cut, t, &owner, retry).await,
        }
    }
}

/// Locks `PATH.ledger-lock` (created if missing; the OS releases it when the process ends).
fn lock_sqlite(path: &Path, wait: Duration) -> Result<File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".ledger-lock");
    let lock_path = PathBuf::from(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Native(format!("cannot open {}: {e}", lock_path.display())))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY);
            }
            Err(TryLockError::WouldBlock) => return Err(busy(&path.display().to_string())),
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Native(format!(
                    "cannot lock {}: {e}",
                    lock_path.display()
                )));
            }
        }
    }
}

/// Takes the session's advisory lock unless it holds it already (true when it holds it).
async fn try_lock_postgres(conn: &mut sqlx::PgConnection) -> Result<bool, StoreError> {
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND pid = pg_backend_pid() AND classid = 0 AND objid = $1::bigint::oid AND objsubid = 1)",
    )
    .bind(PG_LOCK_KEY)
    .fetch_one(&mut *conn)
    .await?;
    if held {
        return Ok(true);
    }
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PG_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?)
}

fn open_sqlite(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // `synchronous` is per connection; WAL is the file's (set when sqlx opened it).
    conn.execute_batch(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536;",
    )?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn write_sqlite(
    conn: &mut Connection,
    ws: &WriteSet,
    t: i64,
    owner: &str,
    retry: bool,
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut retry = retry;
    // The usage totals are increments: a cut that had committed is not written again, and one
    // that had not is written as new (a conflict then fails instead of adding twice).
    if retry && let Some(r) = first_new_charge(ws) {
        let committed = tx
            .query_row(
                "SELECT 1 FROM charges WHERE request_id = ?",
                [r],
                |_| Ok(()),
            )
            .optional()?;
        if committed.is_some() {
            return Ok(());
        }
        retry = false;
    }
    let run = |ins: &Insert, rows: Vec<Vec<V<'_>>>| -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut stmt = tx.prepare_cached(&ins.one_row(retry))?;
        for row in &rows {
            stmt.execute(rusqlite::params_from_iter(row.iter()))?;
        }
        Ok(())
    };
    if !ws.holds_removed.is_empty() {
        let mut stmt = tx.prepare_cached(DELETE_HOLD)?;
        for r in &ws.holds_removed {
            stmt.execute([r.as_str()])?;
        }
    }
    for (ins, rows) in inserts(ws, t, owner) {
        run(ins, rows)?;
    }
    tx.commit()?;
    Ok(())
}

/// One column of an insert, as the array PostgreSQL unnests.
enum Column<'a> {
    Text(Vec<Option<&'a str>>),
    Int(Vec<Option<i64>>),
}

/// The rows as columns; the first row decides each column's type (every row of an insert is
/// built alike).
fn columns<'a>(cols: usize, rows: &'a [Vec<V<'_>>]) -> Result<Vec<Column<'a>>, StoreError> {
    let mut out: Vec<Column<'a>> = match rows.first() {
        Some(first) => first
            .iter()
            .map(|v| match v {
                V::I(_) | V::N(_) => Column::Int(Vec::with_capacity(rows.len())),
                _ => Column::Text(Vec::with_capacity(rows.len())),
            })
            .collect(),
        None => return Ok(Vec::new()),
    };
    for row in rows {
        if row.len() != cols {
            return Err(StoreError::Corrupt(
                "a ledger row of the wrong width".into(),
            ));
        }
        for (c, v) in out.iter_mut().zip(row) {
            match (c, v) {
                (Column::Text(c), V::T(s)) => c.push(Some(s.as_ref())),
                (Column::Text(c), V::O(s)) => c.push(*s),
                (Column::Int(c), V::I(i)) => c.push(Some(*i)),
                (Column::Int(c), V::N(i)) => c.push(*i),
                _ => return Err(StoreError::Corrupt("a ledger column of mixed types".into())),
            }
        }
    }
    Ok(out)
}

async fn write_postgres(
    pool: &PgPool,
    ws: &WriteSet,
    t: i64,
    owner: &str,
    retry: bool,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    // The lock lives with the session: if the connection was replaced, take it again, and
    // write nothing if another writer has it meanwhile.
    if !try_lock_postgres(&mut tx).await? {
        return Err(busy("this PostgreSQL database"));
    }
    let mut retry = retry;
    if retry && let Some(r) = first_new_charge(ws) {
        let committed: Option<String> =
            sqlx::query_scalar("SELECT request_id FROM charges WHERE request_id = $1")
                .bind(r)
                .fetch_optional(&mut *tx)
                .await?;
        if committed.is_some() {
            return Ok(());
        }
        retry = false;
    }
    if !ws.holds_removed.is_empty() {
        let ids: Vec<&str> = ws.holds_removed.iter().map(String::as_str).collect();
        sqlx::query("DELETE FROM holds WHERE request_id = ANY($1)")
            .bind(ids)
            .execute(&mut *tx)
            .await?;
    }
    for (ins, rows) in inserts(ws, t, owner) {
        if rows.is_empty() {
            continue;
        }
        let cols = columns(ins.cols, &rows)?;
        let types: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Column::Text(_) => format!("${}::text[]", i + 1),
                Column::Int(_) => format!("${}::bigint[]", i + 1),
            })
            .collect();
        let head = ins.head.trim_end_matches("VALUES");
        let sql = format!(
            "{head} SELECT * FROM UNNEST({}) {}",
            types.join(", "),
            ins.tail(retry)
        );
        let mut q = sqlx::query(&sql);
        for c in cols {
            q = match c {
                Column::Text(v) => q.bind(v),
                Column::Int(v) => q.bind(v),
            };
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use lattice_ledger::{Applied, Ledger, Money, Op, Split};

    use super::*;
    use crate::ledger::UsageRecord;
    use crate::ledger::side_rows;
    use crate::ledger::sql::net_postings;

    /// One cut with every kind of appended row: a faucet grant (journal leg, applied op, grant),
    /// a charge with its usage record (charge row, settlement item) and balances.
    fn cut() -> WriteSet {
        let mut l = Ledger::default();
        let mut appended = WriteSet::default();
        let usage = UsageRecord {
            request_id: "r".into(),
            user_id: "u".into(),
            key_id: None,
            node: "n".into(),
            model: "m".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            receipt: "{}".into(),
            batch: None,
        };
        let ops = [
            Op::Faucet {
                op: "f".into(),
                user: "u".into(),
                amount: Money::from_units(1_000),
            },
            Op::Hold {
                request: "r".into(),
                user: "u".into(),
                key: None,
                amount: Money::from_units(300),
            },
            Op::Charge {
                request: "r".into(),
                user: "u".into(),
                node: "n".into(),
                amount: Money::from_units(100),
                split: Split::default(),
            },
        ];
        for op in &ops {
            let Ok(Applied::Posted(p)) = l.apply(op) else {
                panic!("{op:?} not applied")
            };
            let u = matches!(op, Op::Charge { .. }).then(|| usage.clone());
            side_rows(&mut appended, &l, op, u, net_postings(op, &p));
        }
        let mut cut = WriteSet::cut(&mut l, |_| 0);
        cut.net_holds(&l);
        cut.set_appended(appended);
        cut
    }

    /// A write retried after its commit landed (the acknowledgement lost) neither fails nor
    /// writes anything twice, usage totals included; written again as new, the same rows
    /// conflict.
    #[tokio::test]
    async fn a_retried_write_writes_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        retried_write(&format!(
            "sqlite://{}",
            dir.path().join("nexus.db").display()
        ))
        .await;
    }

    fn manifest_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        )
    }

    /// Stops and deletes the PostgreSQL cluster (by port) a test started (none when
    /// `LATTICE_TEST_POSTGRES_URL` named one).
    struct Cluster(Option<String>);

    impl Drop for Cluster {
        fn drop(&mut self) {
            if let Some(port) = &self.0 {
                let _ =
                    std::process::Command::new(manifest_dir().join("../../scripts/postgres.sh"))
                        .args(["--stop", port])
                        .output();
            }
        }
    }

    /// The same on PostgreSQL (`LATTICE_TEST_POSTGRES_URL`, or a cluster `scripts/postgres.sh`
    /// starts), in a fresh database.
    #[tokio::test]
    async fn a_retried_write_writes_nothing_twice_postgres() {
        let (admin, cluster) = match std::env::var("LATTICE_TEST_POSTGRES_URL") {
            Ok(url) => (url, Cluster(None)),
            Err(_) => {
                let out =
                    std::process::Command::new(manifest_dir().join("../../scripts/postgres.sh"))
                        .output()
                        .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
                let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
                let cluster = Cluster(Some(port.to_owned()));
                (url, cluster)
            }
        };
        let name = format!("lattice_retry_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let base = admin.rsplit_once('/').unwrap().0;
        retried_write(&format!("{base}/{name}")).await;
        drop(cluster);
    }

    async fn retried_write(url: &str) {
        let db = Db::open(url).await.unwrap();
        let native = Native::open(&db, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        let cut = Arc::new(cut());
        let owner: Arc<str> = "a".into();
        // A retry whose earlier attempt did not commit writes everything.
        native
            .write(cut.clone(), 1, owner.clone(), true)
            .await
            .unwrap();
        assert!(
            native
                .write(cut.clone(), 1, owner.clone(), false)
                .await
                .is_err()
        );
        native.write(cut.clone(), 1, owner, true).await.unwrap();
        for (table, rows) in [
            ("charges", 1),
            ("journal", 1),
            ("applied_ops", 1),
            ("chain_grants", 1),
            ("settle_items", 1),
            ("usage_daily", 1),
        ] {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(db.pool())
                .await
                .unwrap();
            assert_eq!(n, rows, "{table}");
        }
        let model: Option<String> =
            sqlx::query_scalar("SELECT model FROM charges WHERE request_id = 'r'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(model.as_deref(), Some("m"));
        // The usage totals are increments: the retry after the commit did not add again.
        let (requests, lo): (i64, i64) =
            sqlx::query_as("SELECT requests, amount_lo FROM usage_daily WHERE user_id = 'u'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((requests, lo), (1, 100));
    }
}
