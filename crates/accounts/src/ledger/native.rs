//! The exclusive writer's own connection, with each database's native driver instead of sqlx's
//! `Any` (which converts every bound value, and on SQLite hands each statement to a worker
//! thread; a profile of a billed Nexus put 43 % of its CPU there):
//!
//! - **SQLite**: a `rusqlite` connection on a blocking thread, each row through a prepared
//!   single-row statement cached on the connection.
//! - **PostgreSQL**: one statement per table per cut, its rows bound as column arrays
//!   (`INSERT … SELECT * FROM UNNEST($1::text[], …)`), prepared once.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql, TransactionBehavior};
use sqlx::PgPool;

use super::sql::{DELETE_HOLD, Insert, V, WriteSet, inserts};
use crate::StoreError;
use crate::db::{Backend, Db};

impl ToSql for V<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            V::T(s) => ValueRef::Text(s.as_bytes()),
            V::O(Some(s)) => ValueRef::Text(s.as_bytes()),
            V::O(None) => ValueRef::Null,
            V::I(i) => ValueRef::Integer(*i),
        }))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Native(e.to_string())
    }
}

/// The writer's connection.
pub(super) enum Native {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(PgPool),
}

impl Native {
    /// A connection of its own to `db` (already created and migrated), or none for an in-memory
    /// SQLite database (which only the pool's one connection can see).
    pub(super) async fn open(db: &Db) -> Result<Option<Self>, StoreError> {
        match (db.backend(), db.sqlite_file()) {
            (Backend::Sqlite, Some(path)) => {
                let path = path.to_owned();
                let conn = tokio::task::spawn_blocking(move || open_sqlite(&path))
                    .await
                    .map_err(|e| StoreError::Native(e.to_string()))??;
                Ok(Some(Self::Sqlite(Arc::new(Mutex::new(conn)))))
            }
            (Backend::Sqlite, None) => Ok(None),
            (Backend::Postgres, _) => Ok(Some(Self::Postgres(db.postgres_connection().await?))),
        }
    }

    /// Writes `cut` in one transaction.
    pub(super) async fn write(
        &self,
        cut: Arc<WriteSet>,
        t: i64,
        owner: Arc<str>,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                    write_sqlite(&mut conn, &cut, t, &owner)
                })
                .await
                .map_err(|e| StoreError::Native(e.to_string()))?
            }
            Self::Postgres(pool) => write_postgres(pool, &cut, t, &owner).await,
        }
    }
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
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let run = |ins: &Insert, rows: Vec<Vec<V<'_>>>| -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut stmt = tx.prepare_cached(&ins.one_row())?;
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
    Int(Vec<i64>),
}

/// The rows as columns; the first row decides each column's type (every row of an insert is
/// built alike).
fn columns<'a>(cols: usize, rows: &'a [Vec<V<'_>>]) -> Result<Vec<Column<'a>>, StoreError> {
    let mut out: Vec<Column<'a>> = match rows.first() {
        Some(first) => first
            .iter()
            .map(|v| match v {
                V::I(_) => Column::Int(Vec::with_capacity(rows.len())),
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
                (Column::Int(c), V::I(i)) => c.push(*i),
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
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
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
            ins.tail
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
