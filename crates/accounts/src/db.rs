//! The database: SQLite (default) or PostgreSQL, one set of migrations and queries for both
//! (sqlx's `Any` driver; `$N` placeholders work on both).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, Executor};

use crate::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool plus what differs between the two backends.
#[derive(Clone)]
pub struct Db {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// The database file, when it is a SQLite file (not in memory).
    file: Option<PathBuf>,
    /// The URL it was opened with (a writer may open its own connection to it).
    url: String,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .field("url", &redact(&self.url))
            .finish()
    }
}

impl Db {
    /// `sqlite://PATH` (created if missing), `sqlite::memory:` or `postgres://…`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Config(format!(
                "unsupported database URL {url:?} (expected sqlite://PATH or postgres://…)"
            )));
        };
        let mut connect_url = url.to_owned();
        if backend == Backend::Sqlite && !url.contains("mode=") && !url.contains(":memory:") {
            connect_url.push_str(if url.contains('?') { "&" } else { "?" });
            connect_url.push_str("mode=rwc");
        }
        let memory = url.contains(":memory:");
        let pool = AnyPoolOptions::new()
            // One in-memory SQLite database exists per connection: keep exactly one.
            .max_connections(match (backend, memory) {
                (Backend::Sqlite, true) => 1,
                (Backend::Sqlite, false) => 4,
                (Backend::Postgres, _) => 16,
            })
            .min_connections(if memory { 1 } else { 0 })
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(url),
                source,
            })?;
        if backend == Backend::Sqlite && !memory {
            // WAL lets readers proceed while the ledger writer commits; it persists in the file.
            pool.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                .await?;
        }
        sqlx::migrate!("./migrations").run(&pool).await?;
        let file = match backend {
            Backend::Sqlite if !memory && !url.contains("mode=memory") => {
                let options =
                    SqliteConnectOptions::from_str(url).map_err(|source| StoreError::Open {
                        url: redact(url),
                        source,
                    })?;
                Some(options.get_filename().to_owned())
            }
            _ => None,
        };
        Ok(Self {
            pool,
            backend,
            file,
            url: url.to_owned(),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens one connection of PostgreSQL's own driver (not `Any`) to this database, kept open
    /// (its session holds the exclusive ledger writer's lock).
    pub(crate) async fn postgres_connection(&self) -> Result<sqlx::PgPool, StoreError> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&self.url)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(&self.url),
                source,
            })
    }

    /// The SQLite file behind the pool, if any.
    pub(crate) fn sqlite_file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Row-lock suffix for reads that precede a write in the same transaction. SQLite needs none:
    /// its writers are serialised by the database lock.
    pub(crate) fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        }
    }
}

impl Db {
    /// A transaction that will write. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that read first fails at once with "database is
    /// locked" when another connection wrote in between, instead of waiting its turn.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }
}

impl Backend {
    /// Placeholders for parameters `start..start + n` of a statement whose parameters are all
    /// written by this function, in order from 1. On SQLite they are anonymous (`?`): with
    /// numbered ones SQLite looks each name up in a list while parsing, and sqlx asks it for
    /// every parameter's name while binding — both linear per parameter, so quadratic in a
    /// multi-row insert (≈10 % of a billed Nexus's CPU in a profile). PostgreSQL needs `$N`.
    pub(crate) fn placeholders(self, start: usize, n: usize) -> String {
        match self {
            Backend::Sqlite => vec!["?"; n].join(", "),
            Backend::Postgres => placeholders(start, n),
        }
    }
}

/// `$start, $start+1, …` for `n` parameters.
pub(crate) fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `YYYY-MM-DD` of a unix time, UTC.
pub(crate) fn day_of(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://lattice:secret@127.0.0.1:5432/db"),
            "postgres://lattice:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_795_000_000), "2026-11-18");
        assert_eq!(placeholders(3, 2), "$3, $4");
        assert_eq!(Backend::Postgres.placeholders(3, 2), "$3, $4");
        assert_eq!(Backend::Sqlite.placeholders(3, 2), "?, ?");
    }
}
