//! Persistent state: nodes Nexus has seen and their reputation (SQLite via sqlx, migrations in
//! `migrations/`). Failures to write are logged, never fatal to serving.

use lattice_link::{ModelAd, NodeKind, Price};
use sqlx::{AnyPool, Row};

pub(crate) struct Db {
    pool: AnyPool,
}

fn now() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl Db {
    /// Node state lives in the accounts database (one set of migrations, SQLite or PostgreSQL).
    pub(crate) fn new(db: &lattice_accounts::Db) -> Self {
        Self {
            pool: db.pool().clone(),
        }
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
        let previous = sqlx::query("SELECT reputation FROM nodes WHERE address = $1")
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
             VALUES ($1, $2, $3, $4, $5, $6, 0.5, $7, $8)
             ON CONFLICT(address) DO UPDATE SET label = excluded.label, kind = excluded.kind,
               models = excluded.models, price_in = excluded.price_in, price_out = excluded.price_out,
               last_seen = excluded.last_seen",
        )
        .bind(address)
        .bind(label)
        .bind(kind)
        .bind(models)
        .bind(price.input_per_mtok.to_string())
        .bind(price.output_per_mtok.to_string())
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
        let r = sqlx::query("UPDATE nodes SET reputation = $1, last_seen = $2 WHERE address = $3")
            .bind(reputation)
            .bind(now())
            .bind(address)
            .execute(&self.pool)
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "saving reputation");
        }
    }

    /// Every node ever seen, with its owner when a live node token binds it.
    pub(crate) async fn known_nodes(&self) -> Vec<KnownNode> {
        // At most one live token per node address (a unique index), so one row per node.
        let rows = sqlx::query(
            "SELECT n.address, n.label, n.models, n.reputation, n.last_seen, u.address AS owner
             FROM nodes n
             LEFT JOIN node_tokens t ON t.node_address = n.address AND t.revoked_at IS NULL
             LEFT JOIN users u ON u.id = t.user_id
             ORDER BY n.address",
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
                owner: r
                    .try_get::<Option<String>, _>("owner")
                    .ok()
                    .flatten()
                    .map(|o| o.to_lowercase()),
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
    /// On-chain address of the account the node is bound to by a live node token.
    pub owner: Option<String>,
}
