//! Usage by user (per day, model, node or key) and earnings by node.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use lattice_ledger::Money;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::ledger::parse_money;
use crate::{Accounts, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageGroup {
    Day,
    Model,
    Node,
    Key,
}

impl UsageGroup {
    fn column(self) -> &'static str {
        match self {
            UsageGroup::Day => "day",
            UsageGroup::Model => "model",
            UsageGroup::Node => "node",
            UsageGroup::Key => "key_id",
        }
    }
}

/// Totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub group: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Money,
}

impl Accounts {
    /// A user's usage between two days (inclusive, `YYYY-MM-DD`), grouped.
    pub async fn usage(
        &self,
        user_id: &str,
        from: &str,
        to: &str,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.grouped("user_id", user_id, from, to, group).await
    }

    /// What a node earned between two days, grouped (cost is what users paid for its work).
    pub async fn node_usage(
        &self,
        node: &str,
        from: &str,
        to: &str,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.grouped("node", &node.to_lowercase(), from, to, group)
            .await
    }

    async fn grouped(
        &self,
        by: &str,
        who: &str,
        from: &str,
        to: &str,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, StoreError> {
        // Read your own writes: usage records are written behind the charges.
        self.ledger
            .sync()
            .await
            .map_err(|e| StoreError::Ledger(e.to_string()))?;
        // Money is summed in Rust (it exceeds 64 bits); rows stream rather than load at once.
        let sql = format!(
            "SELECT {} AS g, prompt_tokens, completion_tokens, cost FROM usage_records
             WHERE {by} = $1 AND day >= $2 AND day <= $3",
            group.column()
        );
        let mut out: BTreeMap<String, UsageRow> = BTreeMap::new();
        let mut rows = sqlx::query(&sql)
            .bind(who)
            .bind(from)
            .bind(to)
            .fetch(&self.db.pool);
        while let Some(r) = rows.try_next().await? {
            let g: Option<String> = r.try_get("g")?;
            let g = g.unwrap_or_else(|| "session".into());
            let e = out.entry(g.clone()).or_insert_with(|| UsageRow {
                group: g,
                ..UsageRow::default()
            });
            e.requests += 1;
            e.prompt_tokens += u64::try_from(r.try_get::<i64, _>("prompt_tokens")?).unwrap_or(0);
            e.completion_tokens +=
                u64::try_from(r.try_get::<i64, _>("completion_tokens")?).unwrap_or(0);
            e.cost = e
                .cost
                .checked_add(parse_money(&r.try_get::<String, _>("cost")?)?)
                .ok_or_else(|| StoreError::Corrupt("usage cost overflow".into()))?;
        }
        Ok(out.into_values().collect())
    }
}
