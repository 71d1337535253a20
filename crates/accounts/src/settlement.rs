//! The off-chain side of settlement: which credit and usage still has to reach the chain, the
//! batches it was put in, and what the chain should show once they are applied.
//!
//! A batch is written here, entries and id included, *before* it is sent, and every item it
//! covers is marked with its id in the same transaction. So an item is in at most one batch,
//! and after a crash the settler only has to ask the chain whether each unconfirmed id was
//! applied (the contracts apply an id at most once) and resend the ones that were not.
//!
//! Settlement's items are not charges but `settle_items`: the ledger writer nets the charges
//! (and refunds) of each transaction it writes per (user, node), so a settlement batch reads and
//! marks a few rows per line, however many requests it pays for.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use lattice_ledger::{Money, Op};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{Backend, now, placeholders};
use crate::ledger::parse_money;
use crate::{Accounts, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchKind {
    /// Faucet credit minted into users' custody.
    Grant,
    /// Usage moved from users to nodes.
    Settle,
    /// Debited withdrawals released from users' custody to their destinations.
    Withdraw,
}

impl BatchKind {
    fn as_str(self) -> &'static str {
        match self {
            BatchKind::Grant => "grant",
            BatchKind::Settle => "settle",
            BatchKind::Withdraw => "withdraw",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "grant" => Ok(BatchKind::Grant),
            "settle" => Ok(BatchKind::Settle),
            "withdraw" => Ok(BatchKind::Withdraw),
            other => Err(StoreError::Corrupt(format!("unknown batch kind {other}"))),
        }
    }
}

/// One line of a batch: netted per user (grants), per (user, node) (settlement) or per
/// (user, destination) (withdrawals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    /// The user's on-chain address.
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where a withdrawal line pays to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub amount: Money,
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub requests: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBatch {
    /// `0x` + 64 hex digits, the id used on-chain.
    pub id: String,
    pub kind: BatchKind,
    pub seq: i64,
    pub entries: Vec<BatchEntry>,
    pub total: Money,
    pub confirmed: bool,
    pub created_at: i64,
    pub tx_hash: Option<String>,
    /// Items were left out of this batch by its limits (known when it is prepared; false for
    /// a batch read back): the settler prepares the next one at once rather than next tick.
    pub more: bool,
}

/// What the chain should hold for one user once every confirmed batch is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub granted: Money,
    pub deposited: Money,
    pub settled: Money,
    pub withdrawn: Money,
}

impl Expected {
    /// The custody balance the chain should show (None if the records are inconsistent).
    pub fn balance(&self) -> Option<Money> {
        self.granted
            .checked_add(self.deposited)?
            .checked_sub(self.settled)?
            .checked_sub(self.withdrawn)
    }
}

/// One user's credit on its way to and from the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChainPosition {
    /// Faucet credit minted into custody by confirmed grant batches.
    pub granted: Money,
    /// On-chain deposits credited off-chain.
    pub deposited: Money,
    /// Charges taken from custody by confirmed settlement batches.
    pub settled: Money,
    /// Faucet credit not yet minted on-chain (no batch yet, or its batch is not confirmed).
    pub unminted: Money,
    /// Charges not yet settled on-chain, less refunds not yet netted against them (never below
    /// zero: refunds of settled charges wait for later charges of the same node).
    pub unsettled: Money,
    /// Withdrawals paid out of custody by confirmed withdrawal batches.
    pub withdrawn: Money,
    /// Withdrawals debited off-chain and not yet confirmed on-chain.
    pub withdrawing: Money,
}

impl ChainPosition {
    /// The custody balance the chain should show for this user (None if inconsistent).
    pub fn expected_custody(&self) -> Option<Money> {
        self.granted
            .checked_add(self.deposited)?
            .checked_sub(self.settled)?
            .checked_sub(self.withdrawn)
    }
}

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Lines per batch. Each costs gas on-chain: ~33k when the pair was settled before in the
    /// epoch, up to ~150k when the node is paid for the first time and feeds a staked pool
    /// (`contracts/test/Gas.t.sol`); 100 of the worst kind fit a 16.7M-gas transaction.
    pub max_entries: usize,
    /// Items (charges or grants) looked at per batch.
    pub max_items: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_entries: 100,
            max_items: 20_000,
        }
    }
}

/// A batch line being netted: what it moves, what comes back off it (refunds), and its items.
struct Line {
    entry: BatchEntry,
    user_id: String,
    back: Money,
    items: Vec<String>,
    /// The refund items among `items`, and how many refunds they stand for.
    refund_items: Vec<String>,
    refunds: i64,
}

impl Accounts {
    /// Puts items not yet in any batch into a new batch `id` (recorded, not yet sent).
    /// Returns None when there is nothing to put in.
    pub async fn prepare_batch(
        &self,
        kind: BatchKind,
        id: &str,
        limits: BatchLimits,
    ) -> Result<Option<ChainBatch>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let lock = match self.db.backend {
            Backend::Postgres => " FOR UPDATE OF i SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let limit = i64::try_from(limits.max_items).unwrap_or(i64::MAX);
        let rows = match kind {
            BatchKind::Grant => {
                sqlx::query(&format!(
                    "SELECT i.op AS item, i.user_id, u.address, NULL AS node, NULL AS dest,
                            i.amount, 0 AS refund, 0 AS tokens, 0 AS requests
                     FROM chain_grants i JOIN users u ON u.id = i.user_id
                     WHERE i.batch_id IS NULL ORDER BY i.created_at, i.op LIMIT $1{lock}"
                ))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
            // Items, not charges: the ledger writer nets each batch it writes per (user, node).
            BatchKind::Settle => {
                sqlx::query(&format!(
                    "SELECT i.item, i.user_id, u.address, i.node, NULL AS dest, i.amount,
                            i.refund, i.tokens, i.requests
                     FROM settle_items i JOIN users u ON u.id = i.user_id
                     WHERE i.batch_id IS NULL ORDER BY i.created_at, i.item LIMIT $1{lock}"
                ))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
            // Only withdrawals whose debit is durably in the ledger (its op is applied).
            BatchKind::Withdraw => {
                sqlx::query(&format!(
                    "SELECT i.op AS item, i.user_id, u.address, NULL AS node,
                            i.destination AS dest, i.amount, 0 AS refund, 0 AS tokens, 0 AS requests
                     FROM withdrawals i JOIN users u ON u.id = i.user_id
                     JOIN applied_ops a ON a.op = i.op
                     WHERE i.batch_id IS NULL
                     ORDER BY i.seq LIMIT $1{lock}"
                ))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        // Net per line, in order of first appearance; items past the last line that fits wait
        // for the next batch.
        let mut lines: Vec<Line> = Vec::new();
        let mut index: BTreeMap<(String, Option<String>, Option<String>), usize> = BTreeMap::new();
        // The window is full: items beyond it wait, so debts must not stay in front of them.
        let full = rows.len() >= limits.max_items;
        // Items of lines beyond `max_entries` were left for the next batch.
        let mut left = false;
        for r in rows {
            let user: String = r.try_get("address")?;
            let node: Option<String> = r.try_get("node")?;
            let to: Option<String> = r.try_get("dest")?;
            let key = (user.clone(), node.clone(), to.clone());
            let i = match index.get(&key) {
                Some(&i) => i,
                None if lines.len() < limits.max_entries => {
                    lines.push(Line {
                        entry: BatchEntry {
                            user,
                            node,
                            to,
                            amount: Money::ZERO,
                            tokens: 0,
                            requests: 0,
                        },
                        user_id: r.try_get("user_id")?,
                        back: Money::ZERO,
                        items: Vec::new(),
                        refund_items: Vec::new(),
                        refunds: 0,
                    });
                    index.insert(key, lines.len() - 1);
                    lines.len() - 1
                }
                None => {
                    left = true;
                    continue;
                }
            };
            let line = &mut lines[i];
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            let item: String = r.try_get("item")?;
            let sum = if r.try_get::<i64, _>("refund")? != 0 {
                line.refund_items.push(item.clone());
                line.refunds = line
                    .refunds
                    .saturating_add(r.try_get::<i64, _>("requests")?);
                &mut line.back
            } else {
                line.entry.tokens = line
                    .entry
                    .tokens
                    .saturating_add(u64::try_from(r.try_get::<i64, _>("tokens")?).unwrap_or(0));
                line.entry.requests = line.entry.requests.saturating_add(
                    u32::try_from(r.try_get::<i64, _>("requests")?).unwrap_or(u32::MAX),
                );
                &mut line.entry.amount
            };
            *sum = sum
                .checked_add(amount)
                .ok_or_else(|| StoreError::Corrupt("batch amount overflow".into()))?;
            line.items.push(item);
        }
        // A line's refunds come off its charges. Refunds of charges settled before that exceed
        // what the pair was charged since wait for more charges: the line's charge items stay,
        // its refund items become one, which goes to the back of the queue when the window of
        // `max_items` is full (so old debts never fill it). Refunds that cancel the charges exactly leave nothing
        // to send, and their items are done with.
        let mut items: Vec<String> = Vec::new();
        let mut deleted: Vec<String> = Vec::new();
        let mut debts: Vec<Line> = Vec::new();
        let mut entries: Vec<BatchEntry> = Vec::new();
        for mut line in lines {
            match line.entry.amount.checked_sub(line.back) {
                // Rewritten only when there is something to fold or the window is full: a debt
                // that is one item already stays where it is, without a write every pass.
                None if line.refund_items.len() > 1 || full => {
                    deleted.extend(line.refund_items.iter().cloned());
                    debts.push(line);
                }
                None => {}
                Some(net) if net.is_zero() && !line.back.is_zero() => {
                    deleted.append(&mut line.items);
                }
                Some(net) => {
                    line.entry.amount = net;
                    items.append(&mut line.items);
                    entries.push(line.entry);
                }
            }
        }
        for chunk in deleted.chunks(500) {
            let sql = format!(
                "DELETE FROM settle_items WHERE item IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for item in chunk {
                q = q.bind(item.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        let t = now();
        for d in debts {
            let (Some(item), Some(node)) = (d.refund_items.into_iter().next(), d.entry.node) else {
                continue;
            };
            sqlx::query(
                "INSERT INTO settle_items (item, user_id, node, amount, refund, tokens, requests,
                                           created_at)
                 VALUES ($1, $2, $3, $4, 1, 0, $5, $6)",
            )
            .bind(item)
            .bind(d.user_id)
            .bind(node)
            .bind(d.back.to_string())
            .bind(d.refunds)
            .bind(t)
            .execute(&mut *tx)
            .await?;
        }
        if entries.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        let (table, key) = match kind {
            BatchKind::Grant => ("chain_grants", "op"),
            BatchKind::Settle => ("settle_items", "item"),
            BatchKind::Withdraw => ("withdrawals", "op"),
        };
        for chunk in items.chunks(500) {
            let sql = format!(
                "UPDATE {table} SET batch_id = $1 WHERE {key} IN ({})",
                placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(id);
            for item in chunk {
                q = q.bind(item.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        let total = entries
            .iter()
            .try_fold(Money::ZERO, |t, l| t.checked_add(l.amount))
            .ok_or_else(|| StoreError::Corrupt("batch total overflow".into()))?;
        let seq: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM chain_batches")
            .fetch_one(&mut *tx)
            .await?
            .try_get("seq")?;
        let created_at = t;
        let json = serde_json::to_string(&entries)
            .map_err(|e| StoreError::Corrupt(format!("batch entries: {e}")))?;
        sqlx::query(
            "INSERT INTO chain_batches (id, kind, seq, status, entries, total, created_at)
             VALUES ($1, $2, $3, 'prepared', $4, $5, $6)",
        )
        .bind(id)
        .bind(kind.as_str())
        .bind(seq)
        .bind(json)
        .bind(total.to_string())
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(ChainBatch {
            id: id.to_owned(),
            kind,
            seq,
            entries,
            total,
            confirmed: false,
            created_at,
            tx_hash: None,
            more: full || left,
        }))
    }

    /// Batches recorded but not yet confirmed on-chain, oldest first.
    pub async fn unconfirmed_batches(&self) -> Result<Vec<ChainBatch>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, seq, status, entries, total, created_at, tx_hash FROM chain_batches
             WHERE status = 'prepared' ORDER BY seq",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(batch_of).collect()
    }

    /// The most recent batches, newest first.
    pub async fn recent_batches(&self, limit: u32) -> Result<Vec<ChainBatch>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, seq, status, entries, total, created_at, tx_hash FROM chain_batches
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(batch_of).collect()
    }

    /// Marks batch `id` as applied on-chain (by transaction `tx_hash`, when this replica sent it).
    pub async fn confirm_batch(&self, id: &str, tx_hash: Option<&str>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE chain_batches SET status = 'confirmed', confirmed_at = $1,
             tx_hash = COALESCE($2, tx_hash) WHERE id = $3",
        )
        .bind(now())
        .bind(tx_hash)
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    pub async fn cursor(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query("SELECT value FROM chain_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.db.pool)
                .await?
                .map(|r| r.try_get("value"))
                .transpose()?,
        )
    }

    pub async fn set_cursor(&self, name: &str, value: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO chain_cursors (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Credits on-chain deposit `id` (`txhash:logindex`) to the user owning `address`, once.
    /// Returns false when no user has that address (the deposit stays on-chain, uncredited)
    /// or it was already credited.
    pub async fn credit_deposit(
        &self,
        id: &str,
        address: &str,
        amount: Money,
        block: i64,
    ) -> Result<bool, StoreError> {
        let Some(user) = sqlx::query("SELECT id FROM users WHERE LOWER(address) = LOWER($1)")
            .bind(address)
            .fetch_optional(&self.db.pool)
            .await?
        else {
            return Ok(false);
        };
        let user_id: String = user.try_get("id")?;
        // The ledger applies op `deposit:<id>` at most once; the row below is its record for
        // reconciliation, written after so a crash in between is repaired by the next scan.
        let applied = self
            .ledger
            .post(Op::Deposit {
                op: format!("deposit:{id}"),
                user: user_id.clone(),
                amount,
            })
            .await
            .map_err(|e| StoreError::Ledger(e.to_string()))?;
        sqlx::query(
            "INSERT INTO chain_deposits (id, user_id, amount, block, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(&user_id)
        .bind(amount.to_string())
        .bind(block)
        .bind(now())
        .execute(&self.db.pool)
        .await?;
        Ok(matches!(applied, lattice_ledger::Applied::Posted(_)))
    }

    /// What of a user's credit is on-chain already and what is still on its way.
    pub async fn chain_position(&self, user_id: &str) -> Result<ChainPosition, StoreError> {
        let mut out = ChainPosition::default();
        type Field = fn(&mut ChainPosition) -> &mut Money;
        let queries: [(&str, Field); 5] = [
            (
                "SELECT i.amount FROM chain_grants i JOIN chain_batches b ON b.id = i.batch_id
                 WHERE i.user_id = $1 AND b.status = 'confirmed'",
                |p| &mut p.granted,
            ),
            (
                "SELECT i.amount FROM chain_grants i LEFT JOIN chain_batches b ON b.id = i.batch_id
                 WHERE i.user_id = $1 AND (i.batch_id IS NULL OR b.status <> 'confirmed')",
                |p| &mut p.unminted,
            ),
            (
                "SELECT i.amount FROM chain_deposits i WHERE i.user_id = $1",
                |p| &mut p.deposited,
            ),
            (
                "SELECT i.amount FROM withdrawals i JOIN chain_batches b ON b.id = i.batch_id
                 WHERE i.user_id = $1 AND b.status = 'confirmed'",
                |p| &mut p.withdrawn,
            ),
            (
                "SELECT i.amount FROM withdrawals i JOIN applied_ops a ON a.op = i.op
                 LEFT JOIN chain_batches b ON b.id = i.batch_id
                 WHERE i.user_id = $1 AND (i.batch_id IS NULL OR b.status <> 'confirmed')",
                |p| &mut p.withdrawing,
            ),
        ];
        for (sql, field) in queries {
            // Streamed: an account may have many rows.
            let mut rows = sqlx::query(sql).bind(user_id).fetch(&self.db.pool);
            while let Some(r) = rows.try_next().await? {
                let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
                let slot = field(&mut out);
                *slot = slot
                    .checked_add(amount)
                    .ok_or_else(|| StoreError::Corrupt("chain position overflow".into()))?;
            }
        }
        // Charges and refunds, confirmed on-chain or not; a pair's refunds come off its charges.
        let mut sums = [Money::ZERO; 4];
        let mut rows = sqlx::query(
            "SELECT i.amount, i.refund,
                    CASE WHEN b.status = 'confirmed' THEN 1 ELSE 0 END AS confirmed
             FROM settle_items i LEFT JOIN chain_batches b ON b.id = i.batch_id
             WHERE i.user_id = $1",
        )
        .bind(user_id)
        .fetch(&self.db.pool);
        while let Some(r) = rows.try_next().await? {
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            let confirmed = r.try_get::<i64, _>("confirmed")? != 0;
            let refund = r.try_get::<i64, _>("refund")? != 0;
            let slot = &mut sums[usize::from(confirmed) * 2 + usize::from(refund)];
            *slot = slot
                .checked_add(amount)
                .ok_or_else(|| StoreError::Corrupt("chain position overflow".into()))?;
        }
        let [charged, refunded, settled, settled_back] = sums;
        // A confirmed batch line is never negative; refunds beyond what is not yet settled wait
        // for more charges, so nothing is on its way meanwhile.
        out.settled = settled
            .checked_sub(settled_back)
            .ok_or_else(|| StoreError::Corrupt("settled refunds exceed charges".into()))?;
        out.unsettled = charged.checked_sub(refunded).unwrap_or(Money::ZERO);
        Ok(out)
    }

    /// Per on-chain address, what confirmed batches (grants, settlements, withdrawals) and
    /// credited deposits imply.
    pub async fn chain_expectations(&self) -> Result<BTreeMap<String, Expected>, StoreError> {
        let mut out: BTreeMap<String, Expected> = BTreeMap::new();
        let mut add = |address: &str, field: fn(&mut Expected) -> &mut Money, amount: Money| {
            let slot = field(out.entry(address.to_lowercase()).or_default());
            *slot = slot
                .checked_add(amount)
                .ok_or_else(|| StoreError::Corrupt("expected balance overflow".into()))?;
            Ok::<(), StoreError>(())
        };
        // Confirmed batches carry their lines already netted per user (and node): summing them
        // reads one row per batch instead of every charge ever made.
        let batches = sqlx::query(
            "SELECT id, kind, seq, status, entries, total, created_at, tx_hash FROM chain_batches
             WHERE status = 'confirmed'",
        )
        .fetch_all(&self.db.pool)
        .await?;
        for b in batches.iter().map(batch_of) {
            let b = b?;
            let field: fn(&mut Expected) -> &mut Money = match b.kind {
                BatchKind::Grant => |e| &mut e.granted,
                BatchKind::Settle => |e| &mut e.settled,
                BatchKind::Withdraw => |e| &mut e.withdrawn,
            };
            for line in &b.entries {
                add(&line.user, field, line.amount)?;
            }
        }
        let deposits = sqlx::query(
            "SELECT u.address, i.amount FROM chain_deposits i JOIN users u ON u.id = i.user_id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        for r in deposits {
            let address: String = r.try_get("address")?;
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            add(&address, |e| &mut e.deposited, amount)?;
        }
        Ok(out)
    }
}

fn batch_of(r: &sqlx::any::AnyRow) -> Result<ChainBatch, StoreError> {
    let entries: String = r.try_get("entries")?;
    Ok(ChainBatch {
        id: r.try_get("id")?,
        kind: BatchKind::parse(&r.try_get::<String, _>("kind")?)?,
        seq: r.try_get("seq")?,
        entries: serde_json::from_str(&entries)
            .map_err(|e| StoreError::Corrupt(format!("batch entries: {e}")))?,
        total: parse_money(&r.try_get::<String, _>("total")?)?,
        confirmed: r.try_get::<String, _>("status")? == "confirmed",
        created_at: r.try_get("created_at")?,
        tx_hash: r.try_get("tx_hash")?,
        more: false,
    })
}
