//! Usage by user (per day, model, node or key) and earnings by node.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use lattice_ledger::Money;
use lattice_link::{BatchedReceipt, ReceiptInBatch, UsageReceipt};
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

/// The receipt a charge was made on, as stored with its usage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredReceipt {
    /// A receipt the node signed on its own.
    Alone(UsageReceipt),
    /// A receipt in a signed batch, with its Merkle proof rebuilt from the batch's leaves.
    Batched(BatchedReceipt),
}

impl Accounts {
    /// The receipt request `request_id` was charged on (the evidence for a dispute), if it was
    /// charged.
    pub async fn stored_receipt(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredReceipt>, StoreError> {
        self.ledger
            .sync()
            .await
            .map_err(|e| StoreError::Ledger(e.to_string()))?;
        let text: Option<Option<String>> =
            sqlx::query_scalar("SELECT receipt FROM charges WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&self.db.pool)
                .await?;
        let Some(text) = text.flatten() else {
            return Ok(None);
        };
        let corrupt = |e: String| StoreError::Corrupt(format!("receipt of {request_id}: {e}"));
        let Ok(inb) = serde_json::from_str::<ReceiptInBatch>(&text) else {
            // Charges stored before batches were stored once carry the whole evidence.
            if let Ok(whole) = serde_json::from_str::<BatchedReceipt>(&text) {
                return Ok(Some(StoredReceipt::Batched(whole)));
            }
            let alone = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
            return Ok(Some(StoredReceipt::Alone(alone)));
        };
        let row = sqlx::query("SELECT signature, leaves FROM receipt_batches WHERE root = $1")
            .bind(&inb.root)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| corrupt("its batch is missing".into()))?;
        let signature: String = row.try_get("signature")?;
        let hexed: String = row.try_get("leaves")?;
        let leaves = hex::decode(&hexed)
            .ok()
            .filter(|b| b.len() % 32 == 0)
            .map(|b| {
                b.chunks_exact(32)
                    .filter_map(|c| <[u8; 32]>::try_from(c).ok())
                    .collect::<Vec<_>>()
            })
            .ok_or_else(|| corrupt("malformed batch leaves".into()))?;
        inb.with_batch(&leaves, &signature)
            .map(|b| Some(StoredReceipt::Batched(b)))
            .ok_or_else(|| corrupt("its leaf is outside its batch".into()))
    }

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
            "SELECT {} AS g, prompt_tokens, completion_tokens, amount FROM charges
             WHERE {by} = $1 AND day >= $2 AND day <= $3 AND model IS NOT NULL",
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
                .checked_add(parse_money(&r.try_get::<String, _>("amount")?)?)
                .ok_or_else(|| StoreError::Corrupt("usage cost overflow".into()))?;
        }
        Ok(out.into_values().collect())
    }
}
