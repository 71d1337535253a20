//! Usage by user (per day, model, node or key) and earnings by node.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use lattice_ledger::Money;
use lattice_link::{BatchedReceipt, ChargeColumns, ReceiptInBatch, UsageReceipt};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::ledger::AMOUNT_SPLIT;
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
        let row = sqlx::query(
            "SELECT receipt, model, prompt_tokens, completion_tokens FROM charges
             WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let Some(text) = row.try_get::<Option<String>, _>("receipt")? else {
            return Ok(None);
        };
        let corrupt = |e: String| StoreError::Corrupt(format!("receipt of {request_id}: {e}"));
        let model: Option<String> = row.try_get("model")?;
        // NULL only on charges without a usage record, whose receipt is JSON (never compact).
        let tokens = |c: &str| -> Result<u64, StoreError> {
            let n: Option<i64> = row.try_get(c)?;
            u64::try_from(n.unwrap_or(0)).map_err(|_| corrupt(format!("negative {c}")))
        };
        let columns = ChargeColumns {
            request_id,
            model: model.as_deref().unwrap_or_default(),
            prompt_tokens: tokens("prompt_tokens")?,
            completion_tokens: tokens("completion_tokens")?,
        };
        // The compact form (the rest of the receipt is the row), else JSON.
        let inb = ReceiptInBatch::from_compact(&text, columns)
            .or_else(|| serde_json::from_str::<ReceiptInBatch>(&text).ok());
        let Some(inb) = inb else {
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
        // The daily totals (migration 0009): a few rows per day, summed again per group.
        let sql = format!(
            "SELECT {} AS g, requests, prompt_tokens, completion_tokens, amount_hi, amount_lo
             FROM usage_daily WHERE {by} = $1 AND day >= $2 AND day <= $3",
            group.column()
        );
        let mut out: BTreeMap<String, UsageRow> = BTreeMap::new();
        let mut rows = sqlx::query(&sql)
            .bind(who)
            .bind(from)
            .bind(to)
            .fetch(&self.db.pool);
        let count = |r: &sqlx::any::AnyRow, col: &str| -> Result<u64, StoreError> {
            u64::try_from(r.try_get::<i64, _>(col)?)
                .map_err(|_| StoreError::Corrupt(format!("negative usage_daily.{col}")))
        };
        while let Some(r) = rows.try_next().await? {
            let g: String = r.try_get("g")?;
            // Requests made in a signed-in session have no key.
            let g = if g.is_empty() { "session".into() } else { g };
            let (hi, lo) = (count(&r, "amount_hi")?, count(&r, "amount_lo")?);
            let cost = u128::from(hi)
                .checked_mul(AMOUNT_SPLIT)
                .and_then(|hi| hi.checked_add(u128::from(lo)))
                .map(Money::from_units)
                .ok_or_else(|| StoreError::Corrupt("usage cost overflow".into()))?;
            let e = out.entry(g.clone()).or_insert_with(|| UsageRow {
                group: g,
                ..UsageRow::default()
            });
            e.requests = e.requests.saturating_add(count(&r, "requests")?);
            e.prompt_tokens = e.prompt_tokens.saturating_add(count(&r, "prompt_tokens")?);
            e.completion_tokens = e
                .completion_tokens
                .saturating_add(count(&r, "completion_tokens")?);
            e.cost = e
                .cost
                .checked_add(cost)
                .ok_or_else(|| StoreError::Corrupt("usage cost overflow".into()))?;
        }
        Ok(out.into_values().collect())
    }
}
