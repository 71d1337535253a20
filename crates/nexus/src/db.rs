//! Persistent state: nodes Nexus has seen and their reputation (SQLite via sqlx, migrations in
//! `migrations/`). Failures to write are logged, never fatal to serving.

use lattice_link::{ModelAd, NodeKind, Price};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

pub(crate) struct Db {
    pool: SqlitePool,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

fn now() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl Db {
    /// `url` like `sqlite://path/nexus.db` (created if missing) or `sqlite::memory:`.
    pub(crate) async fn open(url: &str) -> Result<Self, DbError> {
        let err = |source| DbError::Open {
            url: url.to_owned(),
            source,
        };
        let opts: SqliteConnectOptions = url.parse().map_err(err)?;
        let opts = opts
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(err)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Records a (re)connecting node; returns its stored reputation if it was seen before.
    pub(crate) async fn upsert_node(
        &self,
        address: &str,
        label: Option<&str>,
        kind: NodeKind,
        models: &[ModelAd],
        price: Price,
    ) -> Option<f64> {
        let previous = sqlx::query("SELECT reputation FROM nodes WHERE address = ?")
            .bind(address)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| tracing::error!(error = %e, "reading node state"))
            .ok()
            .flatten()
            .and_then(|row| row.try_get::<f64, _>("reputation").ok());
        let kind = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let models = serde_json::to_string(models).unwrap_or_else(|_| "[]".into());
        let t = now();
        let r = sqlx::query(
            "INSERT INTO nodes (address, label, kind, models, price_in, price_out, reputation, first_seen, last_seen)
             VALUES (?, ?, ?, ?, ?, ?, 0.5, ?, ?)
             ON CONFLICT(address) DO UPDATE SET label = excluded.label, kind = excluded.kind,
               models = excluded.models, price_in = excluded.price_in, price_out = excluded.price_out,
               last_seen = excluded.last_seen",
        )
        .bind(address)
        .bind(label)
        .bind(kind)
        .bind(models)
        .bind(i64::try_from(price.input_per_mtok).unwrap_or(i64::MAX))
        .bind(i64::try_from(price.output_per_mtok).unwrap_or(i64::MAX))
        .bind(t)
        .bind(t)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "saving node");
        }
        previous
    }

    pub(crate) async fn save_reputation(&self, address: &str, reputation: f64) {
        let r = sqlx::query("UPDATE nodes SET reputation = ?, last_seen = ? WHERE address = ?")
            .bind(reputation)
            .bind(now())
            .bind(address)
            .execute(&self.pool)
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "saving reputation");
        }
    }

    /// Every node ever seen: (address, label, models JSON, reputation, last_seen).
    pub(crate) async fn known_nodes(&self) -> Vec<KnownNode> {
        let rows = sqlx::query(
            "SELECT address, label, models, reputation, last_seen FROM nodes ORDER BY address",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        rows.iter()
            .map(|r| KnownNode {
                address: r.try_get("address").unwrap_or_default(),
                label: r.try_get("label").unwrap_or_default(),
                models: serde_json::from_str::<Vec<ModelAd>>(
                    &r.try_get::<String, _>("models").unwrap_or_default(),
                )
                .map(|v| v.into_iter().map(|m| m.id).collect())
                .unwrap_or_default(),
                reputation: r.try_get("reputation").unwrap_or(0.5),
                last_seen: r.try_get("last_seen").unwrap_or(0),
            })
            .collect()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KnownNode {
    pub address: String,
    pub label: Option<String>,
    pub models: Vec<String>,
    pub reputation: f64,
    pub last_seen: i64,
}
